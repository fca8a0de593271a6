"""Quotas over HTTP: exact fits, 507 before the body or as the stream passes the quota, tus,
records, replaces counting the difference, racing uploads, the CLI and the default quota."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from conftest import (
    Server,
    User,
    assert_problem,
    http_chunk,
    make_settings,
    make_user,
    raw_connection,
    read_response,
    request_head,
    serve_in_thread,
    tus_metadata,
    upload,
)
from media_samples import make_wav

from mediad import cli

TUS = {"Tus-Resumable": "1.0.0"}
BOUNDARY = "quota-boundary"
ENVELOPE = 64 * 1024


async def set_quota(server: Server, user: User, quota: int | None) -> None:
    conn = await asyncpg.connect(server.database_url)
    try:
        await conn.execute("UPDATE users SET quota = $1 WHERE name = $2", quota, user.name)
    finally:
        await conn.close()


async def usage(client: httpx.AsyncClient, user: User) -> dict[str, Any]:
    response = await client.get("/usage", headers=user.auth)
    assert response.status_code == 200
    body: dict[str, Any] = response.json()
    return body


async def state(server: Server) -> tuple[list[tuple[Any, ...]], list[Path], list[Path]]:
    conn = await asyncpg.connect(server.database_url)
    try:
        rows = [tuple(r) for r in await conn.fetch("SELECT id, size, blob_id FROM files ORDER BY id")]
    finally:
        await conn.close()
    return rows, server.blob_files(), server.partial_files()


def assert_quota_problem(response: httpx.Response, quota: int, used: int) -> None:
    body = assert_problem(response, 507)
    assert body["type"].endswith("/quota-exceeded")
    assert f"quota of {quota} bytes" in body["detail"] and f"{used} bytes are in use" in body["detail"], body


async def no_temp_files(server: Server) -> None:
    for _ in range(250):
        if not server.stray_temp_files():
            return
        await asyncio.sleep(0.02)
    assert server.stray_temp_files() == []


async def test_an_exact_fit_succeeds_and_usage_shows_the_quota(server: Server, client: httpx.AsyncClient,
                                                               user: User) -> None:
    assert await usage(client, user) == {"files": 0, "bytes": 0, "quota": None}
    await set_quota(server, user, 100)
    await upload(client, user, b"a" * 60, path="/a.bin")
    await upload(client, user, b"b" * 40, name="b.bin")
    await upload(client, user, b"", name="empty.bin")  # nothing over the quota: still fits
    assert await usage(client, user) == {"files": 3, "bytes": 100, "quota": 100}
    assert_quota_problem(await client.put("/files", headers=user.auth, params={"path": "/c.bin"}, content=b"c"),
                         100, 100)


@pytest.mark.parametrize("method,target,content_type,declared", [
    ("POST", "/files?name=big.bin", "application/octet-stream", 101),
    ("PUT", "/files?path=/big.bin", "application/octet-stream", 101),
    ("POST", "/files", f"multipart/form-data; boundary={BOUNDARY}", 101 + ENVELOPE),
])
async def test_one_byte_over_is_507_before_the_body_when_declared(
        server: Server, client: httpx.AsyncClient, user: User, method: str, target: str, content_type: str,
        declared: int) -> None:
    await set_quota(server, user, 100)
    before = await state(server)
    async with raw_connection(server) as (reader, writer):
        writer.write(request_head(method, target, {"Authorization": f"Bearer {user.token}",
                                                   "Content-Type": content_type, "Content-Length": str(declared)}))
        await writer.drain()
        # Not one byte of the body was sent: the answer can only come from the declared length.
        response = await read_response(reader)
    assert_quota_problem(response, 100, 0)
    assert await state(server) == before


@pytest.mark.parametrize("kind", ["raw", "multipart"])
async def test_a_stream_without_a_length_is_507_as_soon_as_it_passes_the_quota(
        server: Server, client: httpx.AsyncClient, user: User, kind: str) -> None:
    await set_quota(server, user, 1000)
    await upload(client, user, b"x" * 100, path="/used.bin")
    before = await state(server)
    multipart = kind == "multipart"
    prefix = (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"big.bin\"\r\n\r\n"
              .encode() if multipart else b"")
    content_type = f"multipart/form-data; boundary={BOUNDARY}" if multipart else "application/octet-stream"
    async with raw_connection(server) as (reader, writer):
        writer.write(request_head("PUT" if not multipart else "POST", "/files?path=/big.bin" if not multipart
                                  else "/files", {"Authorization": f"Bearer {user.token}",
                                                  "Content-Type": content_type, "Transfer-Encoding": "chunked"}))
        with contextlib.suppress(ConnectionError):
            writer.write(http_chunk(prefix + b"y" * 600))
            writer.write(http_chunk(b"y" * 600))  # 1,200 bytes: past the 900 left; the body never ends
            await writer.drain()
        response = await read_response(reader)
    assert_quota_problem(response, 1000, 100)
    await no_temp_files(server)
    assert await state(server) == before


async def test_tus_creation_over_the_quota_is_507_and_each_patch_checks_again(
        server: Server, client: httpx.AsyncClient, user: User) -> None:
    await set_quota(server, user, 100)
    meta = "filename " + base64.b64encode(b"t.bin").decode()
    response = await client.post("/uploads", headers={**user.auth, **TUS, "Upload-Length": "101",
                                                      "Upload-Metadata": meta})
    assert_quota_problem(response, 100, 0)
    assert response.headers["tus-resumable"] == "1.0.0"
    assert await state(server) == ([], [], [])

    created = await client.post("/uploads", headers={**user.auth, **TUS, "Upload-Length": "60",
                                                     "Upload-Metadata": meta})
    assert created.status_code == 201
    location = created.headers["location"]
    await upload(client, user, b"z" * 50, name="meanwhile.bin")  # 50 + 60 > 100 now
    patched = await client.patch(location, content=b"t" * 60, headers={
        **user.auth, **TUS, "Upload-Offset": "0", "Content-Type": "application/offset+octet-stream"})
    assert_quota_problem(patched, 100, 50)
    head = await client.head(location, headers={**user.auth, **TUS})
    assert head.headers["upload-offset"] == "0"
    assert await usage(client, user) == {"files": 1, "bytes": 50, "quota": 100}


async def test_a_tus_upload_that_replaces_counts_the_difference_at_each_patch(
        server: Server, client: httpx.AsyncClient, user: User) -> None:
    await set_quota(server, user, 100)
    await upload(client, user, b"o" * 60, path="/a.bin")
    created = await client.post("/uploads", headers={**user.auth, **TUS, "Upload-Length": "80",
                                                     "Upload-Metadata": tus_metadata(filename="a.bin", path="/")})
    assert created.status_code == 201, created.text
    location = created.headers["location"]
    patch = {**user.auth, **TUS, "Content-Type": "application/offset+octet-stream"}
    assert (await client.patch(location, content=b"n" * 30, headers={**patch, "Upload-Offset": "0"})).status_code == 204
    done = await client.patch(location, content=b"n" * 50, headers={**patch, "Upload-Offset": "30"})
    assert done.status_code == 204 and done.headers["upload-offset"] == "80"
    assert await usage(client, user) == {"files": 1, "bytes": 80, "quota": 100}
    replaced = (await client.get("/download", headers=user.auth, params={"path": "/a.bin"})).content
    assert replaced == b"n" * 80


async def test_racing_uploads_that_fit_alone_but_not_together_get_exactly_one_507(
        server: Server, client: httpx.AsyncClient, user: User) -> None:
    await set_quota(server, user, 100)
    for round_ in range(6):
        responses = await asyncio.gather(*(
            client.put("/files", headers=user.auth, params={"path": f"/race/{round_}-{i}.bin"}, content=b"r" * 60)
            for i in range(2)))
        assert sorted(r.status_code for r in responses) == [201, 507], [r.text for r in responses]
        assert_quota_problem(next(r for r in responses if r.status_code == 507), 100, 60)
        assert (await usage(client, user))["bytes"] == 60
        winner = next(r for r in responses if r.status_code == 201).json()
        await no_temp_files(server)
        assert len(server.blob_files()) == 1
        assert (await client.delete(f"/files/{winner['id']}", headers=user.auth)).status_code == 204


async def test_a_replace_counts_the_difference(server: Server, client: httpx.AsyncClient, user: User) -> None:
    await set_quota(server, user, 100)
    await upload(client, user, b"1" * 80, path="/doc.bin")
    # 80 in use, but replacing those 80 with 95 takes usage to 95, not 175.
    replaced = await client.put("/files", headers=user.auth, params={"path": "/doc.bin"}, content=b"2" * 95)
    assert replaced.status_code == 200, replaced.text
    assert_quota_problem(await client.put("/files", headers=user.auth, params={"path": "/other.bin"},
                                          content=b"3" * 6), 100, 95)
    replaced = await client.put("/files", headers=user.auth, params={"path": "/doc.bin"}, content=b"4" * 100)
    assert replaced.status_code == 200
    assert_quota_problem(await client.put("/files", headers=user.auth, params={"path": "/doc.bin"},
                                          content=b"5" * 101), 100, 0)
    # Named by a folder path and ?name=, the replaced file is credited before the body too.
    async with raw_connection(server) as (reader, writer):
        writer.write(request_head("PUT", "/files?path=/&name=doc.bin", {
            "Authorization": f"Bearer {user.token}", "Content-Length": "100"}) + b"6" * 100)
        await writer.drain()
        assert (await read_response(reader)).status_code == 200
    assert await usage(client, user) == {"files": 1, "bytes": 100, "quota": 100}


def form_body(*parts: tuple[str, str | None, bytes]) -> bytes:
    """A multipart/form-data body of (field name, filename or None, content) parts."""
    body = b""
    for name, filename, content in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        body += f"--{BOUNDARY}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + content + b"\r\n"
    return body + f"--{BOUNDARY}--\r\n".encode()


async def streamed(body: bytes) -> AsyncIterator[bytes]:
    """A chunked request body: no declared length, so only the check as it streams applies."""
    for start in range(0, len(body), 16 * 1024):
        yield body[start:start + 16 * 1024]


@pytest.mark.parametrize("declared", [True, False])
@pytest.mark.parametrize("where", ["path-field", "path-field-after-the-file", "folder-query"])
async def test_a_multipart_replace_counts_the_difference_wherever_its_path_is(
        server: Server, client: httpx.AsyncClient, user: User, where: str, declared: bool) -> None:
    KiB = 1024
    await set_quota(server, user, 200 * KiB)
    await upload(client, user, b"1" * 150 * KiB, path="/doc.bin")
    await upload(client, user, b"2" * 20 * KiB, path="/other.bin")
    # 170 KiB in use; 120 KiB replacing the 150 take usage to 140 KiB, not 290 (or 226 before the
    # body, counting the declared length less the envelope allowance).
    data = b"3" * 120 * KiB
    parts = {"path-field": [("path", None, b"/doc.bin"), ("file", "doc.bin", data)],
             "path-field-after-the-file": [("file", "doc.bin", data), ("path", None, b"/doc.bin")],
             "folder-query": [("file", "doc.bin", data)]}[where]
    form = {**user.auth, "content-type": f"multipart/form-data; boundary={BOUNDARY}"}
    body = form_body(*parts)
    response = await client.post("/files", headers=form, params={"path": "/"} if where == "folder-query" else {},
                                 content=body if declared else streamed(body))
    assert response.status_code == 200, response.text
    assert (response.json()["path"], response.json()["size"]) == ("/doc.bin", 120 * KiB)
    assert await usage(client, user) == {"files": 2, "bytes": 140 * KiB, "quota": 200 * KiB}
    # The exact check at commit still holds: 100 KiB replacing /other.bin's 20 take usage to 220 KiB.
    before = await state(server)
    too_big = form_body(("path", None, b"/other.bin"), ("file", "other.bin", b"4" * 100 * KiB))
    response = await client.post("/files", headers=form, content=too_big)
    assert_quota_problem(response, 200 * KiB, 120 * KiB)
    assert "would take usage to 225280 bytes" in response.json()["detail"]
    await no_temp_files(server)
    assert await state(server) == before


async def test_records_count_too(server: Server, client: httpx.AsyncClient, user: User, tmp_path: Path) -> None:

    await set_quota(server, user, 1000)  # far less than the MP3 of a second of sound
    wav = make_wav(tmp_path / "tone.wav", 1.0).read_bytes()
    response = await client.post("/records", headers=user.auth, files={"file": ("tone.wav", wav, "audio/wav")})
    assert_quota_problem(response, 1000, 0)
    await no_temp_files(server)
    assert await state(server) == ([], [], [])


async def test_the_cli_sets_and_clears_a_quota(server: Server, client: httpx.AsyncClient, user: User,
                                               monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("MEDIAD_DATABASE_URL", server.database_url)
    root = logging.getLogger()
    # The CLI sets up logging as a process of its own would; the test process keeps its handlers.
    monkeypatch.setattr(root, "handlers", list(root.handlers))
    monkeypatch.setattr(root, "level", root.level)

    def run(*args: str) -> int:
        return cli.main(["users", "set-quota", *args])

    assert await asyncio.to_thread(run, user.name.upper(), "2KiB") == 0
    assert "2048 bytes" in capsys.readouterr().out
    assert (await usage(client, user))["quota"] == 2048
    assert await asyncio.to_thread(run, user.name, "none") == 0
    assert (await usage(client, user))["quota"] is None
    assert await asyncio.to_thread(run, "nobody-by-this-name", "100") == 1
    assert await asyncio.to_thread(run, user.name, "lots") == 2
    assert (await usage(client, user))["quota"] is None


async def test_new_users_get_the_default_quota(database_url: str, tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "data", default_quota_bytes=5000)
    with serve_in_thread(settings, database_url) as running:
        async with httpx.AsyncClient(base_url=running.url, timeout=30) as http:
            user = await make_user(http)
            assert await usage(http, user) == {"files": 0, "bytes": 0, "quota": 5000}
            assert_quota_problem(await http.post("/files", headers=user.auth, params={"name": "big.bin"},
                                                 content=b"b" * 5001), 5000, 0)
            await upload(http, user, b"b" * 5000, name="fits.bin")

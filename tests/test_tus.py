"""Resumable uploads (tus 1.0.0) end to end: tuspy, raw HTTP, resumption, crashes, races."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import os
import signal
import socket
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import httpx
import pytest
from conftest import (
    Server,
    User,
    assert_problem,
    make_settings,
    make_user,
    mediad_process,
    serve_in_thread,
    tus_metadata,
    wait_for,
)
from tusclient.client import TusClient

from mediad.cleanup import sweep
from mediad.config import Settings
from mediad.db import create_engine
from mediad.storage import Storage
from mediad.tus import Hashes

MiB = 1024 * 1024
TUS = {"Tus-Resumable": "1.0.0"}


async def create(http: httpx.AsyncClient, user: User, length: int, **meta: str) -> str:
    response = await http.post("/uploads", headers={**user.auth, **TUS, "Upload-Length": str(length),
                                                    "Upload-Metadata": tus_metadata(**(meta or {"filename": "a.bin"}))})
    assert response.status_code == 201, response.text
    assert response.headers["tus-resumable"] == "1.0.0" and response.headers["upload-expires"]
    return response.headers["location"]


async def patch(http: httpx.AsyncClient, user: User, location: str, offset: int, body: bytes | AsyncIterator[bytes],
                **headers: str) -> httpx.Response:
    return await http.patch(location, content=body, headers={
        **user.auth, **TUS, "Upload-Offset": str(offset), "Content-Type": "application/offset+octet-stream",
        **headers})


async def offset_of(http: httpx.AsyncClient, user: User, location: str) -> int:
    response = await http.head(location, headers={**user.auth, **TUS})
    assert response.status_code == 200 and response.headers["cache-control"] == "no-store"
    return int(response.headers["upload-offset"])


async def test_tuspy_uploads_64_mib_in_5_mib_chunks_to_a_path(server: Server, client: httpx.AsyncClient,
                                                              user: User) -> None:
    data = os.urandom(64 * MiB)
    tus = TusClient(server.url + "/uploads", headers=user.auth)
    uploader = tus.uploader(file_stream=io.BytesIO(data), chunk_size=5 * MiB, upload_checksum=True,
                            metadata={"filename": "Видео 1.mp4", "path": "/videos/"})
    await asyncio.to_thread(uploader.upload)
    listed = (await client.get("/files?prefix=/videos/", headers=user.auth)).json()["files"]
    assert len(listed) == 1
    file = listed[0]
    assert file["sha256"] == hashlib.sha256(data).hexdigest() and file["size"] == len(data)
    assert file["path"] == "/videos/Видео 1.mp4"
    downloaded = await client.get(f"/files/{file['id']}/content", headers=user.auth)
    assert downloaded.content == data
    status = (await client.get(uploader.url, headers=user.auth)).json()
    assert status["offset"] == status["length"] == len(data) and status["file_id"] == file["id"]
    assert server.stray_temp_files() == [] and server.partial_files() == []


async def test_options_discovery_needs_no_token(client: httpx.AsyncClient) -> None:
    response = await client.options("/uploads")
    assert response.status_code == 204
    assert response.headers["tus-version"] == "1.0.0" and response.headers["tus-resumable"] == "1.0.0"
    assert set(response.headers["tus-extension"].split(",")) == {
        "creation", "creation-with-upload", "termination", "checksum", "expiration"}
    assert int(response.headers["tus-max-size"]) > 0
    assert set(response.headers["tus-checksum-algorithm"].split(",")) == {"sha1", "sha256", "md5"}


async def test_creation_with_upload_and_patches_complete_a_file(client: httpx.AsyncClient, user: User) -> None:
    data = os.urandom(300_000)
    response = await client.post("/uploads", content=data[:100_000], headers={
        **user.auth, **TUS, "Upload-Length": str(len(data)), "Upload-Metadata": tus_metadata(filename="x.bin"),
        "Content-Type": "application/offset+octet-stream"})
    assert response.status_code == 201 and response.headers["upload-offset"] == "100000"
    location = response.headers["location"]
    middle = await patch(client, user, location, 100_000, data[100_000:200_000])
    assert middle.status_code == 204 and middle.headers["upload-offset"] == "200000"
    assert "mediad-file-id" not in middle.headers
    last = await patch(client, user, location, 200_000, data[200_000:])
    assert last.status_code == 204 and last.headers["upload-offset"] == str(len(data))
    # The expiration extension: every PATCH answer says when the upload expires.
    assert middle.headers["upload-expires"] == last.headers["upload-expires"] == response.headers["upload-expires"]
    file = (await client.get(f"/files/{last.headers['mediad-file-id']}", headers=user.auth)).json()
    assert file["sha256"] == hashlib.sha256(data).hexdigest() and file["name"] == "x.bin" and file["path"] is None


async def test_media_types_match_case_insensitively(client: httpx.AsyncClient, user: User) -> None:
    """RFC 9110 §8.3.1: type and subtype are case-insensitive, parameters may follow."""
    data = os.urandom(3000)
    response = await client.post("/uploads", content=data[:1000], headers={
        **user.auth, **TUS, "Upload-Length": "3000", "Upload-Metadata": tus_metadata(filename="c.bin"),
        "Content-Type": "Application/Offset+Octet-Stream"})
    assert response.status_code == 201 and response.headers["upload-offset"] == "1000"
    answers = [await patch(client, user, response.headers["location"], start, data[start:start + 1000],
                           **{"Content-Type": kind})
               for start, kind in ((1000, "APPLICATION/OFFSET+OCTET-STREAM ; x=y"),
                                   (2000, "application/Offset+octet-Stream"))]
    assert [(a.status_code, a.headers["upload-offset"]) for a in answers] == [(204, "2000"), (204, "3000")]
    file = (await client.get(f"/files/{answers[1].headers['mediad-file-id']}", headers=user.auth)).json()
    assert file["sha256"] == hashlib.sha256(data).hexdigest() and file["size"] == 3000


async def test_zero_length_upload_is_a_file_at_once(client: httpx.AsyncClient, user: User) -> None:
    response = await client.post("/uploads", headers={**user.auth, **TUS, "Upload-Length": "0",
                                                      "Upload-Metadata": tus_metadata(filename="empty.txt")})
    assert response.status_code == 201 and response.headers["upload-offset"] == "0"
    file = (await client.get(f"/files/{response.headers['mediad-file-id']}", headers=user.auth)).json()
    assert file["size"] == 0 and file["sha256"] == hashlib.sha256(b"").hexdigest()


async def test_a_patch_cut_off_keeps_the_bytes_that_arrived(server: Server, client: httpx.AsyncClient,
                                                             user: User) -> None:
    data = os.urandom(4 * MiB)
    location = await create(client, user, len(data))
    half = 2 * MiB + 12345
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:  # a raw client that drops mid-body
        sock.sendall((f"PATCH {location} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {user.token}\r\n"
                      f"Tus-Resumable: 1.0.0\r\nUpload-Offset: 0\r\nContent-Type: application/offset+octet-stream\r\n"
                      f"Content-Length: {len(data)}\r\n\r\n").encode() + data[:half])
        await asyncio.sleep(0.3)

    async def kept() -> bool:
        return await offset_of(client, user, location) == half

    await wait_for(kept, what="the bytes that arrived to be kept")
    done = await patch(client, user, location, half, data[half:])
    assert done.status_code == 204
    file = (await client.get(f"/files/{done.headers['mediad-file-id']}", headers=user.auth)).json()
    assert file["sha256"] == hashlib.sha256(data).hexdigest()


async def test_a_last_chunk_whose_framing_is_cut_off_still_makes_the_file(server: Server, client: httpx.AsyncClient,
                                                                          user: User) -> None:
    """Every byte of the upload arrived, only the chunked body's final zero-length chunk did not:
    the upload is complete, so it becomes a File (not an upload stuck at its full length)."""
    data = os.urandom(100_000)
    location = await create(client, user, len(data))
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall((f"PATCH {location} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {user.token}\r\n"
                      f"Tus-Resumable: 1.0.0\r\nUpload-Offset: 0\r\nContent-Type: application/offset+octet-stream\r\n"
                      f"Transfer-Encoding: chunked\r\n\r\n{len(data):x}\r\n").encode() + data + b"\r\n")
        await asyncio.sleep(0.3)

    async def finished() -> bool:
        return (await client.get(location, headers=user.auth)).json()["file_id"] is not None

    await wait_for(finished, what="the upload to become a File")
    file_id = (await client.get(location, headers=user.auth)).json()["file_id"]
    file = (await client.get(f"/files/{file_id}", headers=user.auth)).json()
    assert file["sha256"] == hashlib.sha256(data).hexdigest() and file["size"] == len(data)


async def test_creation_with_upload_verifies_its_checksum_and_leaves_nothing_when_refused(
        server: Server, client: httpx.AsyncClient, user: User) -> None:
    data = os.urandom(5000)

    def post(checksum: bytes) -> object:
        return client.post("/uploads", content=data[:1000], headers={
            **user.auth, **TUS, "Upload-Length": str(len(data)), "Upload-Metadata": tus_metadata(filename="k.bin"),
            "Content-Type": "application/offset+octet-stream",
            "Upload-Checksum": f"sha256 {base64.b64encode(checksum).decode()}"})

    refused = await post(hashlib.sha256(b"other").digest())
    assert_problem(refused, 460)
    assert "location" not in refused.headers and server.partial_files() == []
    conn = await asyncpg.connect(server.database_url)
    try:
        assert await conn.fetchval("SELECT count(*) FROM uploads WHERE owner_id = $1", uuid.UUID(user.id)) == 0
    finally:
        await conn.close()
    accepted = await post(hashlib.sha256(data[:1000]).digest())
    assert accepted.status_code == 201 and accepted.headers["upload-offset"] == "1000"


async def test_checksums_are_verified_per_chunk(client: httpx.AsyncClient, user: User) -> None:
    data = os.urandom(200_000)
    location = await create(client, user, len(data))
    for algorithm in ("sha1", "sha256", "md5"):
        wrong = base64.b64encode(hashlib.new(algorithm, b"other").digest()).decode()
        response = await patch(client, user, location, 0, data[:1000], **{"Upload-Checksum": f"{algorithm} {wrong}"})
        assert_problem(response, 460)
        assert response.headers["tus-resumable"] == "1.0.0"
        assert await offset_of(client, user, location) == 0
    right = base64.b64encode(hashlib.sha1(data[:1000]).digest()).decode()
    ok = await patch(client, user, location, 0, data[:1000], **{"Upload-Checksum": f"sha1 {right}"})
    assert ok.status_code == 204 and ok.headers["upload-offset"] == "1000"
    assert_problem(await patch(client, user, location, 1000, data[1000:], **{"Upload-Checksum": "crc32 AAAA"}), 400)
    rest = await patch(client, user, location, 1000, data[1000:])
    file = (await client.get(f"/files/{rest.headers['mediad-file-id']}", headers=user.auth)).json()
    assert file["sha256"] == hashlib.sha256(data).hexdigest()


async def test_racing_patches_never_interleave(server: Server, client: httpx.AsyncClient, user: User) -> None:
    data = os.urandom(2 * MiB)
    location = await create(client, user, len(data))
    upload_id = location.rsplit("/", 1)[1]
    rival_answered = asyncio.Event()

    async def slow_body() -> AsyncIterator[bytes]:
        yield data[:64 * 1024]
        await rival_answered.wait()  # the first PATCH holds its claim until the rival has its answer
        for start in range(64 * 1024, MiB, 64 * 1024):
            yield data[start:start + 64 * 1024]

    async def locked() -> bool:
        conn = await asyncpg.connect(server.database_url)
        try:
            return bool(await conn.fetchval("SELECT lock_until IS NOT NULL FROM uploads WHERE id = $1", upload_id))
        finally:
            await conn.close()

    async def rival() -> httpx.Response:
        try:
            await wait_for(locked, what="the first PATCH's claim")
            return await patch(client, user, location, 0, b"\x00" * MiB)
        finally:
            rival_answered.set()

    first, second = await asyncio.gather(patch(client, user, location, 0, slow_body()), rival())
    assert first.status_code == 204 and first.headers["upload-offset"] == str(MiB)
    assert_problem(second, 423)
    stale = await patch(client, user, location, 0, data[:10])
    assert_problem(stale, 409)
    last = await patch(client, user, location, MiB, data[MiB:])
    file = (await client.get(f"/files/{last.headers['mediad-file-id']}", headers=user.auth)).json()
    assert file["sha256"] == hashlib.sha256(data).hexdigest()


async def test_bad_requests_get_clear_answers(client: httpx.AsyncClient, user: User, other_user: User) -> None:
    no_version = await client.post("/uploads", headers={**user.auth, "Upload-Length": "5",
                                                        "Upload-Metadata": tus_metadata(filename="a")})
    assert_problem(no_version, 412)
    assert no_version.headers["tus-version"] == "1.0.0"

    def post(**headers: str) -> object:
        return client.post("/uploads", headers={**user.auth, **TUS, **headers})

    assert_problem(await post(**{"Upload-Metadata": tus_metadata(filename="a")}), 400)  # no Upload-Length
    assert_problem(await post(**{"Upload-Length": "5"}), 400)  # no filename
    assert_problem(await post(**{"Upload-Length": "5", "Upload-Metadata": "filename !!notbase64"}), 400)
    assert_problem(await post(**{"Upload-Length": str(10**15), "Upload-Metadata": tus_metadata(filename="a")}), 413)
    superscript = await client.post("/uploads", headers=[*user.auth.items(), *TUS.items(), ("Upload-Length", b"\xb2"),
                                                        ("Upload-Metadata", tus_metadata(filename="a"))])
    assert_problem(superscript, 400)  # "²".isdigit(), but it is no number
    assert superscript.headers["tus-resumable"] == "1.0.0"
    relative = tus_metadata(filename="a", path="rel/x")
    assert_problem(await post(**{"Upload-Length": "5", "Upload-Metadata": relative}), 422)
    unauthorized = await client.post("/uploads", headers={**TUS, "Upload-Length": "5"})
    assert_problem(unauthorized, 401)
    assert unauthorized.headers["tus-resumable"] == "1.0.0"

    location = await create(client, user, 10)
    wrong_type = await client.patch(location, content=b"x", headers={**user.auth, **TUS, "Upload-Offset": "0",
                                                                      "Content-Type": "text/plain"})
    assert_problem(wrong_type, 415)
    assert_problem(await patch(client, user, location, 3, b"abc"), 409)
    assert_problem(await patch(client, user, location, 0, b"x" * 11), 413)
    assert await offset_of(client, user, location) == 0
    assert_problem(await patch(client, other_user, location, 0, b"abc"), 404)
    assert (await client.head(location, headers={**other_user.auth, **TUS})).status_code == 404  # HEAD: no body
    assert_problem(await client.get("/uploads/not-a-uuid", headers=user.auth), 404)


async def test_termination_removes_the_partial_bytes(server: Server, client: httpx.AsyncClient, user: User) -> None:
    location = await create(client, user, 1000)
    assert (await patch(client, user, location, 0, b"y" * 500)).status_code == 204
    assert len(server.partial_files()) == 1
    deleted = await client.delete(location, headers={**user.auth, **TUS})
    assert deleted.status_code == 204 and deleted.headers["tus-resumable"] == "1.0.0"
    assert server.partial_files() == []
    assert (await client.head(location, headers={**user.auth, **TUS})).status_code == 404


async def sweep_once(database_url: str, settings: Settings) -> int:
    """One cleanup pass over `settings.data_dir`, as `mediad cleanup --once` runs it; → uploads removed."""
    engine = create_engine(database_url, settings)
    storage = Storage(settings.data_dir)
    storage.prepare()
    try:
        return (await sweep(engine, storage, settings)).uploads_removed
    finally:
        await engine.dispose()


async def test_expired_uploads_are_404_and_cleaned_up(database_url: str, tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "data", upload_expire_s=1, cleanup_interval_s=0)
    with serve_in_thread(settings, database_url) as running:
        async with httpx.AsyncClient(base_url=running.url, timeout=30) as http:
            user = await make_user(http)
            location = await create(http, user, 100)
            assert (await patch(http, user, location, 0, b"z" * 50)).status_code == 204
            await asyncio.sleep(1.5)
            assert (await http.head(location, headers={**user.auth, **TUS})).status_code == 404
            assert_problem(await patch(http, user, location, 50, b"z" * 50), 404)
            assert await sweep_once(database_url, settings) == 1
            assert list((settings.data_dir / "uploads").iterdir()) == []
            conn = await asyncpg.connect(database_url)
            try:
                assert await conn.fetchval("SELECT count(*) FROM uploads") == 0
            finally:
                await conn.close()


async def test_an_upload_swept_while_a_patch_writes_is_404_not_acknowledged(database_url: str,
                                                                          tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "data", upload_expire_s=1, cleanup_interval_s=0)
    swept = asyncio.Event()

    async def body() -> AsyncIterator[bytes]:
        yield b"a" * 1000
        await swept.wait()
        yield b"b" * 1000

    async def sweep_when_expired() -> int:
        await asyncio.sleep(1.5)
        try:
            return await sweep_once(database_url, settings)
        finally:
            swept.set()

    with serve_in_thread(settings, database_url) as running:
        async with httpx.AsyncClient(base_url=running.url, timeout=30) as http:
            user = await make_user(http)
            location = await create(http, user, 5000)
            answer, removed = await asyncio.gather(patch(http, user, location, 0, body()), sweep_when_expired())
            assert removed == 1
            assert_problem(answer, 404)
            assert list((settings.data_dir / "uploads").iterdir()) == []


async def test_a_revoked_token_stops_patching_at_once(client: httpx.AsyncClient, user: User) -> None:
    second = await client.post("/auth/tokens", headers=user.auth, json={"name": "uploader"})
    assert second.status_code == 201
    uploader = User(user.id, user.name, second.json()["token"])
    location = await create(client, uploader, 100)
    assert (await patch(client, uploader, location, 0, b"r" * 40)).status_code == 204  # its check now cached
    revoked = await client.delete(f"/auth/tokens/{second.json()['id']}", headers=user.auth)
    assert revoked.status_code == 204
    assert_problem(await patch(client, uploader, location, 40, b"r" * 60), 401)
    assert await offset_of(client, user, location) == 40


async def test_kill_9_loses_no_acknowledged_byte(database_url: str, tmp_path: Path) -> None:
    data = os.urandom(6 * MiB)
    with mediad_process(tmp_path / "data", database_url=database_url) as running:
        async with httpx.AsyncClient(base_url=running.url, timeout=30) as http:
            user = await make_user(http)
            location = await create(http, user, len(data), filename="crash.bin")
            acknowledged = 0
            for start in range(0, 3 * MiB, MiB):
                response = await patch(http, user, location, start, data[start:start + MiB])
                assert response.status_code == 204
                acknowledged = int(response.headers["upload-offset"])
        assert running.process is not None
        running.process.send_signal(signal.SIGKILL)
        running.process.wait(10)
    with mediad_process(tmp_path / "data", database_url=database_url) as restarted:
        async with httpx.AsyncClient(base_url=restarted.url, timeout=30) as http:
            offset = await offset_of(http, user, location)
            assert offset >= acknowledged
            done = await patch(http, user, location, offset, data[offset:])
            assert done.status_code == 204
            file = (await http.get(f"/files/{done.headers['mediad-file-id']}", headers=user.auth)).json()
            assert file["sha256"] == hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("length", [1, 5 * MiB + 3])
async def test_status_json(client: httpx.AsyncClient, user: User, length: int) -> None:
    location = await create(client, user, length)
    status = (await client.get(location, headers=user.auth)).json()
    assert status["offset"] == 0 and status["length"] == length and status["file_id"] is None
    assert status["expires_at"].endswith("Z") and status["id"] in location


def test_cached_hashes_of_expired_uploads_are_pruned() -> None:
    hashes = Hashes()
    now = datetime.now(UTC)
    abandoned, live = uuid.uuid4(), uuid.uuid4()
    hashes.put(abandoned, 10, hashlib.sha256(b"0123456789"), now - timedelta(seconds=1))
    assert hashes.get(abandoned, 10) is None and len(hashes) == 0
    hasher = hashlib.sha256(b"abc")
    hashes.put(live, 3, hasher, now + timedelta(hours=1))
    assert hashes.get(live, 3) is hasher and hashes.get(live, 4) is None  # only at its own offset
    hashes.drop(live)
    assert len(hashes) == 0

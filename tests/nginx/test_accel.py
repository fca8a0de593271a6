"""mediad behind nginx with MEDIAD_ACCEL_REDIRECT: mediad decides, nginx sends the bytes.

Every download case of tests/test_downloads.py that matters to a client — headers, ranges,
multi-range, conditionals, If-Range, HEAD, empty files, awkward names — must look the same through
nginx as from a mediad that sends the bytes itself (Server, Date and Connection aside), and the
answers nginx can send from the blob must really be sent by nginx.
"""

from __future__ import annotations

import asyncio
import email.utils
import hashlib
import os
import re
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from conftest import (
    Server,
    assert_problem,
    free_port,
    make_settings,
    make_user,
    mediad_process,
    serve_in_thread,
    upload,
    wait_for,
)
from media_samples import make_wav

from ops.harness import proc_status

from .conftest import Nginx, require_nginx, running_nginx

MiB = 1024 * 1024
IGNORED = {"server", "date", "connection", "keep-alive", "x-request-id"}


@dataclass
class Stack:
    direct: Server  # a mediad that sends bytes itself, on the same database and data dir
    accel: Server  # the mediad behind nginx, answering with X-Accel-Redirect
    nginx: Nginx


@pytest.fixture(scope="module")
def stack(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    require_nginx()
    root = tmp_path_factory.mktemp("nginx")
    data = root / "data"
    port = free_port()
    env = {"MEDIAD_ACCEL_REDIRECT": "/_mediad/", "MEDIAD_PUBLIC_URL": f"http://127.0.0.1:{port}",
           "MEDIAD_CLOUD_POLL_S": "0.3", "MEDIAD_MAX_UPLOAD_BYTES": str(300 * MiB)}
    with mediad_process(data, database_url=database_url, env=env) as accel, \
            serve_in_thread(make_settings(data), database_url) as direct, \
            running_nginx(int(accel.url.rsplit(":", 1)[1]), data / "files", root / "nginx", port) as nginx:
        yield Stack(direct, accel, nginx)


@pytest.fixture
async def clients(stack: Stack) -> AsyncIterator[tuple[httpx.AsyncClient, httpx.AsyncClient]]:
    async with httpx.AsyncClient(base_url=stack.direct.url, timeout=60) as direct, \
            httpx.AsyncClient(base_url=stack.nginx.url, timeout=60) as proxied:
        yield direct, proxied


def comparable(response: httpx.Response) -> tuple[int, list[tuple[str, str]], bytes]:
    """Status, headers and body with what legitimately differs between two servers taken out:
    the hop-by-hop and server's own headers, and a multipart answer's random boundary."""
    headers = sorted((k.lower(), v) for k, v in response.headers.multi_items() if k.lower() not in IGNORED)
    body = response.content
    boundary = re.search(r"boundary=(\w+)", response.headers.get("content-type", ""))
    if boundary:
        token = boundary.group(1)
        headers = [(k, v.replace(token, "BOUNDARY")) for k, v in headers]
        body = body.replace(token.encode(), b"BOUNDARY")
    return response.status_code, headers, body


def http_date(moment: datetime) -> str:
    return email.utils.format_datetime(moment, usegmt=True)


async def assert_same(clients: tuple[httpx.AsyncClient, httpx.AsyncClient], method: str, url: str,
                      headers: dict[str, str]) -> httpx.Response:
    direct, proxied = clients
    mine = await direct.request(method, url, headers=headers)
    through = await proxied.request(method, url, headers=headers)
    assert comparable(through) == comparable(mine), (method, url, headers)
    return through


async def offloaded(stack: Stack, url: str, headers: dict[str, str]) -> bool:
    """Whether the mediad behind nginx hands this GET to nginx (asked directly, past nginx)."""
    async with httpx.AsyncClient(base_url=stack.accel.url, timeout=30) as http:
        answer = await http.get(url, headers=headers)
    return "x-accel-redirect" in answer.headers and answer.content == b""


async def test_downloads_look_the_same_through_nginx(stack: Stack, clients: Any) -> None:
    direct, _ = clients
    user = await make_user(direct)
    data = os.urandom(100_000)
    file = await upload(direct, user, data, path="/media/Ünïcode 🎉 \"quoted\" name.bin")
    etag = f'"{file["sha256"]}"'
    modified = email.utils.parsedate_to_datetime((await direct.head(f"/files/{file['id']}/content",
                                                                    headers=user.auth)).headers["last-modified"])
    cases: list[tuple[dict[str, str], bool]] = [  # (request headers, nginx sends the bytes)
        ({}, True),
        ({"Range": "bytes=0-99"}, True),
        ({"Range": "bytes=99000-"}, True),
        ({"Range": "bytes=-10"}, True),
        ({"Range": "bytes=99990-200000"}, True),
        ({"Range": "bytes=0-9,5000-5009,-3"}, False),  # multipart/byteranges
        ({"Range": "bytes=0-50,25-75"}, False),  # coalesced into one range by mediad
        ({"Range": "bytes=abc"}, False),  # malformed: ignored, the full body
        ({"Range": "bytes=200000-"}, False),  # 416
        ({"If-None-Match": etag}, False),  # 304
        ({"If-None-Match": '"other"'}, True),
        ({"If-None-Match": "*"}, False),
        ({"If-Modified-Since": http_date(modified)}, False),
        ({"If-Modified-Since": http_date(modified - timedelta(days=1))}, True),
        ({"If-Match": '"other"'}, False),  # 412
        ({"If-Match": etag, "Range": "bytes=0-9"}, False),  # served by mediad (nginx has other validators)
        ({"If-Unmodified-Since": http_date(modified + timedelta(days=1))}, False),
        ({"If-Range": etag, "Range": "bytes=10-19"}, True),
        ({"If-Range": '"stale"', "Range": "bytes=10-19"}, False),  # the full 200
        ({"If-Range": http_date(modified), "Range": "bytes=10-19"}, True),
        ({"If-Range": http_date(modified - timedelta(days=1)), "Range": "bytes=10-19"}, False),
    ]
    for route in (f"/files/{file['id']}/content", f"/files/{file['id']}/content?inline=1",
                  f"/download?id={file['id']}", f"/download?path={file['path']}"):
        for extra, by_nginx in cases:
            if route.startswith("/download?path=") and not extra.get("If-Range", '"').startswith('"'):
                by_nginx = False  # by path a date validates no range: mediad sends the whole body
            headers = {**user.auth, **extra}
            for method in ("GET", "HEAD"):
                await assert_same(clients, method, route, headers)
            assert await offloaded(stack, route, headers) is by_nginx, (route, extra)


async def test_empty_and_replaced_files_through_nginx(stack: Stack, clients: Any) -> None:
    direct, proxied = clients
    user = await make_user(direct)
    empty = await upload(direct, user, b"", name="empty.txt")
    url = f"/files/{empty['id']}/content"
    for extra in ({}, {"Range": "bytes=0-"}, {"Range": "bytes=-5"}):
        await assert_same(clients, "GET", url, {**user.auth, **extra})
    first = await upload(direct, user, b"first version", path="/v.txt")
    await upload(direct, user, b"second, longer version", path="/v.txt", replaces=True)
    url = f"/files/{first['id']}/content"
    got = await assert_same(clients, "GET", url, {**user.auth, "Range": "bytes=0-5"})
    assert got.status_code == 206 and got.content == b"second"
    # After a replace the date is no longer a strong validator: If-Range by date gets the full 200.
    stale = await assert_same(clients, "GET", url, {**user.auth, "Range": "bytes=0-5",
                                                    "If-Range": got.headers["last-modified"]})
    assert stale.status_code == 200 and stale.content == b"second, longer version"


async def test_another_users_file_is_still_404_through_nginx(stack: Stack, clients: Any) -> None:
    direct, proxied = clients
    owner, stranger = await make_user(direct), await make_user(direct)
    file = await upload(direct, owner, b"private bytes", name="p.bin")
    for url in (f"/files/{file['id']}/content", f"/download?id={file['id']}"):
        assert_problem(await proxied.get(url, headers=stranger.auth), 404)
        assert_problem(await proxied.get(url), 401)
    # The internal location itself is not reachable from outside.
    blob = next(p for p in (stack.direct.data_dir / "files").rglob("*") if p.is_file())
    assert (await proxied.get(f"/_mediad/{blob.parent.parent.name}/{blob.parent.name}/{blob.name}")).status_code == 404


async def test_signed_and_record_links_through_nginx(stack: Stack, clients: Any, tmp_path: Path) -> None:

    direct, proxied = clients
    user = await make_user(direct)
    data = os.urandom(50_000)
    file = await upload(direct, user, data, name="clip.bin")
    link = (await proxied.post(f"/files/{file['id']}/links", headers=user.auth, json={})).json()
    assert link["url"].startswith(stack.nginx.url)
    whole = await proxied.get(link["url"])
    assert whole.status_code == 200 and whole.content == data
    part = await proxied.get(link["url"], headers={"Range": "bytes=100-199"})
    assert part.status_code == 206 and part.content == data[100:200]
    assert await offloaded(stack, link["url"].removeprefix(stack.nginx.url), {})

    wav = make_wav(tmp_path / "take.wav", 1.0).read_bytes()
    record = await proxied.post("/records", headers=user.auth, files={"file": ("take.wav", wav, "audio/wav")})
    assert record.status_code == 201, record.text
    mp3 = await proxied.get(record.json()["url"])
    assert mp3.status_code == 200 and mp3.headers["content-type"] == "audio/mpeg"
    assert hashlib.sha256(mp3.content).hexdigest() == record.json()["file"]["sha256"]


async def test_evicted_file_is_read_through_from_the_cloud_via_nginx(stack: Stack, clients: Any) -> None:
    direct, proxied = clients
    user = await make_user(direct)
    data = os.urandom(300_000)
    file = await upload(direct, user, data, name="cold.bin")

    async def stored() -> bool:
        answer = await proxied.get(f"/files/{file['id']}", headers=user.auth)
        return bool(answer.json()["cloud"]["state"] == "stored")

    await wait_for(stored, what="the cloud copy")
    conn = await asyncpg.connect(stack.direct.database_url)
    try:  # what an eviction does: the local copy goes, the row says so
        blob = await conn.fetchval("UPDATE files SET node = NULL WHERE id = $1 RETURNING blob_id",
                                   uuid.UUID(file["id"]))
    finally:
        await conn.close()
    (stack.direct.data_dir / "files" / blob.hex[:2] / blob.hex[2:4] / blob.hex).unlink()
    url = f"/files/{file['id']}/content"
    assert not await offloaded(stack, url, user.auth)
    whole = await proxied.get(url, headers=user.auth)
    assert whole.status_code == 200 and whole.content == data
    assert whole.headers["etag"] == f'"{file["sha256"]}"'
    part = await proxied.get(url, headers={**user.auth, "Range": "bytes=1000-1999"})
    assert part.status_code == 206 and part.content == data[1000:2000]


async def test_uploads_stream_through_nginx(stack: Stack, clients: Any) -> None:
    direct, proxied = clients
    user = await make_user(direct)
    size, chunk = 256 * MiB, os.urandom(MiB)
    samples: list[tuple[int, int, int]] = []  # (nginx RSS, mediad RSS, files in nginx's body temp)
    done = asyncio.Event()

    async def body() -> AsyncIterator[bytes]:
        for _ in range(size // MiB):
            yield chunk

    async def sample() -> None:
        while not done.is_set():
            samples.append((stack.nginx.rss(), _rss_of(stack.accel), len(stack.nginx.body_temp_files())))
            await asyncio.sleep(0.05)

    before = (stack.nginx.rss(), _rss_of(stack.accel))
    sampler = asyncio.create_task(sample())
    try:
        answer = await proxied.post("/files?name=big.bin", headers=user.auth, content=body())
    finally:
        done.set()
        await sampler
    assert answer.status_code == 201, answer.text
    want = hashlib.sha256(chunk * (size // MiB)).hexdigest()
    assert answer.json()["size"] == size and answer.json()["sha256"] == want
    assert len(samples) > 5
    assert max(s[2] for s in samples) == 0, "nginx buffered the upload into a temp file"
    assert max(s[0] for s in samples) - before[0] < 32 * MiB, "nginx's memory grew with the upload"
    assert max(s[1] for s in samples) - before[1] < 64 * MiB, "mediad's memory grew with the upload"


def _rss_of(server: Server) -> int:
    assert server.process is not None
    return 1024 * proc_status(server.process.pid)["VmRSS"]

"""Slow and oversized clients (mediad/server.py): a request head must arrive within
MEDIAD_HEADER_TIMEOUT_S, a body may pause at most MEDIAD_BODY_TIMEOUT_S, a head is capped at
MEDIAD_MAX_HEADER_BYTES (431), and while hundreds of clients dawdle a normal one is served."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import statistics
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
from conftest import (
    Server,
    User,
    assert_problem,
    eventually,
    make_settings,
    make_user,
    mediad_process,
    raw_connection,
    read_response,
    request_head,
    serve_in_thread,
    tus_metadata,
)

MiB = 1024 * 1024
HEAD_TIMEOUT = 1.0
BODY_TIMEOUT = 1.0
MAX_HEAD = 8 * 1024


@pytest.fixture(scope="module")
def guarded(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    settings = make_settings(tmp_path_factory.mktemp("guarded"), header_timeout_s=HEAD_TIMEOUT,
                             body_timeout_s=BODY_TIMEOUT, max_header_bytes=MAX_HEAD)
    with serve_in_thread(settings, database_url) as running:
        yield running


@pytest.fixture
async def http(guarded: Server) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=guarded.url, timeout=10) as client:
        yield client


def parse_answer(raw: bytes) -> httpx.Response:
    """A response the server sent before closing the connection (every refusal closes it)."""
    head_bytes, _, body = raw.partition(b"\r\n\r\n")
    status_line, *lines = head_bytes.decode("latin-1").split("\r\n")
    headers = [(k.strip(), v.strip()) for k, v in (line.split(":", 1) for line in lines)]
    assert dict((k.lower(), v) for k, v in headers)["connection"] == "close"
    return httpx.Response(int(status_line.split()[1]), headers=headers, content=body)


async def read_answer(reader: asyncio.StreamReader, timeout: float = 10) -> httpx.Response:
    async with asyncio.timeout(timeout):
        return parse_answer(await reader.read(-1))


async def dribble(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, data: bytes,
                  interval: float) -> bytes:
    """Sends `data` a byte per `interval` until the server answers; returns the answer (b"" if
    the server hung up without one, or if all of `data` went out unanswered)."""
    for byte in data:
        try:
            writer.write(bytes([byte]))
            await writer.drain()
            first = await asyncio.wait_for(reader.read(65536), interval)  # a cancelled read loses nothing
        except TimeoutError:
            continue
        except ConnectionError:
            return b""
        return first + await asyncio.wait_for(reader.read(-1), 5)
    return b""


def stray_files(server: Server) -> list[Path]:
    return server.stray_temp_files() + server.partial_files()


async def test_a_head_over_the_cap_gets_431(http: httpx.AsyncClient) -> None:
    body = assert_problem(await http.get("/health", headers={"X-Filler": "a" * MAX_HEAD}), 431)
    assert str(MAX_HEAD) in body["detail"]
    many = {f"X-Filler-{i}": "b" * 100 for i in range(MAX_HEAD // 100)}
    assert_problem(await http.get("/health", headers=many), 431)
    # Just under the cap is an ordinary request.
    assert (await http.get("/health", headers={"X-Filler": "c" * (MAX_HEAD - 512)})).status_code == 200


async def test_a_head_under_the_cap_is_served_however_it_is_split(guarded: Server) -> None:
    """Bytes of a head counted as they arrive are not counted again when its headers are parsed."""
    head = request_head("GET", "/health", {"X-Filler": "a" * (MAX_HEAD - 1024)})
    async with raw_connection(guarded) as (reader, writer):
        for start in range(0, len(head), 512):
            writer.write(head[start:start + 512])
            await writer.drain()
            await asyncio.sleep(0.005)  # separate segments, so separate reads
        status_line = await asyncio.wait_for(reader.readline(), 10)
    assert status_line.startswith(b"HTTP/1.1 200"), status_line


async def test_a_pipelined_head_is_not_charged_for_the_body_read_with_it(guarded: Server,
                                                                       http: httpx.AsyncClient) -> None:
    """The tail of one request's body and the start of the next request's head may come in one
    read: only the head's bytes count towards the cap."""
    user = await make_user(http)
    data = os.urandom(256 * 1024)
    put = request_head("PUT", "/files?path=/pipelined.bin", {**user.auth, "Content-Length": str(len(data))})
    get = request_head("GET", "/health", {})
    tail = 4 * MAX_HEAD  # body bytes in the read that starts the next head: four caps' worth
    async with raw_connection(guarded) as (reader, writer):
        writer.write(put + data[:-tail])
        await writer.drain()
        await asyncio.sleep(0.2)
        writer.write(data[-tail:] + get[:10])
        await writer.drain()
        await asyncio.sleep(0.2)
        writer.write(get[10:])
        answers = [await read_response(reader), await read_response(reader)]
    assert [answer.status_code for answer in answers] == [201, 200]
    assert answers[0].json()["sha256"] == hashlib.sha256(data).hexdigest()


async def test_a_head_over_the_cap_that_never_ends_gets_431(guarded: Server) -> None:
    """httptools buffers a header value until it ends: the cap must hold for one still arriving."""
    async with raw_connection(guarded) as (reader, writer):
        writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Endless: " + b"a" * (4 * MAX_HEAD))
        answer = await read_answer(reader)
    assert_problem(answer, 431)


async def test_malformed_http_gets_a_problem_400(guarded: Server) -> None:
    async with raw_connection(guarded) as (reader, writer):
        writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\nBad Header Name: 1\r\n\r\n")
        answer = await read_answer(reader)
    assert_problem(answer, 400)


async def test_a_head_that_dawdles_gets_408_and_is_closed(guarded: Server) -> None:
    async with raw_connection(guarded) as (reader, writer):
        started = time.monotonic()  # 4 bytes a second: this head would take 8 s
        answer = parse_answer(await dribble(reader, writer, b"GET /health HTTP/1.1\r\nHost: x\r\n", 0.25))
    assert_problem(answer, 408)
    assert HEAD_TIMEOUT <= time.monotonic() - started < HEAD_TIMEOUT + 3


async def test_a_connection_that_sends_nothing_is_closed(guarded: Server) -> None:
    async with raw_connection(guarded) as (reader, _writer):
        started = time.monotonic()
        assert_problem(await read_answer(reader), 408)
    assert time.monotonic() - started < HEAD_TIMEOUT + 3


async def test_the_head_deadline_applies_to_each_request_on_a_kept_alive_connection(guarded: Server) -> None:
    async with raw_connection(guarded) as (reader, writer):
        writer.write(request_head("GET", "/health", {}))
        first = await reader.readuntil(b"\r\n\r\n")
        assert first.startswith(b"HTTP/1.1 200")
        await reader.readexactly(int(first.lower().split(b"content-length: ")[1].split(b"\r\n")[0]))
        writer.write(b"GET /health HTTP/1.1\r\n")  # the second request's head starts, then stops
        assert_problem(await read_answer(reader), 408)


async def test_a_stalled_upload_gets_408_and_leaves_nothing(guarded: Server, http: httpx.AsyncClient) -> None:
    user = await make_user(http)
    async with raw_connection(guarded) as (reader, writer):
        writer.write(request_head("PUT", "/files?path=/stalled.bin", {**user.auth, "Content-Length": str(4 * MiB)}))
        writer.write(os.urandom(MiB))  # a quarter of the promised body, then nothing
        started = time.monotonic()
        answer = await read_answer(reader)
    body = assert_problem(answer, 408)
    assert "stalled" in body["detail"]
    assert BODY_TIMEOUT <= time.monotonic() - started < BODY_TIMEOUT + 3
    assert (await http.get("/files", headers=user.auth)).json()["files"] == []
    assert await eventually(lambda: not stray_files(guarded)), stray_files(guarded)


async def test_a_slow_but_steady_upload_is_not_cut_off(guarded: Server, http: httpx.AsyncClient) -> None:
    """The body deadline is for silence, not for the whole transfer: chunks every 0.4 s over
    4 s (four body timeouts) make a complete upload."""
    user = await make_user(http)
    chunks = [os.urandom(64 * 1024) for _ in range(10)]
    data = b"".join(chunks)
    async with raw_connection(guarded) as (reader, writer):
        writer.write(request_head("PUT", "/files?path=/steady.bin", {**user.auth, "Content-Length": str(len(data))}))
        for chunk in chunks:
            writer.write(chunk)
            await writer.drain()
            await asyncio.sleep(BODY_TIMEOUT * 0.4)
        status_line = await asyncio.wait_for(reader.readline(), 10)
    assert status_line.startswith(b"HTTP/1.1 201"), status_line
    stored = (await http.get("/download", params={"path": "/steady.bin"}, headers=user.auth)).content
    assert hashlib.sha256(stored).hexdigest() == hashlib.sha256(data).hexdigest()


TUS = {"Tus-Resumable": "1.0.0"}


async def tus_upload(http: httpx.AsyncClient, user: User, length: int) -> str:
    response = await http.post("/uploads", headers={**user.auth, **TUS, "Upload-Length": str(length),
                                                    "Upload-Metadata": tus_metadata(filename="slow.bin")})
    assert response.status_code == 201, response.text
    return response.headers["location"]


def tus_patch_headers(user: User, offset: int) -> dict[str, str]:
    return {**user.auth, **TUS, "Upload-Offset": str(offset), "Content-Type": "application/offset+octet-stream"}


async def test_a_tus_patch_that_outlasts_its_lease_still_holds_the_upload(guarded: Server,
                                                                         http: httpx.AsyncClient) -> None:
    """A PATCH's claim lasts 2 × MEDIAD_BODY_TIMEOUT_S and is renewed while the PATCH runs: one
    that streams for three lease lengths still makes a racing PATCH get 423, then completes."""
    user = await make_user(http)
    chunks = [os.urandom(16 * 1024) for _ in range(15)]
    data = b"".join(chunks)
    location = await tus_upload(http, user, len(data))
    rival_answers: list[httpx.Response] = []

    async def slow_body() -> AsyncIterator[bytes]:
        for i, chunk in enumerate(chunks):
            yield chunk
            await asyncio.sleep(BODY_TIMEOUT * 0.4)  # 6 s in all
            if i in (6, 13):  # 2.8 s and 5.6 s in: past one and two unrenewed leases
                rival_answers.append(await http.patch(location, content=b"x", headers=tus_patch_headers(user, 0)))

    async with httpx.AsyncClient(base_url=guarded.url, timeout=30) as slow:
        first = await slow.patch(location, content=slow_body(), headers=tus_patch_headers(user, 0))
    assert first.status_code == 204, first.text
    assert [answer.status_code for answer in rival_answers] == [423, 423]
    assert_problem(rival_answers[0], 423)
    file = (await http.get(f"/files/{first.headers['mediad-file-id']}", headers=user.auth)).json()
    assert file["sha256"] == hashlib.sha256(data).hexdigest()


async def test_a_silent_tus_patch_ends_keeping_its_bytes_and_frees_the_upload(guarded: Server,
                                                                            http: httpx.AsyncClient) -> None:
    user = await make_user(http)
    data = os.urandom(3 * MiB)
    location = await tus_upload(http, user, len(data))
    async with raw_connection(guarded) as (reader, writer):
        writer.write(request_head("PATCH", location, {**tus_patch_headers(user, 0), "Content-Length": str(len(data))}))
        writer.write(data[:MiB])  # a third of the promised body, then nothing
        assert_problem(await read_answer(reader), 408)
    for _ in range(100):  # the server records what arrived just after its 408 went out
        offset = (await http.head(location, headers={**user.auth, **TUS})).headers["upload-offset"]
        if offset != "0":
            break
        await asyncio.sleep(0.05)
    assert offset == str(MiB)
    rest = await http.patch(location, content=data[MiB:], headers=tus_patch_headers(user, MiB))
    assert rest.status_code == 204, rest.text  # not 423: the stalled PATCH let go of the upload
    file = (await http.get(f"/files/{rest.headers['mediad-file-id']}", headers=user.auth)).json()
    assert file["sha256"] == hashlib.sha256(data).hexdigest()


def open_blobs(server: Server) -> list[str]:
    """What this process (the thread server's) holds open under the server's blob directory."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/self/fd/{fd}")
            if target.startswith(str(server.data_dir / "files")):
                found.append(target)
    return found


async def test_a_client_that_stops_reading_a_download_is_dropped(guarded: Server, http: httpx.AsyncClient) -> None:
    """A download whose reader stops holds a connection and an open file once the socket buffers
    are full; after the body deadline the server drops the connection and closes the file."""
    user = await make_user(http)
    data = os.urandom(48 * MiB)  # far more than loopback socket buffers hold
    file = (await http.put("/files", params={"path": "/big.bin"}, headers=user.auth, content=data)).json()
    async with raw_connection(guarded) as (reader, writer):
        writer.write(request_head("GET", f"/files/{file['id']}/content", user.auth))
        await asyncio.sleep(BODY_TIMEOUT / 2)
        assert open_blobs(guarded), "the download holds its file while the client reads nothing"
        await asyncio.sleep(BODY_TIMEOUT * 2)
        received = 0
        with contextlib.suppress(ConnectionError):
            async with asyncio.timeout(10):
                while chunk := await reader.read(MiB):
                    received += len(chunk)
    assert 0 < received < len(data), received  # what was buffered, then the end: not the whole file
    assert await eventually(lambda: not open_blobs(guarded)), open_blobs(guarded)


# ---- 200 slow heads and 50 stalled uploads against `mediad serve` -----------------------------

def clients_and_files(pid: int, port: int) -> int:
    """Descriptors of `pid` that a dawdling client could leak: sockets on the server's own port and
    files. Database connections are left out: the pool opens more under load and keeps them."""
    server_side = set()
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port:
                server_side.add(f"socket:[{fields[9]}]")
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(FileNotFoundError):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            count += target in server_side or target.startswith("/")
    return count


SLOW_HEADS = 200
STALLED_UPLOADS = 50
LOAD_TIMEOUT = 4.0  # seconds, for both deadlines in the load test


async def dribble_head(server: Server, closed: list[float], answers: list[int]) -> None:
    """Sends a request head one byte a second until the server hangs up."""
    async with raw_connection(server) as (reader, writer):
        started = time.monotonic()
        raw = await dribble(reader, writer, b"GET /health HTTP/1.1\r\nHost: slow\r\nX-Slow: " + b"z" * 100, 1.0)
        answers.append(int(raw.split()[1]) if raw else 0)
        closed.append(time.monotonic() - started)


async def stall_upload(server: Server, user: User, closed: list[float], answers: list[int]) -> None:
    async with raw_connection(server) as (reader, writer):
        writer.write(request_head("POST", "/files?name=stalled.bin", {**user.auth, "Content-Length": str(16 * MiB)}))
        writer.write(os.urandom(256 * 1024))
        started = time.monotonic()
        with contextlib.suppress(ConnectionError):
            async with asyncio.timeout(LOAD_TIMEOUT * 4):
                raw = await reader.read(-1)
                answers.append(int(raw.split()[1]) if raw else 0)
        closed.append(time.monotonic() - started)


@pytest.mark.timeout(120)
async def test_slow_clients_do_not_starve_a_normal_one(database_url: str, tmp_path: Path) -> None:
    env = {"MEDIAD_HEADER_TIMEOUT_S": str(LOAD_TIMEOUT), "MEDIAD_BODY_TIMEOUT_S": str(LOAD_TIMEOUT)}
    with mediad_process(tmp_path / "data", database_url=database_url, env=env) as server:
        pid = server.process.pid if server.process else 0
        async with httpx.AsyncClient(base_url=server.url, timeout=10) as http:
            user = await make_user(http)
            # Warm: the database pool holds all it keeps, so what is counted later is what leaked.
            await asyncio.gather(*(http.get("/files", headers=user.auth) for _ in range(40)))
            port = int(server.url.rsplit(":", 1)[1])
            fds_before = clients_and_files(pid, port)
            closed: dict[str, list[float]] = {"heads": [], "uploads": []}
            answers: dict[str, list[int]] = {"heads": [], "uploads": []}
            slow = [asyncio.create_task(dribble_head(server, closed["heads"], answers["heads"]))
                    for _ in range(SLOW_HEADS)]
            slow += [asyncio.create_task(stall_upload(server, user, closed["uploads"], answers["uploads"]))
                     for _ in range(STALLED_UPLOADS)]
            await asyncio.sleep(1)  # all connected and dawdling

            latencies = []
            while not all(task.done() for task in slow):
                started = time.perf_counter()
                assert (await http.get("/health")).status_code == 200
                latencies.append(time.perf_counter() - started)
                await asyncio.sleep(0.02)
            await asyncio.gather(*slow)

            assert len(closed["heads"]) == SLOW_HEADS and len(closed["uploads"]) == STALLED_UPLOADS
            assert set(answers["heads"]) == {408} and set(answers["uploads"]) == {408}, answers
            assert max(closed["heads"] + closed["uploads"]) < LOAD_TIMEOUT + 4
            p99 = statistics.quantiles(latencies, n=100)[98]
            print(f"/health during {SLOW_HEADS} slow heads + {STALLED_UPLOADS} stalled uploads: "
                  f"{len(latencies)} requests, p50 {statistics.median(latencies) * 1000:.1f} ms, "
                  f"p99 {p99 * 1000:.1f} ms")
            assert len(latencies) >= 50
            assert p99 < 0.100

            assert (await http.get("/files", headers=user.auth)).json()["files"] == []
            # The stalled uploads' temp files and sockets go as their requests end.
            assert await eventually(lambda: not stray_files(server)), stray_files(server)
            assert await eventually(lambda: clients_and_files(pid, port) <= fds_before), (
                f"{clients_and_files(pid, port)} client sockets and files open, {fds_before} before")


async def test_an_idle_keep_alive_connection_is_kept_for_keep_alive_s_not_the_head_deadline(
        database_url: str, tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "data", header_timeout_s=HEAD_TIMEOUT, keep_alive_s=3.0)
    with serve_in_thread(settings, database_url) as running:
        async with raw_connection(running) as (reader, writer):
            for _ in range(2):
                writer.write(request_head("GET", "/health", {}))
                assert (await read_response(reader)).status_code == 200
                await asyncio.sleep(2 * HEAD_TIMEOUT)  # idle past the head deadline, within keep-alive
            started = time.monotonic()
            async with asyncio.timeout(10):
                assert await reader.read(1) == b""  # then the server closes it
            assert time.monotonic() - started < 2.0

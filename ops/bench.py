"""Benchmark mediad against this machine's own ceilings and print the figures as Markdown.

    python -m ops.bench [--only SECTION] [--size-mib 1024] [--out FILE]
                        [--database-url URL] [--env MEDIAD_X=VALUE] [--keep]

(from the repository root: the bench shares ops/harness.py with the tests)

Every target is relative to references measured in the same run (sha256, disk write with and
without fsync, a bare uvicorn app draining the body, the loopback ceiling, a minimal Starlette
FileResponse app, a plain PUT to the mock cloud, ffmpeg alone), so figures from different
machines compare. mediad runs as a real `mediad serve` subprocess on a fresh data dir under the
repo's own filesystem (`var/bench-*`, removed afterwards), replicating to a `mediad mock-cloud`
subprocess the bench owns; the downloads section also starts `mediad serve --server granian` on
the same data dir and database. A script that prints figures, not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import functools
import hashlib
import json
import multiprocessing
import os
import random
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from ops.harness import (
    NGINX,
    RssSampler,
    cpu_seconds,
    descendants,
    free_port,
    largest_rss_kib,
    nginx_front,
    percentile,
    proc_status,
    run_async,
    running,
    tree_cpu_seconds,
)

MiB = 1 << 20
GiB = 1 << 30
REPO = Path(__file__).resolve().parent.parent
BOUNDARY = "mediad-bench-0123456789abcdef"
CROWD, CROWD_SIZE = 32, 8 * MiB  # the concurrent uploads
DOWNLOAD_REPEATS = 3  # timed full downloads per server, after one that checks the sha256
RANGES, RANGE_CLIENTS, RANGE_SIZE = 1000, 64, MiB  # random range requests, concurrent clients
LAG_FILES, LAG_SIZE = 100, 64 * 1024  # small uploads whose 201 → "stored" lag is measured
RECORD_S, SHORT_RECORD_S, RECORD_CROWD = 600, 120, 4  # WAV durations; concurrent conversions
TIMEOUT = httpx.Timeout(120.0, connect=10.0)  # per socket operation: a stalled server fails the run
Result = dict[str, Any]


def size_label(size: int) -> str:
    return f"{size / GiB:g} GiB" if size >= GiB else f"{size / MiB:g} MiB"


# ---- the machine's references -------------------------------------------------------------------

def sha256_rate(buf: bytes, size: int) -> Result:
    """One core hashing 1 MiB buffers, as mediad's writer thread does."""
    hasher = hashlib.sha256()
    started = time.perf_counter()
    for _ in range(size // len(buf)):
        hasher.update(buf)
    return {"sha256_mib_s": size / MiB / (time.perf_counter() - started)}


def _write_file(path: Path, buf: bytes, size: int, *, fsync: bool) -> float:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        started = time.perf_counter()
        for _ in range(size // len(buf)):
            os.write(fd, buf)
        if fsync:
            os.fsync(fd)
        elapsed = time.perf_counter() - started
        if not fsync:
            os.fsync(fd)  # untimed: leave no dirty pages to disturb what runs next
        return elapsed
    finally:
        os.close(fd)
        path.unlink(missing_ok=True)


def disk_rates(directory: Path, buf: bytes, size: int) -> Result:
    """Sequential 1 MiB writes into `directory`: durable (fsync included) and page cache only."""
    durable = _write_file(directory / "disk-ref.bin", buf, size, fsync=True)
    cached = _write_file(directory / "disk-ref.bin", buf, size, fsync=False)
    return {"write_fsync_mib_s": size / MiB / durable, "write_cache_mib_s": size / MiB / cached}


async def _drain_app(scope: dict[str, Any], receive: Callable[[], Awaitable[dict[str, Any]]],
                     send: Callable[[dict[str, Any]], Awaitable[None]]) -> None:
    """The server ceiling: a raw ASGI app that reads and discards the request body."""
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            await send({"type": message["type"] + ".complete"})
            if message["type"] == "lifespan.shutdown":
                return
    received, more = 0, True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        received += len(message.get("body", b""))
        more = message.get("more_body", False)
    body = json.dumps({"bytes": received}).encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def serve_ceiling(port: int) -> None:
    import uvicorn

    uvicorn.Server(uvicorn.Config(_drain_app, host="127.0.0.1", port=port, log_config=None)).run()


async def ceiling_rate(base_url: str, buf: bytes, size: int) -> Result:
    async with httpx.AsyncClient(base_url=base_url, timeout=TIMEOUT) as client:
        sent = await send_body(client, "POST", "/", buf, size)
    if sent["status"] != 200 or sent["json"].get("bytes") != size:
        raise RuntimeError(f"ceiling server answered {sent['status']} {sent['json']}")
    return {"ceiling_mib_s": sent["mib_s"], "ceiling_client_cpu_pct": sent["client_cpu_pct"]}


def _read_request_head(conn: socket.socket) -> bytes:
    head = b""
    while b"\r\n\r\n" not in head:
        data = conn.recv(4096)
        if not data:
            break
        head += data
    return head


def serve_sendfile(port: int, path: Path) -> None:
    """The loopback ceiling: a bare socket server that answers any GET with the whole file by
    sendfile(2) from the page cache, one connection at a time; just enough HTTP for the same
    client to read it (and /health for `running`)."""
    size = path.stat().st_size
    with socket.create_server(("127.0.0.1", port)) as server, open(path, "rb") as file:
        while True:
            conn, _ = server.accept()
            with conn, contextlib.suppress(OSError):  # a client gone early is its own business
                if _read_request_head(conn).startswith(b"GET /health "):
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                    continue
                conn.sendall(f"HTTP/1.1 200 OK\r\nContent-Length: {size}\r\n"
                             "Connection: close\r\n\r\n".encode())
                offset = 0
                while offset < size:
                    offset += os.sendfile(conn.fileno(), file.fileno(), offset, size - offset)


def fileresponse_app() -> Any:
    """The framework reference: the smallest Starlette app serving $BENCH_FILE with FileResponse
    (ranges included). A factory, so that Granian can import it in its worker."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import FileResponse, PlainTextResponse, Response
    from starlette.routing import Route

    path = os.environ["BENCH_FILE"]

    async def health(request: Request) -> Response:
        return PlainTextResponse("ok")

    async def file(request: Request) -> Response:
        return FileResponse(path)

    return Starlette(routes=[Route("/health", health), Route("/file", file)])


def serve_fileresponse(port: int, path: Path, server: str) -> None:
    """`fileresponse_app` on uvicorn or Granian, configured as `mediad serve` configures them."""
    os.environ["BENCH_FILE"] = str(path)
    if server == "granian":
        from granian import Granian
        from granian.constants import Interfaces

        Granian("ops.bench:fileresponse_app", factory=True, interface=Interfaces.ASGI, port=port,
                workers=1, log_enabled=False, working_dir=REPO).serve()
        return
    import uvicorn

    config = uvicorn.Config(fileresponse_app(), host="127.0.0.1", port=port, log_config=None,
                            server_header=False)
    uvicorn.Server(config).run()


# ---- processes ----------------------------------------------------------------------------------

@contextlib.contextmanager
def bench_helper(bench_dir: Path, mode: str, *args: str) -> Iterator[Server]:
    """This script in one of its reference-server modes (`--sendfile-server PORT PATH`, ...)."""
    port = free_port()
    cmd = [sys.executable, "-m", "ops.bench", mode, str(port), *args]
    url = f"http://127.0.0.1:{port}"
    log = bench_dir / f"{mode.strip('-')}.log"
    with running(cmd, dict(os.environ), url + "/health", log, REPO) as proc:
        yield Server(url, proc.pid)


@dataclass
class Cloud:
    url: str
    token: str
    pid: int


@contextlib.contextmanager
def mock_cloud(bench_dir: Path) -> Iterator[Cloud]:
    """A `mediad mock-cloud` of the bench's own, so its URL, token and pid are known here, and
    every mediad process of the run (uvicorn and Granian on one data dir) replicates to it."""
    port, token = free_port(), secrets.token_urlsafe(24)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MEDIAD_", "MOCKCLOUD_"))}
    env["MEDIAD_CLOUD_TOKEN"] = token  # in the environment, not in `ps`
    cmd = [str(Path(sys.executable).parent / "mediad"), "mock-cloud", "--host", "127.0.0.1",
           "--port", str(port), "--data-dir", str(bench_dir / "cloud")]
    url = f"http://127.0.0.1:{port}"
    with running(cmd, env, url + "/health", bench_dir / "mock-cloud.log", bench_dir) as proc:
        yield Cloud(url, token, proc.pid)


@dataclass
class Server:
    base_url: str
    pid: int  # the `mediad serve` process; PostgreSQL and the mock cloud are others
    headers: dict[str, str] = field(default_factory=dict)  # the bench user's bearer token

    @property
    def port(self) -> int:
        return int(self.base_url.rsplit(":", 1)[1])


@contextlib.contextmanager
def mediad_server(bench_dir: Path, database_url: str | None, extra_env: dict[str, str],
                  cloud: Cloud, kind: str = "uvicorn",
                  shared_with: Server | None = None, workers: int | None = None,
                  env_overrides: dict[str, str] | None = None) -> Iterator[Server]:
    """`mediad serve --server <kind>` on the bench's data dir. With `shared_with`, a second process
    on the same data dir and database (so the same node id, files and user) that leaves the
    embedded PostgreSQL, if any, to the first one; `env_overrides` are its own extra settings."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEDIAD_")}
    env.update(MEDIAD_DATA_DIR=str(bench_dir / "data"), MEDIAD_PORT=str(port),
               MEDIAD_HOST="127.0.0.1", MEDIAD_MAX_UPLOAD_BYTES="20GiB",
               MEDIAD_CLOUD_URL=cloud.url, MEDIAD_CLOUD_TOKEN=cloud.token)
    if database_url:
        env["MEDIAD_DATABASE_URL"] = database_url
    env.update({**extra_env, **(env_overrides or {})})
    mediad = str(Path(sys.executable).parent / "mediad")
    base_url = f"http://127.0.0.1:{port}"
    log = bench_dir / ("mediad.log" if shared_with is None else f"mediad-{kind}-{port}.log")
    command = [mediad, "serve", "--server", kind, *(["--workers", str(workers)] if workers else [])]
    try:
        with running(command, env, base_url + "/health", log,
                     bench_dir) as proc:
            if shared_with is not None:
                yield Server(base_url, proc.pid, shared_with.headers)
                return
            answer = httpx.post(base_url + "/users", json={"name": f"bench-{secrets.token_hex(4)}"})
            answer.raise_for_status()
            yield Server(base_url, proc.pid, {"Authorization": f"Bearer {answer.json()['token']}"})
    finally:
        if shared_with is None:
            _stop_orphaned_postgres(bench_dir / "data" / "pg")


def _stop_orphaned_postgres(pgdata: Path) -> None:
    """If mediad had to be killed, its embedded PostgreSQL outlives it: stop that one too."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        pid = int((pgdata / "postmaster.pid").read_text().split()[0])
        if b"postgres" not in Path(f"/proc/{pid}/cmdline").read_bytes():
            return  # a stale pid file: that pid is someone else's now
        os.kill(pid, signal.SIGINT)  # PostgreSQL's "fast" shutdown
        for _ in range(100):
            os.kill(pid, 0)
            time.sleep(0.1)


# ---- the HTTP client (httpx, for uploads) ---------------------------------------------------------

def expected_sha256(buf: bytes, size: int) -> str:
    hasher = hashlib.sha256()
    for _ in range(size // len(buf)):
        hasher.update(buf)
    hasher.update(buf[: size % len(buf)])
    return hasher.hexdigest()


async def _buffer_chunks(buf: bytes, size: int) -> AsyncIterator[bytes]:
    """`size` bytes as 1 MiB chunks of one reused buffer."""
    for _ in range(size // len(buf)):
        yield buf
    if size % len(buf):
        yield buf[: size % len(buf)]


async def _file_chunks(path: Path) -> AsyncIterator[bytes]:
    """A file in 1 MiB reads off the event loop (from the page cache: the bench wrote it)."""
    fd = await asyncio.to_thread(os.open, path, os.O_RDONLY)
    try:
        while chunk := await asyncio.to_thread(os.read, fd, MiB):
            yield chunk
    finally:
        os.close(fd)


async def _framed(prefix: bytes, chunks: AsyncIterator[bytes], suffix: bytes,
                  marks: list[float]) -> AsyncIterator[bytes]:
    """`prefix`, the chunks, `suffix`; `marks` gets the time of the first byte and of the last."""
    marks.append(time.perf_counter())
    if prefix:
        yield prefix
    async for chunk in chunks:
        yield chunk
    if suffix:
        yield suffix
    marks.append(time.perf_counter())


def multipart_envelope(filename: str, content_type: str) -> tuple[bytes, bytes, str]:
    """The bytes before and after one `file` part, and the request's Content-Type."""
    prefix = (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; "
              f"filename=\"{filename}\"\r\nContent-Type: {content_type}\r\n\r\n").encode()
    return prefix, f"\r\n--{BOUNDARY}--\r\n".encode(), f"multipart/form-data; boundary={BOUNDARY}"


async def send_stream(client: httpx.AsyncClient, method: str, url: str, chunks: AsyncIterator[bytes],
                      size: int, *, part: tuple[str, str] | None = None,
                      headers: dict[str, str] | None = None) -> Result:
    """Stream `size` bytes of `chunks` (raw, or as the `file` part (filename, type) of a multipart
    envelope written here); MiB/s from the first byte sent to the response received."""
    prefix = suffix = b""
    headers = {"Content-Type": "application/octet-stream", **(headers or {})}
    if part:
        prefix, suffix, headers["Content-Type"] = multipart_envelope(*part)
    headers["Content-Length"] = str(len(prefix) + size + len(suffix))
    marks: list[float] = []
    cpu_before = time.process_time()
    response = await client.request(method, url, content=_framed(prefix, chunks, suffix, marks),
                                    headers=headers)
    elapsed = time.perf_counter() - marks[0]
    client_cpu = time.process_time() - cpu_before
    try:
        answer = response.json()
    except ValueError:
        answer = {}
    return {"status": response.status_code, "json": answer, "seconds": elapsed,
            "body_sent_s": (marks[-1] if len(marks) > 1 else time.perf_counter()) - marks[0],
            "mib_s": size / MiB / elapsed, "client_cpu_pct": 100 * client_cpu / elapsed}


async def send_body(client: httpx.AsyncClient, method: str, url: str, buf: bytes, size: int, *,
                    multipart: bool = False, headers: dict[str, str] | None = None) -> Result:
    """`size` bytes of 1 MiB chunks of `buf`, raw or as a multipart `file` part."""
    part = ("bench.bin", "application/octet-stream") if multipart else None
    return await send_stream(client, method, url, _buffer_chunks(buf, size), size, part=part,
                             headers=headers)


async def upload(server: Server, client: httpx.AsyncClient, method: str, url: str, buf: bytes,
                 size: int, *, multipart: bool = False) -> Result:
    """One upload to mediad with the server's RSS sampled and its CPU time counted."""
    want = await asyncio.to_thread(expected_sha256, buf, size)
    cpu_before = tree_cpu_seconds(server.pid)
    with RssSampler(server.pid, tree=True) as rss:  # the process that received it: the largest
        sent = await send_body(client, method, url, buf, size, multipart=multipart,
                               headers=server.headers)
    cpu = tree_cpu_seconds(server.pid) - cpu_before
    if sent["status"] not in (200, 201) or sent["json"].get("sha256") != want:
        raise RuntimeError(f"{method} {url} answered {sent['status']}: {sent['json']}")
    replicated = await wait_replicated(client, sent["json"]["id"], server.headers)
    await asyncio.sleep(0.3)  # let the server settle before the "after" reading
    return {"id": sent["json"]["id"], "mib_s": sent["mib_s"], "seconds": sent["seconds"],
            "replicated_s": replicated, "peak_rss_mib": rss.peak_one_kib / 1024,
            "hwm_mib": rss.hwm_kib / 1024, "rss_after_mib": largest_rss_kib(server.pid) / 1024,
            "server_cpu_pct": 100 * cpu / sent["seconds"], "client_cpu_pct": sent["client_cpu_pct"]}


async def settle(server: Server, client: httpx.AsyncClient, limit_s: float = 300.0) -> None:
    """Wait until every file of the bench user is in the cloud and probed, so that an earlier
    section's background work (pushes, probes of 512 MiB files) does not run under this one."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        busy, cursor = 0, None
        while True:
            page = (await client.get("/files", headers=server.headers,
                                     params={"limit": 1000, **({"cursor": cursor} if cursor else {})})).json()
            busy += sum(1 for f in page["files"] if f["cloud"]["state"] == "pending" or f["media"] is None)
            cursor = page["next_cursor"]
            if cursor is None:
                break
        if busy == 0:
            return
        await asyncio.sleep(0.2)
    raise RuntimeError(f"the server's background work did not settle within {limit_s:.0f} s")


async def wait_replicated(client: httpx.AsyncClient, file_id: str, headers: dict[str, str],
                          limit_s: float = 300.0, poll_s: float = 0.05) -> float | None:
    """Seconds until the file's cloud copy is stored (None: failed or not within `limit_s`), so
    one upload's background replication does not overlap the next measurement."""
    started = time.perf_counter()
    while time.perf_counter() - started < limit_s:
        answer = await client.get(f"/files/{file_id}", headers=headers)
        state = answer.json().get("cloud", {}).get("state")
        if state == "stored":
            return time.perf_counter() - started
        if state == "failed":
            return None
        await asyncio.sleep(poll_s)
    return None


# ---- the raw HTTP client (for downloads) --------------------------------------------------------

@dataclass
class Fetched:
    status: int
    headers: dict[str, str]
    length: int  # body bytes received
    seconds: float  # request sent → last body byte
    cpu_seconds: float  # this client thread's CPU meanwhile
    head: bytes  # the body's first and last 64 bytes, for spot checks
    tail: bytes


class RawConnection:
    """One keep-alive HTTP/1.1 connection with the least client work possible: the body is
    received into one reused buffer (recv_into) and dropped. The same client reads the loopback
    ceiling, the FileResponse app and mediad, so the ratios compare servers, not clients (httpx
    would itself be the bottleneck above ~1 GiB/s on this machine)."""

    def __init__(self, port: int, buffer_bytes: int = MiB) -> None:
        self.port = port
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.view = memoryview(bytearray(buffer_bytes))

    def close(self) -> None:
        self.sock.close()

    def _read_head(self) -> tuple[int, dict[str, str], bytes]:
        data = b""
        while (end := data.find(b"\r\n\r\n")) < 0:
            more = self.sock.recv(65536)
            if not more:
                raise ConnectionError("the server closed the connection before answering")
            data += more
        lines = data[:end].decode("latin-1").split("\r\n")
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        return int(lines[0].split()[1]), headers, data[end + 4:]

    def get(self, target: str, headers: dict[str, str],
            hasher: hashlib._Hash | None = None) -> Fetched:
        request = f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\n"
        request += "".join(f"{name}: {value}\r\n" for name, value in headers.items()) + "\r\n"
        started, cpu_before = time.perf_counter(), time.thread_time()
        self.sock.sendall(request.encode("latin-1"))
        status, answer, body = self._read_head()
        length = int(answer.get("content-length", "0"))
        head, tail, received = body[:64], body[-64:], len(body)
        if hasher:
            hasher.update(body)
        while received < length:
            n = self.sock.recv_into(self.view[: min(len(self.view), length - received)])
            if not n:
                raise ConnectionError(f"the body ended after {received} of {length} bytes")
            chunk = self.view[:n]
            if hasher:
                hasher.update(chunk)
            if len(head) < 64:
                head += bytes(chunk[: 64 - len(head)])
            tail = (tail + bytes(chunk[-64:]))[-64:]
            received += n
        return Fetched(status, answer, received, time.perf_counter() - started,
                       time.thread_time() - cpu_before, head, tail)


def fetch_once(port: int, target: str, headers: dict[str, str],
               hasher: hashlib._Hash | None = None) -> Fetched:
    conn = RawConnection(port)
    try:
        return conn.get(target, headers, hasher)
    finally:
        conn.close()


def full_downloads(server: Server, target: str, size: int, want_sha256: str) -> Result:
    """One GET that checks the sha256 (and warms the page cache), then the best of
    DOWNLOAD_REPEATS timed ones; the server's CPU (process tree) over the timed ones."""
    hasher = hashlib.sha256()
    checked = fetch_once(server.port, target, server.headers, hasher)
    if checked.status != 200 or checked.length != size or hasher.hexdigest() != want_sha256:
        raise RuntimeError(f"GET {server.base_url}{target}: {checked.status}, {checked.length} "
                           f"bytes, sha256 {hasher.hexdigest()[:16]}… (want {want_sha256[:16]}…)")
    cpu_before = tree_cpu_seconds(server.pid)
    runs = [fetch_once(server.port, target, server.headers) for _ in range(DOWNLOAD_REPEATS)]
    server_cpu = tree_cpu_seconds(server.pid) - cpu_before
    best = min(runs, key=lambda run: run.seconds)
    total = sum(run.seconds for run in runs)
    return {"mib_s": size / MiB / best.seconds,
            "median_mib_s": size / MiB / statistics.median(run.seconds for run in runs),
            "client_cpu_pct": 100 * best.cpu_seconds / best.seconds,
            "server_cpu_pct": 100 * server_cpu / total}


def _range_checker(buf: bytes) -> Callable[[int, Fetched], str | None]:
    """Spot-check a range answer of a file made of `buf` repeated: status, length, and its first
    and last 64 bytes at the right offsets."""
    doubled = buf + buf

    def check(start: int, got: Fetched) -> str | None:
        end = start + RANGE_SIZE
        first, last = start % len(buf), (end - 64) % len(buf)
        if got.status != 206 or got.length != RANGE_SIZE:
            return f"bytes={start}-{end - 1}: {got.status}, {got.length} bytes"
        if got.head != doubled[first:first + 64] or got.tail != doubled[last:last + 64]:
            return f"bytes={start}-{end - 1}: wrong bytes"
        return None

    return check


def range_requests(server: Server, target: str, size: int, buf: bytes) -> Result:
    """RANGES random RANGE_SIZE ranges over RANGE_CLIENTS keep-alive connections, one thread
    each (recv_into releases the GIL); requests/s over the whole batch and latency per request."""
    rng = random.Random(20261123)  # the same ranges on every server
    pending = iter([rng.randrange(size - RANGE_SIZE + 1) for _ in range(RANGES)])
    lock = threading.Lock()
    check = _range_checker(buf)
    latencies: list[float] = []
    errors: list[str] = []

    def client() -> None:
        conn: RawConnection | None = None
        while True:
            with lock:
                start = next(pending, None)
            if start is None:
                break
            try:
                conn = conn or RawConnection(server.port)
                got = conn.get(target, {**server.headers, "Range": f"bytes={start}-{start + RANGE_SIZE - 1}"})
            except OSError as exc:
                errors.append(f"bytes={start}-: {exc!r}")
                if conn:
                    conn.close()
                conn = None
                continue
            latencies.append(got.seconds)
            if problem := check(start, got):
                errors.append(problem)
        if conn:
            conn.close()

    threads = [threading.Thread(target=client) for _ in range(RANGE_CLIENTS)]
    cpu_before, client_cpu_before = tree_cpu_seconds(server.pid), time.process_time()
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - started
    server_cpu = tree_cpu_seconds(server.pid) - cpu_before
    client_cpu = time.process_time() - client_cpu_before
    for line in errors[:5]:
        print(f"bench: range request {line}", file=sys.stderr)
    latencies = latencies or [float("nan")]
    return {"per_s": RANGES / seconds, "mib_s": RANGES * RANGE_SIZE / MiB / seconds,
            "p50_ms": percentile(latencies, 50) * 1000, "p99_ms": percentile(latencies, 99) * 1000,
            "errors": len(errors), "server_cpu_pct": 100 * server_cpu / seconds,
            "server_cpu_ms": 1000 * server_cpu / RANGES, "client_cpu_pct": 100 * client_cpu / seconds}


# ---- GET /health while something runs -----------------------------------------------------------

def _poll_health(base_url: str, stop: Any, results: Any) -> None:
    """GET /health every 10 ms on a connection of its own, in a process of its own so that the
    uploads' client work (and its GIL) does not delay it. Sends back (started, seconds, status)."""
    samples: list[tuple[float, float, int]] = []
    with httpx.Client(base_url=base_url, timeout=TIMEOUT) as client:
        while not stop.is_set():
            started = time.monotonic()
            try:
                status = client.get("/health").status_code
            except httpx.HTTPError:
                status = 0
            if not samples:
                results.send("ready")
            samples.append((started, time.monotonic() - started, status))
            stop.wait(0.01)
    results.send(samples)


@dataclass
class HealthWatch:
    """/health answers sampled while the block of `health_watched` ran."""

    started: float = 0.0
    finished: float = 0.0
    samples: list[tuple[float, float, int]] = field(default_factory=list)

    def stats(self) -> Result:
        during = [(s, status) for at, s, status in self.samples if self.started <= at <= self.finished]
        latencies = [seconds for seconds, _ in during] or [float("nan")]
        return {"health_p50_ms": percentile(latencies, 50) * 1000,
                "health_p99_ms": percentile(latencies, 99) * 1000,
                "health_max_ms": max(latencies) * 1000, "health_samples": len(during),
                "health_errors": [f"/health answered {status or 'nothing'}"
                                  for _, status in during if status != 200]}


@contextlib.asynccontextmanager
async def health_watched(base_url: str) -> AsyncIterator[HealthWatch]:
    """Poll GET /health from another process for as long as the block runs."""
    spawn = multiprocessing.get_context("spawn")
    stop = spawn.Event()
    results, sender = spawn.Pipe(duplex=False)
    poller = spawn.Process(target=_poll_health, args=(base_url, stop, sender), daemon=True)
    poller.start()
    watch = HealthWatch()
    try:
        if not await asyncio.to_thread(results.poll, 30):
            raise RuntimeError("the /health poller did not start")
        results.recv()  # "ready": its first answer came back
        watch.started = time.monotonic()
        yield watch
    finally:
        watch.finished = time.monotonic()
        stop.set()
        if await asyncio.to_thread(results.poll, 30):
            watch.samples = results.recv()
        poller.join(5)


async def concurrent_uploads(server: Server, buf: bytes, count: int, size: int) -> Result:
    want = expected_sha256(buf, size)
    errors: list[str] = []
    limits = httpx.Limits(max_connections=count, max_keepalive_connections=count)

    async def one(client: httpx.AsyncClient, i: int) -> None:
        try:
            sent = await send_body(client, "POST", f"/files?name=c-{i}.bin", buf, size,
                                   headers=server.headers)
            if sent["status"] != 201 or sent["json"].get("sha256") != want:
                errors.append(f"upload {i}: {sent['status']} {sent['json']}")
        except httpx.HTTPError as exc:
            errors.append(f"upload {i}: {exc!r}")

    async with httpx.AsyncClient(base_url=server.base_url, timeout=TIMEOUT, limits=limits) as client:
        with RssSampler(server.pid, tree=True) as rss:
            async with health_watched(server.base_url) as health:
                await asyncio.gather(*(one(client, i) for i in range(count)))
    stats = health.stats()
    errors += stats.pop("health_errors")
    seconds = health.finished - health.started
    for line in errors[:5]:
        print(f"bench: {line}", file=sys.stderr)
    return {"seconds": seconds, "mib_s": count * size / MiB / seconds, "errors": len(errors),
            **stats, "peak_rss_mib": rss.peak_kib / 1024, "peak_one_rss_mib": rss.peak_one_kib / 1024}


# ---- the report ---------------------------------------------------------------------------------

@dataclass
class Report:
    figures: list[tuple[str, str]] = field(default_factory=list)
    targets: list[tuple[str, str, str, bool]] = field(default_factory=list)

    def figure(self, name: str, value: float, unit: str, digits: int = 0) -> None:
        self.figures.append((name, f"{value:,.{digits}f} {unit}".rstrip()))

    def note(self, name: str, text: str) -> None:
        self.figures.append((name, text))

    def target(self, name: str, measured: str, goal: str, met: bool) -> None:
        self.targets.append((name, measured, goal, met))

    def markdown(self) -> str:
        lines = ["| figure | value |", "|---|---:|"]
        lines += [f"| {name} | {value} |" for name, value in self.figures]
        lines += ["", "| target | measured | goal | result |", "|---|---:|---:|---|"]
        lines += [f"| {name} | {measured} | {goal} | {'met' if met else '**NOT MET**'} |"
                  for name, measured, goal, met in self.targets]
        return "\n".join(lines) + "\n"


@dataclass
class Run:
    """What every section gets: the server, the references, the payload and the report."""

    server: Server
    refs: Result
    buf: bytes  # 1 MiB of random bytes, reused for every chunk
    size: int  # bytes of each big transfer (--size-mib)
    report: Report
    bench_dir: Path
    cloud: Cloud
    # Another `mediad serve --server <kind>` on the same data dir, database and user (workers=N
    # for `--workers N`).
    start_server: Callable[..., contextlib.AbstractContextManager[Server]]
    database_url: str | None = None  # --database-url; None: mediad's embedded PostgreSQL


def references(bench_dir: Path, buf: bytes, size: int, report: Report) -> Result:
    load = os.getloadavg()[0]  # other work on the machine skews every figure: say how much
    refs = {**sha256_rate(buf, size), **disk_rates(bench_dir, buf, size)}
    port = free_port()
    cmd = [sys.executable, "-m", "ops.bench", "--ceiling-server", str(port)]
    url = f"http://127.0.0.1:{port}"
    with running(cmd, dict(os.environ), url, bench_dir / "ceiling.log", REPO):
        refs.update(run_async(ceiling_rate(url, buf, size)))
    report.figure(f"load average at start ({os.cpu_count()} CPUs)", load, "", 2)
    report.figure("sha256, one core", refs["sha256_mib_s"], "MiB/s")
    report.figure("disk write + fsync", refs["write_fsync_mib_s"], "MiB/s")
    report.figure("disk write, page cache", refs["write_cache_mib_s"], "MiB/s")
    report.figure("server ceiling (bare uvicorn app draining the body)", refs["ceiling_mib_s"], "MiB/s")
    report.figure("server ceiling: client CPU", refs["ceiling_client_cpu_pct"], "% of one core")
    return refs


def payload_file(run: Run) -> Path:
    """The big transfer as a file (`buf` repeated, so the same bytes as the uploads): what the
    download references serve and what the plain cloud PUT sends. Written once per run."""
    path = run.bench_dir / "payload.bin"
    if not path.exists() or path.stat().st_size != run.size:
        with open(path, "wb") as file:
            for _ in range(run.size // len(run.buf)):
                file.write(run.buf)
            file.write(run.buf[: run.size % len(run.buf)])
            file.flush()
            os.fsync(file.fileno())  # no dirty pages left to disturb what runs next
    return path


# ---- uploads ------------------------------------------------------------------------------------

async def section_uploads(run: Run) -> None:
    server, refs, buf, size, report = run.server, run.refs, run.buf, run.size, run.report
    gib = size_label(size)
    idle = largest_rss_kib(server.pid) / 1024
    async with httpx.AsyncClient(base_url=server.base_url, timeout=TIMEOUT) as client:
        small = await upload(server, client, "POST", "/files?name=small.bin", buf, 10 * MiB)
        multipart = await upload(server, client, "POST", "/files", buf, size, multipart=True)
        raw = await upload(server, client, "PUT", "/files?path=/bench/raw.bin", buf, size)
    crowd = await concurrent_uploads(server, buf, CROWD, CROWD_SIZE)

    report.figure("server RSS idle, after start", idle, "MiB", 1)
    report.figure("server RSS after a 10 MiB upload", small["rss_after_mib"], "MiB", 1)
    for label, result in ((f"{gib} multipart POST /files", multipart), (f"{gib} raw PUT /files", raw)):
        report.figure(label, result["mib_s"], "MiB/s")
        report.note(f"{label}: CPU, server / client",
                    f"{result['server_cpu_pct']:.0f}% / {result['client_cpu_pct']:.0f}% of one core")
        report.figure(f"{label}: peak server RSS", result["peak_rss_mib"], "MiB", 1)
        report.figure(f"{label}: server RSS after", result["rss_after_mib"], "MiB", 1)
        if result["replicated_s"] is not None:
            report.figure(f"{label}: then stored in the cloud after", result["replicated_s"], "s", 1)
        else:
            report.note(f"{label}: cloud copy", "not stored within 300 s")
    report.figure("server VmHWM (lifetime peak RSS, largest process)", raw["hwm_mib"], "MiB", 1)
    crowd_label = f"{CROWD} × {CROWD_SIZE // MiB} MiB concurrent uploads"
    report.figure(f"{crowd_label}: total", crowd["seconds"], "s", 2)
    report.figure(f"{crowd_label}: throughput", crowd["mib_s"], "MiB/s")
    report.note(f"{crowd_label}: errors", str(crowd["errors"]))
    workers = service_workers(server.pid)
    report.figure(f"{crowd_label}: peak server RSS, all processes" + (f" ({workers} workers)" if workers > 1 else ""),
                  crowd["peak_rss_mib"], "MiB", 1)
    report.figure(f"{crowd_label}: peak RSS of the largest process", crowd["peak_one_rss_mib"], "MiB", 1)
    report_health(report, "during them", crowd)

    floor = 0.8 * min(refs["write_fsync_mib_s"], refs["ceiling_mib_s"])
    for label, result in (("multipart", multipart), ("raw PUT", raw)):
        report.target(f"{gib} {label} upload ≥ 80% of min(write+fsync, ceiling)",
                      f"{result['mib_s']:,.0f} MiB/s", f"≥ {floor:,.0f} MiB/s", result["mib_s"] >= floor)
    peak = max(multipart["peak_rss_mib"], raw["peak_rss_mib"])
    report.target("peak server RSS during the big uploads", f"{peak:.1f} MiB", "< 100 MiB", peak < 100)
    growth = max(multipart["rss_after_mib"], raw["rss_after_mib"]) - small["rss_after_mib"]
    report.target(f"RSS growth, 10 MiB → {gib} upload", f"{growth:.1f} MiB", "< 16 MiB", growth < 16)
    report.target(f"errors under {CROWD} concurrent uploads", str(crowd["errors"]), "0", crowd["errors"] == 0)
    report.target(f"p99 GET /health under {CROWD} concurrent uploads", f"{crowd['health_p99_ms']:.1f} ms",
                  "< 100 ms", crowd["health_p99_ms"] < 100)


def report_health(report: Report, when: str, result: Result) -> None:
    report.figure(f"GET /health {when}: p50 ({result['health_samples']} samples)",
                  result["health_p50_ms"], "ms", 1)
    report.figure(f"GET /health {when}: p99", result["health_p99_ms"], "ms", 1)
    report.figure(f"GET /health {when}: max", result["health_max_ms"], "ms", 1)


# ---- downloads ----------------------------------------------------------------------------------

async def measure_downloads(server: Server, target: str, run: Run, want: str, *,
                            ranges: bool = True) -> Result:
    full = await asyncio.to_thread(full_downloads, server, target, run.size, want)
    if ranges:
        full["ranges"] = await asyncio.to_thread(range_requests, server, target, run.size, run.buf)
    return full


async def section_downloads(run: Run) -> None:
    """Full downloads and random ranges on uvicorn and Granian, against the loopback ceiling and
    a minimal FileResponse app on uvicorn serving the same bytes."""
    payload = await asyncio.to_thread(payload_file, run)
    want = await asyncio.to_thread(expected_sha256, run.buf, run.size)
    async with httpx.AsyncClient(base_url=run.server.base_url, timeout=TIMEOUT) as client:
        # Waits for the cloud copy too: a replication reading the file must not overlap.
        stored = await upload(run.server, client, "PUT", "/files?path=/bench/download.bin",
                              run.buf, run.size)
    target = f"/files/{stored['id']}/content"
    with bench_helper(run.bench_dir, "--sendfile-server", str(payload)) as helper:
        loopback = await measure_downloads(helper, "/file", run, want, ranges=False)
    references = {}
    for kind in ("uvicorn", "granian"):  # the framework alone on each server, for comparison
        with bench_helper(run.bench_dir, "--fileresponse-server", str(payload), kind) as helper:
            references[kind] = await measure_downloads(helper, "/file", run, want)
    on_uvicorn = await measure_downloads(run.server, target, run, want)
    with run.start_server("granian") as granian:
        on_granian = await measure_downloads(granian, target, run, want)
    report_downloads(run, loopback, references, on_uvicorn, on_granian)


def report_downloads(run: Run, loopback: Result, fileresponse: dict[str, Result], on_uvicorn: Result,
                     on_granian: Result) -> None:
    report, gib = run.report, size_label(run.size)
    ranges = f"{RANGES:,} × {RANGE_SIZE // MiB} MiB random ranges, {RANGE_CLIENTS} clients"
    report.figure(f"loopback ceiling: {gib} by sendfile → recv_into (best of {DOWNLOAD_REPEATS})",
                  loopback["mib_s"], "MiB/s")
    rows = (("FileResponse app on uvicorn", fileresponse["uvicorn"]), ("mediad on uvicorn", on_uvicorn),
            ("FileResponse app on Granian", fileresponse["granian"]), ("mediad on Granian", on_granian))
    for label, result in rows:
        report.figure(f"{label}: {gib} download (best of {DOWNLOAD_REPEATS})", result["mib_s"], "MiB/s")
        report.note(f"{label}: {gib} download, median; CPU server / client",
                    f"{result['median_mib_s']:,.0f} MiB/s; {result['server_cpu_pct']:.0f}% / "
                    f"{result['client_cpu_pct']:.0f}% of one core")
    for label, result in rows:
        got = result["ranges"]
        report.note(f"{label}: {ranges}",
                    f"{got['per_s']:,.0f} req/s, {got['mib_s']:,.0f} MiB/s, {got['errors']} errors")
        report.note(f"{label}: range latency p50 / p99; CPU server / client",
                    f"{got['p50_ms']:.1f} / {got['p99_ms']:.1f} ms; {got['server_cpu_pct']:.0f}% / "
                    f"{got['client_cpu_pct']:.0f}% of one core")
        # Load on the machine moves req/s; the server's CPU per request moves much less.
        report.figure(f"{label}: server CPU per range request", got["server_cpu_ms"], "ms", 2)

    floor = 0.45 * loopback["mib_s"]
    report.target(f"Granian {gib} download ≥ 45% of the loopback ceiling",
                  f"{on_granian['mib_s']:,.0f} MiB/s", f"≥ {floor:,.0f} MiB/s", on_granian["mib_s"] >= floor)
    floor = 0.9 * fileresponse["uvicorn"]["mib_s"]
    report.target(f"uvicorn {gib} download ≥ 90% of FileResponse on uvicorn",
                  f"{on_uvicorn['mib_s']:,.0f} MiB/s", f"≥ {floor:,.0f} MiB/s", on_uvicorn["mib_s"] >= floor)
    got = on_granian["ranges"]
    report.target(f"Granian {RANGE_SIZE // MiB} MiB range requests, {RANGE_CLIENTS} clients",
                  f"{got['per_s']:,.0f} /s", "≥ 1,000 /s", got["per_s"] >= 1000 and got["errors"] == 0)


# ---- the cost of one range request ---------------------------------------------------------------
# What a media player costs the server: many small ranges of one hot file with one token. Counted
# as CPU time (utime + stime of the server's processes and of its PostgreSQL) per request, which
# load on the shared machine moves much less than req/s, next to nginx sending the same file.

SMALL_RANGE, RANGE_FILE, RANGE_SECONDS, RANGE_CONNECTIONS = 64 * 1024, 16 * MiB, 8, 16
_NGINX_CONF = """worker_processes 1;
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/error.log;
events {{ worker_connections 1024; }}
http {{
  access_log off;
  sendfile on;
  tcp_nodelay on;
  client_body_temp_path {dir}/tmp; proxy_temp_path {dir}/tmp; fastcgi_temp_path {dir}/tmp;
  uwsgi_temp_path {dir}/tmp; scgi_temp_path {dir}/tmp;
  server {{ listen 127.0.0.1:{port}; location = /health {{ return 200; }}
           location = /file {{ alias {file}; default_type application/octet-stream; }} }}
}}
"""
# Random 64 KiB-aligned ranges of the file, one per request (wrk's Lua runs in wrk, not the server).
_WRK_SCRIPT = """local blocks = {blocks}
request = function()
  local start = math.random(0, blocks - 1) * {size}
  wrk.headers["Range"] = "bytes=" .. start .. "-" .. (start + {size} - 1)
  return wrk.format()
end
"""


@contextlib.contextmanager
def nginx_server(bench_dir: Path, path: Path) -> Iterator[Server | None]:
    """Debian's nginx (nginx-light) on a loopback port serving `path` with sendfile, no auth;
    None when nginx is not installed."""
    nginx = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    if nginx is None:
        yield None
        return
    directory, port = bench_dir / "nginx", free_port()
    (directory / "tmp").mkdir(parents=True, exist_ok=True)
    conf = directory / "nginx.conf"
    conf.write_text(_NGINX_CONF.format(dir=directory, port=port, file=path))
    url = f"http://127.0.0.1:{port}"
    with running([nginx, "-c", str(conf)], dict(os.environ), url + "/health", directory / "out.log",
                 bench_dir) as proc:
        yield Server(url, proc.pid)


def _cpu_by_pid(pids: Iterable[int]) -> dict[int, float]:
    found = {}
    for pid in pids:
        with contextlib.suppress(OSError):
            found[pid] = cpu_seconds(pid)
    return found


def postgres_pids(run: Run) -> list[int]:
    """The PostgreSQL processes serving mediad: the embedded postmaster's tree, or the backends
    of an external server connected to mediad's database (the postmaster's own work excluded)."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        postmaster = int((run.bench_dir / "data" / "pg" / "postmaster.pid").read_text().split()[0])
        return [postmaster, *descendants(postmaster)]
    if not run.database_url:
        return []
    name = run.database_url.rsplit("/", 1)[-1].split("?")[0].encode()
    pids = []
    for entry in Path("/proc").iterdir():
        with contextlib.suppress(OSError):
            if entry.name.isdigit() and (entry / "cmdline").read_bytes().startswith(b"postgres:") \
                    and name in (entry / "cmdline").read_bytes().split():
                pids.append(int(entry.name))
    return pids


def _client_load(server: Server, target: str, seconds: float, size: int) -> int:
    """wrk when installed, else this script's raw client in RANGE_CONNECTIONS threads: random
    SMALL_RANGE ranges for `seconds`; → the number of answers (every one must be a 206)."""
    wrk = shutil.which("wrk")
    url = server.base_url + target
    if wrk:
        script = Path(os.environ.get("TMPDIR", "/tmp")) / f"bench-ranges-{os.getpid()}.lua"
        script.write_text(_WRK_SCRIPT.format(blocks=size // SMALL_RANGE, size=SMALL_RANGE))
        auth = [arg for name, value in server.headers.items() for arg in ("-H", f"{name}: {value}")]
        try:
            out = subprocess.run([wrk, "-t2", f"-c{RANGE_CONNECTIONS}", f"-d{seconds:g}s", "-s", str(script),
                                  *auth, url], capture_output=True, text=True, check=True).stdout
        finally:
            script.unlink(missing_ok=True)
        if "Non-2xx" in out or "Socket errors" in out:
            raise RuntimeError(f"wrk against {url} saw errors:\n{out}")
        return int(out.split(" requests in ")[0].split()[-1])
    deadline, counts, failures = time.monotonic() + seconds, [], []

    def client(seed: int) -> None:
        rng, conn, done = random.Random(seed), RawConnection(server.port, SMALL_RANGE), 0
        try:
            while time.monotonic() < deadline:
                start = rng.randrange(size // SMALL_RANGE) * SMALL_RANGE
                got = conn.get(target, {**server.headers, "Range": f"bytes={start}-{start + SMALL_RANGE - 1}"})
                if got.status != 206 or got.length != SMALL_RANGE:
                    failures.append(f"{got.status}, {got.length} bytes")
                done += 1
        finally:
            conn.close()
            counts.append(done)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(RANGE_CONNECTIONS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if failures:
        raise RuntimeError(f"range requests to {url} failed: {failures[:3]}")
    return sum(counts)


def range_cost(server: Server, target: str, postgres: Callable[[], list[int]], size: int) -> Result:
    """req/s and CPU µs per request of SMALL_RANGE range requests, after a 1 s warm-up (caches,
    pooled connections). Processes started meanwhile (PostgreSQL backends) count from zero."""
    _client_load(server, target, 1, size)

    def cpu() -> tuple[dict[int, float], dict[int, float]]:
        mine = _cpu_by_pid([server.pid, *descendants(server.pid)])
        return mine, _cpu_by_pid(pid for pid in postgres() if pid not in mine)

    (server_before, pg_before), started = cpu(), time.perf_counter()
    done = _client_load(server, target, RANGE_SECONDS, size)
    seconds = time.perf_counter() - started
    server_after, pg_after = cpu()
    server_cpu = sum(t - server_before.get(pid, 0.0) for pid, t in server_after.items())
    pg_cpu = sum(t - pg_before.get(pid, 0.0) for pid, t in pg_after.items())
    return {"per_s": done / seconds, "server_us": 1e6 * server_cpu / done, "postgres_us": 1e6 * pg_cpu / done,
            "total_us": 1e6 * (server_cpu + pg_cpu) / done}


async def section_ranges(run: Run) -> None:
    """CPU per authenticated 64 KiB range request of a hot file: mediad on uvicorn and on Granian,
    nginx (sendfile, no auth) on the same file, in the same run."""
    path = run.bench_dir / "ranges.bin"
    await asyncio.to_thread(path.write_bytes, run.buf * (RANGE_FILE // len(run.buf)))
    async with httpx.AsyncClient(base_url=run.server.base_url, timeout=TIMEOUT) as client:
        stored = await upload(run.server, client, "PUT", "/files?path=/bench/ranges.bin", run.buf, RANGE_FILE)
    target = f"/files/{stored['id']}/content"
    results: dict[str, Result] = {}
    with nginx_server(run.bench_dir, path) as nginx:
        if nginx is not None:
            results["nginx (sendfile, no auth)"] = await asyncio.to_thread(range_cost, nginx, "/file", list,
                                                                         RANGE_FILE)
    postgres = functools.partial(postgres_pids, run)
    results["mediad on uvicorn"] = await asyncio.to_thread(range_cost, run.server, target, postgres, RANGE_FILE)
    with run.start_server("granian") as granian:
        results["mediad on Granian"] = await asyncio.to_thread(range_cost, granian, target, postgres, RANGE_FILE)
    report_ranges(run.report, results, bool(shutil.which("wrk")))


def report_ranges(report: Report, results: dict[str, Result], wrk: bool) -> None:
    client = f"{'wrk' if wrk else 'raw client'}, {RANGE_CONNECTIONS} connections, {RANGE_SECONDS} s"
    for label, got in results.items():
        report.note(f"{label}: random {SMALL_RANGE // 1024} KiB ranges of a {RANGE_FILE // MiB} MiB file ({client})",
                    f"{got['per_s']:,.0f} req/s; CPU per request {got['total_us']:,.0f} µs "
                    f"(server {got['server_us']:,.0f} + PostgreSQL {got['postgres_us']:,.0f})")
    nginx = results.get("nginx (sendfile, no auth)")
    best = min(got["total_us"] for label, got in results.items() if label.startswith("mediad"))
    if nginx is None:
        report.note("nginx reference", "not installed (apt-get install nginx-light): no target")
        return
    report.target(f"mediad CPU per {SMALL_RANGE // 1024} KiB range request (best server) ≤ 8× nginx's",
                  f"{best:,.0f} µs ({best / nginx['total_us']:.1f}×)", f"≤ {8 * nginx['total_us']:,.0f} µs",
                  best <= 8 * nginx["total_us"])


# ---- cloud --------------------------------------------------------------------------------------

async def plain_cloud_put(cloud: Cloud, path: Path, size: int, want: str) -> Result:
    """The reference: one streamed httpx PUT of the file to the same mock cloud."""
    headers = {"Authorization": f"Bearer {cloud.token}", "x-content-sha256": want}
    cpu_before = cpu_seconds(cloud.pid)
    async with httpx.AsyncClient(timeout=TIMEOUT) as client:
        sent = await send_stream(client, "PUT", f"{cloud.url}/objects/bench/plain-{secrets.token_hex(4)}",
                                 _file_chunks(path), size, headers=headers)
    if sent["status"] != 201 or sent["json"].get("sha256") != want:
        raise RuntimeError(f"the mock cloud answered {sent['status']}: {sent['json']}")
    return {**sent, "cloud_cpu_pct": 100 * (cpu_seconds(cloud.pid) - cpu_before) / sent["seconds"]}


async def replicate(run: Run, client: httpx.AsyncClient) -> Result:
    """Upload a big file to mediad, then time 201 → cloud.state "stored" with the server's RSS
    sampled meanwhile."""
    server, size = run.server, run.size
    want = await asyncio.to_thread(expected_sha256, run.buf, size)
    before = proc_status(server.pid)["VmRSS"]
    sent = await send_body(client, "PUT", "/files?path=/bench/cloud.bin", run.buf, size,
                           headers=server.headers)
    if sent["status"] not in (200, 201) or sent["json"].get("sha256") != want:
        raise RuntimeError(f"PUT /files answered {sent['status']}: {sent['json']}")
    at_201 = proc_status(server.pid)["VmRSS"]
    cpu_before, cloud_cpu_before = tree_cpu_seconds(server.pid), cpu_seconds(run.cloud.pid)
    with RssSampler(server.pid) as rss:
        seconds = await wait_replicated(client, sent["json"]["id"], server.headers, poll_s=0.02)
    if seconds is None:
        raise RuntimeError("the big file was not stored in the cloud within 300 s")
    return {"seconds": seconds, "mib_s": size / MiB / seconds, "rss_before_mib": before / 1024,
            "rss_at_201_mib": at_201 / 1024, "peak_rss_mib": rss.peak_kib / 1024,
            "server_cpu_pct": 100 * (tree_cpu_seconds(server.pid) - cpu_before) / seconds,
            "cloud_cpu_pct": 100 * (cpu_seconds(run.cloud.pid) - cloud_cpu_before) / seconds}


async def replication_lag(run: Run, client: httpx.AsyncClient) -> Result:
    """LAG_FILES small uploads one after the other; a watcher lists them every 10 ms and notes
    when each first shows as stored (the time its answer arrived: an upper bound)."""
    server, prefix = run.server, f"/bench-lag-{secrets.token_hex(4)}/"
    acked: dict[str, float] = {}
    stored: dict[str, float] = {}
    uploads_done = asyncio.Event()

    async def watch() -> None:
        while not (uploads_done.is_set() and stored.keys() >= acked.keys()):
            answer = await client.get("/files", params={"prefix": prefix, "limit": 1000},
                                      headers=server.headers)
            now = time.perf_counter()
            for file in answer.json()["files"]:
                if file["cloud"]["state"] == "stored":
                    stored.setdefault(file["id"], now)
            await asyncio.sleep(0.01)

    watcher = asyncio.create_task(watch())
    started = time.perf_counter()
    for i in range(LAG_FILES):
        sent = await send_body(client, "POST", f"/files?name=lag-{i}.bin&path={prefix}", run.buf,
                               LAG_SIZE, headers=server.headers)
        if sent["status"] != 201:
            raise RuntimeError(f"POST /files answered {sent['status']}: {sent['json']}")
        acked[sent["json"]["id"]] = time.perf_counter()
    uploaded = time.perf_counter() - started
    uploads_done.set()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(asyncio.shield(watcher), 120)
    watcher.cancel()
    lags = [stored[i] - at for i, at in acked.items() if i in stored] or [float("nan")]
    return {"uploaded_s": uploaded, "p50_ms": percentile(lags, 50) * 1000,
            "p99_ms": percentile(lags, 99) * 1000, "max_ms": max(lags) * 1000,
            "missing": len(acked.keys() - stored.keys())}


async def section_cloud(run: Run) -> None:
    payload = await asyncio.to_thread(payload_file, run)
    want = await asyncio.to_thread(expected_sha256, run.buf, run.size)
    plain = await plain_cloud_put(run.cloud, payload, run.size, want)
    async with httpx.AsyncClient(base_url=run.server.base_url, timeout=TIMEOUT) as client:
        pushed = await replicate(run, client)
        lag = await replication_lag(run, client)

    report, gib = run.report, size_label(run.size)
    report.figure(f"plain streamed httpx PUT of {gib} to the mock cloud", plain["mib_s"], "MiB/s")
    report.note("plain PUT: CPU, mock cloud / client",
                f"{plain['cloud_cpu_pct']:.0f}% / {plain['client_cpu_pct']:.0f}% of one core")
    report.figure(f"mediad: {gib} upload 201 → cloud stored", pushed["seconds"], "s", 2)
    report.figure(f"mediad: {gib} replication throughput", pushed["mib_s"], "MiB/s")
    report.note("mediad replication: CPU, server / mock cloud",
                f"{pushed['server_cpu_pct']:.0f}% / {pushed['cloud_cpu_pct']:.0f}% of one core")
    report.note("server RSS before the upload / at its 201 / peak while replicating",
                f"{pushed['rss_before_mib']:.1f} / {pushed['rss_at_201_mib']:.1f} / "
                f"{pushed['peak_rss_mib']:.1f} MiB")
    label = f"{LAG_FILES} × {LAG_SIZE // 1024} KiB uploads in a row"
    report.figure(f"{label}: uploaded in", lag["uploaded_s"], "s", 2)
    report.note(f"{label}: 201 → stored lag p50 / p99 / max (polled every 10 ms)",
                f"{lag['p50_ms']:,.0f} / {lag['p99_ms']:,.0f} / {lag['max_ms']:,.0f} ms")
    report.note(f"{label}: not stored within 120 s", str(lag["missing"]))

    floor = 0.7 * plain["mib_s"]
    report.target(f"{gib} replication ≥ 70% of a plain PUT", f"{pushed['mib_s']:,.0f} MiB/s",
                  f"≥ {floor:,.0f} MiB/s", pushed["mib_s"] >= floor)
    growth = pushed["peak_rss_mib"] - pushed["rss_at_201_mib"]
    report.target(f"server RSS growth while replicating {gib}", f"{growth:.1f} MiB", "< 32 MiB",
                  growth < 32)


# ---- audio --------------------------------------------------------------------------------------

def ffmpeg_executable() -> str:
    import imageio_ffmpeg  # type: ignore[import-untyped]  # the binary mediad uses by default

    return str(imageio_ffmpeg.get_ffmpeg_exe())


def make_wav(ffmpeg: str, path: Path, seconds: int) -> int:
    """`seconds` of a 440 Hz sine as 44.1 kHz stereo 16-bit PCM (10 minutes ≈ 101 MiB); its size."""
    subprocess.run([ffmpeg, "-nostdin", "-hide_banner", "-loglevel", "error", "-f", "lavfi",
                    "-i", f"sine=frequency=440:sample_rate=44100:duration={seconds}", "-ac", "2",
                    "-c:a", "pcm_s16le", "-y", str(path)], check=True)
    return path.stat().st_size


def convert_alone(ffmpeg: str, wav: Path, mp3: Path) -> float:
    """The floor: seconds for the same conversion mediad.audio.Transcoder runs, on its own."""
    started = time.perf_counter()
    subprocess.run([ffmpeg, "-nostdin", "-hide_banner", "-loglevel", "error", "-xerror",
                    "-f", "wav", "-i", str(wav), "-map", "0:a:0", "-vn", "-c:a", "libmp3lame",
                    "-q:a", "2", "-ar", "44100", "-ac", "2", "-f", "mp3", "-y", str(mp3)], check=True)
    seconds = time.perf_counter() - started
    mp3.unlink()
    return seconds


async def post_record(server: Server, client: httpx.AsyncClient, wav: Path, size: int) -> Result:
    """POST /records with the WAV streamed from disk; the answer must be an MP3 File."""
    sent = await send_stream(client, "POST", "/records", _file_chunks(wav), size,
                             part=(wav.name, "audio/wav"), headers=server.headers)
    if sent["status"] != 201 or sent["json"].get("file", {}).get("format") != "audio/mpeg":
        raise RuntimeError(f"POST /records answered {sent['status']}: {sent['json']}")
    return sent


async def one_record(server: Server, client: httpx.AsyncClient, wav: Path, size: int) -> Result:
    """One long conversion, with the server's RSS and ffmpeg's peak RSS and CPU sampled."""
    idle = proc_status(server.pid)["VmRSS"]
    with RssSampler(server.pid, child_prefix="ffmpeg") as rss:
        sent = await post_record(server, client, wav, size)
    await wait_replicated(client, sent["json"]["id"], server.headers)  # not overlapping what follows
    return {"seconds": sent["seconds"], "body_sent_s": sent["body_sent_s"],
            "rss_growth_mib": (rss.peak_kib - idle) / 1024, "ffmpeg_peak_mib": rss.child_peak_kib / 1024,
            "ffmpeg_cpu_s": sum(rss.child_cpu.values())}


async def concurrent_records(server: Server, client: httpx.AsyncClient, wav: Path, size: int,
                             count: int) -> Result:
    errors: list[str] = []

    async def one(i: int) -> None:
        try:
            await post_record(server, client, wav, size)
        except (httpx.HTTPError, RuntimeError) as exc:
            errors.append(f"record {i}: {exc}")

    async with health_watched(server.base_url) as health:
        await asyncio.gather(*(one(i) for i in range(count)))
    stats = health.stats()
    errors += stats.pop("health_errors")
    for line in errors[:5]:
        print(f"bench: {line}", file=sys.stderr)
    return {"seconds": health.finished - health.started, "errors": len(errors), **stats}


async def section_audio(run: Run) -> None:
    ffmpeg = ffmpeg_executable()
    long_wav, short_wav = run.bench_dir / "long.wav", run.bench_dir / "short.wav"
    long_size = await asyncio.to_thread(make_wav, ffmpeg, long_wav, RECORD_S)
    short_size = await asyncio.to_thread(make_wav, ffmpeg, short_wav, SHORT_RECORD_S)
    alone = await asyncio.to_thread(convert_alone, ffmpeg, long_wav, run.bench_dir / "alone.mp3")
    limits = httpx.Limits(max_connections=RECORD_CROWD)
    async with httpx.AsyncClient(base_url=run.server.base_url, timeout=TIMEOUT, limits=limits) as client:
        single = await one_record(run.server, client, long_wav, long_size)
        crowd = await concurrent_records(run.server, client, short_wav, short_size, RECORD_CROWD)

    report = run.report
    label = f"{RECORD_S // 60} min WAV ({long_size / MiB:.0f} MiB) → MP3"
    report.figure(f"ffmpeg alone: {label}", alone, "s", 2)
    report.figure(f"POST /records: {label}, end to end", single["seconds"], "s", 2)
    report.figure("POST /records: × real time", RECORD_S / single["seconds"], "×", 1)
    report.figure("POST /records: of which the WAV upload", single["body_sent_s"], "s", 2)
    report.figure("POST /records: ffmpeg CPU", single["ffmpeg_cpu_s"], "s", 2)
    report.figure("POST /records: server RSS growth (mediad process)", single["rss_growth_mib"], "MiB", 1)
    report.figure("POST /records: ffmpeg child peak RSS", single["ffmpeg_peak_mib"], "MiB", 1)
    crowd_label = f"{RECORD_CROWD} × {SHORT_RECORD_S // 60} min WAV concurrent POST /records"
    report.figure(f"{crowd_label}: total", crowd["seconds"], "s", 2)
    report.note(f"{crowd_label}: errors", str(crowd["errors"]))
    report_health(report, "during them", crowd)

    speed = RECORD_S / single["seconds"]
    report.target(f"{RECORD_S // 60} min WAV → MP3 speed", f"{speed:.1f}×", "≥ 40× real time", speed >= 40)
    growth = single["rss_growth_mib"]
    report.target("server RSS growth during a conversion", f"{growth:.1f} MiB", "< 50 MiB", growth < 50)
    report.target(f"errors under {RECORD_CROWD} concurrent conversions", str(crowd["errors"]), "0",
                  crowd["errors"] == 0)
    report.target(f"p99 GET /health under {RECORD_CROWD} concurrent conversions",
                  f"{crowd['health_p99_ms']:.1f} ms", "< 100 ms", crowd["health_p99_ms"] < 100)


def run_header(argv: list[str], database_url: str | None) -> str:
    """When, what and on which code: the tree may hold uncommitted work (read-only git calls)."""
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", "--no-optional-locks", *args], cwd=REPO, capture_output=True,
                                  text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    dirty = " + uncommitted changes" if git("status", "--porcelain", "--untracked-files=no") else ""
    database = "embedded PostgreSQL"
    if database_url:
        database = database_url.split("@")[-1]  # host/db only: never print a password
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    return (f"mediad benchmark, {when}: `python -m ops.bench {' '.join(argv)}`, commit "
            f"{git('rev-parse', '--short', 'HEAD') or '?'}{dirty}, database {database}, "
            f"{os.cpu_count()} CPUs.\n\n")



# ---- resumable uploads (tus) --------------------------------------------------------------------

TUS_CHUNK = 16 * MiB


async def tus_upload(server: Server, client: httpx.AsyncClient, buf: bytes, size: int,
                     chunk: int = TUS_CHUNK) -> Result:
    """`size` bytes through /uploads in `chunk`-sized PATCHes, each streamed in 1 MiB pieces."""
    want = await asyncio.to_thread(expected_sha256, buf, size)
    metadata = "filename " + base64.b64encode(b"tus.bin").decode()
    tus = {**server.headers, "Tus-Resumable": "1.0.0"}
    started = time.perf_counter()
    cpu_before = tree_cpu_seconds(server.pid)
    with RssSampler(server.pid) as rss:
        created = await client.post("/uploads", headers={**tus, "Upload-Length": str(size),
                                                         "Upload-Metadata": metadata})
        location, offset, file_id = created.headers["location"], 0, None
        while offset < size:
            length = min(chunk, size - offset)
            answer = await client.patch(location, content=_buffer_chunks(buf, length), headers={
                **tus, "Upload-Offset": str(offset), "Content-Type": "application/offset+octet-stream",
                "Content-Length": str(length)})
            if answer.status_code != 204:
                raise RuntimeError(f"PATCH at {offset} answered {answer.status_code}: {answer.text}")
            offset = int(answer.headers["upload-offset"])
            file_id = answer.headers.get("mediad-file-id", file_id)
    seconds = time.perf_counter() - started
    cpu = tree_cpu_seconds(server.pid) - cpu_before
    stored = (await client.get(f"/files/{file_id}", headers=server.headers)).json()
    if stored.get("sha256") != want:
        raise RuntimeError(f"tus upload stored sha256 {stored.get('sha256')}, expected {want}")
    await wait_replicated(client, str(file_id), server.headers)
    await asyncio.sleep(0.3)  # as after a PUT (`upload`): the next upload starts on a settled server
    return {"mib_s": size / MiB / seconds, "seconds": seconds, "peak_rss_mib": rss.peak_kib / 1024,
            "server_cpu_pct": 100 * cpu / seconds}


SMALL_PATCHES = 200


async def small_patch_latency(server: Server, client: httpx.AsyncClient) -> dict[str, float]:
    """What a PATCH costs whatever its size: p50 of SMALL_PATCHES 1-byte PATCHes to one upload,
    against an authenticated HEAD of it (the least a request with one lookup costs)."""
    metadata = "filename " + base64.b64encode(b"small.bin").decode()
    tus = {**server.headers, "Tus-Resumable": "1.0.0"}
    created = await client.post("/uploads", headers={**tus, "Upload-Length": str(SMALL_PATCHES + 1),
                                                     "Upload-Metadata": metadata})
    location = created.headers["location"]
    patches, heads = [], []
    for offset in range(SMALL_PATCHES):
        started = time.perf_counter()
        answer = await client.patch(location, content=b"x", headers={
            **tus, "Upload-Offset": str(offset), "Content-Type": "application/offset+octet-stream"})
        patches.append(time.perf_counter() - started)
        if answer.status_code != 204:
            raise RuntimeError(f"1-byte PATCH at {offset} answered {answer.status_code}: {answer.text}")
        started = time.perf_counter()
        await client.head(location, headers=tus)
        heads.append(time.perf_counter() - started)
    await client.delete(location, headers=tus)
    return {"patch_ms": 1000 * statistics.median(patches), "head_ms": 1000 * statistics.median(heads)}


TUS_ROUNDS = 6  # PUT and tus alternate: a VM's write speed drifts by ±30 % within a minute
TUS_LARGE_CHUNK, TUS_LARGE_ROUNDS = 64 * MiB, 2  # what larger PATCHes change, for the record


async def _paired_round(server: Server, client: httpx.AsyncClient, buf: bytes, size: int, i: int,
                        chunk: int) -> tuple[Result, Result]:
    """A plain PUT and the same bytes through tus in `chunk` PATCHes; tus goes first when `i` is
    odd, so that a speed that drifts favours neither. New paths: a replace would delete a blob
    during the next upload."""
    put = upload(server, client, "PUT", f"/files?path=/bench/plain-for-tus-{chunk // MiB}-{i}.bin", buf, size)
    if i % 2:
        resumable = await tus_upload(server, client, buf, size, chunk)
        return await put, resumable
    plain = await put
    return plain, await tus_upload(server, client, buf, size, chunk)


async def section_tus(run: Run) -> None:
    """TUS_ROUNDS rounds of a plain PUT and the same bytes through tus, which of the two goes first
    alternating from round to round; the target is the median of the rounds' ratios, so that a
    slow or fast spell of the machine weighs on both sides of a round alike."""
    server, buf, size, report = run.server, run.buf, run.size, run.report
    gib = size_label(size)
    plain: list[Result] = []
    resumable: list[Result] = []
    async with httpx.AsyncClient(base_url=server.base_url, timeout=TIMEOUT) as client:
        await settle(server, client)
        # Not counted: on a VM the first big write after a quiet spell runs up to twice as fast
        # as the ones after it, which would favour whichever upload came first.
        await upload(server, client, "PUT", "/files?path=/bench/tus-warm-up.bin", buf, size)
        for i in range(TUS_ROUNDS):
            put, tus = await _paired_round(server, client, buf, size, i, TUS_CHUNK)
            plain.append(put)
            resumable.append(tus)
        large = [await _paired_round(server, client, buf, size, i, TUS_LARGE_CHUNK) for i in range(TUS_LARGE_ROUNDS)]
        small = await small_patch_latency(server, client)
    put_mib_s = statistics.median(r["mib_s"] for r in plain)
    tus_mib_s = statistics.median(r["mib_s"] for r in resumable)
    rounds = ", ".join(f"{p['mib_s']:,.0f} / {t['mib_s']:,.0f}" for p, t in zip(plain, resumable, strict=True))
    report.figure(f"{gib} plain PUT (same run, for tus; median of {TUS_ROUNDS})", put_mib_s, "MiB/s")
    report.figure(f"{gib} tus upload in {TUS_CHUNK // MiB} MiB PATCHes (median of {TUS_ROUNDS})", tus_mib_s, "MiB/s")
    report.note(f"{gib} PUT / tus, MiB/s, round by round (tus first in the even-numbered ones)", rounds)
    report.note(f"{gib} tus / PUT, round by round", ", ".join(
        f"{100 * t['mib_s'] / p['mib_s']:.0f}%" for p, t in zip(plain, resumable, strict=True)))
    report.note(f"{gib} tus / PUT with {TUS_LARGE_CHUNK // MiB} MiB PATCHes, round by round",
                ", ".join(f"{100 * t['mib_s'] / p['mib_s']:.0f}%" for p, t in large))
    report.note("what a PATCH costs whatever its size (1-byte PATCHes, p50)",
                f"{small['patch_ms']:.2f} ms; an authenticated HEAD of the upload {small['head_ms']:.2f} ms")
    report.note(f"{gib} tus upload: server CPU",
                f"{statistics.median(r['server_cpu_pct'] for r in resumable):.0f}% of one core")
    peak = max(r["peak_rss_mib"] for r in resumable)
    report.figure(f"{gib} tus upload: peak server RSS", peak, "MiB", 1)
    ratio = statistics.median(t["mib_s"] / p["mib_s"] for p, t in zip(plain, resumable, strict=True))
    report.target(f"{gib} tus upload ≥ 90% of a plain PUT", f"{100 * ratio:.0f}%", "≥ 90%", ratio >= 0.9)
    report.target("peak server RSS during the tus upload", f"{peak:.1f} MiB", "< 100 MiB", peak < 100)


# ---- webhooks -----------------------------------------------------------------------------------

HOOK_UPLOADS, HOOK_SIZE, HOOK_CLIENTS = 1000, 16 * 1024, 8  # small uploads: per-upload cost shows


async def _hook_receiver_app(scope: dict[str, Any], receive: Callable[[], Awaitable[dict[str, Any]]],
                             send: Callable[[dict[str, Any]], Awaitable[None]], log: Any = None) -> None:
    """A subscriber: notes each event's arrival (wall clock, file id, type), answers 204."""
    if scope["type"] == "lifespan":
        while (message := await receive())["type"] != "lifespan.shutdown":
            await send({"type": message["type"] + ".complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    body, more = b"", True
    while more:
        message = await receive()
        body += message.get("body", b"")
        more = message.get("more_body", False)
    arrived = time.time()
    if body:
        event = json.loads(body)
        log.write(f"{arrived} {event['data'].get('file', {}).get('id')} {event['type']}\n")
        log.flush()
    await send({"type": "http.response.start", "status": 204 if body else 200, "headers": []})
    await send({"type": "http.response.body", "body": b""})


def serve_hook_receiver(port: int, path: str) -> None:
    import uvicorn

    with open(path, "a") as log:
        app = functools.partial(_hook_receiver_app, log=log)
        uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None,
                                      access_log=False, interface="asgi3")).run()


async def _timed_uploads(server: Server, headers: dict[str, str], tag: str) -> tuple[Result, dict[str, float]]:
    """HOOK_UPLOADS small raw uploads from HOOK_CLIENTS clients: ({uploads/s, server CPU ms per
    upload}, file id → 201 time)."""
    body = os.urandom(HOOK_SIZE)
    acked: dict[str, float] = {}
    queue = iter(range(HOOK_UPLOADS))
    limits = httpx.Limits(max_connections=HOOK_CLIENTS, max_keepalive_connections=HOOK_CLIENTS)

    async def worker(client: httpx.AsyncClient) -> None:
        for i in queue:
            answer = await client.post(f"/files?name={tag}-{i}.bin", content=body, headers=headers)
            if answer.status_code != 201:
                raise RuntimeError(f"upload {tag}-{i} answered {answer.status_code}: {answer.text}")
            acked[answer.json()["id"]] = time.time()

    async with httpx.AsyncClient(base_url=server.base_url, timeout=TIMEOUT, limits=limits) as client:
        started, cpu = time.perf_counter(), tree_cpu_seconds(server.pid)
        await asyncio.gather(*(worker(client) for _ in range(HOOK_CLIENTS)))
        seconds = time.perf_counter() - started
        cpu = tree_cpu_seconds(server.pid) - cpu
    return {"rate": HOOK_UPLOADS / seconds, "cpu_ms": 1000 * cpu / HOOK_UPLOADS}, acked


async def _arrivals(path: Path, acked: dict[str, float], timeout: float = 120) -> dict[str, float]:
    """file id → when its file.created reached the receiver, once all of `acked` have."""
    deadline = time.monotonic() + timeout
    while True:
        arrivals = {}
        for line in (await asyncio.to_thread(path.read_text)).splitlines():
            moment, file_id, kind = line.split(" ")
            if kind == "file.created" and file_id in acked:
                arrivals.setdefault(file_id, float(moment))
        if len(arrivals) == len(acked) or time.monotonic() > deadline:
            return arrivals
        await asyncio.sleep(0.2)


async def section_webhooks(run: Run) -> None:
    """Upload throughput without and with an endpoint registered, and 201 → receiver latency. A
    mediad of its own (its own embedded database) that may call the loopback receiver."""
    report, bench_dir = run.report, run.bench_dir / "webhooks"
    bench_dir.mkdir(exist_ok=True)
    port, arrivals_log = free_port(), bench_dir / "arrivals.log"
    arrivals_log.touch()
    receiver = multiprocessing.get_context("spawn").Process(
        target=serve_hook_receiver, args=(port, str(arrivals_log)), daemon=True)
    receiver.start()
    env = {"MEDIAD_WEBHOOK_ALLOW_PRIVATE": "true"}
    try:
        await asyncio.to_thread(_wait_answering, f"http://127.0.0.1:{port}/")
        with mediad_server(bench_dir, None, env, run.cloud) as server:
            await _timed_uploads(server, server.headers, "warm")  # first-use costs out of the figures
            plain, _ = await _timed_uploads(server, server.headers, "plain")
            async with httpx.AsyncClient(base_url=server.base_url, timeout=TIMEOUT) as client:
                user = (await client.post("/users", json={"name": f"hooked-{secrets.token_hex(4)}"})).json()
                headers = {"Authorization": f"Bearer {user['token']}"}
                created = await client.post("/webhooks", json={"url": f"http://127.0.0.1:{port}/hook"},
                                            headers=headers)
                created.raise_for_status()
            hooked, acked = await _timed_uploads(server, headers, "hooked")
            arrived = await _arrivals(arrivals_log, acked)
            await asyncio.sleep(3)  # the file.stored events trail
            events = len((await asyncio.to_thread(arrivals_log.read_text)).splitlines())
    finally:
        receiver.terminate()
        receiver.join(10)
    latencies = sorted(1000 * (arrived[i] - acked[i]) for i in arrived)
    label = f"{HOOK_UPLOADS} × {HOOK_SIZE // 1024} KiB uploads, {HOOK_CLIENTS} clients"
    report.figure(f"{label}: no endpoint", plain["rate"], "uploads/s")
    report.figure(f"{label}: an endpoint (all events)", hooked["rate"], "uploads/s")
    report.figure("mediad CPU per upload, no endpoint", plain["cpu_ms"], "ms", 2)
    report.figure("mediad CPU per upload, an endpoint", hooked["cpu_ms"], "ms", 2)
    report.note("events received by the end (file.stored trails replication)",
                f"{events}; file.created: {len(arrived)} of {len(acked)}")
    for pct in (50, 99):
        report.figure(f"201 → receiver, p{pct}", percentile(latencies, pct) if latencies else float("nan"), "ms", 1)
    report.figure("201 → receiver, max", latencies[-1] if latencies else float("nan"), "ms", 1)
    ratio = hooked["rate"] / plain["rate"]
    report.target("upload throughput with an endpoint", f"{100 * ratio:.0f}%", "≥ 95% of none", ratio >= 0.95)
    p99 = percentile(latencies, 99) if len(latencies) == len(acked) else float("inf")
    report.target("event latency 201 → receiver, p99", f"{p99:.0f} ms", "< 500 ms", p99 < 500)


def _wait_answering(url: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.TransportError):
            httpx.get(url, timeout=1)
            return
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer within {timeout} s")


# ---- workers -------------------------------------------------------------------------------------

WORKER_RANGE = 64 * 1024  # a media player's small range request
WORKER_CONNECTIONS, WORKER_SECONDS = 16, 5


def service_workers(pid: int) -> int:
    """Worker processes of a `mediad serve` (its children less multiprocessing's resource tracker);
    1 when it serves in-process."""
    workers = 0
    for child in descendants(pid):
        with contextlib.suppress(OSError):
            command = Path(f"/proc/{child}/cmdline").read_bytes()
            if b"resource_tracker" not in command and b"mock-cloud" not in command:
                workers += 1
    return workers or 1


def wrk_ranges(server: Server, target: str, seconds: int) -> Result:
    """wrk, WORKER_CONNECTIONS keep-alive connections, one hot WORKER_RANGE range of one file
    over and over: the server's per-request cost, with a client that costs little."""
    url = f"{server.base_url}{target}"
    headers = [*(item for name, value in server.headers.items() for item in ("-H", f"{name}: {value}")),
               "-H", f"Range: bytes=0-{WORKER_RANGE - 1}"]
    base = ["wrk", "-t", "2", "-c", str(WORKER_CONNECTIONS), *headers]
    subprocess.run([*base, "-d", "1s", url], capture_output=True, check=True)  # warm up
    cpu_before = tree_cpu_seconds(server.pid)
    done = subprocess.run([*base, "-d", f"{seconds}s", url], capture_output=True, text=True, check=True)
    cpu = tree_cpu_seconds(server.pid) - cpu_before
    out = done.stdout
    per_s = float(out.split("Requests/sec:")[1].split()[0])
    errors = int(out.split("Non-2xx or 3xx responses:")[1].split()[0]) if "Non-2xx" in out else 0
    return {"per_s": per_s, "errors": errors, "server_cpu_us": 1e6 * cpu / max(per_s * seconds, 1)}


async def section_workers(run: Run) -> None:
    """64 KiB authenticated range requests of one file, answered by `mediad serve --workers 1` and
    `--workers 2` on the same data dir and database, with the same client."""
    if shutil.which("wrk") is None:
        run.report.note("range requests by worker count", "skipped: wrk is not installed")
        return
    async with httpx.AsyncClient(base_url=run.server.base_url, timeout=TIMEOUT) as client:
        stored = await upload(run.server, client, "PUT", "/files?path=/bench/workers.bin", run.buf, 64 * MiB)
    target = f"/files/{stored['id']}/content"
    got = {}
    for workers in (1, 2):
        with run.start_server("uvicorn", workers=workers) as server:
            got[workers] = await asyncio.to_thread(wrk_ranges, server, target, WORKER_SECONDS)
    label = f"{WORKER_RANGE // 1024} KiB range requests, {WORKER_CONNECTIONS} connections (wrk, uvicorn)"
    run.report.note(f"{label}: 1 worker / 2 workers",
                    f"{got[1]['per_s']:,.0f} / {got[2]['per_s']:,.0f} req/s "
                    f"({got[1]['errors'] + got[2]['errors']} errors)")
    run.report.note(f"{label}: server CPU per request, 1 / 2 workers",
                    f"{got[1]['server_cpu_us']:,.0f} / {got[2]['server_cpu_us']:,.0f} µs")
    ratio = got[2]["per_s"] / got[1]["per_s"]
    run.report.figure(f"{label}: 2 workers ÷ 1 worker", ratio, "×", 2)
# ---- media: probing and thumbnails --------------------------------------------------------------

# Cold thumbnails are timed on this many uploads of the same file, sharp's as often; the best of each
# is compared, since other work on a shared machine only ever adds to a time.
MEDIA_COPIES = 7
THUMBNAIL_GETS = 1000
SHARP_SCRIPT = r"""
const sharp = require(process.argv[2]);
sharp.cache(false);
const [file, runs] = [process.argv[3], Number(process.argv[4])];
const make = (size) => sharp(file).resize(size, size, { fit: "inside", withoutEnlargement: true })
  .webp({ quality: 80 }).toBuffer();
(async () => {
  await make(128);  // warmed as mediad's worker is: the same file once, at another size
  const times = [];
  for (let i = 0; i < runs; i++) {
    const started = process.hrtime.bigint();
    await make(256);
    times.push(Number(process.hrtime.bigint() - started) / 1e6);
  }
  console.log(JSON.stringify({ times_ms: times, max_rss_kib: process.resourceUsage().maxRSS }));
})();
"""


def make_photo(path: Path, width: int = 6000, height: int = 4000) -> None:
    """24 megapixels with a camera photo's texture (noise compresses as badly as detail does)."""
    import pyvips

    noise = pyvips.Image.gaussnoise(width, height, sigma=40, mean=128)
    xyz = pyvips.Image.xyz(width, height)
    image = noise.bandjoin([xyz[0] / (width / 255), xyz[1] / (height / 255)]).cast("uchar")
    image.copy(interpretation="srgb").jpegsave(str(path), Q=85)


def make_video(path: Path, width: int, height: int, fps: int, seconds: float, *, noisy: bool) -> None:
    """H.264 in MP4 with PyAV (ultrafast: the bench is about reading it, not making it)."""
    import av
    import pyvips

    picture = (pyvips.Image.gaussnoise(width, height, sigma=50, mean=128) if noisy
               else pyvips.Image.xyz(width, height)[0] % 256).cast("uchar")
    rgba = bytes(picture.bandjoin([picture, picture, 255]).cast("uchar").write_to_memory())
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=fps, options={"preset": "ultrafast"})
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.gop_size = 2 * fps
        frame = av.VideoFrame.from_bytes(rgba, width, height, "rgba").reformat(format="yuv420p")
        for index in range(round(seconds * fps)):
            frame.pts = index
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


async def upload_file(client: httpx.AsyncClient, server: Server, path: Path, name: str) -> dict[str, Any]:
    size = await asyncio.to_thread(os.path.getsize, path)
    answer = await send_stream(client, "POST", f"/files?name={name}", _file_chunks(path), size, headers=server.headers)
    if answer["status"] != 201:
        raise RuntimeError(f"upload of {name} answered {answer['status']}: {answer['json']}")
    file: dict[str, Any] = answer["json"]
    return file


async def wait_probed(client: httpx.AsyncClient, server: Server, file_id: str) -> dict[str, Any]:
    for _ in range(1200):
        file: dict[str, Any] = (await client.get(f"/files/{file_id}", headers=server.headers)).json()
        if file["media"] is not None:
            return file
        await asyncio.sleep(0.05)
    raise RuntimeError(f"{file_id} was not probed within a minute")


async def cold_thumbnails(client: httpx.AsyncClient, server: Server, ids: list[str], size: int = 256) -> list[float]:
    """Seconds for the first (uncached) GET of each file's thumbnail, one after another."""
    times = []
    for file_id in ids:
        started = time.perf_counter()
        answer = await client.get(f"/files/{file_id}/thumbnail?size={size}",
                                  headers={**server.headers, "Accept": "image/webp"})
        times.append(time.perf_counter() - started)
        if answer.status_code != 200:
            raise RuntimeError(f"thumbnail of {file_id} answered {answer.status_code}: {answer.text}")
    return times


def repeated_gets(server: Server, target: str, headers: dict[str, str], count: int) -> Result:
    """`count` GETs of one small resource over RANGE_CLIENTS keep-alive connections."""
    pending = iter(range(count))
    lock = threading.Lock()
    latencies: list[float] = []
    errors: list[str] = []

    def client() -> None:
        conn = RawConnection(server.port)
        try:
            while True:
                with lock:
                    if next(pending, None) is None:
                        return
                got = conn.get(target, {**server.headers, **headers})
                latencies.append(got.seconds)
                if got.status != 200 or not got.length:
                    errors.append(f"{got.status}, {got.length} bytes")
        finally:
            conn.close()

    threads = [threading.Thread(target=client) for _ in range(RANGE_CLIENTS)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - started
    return {"per_s": count / seconds, "p50_ms": percentile(latencies, 50) * 1000,
            "p99_ms": percentile(latencies, 99) * 1000, "errors": len(errors)}


def sharp_thumbnails(bench_dir: Path, photo: Path) -> Result | None:
    """The same 256 px WebP from the same file with sharp (Node, its own bundled libvips)."""
    node_dir = bench_dir / "sharp"
    node_dir.mkdir(exist_ok=True)
    try:
        subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--silent", "sharp"], cwd=node_dir,
                       check=True, timeout=600, capture_output=True)
        (node_dir / "thumb.js").write_text(SHARP_SCRIPT)
        done = subprocess.run(["node", "thumb.js", str(node_dir / "node_modules" / "sharp"), str(photo),
                               str(MEDIA_COPIES)], cwd=node_dir, check=True, timeout=300, capture_output=True)
    except (OSError, subprocess.SubprocessError) as exc:
        print(f"bench: sharp is not available ({exc}); no reference for thumbnails", file=sys.stderr)
        return None
    result: Result = json.loads(done.stdout)
    return result


def ffmpeg_poster_seconds(video: Path, at_s: float, out: Path) -> float:
    """The reference for a poster: ffmpeg's CLI seeking and scaling one frame to 256 px."""
    import imageio_ffmpeg

    started = time.perf_counter()
    subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-ss", f"{at_s:.3f}", "-i", str(video),
                    "-frames:v", "1", "-vf", "scale=256:-2", "-y", str(out)], check=True, timeout=120)
    return time.perf_counter() - started


def probe_seconds(video: Path, repeats: int = 5) -> float:
    """The probe itself (what a worker runs per file), best of `repeats`, in this process."""
    from mediad.media import probe

    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        media = probe(str(video), "video", 100_000_000)
        best = min(best, time.perf_counter() - started)
    if media["status"] != "ready" or abs(media["duration_s"] - 3600) > 1:
        raise RuntimeError(f"the 1-hour MP4 probed as {media}")
    return best


async def media_files(run: Run) -> dict[str, Path]:
    files = {"photo": run.bench_dir / "photo-24mp.jpg", "uhd": run.bench_dir / "uhd.mp4",
             "hour": run.bench_dir / "hour.mp4"}
    await asyncio.to_thread(make_photo, files["photo"])
    await asyncio.to_thread(make_video, files["uhd"], 3840, 2160, 25, 4.0, noisy=True)
    await asyncio.to_thread(make_video, files["hour"], 64, 64, 25, 3600.0, noisy=False)
    return files


async def section_media(run: Run) -> None:
    server, report = run.server, run.report
    files = await media_files(run)
    async with httpx.AsyncClient(base_url=server.base_url, timeout=TIMEOUT) as client:
        photos = [(await upload_file(client, server, files["photo"], f"p{i}.jpg"))["id"] for i in range(MEDIA_COPIES)]
        await cold_thumbnails(client, server, photos[:1], 128)  # a worker started, its libraries loaded
        posters = [(await upload_file(client, server, files["uhd"], f"v{i}.mp4"))["id"] for i in range(3)]
        hour = await upload_file(client, server, files["hour"], "hour.mp4")
        for file_id in [*photos, *posters, hour["id"]]:
            await wait_probed(client, server, file_id)  # probing done: the thumbnails have the workers
        photo_cold = await cold_thumbnails(client, server, photos)
        poster_cold = await cold_thumbnails(client, server, posters)
        range_file = await upload(server, client, "PUT", "/files?path=/bench/ranges.bin", run.buf, 64 * MiB)
        target = f"/files/{photos[0]}/thumbnail?size=256"
        cached = await asyncio.to_thread(repeated_gets, server, target, {"Accept": "image/webp"}, THUMBNAIL_GETS)
        ranges = await asyncio.to_thread(range_requests, server, f"/files/{range_file['id']}/content", 64 * MiB,
                                         run.buf)
        concurrent = await concurrent_thumbnails(client, server, photos[-1])
    sharp = await asyncio.to_thread(sharp_thumbnails, run.bench_dir, files["photo"])
    ffmpeg_s = await asyncio.to_thread(ffmpeg_poster_seconds, files["uhd"], 0.4, run.bench_dir / "poster.jpg")
    probe_s = await asyncio.to_thread(probe_seconds, files["hour"])
    report_media(report, photo_cold, poster_cold, cached, ranges, concurrent, sharp, ffmpeg_s, probe_s)


async def concurrent_thumbnails(client: httpx.AsyncClient, server: Server, file_id: str) -> Result:
    """16 cold thumbnails of one 24 MP JPEG at once (16 sizes), retrying 503s as clients do;
    the server's RSS growth (the worker processes apart) and /health meanwhile."""
    baseline = proc_status(server.pid)["VmRSS"]

    async def one(size: int) -> None:
        for _ in range(30):
            answer = await client.get(f"/files/{file_id}/thumbnail?size={size}",
                                      headers={**server.headers, "Accept": "image/webp"})
            if answer.status_code != 503:
                break
            await asyncio.sleep(float(answer.headers.get("retry-after", "1")))
        if answer.status_code != 200:
            raise RuntimeError(f"thumbnail {size} answered {answer.status_code}: {answer.text}")

    with RssSampler(server.pid, child_prefix="python") as rss:
        async with health_watched(server.base_url) as health:
            await asyncio.gather(*(one(300 + n) for n in range(16)))
    return {"seconds": health.finished - health.started, "growth_mib": (rss.peak_kib - baseline) / 1024,
            "worker_peak_mib": rss.child_peak_kib / 1024, **health.stats()}


def report_media(report: Report, photo_cold: list[float], poster_cold: list[float], cached: Result,
                 ranges: Result, concurrent: Result, sharp: Result | None, ffmpeg_s: float, probe_s: float) -> None:
    photo_ms, poster_ms = min(photo_cold) * 1000, min(poster_cold) * 1000
    report.note("24 MP JPEG → 256 px WebP, cold, over HTTP (best / median)",
                f"{photo_ms:.1f} / {statistics.median(photo_cold) * 1000:.1f} ms")
    report.note("4K H.264 → 256 px WebP poster, cold, over HTTP (best / median)",
                f"{poster_ms:.1f} / {statistics.median(poster_cold) * 1000:.1f} ms")
    report.figure("4K H.264 poster with ffmpeg's CLI (reference, JPEG)", ffmpeg_s * 1000, "ms", 1)
    report.figure(f"cached thumbnail, {RANGE_CLIENTS} connections", cached["per_s"], "req/s")
    report.figure(f"cached thumbnail p99 ({cached['errors']} errors)", cached["p99_ms"], "ms", 1)
    report.figure(f"{RANGE_SIZE // MiB} MiB range requests, same run", ranges["per_s"], "req/s")
    report.figure("16 concurrent cold thumbnails: wall time", concurrent["seconds"], "s", 2)
    report.figure("16 concurrent cold thumbnails: /health p99", concurrent["health_p99_ms"], "ms", 1)
    report.figure("16 concurrent cold thumbnails: a media worker's peak RSS", concurrent["worker_peak_mib"], "MiB", 1)
    report.figure("probe of a 1-hour MP4 (in a worker's code, best of 5)", probe_s * 1000, "ms", 1)
    if sharp is not None:
        sharp_ms = min(sharp["times_ms"])
        report.note("sharp: 24 MP JPEG → 256 px WebP, in process (best / median)",
                    f"{sharp_ms:.1f} / {statistics.median(sharp['times_ms']):.1f} ms")
        report.figure("sharp: peak RSS of its Node process", sharp["max_rss_kib"] / 1024, "MiB", 1)
        report.target("cold 256 px thumbnail of a 24 MP JPEG vs sharp", f"{photo_ms / sharp_ms:.2f}×", "≤ 1.5×",
                      photo_ms <= 1.5 * sharp_ms)
    report.target("cached thumbnails vs range requests", f"{cached['per_s'] / ranges['per_s']:.2f}×", "≥ 1×",
                  cached["per_s"] >= ranges["per_s"] and cached["errors"] == 0)
    report.target("server RSS growth, 16 concurrent thumbnails", f"{concurrent['growth_mib']:.2f} MiB", "< 64 MiB",
                  concurrent["growth_mib"] < 64)
    report.target("probe of a 1-hour MP4", f"{probe_s * 1000:.1f} ms", "< 50 ms", probe_s < 0.05)
# ---- the file tree (folders, prefixes, recursive deletion) ---------------------------------------

TREE_FILES, TREE_DELETE_FILES, TREE_REQUESTS = 100_000, 10_000, 300


async def _generate_files(run: Run, user_id: str, count: int) -> None:
    """`count` rows for one user, inserted by PostgreSQL itself: /d<0-99>/s<0-9>/f<i>.bin. They have
    no blob: marked evicted with a stored cloud copy, so neither replication nor cleanup touches
    them, and the listing reads only rows."""
    import asyncpg

    from mediad.embedded import database

    def url() -> str:  # the server's own database: the embedded one is joined, not started
        with database(run.database_url, run.bench_dir / "data") as found:
            return found

    conn = await asyncpg.connect(await asyncio.to_thread(url))
    try:
        await conn.execute(
            "INSERT INTO files (id, owner_id, name, extension, format, size, sha256, path, blob_id, node, "
            "cloud_state) SELECT gen_random_uuid(), $1, 'f' || i || '.bin', 'bin', 'application/octet-stream', "
            "(i * 7919) % 1000000, repeat('0', 64), '/d' || (i % 100) || '/s' || (i / 100 % 10) || '/f' || i "
            "|| '.bin', gen_random_uuid(), NULL, 'stored' FROM generate_series(1, $2) AS i", user_id, count)
        await conn.execute("VACUUM ANALYZE files")  # as autovacuum would soon after such a load
    finally:
        await conn.close()


async def _latencies(client: httpx.AsyncClient, url: str, params: dict[str, str], headers: dict[str, str],
                     count: int) -> Result:
    seconds = []
    for _ in range(count):
        started = time.perf_counter()
        answer = await client.get(url, params=params, headers=headers)
        seconds.append(time.perf_counter() - started)
        if answer.status_code != 200:
            raise RuntimeError(f"GET {url} {params} answered {answer.status_code}: {answer.text[:300]}")
    return {"p50_ms": percentile(seconds, 50) * 1000, "p99_ms": percentile(seconds, 99) * 1000,
            "body": answer.json()}


async def _tiny_uploads(client: httpx.AsyncClient, headers: dict[str, str], prefix: str, count: int) -> float:
    gate = asyncio.Semaphore(16)

    async def put(i: int) -> None:
        async with gate:
            answer = await client.put("/files", params={"path": f"{prefix}{i % 10}/{i}.bin"}, headers=headers,
                                      content=b"%d" % i)
            if answer.status_code != 201:
                raise RuntimeError(f"upload answered {answer.status_code}: {answer.text[:300]}")

    started = time.perf_counter()
    await asyncio.gather(*(put(i) for i in range(count)))
    return time.perf_counter() - started


async def _replication_drained(client: httpx.AsyncClient, limit_s: float = 900.0) -> float:
    """Seconds until no file waits for its cloud copy (mediad_cloud_queue_depth in /metrics)."""
    started = time.perf_counter()
    while time.perf_counter() - started < limit_s:
        metrics = (await client.get("/metrics")).text
        depth = next((line.split()[-1] for line in metrics.splitlines()
                      if line.startswith("mediad_cloud_queue_depth ")), None)
        if depth is not None and float(depth) == 0:
            return time.perf_counter() - started
        await asyncio.sleep(0.5)
    raise RuntimeError(f"replication did not drain within {limit_s:.0f} s")


async def section_tree(run: Run) -> None:
    report = run.report
    async with httpx.AsyncClient(base_url=run.server.base_url, timeout=TIMEOUT) as client:
        created = (await client.post("/users", json={"name": f"bench-tree-{secrets.token_hex(4)}"})).json()
        headers = {"Authorization": f"Bearer {created['token']}"}
        await _generate_files(run, created["id"], TREE_FILES)
        cases = {
            f"GET /folders?path=/ (100 folders over {TREE_FILES:,} files)": ("/folders", {"path": "/"}),
            "GET /folders?path=/d7/ (10 folders)": ("/folders", {"path": "/d7/"}),
            "GET /folders?path=/d7/s3/ (100 files)": ("/folders", {"path": "/d7/s3/"}),
            "GET /files?prefix=/d7/s3/ (100 files)": ("/files", {"prefix": "/d7/s3/"}),
            "GET /files?prefix=/d7/ (first 100 of 1,000)": ("/files", {"prefix": "/d7/"}),
        }
        worst = {"/folders": 0.0, "/files": 0.0}
        for label, (url, params) in cases.items():
            measured = await _latencies(client, url, params, headers, TREE_REQUESTS)
            report.note(label, f"p50 {measured['p50_ms']:.1f} ms, p99 {measured['p99_ms']:.1f} ms")
            worst[url] = max(worst[url], measured["p99_ms"])
        root = (await client.get("/folders", params={"path": "/"}, headers=headers)).json()
        if sum(folder["files"] for folder in root["folders"]) != TREE_FILES:
            raise RuntimeError("the root listing does not count every file")
        upload_s = await _tiny_uploads(client, headers, "/bulk/", TREE_DELETE_FILES)
        report.figure(f"{TREE_DELETE_FILES:,} tiny uploads, 16 at a time", TREE_DELETE_FILES / upload_s, "files/s")
        # The deletion is timed on its own, not racing the pushes of the files it deletes.
        report.figure("their replication drained after", await _replication_drained(client), "s", 1)
        started = time.perf_counter()
        answer = await client.delete("/folders", params={"path": "/bulk/", "recursive": "true"}, headers=headers)
        delete_s = time.perf_counter() - started
        if answer.status_code != 200 or answer.json() != {"deleted": TREE_DELETE_FILES}:
            raise RuntimeError(f"recursive delete answered {answer.status_code}: {answer.text[:300]}")
        started = time.perf_counter()
        await client.delete("/folders", params={"path": "/", "recursive": "true"}, headers=headers)
        report.figure(f"recursive delete of the {TREE_FILES:,} generated rows (no blobs on disk)",
                      time.perf_counter() - started, "s", 2)
    report.target("folder listing p99 (worst of the three)", f"{worst['/folders']:.1f} ms", "< 50 ms",
                  worst["/folders"] < 50)
    report.target("prefix listing p99 (worst of the two)", f"{worst['/files']:.1f} ms", "< 50 ms",
                  worst["/files"] < 50)
    report.target(f"recursive delete of {TREE_DELETE_FILES:,} files", f"{delete_s:.2f} s", "< 10 s", delete_s < 10)


# ---- behind nginx -------------------------------------------------------------------------------
# mediad deciding and nginx sending (MEDIAD_ACCEL_REDIRECT, ops/nginx.conf as shipped) against the
# same nginx sending the same file directly, in the same run.

@contextlib.contextmanager
def nginx_in_front(bench_dir: Path, upstream: Server, direct_file: Path) -> Iterator[Server]:
    """nginx configured by ops/nginx.conf in front of `upstream`, plus a location serving
    `direct_file` at /direct with no auth (the reference)."""
    extra = f"        location = /direct {{ alias {direct_file}; default_type application/octet-stream; }}\n"
    files = bench_dir / "data" / "files"
    with nginx_front(upstream.port, files, bench_dir / "nginx-front", extra=extra) as (url, proc):
        yield Server(url, proc.pid, upstream.headers)


async def section_nginx(run: Run) -> None:
    """Full downloads and 64 KiB ranges through nginx with X-Accel-Redirect, next to nginx serving
    the same file itself. Skipped (with a note) when nginx is not installed."""
    if not os.access(NGINX, os.X_OK):
        run.report.note("behind nginx", "nginx is not installed (apt-get install nginx-light): skipped")
        return
    payload = await asyncio.to_thread(payload_file, run)
    want = await asyncio.to_thread(expected_sha256, run.buf, run.size)
    async with httpx.AsyncClient(base_url=run.server.base_url, timeout=TIMEOUT) as client:
        stored = await upload(run.server, client, "PUT", "/files?path=/bench/nginx.bin", run.buf, run.size)
    target = f"/files/{stored['id']}/content"
    accel = {"MEDIAD_ACCEL_REDIRECT": "/_mediad/"}
    with run.start_server("uvicorn", env_overrides=accel) as mediad, \
            nginx_in_front(run.bench_dir, mediad, payload) as front:
        direct = Server(front.base_url, front.pid)
        offload_full = await asyncio.to_thread(full_downloads, front, target, run.size, want)
        direct_full = await asyncio.to_thread(full_downloads, direct, "/direct", run.size, want)

        def others() -> list[int]:  # mediad decides each request: its CPU counts too
            return [mediad.pid, *descendants(mediad.pid), *postgres_pids(run)]

        offload_ranges = await asyncio.to_thread(range_cost, front, target, others, run.size)
        direct_ranges = await asyncio.to_thread(range_cost, direct, "/direct", list, run.size)
    report_nginx(run.report, size_label(run.size), offload_full, direct_full, offload_ranges, direct_ranges)


def report_nginx(report: Report, gib: str, offload_full: Result, direct_full: Result, offload_ranges: Result,
                 direct_ranges: Result) -> None:
    for label, full, ranges in (
            ("nginx direct (sendfile, no auth)", direct_full, direct_ranges),
            ("mediad behind nginx (X-Accel-Redirect, authenticated)", offload_full, offload_ranges)):
        report.figure(f"{label}: {gib} download", full["mib_s"], "MiB/s")
        report.note(f"{label}: {SMALL_RANGE // 1024} KiB ranges",
                    f"{ranges['per_s']:,.0f} req/s; CPU per request {ranges['total_us']:,.0f} µs")
    full_ratio = offload_full["mib_s"] / direct_full["mib_s"]
    range_ratio = offload_ranges["per_s"] / direct_ranges["per_s"]
    report.target(f"{gib} download behind nginx ≥ 90% of nginx direct", f"{100 * full_ratio:.0f}%", "≥ 90%",
                  full_ratio >= 0.9)
    report.target(f"{SMALL_RANGE // 1024} KiB range req/s behind nginx ≥ 25% of nginx direct",
                  f"{100 * range_ratio:.0f}%", "≥ 25%", range_ratio >= 0.25)


SECTIONS: dict[str, Callable[[Run], Awaitable[None]]] = {
    "uploads": section_uploads,
    "downloads": section_downloads,
    "ranges": section_ranges,
    "cloud": section_cloud,
    "audio": section_audio,
    "tus": section_tus,
    "webhooks": section_webhooks,
    "workers": section_workers,
    "media": section_media,
    "tree": section_tree,
    "nginx": section_nginx,
}


async def run_sections(names: Iterable[str], run: Run) -> None:
    for name in names:
        print(f"bench: {name} …", file=sys.stderr)
        await SECTIONS[name](run)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", action="append", choices=list(SECTIONS),
                        help="run only this section (repeatable); references always run")
    parser.add_argument("--size-mib", type=int, default=1024, help="size of the big transfers")
    parser.add_argument("--out", type=Path, help="also write the Markdown table to this file")
    parser.add_argument("--database-url", default=os.environ.get("MEDIAD_BENCH_DATABASE_URL"),
                        help="PostgreSQL for mediad (default: $MEDIAD_BENCH_DATABASE_URL, else "
                             "mediad's embedded one)")
    parser.add_argument("--env", action="append", default=[], metavar="MEDIAD_X=VALUE",
                        help="extra setting for mediad, e.g. MEDIAD_FSYNC=false (repeatable)")
    parser.add_argument("--keep", action="store_true", help="keep the bench dir (logs) afterwards")
    parser.add_argument("--ceiling-server", type=int, metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument("--sendfile-server", nargs=2, metavar=("PORT", "PATH"), help=argparse.SUPPRESS)
    parser.add_argument("--fileresponse-server", nargs=3, metavar=("PORT", "PATH", "SERVER"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    header = run_header(sys.argv[1:] if argv is None else argv, args.database_url)
    if args.ceiling_server:
        serve_ceiling(args.ceiling_server)
        return 0
    if args.sendfile_server:
        serve_sendfile(int(args.sendfile_server[0]), Path(args.sendfile_server[1]))
        return 0
    if args.fileresponse_server:
        port, path, server = args.fileresponse_server
        serve_fileresponse(int(port), Path(path), server)
        return 0

    # SIGTERM unwinds like Ctrl-C, so the servers are stopped and the bench dir removed either way.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    size = args.size_mib * MiB
    if size < RANGE_SIZE:
        parser.error(f"--size-mib must be at least {RANGE_SIZE // MiB}")
    buf = os.urandom(MiB)
    report = Report()
    bench_dir = REPO / "var" / f"bench-{secrets.token_hex(4)}"
    bench_dir.mkdir(parents=True)
    failed = True
    try:
        print("bench: references …", file=sys.stderr)
        refs = references(bench_dir, buf, size, report)
        extra_env = dict(item.split("=", 1) for item in args.env)
        with contextlib.ExitStack() as stack:
            cloud = stack.enter_context(mock_cloud(bench_dir))
            launch = functools.partial(mediad_server, bench_dir, args.database_url, extra_env, cloud)
            server = stack.enter_context(launch())
            run = Run(server, refs, buf, size, report, bench_dir, cloud,
                      lambda kind, **options: launch(kind, shared_with=server, **options), args.database_url)
            run_async(run_sections(args.only or list(SECTIONS), run))
        report.figure("load average at the end", os.getloadavg()[0], "", 2)
        failed = False
    finally:
        if failed:
            for log in sorted(bench_dir.glob("mediad*.log")):
                print(f"bench: last lines of {log.name}:", *log.read_text().splitlines()[-40:],
                      sep="\n", file=sys.stderr)
        if not args.keep:
            shutil.rmtree(bench_dir, ignore_errors=True)
            with contextlib.suppress(OSError):
                bench_dir.parent.rmdir()  # var/ too, if this run created it and nothing else uses it
    table = header + report.markdown()
    print(table)
    if args.out:
        args.out.write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())

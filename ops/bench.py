"""Benchmark mediad against this machine's own ceilings and print the figures as Markdown.

    python ops/bench.py [--only uploads|downloads|cloud|audio] [--size-mib 1024] [--out FILE]
                        [--database-url URL] [--env MEDIAD_X=VALUE] [--keep]

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
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

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


def run_async(coro: Coroutine[Any, Any, Any]) -> Any:
    """Run the client on uvloop when it is there (uvicorn[standard] brings it): measured here, the
    stock asyncio loop alone lowers the ceiling by ~25%, which would hide the server's own cost."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


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

        Granian("bench:fileresponse_app", factory=True, interface=Interfaces.ASGI, port=port,
                workers=1, log_enabled=False, working_dir=Path(__file__).resolve().parent).serve()
        return
    import uvicorn

    config = uvicorn.Config(fileresponse_app(), host="127.0.0.1", port=port, log_config=None,
                            server_header=False)
    uvicorn.Server(config).run()


# ---- processes ----------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def running(cmd: list[str], env: dict[str, str], ready_url: str, log_path: Path,
            cwd: Path) -> Iterator[subprocess.Popen[bytes]]:
    """Run `cmd` until the block ends: wait for `ready_url` to answer 200, then SIGTERM it (and
    SIGKILL after a grace period) however the block exits."""
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{cmd[0]} exited with {proc.returncode} before it was ready")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(ready_url, timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{ready_url} did not answer 200 within 120 s")
            time.sleep(0.1)
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=45)
            except subprocess.TimeoutExpired:
                print(f"bench: {cmd[0]} ignored SIGTERM for 45 s, killing it", file=sys.stderr)
                proc.kill()
                proc.wait()


@contextlib.contextmanager
def bench_helper(bench_dir: Path, mode: str, *args: str) -> Iterator[Server]:
    """This script in one of its reference-server modes (`--sendfile-server PORT PATH`, ...)."""
    port = free_port()
    cmd = [sys.executable, str(Path(__file__).resolve()), mode, str(port), *args]
    url = f"http://127.0.0.1:{port}"
    log = bench_dir / f"{mode.strip('-')}.log"
    with running(cmd, dict(os.environ), url + "/health", log, bench_dir) as proc:
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
                  shared_with: Server | None = None) -> Iterator[Server]:
    """`mediad serve --server <kind>` on the bench's data dir. With `shared_with`, a second process
    on the same data dir and database (so the same node id, files and user) that leaves the
    embedded PostgreSQL, if any, to the first one."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEDIAD_")}
    env.update(MEDIAD_DATA_DIR=str(bench_dir / "data"), MEDIAD_PORT=str(port),
               MEDIAD_HOST="127.0.0.1", MEDIAD_MAX_UPLOAD_BYTES="20GiB",
               MEDIAD_CLOUD_URL=cloud.url, MEDIAD_CLOUD_TOKEN=cloud.token)
    if database_url:
        env["MEDIAD_DATABASE_URL"] = database_url
    env.update(extra_env)
    mediad = str(Path(sys.executable).parent / "mediad")
    base_url = f"http://127.0.0.1:{port}"
    log = bench_dir / ("mediad.log" if shared_with is None else f"mediad-{kind}.log")
    try:
        with running([mediad, "serve", "--server", kind], env, base_url + "/health", log,
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


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS/VmHWM of one process in KiB (the uvicorn process only, not PostgreSQL's)."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0])
    return values


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def descendants(pid: int) -> list[int]:
    """Live child processes of `pid`, recursively (Granian's worker, ffmpeg)."""
    found: list[int] = []
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError):
                for child in (task / "children").read_text().split():
                    found += [int(child), *descendants(int(child))]
    return found


def tree_cpu_seconds(pid: int) -> float:
    """CPU of a process and its live descendants: Granian serves from a worker process."""
    total = 0.0
    for one in (pid, *descendants(pid)):
        with contextlib.suppress(OSError):
            total += cpu_seconds(one)
    return total


class RssSampler:
    """Samples a process's RSS every `interval` seconds in a thread while the block runs; with
    `child_prefix`, also the peak RSS and the CPU of its descendants of that name (ffmpeg)."""

    def __init__(self, pid: int, interval: float = 0.02, child_prefix: str | None = None) -> None:
        self.pid, self.interval, self.child_prefix = pid, interval, child_prefix
        self.peak_kib = self.hwm_kib = self.child_peak_kib = 0
        self.child_cpu: dict[int, float] = {}  # pid → CPU seconds when last seen alive
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while True:
            status = proc_status(self.pid)
            self.peak_kib = max(self.peak_kib, status["VmRSS"])
            self.hwm_kib = status["VmHWM"]
            if self.child_prefix:
                self._sample_children(self.child_prefix)
            if self._stop.wait(self.interval):
                return

    def _sample_children(self, prefix: str) -> None:
        for child in descendants(self.pid):
            with contextlib.suppress(OSError, KeyError):  # it exited between listing and reading
                if Path(f"/proc/{child}/comm").read_text().startswith(prefix):
                    self.child_peak_kib = max(self.child_peak_kib, proc_status(child)["VmHWM"])
                    self.child_cpu[child] = cpu_seconds(child)


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
    cpu_before = cpu_seconds(server.pid)
    with RssSampler(server.pid) as rss:
        sent = await send_body(client, method, url, buf, size, multipart=multipart,
                               headers=server.headers)
    cpu = cpu_seconds(server.pid) - cpu_before
    if sent["status"] not in (200, 201) or sent["json"].get("sha256") != want:
        raise RuntimeError(f"{method} {url} answered {sent['status']}: {sent['json']}")
    replicated = await wait_replicated(client, sent["json"]["id"], server.headers)
    await asyncio.sleep(0.3)  # let the server settle before the "after" reading
    return {"id": sent["json"]["id"], "mib_s": sent["mib_s"], "seconds": sent["seconds"],
            "replicated_s": replicated, "peak_rss_mib": rss.peak_kib / 1024,
            "hwm_mib": rss.hwm_kib / 1024, "rss_after_mib": proc_status(server.pid)["VmRSS"] / 1024,
            "server_cpu_pct": 100 * cpu / sent["seconds"], "client_cpu_pct": sent["client_cpu_pct"]}


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


def percentile(values: list[float], pct: float) -> float:
    ranked = sorted(values)
    return ranked[min(len(ranked) - 1, max(0, round(pct / 100 * len(ranked)) - 1))]


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
        with RssSampler(server.pid) as rss:
            async with health_watched(server.base_url) as health:
                await asyncio.gather(*(one(client, i) for i in range(count)))
    stats = health.stats()
    errors += stats.pop("health_errors")
    seconds = health.finished - health.started
    for line in errors[:5]:
        print(f"bench: {line}", file=sys.stderr)
    return {"seconds": seconds, "mib_s": count * size / MiB / seconds, "errors": len(errors),
            **stats, "peak_rss_mib": rss.peak_kib / 1024}


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
    # Another `mediad serve --server <kind>` on the same data dir, database and user.
    start_server: Callable[[str], contextlib.AbstractContextManager[Server]]
    database_url: str | None = None  # --database-url; None: the server's embedded PostgreSQL


def references(bench_dir: Path, buf: bytes, size: int, report: Report) -> Result:
    load = os.getloadavg()[0]  # other work on the machine skews every figure: say how much
    refs = {**sha256_rate(buf, size), **disk_rates(bench_dir, buf, size)}
    port = free_port()
    cmd = [sys.executable, str(Path(__file__).resolve()), "--ceiling-server", str(port)]
    url = f"http://127.0.0.1:{port}"
    with running(cmd, dict(os.environ), url, bench_dir / "ceiling.log", bench_dir):
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
    idle = proc_status(server.pid)["VmRSS"] / 1024
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
    report.figure("server VmHWM (lifetime peak RSS)", raw["hwm_mib"], "MiB", 1)
    crowd_label = f"{CROWD} × {CROWD_SIZE // MiB} MiB concurrent uploads"
    report.figure(f"{crowd_label}: total", crowd["seconds"], "s", 2)
    report.figure(f"{crowd_label}: throughput", crowd["mib_s"], "MiB/s")
    report.note(f"{crowd_label}: errors", str(crowd["errors"]))
    report.figure(f"{crowd_label}: peak server RSS", crowd["peak_rss_mib"], "MiB", 1)
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
    cpu_before, cloud_cpu_before = cpu_seconds(server.pid), cpu_seconds(run.cloud.pid)
    with RssSampler(server.pid) as rss:
        seconds = await wait_replicated(client, sent["json"]["id"], server.headers, poll_s=0.02)
    if seconds is None:
        raise RuntimeError("the big file was not stored in the cloud within 300 s")
    return {"seconds": seconds, "mib_s": size / MiB / seconds, "rss_before_mib": before / 1024,
            "rss_at_201_mib": at_201 / 1024, "peak_rss_mib": rss.peak_kib / 1024,
            "server_cpu_pct": 100 * (cpu_seconds(server.pid) - cpu_before) / seconds,
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
    return (f"mediad benchmark, {when}: `python ops/bench.py {' '.join(argv)}`, commit "
            f"{git('rev-parse', '--short', 'HEAD') or '?'}{dirty}, database {database}, "
            f"{os.cpu_count()} CPUs.\n\n")



# ---- resumable uploads (tus) --------------------------------------------------------------------

TUS_CHUNK = 16 * MiB


async def tus_upload(server: Server, client: httpx.AsyncClient, buf: bytes, size: int) -> Result:
    """`size` bytes through /uploads in TUS_CHUNK PATCHes, each streamed in 1 MiB pieces."""
    want = await asyncio.to_thread(expected_sha256, buf, size)
    metadata = "filename " + base64.b64encode(b"tus.bin").decode()
    tus = {**server.headers, "Tus-Resumable": "1.0.0"}
    started = time.perf_counter()
    cpu_before = cpu_seconds(server.pid)
    with RssSampler(server.pid) as rss:
        created = await client.post("/uploads", headers={**tus, "Upload-Length": str(size),
                                                         "Upload-Metadata": metadata})
        location, offset, file_id = created.headers["location"], 0, None
        while offset < size:
            length = min(TUS_CHUNK, size - offset)
            answer = await client.patch(location, content=_buffer_chunks(buf, length), headers={
                **tus, "Upload-Offset": str(offset), "Content-Type": "application/offset+octet-stream",
                "Content-Length": str(length)})
            if answer.status_code != 204:
                raise RuntimeError(f"PATCH at {offset} answered {answer.status_code}: {answer.text}")
            offset = int(answer.headers["upload-offset"])
            file_id = answer.headers.get("mediad-file-id", file_id)
    seconds = time.perf_counter() - started
    cpu = cpu_seconds(server.pid) - cpu_before
    stored = (await client.get(f"/files/{file_id}", headers=server.headers)).json()
    if stored.get("sha256") != want:
        raise RuntimeError(f"tus upload stored sha256 {stored.get('sha256')}, expected {want}")
    await wait_replicated(client, str(file_id), server.headers)
    return {"mib_s": size / MiB / seconds, "seconds": seconds, "peak_rss_mib": rss.peak_kib / 1024,
            "server_cpu_pct": 100 * cpu / seconds}


async def section_tus(run: Run) -> None:
    server, buf, size, report = run.server, run.buf, run.size, run.report
    gib = size_label(size)
    async with httpx.AsyncClient(base_url=server.base_url, timeout=TIMEOUT) as client:
        plain = await upload(server, client, "PUT", "/files?path=/bench/plain-for-tus.bin", buf, size)
        resumable = await tus_upload(server, client, buf, size)
    report.figure(f"{gib} plain PUT (same run, for tus)", plain["mib_s"], "MiB/s")
    report.figure(f"{gib} tus upload in {TUS_CHUNK // MiB} MiB PATCHes", resumable["mib_s"], "MiB/s")
    report.note(f"{gib} tus upload: server CPU", f"{resumable['server_cpu_pct']:.0f}% of one core")
    report.figure(f"{gib} tus upload: peak server RSS", resumable["peak_rss_mib"], "MiB", 1)
    ratio = resumable["mib_s"] / plain["mib_s"]
    report.target(f"{gib} tus upload ≥ 80% of a plain PUT", f"{100 * ratio:.0f}%", "≥ 80%", ratio >= 0.8)
    report.target("peak server RSS during the tus upload", f"{resumable['peak_rss_mib']:.1f} MiB", "< 100 MiB",
                  resumable["peak_rss_mib"] < 100)


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


SECTIONS: dict[str, Callable[[Run], Awaitable[None]]] = {
    "uploads": section_uploads,
    "downloads": section_downloads,
    "cloud": section_cloud,
    "audio": section_audio,
    "tus": section_tus,
    "tree": section_tree,
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
                      lambda kind: launch(kind, shared_with=server), args.database_url)
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

"""Benchmark mediad against this machine's own ceilings and print the figures as Markdown.

    python ops/bench.py [--only uploads] [--size-mib 1024] [--out FILE] [--database-url URL]

Every target is relative to references measured in the same run (sha256, disk write with and
without fsync, and a bare uvicorn app draining the body), so figures from different machines
compare. mediad runs as a real `mediad serve` subprocess on a fresh data dir under the repo's
own filesystem (`var/bench-*`, removed afterwards). A script that prints figures, not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import multiprocessing
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

MiB = 1 << 20
GiB = 1 << 30
REPO = Path(__file__).resolve().parent.parent
BOUNDARY = "mediad-bench-0123456789abcdef"
CROWD, CROWD_SIZE = 32, 8 * MiB  # the concurrent uploads
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


@dataclass
class Server:
    base_url: str
    pid: int  # `mediad serve` is the uvicorn process; PostgreSQL and the mock cloud are others
    headers: dict[str, str] = field(default_factory=dict)  # the bench user's bearer token


@contextlib.contextmanager
def mediad_server(bench_dir: Path, database_url: str | None,
                  extra_env: dict[str, str] | None = None) -> Iterator[Server]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEDIAD_")}
    env.update(MEDIAD_DATA_DIR=str(bench_dir / "data"), MEDIAD_PORT=str(port),
               MEDIAD_HOST="127.0.0.1", MEDIAD_MAX_UPLOAD_BYTES="20GiB")
    if database_url:
        env["MEDIAD_DATABASE_URL"] = database_url
    env.update(extra_env or {})
    mediad = str(Path(sys.executable).parent / "mediad")
    base_url = f"http://127.0.0.1:{port}"
    try:
        with running([mediad, "serve"], env, base_url + "/health", bench_dir / "mediad.log",
                     bench_dir) as proc:
            answer = httpx.post(base_url + "/users", json={"name": f"bench-{secrets.token_hex(4)}"})
            answer.raise_for_status()
            yield Server(base_url, proc.pid, {"Authorization": f"Bearer {answer.json()['token']}"})
    finally:
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


class RssSampler:
    """Samples a process's RSS every `interval` seconds in a thread while the block runs."""

    def __init__(self, pid: int, interval: float = 0.02) -> None:
        self.pid, self.interval = pid, interval
        self.peak_kib = self.hwm_kib = 0
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
            if self._stop.wait(self.interval):
                return


# ---- the client ---------------------------------------------------------------------------------

def expected_sha256(buf: bytes, size: int) -> str:
    hasher = hashlib.sha256()
    for _ in range(size // len(buf)):
        hasher.update(buf)
    hasher.update(buf[: size % len(buf)])
    return hasher.hexdigest()


async def _chunks(buf: bytes, size: int, prefix: bytes, suffix: bytes,
                  started: list[float]) -> AsyncIterator[bytes]:
    """`prefix`, then `size` bytes as 1 MiB chunks of one reused buffer, then `suffix`."""
    started.append(time.perf_counter())
    if prefix:
        yield prefix
    for _ in range(size // len(buf)):
        yield buf
    if size % len(buf):
        yield buf[: size % len(buf)]
    if suffix:
        yield suffix


async def send_body(client: httpx.AsyncClient, method: str, url: str, buf: bytes, size: int, *,
                    multipart: bool = False, headers: dict[str, str] | None = None) -> Result:
    """Stream `size` bytes (raw, or as the `file` part of a multipart envelope written here);
    MiB/s from the first byte sent to the response received."""
    prefix = suffix = b""
    headers = {**(headers or {}), "Content-Type": "application/octet-stream"}
    if multipart:
        prefix = (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; "
                  f"filename=\"bench.bin\"\r\nContent-Type: application/octet-stream\r\n\r\n").encode()
        suffix = f"\r\n--{BOUNDARY}--\r\n".encode()
        headers["Content-Type"] = f"multipart/form-data; boundary={BOUNDARY}"
    headers["Content-Length"] = str(len(prefix) + size + len(suffix))
    started: list[float] = []
    cpu_before = time.process_time()
    response = await client.request(method, url, content=_chunks(buf, size, prefix, suffix, started),
                                     headers=headers)
    elapsed = time.perf_counter() - started[0]
    client_cpu = time.process_time() - cpu_before
    try:
        answer = response.json()
    except ValueError:
        answer = {}
    return {"status": response.status_code, "json": answer, "seconds": elapsed,
            "mib_s": size / MiB / elapsed, "client_cpu_pct": 100 * client_cpu / elapsed}


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
    return {"mib_s": sent["mib_s"], "seconds": sent["seconds"], "replicated_s": replicated,
            "peak_rss_mib": rss.peak_kib / 1024,
            "hwm_mib": rss.hwm_kib / 1024, "rss_after_mib": proc_status(server.pid)["VmRSS"] / 1024,
            "server_cpu_pct": 100 * cpu / sent["seconds"], "client_cpu_pct": sent["client_cpu_pct"]}


async def wait_replicated(client: httpx.AsyncClient, file_id: str, headers: dict[str, str],
                          limit_s: float = 300.0) -> float | None:
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
        await asyncio.sleep(0.05)
    return None


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


async def concurrent_uploads(server: Server, buf: bytes, count: int, size: int) -> Result:
    want = expected_sha256(buf, size)
    errors: list[str] = []
    spawn = multiprocessing.get_context("spawn")
    stop = spawn.Event()
    results, sender = spawn.Pipe(duplex=False)
    poller = spawn.Process(target=_poll_health, args=(server.base_url, stop, sender), daemon=True)
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
        poller.start()
        if not await asyncio.to_thread(results.poll, 30):
            raise RuntimeError("the /health poller did not start")
        results.recv()  # "ready": its first answer came back
        try:
            with RssSampler(server.pid) as rss:
                started = time.monotonic()
                await asyncio.gather(*(one(client, i) for i in range(count)))
                finished = time.monotonic()
        finally:
            stop.set()
            samples = results.recv() if await asyncio.to_thread(results.poll, 30) else []
            poller.join(5)
    during = [(seconds, status) for at, seconds, status in samples if started <= at <= finished]
    errors += [f"/health answered {status or 'nothing'}" for _, status in during if status != 200]
    latencies = [seconds for seconds, _ in during] or [float("nan")]
    seconds = finished - started
    for line in errors[:5]:
        print(f"bench: {line}", file=sys.stderr)
    return {"seconds": seconds, "mib_s": count * size / MiB / seconds, "errors": len(errors),
            "health_p50_ms": percentile(latencies, 50) * 1000,
            "health_p99_ms": percentile(latencies, 99) * 1000,
            "health_max_ms": max(latencies) * 1000, "health_samples": len(latencies),
            "peak_rss_mib": rss.peak_kib / 1024}


# ---- the report ---------------------------------------------------------------------------------

@dataclass
class Report:
    figures: list[tuple[str, str]] = field(default_factory=list)
    targets: list[tuple[str, str, str, bool]] = field(default_factory=list)

    def figure(self, name: str, value: float, unit: str, digits: int = 0) -> None:
        self.figures.append((name, f"{value:,.{digits}f} {unit}"))

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


async def section_uploads(run: Run) -> None:
    server, refs, buf, size, report = run.server, run.refs, run.buf, run.size, run.report
    gib = f"{size / GiB:g} GiB" if size >= GiB else f"{size / MiB:g} MiB"
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
    report.figure(f"GET /health during them: p50 ({crowd['health_samples']} samples)",
                  crowd["health_p50_ms"], "ms", 1)
    report.figure("GET /health during them: p99", crowd["health_p99_ms"], "ms", 1)
    report.figure("GET /health during them: max", crowd["health_max_ms"], "ms", 1)

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


# Later sections (downloads, ranges, cloud, audio) register here with the same signature.
SECTIONS: dict[str, Callable[[Run], Awaitable[None]]] = {
    "uploads": section_uploads,
}


async def run_sections(names: list[str], run: Run) -> None:
    for name in names:
        print(f"bench: {name} …", file=sys.stderr)
        await SECTIONS[name](run)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", action="append", choices=sorted(SECTIONS),
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
    args = parser.parse_args(argv)
    if args.ceiling_server:
        serve_ceiling(args.ceiling_server)
        return 0

    # SIGTERM unwinds like Ctrl-C, so the server is stopped and the bench dir removed either way.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    size = args.size_mib * MiB
    buf = os.urandom(MiB)
    report = Report()
    bench_dir = REPO / "var" / f"bench-{secrets.token_hex(4)}"
    bench_dir.mkdir(parents=True)
    failed = True
    try:
        print("bench: references …", file=sys.stderr)
        refs = references(bench_dir, buf, size, report)
        extra_env = dict(item.split("=", 1) for item in args.env)
        with mediad_server(bench_dir, args.database_url, extra_env) as server:
            run_async(run_sections(args.only or list(SECTIONS), Run(server, refs, buf, size, report)))
        failed = False
    finally:
        if failed and (log := bench_dir / "mediad.log").exists():
            print("bench: last lines of mediad's log:", *log.read_text().splitlines()[-40:],
                  sep="\n", file=sys.stderr)
        if not args.keep:
            shutil.rmtree(bench_dir, ignore_errors=True)
            with contextlib.suppress(OSError):
                bench_dir.parent.rmdir()  # var/ too, if this run created it and nothing else uses it
    table = report.markdown()
    print(table)
    if args.out:
        args.out.write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())

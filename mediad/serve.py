"""`mediad serve`: one service on one port, answered by one process or by N workers.

The process started as `mediad serve` owns what there is one of: the bundled mock cloud, the
schema migration, the start-up recovery of the data dir, the metrics directory; it starts or joins
the embedded PostgreSQL, which the last mediad process using it stops. With `--workers N` (N > 1)
it then binds the port and supervises N worker processes that share the listening socket
(uvicorn's supervisor, or Granian's own); a worker that dies is replaced. SIGTERM or SIGINT stops
the workers gracefully, then what the supervisor owns, and `mediad serve` exits 0; during start-up
it stops what has been started and exits 0 too.

Workers skip the recovery because the supervisor holds the data dir's serve lock for as long as it
runs (`Storage.join`): to each worker's lifespan it is a live peer, whose work in flight is never
swept away. Background work runs in every worker and stays exactly once through the database:
replication by row leases, cleanup passes by an flock and an advisory lock, tus expiry inside a
cleanup pass, last-access times flushed by the worker that saw them.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
from uvicorn.supervisors import Multiprocess

from .config import Settings
from .embedded import database

log = logging.getLogger("mediad")

_WORKER_HEALTHCHECK_S = 30
# prometheus-client's switch into multiprocess mode (mediad/metrics.py reads it too).
MULTIPROC_DIR = "PROMETHEUS_MULTIPROC_DIR"


def serve(settings: Settings, server: str) -> int:
    """Run the service until SIGTERM/SIGINT; → the exit status."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _stop)
    _cap_malloc_arenas()
    with contextlib.ExitStack() as stack:
        url = stack.enter_context(database(settings.database_url, settings.data_dir))
        if not settings.cloud_url and not settings.s3_bucket:
            cloud_url, token = stack.enter_context(mock_cloud_process(settings.data_dir / "cloud"))
            settings = replace(settings, cloud_url=cloud_url, cloud_token=token)
            log.info("cloud: the bundled mock cloud at %s (data in %s)", cloud_url, settings.data_dir / "cloud")
        log.info("database: %s", "embedded PostgreSQL" if not settings.database_url else _redact(url))
        _migrate_in_child(url)
        log.info("data dir: %s", settings.data_dir.resolve())
        if settings.workers > 1:
            stack.enter_context(_metrics_dir())
            stack.enter_context(_recovered(settings, url))
        if _stop_asked:
            return 0
        log.info("listening on http://%s:%d (%s, %d worker%s)", settings.host, settings.port, server,
                 settings.workers, "s" if settings.workers > 1 else "")
        if server == "granian":
            _run_granian(settings, url)
            return 0
        return 0 if _run_uvicorn(settings, url) else 1
    return 0


# ---- the supervisor's own resources ---------------------------------------------------------------

_stop_asked = False  # a SIGTERM/SIGINT came during start-up (see _stop)


def _stop(signum: int, frame: object) -> None:
    """SIGTERM/SIGINT before the server installs its own handlers (while PostgreSQL starts, the
    migration and the recovery run): unwind, so that what has been started is stopped, and exit 0
    as a stop asked for while serving does; docker stop and systemd need not fall back to SIGKILL.
    uvicorn restores this handler after a graceful stop and re-raises the signal it stopped for,
    which lands here too and unwinds the same way.

    The flag is for an exception Python swallows (one raised in an at-fork hook while the mock
    cloud's Popen forks is only printed): `serve` checks it before serving. Signals after the first
    are ignored, so that a second one cannot cut short stopping what has been started."""
    global _stop_asked
    if not _stop_asked:
        _stop_asked = True
        raise SystemExit(0)


def _cap_malloc_arenas(count: int = 2) -> None:
    """glibc gives each thread that allocates an arena of its own (up to 8 per core); with a writer
    thread per upload that kept 30–40 MiB more resident under the soak (ops/soak.py). The same as
    MALLOC_ARENA_MAX=2, which would have to be set before the interpreter starts."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).mallopt(-8, count)  # -8 = M_ARENA_MAX; absent outside glibc


def die_with_parent(signum: int = signal.SIGTERM) -> None:
    """`signum` when the parent dies, even by kill -9 (Linux prctl): a killed `mediad serve`
    leaves no worker or mock cloud behind."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signum)  # 1 = PR_SET_PDEATHSIG


def _redact(url: str) -> str:
    parts = urlsplit(url)
    if parts.password:
        url = url.replace(f":{parts.password}@", ":***@", 1)
    return url


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def mock_cloud_process(data_dir: Path) -> Iterator[tuple[str, str]]:
    """The bundled mock cloud as a child process, so the embedded default replicates out of the box."""
    token = secrets.token_urlsafe(24)
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    # The token travels in the environment: not visible in `ps`, and a random token that starts
    # with "-" cannot be mistaken for an option.
    proc = subprocess.Popen([sys.executable, "-m", "mediad.cli", "mock-cloud", "--host", "127.0.0.1",
                             "--port", str(port), "--data-dir", str(data_dir)],
                            env={**os.environ, "MEDIAD_CLOUD_TOKEN": token}, preexec_fn=die_with_parent)
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the mock cloud exited with {proc.returncode}")
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the mock cloud did not start within 30 s")
            time.sleep(0.05)
        yield url, token
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()


def _migrate_in_child(url: str) -> None:
    """`mediad migrate` in a child process: Alembic and Mako stay resident once imported (≈8 MiB),
    and the server has no use for them after start."""
    env = {**os.environ, "MEDIAD_DATABASE_URL": url}
    if subprocess.run([sys.executable, "-m", "mediad.cli", "migrate"], env=env).returncode != 0:
        raise SystemExit("mediad: the database migration failed (see above)")


@contextlib.contextmanager
def _metrics_dir() -> Iterator[Path]:
    """A fresh, empty directory for the workers' metric files, removed when the service stops.
    Set before any worker imports prometheus_client: spawned workers inherit the environment,
    forked ones (Granian) the variable and a library not imported yet."""
    assert "prometheus_client" not in sys.modules, "prometheus_client must not be imported yet"
    path = Path(tempfile.mkdtemp(prefix="mediad-metrics-"))
    os.environ[MULTIPROC_DIR] = str(path)
    try:
        yield path
    finally:
        os.environ.pop(MULTIPROC_DIR, None)
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def _recovered(settings: Settings, url: str) -> Iterator[None]:
    """The start-up recovery of the data dir, once for the whole service, then the data dir's serve
    lock held (shared) until the service stops: each worker's lifespan finds a live peer in this
    process and leaves recovery alone, and so does a worker started to replace a dead one."""
    from .storage import Storage

    storage = Storage(settings.data_dir, durable=settings.fsync, min_free_bytes=settings.min_free_bytes)
    storage.prepare()
    try:
        asyncio.run(_recover(storage, settings, url))
        yield
    finally:
        storage.leave()


async def _recover(storage: Any, settings: Settings, url: str) -> None:
    from . import db
    from .cleanup import recover

    engine = db.create_engine(url, settings)
    try:
        await recover(engine, storage)
    finally:
        await engine.dispose()


# ---- the servers ----------------------------------------------------------------------------------

def _die_with(supervisor: int | None) -> None:
    """In a worker: SIGKILL when the supervisor dies, as in a crash of the whole service, and exit
    at once if it already has (a worker still starting when `mediad serve` was killed would
    otherwise go on serving alone, holding the port and the data dir)."""
    die_with_parent(signal.SIGKILL)
    if supervisor is not None and os.getppid() != supervisor:
        os._exit(1)


def worker_app(settings: Settings, url: str, supervisor: int) -> Any:
    """The app in a uvicorn worker process (the factory uvicorn's supervisor hands each worker)."""
    from .app import create_app
    from .logs import setup_logging

    _die_with(supervisor)
    setup_logging(settings.log_level, settings.log_file)
    return create_app(settings, url)


_granian_supervisor: int | None = None  # set before Granian forks its workers, which inherit it


def granian_app() -> Any:
    """The app in a Granian worker process; settings and the database URL come through the
    environment (`_export`)."""
    from .app import app_from_environment

    _die_with(_granian_supervisor)
    return app_from_environment()


def _run_uvicorn(settings: Settings, url: str) -> bool:
    """→ False when the workers could not start (uvicorn's supervisor then gives up)."""
    import uvicorn

    from .server import uvicorn_config

    if settings.workers == 1:
        from .app import create_app

        uvicorn.Server(uvicorn_config(create_app(settings, url), settings)).run()
        return True
    # The supervisor pings each worker about every 0.5 s and kills one that does not answer within
    # the health-check timeout; a worker starting on a busy machine may take more than uvicorn's
    # 5 s before its answering thread runs.
    config = uvicorn_config(functools.partial(worker_app, settings, url, os.getpid()), settings, factory=True,
                            workers=settings.workers, timeout_worker_healthcheck=_WORKER_HEALTHCHECK_S)
    supervisor = _Supervisor(config, sockets=[config.bind_socket()])
    supervisor.run()
    return supervisor.asked_to_stop


class _Supervisor(Multiprocess):
    """uvicorn's: spawns the workers on the bound socket, replaces dead ones, stops them all on
    SIGTERM/SIGINT (and restarts them one by one on SIGHUP). It also stops when workers cannot
    start; `asked_to_stop` tells that apart from a stop asked for."""

    asked_to_stop = False

    def handle_int(self) -> None:
        self.asked_to_stop = True
        super().handle_int()

    def handle_term(self) -> None:
        self.asked_to_stop = True
        super().handle_term()


def _export(settings: Settings, url: str) -> None:
    """What a Granian worker's `load_settings()` must see that the environment may not say: the
    database and cloud the supervisor started, and the command line's host and port."""
    os.environ.update({"MEDIAD_DATABASE_URL": url, "MEDIAD_HOST": settings.host,
                       "MEDIAD_PORT": str(settings.port), "MEDIAD_WORKERS": str(settings.workers)})
    if settings.cloud_url:
        os.environ["MEDIAD_CLOUD_URL"] = settings.cloud_url
        os.environ["MEDIAD_CLOUD_TOKEN"] = settings.cloud_token or ""


def _run_granian(settings: Settings, url: str) -> None:
    """Granian serves full-file downloads zero-copy (ASGI pathsend); it imports the app itself in
    each worker process and replaces a worker that dies."""
    from granian import Granian
    from granian.constants import Interfaces
    from granian.http import HTTP1Settings

    global _granian_supervisor
    _granian_supervisor = os.getpid()
    _export(settings, url)
    Granian("mediad.serve:granian_app", factory=True, interface=Interfaces.ASGI,
            address=settings.host, port=settings.port, workers=settings.workers, log_enabled=False,
            workers_kill_timeout=30, respawn_failed_workers=True,
            # Granian has a head deadline and a head-size cap of its own (no body idle deadline).
            http1_settings=HTTP1Settings(header_read_timeout=int(settings.header_timeout_s * 1000),
                                         max_buffer_size=max(settings.max_header_bytes, 65536)),
            ).serve()

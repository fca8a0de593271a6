"""`mediad serve | migrate | cleanup | cloud | users | tokens | mock-cloud` — the command line."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator, Sequence

from . import __version__, admin, mockcloud
from .config import ConfigError, Settings, load_settings
from .embedded import database
from .logs import setup_logging

log = logging.getLogger("mediad")


def _cloud_retry(settings: Settings, file_id: str | None) -> int:
    import asyncio
    import uuid

    from . import db

    try:
        target = uuid.UUID(file_id) if file_id else None
    except ValueError:
        print(f"mediad: {file_id!r} is not a file id", file=sys.stderr)
        return 2

    async def retry(url: str) -> list[uuid.UUID]:
        engine = db.create_engine(url, settings)
        try:
            async with engine.begin() as conn:
                return await db.retry_failed(conn, target)
        finally:
            await engine.dispose()

    with database(settings.database_url, settings.data_dir) as url:
        ids = asyncio.run(retry(url))
    print(f"{len(ids)} failed file(s) queued for another push")
    return 0 if ids or target is None else 1


class _Terminated(SystemExit):
    """SIGTERM, raised wherever the command is so that its finally blocks run."""


@contextlib.contextmanager
def _sigterm_unwinds() -> Iterator[None]:
    """SIGTERM unwinds a command as Ctrl-C does: by default it kills at once, and a command using
    the embedded PostgreSQL would leave it running with nobody to stop it. It exits 143 (128 + 15,
    as a shell reports a process killed by SIGTERM); `mediad cleanup`'s loop turns that into 0.
    Every SIGTERM raises, not just the first: one raised where Python only prints exceptions (an
    at-fork hook) is lost, and the next must still stop the command; starting and stopping the
    embedded PostgreSQL hold signals back themselves. Only on the main thread (`main` is called
    in-process too), and undone afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(signum: int, frame: object) -> None:
        raise _Terminated(128 + signum)

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def _cleanup(settings: Settings, *, once: bool, dry_run: bool) -> int:
    """`mediad cleanup`: the same pass the server's loop runs, for cron or a Procfile worker."""
    import asyncio
    import json

    from . import db, migrate
    from .cleanup import sweep
    from .storage import Storage

    storage = Storage(settings.data_dir, durable=settings.fsync)
    storage.prepare()
    # MEDIAD_CLEANUP_INTERVAL_S=0 switches the server's own loop off, which is when this runs as a
    # worker beside it (with the same settings, as under the Procfile): a pass every 0 s would spin.
    interval = settings.cleanup_interval_s or Settings.cleanup_interval_s
    if not once and not settings.cleanup_interval_s:
        log.info("MEDIAD_CLEANUP_INTERVAL_S=0 switches off the server's loop only; a pass every %g s", interval)

    async def run(url: str) -> int:
        engine = db.create_engine(url, settings)
        try:
            while True:
                report = await sweep(engine, storage, settings, dry_run=dry_run)
                if dry_run:
                    for action in report.actions:
                        print(action)
                print(json.dumps(report.summary()), flush=True)
                if once:
                    return 1 if report.missing else 0
                await asyncio.sleep(interval)
        finally:
            await engine.dispose()

    try:
        with database(settings.database_url, settings.data_dir) as url:
            if not once and not dry_run:
                # A worker may start before the server has migrated a new data dir or a new release
                # (the Procfile starts both at once); migrations take turns (an advisory lock).
                migrate.upgrade(url)
            return asyncio.run(run(url))
    except (_Terminated, KeyboardInterrupt):
        if once:
            raise
        # SIGTERM or Ctrl-C is how a worker is stopped (honcho, docker stop, systemd), whenever it
        # comes: a pass cut short changed rows before bytes, and what it left the next one sweeps.
        log.info("mediad cleanup: stopped")
        return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mediad", description="mediad media file service")
    parser.add_argument("--version", action="version", version=f"mediad {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    serve_cmd = commands.add_parser("serve", help="run the HTTP service")
    serve_cmd.add_argument("--host")
    serve_cmd.add_argument("--port", type=int)
    serve_cmd.add_argument("--server", choices=["uvicorn", "granian"], default="uvicorn",
                           help="granian (optional extra mediad[granian]) sends whole files zero-copy")
    serve_cmd.add_argument("--workers", type=int, help="worker processes answering on the port "
                           "(default MEDIAD_WORKERS, else the CPU count; 1 serves in this process)")
    commands.add_parser("migrate", help="bring the database schema to the latest revision")
    mockcloud.add_cli(commands)
    cleanup_cmd = commands.add_parser("cleanup", help="free local disk: evict files the cloud holds, "
                                      "sweep temp and orphan files")
    cleanup_cmd.add_argument("--once", action="store_true", help="one pass, then exit (for cron)")
    cleanup_cmd.add_argument("--dry-run", action="store_true", help="print what a pass would do")
    cloud_cmd = commands.add_parser("cloud", help="cloud replication maintenance")
    cloud_actions = cloud_cmd.add_subparsers(dest="cloud_command", required=True)
    retry_cmd = cloud_actions.add_parser("retry", help="put failed pushes back in the queue")
    which = retry_cmd.add_mutually_exclusive_group(required=True)
    which.add_argument("--all", action="store_true", help="every failed file")
    which.add_argument("file_id", nargs="?", help="one file id")
    admin.add_cli(commands)
    args = parser.parse_args(argv)
    if args.command == "mock-cloud":
        return mockcloud.main_from_args(args, os.environ)

    try:
        overrides = {}
        if getattr(args, "host", None):
            overrides["MEDIAD_HOST"] = args.host
        if getattr(args, "port", None):
            overrides["MEDIAD_PORT"] = str(args.port)
        if getattr(args, "workers", None) is not None:
            overrides["MEDIAD_WORKERS"] = str(args.workers)
        settings = load_settings({**os.environ, **overrides})
    except ConfigError as exc:
        print(f"mediad: configuration error: {exc}", file=sys.stderr)
        return 2
    setup_logging(settings.log_level, settings.log_file)

    if args.command == "serve":
        from .serve import serve

        return serve(settings, args.server)
    with _sigterm_unwinds():
        return _command(args, settings)


def _command(args: argparse.Namespace, settings: Settings) -> int:
    if args.command == "cleanup":
        return _cleanup(settings, once=args.once or args.dry_run, dry_run=args.dry_run)
    if args.command == "cloud":
        return _cloud_retry(settings, None if args.all else args.file_id)
    if args.command in ("users", "tokens"):
        return admin.main_from_args(settings, args)
    if args.command == "migrate":
        from . import migrate

        with database(settings.database_url, settings.data_dir) as url:
            migrate.upgrade(url)
        log.info("schema is at head")
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())

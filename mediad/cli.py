"""`mediad serve | migrate` — the command line."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Sequence
from urllib.parse import urlsplit

from . import __version__, migrate
from .config import ConfigError, Settings, load_settings
from .embedded import database
from .logs import setup_logging

log = logging.getLogger("mediad")


def _redact(url: str) -> str:
    parts = urlsplit(url)
    if parts.password:
        url = url.replace(f":{parts.password}@", ":***@", 1)
    return url


def _ignore_signal(signum: int, frame: object) -> None:
    """uvicorn re-raises the shutdown signal after a graceful stop; with this handler restored in
    place of the default one, that re-raise no longer kills us before the database is stopped."""


def serve(settings: Settings, server: str) -> int:
    import uvicorn

    from .app import create_app

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _ignore_signal)
    with database(settings.database_url, settings.data_dir) as url:
        log.info("database: %s", "embedded PostgreSQL" if not settings.database_url else _redact(url))
        migrate.upgrade(url)
        log.info("data dir: %s", settings.data_dir.resolve())
        log.info("listening on http://%s:%d (%s)", settings.host, settings.port, server)
        if server == "granian":
            _run_granian(settings, url)
        else:
            config = uvicorn.Config(create_app(settings, url), host=settings.host, port=settings.port,
                                    log_config=None, timeout_graceful_shutdown=30, server_header=False)
            uvicorn.Server(config).run()
    return 0


def _run_granian(settings: Settings, url: str) -> None:
    """Granian serves full-file downloads zero-copy (ASGI pathsend); it imports the app itself in
    a worker process, so the database URL travels through the environment."""
    import os

    from granian import Granian
    from granian.constants import Interfaces

    os.environ["MEDIAD_DATABASE_URL"] = url
    Granian("mediad.app:app_from_environment", factory=True, interface=Interfaces.ASGI,
            address=settings.host, port=settings.port, workers=1, log_enabled=False,
            workers_kill_timeout=30).serve()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mediad", description="mediad media file service")
    parser.add_argument("--version", action="version", version=f"mediad {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    serve_cmd = commands.add_parser("serve", help="run the HTTP service")
    serve_cmd.add_argument("--host")
    serve_cmd.add_argument("--port", type=int)
    serve_cmd.add_argument("--server", choices=["uvicorn", "granian"], default="uvicorn",
                           help="granian (optional extra mediad[granian]) sends whole files zero-copy")
    commands.add_parser("migrate", help="bring the database schema to the latest revision")
    args = parser.parse_args(argv)

    try:
        overrides = {}
        if getattr(args, "host", None):
            overrides["MEDIAD_HOST"] = args.host
        if getattr(args, "port", None):
            overrides["MEDIAD_PORT"] = str(args.port)
        import os

        settings = load_settings({**os.environ, **overrides})
    except ConfigError as exc:
        print(f"mediad: configuration error: {exc}", file=sys.stderr)
        return 2
    setup_logging(settings.log_level, settings.log_file)

    if args.command == "serve":
        return serve(settings, args.server)
    if args.command == "migrate":
        with database(settings.database_url, settings.data_dir) as url:
            migrate.upgrade(url)
        log.info("schema is at head")
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())

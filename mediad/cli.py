"""`mediad serve | migrate` — the command line."""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from urllib.parse import urlsplit

import httpx

from . import __version__, mockcloud
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


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM when the parent dies, even by kill -9 (Linux prctl), so a
    killed `mediad serve` leaves no mock cloud behind."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


def _cap_malloc_arenas(count: int = 2) -> None:
    """glibc gives each thread that allocates an arena of its own (up to 8 per core); with a writer
    thread per upload that kept 30–40 MiB more resident under the soak (ops/soak.py). The same as
    MALLOC_ARENA_MAX=2, which would have to be set before the interpreter starts."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).mallopt(-8, count)  # -8 = M_ARENA_MAX; absent outside glibc


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
                            env={**os.environ, "MEDIAD_CLOUD_TOKEN": token}, preexec_fn=_die_with_parent)
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


def serve(settings: Settings, server: str) -> int:
    import uvicorn

    from .app import create_app
    from .server import uvicorn_config

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _ignore_signal)
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
        log.info("listening on http://%s:%d (%s)", settings.host, settings.port, server)
        if server == "granian":
            _run_granian(settings, url)
        else:
            uvicorn.Server(uvicorn_config(create_app(settings, url), settings)).run()
    return 0


def _run_granian(settings: Settings, url: str) -> None:
    """Granian serves full-file downloads zero-copy (ASGI pathsend); it imports the app itself in
    a worker process, so the database URL travels through the environment."""
    from granian import Granian
    from granian.constants import Interfaces
    from granian.http import HTTP1Settings

    os.environ["MEDIAD_DATABASE_URL"] = url
    if settings.cloud_url:
        os.environ["MEDIAD_CLOUD_URL"] = settings.cloud_url
        os.environ["MEDIAD_CLOUD_TOKEN"] = settings.cloud_token or ""
    Granian("mediad.app:app_from_environment", factory=True, interface=Interfaces.ASGI,
            address=settings.host, port=settings.port, workers=1, log_enabled=False,
            workers_kill_timeout=30,
            # Granian has a head deadline and a head-size cap of its own (no body idle deadline).
            http1_settings=HTTP1Settings(header_read_timeout=int(settings.header_timeout_s * 1000),
                                         max_buffer_size=max(settings.max_header_bytes, 65536)),
            ).serve()


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


def _cleanup(settings: Settings, *, once: bool, dry_run: bool) -> int:
    """`mediad cleanup`: the same pass the server's loop runs, for cron or a Procfile worker."""
    import asyncio
    import json

    from . import db
    from .cleanup import sweep
    from .storage import Storage

    storage = Storage(settings.data_dir, durable=settings.fsync)
    storage.prepare()

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
                await asyncio.sleep(settings.cleanup_interval_s)
        finally:
            await engine.dispose()

    with database(settings.database_url, settings.data_dir) as url:
        return asyncio.run(run(url))


def add_users_set_quota(users_actions: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """`mediad users set-quota NAME BYTES|none`, under the `users` command group."""
    quota_cmd = users_actions.add_parser("set-quota", help="set how many bytes a user's files may take")
    quota_cmd.add_argument("name", help="the user's name (case-insensitive)")
    quota_cmd.add_argument("bytes", help="a byte count (1073741824, 500MiB, 10GiB) or none for unlimited")


def _users_set_quota(settings: Settings, name: str, text: str) -> int:
    import asyncio

    from . import db, quotas
    from .auth import clean_user_name
    from .config import parse_size
    from .errors import Unprocessable

    try:
        quota = None if text.strip().lower() == "none" else parse_size(text)
        _, name_key = clean_user_name(name)
    except (ValueError, Unprocessable) as exc:
        print(f"mediad: {getattr(exc, 'detail', exc)}", file=sys.stderr)
        return 2

    async def update(url: str) -> bool:
        engine = db.create_engine(url, settings)
        try:
            async with engine.begin() as conn:
                return await quotas.set_quota(conn, name_key, quota)
        finally:
            await engine.dispose()

    with database(settings.database_url, settings.data_dir) as url:
        found = asyncio.run(update(url))
    if not found:
        print(f"mediad: no user named {name!r}", file=sys.stderr)
        return 1
    print(f"quota of {name}: " + ("unlimited" if quota is None else f"{quota} bytes"))
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
    users_cmd = commands.add_parser("users", help="user accounts")
    add_users_set_quota(users_cmd.add_subparsers(dest="users_command", required=True))
    args = parser.parse_args(argv)
    if args.command == "mock-cloud":
        return mockcloud.main_from_args(args)

    try:
        overrides = {}
        if getattr(args, "host", None):
            overrides["MEDIAD_HOST"] = args.host
        if getattr(args, "port", None):
            overrides["MEDIAD_PORT"] = str(args.port)
        settings = load_settings({**os.environ, **overrides})
    except ConfigError as exc:
        print(f"mediad: configuration error: {exc}", file=sys.stderr)
        return 2
    setup_logging(settings.log_level, settings.log_file)

    if args.command == "serve":
        return serve(settings, args.server)
    if args.command == "cleanup":
        return _cleanup(settings, once=args.once or args.dry_run, dry_run=args.dry_run)
    if args.command == "users" and args.users_command == "set-quota":
        return _users_set_quota(settings, args.name, args.bytes)
    if args.command == "cloud":
        return _cloud_retry(settings, None if args.all else args.file_id)
    if args.command == "migrate":
        from . import migrate

        with database(settings.database_url, settings.data_dir) as url:
            migrate.upgrade(url)
        log.info("schema is at head")
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())

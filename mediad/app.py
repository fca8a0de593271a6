"""The ASGI application: lifespan, routes and the one place errors become problem+json."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import anyio
import httpx
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import Scope

from . import accounts, audio, auth, downloads, fastpath, files, links, openapi, previews, tree, tus, uploads, webhooks
from .cache import LookupCache, listener_dsn
from .cleanup import AccessTracker, Report, cleanup_loop, recover
from .cloud import CloudError, ObjectStore, Replicator, Store
from .config import Settings
from .conventions import Conventions, allowed_methods, cors
from .db import create_engine
from .deliveries import Deliverer
from .errors import DATABASE_UNAVAILABLE, MediaError, database_unavailable, error_response, problem
from .media import Prober
from .mediapool import MediaPool
from .metrics import Metrics, TelemetryMiddleware, metrics_endpoint
from .storage import Storage
from .thumbnails import Thumbnailer

log = logging.getLogger("mediad")


def create_app(settings: Settings, database_url: str | None = None) -> Starlette:
    """The app for `settings`; `database_url` overrides settings (the embedded server's URL)."""
    url = database_url or settings.database_url
    if not url:
        raise ValueError("no database URL: start the embedded PostgreSQL or set MEDIAD_DATABASE_URL")
    metrics = Metrics()  # a registry per app: several apps in one process do not clash
    lifespan = _lifespan(settings, url, metrics)

    routes = [
        Route("/health", health),
        Route("/ping/all", ping_all),
        Route("/metrics", metrics_endpoint),
        *openapi.routes(),
        Route("/users", auth.create_user, methods=["POST"]),
        Route("/auth/login", auth.login, methods=["POST"]),
        Route("/auth/tokens", accounts.list_tokens, methods=["GET"]),
        Route("/auth/tokens", accounts.create_token, methods=["POST"]),
        Route("/auth/tokens/{token_id}", accounts.revoke_token, methods=["DELETE"]),
        Route("/users/me", accounts.show_me, methods=["GET"]),
        Route("/users/me", accounts.delete_me, methods=["DELETE"]),
        Route("/auth/config", auth.auth_config, methods=["GET"]),
        Route("/users/me/password", auth.change_password, methods=["POST"]),
        Route("/auth/token", auth.sign_out, methods=["DELETE"]),
        Route("/files", uploads.post_files, methods=["POST"]),
        Route("/files", uploads.put_files, methods=["PUT"]),
        Route("/files", files.list_, methods=["GET"]),
        Route("/files/{file_id}", files.show, methods=["GET"]),
        Route("/files/{file_id}", files.delete, methods=["DELETE"]),
        Route("/files/{file_id}", tree.move, methods=["PATCH"]),
        Route("/folders", tree.list_folder, methods=["GET"]),
        Route("/folders", tree.delete_folder, methods=["DELETE"]),
        Route("/files/{file_id}/content", downloads.content, methods=["GET", "HEAD"]),
        Route("/files/{file_id}/links", links.create_link, methods=["POST"]),
        Route("/files/{file_id}/thumbnail", previews.thumbnail, methods=["GET", "HEAD"]),
        Route("/download", downloads.download, methods=["GET", "HEAD"]),
        Route("/usage", files.usage, methods=["GET"]),
        Route("/records", audio.post_records, methods=["POST"]),
        Route("/uploads", tus.options, methods=["OPTIONS"]),
        Route("/uploads", tus.create, methods=["POST"]),
        Route("/uploads/{upload_id}", tus.head, methods=["HEAD"]),  # before GET, which implies HEAD
        Route("/uploads/{upload_id}", tus.status, methods=["GET"]),
        Route("/uploads/{upload_id}", tus.patch, methods=["PATCH"]),
        Route("/uploads/{upload_id}", tus.terminate, methods=["DELETE"]),
        Route("/record", audio.get_record, methods=["GET", "HEAD"]),
        Route("/webhooks", webhooks.create, methods=["POST"]),
        Route("/webhooks", webhooks.list_, methods=["GET"]),
        Route("/webhooks/{webhook_id}", webhooks.delete, methods=["DELETE"]),
        Route("/webhooks/{webhook_id}/deliveries", webhooks.deliveries, methods=["GET"]),
        Route("/", web_index),
        Mount("/web", app=WebFiles(packages=[("mediad", "web")]), name="web"),
    ]
    app = Starlette(
        routes=routes,
        middleware=[*cors(settings), Middleware(TelemetryMiddleware, metrics), Middleware(Conventions),
                    Middleware(fastpath.FastDownloads)],  # the fast path innermost: it sees what the app would
        exception_handlers={
            MediaError: _media_error,
            HTTPException: _http_error,
            **dict.fromkeys(DATABASE_UNAVAILABLE, _database_unavailable),
            Exception: _internal_error,
        },
        lifespan=lifespan,
    )
    app.router.redirect_slashes = False  # Conventions serves /files/ as /files instead of a 307
    return app


async def _start_deliveries(stack: contextlib.AsyncExitStack, engine: AsyncEngine, settings: Settings,
                            link_key: bytes, metrics: Metrics) -> Deliverer:
    """The webhook worker and its own HTTP client (no redirects, no keep-alive, no env proxies)."""
    http = await stack.enter_async_context(Deliverer.client(settings))
    deliverer = Deliverer(engine, http, settings, link_key, metrics)
    _start(stack, "webhooks", deliverer.run())
    return deliverer


Lifespan = Callable[[Starlette], AbstractAsyncContextManager[None]]


def _lifespan(settings: Settings, url: str, metrics: Metrics) -> Lifespan:
    """What the app holds while it serves, on `app.state` for the handlers: the data dir, the
    database, the cloud replicator, the background loops. Everything started is stopped in
    reverse order on the way out, also when starting fails halfway."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        state = app.state
        storage = Storage(settings.data_dir, durable=settings.fsync, min_free_bytes=settings.min_free_bytes)
        await anyio.to_thread.run_sync(storage.prepare)
        state.link_key = await anyio.to_thread.run_sync(links.load_key, settings)
        engine = create_engine(url, settings)
        state.settings, state.storage, state.engine, state.metrics = settings, storage, engine, metrics
        log.info("%s", auth.signup_policy(settings), extra={"signup": "open" if settings.signup_open else "closed"})
        # Single-statement reads (token checks, lookups, health) skip BEGIN/ROLLBACK: two fewer
        # round trips on the hottest paths. Same pool.
        state.reader = engine.execution_options(isolation_level="AUTOCOMMIT")
        state.last_cleanup = None
        state.access = AccessTracker()
        state.transcoder = audio.Transcoder(settings)
        state.tus_hashers = tus.Hashes()
        state.cache = LookupCache(settings.cache_max_age_s) if settings.cache_max_age_s > 0 else None
        async with contextlib.AsyncExitStack() as stack:
            if state.cache is not None:  # the download path's lookups, kept fresh by LISTEN
                _start(stack, "cache-listener", state.cache.listen(listener_dsn(url)))
            stack.push_async_callback(engine.dispose)
            stack.callback(storage.leave)
            await recover(engine, storage)  # what a dead process left on this data dir
            stack.push_async_callback(_flush_quietly, state.access, engine)
            state.store, state.replicator = await _start_replication(stack, settings, engine, storage, metrics)
            state.thumbnails, state.prober = await _start_media(stack, engine, storage, settings)
            state.deliverer = await _start_deliveries(stack, engine, settings, state.link_key, metrics)

            def cleaned(report: Report) -> None:
                state.last_cleanup = report
                if not report.dry_run:
                    metrics.observe_cleanup(evicted_files=report.evicted_files, evicted_bytes=report.evicted_bytes,
                                            temp_removed=report.temp_removed, orphans_removed=report.orphans_removed)

            _start(stack, "cleanup", cleanup_loop(engine, storage, settings, state.access, cleaned))
            yield

    return lifespan


async def _start_replication(stack: contextlib.AsyncExitStack, settings: Settings, engine: AsyncEngine,
                             storage: Storage, metrics: Metrics) -> tuple[Store | None, Replicator | None]:
    """The cloud store (S3 or the mock cloud API) and its replicator, when one is configured."""
    if not (settings.cloud_url or settings.s3_bucket):
        return None, None
    http = await stack.enter_async_context(httpx.AsyncClient(
        timeout=httpx.Timeout(60, connect=5), limits=httpx.Limits(max_connections=64)))
    store: Store
    if settings.s3_bucket:
        from .s3 import S3Store

        store = s3 = S3Store(http, settings)
        try:
            await s3.ensure_bucket()
        except CloudError as exc:  # replication retries; the service starts anyway
            log.warning("could not check or create the S3 bucket: %s", exc)
    else:
        assert settings.cloud_url is not None
        store = ObjectStore(http, settings.cloud_url, settings.cloud_token)
    replicator = Replicator(engine, storage, store, settings, metrics.push_failures.inc)
    _start(stack, "replication", replicator.run())
    return store, replicator


def _start(stack: contextlib.AsyncExitStack, name: str, work: Coroutine[Any, Any, None]) -> None:
    """Run `work` as a task until the stack closes."""
    stack.push_async_callback(_stop, asyncio.create_task(work, name=name))


async def _start_media(stack: contextlib.AsyncExitStack, engine: AsyncEngine, storage: Storage,
                       settings: Settings) -> tuple[Thumbnailer, Prober]:
    """Probing of committed Files and the thumbnail generators, sharing one pool of workers."""
    pool = MediaPool(settings.media_workers, settings.media_timeout_s)
    stack.push_async_callback(pool.close)
    thumbnails = Thumbnailer(storage.root, pool, settings.media_max_pixels)
    stack.push_async_callback(thumbnails.close)
    prober = Prober(engine, storage, pool, thumbnails, settings.media_max_pixels)
    _start(stack, "media-probing", prober.run())
    return thumbnails, prober


async def _flush_quietly(tracker: AccessTracker, engine: AsyncEngine) -> None:
    try:
        await tracker.flush(engine)
    except Exception as exc:
        log.warning("could not record last access times at shutdown: %s", exc.__class__.__name__)


async def _stop(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def app_from_environment() -> Starlette:
    """Factory for servers that import the app in a worker process (Granian): the parent passes
    the database URL, embedded or not, through MEDIAD_DATABASE_URL."""
    from .config import load_settings
    from .logs import setup_logging

    settings = load_settings()
    setup_logging(settings.log_level, settings.log_file)
    return create_app(settings)


async def _media_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, MediaError)
    return error_response(exc)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    detail = {404: f"no route for {request.url.path}",
              405: f"{request.method} is not allowed on {request.url.path}"}.get(exc.status_code, exc.detail)
    headers = dict(exc.headers or {})
    if exc.status_code == 405:
        headers["Allow"] = allowed_methods(request.app.routes, request.url.path)
    return problem(exc.status_code, detail, headers=headers)


async def _database_unavailable(request: Request, exc: Exception) -> Response:
    return database_unavailable(exc)


async def _internal_error(request: Request, exc: Exception) -> Response:
    # ServerErrorMiddleware re-raises after this, so the server logs the traceback.
    return problem(500, "an unexpected error occurred; it has been logged", "internal-error")


# ---- the web app (mediad/web): static files under a strict CSP ----------------------------------

_WEB_DIR = Path(__file__).parent / "web"
_WEB_HEADERS = {
    # No inline script or style anywhere in the app; media only through same-origin signed links.
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; "
                               "img-src 'self' blob: data:; media-src 'self'; connect-src 'self'; "
                               "object-src 'none'; base-uri 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",  # page URLs and signed links never leak to other sites
}
_WEB_TYPES = {".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8",
              ".html": "text/html; charset=utf-8", ".svg": "image/svg+xml"}


class WebFiles(StaticFiles):
    """The web app's assets: revalidated by ETag after an hour (names carry no version)."""

    def file_response(self, full_path: Any, stat_result: os.stat_result, scope: Scope,
                      status_code: int = 200) -> Response:
        response = super().file_response(full_path, stat_result, scope, status_code)
        response.headers.update({**_WEB_HEADERS, "Cache-Control": "public, max-age=3600"})
        kind = _WEB_TYPES.get(os.path.splitext(str(full_path))[1])
        if kind and response.status_code == 200:
            response.headers["Content-Type"] = kind
        return response


async def web_index(request: Request) -> Response:
    return FileResponse(_WEB_DIR / "index.html", media_type="text/html; charset=utf-8",
                        headers={**_WEB_HEADERS, "Cache-Control": "no-cache"})


async def health(request: Request) -> Response:
    try:
        with anyio.fail_after(3):
            async with request.app.state.reader.connect() as conn:
                await conn.execute(sa.text("SELECT 1"))
    except Exception as exc:  # any failure to answer is "unhealthy", not a 500
        log.warning("health check failed: %s", exc.__class__.__name__)
        return problem(503, "the database does not answer", "service-unavailable", {"Retry-After": "2"})
    return JSONResponse({"status": "ok"})


async def ping_all(request: Request) -> Response:
    """Round-trip times (ms) of the services behind mediad; null for one that is absent."""
    started = time.perf_counter()
    async with request.app.state.reader.connect() as conn:
        await conn.execute(sa.text("SELECT 1"))
    db_ms = (time.perf_counter() - started) * 1000
    storage_ms = await anyio.to_thread.run_sync(request.app.state.storage.probe) * 1000
    cloud_ms = None
    if request.app.state.store is not None:
        try:
            cloud_ms = round(await request.app.state.store.ping() * 1000, 3)
        except CloudError:
            cloud_ms = None  # configured but unreachable: null, and the log says why
            log.warning("cloud ping failed")
    last = request.app.state.last_cleanup
    return JSONResponse({"db": round(db_ms, 3), "storage": round(storage_ms, 3), "cloud": cloud_ms,
                         # true when the last cleanup pass could not bring the disk under high water
                         "disk_pressure": bool(last and last.pressure_unrelieved)})

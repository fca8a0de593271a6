"""Prometheus metrics: one registry per app, the middleware that observes requests, GET /metrics.

What only the request path sees (requests, durations, bytes, uploads in flight) is counted as
requests pass. What the database and the disk know (the replication backlog, free space) is read
when Prometheus scrapes, with one indexed query and one statvfs, so a restart or a second
instance on the same database never makes those numbers drift.

Under `mediad serve --workers N` every worker counts into prometheus-client's multiprocess files
(PROMETHEUS_MULTIPROC_DIR, set by the supervisor before any worker imports the library) and
/metrics reads all of them: the service's totals, whichever worker answers the scrape.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import time
from collections.abc import Iterable
from typing import Any

import anyio
import sqlalchemy as sa
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, multiprocess
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Mount
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from . import db, logs
from .storage import Storage

log = logging.getLogger("mediad.metrics")

# Uploads run longer than API calls: buckets up to half an hour.
_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0)
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
_UPLOAD_METHODS = frozenset({"POST", "PUT", "PATCH"})
_UPLOAD_ROUTES = ("/files", "/records")  # plus everything under /uploads (tus)
_DOWNLOAD_ROUTES = frozenset({"/files/{file_id}/content", "/download", "/record"})
_CONVERTOR = re.compile(r"{([^}:]+):[^}]+}")
_SCRAPE_TIMEOUT_S = 2.0
# prometheus-client's own switch, read by the library when it is imported: when set, every value
# lives in a file of this directory named after the process that counts it.
MULTIPROC_DIR = "PROMETHEUS_MULTIPROC_DIR"

# The replication backlog in one query on ix_files_cloud_due (cloud_state leads it): stored rows,
# the bulk of the table, are never read. updated_at is when the row last became pending (insert
# or replace).
_BACKLOG = (
    sa.select(db.files.c.cloud_state, sa.func.count(),
              sa.func.extract("epoch", sa.func.now() - sa.func.min(db.files.c.updated_at)))
    .where(db.files.c.cloud_state.in_(("pending", "failed")))
    .group_by(db.files.c.cloud_state)
)


def route_template(scope: Scope) -> str:
    """The matched route's path template (`/files/{file_id}`): a bounded label, unlike the path."""
    route = scope.get("route")
    path = getattr(route, "path", None)
    return "unmatched" if path is None else _template(path, isinstance(route, Mount))


@functools.lru_cache(maxsize=256)
def _template(path: str, mount: bool) -> str:
    path = _CONVERTOR.sub(r"{\1}", path)  # `{key:path}` → `{key}`, as OpenAPI writes it
    return f"{path}/{{path}}" if mount else path or "/"


def _is_upload(method: str, route: str) -> bool:
    return method in _UPLOAD_METHODS and (route in _UPLOAD_ROUTES or route.startswith("/uploads"))


class Metrics:
    """The app's metrics. Registered on its own registry as a collector too, for the values that
    are read at scrape time rather than counted. `exposed` is the registry /metrics serves: this
    one, or in a multiprocess service one that sums every worker's files."""

    def __init__(self) -> None:
        self.registry = registry = CollectorRegistry()
        self.requests = Counter("mediad_http_requests", "HTTP requests answered, by route template, "
                                "method and status.", ["route", "method", "status"], registry=registry)
        self.duration = Histogram("mediad_http_request_duration_seconds", "Time from a request's "
                                  "arrival to the end of its response.", ["route", "method"],
                                  buckets=_BUCKETS, registry=registry)
        self.uploaded = Counter("mediad_uploaded_bytes", "Request body bytes received by upload routes "
                                "(POST/PUT /files, POST /records, /uploads).", registry=registry)
        self.downloaded = Counter("mediad_downloaded_bytes", "File bytes sent by download routes "
                                  "(/files/{id}/content, /download, /record).", registry=registry)
        # livesum: across the workers alive now; a dead worker's uploads are in flight no more.
        self.uploads_in_flight = Gauge("mediad_uploads_in_flight", "Uploads whose body is being "
                                       "received now.", registry=registry, multiprocess_mode="livesum")
        self.push_failures = Counter("mediad_cloud_push_failures", "Failed pushes to the cloud since "
                                     "start (each is retried with backoff).", registry=registry)
        self.evicted_files = Counter("mediad_cleanup_evicted_files", "Local copies removed by cleanup "
                                     "because the cloud holds them.", registry=registry)
        self.freed_bytes = Counter("mediad_cleanup_freed_bytes", "Local disk bytes freed by cleanup "
                                   "evictions.", registry=registry)
        self.swept_files = Counter("mediad_cleanup_removed_files", "Abandoned temp files and orphan "
                                   "blobs removed by cleanup.", ["kind"], registry=registry)
        for kind in ("temp", "orphan"):
            self.swept_files.labels(kind)
        self.webhook_deliveries = Counter("mediad_webhook_deliveries", "Webhook delivery attempts by "
                                          "outcome: delivered, retried (failed, tried again later) or failed "
                                          "(gave up after MEDIAD_WEBHOOK_RETRY_S).", ["outcome"], registry=registry)
        for outcome in ("delivered", "retried", "failed"):
            self.webhook_deliveries.labels(outcome)
        self._scraped: dict[str, Any] = {}
        registry.register(self)
        self.multiprocess_dir = os.environ.get(MULTIPROC_DIR) or None
        self.exposed = registry
        if self.multiprocess_dir is not None:
            self.exposed = CollectorRegistry()
            multiprocess.MultiProcessCollector(self.exposed, path=self.multiprocess_dir)
            self.exposed.register(self)

    def observe_cleanup(self, *, evicted_files: int, evicted_bytes: int, temp_removed: int,
                        orphans_removed: int) -> None:
        """Add one finished cleanup pass (the lifespan loop calls this)."""
        self.evicted_files.inc(evicted_files)
        self.freed_bytes.inc(evicted_bytes)
        self.swept_files.labels("temp").inc(temp_removed)
        self.swept_files.labels("orphan").inc(orphans_removed)

    async def refresh(self, reader: AsyncEngine, storage: Storage) -> None:
        """Read what is measured at scrape time: the replication backlog and the disk (push
        failures are a counter the replicator increments)."""
        scraped: dict[str, Any] = {"database_up": 0, "backlog": {}}
        try:
            with anyio.fail_after(_SCRAPE_TIMEOUT_S):
                async with reader.connect() as conn:
                    rows = (await conn.execute(_BACKLOG)).all()
            scraped["backlog"] = {row[0]: (int(row[1]), float(row[2] or 0.0)) for row in rows}
            scraped["database_up"] = 1
        except Exception as exc:  # a scrape must answer even when the database does not
            log.warning("metrics: the backlog query failed: %s", exc.__class__.__name__)
        usage = await anyio.to_thread.run_sync(storage.usage)
        scraped["disk"] = (usage.total - usage.free, usage.free)
        if self.multiprocess_dir is not None:
            await anyio.to_thread.run_sync(forget_dead_workers, self.multiprocess_dir)
        self._scraped = scraped

    def collect(self) -> Iterable[Metric]:
        scraped = self._scraped
        if not scraped:
            return
        yield GaugeMetricFamily("mediad_database_up", "1 when the database answered this scrape's query.",
                                value=scraped["database_up"])
        if scraped["database_up"]:
            pending, oldest = scraped["backlog"].get("pending", (0, 0.0))
            yield GaugeMetricFamily("mediad_cloud_queue_depth", "Files waiting for their cloud copy "
                                    "(state pending), in the whole database.", value=pending)
            yield GaugeMetricFamily("mediad_cloud_queue_oldest_age_seconds", "How long the oldest "
                                    "pending file has waited for its cloud copy; 0 when none.", value=oldest)
            yield GaugeMetricFamily("mediad_cloud_failed_files", "Files whose cloud push gave up "
                                    "(state failed; `mediad cloud retry` requeues them).",
                                    value=scraped["backlog"].get("failed", (0, 0.0))[0])
        used, free = scraped["disk"]
        yield GaugeMetricFamily("mediad_disk_used_bytes", "Bytes used on the data dir's filesystem.",
                                value=used)
        yield GaugeMetricFamily("mediad_disk_free_bytes", "Bytes available to mediad on the data dir's "
                                "filesystem.", value=free)


def forget_dead_workers(directory: str) -> None:
    """Drop the live gauges of worker processes that are gone (a worker killed and replaced): what
    mark_process_dead does, for the pids whose live-gauge files outlive them. Their counters and
    histograms stay, as counts since the service started must."""
    pids: set[int] = set()
    for name in os.listdir(directory):
        if name.startswith("gauge_live") and name.endswith(".db"):
            number = name.rsplit("_", 1)[-1].removesuffix(".db")
            if number.isdigit():
                pids.add(int(number))
    for pid in pids:
        if not _alive(pid):
            multiprocess.mark_process_dead(pid, directory)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


class TelemetryMiddleware:
    """One wrapper per HTTP request feeds both records of it: the access log line (method, path,
    status, bytes in and out, duration, request id, also sent back as X-Request-Id) and the
    Prometheus series (requests and durations by route template, the file bytes that upload and
    download routes move, uploads in flight)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics
        # (route, method, status) → its counter and histogram children: labels() is the costly part
        # of recording, and the set of keys is bounded by the routes.
        self._series: dict[tuple[str, str, int], tuple[Any, Any]] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        exchange = _Exchange(self.metrics, scope, receive, send)
        try:
            await self.app(scope, exchange.receive, exchange.send)
        except BaseException:
            exchange.status = exchange.status or 500  # ServerErrorMiddleware answers 500 outside us
            raise
        finally:
            self._record(exchange)

    def _record(self, exchange: _Exchange) -> None:
        if exchange.upload:
            self.metrics.uploads_in_flight.dec()
        duration = time.perf_counter() - exchange.started
        scope, status = exchange.scope, exchange.status
        key = (route_template(scope), exchange.method, status)
        series = self._series.get(key)
        if series is None:
            series = self._series[key] = (self.metrics.requests.labels(key[0], key[1], str(status)),
                                          self.metrics.duration.labels(key[0], key[1]))
        series[0].inc()
        series[1].observe(duration)
        logs.log_access(scope["method"], scope["path"], status, exchange.bytes_in, exchange.bytes_out,
                        duration, exchange.request_id)


class _Exchange:
    """One request as the middleware sees it: its bound `receive` and `send` count what passes."""

    __slots__ = ("metrics", "scope", "_receive", "_send", "started", "request_id", "method", "status",
                 "bytes_in", "bytes_out", "upload", "download", "length")

    def __init__(self, metrics: Metrics, scope: Scope, receive: Receive, send: Send) -> None:
        self.metrics, self.scope, self._receive, self._send = metrics, scope, receive, send
        self.started = time.perf_counter()
        self.request_id = logs.request_id(scope)
        scope["mediad.request_id"] = self.request_id  # for log lines written while handling it
        self.method = scope["method"] if scope["method"] in _METHODS else "other"
        self.status = self.bytes_in = self.bytes_out = self.length = 0
        self.upload: bool | None = None  # decided at the first read of the body, after routing
        self.download = False

    async def receive(self) -> Message:
        if self.upload is None:
            self.upload = _is_upload(self.method, route_template(self.scope))
            if self.upload:
                self.metrics.uploads_in_flight.inc()
        message = await self._receive()
        body = message.get("body")
        if body:
            self.bytes_in += len(body)
            if self.upload:
                self.metrics.uploaded.inc(len(body))
        return message

    async def send(self, message: Message) -> None:
        kind = message["type"]
        if kind == "http.response.body":
            sent = len(message.get("body", b""))
            self.bytes_out += sent
            if self.download and sent:
                self.metrics.downloaded.inc(sent)
        elif kind == "http.response.start":
            self.status = message["status"]
            headers = message["headers"] = [*message.get("headers", ()),
                                            (b"x-request-id", self.request_id.encode())]
            self.download = self.method == "GET" and route_template(self.scope) in _DOWNLOAD_ROUTES
            if self.download:  # Granian may send the file itself (pathsend): count it from here
                self.length = next((int(value) for name, value in headers
                                    if name.lower() == b"content-length" and value.isdigit()), 0)
        elif kind == "http.response.pathsend":
            self.bytes_out += self.length
            if self.download:
                self.metrics.downloaded.inc(self.length)
        await self._send(message)


async def metrics_endpoint(request: Request) -> Response:
    """Prometheus text format (or OpenMetrics when the scraper asks for it)."""
    state = request.app.state
    metrics: Metrics = state.metrics
    await metrics.refresh(state.reader, state.storage)
    encoder, content_type = choose_encoder(request.headers.get("accept", ""))
    return Response(encoder(metrics.exposed), media_type=content_type,
                    headers={"Cache-Control": "no-store"})

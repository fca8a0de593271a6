"""Webhook delivery: the worker that drains the outbox `mediad/webhooks.py` writes.

The outbox row is the source of truth (status, attempts, next attempt, lease). A worker claims
due rows with one conditional UPDATE, as replication does, so several processes on one database
make each attempt once; it wakes on the NOTIFY that an emitting transaction sends at commit (on
every node), after a failed attempt's backoff, and on a slow poll as the fallback.

A slow or dead endpoint holds at most `_PER_ENDPOINT` of the `webhook_concurrency` slots, and an
attempt at most 10 s: uploads and other users' deliveries never wait for it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
import uuid
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import anyio
import httpx
import sqlalchemy as sa
from anyio.abc import TaskGroup
from sqlalchemy.engine import Row
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool

from . import __version__, webhooks
from .cloud import retry_delay
from .config import Settings
from .errors import Unprocessable

log = logging.getLogger("mediad.webhooks")

TIMEOUT_S = 10.0  # any 2xx within this is a success (the contract)
MAX_RESPONSE_BYTES = 64 * 1024  # of an error answer, read for last_error; the rest is never read
_PER_ENDPOINT = 8
_LEASE_S = 3 * TIMEOUT_S  # an attempt is bounded by TIMEOUT_S, so a live worker's claim never lapses
_RETRY_BASE_S = 5.0  # first retry within 5 s (2.5–5 s with jitter), then doubling...
_RETRY_CAP_S = 600.0  # ...to at most 10 minutes between attempts
_BATCH = 2000  # due rows looked at per claim
_COALESCE_S = 0.005
_KEEP_S = 7 * 86400  # finished deliveries stay visible in GET /webhooks/{id}/deliveries this long
_PRUNE_EVERY_S = 600.0

# Due rows, at most _PER_ENDPOINT in flight per endpoint counting this process's own (the
# busy_* arrays), oldest first. The batch skips the endpoints already at their cap (full_ids):
# one endpoint's backlog of old due rows would otherwise fill it, be dropped by the cap, and
# leave every other endpoint unclaimed. The outer WHERE is re-checked on a row another process
# updated meanwhile, so of two concurrent claims only one wins it.
_CLAIM = sa.text(
    "UPDATE webhook_deliveries d SET lease_until = now() + make_interval(secs => :lease)"
    " FROM (SELECT id FROM ("
    "   SELECT due.id, due.next_attempt_at,"
    "     row_number() OVER (PARTITION BY due.endpoint_id ORDER BY due.next_attempt_at) + coalesce(f.n, 0) AS n"
    "   FROM (SELECT id, endpoint_id, next_attempt_at FROM webhook_deliveries"
    "     WHERE status = 'retrying' AND next_attempt_at <= now() AND (lease_until IS NULL OR lease_until < now())"
    "       AND endpoint_id <> ALL(CAST(:full_ids AS uuid[]))"
    "     ORDER BY next_attempt_at LIMIT :batch) due"
    "   LEFT JOIN unnest(CAST(:busy_ids AS uuid[]), CAST(:busy_counts AS int[])) AS f(endpoint_id, n)"
    "     ON f.endpoint_id = due.endpoint_id) ranked"
    "  WHERE n <= :per_endpoint ORDER BY next_attempt_at LIMIT :limit) picked, webhook_endpoints e"
    " WHERE d.id = picked.id AND e.id = d.endpoint_id AND d.status = 'retrying'"
    "   AND (d.lease_until IS NULL OR d.lease_until < now())"
    " RETURNING d.id, d.endpoint_id, d.event_id, d.body, d.attempts, e.url, e.secret")

_DELIVERED = sa.text(
    "UPDATE webhook_deliveries SET status = 'delivered', attempts = attempts + 1, delivered_at = now(),"
    " last_status_code = :code, last_error = NULL, lease_until = NULL WHERE id = :id")

# After the window (counted from the event), the last attempt's failure is final.
_FAILED = sa.text(
    "UPDATE webhook_deliveries SET attempts = attempts + 1, last_status_code = :code, last_error = :error,"
    " lease_until = NULL,"
    " status = CASE WHEN now() >= created_at + make_interval(secs => :window) THEN 'failed' ELSE 'retrying' END,"
    " next_attempt_at = least(now() + make_interval(secs => :delay), created_at + make_interval(secs => :window))"
    " WHERE id = :id RETURNING status, extract(epoch FROM next_attempt_at - now()) AS wait_s")

_RELEASE = sa.text("UPDATE webhook_deliveries SET lease_until = NULL WHERE id = :id AND status = 'retrying'")

_PRUNE = sa.text("DELETE FROM webhook_deliveries WHERE status <> 'retrying'"
                 " AND created_at < now() - make_interval(secs => :keep)")


class Deliverer:
    """Claims due deliveries and POSTs them, signed, to their endpoints."""

    def __init__(self, engine: AsyncEngine, http: httpx.AsyncClient, settings: Settings, server_key: bytes,
                 metrics: Any) -> None:
        self.engine = engine
        # Every statement here is a single one: no BEGIN/COMMIT round trips around it.
        self.db = engine.execution_options(isolation_level="AUTOCOMMIT")
        self.http = http
        self.settings = settings
        self.key = webhooks.secrets_key(server_key)
        self.metrics = metrics
        self._wake = asyncio.Event()
        self._more_due = False  # a freed slot should claim again (see _dispatch)
        self._in_flight: collections.Counter[uuid.UUID] = collections.Counter()

    @staticmethod
    def client(settings: Settings) -> httpx.AsyncClient:
        """The HTTP client for deliveries. Requests go to a checked IP address with the URL's host
        as Host (and TLS server name), so connections are pooled per address: fine for http://,
        where Host picks the site per request, but an https:// connection is bound to the name
        it was opened for, so those are never kept for another request. No proxies from the
        environment: a proxy would connect to an address nobody checked."""
        size = settings.webhook_concurrency
        return httpx.AsyncClient(
            follow_redirects=False, trust_env=False, timeout=httpx.Timeout(TIMEOUT_S), mounts={
                "http://": httpx.AsyncHTTPTransport(limits=httpx.Limits(max_connections=size)),
                "https://": httpx.AsyncHTTPTransport(limits=httpx.Limits(
                    max_connections=size, max_keepalive_connections=0))})

    def wake(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        async with anyio.create_task_group() as group:
            group.start_soon(self._listen)
            group.start_soon(self._prune)
            await self._dispatch(group)

    # ---- claiming ---------------------------------------------------------------------------

    async def _dispatch(self, group: TaskGroup) -> None:
        while True:
            self._wake.clear()
            free = self.settings.webhook_concurrency - sum(self._in_flight.values())
            claimed: list[Row[Any]] = []
            if free > 0:
                try:
                    claimed = await self._claim(free)
                except Exception as exc:  # the database may be down; the next wake-up tries again
                    log.warning("webhook claim failed: %s", exc.__class__.__name__, extra={"error": str(exc)[:300]})
            # A freed slot should look again if this claim found work, or if an endpoint at its
            # cap may have left due rows behind.
            self._more_due = bool(claimed) or any(n >= _PER_ENDPOINT for n in self._in_flight.values())
            for row in claimed:
                self._in_flight[row.endpoint_id] += 1
                group.start_soon(self._deliver, row)
            # An endpoint this claim brought to its cap may have filled the batch with its own
            # rows and hidden other endpoints' behind them; the next claim skips it.
            capped = any(self._in_flight[row.endpoint_id] >= _PER_ENDPOINT for row in claimed)
            if claimed and (len(claimed) == free or capped):
                continue  # there may be more due right now
            with anyio.move_on_after(self.settings.webhook_poll_s):
                await self._wake.wait()
            # Wake-ups come in bursts (a NOTIFY per commit, a freed slot per attempt): one claim
            # serves a burst.
            await anyio.sleep(_COALESCE_S)

    async def _claim(self, limit: int) -> list[Row[Any]]:
        busy = {endpoint: n for endpoint, n in self._in_flight.items() if n > 0}
        async with self.db.connect() as conn:
            result = await conn.execute(_CLAIM, {
                "lease": _LEASE_S, "batch": _BATCH, "per_endpoint": _PER_ENDPOINT, "limit": limit,
                "busy_ids": list(busy), "busy_counts": list(busy.values()),
                "full_ids": [endpoint for endpoint, n in busy.items() if n >= _PER_ENDPOINT]})
            return list(result.all())

    # ---- one attempt ------------------------------------------------------------------------

    async def _deliver(self, row: Row[Any]) -> None:
        """One attempt and its outcome. Never raises (but for cancellation): a task that did
        would end the whole worker. What it could not record is retried once the lease lapses."""
        try:
            code, error = await self.attempt(row)
            await self._record(row, code, error)
        except Exception as exc:  # the database went away mid-way, most likely
            log.warning("webhook delivery %s: %s", row.id, exc.__class__.__name__, extra={"error": str(exc)[:300]})
        except BaseException:
            # Shutting down: hand the claim back now rather than when the lease lapses.
            with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
                async with self.db.connect() as conn:
                    await conn.execute(_RELEASE, {"id": row.id})
            raise
        finally:
            self._in_flight[row.endpoint_id] -= 1
            if self._in_flight[row.endpoint_id] <= 0:
                del self._in_flight[row.endpoint_id]
            if self._more_due:
                self._wake.set()  # a slot is free for what the last claim may have left

    async def _record(self, row: Row[Any], code: int | None, error: str | None) -> None:
        async with self.db.connect() as conn:
            if error is None:
                await conn.execute(_DELIVERED, {"id": row.id, "code": code})
                self.metrics.webhook_deliveries.labels("delivered").inc()
                return
            # retry_delay(attempts) is base·2^attempts: attempt 1's retry is base·2^0.
            delay = retry_delay(row.attempts, _RETRY_BASE_S, _RETRY_CAP_S)
            outcome = (await conn.execute(_FAILED, {
                "id": row.id, "code": code, "error": error[:1000], "delay": delay,
                "window": self.settings.webhook_retry_s})).first()
        if outcome is None:
            return  # the endpoint was removed meanwhile, and its deliveries with it
        if outcome.status == "failed":
            self.metrics.webhook_deliveries.labels("failed").inc()
            log.warning("webhook delivery %s failed for good: %s", row.id, error)
        else:
            self.metrics.webhook_deliveries.labels("retried").inc()
            asyncio.get_running_loop().call_later(max(0.0, float(outcome.wait_s)), self._wake.set)

    async def attempt(self, row: Row[Any]) -> tuple[int | None, str | None]:
        """POST the delivery once: (status code or None, None on success else why not)."""
        secret = webhooks.unseal(self.key, row.endpoint_id, row.secret)
        if secret is None:
            return None, ("this server cannot read the endpoint's secret: MEDIAD_SECRET_KEY differs "
                          "between nodes, or was changed since the webhook was created")
        url = urlsplit(row.url)
        deadline = time.monotonic() + TIMEOUT_S
        try:
            with anyio.fail_after(TIMEOUT_S):
                addresses = await webhooks.resolve(url, self.settings.webhook_allow_private)
                response = await self._send(row, secret, url, addresses)
        except Unprocessable as exc:
            return None, exc.detail
        except TimeoutError:
            return None, f"no answer within {TIMEOUT_S:.0f} s"
        except httpx.HTTPError as exc:
            return None, f"{exc.__class__.__name__}: {exc}"[:500] or exc.__class__.__name__
        try:
            if 200 <= response.status_code < 300:
                return response.status_code, None
            text = await _head_of(response, deadline)
            return response.status_code, f"the endpoint answered {response.status_code}" + (
                f": {text[:200]}" if text else "")
        finally:
            await response.aclose()  # unread bytes are dropped with the connection

    async def _send(self, row: Row[Any], secret: str, url: Any, addresses: list[webhooks.IPAddress]
                    ) -> httpx.Response:
        """To the first checked address that takes the connection (a host may have an IPv6 and an
        IPv4 address, and listen on one only)."""
        for address in addresses[:-1]:
            try:
                return await self.http.send(self._request(row, secret, url, address), stream=True)
            except httpx.ConnectError:
                continue
        return await self.http.send(self._request(row, secret, url, addresses[-1]), stream=True)

    def _request(self, row: Row[Any], secret: str, url: Any, address: webhooks.IPAddress) -> httpx.Request:
        """The request to the checked `address` (never a second DNS lookup), with the URL's host as
        Host and, for https, as the TLS server name the certificate is checked against."""
        port = url.port or (443 if url.scheme == "https" else 80)
        host = f"[{address}]" if address.version == 6 else str(address)
        target = urlunsplit((url.scheme, f"{host}:{port}", url.path or "/", url.query, ""))
        body = row.body.encode("utf-8")
        message_id, timestamp = str(row.event_id), int(time.time())
        headers = {"Host": url.netloc, "Content-Type": "application/json", "User-Agent": f"mediad/{__version__}",
                   "webhook-id": message_id, "webhook-timestamp": str(timestamp),
                   "webhook-signature": webhooks.signature(secret, message_id, timestamp, body)}
        extensions = {"sni_hostname": url.hostname} if url.scheme == "https" else {}
        return self.http.build_request("POST", target, content=body, headers=headers, extensions=extensions)

    # ---- wake-ups and housekeeping ----------------------------------------------------------

    async def _listen(self) -> None:
        """LISTEN on a connection of its own, outside the request pool (a pooled one would be
        held forever, and recycling it would silently stop the listening); when it drops, poll
        until it is back."""
        listener = create_async_engine(self.engine.url, poolclass=NullPool, connect_args={"timeout": 5})
        try:
            while True:
                try:
                    async with listener.connect() as conn:
                        raw = (await conn.get_raw_connection()).driver_connection
                        assert raw is not None
                        lost = asyncio.Event()
                        await raw.add_listener(webhooks.CHANNEL, lambda *_: self._wake.set())
                        raw.add_termination_listener(lambda _, lost=lost: lost.set())
                        self._wake.set()  # whatever was emitted while nobody listened
                        await lost.wait()
                except Exception as exc:
                    log.warning("webhook listener: %s", exc.__class__.__name__, extra={"error": str(exc)[:300]})
                await anyio.sleep(self.settings.webhook_poll_s)
        finally:
            with anyio.CancelScope(shield=True):
                await listener.dispose()

    async def _prune(self) -> None:
        while True:
            await anyio.sleep(_PRUNE_EVERY_S)
            try:
                async with self.engine.begin() as conn:
                    await conn.execute(_PRUNE, {"keep": _KEEP_S})
            except Exception as exc:
                log.warning("webhook prune: %s", exc.__class__.__name__, extra={"error": str(exc)[:300]})


async def _head_of(response: httpx.Response, deadline: float) -> str:
    """At most MAX_RESPONSE_BYTES of the body, within the attempt's deadline; then stop reading."""
    received = bytearray()
    with anyio.move_on_after(max(0.0, deadline - time.monotonic())):
        with contextlib.suppress(httpx.HTTPError):
            async for chunk in response.aiter_raw():
                received += chunk
                if len(received) >= MAX_RESPONSE_BYTES:
                    break
    return bytes(received[:MAX_RESPONSE_BYTES]).decode("utf-8", errors="replace").strip()

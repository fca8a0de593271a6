"""Cloud replication: a durable queue of streamed uploads to an object store, and reads back.

The database row is the source of truth (state, attempts, next attempt, lease); the in-process
asyncio queue is only the fast path. A poller re-enqueues due rows, so a crash or restart never
loses a pending copy, and a lease claimed with one conditional UPDATE makes several processes on
one database push each file exactly once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Protocol

import anyio
import httpx
from sqlalchemy.ext.asyncio import AsyncEngine

from . import db, webhooks
from .config import Settings
from .storage import Storage

log = logging.getLogger("mediad.cloud")

_CHUNK = 1 << 20
_POLL_BATCH = 200


def cloud_key(blob_id: uuid.UUID) -> str:
    """Objects are keyed by content version, so a late push of old content never overwrites new."""
    return f"blobs/{blob_id.hex}"


def retry_delay(attempts: int, base_s: float, cap_s: float, rng: random.Random | None = None) -> float:
    """Exponential backoff with jitter: base·2^attempts, capped, scaled by a random 0.5–1.0."""
    ceiling = min(cap_s, base_s * (2 ** min(attempts, 30)))
    return ceiling * (rng or random).uniform(0.5, 1.0)


class CloudError(Exception):
    """A cloud request failed, or the cloud's copy does not match ours."""


async def _file_chunks(path: Path, size: int) -> AsyncIterator[bytes]:
    fd = await anyio.to_thread.run_sync(os.open, path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        offset = 0
        while offset < size:
            chunk = await anyio.to_thread.run_sync(os.pread, fd, min(_CHUNK, size - offset), offset)
            if not chunk:
                raise CloudError(f"{path.name} is shorter than its recorded size")
            offset += len(chunk)
            yield chunk
    finally:
        os.close(fd)


async def ranged_body(response: httpx.Response, key: str, start: int, end: int) -> AsyncIterator[bytes]:
    """Bytes [start, end) of a ranged GET's open response; CloudError rather than a short body."""
    if response.status_code == 200 and start > 0:
        raise CloudError(f"GET {key}: the store ignored the range")
    received = 0
    async for chunk in response.aiter_raw(_CHUNK):
        chunk = chunk[: end - start - received]
        received += len(chunk)
        yield chunk
        if received >= end - start:
            break
    if received != end - start:
        raise CloudError(f"GET {key}: the store sent {received} of {end - start} bytes")


class Store(Protocol):
    """What replication and read-through need of an object store (mock cloud API, or S3)."""

    async def put(self, key: str, path: Path, size: int, sha256: str) -> str:
        """Stream the file up; return the sha256 of what the store now holds (verified)."""

    async def delete(self, key: str) -> None:
        """Remove the object; absent is fine."""

    def read(self, key: str, start: int, end: int) -> AsyncIterator[bytes]:
        """Bytes [start, end), streamed; raise CloudError rather than end short."""

    async def ping(self) -> float:
        """Seconds for one round trip."""


class ObjectStore:
    """Client of the object store API of the contract (`mediad mock-cloud` speaks it)."""

    def __init__(self, http: httpx.AsyncClient, base_url: str, token: str | None) -> None:
        self.http = http
        self.base_url = base_url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}

    def _url(self, key: str) -> str:
        return f"{self.base_url}/objects/{key}"

    async def put(self, key: str, path: Path, size: int, sha256: str) -> str:
        """Stream the file up; returns the sha256 the store computed."""
        headers = {**self.headers, "Content-Length": str(size), "x-content-sha256": sha256,
                   "Content-Type": "application/octet-stream"}
        try:
            response = await self.http.put(self._url(key), content=_file_chunks(path, size), headers=headers)
        except httpx.HTTPError as exc:
            raise CloudError(f"PUT {key}: {exc.__class__.__name__}: {exc}") from exc
        if response.status_code not in (200, 201):
            raise CloudError(f"PUT {key}: the cloud answered {response.status_code}")
        try:
            reported = response.json()["sha256"]
        except (ValueError, KeyError, TypeError):
            raise CloudError(f"PUT {key}: the cloud's answer has no sha256") from None
        return str(reported)

    async def delete(self, key: str) -> None:
        try:
            response = await self.http.delete(self._url(key), headers=self.headers)
        except httpx.HTTPError as exc:
            raise CloudError(f"DELETE {key}: {exc.__class__.__name__}: {exc}") from exc
        if response.status_code not in (200, 204, 404):
            raise CloudError(f"DELETE {key}: the cloud answered {response.status_code}")

    async def read(self, key: str, start: int, end: int) -> AsyncIterator[bytes]:
        """Bytes [start, end) of an object, streamed; raises CloudError rather than end short."""
        if start >= end:
            return
        headers = {**self.headers, "Range": f"bytes={start}-{end - 1}"}
        try:
            async with self.http.stream("GET", self._url(key), headers=headers) as response:
                if response.status_code not in (200, 206):
                    raise CloudError(f"GET {key}: the cloud answered {response.status_code}")
                async for chunk in ranged_body(response, key, start, end):
                    yield chunk
        except httpx.HTTPError as exc:
            raise CloudError(f"GET {key}: {exc.__class__.__name__}: {exc}") from exc

    async def ping(self) -> float:
        started = time.perf_counter()
        try:
            response = await self.http.get(f"{self.base_url}/health", timeout=5)
        except httpx.HTTPError as exc:
            raise CloudError(f"ping: {exc.__class__.__name__}") from exc
        if response.status_code != 200:
            raise CloudError(f"ping: the cloud answered {response.status_code}")
        return time.perf_counter() - started


class Replicator:
    """Workers pushing committed files to the store, and a poller that keeps the queue honest."""

    def __init__(self, engine: AsyncEngine, storage: Storage, store: Store, settings: Settings,
                 on_push_failure: Callable[[], object] = lambda: None) -> None:
        self.engine = engine
        self.storage = storage
        self.store = store
        self.settings = settings
        self.queue: asyncio.Queue[uuid.UUID] = asyncio.Queue()
        self._queued: set[uuid.UUID] = set()
        self._deletions_due = asyncio.Event()
        assert storage.node_id is not None, "storage.prepare() first"
        self.node = storage.node_id
        self.on_push_failure = on_push_failure  # counted by GET /metrics, summed over workers

    def enqueue(self, file_id: uuid.UUID) -> None:
        if file_id not in self._queued:
            self._queued.add(file_id)
            self.queue.put_nowait(file_id)

    def deletions_queued(self) -> None:
        self._deletions_due.set()

    async def run(self) -> None:
        async with anyio.create_task_group() as group:
            for _ in range(self.settings.cloud_concurrency):
                group.start_soon(self._push_worker)
            group.start_soon(self._poll_pushes)
            group.start_soon(self._delete_loop)

    async def _poll_pushes(self) -> None:
        while True:
            try:
                async with self.engine.connect() as conn:
                    due = await db.due_pushes(conn, self.node, _POLL_BATCH)
                for file_id in due:
                    self.enqueue(file_id)
            except Exception as exc:  # the database may be down; the next poll tries again
                log.warning("replication poll failed: %s", exc.__class__.__name__, extra={"error": str(exc)[:300]})
            await anyio.sleep(self.settings.cloud_poll_s)

    async def _push_worker(self) -> None:
        while True:
            file_id = await self.queue.get()
            self._queued.discard(file_id)
            try:
                await self.push(file_id)
            except Exception:
                log.exception("replication of %s failed unexpectedly", file_id)

    async def push(self, file_id: uuid.UUID) -> None:
        settings = self.settings
        async with self.engine.begin() as conn:
            claim = await db.claim_push(conn, file_id, self.node, settings.cloud_lease_s)
        if claim is None:
            return  # not due, already stored, or another worker holds it
        key = cloud_key(claim.blob_id)
        try:
            async with self._lease_kept(file_id, claim.blob_id):
                reported = await self.store.put(key, self.storage.blob_path(claim.blob_id), claim.size,
                                                claim.sha256)
            if reported != claim.sha256:
                raise CloudError(f"PUT {key}: the cloud stored sha256 {reported[:16]}…, ours is {claim.sha256[:16]}…")
        except (CloudError, OSError) as exc:
            self.on_push_failure()
            delay = retry_delay(claim.cloud_attempts, settings.cloud_retry_base_s, settings.cloud_retry_cap_s)
            log.warning("push of %s failed (attempt %d), retrying in %.1fs: %s", file_id,
                        claim.cloud_attempts + 1, delay, exc)
            async with self.engine.begin() as conn:
                await db.fail_push(conn, file_id, claim.blob_id, str(exc), delay, settings.cloud_max_attempts)
            asyncio.get_running_loop().call_later(delay, self.enqueue, file_id)
            return
        except BaseException:
            # Shutting down mid-push: hand the row back now instead of when the lease lapses.
            with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
                async with self.engine.begin() as conn:
                    await db.release_push(conn, file_id, claim.blob_id)
            raise
        async with self.engine.begin() as conn:
            if not await db.finish_push(conn, file_id, claim.blob_id):
                # Replaced or deleted while we pushed: the object we wrote is nobody's now.
                await db.queue_deletion(conn, key)
                self.deletions_queued()
            await webhooks.emit_file_by_id(conn, "file.stored", file_id, claim.blob_id, self.node)
        log.info("stored %s in the cloud", file_id, extra={"file_id": str(file_id), "bytes": claim.size})

    @contextlib.asynccontextmanager
    async def _lease_kept(self, file_id: uuid.UUID, blob_id: uuid.UUID) -> AsyncIterator[None]:
        """Renew the lease while a long push runs, so no other process takes the row over."""
        lease = self.settings.cloud_lease_s

        async def renew() -> None:
            while True:
                await anyio.sleep(lease / 3)
                with contextlib.suppress(Exception):
                    async with self.engine.begin() as conn:
                        await db.renew_push(conn, file_id, blob_id, lease)

        renewal = asyncio.create_task(renew())
        try:
            yield
        finally:
            renewal.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await renewal

    async def _delete_loop(self) -> None:
        while True:
            with anyio.move_on_after(self.settings.cloud_poll_s):
                await self._deletions_due.wait()
            self._deletions_due.clear()
            try:
                async with self.engine.connect() as conn:
                    keys = await db.due_deletions(conn, _POLL_BATCH)
                for key in keys:
                    await self._delete(key)
            except Exception as exc:
                log.warning("cloud deletion pass failed: %s", exc.__class__.__name__,
                            extra={"error": str(exc)[:300]})

    async def _delete(self, key: str) -> None:
        """One due deletion, retried with the pushes' backoff when the store refuses. It never gives
        up: an object left behind would keep content its owner deleted; past the pushes' attempt
        limit every failure is logged as an error."""
        settings = self.settings
        async with self.engine.begin() as conn:
            claim = await db.claim_deletion(conn, key, settings.cloud_lease_s)
        if claim is None:
            return
        attempts = claim.attempts
        try:
            await self.store.delete(key)
        except CloudError as exc:
            delay = retry_delay(attempts, settings.cloud_retry_base_s, settings.cloud_retry_cap_s)
            level = logging.ERROR if attempts + 1 >= settings.cloud_max_attempts else logging.WARNING
            log.log(level, "cloud deletion of %s failed (attempt %d), retrying in %.1fs: %s", key,
                    attempts + 1, delay, exc)
            async with self.engine.begin() as conn:
                await db.fail_deletion(conn, key, claim.generation, str(exc), delay)
            return
        # A no-op when a late push queued the key again meanwhile: its object may postdate this
        # DELETE, so the row stays for the next pass.
        async with self.engine.begin() as conn:
            await db.finish_deletion(conn, key, claim.generation)

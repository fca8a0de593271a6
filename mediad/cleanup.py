"""Local disk cleanup: evict what the cloud holds, sweep leftovers, and never lose a file.

One pass (`sweep`) serves both the lifespan loop and `mediad cleanup --once`. Eviction only ever
touches Files whose cloud copy is `stored` (verified by sha256 when pushed); everything else stays,
whatever the disk pressure.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from . import db, webhooks
from .config import Settings
from .errors import DATABASE_UNAVAILABLE
from .storage import DiskUsage, Storage

log = logging.getLogger("mediad.cleanup")

_ADVISORY_LOCK = 0x6D65646961640001  # "mediad" + 1: one cleanup pass per database at a time
_LOW_WATER_GAP = 0.10


@dataclass
class Report:
    dry_run: bool = False
    skipped: str | None = None  # why no pass ran (another one holds the lock)
    evicted_files: int = 0
    evicted_bytes: int = 0
    temp_removed: int = 0
    orphans_removed: int = 0
    uploads_removed: int = 0  # expired tus uploads and stray partial files
    missing: list[str] = field(default_factory=list)  # data loss: no local file, no cloud copy
    disk_used_fraction: float = 0.0
    pressure_unrelieved: bool = False
    actions: list[str] = field(default_factory=list)  # what a dry run would do

    def summary(self) -> dict[str, Any]:
        data = asdict(self)
        data["missing"] = len(self.missing)
        data.pop("actions")
        return data


def bytes_to_free(usage: DiskUsage, high_water: float) -> int:
    """Bytes to evict to get from above `high_water` to the low-water mark (high − 0.10); 0 if not above."""
    if usage.used_fraction <= high_water:
        return 0
    target_used = max(high_water - _LOW_WATER_GAP, 0.0) * usage.total
    return int((usage.total - usage.free) - target_used) + 1


class AccessTracker:
    """Coalesces last-access times in memory; one UPDATE per flush instead of one per request."""

    def __init__(self) -> None:
        self._seen: dict[uuid.UUID, datetime] = {}

    def touch(self, file_id: uuid.UUID) -> None:
        self._seen[file_id] = datetime.now(UTC)

    async def flush(self, engine: AsyncEngine) -> None:
        if not self._seen:
            return
        seen, self._seen = self._seen, {}
        try:
            async with engine.begin() as conn:
                await db.record_access(conn, seen)
        except Exception:
            for file_id, moment in seen.items():  # keep them for the next flush
                self._seen.setdefault(file_id, moment)
            raise


@contextlib.contextmanager
def _data_dir_lock(storage: Storage) -> Iterator[bool]:
    """flock on the data dir: processes sharing it run one pass at a time."""
    fd = os.open(storage.root / "cleanup.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)


@contextlib.asynccontextmanager
async def _database_lock(engine: AsyncEngine) -> AsyncIterator[bool]:
    async with engine.connect() as conn:
        got = (await conn.execute(sa.select(sa.func.pg_try_advisory_lock(_ADVISORY_LOCK)))).scalar_one()
        await conn.commit()
        try:
            yield bool(got)
        finally:
            if got:
                await conn.execute(sa.select(sa.func.pg_advisory_unlock(_ADVISORY_LOCK)))
                await conn.commit()


async def sweep(engine: AsyncEngine, storage: Storage, settings: Settings, *, dry_run: bool = False,
                now: datetime | None = None, usage: DiskUsage | None = None) -> Report:
    """One cleanup pass. `now` and `usage` exist for tests (a controllable clock and disk)."""
    report = Report(dry_run=dry_run)
    with _data_dir_lock(storage) as mine:
        if not mine:
            report.skipped = "another cleanup pass holds this data dir"
            return report
        async with _database_lock(engine) as ours:
            if not ours:
                report.skipped = "another process runs a cleanup pass on this database"
                return report
            await _pass(engine, storage, settings, report, now or datetime.now(UTC), usage)
    level = logging.ERROR if report.missing or report.pressure_unrelieved else logging.INFO
    log.log(level, "cleanup pass%s: evicted %d files (%d bytes), removed %d temp and %d orphan files, "
            "%d missing", " (dry run)" if dry_run else "", report.evicted_files, report.evicted_bytes,
            report.temp_removed, report.orphans_removed, len(report.missing), extra=report.summary())
    return report


async def _pass(engine: AsyncEngine, storage: Storage, settings: Settings, report: Report,
                now: datetime, usage: DiskUsage | None) -> None:
    assert storage.node_id is not None, "storage.prepare() first"
    evicted = await _evict_stale(engine, storage, report, now - timedelta(seconds=settings.local_ttl_s))
    await _relieve_pressure(engine, storage, settings, report, evicted, usage)
    actions = await sweep_uploads(engine, storage, dry_run=report.dry_run,
                                  older_than=time.time() - settings.cleanup_grace_s)
    report.uploads_removed = len(actions)
    report.actions.extend(actions)
    await _sweep_leftovers(engine, storage, report, older_than=time.time() - settings.cleanup_grace_s)


async def _evict_stale(engine: AsyncEngine, storage: Storage, report: Report, accessed_before: datetime
                       ) -> set[uuid.UUID]:
    """Local copies not read since `accessed_before`, once the cloud holds them; → their ids."""
    assert storage.node_id is not None
    async with engine.connect() as conn:
        stale = await db.evictable(conn, storage.node_id, accessed_before=accessed_before)
    return {row.id for row in stale if await _evict(engine, storage, row, report)}


async def _relieve_pressure(engine: AsyncEngine, storage: Storage, settings: Settings, report: Report,
                            evicted: set[uuid.UUID], usage: DiskUsage | None) -> None:
    """Over the high-water mark: least recently accessed first, down to the low-water mark."""
    assert storage.node_id is not None
    if usage is None:
        usage = await anyio.to_thread.run_sync(storage.usage)
    report.disk_used_fraction = round(usage.used_fraction, 4)
    wanted = bytes_to_free(usage, settings.disk_high_water)
    if wanted <= 0:
        return
    async with engine.connect() as conn:
        candidates = await db.evictable(conn, storage.node_id)
    freed = 0
    for row in candidates:
        if freed >= wanted:
            break
        if row.id not in evicted and await _evict(engine, storage, row, report):
            freed += row.size
    if freed < wanted:
        report.pressure_unrelieved = True
        log.error("disk is %.0f%% full and only %d of %d bytes could be evicted: the rest is not "
                  "in the cloud yet", usage.used_fraction * 100, freed, wanted)


async def _sweep_leftovers(engine: AsyncEngine, storage: Storage, report: Report, *, older_than: float) -> None:
    """Temp files and blobs no row owns (last written before `older_than`), and rows whose bytes
    are gone: marked evicted when the cloud has them, reported as lost when not."""
    node = storage.node_id
    assert node is not None
    async with engine.connect() as conn:
        rows = await db.local_state(conn, node)
    temps, orphans, present = await anyio.to_thread.run_sync(
        _scan_disk, storage, {r.blob_id for r in rows}, older_than)
    doomed = [*temps, *orphans]
    report.temp_removed += len(temps)
    report.orphans_removed += len(orphans)
    report.actions.extend(f"remove abandoned temp file {os.path.basename(path)}" for path in temps)
    report.actions.extend(f"remove orphan blob {os.path.basename(path)}" for path in orphans)
    for row in rows:
        on_disk = row.blob_id in present
        if row.node == node and not on_disk:
            await _lost_bytes(engine, storage, row, report)
        elif row.node is None and on_disk:
            # An eviction interrupted between its UPDATE and its unlink: finish it.
            report.actions.append(f"finish eviction of {row.id}")
            doomed.append(str(storage.blob_path(row.blob_id)))
    if not report.dry_run:
        await anyio.to_thread.run_sync(_remove_all, doomed)


async def _lost_bytes(engine: AsyncEngine, storage: Storage, seen: Any, report: Report) -> None:
    """A row of this node, as read before the scan, whose blob the scan did not find on its disk."""
    assert storage.node_id is not None
    # The scan can take long on a big disk: a file deleted or replaced since the row was read is
    # no loss (its old bytes went with it), and a push may have finished, so decide on the row now.
    async with engine.connect() as conn:
        row = await db.local_state_of(conn, seen.id, seen.blob_id)
    if row is None or row.node != storage.node_id:
        return
    if row.cloud_state == "stored":
        report.actions.append(f"mark {row.id} as not local (its file is gone, the cloud has it)")
        if not report.dry_run:
            async with engine.begin() as conn:
                await db.mark_evicted(conn, row.id, row.blob_id, storage.node_id)
    else:
        report.missing.append(str(row.id))
        log.error("DATA LOSS: file %s has no local bytes and no cloud copy", row.id,
                  extra={"file_id": str(row.id), "blob_id": str(row.blob_id)})


async def _evict(engine: AsyncEngine, storage: Storage, row: Any, report: Report) -> bool:
    """Row first (only if still stored and unchanged), then the bytes: a download that already
    opened the file keeps its inode; one that has not re-reads the row and goes to the cloud."""
    assert storage.node_id is not None
    report.actions.append(f"evict {row.id} ({row.size} bytes)")
    if report.dry_run:
        report.evicted_files += 1
        report.evicted_bytes += row.size
        return True
    async with engine.begin() as conn:
        if not await db.mark_evicted(conn, row.id, row.blob_id, storage.node_id):
            return False  # replaced, deleted or no longer stored meanwhile
        await webhooks.emit_file_by_id(conn, "file.evicted", row.id, row.blob_id, storage.node_id)
    await anyio.to_thread.run_sync(storage.remove_blob, row.blob_id)
    report.evicted_files += 1
    report.evicted_bytes += row.size
    return True


def _remove_all(paths: list[str]) -> None:
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def _scan_disk(storage: Storage, known: set[uuid.UUID], older_than: float
               ) -> tuple[list[str], list[str], set[uuid.UUID]]:
    """(old temp files, old blobs no row owns, blob ids present on disk)."""
    temps = []
    for entry in os.scandir(storage.tmp_dir):
        if entry.name.endswith(".part") and entry.stat().st_mtime < older_than:
            temps.append(entry.path)
    orphans, present = [], set()
    for directory, _, names in os.walk(storage.root / "files"):
        for name in names:
            try:
                blob_id = uuid.UUID(hex=name)
            except ValueError:
                continue
            path = os.path.join(directory, name)
            if blob_id in known:
                present.add(blob_id)
            elif os.stat(path).st_mtime < older_than:
                orphans.append(path)
    return temps, orphans, present


# ---- resumable uploads ----------------------------------------------------------------------------

async def sweep_uploads(engine: AsyncEngine, storage: Storage, *, dry_run: bool, older_than: float) -> list[str]:
    """Expired uploads go (rows and partial files); partial files no row owns go after a grace."""
    assert storage.node_id is not None
    async with engine.begin() as conn:
        expired = await db.expired_uploads(conn, storage.node_id)
        if expired and not dry_run:  # announced in the transaction that ends them
            await webhooks.emit_expired_uploads(conn, expired)
            await db.delete_uploads(conn, expired)
        live = await db.unfinished_uploads(conn)
    stray = await anyio.to_thread.run_sync(storage.stray_partials, live | set(expired), older_than)
    actions = [f"remove expired upload {upload_id}" for upload_id in expired]
    actions += [f"remove stray partial file {path.name}" for path in stray]
    if not dry_run:
        await anyio.to_thread.run_sync(_remove_all, [*map(str, map(storage.partial_path, expired)), *map(str, stray)])
    return actions


# ---- start-up and the lifespan's loop -------------------------------------------------------------

async def recover(engine: AsyncEngine, storage: Storage) -> None:
    """The start-up pass of `mediad serve`. When no other live process shares this data dir, what
    is left in flight there is a dead process's: its temp files (uploads cut by the crash; they
    have no row), blobs renamed into place whose row never committed, partial files with no
    upload, the leases on its pushes and the locks of its PATCHes, all released now rather than
    after their grace, lease or lock time. With a live peer none of it can be told apart from the
    peer's own work, so it lapses as usual."""
    if not await anyio.to_thread.run_sync(storage.join):
        return
    try:
        temps = await anyio.to_thread.run_sync(storage.sweep_temp)
        try:
            leases, locks, partials, orphans = await _release_dead_work(engine, storage)
        except Exception as exc:  # the database may be down: leases and locks lapse by themselves
            log.warning("start-up recovery could not reach the database: %s", exc.__class__.__name__,
                        exc_info=not isinstance(exc, DATABASE_UNAVAILABLE))
            leases = locks = partials = orphans = 0
        if temps or leases or locks or partials or orphans:
            log.info("start-up recovery: removed %d temp, %d partial and %d orphan files, released %d "
                     "push leases and %d upload locks", temps, partials, orphans, leases, locks)
    finally:
        await anyio.to_thread.run_sync(storage.share)


async def _release_dead_work(engine: AsyncEngine, storage: Storage) -> tuple[int, int, int, int]:
    """→ (push leases and upload locks released, partial files and orphan blobs removed)."""
    node = storage.node_id
    assert node is not None, "storage.prepare() first"
    async with engine.begin() as conn:
        leases = await db.release_node_pushes(conn, node)
        locks = await db.release_upload_locks(conn, node)
    partials = await sweep_uploads(engine, storage, dry_run=False, older_than=time.time())
    async with engine.connect() as conn:
        known = {row.blob_id for row in await db.local_state(conn, node)}
    # Every blob is older than "in a second": no grace, since no live process can be committing one.
    _, orphans, _ = await anyio.to_thread.run_sync(_scan_disk, storage, known, time.time() + 1)
    if orphans and not known:
        # A database that names none of this data dir's blobs is more likely the wrong database
        # (a changed MEDIAD_DATABASE_URL) than one crash's leftovers: keep them, say so.
        log.warning("start-up recovery: the database names none of the %d blobs in %s; left in place "
                    "(check MEDIAD_DATABASE_URL)", len(orphans), storage.root / "files")
        orphans = []
    await anyio.to_thread.run_sync(_remove_all, orphans)
    return leases, locks, len(partials), len(orphans)


async def cleanup_loop(engine: AsyncEngine, storage: Storage, settings: Settings, tracker: AccessTracker,
                       on_pass: Callable[[Report], None]) -> None:
    """The lifespan's loop: flush access times often, run a pass every cleanup interval, and hand
    each pass's report to `on_pass`. With the interval 0 it only flushes: the passes are another
    process's (`mediad cleanup`), which evicts by the access times this one records."""
    passes = settings.cleanup_interval_s > 0
    next_pass = time.monotonic() + min(settings.cleanup_interval_s, 5.0)
    while True:
        await asyncio.sleep(min(10.0, settings.cleanup_interval_s) if passes else 10.0)
        try:
            await tracker.flush(engine)
            if passes and time.monotonic() >= next_pass:
                next_pass = time.monotonic() + settings.cleanup_interval_s
                report = await sweep(engine, storage, settings)
                if report.skipped is None:
                    on_pass(report)
        except DATABASE_UNAVAILABLE as exc:  # the database is down: try again next time
            log.warning("cleanup loop: %s", exc.__class__.__name__, extra={"error": str(exc)[:300]})
        except Exception:  # a bug, or the disk: say where, and still try again next time
            log.exception("cleanup loop: the pass failed")

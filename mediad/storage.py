"""Local disk: where blobs live, how an upload is written, hashed and made durable.

Disk paths derive from our own ids only (`files/ab/cd/<blob id>`), never from client input.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import fcntl
import hashlib
import os
import queue
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import anyio

from .errors import InsufficientStorage, PayloadTooLarge

_BATCH_BYTES = 1 << 20  # hand the writer thread ~1 MiB at a time: few thread hops per GiB
_QUEUE_DEPTH = 8  # batches in flight: bounds memory per upload at ~8 MiB
_WRITEBACK_EVERY = 32 << 20  # start write-back early so the final fsync is short
_HEAD_BYTES = 8192  # leading bytes kept for format detection
_FREE_CHECK_EVERY = 64 << 20


class _WriterThreads:
    """Daemon threads kept for reuse, one per upload in progress. Thread.start() blocks the event
    loop until the new thread has run, which under load (GIL contention) took ~10 % of the loop's
    time in the soak; a reused thread costs a queue put. Daemon, unlike concurrent.futures' pool,
    whose exit handler would wait for a writer still waiting for its upload's next batch."""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._idle = 0
        self._lock = threading.Lock()

    def submit(self, job: Callable[[], None]) -> None:
        with self._lock:
            reuse = self._idle > 0
            if reuse:
                self._idle -= 1
        self._jobs.put(job)
        if not reuse:
            threading.Thread(target=self._serve, name="mediad-writer", daemon=True).start()

    def _serve(self) -> None:
        while True:
            self._jobs.get()()  # jobs handle their own errors (BlobWriter._run)
            with self._lock:
                self._idle += 1


_WRITERS = _WriterThreads()

_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


@dataclass(frozen=True)
class Blob:
    """A finished temp file: every byte written (and fsynced when durable), not yet in place."""

    temp_path: Path
    size: int
    sha256: str
    head: bytes


def blob_relpath(blob_id: uuid.UUID) -> str:
    hex_id = blob_id.hex
    return f"files/{hex_id[:2]}/{hex_id[2:4]}/{hex_id}"


def is_disk_full(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in _DISK_FULL


class Storage:
    def __init__(self, data_dir: Path, *, durable: bool = True, min_free_bytes: int = 0) -> None:
        self.root = data_dir.resolve()
        self.tmp_dir = self.root / "tmp"
        self.durable = durable
        self.min_free_bytes = min_free_bytes
        self.node_id: uuid.UUID | None = None  # set by prepare()
        self._live_fd = -1  # flock on serve.lock while this process serves the data dir

    def prepare(self) -> None:
        for directory in (self.root, self.tmp_dir, self.root / "files", self.root / "uploads"):
            directory.mkdir(parents=True, exist_ok=True)
        self.node_id = _node_id(self.root / "node-id")

    def join(self) -> bool:
        """Join the processes serving this data dir; True when no other one is alive.

        Each holds a shared flock on `serve.lock` for as long as it runs (the kernel drops it when
        a process dies, kill -9 included). True means this process holds it exclusively until
        `share()`: whatever a process left in tmp/ or in flight is then a dead one's, and no peer's.
        """
        if self._live_fd < 0:
            self._live_fd = os.open(self.root / "serve.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(self._live_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.share()
            return False
        return True

    def share(self) -> None:
        """From `join()`'s exclusive hold to the shared one of a running process (waits while a
        starting peer recovers)."""
        fcntl.flock(self._live_fd, fcntl.LOCK_SH)

    def leave(self) -> None:
        if self._live_fd >= 0:
            os.close(self._live_fd)
            self._live_fd = -1

    def sweep_temp(self) -> int:
        """Remove every temp file; only for a process that `join()`ed alone (none is in flight)."""
        removed = 0
        for entry in os.scandir(self.tmp_dir):
            if entry.is_file():
                os.unlink(entry.path)
                removed += 1
        return removed

    def blob_path(self, blob_id: uuid.UUID) -> Path:
        return self.root / blob_relpath(blob_id)

    def temp_path(self, upload_id: uuid.UUID) -> Path:
        return self.tmp_dir / f"{upload_id.hex}.part"

    def free_bytes(self) -> int:
        stat = os.statvfs(self.root)
        return stat.f_bavail * stat.f_frsize

    def check_reserve(self, incoming: int) -> None:
        """507 up front when storing `incoming` more bytes would eat into MEDIAD_MIN_FREE_BYTES."""
        if self.min_free_bytes and self.free_bytes() - incoming < self.min_free_bytes:
            raise InsufficientStorage(
                f"storing {incoming} bytes would leave less than the {self.min_free_bytes} bytes "
                "of free disk this server keeps in reserve")

    def open_writer(self, max_bytes: int) -> BlobWriter:
        return BlobWriter(self, self.temp_path(uuid.uuid4()), max_bytes=max_bytes)

    def commit(self, blob: Blob, blob_id: uuid.UUID) -> Path:
        """Move a finished temp file into its final place; durable once this returns."""
        final = self.blob_path(blob_id)
        self._makedirs(final.parent)
        os.replace(blob.temp_path, final)
        if self.durable:
            fsync_dir(final.parent)
        return final

    def remove_blob(self, blob_id: uuid.UUID) -> None:
        self.blob_path(blob_id).unlink(missing_ok=True)

    def probe(self) -> float:
        """Write, fsync, read back and remove a small file; seconds taken."""
        started = time.perf_counter()
        path = self.tmp_dir / f"probe-{uuid.uuid4().hex}.part"
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.write(fd, b"mediad" * 512)
                os.fsync(fd)
            finally:
                os.close(fd)
            path.read_bytes()
        finally:
            path.unlink(missing_ok=True)
        return time.perf_counter() - started

    def _makedirs(self, directory: Path) -> None:
        if directory.is_dir():
            return
        self._makedirs(directory.parent)
        try:
            directory.mkdir()
        except FileExistsError:
            return
        if self.durable:
            fsync_dir(directory.parent)


def _libc_sync_file_range() -> Callable[[int, int, int], None] | None:
    """sync_file_range(2) with SYNC_FILE_RANGE_WRITE: start write-back without waiting for it.
    Python's os module does not expose it, so call libc directly (Linux only)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        function = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    function.restype = ctypes.c_int

    def start_writeback(fd: int, offset: int, length: int) -> None:
        if function(fd, offset, length, 2) != 0:  # 2 = SYNC_FILE_RANGE_WRITE
            raise OSError(ctypes.get_errno(), "sync_file_range failed")

    return start_writeback


start_writeback = _libc_sync_file_range() or (lambda fd, offset, length: os.fdatasync(fd))


def _node_id(path: Path) -> uuid.UUID:
    """This data dir's identity, created once: rows name the node whose disk holds their blob."""
    try:
        return uuid.UUID(path.read_text().strip())
    except FileNotFoundError:
        pass
    candidate = path.with_name(f"{path.name}.{uuid.uuid4().hex}")
    candidate.write_text(f"{uuid.uuid4()}\n")
    try:
        os.link(candidate, path)  # atomic: two processes starting at once agree on one id
    except FileExistsError:
        pass
    finally:
        candidate.unlink()
    return uuid.UUID(path.read_text().strip())


def fsync_dir(directory: Path) -> None:
    """Make a rename or create in `directory` durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, chunks: list[bytes]) -> None:
    if len(chunks) > 512:  # stay under IOV_MAX
        chunks = [b"".join(chunks)]
    total = sum(map(len, chunks))
    written = os.writev(fd, chunks)
    if written < total:
        rest = memoryview(b"".join(chunks))[written:]
        while rest:
            rest = rest[os.write(fd, rest):]


class BlobWriter:
    """Streams one upload to `tmp/<id>.part` through a thread of its own.

    The event loop only batches chunks; the thread hashes (sha256), writes and starts write-back,
    so receiving overlaps with disk work and a big upload never stalls other requests (hashlib
    and os.write release the GIL). A bounded number of batches in flight keeps memory flat.
    """

    def __init__(self, storage: Storage, path: Path, *, max_bytes: int) -> None:
        self.path = path
        self.size = 0
        self._storage = storage
        self._max_bytes = max_bytes
        self._head = bytearray()
        self._batch: list[bytes] = []
        self._batch_bytes = 0
        self._next_free_check = _FREE_CHECK_EVERY
        self._loop = asyncio.get_running_loop()
        self._slots = asyncio.Semaphore(_QUEUE_DEPTH)
        self._queue: queue.SimpleQueue[list[bytes] | None] = queue.SimpleQueue()
        self._done = self._loop.create_future()
        self._closed = False
        self._error: BaseException | None = None
        self._sha256 = ""
        _WRITERS.submit(self._run)

    async def write(self, chunk: bytes) -> None:
        if self._error is not None:
            raise self._mapped_error()
        if not chunk:
            return
        self.size += len(chunk)
        if self.size > self._max_bytes:
            raise PayloadTooLarge(f"the file is larger than the limit of {self._max_bytes} bytes")
        if len(self._head) < _HEAD_BYTES:
            self._head += chunk[: _HEAD_BYTES - len(self._head)]
        if self.size >= self._next_free_check:
            self._next_free_check += _FREE_CHECK_EVERY
            self._storage.check_reserve(0)
        self._batch.append(chunk)
        self._batch_bytes += len(chunk)
        if self._batch_bytes >= _BATCH_BYTES:
            await self._flush()

    async def finish(self) -> Blob:
        if self._batch:
            await self._flush()
        await self._close()
        if self._error is not None:
            raise self._mapped_error()
        return Blob(self.path, self.size, self._sha256, bytes(self._head))

    async def abort(self) -> None:
        """Stop writing and remove the temp file; safe to call at any point, also twice."""
        with anyio.CancelScope(shield=True):
            await self._close()
            await anyio.to_thread.run_sync(lambda: self.path.unlink(missing_ok=True))

    async def _flush(self) -> None:
        batch, self._batch, self._batch_bytes = self._batch, [], 0
        await self._slots.acquire()
        self._queue.put(batch)

    async def _close(self) -> None:
        if not self._closed:
            self._closed = True
            self._queue.put(None)
        await asyncio.shield(self._done)

    def _mapped_error(self) -> BaseException:
        assert self._error is not None
        if is_disk_full(self._error):
            return InsufficientStorage("the server's disk is full")
        return self._error

    def _run(self) -> None:
        try:
            self._write_batches()
        except BaseException as exc:  # whatever happens, the waiting upload must hear of it
            self._error = exc
        finally:
            self._call_loop(self._set_done)

    def _write_batches(self) -> None:
        hasher = hashlib.sha256()
        durable = self._storage.durable
        fd = -1
        written = flushed = 0
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o640)
        except OSError as exc:
            self._error = exc
        while (batch := self._queue.get()) is not None:
            try:
                if self._error is None:
                    for chunk in batch:
                        hasher.update(chunk)
                    _write_all(fd, batch)
                    written += sum(map(len, batch))
                    if durable and written - flushed >= _WRITEBACK_EVERY:
                        start_writeback(fd, flushed, written - flushed)
                        flushed = written
            except Exception as exc:  # keep draining, so the event loop side never blocks on a slot
                self._error = exc
            finally:
                self._call_loop(self._slots.release)
        try:
            if fd >= 0 and self._error is None and durable:
                os.fsync(fd)
        except OSError as exc:
            self._error = exc
        finally:
            if fd >= 0:
                os.close(fd)
        self._sha256 = hasher.hexdigest()

    def _set_done(self) -> None:
        if not self._done.done():
            self._done.set_result(None)

    def _call_loop(self, callback: object) -> None:
        try:
            self._loop.call_soon_threadsafe(callback)  # type: ignore[arg-type]
        except RuntimeError:  # the loop closed under us (process shutting down)
            pass

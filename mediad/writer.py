"""The one way received bytes reach the disk: batched on the event loop, written by a writer thread
while a hashing thread hashes the same batch, write-back started early, fsynced at the end.

Every kind of upload goes through `BlobWriter`: multipart and raw bodies and records into a new
temp file, tus PATCHes appended at an upload's offset. Reading a file back through hashes (a tus
upload after a restart, a conversion's output, a cloud push) is `read_span`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import ctypes
import hashlib
import os
import queue
import threading
import uuid
import weakref
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import anyio

from .errors import InsufficientStorage, NotFound, PayloadTooLarge
from .storage import HEAD_BYTES, Blob, Storage, is_disk_full

Hasher = Any  # a hashlib object

_BATCH_BYTES = 1 << 20  # hand the writer thread ~1 MiB at a time: few thread hops per GiB
_MIN_BATCH_BYTES = 64 << 10  # with many uploads at once, smaller batches (see _Budget.batch_bytes)
_QUEUE_DEPTH = 8  # batches in flight per upload: one upload keeps the disk busy with ~8 MiB
# Bytes handed to writer threads and not yet written, over all uploads of a process (of its event
# loop): each upload's queue bounds that upload only, and 32 concurrent uploads could otherwise
# queue 32 × 8 MiB. Only handed-over bytes count, which the threads write by themselves: a stalled
# client's unfinished batch holds none of it, so a few stalled uploads cannot hold up everyone
# else's; and batches shrink as writers multiply, so what they gather stays bounded too.
_IN_FLIGHT_BYTES = 4 << 20
# Start write-back every 2 MiB, so that the disk is busy from a body's first MiBs on and the final
# fsync waits for little: a tus PATCH's fsync waited ~38 ms per 16 MiB at 8 MiB (PUTs unchanged).
_WRITEBACK_EVERY = 2 << 20
# The first batch is handed over small: until then the writer thread has nothing to do, and a tus
# upload starts anew with every PATCH (~1 ms of idle writer per 1 MiB waited for).
_FIRST_BATCH_BYTES = 128 << 10
_FREE_CHECK_EVERY = 64 << 20
_READ_BYTES = 1 << 20
_IOV_MAX = 512  # stay under the kernel's IOV_MAX (1024) per pwritev


class TruncatedFile(Exception):
    """A file holds fewer bytes than its recorded length."""


def read_span(fd: int, offset: int, length: int, hashers: Sequence[Hasher] = ()) -> Iterator[bytes]:
    """Bytes [offset, offset + length) of `fd` in ≤1 MiB reads, each fed to every hasher first.
    Blocking: call it in a worker thread (hashlib releases the GIL on big buffers)."""
    done = 0
    while done < length:
        chunk = os.pread(fd, min(_READ_BYTES, length - done), offset + done)
        if not chunk:
            raise TruncatedFile(f"{length} bytes expected, {done} found")
        for hasher in hashers:
            hasher.update(chunk)
        done += len(chunk)
        yield chunk


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


def _pwrite_all(fd: int, chunks: list[bytes], position: int) -> int:
    if len(chunks) > _IOV_MAX:
        chunks = [b"".join(chunks)]
    total = sum(map(len, chunks))
    written = os.pwritev(fd, chunks, position)
    if written < total:  # a short write (signal, nearly full disk): finish it piece by piece
        rest = memoryview(b"".join(chunks))[written:]
        while rest:
            step = os.pwrite(fd, rest, position + written)
            written += step
            rest = rest[step:]
    return total


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

# A batch is hashed here while its writer thread copies it into the page cache: sha256 takes
# ~0.5 ms per MiB, the copy 0.2 ms, or 2.5 ms when the kernel must first get fresh pages (a VM's
# memory). One after the other in one thread, a writer went at the sum of the two; side by side, at
# the slower one's rate (measured: 1,300 → 1,450 MiB/s with the pages at hand, a 512 MiB PUT 300 →
# 375 MiB/s without). Hashing is CPU work, so more threads than cores would only queue; the jobs
# are short, so the pool's exit handler never waits long. One pool per process: a forked child
# inherits a pool's bookkeeping but not its threads.
_HASH_POOLS: dict[int, concurrent.futures.ThreadPoolExecutor] = {}


def _hash_pool() -> concurrent.futures.ThreadPoolExecutor:
    pool = _HASH_POOLS.get(os.getpid())
    if pool is None:
        pool = _HASH_POOLS[os.getpid()] = concurrent.futures.ThreadPoolExecutor(
            max_workers=os.cpu_count() or 1, thread_name_prefix="mediad-hash")
    return pool


def _hash_batch(hashers: Sequence[Hasher], batch: list[bytes]) -> None:
    for chunk in batch:
        for hasher in hashers:
            hasher.update(chunk)


class _Budget:
    """Bytes handed to writer threads and not yet on disk, for all uploads on one event loop.
    Taken as a batch is handed over, given back as the thread writes it; used on the loop's
    thread only."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self.writers = 0  # open on this loop
        self._waiters: deque[asyncio.Future[None]] = deque()

    def batch_bytes(self) -> int:
        """How much a writer gathers before handing it over: ~1 MiB alone, less when many share
        the limit, so that what they gather is bounded like what they have handed over."""
        return max(_MIN_BATCH_BYTES, min(_BATCH_BYTES, self.limit // max(1, self.writers)))

    async def take(self, size: int) -> None:
        # With nothing in flight any batch may go, or one larger than the limit would never pass.
        while self.used > 0 and self.used + size > self.limit:
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            finally:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)
        self.used += size

    def give(self, size: int) -> None:
        self.used -= size
        while self._waiters:  # each waiter checks again; the few that fit go on
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)


_BUDGETS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Budget] = weakref.WeakKeyDictionary()


def _budget(loop: asyncio.AbstractEventLoop) -> _Budget:
    budget = _BUDGETS.get(loop)
    if budget is None:
        budget = _BUDGETS[loop] = _Budget(_IN_FLIGHT_BYTES)
    return budget


class BlobWriter:
    """Streams one body to a file through a writer thread of its own.

    The event loop only batches chunks; the thread writes them and starts write-back while a
    hashing thread feeds them to sha256 and any `extra` hashers, so receiving overlaps with disk
    work and a big upload never stalls other requests (hashlib and os.pwritev release the GIL).
    A bounded number of batches per upload, and of bytes over all uploads, keeps memory flat.

    `create` makes `path` (a new temp file); `append` writes an existing file from `offset` on,
    cutting off whatever lies past it first. `finish()` returns the Blob once every byte is
    fsynced (when durable); `abort()` undoes the writing: the new file is removed, an appended
    one cut back to its starting offset.
    """

    def __init__(self, storage: Storage, path: Path, *, max_bytes: int, offset: int = 0,
                 create: bool = True, sha256: Hasher | None = None, extra: Sequence[Hasher] = (),
                 too_large: str | None = None) -> None:
        self.path = path
        self.size = 0  # bytes received by this writer (on top of `offset`)
        self.sha256 = sha256 if sha256 is not None else hashlib.sha256()
        self._storage = storage
        self._offset = offset
        self._create = create
        self._hashers = [self.sha256, *extra]
        self._max_bytes = max_bytes
        self._too_large = too_large or f"the file is larger than the limit of {max_bytes} bytes"
        self._head = bytearray()
        self._batch: list[bytes] = []
        self._batch_bytes = 0
        self._next_free_check = _FREE_CHECK_EVERY
        self._loop = asyncio.get_running_loop()
        self._budget = _budget(self._loop)
        self._budget.writers += 1
        self._held = 0  # of the budget, by this writer
        self._slots = asyncio.Semaphore(_QUEUE_DEPTH)
        self._queue: queue.SimpleQueue[list[bytes] | None] = queue.SimpleQueue()
        self._done = self._loop.create_future()
        self._closed = False
        self._ended = False  # the thread took the end marker
        self._error: BaseException | None = None
        _WRITERS.submit(self._run)

    @classmethod
    def create(cls, storage: Storage, *, max_bytes: int) -> BlobWriter:
        """A writer of a new temp file, to be committed into place as a blob."""
        return cls(storage, storage.temp_path(uuid.uuid4()), max_bytes=max_bytes)

    @classmethod
    def append(cls, storage: Storage, path: Path, offset: int, *, max_bytes: int, sha256: Hasher,
               extra: Sequence[Hasher] = (), too_large: str | None = None) -> BlobWriter:
        return cls(storage, path, max_bytes=max_bytes, offset=offset, create=False, sha256=sha256,
                   extra=extra, too_large=too_large)

    async def write(self, chunk: bytes) -> None:
        if self._error is not None:
            raise self._mapped_error()
        if not chunk:
            return
        self.size += len(chunk)
        if self.size > self._max_bytes:
            raise PayloadTooLarge(self._too_large)
        if len(self._head) < HEAD_BYTES:
            self._head += chunk[: HEAD_BYTES - len(self._head)]
        if self.size >= self._next_free_check:
            self._next_free_check += _FREE_CHECK_EVERY
            self._storage.check_reserve(0)
        self._batch.append(chunk)
        self._batch_bytes += len(chunk)
        limit = self._budget.batch_bytes()
        if self.size == self._batch_bytes:  # nothing handed over yet
            limit = min(limit, _FIRST_BATCH_BYTES)
        if self._batch_bytes >= limit:
            await self._flush()

    async def finish(self) -> Blob:
        if self._batch:
            await self._flush()
        await self._close()
        if self._error is not None:
            raise self._mapped_error()
        return Blob(self.path, self._offset + self.size, self.sha256.hexdigest(), bytes(self._head))

    async def abort(self) -> None:
        """Stop writing and undo it; safe to call at any point, also twice."""
        with anyio.CancelScope(shield=True):
            await self._close()
            await anyio.to_thread.run_sync(self._undo)

    def _undo(self) -> None:
        if self._create:
            self.path.unlink(missing_ok=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.truncate(self.path, self._offset)  # the bytes past the offset were never acknowledged

    async def _flush(self) -> None:
        batch, size = self._batch, self._batch_bytes
        self._batch, self._batch_bytes = [], 0
        await self._slots.acquire()
        await self._budget.take(size)
        self._held += size
        self._queue.put(batch)

    async def _close(self) -> None:
        if not self._closed:
            self._closed = True
            self._budget.writers -= 1
            self._queue.put(None)
            self._batch, self._batch_bytes = [], 0  # never handed over (aborted mid-batch)
        await asyncio.shield(self._done)
        if self._held:
            self._budget.give(self._held)
            self._held = 0

    def _mapped_error(self) -> BaseException:
        assert self._error is not None
        if is_disk_full(self._error):
            return InsufficientStorage("the server's disk is full")
        if isinstance(self._error, FileNotFoundError) and not self._create:
            return NotFound("this upload's partial file is gone")
        return self._error

    def _written(self, size: int) -> None:
        """On the loop: a batch of `size` bytes is on disk (or dropped after an error)."""
        self._slots.release()
        size = min(size, self._held)
        self._held -= size
        self._budget.give(size)

    # ---- the writer thread ----------------------------------------------------------------------

    def _run(self) -> None:
        fd = -1
        try:
            fd = self._open()
            self._write_batches(fd)
            if self._storage.durable:  # before the caller acknowledges a byte, it is durable
                # An appended file's metadata that matters (its size) is in fdatasync's scope too.
                (os.fsync if self._create else os.fdatasync)(fd)
        except BaseException as exc:  # whatever happens, the waiting upload must hear of it
            self._error = exc
            self._drain()
        finally:
            if fd >= 0:
                os.close(fd)
            self._call_loop(self._set_done)

    def _open(self) -> int:
        if self._create:
            return os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o640)
        fd = os.open(self.path, os.O_WRONLY | os.O_CLOEXEC)
        os.ftruncate(fd, self._offset)  # bytes past the durable offset (a write cut by a crash) are not ours
        return fd

    def _write_batches(self, fd: int) -> None:
        durable = self._storage.durable
        position = flushed = self._offset
        while (batch := self._next()) is not None:
            size = 0
            try:
                hashed = _hash_pool().submit(_hash_batch, self._hashers, batch)
                try:
                    size = _pwrite_all(fd, batch, position)
                finally:  # hashed before the next batch is, and the hashers never used by two threads
                    error = hashed.exception()
                if error is not None:
                    raise error
                position += size
                if durable and position - flushed >= _WRITEBACK_EVERY:
                    start_writeback(fd, flushed, position - flushed)
                    flushed = position
            finally:  # on error too: the loop side must never block on a slot
                self._call_loop(self._written, size or sum(map(len, batch)))

    def _drain(self) -> None:
        """After an error, take batches until the end, so the loop side never blocks on a slot."""
        while (batch := self._next()) is not None:
            self._call_loop(self._written, sum(map(len, batch)))

    def _next(self) -> list[bytes] | None:
        if self._ended:
            return None
        batch = self._queue.get()
        self._ended = batch is None
        return batch

    def _set_done(self) -> None:
        if not self._done.done():
            self._done.set_result(None)

    def _call_loop(self, callback: Callable[..., None], *args: object) -> None:
        try:
            self._loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:  # the loop closed under us (process shutting down)
            pass

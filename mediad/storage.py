"""Local disk: where blobs, temp files and partial uploads live, and how they become durable.

Disk paths derive from our own ids only (`files/ab/cd/<blob id>`), never from client input.
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from .errors import InsufficientStorage

HEAD_BYTES = 8192  # leading bytes kept for format detection

_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


@dataclass(frozen=True)
class Blob:
    """A finished temp file: every byte written (and fsynced when durable), not yet in place."""

    temp_path: Path
    size: int
    sha256: str
    head: bytes


@dataclass(frozen=True)
class DiskUsage:
    total: int
    free: int

    @property
    def used_fraction(self) -> float:
        return 1.0 - self.free / self.total if self.total else 0.0


def blob_relpath(blob_id: uuid.UUID) -> str:
    hex_id = blob_id.hex
    return f"files/{hex_id[:2]}/{hex_id[2:4]}/{hex_id}"


def derived_dir(root: Path, blob_id: uuid.UUID) -> Path:
    """Where the files derived from a content live (thumbnails): made again on demand, never
    replicated, removed with the content."""
    hex_id = blob_id.hex
    return root / "derived" / hex_id[:2] / hex_id


def is_disk_full(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in _DISK_FULL


class Storage:
    def __init__(self, data_dir: Path, *, durable: bool = True, min_free_bytes: int = 0) -> None:
        self.root = data_dir.resolve()
        self.tmp_dir = self.root / "tmp"
        self.partials_dir = self.root / "uploads"  # tus uploads in progress, one file each
        self.durable = durable
        self.min_free_bytes = min_free_bytes
        self.node_id: uuid.UUID | None = None  # set by prepare()
        self._live_fd = -1  # flock on serve.lock while this process serves the data dir

    def prepare(self) -> None:
        for directory in (self.root, self.tmp_dir, self.root / "files", self.partials_dir):
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

    def usage(self) -> DiskUsage:
        stat = os.statvfs(self.root)
        return DiskUsage(stat.f_blocks * stat.f_frsize, stat.f_bavail * stat.f_frsize)

    def free_bytes(self) -> int:
        return self.usage().free

    def check_reserve(self, incoming: int) -> None:
        """507 up front when storing `incoming` more bytes would eat into MEDIAD_MIN_FREE_BYTES."""
        if self.min_free_bytes and self.free_bytes() - incoming < self.min_free_bytes:
            raise InsufficientStorage(
                f"storing {incoming} bytes would leave less than the {self.min_free_bytes} bytes "
                "of free disk this server keeps in reserve")

    def commit(self, blob: Blob, blob_id: uuid.UUID) -> Path:
        """Move a finished temp file into its final place; durable once this returns."""
        final = self.blob_path(blob_id)
        self._makedirs(final.parent)
        os.replace(blob.temp_path, final)
        if self.durable:
            fsync_dir(final.parent)
        return final

    def remove_blob(self, blob_id: uuid.UUID) -> None:
        """The local copy only (an eviction keeps what was derived from it)."""
        self.blob_path(blob_id).unlink(missing_ok=True)

    def remove_content(self, blob_id: uuid.UUID) -> None:
        """A content gone from the service (its File deleted, or replaced): the local copy and the
        files derived from it (thumbnails)."""
        self.remove_blob(blob_id)
        self.remove_derived(blob_id)

    def remove_derived(self, blob_id: uuid.UUID) -> None:
        """The files derived from a content, every size and format."""
        shutil.rmtree(derived_dir(self.root, blob_id), ignore_errors=True)

    # ---- partial files of resumable uploads -----------------------------------------------------

    def partial_path(self, upload_id: uuid.UUID) -> Path:
        return self.partials_dir / f"{upload_id.hex}.part"

    def create_partial(self, upload_id: uuid.UUID) -> None:
        path = self.partial_path(upload_id)
        path.parent.mkdir(exist_ok=True)
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o640))
        if self.durable:
            fsync_dir(path.parent)

    def remove_partial(self, upload_id: uuid.UUID) -> None:
        self.partial_path(upload_id).unlink(missing_ok=True)

    def stray_partials(self, known: set[uuid.UUID], older_than: float) -> list[Path]:
        """Partial files of no upload in `known`, last written before `older_than`."""
        if not self.partials_dir.is_dir():
            return []
        stray = []
        for entry in os.scandir(self.partials_dir):
            try:
                upload_id = uuid.UUID(hex=entry.name.removesuffix(".part"))
            except ValueError:
                continue
            if upload_id not in known and entry.stat().st_mtime < older_than:
                stray.append(Path(entry.path))
        return stray

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


def _node_id(path: Path) -> uuid.UUID:
    """This data dir's identity, created once: rows name the node whose disk holds their blob."""
    try:
        return uuid.UUID(path.read_text().strip())
    except FileNotFoundError:
        pass
    create_exclusive(path, f"{uuid.uuid4()}\n".encode(), mode=0o644)
    return uuid.UUID(path.read_text().strip())


def create_exclusive(path: Path, data: bytes, *, mode: int) -> bool:
    """Create `path` holding `data`, whole or not at all; False when it already exists.

    The bytes go to a name of their own, fsynced, then are hard-linked into place, which fails if
    another process was first: processes starting at once agree on one file, and a crash never
    leaves an empty or half-written one in place.
    """
    candidate = path.with_name(f"{path.name}.{uuid.uuid4().hex}")
    fd = os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.link(candidate, path)
    except FileExistsError:
        return False
    finally:
        candidate.unlink(missing_ok=True)
    fsync_dir(path.parent)
    return True


def fsync_dir(directory: Path) -> None:
    """Make a rename or create in `directory` durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

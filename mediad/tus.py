"""Resumable uploads: the tus 1.0.0 protocol under /uploads, crash-safe and checksummed.

Each upload appends to one partial file (`uploads/<id>.part`). An offset is written to PostgreSQL
only after the bytes it covers are fsynced, so a 204 is a promise that survives kill -9. A lease
on the row (one conditional UPDATE, like cloud pushes) keeps two PATCHes, on one node or several,
from interleaving bytes. The final chunk is acknowledged only once the File exists: completion
goes through `uploads.commit_upload`, the same path as every other upload.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import email.utils
import hashlib
import os
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import sqlalchemy as sa
from sqlalchemy.engine import Row
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from starlette.datastructures import State
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response

from . import db, quotas
from .auth import authenticate
from .errors import (
    DATABASE_UNAVAILABLE,
    BadRequest,
    ChecksumMismatch,
    Conflict,
    InsufficientStorage,
    Locked,
    MediaError,
    NotFound,
    PayloadTooLarge,
    PreconditionFailed,
    ServiceUnavailable,
    UnsupportedMediaType,
    database_unavailable,
    error_response,
)
from .files import parse_file_id, rfc3339
from .storage import Blob, Storage, fsync_dir, is_disk_full, start_writeback
from .uploads import clean_path, commit_upload, place

TUS_VERSION = "1.0.0"
EXTENSIONS = "creation,creation-with-upload,termination,checksum,expiration"
CHECKSUMS: dict[str, Callable[[], Any]] = {"sha1": hashlib.sha1, "sha256": hashlib.sha256, "md5": hashlib.md5}
OFFSET_STREAM = "application/offset+octet-stream"
_LOCK_S = 60.0
_BATCH = 1 << 20

uploads = db.uploads
Hasher = Any  # a hashlib object


# ---- pure parsing -------------------------------------------------------------------------------

def parse_metadata(header: str | None) -> dict[str, str]:
    """Upload-Metadata: comma-separated `key base64(value)` pairs (value optional), keys unique."""
    result: dict[str, str] = {}
    for pair in (header or "").split(","):
        pair = pair.strip()
        if not pair:
            continue
        key, _, encoded = pair.partition(" ")
        if not key or not key.isascii() or key in result:
            raise BadRequest(f"Upload-Metadata has a bad or repeated key: {key[:40]!r}")
        try:
            result[key] = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            raise BadRequest(f"Upload-Metadata value of {key!r} is not base64 of UTF-8 text") from None
    return result


def parse_checksum(header: str) -> tuple[str, bytes]:
    """Upload-Checksum: `<algorithm> <base64 digest>`."""
    algorithm, _, encoded = header.strip().partition(" ")
    if algorithm.lower() not in CHECKSUMS:
        raise BadRequest(f"unsupported checksum algorithm {algorithm!r}; use one of {', '.join(CHECKSUMS)}")
    try:
        return algorithm.lower(), base64.b64decode(encoded.strip(), validate=True)
    except binascii.Error:
        raise BadRequest("Upload-Checksum's digest is not base64") from None


def _int_header(request: Request, name: str) -> int | None:
    value = request.headers.get(name)
    if value is None:
        return None
    if not value.strip().isdigit():
        raise BadRequest(f"{name} must be a non-negative integer")
    return int(value)


def _http_date(moment: datetime) -> str:
    return email.utils.format_datetime(moment.astimezone(UTC), usegmt=True)


def partial_path(storage: Storage, upload_id: uuid.UUID) -> Path:
    return storage.root / "uploads" / f"{upload_id.hex}.part"


# ---- queries ------------------------------------------------------------------------------------

_live = uploads.c.expires_at > sa.func.now()


async def _visible(conn: AsyncConnection, upload_id: uuid.UUID, owner_id: uuid.UUID) -> Row[Any] | None:
    return (await conn.execute(sa.select(uploads).where(
        uploads.c.id == upload_id, uploads.c.owner_id == owner_id, _live))).first()


async def release_locks(conn: AsyncConnection, node: uuid.UUID) -> int:
    """Free the uploads of `node` locked by a PATCH that a crash cut off, which would otherwise answer
    423 for a minute; only once every process sharing that data dir is known dead."""
    result = await conn.execute(sa.update(uploads).where(uploads.c.node == node, uploads.c.lock_until.is_not(None))
                                .values(lock_until=None))
    return result.rowcount


async def _claim(conn: AsyncConnection, upload_id: uuid.UUID, owner_id: uuid.UUID) -> Row[Any] | None:
    free = sa.or_(uploads.c.lock_until.is_(None), uploads.c.lock_until < sa.func.now())
    return (await conn.execute(
        sa.update(uploads)
        .where(uploads.c.id == upload_id, uploads.c.owner_id == owner_id, _live, free)
        .values(lock_until=sa.func.now() + sa.func.make_interval(0, 0, 0, 0, 0, 0, _LOCK_S))
        .returning(uploads))).first()


# ---- the protocol -------------------------------------------------------------------------------

def _tus(handler: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
    """Every answer, errors included, carries Tus-Resumable; tus requests must send it."""

    async def wrapped(request: Request) -> Response:
        try:
            if request.method not in ("OPTIONS", "GET") and request.headers.get("tus-resumable") != TUS_VERSION:
                raise PreconditionFailed(f"this is a tus {TUS_VERSION} endpoint: send Tus-Resumable: {TUS_VERSION}",
                                         {"Tus-Version": TUS_VERSION})
            response = await handler(request)
        except MediaError as exc:
            response = error_response(exc)
        except DATABASE_UNAVAILABLE as exc:  # answered here, not by the app, to carry Tus-Resumable
            response = database_unavailable(exc)
        response.headers["Tus-Resumable"] = TUS_VERSION
        return response

    return wrapped


@_tus
async def options(request: Request) -> Response:
    return Response(status_code=204, headers={
        "Tus-Version": TUS_VERSION, "Tus-Extension": EXTENSIONS,
        "Tus-Max-Size": str(request.app.state.settings.max_upload_bytes),
        "Tus-Checksum-Algorithm": ",".join(CHECKSUMS)})


@_tus
async def create(request: Request) -> Response:
    state = request.app.state
    owner_id = await authenticate(request)
    length = _int_header(request, "upload-length")
    if length is None:
        raise BadRequest("Upload-Length is required (Upload-Defer-Length is not supported)")
    if length > state.settings.max_upload_bytes:
        raise PayloadTooLarge(f"Upload-Length {length} is over the limit of {state.settings.max_upload_bytes} bytes")
    metadata = parse_metadata(request.headers.get("upload-metadata"))
    if not metadata.get("filename"):
        raise BadRequest("Upload-Metadata must carry a filename")
    path = clean_path(metadata["path"]) if metadata.get("path") else None
    name, path = place(path, metadata["filename"])
    state.storage.check_reserve(length)
    (await quotas.room(state.reader, owner_id, path)).check(length)

    upload_id = uuid.uuid4()
    expires_at = datetime.now(UTC) + timedelta(seconds=state.settings.upload_expire_s)
    await anyio.to_thread.run_sync(_create_partial, state.storage, upload_id)
    try:
        async with state.engine.begin() as conn:
            await conn.execute(sa.insert(uploads).values(
                id=upload_id, owner_id=owner_id, length=length, name=name, path=path,
                node=state.storage.node_id, expires_at=expires_at))
    except BaseException:
        await anyio.to_thread.run_sync(_remove_partial, state.storage, upload_id)
        raise
    headers = {"Location": f"/uploads/{upload_id}", "Upload-Expires": _http_date(expires_at)}
    body_follows = request.headers.get("content-type", "").split(";")[0].strip() == OFFSET_STREAM
    if body_follows or length == 0:
        offset, file_id = await _patch(request, upload_id, owner_id, offset=0, checksum=None)
        headers["Upload-Offset"] = str(offset)
        if file_id is not None:
            headers["Mediad-File-Id"] = str(file_id)
    return Response(status_code=201, headers=headers)


@_tus
async def head(request: Request) -> Response:
    row = await _find(request)
    return Response(status_code=200, headers={
        "Upload-Offset": str(row.offset), "Upload-Length": str(row.length),
        "Upload-Expires": _http_date(row.expires_at), "Cache-Control": "no-store"})


@_tus
async def status(request: Request) -> Response:
    row = await _find(request)
    return JSONResponse({"id": str(row.id), "offset": row.offset, "length": row.length,
                         "expires_at": rfc3339(row.expires_at),
                         "file_id": str(row.file_id) if row.file_id else None},
                        headers={"Cache-Control": "no-store"})


@_tus
async def patch(request: Request) -> Response:
    owner_id = await authenticate(request)
    upload_id = parse_file_id(request.path_params["upload_id"])
    if request.headers.get("content-type", "").split(";")[0].strip() != OFFSET_STREAM:
        raise UnsupportedMediaType(f"PATCH needs Content-Type: {OFFSET_STREAM}")
    offset = _int_header(request, "upload-offset")
    if offset is None:
        raise BadRequest("Upload-Offset is required")
    header = request.headers.get("upload-checksum")
    checksum = parse_checksum(header) if header else None
    new_offset, file_id = await _patch(request, upload_id, owner_id, offset=offset, checksum=checksum)
    headers = {"Upload-Offset": str(new_offset)}
    if file_id is not None:
        headers["Mediad-File-Id"] = str(file_id)
    return Response(status_code=204, headers=headers)


@_tus
async def terminate(request: Request) -> Response:
    state = request.app.state
    owner_id = await authenticate(request)
    upload_id = parse_file_id(request.path_params["upload_id"])
    async with state.engine.begin() as conn:
        row = await _claim(conn, upload_id, owner_id)
        if row is None:
            raise (Locked("a PATCH is writing this upload") if await _visible(conn, upload_id, owner_id)
                   else NotFound("no such upload"))
        await conn.execute(sa.delete(uploads).where(uploads.c.id == upload_id))
    state.tus_hashers.pop(upload_id, None)
    await anyio.to_thread.run_sync(_remove_partial, state.storage, upload_id)
    return Response(status_code=204)


async def _find(request: Request) -> Row[Any]:
    owner_id = await authenticate(request)
    upload_id = parse_file_id(request.path_params["upload_id"])
    async with request.app.state.reader.connect() as conn:
        row = await _visible(conn, upload_id, owner_id)
    if row is None:
        raise NotFound("no such upload (or it expired)")
    return row


# ---- appending ----------------------------------------------------------------------------------

async def _patch(request: Request, upload_id: uuid.UUID, owner_id: uuid.UUID, *, offset: int,
                 checksum: tuple[str, bytes] | None) -> tuple[int, uuid.UUID | None]:
    """Claim the upload, append the body at `offset`, make it durable; → (offset, File id if done)."""
    state = request.app.state
    # Single statements in autocommit: the claim, and on success one UPDATE that records the new
    # offset and releases the claim together; a PATCH costs two round trips to the database, not nine.
    async with state.reader.connect() as conn:
        row = await _claim(conn, upload_id, owner_id)
        if row is None:
            raise (Locked("another PATCH is writing this upload; retry when it is done")
                   if await _visible(conn, upload_id, owner_id) else NotFound("no such upload (or it expired)"))
    released = False
    try:
        if row.node != state.storage.node_id:
            raise ServiceUnavailable("this upload's bytes are on another mediad node", retry_after=5)
        if row.file_id is not None or row.offset == row.length and row.length > 0:
            raise Conflict("this upload is complete")
        if offset != row.offset:
            raise Conflict(f"Upload-Offset is {offset} but the upload is at {row.offset}")
        # Other uploads may have used the room since creation: refuse before taking more bytes.
        (await quotas.room(state.reader, owner_id, row.path)).check(row.length)
        appended = await _append(request, state, row, checksum)
        released = True  # the statement that recorded the new offset released the claim
        return appended
    finally:
        if not released:
            with anyio.CancelScope(shield=True):
                async with state.reader.connect() as conn:
                    await conn.execute(sa.update(uploads).where(uploads.c.id == upload_id).values(lock_until=None))


async def _append(request: Request, state: State, row: Row[Any],
                  checksum: tuple[str, bytes] | None) -> tuple[int, uuid.UUID | None]:
    storage: Storage = state.storage
    whole = (await _whole_hasher(state, row)).copy()  # the cached one changes only on success
    chunk_hasher = CHECKSUMS[checksum[0]]() if checksum else None
    hashers = [h for h in (whole, chunk_hasher) if h is not None]
    remaining = row.length - row.offset
    fd = await anyio.to_thread.run_sync(_open_at, partial_path(storage, row.id), row.offset)
    written, batch, batch_bytes, cut = 0, [], 0, False
    in_flight: asyncio.Future[None] | None = None  # one batch is written while the next arrives

    async def flush() -> None:
        nonlocal in_flight, batch, batch_bytes
        if in_flight is not None:
            await in_flight
        position = row.offset + written - batch_bytes
        in_flight = asyncio.ensure_future(
            anyio.to_thread.run_sync(_write, fd, position, batch, hashers, storage.durable))
        batch, batch_bytes = [], 0

    try:
        try:
            async for chunk in request.stream():
                written += len(chunk)
                if written > remaining:
                    raise PayloadTooLarge(f"the body goes past Upload-Length ({row.length} bytes)")
                batch.append(chunk)
                batch_bytes += len(chunk)
                if batch_bytes >= _BATCH:
                    await flush()
        except ClientDisconnect:
            cut = True  # keep what arrived (unless it cannot be verified against a checksum)
        if batch:
            await flush()
        if in_flight is not None:
            await in_flight
        if chunk_hasher is not None and checksum is not None:
            if cut:
                raise BadRequest("the body was cut off, so its Upload-Checksum cannot be verified")
            if chunk_hasher.digest() != checksum[1]:
                raise ChecksumMismatch(f"the chunk's {checksum[0]} does not match Upload-Checksum; it was discarded")
        await anyio.to_thread.run_sync(_sync_close, fd, storage.durable)
    except BaseException as exc:
        with anyio.CancelScope(shield=True):
            if in_flight is not None:
                await asyncio.wait([in_flight])  # never truncate under a write still running
            await anyio.to_thread.run_sync(_truncate_close, fd, row.offset)  # offset unchanged
        if is_disk_full(exc):
            raise InsufficientStorage("the server's disk is full; the chunk was discarded") from exc
        raise
    new_offset = row.offset + written
    if new_offset == row.length and not cut:
        return new_offset, await _complete(state, row, whole)
    async with state.reader.connect() as conn:
        await conn.execute(sa.update(uploads).where(uploads.c.id == row.id, uploads.c.offset == row.offset)
                           .values(offset=new_offset, lock_until=None))
    state.tus_hashers[row.id] = (new_offset, whole)
    return new_offset, None


async def _complete(state: State, row: Row[Any], whole: Hasher) -> uuid.UUID:
    """The last chunk is durable: make the File, and only then acknowledge the final offset."""
    partial = partial_path(state.storage, row.id)
    temp = state.storage.temp_path(uuid.uuid4())
    head = await anyio.to_thread.run_sync(_link_and_head, partial, temp)
    blob = Blob(temp, row.length, whole.hexdigest(), head)

    async def finished(conn: AsyncConnection, file_row: Row[Any]) -> None:
        await conn.execute(sa.update(uploads).where(uploads.c.id == row.id)
                           .values(offset=row.length, file_id=file_row.id, lock_until=None))

    try:
        file_row, _ = await commit_upload(state, row.owner_id, blob, name=row.name, path=row.path, also=finished)
    finally:
        await anyio.to_thread.run_sync(lambda: temp.unlink(missing_ok=True))
    state.tus_hashers.pop(row.id, None)
    await anyio.to_thread.run_sync(_remove_partial, state.storage, row.id)
    return uuid.UUID(str(file_row.id))


async def _whole_hasher(state: State, row: Row[Any]) -> Hasher:
    """sha256 of the bytes so far: kept in memory while the upload is live; after a restart, or on
    another process, rebuilt once from the partial file."""
    cached = state.tus_hashers.get(row.id)
    if cached is not None and cached[0] == row.offset:
        return cached[1]
    hasher = await anyio.to_thread.run_sync(_hash_prefix, partial_path(state.storage, row.id), row.offset)
    state.tus_hashers[row.id] = (row.offset, hasher)
    return hasher


# ---- blocking file work (run in threads) ---------------------------------------------------------

def _create_partial(storage: Storage, upload_id: uuid.UUID) -> None:
    path = partial_path(storage, upload_id)
    path.parent.mkdir(exist_ok=True)
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o640))
    if storage.durable:
        fsync_dir(path.parent)


def _remove_partial(storage: Storage, upload_id: uuid.UUID) -> None:
    partial_path(storage, upload_id).unlink(missing_ok=True)


def _open_at(path: Path, offset: int) -> int:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NotFound("this upload's partial file is gone") from None
    os.ftruncate(fd, offset)  # bytes past the durable offset (a PATCH cut by a crash) are not ours
    return fd


def _write(fd: int, position: int, batch: list[bytes], hashers: list[Hasher], writeback: bool) -> None:
    """Hash and write one batch; start its write-back so the fdatasync at the end is short."""
    for chunk in batch:
        for hasher in hashers:
            hasher.update(chunk)
    data = memoryview(b"".join(batch))
    offset = 0
    while offset < len(data):
        offset += os.pwrite(fd, data[offset:], position + offset)
    if writeback:
        start_writeback(fd, position, len(data))


def _sync_close(fd: int, durable: bool) -> None:
    """fdatasync before the offset is recorded: an acknowledged byte is a durable byte."""
    if durable:
        os.fdatasync(fd)
    os.close(fd)


def _truncate_close(fd: int, offset: int) -> None:
    try:
        os.ftruncate(fd, offset)
    finally:
        os.close(fd)


def _link_and_head(partial: Path, temp: Path) -> bytes:
    """A second name for the finished partial file: committing moves that one, so if committing
    fails the upload's bytes are still there for a retry of the last PATCH."""
    os.link(partial, temp)
    with open(temp, "rb") as file:
        return file.read(8192)


def _hash_prefix(path: Path, length: int) -> Hasher:
    hasher = hashlib.sha256()
    with open(path, "rb") as file:
        remaining = length
        while remaining:
            chunk = file.read(min(_BATCH, remaining))
            if not chunk:
                raise NotFound("this upload's partial file is shorter than its offset")
            hasher.update(chunk)
            remaining -= len(chunk)
    return hasher


# ---- cleanup ------------------------------------------------------------------------------------

async def sweep_uploads(engine: AsyncEngine, storage: Storage, *, dry_run: bool, older_than: float) -> list[str]:
    """Expired uploads go (rows and partial files); partial files no row owns go after a grace."""
    actions: list[str] = []
    async with engine.begin() as conn:
        query = sa.select(uploads.c.id).where(uploads.c.expires_at <= sa.func.now(), uploads.c.node == storage.node_id)
        expired = list((await conn.execute(query)).scalars())
        if expired and not dry_run:
            await conn.execute(sa.delete(uploads).where(uploads.c.id.in_(expired)))
        live = set((await conn.execute(sa.select(uploads.c.id).where(uploads.c.file_id.is_(None)))).scalars())
    for upload_id in expired:
        actions.append(f"remove expired upload {upload_id}")
        if not dry_run:
            await anyio.to_thread.run_sync(_remove_partial, storage, upload_id)
    for path in await anyio.to_thread.run_sync(_stray_partials, storage, live | set(expired), older_than):
        actions.append(f"remove stray partial file {path.name}")
        if not dry_run:
            path.unlink(missing_ok=True)
    return actions


def _stray_partials(storage: Storage, known: set[uuid.UUID], older_than: float) -> list[Path]:
    directory = storage.root / "uploads"
    if not directory.is_dir():
        return []
    stray = []
    for entry in os.scandir(directory):
        try:
            upload_id = uuid.UUID(hex=entry.name.removesuffix(".part"))
        except ValueError:
            continue
        if upload_id not in known and entry.stat().st_mtime < older_than:
            stray.append(Path(entry.path))
    return stray

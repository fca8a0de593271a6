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
import contextlib
import email.utils
import hashlib
import os
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import anyio
import sqlalchemy as sa
from sqlalchemy.engine import Row
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response

from . import db, quotas
from .auth import authenticate
from .cloud import Replicator
from .config import Settings
from .errors import (
    DATABASE_UNAVAILABLE,
    BadRequest,
    ChecksumMismatch,
    Conflict,
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
from .media import Prober
from .names import clean_path, media_type, place
from .storage import HEAD_BYTES, Blob, Storage
from .uploads import commit_upload
from .writer import BlobWriter, TruncatedFile, read_span

TUS_VERSION = "1.0.0"
EXTENSIONS = "creation,creation-with-upload,termination,checksum,expiration"
CHECKSUMS: dict[str, Callable[[], Any]] = {"sha1": hashlib.sha1, "sha256": hashlib.sha256, "md5": hashlib.md5}
OFFSET_STREAM = "application/offset+octet-stream"

T = TypeVar("T")

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


def _checksum_of(request: Request) -> tuple[str, bytes] | None:
    """The chunk's Upload-Checksum, if it has one (a POST with a first chunk, or a PATCH)."""
    header = request.headers.get("upload-checksum")
    return parse_checksum(header) if header else None


def _int_header(request: Request, name: str) -> int | None:
    value = request.headers.get(name)
    if value is None:
        return None
    value = value.strip()
    if not (value.isascii() and value.isdigit()):  # "²".isdigit() is true, and int("²") fails
        raise BadRequest(f"{name} must be a non-negative integer")
    return int(value)


def _http_date(moment: datetime) -> str:
    return email.utils.format_datetime(moment.astimezone(UTC), usegmt=True)


# ---- queries ------------------------------------------------------------------------------------

_live = uploads.c.expires_at > sa.func.now()


async def _visible(conn: AsyncConnection, upload_id: uuid.UUID, owner_id: uuid.UUID) -> Row[Any] | None:
    return (await conn.execute(sa.select(uploads).where(
        uploads.c.id == upload_id, uploads.c.owner_id == owner_id, _live))).first()


# A lease is not worth a WAL flush: a crash ends the PATCH holding it anyway, and start-up
# recovery frees the leases of the dead. So the claim commits asynchronously (set for its own
# transaction only); what must survive a crash, the offset, is recorded by a durable commit.
_ASYNC_COMMIT = sa.select(sa.func.set_config("synchronous_commit", "off", True)).scalar_subquery()
_DURABLE_COMMIT = sa.select(sa.func.set_config("synchronous_commit", "on", True))

# Built once: built per call, a claim and an offset record took 5.1 ms together on an idle
# database, 1.7 ms prebuilt (SQLAlchemy builds, keys and looks up a statement every time).
_LEASE_END = sa.func.now() + sa.func.make_interval(0, 0, 0, 0, 0, 0, sa.bindparam("lease_s", type_=sa.Float))
_CLAIM = (sa.update(uploads)
          .where(uploads.c.id == sa.bindparam("upload_id"), uploads.c.owner_id == sa.bindparam("claimant"), _live,
                 sa.or_(uploads.c.lock_until.is_(None), uploads.c.lock_until < sa.func.now()), _ASYNC_COMMIT == "off")
          .values(lock_until=_LEASE_END)
          .returning(*uploads.c))
_RENEW = (sa.update(uploads)
          .where(uploads.c.id == sa.bindparam("upload_id"), _live, _ASYNC_COMMIT == "off")
          .values(lock_until=_LEASE_END))
_CLAIM_WITH_ROOM = _CLAIM.returning(*quotas.room_columns(uploads.c.owner_id, uploads.c.path))
_RECORD_OFFSET = (sa.update(uploads)  # and release the claim
                  .where(uploads.c.id == sa.bindparam("upload_id"), uploads.c.offset == sa.bindparam("from_offset"))
                  .values(offset=sa.bindparam("to_offset"), lock_until=None))


def lease_s(settings: Settings) -> float:
    """How long a claim lasts unless renewed: twice the longest silence a live body may keep
    (MEDIAD_BODY_TIMEOUT_S), so a stalled client frees the upload within a minute by default."""
    return 2 * settings.body_timeout_s


async def _claim(conn: AsyncConnection, upload_id: uuid.UUID, owner_id: uuid.UUID, lease: float, *,
                 with_room: bool = False) -> Row[Any] | None:
    """Lease the upload to this request: its row, and with `with_room` the owner's quota room."""
    statement = _CLAIM_WITH_ROOM if with_room else _CLAIM
    return (await conn.execute(statement, {"upload_id": upload_id, "claimant": owner_id, "lease_s": lease})).first()


async def _holding(reader: AsyncEngine, upload_id: uuid.UUID, lease: float, claimed_at: float,
                   work: Callable[[], Awaitable[T]]) -> T:
    """`work()` under a claim renewed every sixth of its length. A PATCH can outlast any fixed
    lease (a slow link, a large chunk); once its lease ran out a retry could claim the upload and
    write the same bytes, and either one's undo would cut off the other's. So if the upload is gone,
    or half the lease passed without a renewal, `work` is cancelled instead."""
    lost: list[MediaError] = []
    done = anyio.Event()
    with anyio.CancelScope() as scope:
        keeper = asyncio.create_task(_keep(reader, upload_id, lease, claimed_at, done, scope, lost))
        try:
            return await work()
        finally:
            done.set()
            with anyio.CancelScope(shield=True):
                await keeper  # never cancelled mid-statement: that can leave a pooled connection broken
    raise lost[0]  # reached only when the keeper cancelled `work`


async def _keep(reader: AsyncEngine, upload_id: uuid.UUID, lease: float, held_from: float, done: anyio.Event,
                scope: anyio.CancelScope, lost: list[MediaError]) -> None:
    while True:
        with anyio.move_on_after(lease / 6):
            await done.wait()
        if done.is_set():
            return
        started = time.monotonic()
        try:  # a statement that hangs gives up after the engine's command timeout
            async with reader.connect() as conn:
                renewed = (await conn.execute(_RENEW, {"upload_id": upload_id, "lease_s": lease})).rowcount == 1
        except DATABASE_UNAVAILABLE:
            if time.monotonic() - held_from < lease / 2:
                continue  # try again; half the lease is left to stop in
            lost.append(ServiceUnavailable("the database stopped answering, so this PATCH could not keep its "
                                           "hold on the upload", retry_after=5))
        else:
            if renewed:
                held_from = started
                continue
            lost.append(NotFound("no such upload (it expired)"))
        scope.cancel()
        return


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
    checksum = _checksum_of(request)
    state.storage.check_reserve(length)
    (await quotas.room(state.reader, owner_id, path)).check(length)

    upload_id = uuid.uuid4()
    expires_at = datetime.now(UTC) + timedelta(seconds=state.settings.upload_expire_s)
    await anyio.to_thread.run_sync(state.storage.create_partial, upload_id)
    try:
        async with state.engine.begin() as conn:
            await conn.execute(sa.insert(uploads).values(
                id=upload_id, owner_id=owner_id, length=length, name=name, path=path,
                node=state.storage.node_id, expires_at=expires_at))
    except BaseException:
        await anyio.to_thread.run_sync(state.storage.remove_partial, upload_id)
        raise
    headers = {"Location": f"/uploads/{upload_id}", "Upload-Expires": _http_date(expires_at)}
    body_follows = media_type(request.headers.get("content-type")) == OFFSET_STREAM
    if body_follows or length == 0:
        try:
            offset, file_id, _ = await _patch(request, upload_id, owner_id, offset=0, checksum=checksum)
        except BaseException:  # the client never learnt where the upload is: it could not resume it
            with anyio.CancelScope(shield=True), contextlib.suppress(*DATABASE_UNAVAILABLE):
                async with state.engine.begin() as conn:
                    await conn.execute(sa.delete(uploads).where(uploads.c.id == upload_id))
                await _discard_bytes(state.storage, state.tus_hashers, upload_id)
            raise
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
    owner_id = await authenticate(request, cached=True)
    upload_id = parse_file_id(request.path_params["upload_id"])
    if media_type(request.headers.get("content-type")) != OFFSET_STREAM:
        raise UnsupportedMediaType(f"PATCH needs Content-Type: {OFFSET_STREAM}")
    offset = _int_header(request, "upload-offset")
    if offset is None:
        raise BadRequest("Upload-Offset is required")
    checksum = _checksum_of(request)
    new_offset, file_id, expires_at = await _patch(request, upload_id, owner_id, offset=offset, checksum=checksum)
    # The expiration extension: every PATCH answer of an upload that will expire says when.
    headers = {"Upload-Offset": str(new_offset), "Upload-Expires": _http_date(expires_at)}
    if file_id is not None:
        headers["Mediad-File-Id"] = str(file_id)
    return Response(status_code=204, headers=headers)


@_tus
async def terminate(request: Request) -> Response:
    state = request.app.state
    owner_id = await authenticate(request)
    upload_id = parse_file_id(request.path_params["upload_id"])
    async with state.engine.begin() as conn:
        row = await _claim(conn, upload_id, owner_id, lease_s(state.settings))
        if row is None:
            raise (Locked("a PATCH is writing this upload") if await _visible(conn, upload_id, owner_id)
                   else NotFound("no such upload"))
        await conn.execute(_DURABLE_COMMIT)  # the claim made this transaction's commit asynchronous
        await conn.execute(sa.delete(uploads).where(uploads.c.id == upload_id))
    await _discard_bytes(state.storage, state.tus_hashers, upload_id)
    return Response(status_code=204)


async def _discard_bytes(storage: Storage, hashes: Hashes, upload_id: uuid.UUID) -> None:
    """What an upload whose row is gone leaves: its cached hash and its partial file."""
    hashes.drop(upload_id)
    await anyio.to_thread.run_sync(storage.remove_partial, upload_id)


async def _find(request: Request) -> Row[Any]:
    owner_id = await authenticate(request)
    upload_id = parse_file_id(request.path_params["upload_id"])
    async with request.app.state.reader.connect() as conn:
        row = await _visible(conn, upload_id, owner_id)
    if row is None:
        raise NotFound("no such upload (or it expired)")
    return row


# ---- appending ----------------------------------------------------------------------------------

class Hashes:
    """sha256 of each live upload's bytes so far, so a PATCH need not re-read the partial file.
    An entry goes when its upload completes or is terminated, and those of uploads that expired
    (abandoned by their clients) are pruned, at most once a minute, as new entries come."""

    _PRUNE_EVERY_S = 60.0

    def __init__(self) -> None:
        self._entries: dict[uuid.UUID, tuple[int, Hasher, datetime]] = {}
        self._next_prune = 0.0

    def get(self, upload_id: uuid.UUID, offset: int) -> Hasher | None:
        entry = self._entries.get(upload_id)
        return entry[1] if entry is not None and entry[0] == offset else None

    def put(self, upload_id: uuid.UUID, offset: int, hasher: Hasher, expires_at: datetime) -> None:
        self._entries[upload_id] = (offset, hasher, expires_at)
        now = time.monotonic()
        if now >= self._next_prune:
            self._next_prune = now + self._PRUNE_EVERY_S
            wall = datetime.now(UTC)
            for key in [key for key, entry in self._entries.items() if entry[2] <= wall]:
                del self._entries[key]

    def drop(self, upload_id: uuid.UUID) -> None:
        self._entries.pop(upload_id, None)

    def __len__(self) -> int:
        return len(self._entries)


class Appended(NamedTuple):
    offset: int
    file_id: uuid.UUID | None  # the File, once the upload is complete
    expires_at: datetime


async def _patch(request: Request, upload_id: uuid.UUID, owner_id: uuid.UUID, *, offset: int,
                 checksum: tuple[str, bytes] | None) -> Appended:
    """Claim the upload, append the body at `offset`, make it durable; → where it stands now."""
    state = request.app.state
    storage: Storage = state.storage
    lease = lease_s(state.settings)
    # Single statements in autocommit: the claim (with the quota room), and on success one UPDATE
    # that records the new offset and releases the claim together: two round trips to the database
    # and one durable commit per PATCH (the token check is the lookup cache's when it can be).
    claimed_at = time.monotonic()
    async with state.reader.connect() as conn:
        row = await _claim(conn, upload_id, owner_id, lease, with_room=True)
        if row is None:
            raise (Locked("another PATCH is writing this upload; retry when it is done")
                   if await _visible(conn, upload_id, owner_id) else NotFound("no such upload (or it expired)"))
    try:
        if row.node != storage.node_id:
            raise ServiceUnavailable("this upload's bytes are on another mediad node", retry_after=5)
        if row.file_id is not None:
            raise Conflict("this upload is complete")
        if offset != row.offset:
            raise Conflict(f"Upload-Offset is {offset} but the upload is at {row.offset}")
        # Other uploads may have used the room since creation: refuse before taking more bytes.
        quotas.Room.from_row(row).check(row.length)
        hashes: Hashes = state.tus_hashers
        # Only the writing needs the keeper: what follows is short, and an offset record or the
        # File's transaction must not be cancelled halfway.
        writer = await _holding(state.reader, row.id, lease, claimed_at,
                                lambda: _append(request, storage, hashes, row, checksum))
        return await _conclude(request, hashes, row, writer)
    except BaseException:
        # Also after the claim was released (an upload swept meanwhile, or a failure once the File
        # exists): a claim taken since then is on a finished or missing upload, so nothing writes.
        with anyio.CancelScope(shield=True):
            async with state.reader.connect() as conn:
                await conn.execute(sa.update(uploads).where(uploads.c.id == upload_id).values(lock_until=None))
        raise


async def _conclude(request: Request, hashes: Hashes, row: Row[Any],
                    writer: BlobWriter) -> Appended:
    """The appended bytes count from here: as the File if they end the upload (a body whose
    framing was cut off after its last byte included), else as the new offset; either way the
    statement that records them releases the claim."""
    state = request.app.state
    new_offset = row.offset + writer.size
    if new_offset == row.length:
        file_id = await _complete(state.engine, state.storage, state.replicator, row, writer.sha256, state.prober)
        hashes.drop(row.id)
        return Appended(new_offset, file_id, row.expires_at)
    async with state.reader.connect() as conn:
        recorded = await conn.execute(_RECORD_OFFSET, {"upload_id": row.id, "from_offset": row.offset,
                                                       "to_offset": new_offset})
    if recorded.rowcount != 1:  # expired and swept while this PATCH wrote
        raise NotFound("no such upload (it expired)")
    hashes.put(row.id, new_offset, writer.sha256, row.expires_at)
    return Appended(new_offset, None, row.expires_at)


async def _append(request: Request, storage: Storage, hashes: Hashes, row: Row[Any],
                  checksum: tuple[str, bytes] | None) -> BlobWriter:
    """The body onto the partial file at the upload's offset, durably; → the finished writer.
    A body cut off keeps what arrived; a chunk that fails its checksum leaves nothing."""
    whole = (await _whole_hasher(storage, hashes, row)).copy()  # the cached one changes only on success
    chunk_hasher = CHECKSUMS[checksum[0]]() if checksum else None
    writer = BlobWriter.append(storage, storage.partial_path(row.id), row.offset,
                               max_bytes=row.length - row.offset, sha256=whole,
                               extra=[chunk_hasher] if chunk_hasher is not None else [],
                               too_large=f"the body goes past Upload-Length ({row.length} bytes)")
    cut = False
    try:
        try:
            async for chunk in request.stream():
                await writer.write(chunk)
        except ClientDisconnect:
            cut = True
        if chunk_hasher is not None and checksum is not None and cut:
            raise BadRequest("the body was cut off, so its Upload-Checksum cannot be verified")
        await writer.finish()  # fsynced: an acknowledged offset is a durable offset
        if chunk_hasher is not None and checksum is not None and chunk_hasher.digest() != checksum[1]:
            raise ChecksumMismatch(f"the chunk's {checksum[0]} does not match Upload-Checksum; it was discarded")
    except BaseException:
        await writer.abort()  # the partial file is cut back to the recorded offset
        raise
    return writer


async def _complete(engine: AsyncEngine, storage: Storage, replicator: Replicator | None, row: Row[Any],
                    whole: Hasher, prober: Prober | None) -> uuid.UUID:
    """The last chunk is durable: make the File, and only then acknowledge the final offset."""
    partial = storage.partial_path(row.id)
    temp = storage.temp_path(uuid.uuid4())
    head = await anyio.to_thread.run_sync(_link_and_head, partial, temp)
    blob = Blob(temp, row.length, whole.hexdigest(), head)

    async def finished(conn: AsyncConnection, file_row: Row[Any]) -> None:
        await conn.execute(sa.update(uploads).where(uploads.c.id == row.id)
                           .values(offset=row.length, file_id=file_row.id, lock_until=None))

    try:
        file_row, _ = await commit_upload(engine, storage, replicator, row.owner_id, blob, name=row.name,
                                          path=row.path, also=finished, prober=prober)
    finally:
        await anyio.to_thread.run_sync(lambda: temp.unlink(missing_ok=True))
    await anyio.to_thread.run_sync(storage.remove_partial, row.id)
    return uuid.UUID(str(file_row.id))


async def _whole_hasher(storage: Storage, hashes: Hashes, row: Row[Any]) -> Hasher:
    """sha256 of the bytes so far: kept in memory while the upload is live; after a restart, or on
    another process, rebuilt once from the partial file."""
    cached = hashes.get(row.id, row.offset)
    if cached is not None:
        return cached
    hasher = await anyio.to_thread.run_sync(_hash_prefix, storage.partial_path(row.id), row.offset)
    hashes.put(row.id, row.offset, hasher, row.expires_at)
    return hasher


# ---- blocking file work (run in threads) ---------------------------------------------------------

def _link_and_head(partial: Path, temp: Path) -> bytes:
    """A second name for the finished partial file: committing moves that one, so if committing
    fails the upload's bytes are still there for a retry of the last PATCH."""
    os.link(partial, temp)
    with open(temp, "rb") as file:
        return file.read(HEAD_BYTES)


def _hash_prefix(path: Path, length: int) -> Hasher:
    hasher = hashlib.sha256()
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NotFound("this upload's partial file is gone") from None
    try:
        for _ in read_span(fd, 0, length, [hasher]):
            pass
    except TruncatedFile:
        raise NotFound("this upload's partial file is shorter than its offset") from None
    finally:
        os.close(fd)
    return hasher

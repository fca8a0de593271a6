"""Receiving uploads: multipart and raw bodies streamed to disk, then committed as Files."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from email.message import Message
from email.utils import collapse_rfc2231_value
from typing import Any

import anyio
from sqlalchemy.engine import Row
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse

from . import db, quotas, webhooks
from .auth import authenticate
from .cloud import Replicator, cloud_key
from .errors import BadRequest, InsufficientStorage, PayloadTooLarge, Unprocessable
from .files import file_json
from .formdata import (
    BaseTarget,
    Envelope,
    LimitExceeded,
    MaxSizeValidator,
    ParseFailedException,
    StreamingFormDataParser,
    ValidationError,
    ValueTarget,
    parse_content_boundary,
)
from .media import Prober
from .names import (
    MAX_PATH_CHARS,
    clean_name,
    clean_path,
    detect_format,
    extension_of,
    filename_from_disposition,
    media_type,
    place,
)
from .storage import Blob, Storage, is_disk_full
from .writer import BlobWriter

__all__ = ["clean_name", "clean_path", "commit_upload", "place", "receive_multipart"]

MULTIPART_ENVELOPE = 64 * 1024  # allowance for boundaries and part headers over the file's bytes
MAX_PARTS = 100  # a file, a path and whatever else a web form sends along
MAX_PART_HEADER_BYTES = MULTIPART_ENVELOPE  # the headers of all parts together


# ---- committing ---------------------------------------------------------------------------------

AlsoInTransaction = Callable[[AsyncConnection, Row[Any]], Awaitable[None]]


async def commit_upload(engine: AsyncEngine, storage: Storage, replicator: Replicator | None,
                        owner_id: uuid.UUID, blob: Blob, *, name: str, path: str | None,
                        also: AlsoInTransaction | None = None, prober: Prober | None = None
                        ) -> tuple[Row[Any], bool]:
    """Turn a finished temp file into a File: into place durably, then the row (insert or replace
    at `path`). Returns the row and whether it replaced an existing file. The one path every kind
    of upload takes. On a failure before COMMIT the blob is gone and no row was written; on one
    during COMMIT the blob stays, for the File that may have been committed or for the cleanup."""
    blob_id = uuid.uuid4()
    values = {
        "id": uuid.uuid4(), "owner_id": owner_id, "name": name, "extension": extension_of(name),
        "format": detect_format(blob.head, name), "size": blob.size, "sha256": blob.sha256,
        "path": path, "blob_id": blob_id, "node": storage.node_id,
    }
    try:
        await anyio.to_thread.run_sync(storage.commit, blob, blob_id)
    except OSError as exc:
        if is_disk_full(exc):
            raise InsufficientStorage("the server's disk is full") from exc
        raise
    committing = False
    try:
        async with engine.begin() as conn:
            row, displaced = await file_from_upload(conn, values, also)
            committing = True  # leaving the block sends COMMIT
    except BaseException:
        # Before COMMIT the row cannot exist: the blob goes. Once COMMIT is sent, a failure (the
        # connection lost, the task cancelled) leaves the outcome unknown: the row may be there,
        # and unlinking its blob would lose the file. An unreferenced blob is the cleanup's to
        # remove (an orphan, after its grace or at the next start), a referenced one stays.
        if not committing:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(storage.remove_blob, blob_id)
        raise
    if displaced is not None:
        await anyio.to_thread.run_sync(storage.remove_content, displaced)
    if replicator is not None:
        replicator.enqueue(row.id)
        if displaced is not None:
            replicator.deletions_queued()
    if prober is not None:
        prober.committed()  # probe the new content now rather than at the next poll
    return row, displaced is not None


async def file_from_upload(conn: AsyncConnection, values: dict[str, Any], also: AlsoInTransaction | None
                           ) -> tuple[Row[Any], uuid.UUID | None]:
    """Where an upload becomes a File, inside the one transaction that stands or falls with it:
    the row (inserted, or replacing the file at its path), `also` (a record's row), and the cloud
    deletion of displaced content. Work that must commit with every new File belongs here.
    → (the row, the blob id of the content it displaced, if any)."""
    await quotas.reserve(conn, values["owner_id"], values["size"], values["path"])
    row, displaced = await db.put_file(conn, values)
    await webhooks.emit_file(conn, "file.replaced" if displaced else "file.created", row, row.node)
    if also is not None:
        await also(conn, row)
    if displaced is not None:  # the old content's cloud copy goes too, with retries
        await db.queue_deletion(conn, cloud_key(displaced))
    return row, displaced


# ---- receiving ----------------------------------------------------------------------------------

def _declared_length(request: Request) -> int | None:
    value = request.headers.get("content-length")
    if value is None:
        return None
    if not (value.isascii() and value.isdigit()):  # "²".isdigit() is true, and int("²") raises
        raise BadRequest("Content-Length is not a number")
    return int(value)


def _check_declared(request: Request, storage: Storage, limit: int, what: str) -> int | None:
    declared = _declared_length(request)
    if declared is not None:
        if declared > limit:
            raise PayloadTooLarge(f"the {what} declares {declared} bytes, over the limit of {limit}")
        storage.check_reserve(declared)
    return declared


async def _body(request: Request) -> AsyncIterator[bytes]:
    try:
        async for chunk in request.stream():
            yield chunk
    except ClientDisconnect:
        raise BadRequest("the client disconnected before the body was complete") from None


class _FilePart(BaseTarget):
    """Collects the `file` part's bytes for the async writer, counting parts (the parser feeds a
    second part with the same name into the same target without complaint)."""

    def __init__(self) -> None:
        super().__init__()
        self.parts = 0
        self.finished = False
        self.pending: list[bytes] = []

    def on_start(self) -> None:
        self.parts += 1

    def on_data_received(self, chunk: bytes) -> None:
        if self.parts == 1:
            self.pending.append(chunk)

    def on_finish(self) -> None:
        self.finished = True


class _TextField(ValueTarget):
    """A small text field, counting parts: the parser would concatenate a repeated field."""

    def __init__(self) -> None:
        super().__init__(validator=MaxSizeValidator(MAX_PATH_CHARS * 4))
        self.parts = 0

    def on_start(self) -> None:
        self.parts += 1


class _Form:
    """One multipart body as it streams past: the framing checks, the parser and its targets."""

    def __init__(self, request: Request, fields: tuple[str, ...]) -> None:
        try:
            self.parser = StreamingFormDataParser(headers=request.headers)
            self.envelope = Envelope(parse_content_boundary(request.headers), max_parts=MAX_PARTS,
                                     max_header_bytes=MAX_PART_HEADER_BYTES)
        except ParseFailedException as exc:
            raise BadRequest(f"malformed multipart/form-data: {exc}") from None
        self.fields = fields
        self.file = _FilePart()
        self.texts = {name: _TextField() for name in fields}
        self.parser.register("file", self.file)
        for name, target in self.texts.items():
            self.parser.register(name, target)

    def feed(self, chunk: bytes) -> list[bytes]:
        """Parse one chunk; → the `file` part's bytes in it."""
        try:
            # First: what is over a cap or malformed never reaches the parser's buffers, nor does
            # the epilogue after the close delimiter.
            body = self.envelope.feed(chunk)
            self.parser.data_received(chunk if body == len(chunk) else chunk[:body])
        except LimitExceeded as exc:
            raise BadRequest(str(exc)) from None
        except ValidationError:
            raise Unprocessable(f"a text field ({', '.join(self.fields)}) is too long") from None
        except (ParseFailedException, UnicodeDecodeError) as exc:  # part headers must be UTF-8
            raise BadRequest(f"malformed multipart/form-data: {exc}") from None
        if self.file.parts > 1:
            raise BadRequest("the body has more than one part named 'file'")
        for name, target in self.texts.items():
            if target.parts > 1:
                raise BadRequest(f"the body has more than one field named {name!r}")
        data, self.file.pending = self.file.pending, []
        return data

    def end(self) -> tuple[str | None, dict[str, str]]:
        """The body is over: → (the `file` part's filename, the text fields present)."""
        if self.file.parts == 0:
            raise BadRequest("the multipart body has no part named 'file'")
        # The parser does not notice a body cut off before its close delimiter.
        if not self.envelope.closed or not self.file.finished:
            raise BadRequest("the multipart body ended before its closing boundary")
        values = {}
        for name, target in self.texts.items():
            if target.parts:
                try:
                    values[name] = target.value.decode("utf-8")
                except UnicodeDecodeError:
                    raise Unprocessable(f"the {name} field is not valid UTF-8") from None
        return _file_part_filename(self.envelope.dispositions), values


async def receive_multipart(request: Request, writer: BlobWriter, storage: Storage, max_bytes: int,
                            fields: tuple[str, ...] = ("path",)) -> tuple[str | None, dict[str, str]]:
    """Stream the one `file` part into `writer`; → (its filename, the text `fields` present)."""
    limit = max_bytes + MULTIPART_ENVELOPE
    _check_declared(request, storage, limit, "multipart body")
    form = _Form(request, fields)
    received = 0
    async for chunk in _body(request):
        received += len(chunk)
        if received > limit:
            raise PayloadTooLarge(f"the multipart body is over the limit of {max_bytes} bytes plus envelope")
        for data in form.feed(chunk):
            await writer.write(data)
    return form.end()


def _file_part_filename(dispositions: list[str]) -> str | None:
    """The `file` part's filename, read from its raw Content-Disposition as for a request header:
    the parser's own reading unescapes every backslash in a quoted filename, but browsers send a
    Windows path's backslashes raw (WHATWG), and those separators must survive to be split on."""
    for header in dispositions:
        message = Message()
        message["content-disposition"] = header
        name = message.get_param("name", header="content-disposition")
        if name is not None and collapse_rfc2231_value(name) == "file":  # name= or RFC 2231 name*=
            return filename_from_disposition(header)
    return None


async def _store(request: Request, owner_id: uuid.UUID, *, multipart: bool, name: str | None,
                 path: str | None) -> tuple[Row[Any], bool]:
    state = request.app.state
    storage: Storage = state.storage
    max_bytes: int = state.settings.max_upload_bytes
    if multipart:
        # Where it goes (the path field, else ?path= and, for a folder, the part's filename) is
        # known only once the body is read: any one of the user's files may be the one it frees.
        room = await quotas.room_unplaced(state.reader, owner_id)
    else:  # the path a replace would free: a folder path's file name is in the query already
        room = await quotas.room(state.reader, owner_id, place(path, name)[1] if path is not None else None)
    _check_quota_declared(request, room, max_bytes, multipart)
    writer = BlobWriter.create(storage, max_bytes=room.cap(max_bytes))  # stops at the quota mid-stream too
    try:
        if multipart:
            filename, values = await receive_multipart(request, writer, storage, max_bytes)
            path_value = values.get("path")
            path = clean_path(path_value) if path_value else path  # the field, else ?path=
            name, path = place(path, filename or name)
        else:
            _check_declared(request, storage, max_bytes, "body")
            async for chunk in _body(request):
                await writer.write(chunk)
            name, path = place(path, name)
        blob = await writer.finish()
        return await commit_upload(state.engine, storage, state.replicator, owner_id, blob, name=name, path=path,
                                   prober=state.prober)
    except PayloadTooLarge as exc:
        await writer.abort()
        raise room.mapped(exc, max_bytes, writer.size) from None
    except BaseException:
        await writer.abort()
        raise


def _check_quota_declared(request: Request, room: quotas.Room, max_bytes: int, multipart: bool) -> None:
    """507 before the body when its declared length cannot fit the quota (a length over the upload
    limit is left to the 413). A multipart body is counted without its envelope allowance, and with
    the most a replace could free (`quotas.room_unplaced`)."""
    declared = _declared_length(request)
    envelope = MULTIPART_ENVELOPE if multipart else 0
    if declared is not None and declared <= max_bytes + envelope:
        room.check(declared - envelope)


def _created(row: Row[Any], replaced: bool, node: uuid.UUID | None) -> JSONResponse:
    status = 200 if replaced else 201
    return JSONResponse(file_json(row, node), status_code=status, headers={"Location": f"/files/{row.id}"})


async def post_files(request: Request) -> JSONResponse:
    owner_id = await authenticate(request)
    multipart = media_type(request.headers.get("content-type")) == "multipart/form-data"
    name = request.query_params.get("name") or filename_from_disposition(
        request.headers.get("content-disposition"))
    raw_path = request.query_params.get("path")
    path = clean_path(raw_path) if raw_path is not None else None
    if not multipart:
        place(path, name)  # refuse a nameless or badly named upload before reading its body
    row, replaced = await _store(request, owner_id, multipart=multipart, name=name, path=path)
    return _created(row, replaced, request.app.state.storage.node_id)


async def put_files(request: Request) -> JSONResponse:
    owner_id = await authenticate(request)
    raw_path = request.query_params.get("path")
    if raw_path is None:
        raise Unprocessable("PUT /files needs ?path=/dir/name.ext")
    path = clean_path(raw_path)
    name = request.query_params.get("name") or filename_from_disposition(
        request.headers.get("content-disposition"))
    place(path, name)
    row, replaced = await _store(request, owner_id, multipart=False, name=name, path=path)
    return _created(row, replaced, request.app.state.storage.node_id)

"""Receiving uploads: multipart and raw bodies streamed to disk, then committed as Files."""

from __future__ import annotations

import mimetypes
import os
import re
import unicodedata
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from email.message import Message
from email.utils import collapse_rfc2231_value
from typing import Any

import anyio
import filetype
from sqlalchemy.engine import Row
from sqlalchemy.ext.asyncio import AsyncConnection
from starlette.datastructures import State
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse

from . import db, quotas
from .auth import authenticate
from .cloud import cloud_key
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
from .storage import Blob, BlobWriter, is_disk_full

MULTIPART_ENVELOPE = 64 * 1024  # allowance for boundaries and part headers over the file's bytes
MAX_PARTS = 100  # a file, a path and whatever else a web form sends along
MAX_PART_HEADER_BYTES = MULTIPART_ENVELOPE  # the headers of all parts together
_MAX_NAME_CHARS = 1024
_MAX_PATH_CHARS = 4096
_SEPARATORS = re.compile(r"[/\\]")


# ---- names and paths (pure) ---------------------------------------------------------------------

def _has_control(text: str) -> bool:
    return any(unicodedata.category(ch) == "Cc" for ch in text)


def clean_name(raw: str) -> str:
    """The client's file name as metadata: last path component, NFC; never a disk path."""
    if _has_control(raw):
        raise Unprocessable("the file name contains NUL or control characters")
    name = unicodedata.normalize("NFC", _SEPARATORS.split(raw)[-1])
    if name in ("", ".", ".."):
        raise Unprocessable(f"{raw!r} is not a usable file name")
    if len(name) > _MAX_NAME_CHARS:
        raise Unprocessable(f"the file name is longer than {_MAX_NAME_CHARS} characters")
    return name


def clean_path(raw: str) -> str:
    """An absolute virtual path, `//` collapsed; a trailing `/` marks a folder."""
    if _has_control(raw):
        raise Unprocessable("the path contains NUL or control characters")
    if not raw.startswith("/"):
        raise Unprocessable("the path must be absolute (start with /)")
    if "\\" in raw:
        raise Unprocessable("the path must not contain backslashes")
    path = re.sub(r"/{2,}", "/", unicodedata.normalize("NFC", raw))
    if any(segment in (".", "..") for segment in path.split("/")):
        raise Unprocessable("the path must not contain . or .. segments")
    if len(path) > _MAX_PATH_CHARS:
        raise Unprocessable(f"the path is longer than {_MAX_PATH_CHARS} characters")
    return path


def place(path: str | None, name: str | None) -> tuple[str, str | None]:
    """(name, path) of the File: a folder path keeps the file's own name inside it; a full path
    names the file itself."""
    if path is not None and not path.endswith("/"):
        return clean_name(path.rsplit("/", 1)[-1]), path
    if name is None:
        raise Unprocessable("a file name is required: a filename in the upload, ?name= or a path")
    name = clean_name(name)
    return name, (path + name if path is not None else None)


def extension_of(name: str) -> str:
    return os.path.splitext(name)[1][1:].lower()


def detect_format(head: bytes, name: str) -> str:
    """MIME type from the leading bytes, then the name's extension; the client's type is ignored."""
    kind = filetype.guess(head) if head else None
    if kind is not None:
        return str(kind.mime)
    return mimetypes.guess_type(name, strict=False)[0] or "application/octet-stream"


def filename_from_disposition(header: str | None) -> str | None:
    """The filename (or RFC 6266 filename*) of a Content-Disposition header."""
    if not header:
        return None
    try:  # Starlette decodes headers as latin-1; clients that send raw UTF-8 mean UTF-8
        header = header.encode("latin-1").decode("utf-8")
    except UnicodeError:
        pass
    message = Message()
    message["content-disposition"] = header
    # RFC 6266 §4.3: filename* wins over the plain fallback wherever it appears; the email
    # package decodes both to "filename", telling the extended one apart only as a tuple.
    params = message.get_params(header="content-disposition") or []
    for key, value in params:
        if key.lower() == "filename" and isinstance(value, tuple):
            return str(collapse_rfc2231_value(value))
    filename = message.get_filename()
    return str(filename) if filename is not None else None


# ---- committing ---------------------------------------------------------------------------------

async def commit_upload(state: State, owner_id: uuid.UUID, blob: Blob, *, name: str, path: str | None,
                        also: Callable[[AsyncConnection, Row[Any]], Awaitable[None]] | None = None
                        ) -> tuple[Row[Any], bool]:
    """Turn a finished temp file into a File: into place durably, then the row (insert or replace
    at `path`). Returns the row and whether it replaced an existing file. The one path every kind
    of upload takes; on any failure the blob is gone and no row was written."""
    storage = state.storage
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
    try:
        async with state.engine.begin() as conn:
            await quotas.reserve(conn, owner_id, blob.size, path)
            row, displaced = await db.put_file(conn, values)
            if also is not None:  # more rows that stand or fall with this File (a record)
                await also(conn, row)
            if displaced is not None:  # the old content's cloud copy goes too, with retries
                await db.queue_deletion(conn, cloud_key(displaced))
    except BaseException:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(storage.remove_blob, blob_id)
        raise
    if displaced is not None:
        await anyio.to_thread.run_sync(storage.remove_blob, displaced)
    if state.replicator is not None:
        state.replicator.enqueue(row.id)
        if displaced is not None:
            state.replicator.deletions_queued()
    return row, displaced is not None


# ---- receiving ----------------------------------------------------------------------------------

def _declared_length(request: Request) -> int | None:
    value = request.headers.get("content-length")
    if value is None:
        return None
    if not value.isdigit():
        raise BadRequest("Content-Length is not a number")
    return int(value)


def _check_declared(request: Request, limit: int, what: str) -> int | None:
    declared = _declared_length(request)
    if declared is not None:
        if declared > limit:
            raise PayloadTooLarge(f"the {what} declares {declared} bytes, over the limit of {limit}")
        request.app.state.storage.check_reserve(declared)
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
        super().__init__(validator=MaxSizeValidator(_MAX_PATH_CHARS * 4))
        self.parts = 0

    def on_start(self) -> None:
        self.parts += 1


async def receive_multipart(request: Request, writer: BlobWriter,
                            fields: tuple[str, ...] = ("path",)) -> tuple[str | None, dict[str, str]]:
    """Stream the one `file` part into `writer`; → (its filename, the text `fields` present)."""
    max_bytes = request.app.state.settings.max_upload_bytes
    _check_declared(request, max_bytes + MULTIPART_ENVELOPE, "multipart body")
    try:
        parser = StreamingFormDataParser(headers=request.headers)
        envelope = Envelope(parse_content_boundary(request.headers), max_parts=MAX_PARTS,
                            max_header_bytes=MAX_PART_HEADER_BYTES)
    except ParseFailedException as exc:
        raise BadRequest(f"malformed multipart/form-data: {exc}") from None
    part = _FilePart()
    texts = {name: _TextField() for name in fields}
    parser.register("file", part)
    for name, target in texts.items():
        parser.register(name, target)

    received = 0
    async for chunk in _body(request):
        received += len(chunk)
        if received > max_bytes + MULTIPART_ENVELOPE:
            raise PayloadTooLarge(f"the multipart body is over the limit of {max_bytes} bytes plus envelope")
        try:
            envelope.feed(chunk)  # first: what is over a cap never reaches the parser's buffers
            parser.data_received(chunk)
        except LimitExceeded as exc:
            raise BadRequest(str(exc)) from None
        except ValidationError:
            raise Unprocessable(f"a text field ({', '.join(fields)}) is too long") from None
        except (ParseFailedException, UnicodeDecodeError) as exc:  # part headers must be UTF-8
            raise BadRequest(f"malformed multipart/form-data: {exc}") from None
        if part.parts > 1:
            raise BadRequest("the body has more than one part named 'file'")
        for name, target in texts.items():
            if target.parts > 1:
                raise BadRequest(f"the body has more than one field named {name!r}")
        for data in part.pending:
            await writer.write(data)
        part.pending.clear()

    if part.parts == 0:
        raise BadRequest("the multipart body has no part named 'file'")
    # The parser does not notice a body cut off before its close delimiter.
    if not envelope.closed or not part.finished:
        raise BadRequest("the multipart body ended before its closing boundary")
    values = {}
    for name, target in texts.items():
        if target.parts:
            try:
                values[name] = target.value.decode("utf-8")
            except UnicodeDecodeError:
                raise Unprocessable(f"the {name} field is not valid UTF-8") from None
    return _file_part_filename(envelope.dispositions, part.multipart_filename), values


def _file_part_filename(dispositions: list[str], parsed: str | None) -> str | None:
    """The `file` part's filename read from its raw Content-Disposition, as for a request header:
    the parser's own reading unescapes every backslash in a quoted filename, but browsers send a
    Windows path's backslashes raw (WHATWG), and those separators must survive to be split on."""
    for header in dispositions:
        message = Message()
        message["content-disposition"] = header
        if message.get_param("name", header="content-disposition") == "file":
            return filename_from_disposition(header)
    return parsed  # a name the parser matched in some other spelling (RFC 2231 name*=)


async def _receive_raw(request: Request, writer: BlobWriter) -> None:
    _check_declared(request, request.app.state.settings.max_upload_bytes, "body")
    async for chunk in _body(request):
        await writer.write(chunk)


async def _store(request: Request, owner_id: uuid.UUID, *, multipart: bool, name: str | None,
                 path: str | None) -> tuple[Row[Any], bool]:
    state = request.app.state
    max_bytes = state.settings.max_upload_bytes
    # The path a replace would free: a folder path's file name is in a raw upload's query already.
    replacing = place(path, name)[1] if path is not None and not multipart else path
    room = await quotas.room(state.reader, owner_id, replacing)
    _check_quota_declared(request, room, max_bytes, multipart)
    writer = state.storage.open_writer(room.cap(max_bytes))  # stops at the quota mid-stream too
    try:
        if multipart:
            filename, values = await receive_multipart(request, writer)
            path_value = values.get("path")
            path = clean_path(path_value) if path_value else path  # the field, else ?path=
            name, path = place(path, filename or name)
        else:
            await _receive_raw(request, writer)
            name, path = place(path, name)
        blob = await writer.finish()
        return await commit_upload(state, owner_id, blob, name=name, path=path)
    except PayloadTooLarge as exc:
        await writer.abort()
        raise room.mapped(exc, max_bytes, writer.size) from None
    except BaseException:
        await writer.abort()
        raise


def _check_quota_declared(request: Request, room: quotas.Room, max_bytes: int, multipart: bool) -> None:
    """507 before the body when its declared length cannot fit the quota (a length over the upload
    limit is left to the 413). A multipart body is counted without its envelope allowance; a path
    sent in its form field is not known yet, so only a ?path= replace is credited this early."""
    declared = _declared_length(request)
    envelope = MULTIPART_ENVELOPE if multipart else 0
    if declared is not None and declared <= max_bytes + envelope:
        room.check(declared - envelope)


def _created(row: Row[Any], replaced: bool, node: uuid.UUID | None) -> JSONResponse:
    status = 200 if replaced else 201
    return JSONResponse(file_json(row, node), status_code=status, headers={"Location": f"/files/{row.id}"})


async def post_files(request: Request) -> JSONResponse:
    owner_id = await authenticate(request)
    content_type = request.headers.get("content-type", "")
    multipart = content_type.split(";", 1)[0].strip().lower() == "multipart/form-data"
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

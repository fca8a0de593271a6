"""Downloads: by id or path, with ranges (RFC 9110 §14), conditionals (§13) and safe names.

The decisions (which ranges, which status, which headers) are pure functions; `BlobResponse`
only moves bytes. Full bodies go through the server's zero-copy `http.response.pathsend` where it
exists (Granian); otherwise the file is read in large chunks off the event loop.
"""

from __future__ import annotations

import email.utils
import errno
import logging
import os
import re
import secrets
import time
import unicodedata
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

import anyio
from sqlalchemy.engine import Row
from sqlalchemy.ext.asyncio import AsyncConnection
from starlette.datastructures import Headers, QueryParams
from starlette.requests import Request
from starlette.types import Receive, Scope, Send

from . import db, links
from .auth import UNKNOWN_TOKEN, accept_token, authenticate, bearer_token, token_hash
from .cache import LookupCache
from .cloud import CloudError, Store, cloud_key
from .errors import (
    MediaError,
    NotFound,
    PreconditionFailed,
    RangeNotSatisfiable,
    ServiceUnavailable,
    Unauthorized,
    Unprocessable,
)
from .files import parse_file_id
from .names import clean_path
from .storage import blob_relpath

log = logging.getLogger("mediad.downloads")

MAX_RANGES = 16  # more than this is refused by serving the whole body (RFC 9110 §14.2 advice)
_COALESCE_GAP = 128  # ranges closer than a multipart part header are served as one
_CHUNK = 256 * 1024
# At most 19 digits a position, enough for any size below 2**63: a longer run counts as malformed
# (the header is ignored) rather than reaching int(), which refuses more than 4,300 digits.
_RANGE_SPEC = re.compile(r"^(\d{0,19})-(\d{0,19})$")

Ranges = list[tuple[int, int]]  # half-open [start, end) byte intervals


# ---- pure decisions -----------------------------------------------------------------------------

def parse_ranges(header: str | None, size: int) -> Ranges | None:
    """The byte ranges to serve, or None to serve the whole body.

    Malformed headers, other units and too many ranges are ignored (200), as RFC 9110 §14.2
    allows; a valid header none of whose ranges overlaps the file raises 416.
    """
    if header is None:
        return None
    unit, sep, spec = header.partition("=")
    if not sep or unit.strip().lower() != "bytes":
        return None
    wanted: Ranges = []
    any_spec = False
    for element in spec.split(","):
        element = element.strip()
        if not element:
            continue  # empty list elements are allowed (RFC 9110 §5.6.1)
        match = _RANGE_SPEC.match(element)
        if match is None or match.group(0) == "-":
            return None
        first, last = match.groups()
        any_spec = True
        if first:
            start = int(first)
            if last and int(last) < start:
                return None  # invalid spec: the whole header is ignored
            end = min(int(last) + 1, size) if last else size
            if start < size:
                wanted.append((start, end))
        else:
            suffix = int(last)
            if suffix > 0 and size > 0:
                wanted.append((max(size - suffix, 0), size))
    if not any_spec:
        return None
    if not wanted:
        if size == 0 and all(e.strip().startswith("-") for e in spec.split(",") if e.strip()):
            return None  # a suffix of an empty body is the empty body
        raise RangeNotSatisfiable(size)
    merged = coalesce(wanted)
    if len(merged) > MAX_RANGES:
        return None
    return merged


def coalesce(ranges: Ranges) -> Ranges:
    """Sort and merge overlapping or nearly adjacent ranges so no byte is sent twice."""
    merged: Ranges = []
    for start, end in sorted(ranges):
        if merged and start <= merged[-1][1] + _COALESCE_GAP:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def _etags(header: str) -> list[str]:
    return [tag.strip() for tag in header.split(",") if tag.strip()]


def _http_date(text: str | None) -> datetime | None:
    if text is None:
        return None  # absent, the common case: no parse attempt (and its exception) per request
    try:
        parsed = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


def evaluate_preconditions(headers: Headers, etag: str, modified: datetime) -> int | None:
    """RFC 9110 §13.2.2, in its order: 412, 304, or None to go on."""
    if_match = headers.get("if-match")
    if if_match is not None:
        tags = _etags(if_match)
        if "*" not in tags and etag not in tags:  # strong comparison: W/ tags never match
            return 412
    else:
        since = _http_date(headers.get("if-unmodified-since"))
        if since is not None and modified > since:
            return 412
    if_none_match = headers.get("if-none-match")
    if if_none_match is not None:
        tags = [t.removeprefix("W/") for t in _etags(if_none_match)]  # weak comparison
        if "*" in tags or etag in tags:
            return 304
    else:
        since = _http_date(headers.get("if-modified-since"))
        if since is not None and modified <= since:
            return 304
    return None


def range_applies(headers: Headers, etag: str, last_modified: str | None) -> bool:
    """If-Range (RFC 9110 §13.1.5): the range only if the validator still matches, strongly.
    `last_modified` is None when the date is not a strong validator: no date matches then."""
    if_range = headers.get("if-range")
    if if_range is None:
        return True
    if_range = if_range.strip()
    if if_range.startswith('"') or if_range.startswith("W/"):
        return if_range == etag
    return last_modified is not None and if_range == last_modified


_FALLBACK_UNSAFE = re.compile(r"[^A-Za-z0-9 !#$&'()+,.=@\[\]^_`{}~-]")


def content_disposition(name: str, inline: bool = False) -> str:
    """RFC 6266 with an ASCII fallback and the exact name in RFC 8187 `filename*`."""
    return f"{'inline' if inline else 'attachment'}; {_filename_parameters(name)}"


def _filename_parameters(name: str) -> str:
    def ascii_only(text: str) -> str:
        # Letters that decompose keep their base letter (é → e, its accent dropped); every other
        # character with no ASCII form becomes one "_", so the fallback keeps the name's shape.
        folded = "".join(ch if ch.isascii() else "" if unicodedata.combining(ch) else "_"
                         for ch in unicodedata.normalize("NFKD", text))
        return _FALLBACK_UNSAFE.sub("_", folded)

    stem, extension = os.path.splitext(name)
    # A name with no ASCII in its stem still keeps its extension: "download.mp4", not "mp4".
    fallback = ((ascii_only(stem).strip(" .")[:150] or "download") + ascii_only(extension)[:20]).strip(" ")
    encoded = quote(name, safe="!#$&+-.^_`|~")
    return f"filename=\"{fallback}\"; filename*=UTF-8''{encoded}"


_Raw = list[tuple[bytes, bytes]]


def _raw(headers: dict[str, str]) -> _Raw:
    return [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]


@dataclass(slots=True)
class Representation:
    """A File as a download serves it, its header bytes built once: a hot file's many range
    requests then add only Content-Length/Content-Range. Kept by the lookup cache (cache.py)."""

    id: uuid.UUID
    owner_id: uuid.UUID
    path: str | None
    size: int
    format: str
    blob_id: uuid.UUID
    node: uuid.UUID | None
    cloud_state: str
    record: bool  # the File of an audio record: also served by the tokenless /record link
    etag: str
    modified: datetime  # at HTTP dates' one-second resolution
    # Two contents can share a Last-Modified second, so the date is a strong validator only while
    # the File has its first content (RFC 9110 §8.8.2.2); a replace keeps the id. None otherwise.
    strong_date: str | None
    sha256: str
    full: tuple[_Raw, _Raw]  # every representation header: (attachment, inline)
    not_modified: tuple[_Raw, _Raw]  # what a 304 repeats (RFC 9110 §15.4.5)
    cached_at: float
    local_path: str = ""  # the blob's path on this node's disk, once a download has asked

    @classmethod
    def from_row(cls, row: Row[Any], record: bool = False) -> Representation:
        modified = row.updated_at.astimezone(UTC).replace(microsecond=0)
        attachment = representation_headers(row, modified)
        parameters = attachment["content-disposition"].partition("; ")[2]
        inline = {**attachment, "content-disposition": f"inline; {parameters}"}
        keep = ("etag", "last-modified", "cache-control", "content-disposition")
        last_modified = attachment["last-modified"]
        return cls(row.id, row.owner_id, row.path, row.size, row.format, row.blob_id, row.node,
                   row.cloud_state, record, attachment["etag"], modified,
                   last_modified if row.updated_at == row.created_at else None, row.sha256,
                   (_raw(attachment), _raw(inline)),
                   (_raw({k: attachment[k] for k in keep}), _raw({k: inline[k] for k in keep})),
                   time.monotonic())


def representation_headers(row: Row[Any], modified: datetime) -> dict[str, str]:
    """The headers of every answer about the File (as an attachment; `?inline=1` swaps the kind)."""
    return {
        "etag": f'"{row.sha256}"',
        "last-modified": email.utils.format_datetime(modified, usegmt=True),
        "accept-ranges": "bytes",
        "content-type": row.format,
        "content-disposition": content_disposition(row.name),
        "cache-control": "private, no-cache",
        "x-content-type-options": "nosniff",
        # User content served from our origin must never run as our page.
        "content-security-policy": "sandbox",
    }


# ---- sending ------------------------------------------------------------------------------------

@dataclass(slots=True)
class _Plan:
    status: int
    headers: _Raw
    ranges: Ranges | None  # None: the whole body
    boundary: str = ""


def plan_response(method: str, headers: Headers, rep: Representation, inline: bool,
                  by_path: bool = False) -> _Plan:
    """Status, headers and byte ranges for a GET/HEAD of this File (no I/O).

    `by_path`: asked for as /download?path=. Another File can take that path over (a move with
    "replace", or a delete and an upload within the second) sharing its Last-Modified, so there a
    date in If-Range never matches: the new file's bytes spliced onto the old one's would be a
    corrupt download (RFC 9110 §13.1.5). The ETag, the content's sha256, still does. If-Modified-
    Since keeps the date, a weak comparison (§13.1.3): at worst a cache keeps a whole copy of the
    previous file, and a cache that has our ETag sends If-None-Match, which is evaluated instead.
    """
    outcome = evaluate_preconditions(headers, rep.etag, rep.modified)
    if outcome == 412:
        raise PreconditionFailed("If-Match or If-Unmodified-Since does not hold for this file")
    if outcome == 304:
        return _Plan(304, list(rep.not_modified[inline]), [])
    size, base = rep.size, rep.full[inline]
    ranges = None
    # Range handling is defined for GET only (RFC 9110 §14.2): HEAD describes the full 200.
    if method == "GET" and range_applies(headers, rep.etag, None if by_path else rep.strong_date):
        ranges = parse_ranges(headers.get("range"), size)
    if ranges is None:
        return _Plan(200, [*base, (b"content-length", b"%d" % size)], None)
    if len(ranges) == 1:
        start, end = ranges[0]
        return _Plan(206, [*base, (b"content-length", b"%d" % (end - start)),
                           (b"content-range", b"bytes %d-%d/%d" % (start, end - 1, size))], ranges)
    boundary = secrets.token_hex(16)
    length = sum(len(_part_header(boundary, rep.format, s, e, size)) + (e - s) + 2
                 for s, e in ranges) + len(_closing(boundary))
    content_type = f"multipart/byteranges; boundary={boundary}".encode("latin-1")
    headers_out = [(k, content_type if k == b"content-type" else v) for k, v in base]
    return _Plan(206, [*headers_out, (b"content-length", b"%d" % length)], ranges, boundary)


def _part_header(boundary: str, content_type: str, start: int, end: int, size: int) -> bytes:
    return (f"--{boundary}\r\nContent-Type: {content_type}\r\n"
            f"Content-Range: bytes {start}-{end - 1}/{size}\r\n\r\n").encode("latin-1")


def _closing(boundary: str) -> bytes:
    return f"--{boundary}--\r\n".encode("latin-1")


_nowait_reads = hasattr(os, "RWF_NOWAIT")


def _read_cached(fd: int, size: int, offset: int) -> bytes | None:
    """What of the span the page cache holds, read on the event loop (preadv2 with RWF_NOWAIT
    never waits for the disk); None when the disk is needed, so the caller reads in a thread.
    Media players send many small ranges of hot files: a thread hop each cost more than the read."""
    global _nowait_reads
    if not _nowait_reads:
        return None
    buffer = bytearray(size)
    try:
        read = os.preadv(fd, [buffer], offset, os.RWF_NOWAIT)
    except BlockingIOError:
        return None
    except OSError as exc:
        if exc.errno != errno.EOPNOTSUPP:
            raise
        _nowait_reads = False  # a filesystem without non-blocking buffered reads: threads only
        return None
    return bytes(memoryview(buffer)[:read]) if read else None


class LocalSource:
    """A blob on this server's disk, held open: a concurrent replace or eviction cannot swap it."""

    def __init__(self, fd: int, path: str) -> None:
        self.fd = fd
        self.path: str | None = path

    async def span(self, start: int, end: int) -> AsyncIterator[bytes]:
        while start < end:
            size = min(_CHUNK, end - start)
            chunk = _read_cached(self.fd, size, start) or await anyio.to_thread.run_sync(os.pread, self.fd, size, start)
            if not chunk:
                raise RuntimeError("the stored file is shorter than its recorded size")
            start += len(chunk)
            yield chunk

    def close(self) -> None:
        os.close(self.fd)


class CloudSource:
    """A blob read through from its verified cloud copy (the local one was evicted)."""

    path: str | None = None

    def __init__(self, store: Store, key: str) -> None:
        self.store = store
        self.key = key

    def span(self, start: int, end: int) -> AsyncIterator[bytes]:
        return self.store.read(self.key, start, end)

    def close(self) -> None:
        pass


class BlobResponse:
    """Sends a planned response from a local or cloud source (closed when done)."""

    def __init__(self, plan: _Plan, source: LocalSource | CloudSource, size: int, content_type: str) -> None:
        self.plan = plan
        self.source = source
        self.size = size
        self.content_type = content_type

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await self._send(scope, send)
        except OSError:
            pass  # the client went away (ASGI 2.4 send raises OSError); nothing left to do
        except CloudError as exc:
            # Headers are out; ending the response early makes the server drop the connection,
            # so the client sees a short body against Content-Length, never silent truncation.
            log.warning("read-through from the cloud failed mid-response: %s", exc)
            raise
        finally:
            self.source.close()

    async def _send(self, scope: Scope, send: Send) -> None:
        plan = self.plan
        await send({"type": "http.response.start", "status": plan.status, "headers": plan.headers})
        if scope["method"] == "HEAD" or plan.status == 304:
            await send({"type": "http.response.body", "body": b""})
            return
        if plan.ranges is None:
            if self.source.path and "http.response.pathsend" in scope.get("extensions", {}):
                # The server opens the path after send() returns (Granian does), so it must be the
                # real path, not our fd: a replace or eviction racing this gets a clean error.
                await send({"type": "http.response.pathsend", "path": self.source.path})
                return
            await self._send_span(send, 0, self.size, last=True)
            return
        if not plan.boundary:
            start, end = plan.ranges[0]
            await self._send_span(send, start, end, last=True)
            return
        for start, end in plan.ranges:
            header = _part_header(plan.boundary, self.content_type, start, end, self.size)
            await send({"type": "http.response.body", "body": header, "more_body": True})
            await self._send_span(send, start, end, last=False)
            await send({"type": "http.response.body", "body": b"\r\n", "more_body": True})
        await send({"type": "http.response.body", "body": _closing(plan.boundary)})

    async def _send_span(self, send: Send, start: int, end: int, *, last: bool) -> None:
        sent = start
        async for chunk in self.source.span(start, end):
            sent += len(chunk)
            await send({"type": "http.response.body", "body": chunk, "more_body": not last or sent < end})
        if last and sent == start:
            await send({"type": "http.response.body", "body": b""})


class AccelResponse:
    """The decision without the bytes: nginx sends the blob named in X-Accel-Redirect (ops/nginx.conf
    keeps our validators and security headers on what it sends)."""

    def __init__(self, plan: _Plan, location: str) -> None:
        self.plan = plan
        self.location = location

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # nginx computes Content-Length and Content-Range for the range it sends itself, and adds
        # its own Accept-Ranges to a whole-body answer (ours would then appear twice).
        own = {b"content-length", b"content-range"} | ({b"accept-ranges"} if self.plan.status == 200 else set())
        headers = [(k, v) for k, v in self.plan.headers if k not in own]
        headers += [(b"x-accel-redirect", self.location.encode("latin-1")), (b"content-length", b"0")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b""})


def offloadable(method: str, headers: Headers, plan: _Plan) -> bool:
    """Whether nginx, re-reading the request's Range and conditionals on the internal redirect,
    sends exactly what mediad would: a GET answered 200 without a Range, or one range asked as
    one. Several ranges (mediad coalesces them, nginx does not), a Range mediad ignored (malformed,
    too many, If-Range mismatch) and If-Match/If-Unmodified-Since (nginx would test its own
    validators) stay with mediad."""
    if method != "GET" or plan.status not in (200, 206) or plan.boundary:
        return False
    if "if-match" in headers or "if-unmodified-since" in headers:
        return False
    requested = headers.get("range")
    if plan.ranges is None:
        return requested is None
    return requested is not None and "," not in requested


# ---- handlers -----------------------------------------------------------------------------------

def _exists(path: str) -> bool:
    return os.path.exists(path)


def _open_blob(path: str) -> int | None:
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None


async def respond(request: Request, rep: Representation, *, on_loop: bool = False,
                  by_path: bool = False) -> BlobResponse | AccelResponse | None:
    """The answer for this File from this node's disk, else its cloud copy; None when neither
    has it now. `on_loop`: open on the event loop, for a file just served (its directory entries
    are cached, so open() does not wait for the disk); else in a thread. `by_path`: see
    `plan_response`."""
    state = request.app.state
    plan = plan_response(request.method, request.headers, rep, request.query_params.get("inline") == "1",
                         by_path)
    state.access.touch(rep.id)
    if rep.node == state.storage.node_id:
        path = rep.local_path = rep.local_path or str(state.storage.blob_path(rep.blob_id))
        accel = state.settings.accel_redirect
        if accel and offloadable(request.method, request.headers, plan) and (
                _exists(path) if on_loop else await anyio.to_thread.run_sync(_exists, path)):
            return AccelResponse(plan, accel + blob_relpath(rep.blob_id).removeprefix("files/"))
        fd = _open_blob(path) if on_loop else await anyio.to_thread.run_sync(_open_blob, path)
        if fd is not None:
            return BlobResponse(plan, LocalSource(fd, path), rep.size, rep.format)
    if rep.cloud_state == "stored" and state.store is not None:
        return BlobResponse(plan, CloudSource(state.store, cloud_key(rep.blob_id)), rep.size, rep.format)
    return None


Fetch = Callable[[AsyncConnection], Awaitable[Row[Any]]]


def owned_by_bearer(request: Request, lookup: dict[str, Any]) -> Fetch:
    """The caller's File selected by `lookup` (file_id= or path=): token check and lookup in one
    query; 401 for an unknown token, 404 for a file that is not the caller's."""
    digest = token_hash(bearer_token(request))
    settings = request.app.state.settings
    cache: LookupCache | None = request.app.state.cache

    async def fetch(conn: AsyncConnection) -> Row[Any]:
        stamp = cache.stamp() if cache is not None else None
        found = await db.file_for_token(conn, digest, **lookup)
        if found is None:
            raise Unauthorized(UNKNOWN_TOKEN)
        last_used = await accept_token(conn, digest, found.token_created_at, found.token_last_used_at, settings)
        if cache is not None:
            cache.keep_token(stamp, digest, found.token_user_id, found.token_created_at, last_used)
        if found.id is None:  # the token is valid; the file is not the caller's or does not exist
            raise NotFound("no such file")
        return found

    return fetch


async def serve_file(request: Request, fetch: Fetch, *, record: bool = False,
                     by_path: bool = False) -> BlobResponse | AccelResponse:
    """Answer GET/HEAD for the File `fetch` finds: from this node's disk (by nginx when it fronts
    mediad), else the cloud copy.
    `record`: `fetch` found it as an audio record's File; `by_path`: by its path (`plan_response`)."""
    reader, cache = request.app.state.reader, request.app.state.cache
    node = request.app.state.storage.node_id
    for _ in range(3):
        stamp = cache.stamp() if cache is not None else None
        async with reader.connect() as conn:
            row = await fetch(conn)
        known = cache.file(row.id) if cache is not None else None
        rep = Representation.from_row(row, record or (known is not None and known.record))
        if cache is not None:
            cache.keep_file(stamp, rep)
        response = await respond(request, rep, by_path=by_path)
        if response is not None:
            return response
        if rep.node not in (None, node):
            raise ServiceUnavailable("the file is on another mediad node's disk and not in the cloud yet",
                                     retry_after=5)
        # Replaced, deleted or evicted between the lookup and the open: look again.
    raise ServiceUnavailable("the file's content is not available on this server right now")


async def content(request: Request) -> BlobResponse | AccelResponse:
    if "signature" in request.query_params:  # a signed link: the signature, not a token, is the capability
        return await serve_file(request, links.signed_fetch(request))
    try:
        file_id = parse_file_id(request.path_params["file_id"])
    except NotFound:
        await authenticate(request)  # a missing or unknown token is 401 first, as on every route
        raise
    return await serve_file(request, owned_by_bearer(request, {"file_id": file_id}))


def download_lookup(params: QueryParams) -> dict[str, Any]:
    if ("id" in params) == ("path" in params):
        raise Unprocessable("give exactly one of ?id= or ?path=")
    if "id" in params:
        return {"file_id": parse_file_id(params["id"])}
    path = clean_path(params["path"])
    if path.endswith("/"):
        raise Unprocessable("the path names a folder, not a file")
    return {"path": path}


async def download(request: Request) -> BlobResponse | AccelResponse:
    try:
        lookup = download_lookup(request.query_params)
    except MediaError:
        await authenticate(request)  # a missing or unknown token is 401 first, as on every route
        raise
    return await serve_file(request, owned_by_bearer(request, lookup), by_path="path" in lookup)

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
import unicodedata
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
from .auth import authenticate, bearer_token, token_hash
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

log = logging.getLogger("mediad.downloads")

MAX_RANGES = 16  # more than this is refused by serving the whole body (RFC 9110 §14.2 advice)
_COALESCE_GAP = 128  # ranges closer than a multipart part header are served as one
_CHUNK = 256 * 1024
_RANGE_SPEC = re.compile(r"^(\d*)-(\d*)$")

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


def _http_date(text: str) -> datetime | None:
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
        since = _http_date(headers.get("if-unmodified-since", ""))
        if since is not None and modified > since:
            return 412
    if_none_match = headers.get("if-none-match")
    if if_none_match is not None:
        tags = [t.removeprefix("W/") for t in _etags(if_none_match)]  # weak comparison
        if "*" in tags or etag in tags:
            return 304
    else:
        since = _http_date(headers.get("if-modified-since", ""))
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
    def ascii_only(text: str) -> str:
        folded = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
        return _FALLBACK_UNSAFE.sub("_", folded)

    stem, extension = os.path.splitext(name)
    # A name with no ASCII in its stem still keeps its extension: "download.mp4", not "mp4".
    fallback = ((ascii_only(stem).strip(" .")[:150] or "download") + ascii_only(extension)[:20]).strip(" ")
    encoded = quote(name, safe="!#$&+-.^_`|~")
    kind = "inline" if inline else "attachment"
    return f"{kind}; filename=\"{fallback}\"; filename*=UTF-8''{encoded}"


def _modified(row: Row[Any]) -> datetime:
    # HTTP dates have one-second resolution; compare at that resolution.
    return row.updated_at.astimezone(UTC).replace(microsecond=0)


def representation_headers(row: Row[Any], inline: bool) -> dict[str, str]:
    return {
        "etag": f'"{row.sha256}"',
        "last-modified": email.utils.format_datetime(_modified(row), usegmt=True),
        "accept-ranges": "bytes",
        "content-type": row.format,
        "content-disposition": content_disposition(row.name, inline),
        "cache-control": "private, no-cache",
        "x-content-type-options": "nosniff",
        # User content served from our origin must never run as our page.
        "content-security-policy": "sandbox",
    }


# ---- sending ------------------------------------------------------------------------------------

@dataclass
class _Plan:
    status: int
    headers: dict[str, str]
    ranges: Ranges | None  # None: the whole body
    boundary: str = ""


def plan_response(method: str, headers: Headers, row: Row[Any], inline: bool) -> _Plan:
    """Status, headers and byte ranges for a GET/HEAD of this File (no I/O)."""
    base = representation_headers(row, inline)
    outcome = evaluate_preconditions(headers, base["etag"], _modified(row))
    if outcome == 412:
        raise PreconditionFailed("If-Match or If-Unmodified-Since does not hold for this file")
    if outcome == 304:
        keep = ("etag", "last-modified", "cache-control", "content-disposition")
        return _Plan(304, {k: base[k] for k in keep}, [])
    size = row.size
    ranges = None
    # Two contents can share a Last-Modified second, so the date is a strong validator only while
    # the File has its first content (RFC 9110 §8.8.2.2); a replace keeps the id.
    strong_date = base["last-modified"] if row.updated_at == row.created_at else None
    # Range handling is defined for GET only (RFC 9110 §14.2): HEAD describes the full 200.
    if method == "GET" and range_applies(headers, base["etag"], strong_date):
        ranges = parse_ranges(headers.get("range"), size)
    if ranges is None:
        return _Plan(200, {**base, "content-length": str(size)}, None)
    if len(ranges) == 1:
        start, end = ranges[0]
        return _Plan(206, {**base, "content-length": str(end - start),
                           "content-range": f"bytes {start}-{end - 1}/{size}"}, ranges)
    boundary = secrets.token_hex(16)
    length = sum(len(_part_header(boundary, base["content-type"], s, e, size)) + (e - s) + 2
                 for s, e in ranges) + len(_closing(boundary))
    headers_out = {**base, "content-type": f"multipart/byteranges; boundary={boundary}",
                   "content-length": str(length)}
    return _Plan(206, headers_out, ranges, boundary)


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
        raw_headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in plan.headers.items()]
        await send({"type": "http.response.start", "status": plan.status, "headers": raw_headers})
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


# ---- handlers -----------------------------------------------------------------------------------

def _open_blob(path: os.PathLike[str] | str) -> int | None:
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None


Fetch = Callable[[AsyncConnection], Awaitable[Row[Any]]]


def owned_by_bearer(request: Request, lookup: dict[str, Any]) -> Fetch:
    """The caller's File selected by `lookup` (file_id= or path=): token check and lookup in one
    query; 401 for an unknown token, 404 for a file that is not the caller's."""
    digest = token_hash(bearer_token(request))

    async def fetch(conn: AsyncConnection) -> Row[Any]:
        found = await db.file_for_token(conn, digest, **lookup)
        if found is None:
            raise Unauthorized("unknown token")
        if found.id is None:  # the token is valid; the file is not the caller's or does not exist
            raise NotFound("no such file")
        return found

    return fetch


async def serve_file(request: Request, fetch: Fetch) -> BlobResponse:
    """Answer GET/HEAD for the File `fetch` finds: from this node's disk, else the cloud copy."""
    reader, storage, store = request.app.state.reader, request.app.state.storage, request.app.state.store
    for _ in range(3):
        async with reader.connect() as conn:
            row = await fetch(conn)
        plan = plan_response(request.method, request.headers, row,
                             request.query_params.get("inline") == "1")
        request.app.state.access.touch(row.id)
        if row.node == storage.node_id:
            path = str(storage.blob_path(row.blob_id))
            fd = await anyio.to_thread.run_sync(_open_blob, path)
            if fd is not None:
                return BlobResponse(plan, LocalSource(fd, path), row.size, row.format)
        if row.cloud_state == "stored" and store is not None:
            return BlobResponse(plan, CloudSource(store, cloud_key(row.blob_id)), row.size, row.format)
        if row.node not in (None, storage.node_id):
            raise ServiceUnavailable("the file is on another mediad node's disk and not in the cloud yet",
                                     retry_after=5)
        # Replaced, deleted or evicted between the lookup and the open: look again.
    raise ServiceUnavailable("the file's content is not available on this server right now")


async def content(request: Request) -> BlobResponse:
    if "signature" in request.query_params:  # a signed link: the signature, not a token, is the capability
        return await serve_file(request, links.signed_fetch(request))
    try:
        file_id = parse_file_id(request.path_params["file_id"])
    except NotFound:
        await authenticate(request)  # a missing or unknown token is 401 first, as on every route
        raise
    return await serve_file(request, owned_by_bearer(request, {"file_id": file_id}))


def _download_lookup(params: QueryParams) -> dict[str, Any]:
    if ("id" in params) == ("path" in params):
        raise Unprocessable("give exactly one of ?id= or ?path=")
    if "id" in params:
        return {"file_id": parse_file_id(params["id"])}
    path = clean_path(params["path"])
    if path.endswith("/"):
        raise Unprocessable("the path names a folder, not a file")
    return {"path": path}


async def download(request: Request) -> BlobResponse:
    try:
        lookup = _download_lookup(request.query_params)
    except MediaError:
        await authenticate(request)  # a missing or unknown token is 401 first, as on every route
        raise
    return await serve_file(request, owned_by_bearer(request, lookup))


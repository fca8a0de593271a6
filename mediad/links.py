"""Signed links: expiring, tokenless download URLs, like an S3 presigned GET.

A link is `/files/{id}/content?expires=<unix s>&inline=0|1&signature=<…>`, where the signature is
an HMAC-SHA256 (RFC 2104) over the file id, the expiry, the inline flag, the content's sha256 and
its blob id. A thumbnail link, `/files/{id}/thumbnail?size=<px>&expires=…&signature=…`, signs its
size as one more part, so it serves that thumbnail only and never the bytes (nor another size).
Every upload stores a new blob, so binding the blob id means replacing the content ends the link,
even with the same bytes, and a link never comes back when an old content does (A, B, then A
again); a deleted file has no row to check against. The method is not signed, so one link serves
GET and HEAD (a media player needs both).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import secrets
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import sqlalchemy as sa
from sqlalchemy.engine import Row
from sqlalchemy.ext.asyncio import AsyncConnection
from starlette.datastructures import QueryParams
from starlette.requests import Request
from starlette.responses import JSONResponse

from . import db
from .auth import authenticate, read_json_object
from .config import ConfigError, Settings
from .errors import Forbidden, NotFound, Unprocessable
from .files import parse_file_id, rfc3339
from .storage import create_exclusive
from .thumbnails import MAX_SIZE, MIN_SIZE

log = logging.getLogger("mediad.links")

KEY_FILE = "link-secret.key"
MIN_EXPIRES_S = 1
MAX_EXPIRES_S = 7 * 86400
DEFAULT_EXPIRES_S = 3600
_KEY_BYTES = 32
_INVALID = "this link is not valid: it was altered, or the file was replaced or deleted"
_DOMAIN = b"mediad-link-v1"  # a key reused for something else can never produce a link signature


# ---- signing (pure) -----------------------------------------------------------------------------

@dataclass(frozen=True)
class LinkQuery:
    """The signed parameters as they arrived in a link's query string."""

    expires: int
    inline: bool
    signature: str
    thumbnail: int | None = None  # the signed size of a thumbnail link


def sign(key: bytes, file_id: uuid.UUID, expires: int, inline: bool, sha256: str, blob_id: uuid.UUID,
         thumbnail: int | None = None) -> str:
    """The url-safe base64 (unpadded) HMAC-SHA256 of the method-independent parts of a link."""
    parts = [_DOMAIN, str(file_id).encode(), str(expires).encode(), b"1" if inline else b"0",
             sha256.encode("ascii"), str(blob_id).encode()]
    if thumbnail is not None:  # only thumbnail links have this part: no content link can pass for one
        parts.append(b"thumbnail=%d" % thumbnail)
    message = b"\n".join(parts)
    digest = hmac.new(key, message, hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def link_path(key: bytes, file_id: uuid.UUID, expires: int, inline: bool, sha256: str, blob_id: uuid.UUID,
              thumbnail: int | None = None) -> str:
    if thumbnail is not None:
        inline = False  # a thumbnail is shown, never saved as the file: the flag has no meaning there
    signature = sign(key, file_id, expires, inline, sha256, blob_id, thumbnail)
    if thumbnail is not None:
        query = urlencode({"size": thumbnail, "expires": expires, "signature": signature})
        return f"/files/{file_id}/thumbnail?{query}"
    query = urlencode({"expires": expires, "inline": "1" if inline else "0", "signature": signature})
    return f"/files/{file_id}/content?{query}"


def parse_query(params: QueryParams, thumbnail: int | None = None) -> LinkQuery:
    """The signed parameters (a thumbnail link's size is parsed by its route and passed in);
    anything malformed is an altered link (403), never a 400 or 422."""
    expires, signature = params.get("expires", ""), params.get("signature", "")
    # A thumbnail link has no inline flag (it is signed as 0): an added ?inline= is ignored.
    inline = "0" if thumbnail is not None else params.get("inline", "")
    if not (expires.isascii() and expires.isdigit() and len(expires) <= 12) or inline not in ("0", "1"):
        raise Forbidden("this link was altered: its signed parameters are missing or malformed")
    if not signature.isascii():
        raise Forbidden(_INVALID)
    return LinkQuery(int(expires), inline == "1", signature, thumbnail)


def check_expiry(query: LinkQuery, now: float) -> None:
    if now >= query.expires:
        raise Forbidden("this link has expired; ask for a new one")


def verify(key: bytes, file_id: uuid.UUID, query: LinkQuery, sha256: str, blob_id: uuid.UUID) -> None:
    """403 unless the signature matches this file's current content (constant-time compare)."""
    expected = sign(key, file_id, query.expires, query.inline, sha256, blob_id, query.thumbnail)
    if not hmac.compare_digest(expected.encode("ascii"), query.signature.encode("ascii")):
        raise Forbidden(_INVALID)


def parse_options(data: dict[str, Any]) -> tuple[int, bool, int | None]:
    """`expires_in` (seconds, 1 s … 7 days), `inline` and `thumbnail` (a size in px, for a link
    to that thumbnail) from a POST body; 422 otherwise."""
    expires_in = data.get("expires_in", DEFAULT_EXPIRES_S)
    inline = data.get("inline", False)
    thumbnail = data.get("thumbnail")
    if isinstance(expires_in, bool) or not isinstance(expires_in, int) \
            or not MIN_EXPIRES_S <= expires_in <= MAX_EXPIRES_S:
        raise Unprocessable(f"expires_in must be a whole number of seconds from {MIN_EXPIRES_S} "
                            f"to {MAX_EXPIRES_S} (7 days)")
    if not isinstance(inline, bool):
        raise Unprocessable("inline must be true or false")
    if thumbnail is not None and (isinstance(thumbnail, bool) or not isinstance(thumbnail, int)
                                  or not MIN_SIZE <= thumbnail <= MAX_SIZE):
        raise Unprocessable(f"thumbnail must be a size in pixels from {MIN_SIZE} to {MAX_SIZE}")
    return expires_in, inline, thumbnail


# ---- the key --------------------------------------------------------------------------------------

def load_key(settings: Settings) -> bytes:
    """MEDIAD_SECRET_KEY, else a random key created once under the data dir (mode 0600).

    Several processes on one data dir (Granian workers) agree on one key: the file is written
    under a unique name and hard-linked into place, which fails if another process was first.
    Several nodes with their own data dirs must share MEDIAD_SECRET_KEY for links to work on all.
    """
    if settings.secret_key:  # long enough: load_settings checked it
        return settings.secret_key.encode("utf-8")
    path = settings.data_dir.resolve() / KEY_FILE
    try:
        return _read_key(path)
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    key = base64.urlsafe_b64encode(secrets.token_bytes(_KEY_BYTES)) + b"\n"
    if create_exclusive(path, key, mode=0o600):
        log.info("created the signed-link key at %s", path)
    return _read_key(path)


def _read_key(path: Path) -> bytes:
    text = path.read_bytes().strip()
    try:
        key = base64.urlsafe_b64decode(text)
    except (binascii.Error, ValueError):
        key = b""
    if len(key) < _KEY_BYTES:
        # Regenerating silently would end every link; a person should look at this file.
        raise ConfigError(f"{path} does not hold a valid link key: remove it to make a new one "
                          "(this ends all signed links) or set MEDIAD_SECRET_KEY")
    return key


# ---- HTTP ---------------------------------------------------------------------------------------

async def create_link(request: Request) -> JSONResponse:
    """POST /files/{id}/links → 201 {"url", "path", "expires_at"} for the caller's file."""
    owner_id = await authenticate(request)
    file_id = parse_file_id(request.path_params["file_id"])
    # Both fields are optional, so an empty body means the defaults.
    empty = request.headers.get("content-length") == "0" or (
        "content-length" not in request.headers and "transfer-encoding" not in request.headers)
    expires_in, inline, thumbnail = parse_options({} if empty else await read_json_object(request))
    async with request.app.state.reader.connect() as conn:
        row = await db.get_file(conn, owner_id, file_id)
    if row is None:
        raise NotFound("no such file")
    expires = int(time.time()) + expires_in
    path = link_path(request.app.state.link_key, file_id, expires, inline, row.sha256, row.blob_id, thumbnail)
    return JSONResponse(
        {"url": request.app.state.settings.base_url + path,
         # The same link as a same-origin path: the web app's `media-src 'self'` accepts it even
         # when MEDIAD_PUBLIC_URL names a proxy's address.
         "path": path,
         "expires_at": rfc3339(datetime.fromtimestamp(expires, UTC))},
        status_code=201, headers={"Cache-Control": "no-store"})


def signed_fetch(request: Request, thumbnail: int | None = None) -> Callable[[AsyncConnection], Awaitable[Row[Any]]]:
    """A `serve_file` fetch for a signed link: no token; the File by id, whoever owns it, and only
    while the signature matches its current content. Every failure is the same 403."""
    query = parse_query(request.query_params, thumbnail)
    check_expiry(query, time.time())  # before any database work
    try:
        file_id = parse_file_id(request.path_params["file_id"])
    except NotFound:
        raise Forbidden(_INVALID) from None
    key = request.app.state.link_key

    async def fetch(conn: AsyncConnection) -> Row[Any]:
        row = (await conn.execute(sa.select(db.files).where(db.files.c.id == file_id))).first()
        if row is None:  # the same answer as a bad signature: no oracle for which ids exist
            raise Forbidden(_INVALID)
        verify(key, file_id, query, row.sha256, row.blob_id)
        return row

    return fetch

"""GET /files/{id}/thumbnail: the HTTP side of thumbnails (decisions and making in thumbnails.py)."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from sqlalchemy.engine import Row
from starlette.requests import Request
from starlette.responses import Response

from . import links
from .auth import authenticate
from .cloud import CloudError, Store, cloud_key
from .downloads import evaluate_preconditions, owned_by_bearer
from .errors import NotFound, PreconditionFailed, ServiceUnavailable, Unprocessable
from .files import parse_file_id
from .storage import Storage
from .thumbnails import MEDIA_TYPES, choose_format, etag, parse_size
from .writer import BlobWriter

CLOUD_READ_BACK_MAX = 1 << 30  # bytes of an evicted File read back from the cloud for one thumbnail
_CACHE_CONTROL = "private, max-age=31536000, immutable"  # the URL carries the content's version (&v=)


@contextlib.asynccontextmanager
async def readable_copy(storage: Storage, store: Store | None, row: Row[Any]) -> AsyncIterator[Path]:
    """The File's content as a path a worker can open: its blob on this disk, else a temporary
    copy read back from its cloud copy in `store` (removed afterwards). Entered by the shared
    generation in Thumbnailer.make, not by a request: no requester going away can remove a copy
    the others' job still needs, and they share one read-back."""
    if row.node == storage.node_id:
        yield storage.blob_path(row.blob_id)
        return
    if row.cloud_state != "stored" or store is None:
        raise ServiceUnavailable("the file is on another mediad node's disk and not in the cloud yet",
                                 retry_after=5)
    if row.size > CLOUD_READ_BACK_MAX:
        raise NotFound(f"no thumbnail can be made for this file: it is kept in the cloud only, and reading "
                       f"back more than {CLOUD_READ_BACK_MAX >> 20} MiB to make a picture is not worth it")
    writer = BlobWriter.create(storage, max_bytes=row.size)
    try:
        try:
            async for chunk in store.read(cloud_key(row.blob_id), 0, row.size):
                await writer.write(chunk)
            copy = await writer.finish()
        except CloudError as exc:
            raise ServiceUnavailable(f"the file's cloud copy could not be read just now ({exc})",
                                     retry_after=5) from None
        yield copy.temp_path
    finally:
        await writer.abort()


def no_picture_reason(row: Row[Any]) -> str | None:
    """Why this File can have no thumbnail, when that is known without decoding anything."""
    if row.media_kind == "other":
        return "this file is not an image, video or audio file, so it has no picture"
    if row.media_state == "failed":
        return f"no thumbnail can be made for this file: {row.media['error']}"
    return None


def _size_to_verify(text: str | None) -> int:
    """The size a signed link's signature is checked against. A size no link can carry was never
    signed (links.parse_options refuses it), so 0 stands in for it: it fails verification like
    any other altered parameter, a 403 rather than the 422 of a malformed request."""
    try:
        return parse_size(text)
    except Unprocessable:
        return 0


async def thumbnail(request: Request) -> Response:
    text = request.query_params.get("size")
    if "signature" in request.query_params:  # a signed thumbnail link, as for /content
        fetch = links.signed_fetch(request, _size_to_verify(text))
    else:
        try:
            file_id = parse_file_id(request.path_params["file_id"])
        except NotFound:
            await authenticate(request)  # 401 before 404, as on every route
            raise
        fetch = owned_by_bearer(request, {"file_id": file_id})
    state = request.app.state
    async with state.reader.connect() as conn:
        row = await fetch(conn)
    size = parse_size(text)  # after the token or signature: 401 and 403 come before a 422
    fmt = choose_format(request.headers.get("accept"))
    headers = {"etag": etag(row.sha256, size, fmt), "vary": "Accept", "cache-control": _CACHE_CONTROL}
    outcome = evaluate_preconditions(request.headers, headers["etag"], row.updated_at)
    if outcome == 412:
        raise PreconditionFailed("If-Match or If-Unmodified-Since does not hold for this thumbnail")
    if outcome == 304:
        return Response(status_code=304, headers=headers)
    reason = no_picture_reason(row)
    if reason is not None:
        raise NotFound(reason)
    body = await state.thumbnails.cached(row.blob_id, size, fmt)
    if body is None:
        source = functools.partial(readable_copy, state.storage, state.store, row)
        body = await state.thumbnails.make(row.blob_id, source, row.media_kind, size, fmt)
    headers["x-content-type-options"] = "nosniff"
    if request.method == "HEAD":  # the length a GET would send, and no body (whatever the server)
        headers["content-length"] = str(len(body))
        body = b""
    return Response(body, headers=headers, media_type=MEDIA_TYPES[fmt])

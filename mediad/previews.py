"""GET /files/{id}/thumbnail: the HTTP side of thumbnails (decisions and making in thumbnails.py)."""

from __future__ import annotations

from typing import Any

from sqlalchemy.engine import Row
from starlette.requests import Request
from starlette.responses import Response

from . import links
from .auth import authenticate
from .downloads import evaluate_preconditions, owned_by_bearer
from .errors import NotFound, PreconditionFailed
from .files import parse_file_id
from .thumbnails import MEDIA_TYPES, choose_format, etag, parse_size

_CACHE_CONTROL = "private, max-age=31536000, immutable"  # the URL carries the content's version (&v=)


def no_picture_reason(row: Row[Any]) -> str | None:
    """Why this File can have no thumbnail, when that is known without decoding anything."""
    if row.media_kind == "other":
        return "this file is not an image, video or audio file, so it has no picture"
    if row.media_state == "failed":
        return f"no thumbnail can be made for this file: {row.media['error']}"
    return None


async def thumbnail(request: Request) -> Response:
    size = parse_size(request.query_params.get("size"))
    if "signature" in request.query_params:  # a signed thumbnail link, as for /content
        fetch = links.signed_fetch(request, size)
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
    source = state.storage.blob_path(row.blob_id)
    body = await state.thumbnails.picture(row.blob_id, source, row.media_kind, size, fmt,
                                          local=row.node == state.storage.node_id)
    headers["x-content-type-options"] = "nosniff"
    return Response(body, headers=headers, media_type=MEDIA_TYPES[fmt])  # the server drops it for HEAD

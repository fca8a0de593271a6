"""The File API: the File object, listing, metadata, deletion and usage."""

from __future__ import annotations

import base64
import binascii
import unicodedata
import uuid
from datetime import UTC, datetime
from typing import Any

import anyio
from sqlalchemy.engine import Row
from sqlalchemy.ext.asyncio import AsyncConnection
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from . import db, quotas, webhooks
from .auth import authenticate
from .cloud import Replicator, cloud_key
from .errors import NotFound, Unprocessable
from .media import file_media
from .storage import Storage

MAX_LIMIT = 1000
_UNLINK_THREADS = 8


def rfc3339(moment: datetime | None) -> str | None:
    if moment is None:
        return None
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def file_json(row: Row[Any], node: uuid.UUID | None) -> dict[str, Any]:
    """The File object; `local` says whether this node's disk holds its bytes."""
    return {
        "id": str(row.id),
        "name": row.name,
        "extension": row.extension,
        "format": row.format,
        "size": row.size,
        "sha256": row.sha256,
        "path": row.path,
        "created_at": rfc3339(row.created_at),
        "updated_at": rfc3339(row.updated_at),
        "cloud": {"state": row.cloud_state, "stored_at": rfc3339(row.cloud_stored_at)},
        "local": row.node is not None and row.node == node,
        "media": file_media(row),
    }


def parse_file_id(text: str) -> uuid.UUID:
    """A File id from a URL; anything that is not a UUID is simply not found."""
    try:
        return uuid.UUID(text)
    except ValueError:
        raise NotFound("no such file") from None


def encode_cursor(row: Row[Any]) -> str:
    raw = f"{row.created_at.isoformat()}|{row.id}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, uuid.UUID]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        moment, _, file_id = raw.partition("|")
        parsed = datetime.fromisoformat(moment)
        if parsed.tzinfo is None:
            raise ValueError("naive time")
        # In UTC here, so an offset that pushes it past year 1 or 9999 fails now, not in the driver.
        return parsed.astimezone(UTC), uuid.UUID(file_id)
    except (ValueError, OverflowError, binascii.Error, UnicodeDecodeError):
        raise Unprocessable("cursor is not one this server returned") from None


def parse_limit(text: str | None) -> int:
    if text is None:
        return 100
    if not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= MAX_LIMIT:  # "²".isdigit()
        raise Unprocessable(f"limit must be an integer from 1 to {MAX_LIMIT}")
    return int(text)


async def list_(request: Request) -> JSONResponse:
    owner_id = await authenticate(request)
    params = request.query_params
    limit = parse_limit(params.get("limit"))
    prefix = unicodedata.normalize("NFC", params["prefix"]) if params.get("prefix") else None  # as paths are
    if prefix is not None and not prefix.startswith("/"):
        raise Unprocessable("prefix must be an absolute path (start with /)")
    if prefix is not None and "\x00" in prefix:  # PostgreSQL text cannot hold NUL: no path has one
        raise Unprocessable("prefix must not contain NUL")
    after = decode_cursor(params["cursor"]) if params.get("cursor") else None
    kind = params.get("kind")
    if kind is not None and kind not in db.MEDIA_KINDS:
        raise Unprocessable(f"kind must be one of {', '.join(db.MEDIA_KINDS)}")
    async with request.app.state.reader.connect() as conn:
        rows = await db.list_files(conn, owner_id, prefix=prefix, after=after, limit=limit + 1, kind=kind)
    page = rows[:limit]
    next_cursor = encode_cursor(page[-1]) if len(rows) > limit else None
    node = request.app.state.storage.node_id
    return JSONResponse({"files": [file_json(r, node) for r in page], "next_cursor": next_cursor})


async def show(request: Request) -> JSONResponse:
    owner_id = await authenticate(request)
    file_id = parse_file_id(request.path_params["file_id"])
    async with request.app.state.reader.connect() as conn:
        row = await db.get_file(conn, owner_id, file_id)
    if row is None:
        raise NotFound("no such file")
    return JSONResponse(file_json(row, request.app.state.storage.node_id))


async def delete(request: Request) -> Response:
    owner_id = await authenticate(request)
    file_id = parse_file_id(request.path_params["file_id"])
    state = request.app.state
    async with state.engine.begin() as conn:
        blob_id = await drop_file(conn, owner_id, file_id)
        if blob_id is None:
            raise NotFound("no such file")
    await forget_blobs(state.storage, state.replicator, [blob_id])
    return Response(status_code=204)


async def drop_file(conn: AsyncConnection, owner_id: uuid.UUID, file_id: uuid.UUID) -> uuid.UUID | None:
    """Delete a File's row and queue its cloud copy's deletion, in the caller's transaction; → the
    blob whose local bytes go once that commits (`forget_blobs`), None if there was no such file."""
    gone = await db.delete_file(conn, owner_id, file_id)
    if gone is None:
        return None
    await db.queue_deletion(conn, cloud_key(gone.blob_id))
    await webhooks.emit_file(conn, "file.deleted", gone, None)
    return uuid.UUID(str(gone.blob_id))


async def forget_blobs(storage: Storage, replicator: Replicator | None, blob_ids: list[uuid.UUID], *,
                       notify: bool = True) -> None:
    """After the commit that deleted their rows: the local bytes go now (even if the request is
    cancelled meanwhile), the queued cloud deletions as soon as the replicator gets to them (told
    now, or by the caller once it is done; the replicator also polls)."""
    def remove(some: list[uuid.UUID]) -> None:
        for blob_id in some:
            storage.remove_content(blob_id)

    # Many at once are spread over a few threads: an unlink of an fsynced file waits on the
    # filesystem's journal, and eight in parallel took a tenth of the time of one after another.
    shares = [blob_ids[i::_UNLINK_THREADS] for i in range(min(_UNLINK_THREADS, len(blob_ids)))]
    with anyio.CancelScope(shield=True):
        async with anyio.create_task_group() as group:
            for share in shares:
                group.start_soon(anyio.to_thread.run_sync, remove, share)
    if notify and replicator is not None:
        replicator.deletions_queued()


async def usage(request: Request) -> JSONResponse:
    owner_id = await authenticate(request)
    async with request.app.state.reader.connect() as conn:
        count, total = await db.usage(conn, owner_id)
        quota = await quotas.quota_of(conn, owner_id)
    return JSONResponse({"files": count, "bytes": total, "quota": quota})

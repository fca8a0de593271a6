"""The caller's account: its tokens (list, create, revoke) and the account itself (show, delete)."""

from __future__ import annotations

import uuid
from typing import Any

import anyio
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from . import db
from .auth import (
    authenticate,
    bearer_token,
    clean_name,
    confirm_password,
    new_token,
    read_json_object,
    security_event,
    token_expires_at,
    token_hash,
)
from .cloud import Replicator, cloud_key
from .errors import Forbidden, NotFound
from .files import forget_blobs, rfc3339
from .storage import Storage


async def list_tokens(request: Request) -> JSONResponse:
    """GET /auth/tokens: the caller's tokens, oldest first; `current` marks the one presented."""
    user_id = await authenticate(request)
    current = token_hash(bearer_token(request))
    settings = request.app.state.settings
    async with request.app.state.reader.connect() as conn:
        rows = await db.list_tokens(conn, user_id)
    return JSONResponse({"tokens": [
        {"id": str(row.id), "name": row.name, "created_at": rfc3339(row.created_at),
         "last_used_at": rfc3339(row.last_used_at), "current": row.token_hash == current,
         "expires_at": rfc3339(token_expires_at(row.created_at, row.last_used_at, settings))}
        for row in rows]})


async def create_token(request: Request) -> JSONResponse:
    """POST /auth/tokens {"name"}: another token for the caller (one per device or app)."""
    user_id = await authenticate(request)
    name = clean_name((await read_json_object(request)).get("name"))
    token = new_token()
    async with request.app.state.engine.begin() as conn:
        token_id = await db.insert_token(conn, user_id, token_hash(token), name)
    security_event("token.created", request, user_id=user_id, token_id=str(token_id), via="api")
    return JSONResponse({"id": str(token_id), "name": name, "token": token}, status_code=201)


async def revoke_token(request: Request) -> Response:
    """DELETE /auth/tokens/{id}: 204; another user's token is as missing as an unknown one."""
    user_id = await authenticate(request)
    try:
        token_id = uuid.UUID(request.path_params["token_id"])
    except ValueError:
        raise NotFound("no such token") from None
    async with request.app.state.engine.begin() as conn:
        if not await db.delete_token(conn, token_id, user_id):
            raise NotFound("no such token")
    security_event("token.revoked", request, user_id=user_id, token_id=str(token_id))
    return Response(status_code=204)


async def show_me(request: Request) -> JSONResponse:
    """GET /users/me."""
    user_id = await authenticate(request)
    async with request.app.state.reader.connect() as conn:
        user = await db.get_user(conn, user_id)
        count, total = await db.usage(conn, user_id)
    if user is None:  # deleted between the token check and this read
        raise NotFound("no such user")
    return JSONResponse({"id": str(user.id), "name": user.name, "created_at": rfc3339(user.created_at),
                         "quota": user.quota, "usage": {"files": count, "bytes": total}})


async def delete_me(request: Request) -> Response:
    """DELETE /users/me: the user, every token and every file; a user with a password sends it."""
    user_id = await authenticate(request)
    body = await _optional_json(request)
    state = request.app.state
    async with state.reader.connect() as conn:
        user = await db.get_user(conn, user_id)
    if user is None:
        raise NotFound("no such user")
    if user.password_hash is not None:
        password = body.get("password")
        if not isinstance(password, str):
            raise Forbidden("send this account's password as {\"password\": …} to delete it")
        if not await confirm_password(request, user, password):
            security_event("account.delete_refused", request, user_id=user.id, name=user.name)
            raise Forbidden("wrong password: nothing was deleted")
    deleted = await delete_account(state.engine, state.storage, state.replicator, user_id)
    security_event("account.deleted", request, user_id=user_id, name=user.name, files=deleted)
    return Response(status_code=204)


async def delete_account(engine: AsyncEngine, storage: Storage, replicator: Replicator | None,
                         user_id: uuid.UUID) -> int:
    """Delete a user in one transaction (rows cascade) with its cloud copies queued for deletion
    (retried like pushes), then its local bytes and partial uploads; → the number of files deleted."""
    async with engine.begin() as conn:
        upload_ids = await db.user_upload_ids(conn, user_id)
        blobs = await db.delete_user(conn, user_id)
        await db.queue_deletions(conn, [cloud_key(blob_id) for blob_id in blobs])
    await forget_blobs(storage, replicator, blobs)

    def remove_partials() -> None:
        for upload_id in upload_ids:
            storage.partial_path(upload_id).unlink(missing_ok=True)

    await anyio.to_thread.run_sync(remove_partials)
    return len(blobs)


async def _optional_json(request: Request) -> dict[str, Any]:
    """A JSON object body, or {} when there is no body at all."""
    if request.headers.get("content-length") == "0" or (
            "content-length" not in request.headers and "transfer-encoding" not in request.headers):
        return {}
    return await read_json_object(request)

"""Users, passwords and bearer tokens."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import unicodedata
import uuid
from typing import Any

import anyio
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.requests import Request
from starlette.responses import JSONResponse

from . import db
from .errors import BadRequest, Conflict, Unauthorized, Unprocessable

_SCRYPT = {"n": 2**14, "r": 8, "p": 1}  # 16 MiB of memory per hash: memory-hard, ~50 ms here
_MAX_JSON_BODY = 64 * 1024


def hash_password(password: str) -> str:
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, dklen=32, **_SCRYPT)
    b64 = base64.b64encode
    return f"scrypt${_SCRYPT['n']}${_SCRYPT['r']}${_SCRYPT['p']}${b64(salt).decode()}${b64(digest).decode()}"


def verify_password(password: str, encoded: str) -> bool:
    try:
        _, n, r, p, salt, digest = encoded.split("$")
        expected = base64.b64decode(digest)
        actual = hashlib.scrypt(password.encode(), salt=base64.b64decode(salt), n=int(n), r=int(r),
                                p=int(p), dklen=len(expected))
    except ValueError:
        return False
    return hmac.compare_digest(actual, expected)


# Checked against when the user does not exist, so both failures cost the same time.
_DUMMY_HASH = hash_password(secrets.token_urlsafe(16))


def new_token() -> str:
    return secrets.token_urlsafe(32)  # 256 bits


def token_hash(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def clean_user_name(value: Any) -> tuple[str, str]:
    """→ (name as stored, case-insensitive key). 1–64 characters, no control characters."""
    if not isinstance(value, str):
        raise Unprocessable("name must be a string")
    name = unicodedata.normalize("NFC", value)
    if not 1 <= len(name) <= 64:
        raise Unprocessable("name must be 1 to 64 characters long")
    if any(unicodedata.category(ch) in ("Cc", "Cs") for ch in name):
        raise Unprocessable("name must not contain control characters")
    if not name.strip():
        raise Unprocessable("name must not be blank")
    return name, name.casefold()


def _clean_password(value: Any) -> str:
    if not isinstance(value, str):
        raise Unprocessable("password must be a string")
    if len(value) < 8:
        raise Unprocessable("password must be at least 8 characters long")
    if len(value) > 1024:
        raise Unprocessable("password must be at most 1024 characters long")
    if any("\ud800" <= ch <= "\udfff" for ch in value):  # JSON allows lone surrogates; UTF-8 does not
        raise Unprocessable("password must be Unicode text (no lone surrogates)")
    return value


async def read_json_object(request: Request) -> dict[str, Any]:
    """The request body as a JSON object, read with a size cap (never unbounded)."""
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > _MAX_JSON_BODY:
            raise BadRequest(f"JSON body is larger than {_MAX_JSON_BODY} bytes")
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise BadRequest("request body is not valid JSON") from None
    if not isinstance(data, dict):
        raise Unprocessable("request body must be a JSON object")
    return data


def bearer_token(request: Request) -> str:
    """The token of `Authorization: Bearer <token>`; 401 when the header is missing or malformed."""
    header = request.headers.get("authorization")
    if header is None:
        raise Unauthorized("missing Authorization: Bearer header")
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or len(token) > 256:
        raise Unauthorized("malformed Authorization header: expected Bearer <token>")
    return token


async def authenticate(request: Request) -> uuid.UUID:
    """The caller's user id from `Authorization: Bearer <token>`; 401 otherwise."""
    return await user_for_token(request.app.state.reader, bearer_token(request))


async def user_for_token(engine: AsyncEngine, token: str) -> uuid.UUID:
    digest = token_hash(token)
    async with engine.connect() as conn:
        found = await db.user_for_token(conn, digest)
    # The lookup is by hash, so its timing says nothing about the token; compare anyway.
    if found is None or not hmac.compare_digest(found[1], digest):
        raise Unauthorized("unknown token")
    return found[0]


async def create_user(request: Request) -> JSONResponse:
    data = await read_json_object(request)
    name, name_key = clean_user_name(data.get("name"))
    password = data.get("password")
    password_hash = None
    if password is not None:
        password_hash = await anyio.to_thread.run_sync(hash_password, _clean_password(password))
    token = new_token()
    async with request.app.state.engine.begin() as conn:
        user_id = await db.insert_user(conn, name, name_key, password_hash,
                                       quota=request.app.state.settings.default_quota_bytes)
        if user_id is None:
            raise Conflict(f"the name {name!r} is taken")
        await db.insert_token(conn, user_id, token_hash(token))
    return JSONResponse({"id": str(user_id), "name": name, "token": token}, status_code=201)


async def login(request: Request) -> JSONResponse:
    data = await read_json_object(request)
    name, password = data.get("name"), data.get("password")
    if not isinstance(name, str) or not isinstance(password, str):
        raise Unprocessable("name and password are required strings")
    user = None
    try:
        _, name_key = clean_user_name(name)
    except Unprocessable:
        pass  # no user can have this name (NUL, control characters, length): wrong credentials
    else:
        async with request.app.state.reader.connect() as conn:
            user = await db.user_by_name_key(conn, name_key)
    encoded = user.password_hash if user is not None and user.password_hash else _DUMMY_HASH
    ok = await anyio.to_thread.run_sync(verify_password, password[:1024], encoded)
    if user is None or not user.password_hash or not ok:
        raise Unauthorized("wrong name or password")
    token = new_token()
    async with request.app.state.engine.begin() as conn:
        await db.insert_token(conn, user.id, token_hash(token))
    return JSONResponse({"token": token, "token_type": "bearer"})

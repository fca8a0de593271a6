"""Users, passwords and bearer tokens."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
import logging
import secrets
import unicodedata
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from . import db, throttle
from .cache import LookupCache
from .config import Settings
from .errors import BadRequest, Conflict, Forbidden, TooManyRequests, Unauthorized, Unprocessable

security_log = logging.getLogger("mediad.security")

log = logging.getLogger("mediad")

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


def clean_name(value: Any, field: str = "name") -> str:
    """A user's or a token's name, NFC: 1–64 characters, no control characters, not blank."""
    if value is None:
        raise Unprocessable(f"{field} is required")
    if not isinstance(value, str):
        raise Unprocessable(f"{field} must be a string")
    name = unicodedata.normalize("NFC", value)
    if not 1 <= len(name) <= 64:
        raise Unprocessable(f"{field} must be 1 to 64 characters long")
    if any(unicodedata.category(ch) in ("Cc", "Cs") for ch in name):
        raise Unprocessable(f"{field} must not contain control characters")
    if not name.strip():
        raise Unprocessable(f"{field} must not be blank")
    return name


def clean_user_name(value: Any) -> tuple[str, str]:
    """→ (name as stored, case-insensitive key)."""
    name = clean_name(value)
    return name, name.casefold()


def clean_password(value: Any) -> str:
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


async def authenticate(request: Request, *, cached: bool = False) -> uuid.UUID:
    """The caller's user id from `Authorization: Bearer <token>`; 401 otherwise. `cached`: a
    fresh check in the lookup cache answers (a hot route's saving of a round trip per request)."""
    state = request.app.state
    return await user_for_token(state.reader, bearer_token(request), state.settings,
                                state.cache if cached else None)


async def user_for_token(engine: AsyncEngine, token: str, settings: Settings,
                         cache: LookupCache | None = None) -> uuid.UUID:
    digest = token_hash(token)
    if cache is not None and (known := cached_user(cache, digest, settings)) is not None:
        return known
    stamp = cache.stamp() if cache is not None else None
    async with engine.connect() as conn:
        found = await db.user_for_token(conn, digest)
        # The lookup is by hash, so its timing says nothing about the token; compare anyway.
        if found is None or not hmac.compare_digest(found.token_hash, digest):
            raise Unauthorized(UNKNOWN_TOKEN)
        last_used = await accept_token(conn, digest, found.created_at, found.last_used_at, settings)
    if cache is not None:
        cache.keep_token(stamp, digest, found.user_id, found.created_at, last_used)
    return found.user_id


def cached_user(cache: LookupCache, digest: bytes, settings: Settings) -> uuid.UUID | None:
    """The user of a token the cache knows and that may be accepted without the database; None
    when the database must answer (unknown, expired: a 401 there, or its use due to be recorded)."""
    entry = cache.user(digest)
    if entry is None or not token_fresh(entry.created_at, entry.last_used_at, settings):
        return None
    return entry.user_id


# ---- token lifetimes ----------------------------------------------------------------------------

UNKNOWN_TOKEN = "unknown or expired token"  # the same answer for both: 401 either way


def token_expires_at(created_at: datetime, last_used_at: datetime | None, settings: Settings) -> datetime | None:
    """When the token stops working: MEDIAD_TOKEN_TTL_S after creation or MEDIAD_TOKEN_IDLE_S
    after its last recorded use, whichever comes first; None when neither is set."""
    limits = []
    if settings.token_ttl_s is not None:
        limits.append(created_at + timedelta(seconds=settings.token_ttl_s))
    if settings.token_idle_s is not None:
        limits.append((last_used_at or created_at) + timedelta(seconds=settings.token_idle_s))
    return min(limits) if limits else None


def token_expired(created_at: datetime, last_used_at: datetime | None, now: datetime, settings: Settings) -> bool:
    """The one expiry rule: every token check (routes, downloads, caches) asks this."""
    expires = token_expires_at(created_at, last_used_at, settings)
    return expires is not None and now >= expires


def touch_interval_s(settings: Settings) -> float:
    """How stale a recorded last use may get before it is written again: a write per token per
    interval, not per request. A tenth of the idle window keeps idle expiry within 10 % of exact."""
    return 60.0 if settings.token_idle_s is None else min(60.0, settings.token_idle_s / 10)


def touch_due(last_used_at: datetime | None, now: datetime, settings: Settings) -> bool:
    return last_used_at is None or (now - last_used_at).total_seconds() >= touch_interval_s(settings)


async def accept_token(conn: AsyncConnection, digest: bytes, created_at: datetime,
                       last_used_at: datetime | None, settings: Settings) -> datetime | None:
    """401 for an expired token; otherwise record its use when the recorded one is stale.
    → the last use as now recorded."""
    now = datetime.now(UTC)
    if token_expired(created_at, last_used_at, now, settings):
        raise Unauthorized(UNKNOWN_TOKEN)
    if touch_due(last_used_at, now, settings):
        await db.touch_token(conn, digest, now - timedelta(seconds=touch_interval_s(settings)))
        return now
    return last_used_at


def token_fresh(created_at: datetime, last_used_at: datetime | None, settings: Settings) -> bool:
    """Whether a cached token check may answer without the database: not expired, and its
    recorded use recent enough that no write is due (else the full check records it)."""
    now = datetime.now(UTC)
    return not token_expired(created_at, last_used_at, now, settings) and not touch_due(last_used_at, now, settings)


# ---- security events ----------------------------------------------------------------------------

def security_event(event: str, request: Request | None = None, *, user_id: uuid.UUID | str | None = None,
                   name: str | None = None, client: str | None = None, **fields: Any) -> None:
    """One JSON log line (logger "mediad.security") for an account event: `event`, the user id or
    the attempted name, the client address and the request id. Never pass a password or token."""
    extra: dict[str, Any] = {"event": event}
    if user_id is not None:
        extra["user_id"] = str(user_id)
    if name is not None:
        extra["user_name"] = name[:64]  # an attempted name is attacker-chosen: bounded
    if request is not None:
        extra["client"] = throttle.client_address(request.scope, request.app.state.settings)
        extra["request_id"] = request.scope.get("mediad.request_id")
    if client is not None:
        extra["client"] = client
    extra.update(fields)
    security_log.info(event, extra=extra)


# ---- sign-up ------------------------------------------------------------------------------------

SIGNUP_CLOSED = "sign-up is closed; an operator creates accounts with `mediad users create`"


def signup_policy(settings: Settings) -> str:
    """The start-up log's sentence on who may create accounts."""
    state = "open" if settings.signup_open else "closed"
    if settings.signup is not None:
        return f"sign-up is {state} (MEDIAD_SIGNUP={settings.signup})"
    if settings.signup_open:
        return f"sign-up is open: MEDIAD_HOST={settings.host} is a loopback address (MEDIAD_SIGNUP=closed to close it)"
    return (f"sign-up is closed: MEDIAD_HOST={settings.host} is reachable from a network "
            "(MEDIAD_SIGNUP=open to let anyone create an account; `mediad users create` works either way)")


async def auth_config(request: Request) -> JSONResponse:
    """What a sign-in page needs to know before anyone has signed in."""
    settings: Settings = request.app.state.settings
    return JSONResponse({"signup": "open" if settings.signup_open else "closed",
                         "token_ttl_s": settings.token_ttl_s, "token_idle_s": settings.token_idle_s})


async def create_user(request: Request) -> JSONResponse:
    if not request.app.state.settings.signup_open:
        raise Forbidden(SIGNUP_CLOSED)
    data = await read_json_object(request)
    name, name_key = clean_user_name(data.get("name"))
    password = data.get("password")
    password_hash = None
    if password is not None:
        password_hash = await anyio.to_thread.run_sync(hash_password, clean_password(password))
    settings = request.app.state.settings
    user_id, token = await register(request.app.state.engine, name, name_key, password_hash, "signup",
                                    quota=settings.default_quota_bytes)
    security_event("user.created", request, user_id=user_id, name=name)
    security_event("token.created", request, user_id=user_id, via="sign-up")
    return JSONResponse({"id": str(user_id), "name": name, "token": token}, status_code=201)


async def register(engine: AsyncEngine, name: str, name_key: str, password_hash: str | None,
                   token_name: str, *, quota: int | None = None) -> tuple[uuid.UUID, str]:
    """Create a user with a first token (POST /users, `mediad users create`); 409 if the name is taken."""
    token = new_token()
    async with engine.begin() as conn:
        user_id = await db.insert_user(conn, name, name_key, password_hash, quota=quota)
        if user_id is None:
            raise Conflict(f"the name {name!r} is taken")
        await db.insert_token(conn, user_id, token_hash(token), token_name)
    return user_id, token


# ---- sign-in and passwords ----------------------------------------------------------------------

async def _begin_attempt(request: Request, keys: list[str], *, name: str,
                         user_id: uuid.UUID | None = None) -> throttle.Attempt:
    """429 while the name or the client is blocked; otherwise the attempt is counted as a failure
    until it proves otherwise (_check_password)."""
    attempt = await throttle.begin(request.app.state.engine, keys, request.app.state.settings)
    if attempt.retry_after is not None:
        security_event("signin.throttled", request, user_id=user_id, name=name, retry_after=attempt.retry_after)
        raise TooManyRequests("too many failed sign-ins for this name or from this address; "
                              f"retry in {attempt.retry_after} s", attempt.retry_after)
    return attempt


async def _check_password(request: Request, attempt: throttle.Attempt, password: str, encoded: str | None, *,
                          name: str, user_id: uuid.UUID | None) -> bool:
    """scrypt runs against a dummy hash when there is no user or no password, so every failure
    costs the same time; a success takes the attempt's count back."""
    ok = await anyio.to_thread.run_sync(verify_password, password[:1024], encoded or _DUMMY_HASH)
    if ok and encoded is not None:
        await throttle.succeeded(request.app.state.engine, attempt)
        return True
    for kind, seconds in attempt.blocks_started():
        security_event("signin.blocked", request, user_id=user_id, name=name, by=kind, block_s=seconds)
    return False


async def confirm_password(request: Request, user: Any, password: str) -> bool:
    """Whether `password` is the signed-in `user`'s, counted against their name and the client
    address as a sign-in is (429 while either is blocked): a stolen token must not become a way
    around sign-in throttling."""
    keys = [throttle.name_key(user.name_key),
            throttle.address_key(throttle.client_address(request.scope, request.app.state.settings))]
    attempt = await _begin_attempt(request, keys, name=user.name, user_id=user.id)
    return await _check_password(request, attempt, password, user.password_hash, name=user.name, user_id=user.id)


async def login(request: Request) -> JSONResponse:
    data = await read_json_object(request)
    name, password = data.get("name"), data.get("password")
    if not isinstance(name, str) or not isinstance(password, str):
        raise Unprocessable("name and password are required strings")
    token_name = clean_name(data.get("token_name", "login"), "token_name")
    keys = [throttle.address_key(throttle.client_address(request.scope, request.app.state.settings))]
    name_key: str | None = None  # None: no user can have this name (NUL, control characters, length)
    with contextlib.suppress(Unprocessable):
        name_key = clean_user_name(name)[1]
        keys.append(throttle.name_key(name_key))
    # The throttle answers before the user is looked up: a blocked name that exists and one that
    # does not get the same answer in the same time.
    attempt = await _begin_attempt(request, keys, name=name)
    user = None
    if name_key is not None:
        async with request.app.state.reader.connect() as conn:
            user = await db.user_by_name_key(conn, name_key)
    user_id = user.id if user is not None else None
    encoded = user.password_hash if user is not None else None
    if not await _check_password(request, attempt, password, encoded, name=name, user_id=user_id):
        security_event("signin.failure", request, user_id=user_id, name=name)
        raise Unauthorized("wrong name or password")
    assert user is not None
    if user.disabled_at is not None:  # after scrypt: a disabled account answers no faster, says no more
        security_event("signin.failure", request, user_id=user.id, name=name, reason="disabled")
        raise Unauthorized("wrong name or password")
    token = new_token()
    async with request.app.state.engine.begin() as conn:
        token_id = await db.insert_token(conn, user.id, token_hash(token), token_name)
    security_event("signin.success", request, user_id=user.id, name=user.name)
    security_event("token.created", request, user_id=user.id, token_id=str(token_id), via="sign-in")
    return JSONResponse({"token": token, "token_type": "bearer", "id": str(token_id)})


async def change_password(request: Request) -> Response:
    """POST /users/me/password: every other token of the user is revoked, the caller's is kept."""
    token = bearer_token(request)
    user_id = await user_for_token(request.app.state.reader, token, request.app.state.settings)
    data = await read_json_object(request)
    old, new = data.get("password"), data.get("new_password")
    if old is not None and not isinstance(old, str):
        raise Unprocessable("password must be the current password, or null when none is set")
    async with request.app.state.reader.connect() as conn:
        user = await db.user_by_id(conn, user_id)
    if user is None:
        raise Unauthorized(UNKNOWN_TOKEN)  # deleted since the token check
    new = clean_password(new)
    if user.password_hash is None:
        if old is not None:
            raise Forbidden("this account has no password yet: send \"password\": null")
    else:
        if not await confirm_password(request, user, old or ""):
            security_event("password.change_refused", request, user_id=user.id, name=user.name)
            raise Forbidden("the current password is wrong")
    encoded = await anyio.to_thread.run_sync(hash_password, new)
    async with request.app.state.engine.begin() as conn:
        revoked = await db.set_password(conn, user.id, encoded, token_hash(token))
    security_event("password.changed", request, user_id=user.id)
    if revoked:
        security_event("token.revoked", request, user_id=user.id, tokens=revoked, reason="password changed")
    return Response(status_code=204)


async def sign_out(request: Request) -> Response:
    """DELETE /auth/token: revoke the presented token (204), on every node within 1 s (the
    tokens table's trigger notifies the download caches); an unknown token is 401."""
    token = bearer_token(request)
    await user_for_token(request.app.state.reader, token, request.app.state.settings)  # expired: 401 as anywhere
    digest = token_hash(token)
    async with request.app.state.engine.begin() as conn:
        revoked = (await conn.execute(sa.delete(db.tokens).where(db.tokens.c.token_hash == digest)
                                      .returning(db.tokens.c.id, db.tokens.c.user_id))).first()
    if revoked is None:
        raise Unauthorized(UNKNOWN_TOKEN)
    security_event("token.revoked", request, user_id=revoked.user_id, token_id=str(revoked.id), via="sign-out")
    return Response(status_code=204)

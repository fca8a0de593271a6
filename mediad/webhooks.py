"""Webhooks: per-user endpoints, the outbox writer, signing and the address rules.

An event is a row of `webhook_deliveries` per matching endpoint, inserted by `emit` inside the
transaction of the change it announces: it exists exactly when that change committed, and a
crash between commit and delivery loses nothing (mediad/deliveries.py sends them). Emitting for
a user with no endpoint is one statement on an indexed column that inserts nothing.

Signatures follow Standard Webhooks (standardwebhooks.com): `webhook-signature: v1,<base64
HMAC-SHA256 of "id.timestamp.body">`, keyed with the base64-decoded part of the `whsec_` secret.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import json
import secrets
import socket
import uuid
from datetime import UTC, datetime
from typing import Any
from urllib.parse import SplitResult, urlsplit

import anyio
import sqlalchemy as sa
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from sqlalchemy.engine import Row
from sqlalchemy.ext.asyncio import AsyncConnection
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from .auth import authenticate, read_json_object
from .db import WEBHOOK_EVENTS, files, uploads, webhook_deliveries, webhook_endpoints
from .errors import Conflict, NotFound, Unprocessable

CHANNEL = "mediad_webhooks"  # NOTIFY on commit of an event: every node's worker wakes at once
MAX_ENDPOINTS_PER_USER = 20
MAX_URL_CHARS = 2048
DELIVERIES_SHOWN = 100
_SECRET_BYTES = 32
_RESOLVE_TIMEOUT_S = 5.0
_KEY_DOMAIN = b"mediad-webhook-secrets-v1"  # the link key, put to a second, separate use


# ---- secrets (pure) -----------------------------------------------------------------------------

def secrets_key(server_key: bytes) -> bytes:
    """The AES-256 key for stored secrets, derived from the server key (MEDIAD_SECRET_KEY or the
    data dir's key): rotating that key makes stored secrets unreadable, as it ends signed links."""
    return hmac.new(server_key, _KEY_DOMAIN, hashlib.sha256).digest()


def new_secret() -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(_SECRET_BYTES)).decode("ascii")


def seal(key: bytes, endpoint_id: uuid.UUID, secret: str) -> bytes:
    """nonce ‖ ciphertext; the endpoint id is bound in, so a sealed secret cannot be moved to
    another row."""
    nonce = secrets.token_bytes(12)
    return nonce + AESGCM(key).encrypt(nonce, secret.encode("ascii"), endpoint_id.bytes)


def unseal(key: bytes, endpoint_id: uuid.UUID, sealed: bytes) -> str | None:
    """The secret, or None when this key did not seal it (another node's key, a rotated key)."""
    try:
        return AESGCM(key).decrypt(sealed[:12], sealed[12:], endpoint_id.bytes).decode("ascii")
    except (InvalidTag, ValueError):
        return None


def signature(secret: str, message_id: str, timestamp: int, body: bytes) -> str:
    """The Standard Webhooks `webhook-signature` value."""
    key = base64.b64decode(secret.removeprefix("whsec_"))
    signed = f"{message_id}.{timestamp}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode("ascii")


# ---- addresses (pure) ---------------------------------------------------------------------------

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
_METADATA = {ipaddress.ip_address("169.254.169.254"), ipaddress.ip_address("fd00:ec2::254")}
_CGNAT = ipaddress.ip_network("100.64.0.0/10")
# IPv6 addresses whose last 32 bits are an IPv4 address that a translator or an automatic tunnel
# delivers to: NAT64's well-known and local-use prefixes (RFC 6052, RFC 8215), IPv4-translated
# (RFC 2765) and the deprecated IPv4-compatible form (RFC 4291 2.5.5.1).
_IPV4_TAIL = tuple(ipaddress.ip_network(net) for net in ("64:ff9b::/96", "64:ff9b:1::/48", "::ffff:0:0:0/96", "::/96"))


def _embedded(address: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """The IPv4 addresses a connection to `address` may end up at."""
    if address.sixtofour is not None:  # 2002::/16
        return [address.sixtofour]
    if address.teredo is not None:  # 2001::/32: the relay, and the client behind it
        return list(address.teredo)
    if int(address) > 1 and any(address in net for net in _IPV4_TAIL):  # :: and ::1 are IPv6's own
        return [ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)]
    return []


def refused(address: IPAddress, allow_private: bool) -> str | None:
    """Why mediad must not connect to `address`, or None. Cloud metadata services are refused even
    when private addresses are allowed: no trusted network wants webhooks reading them."""
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            address = address.ipv4_mapped  # ::ffff:127.0.0.1 is 127.0.0.1
        else:
            for inner in _embedded(address):
                why = refused(inner, allow_private)
                if why is not None:
                    return f"an IPv6 form of {inner}, {why}"
    if address in _METADATA:
        return "a cloud metadata address"
    if allow_private:
        return None
    if address.is_loopback:
        return "a loopback address"
    if address.is_unspecified:
        return "an unspecified address"
    if address.is_multicast:
        return "a multicast address"
    if address.is_link_local:
        return "a link-local address"
    if isinstance(address, ipaddress.IPv4Address) and address in _CGNAT:
        return "a shared (CGNAT) address"
    if not address.is_global:
        return "a private or reserved address"
    return None


def parse_url(raw: Any) -> SplitResult:
    """An absolute http(s) URL without credentials; 422 otherwise."""
    if not isinstance(raw, str) or not raw or len(raw) > MAX_URL_CHARS:
        raise Unprocessable(f"url must be an http:// or https:// URL of at most {MAX_URL_CHARS} characters")
    try:
        url = urlsplit(raw)
        url.port  # noqa: B018  (raises on a port out of range)
    except ValueError as exc:
        raise Unprocessable(f"url is not a valid URL: {exc}") from None
    if url.scheme not in ("http", "https") or not url.hostname:
        raise Unprocessable("url must be an absolute http:// or https:// URL")
    if url.username is not None or url.password is not None:
        raise Unprocessable("url must not carry credentials; check the webhook-signature header instead")
    if not raw.isascii() or any(ord(ch) < 0x21 or ch == "\x7f" for ch in raw):
        raise Unprocessable("url must be ASCII without spaces or control characters (an international "
                            "domain name in its xn-- form, a path percent-encoded)")
    return url


async def resolve(url: SplitResult, allow_private: bool) -> list[IPAddress]:
    """The addresses `url`'s host resolves to, every one of them allowed; 422 otherwise. Called at
    registration and again before every attempt (a DNS answer may change: rebinding)."""
    assert url.hostname is not None
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        literal: IPAddress | None = ipaddress.ip_address(url.hostname)
    except ValueError:
        literal = None
    if literal is not None:  # nothing to look up
        why = refused(literal, allow_private)
        if why is not None:
            raise Unprocessable(f"the URL's host is {literal}, {why}; webhooks are not sent there "
                                "(MEDIAD_WEBHOOK_ALLOW_PRIVATE=true allows private addresses)")
        return [literal]
    try:
        with anyio.fail_after(_RESOLVE_TIMEOUT_S):
            found = await anyio.getaddrinfo(url.hostname, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError, TimeoutError) as exc:
        raise Unprocessable(f"the URL's host {url.hostname!r} does not resolve: {exc or 'no answer'}") from None
    addresses = list(dict.fromkeys(ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in found))
    for address in addresses:
        why = refused(address, allow_private)
        if why is not None:
            raise Unprocessable(f"the URL's host resolves to {address}, {why}; webhooks are not sent there "
                                "(MEDIAD_WEBHOOK_ALLOW_PRIVATE=true allows private addresses)")
    if not addresses:
        raise Unprocessable(f"the URL's host {url.hostname!r} has no address")
    return addresses


# ---- the outbox ---------------------------------------------------------------------------------

def _timestamp() -> str:
    # Microseconds: `timestamp` is what orders events, and several land within one second.
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


# One statement: fan out to the matching endpoints, and NOTIFY (delivered at commit) only when
# there was one. With no endpoint it is an index probe on webhook_endpoints.user_id.
_WANTED = "e.user_id = :user_id AND (e.events IS NULL OR :event = ANY(e.events))"  # the endpoints of an event
_EMIT = sa.text(
    "WITH queued AS ("
    " INSERT INTO webhook_deliveries (id, endpoint_id, event_id, event, body)"
    f" SELECT gen_random_uuid(), e.id, :event_id, :event, :body FROM webhook_endpoints e WHERE {_WANTED}"
    " RETURNING 1)"
    f" SELECT pg_notify('{CHANNEL}', '') WHERE EXISTS (SELECT 1 FROM queued)"
).bindparams(sa.bindparam("user_id", type_=sa.Uuid), sa.bindparam("event_id", type_=sa.Uuid))


_LISTENING = sa.text(f"SELECT 1 FROM webhook_endpoints e WHERE {_WANTED} LIMIT 1").bindparams(
    sa.bindparam("user_id", type_=sa.Uuid))


async def emit(conn: AsyncConnection, user_id: uuid.UUID, event_type: str, data: dict[str, Any]) -> None:
    """Queue `event_type` with `data` for `user_id`'s endpoints that want it, inside the caller's
    transaction (the event stands or falls with the change it announces)."""
    assert event_type in WEBHOOK_EVENTS, event_type
    body = json.dumps({"type": event_type, "timestamp": _timestamp(), "data": data},
                      ensure_ascii=False, separators=(",", ":"))
    await conn.execute(_EMIT, {"user_id": user_id, "event_id": uuid.uuid4(), "event": event_type, "body": body})


async def listening(conn: AsyncConnection, user_id: uuid.UUID, event_type: str) -> bool:
    """Whether any of the user's endpoints wants `event_type`: lets a bulk change skip building
    events nobody receives."""
    return (await conn.execute(_LISTENING, {"user_id": user_id, "event": event_type})).first() is not None


async def emit_file(conn: AsyncConnection, event_type: str, row: Row[Any], node: uuid.UUID | None) -> None:
    """`event_type` with `{"file": File}` for the File row as it is now, seen from `node`."""
    from .files import file_json  # here: files → cloud → webhooks would otherwise be a cycle

    await emit(conn, row.owner_id, event_type, {"file": file_json(row, node)})


async def emit_file_by_id(conn: AsyncConnection, event_type: str, file_id: uuid.UUID, blob_id: uuid.UUID,
                          node: uuid.UUID | None) -> None:
    """As emit_file, for a change made by id: only while the row still holds `blob_id` (a replace
    or delete in between makes this event moot) and its owner has an endpoint at all."""
    wanted = sa.exists().where(webhook_endpoints.c.user_id == files.c.owner_id)
    row = (await conn.execute(sa.select(files).where(files.c.id == file_id, files.c.blob_id == blob_id, wanted))
           ).first()
    if row is not None:
        await emit_file(conn, event_type, row, node)


def upload_json(row: Row[Any]) -> dict[str, Any]:
    """A tus upload as GET /uploads/{id} shows it."""
    return {"id": str(row.id), "offset": row.offset, "length": row.length,
            "expires_at": row.expires_at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "file_id": str(row.file_id) if row.file_id else None}


async def emit_expired_uploads(conn: AsyncConnection, upload_ids: list[uuid.UUID]) -> None:
    """upload.expired for the unfinished ones among these uploads (before their rows go)."""
    # Unfinished by its offset, not by a NULL file_id: a finished upload whose File was deleted
    # since has file_id NULL again (ON DELETE SET NULL).
    rows = (await conn.execute(sa.select(uploads).where(
        uploads.c.id.in_(upload_ids), uploads.c.offset < uploads.c.length,
        sa.exists().where(webhook_endpoints.c.user_id == uploads.c.owner_id)))).all()
    for row in rows:
        await emit(conn, row.owner_id, "upload.expired", {"upload": upload_json(row)})


# ---- the HTTP API -------------------------------------------------------------------------------

def _rfc3339(moment: datetime | None) -> str | None:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ") if moment is not None else None


def _events(raw: Any) -> list[str] | None:
    """The event types asked for; None (all) when omitted."""
    if raw is None:
        return None
    if not isinstance(raw, list) or not raw or not all(isinstance(e, str) for e in raw):
        raise Unprocessable("events must be a non-empty list of event types (omit it for all)")
    unknown = sorted(set(raw) - set(WEBHOOK_EVENTS))
    if unknown:
        raise Unprocessable(f"unknown event type {unknown[0]!r}; known: {', '.join(WEBHOOK_EVENTS)}")
    return [e for e in WEBHOOK_EVENTS if e in raw]


def endpoint_json(row: Row[Any]) -> dict[str, Any]:
    return {"id": str(row.id), "url": row.url, "events": list(row.events or WEBHOOK_EVENTS),
            "created_at": _rfc3339(row.created_at)}


def _endpoint_id(request: Request) -> uuid.UUID:
    try:
        return uuid.UUID(request.path_params["webhook_id"])
    except ValueError:
        raise NotFound("no such webhook") from None


async def create(request: Request) -> JSONResponse:
    user_id = await authenticate(request)
    body = await read_json_object(request)
    url = parse_url(body.get("url"))
    events = _events(body.get("events"))
    await resolve(url, request.app.state.settings.webhook_allow_private)
    endpoint_id, secret = uuid.uuid4(), new_secret()
    sealed = seal(secrets_key(request.app.state.link_key), endpoint_id, secret)
    async with request.app.state.engine.begin() as conn:
        # Serialises one user's registrations, so the cap holds under concurrent requests.
        await conn.execute(sa.select(sa.func.pg_advisory_xact_lock(sa.func.hashtext(str(user_id)))))
        count = (await conn.execute(sa.select(sa.func.count()).where(webhook_endpoints.c.user_id == user_id))
                 ).scalar_one()
        if count >= MAX_ENDPOINTS_PER_USER:
            raise Conflict(f"a user may register at most {MAX_ENDPOINTS_PER_USER} webhooks")
        row = (await conn.execute(sa.insert(webhook_endpoints).values(
            id=endpoint_id, user_id=user_id, url=url.geturl(), events=events, secret=sealed)
            .returning(webhook_endpoints))).one()
    return JSONResponse({**endpoint_json(row), "secret": secret}, status_code=201,
                        headers={"Location": f"/webhooks/{endpoint_id}"})


async def list_(request: Request) -> JSONResponse:
    user_id = await authenticate(request)
    async with request.app.state.reader.connect() as conn:
        rows = (await conn.execute(sa.select(webhook_endpoints).where(webhook_endpoints.c.user_id == user_id)
                                   .order_by(webhook_endpoints.c.created_at, webhook_endpoints.c.id))).all()
    return JSONResponse({"webhooks": [endpoint_json(row) for row in rows]})


async def delete(request: Request) -> Response:
    """204; its queued deliveries go with it (an endpoint removed is not called again)."""
    user_id = await authenticate(request)
    endpoint_id = _endpoint_id(request)
    async with request.app.state.engine.begin() as conn:
        gone = await conn.execute(sa.delete(webhook_endpoints).where(
            webhook_endpoints.c.id == endpoint_id, webhook_endpoints.c.user_id == user_id))
    if gone.rowcount != 1:
        raise NotFound("no such webhook")
    return Response(status_code=204)


def delivery_json(row: Row[Any]) -> dict[str, Any]:
    return {"id": str(row.id), "event_id": str(row.event_id), "event": row.event, "status": row.status,
            "attempts": row.attempts, "last_status_code": row.last_status_code, "last_error": row.last_error,
            "created_at": _rfc3339(row.created_at), "delivered_at": _rfc3339(row.delivered_at),
            "next_attempt_at": _rfc3339(row.next_attempt_at) if row.status == "retrying" else None}


async def deliveries(request: Request) -> JSONResponse:
    user_id = await authenticate(request)
    endpoint_id = _endpoint_id(request)
    d = webhook_deliveries.c
    async with request.app.state.reader.connect() as conn:
        owned = (await conn.execute(sa.select(webhook_endpoints.c.id).where(
            webhook_endpoints.c.id == endpoint_id, webhook_endpoints.c.user_id == user_id))).first()
        if owned is None:
            raise NotFound("no such webhook")
        rows = (await conn.execute(sa.select(webhook_deliveries).where(d.endpoint_id == endpoint_id)
                                   .order_by(d.created_at.desc(), d.id.desc()).limit(DELIVERIES_SHOWN))).all()
    return JSONResponse({"deliveries": [delivery_json(row) for row in rows]})

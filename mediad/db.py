"""The schema (SQLAlchemy Core tables; Alembic migrations own the database) and the queries."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import asyncpg  # type: ignore[import-untyped]
import sqlalchemy as sa
from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects.postgresql import ARRAY, JSONB, UUID, insert
from sqlalchemy.engine import Dialect, ExceptionContext, Row
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from .config import Settings

# A row of whatever columns a query selects: SQLAlchemy 2.1 types a Row by its columns (Row[int,
# str]), and these functions' callers read rows by column name.
AnyRow = Row[*tuple[Any, ...]]

metadata = sa.MetaData(
    naming_convention={
        "ix": "ix_%(column_0_label)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

TZ = sa.DateTime(timezone=True)

users = sa.Table(
    "users",
    metadata,
    sa.Column("id", UUID(as_uuid=True), primary_key=True),
    sa.Column("name", sa.Text, nullable=False),
    # NFC + casefold of name: uniqueness is case-insensitive without a functional index.
    sa.Column("name_key", sa.Text, nullable=False, unique=True),
    # scrypt$n$r$p$salt$hash, or NULL for token-only users.
    sa.Column("password_hash", sa.Text),
    sa.Column("created_at", TZ, nullable=False, server_default=sa.func.now()),
    # Set by `mediad users disable`: every token of the user stops working, sign-in is refused.
    sa.Column("disabled_at", TZ),
    # Bytes the user's files may take in all; NULL: unlimited (mediad/quotas.py).
    sa.Column("quota", sa.BigInteger),
)

tokens = sa.Table(
    "tokens",
    metadata,
    # sha256 of the bearer token: tokens are 256-bit random, so a fast hash is enough and the
    # lookup stays one index probe per request.
    sa.Column("token_hash", sa.LargeBinary(32), primary_key=True),
    sa.Column("user_id", UUID(as_uuid=True), sa.ForeignKey("users.id", ondelete="CASCADE"),
              nullable=False, index=True),
    sa.Column("created_at", TZ, nullable=False, server_default=sa.func.now()),
    # The public handle of a token (GET /auth/tokens, DELETE /auth/tokens/{id}); never the secret.
    sa.Column("id", UUID(as_uuid=True), nullable=False, unique=True,
              server_default=sa.text("gen_random_uuid()")),
    sa.Column("name", sa.Text, nullable=False, server_default="login"),
    # Written when older than a fraction of the idle window (auth.touch_due), not on every use.
    sa.Column("last_used_at", TZ),
)

signin_throttle = sa.Table(
    "signin_throttle",
    metadata,
    # Failed sign-ins per "name:<name key>" or "addr:<client address>" (mediad/throttle.py); in
    # the database so that every worker and node counts the same attempts.
    sa.Column("key", sa.Text, primary_key=True),
    sa.Column("failures", sa.Integer, nullable=False, server_default="0"),  # in the current window
    sa.Column("window_started_at", TZ, nullable=False, server_default=sa.func.now()),
    sa.Column("blocked_until", TZ),
    # Blocks so far: the next one lasts MEDIAD_SIGNIN_BLOCK_S * 2**level (at most an hour).
    sa.Column("level", sa.Integer, nullable=False, server_default="0"),
    sa.Column("updated_at", TZ, nullable=False, server_default=sa.func.now(), index=True),
)

CLOUD_STATES = ("pending", "stored", "failed")
MEDIA_STATES = ("pending", "ready", "failed")
MEDIA_KINDS = ("image", "video", "audio", "other")
_PROBED_KINDS = ("image", "video", "audio")


def initial_media(format: str) -> dict[str, Any]:
    """A new content's media columns: pending when probing can tell more, else known at once."""
    kind = format.split("/", 1)[0]
    if kind in _PROBED_KINDS:
        return {"media_kind": kind, "media_state": "pending", "media": None, "media_lease_until": None}
    return {"media_kind": "other", "media_state": "ready", "media_lease_until": None,
            "media": {"kind": "other", "status": "ready", "error": None}}
# Everything up to the last "/" of a path (immutable functions only, as a generated column needs).
FOLDER_OF_PATH = "left(path, length(path) - strpos(reverse(path), '/') + 1)"

files = sa.Table(
    "files",
    metadata,
    sa.Column("id", UUID(as_uuid=True), primary_key=True),
    sa.Column("owner_id", UUID(as_uuid=True), sa.ForeignKey("users.id", ondelete="CASCADE"),
              nullable=False),
    sa.Column("name", sa.Text, nullable=False),
    sa.Column("extension", sa.Text, nullable=False),
    sa.Column("format", sa.Text, nullable=False),
    sa.Column("size", sa.BigInteger, nullable=False),
    sa.Column("sha256", sa.Text, nullable=False),
    # Virtual path in the owner's tree; NULL when uploaded without one (NULLs never collide).
    sa.Column("path", sa.Text),
    # The folder holding `path` ("/videos/" for "/videos/a.mp4"), kept by PostgreSQL itself: the
    # folder listing finds a folder's own files, and groups its subfolders, with one index range.
    sa.Column("folder", sa.Text, sa.Computed(FOLDER_OF_PATH, persisted=True)),
    # The stored content version: disk path and cloud key derive from it. A replace writes a
    # new blob and swaps this column, so readers see old or new bytes whole, never a mix.
    sa.Column("blob_id", UUID(as_uuid=True), nullable=False, unique=True),
    sa.Column("created_at", TZ, nullable=False, server_default=sa.func.now()),
    sa.Column("updated_at", TZ, nullable=False, server_default=sa.func.now()),
    sa.Column("accessed_at", TZ, nullable=False, server_default=sa.func.now()),
    # The node (data dir) whose disk holds the blob; NULL once evicted after a verified cloud
    # copy. Several instances may share one database with data dirs of their own.
    sa.Column("node", UUID(as_uuid=True)),
    sa.Column("cloud_state", sa.Text, nullable=False, server_default="pending"),
    sa.Column("cloud_stored_at", TZ),
    sa.Column("cloud_attempts", sa.Integer, nullable=False, server_default="0"),
    sa.Column("cloud_next_attempt_at", TZ, nullable=False, server_default=sa.func.now()),
    sa.Column("cloud_last_error", sa.Text),
    # A worker's claim on the push of this row; another process may take it once it lapses.
    sa.Column("cloud_lease_until", TZ),
    # Probing (mediad/media.py): every new or replaced content starts pending, so a restart finds
    # what was missed; `media` is the File's "media" object once probed (never GPS).
    sa.Column("media_state", sa.Text, nullable=False, server_default="pending"),
    sa.Column("media", JSONB),
    sa.Column("media_lease_until", TZ),
    # GET /files?kind=: the detected format's top-level type until the probe says better.
    sa.Column("media_kind", sa.Text, nullable=False, server_default="other"),
    sa.UniqueConstraint("owner_id", "path"),
    sa.CheckConstraint(f"cloud_state IN {CLOUD_STATES!r}", name="cloud_state"),
    sa.CheckConstraint(f"media_state IN {MEDIA_STATES!r}", name="media_state"),
    sa.CheckConstraint("size >= 0", name="size"),
    sa.Index("ix_files_owner_created", "owner_id", "created_at", "id"),
    sa.Index("ix_files_cloud_due", "cloud_state", "cloud_next_attempt_at"),
    sa.Index("ix_files_media_state", "media_state"),
    # text_pattern_ops compares bytes, so "starts with" is an index range (db.prefix_range) whatever
    # the database's collation; size is included for index-only counts of a folder's bytes.
    sa.Index("ix_files_owner_path", "owner_id", "path", postgresql_ops={"path": "text_pattern_ops"}),
    sa.Index("ix_files_owner_folder", "owner_id", "folder", "created_at", "id",
             postgresql_ops={"folder": "text_pattern_ops"}, postgresql_include=["size"]),
)

records = sa.Table(
    "records",
    metadata,
    # Files made by POST /records: only these are served by the tokenless /record link.
    sa.Column("file_id", UUID(as_uuid=True), sa.ForeignKey("files.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("created_at", TZ, nullable=False, server_default=sa.func.now()),
    sa.Column("duration_ms", sa.BigInteger, nullable=False),
)

uploads = sa.Table(
    "uploads",
    metadata,
    # tus uploads in progress (and finished ones until they expire).
    sa.Column("id", UUID(as_uuid=True), primary_key=True),
    sa.Column("owner_id", UUID(as_uuid=True), sa.ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
    sa.Column("length", sa.BigInteger, nullable=False),
    # Bytes durable in the partial file: written only after they are fsynced.
    sa.Column("offset", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("name", sa.Text, nullable=False),
    sa.Column("path", sa.Text),
    # The node whose data dir holds the partial file.
    sa.Column("node", UUID(as_uuid=True), nullable=False),
    sa.Column("created_at", TZ, nullable=False, server_default=sa.func.now()),
    sa.Column("expires_at", TZ, nullable=False, index=True),
    # A PATCH's claim on the upload, across processes; lapses if its holder dies.
    sa.Column("lock_until", TZ),
    sa.Column("file_id", UUID(as_uuid=True), sa.ForeignKey("files.id", ondelete="SET NULL")),
    sa.CheckConstraint('"offset" >= 0 AND "offset" <= length', name="offset"),
)

cloud_deletions = sa.Table(
    "cloud_deletions",
    metadata,
    # Object keys to delete from the cloud (deleted files, replaced content), retried like pushes.
    sa.Column("key", sa.Text, primary_key=True),
    sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
    sa.Column("next_attempt_at", TZ, nullable=False, server_default=sa.func.now()),
    sa.Column("last_error", sa.Text),
    sa.Column("lease_until", TZ),
    # Bumped when the key is queued again while queued (a push whose PUT landed after the
    # deletion's DELETE): a deleter removes the row only if it is still the generation it claimed.
    sa.Column("generation", sa.Integer, nullable=False, server_default="0"),
)

WEBHOOK_EVENTS = ("file.created", "file.replaced", "file.moved", "file.deleted", "file.stored", "file.evicted",
                  "file.media_ready", "record.created", "upload.expired")
DELIVERY_STATES = ("retrying", "delivered", "failed")

webhook_endpoints = sa.Table(
    "webhook_endpoints",
    metadata,
    sa.Column("id", UUID(as_uuid=True), primary_key=True),
    sa.Column("user_id", UUID(as_uuid=True), sa.ForeignKey("users.id", ondelete="CASCADE"),
              nullable=False, index=True),
    sa.Column("url", sa.Text, nullable=False),
    # The event types it receives; NULL: all of them, including ones added later.
    sa.Column("events", ARRAY(sa.Text)),
    # nonce ‖ AES-GCM ciphertext of the signing secret, under a key derived from the server key:
    # mediad must sign with it, so it cannot be a hash; a database dump alone does not reveal it.
    sa.Column("secret", sa.LargeBinary, nullable=False),
    sa.Column("created_at", TZ, nullable=False, server_default=sa.func.now()),
)

webhook_deliveries = sa.Table(
    "webhook_deliveries",
    metadata,
    # The outbox: one row per event and endpoint, written in the transaction of the change it
    # announces, so it exists exactly when that change committed.
    sa.Column("id", UUID(as_uuid=True), primary_key=True),
    sa.Column("endpoint_id", UUID(as_uuid=True), sa.ForeignKey("webhook_endpoints.id", ondelete="CASCADE"),
              nullable=False),
    # The webhook-id header: one per event, the same on every attempt.
    sa.Column("event_id", UUID(as_uuid=True), nullable=False),
    sa.Column("event", sa.Text, nullable=False),
    # The exact bytes signed and sent (UTF-8 JSON), fixed at emit time.
    sa.Column("body", sa.Text, nullable=False),
    sa.Column("status", sa.Text, nullable=False, server_default="retrying"),
    sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
    sa.Column("next_attempt_at", TZ, nullable=False, server_default=sa.func.now()),
    # A worker's claim on the next attempt; another process may take it once it lapses.
    sa.Column("lease_until", TZ),
    sa.Column("last_status_code", sa.Integer),
    sa.Column("last_error", sa.Text),
    sa.Column("created_at", TZ, nullable=False, server_default=sa.func.now()),
    sa.Column("delivered_at", TZ),
    sa.CheckConstraint(f"status IN {DELIVERY_STATES!r}", name="status"),
    sa.Index("ix_webhook_deliveries_endpoint_created", "endpoint_id", "created_at"),
    sa.Index("ix_webhook_deliveries_due", "status", "next_attempt_at"),
)


def async_url(url: str) -> str:
    """postgresql://… as given by users → the asyncpg dialect SQLAlchemy needs."""
    scheme, sep, rest = url.partition("://")
    if scheme in ("postgres", "postgresql"):
        return f"postgresql+asyncpg://{rest}"
    return url


def create_engine(url: str, settings: Settings) -> AsyncEngine:
    engine = create_async_engine(
        async_url(url),
        # No overflow: an overflow connection is closed as soon as it is returned, so under load
        # every burst forked PostgreSQL backends and re-ran asyncpg's setup (618 in a 120 s soak,
        # 18 % of a core); waiting a moment for a pooled connection is cheaper than opening one.
        pool_size=settings.db_pool_size,
        max_overflow=0,
        pool_timeout=settings.db_pool_timeout_s,
        # No pre-ping: with asyncpg it costs extra round trips on every checkout (measured: ~6 per
        # SELECT 1, and /health p99 of 400+ ms under 32 concurrent uploads). A connection found dead
        # invalidates the pool instead, and that one request answers 503.
        pool_recycle=1800,
        connect_args={"timeout": 5, "command_timeout": 30},
    )
    sa.event.listen(engine.sync_engine, "do_connect", _connect)
    sa.event.listen(engine.sync_engine, "handle_error", _out_of_reach)
    return engine


# ---- the database out of reach ------------------------------------------------------------------
# Whatever layer notices it, "the database cannot serve us now" becomes SQLAlchemy's OperationalError
# (the app answers 503 + Retry-After), and the pool starts afresh, so that service resumes by itself
# once the database is back. What asyncpg raises then: OSError (connection refused, the socket file
# gone), TimeoutError (no answer to a connect or a query), and SQLSTATE classes 08 (connection
# exception), 57 (operator intervention: shutting down, starting up) and 53 (too many connections).

_UNAVAILABLE = (OSError, TimeoutError, asyncpg.PostgresConnectionError,
                asyncpg.exceptions.OperatorInterventionError, asyncpg.exceptions.InsufficientResourcesError)


def _unavailable(exc: BaseException | None) -> bool:
    """Whether `exc`, or the driver error it wraps, means the database is out of reach (not a bug)."""
    while exc is not None:
        if isinstance(exc, _UNAVAILABLE):
            return True
        exc = exc.__cause__
    return False


def _connect(dialect: Dialect, record: Any, cargs: Any, cparams: Any) -> Any:
    """SQLAlchemy passes a refused or missing socket (OSError) or a connect timeout up unwrapped,
    and a server starting up as a generic error: make each the DBAPI's OperationalError."""
    try:
        return dialect.connect(*cargs, **cparams)
    except Exception as exc:
        if _unavailable(exc) and not isinstance(exc, dialect.loaded_dbapi.OperationalError):
            raise dialect.loaded_dbapi.OperationalError(f"cannot connect to the database: {exc!r}", exc) from exc
        raise


def _out_of_reach(context: ExceptionContext) -> BaseException | None:
    """A connection dropped mid-query (asyncpg's generic error) or a query left unanswered (a bare
    TimeoutError): OperationalError, and every pooled connection is replaced. A cancellation
    (SQLAlchemy counts it as a disconnect too) stays what it is, or the cancelled task never learns."""
    original = context.original_exception
    if not isinstance(original, Exception) or not (context.is_disconnect or _unavailable(original)):
        return None
    context.is_disconnect = True  # a connection that timed out is in an unknown state: do not reuse it
    if isinstance(context.sqlalchemy_exception, sa_exc.OperationalError):
        return None
    return sa_exc.OperationalError(context.statement, context.parameters, original, connection_invalidated=True)


# ---- users and tokens ---------------------------------------------------------------------------

async def insert_user(conn: AsyncConnection, name: str, name_key: str,
                      password_hash: str | None, quota: int | None = None) -> uuid.UUID | None:
    """Insert a user; None when the name is taken (case-insensitively)."""
    user_id = uuid.uuid4()
    result = await conn.execute(
        insert(users)
        .values(id=user_id, name=name, name_key=name_key, password_hash=password_hash, quota=quota)
        .on_conflict_do_nothing(index_elements=["name_key"])
        .returning(users.c.id)
    )
    return result.scalar_one_or_none()


async def user_by_name_key(conn: AsyncConnection, name_key: str) -> Row[Any] | None:
    result = await conn.execute(sa.select(users).where(users.c.name_key == name_key))
    return result.first()


async def insert_token(conn: AsyncConnection, user_id: uuid.UUID, token_hash: bytes, name: str) -> uuid.UUID:
    result = await conn.execute(sa.insert(tokens).values(token_hash=token_hash, user_id=user_id, name=name)
                                .returning(tokens.c.id))
    return result.scalar_one()


# The statements every request runs are built once: building a Select and its cache key costs
# ~200 µs a request, a prebuilt one's key is memoised (ops/soak.py showed the difference).
# A disabled user's tokens match nothing: the join on the user's primary key is one more index probe.
_ACTIVE_TOKENS = tokens.join(users, (users.c.id == tokens.c.user_id) & users.c.disabled_at.is_(None))
_USER_FOR_TOKEN = (sa.select(tokens.c.user_id, tokens.c.token_hash, tokens.c.created_at, tokens.c.last_used_at)
                   .select_from(_ACTIVE_TOKENS).where(tokens.c.token_hash == sa.bindparam("token_hash")))


async def user_for_token(conn: AsyncConnection, token_hash: bytes) -> AnyRow | None:
    """(user_id, token_hash, created_at, last_used_at) of a token, or None."""
    result = await conn.execute(_USER_FOR_TOKEN, {"token_hash": token_hash})
    return result.first()


_TOUCH_TOKEN = sa.update(tokens).where(
    tokens.c.token_hash == sa.bindparam("digest"),
    sa.or_(tokens.c.last_used_at.is_(None), tokens.c.last_used_at < sa.bindparam("before", type_=TZ)),
).values(last_used_at=sa.func.now())


async def touch_token(conn: AsyncConnection, token_hash: bytes, before: datetime) -> None:
    """Record a use of the token unless one was recorded since `before` (other workers race)."""
    await conn.execute(_TOUCH_TOKEN, {"digest": token_hash, "before": before})


async def user_by_id(conn: AsyncConnection, user_id: uuid.UUID) -> Row[Any] | None:
    return (await conn.execute(sa.select(users).where(users.c.id == user_id))).first()


async def set_password(conn: AsyncConnection, user_id: uuid.UUID, password_hash: str,
                       keep_token_hash: bytes) -> int:
    """Change the password and revoke every token of the user but `keep_token_hash`; → revoked count."""
    await conn.execute(sa.update(users).where(users.c.id == user_id).values(password_hash=password_hash))
    result = await conn.execute(sa.delete(tokens).where(tokens.c.user_id == user_id,
                                                        tokens.c.token_hash != keep_token_hash))
    return result.rowcount


async def list_tokens(conn: AsyncConnection, user_id: uuid.UUID) -> Sequence[AnyRow]:
    return (await conn.execute(
        sa.select(tokens.c.id, tokens.c.name, tokens.c.created_at, tokens.c.last_used_at, tokens.c.token_hash)
        .where(tokens.c.user_id == user_id).order_by(tokens.c.created_at, tokens.c.id))).all()


async def delete_token(conn: AsyncConnection, token_id: uuid.UUID, user_id: uuid.UUID | None = None) -> bool:
    """Revoke a token by id (only if it is `user_id`'s, when given)."""
    query = sa.delete(tokens).where(tokens.c.id == token_id)
    if user_id is not None:
        query = query.where(tokens.c.user_id == user_id)
    return (await conn.execute(query)).rowcount == 1


async def get_user(conn: AsyncConnection, user_id: uuid.UUID) -> Row[Any] | None:
    return (await conn.execute(sa.select(users).where(users.c.id == user_id))).first()


async def list_users(conn: AsyncConnection) -> Sequence[AnyRow]:
    count = sa.select(sa.func.count()).where(files.c.owner_id == users.c.id).scalar_subquery()
    total = sa.select(sa.func.coalesce(sa.func.sum(files.c.size), 0)).where(
        files.c.owner_id == users.c.id).scalar_subquery()
    return (await conn.execute(
        sa.select(users.c.id, users.c.name, users.c.created_at, users.c.disabled_at,
                  count.label("files"), total.label("bytes"))
        .order_by(users.c.name_key))).all()


async def set_disabled(conn: AsyncConnection, name_key: str, disabled: bool) -> bool:
    """Disable or enable a user by name: an UPDATE of users, which caches of token checks watch."""
    result = await conn.execute(
        sa.update(users).where(users.c.name_key == name_key)
        .values(disabled_at=sa.func.now() if disabled else None))
    return result.rowcount == 1


async def user_upload_ids(conn: AsyncConnection, user_id: uuid.UUID) -> list[uuid.UUID]:
    return list((await conn.execute(sa.select(uploads.c.id).where(uploads.c.owner_id == user_id))).scalars())


async def delete_user(conn: AsyncConnection, user_id: uuid.UUID) -> list[uuid.UUID]:
    """Delete a user with every token, file and upload (foreign keys cascade); the File blobs
    deleted, for the caller to remove from disk and queue for deletion from the cloud."""
    blobs = (await conn.execute(
        sa.select(files.c.blob_id).where(files.c.owner_id == user_id).with_for_update())).scalars().all()
    await conn.execute(sa.delete(users).where(users.c.id == user_id))
    return list(blobs)


# ---- files --------------------------------------------------------------------------------------

async def get_file(conn: AsyncConnection, owner_id: uuid.UUID, file_id: uuid.UUID) -> Row[Any] | None:
    result = await conn.execute(
        sa.select(files).where(files.c.id == file_id, files.c.owner_id == owner_id)
    )
    return result.first()


async def file_for_token(conn: AsyncConnection, token_hash: bytes, *, file_id: uuid.UUID | None = None,
                         path: str | None = None) -> Row[Any] | None:
    """Authentication and lookup in one round trip (downloads are hot: media players send many
    range requests). None: unknown token; a row whose `id` is None: no such file for that user."""
    if file_id is not None:
        result = await conn.execute(_FILE_BY_ID_FOR_TOKEN, {"token_hash": token_hash, "key": file_id})
    else:
        result = await conn.execute(_FILE_BY_PATH_FOR_TOKEN, {"token_hash": token_hash, "key": path})
    return result.first()


def _file_for_token(key: sa.ColumnElement[Any]) -> sa.Select[Any]:
    match = (files.c.owner_id == tokens.c.user_id) & (key == sa.bindparam("key", type_=key.type))
    return (sa.select(tokens.c.user_id.label("token_user_id"), tokens.c.created_at.label("token_created_at"),
                      tokens.c.last_used_at.label("token_last_used_at"), *files.c)
            .select_from(_ACTIVE_TOKENS.outerjoin(files, match))
            .where(tokens.c.token_hash == sa.bindparam("token_hash")))


_FILE_BY_ID_FOR_TOKEN = _file_for_token(files.c.id)
_FILE_BY_PATH_FOR_TOKEN = _file_for_token(files.c.path)


async def get_file_by_path(conn: AsyncConnection, owner_id: uuid.UUID, path: str) -> Row[Any] | None:
    result = await conn.execute(
        sa.select(files).where(files.c.owner_id == owner_id, files.c.path == path)
    )
    return result.first()


async def put_file(conn: AsyncConnection, values: dict[str, Any]) -> tuple[Row[Any], uuid.UUID | None]:
    """Insert a File, or replace the owner's file at the same path (same id, new content).

    Returns the row and the blob it displaced (None when nothing was replaced). Runs inside the
    caller's transaction; a concurrent insert at the same path is resolved by retrying, so the
    loser of the race becomes a replace and no blob is left without a row.
    """
    path = values.get("path")
    values = {**values, **initial_media(values["format"])}
    while True:
        if path is not None:
            current = (await conn.execute(
                sa.select(files.c.id, files.c.blob_id)
                .where(files.c.owner_id == values["owner_id"], files.c.path == path)
                .with_for_update()
            )).first()
            if current is not None:
                row = (await conn.execute(
                    sa.update(files)
                    .where(files.c.id == current.id)
                    .values({
                        **{k: v for k, v in values.items() if k not in ("id", "owner_id", "path")},
                        "updated_at": sa.func.now(), "accessed_at": sa.func.now(),
                        "cloud_state": "pending", "cloud_stored_at": None, "cloud_attempts": 0,
                        "cloud_next_attempt_at": sa.func.now(), "cloud_last_error": None,
                        "cloud_lease_until": None,
                    })
                    .returning(files)
                )).one()
                return row, current.blob_id
        inserted = (await conn.execute(
            insert(files).values(values).on_conflict_do_nothing().returning(files)
        )).first()
        if inserted is not None:
            return inserted, None
        # Lost an insert race at this path: the winner's row is committed now; replace it.


def prefix_range(prefix: str) -> tuple[str, str]:
    """[low, high): exactly the strings that start with `prefix`, in byte (= code point) order.
    `high` is the prefix with its last character incremented; U+10FFFF has no successor, so it is
    dropped and the one before it incremented instead (a prefix is never all U+10FFFF: it starts
    with "/")."""
    stem = prefix
    while stem:
        code = ord(stem[-1]) + 1
        if code <= 0x10FFFF:
            return prefix, stem[:-1] + chr(0xE000 if 0xD800 <= code <= 0xDFFF else code)
        stem = stem[:-1]
    raise ValueError("a prefix needs a character below U+10FFFF")


def starts_with(column: sa.ColumnElement[Any], prefix: str) -> sa.ColumnElement[bool]:
    """`column` starts with `prefix`, as a range that an index with text_pattern_ops serves. LIKE
    'prefix%' would be one only when the planner sees the pattern, not in a generic plan of a
    prepared statement (asyncpg prepares every statement)."""
    low, high = prefix_range(prefix)
    return sa.and_(column.op("~>=~", is_comparison=True)(low), column.op("~<~", is_comparison=True)(high))


async def list_files(conn: AsyncConnection, owner_id: uuid.UUID, *, prefix: str | None,
                     after: tuple[datetime, uuid.UUID] | None, limit: int,
                     kind: str | None = None) -> Sequence[Row[Any]]:
    query = sa.select(files).where(files.c.owner_id == owner_id)
    if kind is not None:
        query = query.where(files.c.media_kind == kind)
    if prefix:
        query = query.where(starts_with(files.c.path, prefix))
    if after is not None:
        query = query.where(sa.tuple_(files.c.created_at, files.c.id) < sa.tuple_(*after))
    query = query.order_by(files.c.created_at.desc(), files.c.id.desc()).limit(limit)
    return (await conn.execute(query)).all()


async def delete_file(conn: AsyncConnection, owner_id: uuid.UUID, file_id: uuid.UUID) -> Row[Any] | None:
    result = await conn.execute(
        sa.delete(files)
        .where(files.c.id == file_id, files.c.owner_id == owner_id)
        .returning(files)
    )
    return result.first()


async def usage(conn: AsyncConnection, owner_id: uuid.UUID) -> tuple[int, int]:
    row = (await conn.execute(
        sa.select(sa.func.count(), sa.func.coalesce(sa.func.sum(files.c.size), 0))
        .where(files.c.owner_id == owner_id)
    )).one()
    return int(row[0]), int(row[1])


async def blob_ids(conn: AsyncConnection) -> set[uuid.UUID]:
    return set((await conn.execute(sa.select(files.c.blob_id))).scalars())


# ---- cloud replication --------------------------------------------------------------------------
# A push is claimed by setting a lease with one conditional UPDATE: PostgreSQL re-checks the WHERE
# clause of a concurrent UPDATE after the first commits, so two processes never both win a row.

def _lease(seconds: float) -> sa.ColumnElement[Any]:
    return sa.func.now() + sa.func.make_interval(0, 0, 0, 0, 0, 0, seconds)


def _claimable(table: sa.Table, lease_column: str) -> sa.ColumnElement[bool]:
    lease = table.c[lease_column]
    return sa.or_(lease.is_(None), lease < sa.func.now())


async def due_pushes(conn: AsyncConnection, node: uuid.UUID, limit: int) -> list[uuid.UUID]:
    """Pending pushes of blobs on this node's disk (only this node can read them)."""
    result = await conn.execute(
        sa.select(files.c.id)
        .where(files.c.node == node, files.c.cloud_state == "pending",
               files.c.cloud_next_attempt_at <= sa.func.now(),
               _claimable(files, "cloud_lease_until"))
        .order_by(files.c.cloud_next_attempt_at)
        .limit(limit)
    )
    return list(result.scalars())


async def claim_push(conn: AsyncConnection, file_id: uuid.UUID, node: uuid.UUID,
                     lease_s: float) -> Row[Any] | None:
    result = await conn.execute(
        sa.update(files)
        .where(files.c.id == file_id, files.c.node == node, files.c.cloud_state == "pending",
               files.c.cloud_next_attempt_at <= sa.func.now(), _claimable(files, "cloud_lease_until"))
        .values(cloud_lease_until=_lease(lease_s))
        .returning(files.c.blob_id, files.c.sha256, files.c.size, files.c.cloud_attempts)
    )
    return result.first()


def _same_push(file_id: uuid.UUID, blob_id: uuid.UUID) -> sa.ColumnElement[bool]:
    # A replace swaps blob_id and resets the state: an older push must not touch the new content.
    return sa.and_(files.c.id == file_id, files.c.blob_id == blob_id)


async def renew_push(conn: AsyncConnection, file_id: uuid.UUID, blob_id: uuid.UUID, lease_s: float) -> None:
    await conn.execute(sa.update(files).where(_same_push(file_id, blob_id), files.c.cloud_state == "pending")
                       .values(cloud_lease_until=_lease(lease_s)))


async def finish_push(conn: AsyncConnection, file_id: uuid.UUID, blob_id: uuid.UUID) -> bool:
    """Mark the content stored; False only when it is no longer the File's (replaced or deleted).
    Any state of the same blob counts: the PUT verified the object at that content's key, and
    False would have the caller queue the deletion of an object the row may already rely on."""
    result = await conn.execute(
        sa.update(files).where(_same_push(file_id, blob_id))
        .values(cloud_state="stored", cloud_stored_at=sa.func.now(), cloud_lease_until=None,
                cloud_last_error=None)
    )
    return result.rowcount == 1


async def fail_push(conn: AsyncConnection, file_id: uuid.UUID, blob_id: uuid.UUID, error: str,
                    retry_in_s: float, max_attempts: int) -> None:
    attempts = files.c.cloud_attempts + 1
    await conn.execute(
        # Only while pending: a worker whose lease lapsed may fail after another one stored the copy.
        sa.update(files).where(_same_push(file_id, blob_id), files.c.cloud_state == "pending")
        .values(cloud_attempts=attempts, cloud_last_error=error[:1000], cloud_lease_until=None,
                cloud_next_attempt_at=_lease(retry_in_s),
                cloud_state=sa.case((attempts >= max_attempts, "failed"), else_="pending"))
    )


async def release_push(conn: AsyncConnection, file_id: uuid.UUID, blob_id: uuid.UUID) -> None:
    await conn.execute(sa.update(files).where(_same_push(file_id, blob_id)).values(cloud_lease_until=None))


async def release_node_pushes(conn: AsyncConnection, node: uuid.UUID) -> int:
    """Hand back the leases on pushes of `node`'s blobs: for a process that knows every other one
    that could hold them (processes sharing that data dir) is dead."""
    result = await conn.execute(
        sa.update(files).where(files.c.node == node, files.c.cloud_lease_until.is_not(None))
        .values(cloud_lease_until=None))
    return result.rowcount


async def retry_failed(conn: AsyncConnection, file_id: uuid.UUID | None = None) -> list[uuid.UUID]:
    """Put failed pushes (all, or one) back in the queue with a fresh attempt budget."""
    query = sa.update(files).where(files.c.cloud_state == "failed")
    if file_id is not None:
        query = query.where(files.c.id == file_id)
    result = await conn.execute(
        query.values(cloud_state="pending", cloud_attempts=0, cloud_next_attempt_at=sa.func.now(),
                     cloud_lease_until=None).returning(files.c.id))
    return list(result.scalars())


def _queue(keys: list[str]) -> sa.Insert:
    # A key already queued may be claimed with its DELETE on the way, sent before the object it
    # must remove was written: a new generation makes that deleter's finish a no-op, and the
    # lease goes so that the next pass deletes again.
    statement = insert(cloud_deletions).values([{"key": key} for key in keys])
    return statement.on_conflict_do_update(
        index_elements=[cloud_deletions.c.key],
        set_={"generation": cloud_deletions.c.generation + 1, "lease_until": None})


async def queue_deletion(conn: AsyncConnection, key: str) -> None:
    await conn.execute(_queue([key]))


async def queue_deletions(conn: AsyncConnection, keys: list[str]) -> None:
    """queue_deletion for many keys in one statement (a folder's files)."""
    if keys:  # once each: ON CONFLICT DO UPDATE may not touch a row twice in one statement
        await conn.execute(_queue(list(dict.fromkeys(keys))))


async def due_deletions(conn: AsyncConnection, limit: int) -> list[str]:
    result = await conn.execute(
        sa.select(cloud_deletions.c.key)
        .where(cloud_deletions.c.next_attempt_at <= sa.func.now(), _claimable(cloud_deletions, "lease_until"))
        .order_by(cloud_deletions.c.next_attempt_at).limit(limit))
    return list(result.scalars())


async def claim_deletion(conn: AsyncConnection, key: str, lease_s: float) -> AnyRow | None:
    """Lease a due deletion; → its failed attempts so far and the generation claimed (for
    finish_deletion and fail_deletion), or None when it is not due or taken."""
    result = await conn.execute(
        sa.update(cloud_deletions)
        .where(cloud_deletions.c.key == key, cloud_deletions.c.next_attempt_at <= sa.func.now(),
               _claimable(cloud_deletions, "lease_until"))
        .values(lease_until=_lease(lease_s))
        .returning(cloud_deletions.c.attempts, cloud_deletions.c.generation))
    return result.first()


def _same_deletion(key: str, generation: int) -> sa.ColumnElement[bool]:
    # Queued again since the claim: the claimed DELETE may predate the object, so the row stays.
    return sa.and_(cloud_deletions.c.key == key, cloud_deletions.c.generation == generation)


async def finish_deletion(conn: AsyncConnection, key: str, generation: int) -> None:
    await conn.execute(sa.delete(cloud_deletions).where(_same_deletion(key, generation)))


async def fail_deletion(conn: AsyncConnection, key: str, generation: int, error: str, retry_in_s: float) -> None:
    await conn.execute(
        sa.update(cloud_deletions).where(_same_deletion(key, generation))
        .values(attempts=cloud_deletions.c.attempts + 1, last_error=error[:1000], lease_until=None,
                next_attempt_at=_lease(retry_in_s)))


# ---- local disk cleanup -------------------------------------------------------------------------

async def evictable(conn: AsyncConnection, node: uuid.UUID,
                    accessed_before: datetime | None = None) -> Sequence[AnyRow]:
    """Files on this node's disk whose verified cloud copy exists, least recently accessed first;
    not while a probe is due, which reads only local bytes (claim_probes)."""
    query = (sa.select(files.c.id, files.c.blob_id, files.c.size)
             .where(files.c.node == node, files.c.cloud_state == "stored", files.c.media_state != "pending")
             .order_by(files.c.accessed_at, files.c.id))
    if accessed_before is not None:
        query = query.where(files.c.accessed_at < accessed_before)
    return (await conn.execute(query)).all()


async def mark_evicted(conn: AsyncConnection, file_id: uuid.UUID, blob_id: uuid.UUID, node: uuid.UUID) -> bool:
    """No local copy any more, only while the row still holds that blob on this node and its cloud
    copy is stored."""
    result = await conn.execute(
        sa.update(files)
        .where(files.c.id == file_id, files.c.blob_id == blob_id, files.c.cloud_state == "stored",
               files.c.node == node)
        .values(node=None))
    return result.rowcount == 1


_LOCAL_STATE = (files.c.id, files.c.blob_id, files.c.node, files.c.cloud_state)


async def local_state(conn: AsyncConnection, node: uuid.UUID) -> Sequence[AnyRow]:
    """Rows whose blob this node's disk holds, or held until an eviction (node NULL)."""
    return (await conn.execute(
        sa.select(*_LOCAL_STATE).where(sa.or_(files.c.node == node, files.c.node.is_(None))))).all()


async def local_state_of(conn: AsyncConnection, file_id: uuid.UUID, blob_id: uuid.UUID) -> AnyRow | None:
    """local_state's row of one File as it is now, None once it no longer holds that blob."""
    return (await conn.execute(sa.select(*_LOCAL_STATE).where(_same_push(file_id, blob_id)))).first()


async def record_access(conn: AsyncConnection, seen: dict[uuid.UUID, datetime]) -> None:
    await conn.execute(
        sa.text("UPDATE files SET accessed_at = greatest(files.accessed_at, v.t) "
                "FROM unnest(CAST(:ids AS uuid[]), CAST(:ts AS timestamptz[])) AS v(id, t) "
                "WHERE files.id = v.id"),
        {"ids": list(seen), "ts": list(seen.values())})


# ---- audio records ------------------------------------------------------------------------------

async def insert_record(conn: AsyncConnection, file_id: uuid.UUID, duration_ms: int) -> None:
    await conn.execute(sa.insert(records).values(file_id=file_id, duration_ms=duration_ms))


async def record_file(conn: AsyncConnection, file_id: uuid.UUID, user_id: uuid.UUID) -> Row[Any] | None:
    """The File of a record, only if the record belongs to that user."""
    result = await conn.execute(
        sa.select(files).join(records, records.c.file_id == files.c.id)
        .where(files.c.id == file_id, files.c.owner_id == user_id))
    return result.first()


# ---- resumable uploads: what cleanup and recovery need ------------------------------------------

async def release_upload_locks(conn: AsyncConnection, node: uuid.UUID) -> int:
    """Free the uploads of `node` locked by a PATCH that a crash cut off, which would otherwise answer
    423 for a minute; only once every process sharing that data dir is known dead."""
    result = await conn.execute(sa.update(uploads).where(uploads.c.node == node, uploads.c.lock_until.is_not(None))
                                .values(lock_until=None))
    return result.rowcount


async def expired_uploads(conn: AsyncConnection, node: uuid.UUID) -> list[uuid.UUID]:
    """The expired uploads whose partial files are on `node`."""
    query = sa.select(uploads.c.id).where(uploads.c.expires_at <= sa.func.now(), uploads.c.node == node)
    return list((await conn.execute(query)).scalars())


async def delete_uploads(conn: AsyncConnection, upload_ids: list[uuid.UUID]) -> None:
    await conn.execute(sa.delete(uploads).where(uploads.c.id.in_(upload_ids)))


async def unfinished_uploads(conn: AsyncConnection) -> set[uuid.UUID]:
    return set((await conn.execute(sa.select(uploads.c.id).where(uploads.c.file_id.is_(None)))).scalars())


# ---- media probing ------------------------------------------------------------------------------
# Claimed like pushes, with a lease: FOR UPDATE SKIP LOCKED lets several processes take disjoint
# rows in one statement, and a lease that lapses (its holder died) makes the row claimable again.

async def claim_probes(conn: AsyncConnection, node: uuid.UUID, limit: int, lease_s: float) -> Sequence[Row[Any]]:
    """Up to `limit` pending Files whose bytes are on this node's disk, leased to the caller."""
    due = (sa.select(files.c.id)
           .where(files.c.media_state == "pending", files.c.node == node,
                  _claimable(files, "media_lease_until"))
           .order_by(files.c.created_at).limit(limit)
           .with_for_update(skip_locked=True).scalar_subquery())
    result = await conn.execute(
        sa.update(files).where(files.c.id.in_(due))
        .values(media_lease_until=_lease(lease_s))
        .returning(files.c.id, files.c.blob_id, files.c.format, files.c.media_kind))
    return result.all()


async def finish_probe(conn: AsyncConnection, file_id: uuid.UUID, blob_id: uuid.UUID,
                       media: dict[str, Any]) -> Row[Any] | None:
    """Store a probe's result, unless the content was replaced meanwhile; the File as it is now."""
    result = await conn.execute(
        sa.update(files).where(_same_push(file_id, blob_id), files.c.media_state == "pending")
        .values(media=media, media_state=media["status"], media_kind=media["kind"], media_lease_until=None)
        .returning(files))
    return result.first()


async def release_probe(conn: AsyncConnection, file_id: uuid.UUID, blob_id: uuid.UUID) -> None:
    await conn.execute(sa.update(files).where(_same_push(file_id, blob_id)).values(media_lease_until=None))

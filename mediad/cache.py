"""The download path's in-process cache of token checks and File lookups, kept fresh by
PostgreSQL LISTEN/NOTIFY.

Media players send many small range requests of one file with one token: answering each from
memory instead of a database round trip is most of what makes a range request cheap. What makes
that safe is one rule, written once in `_invalidate`, driven by the triggers of migration 0005,
which notify the channel on every change to a token, a user or a file, whoever makes it (another
node, the CLI, psql):

- an answer is used only while the listener is known to be connected: it pings its connection
  every `_PING_S` and the cache is live for `_FRESH_S` after the last answered ping, so a lost,
  stalled or partitioned connection turns the cache off within a second, and the cache is emptied
  when the listener goes and again when it is back (notifications in between are lost);
- an answer is stored only if no notification (or loss) came between the start of the query that
  produced it and its storing (the `stamp` generation check), so a change that commits while a
  lookup runs can never be cached over;
- every entry lapses after `max_age_s` whatever happens: a second guard, not the mechanism.

Only positive answers are stored (a valid token, an existing file): caching "unknown token" would
let anyone fill memory with random tokens, and a miss costs one indexed query. Both maps are
bounded; the oldest entries go first.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

import asyncpg  # type: ignore[import-untyped]

log = logging.getLogger("mediad.cache")

CHANNEL = "mediad_changes"  # the triggers of migration 0005 notify this
_PING_S = 0.25
_FRESH_S = 1.0  # answers are trusted this long after the last answered ping
_BACKOFF_S = (0.1, 0.2, 0.5, 1.0, 2.0)  # the cache is off meanwhile: come back soon
_MAX_TOKENS = 10_000
_MAX_FILES = 50_000


@dataclass(frozen=True, slots=True)
class TokenEntry:
    """What a token check needs, for a token the database knew at `cached_at` (monotonic)."""

    user_id: uuid.UUID
    created_at: datetime
    last_used_at: datetime | None  # as recorded: the fast path leaves a stale one to the app to record
    cached_at: float


class CachedFile(Protocol):
    """A File as the download path keeps it (downloads.Representation)."""

    id: uuid.UUID
    owner_id: uuid.UUID
    path: str | None
    cached_at: float


class LookupCache:
    """Token → user and file id → File, valid only while the change listener is connected."""

    def __init__(self, max_age_s: float) -> None:
        self.max_age_s = max_age_s
        self._tokens: dict[bytes, TokenEntry] = {}
        self._files: dict[uuid.UUID, Any] = {}
        self._paths: dict[tuple[uuid.UUID, str], uuid.UUID] = {}
        self._generation = 0
        self._fresh_until = 0.0  # monotonic; 0: the listener is not connected

    # ---- answers --------------------------------------------------------------------------------

    def _valid(self, cached_at: float) -> bool:
        now = time.monotonic()
        return now < self._fresh_until and now - cached_at < self.max_age_s

    def user(self, token_hash: bytes) -> TokenEntry | None:
        entry = self._tokens.get(token_hash)
        if entry is None or not self._valid(entry.cached_at):
            return None
        return entry

    def file(self, file_id: uuid.UUID) -> Any | None:
        entry = self._files.get(file_id)
        return entry if entry is not None and self._valid(entry.cached_at) else None

    def file_at(self, owner_id: uuid.UUID, path: str) -> Any | None:
        file_id = self._paths.get((owner_id, path))
        entry = None if file_id is None else self.file(file_id)
        return entry if entry is not None and entry.owner_id == owner_id and entry.path == path else None

    # ---- filling --------------------------------------------------------------------------------

    def stamp(self) -> int | None:
        """Take before the query whose answer may be kept; None when nothing may be kept now."""
        return self._generation if time.monotonic() < self._fresh_until else None

    def keep_token(self, stamp: int | None, token_hash: bytes, user_id: uuid.UUID,
                   created_at: datetime, last_used_at: datetime | None) -> None:
        if stamp is None or stamp != self._generation:
            return  # a change or a loss of the listener since the query began: it may be stale
        if len(self._tokens) >= _MAX_TOKENS:
            self._tokens.pop(next(iter(self._tokens)))
        self._tokens[token_hash] = TokenEntry(user_id, created_at, last_used_at, time.monotonic())

    def keep_file(self, stamp: int | None, entry: CachedFile) -> None:
        """`entry.cached_at` must be a monotonic time taken no earlier than the stamp."""
        if stamp is None or stamp != self._generation:
            return
        self._drop_file(entry.id)
        if len(self._files) >= _MAX_FILES:
            self._drop_file(next(iter(self._files)))
        self._files[entry.id] = entry
        if entry.path is not None:
            self._paths[entry.owner_id, entry.path] = entry.id

    def forget_file(self, file_id: uuid.UUID) -> None:
        """The download path found this file's bytes gone: ask the database next time."""
        self._invalidate("f", str(file_id))

    # ---- invalidation: the one rule -------------------------------------------------------------

    def _invalidate(self, kind: str, key: str) -> None:
        """Drop what a change names: `t` a token hash (hex), `u` a user (its tokens and files),
        `f` a file; anything else (an unknown payload from a newer schema) drops everything."""
        self._generation += 1
        try:
            if kind == "t":
                self._tokens.pop(bytes.fromhex(key), None)
            elif kind == "f":
                self._drop_file(uuid.UUID(key))
            elif kind == "u":
                user_id = uuid.UUID(key)
                for token_hash in [h for h, e in self._tokens.items() if e.user_id == user_id]:
                    del self._tokens[token_hash]
                for file_id in [i for i, e in self._files.items() if e.owner_id == user_id]:
                    self._drop_file(file_id)
            else:
                self._drop_all()
        except ValueError:
            self._drop_all()

    def _drop_file(self, file_id: uuid.UUID) -> None:
        entry = self._files.pop(file_id, None)
        if entry is not None and entry.path is not None:
            self._paths.pop((entry.owner_id, entry.path), None)

    def _drop_all(self) -> None:
        self._generation += 1
        self._tokens.clear()
        self._files.clear()
        self._paths.clear()

    # ---- the listener ---------------------------------------------------------------------------

    def _notified(self, conn: Any, pid: int, channel: str, payload: str) -> None:
        kind, _, key = payload.partition(" ")
        try:
            self._invalidate(kind, key)
        except Exception:  # asyncpg would only log it: never leave an entry a change named
            log.exception("cache: could not apply the notification %r; dropping everything", payload[:100])
            self._drop_all()

    def _lost(self, conn: Any = None) -> None:
        if self._fresh_until:
            log.warning("cache: the change listener lost its database connection; lookups bypass "
                        "the cache until it is back")
        self._fresh_until = 0.0
        self._drop_all()

    async def listen(self, dsn: str) -> None:
        """Run until cancelled: LISTEN on a connection of its own (a pooled one that is recycled
        stops listening silently), ping it, and reconnect with backoff when it goes."""
        failures = 0
        while True:
            try:
                conn = await asyncpg.connect(dsn, timeout=5,
                                             server_settings={"application_name": "mediad-cache"})
            except Exception as exc:  # whatever it is, the cache stays off and the listener retries
                delay = _BACKOFF_S[min(failures, len(_BACKOFF_S) - 1)]
                failures += 1
                log.debug("cache: listener cannot connect (%s); retrying in %.1f s", exc.__class__.__name__, delay)
                await asyncio.sleep(delay)
                continue
            try:
                conn.add_termination_listener(self._lost)
                await conn.add_listener(CHANNEL, self._notified)
                self._drop_all()  # whatever happened before LISTEN took effect went unheard
                failures = 0
                log.info("cache: listening for changes on %r", CHANNEL)
                await self._ping(conn)
            except asyncio.CancelledError:
                self._fresh_until = 0.0  # shutting down: not a loss worth a warning
                raise
            except Exception as exc:
                log.debug("cache: listener connection failed: %s", exc.__class__.__name__)
            finally:
                self._lost()
                with contextlib.suppress(Exception):
                    conn.terminate()
            await asyncio.sleep(_BACKOFF_S[0])

    async def _ping(self, conn: Any) -> None:
        """Keep the cache live while the connection answers; return (or raise) when it does not."""
        while not conn.is_closed():
            sent = time.monotonic()
            await conn.fetchval("SELECT 1", timeout=_FRESH_S)
            # Notifications sent before the ping's answer have been dispatched by now (one socket,
            # in order), so everything committed before `sent` is already reflected.
            self._fresh_until = sent + _FRESH_S
            await asyncio.sleep(_PING_S)


def listener_dsn(url: str) -> str:
    """The SQLAlchemy URL (postgresql+asyncpg://…) as asyncpg's own connect() takes it."""
    scheme, sep, rest = url.partition("://")
    return f"postgresql://{rest}" if sep and scheme.startswith("postgres") else url

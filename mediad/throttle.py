"""Sign-in throttling: failed attempts counted per name and per client address, in PostgreSQL.

The counts live in the database, not in a worker's memory, so every worker and every node behind
a load balancer sees the same attempts. An attempt is counted *before* its password is checked
and taken back when it succeeds: otherwise a thousand concurrent guesses would all pass the check
before the first failure was recorded.

Decisions (when a block starts, how long it lasts, who the client is) are pure functions; the
queries are the three small functions at the end.
"""

from __future__ import annotations

import functools
import ipaddress
import math
import random
from collections.abc import Iterable
from dataclasses import dataclass, replace
from datetime import datetime, timedelta

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from starlette.types import Scope

from .config import Settings, parse_networks
from .db import signin_throttle

NAME_LIMIT = 5  # failures for one name, from any address, within the window
ADDRESS_LIMIT = 30  # failures from one client address, for any names, within the window
MAX_BLOCK_S = 3600.0
# A name or address with no failed attempt for this long starts again at the first block; rows
# idle for this long are pruned.
MEMORY_S = 86400.0
_PRUNE_ONE_IN = 64  # failed attempts; pruning is opportunistic, there is no background job


# ---- who is asking ------------------------------------------------------------------------------

_networks = functools.lru_cache(maxsize=8)(parse_networks)


def client_address(scope: Scope, settings: Settings) -> str:
    """The client's address: the peer's, or the last X-Forwarded-For entry when the peer is one of
    MEDIAD_TRUSTED_PROXIES (that entry is the one our proxy added; earlier ones are the client's
    own claims). The server itself must not rewrite the peer from proxy headers (server.py)."""
    client = scope.get("client")
    peer = client[0] if client else ""
    trusted = _networks(settings.trusted_proxies)
    if not trusted or not _in(peer, trusted):
        return peer
    forwarded = b",".join(value for name, value in scope.get("headers", ()) if name == b"x-forwarded-for")
    entries = [entry.strip() for entry in forwarded.decode("latin-1").split(",") if entry.strip()]
    if not entries:
        return peer
    try:
        return str(ipaddress.ip_address(entries[-1]))
    except ValueError:
        return peer  # our proxy would not write garbage: treat it as absent


def _in(address: str, networks: Iterable[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> bool:
    try:
        parsed = ipaddress.ip_address(address)
    except ValueError:
        return False
    # A dual-stack listener (MEDIAD_HOST=::) sees an IPv4 peer as ::ffff:a.b.c.d, which is in no
    # IPv4 network: unwrapped too, a proxy listed as 10.0.0.5 is recognised however it connects.
    forms = [parsed]
    if isinstance(parsed, ipaddress.IPv6Address) and parsed.ipv4_mapped is not None:
        forms.append(parsed.ipv4_mapped)
    return any(form in network for form in forms for network in networks)


def name_key(name_key: str) -> str:
    return "name:" + name_key


def address_key(address: str) -> str:
    """IPv6 clients are counted per /64: one host commonly holds a whole /64."""
    try:
        parsed = ipaddress.ip_address(address)
    except ValueError:
        return "addr:" + address[:64]
    if isinstance(parsed, ipaddress.IPv6Address):
        if parsed.ipv4_mapped is not None:
            return "addr:" + str(parsed.ipv4_mapped)
        return "addr:" + str(ipaddress.ip_network(f"{parsed}/64", strict=False))
    return "addr:" + str(parsed)


# ---- decisions ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Counter:
    failures: int
    window_started_at: datetime
    blocked_until: datetime | None
    level: int
    updated_at: datetime


def limit_for(key: str) -> int:
    return NAME_LIMIT if key.startswith("name:") else ADDRESS_LIMIT


def block_seconds(level: int, settings: Settings) -> float:
    """The `level`-th block (0 = the first): MEDIAD_SIGNIN_BLOCK_S, doubling, at most an hour."""
    return min(settings.signin_block_s * 2.0 ** min(level, 32), max(MAX_BLOCK_S, settings.signin_block_s))


def retry_after(counter: Counter, now: datetime) -> int | None:
    """Whole seconds until the block ends (at least 1), or None when not blocked."""
    if counter.blocked_until is None or counter.blocked_until <= now:
        return None
    return max(1, math.ceil((counter.blocked_until - now).total_seconds()))


def after_failure(counter: Counter, now: datetime, limit: int, settings: Settings) -> Counter:
    """The counter once one more attempt has failed; reaching `limit` in the window blocks."""
    if (now - counter.updated_at).total_seconds() > MEMORY_S:
        counter = replace(counter, level=0)
    if (now - counter.window_started_at).total_seconds() >= settings.signin_window_s:
        counter = replace(counter, failures=0, window_started_at=now)
    failures = counter.failures + 1
    if failures < limit:
        return replace(counter, failures=failures, updated_at=now)
    until = now + timedelta(seconds=block_seconds(counter.level, settings))
    # The next window starts with the block: after it, `limit` more failures block again (longer).
    return Counter(0, now, until, counter.level + 1, now)


def undo_failure(counter: Counter, before: Counter) -> Counter:
    """An address's counter after an attempt counted in advance turned out to succeed."""
    if counter.level > before.level:  # that very attempt started a block: lift it
        return replace(before, updated_at=counter.updated_at)
    return replace(counter, failures=max(0, counter.failures - 1))


# ---- the database -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Attempt:
    """A sign-in attempt as counted: `retry_after` set when it was refused (nothing counted then)."""

    retry_after: int | None
    counted: dict[str, tuple[Counter, Counter]]  # key → (before, after)

    def blocks_started(self) -> list[tuple[str, int]]:
        """("name" or "addr", seconds) of each block this attempt started."""
        return [(key.split(":", 1)[0], round((after.blocked_until - after.updated_at).total_seconds()))
                for key, (before, after) in self.counted.items()
                if after.level > before.level and after.blocked_until is not None]


_COLUMNS = (signin_throttle.c.failures, signin_throttle.c.window_started_at, signin_throttle.c.blocked_until,
            signin_throttle.c.level, signin_throttle.c.updated_at)


async def begin(engine: AsyncEngine, keys: list[str], settings: Settings) -> Attempt:
    """Refuse the attempt if any key is blocked; else count it as a failure for every key."""
    keys = sorted(set(keys))  # rows are locked in this order: two attempts cannot deadlock
    async with engine.begin() as conn:
        # Insert-or-lock in one statement: the no-op update takes the row lock and returns the row.
        rows = (await conn.execute(
            insert(signin_throttle).values([{"key": key} for key in keys])
            .on_conflict_do_update(index_elements=["key"], set_={"key": sa.text("excluded.key")})
            .returning(signin_throttle.c.key, *_COLUMNS, sa.func.now().label("now"))
        )).all()
        if not rows:
            return Attempt(None, {})
        now = rows[0].now
        counters = {row.key: Counter(*row[1:6]) for row in rows}
        waits = [wait for counter in counters.values() if (wait := retry_after(counter, now)) is not None]
        if waits:
            return Attempt(max(waits), {})
        counted = {key: (counter, after_failure(counter, now, limit_for(key), settings))
                   for key, counter in counters.items()}
        await _store(conn, {key: after for key, (_, after) in counted.items()})
        if random.randrange(_PRUNE_ONE_IN) == 0:
            await conn.execute(sa.delete(signin_throttle).where(
                signin_throttle.c.updated_at < now - timedelta(seconds=MEMORY_S),
                sa.or_(signin_throttle.c.blocked_until.is_(None), signin_throttle.c.blocked_until < now)))
    return Attempt(None, counted)


async def succeeded(engine: AsyncEngine, attempt: Attempt) -> None:
    """The password was right: the name starts over; the address forgets this attempt."""
    async with engine.begin() as conn:
        names = [key for key in attempt.counted if key.startswith("name:")]
        if names:
            await conn.execute(sa.delete(signin_throttle).where(signin_throttle.c.key.in_(names)))
        for key, (before, _) in attempt.counted.items():
            if key.startswith("name:"):
                continue
            row = (await conn.execute(sa.select(*_COLUMNS).where(signin_throttle.c.key == key)
                                      .with_for_update())).first()
            if row is not None:
                await _store(conn, {key: undo_failure(Counter(*row), before)})


async def _store(conn: AsyncConnection, counters: dict[str, Counter]) -> None:
    table = signin_throttle
    await conn.execute(
        sa.update(table).where(table.c.key == sa.bindparam("k")).values(
            failures=sa.bindparam("f"), window_started_at=sa.bindparam("w"), blocked_until=sa.bindparam("b"),
            level=sa.bindparam("l"), updated_at=sa.bindparam("u")),
        [{"k": key, "f": c.failures, "w": c.window_started_at, "b": c.blocked_until, "l": c.level,
          "u": c.updated_at} for key, c in counters.items()])

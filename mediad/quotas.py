"""Quotas: how many bytes a user's files may take in all (`users.quota`, NULL = unlimited).

Checked early wherever an upload's size is known (a declared length, tus Upload-Length) or
becomes known (the stream passes the room left), and once more, exactly, in the transaction that
commits the File: that check locks the user's row, so two uploads that each fit alone but not
together are serialised there and the second is refused. A replace counts the difference: the
file it replaces is left out of the usage. Where that file is known only once the body has been
read (a multipart path field), the early checks leave out the user's largest file instead, so that
they never refuse what the exact check would allow.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from .db import files, users
from .errors import PayloadTooLarge, QuotaExceeded


@dataclass(frozen=True)
class Room:
    """A user's quota and the bytes their files use, leaving out the one at the path an upload
    would replace; or, while that path is not known, all of them and the most a replace can free."""

    quota: int | None
    used: int
    freeable: int = 0  # the user's largest file, when which one the upload replaces is not known yet

    @classmethod
    def from_row(cls, row: Any) -> Room:
        """From a row that selected `room_columns`."""
        return cls(row.quota, int(row.used))

    def check(self, incoming: int) -> None:
        """QuotaExceeded (507) when a file of `incoming` bytes would take usage over the quota."""
        after = self.used - self.freeable + incoming
        if self.quota is not None and after > self.quota:
            least, freed = (("at least ", f", at most {self.freeable} of them in a file it may replace")
                            if self.freeable else ("", ""))
            raise QuotaExceeded(
                f"the upload of {incoming} bytes would take usage to {least}{after} bytes, over the quota "
                f"of {self.quota} bytes ({self.used} bytes are in use{freed})")

    def cap(self, max_bytes: int) -> int:
        """The most bytes a streamed upload may have: the upload limit or the room left."""
        if self.quota is None:
            return max_bytes
        return max(0, min(max_bytes, self.quota - self.used + self.freeable))

    def mapped(self, exc: PayloadTooLarge, max_bytes: int, received: int) -> PayloadTooLarge | QuotaExceeded:
        """A writer that stopped at `cap()`: a 507 when the quota was the smaller limit, else the 413."""
        if self.cap(max_bytes) < max_bytes:
            try:
                self.check(received)
            except QuotaExceeded as quota_exc:
                return quota_exc
        return exc


async def quota_of(conn: AsyncConnection, user_id: uuid.UUID, *, lock: bool = False) -> int | None:
    query = sa.select(users.c.quota).where(users.c.id == user_id)
    if lock:  # NO KEY: a files insert's foreign-key check (KEY SHARE) does not wait on it
        query = query.with_for_update(key_share=True)
    return (await conn.execute(query)).scalar_one_or_none()


def _usage(user_id: sa.ColumnElement[uuid.UUID], replacing: sa.ColumnElement[str | None]) -> sa.ScalarSelect[int]:
    """The bytes of the user's files, leaving out the one at `replacing` (NULL: none is replaced)."""
    return (sa.select(sa.func.coalesce(sa.func.sum(files.c.size), 0))
            .where(files.c.owner_id == user_id, sa.or_(replacing.is_(None), files.c.path.is_distinct_from(replacing)))
            .scalar_subquery())


def _given(user_id: uuid.UUID,
           replacing: str | None) -> tuple[sa.ColumnElement[uuid.UUID], sa.ColumnElement[str | None]]:
    return sa.literal(user_id, sa.Uuid), sa.literal(replacing, sa.Text)


def room_columns(user_id: sa.ColumnElement[uuid.UUID],
                 replacing: sa.ColumnElement[str | None]) -> list[sa.Label[object]]:
    """`quota` and `used` as two columns of a statement, so that the early check costs no round
    trip of its own (a tus PATCH's claim returns them); read back by `Room.from_row`. An unlimited
    user's files are not added up: a scalar subquery in a CASE branch runs only when reached."""
    quota = sa.select(users.c.quota).where(users.c.id == user_id).scalar_subquery()
    return [quota.label("quota"), sa.case((quota.is_(None), 0), else_=_usage(user_id, replacing)).label("used")]


async def room(reader: AsyncEngine, user_id: uuid.UUID, replacing: str | None) -> Room:
    """For the early checks, before or while the body arrives (no lock held): one statement."""
    async with reader.connect() as conn:
        row = (await conn.execute(sa.select(*room_columns(*_given(user_id, replacing))))).one()
    return Room.from_row(row)


async def room_unplaced(reader: AsyncEngine, user_id: uuid.UUID) -> Room:
    """`room` for an upload whose path is known only once its body is read (multipart): it may
    replace any one file, so the early checks leave out the largest, and never refuse what the
    exact check at commit would let through. One statement; an unlimited user's files are not
    looked at (as in `room_columns`)."""
    user, nothing = _given(user_id, None)
    quota = sa.select(users.c.quota).where(users.c.id == user).scalar_subquery()
    largest = (sa.select(sa.func.coalesce(sa.func.max(files.c.size), 0)).where(files.c.owner_id == user)
               .scalar_subquery())
    query = sa.select(quota.label("quota"), sa.case((quota.is_(None), 0), else_=_usage(user, nothing)).label("used"),
                      sa.case((quota.is_(None), 0), else_=largest).label("largest"))
    async with reader.connect() as conn:
        row = (await conn.execute(query)).one()
    return Room(row.quota, int(row.used), int(row.largest))


async def reserve(conn: AsyncConnection, user_id: uuid.UUID, size: int, path: str | None) -> None:
    """The exact check, in the transaction that commits a File of `size` bytes at `path`: the
    user's row stays locked until that transaction ends, so concurrent commits take turns. An
    unlimited user's commits skip the lock (and the sum)."""
    if await quota_of(conn, user_id) is not None:
        quota = await quota_of(conn, user_id, lock=True)
        used = (await conn.execute(sa.select(_usage(*_given(user_id, path))))).scalar_one()
        Room(quota, int(used)).check(size)


async def set_quota(conn: AsyncConnection, name_key: str, quota: int | None) -> bool:
    """Set a user's quota by name key; False when there is no such user."""
    result = await conn.execute(sa.update(users).where(users.c.name_key == name_key).values(quota=quota))
    return result.rowcount == 1

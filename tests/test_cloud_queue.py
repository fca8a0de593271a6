"""The replication queues' claims against a real PostgreSQL: what a worker that lost its claim (a
lapsed lease, a key queued again) may still change. The races behind these cannot be timed
through HTTP; the queries are driven in the order the races produce."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from conftest import make_settings
from sqlalchemy.ext.asyncio import AsyncEngine

from mediad import db


@pytest.fixture
async def engine(database_url: str, tmp_path: Path) -> AsyncIterator[AsyncEngine]:
    engine = db.create_engine(database_url, make_settings(tmp_path / "data"))
    try:
        yield engine
    finally:
        await engine.dispose()


async def _pending_file(engine: AsyncEngine) -> tuple[uuid.UUID, uuid.UUID, uuid.UUID]:
    """A committed File waiting for its push: → (id, blob id, node)."""
    user_id, file_id, blob_id, node = uuid.uuid4(), uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    async with engine.begin() as conn:
        await conn.execute(sa.insert(db.users).values(id=user_id, name=user_id.hex, name_key=user_id.hex))
        await conn.execute(sa.insert(db.files).values(
            id=file_id, owner_id=user_id, name="a.bin", extension="bin", format="application/octet-stream",
            size=5, sha256="0" * 64, blob_id=blob_id, node=node, **db.initial_media("application/octet-stream")))
    return file_id, blob_id, node


async def _cloud_columns(engine: AsyncEngine, file_id: uuid.UUID) -> tuple[str, int, str | None]:
    async with engine.connect() as conn:
        row = (await conn.execute(sa.select(db.files.c.cloud_state, db.files.c.cloud_attempts,
                                            db.files.c.cloud_last_error).where(db.files.c.id == file_id))).one()
    return row.cloud_state, row.cloud_attempts, row.cloud_last_error


async def test_a_late_failure_does_not_undo_the_copy_another_worker_stored(engine: AsyncEngine) -> None:
    file_id, blob_id, node = await _pending_file(engine)
    async with engine.begin() as conn:  # worker A claims, then stalls past its lease
        assert await db.claim_push(conn, file_id, node, 60) is not None
        await conn.execute(sa.update(db.files).where(db.files.c.id == file_id)
                           .values(cloud_lease_until=sa.func.now() - sa.text("interval '1 second'")))
    async with engine.begin() as conn:  # worker B takes the lapsed lease over and stores the copy
        assert await db.claim_push(conn, file_id, node, 60) is not None
        assert await db.finish_push(conn, file_id, blob_id) is True
    async with engine.begin() as conn:  # A's PUT fails at last; one attempt allowed would mean "failed"
        await db.fail_push(conn, file_id, blob_id, "PUT blobs/…: the cloud answered 503", 30, 1)
    assert await _cloud_columns(engine, file_id) == ("stored", 0, None)
    async with engine.begin() as conn:
        # A late success of the same content is no replaced file: answering False here would
        # queue the deletion of the object the row now counts on.
        assert await db.finish_push(conn, file_id, blob_id) is True
    assert await _cloud_columns(engine, file_id) == ("stored", 0, None)


async def test_a_key_queued_again_while_its_deletion_runs_stays_queued(engine: AsyncEngine) -> None:
    key = f"blobs/{uuid.uuid4().hex}"
    async with engine.begin() as conn:  # a file deleted while its push streams
        await db.queue_deletion(conn, key)
    async with engine.begin() as conn:  # the deleter claims the key and sends its DELETE
        first = await db.claim_deletion(conn, key, 60)
    assert first is not None and first.attempts == 0
    async with engine.begin() as conn:  # the push's PUT lands after that DELETE: the key again
        await db.queue_deletion(conn, key)
    async with engine.begin() as conn:  # the first DELETE's outcome, whichever it was, is stale
        await db.fail_deletion(conn, key, first.generation, "DELETE: the cloud answered 503", 300)
        await db.finish_deletion(conn, key, first.generation)
    async with engine.connect() as conn:
        assert await db.due_deletions(conn, 10) == [key]  # due now, not after the first claim's lease
    async with engine.begin() as conn:
        second = await db.claim_deletion(conn, key, 60)
    assert second is not None and second.attempts == 0 and second.generation != first.generation
    async with engine.begin() as conn:
        await db.finish_deletion(conn, key, second.generation)
    async with engine.connect() as conn:
        assert (await conn.execute(sa.select(sa.func.count()).select_from(db.cloud_deletions))).scalar() == 0


async def test_queueing_many_keys_again_marks_each_requeued(engine: AsyncEngine) -> None:
    keys = [f"blobs/{uuid.uuid4().hex}" for _ in range(3)]
    async with engine.begin() as conn:
        await db.queue_deletions(conn, keys[:2])
    async with engine.begin() as conn:
        claimed = await db.claim_deletion(conn, keys[0], 60)
    assert claimed is not None
    async with engine.begin() as conn:  # a folder's deletion naming a key already queued, twice
        await db.queue_deletions(conn, [keys[0], keys[2], keys[0]])
        await db.finish_deletion(conn, keys[0], claimed.generation)
    async with engine.connect() as conn:
        assert sorted(await db.due_deletions(conn, 10)) == sorted(keys)

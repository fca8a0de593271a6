"""Folders over HTTP (GET/DELETE /folders): immediate children with counts and bytes computed
below them, paging across folders and files, recursive deletion in batches, and the plans of
the folder and prefix queries on 100,000 files."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
import sqlalchemy as sa
from conftest import Server, User, assert_problem, fresh_database, make_settings, make_user, serve_in_thread, upload
from sqlalchemy.dialects.postgresql.asyncpg import dialect as asyncpg_dialect

from mediad import db, migrate, tree
from mediad.cloud import cloud_key
from mediad.storage import blob_relpath


async def listing(client: httpx.AsyncClient, user: User, path: str, **params: Any) -> dict[str, Any]:
    response = await client.get("/folders", headers=user.auth, params={"path": path, **params})
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    assert set(body) == {"path", "folders", "files", "next_cursor"}
    return body


def summary(body: dict[str, Any]) -> tuple[list[tuple[str, int, int]], list[str]]:
    return ([(f["path"], f["files"], f["bytes"]) for f in body["folders"]], [f["path"] for f in body["files"]])


TREE = {  # path → size
    "/videos/2026/may.mp4": 3, "/videos/2026/june.mp4": 5, "/videos/2025/deep/er/old.mp4": 7,
    "/videos/top.mp4": 11, "/Docs/x.txt": 13, "/root.txt": 17, "/a b/c.txt": 19, "/a/c.txt": 23,
}


async def make_tree(client: httpx.AsyncClient, user: User) -> dict[str, dict[str, Any]]:
    made = {}
    for path, size in TREE.items():  # one at a time: created_at order is upload order
        made[path] = await upload(client, user, b"x" * size, path=path)
    await upload(client, user, b"no path", name="loose.bin")  # not in the tree
    return made


async def test_folders_list_children_with_counts_and_bytes_of_everything_below(
        client: httpx.AsyncClient, user: User, other_user: User) -> None:
    await make_tree(client, user)
    await upload(client, other_user, b"y" * 1000, path="/videos/theirs.mp4")
    root = await listing(client, user, "/")
    assert root["path"] == "/" and root["next_cursor"] is None
    # Code point order: "Docs" < "a" < "a b" < "videos".
    assert summary(root) == ([("/Docs/", 1, 13), ("/a/", 1, 23), ("/a b/", 1, 19), ("/videos/", 4, 26)],
                             ["/root.txt"])
    videos = await listing(client, user, "/videos")  # the trailing / is implied
    assert videos["path"] == "/videos/"
    assert summary(videos) == ([("/videos/2025/", 1, 7), ("/videos/2026/", 2, 8)], ["/videos/top.mp4"])
    assert summary(await listing(client, user, "/videos/2026/")) == (
        [], ["/videos/2026/june.mp4", "/videos/2026/may.mp4"])  # newest first
    assert summary(await listing(client, user, "/videos/2025/")) == ([("/videos/2025/deep/", 1, 7)], [])
    file = (await listing(client, user, "//videos//2025/deep/er/"))["files"][0]
    assert (file["name"], file["size"]) == ("old.mp4", 7)


async def test_paging_runs_through_folders_then_files(client: httpx.AsyncClient, user: User) -> None:
    for name in ["c", "a", "b"]:
        await upload(client, user, b"1", path=f"/p/{name}/f.txt")
    for name in ["1.txt", "2.txt", "3.txt"]:
        await upload(client, user, b"22", path=f"/p/{name}")
    expected = ["/p/a/", "/p/b/", "/p/c/", "/p/3.txt", "/p/2.txt", "/p/1.txt"]
    for limit in range(1, 8):
        seen: list[str] = []
        cursor = None
        for _ in range(10):
            body = await listing(client, user, "/p/", limit=limit, **({"cursor": cursor} if cursor else {}))
            folders, files = summary(body)
            assert len(folders) + len(files) <= limit
            seen += [path for path, _, _ in folders] + files
            cursor = body["next_cursor"]
            if cursor is None:
                break
        assert seen == expected, limit


async def test_the_root_always_exists_other_folders_only_while_they_hold_files(
        client: httpx.AsyncClient, user: User) -> None:
    assert summary(await listing(client, user, "/")) == ([], [])
    file = await upload(client, user, b"abc", path="/only/here/file.txt")
    for missing in ["/nothing/", "/onl/", "/only/here/file.txt/", "/other"]:
        assert_problem(await client.get("/folders", headers=user.auth, params={"path": missing}), 404)
    assert (await client.delete(f"/files/{file['id']}", headers=user.auth)).status_code == 204
    assert_problem(await client.get("/folders", headers=user.auth, params={"path": "/only/"}), 404)


@pytest.mark.parametrize("params", [{"path": "relative/"}, {"path": "/a/../"}, {"path": "/a\x01/"}, {},
                                    {"path": "/", "limit": "0"}, {"path": "/", "cursor": "garbage!"},
                                    {"path": "/", "cursor": "d.!!!"}])
async def test_bad_folder_queries_are_422(client: httpx.AsyncClient, user: User, params: dict[str, str]) -> None:
    assert_problem(await client.get("/folders", headers=user.auth, params=params), 422)


async def test_folders_need_a_token(client: httpx.AsyncClient) -> None:
    assert_problem(await client.get("/folders", params={"path": "/"}), 401)
    assert_problem(await client.delete("/folders", params={"path": "/", "recursive": "true"}), 401)


async def test_delete_folder_non_recursive_is_409_when_not_empty(client: httpx.AsyncClient, user: User) -> None:
    await upload(client, user, b"abc", path="/keep/a.txt")
    body = assert_problem(await client.delete("/folders", headers=user.auth, params={"path": "/keep/"}), 409)
    assert "recursive=true" in body["detail"]
    assert_problem(await client.delete("/folders", headers=user.auth, params={"path": "/none/"}), 404)
    assert_problem(await client.delete("/folders", headers=user.auth,
                                       params={"path": "/none/", "recursive": "true"}), 404)
    assert_problem(await client.delete("/folders", headers=user.auth,
                                       params={"path": "/keep/", "recursive": "maybe"}), 422)
    assert (await listing(client, user, "/keep/"))["files"][0]["path"] == "/keep/a.txt"


async def test_recursive_delete_removes_only_what_is_below(server: Server, client: httpx.AsyncClient,
                                                           user: User, other_user: User) -> None:
    await make_tree(client, user)
    theirs = await upload(client, other_user, b"theirs", path="/videos/2026/may.mp4")
    response = await client.delete("/folders", headers=user.auth, params={"path": "/videos", "recursive": "true"})
    assert response.status_code == 200 and response.json() == {"deleted": 4}
    assert summary(await listing(client, user, "/")) == (
        [("/Docs/", 1, 13), ("/a/", 1, 23), ("/a b/", 1, 19)], ["/root.txt"])
    assert (await client.get(f"/files/{theirs['id']}", headers=other_user.auth)).status_code == 200
    usage = (await client.get("/usage", headers=user.auth)).json()
    assert (usage["files"], usage["bytes"]) == (5, 13 + 23 + 19 + 17 + len(b"no path"))


def test_recursive_delete_of_2000_files_leaves_no_row_no_blob_and_queues_every_cloud_copy(
        pg_server_url: str, tmp_path: Path) -> None:
    """On a database of its own: the session's Granian mediad shares the session database and
    carries out queued cloud deletions, which would race this test's reading of the queue."""
    with fresh_database(pg_server_url) as url:
        migrate.upgrade(url)
        with serve_in_thread(make_settings(tmp_path / "data"), url) as running:
            asyncio.run(_recursive_delete_of_2000_files(running))


async def _recursive_delete_of_2000_files(server: Server) -> None:
    gate = asyncio.Semaphore(16)
    async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
        user = await make_user(client)

        async def put(i: int) -> None:
            async with gate:
                await upload(client, user, b"%d" % i, path=f"/bulk/{i % 7}/{i}.txt")

        await asyncio.gather(*(put(i) for i in range(2000)))
        keep = await upload(client, user, b"stays", path="/bulky/stays.txt")  # shares the prefix, not the folder
        conn = await asyncpg.connect(server.database_url)
        try:
            blobs = await conn.fetchval("SELECT array_agg(blob_id) FROM files WHERE path LIKE '/bulk/%'")
            assert len(blobs) == 2000
            response = await client.delete("/folders", headers=user.auth,
                                           params={"path": "/bulk/", "recursive": "true"})
            assert response.status_code == 200 and response.json() == {"deleted": 2000}
            assert await conn.fetchval("SELECT count(*) FROM files WHERE path LIKE '/bulk/%'") == 0
            keys = {row["key"] for row in await conn.fetch("SELECT key FROM cloud_deletions")}
        finally:
            await conn.close()
        assert keys == {cloud_key(b) for b in blobs}
        assert not any((server.data_dir / blob_relpath(b)).exists() for b in blobs)
        assert len(server.blob_files()) == 1
        assert (await client.get(f"/files/{keep['id']}", headers=user.auth)).status_code == 200


# ---- query plans on 100,000 files ---------------------------------------------------------------

def _compiled(query: sa.Select[Any]) -> tuple[str, list[Any]]:
    """The statement as asyncpg receives it: positional parameters, so the plan may be generic."""
    compiled = query.compile(dialect=asyncpg_dialect())
    params = compiled.construct_params()
    return str(compiled), [params[name] for name in compiled.positiontup or []]


async def _plan(conn: asyncpg.Connection, query: sa.Select[Any]) -> str:
    sql, args = _compiled(query)
    rows = await conn.fetch("EXPLAIN " + sql, *args)
    return "\n".join(row[0] for row in rows)


def test_folder_and_prefix_queries_use_indexes_on_100000_files(pg_server_url: str) -> None:
    async def check(url: str) -> None:
        conn = await asyncpg.connect(url)
        try:
            owner = uuid.uuid4()
            await conn.execute("INSERT INTO users (id, name, name_key) VALUES ($1, 'big', 'big')", owner)
            await conn.execute(
                "INSERT INTO files (id, owner_id, name, extension, format, size, sha256, path, blob_id) "
                "SELECT gen_random_uuid(), $1, 'f' || i, '', 'application/octet-stream', i % 1000, '', "
                "'/d' || (i % 100) || '/s' || (i % 7) || '/f' || i, gen_random_uuid() "
                "FROM generate_series(1, 100000) AS i", owner)
            await conn.execute("VACUUM ANALYZE files")
            # As in asyncpg's prepared statements after a few executions: a plan for any parameters.
            await conn.execute("SET plan_cache_mode = force_generic_plan")
            plans = {
                "root folders": await _plan(conn, tree.subfolders_query(owner, "/", after=None, limit=101)),
                "folders after": await _plan(conn, tree.subfolders_query(owner, "/d5/", after="s2", limit=101)),
                "folder files": await _plan(conn, tree.folder_files_query(owner, "/d5/s3/", after=None, limit=101)),
                "prefix": await _plan(conn, sa.select(db.files).where(
                    db.files.c.owner_id == owner, db.starts_with(db.files.c.path, "/d5/s3/"))
                    .order_by(db.files.c.created_at.desc(), db.files.c.id.desc()).limit(101)),
                "exists": await _plan(conn, sa.select(db.files.c.id).where(
                    db.files.c.owner_id == owner, db.starts_with(db.files.c.path, "/d5/")).limit(1)),
            }
        finally:
            await conn.close()
        for what, plan in plans.items():
            assert "Seq Scan" not in plan, (what, plan)
        assert "ix_files_owner_folder" in plans["root folders"], plans["root folders"]
        assert "Index Only Scan" in plans["root folders"], plans["root folders"]
        assert "ix_files_owner_folder" in plans["folder files"], plans["folder files"]
        assert "ix_files_owner_path" in plans["exists"], plans["exists"]
        assert "Index" in plans["prefix"], plans["prefix"]

    with fresh_database(pg_server_url) as url:
        migrate.upgrade(url)
        asyncio.run(check(url))

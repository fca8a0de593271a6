"""Moves and renames over HTTP (PATCH /files/{id}): no bytes copied, id, ETag and links kept,
the path rules of uploads, conflicts and replacing, and races with uploads and downloads."""

from __future__ import annotations

import asyncio
import hashlib
import random
import uuid
from typing import Any

import asyncpg
import httpx
import pytest
from conftest import Server, User, assert_problem, upload

from mediad.cloud import cloud_key
from mediad.storage import blob_relpath


def payload(size: int, seed: int = 0) -> bytes:
    return random.Random(f"tree/{size}/{seed}").randbytes(size)


async def move(client: httpx.AsyncClient, user: User, file_id: str, **body: Any) -> httpx.Response:
    return await client.patch(f"/files/{file_id}", headers=user.auth, json=body)


async def moved(client: httpx.AsyncClient, user: User, file_id: str, **body: Any) -> dict[str, Any]:
    response = await move(client, user, file_id, **body)
    assert response.status_code == 200, response.text
    return response.json()


async def blob_of(server: Server, file_id: str) -> uuid.UUID | None:
    conn = await asyncpg.connect(server.database_url)
    try:
        return await conn.fetchval("SELECT blob_id FROM files WHERE id = $1", uuid.UUID(file_id))
    finally:
        await conn.close()


async def queued_deletions(server: Server) -> set[str]:
    conn = await asyncpg.connect(server.database_url)
    try:
        return {row["key"] for row in await conn.fetch("SELECT key FROM cloud_deletions")}
    finally:
        await conn.close()


async def download(client: httpx.AsyncClient, user: User, file_id: str) -> httpx.Response:
    response = await client.get(f"/files/{file_id}/content", headers=user.auth)
    assert response.status_code == 200, response.text
    return response


async def test_move_by_full_path_keeps_id_content_and_etag(server: Server, client: httpx.AsyncClient,
                                                           user: User) -> None:
    data = payload(10_000)
    file = await upload(client, user, data, path="/inbox/report.pdf")
    etag = (await download(client, user, file["id"])).headers["etag"]
    blob = await blob_of(server, file["id"])

    after = await moved(client, user, file["id"], path="/archive/2026/Отчёт за май.PDF")
    assert after["id"] == file["id"]
    assert (after["path"], after["name"], after["extension"]) == ("/archive/2026/Отчёт за май.PDF",
                                                                  "Отчёт за май.PDF", "pdf")
    assert (after["sha256"], after["size"], after["created_at"], after["updated_at"]) == (
        file["sha256"], file["size"], file["created_at"], file["updated_at"])
    assert await blob_of(server, file["id"]) == blob  # no bytes were copied
    got = await download(client, user, file["id"])
    assert got.content == data and got.headers["etag"] == etag
    by_path = await client.get("/download", headers=user.auth, params={"path": "/archive/2026/Отчёт за май.PDF"})
    assert by_path.status_code == 200 and by_path.content == data
    assert_problem(await client.get("/download", headers=user.auth, params={"path": "/inbox/report.pdf"}), 404)
    assert (await client.get(f"/files/{file['id']}", headers=user.auth)).json() == after


async def test_move_into_a_folder_keeps_the_name_or_takes_a_new_one(client: httpx.AsyncClient, user: User) -> None:
    file = await upload(client, user, b"abc", path="/a/notes.txt")
    after = await moved(client, user, file["id"], path="/new/deeper/")
    assert (after["path"], after["name"]) == ("/new/deeper/notes.txt", "notes.txt")
    after = await moved(client, user, file["id"], path="//other//", name="renamed.md")
    assert (after["path"], after["name"], after["extension"]) == ("/other/renamed.md", "renamed.md", "md")


async def test_rename_by_name_stays_in_its_folder(client: httpx.AsyncClient, user: User) -> None:
    file = await upload(client, user, b"abc", path="/docs/old.txt")
    after = await moved(client, user, file["id"], name="new.TXT")
    assert (after["path"], after["name"], after["extension"]) == ("/docs/new.TXT", "new.TXT", "txt")
    at_root = await upload(client, user, b"root", path="/top.txt")
    assert (await moved(client, user, at_root["id"], name="top2.txt"))["path"] == "/top2.txt"
    # A file uploaded without a path is renamed and stays out of the tree; a path puts it in.
    loose = await upload(client, user, b"loose", name="loose.bin")
    after = await moved(client, user, loose["id"], name="still loose.bin")
    assert (after["path"], after["name"]) == (None, "still loose.bin")
    assert (await moved(client, user, loose["id"], path="/found/"))["path"] == "/found/still loose.bin"
    # Moving a file onto its own path changes nothing.
    assert (await moved(client, user, file["id"], path="/docs/new.TXT"))["path"] == "/docs/new.TXT"


async def test_a_taken_path_is_409_unless_replace(server: Server, client: httpx.AsyncClient, user: User) -> None:
    mover = await upload(client, user, b"the mover", path="/a/mover.txt")
    target = await upload(client, user, b"the one in the way", path="/b/target.txt")
    body = assert_problem(await move(client, user, mover["id"], path="/b/target.txt"), 409)
    assert "/b/target.txt" in body["detail"]
    assert_problem(await move(client, user, mover["id"], path="/b/", name="target.txt"), 409)
    assert (await client.get(f"/files/{mover['id']}", headers=user.auth)).json()["path"] == "/a/mover.txt"

    target_blob = await blob_of(server, target["id"])
    assert target_blob is not None and (server.data_dir / blob_relpath(target_blob)).is_file()
    after = await moved(client, user, mover["id"], path="/b/target.txt", replace=True)
    assert (after["id"], after["path"]) == (mover["id"], "/b/target.txt")
    assert (await download(client, user, mover["id"])).content == b"the mover"
    # The file that was there is deleted as DELETE would: row, local bytes, cloud copy queued.
    assert_problem(await client.get(f"/files/{target['id']}", headers=user.auth), 404)
    assert not (server.data_dir / blob_relpath(target_blob)).exists()
    assert cloud_key(target_blob) in await queued_deletions(server)
    usage = (await client.get("/usage", headers=user.auth)).json()
    assert (usage["files"], usage["bytes"]) == (1, len(b"the mover"))


@pytest.mark.parametrize("body", [
    {"path": "relative/x.txt"}, {"path": "/a/../x.txt"}, {"path": "/a/./x.txt"}, {"path": "/a\x01/x.txt"},
    {"path": "/a\\b.txt"}, {"path": "/a/.."}, {"name": ".."}, {"name": ""}, {"name": "a\x00b"},
    {"path": 5}, {"name": ["x"]}, {"path": "/x.txt", "replace": "yes"}, {}, {"replace": True},
    {"path": "/dir/a.txt", "name": "b.txt"}, {"path": "/" + "x" * 5000},
])
async def test_invalid_moves_are_422_and_change_nothing(client: httpx.AsyncClient, user: User,
                                                         body: dict[str, Any]) -> None:
    file = await upload(client, user, b"abc", path="/docs/file.txt")
    assert_problem(await move(client, user, file["id"], **body), 422)
    assert (await client.get(f"/files/{file['id']}", headers=user.auth)).json() == file


async def test_malformed_body_is_400(client: httpx.AsyncClient, user: User) -> None:
    file = await upload(client, user, b"abc", path="/docs/file.txt")
    response = await client.patch(f"/files/{file['id']}", headers=user.auth, content=b"{not json")
    assert_problem(response, 400)


async def test_another_users_file_is_404(client: httpx.AsyncClient, user: User, other_user: User) -> None:
    file = await upload(client, user, b"mine", path="/mine.txt")
    assert_problem(await move(client, other_user, file["id"], path="/stolen.txt"), 404)
    assert_problem(await move(client, user, str(uuid.uuid4()), path="/x.txt"), 404)
    assert_problem(await move(client, user, "not-a-uuid", path="/x.txt"), 404)
    assert_problem(await client.patch(f"/files/{file['id']}", json={"path": "/x.txt"}), 401)
    # The same path in another user's tree is no conflict.
    theirs = await upload(client, other_user, b"theirs", path="/b.txt")
    assert (await moved(client, other_user, theirs["id"], path="/mine.txt"))["path"] == "/mine.txt"
    assert (await client.get(f"/files/{file['id']}", headers=user.auth)).json()["path"] == "/mine.txt"


async def test_a_link_made_before_the_move_still_works(client: httpx.AsyncClient, user: User) -> None:
    data = payload(5000, 1)
    file = await upload(client, user, data, path="/pics/cat.jpg")
    link = (await client.post(f"/files/{file['id']}/links", json={}, headers=user.auth)).json()
    await moved(client, user, file["id"], path="/animals/cats/", name="tom.jpg")
    response = await client.get(link["path"])
    assert response.status_code == 200 and response.content == data
    assert 'filename="tom.jpg"' in response.headers["content-disposition"]


async def test_downloads_racing_moves_get_whole_bytes(client: httpx.AsyncClient, user: User) -> None:
    data = payload(4 << 20, 2)
    digest = hashlib.sha256(data).hexdigest()
    file = await upload(client, user, data, path="/race/a.bin")

    async def mover() -> None:
        for i in range(20):
            await moved(client, user, file["id"], path=f"/race/{'b' if i % 2 == 0 else 'a'}.bin")

    async def downloader() -> list[str]:
        digests = []
        for _ in range(6):
            response = await client.get(f"/files/{file['id']}/content", headers=user.auth)
            assert response.status_code == 200
            digests.append(hashlib.sha256(response.content).hexdigest())
        return digests

    results = await asyncio.gather(mover(), *(downloader() for _ in range(3)))
    assert all(d == digest for digests in results[1:] for d in digests)


async def test_a_move_racing_an_upload_to_its_target_loses_nothing(server: Server, client: httpx.AsyncClient,
                                                                   user: User) -> None:
    """One wins: the upload first → the move is 409; the move first → the upload replaces the moved
    file's content at that path. Either way every row has its blob and no blob is left without one."""
    outcomes = set()
    for i in range(12):
        mover = await upload(client, user, b"moving %d" % i, path=f"/src/{i}.txt")
        target = f"/dst/{i}.txt"
        moving, uploading = await asyncio.gather(
            move(client, user, mover["id"], path=target),
            client.put("/files", headers=user.auth, params={"path": target}, content=b"uploaded %d" % i))
        at_target = (await client.get("/download", headers=user.auth, params={"path": target}))
        assert at_target.content == b"uploaded %d" % i  # the upload's bytes are at the target either way
        if moving.status_code == 409:
            assert uploading.status_code == 201
            assert (await download(client, user, mover["id"])).content == b"moving %d" % i
            outcomes.add("upload first")
        else:
            assert moving.status_code == 200, moving.text
            assert uploading.status_code == 200 and uploading.json()["id"] == mover["id"]  # replaced it
            outcomes.add("move first")
    conn = await asyncpg.connect(server.database_url)
    try:
        blobs = {server.data_dir / blob_relpath(b) for b in await conn.fetchval(
            "SELECT array_agg(blob_id) FROM files WHERE owner_id = $1", uuid.UUID(user.id))}
    finally:
        await conn.close()
    assert set(server.blob_files()) == blobs  # no orphan, nothing missing
    assert outcomes  # which interleavings happened depends on timing; each is checked above

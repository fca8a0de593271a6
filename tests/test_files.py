"""The File API over HTTP: the File object, listing with pagination and prefixes, deletion, usage,
ownership and authentication."""

from __future__ import annotations

import asyncio
import base64
import re
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import httpx
from conftest import Server, User, assert_problem

from mediad.storage import blob_relpath

FILE_KEYS = {"id", "name", "extension", "format", "size", "sha256", "path", "created_at", "updated_at",
             "cloud", "local", "media"}
RFC3339_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$")


async def upload(client: httpx.AsyncClient, user: User, data: bytes = b"content", *, name: str = "f.txt",
                 path: str | None = None, replaces: bool = False) -> dict[str, Any]:
    """201 for a new file, 200 when it `replaces` the file at its path."""
    params = {"name": name} if path is None else {"path": path, "name": name}
    response = await client.post("/files", headers=user.auth, params=params, content=data)
    assert response.status_code == (200 if replaces else 201), response.text
    return response.json()


async def blob_path(server: Server, file_id: str) -> Path:
    conn = await asyncpg.connect(server.database_url)
    try:
        blob_id = await conn.fetchval("SELECT blob_id FROM files WHERE id = $1", uuid.UUID(file_id))
    finally:
        await conn.close()
    assert blob_id is not None
    return server.data_dir / blob_relpath(blob_id)


async def list_all(client: httpx.AsyncClient, user: User, **params: Any) -> list[list[dict[str, Any]]]:
    """Every page of GET /files, following next_cursor."""
    pages: list[list[dict[str, Any]]] = []
    cursor = None
    while True:
        query = {**params, **({"cursor": cursor} if cursor else {})}
        response = await client.get("/files", headers=user.auth, params=query)
        assert response.status_code == 200, response.text
        body = response.json()
        assert set(body) == {"files", "next_cursor"}
        pages.append(body["files"])
        cursor = body["next_cursor"]
        if cursor is None:
            return pages
        assert len(pages) < 50, "pagination does not end"


# ---- the File object ----------------------------------------------------------------------------

async def test_file_object_has_exactly_the_contract_keys(client: httpx.AsyncClient, user: User) -> None:
    created = await upload(client, user, b"%PDF-1.7\n", name="Отчёт.PDF", path="/docs/")
    response = await client.get(f"/files/{created['id']}", headers=user.auth)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == FILE_KEYS
    assert body == created
    assert str(uuid.UUID(body["id"])) == body["id"] and uuid.UUID(body["id"]).version in (4, 7)
    assert (body["name"], body["extension"], body["format"]) == ("Отчёт.PDF", "pdf", "application/pdf")
    assert (body["size"], body["path"]) == (9, "/docs/Отчёт.PDF")
    assert re.fullmatch(r"[0-9a-f]{64}", body["sha256"])
    assert RFC3339_UTC.match(body["created_at"]) and RFC3339_UTC.match(body["updated_at"])
    assert body["cloud"] == {"state": "pending", "stored_at": None}
    assert body["local"] is True


    loose = await upload(client, user, name="loose.bin")
    assert (await client.get(f"/files/{loose['id']}", headers=user.auth)).json()["path"] is None


async def test_unknown_or_malformed_ids_are_404(client: httpx.AsyncClient, user: User) -> None:
    await upload(client, user)
    for file_id in ["not-a-uuid", "123", "0" * 31, "zzzzzzzz-zzzz-zzzz-zzzz-zzzzzzzzzzzz", "%00",
                    "..%2F..%2Fetc", str(uuid.uuid4())]:
        for method in ("GET", "DELETE"):
            response = await client.request(method, f"/files/{file_id}", headers=user.auth)
            assert response.status_code == 404, (method, file_id, response.text)
            assert_problem(response, 404)
    assert len((await client.get("/files", headers=user.auth)).json()["files"]) == 1


async def test_another_users_file_is_404_and_untouched(client: httpx.AsyncClient, server: Server,
                                                       user: User, other_user: User) -> None:
    theirs = await upload(client, other_user, b"private bytes", path="/secret/")
    on_disk = await blob_path(server, theirs["id"])
    missing = assert_problem(await client.get(f"/files/{uuid.uuid4()}", headers=user.auth), 404)
    foreign = assert_problem(await client.get(f"/files/{theirs['id']}", headers=user.auth), 404)
    assert foreign == missing  # indistinguishable from a file that does not exist
    assert_problem(await client.delete(f"/files/{theirs['id']}", headers=user.auth), 404)
    assert (await client.get("/files", headers=user.auth)).json() == {"files": [], "next_cursor": None}
    filtered = await client.get("/files", headers=user.auth, params={"prefix": "/secret/"})
    assert filtered.json()["files"] == []
    # Still there for its owner, bytes included.
    assert (await client.get(f"/files/{theirs['id']}", headers=other_user.auth)).json() == theirs
    assert on_disk.read_bytes() == b"private bytes"


# ---- deleting -----------------------------------------------------------------------------------

async def test_delete_removes_row_and_bytes(client: httpx.AsyncClient, server: Server, user: User) -> None:
    keep = await upload(client, user, b"keep", name="keep.txt")
    gone = await upload(client, user, b"delete me", name="gone.txt", path="/d/")
    gone_blob = await blob_path(server, gone["id"])
    assert gone_blob.read_bytes() == b"delete me"
    response = await client.delete(f"/files/{gone['id']}", headers=user.auth)
    assert response.status_code == 204
    assert response.content == b""
    assert_problem(await client.get(f"/files/{gone['id']}", headers=user.auth), 404)
    assert_problem(await client.delete(f"/files/{gone['id']}", headers=user.auth), 404)
    assert not gone_blob.exists()
    assert server.blob_files() == [await blob_path(server, keep["id"])]
    assert [f["id"] for f in (await client.get("/files", headers=user.auth)).json()["files"]] == [keep["id"]]
    assert (await client.get("/usage", headers=user.auth)).json() == {"files": 1, "bytes": 4, "quota": None}
    # The path is free again: the next upload there is a new file.
    again = await client.post("/files", headers=user.auth, params={"path": "/d/gone.txt"}, content=b"new")
    assert again.status_code == 201 and again.json()["id"] != gone["id"]


# ---- usage --------------------------------------------------------------------------------------

async def test_usage_counts_the_callers_files_and_bytes_only(client: httpx.AsyncClient, user: User,
                                                             other_user: User) -> None:
    assert (await client.get("/usage", headers=user.auth)).json() == {"files": 0, "bytes": 0, "quota": None}
    for size in (0, 10, 1000, 65536):
        await upload(client, user, b"u" * size)
    await upload(client, other_user, b"o" * 777)
    await upload(client, user, b"r" * 5, path="/r.txt")
    await upload(client, user, b"r" * 50, path="/r.txt", replaces=True)  # a replace counts once, at its new size
    response = await client.get("/usage", headers=user.auth)
    assert response.status_code == 200
    assert response.json() == {"files": 5, "bytes": 10 + 1000 + 65536 + 50, "quota": None}
    assert (await client.get("/usage", headers=other_user.auth)).json() == {"files": 1, "bytes": 777, "quota": None}


# ---- listing ------------------------------------------------------------------------------------

async def test_listing_is_newest_first_and_pages_without_gaps_or_duplicates(
        client: httpx.AsyncClient, user: User, other_user: User) -> None:
    uploaded = []
    for i in range(7):
        uploaded.append((await upload(client, user, b"%d" % i, name=f"{i}.txt"))["id"])
        if i == 3:
            await upload(client, other_user, b"not yours")
    newest_first = uploaded[::-1]

    pages = await list_all(client, user, limit=3)
    assert [len(page) for page in pages] == [3, 3, 1]
    assert [f["id"] for page in pages for f in page] == newest_first
    assert all(set(f) == FILE_KEYS for page in pages for f in page)

    everything = (await client.get("/files", headers=user.auth)).json()
    assert [f["id"] for f in everything["files"]] == newest_first and everything["next_cursor"] is None
    exact = (await client.get("/files", headers=user.auth, params={"limit": 7})).json()
    assert len(exact["files"]) == 7 and exact["next_cursor"] is None
    assert (await list_all(client, user, limit=3)) == pages  # the same pages when nothing changed


async def test_pages_stay_stable_when_files_arrive_between_requests(client: httpx.AsyncClient,
                                                                    user: User) -> None:
    uploaded = [(await upload(client, user, name=f"{i}.txt"))["id"] for i in range(5)]
    first = (await client.get("/files", headers=user.auth, params={"limit": 2})).json()
    newcomer = await upload(client, user, name="late.txt")
    second = (await client.get("/files", headers=user.auth,
                               params={"limit": 2, "cursor": first["next_cursor"]})).json()
    third = (await client.get("/files", headers=user.auth,
                              params={"limit": 2, "cursor": second["next_cursor"]})).json()
    seen = [f["id"] for page in (first, second, third) for f in page["files"]]
    assert seen == uploaded[::-1] and third["next_cursor"] is None
    fresh = (await client.get("/files", headers=user.auth, params={"limit": 1})).json()
    assert fresh["files"][0]["id"] == newcomer["id"]


async def test_replacing_keeps_a_files_place_in_the_listing(client: httpx.AsyncClient, user: User) -> None:
    oldest = await upload(client, user, b"v1", path="/p/old.txt")
    newer = await upload(client, user, b"x", name="newer.txt")
    await asyncio.sleep(0.01)
    replaced = await upload(client, user, b"version 2", path="/p/old.txt", replaces=True)
    assert replaced["id"] == oldest["id"] and replaced["created_at"] == oldest["created_at"]
    listed = (await client.get("/files", headers=user.auth)).json()["files"]
    assert [f["id"] for f in listed] == [newer["id"], oldest["id"]]
    assert listed[1]["size"] == 9


async def test_prefix_filters_by_virtual_path(client: httpx.AsyncClient, user: User,
                                               other_user: User) -> None:
    paths = ["/dir/a.txt", "/dir/sub/b.txt", "/dirx/c.txt", "/other/dir/d.txt", "/a_b/e.txt", "/axb/f.txt",
             "/100%/g.txt", "/100x/h.txt"]
    ids = {p: (await upload(client, user, path=p))["id"] for p in paths}
    await upload(client, user, name="no-path.txt")
    await upload(client, other_user, path="/dir/theirs.txt")

    async def listed(prefix: str, **params: Any) -> list[str]:
        pages = await list_all(client, user, prefix=prefix, **params)
        return [f["path"] for page in pages for f in page]

    assert await listed("/dir/") == ["/dir/sub/b.txt", "/dir/a.txt"]
    assert await listed("/dir/", limit=1) == ["/dir/sub/b.txt", "/dir/a.txt"]
    assert await listed("/dir/sub/") == ["/dir/sub/b.txt"]
    # LIKE wildcards in a prefix are literal characters.
    assert await listed("/a_b/") == ["/a_b/e.txt"]
    assert await listed("/100%/") == ["/100%/g.txt"]
    assert await listed("/nothing/") == []
    everything = await listed("/")
    assert sorted(everything) == sorted(paths) and len(ids) == len(paths)


async def test_a_prefix_matches_whatever_unicode_normal_form_it_is_sent_in(client: httpx.AsyncClient,
                                                                         user: User) -> None:
    """Paths are stored in NFC; a prefix typed on a system that sends NFD (macOS) finds them too."""
    stored = await upload(client, user, path="/caf\u00e9/menu.txt")
    for prefix in ("/caf\u00e9/", "/cafe\u0301/"):
        listed = (await client.get("/files", headers=user.auth, params={"prefix": prefix})).json()["files"]
        assert [f["id"] for f in listed] == [stored["id"]], prefix


async def test_bad_limits_are_422(client: httpx.AsyncClient, user: User) -> None:
    for limit in ["0", "1001", "abc", "-1", "1.5", "1e3", " 5", "²", "99999999999999999999"]:
        response = await client.get("/files", headers=user.auth, params={"limit": limit})
        assert response.status_code == 422, (limit, response.text)
        assert "limit" in assert_problem(response, 422)["detail"]


async def test_limits_at_the_bounds_are_accepted(client: httpx.AsyncClient, user: User) -> None:
    for i in range(2):
        await upload(client, user, name=f"{i}.txt")
    one = (await client.get("/files", headers=user.auth, params={"limit": "1"})).json()
    assert len(one["files"]) == 1 and one["next_cursor"] is not None
    most = (await client.get("/files", headers=user.auth, params={"limit": "1000"})).json()
    assert len(most["files"]) == 2 and most["next_cursor"] is None


def _b64(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


BAD_CURSORS = [
    "abc", "!!!!", "é", _b64("garbage"), _b64(f"2026-01-01T00:00:00|{uuid.uuid4()}"),  # naive time
    _b64("2026-01-01T00:00:00+00:00|not-a-uuid"), _b64("not a time|" + str(uuid.uuid4())),
    # Valid times whose offset pushes them out of range in UTC.
    _b64(f"0001-01-01T00:00:00+05:00|{uuid.uuid4()}"), _b64(f"9999-12-31T23:59:59-05:00|{uuid.uuid4()}"),
    base64.urlsafe_b64encode(b"\xff\xfe\xfd").decode(),
]


async def test_bad_cursors_are_422(client: httpx.AsyncClient, user: User) -> None:
    await upload(client, user)
    for cursor in BAD_CURSORS:
        response = await client.get("/files", headers=user.auth, params={"cursor": cursor})
        assert response.status_code == 422, (cursor, response.text)
        assert "cursor" in assert_problem(response, 422)["detail"]


# ---- authentication -----------------------------------------------------------------------------

ROUTES = [
    ("GET", "/files"), ("GET", "/files?prefix=/a/&limit=3"), ("POST", "/files?name=a.txt"),
    ("PUT", "/files?path=/a.txt"), ("GET", "/files/{id}"), ("DELETE", "/files/{id}"),
    ("GET", "/files/not-a-uuid"), ("GET", "/usage"),
]


async def test_every_files_route_needs_a_bearer_token(client: httpx.AsyncClient, server: Server,
                                                      user: User) -> None:
    mine = await upload(client, user, b"still here")
    for header in [None, "Bearer not-a-real-token", "Bearer", "Basic dXNlcjpwYXNz", user.token]:
        headers = {} if header is None else {"Authorization": header}
        for method, url in ROUTES:
            response = await client.request(method, url.format(id=mine["id"]), headers=headers,
                                            content=b"body")
            assert response.status_code == 401, (header, method, url, response.text)
            assert_problem(response, 401)
            assert response.headers["www-authenticate"].startswith("Bearer"), (method, url)
    # Nothing was deleted, replaced or added by the refused calls.
    assert (await client.get("/files", headers=user.auth)).json()["files"] == [mine]
    assert (await blob_path(server, mine["id"])).read_bytes() == b"still here"

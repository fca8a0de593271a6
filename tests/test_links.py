"""Signed links over HTTP: tokenless downloads with ranges and conditionals, and every way a link
stops working (altered, expired, content replaced, file deleted, key rotated) answered with 403."""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import stat
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

import httpx
import media_samples as samples
import pytest
from conftest import User, assert_problem, make_settings, make_user, serve_in_thread, upload, wait_for

from mediad import links

KEY_FILE = links.KEY_FILE


def payload(size: int, seed: int = 0) -> bytes:
    return random.Random(f"links/{size}/{seed}").randbytes(size)


async def make_link(http: httpx.AsyncClient, user: User, file_id: str, **body: Any) -> dict[str, Any]:
    response = await http.post(f"/files/{file_id}/links", headers=user.auth, json=body)
    assert response.status_code == 201, response.text
    return response.json()


def altered(path: str, **changes: str) -> str:
    """The link path with some query parameters replaced."""
    parts = urlsplit(path)
    query = dict(parse_qsl(parts.query))
    query.update(changes)
    return f"{parts.path}?{urlencode(query)}"


async def test_a_link_downloads_without_a_token_with_ranges(client: httpx.AsyncClient, user: User) -> None:
    data = payload(100_000)
    file = await upload(client, user, data, name="Отчёт.bin")
    before = time.time()
    link = await make_link(client, user, file["id"], expires_in=600)

    assert link["path"].startswith(f"/files/{file['id']}/content?")
    assert link["url"].endswith(link["path"]) and link["url"].startswith("http")
    query = dict(parse_qsl(urlsplit(link["path"]).query))
    assert set(query) == {"expires", "inline", "signature"} and query["inline"] == "0"
    assert before + 600 - 2 <= int(query["expires"]) <= time.time() + 600
    expires_at = datetime.strptime(link["expires_at"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    assert int(expires_at.timestamp()) == int(query["expires"])

    whole = await client.get(link["path"])  # no Authorization header
    assert whole.status_code == 200 and whole.content == data
    assert whole.headers["etag"] == f'"{file["sha256"]}"'
    assert whole.headers["content-disposition"].startswith("attachment;")

    part = await client.get(link["path"], headers={"Range": "bytes=1000-1999"})
    assert part.status_code == 206 and part.content == data[1000:2000]
    assert part.headers["content-range"] == f"bytes 1000-1999/{len(data)}"
    tail = await client.get(link["path"], headers={"Range": "bytes=-10"})
    assert tail.status_code == 206 and tail.content == data[-10:]
    head = await client.head(link["path"])
    assert head.status_code == 200 and head.headers["content-length"] == str(len(data))
    cached = await client.get(link["path"], headers={"If-None-Match": whole.headers["etag"]})
    assert cached.status_code == 304

    # Other query parameters are ignored; a token sent along changes nothing.
    assert (await client.get(link["path"] + "&utm_source=mail")).content == data
    assert (await client.get(link["path"], headers={"Authorization": "Bearer nonsense"})).content == data


async def test_inline_links_say_inline(client: httpx.AsyncClient, user: User) -> None:
    file = await upload(client, user, payload(10), name="a.bin")
    link = await make_link(client, user, file["id"], inline=True)
    assert dict(parse_qsl(urlsplit(link["path"]).query))["inline"] == "1"
    response = await client.get(link["path"])
    assert response.status_code == 200
    assert response.headers["content-disposition"].startswith("inline;")


async def test_defaults_with_an_empty_body(client: httpx.AsyncClient, user: User) -> None:
    file = await upload(client, user, payload(10))
    response = await client.post(f"/files/{file['id']}/links", headers=user.auth)
    assert response.status_code == 201, response.text
    query = dict(parse_qsl(urlsplit(response.json()["path"]).query))
    assert query["inline"] == "0"
    assert abs(int(query["expires"]) - (time.time() + 3600)) < 5


def _flip(signature: str) -> str:
    return ("A" if signature[0] != "A" else "B") + signature[1:]


@pytest.mark.parametrize("change", [
    "expires+1", "expires-1", "expires=abc", "inline", "inline=2", "signature", "signature-short",
    "signature-empty", "signature-non-ascii", "id-other-file", "id-random", "id-not-uuid", "inline-missing",
])
async def test_altered_links_are_403(client: httpx.AsyncClient, user: User, change: str) -> None:
    file = await upload(client, user, payload(1000))
    other = await upload(client, user, payload(1000, seed=1))
    path = (await make_link(client, user, file["id"]))["path"]
    query = dict(parse_qsl(urlsplit(path).query))
    expires, signature = int(query["expires"]), query["signature"]
    changed = {
        "expires+1": altered(path, expires=str(expires + 1)),
        "expires-1": altered(path, expires=str(expires - 1)),
        "expires=abc": altered(path, expires="abc"),
        "inline": altered(path, inline="1"),
        "inline=2": altered(path, inline="2"),
        "signature": altered(path, signature=_flip(signature)),
        "signature-short": altered(path, signature=signature[:-1]),
        "signature-empty": altered(path, signature=""),
        "signature-non-ascii": altered(path, signature="é" + signature[1:]),
        "id-other-file": path.replace(file["id"], other["id"]),
        "id-random": path.replace(file["id"], str(uuid.uuid4())),
        "id-not-uuid": path.replace(file["id"], "not-a-uuid"),
        "inline-missing": f"/files/{file['id']}/content?expires={expires}&signature={signature}",
    }[change]
    for method in ("GET", "HEAD"):
        response = await client.request(method, changed)
        assert response.status_code == 403, (change, method, response.text)
    assert_problem(await client.get(changed), 403)
    assert (await client.get(path)).status_code == 200  # the original still works


async def test_an_expired_link_is_403(client: httpx.AsyncClient, user: User) -> None:
    file = await upload(client, user, payload(100))
    path = (await make_link(client, user, file["id"], expires_in=1))["path"]
    expires = int(dict(parse_qsl(urlsplit(path).query))["expires"])
    await asyncio.sleep(max(0.0, expires - time.time()) + 0.05)
    body = assert_problem(await client.get(path), 403)
    assert "expired" in body["detail"]
    assert (await client.head(path)).status_code == 403


async def test_replacing_the_content_ends_old_links(client: httpx.AsyncClient, user: User) -> None:
    first = await upload(client, user, payload(500), path="/docs/a.bin")
    old = (await make_link(client, user, first["id"]))["path"]
    assert (await client.get(old)).status_code == 200
    second = await upload(client, user, payload(500, seed=2), path="/docs/a.bin", replaces=True)
    assert second["id"] == first["id"]  # same File, new content
    assert_problem(await client.get(old), 403)
    new = (await make_link(client, user, second["id"]))["path"]
    assert (await client.get(new)).content == payload(500, seed=2)


async def _served(http: httpx.AsyncClient, user: User, file_id: str, data: bytes) -> None:
    """Wait until downloads of the file (the lookup cache included) serve `data`: a change is seen
    everywhere within 1 s, and a link checked before that could be checked against the old row."""
    async def current() -> bool:
        return (await http.get(f"/files/{file_id}/content", headers=user.auth)).content == data
    await wait_for(current, timeout=2, what="the new content")


async def _ended(http: httpx.AsyncClient, path: str) -> None:
    """The link answers 403 within 1 s (the cache's bound, with some slack), and keeps doing so."""
    async def refused() -> bool:
        return (await http.get(path)).status_code == 403
    await wait_for(refused, timeout=2, what="the link to end")
    for _ in range(2):
        assert_problem(await http.get(path), 403)


async def test_any_new_upload_ends_old_links_even_of_the_same_bytes(client: httpx.AsyncClient, user: User) -> None:
    """A link is for the content it was made for, not for whatever has the same sha256: uploading
    the same bytes again replaces the content, and a content that comes back (A, B, A) does not
    bring back the links made for the first A."""
    a, b = payload(500, 3), payload(500, 4)
    first = await upload(client, user, a, path="/docs/same.bin")
    same = (await make_link(client, user, first["id"]))["path"]
    assert (await client.get(same)).content == a
    again = await upload(client, user, a, path="/docs/same.bin", replaces=True)
    assert (again["id"], again["sha256"]) == (first["id"], first["sha256"])
    await _ended(client, same)

    back = (await make_link(client, user, first["id"]))["path"]
    assert (await client.get(back)).content == a
    await upload(client, user, b, path="/docs/same.bin", replaces=True)
    await _served(client, user, first["id"], b)
    assert_problem(await client.get(back), 403)
    await upload(client, user, a, path="/docs/same.bin", replaces=True)
    await _served(client, user, first["id"], a)
    for _ in range(2):  # from the database, then from the lookup cache
        assert_problem(await client.get(back), 403)
        assert_problem(await client.get(same), 403)
    fresh = (await make_link(client, user, first["id"]))["path"]
    assert (await client.get(fresh)).content == a


async def test_a_new_upload_of_the_same_picture_ends_its_thumbnail_links(client: httpx.AsyncClient,
                                                                          user: User) -> None:
    picture = samples.photo(width=200, height=100, orientation=1)
    file = await upload(client, user, picture, path="/l/same.jpg")
    created = await client.post(f"/files/{file['id']}/links", headers=user.auth, json={"thumbnail": 32})
    assert created.status_code == 201, created.text
    path = created.json()["path"]
    assert (await client.get(path, headers={"Accept": "image/jpeg"})).status_code == 200
    await upload(client, user, picture, path="/l/same.jpg", replaces=True)
    assert_problem(await client.get(path, headers={"Accept": "image/jpeg"}), 403)


async def test_deleting_the_file_ends_its_links(client: httpx.AsyncClient, user: User) -> None:
    file = await upload(client, user, payload(500))
    path = (await make_link(client, user, file["id"]))["path"]
    assert (await client.delete(f"/files/{file['id']}", headers=user.auth)).status_code == 204
    assert_problem(await client.get(path), 403)


async def test_only_the_owner_can_make_links(client: httpx.AsyncClient, user: User, other_user: User) -> None:
    file = await upload(client, user, payload(10))
    assert_problem(await client.post(f"/files/{file['id']}/links", headers=other_user.auth, json={}), 404)
    assert_problem(await client.post(f"/files/{uuid.uuid4()}/links", headers=user.auth, json={}), 404)
    assert_problem(await client.post("/files/nope/links", headers=user.auth, json={}), 404)
    missing = await client.post(f"/files/{file['id']}/links", json={})
    assert_problem(missing, 401)
    assert missing.headers["www-authenticate"].startswith("Bearer")
    assert_problem(await client.post(f"/files/{file['id']}/links", json={},
                                     headers={"Authorization": "Bearer wrong"}), 401)


@pytest.mark.parametrize("body", [
    {"expires_in": 0}, {"expires_in": -5}, {"expires_in": 7 * 86400 + 1}, {"expires_in": "60"},
    {"expires_in": 1.5}, {"expires_in": True}, {"expires_in": None}, {"inline": "yes"}, {"inline": 1},
])
async def test_bad_options_are_422(client: httpx.AsyncClient, user: User, body: dict[str, Any]) -> None:
    file = await upload(client, user, payload(10))
    assert_problem(await client.post(f"/files/{file['id']}/links", headers=user.auth, json=body), 422)


async def test_bounds_and_malformed_bodies(client: httpx.AsyncClient, user: User) -> None:
    file = await upload(client, user, payload(10))
    for seconds in (1, 7 * 86400):
        await make_link(client, user, file["id"], expires_in=seconds)
    url = f"/files/{file['id']}/links"
    assert_problem(await client.post(url, headers=user.auth, content=b"{nope"), 400)
    assert_problem(await client.post(url, headers=user.auth, json=[1]), 422)


def test_signatures_bind_every_part() -> None:
    key, file_id, sha, blob = os.urandom(32), uuid.uuid4(), hashlib.sha256(b"x").hexdigest(), uuid.uuid4()
    base = links.sign(key, file_id, 100, False, sha, blob)
    assert links.sign(key, file_id, 100, False, sha, blob) == base and "=" not in base
    others = {links.sign(os.urandom(32), file_id, 100, False, sha, blob),
              links.sign(key, uuid.uuid4(), 100, False, sha, blob),
              links.sign(key, file_id, 101, False, sha, blob), links.sign(key, file_id, 100, True, sha, blob),
              links.sign(key, file_id, 100, False, hashlib.sha256(b"y").hexdigest(), blob),
              links.sign(key, file_id, 100, False, sha, uuid.uuid4()),
              links.sign(key, file_id, 100, False, sha, blob, thumbnail=100)}
    assert base not in others and len(others) == 7


async def test_links_survive_a_restart_and_the_key_file_is_private(database_url: str, tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "data")
    data = payload(2000)
    with serve_in_thread(settings, database_url) as first:
        async with httpx.AsyncClient(base_url=first.url, timeout=30) as http:
            user = await make_user(http)
            file = await upload(http, user, data)
            path = (await make_link(http, user, file["id"]))["path"]
    key_file = tmp_path / "data" / KEY_FILE
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    key = key_file.read_bytes()
    with serve_in_thread(settings, database_url) as second:
        async with httpx.AsyncClient(base_url=second.url, timeout=30) as http:
            assert (await http.get(path)).content == data
    assert key_file.read_bytes() == key


async def test_a_configured_key_is_used_and_rotating_it_ends_links(database_url: str, tmp_path: Path) -> None:
    secret = "s3cret-" + "k" * 30
    data = payload(300)
    with serve_in_thread(make_settings(tmp_path / "a", secret_key=secret), database_url) as node_a:
        async with httpx.AsyncClient(base_url=node_a.url, timeout=30) as http:
            user = await make_user(http)
            file = await upload(http, user, data)
            path = (await make_link(http, user, file["id"]))["path"]
    assert not (tmp_path / "a" / KEY_FILE).exists()
    rotated_settings = make_settings(tmp_path / "a", secret_key=secret + "-rotated")
    with serve_in_thread(rotated_settings, database_url) as rotated:
        async with httpx.AsyncClient(base_url=rotated.url, timeout=30) as http:
            assert_problem(await http.get(path), 403)
            assert (await http.get(f"/files/{file['id']}/content", headers=user.auth)).content == data

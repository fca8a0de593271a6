"""The download path's lookup cache (mediad/cache.py): changes take effect within 1 s whoever
makes them, and nothing stale is served while the change listener is away.

The server here has a database of its own and a cache max age of 60 s, so that only the
notifications (or the listener's loss) can end a cached answer inside a test, and so that a
test may switch the triggers off without disturbing any other server.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import asyncpg
import httpx
import pytest
from conftest import Server, User, assert_problem, fresh_database, make_settings, make_user, serve_in_thread, upload

from mediad import migrate

RANGE = {"Range": "bytes=0-99"}


@pytest.fixture(scope="module")
def cache_server(pg_server_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with fresh_database(pg_server_url) as url:
        migrate.upgrade(url)
        settings = make_settings(tmp_path_factory.mktemp("cache") / "data", cache_max_age_s=60.0)
        with serve_in_thread(settings, url) as running:
            yield running


@pytest.fixture
async def http(cache_server: Server) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=cache_server.url, timeout=30) as client:
        yield client


async def sql(server: Server, statement: str, *args: Any) -> str:
    """One statement from a connection of its own, as another node or psql would send it."""
    conn = await asyncpg.connect(server.database_url)
    try:
        return str(await conn.execute(statement, *args))
    finally:
        await conn.close()


async def within_1s(request: Any, expected_status: int, body: bytes | None = None) -> float:
    """Seconds after the change of the first request that got `expected_status` (and `body`);
    fails if a request sent 1 s or more after the change still got the old answer (the time a
    slow answer takes on a loaded machine does not count against the server)."""
    started = time.monotonic()
    while True:
        sent = time.monotonic() - started
        response = await request()
        if response.status_code == expected_status and (body is None or response.content == body):
            return sent
        assert sent < 1.0, f"still {response.status_code} {response.content[:40]!r} 1 s after the change"
        await asyncio.sleep(0.02)


async def cached(http: httpx.AsyncClient, user: User, target: str, data: bytes) -> None:
    """Two answers in a row: the first fills the cache, the second comes from it."""
    for _ in range(2):
        response = await http.get(target, headers={**user.auth, **RANGE})
        assert response.status_code == 206 and response.content == data[:100]


async def test_sign_out_ends_the_token_within_1s(http: httpx.AsyncClient) -> None:
    user = await make_user(http)
    data = b"sign out " * 100
    file = await upload(http, user, data)
    await cached(http, user, f"/files/{file['id']}/content", data)
    signed_out = await http.delete("/auth/token", headers=user.auth)
    assert signed_out.status_code == 204 and signed_out.content == b""
    await within_1s(lambda: http.get(f"/files/{file['id']}/content", headers={**user.auth, **RANGE}), 401)
    answer = await http.get(f"/download?id={file['id']}", headers=user.auth)
    assert_problem(answer, 401)
    assert answer.headers["www-authenticate"].startswith("Bearer")
    assert_problem(await http.delete("/auth/token", headers=user.auth), 401)  # already revoked
    assert_problem(await http.delete("/auth/token"), 401)


async def test_sign_out_revokes_only_the_presented_token(http: httpx.AsyncClient) -> None:
    user = await make_user(http, password="correct horse")
    login = await http.post("/auth/login", json={"name": user.name, "password": "correct horse"})
    second = {"Authorization": f"Bearer {login.json()['token']}"}
    data = b"two tokens " * 20
    file = await upload(http, user, data)
    await cached(http, user, f"/files/{file['id']}/content", data)
    assert (await http.delete("/auth/token", headers=second)).status_code == 204
    assert_problem(await http.get(f"/files/{file['id']}/content", headers=second), 401)
    still = await http.get(f"/files/{file['id']}/content", headers=user.auth)
    assert still.status_code == 200 and still.content == data


async def test_a_token_deleted_by_another_process_ends_within_1s(http: httpx.AsyncClient,
                                                                  cache_server: Server) -> None:
    user = await make_user(http)
    data = b"elsewhere " * 50
    await upload(http, user, data, path="/a/elsewhere.bin")
    await cached(http, user, "/download?path=/a/elsewhere.bin", data)
    digest = hashlib.sha256(user.token.encode()).digest()
    assert await sql(cache_server, "DELETE FROM tokens WHERE token_hash = $1", digest) == "DELETE 1"
    await within_1s(lambda: http.get("/download?path=/a/elsewhere.bin", headers={**user.auth, **RANGE}), 401)


async def test_a_deleted_file_is_404_within_1s(http: httpx.AsyncClient) -> None:
    user = await make_user(http)
    data = b"deleted " * 50
    file = await upload(http, user, data)
    await cached(http, user, f"/files/{file['id']}/content", data)
    assert (await http.delete(f"/files/{file['id']}", headers=user.auth)).status_code == 204
    await within_1s(lambda: http.get(f"/files/{file['id']}/content", headers={**user.auth, **RANGE}), 404)


async def test_a_replaced_file_serves_the_new_bytes_within_1s(http: httpx.AsyncClient) -> None:
    user = await make_user(http)
    old, new = b"old content " * 20, b"new content!" * 20
    file = await upload(http, user, old, path="/r/file.bin")
    link = (await http.post(f"/files/{file['id']}/links", headers=user.auth)).json()["path"]
    await cached(http, user, "/download?path=/r/file.bin", old)
    await cached(http, user, f"/files/{file['id']}/content", old)
    for _ in range(2):
        assert (await http.get(link, headers=RANGE)).content == old[:100]
    replaced = await upload(http, user, new, path="/r/file.bin", replaces=True)
    assert replaced["id"] == file["id"]
    for target in ("/download?path=/r/file.bin", f"/files/{file['id']}/content"):
        await within_1s(lambda t=target: http.get(t, headers={**user.auth, **RANGE}), 206, new[:100])  # type: ignore[misc]
    answer = await http.get(f"/files/{file['id']}/content", headers=user.auth)
    assert answer.headers["etag"] == f'"{hashlib.sha256(new).hexdigest()}"' and answer.content == new
    await within_1s(lambda: http.get(link, headers=RANGE), 403)  # the link was for the old content


async def test_a_moved_file_is_found_at_its_new_path_only(http: httpx.AsyncClient, cache_server: Server) -> None:
    """A move by another connection (an UPDATE of files.path); then a new file at the old path."""
    user = await make_user(http)
    data, other = b"moving " * 30, b"the newcomer" * 30
    file = await upload(http, user, data, path="/m/before.bin")
    await cached(http, user, "/download?path=/m/before.bin", data)
    assert await sql(cache_server, "UPDATE files SET path = '/m/after.bin' WHERE id = $1",
                     uuid.UUID(file["id"])) == "UPDATE 1"
    await within_1s(lambda: http.get("/download?path=/m/before.bin", headers={**user.auth, **RANGE}), 404)
    moved = await http.get("/download?path=/m/after.bin", headers={**user.auth, **RANGE})
    assert moved.status_code == 206 and moved.content == data[:100]
    newcomer = await upload(http, user, other, path="/m/before.bin")
    assert newcomer["id"] != file["id"]
    answer = await http.get("/download?path=/m/before.bin", headers={**user.auth, **RANGE})
    assert answer.status_code == 206 and answer.content == other[:100]


async def test_another_users_cached_file_stays_404(http: httpx.AsyncClient) -> None:
    owner, stranger = await make_user(http), await make_user(http)
    data = b"private " * 40
    file = await upload(http, owner, data, path="/p/private.bin")
    await upload(http, stranger, b"mine", path="/p/mine.bin")
    await cached(http, owner, f"/files/{file['id']}/content", data)
    for _ in range(2):  # the stranger's token is cached too, from its own requests
        assert (await http.get("/download?path=/p/mine.bin", headers=stranger.auth)).status_code == 200
        assert_problem(await http.get(f"/files/{file['id']}/content", headers=stranger.auth), 404)
        assert_problem(await http.get("/download?path=/p/private.bin", headers=stranger.auth), 404)
        assert_problem(await http.get(f"/download?id={file['id']}", headers=stranger.auth), 404)


async def test_a_lost_listener_drops_the_cache(http: httpx.AsyncClient, cache_server: Server) -> None:
    """With the tokens trigger off, a revoke goes unheard: the cache keeps answering 200 (which
    shows the answers come from it). Terminating the listener's backend must end that at once:
    from then on, until the listener is back and has emptied the cache, lookups go to the database."""
    user = await make_user(http)
    data = b"listener " * 30
    file = await upload(http, user, data)
    target = f"/files/{file['id']}/content"
    await cached(http, user, target, data)
    digest = hashlib.sha256(user.token.encode()).digest()
    conn = await asyncpg.connect(cache_server.database_url)
    try:
        async with conn.transaction():
            await conn.execute("ALTER TABLE tokens DISABLE TRIGGER tokens_notify_change")
            await conn.execute("DELETE FROM tokens WHERE token_hash = $1", digest)
            await conn.execute("ALTER TABLE tokens ENABLE TRIGGER tokens_notify_change")
        await asyncio.sleep(0.3)
        stale = await http.get(target, headers={**user.auth, **RANGE})
        assert stale.status_code == 206, "the cache should still hold the unheard-of token"
        killed = await conn.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE application_name = 'mediad-cache' AND datname = current_database()")
        assert killed == 1
    finally:
        await conn.close()
    # The loss is seen when the socket closes, or at the latest 1 s after the last ping.
    await within_1s(lambda: http.get(target, headers={**user.auth, **RANGE}), 401)
    for _ in range(20):  # and it stays so, listener back or not
        assert_problem(await http.get(target, headers={**user.auth, **RANGE}), 401)
        await asyncio.sleep(0.05)


"""The download caches of two `mediad serve` nodes on one database: a change made through one
node, or by another connection, takes effect on the other within 1 s; and a PostgreSQL restart
never lets a node serve an answer it cached before.

Node B has a data dir of its own, so it serves A's files from the cloud copy (read-through),
from its cache once it has answered them once. The cache max age is 60 s: within a test only the
notifications (or the loss of the listener) can end a cached answer.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
import uuid
from collections.abc import Awaitable, Callable

import httpx
from conftest import assert_problem, make_user

from .conftest import CloudProcess, NodeFactory, Postgres, query, wait_drained

RANGE = {"Range": "bytes=0-99"}
SLOW_AGE = {"MEDIAD_CACHE_MAX_AGE_S": "60"}


async def within_1s(request: Callable[[], Awaitable[httpx.Response]], status: int,
                    body: bytes | None = None) -> None:
    """Until `request()` answers `status` (and `body`); fails if a request sent 1 s or more after
    the change still got the old answer."""
    started = time.monotonic()
    while True:
        sent = time.monotonic() - started
        response = await request()
        if response.status_code == status and (body is None or response.content == body):
            return
        assert sent < 1.0, f"still {response.status_code} {response.content[:40]!r} 1 s after the change"
        await asyncio.sleep(0.02)


async def _login(http: httpx.AsyncClient, name: str) -> dict[str, str]:
    answer = await http.post("/auth/login", json={"name": name, "password": "correct horse"})
    assert answer.status_code == 200, answer.text
    return {"Authorization": f"Bearer {answer.json()['token']}"}


async def _warm(http: httpx.AsyncClient, target: str, auth: dict[str, str], data: bytes) -> None:
    for _ in range(2):  # the first answer fills the cache, the second comes from it
        answer = await http.get(target, headers={**auth, **RANGE})
        assert answer.status_code == 206 and answer.content == data[:100], (answer.status_code, answer.text)


async def test_changes_through_one_node_reach_the_other_within_1s(
        nodes: NodeFactory, fault_database: str, cloud: CloudProcess) -> None:
    a = nodes("a", fault_database, cloud=cloud, **SLOW_AGE)
    b = nodes("b", fault_database, cloud=cloud, **SLOW_AGE)
    assert a.node_id() != b.node_id()
    async with a.client() as on_a, b.client() as on_b:
        user = await make_user(on_a, password="correct horse")
        signed_in = await _login(on_a, user.name)
        old, new = b"first content " * 10, b"second content" * 10
        kept = (await on_a.put("/files", params={"path": "/n/kept.bin"}, content=old, headers=user.auth)).json()
        gone = (await on_a.put("/files", params={"path": "/n/gone.bin"}, content=old, headers=user.auth)).json()
        moved = (await on_a.put("/files", params={"path": "/n/moved.bin"}, content=old, headers=user.auth)).json()
        await wait_drained(fault_database)  # B can read them through the cloud from now on
        for file in (kept, gone, moved):
            await _warm(on_b, f"/files/{file['id']}/content", user.auth, old)
        await _warm(on_b, "/download?path=/n/moved.bin", signed_in, old)

        # A token revoked on A.
        assert (await on_a.delete("/auth/token", headers=signed_in)).status_code == 204
        await within_1s(lambda: on_b.get("/download?path=/n/moved.bin", headers={**signed_in, **RANGE}), 401)

        # A file deleted on A.
        assert (await on_a.delete(f"/files/{gone['id']}", headers=user.auth)).status_code == 204
        await within_1s(lambda: on_b.get(f"/files/{gone['id']}/content", headers={**user.auth, **RANGE}), 404)

        # A file replaced on A: B has no copy of the new content until the cloud has it (503),
        # and never serves the old one again.
        replaced = await on_a.put("/files", params={"path": "/n/kept.bin"}, content=new, headers=user.auth)
        assert replaced.status_code == 200 and replaced.json()["id"] == kept["id"]
        target = f"/files/{kept['id']}/content"
        await within_1s(lambda: on_b.get(target, headers={**user.auth, **RANGE}), 503)
        await wait_drained(fault_database)
        answer = await on_b.get(target, headers=user.auth)
        assert answer.status_code == 200 and answer.content == new

        # A move by another connection (as another node's move route or psql would make it).
        await query(fault_database, "UPDATE files SET path = '/n/elsewhere.bin' WHERE id = $1",
                    uuid.UUID(moved["id"]))
        await within_1s(lambda: on_b.get("/download?path=/n/moved.bin", headers={**user.auth, **RANGE}), 404)
        answer = await on_b.get("/download?path=/n/elsewhere.bin", headers={**user.auth, **RANGE})
        assert answer.status_code == 206 and answer.content == old[:100]


async def test_a_database_restart_serves_nothing_cached_before_it(
        nodes: NodeFactory, own_postgres: Postgres, outage_database: str) -> None:
    """Stop and start PostgreSQL, then revoke the token at once, before the node's listener can
    be back: every answer from then on is 401 (or 503 while the pool reconnects), never 206."""
    a = nodes("a", outage_database, **SLOW_AGE)
    async with a.client(timeout=10) as http:
        user = await make_user(http)
        data = b"restart " * 20
        file = (await http.post("/files", params={"name": "r.bin"}, content=data, headers=user.auth)).json()
        target = f"/files/{file['id']}/content"
        await _warm(http, target, user.auth, data)
        await asyncio.to_thread(own_postgres.stop)
        await asyncio.to_thread(own_postgres.start)
        digest = hashlib.sha256(user.token.encode()).digest()
        await query(outage_database, "DELETE FROM tokens WHERE token_hash = $1", digest)
        statuses = []
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            answer = await http.get(target, headers={**user.auth, **RANGE})
            statuses.append(answer.status_code)
            assert answer.status_code in (401, 503), statuses
            if answer.status_code == 401:
                break
            await asyncio.sleep(0.05)
        assert statuses[-1] == 401, statuses
        assert_problem(await http.get(target, headers=user.auth), 401)

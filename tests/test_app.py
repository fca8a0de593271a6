"""Service endpoints and the error contract shared by every route."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import asyncpg
import httpx
from conftest import assert_problem, make_settings, make_user, serve_in_thread


async def test_health_answers_ok_when_the_database_does(client: httpx.AsyncClient) -> None:
    response = await client.get("/health")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


async def test_ping_all_reports_round_trips(client: httpx.AsyncClient) -> None:
    body = (await client.get("/ping/all")).json()
    assert body["db"] > 0 and body["storage"] > 0
    assert body["cloud"] is None and body["disk_pressure"] is False  # this server has no cloud
    assert set(body) == {"db", "storage", "cloud", "disk_pressure"}


async def test_unknown_route_is_problem_json(client: httpx.AsyncClient) -> None:
    body = assert_problem(await client.get("/no/such/route"), 404)
    assert "/no/such/route" in body["detail"]


async def test_wrong_method_is_problem_json_with_allow(client: httpx.AsyncClient) -> None:
    response = await client.delete("/health")
    assert_problem(response, 405)
    assert "GET" in response.headers["allow"]


async def test_every_response_carries_a_request_id(client: httpx.AsyncClient) -> None:
    mine = await client.get("/health", headers={"X-Request-ID": "abc-123"})
    assert mine.headers["x-request-id"] == "abc-123"
    generated = await client.get("/health", headers={"X-Request-ID": "bad id\twith tab"})
    assert generated.headers["x-request-id"] not in ("", "bad id\twith tab")


async def test_a_request_waiting_too_long_for_a_database_connection_gets_503(database_url: str,
                                                                              tmp_path: Path) -> None:
    """The pool is bounded and its waiters give up: with its only connection stuck behind a lock,
    the next request is 503 + Retry-After after the pool timeout, not queued without end."""
    settings = make_settings(tmp_path / "data", db_pool_size=1, db_pool_timeout_s=0.3)
    with serve_in_thread(settings, database_url) as server:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
            user = await make_user(http)
            locker = await asyncpg.connect(database_url)
            try:
                async with locker.transaction():
                    await locker.execute("LOCK TABLE tokens IN ACCESS EXCLUSIVE MODE")
                    stuck = asyncio.create_task(http.get("/files", headers=user.auth))
                    await asyncio.sleep(0.5)  # it holds the pool's one connection, waiting on the lock
                    started = time.monotonic()
                    waiting = await http.get("/files", headers=user.auth)
                    waited = time.monotonic() - started
                    assert not stuck.done()
            finally:
                await locker.close()
            assert (await stuck).status_code == 200  # the lock is gone: the first one completes
    assert_problem(waiting, 503)
    assert waiting.headers["retry-after"]
    assert 0.3 <= waited < 3

"""Service endpoints and the error contract shared by every route."""

from __future__ import annotations

import httpx
from conftest import assert_problem


async def test_health_answers_ok_when_the_database_does(client: httpx.AsyncClient) -> None:
    response = await client.get("/health")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


async def test_ping_all_reports_round_trips(client: httpx.AsyncClient) -> None:
    body = (await client.get("/ping/all")).json()
    assert body["db"] > 0 and body["storage"] > 0
    assert "cloud" in body


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

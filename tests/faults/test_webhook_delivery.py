"""Webhook delivery under faults, with `mediad serve` subprocesses and a real receiver: a kill -9
between commit and delivery, endpoints that hang or answer without end, two nodes on one database."""

from __future__ import annotations

import asyncio
import os
import statistics
import time
from typing import Any

import httpx
from conftest import (
    Receiver,
    User,
    arrived,
    make_user,
    register,
)

from .conftest import NodeFactory, query, wait_until

HOOKS = {"MEDIAD_WEBHOOK_ALLOW_PRIVATE": "true", "MEDIAD_WEBHOOK_POLL_S": "0.5"}
GiB = 1024**3
CREATED = ["file.created"]  # a node replicates to its own mock cloud: no file.stored in the counts


async def _deliveries(database_url: str) -> list[dict[str, Any]]:
    rows = await query(database_url, "SELECT d.*, e.url FROM webhook_deliveries d "
                                     "JOIN webhook_endpoints e ON e.id = d.endpoint_id ORDER BY d.created_at")
    return [dict(row) for row in rows]


async def test_an_event_committed_before_a_kill_is_delivered_after_the_restart(
        nodes: NodeFactory, fault_database: str, receiver: Receiver) -> None:
    node = nodes("a", fault_database, **HOOKS)
    async with node.client() as http:
        user = await make_user(http)
        await register(http, user, receiver, events=CREATED)
        receiver.stop()  # so that nothing is delivered before the kill
        uploaded = await http.post("/files?name=kept.bin", content=b"committed", headers=user.auth)
        assert uploaded.status_code == 201, uploaded.text

    async def attempted() -> bool:
        return any(d["attempts"] >= 1 for d in await _deliveries(fault_database))
    await wait_until(attempted, 10, "a first (refused) attempt")
    node.kill()
    [pending] = await _deliveries(fault_database)
    assert pending["status"] == "retrying" and pending["delivered_at"] is None

    receiver.start()
    node.start()
    await arrived(receiver, 1, "the event, after the restart", timeout=30)
    [got] = receiver.received
    assert got.verified and got.headers["webhook-id"] == str(pending["event_id"])
    assert got.event["type"] == "file.created" and got.event["data"]["file"] == uploaded.json()
    await wait_until(lambda: _all_delivered(fault_database), 5, "the delivery recorded")


async def _all_delivered(database_url: str) -> bool:
    rows = await _deliveries(database_url)
    return bool(rows) and all(d["status"] == "delivered" for d in rows)


async def _timed_uploads(http: httpx.AsyncClient, user: User, count: int, size: int) -> list[float]:
    took = []
    for n in range(count):
        started = time.perf_counter()
        response = await http.post(f"/files?name=u{n}.bin", content=os.urandom(size), headers=user.auth)
        assert response.status_code == 201, response.text
        took.append(time.perf_counter() - started)
    return took


async def test_a_hanging_or_endless_endpoint_holds_neither_uploads_nor_other_users(
        nodes: NodeFactory, fault_database: str, receiver: Receiver) -> None:
    """An endpoint that answers after 30 s is cut off at 10 s; one that streams a 1 GiB answer is
    read for at most 64 KiB; meanwhile uploads keep their speed and another user's endpoint gets
    its events at once."""
    node = nodes("a", fault_database, **HOOKS)
    receiver.delay_s["/slow"] = 30
    receiver.status["/huge"], receiver.huge_bytes["/huge"] = 500, GiB
    async with node.client() as http:
        slow, huge, fast = await make_user(http), await make_user(http), await make_user(http)
        await register(http, slow, receiver, "/slow", events=CREATED)
        await register(http, huge, receiver, "/huge", events=CREATED)
        await register(http, fast, receiver, "/fast", events=CREATED)
        baseline = await _timed_uploads(http, fast, 10, 256 * 1024)
        await arrived(receiver, 10, "the fast user's first events")
        started = time.monotonic()
        loaded = await asyncio.gather(_timed_uploads(http, slow, 10, 256 * 1024),
                                      _timed_uploads(http, huge, 10, 256 * 1024))
        during = await _timed_uploads(http, fast, 10, 256 * 1024)

        async def fast_arrived() -> bool:
            return len(receiver.events("/fast")) == 20
        waited = await wait_until(fast_arrived, 5, "the fast user's events while the others hang", interval=0.05)

        async def huge_failed() -> bool:
            rows = [d for d in await _deliveries(fault_database) if d["url"].endswith("/huge")]
            return len(rows) == 10 and all(d["attempts"] >= 1 for d in rows)
        await wait_until(huge_failed, 9, "the endless answers to be cut off")
        huge_done = time.monotonic() - started

        async def slow_timed_out() -> bool:
            rows = [d for d in await _deliveries(fault_database) if d["url"].endswith("/slow")]
            return sum(d["attempts"] for d in rows) >= 8
        await wait_until(slow_timed_out, 20, "the first hanging attempts to time out")

    typical = statistics.median(baseline)
    for took in (*loaded, during):
        assert statistics.median(took) <= 2 * typical + 0.05, (typical, took)
    assert waited < 5
    assert huge_done < 9  # well before the 10 s bound: mediad stopped reading after 64 KiB
    rows = await _deliveries(fault_database)
    huge_rows = [d for d in rows if d["url"].endswith("/huge")]
    assert {(d["status"], d["last_status_code"]) for d in huge_rows} == {("retrying", 500)}
    assert all(d["last_error"] == "the endpoint answered 500: " + "x" * 200 for d in huge_rows)
    slow_rows = [d for d in rows if d["url"].endswith("/slow") and d["attempts"]]
    assert slow_rows and {(d["status"], d["last_error"]) for d in slow_rows} == {("retrying", "no answer within 10 s")}
    # At most 8 attempts at a time per endpoint: the other two waited for a slot until the first
    # ones were cut off.
    slow_arrivals = [r.at for r in receiver.received if r.path == "/slow"]
    assert len([at for at in slow_arrivals if at - slow_arrivals[0] < 9]) == 8


async def test_two_nodes_on_one_database_deliver_each_event_once(
        nodes: NodeFactory, fault_database: str, receiver: Receiver) -> None:
    env = {**HOOKS, "MEDIAD_SECRET_KEY": "a shared key for both nodes, 32+ chars"}
    a, b = nodes("a", fault_database, **env), nodes("b", fault_database, **env)
    async with a.client() as on_a, b.client() as on_b:
        user = await make_user(on_a)
        await register(on_b, user, receiver, events=CREATED)

        async def put(n: int) -> str:
            http = on_a if n % 2 else on_b
            response = await http.post(f"/files?name=n{n}.bin", content=os.urandom(1000 + n), headers=user.auth)
            assert response.status_code == 201, response.text
            return str(response.json()["id"])

        ids = await asyncio.gather(*(put(n) for n in range(40)))
        await arrived(receiver, 40, "40 events")
        await asyncio.sleep(1.5)  # a second delivery of any of them would arrive by now
    assert len(receiver.received) == 40 and all(r.verified for r in receiver.received)
    assert len({r.headers["webhook-id"] for r in receiver.received}) == 40
    assert sorted(e["data"]["file"]["id"] for e in receiver.events()) == sorted(ids)
    rows = await _deliveries(fault_database)
    assert {(d["status"], d["attempts"]) for d in rows} == {("delivered", 1)} and len(rows) == 40

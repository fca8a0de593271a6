"""PostgreSQL taken away under load: clear 503s while it is gone, service again without a restart.

These tests stop their own embedded PostgreSQL (`own_postgres`), never the shared test server.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import httpx
from conftest import User, make_user

from .conftest import Acked, CloudProcess, NodeFactory, Postgres, acked, assert_invariants, trickle, wait_drained

OUTAGE_S = 10.0


@dataclass
class Outcome:
    kind: str
    at: float  # monotonic time the request was sent
    took: float
    status: int | None  # None: no answer (a transport error)
    problem: bool = False  # application/problem+json
    retry_after: str | None = None
    tus_resumable: str | None = None
    error: str | None = None


async def _load(kind: str, send: Callable[[], Awaitable[httpx.Response]], outcomes: list[Outcome],
                stop: asyncio.Event, pause: float) -> None:
    while not stop.is_set():
        at = time.monotonic()
        try:
            response = await send()
        except httpx.TransportError as exc:
            outcomes.append(Outcome(kind, at, time.monotonic() - at, None, error=repr(exc)))
        else:
            outcomes.append(Outcome(kind, at, time.monotonic() - at, response.status_code,
                                    response.headers.get("content-type", "").startswith("application/problem+json"),
                                    response.headers.get("retry-after"), response.headers.get("tus-resumable")))
        await asyncio.sleep(pause)


async def test_postgres_stopped_for_10_s_under_load(nodes: NodeFactory, own_postgres: Postgres,
                                                   outage_database: str, cloud: CloudProcess,
                                                   started: float) -> None:
    """While PostgreSQL is down, /health and the API answer 503 problem+json with Retry-After, within
    seconds, never 500; uploads caught by it fail and leave nothing; 5 s after it is back, mediad
    serves again, with no restart."""
    node = nodes("a", outage_database, cloud=cloud)
    done: list[Acked] = []
    async with node.client(timeout=15) as http:
        user = await make_user(http)
        sample = os.urandom(300_000)
        first = await http.post("/files?name=sample.bin", content=sample, headers=user.auth)
        done.append(acked(first, sample, user.auth))
        bodies: dict[str, bytes] = {}

        async def upload() -> httpx.Response:
            data = os.urandom(256 * 1024)
            response = await http.post("/files?name=load.bin", content=trickle(data, 64 * 1024, 0.05),
                                       headers={**user.auth, "Content-Length": str(len(data))})
            if response.status_code == 201:
                bodies[response.json()["id"]] = data
            return response

        async def download() -> httpx.Response:
            response = await http.get(f"/files/{done[0].file_id}/content", headers=user.auth)
            if response.status_code == 200:
                assert hashlib.sha256(response.content).hexdigest() == done[0].sha256
            return response

        load: dict[str, Callable[[], Awaitable[httpx.Response]]] = {
            "health": lambda: http.get("/health"),
            "upload": upload,
            "download": download,
            "list": lambda: http.get("/files", headers=user.auth),
            "tus": lambda: http.post("/uploads", headers={**user.auth, "Tus-Resumable": "1.0.0",
                                                          "Upload-Length": "10",
                                                          "Upload-Metadata": "filename YS5iaW4="}),
        }
        outcomes: list[Outcome] = []
        stop = asyncio.Event()
        tasks = [asyncio.create_task(_load(kind, send, outcomes, stop, 0.05)) for kind, send in load.items()]
        tasks += [asyncio.create_task(_load("upload", upload, outcomes, stop, 0.05)) for _ in range(3)]

        await asyncio.sleep(1.0)
        await asyncio.to_thread(own_postgres.stop)
        down_at = time.monotonic()
        await asyncio.sleep(OUTAGE_S)
        await asyncio.to_thread(own_postgres.start)
        back_at = time.monotonic()
        recovered = await _recovered(http, user, done[0])
        stop.set()
        await asyncio.gather(*tasks)

    during = [o for o in outcomes if down_at + 0.5 < o.at < back_at]
    assert {o.kind for o in during if o.status == 503} == set(load), "every kind of request saw the outage"
    for o in outcomes:
        assert o.took < OUTAGE_S, f"{o.kind} took {o.took:.1f} s"
        assert o.status is not None and o.status != 500, o
        if o.status >= 400:
            assert o.status == 503 and o.problem and o.retry_after, o
        if o.kind == "tus":  # a tus client reads every answer, a 503 too, by its Tus-Resumable
            assert o.tus_resumable == "1.0.0", o
    assert recovered - back_at < 5, f"serving again {recovered - back_at:.1f} s after PostgreSQL came back"

    done += [Acked(file_id, hashlib.sha256(data).hexdigest(), len(data), user.auth) for file_id, data in bodies.items()]
    await wait_drained(outage_database)
    await assert_invariants(outage_database, [node], started=started, acked=done, cloud=cloud)


async def _recovered(http: httpx.AsyncClient, user: User, sample: Acked) -> float:
    """The monotonic time at which health, an upload and a download all succeed again."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            health = await http.get("/health")
            upload = await http.post("/files?name=after.bin", content=b"back", headers=user.auth)
            download = await http.get(f"/files/{sample.file_id}/content", headers=user.auth)
        except httpx.TransportError:
            pass
        else:
            if (health.status_code, upload.status_code, download.status_code) == (200, 201, 200):
                return time.monotonic()
        await asyncio.sleep(0.1)
    raise AssertionError("mediad did not recover within 30 s of PostgreSQL's return")


async def test_postgres_hung_for_a_few_seconds(nodes: NodeFactory, own_postgres: Postgres, outage_database: str,
                                               cloud: CloudProcess, started: float) -> None:
    """SIGSTOP rather than stop: connections are neither refused nor answered. /health answers 503
    within its 3 s budget; other requests wait for the database and then succeed or answer 503;
    none gets a 500, none waits 10 s; afterwards everything works, with no restart."""
    node = nodes("a", outage_database, cloud=cloud)
    async with node.client(timeout=15) as http:
        user = await make_user(http)
        sample = os.urandom(100_000)
        done = [acked(await http.post("/files?name=sample.bin", content=sample, headers=user.auth), sample,
                      user.auth)]
        bodies: dict[str, bytes] = {}

        async def upload() -> httpx.Response:
            data = os.urandom(64 * 1024)
            response = await http.post("/files?name=stall.bin", content=data, headers=user.auth)
            if response.status_code == 201:
                bodies[response.json()["id"]] = data
            return response

        load: dict[str, Callable[[], Awaitable[httpx.Response]]] = {
            "health": lambda: http.get("/health"),
            "upload": upload,
            "download": lambda: http.get(f"/files/{done[0].file_id}/content", headers=user.auth),
        }
        outcomes: list[Outcome] = []
        stop = asyncio.Event()
        tasks = [asyncio.create_task(_load(kind, send, outcomes, stop, 0.1)) for kind, send in load.items()]
        await asyncio.sleep(0.5)
        own_postgres.pause()
        paused_at = time.monotonic()
        await asyncio.sleep(4)
        own_postgres.resume()
        back_at = time.monotonic()
        recovered = await _recovered(http, user, done[0])
        stop.set()
        await asyncio.gather(*tasks)

    stalled_health = [o for o in outcomes if o.kind == "health" and paused_at < o.at and o.at + o.took < back_at]
    assert stalled_health and all(o.status == 503 and o.took < 3.5 for o in stalled_health), stalled_health
    for o in outcomes:
        assert o.took < OUTAGE_S, f"{o.kind} took {o.took:.1f} s"
        assert o.status in (200, 201, 503), o
        if o.status == 503:
            assert o.problem and o.retry_after, o
    assert recovered - back_at < 5
    done += [Acked(file_id, hashlib.sha256(data).hexdigest(), len(data), user.auth) for file_id, data in bodies.items()]
    await wait_drained(outage_database)
    await assert_invariants(outage_database, [node], started=started, acked=done, cloud=cloud)

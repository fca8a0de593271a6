"""Token lifetimes: MEDIAD_TOKEN_TTL_S from creation, MEDIAD_TOKEN_IDLE_S since the last use.

An expired token is a 401 like an unknown one on every route: the routes' token check and the
download fast path (token and file in one query) apply the same rule, auth.token_expired.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import httpx
import pytest
from conftest import Server, User, assert_problem, make_settings, make_user, serve_in_thread, upload

from mediad.auth import token_expired, token_expires_at, touch_due, touch_interval_s
from mediad.config import Settings

T0 = datetime(2026, 12, 1, 10, 0, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


@pytest.mark.parametrize(("ttl", "idle", "last_used", "expires"), [
    (None, None, None, None),
    (None, None, 50, None),
    (3600, None, None, 3600),
    (3600, None, 3000, 3600),  # use does not extend a TTL
    (None, 600, None, 600),  # never used: idle since creation
    (None, 600, 1000, 1600),
    (3600, 600, 3500, 3600),  # whichever comes first
    (3600, 600, 100, 700),
])
def test_expires_at(ttl: float | None, idle: float | None, last_used: float | None, expires: float | None) -> None:
    settings = Settings(token_ttl_s=ttl, token_idle_s=idle)
    last = None if last_used is None else at(last_used)
    assert token_expires_at(T0, last, settings) == (None if expires is None else at(expires))
    if expires is not None:
        assert not token_expired(T0, last, at(expires - 0.001), settings)
        assert token_expired(T0, last, at(expires), settings)
    else:
        assert not token_expired(T0, last, at(10**9), settings)


def test_last_use_is_recorded_often_enough_for_the_idle_window() -> None:
    assert touch_interval_s(Settings()) == 60
    assert touch_interval_s(Settings(token_idle_s=86400)) == 60
    assert touch_interval_s(Settings(token_idle_s=300)) == 30
    settings = Settings(token_idle_s=300)
    assert touch_due(None, T0, settings)
    assert not touch_due(at(0), at(29.9), settings)
    assert touch_due(at(0), at(30), settings)


@pytest.fixture
def short_lived(database_url: str, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Server]:
    settings = make_settings(tmp_path / "data", **request.param)
    with serve_in_thread(settings, database_url) as running:
        yield running


async def _routes_answer(http: httpx.AsyncClient, user: User, file: dict[str, object]) -> list[int]:
    """Status of a listing, a range download by id and a download by path."""
    ranged = {**user.auth, "Range": "bytes=2-5"}
    return [(await http.get("/files", headers=user.auth)).status_code,
            (await http.get(f"/files/{file['id']}/content", headers=ranged)).status_code,
            (await http.get("/download", params={"path": file["path"]}, headers=ranged)).status_code]


async def _all_refused(http: httpx.AsyncClient, user: User, file: dict[str, object]) -> None:
    ranged = {**user.auth, "Range": "bytes=2-5"}
    for response in (await http.get("/files", headers=user.auth),
                     await http.get(f"/files/{file['id']}/content", headers=ranged),
                     await http.head(f"/files/{file['id']}/content", headers=ranged),
                     await http.get("/download", params={"path": file["path"]}, headers=ranged),
                     await http.get("/usage", headers=user.auth),
                     await http.delete("/auth/token", headers=user.auth)):  # not even a sign-out
        assert response.status_code == 401, (response.request.url, response.status_code)
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert assert_problem(await http.get("/files", headers=user.auth), 401)["detail"] == "unknown or expired token"


@pytest.mark.parametrize("short_lived", [{"token_ttl_s": 2.0}], indirect=True)
async def test_a_token_past_its_ttl_is_refused_everywhere(short_lived: Server) -> None:
    async with httpx.AsyncClient(base_url=short_lived.url, timeout=30) as http:
        started = time.monotonic()
        user = await make_user(http)
        file = await upload(http, user, b"0123456789", path="/ttl/a.bin")
        # Used, and so cached by whatever caches tokens, right up to the end of its life.
        while time.monotonic() - started < 1.0:
            assert await _routes_answer(http, user, file) == [200, 206, 206]
        await asyncio.sleep(max(0.0, 2.2 - (time.monotonic() - started)))
        await _all_refused(http, user, file)


@pytest.mark.parametrize("short_lived", [{"token_idle_s": 1.5}], indirect=True)
async def test_a_token_left_idle_is_refused_and_use_keeps_it_alive(short_lived: Server, database_url: str) -> None:
    async with httpx.AsyncClient(base_url=short_lived.url, timeout=30) as http:
        user = await make_user(http)
        file = await upload(http, user, b"0123456789", path="/idle/a.bin")
        started = time.monotonic()
        while time.monotonic() - started < 3.0:  # twice the idle window, in use all along
            assert await _routes_answer(http, user, file) == [200, 206, 206]
            await asyncio.sleep(0.4)
        # The last use was recorded, within the touch interval (0.15 s here) of the truth.
        conn = await asyncpg.connect(database_url)
        try:
            row = await conn.fetchrow("SELECT created_at, last_used_at, now() AS now FROM tokens "
                                      "WHERE user_id = $1", uuid.UUID(user.id))
        finally:
            await conn.close()
        assert row["last_used_at"] is not None
        assert (row["now"] - row["last_used_at"]).total_seconds() < 0.4 + 0.15 + 0.5
        await asyncio.sleep(1.8)
        await _all_refused(http, user, file)


@pytest.mark.parametrize("short_lived", [{"token_ttl_s": 1.0}], indirect=True)
async def test_a_new_sign_in_gets_a_fresh_lifetime(short_lived: Server) -> None:
    async with httpx.AsyncClient(base_url=short_lived.url, timeout=30) as http:
        user = await make_user(http, password="correct horse battery")
        await asyncio.sleep(1.2)
        assert_problem(await http.get("/files", headers=user.auth), 401)
        response = await http.post("/auth/login", json={"name": user.name, "password": "correct horse battery"})
        fresh = replace(user, token=response.json()["token"])
        assert (await http.get("/files", headers=fresh.auth)).status_code == 200

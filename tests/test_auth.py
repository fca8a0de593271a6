"""Users, login and bearer tokens over HTTP."""

from __future__ import annotations

import hashlib
import json

import asyncpg
import httpx
import pytest
from conftest import Server, assert_problem, make_user


async def test_create_user_returns_id_and_token(client: httpx.AsyncClient) -> None:
    response = await client.post("/users", json={"name": "alice"})
    assert response.status_code == 201
    body = response.json()
    assert set(body) == {"id", "name", "token"}
    assert body["name"] == "alice"
    assert len(body["token"]) >= 22  # ≥ 128 bits in url-safe base64
    usage = await client.get("/usage", headers={"Authorization": f"Bearer {body['token']}"})
    assert usage.status_code == 200


async def test_only_a_hash_of_the_token_is_stored(client: httpx.AsyncClient, server: Server) -> None:
    user = await make_user(client, password="correct horse")
    conn = await asyncpg.connect(server.database_url)
    try:
        stored = await conn.fetch("SELECT token_hash FROM tokens")
        password_hash = await conn.fetchval("SELECT password_hash FROM users WHERE name = $1", user.name)
    finally:
        await conn.close()
    assert [bytes(r["token_hash"]) for r in stored] == [hashlib.sha256(user.token.encode()).digest()]
    assert password_hash.startswith("scrypt$") and "correct horse" not in password_hash


async def test_names_are_unique_case_insensitively(client: httpx.AsyncClient) -> None:
    await make_user(client, "Дмитрий")
    assert_problem(await client.post("/users", json={"name": "дмитрий"}), 409)
    assert_problem(await client.post("/users", json={"name": "ДМИТРИЙ"}), 409)


@pytest.mark.parametrize("body", [
    {}, {"name": ""}, {"name": "x" * 65}, {"name": "bad\nname"}, {"name": "nul\x00"}, {"name": 42},
    {"name": "   "}, {"name": "bob", "password": "short"}, {"name": "bob", "password": 12345678},
])
async def test_invalid_fields_are_422(client: httpx.AsyncClient, body: dict) -> None:
    body = assert_problem(await client.post("/users", json=body), 422)
    assert "name" in body["detail"] or "password" in body["detail"]


@pytest.mark.parametrize("raw", [b"{", b"not json", b"\xff\xfe"])
async def test_malformed_json_is_400(client: httpx.AsyncClient, raw: bytes) -> None:
    assert_problem(await client.post("/users", content=raw, headers={"content-type": "application/json"}), 400)


async def test_json_that_is_not_an_object_is_422(client: httpx.AsyncClient) -> None:
    assert_problem(await client.post("/users", json=["alice"]), 422)


async def test_login_issues_a_working_token(client: httpx.AsyncClient) -> None:
    await make_user(client, "carol", password="s3cret-pass")
    response = await client.post("/auth/login", json={"name": "CAROL", "password": "s3cret-pass"})
    assert response.status_code == 200
    body = response.json()
    assert body["token_type"] == "bearer"
    usage = await client.get("/usage", headers={"Authorization": f"Bearer {body['token']}"})
    assert usage.json() == {"files": 0, "bytes": 0, "quota": None}


async def test_wrong_password_and_unknown_user_answer_alike(client: httpx.AsyncClient) -> None:
    await make_user(client, "dave", password="right-password")
    wrong = assert_problem(await client.post("/auth/login", json={"name": "dave", "password": "nope-nope"}), 401)
    unknown = assert_problem(await client.post("/auth/login", json={"name": "nobody", "password": "x" * 9}), 401)
    assert wrong == unknown


async def test_user_without_password_cannot_log_in(client: httpx.AsyncClient) -> None:
    await make_user(client, "erin")
    assert_problem(await client.post("/auth/login", json={"name": "erin", "password": "anything-at-all"}), 401)


@pytest.mark.parametrize("header", [None, "Bearer", "Basic abc", "Bearer not-a-real-token", "token"])
async def test_missing_malformed_or_unknown_token_is_401(client: httpx.AsyncClient, header: str | None) -> None:
    headers = {"Authorization": header} if header is not None else {}
    response = await client.get("/usage", headers=headers)
    assert_problem(response, 401)
    assert response.headers["www-authenticate"].startswith("Bearer")


async def test_login_with_a_name_no_user_can_have_is_wrong_credentials(client: httpx.AsyncClient) -> None:
    # Found by tests/test_schema_fuzz.py: NUL reached PostgreSQL, which cannot store it in text (500).
    for name in ("alice\x00", "\ud800bob", "", "x" * 65):
        response = await client.post("/auth/login", content=_json_with_escapes({"name": name, "password": "secret-pw"}),
                                     headers={"Content-Type": "application/json"})
        assert_problem(response, 401)


async def test_a_password_that_is_not_unicode_text_is_invalid(client: httpx.AsyncClient) -> None:
    # A lone surrogate (legal in JSON, not in UTF-8) cannot be hashed: 422, not 500.
    response = await client.post("/users", content=_json_with_escapes({"name": "carol", "password": "ab\ud800cdefgh"}),
                                 headers={"Content-Type": "application/json"})
    assert_problem(response, 422)


def _json_with_escapes(body: dict[str, str]) -> bytes:
    """JSON with every non-ASCII character escaped, so lone surrogates go over the wire as `\\udxxx`."""
    return json.dumps(body, ensure_ascii=True).encode("ascii")

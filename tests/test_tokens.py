"""Tokens and accounts: named tokens, listing, revocation, the account itself and its deletion."""

from __future__ import annotations

import uuid

import asyncpg
import httpx
from conftest import (
    MockCloud,
    Server,
    User,
    assert_problem,
    blob_id,
    make_user,
    stored,
    upload,
    wait_for,
)

from mediad.cloud import cloud_key


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def test_named_tokens_are_listed_and_one_revoked_stops_working_alone(client: httpx.AsyncClient) -> None:
    await make_user(client, "tina", password="tina-password")
    phone = (await client.post("/auth/login", json={"name": "tina", "password": "tina-password",
                                                     "token_name": "phone"})).json()
    assert phone["token_type"] == "bearer" and uuid.UUID(phone["id"])
    laptop = await client.post("/auth/tokens", headers=bearer(phone["token"]), json={"name": "laptop"})
    assert laptop.status_code == 201
    laptop_body = laptop.json()
    assert set(laptop_body) == {"id", "name", "token"} and laptop_body["name"] == "laptop"

    listed = await client.get("/auth/tokens", headers=bearer(laptop_body["token"]))
    assert listed.status_code == 200
    tokens = listed.json()["tokens"]
    assert [(t["name"], t["current"]) for t in tokens] == [("signup", False), ("phone", False), ("laptop", True)]
    assert {t["id"] for t in tokens[1:]} == {phone["id"], laptop_body["id"]}
    for entry in tokens:
        assert set(entry) == {"id", "name", "created_at", "last_used_at", "current", "expires_at"}
        assert entry["created_at"].endswith("Z")
    assert phone["token"] not in listed.text and laptop_body["token"] not in listed.text

    revoked = await client.delete(f"/auth/tokens/{phone['id']}", headers=bearer(laptop_body["token"]))
    assert revoked.status_code == 204
    assert_problem(await client.get("/usage", headers=bearer(phone["token"])), 401)
    assert_problem(await client.get(f"/files/{uuid.uuid4()}/content", headers=bearer(phone["token"])), 401)
    assert (await client.get("/usage", headers=bearer(laptop_body["token"]))).status_code == 200
    again = await client.get("/auth/tokens", headers=bearer(laptop_body["token"]))
    assert [t["name"] for t in again.json()["tokens"]] == ["signup", "laptop"]


async def test_login_names_its_token_login_by_default_and_checks_the_name(client: httpx.AsyncClient) -> None:
    await make_user(client, "uma", password="uma-password")
    login = (await client.post("/auth/login", json={"name": "uma", "password": "uma-password"})).json()
    names = [t["name"] for t in (await client.get("/auth/tokens", headers=bearer(login["token"]))).json()["tokens"]]
    assert names == ["signup", "login"]
    for bad in ("", "x" * 65, "tab\there", 7):
        body = assert_problem(await client.post("/auth/login", json={"name": "uma", "password": "uma-password",
                                                                     "token_name": bad}), 422)
        assert "token_name" in body["detail"]
    assert "name is required" in assert_problem(
        await client.post("/auth/tokens", headers=bearer(login["token"]), json={}), 422)["detail"]


async def test_another_users_token_is_not_found(client: httpx.AsyncClient) -> None:
    alice, bob = await make_user(client), await make_user(client)
    bobs = (await client.get("/auth/tokens", headers=bob.auth)).json()["tokens"][0]["id"]
    assert_problem(await client.delete(f"/auth/tokens/{bobs}", headers=alice.auth), 404)
    assert_problem(await client.delete(f"/auth/tokens/{uuid.uuid4()}", headers=alice.auth), 404)
    assert_problem(await client.delete("/auth/tokens/not-a-uuid", headers=alice.auth), 404)
    assert (await client.get("/usage", headers=bob.auth)).status_code == 200


async def test_users_me_shows_the_account_and_its_usage(client: httpx.AsyncClient) -> None:
    user = await make_user(client, "vera")
    await upload(client, user, b"12345", name="a.txt")
    await upload(client, user, b"678", name="b.txt")
    response = await client.get("/users/me", headers=user.auth)
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json; charset=utf-8"
    body = response.json()
    assert body == {"id": user.id, "name": "vera", "created_at": body["created_at"], "quota": None,
                    "usage": {"files": 2, "bytes": 8}}
    assert body["created_at"].endswith("Z")
    assert_problem(await client.get("/users/me"), 401)


async def test_last_used_at_is_recorded_once_per_interval(client: httpx.AsyncClient, user: User) -> None:
    """Never a write per request: a token's use is recorded when the recorded one is older than the
    touch interval (a minute without idle expiry), so GET /auth/tokens may lag by that much."""
    first = (await client.get("/auth/tokens", headers=user.auth)).json()["tokens"][0]
    assert first["last_used_at"] is not None  # this request was the token's first recorded use
    assert first["last_used_at"] >= first["created_at"]
    for _ in range(5):
        assert (await client.get("/usage", headers=user.auth)).status_code == 200
    again = (await client.get("/auth/tokens", headers=user.auth)).json()["tokens"][0]
    assert again["last_used_at"] == first["last_used_at"]
    assert again["expires_at"] is None  # the shared server sets no token lifetime


async def test_deleting_an_account_with_a_password_needs_it(cloud_server: Server, mock_cloud: MockCloud) -> None:
    async with httpx.AsyncClient(base_url=cloud_server.url, timeout=30) as http:
        user = await make_user(http, "wanda", password="wanda-password")
        second = (await http.post("/auth/tokens", headers=user.auth, json={"name": "second"})).json()
        files = [await upload(http, user, f"content {n}".encode(), name=f"{n}.txt") for n in range(3)]
        for file in files:
            await wait_for(lambda f=file: stored(http, user.auth, f["id"]), what="stored in the cloud")
        keys = [cloud_key(await blob_id(cloud_server.database_url, f["id"])) for f in files]
        assert len(cloud_server.blob_files()) == 3

        assert_problem(await http.delete("/users/me", headers=user.auth), 403)
        assert_problem(await http.request("DELETE", "/users/me", headers=user.auth,
                                          json={"password": "not-the-password"}), 403)
        assert (await http.get("/users/me", headers=user.auth)).json()["usage"]["files"] == 3
        assert len(cloud_server.blob_files()) == 3

        deleted = await http.request("DELETE", "/users/me", headers=user.auth, json={"password": "wanda-password"})
        assert deleted.status_code == 204
        assert cloud_server.blob_files() == []  # local bytes at once
        for token in (user.token, second["token"]):
            assert_problem(await http.get("/usage", headers=bearer(token)), 401)
        assert_problem(await http.post("/auth/login", json={"name": "wanda", "password": "wanda-password"}), 401)

        async def cloud_copies_gone() -> bool:
            return [(await mock_cloud.object(key)).status_code for key in keys] == [404] * len(keys)

        await wait_for(cloud_copies_gone, what="the cloud copies deleted")
    conn = await asyncpg.connect(cloud_server.database_url)
    try:
        counts = await conn.fetchrow("SELECT (SELECT count(*) FROM users) AS users, (SELECT count(*) FROM tokens) "
                                     "AS tokens, (SELECT count(*) FROM files) AS files")
    finally:
        await conn.close()
    assert dict(counts) == {"users": 0, "tokens": 0, "files": 0}


async def test_an_account_without_a_password_is_deleted_without_one(client: httpx.AsyncClient,
                                                                   server: Server) -> None:
    user = await make_user(client)
    other = await make_user(client)
    await upload(client, user, b"mine", name="mine.txt")
    kept = await upload(client, other, b"theirs", name="theirs.txt")
    assert (await client.delete("/users/me", headers=user.auth)).status_code == 204
    assert_problem(await client.get("/users/me", headers=user.auth), 401)
    assert len(server.blob_files()) == 1
    assert (await client.get(f"/files/{kept['id']}/content", headers=other.auth)).content == b"theirs"

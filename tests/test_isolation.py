"""Users are isolated: another user's id, on every route that takes one, is 404 problem+json (never
403, never data) and changes nothing. The routes come from the app's own routing table, so a route
added later is tested here without anyone remembering to."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import struct
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from conftest import Server, User, assert_problem, make_settings, make_user, upload
from starlette.routing import Route

from mediad.app import create_app

TUS = {"Tus-Resumable": "1.0.0"}  # harmless on the other routes, required on the tus ones
OFFSET_STREAM = "application/offset+octet-stream"


# ---- what A owns, and how to look at it ---------------------------------------------------------

State = Callable[[], Awaitable[Any]]  # what the owner sees of a resource, to compare before and after


# A 1×1 GIF, so every file route (its thumbnail too) has something to answer the owner with.
_PICTURE = bytes.fromhex("474946383761010001008000000000000000002c000000000100010000080400010404003b")


async def _a_file(http: httpx.AsyncClient, owner: User) -> tuple[str, State]:
    file = await upload(http, owner, _PICTURE + b"A's secret bytes", path=f"/private/{uuid.uuid4().hex}.gif")
    for _ in range(400):  # probed before comparing: its media turns from null to known once
        if (await http.get(f"/files/{file['id']}", headers=owner.auth)).json()["media"] is not None:
            break
        await asyncio.sleep(0.05)

    async def state() -> Any:
        shown = await http.get(f"/files/{file['id']}", headers=owner.auth)
        content = await http.get(f"/files/{file['id']}/content", headers=owner.auth)
        return shown.status_code, shown.json(), content.content

    return file["id"], state


async def _a_tus_upload(http: httpx.AsyncClient, owner: User) -> tuple[str, State]:
    created = await http.post("/uploads", headers={
        **owner.auth, **TUS, "Upload-Length": "10", "Content-Type": OFFSET_STREAM,
        "Upload-Metadata": "filename " + base64.b64encode(b"a.bin").decode()}, content=b"abc")
    assert created.status_code == 201 and created.headers["upload-offset"] == "3", created.text
    location = created.headers["location"]

    async def state() -> Any:
        shown = await http.get(location, headers=owner.auth)
        head = await http.head(location, headers={**owner.auth, **TUS})
        return shown.status_code, shown.json(), head.headers.get("upload-offset")

    return location.rsplit("/", 1)[1], state


async def _a_token(http: httpx.AsyncClient, owner: User) -> tuple[str, State]:
    created = await http.post("/auth/tokens", headers=owner.auth, json={"name": "A's device"})
    assert created.status_code == 201, created.text
    token = created.json()

    async def state() -> Any:
        listed = await http.get("/auth/tokens", headers=owner.auth)
        works = await http.get("/usage", headers={"Authorization": f"Bearer {token['token']}"})
        return [t["id"] for t in listed.json()["tokens"]], works.status_code

    return token["id"], state


_DATABASE: dict[str, str] = {}  # the shared server's database URL, set by the `calls` fixture


async def _a_webhook(http: httpx.AsyncClient, owner: User) -> tuple[str, State]:
    # The shared server refuses loopback endpoints (and tests call nothing off the machine), so the
    # row is written directly; an attempt to it would be refused before connecting.
    webhook_id = uuid.uuid4()
    conn = await asyncpg.connect(_DATABASE["url"])
    try:
        await conn.execute("INSERT INTO webhook_endpoints (id, user_id, url, secret) VALUES ($1, $2, $3, $4)",
                           webhook_id, uuid.UUID(owner.id), "http://127.0.0.1:9/hook", b"not a sealed secret")
    finally:
        await conn.close()

    async def state() -> Any:
        listed = await http.get("/webhooks", headers=owner.auth)
        deliveries = await http.get(f"/webhooks/{webhook_id}/deliveries", headers=owner.auth)
        return listed.json(), deliveries.status_code, deliveries.json()

    return str(webhook_id), state


# Every path parameter of the app names one kind of resource. A route with a parameter missing here
# fails test_every_id_route_is_covered: add the kind's factory, and every test below covers it.
RESOURCES: dict[str, Callable[[httpx.AsyncClient, User], Awaitable[tuple[str, State]]]] = {
    "file_id": _a_file,
    "upload_id": _a_tus_upload,
    "token_id": _a_token,
    "webhook_id": _a_webhook,
}


@dataclass
class Call:
    """A request that succeeds for the resource's owner; any other user must get 404 for it."""

    method: str
    template: str
    headers: dict[str, str] = field(default_factory=dict)
    content: bytes | None = None
    json: Any = None

    def url(self, param: str, value: str) -> str:
        return self.template.replace("{" + param + "}", value)

    async def send(self, http: httpx.AsyncClient, user: User, param: str, value: str) -> httpx.Response:
        return await http.request(self.method, self.url(param, value), content=self.content, json=self.json,
                                  headers={**user.auth, **TUS, **self.headers})


# Bodies and headers of the calls that need more than a bare request to succeed for the owner.
CALLS = {
    ("POST", "/files/{file_id}/links"): {"json": {"expires_in": 60}},
    ("PATCH", "/files/{file_id}"): {"json": {"name": "renamed.txt"}},
    ("PATCH", "/uploads/{upload_id}"): {"headers": {"Content-Type": OFFSET_STREAM, "Upload-Offset": "3"},
                                        "content": b"def"},
}


def id_calls(tmp_path: Path, database_url: str) -> list[tuple[str, Call]]:
    """(path parameter, call) for every route and method of the app that takes an id in its path."""
    app = create_app(make_settings(tmp_path / "routes-only"), database_url)  # not started: just its table
    seen: set[tuple[str, str]] = set()
    calls = []
    for route in app.routes:
        if not isinstance(route, Route) or not route.param_convertors:
            continue  # no id in the path (the /web mount serves the web app's own files)
        assert len(route.param_convertors) == 1, f"{route.path}: several ids; extend this test"
        (param,) = route.param_convertors
        for method in sorted(route.methods or ()):
            if (method, route.path) in seen:  # HEAD is both explicit and implied by GET on /uploads/{id}
                continue
            seen.add((method, route.path))
            calls.append((param, Call(method, route.path, **CALLS.get((method, route.path), {}))))
    return calls


@pytest.fixture
def calls(tmp_path: Path, server: Server) -> list[tuple[str, Call]]:
    _DATABASE["url"] = server.database_url
    return id_calls(tmp_path, server.database_url)


def assert_not_found(response: httpx.Response, call: Call) -> None:
    if call.method == "HEAD":  # no body to read: the status and type must still say 404 problem
        assert response.status_code == 404, (call, response.status_code)
        assert response.headers["content-type"].startswith("application/problem+json")
        return
    body = assert_problem(response, 404)
    assert "secret" not in response.text and body["status"] == 404, call


# ---- tests --------------------------------------------------------------------------------------

def test_every_id_route_is_covered(calls: list[tuple[str, Call]]) -> None:
    routes = {(call.method, call.template) for _, call in calls}
    # The routes this test was written against must still be found by reading the table.
    assert {("GET", "/files/{file_id}"), ("DELETE", "/files/{file_id}"), ("GET", "/files/{file_id}/content"),
            ("HEAD", "/files/{file_id}/content"), ("POST", "/files/{file_id}/links"),
            ("HEAD", "/uploads/{upload_id}"), ("GET", "/uploads/{upload_id}"),
            ("PATCH", "/uploads/{upload_id}"), ("DELETE", "/uploads/{upload_id}")} <= routes
    missing = {param for param, _ in calls} - set(RESOURCES)
    assert not missing, f"no factory in RESOURCES for the path parameters {missing}"
    assert set(CALLS) <= routes, "CALLS names a route the app no longer has"


async def test_another_users_id_is_404_on_every_route_and_changes_nothing(
        client: httpx.AsyncClient, calls: list[tuple[str, Call]]) -> None:
    owner, intruder = await make_user(client), await make_user(client)
    for param, call in calls:
        resource_id, state = await RESOURCES[param](client, owner)
        before = await state()
        # Every spelling of the id that the server accepts as the same UUID.
        for spelling in (resource_id, resource_id.upper(), uuid.UUID(resource_id).hex):
            assert_not_found(await call.send(client, intruder, param, spelling), call)
        assert await state() == before, call
        # Control: the very same request is fine for the owner, so the 404 was about ownership.
        mine = await call.send(client, owner, param, resource_id)
        assert mine.status_code < 300, (call, mine.status_code, mine.text)


async def test_unknown_and_malformed_ids_are_404_on_every_route(
        client: httpx.AsyncClient, calls: list[tuple[str, Call]]) -> None:
    # The contract's ids are UUIDs; anything else names nothing, so it is as missing as an unknown
    # UUID: 404 everywhere (never 422 on one route and 404 on another, nor a 500).
    user = await make_user(client)
    for param, call in calls:
        for value in (str(uuid.uuid4()), "not-a-uuid", "0" * 33, "%00", "...", "1' OR '1'='1", "🎬"):
            assert_not_found(await call.send(client, user, param, value), call)


async def test_another_users_path_and_query_ids_are_404(client: httpx.AsyncClient) -> None:
    owner, intruder = await make_user(client), await make_user(client)
    file = await upload(client, owner, b"A's secret bytes", path="/shared/name.txt")
    for params in ({"id": file["id"]}, {"path": "/shared/name.txt"}, {"path": "//shared//name.txt"}):
        assert_problem(await client.get("/download", params=params, headers=intruder.auth), 404)
        head = await client.head("/download", params=params, headers=intruder.auth)
        assert head.status_code == 404 and head.content == b""
    # Lists and totals are per user too.
    assert (await client.get("/files", params={"prefix": "/shared/"}, headers=intruder.auth)).json()["files"] == []
    assert (await client.get("/usage", headers=intruder.auth)).json() == {"files": 0, "bytes": 0, "quota": None}
    # The same path is a different file for each user: B's upload there does not replace A's.
    theirs = await upload(client, intruder, b"B's bytes", path="/shared/name.txt")
    assert theirs["id"] != file["id"]
    mine = await client.get("/download", params={"path": "/shared/name.txt"}, headers=owner.auth)
    assert mine.content == b"A's secret bytes"
    assert (await client.get(f"/files/{file['id']}", headers=owner.auth)).json() == file


def _wav(seconds: float = 0.1, rate: int = 8000) -> bytes:
    """A silent 16-bit mono WAV."""
    data = b"\x00\x00" * int(seconds * rate)
    fmt = struct.pack("<HHIIHH", 1, 1, rate, rate * 2, 2, 16)
    body = b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", len(data)) + data
    return b"RIFF" + struct.pack("<I", 4 + len(body)) + b"WAVE" + body


async def test_records_of_another_user_are_404_and_cannot_be_posted_for_them(client: httpx.AsyncClient,
                                                                           server: Server) -> None:
    owner, intruder = await make_user(client), await make_user(client)
    created = await client.post("/records", headers=owner.auth, files={"file": ("memo.wav", io.BytesIO(_wav()))})
    assert created.status_code == 201, created.text
    record = created.json()
    # /record?id=…&user=<the owner> needs no token by design (the random id is the capability, like a
    # signed link), so only the pairing is checked: the record under another user is not there.
    for user_id in (intruder.id, str(uuid.uuid4()), "not-a-uuid"):
        assert_problem(await client.get("/record", params={"id": record["id"], "user": user_id}), 404)
    # Form fields cannot file a record in another user's name with one's own token.
    forged = await client.post("/records", data={"user": owner.id, "token": intruder.token},
                               files={"file": ("forged.wav", io.BytesIO(_wav()))})
    assert_problem(forged, 401)
    listing = (await client.get("/files", headers=owner.auth)).json()["files"]
    assert [f["id"] for f in listing] == [record["id"]]
    assert server.stray_temp_files() == []
    owned = await client.get("/record", params={"id": record["id"], "user": owner.id})
    assert owned.status_code == 200 and hashlib.sha256(owned.content).hexdigest() == record["file"]["sha256"]

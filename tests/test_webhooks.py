"""Webhooks end to end: endpoints over HTTP, every event type arriving signed at a real receiver,
retries with the same webhook-id, giving up after the window, and the address rules."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import struct
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from conftest import (
    MockCloud,
    Receiver,
    Server,
    User,
    arrived,
    assert_problem,
    cloud_settings,
    free_port,
    fresh_database,
    make_settings,
    make_user,
    register,
    serve_in_thread,
    tus_metadata,
    upload,
    wait_for,
)

from mediad import migrate
from mediad.cleanup import sweep
from mediad.db import WEBHOOK_EVENTS, create_engine
from mediad.storage import Storage


@pytest.fixture(scope="module")
def hook_database(pg_server_url: str) -> Iterator[str]:
    """A database of this module's own: the session's shared server runs a delivery worker too, and
    with private addresses refused it would claim (and fail) deliveries to the loopback receiver."""
    with fresh_database(pg_server_url) as url:
        migrate.upgrade(url)
        yield url


async def _sql(url: str, query: str, *args: Any) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(url)
    try:
        return list(await conn.fetch(query, *args))
    finally:
        await conn.close()


@pytest.fixture
def hook_db(hook_database: str) -> Iterator[str]:
    yield hook_database
    asyncio.run(_sql(hook_database, "TRUNCATE users CASCADE"))


@contextlib.asynccontextmanager
async def hooked(tmp_path: Path, database_url: str, cloud: MockCloud | None = None,
                 **overrides: Any) -> AsyncIterator[tuple[Server, httpx.AsyncClient, Any]]:
    """mediad allowed to call the loopback receiver, polling fast."""
    fast = {"webhook_allow_private": True, "webhook_poll_s": 0.5, "cleanup_interval_s": 0, **overrides}
    settings = (cloud_settings(tmp_path / "data", cloud, **fast) if cloud is not None
                else make_settings(tmp_path / "data", **fast))
    with serve_in_thread(settings, database_url) as running:
        async with httpx.AsyncClient(base_url=running.url, timeout=60) as http:
            yield running, http, settings


def _wav(seconds: float = 0.1, rate: int = 8000) -> bytes:
    data = b"\x00\x00" * int(seconds * rate)
    fmt = struct.pack("<HHIIHH", 1, 1, rate, rate * 2, 2, 16)
    body = b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", len(data)) + data
    return b"RIFF" + struct.pack("<I", 4 + len(body)) + b"WAVE" + body


async def _sweep(server: Server, settings: Any, **kwargs: Any) -> Any:
    engine = create_engine(server.database_url, settings)
    try:
        storage = Storage(server.data_dir)
        storage.prepare()
        return await sweep(engine, storage, settings, **kwargs)
    finally:
        await engine.dispose()


def _by_type(receiver: Receiver) -> dict[str, list[dict[str, Any]]]:
    found: dict[str, list[dict[str, Any]]] = {}
    for event in receiver.events():
        found.setdefault(event["type"], []).append(event)
    return found


async def test_moves_and_folder_deletions_announce_each_file(
        hook_db: str, tmp_path: Path, receiver: Receiver) -> None:
    async with hooked(tmp_path, hook_db) as (server, http, settings):
        user = await make_user(http)
        await register(http, user, receiver, events=["file.moved", "file.deleted"])
        first = await upload(http, user, b"one", path="/trip/a.txt")
        second = await upload(http, user, b"two", path="/trip/b.txt")
        moved = await http.patch(f"/files/{first['id']}", json={"path": "/trip/day1/"}, headers=user.auth)
        assert moved.status_code == 200, moved.text
        gone = await http.delete("/folders", params={"path": "/trip/", "recursive": "true"}, headers=user.auth)
        assert gone.status_code == 200 and gone.json() == {"deleted": 2}
        await arrived(receiver, 3, "one move and two deletions")
        await asyncio.sleep(0.3)  # nothing more may come
    events = _by_type(receiver)
    assert sorted(events) == ["file.deleted", "file.moved"]
    assert [e["data"]["file"]["path"] for e in events["file.moved"]] == ["/trip/day1/a.txt"]
    assert events["file.moved"][0]["data"]["file"] == moved.json()
    assert sorted(e["data"]["file"]["id"] for e in events["file.deleted"]) == sorted([first["id"], second["id"]])
    assert all(r.verified for r in receiver.received)


async def test_every_event_type_arrives_signed_with_the_file_as_it_is_after_the_change(
        hook_db: str, tmp_path: Path, mock_cloud: MockCloud, receiver: Receiver) -> None:
    async with hooked(tmp_path, hook_db, mock_cloud, upload_expire_s=1, local_ttl_s=3600) as (server, http, settings):
        user, quiet = await make_user(http), await make_user(http)
        endpoint = await register(http, user, receiver)
        assert endpoint["events"] == list(WEBHOOK_EVENTS) and endpoint["url"] == receiver.url()

        created = await upload(http, user, b"first", path="/docs/a.txt")
        await arrived(receiver, 2, "file.created, file.stored")
        replaced = await upload(http, user, b"second version", path="/docs/a.txt", replaces=True)
        assert replaced["id"] == created["id"]
        record = await http.post("/records", headers=user.auth, files={"file": ("memo.wav", io.BytesIO(_wav()))})
        assert record.status_code == 201, record.text
        tus = await http.post("/uploads", headers={
            **user.auth, "Tus-Resumable": "1.0.0", "Upload-Length": "10",
            "Upload-Metadata": "filename " + base64.b64encode(b"t.bin").decode()})
        assert tus.status_code == 201, tus.text
        await upload(http, quiet, b"nobody listens")  # a user without endpoints: no outbox row

        async def all_stored() -> bool:
            rows = await _sql(hook_db, "SELECT count(*) AS n FROM files WHERE cloud_state <> 'stored'")
            return rows[0]["n"] == 0
        await wait_for(all_stored, 30, "replication")
        await arrived(receiver, 7, "replaced, the record's file.created and record.created, two more stored")
        stored_file = (await http.get(f"/files/{created['id']}", headers=user.auth)).json()
        await asyncio.sleep(1.2)  # the tus upload expires
        await _sweep(server, settings, now=datetime.now(UTC) + timedelta(hours=2))  # evicts both files
        evicted_file = (await http.get(f"/files/{created['id']}", headers=user.auth)).json()
        assert (await http.delete(f"/files/{created['id']}", headers=user.auth)).status_code == 204
        await arrived(receiver, 12, "evicted ×2, expired, deleted, and the record's media_ready")
        await asyncio.sleep(0.5)  # nothing more may come

    events = _by_type(receiver)
    assert sorted((t, len(e)) for t, e in events.items()) == [
        ("file.created", 2), ("file.deleted", 1), ("file.evicted", 2), ("file.media_ready", 1),
        ("file.replaced", 1), ("file.stored", 3), ("record.created", 1), ("upload.expired", 1)]
    assert all(r.verified for r in receiver.received), [r.headers for r in receiver.received if not r.verified]
    assert len({r.headers["webhook-id"] for r in receiver.received}) == len(receiver.received)
    assert all(r.headers["content-type"] == "application/json" for r in receiver.received)
    for event in receiver.events():
        assert set(event) == {"type", "timestamp", "data"}
        assert datetime.fromisoformat(event["timestamp"]).tzinfo is not None
    mine = {e["data"]["file"]["id"]: e["data"]["file"] for e in events["file.created"]}
    assert mine[created["id"]] == created
    assert events["file.replaced"][0]["data"] == {"file": replaced}
    assert events["record.created"][0]["data"] == {"file": record.json()["file"]}
    probed = events["file.media_ready"][0]["data"]["file"]  # the record's MP3, once probed
    assert probed["id"] == record.json()["id"] and probed["media"]["kind"] == "audio"
    stored = sorted((e["timestamp"], e["data"]["file"]) for e in events["file.stored"]
                    if e["data"]["file"]["id"] == created["id"])
    assert [file["sha256"] for _, file in stored] == [created["sha256"], replaced["sha256"]]
    assert stored[1][1] == stored_file
    assert stored_file["cloud"]["state"] == "stored" and stored_file["local"] is True
    assert {e["data"]["file"]["id"]: e["data"]["file"] for e in events["file.evicted"]}[created["id"]] == evicted_file
    assert evicted_file["local"] is False
    assert events["file.deleted"][0]["data"] == {"file": evicted_file}
    upload_id = tus.headers["location"].rsplit("/", 1)[1]
    expired = events["upload.expired"][0]["data"]["upload"]
    assert expired == {"id": upload_id, "offset": 0, "length": 10, "expires_at": expired["expires_at"], "file_id": None}
    rows = await _sql(hook_db, "SELECT status, attempts, last_status_code FROM webhook_deliveries")
    assert {(r["status"], r["attempts"], r["last_status_code"]) for r in rows} == {("delivered", 1, 204)}
    assert len(rows) == 12  # the quiet user's upload wrote none


async def test_a_finished_upload_whose_file_was_deleted_does_not_expire_unfinished(
        hook_db: str, tmp_path: Path, receiver: Receiver) -> None:
    """upload.expired is for uploads that never got all their bytes: not for one that finished,
    even once its File is gone (which leaves the upload's file_id NULL)."""
    async with hooked(tmp_path, hook_db, upload_expire_s=1) as (server, http, settings):
        user = await make_user(http)
        await register(http, user, receiver, events=["upload.expired"])

        async def tus_post(length: int, body: bytes) -> httpx.Response:
            response = await http.post("/uploads", content=body, headers={
                **user.auth, "Tus-Resumable": "1.0.0", "Upload-Length": str(length),
                "Upload-Metadata": tus_metadata(filename="t.bin"), "Content-Type": "application/offset+octet-stream"})
            assert response.status_code == 201, response.text
            return response
        finished = await tus_post(5, b"whole")
        file_id = finished.headers["mediad-file-id"]
        assert (await http.delete(f"/files/{file_id}", headers=user.auth)).status_code == 204
        partial = await tus_post(10, b"half")
        assert partial.headers["upload-offset"] == "4" and "mediad-file-id" not in partial.headers
        rows = await _sql(hook_db, 'SELECT "offset", length, file_id FROM uploads ORDER BY length')
        assert [tuple(r) for r in rows] == [(5, 5, None), (4, 10, None)]  # the finished one looks unfinished
        await asyncio.sleep(1.2)  # both expire
        await _sweep(server, settings)
        assert await _sql(hook_db, "SELECT id FROM uploads") == []
        await arrived(receiver, 1, "upload.expired for the unfinished upload")
        await asyncio.sleep(0.5)  # nothing more may come
    [expired] = receiver.events()
    upload_id = partial.headers["location"].rsplit("/", 1)[1]
    assert expired["type"] == "upload.expired"
    assert expired["data"] == {"upload": {"id": upload_id, "offset": 4, "length": 10,
                                          "expires_at": expired["data"]["upload"]["expires_at"], "file_id": None}}


async def test_an_endpoint_gets_only_the_events_it_asked_for(hook_db: str, tmp_path: Path,
                                                            receiver: Receiver) -> None:
    async with hooked(tmp_path, hook_db) as (server, http, _):
        user = await make_user(http)
        endpoint = await register(http, user, receiver, "/deleted-only", events=["file.deleted", "file.deleted"])
        assert endpoint["events"] == ["file.deleted"]
        await register(http, user, receiver, "/all")
        file = await upload(http, user, b"bytes")
        assert (await http.delete(f"/files/{file['id']}", headers=user.auth)).status_code == 204
        await arrived(receiver, 3, "created to /all, deleted to both")
        await asyncio.sleep(0.5)
    assert sorted(e["type"] for e in receiver.events("/deleted-only")) == ["file.deleted"]
    assert sorted(e["type"] for e in receiver.events("/all")) == ["file.created", "file.deleted"]
    # One event, two endpoints: the same webhook-id, each signed with its own endpoint's secret.
    deleted = [r for r in receiver.received if r.event["type"] == "file.deleted"]
    assert deleted[0].headers["webhook-id"] == deleted[1].headers["webhook-id"]
    assert deleted[0].headers["webhook-signature"] != deleted[1].headers["webhook-signature"]
    assert all(r.verified for r in receiver.received)


async def test_a_failing_endpoint_is_retried_with_the_same_webhook_id_until_it_answers(
        hook_db: str, tmp_path: Path, receiver: Receiver) -> None:
    async with hooked(tmp_path, hook_db, webhook_retry_s=120) as (server, http, _):
        user = await make_user(http)
        endpoint = await register(http, user, receiver)
        receiver.stop()  # down: connections refused
        await upload(http, user, b"while the receiver is down")

        async def attempted(n: int) -> bool:
            rows = await _sql(hook_db, "SELECT attempts FROM webhook_deliveries")
            return bool(rows) and rows[0]["attempts"] >= n
        await wait_for(lambda: attempted(1), 10, "a first, refused attempt")
        listed = (await http.get(f"/webhooks/{endpoint['id']}/deliveries", headers=user.auth)).json()["deliveries"]
        assert [(d["event"], d["status"], d["attempts"], d["last_status_code"]) for d in listed] == [
            ("file.created", "retrying", 1, None)]
        assert listed[0]["last_error"] and listed[0]["delivered_at"] is None
        receiver.status["/hook"] = 500
        receiver.start()  # up again at the same address, failing
        await arrived(receiver, 1, "a retry within 5 s", timeout=10)
        receiver.status["/hook"] = 200
        await arrived(receiver, 2, "the next retry", timeout=15)
        await wait_for(lambda: _status_is(hook_db, "delivered"), 5, "delivered")
        listed = (await http.get(f"/webhooks/{endpoint['id']}/deliveries", headers=user.auth)).json()["deliveries"]
    assert [(d["status"], d["attempts"], d["last_status_code"], d["last_error"]) for d in listed] == [
        ("delivered", 3, 200, None)]
    assert len(receiver.received) == 2 and all(r.verified for r in receiver.received)
    first, second = receiver.received
    assert first.headers["webhook-id"] == second.headers["webhook-id"] == listed[0]["event_id"]
    assert first.body == second.body
    assert 4.9 <= second.at - first.at <= 10.5  # the second retry: 5–10 s after the first


async def _status_is(database_url: str, status: str) -> bool:
    rows = await _sql(database_url, "SELECT status FROM webhook_deliveries")
    return bool(rows) and all(r["status"] == status for r in rows)


async def test_an_endpoint_answering_500_forever_fails_after_the_retry_window(
        hook_db: str, tmp_path: Path, receiver: Receiver) -> None:
    receiver.status["/hook"] = 500
    async with hooked(tmp_path, hook_db, webhook_retry_s=4) as (server, http, _):
        user = await make_user(http)
        endpoint = await register(http, user, receiver)
        await upload(http, user, b"never accepted")
        await wait_for(lambda: _status_is(hook_db, "failed"), 20, "the delivery to fail")
        listed = (await http.get(f"/webhooks/{endpoint['id']}/deliveries", headers=user.auth)).json()["deliveries"]
        metrics = (await http.get("/metrics")).text
    [delivery] = listed
    assert delivery["status"] == "failed" and delivery["last_status_code"] == 500
    assert delivery["attempts"] == len(receiver.received) >= 2
    assert delivery["last_error"] == "the endpoint answered 500"
    assert {r.headers["webhook-id"] for r in receiver.received} == {delivery["event_id"]}
    assert receiver.received[-1].at - receiver.received[0].at >= 3.5  # the last one at the window's end
    assert 'mediad_webhook_deliveries_total{outcome="failed"} 1.0' in metrics
    assert f'mediad_webhook_deliveries_total{{outcome="retried"}} {len(receiver.received) - 1}.0' in metrics


async def test_other_users_webhooks_are_404_and_lists_hold_no_secrets(hook_db: str, tmp_path: Path,
                                                                     receiver: Receiver) -> None:
    async with hooked(tmp_path, hook_db) as (server, http, _):
        owner, intruder = await make_user(http), await make_user(http)
        endpoint = await register(http, owner, receiver)
        for path in (f"/webhooks/{endpoint['id']}/deliveries", f"/webhooks/{uuid.uuid4()}/deliveries",
                     "/webhooks/not-a-uuid/deliveries"):
            assert_problem(await http.get(path, headers=intruder.auth), 404)
        assert_problem(await http.delete(f"/webhooks/{endpoint['id']}", headers=intruder.auth), 404)
        assert (await http.get("/webhooks", headers=intruder.auth)).json() == {"webhooks": []}
        listed = (await http.get("/webhooks", headers=owner.auth)).json()
        assert listed == {"webhooks": [{k: v for k, v in endpoint.items() if k != "secret"}]}
        assert_problem(await http.get("/webhooks"), 401)
        assert (await http.delete(f"/webhooks/{endpoint['id']}", headers=owner.auth)).status_code == 204
        assert_problem(await http.delete(f"/webhooks/{endpoint['id']}", headers=owner.auth), 404)
        assert (await http.get("/webhooks", headers=owner.auth)).json() == {"webhooks": []}
        stored = await _sql(hook_db, "SELECT secret FROM webhook_endpoints")
        assert stored == []


async def test_the_secret_is_stored_encrypted(hook_db: str, tmp_path: Path, receiver: Receiver) -> None:
    async with hooked(tmp_path, hook_db) as (server, http, _):
        endpoint = await register(http, await make_user(http), receiver)
    [row] = await _sql(hook_db, "SELECT secret FROM webhook_endpoints")
    assert endpoint["secret"].encode() not in row["secret"]
    assert base64.b64decode(endpoint["secret"][6:]) not in row["secret"]


@pytest.mark.parametrize("url", [
    "http://127.0.0.1:9/hook", "http://localhost/hook", "http://10.0.0.1/hook", "http://192.168.1.1/",
    "http://169.254.169.254/latest/meta-data/", "http://[::1]/", "http://[::ffff:127.0.0.1]/",
    "http://[::ffff:169.254.169.254]/", "http://100.64.0.1/", "http://0.0.0.0/", "http://[fd00:ec2::254]/",
    "http://224.0.0.1/", "http://[fe80::1]/",
])
async def test_private_addresses_are_refused(client: httpx.AsyncClient, user: User, url: str) -> None:
    body = assert_problem(await client.post("/webhooks", json={"url": url}, headers=user.auth), 422)
    assert "address" in body["detail"]
    assert (await client.get("/webhooks", headers=user.auth)).json() == {"webhooks": []}


@pytest.mark.parametrize(("body", "said"), [
    ({"url": "ftp://example.com/"}, "http"), ({"url": "/relative"}, "http"), ({"url": 5}, "http"), ({}, "http"),
    ({"url": "http://user:pw@127.0.0.1/"}, "credentials"), ({"url": "http://receiver.invalid/"}, "resolve"),
    ({"url": "http://127.0.0.1:99999/"}, "Port out of range"), ({"url": "http://bücher.example/"}, "ASCII"),
    ({"url": "http://127.0.0.1/", "events": ["file.exploded"]}, "unknown event type 'file.exploded'"),
    ({"url": "http://127.0.0.1/", "events": []}, "events"), ({"url": "http://127.0.0.1/", "events": "file.created"},
                                                             "events"),
])
async def test_invalid_registrations_are_422(client: httpx.AsyncClient, user: User, body: dict[str, Any],
                                             said: str) -> None:
    problem = assert_problem(await client.post("/webhooks", json=body, headers=user.auth), 422)
    assert said in problem["detail"]


_REFUSAL = "; webhooks are not sent there (MEDIAD_WEBHOOK_ALLOW_PRIVATE=true allows private addresses)"


@pytest.mark.parametrize(("host", "why"), [
    ("64:ff9b::7f00:1", "127.0.0.1, a loopback address"),  # NAT64
    ("64:ff9b:1::a00:1", "10.0.0.1, a private or reserved address"),  # local-use NAT64
    ("2002:a00:1::1", "10.0.0.1, a private or reserved address"),  # 6to4
    ("::7f00:1", "127.0.0.1, a loopback address"),  # IPv4-compatible
    ("::ffff:0:c0a8:101", "192.168.1.1, a private or reserved address"),  # IPv4-translated
    ("64:ff9b::a9fe:a9fe", "169.254.169.254, a cloud metadata address"),
])
async def test_ipv6_forms_of_refused_ipv4_addresses_are_refused(client: httpx.AsyncClient, user: User,
                                                                host: str, why: str) -> None:
    body = assert_problem(await client.post("/webhooks", json={"url": f"http://[{host}]/hook"}, headers=user.auth),
                          422)
    assert body["detail"] == f"the URL's host is {host}, an IPv6 form of {why}{_REFUSAL}"
    assert (await client.get("/webhooks", headers=user.auth)).json() == {"webhooks": []}


async def test_ipv6_forms_of_public_ipv4_addresses_are_accepted(client: httpx.AsyncClient, user: User) -> None:
    for host in ("64:ff9b::808:808", "2002:808:808::1", "2606:4700:4700::1111"):
        response = await client.post("/webhooks", json={"url": f"http://[{host}]/hook"}, headers=user.auth)
        assert response.status_code == 201, response.text
        assert (await client.delete(f"/webhooks/{response.json()['id']}", headers=user.auth)).status_code == 204


async def test_metadata_addresses_are_refused_even_when_private_ones_are_allowed(
        hook_db: str, tmp_path: Path) -> None:
    async with hooked(tmp_path, hook_db) as (server, http, _):
        user = await make_user(http)
        for url in ("http://169.254.169.254/", "http://[fd00:ec2::254]/", "http://[::ffff:169.254.169.254]/"):
            assert_problem(await http.post("/webhooks", json={"url": url}, headers=user.auth), 422)
        # 169.254.169.254 inside NAT64, 6to4, Teredo (as its client), IPv4-compatible, IPv4-translated
        for host in ("64:ff9b::a9fe:a9fe", "2002:a9fe:a9fe::", "2001:0:4136:e378:8000:63bf:5601:5601",
                     "::a9fe:a9fe", "::ffff:0:a9fe:a9fe"):
            body = assert_problem(await http.post("/webhooks", json={"url": f"http://[{host}]/"}, headers=user.auth),
                                  422)
            assert body["detail"] == (f"the URL's host is {host}, an IPv6 form of 169.254.169.254, "
                                      f"a cloud metadata address{_REFUSAL}")
        assert (await http.post("/webhooks", json={"url": "http://127.0.0.1:9/"}, headers=user.auth)).status_code == 201
        assert (await http.post("/webhooks", json={"url": "http://[::7f00:1]:9/"}, headers=user.auth)
                ).status_code == 201


async def test_a_user_may_register_at_most_20_endpoints(hook_db: str, tmp_path: Path, receiver: Receiver) -> None:
    async with hooked(tmp_path, hook_db) as (server, http, _):
        user = await make_user(http)
        answers = await asyncio.gather(*(http.post("/webhooks", json={"url": receiver.url(f"/{n}")},
                                                   headers=user.auth) for n in range(25)))
        assert sorted(a.status_code for a in answers) == [201] * 20 + [409] * 5
        assert len((await http.get("/webhooks", headers=user.auth)).json()["webhooks"]) == 20


def test_signature_matches_the_standard_webhooks_reference() -> None:
    from standardwebhooks.webhooks import Webhook

    from mediad.webhooks import new_secret, signature

    secret, body, when = new_secret(), b'{"type":"file.created"}', datetime.now(UTC)
    message_id = str(uuid.uuid4())
    expected = Webhook(secret).sign(message_id, when, body.decode())
    assert signature(secret, message_id, int(when.timestamp()), body) == expected


async def test_removing_an_endpoint_mid_attempt_leaves_the_worker_delivering(hook_db: str, tmp_path: Path,
                                                                             receiver: Receiver) -> None:
    receiver.delay_s["/gone"], receiver.status["/gone"] = 1.5, 500
    async with hooked(tmp_path, hook_db) as (server, http, _):
        user = await make_user(http)
        gone = await register(http, user, receiver, "/gone")
        await upload(http, user, b"one")
        await arrived(receiver, 1, "the attempt that will outlive its endpoint")
        assert (await http.delete(f"/webhooks/{gone['id']}", headers=user.auth)).status_code == 204
        await asyncio.sleep(2)  # its answer (500) comes back for a row that is gone
        await register(http, user, receiver, "/after")
        later = await upload(http, user, b"two")
        await arrived(receiver, 2, "an event to the new endpoint")
    assert [r.path for r in receiver.received] == ["/gone", "/after"]
    assert receiver.received[1].event["data"]["file"] == later
    rows = await _sql(hook_db, "SELECT status FROM webhook_deliveries")
    assert [r["status"] for r in rows] == ["delivered"]


async def test_a_named_host_is_called_at_its_checked_address_with_its_name_as_host(
        hook_db: str, tmp_path: Path, receiver: Receiver) -> None:
    """mediad connects to the address it resolved and checked, not to the name again; the request
    still names the host the user registered."""
    async with hooked(tmp_path, hook_db) as (server, http, _):
        user = await make_user(http)
        response = await http.post("/webhooks", headers=user.auth,
                                    json={"url": f"http://localhost:{receiver.port}/hook"})
        assert response.status_code == 201, response.text
        receiver.secrets["/hook"] = response.json()["secret"]
        file = await upload(http, user, b"to localhost")
        await arrived(receiver, 1, "the event over whichever address answers")
    [got] = receiver.received
    assert got.verified and got.event["data"]["file"] == file
    assert got.headers["host"] == f"localhost:{receiver.port}"


@pytest.mark.parametrize("dead", ["hanging", "failing", "refusing"])
async def test_one_endpoints_backlog_leaves_other_users_deliveries_flowing(
        hook_db: str, tmp_path: Path, receiver: Receiver, dead: str) -> None:
    """20,000 due deliveries to one endpoint, older than anyone else's, that hang (its 8 slots stay
    taken until cut off at 10 s), fail after a moment, or are refused at once (its slots free and
    refill all the time): another user's event still goes out at once."""
    receiver.delay_s["/dead"], receiver.status["/dead"] = (30.0, 204) if dead == "hanging" else (0.2, 500)
    dead_url = f"http://127.0.0.1:{free_port()}/dead" if dead == "refusing" else receiver.url("/dead")
    async with hooked(tmp_path, hook_db) as (server, http, _):
        stuck, other = await make_user(http), await make_user(http)
        created = await http.post("/webhooks", json={"url": dead_url, "events": ["file.created"]}, headers=stuck.auth)
        assert created.status_code == 201, created.text
        receiver.secrets["/dead"] = created.json()["secret"]
        await register(http, other, receiver, "/live", events=["file.created"])
        await _sql(hook_db, "INSERT INTO webhook_deliveries (id, endpoint_id, event_id, event, body, next_attempt_at)"
                            " SELECT gen_random_uuid(), $1, gen_random_uuid(), 'file.created', '{}',"
                            "  now() - interval '1 hour' + g * interval '1 ms' FROM generate_series(1, 20000) g",
                   uuid.UUID(created.json()["id"]))

        async def dead_busy() -> bool:
            rows = await _sql(hook_db, "SELECT count(*) AS n FROM webhook_deliveries"
                                       " WHERE attempts > 0 OR lease_until IS NOT NULL")
            return rows[0]["n"] >= (8 if dead == "hanging" else 40)
        await wait_for(dead_busy, 10, "the backlog's attempts")
        file = await upload(http, other, b"for the other user")

        async def delivered() -> bool:
            return len(receiver.events("/live")) == 1
        await wait_for(delivered, 5, "the other user's event while the backlog waits")
        dead_attempts = len(receiver.events("/dead"))
    [got] = [r for r in receiver.received if r.path == "/live"]
    assert got.verified and got.event == {"type": "file.created", "timestamp": got.event["timestamp"],
                                          "data": {"file": file}}
    if dead == "hanging":  # within its first 10 s, the hanging endpoint had its 8 slots and no more
        assert dead_attempts == 8

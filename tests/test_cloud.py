"""Cloud replication end to end: mediad pushing to the mock cloud (a real HTTP server)."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import asyncpg
import httpx
import pytest
from conftest import (
    MockCloud,
    Server,
    asgi_in_thread,
    blob_id,
    cloud_settings,
    file_state,
    make_user,
    serve_in_thread,
    stored,
    wait_for,
)
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from mediad.cloud import cloud_key, retry_delay


def test_retry_delay_grows_exponentially_with_jitter_and_a_cap() -> None:
    delays = [retry_delay(n, 1.0, 60.0) for n in range(10)]
    assert 0.5 <= delays[0] <= 1.0 and 4.0 <= delays[3] <= 8.0
    assert all(30.0 <= d <= 60.0 for d in delays[6:])


async def test_upload_is_replicated_and_verified(cloud_server: Server, mock_cloud: MockCloud) -> None:
    body = os.urandom(3 * 1024 * 1024 + 17)
    async with httpx.AsyncClient(base_url=cloud_server.url, timeout=30) as http:
        user = await make_user(http)
        created = (await http.post("/files?name=clip.bin", content=body, headers=user.auth)).json()
        assert created["cloud"] == {"state": "pending", "stored_at": None}
        await wait_for(lambda: stored(http, user.auth, created["id"]), what="stored")
        state = await file_state(http, user.auth, created["id"])
        assert state["cloud"]["stored_at"] is not None
        ping = (await http.get("/ping/all")).json()
        assert ping["cloud"] is not None and ping["cloud"] > 0
    key = cloud_key(await blob_id(cloud_server.database_url, created["id"]))
    copy = await mock_cloud.object(key)
    assert copy.status_code == 200 and hashlib.sha256(copy.content).hexdigest() == created["sha256"]
    assert (await mock_cloud.stats())["put_keys"] == {key: 1}


async def test_cloud_down_then_back_ends_stored(cloud_server: Server, mock_cloud: MockCloud) -> None:
    await mock_cloud.set_faults(fail_rate=1.0)
    async with httpx.AsyncClient(base_url=cloud_server.url, timeout=30) as http:
        user = await make_user(http)
        created = await http.post("/files?name=a.txt", content=b"hello cloud", headers=user.auth)
        assert created.status_code == 201
        file_id = created.json()["id"]

        async def retried() -> bool:
            conn = await asyncpg.connect(cloud_server.database_url)
            try:
                row = await conn.fetchrow("SELECT cloud_state, cloud_attempts, cloud_last_error FROM files")
            finally:
                await conn.close()
            assert row["cloud_state"] == "pending"
            return row["cloud_attempts"] >= 3 and "503" in row["cloud_last_error"]

        await wait_for(retried, what="several failed attempts recorded")
        await mock_cloud.set_faults(fail_rate=0.0)
        await wait_for(lambda: stored(http, user.auth, file_id), timeout=10, what="stored after recovery")


async def test_wrong_checksum_is_never_stored(cloud_server: Server, mock_cloud: MockCloud) -> None:
    await mock_cloud.set_faults(cut_rate=1.0)
    async with httpx.AsyncClient(base_url=cloud_server.url, timeout=30) as http:
        user = await make_user(http)
        file_id = (await http.post("/files?name=b.bin", content=os.urandom(50_000), headers=user.auth)).json()["id"]
        await asyncio.sleep(1.0)
        assert (await file_state(http, user.auth, file_id))["cloud"]["state"] == "pending"
        assert (await mock_cloud.stats())["puts"] >= 2
        await mock_cloud.set_faults(cut_rate=0.0)
        await wait_for(lambda: stored(http, user.auth, file_id), timeout=10, what="stored")


async def test_exhausted_attempts_fail_then_cli_retry_stores(
        database_url: str, tmp_path: Path, mock_cloud: MockCloud) -> None:
    await mock_cloud.set_faults(fail_rate=1.0)
    settings = cloud_settings(tmp_path / "data", mock_cloud, cloud_max_attempts=2)
    with serve_in_thread(settings, database_url) as running:
        async with httpx.AsyncClient(base_url=running.url, timeout=30) as http:
            user = await make_user(http)
            file_id = (await http.post("/files?name=c.bin", content=b"x" * 1000, headers=user.auth)).json()["id"]

            async def failed() -> bool:
                return (await file_state(http, user.auth, file_id))["cloud"]["state"] == "failed"

            await wait_for(failed, what="failed")
            await mock_cloud.set_faults(fail_rate=0.0)
            env = {**os.environ, "MEDIAD_DATABASE_URL": database_url}
            command = [sys.executable, "-m", "mediad.cli", "cloud", "retry", "--all"]
            result = await asyncio.to_thread(subprocess.run, command, env=env, capture_output=True, text=True,
                                             timeout=60)
            assert result.returncode == 0, result.stderr
            assert "1 failed file(s)" in result.stdout
            await wait_for(lambda: stored(http, user.auth, file_id), what="stored after retry")


async def test_pending_rows_survive_a_restart(database_url: str, tmp_path: Path, mock_cloud: MockCloud) -> None:
    await mock_cloud.set_faults(fail_rate=1.0)
    settings = cloud_settings(tmp_path / "data", mock_cloud, cloud_retry_base_s=30, cloud_retry_cap_s=30)
    with serve_in_thread(settings, database_url) as running:
        async with httpx.AsyncClient(base_url=running.url, timeout=30) as http:
            user = await make_user(http)
            ids = [(await http.post(f"/files?name={n}.bin", content=os.urandom(10_000), headers=user.auth)).json()["id"]
                   for n in range(5)]
    conn = await asyncpg.connect(database_url)
    try:  # the process is gone; make the rows due now instead of in 30 s
        await conn.execute("UPDATE files SET cloud_next_attempt_at = now()")
    finally:
        await conn.close()
    await mock_cloud.set_faults(fail_rate=0.0)
    with serve_in_thread(cloud_settings(tmp_path / "data", mock_cloud), database_url) as running:
        async with httpx.AsyncClient(base_url=running.url, timeout=30) as http:
            for file_id in ids:
                await wait_for(lambda f=file_id: stored(http, user.auth, f), what=f"{file_id} stored")


async def test_two_instances_push_each_file_exactly_once(
        database_url: str, tmp_path: Path, mock_cloud: MockCloud) -> None:
    shared = tmp_path / "shared-data"
    with serve_in_thread(cloud_settings(shared, mock_cloud), database_url) as first, \
            serve_in_thread(cloud_settings(shared, mock_cloud), database_url) as second:
        async with httpx.AsyncClient(timeout=30) as http:
            created = await http.post(first.url + "/users", json={"name": "twin"})
            auth = {"Authorization": f"Bearer {created.json()['token']}"}
            uploads = [http.post(f"{(first, second)[n % 2].url}/files?name={n}.bin",
                                 content=os.urandom(200_000), headers=auth) for n in range(24)]
            ids = [r.json()["id"] for r in await asyncio.gather(*uploads)]

            async def all_stored() -> bool:
                listed = (await http.get(first.url + "/files?limit=100", headers=auth)).json()["files"]
                return len(listed) == 24 and all(f["cloud"]["state"] == "stored" for f in listed)

            await wait_for(all_stored, what="all stored")
    put_keys = (await mock_cloud.stats())["put_keys"]
    assert len(put_keys) == len(ids) == 24
    assert set(put_keys.values()) == {1}, put_keys


async def test_replace_and_delete_propagate(cloud_server: Server, mock_cloud: MockCloud) -> None:
    async with httpx.AsyncClient(base_url=cloud_server.url, timeout=30) as http:
        user = await make_user(http)
        first = (await http.put("/files?path=/docs/r.txt", content=b"version one", headers=user.auth)).json()
        await wait_for(lambda: stored(http, user.auth, first["id"]), what="v1 stored")
        old_key = cloud_key(await blob_id(cloud_server.database_url, first["id"]))
        second = await http.put("/files?path=/docs/r.txt", content=b"version two!", headers=user.auth)
        assert second.status_code == 200 and second.json()["id"] == first["id"]
        await wait_for(lambda: stored(http, user.auth, first["id"]), what="v2 stored")
        new_key = cloud_key(await blob_id(cloud_server.database_url, first["id"]))
        assert (await mock_cloud.object(new_key)).content == b"version two!"

        async def gone(key: str) -> bool:
            return (await mock_cloud.object(key)).status_code == 404

        await wait_for(lambda: gone(old_key), what="old version deleted from the cloud")
        assert (await http.delete(f"/files/{first['id']}", headers=user.auth)).status_code == 204
        await wait_for(lambda: gone(new_key), what="deleted file removed from the cloud")


async def test_read_through_after_local_copy_is_gone(cloud_server: Server, mock_cloud: MockCloud) -> None:
    body = os.urandom(2 * 1024 * 1024 + 5)
    async with httpx.AsyncClient(base_url=cloud_server.url, timeout=30) as http:
        user = await make_user(http)
        created = (await http.post("/files?name=v.bin", content=body, headers=user.auth)).json()
        await wait_for(lambda: stored(http, user.auth, created["id"]), what="stored")
        blob = await blob_id(cloud_server.database_url, created["id"])
        conn = await asyncpg.connect(cloud_server.database_url)
        try:  # what an eviction does: the local copy goes, the row says so
            await conn.execute("UPDATE files SET node = NULL WHERE id = $1", uuid.UUID(created["id"]))
        finally:
            await conn.close()
        (cloud_server.data_dir / "files" / blob.hex[:2] / blob.hex[2:4] / blob.hex).unlink()
        url = f"/files/{created['id']}/content"

        assert (await file_state(http, user.auth, created["id"]))["local"] is False
        full = await http.get(url, headers=user.auth)
        assert full.status_code == 200 and full.content == body
        assert full.headers["etag"] == f'"{created["sha256"]}"'
        part = await http.get(url, headers={**user.auth, "Range": "bytes=1000-1999"})
        assert part.status_code == 206 and part.content == body[1000:2000]
        assert part.headers["content-range"] == f"bytes 1000-1999/{len(body)}"
        tail = await http.get(url, headers={**user.auth, "Range": "bytes=-10"})
        assert tail.content == body[-10:]
        multi = await http.get(url, headers={**user.auth, "Range": "bytes=0-9,1000000-1000009"})
        assert multi.status_code == 206
        assert body[:10] in multi.content and body[1000000:1000010] in multi.content
        assert int(multi.headers["content-length"]) == len(multi.content)
        not_modified = await http.get(url, headers={**user.auth, "If-None-Match": f'"{created["sha256"]}"'})
        assert not_modified.status_code == 304


class Gate:
    """A real HTTP hop between mediad and the mock cloud that holds chosen requests, to order a
    push's PUT and a deletion's DELETE as a slow network can: each PUT's body is taken in full and
    held until `release_put`; each DELETE is carried out at once and its answer held until
    `release_delete`. Everything else passes straight through."""

    def __init__(self, cloud_url: str) -> None:
        self.cloud_url = cloud_url
        self.put_arrived, self.release_put = threading.Event(), threading.Event()
        self.delete_done, self.release_delete = threading.Event(), threading.Event()

    async def _forward(self, request: Request, body: bytes) -> Response:
        headers = {k: v for k, v in request.headers.items() if k.lower() not in ("host", "content-length")}
        async with httpx.AsyncClient(base_url=self.cloud_url, timeout=30) as http:
            answer = await http.request(request.method, request.url.path, content=body, headers=headers)
        return Response(answer.content, answer.status_code, media_type=answer.headers.get("content-type"))

    async def handle(self, request: Request) -> Response:
        body = await request.body()
        if request.method == "PUT":
            self.put_arrived.set()
            assert await asyncio.to_thread(self.release_put.wait, 30)
        answer = await self._forward(request, body)
        if request.method == "DELETE":
            self.delete_done.set()
            assert await asyncio.to_thread(self.release_delete.wait, 30)
        return answer

    def app(self) -> Starlette:
        return Starlette(routes=[Route("/{path:path}", self.handle, methods=["GET", "PUT", "DELETE"])])


async def _signalled(event: threading.Event, what: str) -> None:
    assert await asyncio.to_thread(event.wait, 20), f"timed out waiting for {what}"


async def test_a_push_landing_after_its_deletion_is_deleted_again(
        database_url: str, tmp_path: Path, mock_cloud: MockCloud, caplog: pytest.LogCaptureFixture) -> None:
    """Deleted while its push streams: the deletion's DELETE reaches the cloud before the push's PUT
    creates the object, and the push re-queues the key when it learns the file is gone. That
    re-queue must outlive the first deletion's finish, or the late object stays in the cloud."""
    caplog.set_level(logging.INFO, logger="mediad.cloud")
    gate = Gate(mock_cloud.url)
    with asgi_in_thread(gate.app()) as gate_url, \
            serve_in_thread(cloud_settings(tmp_path / "data", mock_cloud, cloud_url=gate_url), database_url) as running:
        async with httpx.AsyncClient(base_url=running.url, timeout=30) as http:
            user = await make_user(http)
            file_id = (await http.post("/files?name=late.bin", content=b"pushed late", headers=user.auth)).json()["id"]
            key = cloud_key(await blob_id(database_url, file_id))
            await _signalled(gate.put_arrived, "the push's PUT")
            assert (await http.delete(f"/files/{file_id}", headers=user.auth)).status_code == 204
            await _signalled(gate.delete_done, "the deletion's DELETE")  # the cloud has nothing yet
            gate.release_put.set()  # the object is created now, after its deletion

            async def push_done() -> bool:  # logged once the push's transaction has committed
                return any(r.getMessage() == f"stored {file_id} in the cloud" for r in caplog.records)

            await wait_for(push_done, what="the push to finish")
            gate.release_delete.set()

            async def queue_empty() -> bool:
                conn = await asyncpg.connect(database_url)
                try:
                    return await conn.fetchval("SELECT count(*) FROM cloud_deletions") == 0
                finally:
                    await conn.close()

            await wait_for(queue_empty, what="the deletion queue to drain")
            assert (await mock_cloud.object(key)).status_code == 404
    stats = await mock_cloud.stats()
    assert (stats["stored_keys"], stats["deletes"]) == ({key: 1}, 2)

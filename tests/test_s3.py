"""S3Store end to end against moto's standalone server (a real S3 API over HTTP, in a subprocess),
checked through boto3 as an independent client; then mediad replicating to it."""

from __future__ import annotations

import asyncio
import hashlib
import os
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import asyncpg
import httpx
import pytest
from conftest import Oracle, free_port, make_user, serve_in_thread, wait_for

from mediad.cloud import CloudError, cloud_key
from mediad.config import Settings
from mediad.s3 import MiB, S3Store


@pytest.fixture
async def store(s3_settings: Settings) -> AsyncIterator[S3Store]:
    async with httpx.AsyncClient(timeout=30) as http:
        s3 = S3Store(http, s3_settings)
        await s3.ensure_bucket()
        yield s3


def write(path: Path, size: int) -> tuple[bytes, str]:
    body = os.urandom(size)
    path.write_bytes(body)
    return body, hashlib.sha256(body).hexdigest()


async def read_all(store: S3Store, key: str, start: int, end: int) -> bytes:
    return b"".join([chunk async for chunk in store.read(key, start, end)])


async def test_small_file_round_trip_and_ranges(store: S3Store, s3_settings: Settings,
                                                 tmp_path: Path) -> None:
    body, sha256 = write(tmp_path / "small.bin", 300_001)
    assert await store.put("blobs/small", tmp_path / "small.bin", len(body), sha256) == sha256
    oracle = Oracle(s3_settings)
    assert await oracle.keys() == ["blobs/small"]
    assert await oracle.content("blobs/small") == body
    assert await read_all(store, "blobs/small", 0, len(body)) == body
    assert await read_all(store, "blobs/small", 1000, 2000) == body[1000:2000]
    assert await read_all(store, "blobs/small", len(body) - 1, len(body)) == body[-1:]
    assert await read_all(store, "blobs/small", 5, 5) == b""
    with pytest.raises(CloudError):  # the object is shorter than asked: never a silent short read
        await read_all(store, "blobs/small", len(body) - 10, len(body) + 10)


async def test_empty_file_round_trip(store: S3Store, tmp_path: Path) -> None:
    (tmp_path / "empty").write_bytes(b"")
    sha256 = hashlib.sha256().hexdigest()
    assert await store.put("blobs/empty", tmp_path / "empty", 0, sha256) == sha256
    assert await read_all(store, "blobs/empty", 0, 0) == b""


async def test_large_file_goes_up_in_parts(store: S3Store, s3_settings: Settings, tmp_path: Path) -> None:
    store.multipart_threshold = store.part_size = 5 * MiB  # S3's minimum part size
    body, sha256 = write(tmp_path / "big.bin", 12 * MiB + 7)
    assert await store.put("blobs/big", tmp_path / "big.bin", len(body), sha256) == sha256
    oracle = Oracle(s3_settings)
    head = await oracle.call("head_object", Key="blobs/big")
    assert head["ContentLength"] == len(body) and head["ETag"].endswith('-3"')  # three parts
    assert hashlib.sha256(await oracle.content("blobs/big")).hexdigest() == sha256
    assert await oracle.pending_uploads() == []
    assert hashlib.sha256(await read_all(store, "blobs/big", 0, len(body))).hexdigest() == sha256
    edge = 5 * MiB  # a range across a part boundary
    assert await read_all(store, "blobs/big", edge - 10, edge + 10) == body[edge - 10:edge + 10]


async def test_delete_then_read_fails(store: S3Store, tmp_path: Path) -> None:
    body, sha256 = write(tmp_path / "d.bin", 1000)
    await store.put("blobs/d", tmp_path / "d.bin", len(body), sha256)
    await store.delete("blobs/d")
    with pytest.raises(CloudError, match="404"):
        await read_all(store, "blobs/d", 0, len(body))
    await store.delete("blobs/d")  # absent is fine


@pytest.mark.parametrize("size", [200_000, 12 * MiB], ids=["single", "multipart"])
async def test_wrong_sha256_is_never_stored(store: S3Store, s3_settings: Settings, tmp_path: Path,
                                            size: int) -> None:
    store.multipart_threshold = store.part_size = 5 * MiB
    body, _ = write(tmp_path / "f.bin", size)
    wrong = hashlib.sha256(body[:-1] + bytes([body[-1] ^ 1])).hexdigest()  # one bit off, at the very end
    with pytest.raises(CloudError, match="sha256"):
        await store.put("blobs/f", tmp_path / "f.bin", size, wrong)
    oracle = Oracle(s3_settings)
    await asyncio.sleep(0.2)  # let moto finish with the cut-off request
    assert await oracle.keys() == []
    assert await oracle.pending_uploads() == []


async def test_file_shorter_than_recorded_is_never_stored(store: S3Store, s3_settings: Settings,
                                                          tmp_path: Path) -> None:
    body, sha256 = write(tmp_path / "short.bin", 3 * MiB)
    (tmp_path / "short.bin").write_bytes(body[: 2 * MiB])
    with pytest.raises(CloudError, match="shorter"):
        await store.put("blobs/short", tmp_path / "short.bin", len(body), sha256)
    await asyncio.sleep(0.2)
    assert await Oracle(s3_settings).keys() == []


async def test_ping_and_bucket(store: S3Store, s3_settings: Settings) -> None:
    assert 0 < await store.ping() < 5
    await store.ensure_bucket()  # already there: nothing to do
    async with httpx.AsyncClient(timeout=10) as http:
        missing = S3Store(http, replace(s3_settings, s3_bucket=f"absent-{uuid.uuid4().hex[:8]}"))
        with pytest.raises(CloudError, match="404"):
            await missing.ping()
        with pytest.raises(CloudError):
            await S3Store(http, replace(s3_settings, s3_endpoint_url=f"http://127.0.0.1:{free_port()}")).ping()
        forged = S3Store(http, replace(s3_settings, s3_secret_key="not-the-secret"))
        with pytest.raises(CloudError, match="403"):
            await forged.ping()
        with pytest.raises(CloudError, match="403 SignatureDoesNotMatch"):
            await read_all(forged, "blobs/any", 0, 1)


async def test_mediad_replicates_to_s3_reads_through_and_deletes(
        database_url: str, s3_settings: Settings, store: S3Store) -> None:
    settings = replace(s3_settings, cloud_poll_s=0.3, cloud_lease_s=5.0, cloud_retry_base_s=0.1,
                       cloud_retry_cap_s=0.5, cloud_max_attempts=100)
    oracle = Oracle(settings)
    body = os.urandom(2 * MiB + 5)
    with serve_in_thread(settings, database_url) as running:
        async with httpx.AsyncClient(base_url=running.url, timeout=30) as http:
            user = await make_user(http)
            created = (await http.post("/files?name=v.bin", content=body, headers=user.auth)).json()

            async def stored() -> bool:
                state = (await http.get(f"/files/{created['id']}", headers=user.auth)).json()
                return bool(state["cloud"]["state"] == "stored")

            await wait_for(stored, what="stored in S3")
            conn = await asyncpg.connect(database_url)
            try:  # what an eviction does: the local copy goes, the row says so
                file_id = uuid.UUID(created["id"])
                blob = await conn.fetchval("SELECT blob_id FROM files WHERE id = $1", file_id)
                await conn.execute("UPDATE files SET node = NULL WHERE id = $1", file_id)
            finally:
                await conn.close()
            key = cloud_key(blob)
            assert await oracle.keys() == [key]
            assert hashlib.sha256(await oracle.content(key)).hexdigest() == created["sha256"]
            (running.data_dir / "files" / blob.hex[:2] / blob.hex[2:4] / blob.hex).unlink()
            assert (await http.get("/ping/all")).json()["cloud"] > 0

            url = f"/files/{created['id']}/content"
            part = await http.get(url, headers={**user.auth, "Range": "bytes=1000000-1999999"})
            assert part.status_code == 206 and part.content == body[1_000_000:2_000_000]
            assert part.headers["content-range"] == f"bytes 1000000-1999999/{len(body)}"
            full = await http.get(url, headers=user.auth)
            assert full.status_code == 200 and full.content == body

            assert (await http.delete(f"/files/{created['id']}", headers=user.auth)).status_code == 204

            async def gone() -> bool:
                return await oracle.keys() == []

            await wait_for(gone, what="the S3 object deleted")

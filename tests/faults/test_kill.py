"""kill -9 of `mediad serve` while it uploads, replicates and evicts; then restart and drain."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import uuid
from collections.abc import AsyncIterator

import httpx
from conftest import User, make_user

from mediad.storage import blob_relpath

from .conftest import (
    Acked,
    CloudProcess,
    MiB,
    NodeFactory,
    acked,
    assert_invariants,
    cloud_states,
    query,
    trickle,
    wait_drained,
    wait_until,
)

TUS = {"Tus-Resumable": "1.0.0"}


def _multipart(data: bytes, name: str) -> tuple[bytes, bytes, str]:
    """(head, tail, content type) of a one-part form around `data`, so that it can be trickled."""
    boundary = uuid.uuid4().hex
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{name}\"\r\n"
            f"Content-Type: application/octet-stream\r\n\r\n").encode()
    return head, f"\r\n--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


async def _multipart_upload(http: httpx.AsyncClient, user: User, data: bytes, n: int) -> Acked:
    head, tail, content_type = _multipart(data, f"m{n}.bin")

    async def body() -> AsyncIterator[bytes]:
        yield head
        async for chunk in trickle(data, pause=0.05):
            yield chunk
        yield tail

    response = await http.post("/files", content=body(), headers={
        **user.auth, "Content-Type": content_type, "Content-Length": str(len(head) + len(data) + len(tail))})
    assert response.status_code == 201, response.text
    return acked(response, data, user.auth)


async def _put_upload(http: httpx.AsyncClient, user: User, data: bytes, n: int) -> Acked:
    response = await http.put(f"/files?path=/crash/p{n}.bin", content=trickle(data, pause=0.05),
                              headers={**user.auth, "Content-Length": str(len(data))})
    assert response.status_code == 201, response.text
    return acked(response, data, user.auth)


async def _tus_create(http: httpx.AsyncClient, user: User, length: int, n: int) -> str:
    meta = f"filename {base64.b64encode(f't{n}.bin'.encode()).decode()}"
    response = await http.post("/uploads", headers={**user.auth, **TUS, "Upload-Length": str(length),
                                                    "Upload-Metadata": meta})
    assert response.status_code == 201, response.text
    return str(response.headers["location"])


async def _tus_patch(http: httpx.AsyncClient, user: User, location: str, data: bytes, offset: int,
                     acknowledged: dict[str, int]) -> Acked:
    """PATCH 1 MiB at a time from `offset`; `acknowledged` keeps the last offset a 204 promised."""
    response = None
    for start in range(offset, len(data), MiB):
        piece = data[start:start + MiB]
        response = await http.patch(location, content=trickle(piece, pause=0.05), headers={
            **user.auth, **TUS, "Upload-Offset": str(start), "Content-Type": "application/offset+octet-stream",
            "Content-Length": str(len(piece))})
        assert response.status_code == 204, (response.status_code, response.text)
        acknowledged[location] = int(response.headers["upload-offset"])
    assert response is not None
    file_id = response.headers["mediad-file-id"]
    return Acked(file_id, hashlib.sha256(data).hexdigest(), len(data), user.auth)


async def test_sigkill_during_16_concurrent_uploads(nodes: NodeFactory, fault_database: str, cloud: CloudProcess,
                                                    started: float) -> None:
    """Multipart, raw PUT and tus uploads in flight at a kill -9: every 2xx survives byte for byte,
    every cut one leaves nothing behind, every tus upload resumes from at least its last 204."""
    node = nodes("a", fault_database, cloud=cloud)
    bodies = [os.urandom(5 * MiB + n * 4099) for n in range(16)]
    done: list[Acked] = []
    tus: dict[int, str] = {}
    acknowledged: dict[str, int] = {}
    async with node.client() as http:
        user = await make_user(http)

        async def upload(n: int) -> None:
            await asyncio.sleep(n * 0.08)
            kind = n % 3
            if kind == 0:
                done.append(await _multipart_upload(http, user, bodies[n], n))
            elif kind == 1:
                done.append(await _put_upload(http, user, bodies[n], n))
            else:
                tus[n] = await _tus_create(http, user, len(bodies[n]), n)
                done.append(await _tus_patch(http, user, tus[n], bodies[n], 0, acknowledged))

        tasks = [asyncio.create_task(upload(n)) for n in range(16)]
        await asyncio.sleep(2.0)
        assert not all(task.done() for task in tasks), "every upload finished before the kill"
        node.kill()
        results = await asyncio.gather(*tasks, return_exceptions=True)
    cut = [r for r in results if isinstance(r, BaseException)]
    assert done and cut, f"{len(done)} finished and {len(cut)} cut: the kill should land in the middle"
    for error in cut:
        assert isinstance(error, httpx.TransportError), repr(error)  # cut off, never a wrong answer

    node.restart()
    async with node.client() as http:
        # Resume every tus upload from where the server says it is: never behind its last 204.
        for n, location in tus.items():
            head = await http.head(location, headers={**user.auth, **TUS})
            if head.status_code == 404:
                continue  # finished before the kill, and so in `done` already
            offset = int(head.headers["upload-offset"])
            assert offset >= acknowledged.get(location, 0), (location, offset, acknowledged.get(location))
            status = (await http.get(location, headers=user.auth)).json()
            if status["file_id"] is not None:
                continue
            done.append(await _tus_patch(http, user, location, bodies[n], offset, acknowledged))
    assert len({a.file_id for a in done}) == len(done)
    await wait_drained(fault_database, timeout=30)
    await assert_invariants(fault_database, [node], started=started, acked=done, cloud=cloud)


async def test_sigkill_during_a_replication_pass(nodes: NodeFactory, fault_database: str, cloud: CloudProcess,
                                                 started: float) -> None:
    """Pushes in flight at a kill -9 hold leases; the restarted node takes its own jobs back at once
    (not after the 60 s lease) and stores every file once, with its sha256."""
    await cloud.set_faults(delay_s=1.0)  # every PUT waits a second before its body is read
    node = nodes("a", fault_database, cloud=cloud, MEDIAD_CLOUD_LEASE_S=60)
    done = []
    async with node.client() as http:
        user = await make_user(http)
        for n in range(12):
            data = os.urandom(MiB + n)
            response = await http.post(f"/files?name=r{n}.bin", content=data, headers=user.auth)
            done.append(acked(response, data, user.auth))

    async def pushing() -> bool:
        stats = await cloud.stats()
        return bool(stats["puts"] >= 4 and await cloud_states(fault_database) != {"stored": 12})

    await wait_until(pushing, 10, "pushes in flight")
    node.kill()
    leased = await query(fault_database, "SELECT count(*) AS n FROM files WHERE cloud_lease_until > now()")
    assert leased[0]["n"] >= 1, "the kill should leave leased pushes behind"
    await cloud.set_faults(delay_s=0)

    node.restart()
    took = await wait_drained(fault_database, timeout=30)
    assert took < 20, f"the restarted node waited {took:.1f} s: its own leases should be taken back at start"
    stats = await cloud.stats()
    assert all(count <= 2 for count in stats["stored_keys"].values()), stats["stored_keys"]
    assert len(await cloud.objects()) == 12
    await assert_invariants(fault_database, [node], started=started, acked=done, cloud=cloud)


async def test_sigkill_during_a_cleanup_eviction_pass(nodes: NodeFactory, fault_database: str,
                                                      cloud: CloudProcess, started: float) -> None:
    """Eviction is row first, then unlink: a kill between the two leaves a file that cleanup
    finishes evicting, never a row without bytes. Evicted files stream from the cloud."""
    node = nodes("a", fault_database, cloud=cloud)
    count = 64
    done: list[Acked] = []
    async with node.client() as http:
        user = await make_user(http)

        async def upload(n: int) -> None:
            data = os.urandom(2048 + n)
            response = await http.post(f"/files?name=e{n}.bin", content=data, headers=user.auth)
            done.append(acked(response, data, user.auth))

        for batch in range(0, count, 16):
            await asyncio.gather(*(upload(n) for n in range(batch, min(batch + 16, count))))
    await wait_drained(fault_database, timeout=60)

    # Every file is evictable now (TTL 0): the first pass starts a second after start.
    node.reconfigure(MEDIAD_LOCAL_TTL_S="0", MEDIAD_CLEANUP_INTERVAL_S="1")

    async def evicting() -> bool:
        rows = await query(fault_database, "SELECT count(*) AS n FROM files WHERE node IS NULL")
        return bool(rows[0]["n"] > 0)

    await wait_until(evicting, 15, "an eviction pass", interval=0.005)
    node.kill()
    evicted = (await query(fault_database, "SELECT count(*) AS n FROM files WHERE node IS NULL"))[0]["n"]
    assert 0 < evicted < count, f"{evicted} of {count} evicted: the kill should land mid-pass"

    node.restart(MEDIAD_LOCAL_TTL_S="604800", MEDIAD_CLEANUP_INTERVAL_S="0")
    await wait_drained(fault_database)
    await assert_invariants(fault_database, [node], started=started, acked=done, cloud=cloud)



async def test_restart_removes_a_blob_whose_row_never_committed(nodes: NodeFactory, fault_database: str,
                                                                started: float) -> None:
    """A kill between an upload's rename into files/ and its row's commit leaves a blob no row
    names. The restart's recovery (alone on the data dir) removes it at once, without the
    cleanup grace; the blob of an acknowledged upload stays."""
    node = nodes("a", fault_database)
    async with node.client() as http:
        user = await make_user(http)
        data = os.urandom(4096)
        kept = acked(await http.post("/files?name=kept.bin", content=data, headers=user.auth), data, user.auth)
    node.kill()
    orphan = node.data_dir / blob_relpath(uuid.uuid4())
    orphan.parent.mkdir(parents=True, exist_ok=True)
    orphan.write_bytes(os.urandom(1000))  # renamed into place; then the process died before COMMIT

    node.restart()
    rows = await query(fault_database, "SELECT blob_id FROM files WHERE node = $1", node.node_id())
    on_disk = {uuid.UUID(hex=path.name) for path in (node.data_dir / "files").rglob("*") if path.is_file()}
    assert on_disk == {row["blob_id"] for row in rows} and not orphan.exists()
    await assert_invariants(fault_database, [node], started=started, acked=[kept])

"""Two `mediad serve` processes on one PostgreSQL and one cloud, and a kill -9 of one of them.

Replication claims only rows whose `node` is the claiming process's data dir: only that disk holds
the bytes. So "B finishes A's jobs" is what two processes on one data dir (one node id) do, once
A's leases run out; two nodes with disks of their own each finish their own jobs, a node coming
back after a crash at once (its start-up pass hands back the leases of its dead predecessor), and
meanwhile the other one reads the stored files through the cloud and answers 503 for the rest.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import uuid
from pathlib import Path
from typing import Any

import httpx
from conftest import Oracle, assert_problem, make_user

from mediad.cloud import cloud_key
from mediad.config import Settings

from .conftest import (
    Acked,
    CloudProcess,
    MiB,
    NodeFactory,
    acked,
    assert_invariants,
    cloud_states,
    query,
    wait_drained,
    wait_until,
)


async def _upload_many(node_url: str, count: int, size: int) -> tuple[list[Acked], dict[str, str]]:
    """`count` uploads at once: their pushes queue up behind each other."""
    async with httpx.AsyncClient(base_url=node_url, timeout=30) as http:
        user = await make_user(http)

        async def upload(n: int) -> Acked:
            data = os.urandom(size + n)
            return acked(await http.post(f"/files?name=n{n}.bin", content=data, headers=user.auth), data, user.auth)

        done = list(await asyncio.gather(*(upload(n) for n in range(count))))
    return done, user.auth


async def _leased(database_url: str) -> dict[uuid.UUID, Any]:
    rows = await query(database_url, "SELECT id, cloud_lease_until FROM files "
                                     "WHERE cloud_state = 'pending' AND cloud_lease_until > now()")
    return {row["id"]: row["cloud_lease_until"] for row in rows}


async def test_two_nodes_share_a_database_and_a_cloud(nodes: NodeFactory, fault_database: str,
                                                      cloud: CloudProcess, started: float) -> None:
    """Upload on A, download on B: 503 with Retry-After while only A's disk has the bytes, then
    read-through from the cloud. kill -9 A mid-replication: B cannot push A's files (it cannot read
    them) and does not try; A restarted pushes them at once; one object per file, its sha256 right."""
    await cloud.set_faults(delay_s=1.5)  # a PUT waits before its body is read: a kill lands mid-push
    a = nodes("a", fault_database, cloud=cloud, MEDIAD_CLOUD_LEASE_S=2)
    b = nodes("b", fault_database, cloud=cloud, MEDIAD_CLOUD_LEASE_S=2)
    assert a.node_id() != b.node_id()
    done, auth = await _upload_many(a.url, 8, MiB)
    pending = await query(fault_database, "SELECT id FROM files WHERE cloud_state = 'pending' LIMIT 1")
    async with b.client() as http:
        early = await http.get(f"/files/{pending[0]['id']}/content", headers=auth)
        assert_problem(early, 503)
        assert early.headers["retry-after"]

    await wait_until(lambda: _leased(fault_database), 10, "pushes in flight")
    a.kill()
    stranded = await _leased(fault_database)
    assert stranded, "the kill should leave leased pushes behind"
    # Past the lease: B has not touched them (a push from B would fail on a missing file).
    await asyncio.sleep(3)
    rows = await query(fault_database, "SELECT id, cloud_state, cloud_attempts FROM files WHERE id = ANY($1)",
                       list(stranded))
    assert all(row["cloud_state"] == "pending" for row in rows), rows
    async with b.client() as http:
        waiting = await http.get(f"/files/{next(iter(stranded))}/content", headers=auth)
        assert_problem(waiting, 503)

    await cloud.set_faults(delay_s=0)
    a.restart()
    took = await wait_drained(fault_database, timeout=20)
    assert took < 10, f"A took {took:.1f} s to push its own files after its restart"
    stats = await cloud.stats()  # one object per file; a PUT the kill did not cut may be repeated
    assert len(stats["stored_keys"]) == len(done) and all(n <= 2 for n in stats["stored_keys"].values())
    await assert_invariants(fault_database, [a, b], started=started, acked=done, cloud=cloud)


async def test_b_finishes_a_s_jobs_on_one_data_dir(nodes: NodeFactory, fault_database: str,
                                                   cloud: CloudProcess, tmp_path: Path, started: float) -> None:
    """Two processes on one data dir (one node id: the supported way to share work): kill -9 A
    mid-replication, and B pushes A's files once A's leases have run out."""
    await cloud.set_faults(delay_s=2.0)  # a PUT waits before its body is read: the kill lands mid-push
    shared = tmp_path / "shared"
    # A's workers outnumber the files, so A claims each one as it commits it, before B polls.
    a = nodes("a", fault_database, cloud=cloud, data_dir=shared, MEDIAD_CLOUD_CONCURRENCY=8)
    b = nodes("b", fault_database, cloud=cloud, data_dir=shared)
    assert a.node_id() == b.node_id()
    done, auth = await _upload_many(a.url, 6, 256 * 1024)
    await wait_until(lambda: _all_leased(fault_database, 6), 10, "A's pushes in flight", interval=0.05)
    # A's leases, read while A holds them (B must wait at least this long for each). Read after the
    # kill, on a loaded machine they could already have run out and be B's own.
    stranded = await _leased(fault_database)
    a.kill()
    assert len(stranded) == 6 and (await cloud.stats())["stored_keys"] == {}, "A's PUTs are cut in their delay"

    took = await wait_drained(fault_database, timeout=30)
    assert not a.alive
    assert took < 15, f"B took {took:.1f} s to finish A's jobs"
    rows = await query(fault_database, "SELECT id, cloud_stored_at FROM files")
    for row in rows:
        assert row["cloud_stored_at"] >= stranded[row["id"]], "B waited for A's lease to run out"
    stats = await cloud.stats()
    assert len(stats["stored_keys"]) == 6 and all(count <= 2 for count in stats["stored_keys"].values())
    async with b.client() as http:  # the same disk: B serves A's uploads locally
        for upload in done:
            response = await http.get(f"/files/{upload.file_id}/content", headers=auth)
            assert hashlib.sha256(response.content).hexdigest() == upload.sha256
    await assert_invariants(fault_database, [a, b], started=started, acked=done, cloud=cloud)


async def _all_leased(database_url: str, count: int) -> bool:
    return len(await _leased(database_url)) == count


class S3Cloud:
    """The moto bucket as the invariants see it: keys and the sha256 of their bytes, via boto3."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.oracle = Oracle(settings)

    @property
    def env(self) -> dict[str, str]:
        s = self.settings
        return {"MEDIAD_S3_ENDPOINT_URL": str(s.s3_endpoint_url), "MEDIAD_S3_BUCKET": str(s.s3_bucket),
                "MEDIAD_S3_ACCESS_KEY": str(s.s3_access_key), "MEDIAD_S3_SECRET_KEY": str(s.s3_secret_key),
                "MEDIAD_S3_REGION": s.s3_region}

    async def objects(self) -> dict[str, str]:
        return {key: hashlib.sha256(await self.oracle.content(key)).hexdigest() for key in await self.oracle.keys()}


async def test_two_nodes_on_s3(nodes: NodeFactory, fault_database: str, s3_settings: Settings,
                               started: float) -> None:
    """The same with S3 (moto's server): upload on A, read-through on B; kill -9 A while it
    replicates, restart it; every file ends stored: one object per file, with its sha256."""
    s3 = S3Cloud(s3_settings)
    a = nodes("a", fault_database, cloud=s3, MEDIAD_CLOUD_CONCURRENCY=1)  # a queue that backs up
    b = nodes("b", fault_database, cloud=s3)
    done, auth = await _upload_many(a.url, 8, MiB)
    a.kill()  # mid-replication: one worker, and eight files committed at once
    assert (await cloud_states(fault_database)).get("pending"), "the kill should land mid-replication"
    a.restart()
    await wait_drained(fault_database, timeout=30)
    keys = await s3.oracle.keys()
    rows = await query(fault_database, "SELECT blob_id FROM files")
    assert sorted(keys) == sorted(cloud_key(row["blob_id"]) for row in rows)
    async with b.client() as http:
        for upload in done:
            response = await http.get(f"/files/{upload.file_id}/content", headers=auth)
            assert response.status_code == 200 and hashlib.sha256(response.content).hexdigest() == upload.sha256
    await assert_invariants(fault_database, [a, b], started=started, acked=done, cloud=s3)

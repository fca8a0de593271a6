"""A misbehaving cloud, then none: local uploads and downloads carry on, and replication catches up."""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import time

import httpx
from conftest import make_user

from .conftest import Acked, CloudProcess, NodeFactory, acked, assert_invariants, cloud_states, wait_drained

# The "a minute" of each, scaled down so that the suite fits in CI's five minutes; set
# MEDIAD_FAULTS_PHASE_S=60 for the full-length run.
PHASE_S = float(os.environ.get("MEDIAD_FAULTS_PHASE_S", "5"))


async def _traffic(http: httpx.AsyncClient, auth: dict[str, str], done: list[Acked], seconds: float,
                   rng: random.Random) -> int:
    """Upload and download local files for `seconds`: every request must succeed."""
    requests = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        data = os.urandom(rng.randrange(1, 512 * 1024))
        response = await http.post("/files?name=flaky.bin", content=data, headers=auth)
        assert response.status_code == 201, response.text
        done.append(acked(response, data, auth))
        sample = rng.choice(done)
        got = await http.get(f"/files/{sample.file_id}/content", headers=auth)
        assert got.status_code == 200 and hashlib.sha256(got.content).hexdigest() == sample.sha256
        assert (await http.get("/health")).status_code == 200
        requests += 3
        await asyncio.sleep(0.05)
    return requests


async def test_flaky_then_down_cloud(nodes: NodeFactory, fault_database: str, cloud: CloudProcess,
                                     started: float) -> None:
    """Half the cloud's requests fail (503), the rest are slow, a fifth of its PUT answers carry a
    wrong sha256; then it is down. mediad answers every local request throughout; once the cloud is
    back every file ends `stored`, and no object holds bytes other than its file's."""
    node = nodes("a", fault_database, cloud=cloud)
    rng = random.Random(12)
    done: list[Acked] = []
    async with node.client() as http:
        user = await make_user(http)
        await cloud.set_faults(fail_rate=0.5, delay_s=0.2, cut_rate=0.2, seed=12)
        await _traffic(http, user.auth, done, PHASE_S, rng)
        stats = await cloud.stats()
        assert stats["puts"] > len(stats["stored_keys"]), "the faults should have made pushes fail"

        cloud.kill()
        before = await cloud_states(fault_database)
        await _traffic(http, user.auth, done, PHASE_S, rng)
        ping = await http.get("/ping/all")
        assert ping.status_code == 200 and ping.json()["cloud"] is None
        assert before.get("pending", 0) > 0, "files uploaded while the cloud misbehaved wait for it"

        cloud.start()  # back, with its objects, and no faults
        took = await wait_drained(fault_database, timeout=30)
    assert took < 15, f"replication took {took:.1f} s to catch up"
    assert "failed" not in await cloud_states(fault_database)
    await assert_invariants(fault_database, [node], started=started, acked=done, cloud=cloud)

"""`mediad serve --workers N`: one service on one port, answered by N worker processes.

Which worker answered a request is read from the kernel: the worker process holding the server
side of the test's connection (psutil, from /proc). Workers are the children of `mediad serve`
other than its mock cloud and multiprocessing's resource tracker.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import signal
import subprocess
import time
from collections.abc import Set as AbstractSet
from pathlib import Path

import httpx
import psutil
import pytest
from conftest import make_user, mediad_process, read_response, request_head
from prometheus_client.parser import text_string_to_metric_families

from mediad.cloud import cloud_key

from .conftest import (
    Acked,
    CloudProcess,
    MiB,
    Node,
    NodeFactory,
    acked,
    assert_invariants,
    query,
    wait_drained,
    wait_until,
)

TWO = {"MEDIAD_WORKERS": "2"}


def workers_of(process: subprocess.Popen[bytes]) -> set[int]:
    """The live worker processes of a `mediad serve`."""
    pids = set()
    for child in psutil.Process(process.pid).children():
        with contextlib.suppress(psutil.Error):
            command = " ".join(child.cmdline())
            if child.status() != psutil.STATUS_ZOMBIE and "mock-cloud" not in command \
                    and "resource_tracker" not in command:
                pids.add(child.pid)
    return pids


async def wait_workers(node: Node, count: int, timeout: float = 60,
                       without: AbstractSet[int] = frozenset()) -> set[int]:
    """The node's worker pids once there are `count` of them and none is in `without`."""
    assert node.server is not None and node.server.process is not None
    found: set[int] = set()

    def ready() -> bool:
        nonlocal found
        found = workers_of(node.server.process)  # type: ignore[union-attr]
        return len(found) == count and not found & without

    await wait_until(ready, timeout, f"{count} workers other than {sorted(without)}")
    return found


def answering_worker(workers: set[int], client_port: int) -> int | None:
    """The worker holding the server side of the connection from `client_port`."""
    for pid in workers:
        with contextlib.suppress(psutil.Error):
            for conn in psutil.Process(pid).net_connections("tcp"):
                if conn.raddr and conn.raddr.port == client_port:
                    return pid
    return None


async def request_on_new_connection(url: str, target: str, service: subprocess.Popen[bytes],
                                    headers: dict[str, str] | None = None) -> tuple[int, int | None]:
    """GET `target` on a connection of its own → (status, the worker of `service` that answered)."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(request_head("GET", target, headers or {}))
        response = await read_response(reader)
        # Still open (keep-alive): the answering worker holds its end.
        return response.status_code, answering_worker(workers_of(service), writer.get_extra_info("sockname")[1])
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def spread(node: Node, workers: set[int], target: str, most: int = 2000,
                 seconds: float = 60) -> tuple[int, dict[int, int]]:
    """New connections, one at a time, until each of `workers` has answered at least 3 of them (the
    kernel hands each to whichever worker accepts first; a worker still starting accepts none)
    → (requests sent, answers per worker)."""
    assert node.server is not None and node.server.process is not None
    answered = dict.fromkeys(workers, 0)
    deadline = time.monotonic() + seconds
    for sent in range(1, most + 1):
        assert time.monotonic() < deadline, f"not every worker answered within {seconds} s: {answered}"
        status, pid = await request_on_new_connection(node.url, target, node.server.process)
        assert status == 401, status
        assert pid in answered, (pid, workers)
        answered[pid] += 1
        if min(answered.values()) >= 3:
            return sent, answered
    raise AssertionError(f"{most} connections did not reach every worker: {answered}")


def metric(text: str, name: str, **labels: str) -> float:
    """The sum of a metric's samples whose labels include `labels` (0 when there are none)."""
    return sum(sample.value for family in text_string_to_metric_families(text) for sample in family.samples
               if sample.name == name and labels.items() <= sample.labels.items())


# ---- one port, several workers -------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["uvicorn", "granian"])
async def test_two_workers_answer_on_one_port(kind: str, nodes: NodeFactory, fault_database: str) -> None:
    if kind == "granian":
        pytest.importorskip("granian")
    node = nodes("a", fault_database, server=kind, **TWO)
    workers = await wait_workers(node, 2)
    sent, answered = await spread(node, workers, "/usage")
    assert set(answered) == workers and sum(answered.values()) == sent


async def test_metrics_sum_the_requests_of_every_worker(nodes: NodeFactory, fault_database: str) -> None:
    node = nodes("a", fault_database, **TWO)
    workers = await wait_workers(node, 2)
    # /usage without a token: a route nothing else calls (the start-up health checks do not count).
    sent, answered = await spread(node, workers, "/usage")
    async with node.client() as http:
        text = (await http.get("/metrics")).text
    assert metric(text, "mediad_http_requests_total", route="/usage", method="GET", status="401") == sent
    assert metric(text, "mediad_http_request_duration_seconds_count", route="/usage", method="GET") == sent
    assert metric(text, "mediad_uploads_in_flight") == 0
    assert metric(text, "mediad_database_up") == 1


async def test_a_killed_worker_is_replaced_while_the_other_answers(
        nodes: NodeFactory, fault_database: str, started: float) -> None:
    node = nodes("a", fault_database, **TWO)
    workers = await wait_workers(node, 2)
    async with node.client() as http:
        user = await make_user(http)
        data = os.urandom(32 * MiB)
        response = await http.put("/files?path=/big.bin", headers=user.auth, content=data)
        assert response.status_code == 201, response.text
        upload = acked(response, data, user.auth)

    # A download the client stops reading after its first bytes: its worker is busy sending it.
    host, port = node.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(request_head("GET", f"/files/{upload.file_id}/content", user.auth))
    assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
    await reader.readexactly(64 * 1024)
    victim = answering_worker(workers, writer.get_extra_info("sockname")[1])
    assert victim in workers
    os.kill(victim, signal.SIGKILL)

    # The download is cut short; the service answers throughout, and a new worker takes the place.
    with pytest.raises((asyncio.IncompleteReadError, ConnectionError)):
        async with asyncio.timeout(30):
            await reader.readexactly(len(data))
    writer.close()
    statuses = []

    async def replaced() -> bool:
        status, _ = await request_on_new_connection(node.url, "/health", node.server.process)  # type: ignore[union-attr]
        statuses.append(status)
        found = workers_of(node.server.process)  # type: ignore[union-attr]
        return len(found) == 2 and victim not in found

    await wait_until(replaced, 60, "a new worker in place of the killed one", interval=0.05)
    assert statuses and set(statuses) == {200}, statuses
    newcomer = (await wait_workers(node, 2, without={victim})) - workers
    assert len(newcomer) == 1
    await spread(node, workers - {victim} | newcomer, "/usage")  # both serve, the new one too
    await assert_invariants(fault_database, [node], started=started, acked=[upload])


# ---- stopping -------------------------------------------------------------------------------------

def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _postmaster_pid(pgdata: Path) -> int:
    return int((pgdata / "postmaster.pid").read_text().split()[0])


@pytest.mark.parametrize("kind", ["uvicorn", "granian"])
async def test_sigterm_stops_every_worker_the_database_and_the_cloud(kind: str, tmp_path: Path) -> None:
    if kind == "granian":
        pytest.importorskip("granian")
    data_dir = tmp_path / "data"
    # The embedded PostgreSQL and the bundled mock cloud: what a bare `mediad serve` starts.
    with mediad_process(data_dir, database_url=None, server=kind, env=TWO) as running:
        assert running.process is not None
        supervisor = psutil.Process(running.process.pid)
        deadline = time.monotonic() + 60
        while len(workers_of(running.process)) < 2:
            assert time.monotonic() < deadline, "two workers did not start"
            await asyncio.sleep(0.1)
        owned = {child.pid for child in supervisor.children(recursive=True)}
        postmaster = _postmaster_pid(data_dir / "pg")
        assert len(owned) >= 3 and psutil.pid_exists(postmaster)  # two workers and the mock cloud
        running.process.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(running.process.wait, 60) == 0

    await wait_until(lambda: all(gone(pid) for pid in owned | {postmaster}), 10, "every process to exit")
    assert not (data_dir / "pg" / "postmaster.pid").exists()  # stopped, not killed


# ---- background work, exactly once --------------------------------------------------------------

async def _upload_many(node: Node, count: int, size: int) -> list[Acked]:
    async with httpx.AsyncClient(base_url=node.url, timeout=60,
                                 limits=httpx.Limits(max_connections=count)) as http:
        user = await make_user(http)

        async def one(n: int) -> Acked:
            data = os.urandom(size)
            response = await http.put(f"/files?path=/w/{n}.bin", headers=user.auth, content=data)
            assert response.status_code == 201, response.text
            return acked(response, data, user.auth)

        return list(await asyncio.gather(*(one(n) for n in range(count))))


async def test_replication_pushes_each_upload_once_under_two_workers(
        nodes: NodeFactory, fault_database: str, cloud: CloudProcess, started: float) -> None:
    # Both workers poll for due rows every 0.3 s and race for each: the row lease decides.
    node = nodes("a", fault_database, cloud=cloud, **TWO)
    await wait_workers(node, 2)
    uploads = await _upload_many(node, 20, 256 * 1024)
    await wait_drained(fault_database)
    await asyncio.sleep(1)  # a second push, were there one, would land meanwhile
    stats = await cloud.stats()
    keys = {cloud_key(row["blob_id"]) for row in await query(fault_database, "SELECT blob_id FROM files")}
    assert stats["puts"] == 20, stats
    assert stats["put_keys"] == dict.fromkeys(keys, 1)
    await assert_invariants(fault_database, [node], started=started, acked=uploads, cloud=cloud)


def _flock_holders(lock_file: Path) -> set[int]:
    """Pids holding an flock on `lock_file`, from /proc/locks ("1: FLOCK ADVISORY WRITE pid maj:min:ino …")."""
    try:
        inode = os.stat(lock_file).st_ino
    except FileNotFoundError:
        return set()
    holders = set()
    for line in Path("/proc/locks").read_text().splitlines():
        fields = line.split()
        if len(fields) >= 6 and fields[1] == "FLOCK" and "->" not in fields \
                and re.fullmatch(rf"[0-9a-f]+:[0-9a-f]+:{inode}", fields[5]):
            holders.add(int(fields[4]))
    return holders


async def test_one_cleanup_pass_at_a_time_across_workers(
        nodes: NodeFactory, fault_database: str, cloud: CloudProcess) -> None:
    # Every file is evictable once stored; both workers try a pass every 0.1 s.
    node = nodes("a", fault_database, cloud=cloud, MEDIAD_LOCAL_TTL_S="0", MEDIAD_CLEANUP_INTERVAL_S="0.1", **TWO)
    workers = await wait_workers(node, 2)
    lock_file = node.data_dir / "cleanup.lock"
    seen: set[int] = set()
    most_at_once = 0

    async def watch() -> None:
        nonlocal most_at_once
        while True:
            holders = _flock_holders(lock_file)
            most_at_once = max(most_at_once, len(holders))
            seen.update(holders)
            await asyncio.sleep(0.002)

    watcher = asyncio.create_task(watch())
    try:
        uploads = await _upload_many(node, 12, 64 * 1024)
        await wait_drained(fault_database)

        async def evicted() -> bool:
            rows = await query(fault_database, "SELECT count(*) AS n FROM files WHERE node IS NOT NULL")
            return rows[0]["n"] == 0

        await wait_until(evicted, 30, "every local copy to be evicted")
        await wait_until(lambda: seen >= workers, 30, f"both workers {sorted(workers)} to run a pass: {seen}")
    finally:
        watcher.cancel()
    assert most_at_once == 1 and seen == workers
    async with node.client() as http:
        text = (await http.get("/metrics")).text
    # Each eviction counted once, by whichever worker did it, and summed over both.
    assert metric(text, "mediad_cleanup_evicted_files_total") == len(uploads)
    assert metric(text, "mediad_cleanup_freed_bytes_total") == len(uploads) * 64 * 1024
    async with node.client() as http:
        for upload in uploads[:3]:  # read back through the cloud
            response = await http.get(f"/files/{upload.file_id}/content", headers=upload.auth)
            assert response.status_code == 200 and hashlib.sha256(response.content).hexdigest() == upload.sha256


@pytest.mark.parametrize("kind", ["uvicorn", "granian"])
async def test_kill_9_of_the_supervisor_takes_its_workers(kind: str, nodes: NodeFactory, fault_database: str) -> None:
    if kind == "granian":
        pytest.importorskip("granian")
    node = nodes("a", fault_database, server=kind, **TWO)
    workers = await wait_workers(node, 2)
    node.kill()

    await wait_until(lambda: all(gone(pid) for pid in workers), 10,
                     f"workers {sorted(workers)} to die with their supervisor")
    node.start()  # the port and the data dir are free again: a new service starts and answers
    await wait_workers(node, 2, without=workers)
    async with node.client() as http:
        assert (await http.get("/health")).status_code == 200


async def test_uploads_in_flight_forget_a_killed_worker(nodes: NodeFactory, fault_database: str) -> None:
    node = nodes("a", fault_database, **TWO)
    workers = await wait_workers(node, 2)
    async with node.client() as http:
        user = await make_user(http)
    # An upload whose body stops halfway: its worker counts it in flight until it is killed.
    host, port = node.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(request_head("PUT", "/files?path=/half.bin", {**user.auth, "Content-Length": str(MiB)}))
    writer.write(os.urandom(MiB // 2))
    await writer.drain()
    # The bytes wait in the kernel's buffers until a worker accepts the connection, maybe later.
    client_port = writer.get_extra_info("sockname")[1]
    await wait_until(lambda: answering_worker(workers, client_port) is not None, 10,
                     "a worker to accept the upload's connection")
    uploader = answering_worker(workers, client_port)
    assert uploader in workers

    async def in_flight() -> float:
        async with node.client() as http:
            return metric((await http.get("/metrics")).text, "mediad_uploads_in_flight")

    async def counted() -> bool:
        return await in_flight() == 1

    await wait_until(counted, 10, "the upload to be counted in flight")
    os.kill(uploader, signal.SIGKILL)
    writer.close()
    await wait_workers(node, 2, without={uploader})
    assert await in_flight() == 0

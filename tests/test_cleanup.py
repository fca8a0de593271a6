"""Local disk cleanup: eviction only of cloud-stored files, LRU under pressure, sweeping leftovers."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import media_samples as samples
import pytest
from conftest import MockCloud, Server, User, cloud_settings, make_settings, make_user, serve_in_thread, wait_for

from mediad import db
from mediad.cleanup import DiskUsage, Report, _lost_bytes, bytes_to_free, sweep
from mediad.db import create_engine
from mediad.storage import Storage, blob_relpath

MiB = 1024 * 1024


def test_bytes_to_free_goes_from_high_to_low_water() -> None:
    assert bytes_to_free(DiskUsage(total=1000, free=200), 0.90) == 0  # 80 % used: below high water
    assert bytes_to_free(DiskUsage(total=1000, free=50), 0.90) == 151  # 95 % → 80 %: free 150 (+1)


async def _sql(url: str, query: str, *args: Any) -> Any:
    conn = await asyncpg.connect(url)
    try:
        return await conn.fetch(query, *args)
    finally:
        await conn.close()


async def _wait_stored(http: httpx.AsyncClient, user: User, ids: list[str]) -> None:
    async def done() -> bool:
        listed = (await http.get("/files?limit=1000", headers=user.auth)).json()["files"]
        states = {f["id"]: f["cloud"]["state"] for f in listed}
        return all(states.get(i) == "stored" for i in ids)

    await wait_for(done, what="stored in the cloud")


async def _upload(http: httpx.AsyncClient, user: User, name: str, body: bytes) -> str:
    response = await http.post(f"/files?name={name}", content=body, headers=user.auth)
    assert response.status_code == 201
    return str(response.json()["id"])


def _blob_exists(server: Server, blob_id: uuid.UUID) -> bool:
    return (server.data_dir / blob_relpath(blob_id)).exists()


class Scene:
    """A server replicating to the mock cloud, with a user, and direct access for assertions."""

    def __init__(self, server: Server, http: httpx.AsyncClient, user: User, settings: Any) -> None:
        self.server, self.http, self.user, self.settings = server, http, user, settings

    async def rows(self) -> dict[str, Any]:
        rows = await _sql(self.server.database_url,
                         "SELECT id, blob_id, node IS NOT NULL AS local, cloud_state FROM files")
        return {str(r["id"]): r for r in rows}

    async def sweep(self, **kwargs: Any) -> Any:
        engine = create_engine(self.server.database_url, self.settings)
        try:
            storage = Storage(self.server.data_dir)
            storage.prepare()
            return await sweep(engine, storage, self.settings, **kwargs)
        finally:
            await engine.dispose()


@pytest.fixture
async def scene(database_url: str, tmp_path: Path, mock_cloud: MockCloud) -> AsyncIterator[Scene]:
    settings = cloud_settings(tmp_path / "data", mock_cloud, cleanup_interval_s=0, local_ttl_s=3600)
    with serve_in_thread(settings, database_url) as running:
        async with httpx.AsyncClient(base_url=running.url, timeout=60) as http:
            yield Scene(running, http, await make_user(http), settings)


async def test_ttl_evicts_only_stored_files_and_downloads_still_work(
        scene: Scene, mock_cloud: MockCloud) -> None:
    body = os.urandom(300_000)
    stored_id = await _upload(scene.http, scene.user, "stored.bin", body)
    await _wait_stored(scene.http, scene.user, [stored_id])
    await mock_cloud.set_faults(fail_rate=1.0)
    pending_id = await _upload(scene.http, scene.user, "pending.bin", b"not in the cloud")

    report = await scene.sweep(now=datetime.now(UTC) + timedelta(hours=2))
    assert report.evicted_files == 1 and report.evicted_bytes == len(body)
    rows = await scene.rows()
    assert rows[stored_id]["local"] is False and not _blob_exists(scene.server, rows[stored_id]["blob_id"])
    assert rows[pending_id]["local"] is True and _blob_exists(scene.server, rows[pending_id]["blob_id"])

    await mock_cloud.set_faults(fail_rate=0.0)
    again = await scene.http.get(f"/files/{stored_id}/content", headers=scene.user.auth)
    assert again.status_code == 200 and again.content == body
    assert (await scene.http.get(f"/files/{stored_id}", headers=scene.user.auth)).json()["local"] is False


async def test_recently_accessed_files_are_kept_by_the_ttl(scene: Scene) -> None:
    file_id = await _upload(scene.http, scene.user, "fresh.bin", b"fresh")
    await _wait_stored(scene.http, scene.user, [file_id])
    report = await scene.sweep(now=datetime.now(UTC) + timedelta(minutes=30))
    assert report.evicted_files == 0
    assert (await scene.rows())[file_id]["local"] is True


async def test_pressure_evicts_least_recently_accessed_first_down_to_low_water(scene: Scene) -> None:
    ids = [await _upload(scene.http, scene.user, f"{n}.bin", os.urandom(100_000)) for n in range(5)]
    await _wait_stored(scene.http, scene.user, ids)
    base = datetime.now(UTC) - timedelta(minutes=10)
    order = [ids[3], ids[0], ids[4], ids[1], ids[2]]  # least recently accessed first
    for minutes, file_id in enumerate(order):
        await _sql(scene.server.database_url, "UPDATE files SET accessed_at = $1 WHERE id = $2",
                   base + timedelta(minutes=minutes), uuid.UUID(file_id))
    # 95 % used of 1,000,000: low water is 80 %, so 150,001 bytes must go: two files of 100,000.
    report = await scene.sweep(usage=DiskUsage(total=1_000_000, free=50_000))
    assert report.evicted_files == 2 and not report.pressure_unrelieved
    rows = await scene.rows()
    assert [rows[i]["local"] for i in order] == [False, False, True, True, True]


async def test_unreplicated_files_survive_any_pressure(scene: Scene, mock_cloud: MockCloud) -> None:
    await mock_cloud.set_faults(fail_rate=1.0)
    ids = [await _upload(scene.http, scene.user, f"{n}.bin", b"x" * 1000) for n in range(3)]
    report = await scene.sweep(usage=DiskUsage(total=1_000_000, free=1_000))
    assert report.evicted_files == 0 and report.pressure_unrelieved
    rows = await scene.rows()
    assert all(rows[i]["local"] and _blob_exists(scene.server, rows[i]["blob_id"]) for i in ids)


async def test_temp_and_orphan_files_go_only_after_the_grace_period(scene: Scene) -> None:
    data = scene.server.data_dir
    old, new = time.time() - 2 * 3600, time.time() - 60
    paths = {}
    for label, mtime in (("old", old), ("new", new)):
        temp = data / "tmp" / f"{uuid.uuid4().hex}.part"
        orphan = data / blob_relpath(uuid.uuid4())
        orphan.parent.mkdir(parents=True, exist_ok=True)
        for path in (temp, orphan):
            path.write_bytes(b"leftover")
            os.utime(path, (mtime, mtime))
        paths[label] = (temp, orphan)
    kept_id = await _upload(scene.http, scene.user, "kept.bin", b"owned by a row")
    kept_blob = (await scene.rows())[kept_id]["blob_id"]
    os.utime(data / blob_relpath(kept_blob), (old, old))

    report = await scene.sweep()
    assert (report.temp_removed, report.orphans_removed) == (1, 1)
    assert not any(p.exists() for p in paths["old"])
    assert all(p.exists() for p in paths["new"])
    assert _blob_exists(scene.server, kept_blob)


async def test_missing_bytes_without_a_cloud_copy_are_reported_as_data_loss(
        scene: Scene, mock_cloud: MockCloud) -> None:
    await mock_cloud.set_faults(fail_rate=1.0)
    file_id = await _upload(scene.http, scene.user, "lost.bin", b"gone")
    (scene.server.data_dir / blob_relpath((await scene.rows())[file_id]["blob_id"])).unlink()
    report = await scene.sweep()
    assert report.missing == [file_id]


async def test_download_in_flight_during_eviction_gets_the_whole_file(scene: Scene) -> None:
    body = os.urandom(24 * MiB)
    file_id = await _upload(scene.http, scene.user, "big.bin", body)
    await _wait_stored(scene.http, scene.user, [file_id])
    digest = hashlib.sha256()
    async with scene.http.stream("GET", f"/files/{file_id}/content", headers=scene.user.auth) as response:
        chunks = response.aiter_bytes()
        digest.update(await chunks.__anext__())
        report = await scene.sweep(now=datetime.now(UTC) + timedelta(hours=2))
        assert report.evicted_files == 1
        async for chunk in chunks:
            digest.update(chunk)
    assert digest.hexdigest() == hashlib.sha256(body).hexdigest()
    after = await scene.http.get(f"/files/{file_id}/content", headers={**scene.user.auth, "Range": "bytes=-100"})
    assert after.status_code == 206 and after.content == body[-100:]


def _cli(args: list[str], settings: Any, database_url: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEDIAD_")}
    env.update({"MEDIAD_DATABASE_URL": database_url, "MEDIAD_DATA_DIR": str(settings.data_dir),
                "MEDIAD_LOCAL_TTL_S": "0"})
    return subprocess.run([sys.executable, "-m", "mediad.cli", "cleanup", *args], env=env,
                          capture_output=True, text=True, timeout=60)


async def test_dry_run_changes_nothing_and_the_command_evicts(scene: Scene) -> None:
    ids = [await _upload(scene.http, scene.user, f"{n}.bin", b"payload %d" % n) for n in range(3)]
    await _wait_stored(scene.http, scene.user, ids)
    before = {k: dict(v) for k, v in (await scene.rows()).items()}
    files_before = sorted(scene.server.blob_files())

    dry = await asyncio.to_thread(_cli, ["--once", "--dry-run"], scene.settings, scene.server.database_url)
    assert dry.returncode == 0, dry.stderr
    assert sum(line.startswith("evict ") for line in dry.stdout.splitlines()) == 3
    assert json.loads(dry.stdout.splitlines()[-1])["evicted_files"] == 3
    assert {k: dict(v) for k, v in (await scene.rows()).items()} == before
    assert sorted(scene.server.blob_files()) == files_before

    real = await asyncio.to_thread(_cli, ["--once"], scene.settings, scene.server.database_url)
    assert real.returncode == 0, real.stderr
    assert json.loads(real.stdout.splitlines()[-1])["evicted_files"] == 3
    assert not any(r["local"] for r in (await scene.rows()).values())
    assert scene.server.blob_files() == []


async def test_the_lifespan_loop_evicts_like_the_command(database_url: str, tmp_path: Path,
                                                        mock_cloud: MockCloud) -> None:
    settings = cloud_settings(tmp_path / "data", mock_cloud, cleanup_interval_s=0.5, local_ttl_s=0)
    with serve_in_thread(settings, database_url) as running:
        async with httpx.AsyncClient(base_url=running.url, timeout=60) as http:
            user = await make_user(http)
            ids = [await _upload(http, user, f"{n}.bin", b"loop %d" % n) for n in range(3)]

            async def all_evicted() -> bool:
                listed = (await http.get("/files", headers=user.auth)).json()["files"]
                return len(listed) == 3 and not any(f["local"] for f in listed)

            await wait_for(all_evicted, timeout=30, what="the loop to evict")
            assert running.blob_files() == []
            assert (await http.get(f"/files/{ids[0]}/content", headers=user.auth)).content == b"loop 0"


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("mount") is None, reason="mounting a tmpfs needs root")
async def test_real_disk_pressure_on_a_small_tmpfs(database_url: str, tmp_path: Path,
                                                   mock_cloud: MockCloud) -> None:
    mount = tmp_path / "small"
    mount.mkdir()
    await asyncio.to_thread(subprocess.run, ["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount)],
                            check=True)
    try:
        settings = cloud_settings(mount / "data", mock_cloud, cleanup_interval_s=0, disk_high_water=0.5)
        with serve_in_thread(settings, database_url) as running:
            async with httpx.AsyncClient(base_url=running.url, timeout=60) as http:
                user = await make_user(http)
                ids = [await _upload(http, user, f"{n}.bin", os.urandom(2 * MiB)) for n in range(5)]
                await _wait_stored(http, user, ids)
                scene = Scene(running, http, user, settings)
                report = await scene.sweep()  # 10 MiB of 16 MiB used: 62 % > 50 %
                assert report.evicted_files >= 2 and not report.pressure_unrelieved
                stat = os.statvfs(mount)
                assert 1 - stat.f_bavail / stat.f_blocks < 0.4 + 0.01
    finally:
        await asyncio.to_thread(subprocess.run, ["umount", "-l", str(mount)], check=False)


async def _probed(scene: Scene, file_id: str) -> dict[str, Any]:
    async def done() -> bool:
        return (await scene.http.get(f"/files/{file_id}", headers=scene.user.auth)).json()["media"] is not None

    await wait_for(done, timeout=40, what="the probe")
    media: dict[str, Any] = (await scene.http.get(f"/files/{file_id}", headers=scene.user.auth)).json()["media"]
    return media


async def test_a_file_waiting_for_its_probe_keeps_its_local_copy(scene: Scene) -> None:
    file_id = await _upload(scene.http, scene.user, "pic.png", samples.png_alpha(32, 24))
    await _wait_stored(scene.http, scene.user, [file_id])
    await _probed(scene, file_id)
    # As while a probe of it runs (or waits for a busy pool): pending, leased to a prober.
    await _sql(scene.server.database_url, "UPDATE files SET media_state = 'pending', media = NULL, "
               "media_lease_until = now() + interval '1 hour' WHERE id = $1", uuid.UUID(file_id))
    later = datetime.now(UTC) + timedelta(hours=2)
    report = await scene.sweep(now=later, usage=DiskUsage(total=1_000_000, free=1_000))
    assert (report.evicted_files, report.pressure_unrelieved) == (0, True)
    row = (await scene.rows())[file_id]
    assert row["local"] is True and _blob_exists(scene.server, row["blob_id"])

    # The probe can still read the bytes; once it has, the file goes like any other.
    await _sql(scene.server.database_url, "UPDATE files SET media_lease_until = NULL WHERE id = $1",
               uuid.UUID(file_id))
    nudge = await _upload(scene.http, scene.user, "nudge.txt", b"a commit wakes the prober")
    media = await _probed(scene, file_id)
    assert (media["status"], media["width"], media["height"]) == ("ready", 32, 24)
    await _wait_stored(scene.http, scene.user, [nudge])
    assert (await scene.sweep(now=later)).evicted_files == 2  # nudge.txt too
    assert (await scene.rows())[file_id]["local"] is False


async def test_files_deleted_or_replaced_during_the_scan_are_not_reported_lost(
        scene: Scene, mock_cloud: MockCloud, caplog: pytest.LogCaptureFixture) -> None:
    await mock_cloud.set_faults(fail_rate=1.0)  # no cloud copies: bytes gone from disk would be lost
    deleted = await _upload(scene.http, scene.user, "deleted.bin", b"deleted meanwhile")
    replaced = (await scene.http.put("/files?path=/r.bin", content=b"first", headers=scene.user.auth)).json()["id"]
    lost = await _upload(scene.http, scene.user, "lost.bin", b"really gone")
    engine = create_engine(scene.server.database_url, scene.settings)
    try:
        storage = Storage(scene.server.data_dir)
        storage.prepare()
        assert storage.node_id is not None
        async with engine.connect() as conn:  # the rows as a pass reads them before its disk scan
            before = {str(row.id): row for row in await db.local_state(conn, storage.node_id)}
        # While the scan runs: one file is deleted, one replaced (their old bytes go with them),
        # and one file's bytes vanish behind mediad's back.
        assert (await scene.http.delete(f"/files/{deleted}", headers=scene.user.auth)).status_code == 204
        again = await scene.http.put("/files?path=/r.bin", content=b"second", headers=scene.user.auth)
        assert again.status_code == 200
        (scene.server.data_dir / blob_relpath(before[lost].blob_id)).unlink()
        assert not any(_blob_exists(scene.server, before[i].blob_id) for i in (deleted, replaced, lost))

        report = Report()
        for file_id in (deleted, replaced, lost):  # what the pass does with each row the scan missed
            await _lost_bytes(engine, storage, before[file_id], report)
    finally:
        await engine.dispose()
    assert report.missing == [lost]
    errors = [r.getMessage() for r in caplog.records if r.name == "mediad.cleanup" and r.levelno >= logging.ERROR]
    assert errors == [f"DATA LOSS: file {lost} has no local bytes and no cloud copy"]


async def test_a_server_whose_passes_are_off_still_records_access_times(database_url: str, tmp_path: Path) -> None:
    """MEDIAD_CLEANUP_INTERVAL_S=0 leaves the passes to a `mediad cleanup` worker, which evicts
    the least recently used first: the server must still record what it serves as it goes."""
    settings = make_settings(tmp_path / "data", cleanup_interval_s=0)
    with serve_in_thread(settings, database_url) as running:
        async with httpx.AsyncClient(base_url=running.url, timeout=30) as http:
            user = await make_user(http)
            file = (await http.put("/files", params={"path": "/read.bin"}, content=b"x" * 100,
                                   headers=user.auth)).json()
            [before] = await _sql(database_url, "SELECT accessed_at FROM files WHERE id = $1", uuid.UUID(file["id"]))
            assert (await http.get(f"/files/{file['id']}/content", headers=user.auth)).status_code == 200

            async def recorded() -> bool:
                [row] = await _sql(database_url, "SELECT accessed_at FROM files WHERE id = $1", uuid.UUID(file["id"]))
                return bool(row["accessed_at"] > before["accessed_at"])

            await wait_for(recorded, timeout=15, what="the download's access time, while the server runs")

"""`mediad cleanup` as a worker beside the server (the Procfile's `cleanup`)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from conftest import fresh_database


@contextlib.contextmanager
def cleanup_worker(tmp_path: Path, **variables: str) -> Iterator[tuple[subprocess.Popen[bytes], Path, Path]]:
    """`mediad cleanup` as a worker, once its first pass is reported; → (process, stdout, stderr).
    Killed at the end if the test left it running."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEDIAD_")}
    env.update({"MEDIAD_DATA_DIR": str(tmp_path / "data"), **variables})
    out, err = tmp_path / "cleanup.out", tmp_path / "cleanup.err"
    with open(out, "wb") as stdout, open(err, "wb") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "mediad.cli", "cleanup"], env=env, stdout=stdout,
                                stderr=stderr)
    try:
        deadline = time.monotonic() + 60
        while not out.read_bytes().count(b"\n") and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert proc.poll() is None, err.read_text()[-3000:]
        yield proc, out, err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_the_worker_passes_at_the_default_interval_when_the_servers_loop_is_off(
        tmp_path: Path, database_url: str) -> None:
    """MEDIAD_CLEANUP_INTERVAL_S=0 switches off the server's own loop, which is when the cleanup
    runs as a worker of its own; with the same settings the worker must not pass every 0 s."""
    with cleanup_worker(tmp_path, MEDIAD_DATABASE_URL=database_url, MEDIAD_CLEANUP_INTERVAL_S="0") as (proc, out, err):
        time.sleep(3)  # spinning, it made hundreds of passes in this time
        assert proc.poll() is None, err.read_text()[-3000:]
        passes = [json.loads(line) for line in out.read_text().splitlines()]
        assert len(passes) == 1 and passes[0]["skipped"] is None and passes[0]["missing"] == 0
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, err.read_text()[-3000:]
    logged = [json.loads(line)["msg"] for line in err.read_text().splitlines()]
    assert "MEDIAD_CLEANUP_INTERVAL_S=0 switches off the server's loop only; a pass every 300 s" in logged
    assert logged[-1] == "mediad cleanup: stopped"


def test_a_worker_started_before_the_server_migrates_and_passes(tmp_path: Path, pg_server_url: str) -> None:
    """Under the Procfile the cleanup worker may come up before `mediad serve` has migrated a new
    database; it must not die on a missing table (honcho then stops every process)."""
    with fresh_database(pg_server_url) as url, cleanup_worker(tmp_path, MEDIAD_DATABASE_URL=url) as (proc, out, err):
        [first] = [json.loads(line) for line in out.read_text().splitlines()]
        assert (first["skipped"], first["missing"]) == (None, 0)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, err.read_text()[-3000:]

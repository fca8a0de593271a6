"""The embedded PostgreSQL shared by several mediad processes on one data dir (the Procfile's `web`
and `cleanup`, account commands beside a server): it runs until the last of them leaves."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import mediad_process, postgres_running, stop_postmaster


@pytest.fixture(autouse=True)
def _no_server_left(tmp_path: Path) -> Iterator[None]:
    yield
    stop_postmaster(tmp_path / "var" / "pg")


def _env(data_dir: Path) -> dict[str, str]:
    """A `mediad` command's environment on the embedded database of `data_dir`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEDIAD_")}
    env["MEDIAD_DATA_DIR"] = str(data_dir)
    return env


@contextlib.contextmanager
def _cleanup_worker(data_dir: Path) -> Iterator[subprocess.Popen[bytes]]:
    """`mediad cleanup` as the Procfile runs it, once its first pass is done (so it has started
    or joined the database); killed at the end if the test left it running."""
    out = data_dir.parent / "cleanup.out"
    with open(out, "wb") as stdout, open(data_dir.parent / "cleanup.err", "wb") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "mediad.cli", "cleanup"], env=_env(data_dir),
                                stdout=stdout, stderr=stderr)
    try:
        deadline = time.monotonic() + 60
        while not out.read_bytes().count(b"\n"):
            assert proc.poll() is None, (data_dir.parent / "cleanup.err").read_text()
            assert time.monotonic() < deadline, "the cleanup worker made no pass within 60 s"
            time.sleep(0.05)
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _migrate(data_dir: Path) -> None:
    """The schema in place, and the database stopped again (`mediad migrate` was its only user)."""
    migrated = subprocess.run([sys.executable, "-m", "mediad.cli", "migrate"], env=_env(data_dir),
                              capture_output=True, text=True, timeout=90)
    assert migrated.returncode == 0, migrated.stderr
    assert not postgres_running(data_dir / "pg")


def _database_answers(data_dir: Path) -> bool:
    """Whether a command on the embedded database gets an answer (it joins and leaves)."""
    listed = subprocess.run([sys.executable, "-m", "mediad.cli", "users", "list"], env=_env(data_dir),
                            capture_output=True, text=True, timeout=60)
    return listed.returncode == 0 and listed.stdout.split()[:2] == ["name", "id"]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_cleanup_worker_that_started_the_database_leaves_it_to_the_server(tmp_path: Path, signum: int) -> None:
    data_dir = tmp_path / "var"
    data_dir.mkdir()
    pgdata = data_dir / "pg"
    _migrate(data_dir)
    with _cleanup_worker(data_dir) as cleanup:
        assert postgres_running(pgdata)  # the worker started it
        with mediad_process(data_dir, database_url=None) as running:
            assert running.process is not None
            cleanup.send_signal(signum)
            assert cleanup.wait(30) == 0, (tmp_path / "cleanup.err").read_text()[-3000:]
            assert postgres_running(pgdata), "the cleanup worker stopped the database under the server"
            assert httpx.get(running.url + "/health", timeout=10).status_code == 200
            assert httpx.post(running.url + "/users", json={"name": "ines"}, timeout=10).status_code == 201
            running.process.send_signal(signum)
            assert running.process.wait(30) == 0
    assert not postgres_running(pgdata), "the last process to leave should have stopped the database"


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_server_that_started_the_database_leaves_it_to_the_cleanup_worker(tmp_path: Path, signum: int) -> None:
    data_dir = tmp_path / "var"
    pgdata = data_dir / "pg"
    with mediad_process(data_dir, database_url=None) as running:
        assert running.process is not None
        with _cleanup_worker(data_dir) as cleanup:
            running.process.send_signal(signum)
            assert running.process.wait(30) == 0
            assert postgres_running(pgdata), "the server stopped the database under the cleanup worker"
            assert cleanup.poll() is None
            assert _database_answers(data_dir)  # a third user joins and leaves: still running after
            assert postgres_running(pgdata)
            cleanup.send_signal(signum)
            assert cleanup.wait(30) == 0, (tmp_path / "cleanup.err").read_text()[-3000:]
    assert not postgres_running(pgdata), "the cleanup worker, the last to leave, left the database running"


def test_commands_coming_and_going_at_once_all_get_the_database(tmp_path: Path) -> None:
    """Short-lived users overlapping in every order: each one's database is there for as long as it
    needs it, including one that joins while the last user before it is stopping the server."""
    data_dir = tmp_path / "var"
    data_dir.mkdir()
    _migrate(data_dir)
    command = [sys.executable, "-m", "mediad.cli", "users", "list"]
    for round_ in range(3):
        procs = []
        for _ in range(4):
            procs.append(subprocess.Popen(command, env=_env(data_dir), stdout=subprocess.PIPE,
                                          stderr=subprocess.PIPE, text=True))
            time.sleep(0.3 * round_)  # at once, then staggered so that joins meet stops
        for proc in procs:
            out, err = proc.communicate(timeout=90)
            assert proc.returncode == 0, err[-3000:]
            assert out.split()[:2] == ["name", "id"]
    assert not postgres_running(data_dir / "pg"), "the last command left the database running"

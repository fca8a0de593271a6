"""`mediad serve` as a user runs it: embedded PostgreSQL, migrations, HTTP, clean SIGTERM."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from conftest import mediad_process


def _postgres_running(pgdata: Path) -> bool:
    pid_file = pgdata / "postmaster.pid"
    if not pid_file.exists():
        return False
    pid = int(pid_file.read_text().split()[0])
    return Path(f"/proc/{pid}").exists()


def test_serve_on_embedded_defaults_then_sigterm_exits_0(tmp_path: Path) -> None:
    data_dir = tmp_path / "var"
    with mediad_process(data_dir, database_url=None) as running:
        response = httpx.post(running.url + "/users", json={"name": "alice"}, timeout=10)
        assert response.status_code == 201
        assert {"id", "name", "token"} <= response.json().keys()
        assert _postgres_running(data_dir / "pg")
        assert running.process is not None
        running.process.send_signal(signal.SIGTERM)
        assert running.process.wait(30) == 0
    assert not _postgres_running(data_dir / "pg"), "the embedded PostgreSQL outlived mediad"


def test_data_survives_a_restart_on_the_embedded_database(tmp_path: Path) -> None:
    data_dir = tmp_path / "var"
    with mediad_process(data_dir, database_url=None) as running:
        token = httpx.post(running.url + "/users", json={"name": "bob"}, timeout=10).json()["token"]
        created = httpx.post(running.url + "/files?name=note.txt", content=b"kept",
                             headers={"Authorization": f"Bearer {token}"}, timeout=10)
        assert created.status_code == 201
    with mediad_process(data_dir, database_url=None) as running:
        listed = httpx.get(running.url + "/files", headers={"Authorization": f"Bearer {token}"}, timeout=10)
        assert [f["name"] for f in listed.json()["files"]] == ["note.txt"]


@pytest.mark.parametrize(("variable", "value"), [("MEDIAD_PORT", "http"), ("MEDIAD_FSYNC", "perhaps")])
def test_invalid_configuration_fails_at_start_naming_the_variable(variable: str, value: str) -> None:
    result = subprocess.run([sys.executable, "-m", "mediad.cli", "serve"], env={variable: value, "PATH": ""},
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert variable in result.stderr


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry.name))
            except (OSError, IndexError, ValueError):
                continue
    return found


def test_after_kill_9_nothing_is_left_running(tmp_path: Path) -> None:
    data_dir = tmp_path / "var"
    with mediad_process(data_dir, database_url=None) as running:
        assert running.process is not None
        children = _children(running.process.pid)
        assert children, "mediad serve should have started the mock cloud"
        running.process.send_signal(signal.SIGKILL)
        running.process.wait(10)
        deadline = time.monotonic() + 10
        while any(Path(f"/proc/{pid}").exists() for pid in children) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(Path(f"/proc/{pid}").exists() for pid in children), "the mock cloud outlived mediad"
    assert _postgres_running(data_dir / "pg")  # orphaned by the kill …
    with mediad_process(data_dir, database_url=None) as again:
        assert again.process is not None
        again.process.send_signal(signal.SIGTERM)
        assert again.process.wait(30) == 0
    assert not _postgres_running(data_dir / "pg"), "the restarted mediad should adopt and stop it"

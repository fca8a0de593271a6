"""`mediad serve` as a user runs it: embedded PostgreSQL, migrations, HTTP, clean SIGTERM."""

from __future__ import annotations

import signal
import subprocess
import sys
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

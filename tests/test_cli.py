"""`mediad serve` as a user runs it: embedded PostgreSQL, migrations, HTTP, clean SIGTERM."""

from __future__ import annotations

import os
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


# ---- account commands, against a running server's own database ------------------------------

def _mediad(data_dir: Path, *args: str, stdin: str = "",
            database_url: str | None = None) -> subprocess.CompletedProcess[str]:
    """A `mediad` command with the settings of the server on `data_dir` (as an operator runs it)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEDIAD_")}
    env["MEDIAD_DATA_DIR"] = str(data_dir)
    if database_url:
        env["MEDIAD_DATABASE_URL"] = database_url
    return subprocess.run([sys.executable, "-m", "mediad.cli", *args], env=env, input=stdin,
                          capture_output=True, text=True, timeout=60)


def _status_within(url: str, token: str, expected: int, seconds: float = 1.0) -> int:
    """The status of GET /usage once it is `expected`, or the last one after `seconds`."""
    deadline = time.monotonic() + seconds
    while True:
        status = httpx.get(url + "/usage", headers={"Authorization": f"Bearer {token}"}, timeout=10).status_code
        if status == expected or time.monotonic() > deadline:
            return status
        time.sleep(0.05)


def test_account_commands_against_a_running_embedded_server(tmp_path: Path) -> None:
    data_dir = tmp_path / "var"
    with mediad_process(data_dir, database_url=None) as running:
        created = _mediad(data_dir, "users", "create", "olga", "--password-stdin", stdin="olga-password\n")
        assert created.returncode == 0, created.stderr
        token = created.stdout.strip()
        assert len(token) >= 22 and "\n" not in token
        assert _status_within(running.url, token, 200) == 200
        login = httpx.post(running.url + "/auth/login", json={"name": "olga", "password": "olga-password"},
                           timeout=10)
        assert login.status_code == 200
        other = login.json()["token"]
        taken = _mediad(data_dir, "users", "create", "OLGA")
        assert taken.returncode == 1 and "taken" in taken.stderr

        listed = _mediad(data_dir, "users", "list")
        assert listed.returncode == 0, listed.stderr
        header, row = listed.stdout.splitlines()
        assert header.split() == ["name", "id", "created", "state", "files", "bytes"]
        assert row.split()[0] == "olga" and row.split()[3:] == ["active", "0", "0"]

        assert _mediad(data_dir, "users", "disable", "olga").returncode == 0
        assert _status_within(running.url, token, 401) == 401
        assert _status_within(running.url, other, 401) == 401
        assert httpx.post(running.url + "/auth/login", json={"name": "olga", "password": "olga-password"},
                          timeout=10).status_code == 401
        assert _mediad(data_dir, "users", "list").stdout.splitlines()[1].split()[3] == "disabled"
        assert _mediad(data_dir, "users", "enable", "olga").returncode == 0
        assert _status_within(running.url, token, 200) == 200

        tokens = httpx.get(running.url + "/auth/tokens", headers={"Authorization": f"Bearer {other}"},
                           timeout=10).json()["tokens"]
        assert [t["name"] for t in tokens] == ["cli", "login"]
        revoked = _mediad(data_dir, "tokens", "revoke", tokens[0]["id"])
        assert revoked.returncode == 0, revoked.stderr
        assert _status_within(running.url, token, 401) == 401
        assert _status_within(running.url, other, 200) == 200
        assert _mediad(data_dir, "tokens", "revoke", tokens[0]["id"]).returncode == 1
        assert _mediad(data_dir, "users", "disable", "nobody").returncode == 1
    assert not _postgres_running(data_dir / "pg"), "a command left the embedded PostgreSQL running"


def test_account_commands_refuse_bad_input_and_work_without_a_server(tmp_path: Path, database_url: str) -> None:
    short = _mediad(tmp_path, "users", "create", "pat", "--password-stdin", stdin="short\n",
                    database_url=database_url)
    assert short.returncode == 2 and "at least 8 characters" in short.stderr
    assert _mediad(tmp_path, "users", "create", "bad\tname", database_url=database_url).returncode == 2
    assert _mediad(tmp_path, "tokens", "revoke", "not-an-id", database_url=database_url).returncode == 2
    created = _mediad(tmp_path, "users", "create", "pat", database_url=database_url)
    assert created.returncode == 0 and created.stdout.strip()
    assert _mediad(tmp_path, "users", "list", database_url=database_url).stdout.splitlines()[1].split()[0] == "pat"

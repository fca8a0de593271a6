"""`mediad serve` as a user runs it: embedded PostgreSQL, migrations, HTTP, clean SIGTERM."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from conftest import (
    mediad_process,
    postgres_running,
    processes_mentioning,
    stop_postmaster,
)

from ops.harness import descendants, free_port


def test_serve_on_embedded_defaults_then_sigterm_exits_0(tmp_path: Path) -> None:
    data_dir = tmp_path / "var"
    with mediad_process(data_dir, database_url=None) as running:
        response = httpx.post(running.url + "/users", json={"name": "alice"}, timeout=10)
        assert response.status_code == 201
        assert {"id", "name", "token"} <= response.json().keys()
        assert postgres_running(data_dir / "pg")
        assert running.process is not None
        running.process.send_signal(signal.SIGTERM)
        assert running.process.wait(30) == 0
    assert not postgres_running(data_dir / "pg"), "the embedded PostgreSQL outlived mediad"


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
    assert postgres_running(data_dir / "pg")  # orphaned by the kill …
    with mediad_process(data_dir, database_url=None) as again:
        assert again.process is not None
        again.process.send_signal(signal.SIGTERM)
        assert again.process.wait(30) == 0
    assert not postgres_running(data_dir / "pg"), "the restarted mediad should adopt and stop it"


# What start-up is doing when the signal comes: PostgreSQL starting (its postmaster.pid is there),
# the mock cloud starting (PostgreSQL is up), the migration running in its child process.
_START_UP_MOMENTS = {
    "postgres-starting": lambda data_dir, log: (data_dir / "pg" / "postmaster.pid").exists(),
    "mock-cloud-starting": lambda data_dir, log: '"logger": "mediad.embedded"' in log,
    "migrating": lambda data_dir, log: '"msg": "database: embedded PostgreSQL"' in log,
}


@pytest.mark.parametrize("moment", list(_START_UP_MOMENTS))
def test_sigterm_during_start_up_stops_it_and_exits_0(tmp_path: Path, moment: str) -> None:
    """docker stop or systemd during start-up: stop there, leave nothing running, exit 0 (rather
    than come up anyway and be killed by SIGKILL once the stop timeout has passed)."""
    data_dir = tmp_path / "var"
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEDIAD_")}
    env.update({"MEDIAD_DATA_DIR": str(data_dir), "MEDIAD_PORT": str(port), "MEDIAD_HOST": "127.0.0.1",
                "MEDIAD_WORKERS": "1"})
    log_path = tmp_path / "serve.log"
    reached = _START_UP_MOMENTS[moment]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "mediad.cli", "serve"], env=env, stdout=log,
                                stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while not reached(data_dir, log_path.read_text(errors="replace")):
            assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()[-3000:]
            time.sleep(0.005)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, log_path.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
            stop_postmaster(data_dir / "pg")
    assert "listening on" not in log_path.read_text(), "it went on to serve"
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{port}/health", timeout=5)
    assert not processes_mentioning(str(data_dir)), "PostgreSQL or the mock cloud outlived mediad"
    with mediad_process(data_dir, database_url=None) as running:  # and the next start is unharmed
        assert httpx.post(running.url + "/users", json={"name": "uma"}, timeout=10).status_code == 201


def _holder_of(connection: socket.socket, pids: list[int]) -> int | None:
    """Which of `pids` holds the server's end of a loopback TCP connection (by its socket inode)."""
    client_port = connection.getsockname()[1]
    server_port = connection.getpeername()[1]
    inode = None
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote = (int(address.split(":")[1], 16) for address in fields[1:3])
        if (local, remote) == (server_port, client_port):
            inode = fields[9]
    for pid in pids:
        with contextlib.suppress(OSError):
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                with contextlib.suppress(OSError):
                    if os.readlink(fd) == f"socket:[{inode}]":
                        return pid
    return None


def _request_id_over(connection: socket.socket) -> str:
    """GET /health on a raw keep-alive connection (left open, so that its holder can be found)."""
    connection.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = connection.recv(65536)
        assert chunk, "the connection closed before an answer"
        head += chunk
    lines = head.split(b"\r\n\r\n")[0].decode("latin-1").split("\r\n")
    assert lines[0].split()[1] == "200", lines
    return dict(line.lower().split(": ", 1) for line in lines[1:])["x-request-id"]


def test_granian_workers_hand_out_distinct_request_ids(tmp_path: Path, database_url: str) -> None:
    """Granian forks its workers from `mediad serve`: each needs a request-id sequence of its own."""
    pytest.importorskip("granian")
    with mediad_process(tmp_path / "data", database_url=database_url, server="granian",
                        env={"MEDIAD_WORKERS": "2"}) as running:
        assert running.process is not None
        workers = descendants(running.process.pid)
        port = int(running.url.rsplit(":", 1)[1])
        served: dict[int | None, list[str]] = {}
        with contextlib.ExitStack() as connections:
            # New connections until each worker has answered a few (which one accepts is up to
            # the kernel and Granian).
            for _ in range(400):
                connection = connections.enter_context(socket.create_connection(("127.0.0.1", port), 10))
                request_id = _request_id_over(connection)
                served.setdefault(_holder_of(connection, workers), []).append(request_id)
                if len(served) >= 2 and all(len(ids) >= 5 for ids in served.values()):
                    break
    assert None not in served and len(served) == 2, {pid: len(ids) for pid, ids in served.items()}
    found = [one for ids in served.values() for one in ids]
    assert all(len(one) == 32 for one in found)
    assert len(set(found)) == len(found), served


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
    assert not postgres_running(data_dir / "pg"), "a command left the embedded PostgreSQL running"


def test_account_commands_refuse_bad_input_and_work_without_a_server(tmp_path: Path, database_url: str) -> None:
    short = _mediad(tmp_path, "users", "create", "pat", "--password-stdin", stdin="short\n",
                    database_url=database_url)
    assert short.returncode == 2 and "at least 8 characters" in short.stderr
    assert _mediad(tmp_path, "users", "create", "bad\tname", database_url=database_url).returncode == 2
    assert _mediad(tmp_path, "tokens", "revoke", "not-an-id", database_url=database_url).returncode == 2
    created = _mediad(tmp_path, "users", "create", "pat", database_url=database_url)
    assert created.returncode == 0 and created.stdout.strip()
    assert _mediad(tmp_path, "users", "list", database_url=database_url).stdout.splitlines()[1].split()[0] == "pat"

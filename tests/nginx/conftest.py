"""nginx in front of mediad, configured by the shipped ops/nginx.conf.

Debian's nginx-light is installed by ops/test.sh when it runs as root; without an nginx binary the
tests here skip and say so. The configuration under test is ops/nginx.conf itself, with only its
marked values (mediad's address, the listening port, the data dir) and the process's own paths
changed, so what is tested is what the deployment guide ships.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import free_port

CONFIG = Path(__file__).resolve().parents[2] / "ops" / "nginx.conf"
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"


@dataclass
class Nginx:
    url: str
    prefix: Path
    process: subprocess.Popen[bytes]

    def body_temp_files(self) -> list[Path]:
        return sorted(p for p in (self.prefix / "body").rglob("*") if p.is_file())

    def rss(self) -> int:
        """Resident bytes of nginx's master and workers."""
        pids = [self.process.pid, *_children(self.process.pid)]
        return sum(_rss(pid) for pid in pids)


def _children(pid: int) -> list[int]:
    with contextlib.suppress(FileNotFoundError):
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
        return [int(p) for p in text.split()]
    return []


def _rss(pid: int) -> int:
    with contextlib.suppress(FileNotFoundError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def nginx_config(*, upstream_port: int, listen_port: int, files_dir: Path, prefix: Path) -> str:
    """ops/nginx.conf with its CHANGE values filled in, plus this process's pid, log and temp paths."""
    text = CONFIG.read_text()
    for old, new in {"server 127.0.0.1:8000;": f"server 127.0.0.1:{upstream_port};",
                     "listen 80;": f"listen 127.0.0.1:{listen_port};",
                     "alias /var/lib/mediad/files/;": f"alias {files_dir}/;"}.items():
        assert old in text, f"ops/nginx.conf no longer has {old!r}"
        text = text.replace(old, new)
    own = [f"pid {prefix}/nginx.pid;", f"error_log {prefix}/error.log warn;", "daemon off;"]
    if os.geteuid() == 0:
        own.append("user root;")  # the blobs belong to the test's user, as they would to mediad's
    paths = " ".join(f"{kind}_temp_path {prefix}/{name};" for kind, name in
                     [("client_body", "body"), ("proxy", "proxy"), ("fastcgi", "fastcgi"),
                      ("uwsgi", "uwsgi"), ("scgi", "scgi")])
    return "\n".join(own) + "\n" + text.replace("http {", f"http {{\n    {paths}", 1)


def require_nginx() -> None:
    if not os.access(NGINX, os.X_OK):
        pytest.skip("nginx is not installed: `apt-get install nginx-light` (ops/test.sh does it as root)")


@contextlib.contextmanager
def running_nginx(upstream_port: int, files_dir: Path, prefix: Path, port: int | None = None) -> Iterator[Nginx]:
    require_nginx()
    prefix.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    conf = prefix / "nginx.conf"
    conf.write_text(nginx_config(upstream_port=upstream_port, listen_port=port, files_dir=files_dir,
                                 prefix=prefix))
    with open(prefix / "stderr.log", "wb") as log:
        proc = subprocess.Popen([NGINX, "-p", str(prefix), "-c", str(conf)], stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait_listening(port, proc, prefix)
        yield Nginx(f"http://127.0.0.1:{port}", prefix, proc)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _wait_listening(port: int, proc: subprocess.Popen[bytes], prefix: Path) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"nginx exited: {(prefix / 'stderr.log').read_text()}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return
        time.sleep(0.05)
    raise RuntimeError("nginx did not start listening")

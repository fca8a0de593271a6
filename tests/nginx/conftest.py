"""nginx in front of mediad, configured by the shipped ops/nginx.conf.

Debian's nginx-light is installed by ops/test.sh when it runs as root; without an nginx binary the
tests here skip and say so. The configuration under test is ops/nginx.conf itself, with only its
marked values (mediad's address, the listening port, the data dir) and the process's own paths
changed, so what is tested is what the deployment guide ships.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from ops.harness import NGINX, nginx_front, tree_rss_kib


@dataclass
class Nginx:
    url: str
    prefix: Path
    process: subprocess.Popen[bytes]

    def body_temp_files(self) -> list[Path]:
        return sorted(p for p in (self.prefix / "body").rglob("*") if p.is_file())

    def rss(self) -> int:
        """Resident bytes of nginx's master and workers."""
        return 1024 * sum(tree_rss_kib(self.process.pid))


def require_nginx() -> None:
    if not os.access(NGINX, os.X_OK):
        pytest.skip("nginx is not installed: `apt-get install nginx-light` (ops/test.sh does it as root)")


@contextlib.contextmanager
def running_nginx(upstream_port: int, files_dir: Path, prefix: Path, port: int | None = None) -> Iterator[Nginx]:
    require_nginx()
    with nginx_front(upstream_port, files_dir, prefix, port=port) as (url, proc):
        yield Nginx(url, prefix, proc)

"""What the benchmarks and the tests share to run servers and watch them: free loopback ports,
a subprocess kept for the length of a block, and the process's CPU and RSS read from /proc.

Imported as `ops.harness`: by tests/conftest.py (pytest puts the repository root on sys.path) and
by `python -m ops.bench` / `python -m ops.soak`, run from the repository root.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any

import httpx


def run_async(coro: Coroutine[Any, Any, Any]) -> Any:
    """Run the client on uvloop when it is there (uvicorn[standard] brings it): measured here, the
    stock asyncio loop alone lowers the ceiling by ~25%, which would hide the server's own cost."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def running(cmd: list[str], env: dict[str, str], ready_url: str, log_path: Path, cwd: Path | None = None, *,
            start_timeout: float = 120, stop_timeout: float = 45) -> Iterator[subprocess.Popen[bytes]]:
    """Run `cmd` (output appended to `log_path`) until the block ends: wait for `ready_url` to
    answer 200, then SIGTERM it (and SIGKILL after `stop_timeout`) however the block exits."""
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + start_timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{cmd[0]} exited with {proc.returncode} before it was ready: "
                                   f"{log_path.read_text(errors='replace')[-3000:]}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(ready_url, timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{ready_url} did not answer 200 within {start_timeout:.0f} s: "
                                   f"{log_path.read_text(errors='replace')[-3000:]}")
            time.sleep(0.1)
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=stop_timeout)
            except subprocess.TimeoutExpired:
                print(f"{cmd[0]} ignored SIGTERM for {stop_timeout:.0f} s, killing it", file=sys.stderr)
                proc.kill()
                proc.wait()


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS/VmHWM of one process in KiB (the uvicorn process only, not PostgreSQL's)."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0])
    return values


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def descendants(pid: int) -> list[int]:
    """Live child processes of `pid`, recursively (Granian's worker, ffmpeg)."""
    found: list[int] = []
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError):
                for child in (task / "children").read_text().split():
                    found += [int(child), *descendants(int(child))]
    return found


def tree_cpu_seconds(pid: int) -> float:
    """CPU of a process and its live descendants: Granian serves from a worker process."""
    total = 0.0
    for one in (pid, *descendants(pid)):
        with contextlib.suppress(OSError):
            total += cpu_seconds(one)
    return total


class Sampler:
    """Calls `tick()` every `interval` seconds in a thread of its own while the block runs."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Any:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def tick(self) -> None:
        raise NotImplementedError

    def _run(self) -> None:
        while True:
            self.tick()
            if self._stop.wait(self.interval):
                return


def tree_rss_kib(pid: int) -> list[int]:
    """VmRSS of a process and of each live descendant: `mediad serve --workers N` and its workers."""
    sizes = []
    for one in (pid, *descendants(pid)):
        with contextlib.suppress(OSError, KeyError):
            sizes.append(proc_status(one)["VmRSS"])
    return sizes


def largest_rss_kib(pid: int) -> int:
    """The largest VmRSS among a process and its descendants: the worker busy with an upload."""
    return max(tree_rss_kib(pid), default=0)


class RssSampler(Sampler):
    """Samples a process's RSS while the block runs; with `child_prefix`, also the peak RSS and
    the CPU of its descendants of that name (ffmpeg); with `tree`, the peak RSS is the sum over
    the process and its descendants (a service's workers) and `peak_one_kib` that of the largest."""

    def __init__(self, pid: int, interval: float = 0.02, child_prefix: str | None = None,
                 tree: bool = False) -> None:
        super().__init__(interval)
        self.pid, self.child_prefix, self.tree = pid, child_prefix, tree
        self.peak_kib = self.hwm_kib = self.child_peak_kib = self.peak_one_kib = 0
        self.child_cpu: dict[int, float] = {}  # pid → CPU seconds when last seen alive

    def tick(self) -> None:
        status = proc_status(self.pid)
        sizes = tree_rss_kib(self.pid) if self.tree else [status["VmRSS"]]
        self.peak_kib = max(self.peak_kib, sum(sizes))
        self.peak_one_kib = max(self.peak_one_kib, *sizes)
        self.hwm_kib = status["VmHWM"]
        for child in descendants(self.pid) if self.tree else ():
            with contextlib.suppress(OSError, KeyError):
                self.hwm_kib = max(self.hwm_kib, proc_status(child)["VmHWM"])
        if self.child_prefix:
            self._sample_children(self.child_prefix)

    def _sample_children(self, prefix: str) -> None:
        for child in descendants(self.pid):
            with contextlib.suppress(OSError, KeyError):  # it exited between listing and reading
                if Path(f"/proc/{child}/comm").read_text().startswith(prefix):
                    self.child_peak_kib = max(self.child_peak_kib, proc_status(child)["VmHWM"])
                    self.child_cpu[child] = cpu_seconds(child)


def percentile(values: list[float], pct: float) -> float:
    ranked = sorted(values)
    return ranked[min(len(ranked) - 1, max(0, round(pct / 100 * len(ranked)) - 1))]


# ---- nginx in front of mediad, as ops/nginx.conf configures it -----------------------------------

NGINX_CONFIG = Path(__file__).resolve().parent / "nginx.conf"


def nginx_config(*, upstream_port: int, listen_port: int, files_dir: Path, prefix: Path,
                 extra: str = "") -> str:
    """ops/nginx.conf with its CHANGE values filled in, this process's pid, log and temp paths,
    and `extra` locations in its server block: what the tests and the bench run is what ships."""
    text = NGINX_CONFIG.read_text()
    for old, new in {"server 127.0.0.1:8000;": f"server 127.0.0.1:{upstream_port};",
                     "listen 80;": f"listen 127.0.0.1:{listen_port};\n{extra}",
                     "alias /var/lib/mediad/files/;": f"alias {files_dir}/;"}.items():
        if old not in text:
            raise ValueError(f"ops/nginx.conf no longer has {old!r}")
        text = text.replace(old, new)
    own = [f"pid {prefix}/nginx.pid;", f"error_log {prefix}/error.log warn;", "daemon off;"]
    if os.geteuid() == 0:
        own.append("user root;")  # the blobs belong to the running user, as they would to mediad's
    paths = " ".join(f"{kind}_temp_path {prefix}/{name};" for kind, name in
                     [("client_body", "body"), ("proxy", "proxy"), ("fastcgi", "fastcgi"),
                      ("uwsgi", "uwsgi"), ("scgi", "scgi")])
    return "\n".join(own) + "\n" + text.replace("http {", f"http {{\n    {paths}", 1)


NGINX = "/usr/sbin/nginx"  # Debian's nginx-light


@contextlib.contextmanager
def nginx_front(upstream_port: int, files_dir: Path, prefix: Path, *, port: int | None = None,
                extra: str = "") -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """nginx, configured by nginx_config, in front of mediad on `upstream_port`, until the block
    ends; → (its base URL, its master process)."""
    prefix.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    conf = prefix / "nginx.conf"
    health = "        location = /nginx-health { access_log off; return 200; }\n"
    conf.write_text(nginx_config(upstream_port=upstream_port, listen_port=port, files_dir=files_dir,
                                 prefix=prefix, extra=health + extra))
    url = f"http://127.0.0.1:{port}"
    with running([NGINX, "-p", str(prefix), "-c", str(conf)], dict(os.environ), url + "/nginx-health",
                 prefix / "out.log", prefix, stop_timeout=10) as proc:
        yield url, proc

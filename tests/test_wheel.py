"""The product as users get it: a built wheel, installed into a fresh venv outside the checkout,
serves from an empty directory on its embedded defaults and stops cleanly on SIGTERM.

Nothing from the checkout is on the path: migrations, the web app and the docs page must all come
from the wheel (package data), which is what this test proves.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
from conftest import free_port, postgres_running

ROOT = Path(__file__).parents[1]


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MEDIAD_", "PYTHON", "VIRTUAL_ENV"))}
    return {**env, **extra}


def _build_and_install(tmp_path: Path) -> Path:
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "--disable-pip-version-check",
                    "-w", str(dist), str(ROOT)], check=True, timeout=300, env=_clean_env())
    wheels = list(dist.glob("mediad-*.whl"))
    assert len(wheels) == 1, wheels
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    # Dependencies come from the configured index (and pip's cache); mediad only from this wheel.
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                    str(wheels[0])], check=True, timeout=600, env=_clean_env(), cwd=tmp_path)
    return venv


def test_the_wheel_serves_from_an_empty_directory(tmp_path: Path) -> None:
    venv = _build_and_install(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    located = subprocess.run([str(venv / "bin" / "python"), "-c", "import mediad; print(mediad.__file__)"],
                             capture_output=True, text=True, check=True, cwd=empty, env=_clean_env())
    assert Path(located.stdout.strip()).is_relative_to(venv), located.stdout

    port = free_port()
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(venv / "bin" / "mediad"), "serve"], cwd=empty, stdout=out,
                                stderr=subprocess.STDOUT, env=_clean_env(MEDIAD_PORT=str(port)))
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, log.read_text()[-3000:]
            try:
                health = httpx.get(url + "/health", timeout=2)
                if health.status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, f"no healthy answer: {log.read_text()[-3000:]}"
            time.sleep(0.2)
        assert health.json() == {"status": "ok"}
        # Migrated from the wheel's own scripts, and the web app and docs are its package data.
        assert httpx.post(url + "/users", json={"name": "wheel"}, timeout=10).status_code == 201
        assert "<title>mediad</title>" in httpx.get(url + "/", timeout=10).text
        assert httpx.get(url + "/web/app.js", timeout=10).status_code == 200
        assert httpx.get(url + "/docs", timeout=10).status_code == 200
        assert (empty / "var" / "pg").is_dir()  # the default data dir, under the working directory

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, log.read_text()[-3000:]
        assert not postgres_running(empty / "var" / "pg"), "the embedded PostgreSQL outlived mediad"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

"""ops/run.sh installs only when the environment is missing or pyproject.toml changed."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).parents[1]


def _checkout(tmp_path: Path) -> Path:
    """A copy of run.sh and pyproject.toml with a stand-in .venv: its python records each pip
    install, its mediad says how it was called."""
    (tmp_path / "ops").mkdir()
    shutil.copy(ROOT / "ops" / "run.sh", tmp_path / "ops" / "run.sh")
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    bin_dir = tmp_path / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "python").write_text(f'#!/bin/sh\necho "$@" >> {tmp_path}/installs\n')
    (bin_dir / "mediad").write_text('#!/bin/sh\necho "mediad $@"\n')
    for script in bin_dir.iterdir():
        script.chmod(0o755)
    return tmp_path


def _run(checkout: Path) -> str:
    result = subprocess.run(["bash", str(checkout / "ops" / "run.sh"), "--port", "9"], capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    return result.stdout


def _installs(checkout: Path) -> list[str]:
    log = checkout / "installs"
    return log.read_text().splitlines() if log.exists() else []


def test_run_installs_once_then_only_when_pyproject_changes(tmp_path: Path) -> None:
    checkout = _checkout(tmp_path)
    assert _run(checkout) == "mediad serve --port 9\n"
    assert _installs(checkout) == ["-m pip install --quiet --disable-pip-version-check -e ."]
    assert _run(checkout) == "mediad serve --port 9\n"
    assert len(_installs(checkout)) == 1  # nothing changed: straight to serving
    with open(checkout / "pyproject.toml", "a") as pyproject:
        pyproject.write("\n# a new dependency would go here\n")
    _run(checkout)
    assert len(_installs(checkout)) == 2
    _run(checkout)
    assert len(_installs(checkout)) == 2


def test_a_failed_install_is_tried_again(tmp_path: Path) -> None:
    checkout = _checkout(tmp_path)
    python = checkout / ".venv" / "bin" / "python"
    python.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path}/installs\nexit 1\n')
    failed = subprocess.run(["bash", str(checkout / "ops" / "run.sh")], capture_output=True, text=True, timeout=30)
    assert failed.returncode == 1 and "mediad serve" not in failed.stdout
    python.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path}/installs\n')
    assert _run(checkout) == "mediad serve --port 9\n"
    assert len(_installs(checkout)) == 2

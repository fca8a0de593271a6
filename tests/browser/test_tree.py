"""The web app's file tree in Chromium: breadcrumbs, opening a folder and going up, moving a file
with the dialog (and replacing on a conflict), deleting a folder after a confirmation that says
how many files go, and usage shown against the quota set with `mediad users set-quota`."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import httpx
import pytest
from conftest import Server

from .conftest import sign_up

expect = pytest.importorskip(
    "playwright.sync_api", reason="Playwright for Python is missing: pip install -e '.[test]'").expect


def set_quota(server: Server, name: str, quota: str) -> None:
    """The operator's CLI against the running server's embedded database."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEDIAD_")}
    env["MEDIAD_DATA_DIR"] = str(server.data_dir)
    done = subprocess.run([sys.executable, "-m", "mediad.cli", "users", "set-quota", name, quota], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_folders_moves_folder_deletion_and_quota(page: Any, web_server: Server) -> None:
    token = sign_up(page, web_server.url, "tree-user")
    api = httpx.Client(base_url=web_server.url, headers={"Authorization": f"Bearer {token}"}, timeout=30)
    for path, data in {"/videos/2026/a.bin": b"a" * 100, "/videos/2026/b.txt": b"bb", "/videos/c.txt": b"ccc",
                       "/docs/d.txt": b"dddd", "/docs/old/c.txt": b"other c"}.items():
        assert api.put("/files", params={"path": path}, content=data).status_code == 201
    set_quota(web_server, "tree-user", "1KiB")
    page.get_by_role("button", name="Refresh").click()
    expect(page.locator("#usage")).to_have_text("5 files · 116 bytes of 1.0 KiB (11%)")
    expect(page.locator("#folders li")).to_have_count(2)
    expect(page.locator('#folders li[data-path="/docs/"]')).to_contain_text("2 files · 11 bytes")
    expect(page.locator('#folders li[data-path="/videos/"]')).to_contain_text("3 files · 105 bytes")

    page.get_by_role("button", name="Open folder videos").click()
    expect(page.locator("#crumbs")).to_have_text("All files›videos")
    expect(page.locator("#folders li")).to_have_count(1)
    expect(page.locator('#folders li[data-path="/videos/2026/"]')).to_contain_text("2 files · 102 bytes")
    expect(page.locator("#file-rows tr")).to_have_count(3)  # the list follows the folder (prefix)

    # Move c.txt into /docs/old/, where a c.txt is: the conflict asks, and replacing answers it.
    page.locator('#file-rows tr[data-name="c.txt"]').get_by_role("button", name="Move or rename c.txt").click()
    expect(page.locator("#move-path")).to_have_value("/videos/c.txt")
    page.locator("#move-path").fill("/docs/old/")
    page.locator("#move-ok").click()
    expect(page.locator("#confirm-text")).to_contain_text("/docs/old/c.txt is taken")
    page.locator("#confirm-ok").click()
    expect(page.locator("#file-rows tr")).to_have_count(2)
    moved = api.get("/download", params={"path": "/docs/old/c.txt"})
    assert moved.status_code == 200 and moved.content == b"ccc"

    page.get_by_role("button", name="Up", exact=True).click()
    expect(page.locator("#crumbs")).to_have_text("All files")
    expect(page.locator("#folder-up")).to_be_hidden()
    expect(page.locator('#folders li[data-path="/docs/"]')).to_contain_text("2 files · 7 bytes")

    page.get_by_role("button", name="Delete folder docs").click()
    expect(page.locator("#confirm-text")).to_contain_text("the 2 files (7 bytes) in it")
    page.locator("#confirm-ok").click()
    expect(page.locator("#files-status")).to_contain_text("Deleted 2 files.")
    expect(page.locator("#folders li")).to_have_count(1)
    assert api.get("/folders", params={"path": "/docs/"}).status_code == 404
    usage = api.get("/usage").json()
    assert usage == {"files": 2, "bytes": 102, "quota": 1024}
    expect(page.locator("#usage")).to_have_text("2 files · 102 bytes of 1.0 KiB (10%)")
    page.set_viewport_size({"width": 375, "height": 800})  # the tree fits a phone too
    expect(page.locator('#folders li[data-path="/videos/"]')).to_be_visible()
    assert page.evaluate("() => document.documentElement.scrollWidth") <= 375

"""The browser for web app tests: Playwright for Python driving Debian's Chromium, headless.

Playwright's own browser download cannot work on these machines, so the tests launch the system
Chromium (`apt-get install chromium`) by path; without it, or without Playwright, they skip and
say how to get them. Each test's page is screenshotted into its tmp_path when it ends, and a page
that hit a script error or a Content-Security-Policy violation fails its test.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Server, mediad_process

CHROMIUM = Path(os.environ.get("MEDIAD_TEST_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--no-first-run", "--disable-dev-shm-usage",
    "--autoplay-policy=no-user-gesture-required",  # tests call play() without a user gesture
    "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream",  # a microphone to record
]


# Module scope, not session: while Playwright's sync API is open, its event loop counts as running in
# this thread, and the rest of the suite's asyncio.run() calls would fail.
@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="Playwright for Python is missing: pip install -e '.[test]'")
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(f"no Chromium at {CHROMIUM}: install it with `apt-get update && apt-get install -y chromium` "
                    "(Debian/Ubuntu; .ci/run does this when run as root) or point MEDIAD_TEST_CHROMIUM at one")
    with sync_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            yield launched
        finally:
            launched.close()


@contextlib.contextmanager
def watched_page(browser: Any, screenshot: Path, **context_options: Any) -> Iterator[Any]:
    """A page in a context of its own, screenshotted to `screenshot` at the end; a script error or a
    Content-Security-Policy violation on it fails the test."""
    context = browser.new_context(viewport={"width": 1100, "height": 900}, **context_options)
    opened = context.new_page()
    opened.set_default_timeout(20_000)
    problems: list[str] = []
    opened.on("pageerror", lambda error: problems.append(f"script error: {error}"))
    opened.on("console", lambda message: problems.append(f"console: {message.text}")
              if "Content Security Policy" in message.text else None)
    try:
        yield opened
    finally:
        try:
            opened.screenshot(path=str(screenshot), full_page=True)
        finally:
            context.close()
    assert not problems, problems


@pytest.fixture
def page(browser: Any, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Any]:
    with watched_page(browser, tmp_path / f"{request.node.name}.png", accept_downloads=True) as opened:
        yield opened


@pytest.fixture(scope="module")
def web_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """`mediad serve` on its embedded defaults (database, mock cloud), as a person would start it."""
    root = tmp_path_factory.mktemp("web")
    with mediad_process(root / "data", database_url=None, log_path=root / "mediad.log") as running:
        yield running


def sign_up(page: Any, base_url: str, name: str = "alice") -> str:
    """Create an account through the page; returns the token the page keeps in sessionStorage."""
    page.goto(base_url + "/")
    page.get_by_label("Name", exact=True).fill(name)
    page.get_by_label("Password", exact=True).fill("correct horse battery")
    page.get_by_role("button", name="Create account").click()
    page.locator("#workspace").wait_for(state="visible")
    token = page.evaluate("() => sessionStorage.getItem('mediad.token')")
    assert token and page.evaluate("() => document.cookie") == ""
    return str(token)


def access_log(path: Path) -> list[dict[str, Any]]:
    """The access lines (JSON) a `mediad serve` wrote to its log file."""
    lines = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if entry.get("logger") == "mediad.access":
            lines.append(entry)
    return lines


class Relay:
    """A TCP relay on a fixed loopback port in front of a server that is killed and started again
    on another port: the page keeps one origin (and its sessionStorage) across the restart.
    `bytes_up` counts what was passed on to the server, an upper bound of what it received."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.upstream_port: int | None = None
        self.bytes_up = 0
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, name="relay", daemon=True).start()

    def close(self) -> None:
        self.listener.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._relay, args=(client,), daemon=True).start()

    def _relay(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port or 9), timeout=5)
        except OSError:
            client.close()  # the server is down: the browser sees a dropped connection
            return
        upstream.settimeout(None)
        for sock in (client, upstream):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        back = threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True)
        back.start()
        self._pump(client, upstream, True)
        back.join()
        client.close()
        upstream.close()

    def _pump(self, source: socket.socket, target: socket.socket, up: bool) -> None:
        try:
            while data := source.recv(256 * 1024):
                if up:
                    with self._lock:
                        self.bytes_up += len(data)
                target.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, target):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

"""Cross-origin uploads from a real page: the vendored tus-js-client on one loopback origin uploads
to mediad on another when MEDIAD_CORS_ORIGINS lists the page's origin, and the browser refuses
when it does not.

Two origins differ by port: the page is served by a plain static server of the test's own, mediad
by `mediad serve` on its embedded defaults with MEDIAD_CORS_ORIGINS set.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import Server, assert_problem, free_port, mediad_process

from .conftest import watched_page
from .test_tus_js_client import MAKE_FILE, TUS_JS_CLIENT, pattern

SIZE = 3 * 1024 * 1024 + 77
CHUNK = 1024 * 1024

UPLOAD = """async ({endpoint, token, name, size, chunkSize}) => {
    const file = (MAKE_FILE)(name, size);
    return await new Promise((resolve) => {
        const upload = new tus.Upload(file, {
            endpoint, chunkSize, headers: {Authorization: "Bearer " + token},
            metadata: {filename: name, path: "/cors/"},
            onSuccess: (payload) => resolve({outcome: "success", url: upload.url,
                fileId: payload.lastResponse.getHeader("Mediad-File-Id") ?? null,
                offset: payload.lastResponse.getHeader("Upload-Offset") ?? null}),
            onError: (error) => resolve({outcome: "error", error: String(error)}),
        });
        upload.start();
    });
}""".replace("MAKE_FILE", MAKE_FILE)


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextlib.contextmanager
def static_origin(root: Path) -> Iterator[str]:
    """A page and the vendored tus-js-client on an origin of their own (http://127.0.0.1:<port>)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "tus.js").write_text(TUS_JS_CLIENT.read_text())
    (root / "index.html").write_text('<!doctype html><title>another origin</title><script src="tus.js"></script>')
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(root)))
    thread = threading.Thread(target=httpd.serve_forever, name="static-origin", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture(scope="module")
def origins(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    root = tmp_path_factory.mktemp("origins")
    with static_origin(root / "allowed") as allowed, static_origin(root / "refused") as refused:
        yield allowed, refused


@pytest.fixture(scope="module")
def cors_server(tmp_path_factory: pytest.TempPathFactory, origins: tuple[str, str]) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("cors")
    allowed, _ = origins
    # A second listed origin, so the list is really a list.
    listed = f"http://127.0.0.1:{free_port()},{allowed}"
    with mediad_process(root / "data", database_url=None, log_path=root / "mediad.log",
                        env={"MEDIAD_CORS_ORIGINS": listed}) as running:
        yield running


def _token(server: Server, name: str) -> str:
    created = httpx.post(server.url + "/users", json={"name": name}, timeout=30)
    assert created.status_code == 201, created.text
    return str(created.json()["token"])


def _upload_from(browser: Any, page_origin: str, server: Server, token: str, name: str, shot: Path) -> Any:
    with watched_page(browser, shot) as page:
        page.goto(page_origin + "/")
        assert page.evaluate("() => typeof tus.Upload === 'function'") is True
        return page.evaluate(UPLOAD, {"endpoint": server.url + "/uploads", "token": token, "name": name,
                                      "size": SIZE, "chunkSize": CHUNK})


def test_a_listed_origin_uploads_with_tus_js_client(browser: Any, cors_server: Server, origins: tuple[str, str],
                                                    tmp_path: Path) -> None:
    allowed, _ = origins
    token = _token(cors_server, "cors-allowed")
    result = _upload_from(browser, allowed, cors_server, token, "cross.bin", tmp_path / "allowed.png")
    assert result["outcome"] == "success", result.get("error")
    # Location, Upload-Offset and Mediad-File-Id were readable across origins (exposed headers).
    assert result["url"].startswith(cors_server.url + "/uploads/")
    assert result["offset"] == str(SIZE) and result["fileId"]
    with httpx.Client(base_url=cors_server.url, headers={"Authorization": f"Bearer {token}"}) as http:
        stored = http.get(f"/files/{result['fileId']}").json()
        assert (stored["path"], stored["size"]) == ("/cors/cross.bin", SIZE)
        assert stored["sha256"] == hashlib.sha256(pattern(SIZE)).hexdigest()
        preflight = http.options("/uploads", headers={
            "Origin": allowed, "Access-Control-Request-Method": "PATCH",
            "Access-Control-Request-Headers": "authorization,tus-resumable,upload-offset,content-type"})
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == allowed
    assert "PATCH" in preflight.headers["access-control-allow-methods"]


def test_an_unlisted_origin_is_refused_by_the_browser(browser: Any, cors_server: Server, origins: tuple[str, str],
                                                      tmp_path: Path) -> None:
    _, refused = origins
    token = _token(cors_server, "cors-refused")
    result = _upload_from(browser, refused, cors_server, token, "refused.bin", tmp_path / "refused.png")
    assert result["outcome"] == "error" and "failed to create upload" in result["error"], result
    with httpx.Client(base_url=cors_server.url, headers={"Authorization": f"Bearer {token}"}) as http:
        assert http.get("/files").json()["files"] == []
        answer = http.get("/usage", headers={"Origin": refused})
    assert answer.status_code == 200 and "access-control-allow-origin" not in answer.headers



def test_a_refused_preflight_is_a_problem(cors_server: Server, origins: tuple[str, str]) -> None:
    allowed, refused = origins
    with httpx.Client(base_url=cors_server.url) as http:
        by_origin = http.options("/uploads", headers={"Origin": refused, "Access-Control-Request-Method": "PATCH"})
        by_header = http.options("/uploads", headers={"Origin": allowed, "Access-Control-Request-Method": "PATCH",
                                                      "Access-Control-Request-Headers": "x-not-accepted"})
    prefix = "this cross-origin request is not allowed, by its"
    assert assert_problem(by_origin, 400)["detail"].startswith(f"{prefix} origin:")
    assert assert_problem(by_header, 400)["detail"].startswith(f"{prefix} headers:")

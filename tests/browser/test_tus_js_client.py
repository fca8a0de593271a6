"""A stock tus-js-client, unchanged, uploads to a real `mediad serve` from Chromium.

The client is the vendored browser build of tus-js-client (tests/browser/vendor/, see its README),
loaded into mediad's own page so that its requests are same-origin, as a web app on mediad's origin
would make them. The file is generated in the page from a pattern Python computes too, so the bytes
that arrive can be checked against the bytes that were sent.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import Server

from .conftest import access_log, watched_page

VENDOR = Path(__file__).parent / "vendor"
TUS_JS_CLIENT_VERSION = "4.3.1"
TUS_JS_CLIENT = VENDOR / f"tus-js-client-{TUS_JS_CLIENT_VERSION}.min.js"

MiB = 1024 * 1024
CHUNK = 5 * MiB
SIZE = 12 * MiB + 12345  # three chunks, the last one ragged
FOLDER = "/browser/"

# Byte i of the test file: in each 1 KiB block k, the first 4 bytes are k (big-endian), the rest
# (j + 7k) mod 256 for position j. Every block differs, so a chunk written twice or at the wrong
# offset changes the sha256. `pattern` builds the same bytes in Python.
MAKE_FILE = """(name, size) => {
    const data = new Uint8Array(size);
    for (let i = 0; i < size; i++) {
        const k = i >>> 10, j = i & 1023;
        data[i] = j < 4 ? (k >>> (24 - 8 * j)) & 255 : (j + k * 7) & 255;
    }
    // A fixed lastModified: tus-js-client's fingerprint (name, type, size, lastModified, endpoint)
    // is then the same for the file built again after a reload, as for a file picked again.
    return new File([data], name, {type: "application/octet-stream", lastModified: 1700000000000});
}"""

# Runs an upload with the vendored client and records what it did. `stopAfterFirstChunk` aborts
# the upload (upload.abort(), the documented pause) once the first chunk is acknowledged;
# `resume` picks up a previous upload of the same file with the documented resume API.
UPLOAD = """async ({token, name, size, chunkSize, folder, stopAfterFirstChunk, resume}) => {
    const file = (MAKE_FILE)(name, size);
    const digest = new Uint8Array(await crypto.subtle.digest("SHA-256", await file.arrayBuffer()));
    const sha256 = [...digest].map((b) => b.toString(16).padStart(2, "0")).join("");
    const log = {sha256, requests: [], responses: [], progress: [], chunks: [], previous: null};
    return await new Promise(async (resolve) => {
        let upload;
        const finish = (outcome) => resolve({...log, ...outcome, url: upload.url});
        upload = new tus.Upload(file, {
            // Same origin as the page, so no CORS is involved. The dist build resolves Location
            // with url-parse, which accepts a relative endpoint; tus-js-client's ESM build (what
            // bundlers pick) uses `new URL(location, endpoint)`, which needs an absolute one.
            endpoint: "/uploads",
            headers: {Authorization: "Bearer " + token},
            chunkSize,
            metadata: {filename: name, path: folder},
            onBeforeRequest: (req) => {
                log.requests.push({method: req.getMethod(), url: req.getURL(),
                                   offset: req.getHeader("Upload-Offset") ?? null});
            },
            onAfterResponse: (req, res) => {
                log.responses.push({method: req.getMethod(), status: res.getStatus(),
                                    offset: res.getHeader("Upload-Offset") ?? null,
                                    location: res.getHeader("Location") ?? null,
                                    tusResumable: res.getHeader("Tus-Resumable") ?? null});
            },
            onProgress: (sent, total) => log.progress.push([sent, total]),
            onChunkComplete: (chunk, accepted, total) => {
                log.chunks.push([chunk, accepted, total]);
                if (stopAfterFirstChunk) {
                    upload.abort().then(() => finish({outcome: "aborted"}));
                }
            },
            onSuccess: (payload) => finish({
                outcome: "success",
                fileId: payload && payload.lastResponse ? payload.lastResponse.getHeader("Mediad-File-Id") : null,
            }),
            onError: (error) => finish({outcome: "error", error: String(error)}),
        });
        if (resume) {
            const previous = await upload.findPreviousUploads();
            log.previous = previous.map((p) => ({uploadUrl: p.uploadUrl, size: p.size, metadata: p.metadata}));
            if (previous.length) upload.resumeFromPreviousUpload(previous[0]);
        }
        upload.start();
    });
}""".replace("MAKE_FILE", MAKE_FILE)


def pattern(size: int) -> bytes:
    """The bytes MAKE_FILE builds in the page."""
    ramp = bytes(x & 255 for x in range(2048))
    blocks = ((k.to_bytes(4, "big") + ramp[(4 + 7 * k) % 256:][:1020]) for k in range(-(-size // 1024)))
    return b"".join(blocks)[:size]


@pytest.fixture
def tus_page(browser: Any, web_server: Server, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Any]:
    """mediad's web app page with the vendored tus-js-client loaded into it."""
    # bypass_csp only so that the test can inject its own client into the page: mediad's CSP
    # (script-src 'self') rightly refuses an inline script. The page's requests stay same-origin.
    with watched_page(browser, tmp_path / f"{request.node.name}.png", bypass_csp=True) as opened:
        load_client(opened, web_server.url)
        yield opened


def load_client(page: Any, base_url: str) -> None:
    page.goto(base_url + "/")
    assert page.evaluate("() => typeof window.tus") == "undefined"  # mediad's own client is a module
    page.add_script_tag(content=TUS_JS_CLIENT.read_text())
    assert page.evaluate("() => typeof tus.Upload === 'function' && tus.isSupported") is True


def new_user(server: Server, name: str) -> str:
    created = httpx.post(server.url + "/users", json={"name": name}, timeout=30)
    assert created.status_code == 201, created.text
    return str(created.json()["token"])


def upload_in_page(page: Any, token: str, name: str, *, stop_after_first_chunk: bool = False,
                   resume: bool = False) -> dict[str, Any]:
    result = dict(page.evaluate(UPLOAD, {
        "token": token, "name": name, "size": SIZE, "chunkSize": CHUNK, "folder": FOLDER,
        "stopAfterFirstChunk": stop_after_first_chunk, "resume": resume}))
    # Shown on the page, for the screenshot taken when the test ends.
    summary = "\n".join([f"tus-js-client {TUS_JS_CLIENT_VERSION}: {name}",
                         f"outcome: {result['outcome']} {result.get('error') or ''}", f"url: {result['url']}",
                         f"sha256 sent: {result['sha256']}",
                         *(f"{r['method']} -> {r['status']}, Upload-Offset {r['offset']}"
                           for r in result["responses"])])
    page.evaluate("""(text) => {
        const pre = document.createElement("pre");
        pre.className = "tus-js-client-result";
        pre.textContent = text;
        document.body.append(pre); }""", summary)
    return result


def check_stored(server: Server, token: str, name: str, file_id: str, expected: bytes) -> None:
    """The File is where the metadata put it, with the bytes that were sent."""
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {token}"}, timeout=30) as http:
        listed = http.get("/files", params={"prefix": FOLDER}).json()["files"]
        assert [(f["id"], f["path"]) for f in listed] == [(file_id, FOLDER + name)]
        stored = listed[0]
        assert stored["name"] == name and stored["size"] == len(expected)
        assert stored["sha256"] == hashlib.sha256(expected).hexdigest()
        content = http.get(f"/files/{file_id}/content")
        assert content.status_code == 200 and content.content == expected
        by_path = http.get("/download", params={"path": FOLDER + name})
        assert by_path.status_code == 200 and by_path.content == expected


def absolute(server: Server, url: str) -> str:
    return str(httpx.URL(server.url).join(url))


def patch_bytes_in(server: Server, upload_url: str, count: int) -> list[int]:
    """What the server's access log says each PATCH to this upload carried (the line of the last
    one is written just after its answer went out, so wait a moment for `count` of them)."""
    upload_path = httpx.URL(upload_url).path
    deadline = time.monotonic() + 5
    while True:
        sizes = [entry["bytes_in"] for entry in access_log(server.data_dir.parent / "mediad.log")
                 if entry["method"] == "PATCH" and entry["path"] == upload_path]
        if len(sizes) >= count or time.monotonic() > deadline:
            return sizes
        time.sleep(0.05)


def test_tus_js_client_uploads_a_file_in_chunks(tus_page: Any, web_server: Server) -> None:
    token = new_user(web_server, "tus-js-client")
    name = "from-tus-js-client.bin"
    expected = pattern(SIZE)

    result = upload_in_page(tus_page, token, name)

    assert result["outcome"] == "success", result.get("error")
    assert result["sha256"] == hashlib.sha256(expected).hexdigest()  # the page built the same bytes
    # The protocol as tus-js-client spoke it: one creation, then a PATCH per 5 MiB chunk.
    assert [(r["method"], r["offset"]) for r in result["requests"]] == [
        ("POST", None), ("PATCH", "0"), ("PATCH", str(CHUNK)), ("PATCH", str(2 * CHUNK))]
    assert [(r["method"], r["status"], r["offset"]) for r in result["responses"]] == [
        ("POST", 201, None), ("PATCH", 204, str(CHUNK)), ("PATCH", 204, str(2 * CHUNK)), ("PATCH", 204, str(SIZE))]
    assert all(r["tusResumable"] == "1.0.0" for r in result["responses"])
    assert result["responses"][0]["location"].startswith("/uploads/")
    assert result["url"] == result["responses"][0]["location"]  # kept relative, as the endpoint was
    assert [accepted for _, accepted, _ in result["chunks"]] == [CHUNK, 2 * CHUNK, SIZE]
    # Progress: per-chunk XHR upload progress, never going back, ending at the whole file.
    progress = [sent for sent, total in result["progress"] if total == SIZE]
    assert len(progress) == len(result["progress"]) and progress[-1] == SIZE
    assert progress == sorted(progress) and len(set(progress)) >= 3
    assert patch_bytes_in(web_server, result["url"], 3) == [CHUNK, CHUNK, SIZE - 2 * CHUNK]

    assert result["fileId"]  # the final PATCH names the File it made
    check_stored(web_server, token, name, result["fileId"], expected)
    with httpx.Client(base_url=web_server.url, headers={"Authorization": f"Bearer {token}"}) as http:
        status = http.get(result["url"]).json()
    assert status["offset"] == status["length"] == SIZE and status["file_id"] == result["fileId"]


def test_tus_js_client_resumes_an_aborted_upload_after_a_reload(tus_page: Any, web_server: Server) -> None:
    token = new_user(web_server, "tus-js-client-resume")
    name = "resumed-by-tus-js-client.bin"
    expected = pattern(SIZE)

    first = upload_in_page(tus_page, token, name, stop_after_first_chunk=True)
    assert first["outcome"] == "aborted", first.get("error")
    assert [(r["method"], r["status"]) for r in first["responses"]] == [("POST", 201), ("PATCH", 204)]
    upload_url = first["url"]
    # The server holds the first chunk, durably acknowledged.
    head = httpx.head(absolute(web_server, upload_url),
                      headers={"Authorization": f"Bearer {token}", "Tus-Resumable": "1.0.0"})
    assert head.status_code == 200
    offset = int(head.headers["upload-offset"])
    assert offset == CHUNK and int(head.headers["upload-length"]) == SIZE

    # A reload, as after a closed tab: only tus-js-client's localStorage entry remembers the upload.
    load_client(tus_page, web_server.url)
    second = upload_in_page(tus_page, token, name, resume=True)

    assert second["outcome"] == "success", second.get("error")
    assert [p["uploadUrl"] for p in second["previous"]] == [upload_url]
    assert second["previous"][0]["size"] == SIZE and second["previous"][0]["metadata"]["filename"] == name
    assert second["url"] == upload_url
    # No new upload: HEAD for the offset, then PATCHes from there on.
    assert [(r["method"], r["offset"]) for r in second["requests"]] == [
        ("HEAD", None), ("PATCH", str(offset)), ("PATCH", str(2 * CHUNK))]
    assert [(r["method"], r["status"], r["offset"]) for r in second["responses"]] == [
        ("HEAD", 200, str(offset)), ("PATCH", 204, str(2 * CHUNK)), ("PATCH", 204, str(SIZE))]
    assert min(sent for sent, _ in second["progress"]) >= offset and second["progress"][-1] == [SIZE, SIZE]
    # The server received each byte once: far less than the 2x a restart from zero would cost.
    received = patch_bytes_in(web_server, upload_url, 3)
    assert received == [CHUNK, CHUNK, SIZE - 2 * CHUNK]
    assert sum(received) == SIZE < 2 * SIZE

    check_stored(web_server, token, name, second["fileId"], expected)

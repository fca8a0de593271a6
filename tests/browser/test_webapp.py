"""The web app in Chromium against a real `mediad serve` on its embedded defaults: sign up, upload
through the picker with progress, the file list, links, downloads, deletion, video playback with
seeking through ranges, a recording, and an upload that resumes after the server is killed."""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import re
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from conftest import CLOUD_TOKEN, MockCloud, Server, mediad_process, stop_postmaster

from .conftest import Relay, access_log, sign_up

expect = pytest.importorskip(
    "playwright.sync_api", reason="Playwright for Python is missing: pip install -e '.[test]'").expect

KiB, MiB = 1024, 1024 * 1024
WEB_DIR = Path(__file__).parents[2] / "mediad" / "web"


def human(size: int) -> str:
    """What the page shows for a size (app.js humanSize)."""
    if size < 1024:
        return f"{size} {'byte' if size == 1 else 'bytes'}"
    value, unit = size / 1024, 0
    units = ["KiB", "MiB", "GiB", "TiB", "PiB"]
    while value >= 1024 and unit < len(units) - 1:
        value, unit = value / 1024, unit + 1
    return f"{value:.1f} {units[unit]}" if value < 10 else f"{round(value)} {units[unit]}"


def log_path(server: Server) -> Path:
    return server.data_dir.parent / "mediad.log"


def api(server_url: str, token: str) -> httpx.Client:
    return httpx.Client(base_url=server_url, headers={"Authorization": f"Bearer {token}"}, timeout=30)


def test_the_page_is_served_under_a_strict_policy(web_server: Server) -> None:
    index = httpx.get(web_server.url + "/")
    assert index.status_code == 200 and index.headers["content-type"] == "text/html; charset=utf-8"
    assert index.headers["cache-control"] == "no-cache"
    csp = index.headers["content-security-policy"]
    for directive in ("default-src 'self'", "script-src 'self'", "style-src 'self'", "media-src 'self'",
                      "connect-src 'self'", "object-src 'none'", "frame-ancestors 'none'"):
        assert directive in csp
    assert "unsafe" not in csp
    for asset, kind in (("app.js", "text/javascript"), ("tus.js", "text/javascript"), ("style.css", "text/css")):
        response = httpx.get(f"{web_server.url}/web/{asset}")
        assert response.status_code == 200 and response.headers["content-type"].startswith(kind)
        assert re.fullmatch(r"public, max-age=\d+", response.headers["cache-control"])
        assert response.headers["content-security-policy"] == csp and response.headers["etag"]
        again = httpx.get(f"{web_server.url}/web/{asset}", headers={"If-None-Match": response.headers["etag"]})
        assert again.status_code == 304
    missing = httpx.get(web_server.url + "/web/nothing.js")
    assert missing.status_code == 404 and missing.headers["content-type"] == "application/problem+json"
    # No inline script or style, nothing from another origin.
    html = (WEB_DIR / "index.html").read_text()
    assert not re.search(r"<script(?![^>]*\bsrc=)[^>]*>", html) and " style=" not in html
    assert not re.search(r"\bon[a-z]+=", html)
    for source in WEB_DIR.iterdir():
        if source.suffix in (".html", ".css", ".js"):
            code = "\n".join(line for line in source.read_text().splitlines() if not line.strip().startswith("//"))
            assert not re.search(r"(src|href|url\()\s*=?\s*[\"']?(https?:)?//", code), source.name


def test_sign_up_upload_list_share_download_and_delete(page: Any, web_server: Server, tmp_path: Path) -> None:
    page.goto(web_server.url + "/")
    page.get_by_label("Name", exact=True).fill("nobody-here")
    page.get_by_label("Password", exact=True).fill("whatever-password")
    page.get_by_role("button", name="Sign in").click()
    expect(page.locator("#alert")).to_contain_text("wrong name or password")  # the API's detail, in words

    token = sign_up(page, web_server.url, "alice")
    contents = {"notes.txt": b"hello mediad\n" * 100, "big.bin": random.Random(1).randbytes(MiB + 512 * KiB + 7)}
    for name, data in contents.items():
        (tmp_path / name).write_bytes(data)
    page.get_by_label("Target folder").fill("inbox")
    page.locator("#file-input").set_input_files([str(tmp_path / name) for name in contents])

    for name, data in contents.items():
        item = page.locator(f'#uploads li[data-name="{name}"]')
        expect(item).to_have_attribute("data-state", "done")
        expect(item.locator("progress")).to_have_js_property("value", 100)
        expect(item).to_contain_text(f"100% · {human(len(data))} of {human(len(data))}")
        row = page.locator(f'#file-rows tr[data-name="{name}"]')
        expect(row.locator("td.size")).to_have_text(human(len(data)))
        expect(row.locator("td.size")).to_have_attribute("data-bytes", str(len(data)))
        expect(row.locator("td.path")).to_have_text(f"/inbox/{name}")
    expect(page.locator("#usage")).to_contain_text(f"2 files · {human(sum(map(len, contents.values())))}")
    expect(page.locator('#file-rows tr[data-name="notes.txt"] td.type')).to_have_text("text/plain")
    with api(web_server.url, token) as http:
        listed = {f["name"]: f for f in http.get("/files").json()["files"]}
    assert {n: f["sha256"] for n, f in listed.items()} == {
        n: hashlib.sha256(d).hexdigest() for n, d in contents.items()}

    # Sort and filter.
    page.get_by_label("Sort by").select_option("size-asc")
    expect(page.locator("#file-rows tr").first).to_have_attribute("data-name", "notes.txt")
    page.get_by_label("Sort by").select_option("name-asc")
    expect(page.locator("#file-rows tr").first).to_have_attribute("data-name", "big.bin")
    page.get_by_label("Folder prefix").fill("/elsewhere/")
    page.get_by_role("button", name="Filter").click()
    expect(page.locator("#files-status")).to_have_text("No files under /elsewhere/.")
    page.get_by_label("Folder prefix").fill("/inbox/")
    page.get_by_role("button", name="Filter").click()
    expect(page.locator("#file-rows tr")).to_have_count(2)

    # Copy a signed link: it works with no token at all.
    page.get_by_role("button", name="Copy a link to notes.txt").click()
    shared = page.locator("#share-url")
    expect(shared).to_have_value(re.compile(r"/files/[0-9a-f-]+/content\?expires=\d+&inline=0&signature="))
    link = shared.input_value()
    assert urlsplit(link).netloc == urlsplit(web_server.url).netloc
    assert httpx.get(link).content == contents["notes.txt"]
    page.get_by_role("button", name="Close").click()

    # Download through the browser.
    with page.expect_download() as download:
        page.get_by_role("button", name="Download big.bin").click()
    assert download.value.suggested_filename == "big.bin"
    assert Path(download.value.path()).read_bytes() == contents["big.bin"]

    # Delete, with a confirmation that can be declined.
    page.get_by_role("button", name="Delete notes.txt").click()
    expect(page.locator("#confirm")).to_be_visible()
    page.locator("#confirm").get_by_role("button", name="Cancel").click()
    expect(page.locator('#file-rows tr[data-name="notes.txt"]')).to_have_count(1)
    page.get_by_role("button", name="Delete notes.txt").click()
    page.locator("#confirm").get_by_role("button", name="Delete").click()
    expect(page.locator('#file-rows tr[data-name="notes.txt"]')).to_have_count(0)
    expect(page.locator("#usage")).to_contain_text("1 file ·")
    with api(web_server.url, token) as http:
        assert [f["name"] for f in http.get("/files").json()["files"]] == ["big.bin"]

    # Drag and drop.
    dropped = page.evaluate_handle("""() => {
        const transfer = new DataTransfer();
        transfer.items.add(new File(['dropped bytes'], 'dropped.txt', {type: 'text/plain'}));
        return transfer; }""")
    page.dispatch_event("#dropzone", "drop", {"dataTransfer": dropped})
    expect(page.locator('#uploads li[data-name="dropped.txt"]')).to_have_attribute("data-state", "done")
    expect(page.locator('#file-rows tr[data-name="dropped.txt"] td.path')).to_have_text("/inbox/dropped.txt")
    page.get_by_role("button", name="Clear finished uploads").click()
    expect(page.locator("#uploads li")).to_have_count(0)

    # Every control has a name, and the page fits a 375 px wide phone.
    unnamed = page.evaluate("""() => [...document.querySelectorAll('input, select, button')]
        .filter((el) => !(el.labels && el.labels.length) && !el.getAttribute('aria-label')
                        && !el.textContent.trim())
        .map((el) => el.outerHTML)""")
    assert unnamed == []
    page.set_viewport_size({"width": 375, "height": 800})
    assert page.evaluate("() => document.documentElement.scrollWidth") <= 375

    page.get_by_role("button", name="Sign out").click()
    expect(page.locator("#auth")).to_be_visible()
    assert page.evaluate("() => sessionStorage.length") == 0


def test_bidi_controls_in_names_are_shown_not_obeyed(page: Any, web_server: Server) -> None:
    """Names are stored as sent (API.md), so "evil<RLO>txt.exe" would read "evilexe.txt": the page
    shows such controls as code points, in the list, the upload history and the delete dialog."""
    token = sign_up(page, web_server.url, "mallory")
    name = "evil\u202etxt.exe"
    with api(web_server.url, token) as http:
        response = http.post("/files", params={"name": name, "path": "/\u2066in\u2069/"}, content=b"MZ" * 64)
        assert response.status_code == 201 and response.json()["name"] == name
    page.reload()
    row = page.locator("#file-rows tr").first
    expect(row.locator("td.name")).to_have_text("evil[U+202E]txt.exe")
    expect(row.locator("td.path")).to_have_text("/[U+2066]in[U+2069]/evil[U+202E]txt.exe")
    row.get_by_role("button", name="Delete evil[U+202E]txt.exe").click()
    expect(page.locator("#confirm")).to_contain_text("Delete “evil[U+202E]txt.exe”?")


def _encoder(ffmpeg: str) -> tuple[list[str], str]:
    """Codec options and file suffix for a video Chromium plays, from what this ffmpeg build has."""
    encoders = subprocess.run([ffmpeg, "-hide_banner", "-encoders"], capture_output=True, text=True).stdout
    if " libx264 " in encoders:
        return ["-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p", "-movflags", "+faststart"], "mp4"
    if " libvpx " in encoders:
        return ["-c:v", "libvpx", "-deadline", "realtime", "-cpu-used", "8", "-b:v", "3M"], "webm"
    return ["-c:v", "mpeg4", "-q:v", "2", "-movflags", "+faststart"], "mp4"


def make_video(directory: Path, seconds: int = 30) -> Path:
    """A noisy test pattern: a few MiB, more than Chromium buffers ahead, so a far seek needs a
    new range request."""
    ffmpeg = pytest.importorskip("imageio_ffmpeg").get_ffmpeg_exe()
    options, suffix = _encoder(ffmpeg)
    target = directory / f"clip.{suffix}"
    subprocess.run([ffmpeg, "-hide_banner", "-loglevel", "error", "-y", "-f", "lavfi", "-i",
                    f"testsrc=size=320x240:rate=25:duration={seconds},noise=alls=40:allf=t", *options,
                    str(target)], check=True, timeout=60)
    return target


def test_a_video_plays_inline_and_seeking_asks_for_ranges(page: Any, web_server: Server, tmp_path: Path) -> None:
    video_file = make_video(tmp_path)
    sign_up(page, web_server.url, "bob")
    page.locator("#file-input").set_input_files(str(video_file))
    expect(page.locator(f'#uploads li[data-name="{video_file.name}"]')).to_have_attribute("data-state", "done")
    row = page.locator(f'#file-rows tr[data-name="{video_file.name}"]')
    expect(row.locator("td.type")).to_have_text(re.compile(r"video/"))
    file_id = row.get_attribute("data-id")

    responses: list[tuple[float, int, str]] = []
    page.on("response", lambda r: responses.append((time.monotonic(), r.status, r.request.headers.get("range", "")))
            if f"/files/{file_id}/content?" in r.url else None)
    page.get_by_role("button", name=f"Play {video_file.name}").click()
    video = page.locator("#preview video")
    expect(video).to_be_visible()
    assert "signature=" in (video.get_attribute("src") or "")
    page.wait_for_function("() => document.querySelector('#preview video').readyState >= 1")
    page.evaluate("() => document.querySelector('#preview video').play()")
    page.wait_for_function("() => document.querySelector('#preview video').currentTime > 0.3")

    seeked_at = time.monotonic()
    page.evaluate("() => { const v = document.querySelector('#preview video'); v.currentTime = v.duration * 0.85; }")
    page.wait_for_function("""() => { const v = document.querySelector('#preview video');
                                      return !v.seeking && v.currentTime > v.duration * 0.8; }""")
    page.wait_for_function("() => document.querySelector('#preview video').readyState >= 3")
    after_seek = [(status, wanted) for moment, status, wanted in responses if moment >= seeked_at]
    assert any(status == 206 and re.fullmatch(r"bytes=[1-9]\d*-\d*", wanted) for status, wanted in after_seek), \
        responses
    served = [e for e in access_log(log_path(web_server)) if e["path"] == f"/files/{file_id}/content"]
    assert sum(e["status"] == 206 for e in served) >= 2, served
    assert not page.locator("#alert").is_visible()


def test_a_recording_is_kept_as_mp3_and_plays(page: Any, web_server: Server) -> None:
    sign_up(page, web_server.url, "dana")
    page.get_by_role("button", name="Start recording").click()  # Chromium's fake microphone
    expect(page.locator("#record-time")).to_contain_text("Recording")
    page.wait_for_timeout(1500)
    page.get_by_role("button", name="Stop and upload").click()
    expect(page.locator("#record-status")).to_contain_text("Saved record-")
    player = page.locator("#records audio").first
    assert (player.get_attribute("src") or "").startswith("/record?id=")
    page.wait_for_function("() => document.querySelector('#records audio').readyState >= 1")
    duration = page.evaluate("() => document.querySelector('#records audio').duration")
    assert 1.0 < duration < 4.0
    expect(page.locator("#file-rows tr td.type", has_text="audio/mpeg")).to_have_count(1)


def _remembered_upload_url(page: Any, name: str) -> str | None:
    """The tus upload URL the page keeps in localStorage for a file it has not finished."""
    return page.evaluate("""(name) => {
        for (let i = 0; i < localStorage.length; i += 1) {
            const entry = JSON.parse(localStorage.getItem(localStorage.key(i)));
            if (entry.name === name) return entry.url;
        }
        return null; }""", name)


def _slow_uplink(page: Any) -> None:
    """Throttle the page's uploads, so there is time to press buttons mid-upload."""
    cdp = page.context.new_cdp_session(page)
    cdp.send("Network.enable")
    cdp.send("Network.emulateNetworkConditions", {"offline": False, "latency": 0, "downloadThroughput": -1,
                                                  "uploadThroughput": 6 * MiB})


def _wait_for_percent(page: Any, name: str, percent: int) -> None:
    # Polled on every animation frame: a short window of progress is not missed.
    page.wait_for_function("""([name, percent]) => {
        const item = [...document.querySelectorAll('#uploads li')].find((li) => li.dataset.name === name);
        return item && Number(item.dataset.percent) >= percent; }""", arg=[name, percent])


def test_pause_resume_cancel_and_resume_after_a_reload(page: Any, web_server: Server, tmp_path: Path) -> None:
    data = os.urandom(24 * MiB)
    source = tmp_path / "slow.bin"
    source.write_bytes(data)
    token = sign_up(page, web_server.url, "erin")
    page.on("dialog", lambda dialog: dialog.accept())  # "leave the page?" while uploading
    _slow_uplink(page)
    page.locator("#file-input").set_input_files(str(source))
    item = page.locator('#uploads li[data-name="slow.bin"]')
    _wait_for_percent(page, "slow.bin", 10)
    expect(item).to_contain_text("/s")  # the speed
    item.get_by_role("button", name="Pause").click()
    expect(item).to_have_attribute("data-state", "paused")
    url = _remembered_upload_url(page, "slow.bin")
    assert url
    with api(web_server.url, token) as http:
        def offset() -> int:
            return int(http.head(url, headers={"Tus-Resumable": "1.0.0"}).headers["upload-offset"])

        page.wait_for_timeout(500)  # the server finishes with the cut-off chunk
        paused_at = offset()
        page.wait_for_timeout(700)
        assert offset() == paused_at < len(data)  # paused means paused

        item.get_by_role("button", name="Resume").click()
        expect(item).to_have_attribute("data-state", "running")
        _wait_for_percent(page, "slow.bin", 50)

        # The page goes away mid-upload; choosing the same file again continues it.
        page.reload()
        expect(page.locator("#remembered")).to_contain_text("slow.bin")
        _slow_uplink(page)
        resumed_from = offset()
        assert resumed_from > paused_at
        page.locator("#file-input").set_input_files(str(source))
        expect(item).to_have_attribute("data-state", "done")
        expect(page.locator("#remembered")).to_be_hidden()
        file_id = item.get_attribute("data-file-id")
        assert http.get(f"/files/{file_id}").json()["sha256"] == hashlib.sha256(data).hexdigest()
        patched = [e for e in access_log(log_path(web_server))
                   if e["method"] == "PATCH" and e["path"] == urlsplit(url).path]
        # The server keeps the bytes of a cut-off PATCH and the page asks for the offset: not one
        # byte went up twice, across a pause and a reload.
        assert sum(e["bytes_in"] for e in patched) == len(data)

        # Cancel removes the partial upload from the server.
        cancelled = tmp_path / "cancel.bin"
        cancelled.write_bytes(data)
        page.locator("#file-input").set_input_files(str(cancelled))
        doomed = page.locator('#uploads li[data-name="cancel.bin"]')
        _wait_for_percent(page, "cancel.bin", 1)
        doomed_url = _remembered_upload_url(page, "cancel.bin")
        assert doomed_url
        doomed.get_by_role("button", name="Cancel").click()
        expect(doomed).to_have_attribute("data-state", "cancelled")
        expect(doomed.locator(".status")).to_have_text("Cancelled")
        assert _remembered_upload_url(page, "cancel.bin") is None
        assert http.head(doomed_url, headers={"Tus-Resumable": "1.0.0"}).status_code == 404


KILL_AT = 24 * MiB  # the page sends 8 MiB chunks: the server is killed with three acknowledged


def test_an_upload_resumes_after_the_server_is_killed(page: Any, tmp_path: Path, mock_cloud: MockCloud) -> None:
    data = os.urandom(40 * MiB)
    source = tmp_path / "large.bin"
    source.write_bytes(data)
    data_dir = tmp_path / "data"
    env = {"MEDIAD_CLOUD_URL": mock_cloud.url, "MEDIAD_CLOUD_TOKEN": CLOUD_TOKEN}  # no child to orphan
    relay = Relay()
    try:
        with contextlib.ExitStack() as servers:
            first = servers.enter_context(mediad_process(data_dir, database_url=None, env=env,
                                                         log_path=tmp_path / "first.log"))
            relay.upstream_port = urlsplit(first.url).port
            token = sign_up(page, relay.url, "carol")
            killed = threading.Event()

            def kill_before_the_fourth_chunk(route: Any) -> None:
                # Held here, this PATCH has not reached the server: it dies with no write in flight
                # (a PATCH cut by a crash leaves its upload locked for a minute; see tus.py).
                request = route.request
                if (request.method == "PATCH" and not killed.is_set()
                        and int(request.headers.get("upload-offset", "0")) >= KILL_AT):
                    assert first.process is not None
                    first.process.send_signal(signal.SIGKILL)
                    first.process.wait(10)
                    killed.set()
                route.continue_()

            page.route("**/uploads/**", kill_before_the_fourth_chunk)
            relay.bytes_up = 0
            page.locator("#file-input").set_input_files(str(source))
            item = page.locator('#uploads li[data-name="large.bin"]')
            deadline = time.monotonic() + 60
            while not killed.is_set():
                assert time.monotonic() < deadline, "the upload never reached the kill point"
                page.wait_for_timeout(50)
            page.unroute("**/uploads/**")
            expect(item.locator(".status")).to_contain_text("retrying")
            assert item.get_attribute("data-state") == "running"

            second = servers.enter_context(mediad_process(data_dir, database_url=None, env=env,
                                                          log_path=tmp_path / "second.log"))
            relay.upstream_port = urlsplit(second.url).port
            expect(item).to_have_attribute("data-state", "done", timeout=60_000)
            file_id = item.get_attribute("data-file-id")
            with api(relay.url, token) as http:
                stored = http.get(f"/files/{file_id}").json()
            assert stored["size"] == len(data) and stored["sha256"] == hashlib.sha256(data).hexdigest()

            assert relay.bytes_up < 2 * len(data)
            before = sum(e["bytes_in"] for e in access_log(tmp_path / "first.log") if e["method"] == "PATCH")
            after = sum(e["bytes_in"] for e in access_log(tmp_path / "second.log") if e["method"] == "PATCH")
            assert before == KILL_AT and after == len(data) - KILL_AT  # nothing sent twice
    finally:
        relay.close()
        stop_postmaster(data_dir / "pg")


def test_the_account_lists_creates_and_revokes_tokens_and_sign_out_revokes_the_session(
        page: Any, web_server: Server) -> None:
    token = sign_up(page, web_server.url, "account-page")
    with api(web_server.url, token) as http:
        laptop = http.post("/auth/tokens", json={"name": "laptop"}).json()

    page.get_by_role("button", name="Account").click()
    dialog = page.locator("#account-dialog")
    expect(dialog).to_be_visible()
    expect(page.locator("#account-summary")).to_contain_text("account-page · 0 files, 0 bytes")
    rows = page.locator("#token-rows tr")
    expect(rows).to_have_count(2)
    expect(rows.nth(0).locator("td.name")).to_have_text("signup (this browser)")
    expect(rows.nth(1).locator("td.name")).to_have_text("laptop")

    # Keyboard only: type a name, Enter creates the token, which is shown once, selected for copying.
    page.locator("#token-name").focus()
    page.keyboard.type("backup script")
    page.keyboard.press("Enter")
    expect(rows).to_have_count(3)
    created = page.locator("#new-token-value")
    expect(created).to_be_focused()
    new_token = created.input_value()
    with api(web_server.url, new_token) as http:
        assert http.get("/usage").status_code == 200

    page.set_viewport_size({"width": 375, "height": 800})
    assert page.evaluate("() => document.querySelector('#account-dialog').scrollWidth") <= 375
    page.get_by_role("button", name="Revoke laptop").click()
    expect(rows).to_have_count(2)
    expect(page.locator("#tokens-status")).to_have_text("2 tokens")
    with api(web_server.url, laptop["token"]) as http:
        assert http.get("/usage").status_code == 401
    page.keyboard.press("Escape")
    expect(dialog).to_be_hidden()

    with page.expect_request(lambda r: r.method == "DELETE" and r.url.endswith("/auth/token")) as signing_out:
        page.get_by_role("button", name="Sign out").click()
    assert signing_out.value.headers["authorization"] == f"Bearer {token}"
    expect(page.locator("#auth")).to_be_visible()
    assert page.evaluate("() => sessionStorage.length") == 0

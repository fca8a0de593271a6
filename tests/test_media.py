"""Probing: every upload gets a "media" object describing what it really is, never GPS, never a
rejected upload; the kind filter; replace and restart."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import media_samples as samples
import pytest
from conftest import (
    User,
    assert_problem,
    free_port,
    make_settings,
    make_user,
    mediad_process,
    probed,
    serve_in_thread,
    upload,
)

pytestmark = pytest.mark.timeout(120)

_IMAGE_KEYS = {"kind", "status", "error", "width", "height", "orientation"}


async def _probe(http: httpx.AsyncClient, user: User, data: bytes, name: str) -> dict[str, Any]:
    created = await upload(http, user, data, name=name)
    assert created["media"] is None  # answered before probing: pending
    file = await probed(http, user, created["id"])
    assert "gps" not in json.dumps(file).lower()
    media: dict[str, Any] = file["media"]
    return media


def _close(value: float, expected: float, within: float = 0.1) -> bool:
    return abs(value - expected) <= within


async def test_video_containers_and_codecs(client: httpx.AsyncClient, user: User) -> None:
    mp4 = await _probe(client, user, samples.video(seconds=2.0), "clip.mp4")
    assert _close(mp4.pop("duration_s"), 2.0) and mp4.pop("bitrate") > 0
    assert mp4 == {"kind": "video", "status": "ready", "error": None, "container": "mov,mp4,m4a,3gp,3g2,mj2",
                   "width": 320, "height": 240, "video_codec": "h264", "frame_rate": 25.0, "rotation": 0,
                   "audio_codec": "aac", "channels": 2, "sample_rate": 48000}

    webm = await _probe(client, user, samples.video(fmt="webm", codec="libvpx-vp9", audio_codec="libopus",
                                                    width=160, height=90, fps=30, seconds=1.0), "clip.webm")
    assert _close(webm.pop("duration_s"), 1.0) and webm.pop("bitrate") > 0
    assert webm == {"kind": "video", "status": "ready", "error": None, "container": "matroska,webm",
                    "width": 160, "height": 90, "video_codec": "vp9", "frame_rate": 30.0, "rotation": 0,
                    "audio_codec": "opus", "channels": 2, "sample_rate": 48000}


async def test_rotated_video_reports_displayed_size(client: httpx.AsyncClient, user: User) -> None:
    # A phone held upright records 320×240 and a display matrix turning it 90° clockwise.
    media = await _probe(client, user, samples.video(fmt="mov", rotation=-90, audio_codec=None), "phone.mov")
    assert (media["width"], media["height"], media["rotation"]) == (240, 320, 90)
    assert "audio_codec" not in media and "channels" not in media and "sample_rate" not in media


async def test_audio_files(client: httpx.AsyncClient, user: User) -> None:
    mp3 = await _probe(client, user, samples.mp3(seconds=1.5, cover=samples.jpeg_cover()), "song.mp3")
    assert _close(mp3.pop("duration_s"), 1.5) and mp3.pop("bitrate") > 0
    # The cover is a picture stream, not a video: the file is audio and has no video fields.
    assert mp3 == {"kind": "audio", "status": "ready", "error": None, "container": "mp3",
                   "audio_codec": "mp3", "channels": 2, "sample_rate": 44100}

    wav = await _probe(client, user, samples.wav(seconds=1.0, rate=22050), "take.wav")
    assert _close(wav.pop("duration_s"), 1.0)
    assert abs(wav.pop("bitrate") - 352800) < 352800 * 0.01  # the container's: the header counts too
    assert wav == {"kind": "audio", "status": "ready", "error": None, "container": "wav",
                   "audio_codec": "pcm_s16le", "channels": 1, "sample_rate": 22050}

    flac = await _probe(client, user, samples.flac(seconds=1.0), "take.flac")
    assert _close(flac.pop("duration_s"), 1.0) and flac.pop("bitrate") > 0
    assert flac == {"kind": "audio", "status": "ready", "error": None, "container": "flac",
                    "audio_codec": "flac", "channels": 1, "sample_rate": 44100}


async def test_images_with_exif_orientation_and_no_gps(client: httpx.AsyncClient, user: User) -> None:
    photo = await _probe(client, user, samples.photo(width=400, height=300, orientation=6), "IMG_0001.JPG")
    # Orientation 6: shown turned a quarter clockwise, so 300 wide and 400 high.
    assert photo == {"kind": "image", "status": "ready", "error": None, "width": 300, "height": 400,
                     "orientation": 6, "taken_at": "2026-05-01T10:00:00Z", "camera": "Canon EOS R5"}

    png = await _probe(client, user, samples.png_alpha(64, 48), "alpha.png")
    assert png == {"kind": "image", "status": "ready", "error": None, "width": 64, "height": 48, "orientation": 1}
    gif = await _probe(client, user, samples.gif_1x1(), "pixel.gif")
    assert gif == {"kind": "image", "status": "ready", "error": None, "width": 1, "height": 1, "orientation": 1}
    avif = await _probe(client, user, samples.avif(64, 48), "photo.avif")
    assert avif == {"kind": "image", "status": "ready", "error": None, "width": 64, "height": 48, "orientation": 1}


@pytest.mark.parametrize(("taken", "offset", "taken_at"), [
    ("0001:01:01 00:00:00", "+02:00", None),  # in UTC that is year 0
    ("9999:12:31 23:59:59", "-02:00", None),  # and that is year 10000
    ("2026:05:01 12:00:00", "+25:00", None),  # no clock is a day or more from UTC
    ("2026:05:01 12:00:00", "+02:60", None),
    ("0999:01:01 12:00:00", None, "0999-01-01T12:00:00Z"),  # RFC 3339: four digits of year
    ("0999:06:01 12:00:00", "+01:30", "0999-06-01T10:30:00Z"),
    ("2026:05:01 00:30:00", "+01:00", "2026-04-30T23:30:00Z"),
])
async def test_an_odd_exif_date_is_no_date(client: httpx.AsyncClient, user: User, taken: str,
                                           offset: str | None, taken_at: str | None) -> None:
    # Whatever the date tag says, the picture itself is fine: it is probed and has a thumbnail.
    created = await upload(client, user, samples.photo(width=64, height=48, orientation=1, taken=taken,
                                                       offset=offset), name="odd-date.jpg")
    media = (await probed(client, user, created["id"]))["media"]
    expected = {"kind": "image", "status": "ready", "error": None, "width": 64, "height": 48,
                "orientation": 1, "camera": "Canon EOS R5"}
    assert media == (expected if taken_at is None else {**expected, "taken_at": taken_at})
    thumb = await client.get(f"/files/{created['id']}/thumbnail", params={"size": "32"}, headers=user.auth)
    assert thumb.status_code == 200, thumb.text
    assert (samples.decode(thumb.content).width, samples.decode(thumb.content).height) == (32, 24)


async def test_other_files_are_ready_at_once(client: httpx.AsyncClient, user: User) -> None:
    # Nothing to probe in a text file: its media is known in the upload's answer already.
    created = await upload(client, user, b"just some notes\n", name="notes.txt")
    assert created["media"] == {"kind": "other", "status": "ready", "error": None}


@pytest.mark.parametrize(("name", "make", "kind", "reason"), [
    ("bomb.png", lambda: samples.png_bomb(30000), "image",
     "the image is too large to decode: 30000×30000 pixels is over the limit of 100 megapixels"),
    ("cut.mp4", lambda: samples.video(seconds=2.0)[:4000], "video", "the file does not decode as audio or video"),
    ("liar.jpg", lambda: bytes(range(256)) * 20, "image",
     "the file is not an image this server can read (or it is damaged)"),
    ("empty.mp4", lambda: b"", "video", "the file does not decode as audio or video"),
])
async def test_bad_files_are_kept_and_fail_with_a_reason(client: httpx.AsyncClient, user: User, name: str,
                                                         make: Any, kind: str, reason: str) -> None:
    data = make()
    created = await upload(client, user, data, name=name)
    file = await probed(client, user, created["id"])
    media = file["media"]
    assert media["kind"] == kind and media["status"] == "failed"
    assert media["error"].startswith(reason), media["error"]
    assert set(media) == {"kind", "status", "error"}
    content = await client.get(f"/files/{created['id']}/content", headers=user.auth)
    assert content.status_code == 200 and content.content == data  # probing never rejects an upload
    thumb = await client.get(f"/files/{created['id']}/thumbnail", headers=user.auth)
    assert assert_problem(thumb, 404)["detail"].startswith("no thumbnail can be made for this file: " + reason)


async def test_kind_filter(client: httpx.AsyncClient, user: User) -> None:
    ids = {}
    for name, data, path in [("a.jpg", samples.photo(), "/pics/a.jpg"), ("b.png", samples.png_alpha(), "/b.png"),
                             ("c.mp4", samples.video(seconds=0.4), "/pics/c.mp4"),
                             ("d.mp3", samples.mp3(seconds=0.3), None), ("e.txt", b"text", "/pics/e.txt")]:
        ids[name] = (await upload(client, user, data, name=name, path=path))["id"]
    other = await make_user(client)
    await upload(client, other, samples.photo(), name="theirs.jpg")

    async def listed(**params: str) -> set[str]:
        response = await client.get("/files", headers=user.auth, params=params)
        assert response.status_code == 200, response.text
        return {f["id"] for f in response.json()["files"]}

    # Before probing the format decides; after it, the probe: the answers are the same here.
    assert await listed(kind="image") == {ids["a.jpg"], ids["b.png"]}
    for file_id in ids.values():
        await probed(client, user, file_id)
    assert await listed(kind="image") == {ids["a.jpg"], ids["b.png"]}
    assert await listed(kind="video") == {ids["c.mp4"]}
    assert await listed(kind="audio") == {ids["d.mp3"]}
    assert await listed(kind="other") == {ids["e.txt"]}
    assert await listed(kind="image", prefix="/pics/") == {ids["a.jpg"]}
    assert await listed(kind="other", prefix="/pics/") == {ids["e.txt"]}
    for bad in ("IMAGE", "images", ""):
        assert_problem(await client.get("/files", headers=user.auth, params={"kind": bad}), 422)


async def test_the_probe_decides_the_kind(client: httpx.AsyncClient, user: User) -> None:
    # Sniffed as video/webm, but the probe finds no picture in it: the kind follows the probe.
    created = await upload(client, user, samples.webm_audio(seconds=0.5), name="voice.webm")
    assert created["format"] == "video/webm"
    listed = await client.get("/files", headers=user.auth, params={"kind": "video"})
    assert [f["id"] for f in listed.json()["files"]] == [created["id"]]
    media = (await probed(client, user, created["id"]))["media"]
    assert media["kind"] == "audio" and media["audio_codec"] == "opus"
    for kind, expected in (("video", []), ("audio", [created["id"]])):
        listed = await client.get("/files", headers=user.auth, params={"kind": kind})
        assert [f["id"] for f in listed.json()["files"]] == expected


async def test_replace_resets_media_to_pending(client: httpx.AsyncClient, user: User) -> None:
    first = await upload(client, user, samples.png_alpha(64, 48), path="/p/pic.png")
    assert (await probed(client, user, first["id"]))["media"]["width"] == 64
    replaced = await upload(client, user, samples.png_alpha(20, 10), path="/p/pic.png", replaces=True)
    assert replaced["id"] == first["id"] and replaced["media"] is None
    media = (await probed(client, user, first["id"]))["media"]
    assert (media["width"], media["height"]) == (20, 10)


async def _pending_again(database_url: str, file_id: str) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute("UPDATE files SET media_state = 'pending', media = NULL, media_lease_until = NULL "
                           "WHERE id = $1", uuid.UUID(file_id))
    finally:
        await conn.close()


async def test_restart_probes_what_is_pending(database_url: str, tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "data")
    with serve_in_thread(settings, database_url) as running:
        async with httpx.AsyncClient(base_url=running.url, timeout=30) as http:
            user = await make_user(http)
            created = await upload(http, user, samples.png_alpha(30, 20), name="later.png")
            await probed(http, user, created["id"])
    # As if the server had stopped between the upload's 2xx and its probe.
    await _pending_again(database_url, created["id"])
    with serve_in_thread(settings, database_url) as running:
        async with httpx.AsyncClient(base_url=running.url, timeout=30) as http:
            pending = (await http.get(f"/files/{created['id']}", headers=user.auth)).json()
            media = (await probed(http, user, created["id"]))["media"]
    assert media == {"kind": "image", "status": "ready", "error": None, "width": 30, "height": 20, "orientation": 1}
    assert pending["media"] in (None, media)


async def test_a_probe_past_the_timeout_is_stopped(database_url: str, tmp_path: Path) -> None:
    # 50 ms is less than a worker needs to start and load its decoders: every job times out, its
    # worker is killed, and the file is failed with the reason, while the server answers on.
    settings = make_settings(tmp_path / "data", media_timeout_s=0.05)
    with serve_in_thread(settings, database_url) as running:
        async with httpx.AsyncClient(base_url=running.url, timeout=30) as http:
            user = await make_user(http)
            created = await upload(http, user, samples.video(seconds=0.4), name="slow.mp4")
            media = (await probed(http, user, created["id"]))["media"]
            assert media == {"kind": "video", "status": "failed",
                             "error": "it took longer than the 0.05 s allowed and was stopped"}
            assert (await http.get("/health")).status_code == 200


async def test_every_kind_of_upload_is_probed(client: httpx.AsyncClient, user: User) -> None:
    photo = samples.png_alpha(20, 10)
    multipart = await client.post("/files", headers=user.auth, files={"file": ("m.png", photo, "image/png")})
    assert multipart.status_code == 201, multipart.text
    tus = await client.post("/uploads", content=photo, headers={
        **user.auth, "Tus-Resumable": "1.0.0", "Upload-Length": str(len(photo)),
        "Upload-Metadata": "filename " + base64.b64encode(b"t.png").decode(),
        "Content-Type": "application/offset+octet-stream"})
    assert tus.status_code == 201, tus.text
    record = await client.post("/records", headers=user.auth,
                               files={"file": ("take.wav", samples.wav(seconds=1.0), "audio/wav")})
    assert record.status_code == 201, record.text
    for file_id in (multipart.json()["id"], tus.headers["mediad-file-id"]):
        media = (await probed(client, user, file_id))["media"]
        assert (media["kind"], media["width"], media["height"]) == ("image", 20, 10)
    mp3 = (await probed(client, user, record.json()["id"]))["media"]
    assert (mp3["kind"], mp3["container"], mp3["audio_codec"]) == ("audio", "mp3", "mp3")
    assert _close(mp3["duration_s"], 1.0, 0.1)


def _media_workers(parent: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and b"mediad.mediapool" in (entry / "cmdline").read_bytes() \
                    and (entry / "stat").read_text().rsplit(")", 1)[1].split()[1] == str(parent):
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def _alive(pids: list[int]) -> bool:
    return any(os.path.exists(f"/proc/{pid}") for pid in pids)


async def test_workers_die_with_a_killed_server(database_url: str, tmp_path: Path) -> None:
    with mediad_process(tmp_path / "data", database_url=database_url) as running:
        assert running.process is not None
        async with httpx.AsyncClient(base_url=running.url, timeout=30) as http:
            user = await make_user(http)
            created = await upload(http, user, samples.png_alpha(), name="w.png")
            await probed(http, user, created["id"])
        workers = _media_workers(running.process.pid)
        assert len(workers) == 1
        running.process.send_signal(signal.SIGKILL)
        running.process.wait(10)
        for _ in range(100):
            if not _alive(workers):
                break
            await asyncio.sleep(0.05)
        assert not _alive(workers)


def _serve_in_its_own_group(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:  # a process group of its own, as a terminal gives a command
        return subprocess.Popen([sys.executable, "-m", "mediad.cli", "serve"], env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)


async def test_ctrl_c_stops_the_server_and_its_media_workers_quietly(tmp_path: Path, database_url: str) -> None:
    """A terminal's Ctrl-C reaches the whole process group, media workers included: the server
    stops them itself, and none may print a KeyboardInterrupt traceback on the way out."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEDIAD_")}
    env.update({"MEDIAD_DATA_DIR": str(tmp_path / "data"), "MEDIAD_DATABASE_URL": database_url,
                "MEDIAD_PORT": str(port), "MEDIAD_WORKERS": "1", "MEDIAD_MEDIA_WORKERS": "2"})
    log = tmp_path / "serve.log"
    proc = _serve_in_its_own_group(env, log)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
            for _ in range(600):
                with contextlib.suppress(httpx.TransportError):
                    if (await http.get("/health")).status_code == 200:
                        break
                await asyncio.sleep(0.1)
            user = await make_user(http)
            await probed(http, user, (await upload(http, user, samples.png_alpha(), name="p.png"))["id"])
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(30) == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    text = log.read_text()
    assert "KeyboardInterrupt" not in text and "Traceback" not in text, text[-3000:]

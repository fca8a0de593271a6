"""Audio records: WAV in, MP3 out through POST /records, shareable /record links."""

from __future__ import annotations

import asyncio
import struct
import subprocess
import uuid
from pathlib import Path

import asyncpg
import httpx
import pytest
from conftest import Server, User, assert_problem, make_settings, make_user, serve_in_thread
from media_samples import FFMPEG, make_wav
from pydub import AudioSegment

from mediad.audio import WavInfo, mp3_parameters, parse_wav_header
from mediad.errors import UnsupportedMediaType


def decode_mp3(data: bytes, tmp: Path) -> AudioSegment:
    """Decode with ffmpeg to WAV, then read it with pydub (its own WAV parser)."""
    mp3, wav = tmp / f"{uuid.uuid4().hex}.mp3", tmp / f"{uuid.uuid4().hex}.wav"
    mp3.write_bytes(data)
    subprocess.run([FFMPEG, "-nostdin", "-loglevel", "error", "-i", str(mp3), "-c:a", "pcm_s16le", "-y", str(wav)],
                   check=True)
    return AudioSegment.from_wav(wav)


async def _counts(server: Server) -> tuple[int, int]:
    conn = await asyncpg.connect(server.database_url)
    try:
        return (await conn.fetchval("SELECT count(*) FROM files"), await conn.fetchval("SELECT count(*) FROM records"))
    finally:
        await conn.close()


# ---- the header parser (pure) -------------------------------------------------------------------

def _header(tag: int = 1, channels: int = 2, rate: int = 44100, bits: int = 16, data: int = 4) -> bytes:
    fmt = struct.pack("<HHIIHH", tag, channels, rate, rate * channels * bits // 8, channels * bits // 8, bits)
    body = b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", data)
    return b"RIFF" + struct.pack("<I", 4 + len(body) + data) + b"WAVE" + body


def test_parse_wav_header_reads_the_format() -> None:
    head = _header(channels=2, rate=48000, bits=24, data=48000 * 6)
    info = parse_wav_header(head, len(head) + 48000 * 6)
    assert info == WavInfo(2, 48000, 24, False, 48000 * 6)
    assert info.duration_s == pytest.approx(1.0)


@pytest.mark.parametrize(("head", "size_extra", "words"), [
    (b"ID3\x03\x00" + b"\x00" * 100, 0, "not a RIFF/WAVE"),
    (b"hello, I am a text file pretending", 0, "not a RIFF/WAVE"),
    (_header()[:30], 0, "truncated"),
    (_header(data=0), 0, "empty"),
    (_header(data=1000), 10, "truncated"),
    (_header(tag=2), 4, "compressed"),
    (_header(bits=12), 4, "12-bit"),
])
def test_parse_wav_header_refuses_what_is_not_a_usable_wav(head: bytes, size_extra: int, words: str) -> None:
    with pytest.raises(UnsupportedMediaType, match=words):
        parse_wav_header(head, len(head) + size_extra)


def test_mp3_parameters_keep_what_mp3_can_carry() -> None:
    assert mp3_parameters(WavInfo(2, 44100, 16, False, 1)) == (44100, 2)
    assert mp3_parameters(WavInfo(1, 8000, 8, False, 1)) == (8000, 1)
    assert mp3_parameters(WavInfo(6, 96000, 24, False, 1)) == (48000, 2)


# ---- end to end ---------------------------------------------------------------------------------

async def _post_record(http: httpx.AsyncClient, wav: bytes, *, user: User, fields: bool = True,
                       name: str = "take one.wav") -> httpx.Response:
    data = {"user": user.id, "token": user.token} if fields else {}
    headers = {} if fields else user.auth
    return await http.post("/records", data=data, files={"file": (name, wav, "audio/wav")}, headers=headers)


async def test_simple_client_flow_with_form_fields(client: httpx.AsyncClient, server: Server,
                                                   tmp_path: Path) -> None:
    user = await make_user(client)
    wav = make_wav(tmp_path / "in.wav", 3.0, rate=44100, channels=2).read_bytes()
    response = await _post_record(client, wav, user=user)
    assert response.status_code == 201, response.text
    body = response.json()
    assert set(body) == {"id", "user", "url", "file"}
    assert body["user"] == user.id and body["id"] == body["file"]["id"]
    assert body["url"] == f"http://127.0.0.1:8000/record?id={body['id']}&user={user.id}"
    assert body["file"]["format"] == "audio/mpeg" and body["file"]["name"] == "take one.mp3"

    link = f"/record?id={body['id']}&user={user.id}"  # the same link, on the test server's port
    mp3 = await client.get(link)
    assert mp3.status_code == 200 and mp3.headers["content-type"] == "audio/mpeg"
    assert mp3.headers["etag"] == f'"{body["file"]["sha256"]}"'
    audio = decode_mp3(mp3.content, tmp_path)
    assert abs(len(audio) - 3000) <= 50  # milliseconds
    assert audio.channels == 2 and audio.frame_rate == 44100
    part = await client.get(link, headers={"Range": "bytes=0-99"})
    assert part.status_code == 206 and part.content == mp3.content[:100]
    head = await client.head(link)
    assert head.status_code == 200 and head.content == b""


async def test_bearer_variant_and_the_mp3_is_an_ordinary_file(client: httpx.AsyncClient, server: Server,
                                                              tmp_path: Path) -> None:
    user = await make_user(client)
    wav = make_wav(tmp_path / "in.wav", 1.0, rate=22050, channels=1).read_bytes()
    response = await _post_record(client, wav, user=user, fields=False, name="memo.WAV")
    assert response.status_code == 201, response.text
    record = response.json()
    listed = (await client.get("/files", headers=user.auth)).json()["files"]
    assert [f["id"] for f in listed] == [record["id"]]
    usage = (await client.get("/usage", headers=user.auth)).json()
    assert usage == {"files": 1, "bytes": record["file"]["size"], "quota": None}
    by_id = await client.get(f"/files/{record['id']}/content", headers=user.auth)
    assert by_id.content[:3] in (b"ID3", b"\xff\xfb", b"\xff\xf3")
    assert len(server.blob_files()) == 1 and server.stray_temp_files() == []  # the WAV is not kept


async def test_links_answer_only_for_the_records_owner(client: httpx.AsyncClient, tmp_path: Path) -> None:
    owner, stranger = await make_user(client), await make_user(client)
    wav = make_wav(tmp_path / "in.wav", 0.5).read_bytes()
    record = (await _post_record(client, wav, user=owner)).json()
    assert_problem(await client.get(f"/record?id={record['id']}&user={stranger.id}"), 404)
    assert_problem(await client.get(f"/record?id={uuid.uuid4()}&user={owner.id}"), 404)
    assert_problem(await client.get(f"/record?id=not-a-uuid&user={owner.id}"), 404)
    assert_problem(await client.get(f"/record?id={record['id']}"), 422)
    plain = (await client.post("/files?name=x.mp3", content=b"not a record", headers=owner.auth)).json()
    assert_problem(await client.get(f"/record?id={plain['id']}&user={owner.id}"), 404)


@pytest.mark.parametrize(("rate", "channels", "bits", "is_float", "expect_rate", "expect_channels"), [
    (8000, 1, 8, False, 8000, 1),
    (48000, 1, 24, False, 48000, 1),
    (22050, 2, 32, False, 22050, 2),
    (44100, 2, 32, True, 44100, 2),
    (16000, 1, 64, True, 16000, 1),
    (48000, 6, 16, False, 48000, 2),
    (96000, 2, 24, False, 48000, 2),
])
async def test_common_wav_variants_convert(client: httpx.AsyncClient, tmp_path: Path, rate: int, channels: int,
                                           bits: int, is_float: bool, expect_rate: int, expect_channels: int) -> None:
    user = await make_user(client)
    wav = make_wav(tmp_path / "in.wav", 1.5, rate=rate, channels=channels, bits=bits, is_float=is_float)
    response = await _post_record(client, wav.read_bytes(), user=user)
    assert response.status_code == 201, response.text
    audio = decode_mp3((await client.get(f"/record?id={response.json()['id']}&user={user.id}")).content, tmp_path)
    assert abs(len(audio) - 1500) <= 50
    assert (audio.frame_rate, audio.channels) == (expect_rate, expect_channels)


def _invalid_bodies(tmp_path: Path) -> dict[str, bytes]:
    good = make_wav(tmp_path / "good.wav", 0.5).read_bytes()
    mp3 = tmp_path / "x.mp3"
    subprocess.run([FFMPEG, "-nostdin", "-loglevel", "error", "-i", str(tmp_path / "good.wav"), "-y", str(mp3)],
                   check=True)
    return {
        "an MP3 named .wav": mp3.read_bytes(),
        "a text file named .wav": b"just some notes, not audio\n" * 10,
        "a truncated header": good[:30],
        "a zero-length data chunk": _header(data=0),
        "truncated data": good[: len(good) // 2],
        "compressed (ADPCM)": _header(tag=2, data=4) + b"\x00" * 4,
        "empty": b"",
    }


async def test_invalid_uploads_are_415_and_leave_nothing(client: httpx.AsyncClient, server: Server,
                                                          tmp_path: Path) -> None:
    user = await make_user(client)
    for label, body in _invalid_bodies(tmp_path).items():
        response = await _post_record(client, body, user=user)
        problem = assert_problem(response, 415)
        assert problem["detail"], label
        assert await _counts(server) == (0, 0), label
        assert server.blob_files() == [] and server.stray_temp_files() == [], label


async def test_malformed_requests_are_400_or_401(client: httpx.AsyncClient, server: Server, tmp_path: Path) -> None:
    user = await make_user(client)
    wav = make_wav(tmp_path / "in.wav", 0.5).read_bytes()
    no_file = await client.post("/records", data={"user": user.id, "token": user.token})
    assert_problem(no_file, 400)
    raw = await client.post("/records", content=wav, headers={**user.auth, "content-type": "audio/wav"})
    assert_problem(raw, 400)
    wrong = await client.post("/records", data={"user": user.id, "token": "nope"}, files={"file": ("a.wav", wav)})
    assert_problem(wrong, 401)
    other = await make_user(client)
    mismatched = await client.post("/records", data={"user": other.id, "token": user.token},
                                   files={"file": ("a.wav", wav)})
    assert_problem(mismatched, 401)
    assert_problem(await client.post("/records", files={"file": ("a.wav", wav)}), 401)
    assert await _counts(server) == (0, 0)
    assert server.stray_temp_files() == []


async def test_busy_converters_answer_503_with_retry_after(database_url: str, tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "data", audio_workers=1, audio_queue_timeout_s=0.05)
    wav = make_wav(tmp_path / "long.wav", 120.0).read_bytes()  # ~20 MiB: takes a while to convert
    with serve_in_thread(settings, database_url) as running:
        async with httpx.AsyncClient(base_url=running.url, timeout=120) as http:
            user = await make_user(http)
            answers = await asyncio.gather(*[_post_record(http, wav, user=user) for _ in range(3)])
    statuses = sorted(r.status_code for r in answers)
    assert statuses[0] == 201 and 503 in statuses, statuses
    busy = next(r for r in answers if r.status_code == 503)
    assert_problem(busy, 503)
    assert int(busy.headers["retry-after"]) >= 1
    assert running.stray_temp_files() == []

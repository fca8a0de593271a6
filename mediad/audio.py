"""Audio records: a WAV upload validated, converted to MP3 off the event loop, kept as a File.

Conversion runs ffmpeg (libmp3lame, VBR -q:a 2 ≈ 190 kbit/s) file to file, so memory stays flat
however long the recording: pydub's AudioSegment would hold the whole decoded recording in Python
memory, which is exactly what a long recording must not do.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import struct
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
from sqlalchemy.engine import Row
from sqlalchemy.ext.asyncio import AsyncConnection
from starlette.requests import Request
from starlette.responses import JSONResponse

from . import db, webhooks
from .auth import authenticate, user_for_token
from .config import Settings
from .downloads import AccelResponse, BlobResponse, serve_file
from .errors import (
    BadRequest,
    NotFound,
    ServiceUnavailable,
    Unauthorized,
    Unprocessable,
    UnsupportedMediaType,
)
from .files import file_json, parse_file_id
from .names import clean_name, media_type
from .storage import HEAD_BYTES, Blob
from .uploads import commit_upload, receive_multipart
from .writer import BlobWriter, read_span

log = logging.getLogger("mediad.audio")

# WAVE format tags (RFC 2361, mmreg.h) that ffmpeg decodes as PCM or float.
_PCM, _FLOAT, _EXTENSIBLE = 0x0001, 0x0003, 0xFFFE
_PCM_GUID_TAIL = bytes.fromhex("000000001000800000aa00389b71")
_MP3_RATES = (8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000)
HEADER_BYTES = 64 * 1024  # enough for any sane chunk layout before `data`


@dataclass(frozen=True)
class WavInfo:
    channels: int
    sample_rate: int
    bits: int
    is_float: bool
    data_bytes: int

    @property
    def duration_s(self) -> float:
        return self.data_bytes / (self.channels * self.sample_rate * (self.bits // 8))


def parse_wav_header(head: bytes, file_size: int) -> WavInfo:
    """Validate a RIFF/WAVE file from its leading bytes; raises 415 saying what is wrong."""
    if len(head) < 12:
        raise UnsupportedMediaType("the upload is too short to be a WAV file")
    if head[:4] != b"RIFF" or head[8:12] != b"WAVE":
        raise UnsupportedMediaType("the upload is not a RIFF/WAVE file")
    offset, fmt = 12, None
    while offset + 8 <= len(head):
        chunk_id, size = head[offset:offset + 4], struct.unpack_from("<I", head, offset + 4)[0]
        body = offset + 8
        if chunk_id == b"fmt ":
            if size < 16 or body + 16 > len(head):
                raise UnsupportedMediaType("the WAV header is truncated (fmt chunk)")
            fmt = _parse_fmt(head[body:body + size])
        elif chunk_id == b"data":
            if fmt is None:
                raise UnsupportedMediaType("the WAV file has no fmt chunk before its data")
            available = file_size - body
            if size == 0 or available <= 0:
                raise UnsupportedMediaType("the WAV file's data chunk is empty")
            if size == 0xFFFFFFFF:  # written by a streaming recorder that never knew the length
                size = available
            if size > available:
                raise UnsupportedMediaType(
                    f"the WAV file is truncated: its data chunk declares {size} bytes, {available} are present")
            channels, rate, bits, is_float = fmt
            return WavInfo(channels, rate, bits, is_float, size)
        offset = body + size + (size & 1)  # chunks are padded to even sizes
    raise UnsupportedMediaType("the WAV header is truncated: no data chunk found")


def _parse_fmt(fmt: bytes) -> tuple[int, int, int, bool]:
    tag, channels, rate, _, block_align, bits = struct.unpack_from("<HHIIHH", fmt)
    if tag == _EXTENSIBLE:
        if len(fmt) < 40:
            raise UnsupportedMediaType("the WAV header is truncated (extensible fmt chunk)")
        sub_tag = struct.unpack_from("<H", fmt, 24)[0]
        if fmt[26:40] != _PCM_GUID_TAIL:
            raise UnsupportedMediaType("the WAV file uses an unknown sub-format")
        tag = sub_tag
    if tag not in (_PCM, _FLOAT):
        raise UnsupportedMediaType(
            f"the WAV file is compressed (format tag {tag:#06x}); only PCM and float are supported")
    if not 1 <= channels <= 32:
        raise UnsupportedMediaType(f"the WAV file declares {channels} channels")
    if not 1000 <= rate <= 384000:
        raise UnsupportedMediaType(f"the WAV file declares a sample rate of {rate} Hz")
    allowed = (32, 64) if tag == _FLOAT else (8, 16, 24, 32)
    if bits not in allowed or block_align != channels * bits // 8:
        raise UnsupportedMediaType(f"the WAV file declares {bits}-bit samples in {block_align}-byte frames")
    return channels, rate, bits, tag == _FLOAT


def mp3_parameters(info: WavInfo) -> tuple[int, int]:
    """(sample rate, channels) for the MP3: kept where MP3 can carry them; otherwise the nearest
    higher MP3 rate (48 kHz at most) and a stereo downmix beyond two channels."""
    rate = next((r for r in _MP3_RATES if r >= info.sample_rate), _MP3_RATES[-1])
    return rate, min(info.channels, 2)


def ffmpeg_executable(settings: Settings) -> str:
    if settings.ffmpeg:
        return settings.ffmpeg
    import imageio_ffmpeg

    return str(imageio_ffmpeg.get_ffmpeg_exe())


class Transcoder:
    """Runs at most `audio_workers` conversions at once; others wait, then get 503."""

    def __init__(self, settings: Settings) -> None:
        self.executable = ffmpeg_executable(settings)
        self.slots = asyncio.Semaphore(settings.audio_workers)
        self.queue_timeout_s = settings.audio_queue_timeout_s
        self.timeout_s = settings.audio_timeout_s

    async def to_mp3(self, source: Path, target: Path, info: WavInfo) -> None:
        """Convert `source` (validated WAV) to `target`; on any failure `target` does not exist."""
        try:
            await asyncio.wait_for(self.slots.acquire(), self.queue_timeout_s)
        except TimeoutError:
            raise ServiceUnavailable("all audio converters are busy; retry shortly",
                                     retry_after=max(1, int(self.queue_timeout_s))) from None
        try:
            await self._run(source, target, info)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(lambda: target.unlink(missing_ok=True))
            raise
        finally:
            self.slots.release()

    async def _run(self, source: Path, target: Path, info: WavInfo) -> None:
        rate, channels = mp3_parameters(info)
        process = await asyncio.create_subprocess_exec(
            self.executable, "-nostdin", "-hide_banner", "-loglevel", "error", "-xerror",
            "-f", "wav", "-i", str(source), "-map", "0:a:0", "-vn",
            "-c:a", "libmp3lame", "-q:a", "2", "-ar", str(rate), "-ac", str(channels),
            "-f", "mp3", "-y", str(target),
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE)
        try:
            _, stderr = await asyncio.wait_for(process.communicate(), self.timeout_s)
        except BaseException as exc:  # timed out, or the request was cancelled: stop ffmpeg
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            with anyio.CancelScope(shield=True):
                await process.wait()
            if isinstance(exc, TimeoutError):
                raise ServiceUnavailable(f"the conversion took longer than {self.timeout_s:.0f} s") from None
            raise
        if process.returncode != 0:
            message = stderr.decode(errors="replace").strip().splitlines()[-1:] or ["unknown error"]
            log.info("ffmpeg refused a WAV: %s", message[0])
            raise UnsupportedMediaType(f"the WAV file does not decode: {message[0][:200]}")


def finish_blob(path: Path, durable: bool) -> Blob:
    """Hash, size and fsync a finished conversion so it can be committed like any upload."""
    digest = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        head = os.pread(fd, HEAD_BYTES, 0)
        for _ in read_span(fd, 0, size, [digest]):
            pass
        if durable:
            os.fsync(fd)
    finally:
        os.close(fd)
    return Blob(path, size, digest.hexdigest(), head)


# ---- HTTP ---------------------------------------------------------------------------------------

def _read_head(path: Path) -> bytes:
    with open(path, "rb") as file:
        return file.read(HEADER_BYTES)


async def _form_identity(request: Request, fields: dict[str, str]) -> uuid.UUID:
    """Simple clients identify with form fields `user` (id) and `token` instead of a header."""
    user, token = fields.get("user"), fields.get("token")
    if not user or not token:
        raise Unauthorized("a bearer token, or the form fields user and token, are required")
    owner = await user_for_token(request.app.state.reader, token, request.app.state.settings)
    if str(owner) != user.strip().lower():
        raise Unauthorized("the token does not belong to that user")
    return owner


def _record_name(filename: str | None) -> str:
    stem = os.path.splitext(clean_name(filename))[0] if filename else ""
    return f"{stem or 'record'}.mp3"


async def post_records(request: Request) -> JSONResponse:
    state = request.app.state
    storage = state.storage
    if media_type(request.headers.get("content-type")) != "multipart/form-data":
        raise BadRequest("POST /records takes multipart/form-data with the WAV in a part named 'file'")
    owner = await authenticate(request) if "authorization" in request.headers else None
    writer = BlobWriter.create(storage, max_bytes=state.settings.max_upload_bytes)
    mp3 = storage.temp_path(uuid.uuid4())
    try:
        filename, fields = await receive_multipart(request, writer, storage, state.settings.max_upload_bytes,
                                                   fields=("user", "token"))
        owner = owner or await _form_identity(request, fields)
        wav = await writer.finish()
        info = parse_wav_header(await anyio.to_thread.run_sync(_read_head, wav.temp_path), wav.size)
        await state.transcoder.to_mp3(wav.temp_path, mp3, info)
        blob = await anyio.to_thread.run_sync(finish_blob, mp3, storage.durable)

        async def record(conn: AsyncConnection, row: Row[Any]) -> None:
            await db.insert_record(conn, row.id, round(info.duration_s * 1000))
            await webhooks.emit_file(conn, "record.created", row, state.storage.node_id)

        row, _ = await commit_upload(state.engine, storage, state.replicator, owner, blob,
                                     name=_record_name(filename), path=None, also=record, prober=state.prober)
    finally:
        await writer.abort()  # the WAV is never kept
        await anyio.to_thread.run_sync(lambda: mp3.unlink(missing_ok=True))
    url = f"{state.settings.base_url}/record?id={row.id}&user={owner}"
    return JSONResponse({"id": str(row.id), "user": str(owner), "url": url,
                         "file": file_json(row, storage.node_id)},
                        status_code=201, headers={"Location": f"/files/{row.id}"})


async def get_record(request: Request) -> BlobResponse | AccelResponse:
    """The MP3 behind a record link: no token, the random record id is the capability."""
    params = request.query_params
    if "id" not in params or "user" not in params:
        raise Unprocessable("a record link needs ?id= and &user=")
    file_id, user_id = parse_file_id(params["id"]), parse_file_id(params["user"])

    async def fetch(conn: AsyncConnection) -> Row[Any]:
        row = await db.record_file(conn, file_id, user_id)
        if row is None:
            raise NotFound("no such record")
        return row

    return await serve_file(request, fetch, record=True)

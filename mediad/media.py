"""Media probing: what a stored file is (kind, dimensions, duration, codecs, EXIF date and camera).

`probe` is a pure "what is this file" function over a path, run inside a worker process
(mediad/mediapool.py) so a stuck or crashing decoder can be killed without touching the server.
Audio and video are read with PyAV (FFmpeg's demuxers and decoders, bundled in its wheels);
images with libvips (pyvips + pyvips-binary) for the header, and Pillow only to parse the raw EXIF
block libvips hands over. Nothing location-related (GPS) is ever read into the result.

`Prober` is the server side: it claims pending Files from the database with a lease, so probing
survives restarts and is shared by every process of a node, and stores each result.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from datetime import UTC, datetime, timedelta, timezone
from fractions import Fraction
from typing import TYPE_CHECKING, Any

import anyio
from sqlalchemy.ext.asyncio import AsyncEngine

from . import db, webhooks
from .mediapool import MediaPool, WorkerFailed
from .storage import Storage

if TYPE_CHECKING:
    from .thumbnails import Thumbnailer

log = logging.getLogger("mediad.media")

Media = dict[str, Any]

# libvips loaders that read ordinary picture files; the others (matrix, CSV, raw, vips, FITS…)
# would accept bytes no camera or browser produces, and SVG/PDF render rather than decode.
IMAGE_LOADERS = ("jpegload", "pngload", "gifload", "webpload", "heifload", "tiffload")
_LOADER = re.compile(r"^(\w+?load)")
_POLL_S = 10.0  # how often other processes' uploads and lapsed leases are looked for
_CAMERA_MAX = 120


class ProbeFailed(Exception):
    """The file cannot be read as what it claims to be; the message is the user's sentence."""


def failed(kind: str, error: str) -> Media:
    return {"kind": kind, "status": "failed", "error": error}


# ---- probing (runs in a worker process) ---------------------------------------------------------

def probe(path: str, kind: str, max_pixels: int) -> Media:
    """The File's "media" object for a File of `kind` (image, video or audio, from its format);
    never raises for a bad file: it is `failed` with a reason."""
    try:
        media = probe_image(path, max_pixels) if kind == "image" else probe_av(path, max_pixels)
    except ProbeFailed as exc:
        return failed(kind, str(exc))
    return {**media, "status": "ready", "error": None}


def image_header(path_or_buffer: str | bytes, max_pixels: int) -> Any:
    """A lazily loaded pyvips image (header only), refused before any decoding when over limits."""
    import pyvips  # type: ignore[import-untyped]

    try:
        if isinstance(path_or_buffer, bytes):
            image = pyvips.Image.new_from_buffer(path_or_buffer, "", access="sequential")
        else:
            image = pyvips.Image.new_from_file(path_or_buffer, access="sequential")
    except pyvips.Error:
        raise ProbeFailed("the file is not an image this server can read (or it is damaged)") from None
    loader = _LOADER.match(image.get("vips-loader") or "")
    if loader is None or loader.group(1) not in IMAGE_LOADERS:
        raise ProbeFailed("this image format is not supported")
    check_pixels(image.width, image.height, max_pixels)
    return image


def check_pixels(width: int, height: int, max_pixels: int) -> None:
    if width * height > max_pixels:
        raise ProbeFailed(f"the image is too large to decode: {width}×{height} pixels is over the "
                          f"limit of {max_pixels / 1e6:g} megapixels")


def probe_image(path: str, max_pixels: int) -> Media:
    image = image_header(path, max_pixels)
    fields = set(image.get_fields())
    orientation = image.get("orientation") if "orientation" in fields else 1
    width, height = image.width, image.height
    if orientation in (5, 6, 7, 8):  # EXIF orientations that turn the picture a quarter
        width, height = height, width
    # `orientation` is the EXIF value (1–8) the picture is shown with; width/height already apply it.
    media: Media = {"kind": "image", "width": width, "height": height, "orientation": orientation}
    if "exif-data" in fields:
        media.update(exif_fields(image.get("exif-data")))
    return media


def exif_fields(raw: bytes) -> Media:
    """taken_at and camera from a raw EXIF block; GPS tags are never looked at."""
    from PIL import Image

    exif = Image.Exif()
    try:
        exif.load(raw)
        sub = exif.get_ifd(0x8769)  # the Exif sub-IFD: DateTimeOriginal and its offset
    except Exception:  # a damaged EXIF block takes nothing away from the picture itself
        return {}
    out: Media = {}
    taken = exif_time(sub.get(0x9003) or exif.get(0x0132), sub.get(0x9011) or sub.get(0x9010))
    if taken is not None:
        out["taken_at"] = taken
    camera = camera_name(exif.get(0x010F), exif.get(0x0110))
    if camera:
        out["camera"] = camera
    return out


def exif_time(stamp: Any, offset: Any) -> str | None:
    """EXIF "YYYY:MM:DD HH:MM:SS" (+ OffsetTime "+02:00") → RFC 3339 UTC. Without an offset the
    camera's clock is taken as UTC: EXIF itself does not say which zone it was in. A date that
    names no moment (an offset no clock has, a UTC time before year 1 or after 9999) is None:
    the tag is anyone's to write, and it must never cost the picture its probe."""
    if not isinstance(stamp, str):
        return None
    try:
        moment = datetime.strptime(stamp.strip("\x00 ")[:19], "%Y:%m:%d %H:%M:%S")
    except ValueError:
        return None
    zone: timezone = UTC
    match = re.fullmatch(r"([+-])(\d\d):(\d\d)", offset.strip("\x00 ")) if isinstance(offset, str) else None
    if match:
        hours, minutes = int(match.group(2)), int(match.group(3))
        if hours > 23 or minutes > 59:  # timezone() refuses a day or more; minutes past 59 are no offset
            return None
        delta = timedelta(hours=hours, minutes=minutes)
        zone = timezone(delta if match.group(1) == "+" else -delta)
    try:
        utc = moment.replace(tzinfo=zone).astimezone(UTC)
    except OverflowError:  # 0001-01-01 00:00 +02:00 is in year 0, 9999-12-31 23:00 -02:00 in 10000
        return None
    # isoformat, not strftime: glibc's %Y writes year 999 as "999", RFC 3339 wants four digits.
    return utc.replace(tzinfo=None).isoformat(timespec="seconds") + "Z"


def camera_name(make: Any, model: Any) -> str | None:
    def clean(value: Any) -> str:
        text = value if isinstance(value, str) else ""
        return " ".join("".join(c for c in text if c.isprintable()).split())

    make_text, model_text = clean(make), clean(model)
    if make_text and model_text.lower().startswith(make_text.lower()):
        make_text = ""  # "Canon" + "Canon EOS R5" is one camera, not "Canon Canon EOS R5"
    return " ".join(p for p in (make_text, model_text) if p)[:_CAMERA_MAX] or None


def probe_av(path: str, max_pixels: int) -> Media:
    import av

    try:
        with av.open(path, metadata_errors="ignore") as container:
            return _describe(container, max_pixels)
    except av.FFmpegError as exc:
        raise ProbeFailed(f"the file does not decode as audio or video: {_ffmpeg_reason(exc)}") from None


def _ffmpeg_reason(exc: Exception) -> str:
    text = getattr(exc, "strerror", None) or str(exc)
    return text.rstrip(".")[:200]


def real_video(container: Any) -> Any | None:
    """The first video stream that is a moving picture, not an attached cover."""
    import av

    for stream in container.streams.video:
        if not stream.disposition & av.stream.Disposition.attached_pic:
            return stream
    return None


def _describe(container: Any, max_pixels: int) -> Media:
    video = real_video(container)
    audio = container.streams.audio[0] if container.streams.audio else None
    if video is None and audio is None:
        raise ProbeFailed("the file has no audio or video stream")
    media: Media = {"kind": "video" if video is not None else "audio", "container": container.format.name}
    duration = _duration(container, video or audio)
    if duration is not None:
        media["duration_s"] = duration
    if container.bit_rate:
        media["bitrate"] = int(container.bit_rate)
    if video is not None:
        media.update(_video_fields(container, video, max_pixels))
    if audio is not None:
        context = audio.codec_context
        media.update({"audio_codec": context.codec.canonical_name, "channels": context.channels,
                      "sample_rate": context.sample_rate})
    return media


def _duration(container: Any, stream: Any) -> float | None:
    if container.duration:
        return round(container.duration / 1_000_000, 3)  # AV_TIME_BASE units
    if stream.duration and stream.time_base:
        return round(float(stream.duration * stream.time_base), 3)
    return None


def _video_fields(container: Any, video: Any, max_pixels: int) -> Media:
    context = video.codec_context
    width, height = context.width, context.height
    if not width or not height:
        raise ProbeFailed("the video stream does not say its picture size")
    check_pixels(width, height, max_pixels)
    # The display matrix reaches PyAV only on decoded frames: decoding the first one also proves
    # the stream is readable. FFmpeg's angle is counter-clockwise; ours is clockwise, like a phone's.
    frame = first_frame(container, video)
    rotation = (-round(frame.rotation / 90) * 90) % 360
    if rotation in (90, 270):
        width, height = height, width
    rate = video.average_rate or video.guessed_rate
    # canonical_name is the codec's ("mp3", "vp9"), not the decoder's ("mp3float", "libvpx-vp9").
    fields: Media = {"width": width, "height": height, "video_codec": context.codec.canonical_name,
                     "rotation": rotation}
    if isinstance(rate, Fraction) and rate > 0:
        fields["frame_rate"] = round(float(rate), 3)
    return fields


def first_frame(container: Any, stream: Any) -> Any:
    stream.thread_type = "SLICE"  # one frame wanted: frame threading would decode several ahead
    for frame in container.decode(stream):
        return frame
    raise ProbeFailed("the video stream has no decodable picture")


# ---- the durable queue (server side) ------------------------------------------------------------

class Prober:
    """Probes pending Files on this node's disk, `workers` at a time, as they are committed."""

    def __init__(self, engine: AsyncEngine, storage: Storage, pool: MediaPool, thumbnails: Thumbnailer,
                 max_pixels: int) -> None:
        self.engine = engine
        self.storage = storage
        self.pool = pool
        self.thumbnails = thumbnails
        self.max_pixels = max_pixels
        self.lease_s = pool.timeout_s + 30
        self._due = asyncio.Event()
        assert storage.node_id is not None, "storage.prepare() first"
        self.node = storage.node_id

    def committed(self) -> None:
        """A File's content was committed: probe it now rather than at the next poll (what was
        derived from a content it replaced goes with that content: Storage.remove_content)."""
        self._due.set()

    async def run(self) -> None:
        try:
            await self._sweep_derived()
        except Exception as exc:  # the database may be down: strays wait for the next start
            log.warning("could not look for stray thumbnails: %s", exc.__class__.__name__)
        while True:
            try:
                while await self._batch():
                    pass
            except Exception as exc:  # the database may be down: the next poll tries again
                log.warning("media probing pass failed: %s", exc.__class__.__name__, extra={"error": str(exc)[:300]})
            with anyio.move_on_after(_POLL_S):
                await self._due.wait()
            self._due.clear()

    async def _sweep_derived(self) -> None:
        """Derived files whose content is gone (a crash between a delete and their removal)."""
        present = await anyio.to_thread.run_sync(self.thumbnails.derived_blobs)
        if not present:
            return
        async with self.engine.connect() as conn:
            stray = present - await db.blob_ids(conn)
        for blob_id in stray:
            await anyio.to_thread.run_sync(self.storage.remove_derived, blob_id)
        if stray:
            log.info("removed the thumbnails of %d contents that no File holds any more", len(stray))

    async def _batch(self) -> int:
        async with self.engine.begin() as conn:
            rows = await db.claim_probes(conn, self.node, self.pool.size, self.lease_s)
        async with anyio.create_task_group() as group:
            for row in rows:
                group.start_soon(self._probe_one, row)
        return len(rows)

    async def _probe_one(self, row: Any) -> None:
        path = str(self.storage.blob_path(row.blob_id))
        try:
            media = await self.pool.run({"op": "probe", "path": path, "kind": row.media_kind,
                                         "max_pixels": self.max_pixels}, wait=None)
        except WorkerFailed as exc:
            media = failed(row.media_kind, str(exc))
        except BaseException:
            with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
                async with self.engine.begin() as conn:
                    await db.release_probe(conn, row.id, row.blob_id)
            raise
        async with self.engine.begin() as conn:
            done = await db.finish_probe(conn, row.id, row.blob_id, media)
            if done is not None:  # announced with the result, ready or failed (media.status says)
                await webhooks.emit_file(conn, "file.media_ready", done, self.node)
        if done is not None:
            log.info("probed %s: %s %s", row.id, media["kind"], media["status"],
                     extra={"file_id": str(row.id), "error": media.get("error")})


def file_media(row: Any) -> Media | None:
    """The File object's "media": null until probed."""
    return None if row.media_state == "pending" else row.media

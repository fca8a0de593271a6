"""Thumbnails: derived pictures of Files, made once per (content, size, format) and kept on disk.

Images shrink on load with libvips' `thumbnail` (JPEG DCT scaling, WebP/HEIF/PNG reduced while
reading), which never holds the full-size picture; EXIF orientation is applied and metadata
(EXIF, GPS) is not carried into the result. A video's picture is one frame decoded with PyAV
about 10 % in, scaled by FFmpeg's swscale; an audio file's is its attached cover art.

Derived files live under `<data dir>/derived/<blob>/`, one directory per stored content, so they
go with the content (delete, replace) and are no one's usage. They are never replicated; they are
kept when the content is evicted to the cloud, since they are what a gallery of evicted files
still needs, and one not made yet (or lost) is made again from a temporary copy read back from
the cloud. When making one fails for a reason in the content (it does not decode, it runs past
the time allowed, it crashes its decoder), `failed.g<generation>` in that directory keeps the
reason, and requests for any size or format are answered from it without a job for an hour.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

from .errors import NotFound, ServiceUnavailable, Unprocessable
from .media import ProbeFailed, check_pixels, first_frame, image_header, real_video
from .mediapool import Busy, MediaPool, WorkerFailed
from .storage import derived_dir

MIN_SIZE, MAX_SIZE, DEFAULT_SIZE = 16, 2048, 256
# Part of every ETag and cache name: a change to how thumbnails are made bumps it, so clients
# holding an immutable copy get the new picture under a new tag.
GENERATION = 1
MEDIA_TYPES = {"webp": "image/webp", "jpeg": "image/jpeg"}
_QUALITY = {"webp": 80, "jpeg": 82}
HOT_BYTES = 16 * 1024 * 1024  # recently served thumbnails kept in memory: a gallery asks again and again
_WAIT_FOR_WORKER_S = 10.0  # then 503: a thumbnail that waits longer than this is better retried
# A failure is answered from its marker for this long, then tried once more: a timeout or a
# crashed worker may have been the machine's (overloaded, short of memory), not the content's.
_FAILURE_KEPT_S = 3600.0

# Opens the content as a path a worker can read, for as long as the context lasts.
Source = Callable[[], AbstractAsyncContextManager[Path]]


class NoPicture(ProbeFailed):
    """The File has no picture to show (not an error of the server)."""


# ---- decisions (pure) ---------------------------------------------------------------------------

def parse_size(text: str | None) -> int:
    if text is None:
        return DEFAULT_SIZE
    if not (text.isascii() and text.isdigit()) or not MIN_SIZE <= int(text) <= MAX_SIZE:
        raise Unprocessable(f"size must be a whole number of pixels from {MIN_SIZE} to {MAX_SIZE}")
    return int(text)


def choose_format(accept: str | None) -> str:
    """WebP when the Accept header allows it (RFC 9110 §12.5.1: the most specific range decides,
    q=0 refuses), else JPEG. No header means any type is acceptable."""
    if accept is None:
        return "webp"
    ranges: dict[str, float] = {}
    for item in accept.split(","):
        media_type, *params = (part.strip() for part in item.split(";"))
        quality = 1.0
        for param in params:
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    quality = float(value)
                except ValueError:
                    quality = 0.0
        ranges[media_type.lower()] = quality

    def quality_of(media_type: str) -> float:
        for candidate in (media_type, "image/*", "*/*"):
            if candidate in ranges:
                return ranges[candidate]
        return 0.0

    webp, jpeg = quality_of("image/webp"), quality_of("image/jpeg")
    return "webp" if webp > 0 and webp >= jpeg else "jpeg"


def etag(sha256: str, size: int, fmt: str) -> str:
    """Strong: one representation per content, size, format and generation."""
    return f'"{sha256}.{size}.{fmt}.g{GENERATION}"'




def cache_path(root: Path, blob_id: uuid.UUID, size: int, fmt: str) -> Path:
    return derived_dir(root, blob_id) / f"{size}.g{GENERATION}.{fmt}"


def failure_path(root: Path, blob_id: uuid.UUID) -> Path:
    """Why no thumbnail can be made of a content. One per content, not per size or format: what
    fails (the format, damage, the pixel limit, a decoder that hangs or crashes) is in the
    decoding, and only the scaling and encoding after it depend on the size and format asked
    for. The generation is in the name so that a change to how thumbnails are made tries again."""
    return derived_dir(root, blob_id) / f"failed.g{GENERATION}"


def fit(width: int, height: int, size: int) -> tuple[int, int]:
    """Dimensions at most `size` on the longer side, aspect kept, never enlarged."""
    scale = min(1.0, size / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


# ---- rendering (runs in a worker process) --------------------------------------------------------

def render(path: str, kind: str, size: int, fmt: str, out: str, max_pixels: int) -> None:
    """Write the thumbnail to `out` atomically; NoPicture (or ProbeFailed) says why not."""
    if kind == "image":
        picture = _image(path, size, max_pixels)
    elif kind in ("video", "audio"):
        picture = _from_av(path, size, max_pixels)
    else:
        raise NoPicture("this file is not an image, video or audio file, so it has no picture")
    data = _encode(picture, fmt)
    temp = f"{out}.{os.getpid()}.tmp"
    with open(temp, "wb") as file:
        file.write(data)
    os.replace(temp, out)


def _image(source: str | bytes, size: int, max_pixels: int) -> Any:
    import pyvips  # type: ignore[import-untyped]

    image_header(source, max_pixels)  # format allowlist and the pixel limit, from the header
    try:
        if isinstance(source, bytes):
            return pyvips.Image.thumbnail_buffer(source, size, height=size, size="down")
        return pyvips.Image.thumbnail(source, size, height=size, size="down")
    except pyvips.Error:
        raise NoPicture("the image does not decode (it is damaged or truncated)") from None


def _from_av(path: str, size: int, max_pixels: int) -> Any:
    import av

    try:
        with av.open(path, metadata_errors="ignore") as container:
            video = real_video(container)
            if video is None:
                return _image(_cover(container), size, max_pixels)
            check_pixels(video.codec_context.width, video.codec_context.height, max_pixels)
            return _poster(container, video, size)
    except av.FFmpegError:
        raise NoPicture("the file does not decode as audio or video") from None


def _cover(container: Any) -> bytes:
    import av

    for stream in container.streams.video:
        if stream.disposition & av.stream.Disposition.attached_pic:
            for packet in container.demux(stream):
                if packet.size:
                    return bytes(packet)
    raise NoPicture("this audio file has no embedded cover art")


def _poster(container: Any, video: Any, size: int) -> Any:
    import av
    import pyvips  # type: ignore[import-untyped]

    if container.duration and container.duration > 0:
        try:  # to the keyframe at or before 10 %: decoding on to the exact frame costs a GOP
            container.seek(container.duration // 10)
        except av.FFmpegError:
            container.seek(0)
    frame = first_frame(container, video)
    rotation = (-round(frame.rotation / 90) * 90) % 360
    shown_w, shown_h = (frame.height, frame.width) if rotation in (90, 270) else (frame.width, frame.height)
    width, height = fit(shown_w, shown_h, size)
    if rotation in (90, 270):
        width, height = height, width
    rgb = frame.reformat(width=width, height=height, format="rgb24", interpolation="AREA")
    plane = rgb.planes[0]
    row = width * 3
    if plane.line_size == row:
        data = bytes(plane)[:row * height]
    else:
        view = memoryview(plane)
        data = b"".join(view[y * plane.line_size:y * plane.line_size + row] for y in range(height))
    image = pyvips.Image.new_from_memory(data, width, height, 3, "uchar")
    return {90: image.rot90, 180: image.rot180, 270: image.rot270}.get(rotation, lambda: image)()


def _encode(image: Any, fmt: str) -> bytes:
    if image.interpretation not in ("srgb", "b-w") or image.format != "uchar":
        image = image.colourspace("srgb").cast("uchar")
    if fmt == "jpeg" and image.hasalpha():
        image = image.flatten(background=[255, 255, 255])
    data: bytes = image.write_to_buffer(f".{fmt}", Q=_QUALITY[fmt], keep="none")
    return data


# ---- the server side ----------------------------------------------------------------------------

def _read_if_there(path: Path) -> bytes | None:
    try:
        with open(path, "rb") as file:
            return file.read()
    except FileNotFoundError:
        return None


def _look_up(target: Path, failure: Path) -> tuple[bytes | None, str | None]:
    """The thumbnail made before, else the reason none can be made, if one was kept within the
    last _FAILURE_KEPT_S (blocking)."""
    data = _read_if_there(target)
    if data is not None:
        return data, None
    try:
        if time.time() - failure.stat().st_mtime > _FAILURE_KEPT_S:
            return None, None
    except FileNotFoundError:
        return None, None
    reason = _read_if_there(failure)
    # Empty: a marker a power cut caught before its bytes were on disk; it only costs a retry.
    return None, reason.decode("utf-8", "replace") if reason else None


def _keep_failure(failure: Path, source: Path, reason: str) -> None:
    """Keep why the content has no thumbnail (blocking). Best effort: a marker that cannot be
    written costs one more job later, never this request's answer."""
    if not source.exists():  # gone before the decoder opened it (evicted): not the content's failure
        return
    temp = failure.with_name(f"{failure.name}.{uuid.uuid4().hex}.tmp")
    try:
        temp.write_text(reason, encoding="utf-8")
        os.replace(temp, failure)  # whole or not at all, also across a crash
    except OSError:  # the content was removed meanwhile (its folder too), or the disk is full
        pass
    finally:
        temp.unlink(missing_ok=True)


class Thumbnailer:
    """Finds or makes derived files; one generation per cache path however many ask at once."""

    def __init__(self, root: Path, pool: MediaPool, max_pixels: int) -> None:
        self.root = root
        self.pool = pool
        self.max_pixels = max_pixels
        self._making: dict[Path, asyncio.Task[None]] = {}
        self._hot: OrderedDict[tuple[uuid.UUID, int, str], bytes] = OrderedDict()  # least recent first
        self._hot_bytes = 0

    async def cached(self, blob_id: uuid.UUID, size: int, fmt: str) -> bytes | None:
        """A thumbnail made before (from memory, else read in one thread hop); None when there
        is none yet; NotFound with the reason when making one of this content failed before."""
        key = (blob_id, size, fmt)
        data = self._hot.get(key)
        if data is not None:
            self._hot.move_to_end(key)
            return data
        data, failure = await asyncio.to_thread(_look_up, cache_path(self.root, blob_id, size, fmt),
                                                failure_path(self.root, blob_id))
        if failure is not None:
            raise NotFound(f"no thumbnail can be made for this file: {failure}")
        if data is not None:
            self._remember(key, data)
        return data

    def _remember(self, key: tuple[uuid.UUID, int, str], data: bytes) -> None:
        # Keyed by the content's blob, which a replace changes: an entry of content that is gone
        # is never asked for again and simply ages out, so no other process has to be told.
        self._hot[key] = data
        self._hot_bytes += len(data)
        while self._hot_bytes > HOT_BYTES:
            _, dropped = self._hot.popitem(last=False)
            self._hot_bytes -= len(dropped)

    async def make(self, blob_id: uuid.UUID, source: Source, kind: str, size: int, fmt: str) -> bytes:
        """Make the thumbnail from the content `source` opens (once, however many ask at the same
        time) and return it: NotFound with the reason when there is no picture, ServiceUnavailable
        when every worker stays busy; whatever opening the source raises."""
        target = cache_path(self.root, blob_id, size, fmt)
        task = self._making.get(target)
        if task is None:
            job = {"op": "thumbnail", "kind": kind, "size": size, "format": fmt, "out": str(target),
                   "max_pixels": self.max_pixels}
            task = asyncio.create_task(self._generate(target, failure_path(self.root, blob_id), source, job))
            self._making[target] = task
            task.add_done_callback(lambda _: self._making.pop(target, None))
        try:
            await asyncio.shield(task)  # a client that goes away does not stop it for the others
        except Busy:
            raise ServiceUnavailable("every thumbnail generator is busy; retry shortly", retry_after=2) from None
        except WorkerFailed as exc:
            raise NotFound(f"no thumbnail can be made for this file: {exc}") from None
        made = await asyncio.to_thread(_read_if_there, target)
        if made is None:  # removed at once by a replace or delete of the content
            raise NotFound("the file's content changed while its thumbnail was being made")
        return made

    async def _generate(self, target: Path, failure: Path, source: Source, job: dict[str, Any]) -> None:
        # The shared task opens the source itself, so a copy read back from the cloud lives as long
        # as the job needs it. Were it the first requester's, that request being cancelled would
        # remove it under the others' job, and each requester joining would read back a copy of
        # its own for nothing.
        async with source() as path:
            await asyncio.to_thread(target.parent.mkdir, parents=True, exist_ok=True)
            try:
                await self.pool.run({**job, "path": str(path)}, wait=_WAIT_FOR_WORKER_S)
            except WorkerFailed as exc:
                # Kept, or a hostile file would cost a worker up to the whole timeout again for
                # each of its ~4,000 sizes and formats, and the probes waiting for the pool with it.
                if exc.lasting:
                    await asyncio.to_thread(_keep_failure, failure, path, str(exc))
                raise

    def derived_blobs(self) -> set[uuid.UUID]:
        """The contents that have derived files on disk (blocking)."""
        found = set()
        with contextlib.suppress(FileNotFoundError):
            for shard in os.scandir(self.root / "derived"):
                for entry in os.scandir(shard.path):
                    with contextlib.suppress(ValueError):
                        found.add(uuid.UUID(hex=entry.name))
        return found

    async def close(self) -> None:
        tasks = list(self._making.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)  # their workers are killed, not left

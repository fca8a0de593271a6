"""Real media made in the tests, small and fast: PyAV encodes audio and video, Pillow and libvips
write pictures. Each maker returns the bytes and what a probe must report for them."""

from __future__ import annotations

import io
import struct
import subprocess
import tempfile
import wave
import zlib
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import imageio_ffmpeg
import pyvips
from PIL import Image


def _encoded(fmt: str, suffix: str, build: Any) -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"sample.{suffix}"
        with av.open(str(path), "w", format=fmt) as out:
            build(out)
        return path.read_bytes()


def _video_stream(out: Any, codec: str, width: int, height: int, fps: int, rotation: int | None) -> Any:
    stream = out.add_stream(codec, rate=fps)
    stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
    stream.codec_context.gop_size = 5  # a keyframe every 0.2 s: the poster at 10 % is frame 5 exactly
    if rotation is not None:
        stream.set_display_rotation(rotation)  # counter-clockwise, as FFmpeg counts
    return stream


def frame_red(index: int) -> int:
    """The red level of video frame `index`: frames are told apart by colour."""
    return (index * 9) % 256


def _write_video(out: Any, stream: Any, frames: int) -> None:
    for index in range(frames):
        picture = Image.new("RGBA", (stream.width, stream.height), (frame_red(index), 60, 160, 255))
        for packet in stream.encode(av.VideoFrame.from_image(picture)):
            out.mux(packet)
    for packet in stream.encode():
        out.mux(packet)


def _write_audio(out: Any, stream: Any, seconds: float, rate: int, samples: int = 1024) -> None:
    pts = 0
    layout = stream.layout.name
    while pts < seconds * rate:
        frame = av.AudioFrame(format="fltp", layout=layout, samples=samples)
        for plane in frame.planes:
            plane.update(bytes(samples * 4))
        frame.sample_rate, frame.pts, frame.time_base = rate, pts, Fraction(1, rate)
        pts += samples
        for packet in stream.encode(frame):
            out.mux(packet)
    for packet in stream.encode():
        out.mux(packet)


def video(*, fmt: str = "mp4", codec: str = "libx264", audio_codec: str | None = "aac", width: int = 320,
          height: int = 240, fps: int = 25, seconds: float = 2.0, rotation: int | None = None) -> bytes:
    suffix = {"mp4": "mp4", "mov": "mov", "webm": "webm"}[fmt]

    def build(out: Any) -> None:
        stream = _video_stream(out, codec, width, height, fps, rotation)
        sound = None
        if audio_codec:
            sound = out.add_stream(audio_codec, rate=48000)
            sound.layout = "stereo"
        _write_video(out, stream, round(seconds * fps))
        if sound is not None:
            _write_audio(out, sound, seconds, 48000, 960 if audio_codec == "libopus" else 1024)

    return _encoded(fmt, suffix, build)


def webm_audio(*, seconds: float = 0.5) -> bytes:
    def build(out: Any) -> None:
        sound = out.add_stream("libopus", rate=48000)
        sound.layout = "stereo"
        _write_audio(out, sound, seconds, 48000, 960)

    return _encoded("webm", "webm", build)


def jpeg_cover(colour: tuple[int, int, int] = (0, 200, 0), size: tuple[int, int] = (200, 160)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, "JPEG", quality=95)
    return buffer.getvalue()


def mp3(*, seconds: float = 1.5, cover: bytes | None = None, channels: int = 2, rate: int = 44100) -> bytes:
    def build(out: Any) -> None:
        sound = out.add_stream("libmp3lame", rate=rate)
        sound.layout = "stereo" if channels == 2 else "mono"
        if cover is not None:
            picture = Image.open(io.BytesIO(cover))
            art = out.add_stream("mjpeg", rate=1)
            art.width, art.height = picture.size
            art.pix_fmt = "yuvj420p"
            art.disposition = av.stream.Disposition.attached_pic
            packet = av.Packet(cover)
            packet.stream, packet.pts, packet.dts, packet.time_base = art, 0, 0, Fraction(1, 1)
            out.mux(packet)
        _write_audio(out, sound, seconds, rate, 1152)

    return _encoded("mp3", "mp3", build)


def flac(*, seconds: float = 1.0, rate: int = 44100) -> bytes:
    def build(out: Any) -> None:
        sound = out.add_stream("flac", rate=rate)
        sound.layout = "mono"
        sound.format = "s16"
        pts = 0
        while pts < seconds * rate:
            frame = av.AudioFrame(format="s16", layout="mono", samples=1024)
            frame.planes[0].update(bytes(2048))
            frame.sample_rate, frame.pts, frame.time_base = rate, pts, Fraction(1, rate)
            pts += 1024
            for packet in sound.encode(frame):
                out.mux(packet)
        for packet in sound.encode():
            out.mux(packet)

    return _encoded("flac", "flac", build)


def wav(*, seconds: float = 1.0, rate: int = 22050, channels: int = 1) -> bytes:
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(channels)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(bytes(int(seconds * rate) * channels * 2))
    return buffer.getvalue()


def photo(*, width: int = 400, height: int = 300, orientation: int = 6, taken: str = "2026:05:01 12:00:00",
          offset: str | None = "+02:00") -> bytes:
    """A JPEG whose stored left half is red and right half blue, with EXIF orientation, date
    (DateTimeOriginal `taken`, OffsetTimeOriginal `offset` unless None), camera and GPS (which
    must never come out of mediad)."""
    picture = Image.new("RGB", (width, height), (220, 0, 0))
    picture.paste((0, 0, 220), (width // 2, 0, width, height))
    exif = Image.Exif()
    exif[0x0112] = orientation
    exif[0x010F] = "Canon"
    exif[0x0110] = "Canon EOS R5"
    exif.get_ifd(0x8769).update({0x9003: taken, **({} if offset is None else {0x9011: offset})})
    exif.get_ifd(0x8825).update({1: "N", 2: (52.0, 31.0, 12.0), 3: "E", 4: (13.0, 24.0, 36.0)})
    buffer = io.BytesIO()
    picture.save(buffer, "JPEG", exif=exif.tobytes(), quality=90)
    return buffer.getvalue()


def png_alpha(width: int = 64, height: int = 48) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGBA", (width, height), (10, 20, 30, 128)).save(buffer, "PNG")
    return buffer.getvalue()


def gif_1x1() -> bytes:
    buffer = io.BytesIO()
    Image.new("P", (1, 1), 0).save(buffer, "GIF")
    return buffer.getvalue()


def avif(width: int = 64, height: int = 48) -> bytes:
    image = (pyvips.Image.black(width, height, bands=3) + [200, 30, 30]).cast("uchar")
    return bytes(image.heifsave_buffer(compression="av1"))


def big_jpeg(width: int = 6000, height: int = 4000) -> bytes:
    """24 megapixels with some texture (noise), as a camera's would have."""
    noise = pyvips.Image.gaussnoise(width, height, sigma=40, mean=128)
    xyz = pyvips.Image.xyz(width, height)
    image = (noise.bandjoin([xyz[0] / (width / 255), xyz[1] / (height / 255)])).cast("uchar")
    return bytes(image.copy(interpretation="srgb").jpegsave_buffer(Q=85))


def png_bomb(side: int = 30000) -> bytes:
    """A side×side one-colour 1-bit PNG: ~100 KiB on disk, side² pixels once decoded."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\x00" + bytes((side + 7) // 8)
    packer = zlib.compressobj(9)
    body = b"".join(packer.compress(row) for _ in range(side)) + packer.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


def decode(data: bytes) -> pyvips.Image:
    return pyvips.Image.new_from_buffer(data, "")


FFMPEG = imageio_ffmpeg.get_ffmpeg_exe()
CODECS = {(8, False): "pcm_u8", (16, False): "pcm_s16le", (24, False): "pcm_s24le",
          (32, False): "pcm_s32le", (32, True): "pcm_f32le", (64, True): "pcm_f64le"}


def make_wav(path: Path, seconds: float, rate: int = 44100, channels: int = 2, bits: int = 16,
             is_float: bool = False) -> Path:
    """A tone generated by ffmpeg, written as the requested PCM or float WAV."""
    subprocess.run([FFMPEG, "-nostdin", "-loglevel", "error", "-f", "lavfi", "-i",
                    f"sine=frequency=440:sample_rate={rate}:duration={seconds}", "-ac", str(channels),
                    "-c:a", CODECS[(bits, is_float)], "-y", str(path)], check=True)
    return path

"""Uploads over HTTP: multipart and raw bodies, names, formats, paths, replacement, limits, and
failures that must leave nothing behind. Stored bytes are checked on disk (no download route yet)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import random
import struct
import unicodedata
import uuid
import zlib
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any
from urllib.parse import quote

import asyncpg
import httpx
import pytest
from conftest import (
    CHUNK_SIZES,
    TEST_MAX_UPLOAD,
    Server,
    User,
    assert_problem,
    eventually,
    http_chunk,
    make_settings,
    make_user,
    post_in_pieces,
    raw_connection,
    read_response,
    request_head,
)

from mediad.app import create_app
from mediad.storage import blob_relpath

KiB, MiB = 1024, 1024 * 1024
ENVELOPE = 64 * KiB  # the contract's allowance for multipart boundaries and headers
BOUNDARY = "mediad-test-boundary-7f3a"

Snapshot = tuple[list[tuple[Any, ...]], list[Any]]


# ---- helpers ------------------------------------------------------------------------------------

@functools.cache  # generating 64 MiB costs more than uploading it; tests share their bodies
def payload(size: int, seed: int = 0) -> bytes:
    return random.Random(f"{size}/{seed}").randbytes(size)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def pieces(data: bytes, size: int = 7777) -> AsyncIterator[bytes]:
    """A streamed (chunked) request body in odd-sized pieces."""
    for start in range(0, len(data), size):
        yield data[start:start + size]


def png_1x1() -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(b"\x00\xff\x00\x00")) + chunk(b"IEND", b""))


def multipart(parts: Iterable[tuple[str, str | None, bytes]], boundary: str = BOUNDARY) -> bytes:
    """A hand-built multipart/form-data body from (field name, filename or None, content)."""
    body = b""
    for name, filename, content in parts:
        disposition = f'form-data; name="{name}"'
        if filename is not None:
            disposition += f'; filename="{filename}"'
        body += f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + content + b"\r\n"
    return body + f"--{boundary}--\r\n".encode()


MULTIPART_TYPE = f"multipart/form-data; boundary={BOUNDARY}"


def form(user: User) -> dict[str, str]:
    """Headers for a hand-built multipart body (see `multipart`)."""
    return {**user.auth, "content-type": MULTIPART_TYPE}


async def fetch(server: Server, query: str, *args: Any) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(server.database_url)
    try:
        return await conn.fetch(query, *args)
    finally:
        await conn.close()


async def blob_of(server: Server, file_id: str) -> bytes:
    """The stored bytes of a File, read from disk through its row's blob_id."""
    rows = await fetch(server, "SELECT blob_id FROM files WHERE id = $1", uuid.UUID(file_id))
    assert len(rows) == 1
    return (server.data_dir / blob_relpath(rows[0]["blob_id"])).read_bytes()


async def assert_stored(server: Server, body: dict[str, Any], data: bytes) -> None:
    assert body["size"] == len(data)
    assert body["sha256"] == sha(data)
    assert await blob_of(server, body["id"]) == data


async def snapshot(server: Server) -> Snapshot:
    rows = await fetch(server, "SELECT id, sha256, size, blob_id, updated_at FROM files ORDER BY id")
    return [tuple(r) for r in rows], server.blob_files()


async def assert_unchanged(server: Server, before: Snapshot, settle: float = 0.0) -> None:
    """No temp file left, no row or blob added, changed or lost."""
    await eventually(lambda: not server.stray_temp_files())
    await asyncio.sleep(settle)
    assert server.stray_temp_files() == []
    assert await snapshot(server) == before


async def send_past_limit(writer: asyncio.StreamWriter, chunked: bool, prefix: bytes = b"") -> None:
    """Stream more than the upload limit, without ever ending the body."""
    block = payload(MiB, seed=99)
    frame = http_chunk if chunked else (lambda data: data)
    with contextlib.suppress(ConnectionError):  # the server may hang up once it has answered
        if prefix:
            writer.write(frame(prefix))
        for _ in range(TEST_MAX_UPLOAD // MiB + 1):
            writer.write(frame(block))
            await writer.drain()


async def wait_for_temp_file(server: Server) -> None:
    assert await eventually(server.stray_temp_files), "the upload never reached the disk"


# ---- round trips --------------------------------------------------------------------------------

SIZES = [0, 1, 8193, 64 * KiB - 1, 64 * KiB, 64 * KiB + 1, MiB - 1, MiB, MiB + 1, 20 * MiB]


@pytest.mark.parametrize("mode", ["multipart", "raw-post", "raw-put-chunked"])
async def test_round_trip_keeps_every_byte(client: httpx.AsyncClient, server: Server, user: User,
                                           mode: str) -> None:
    for count, size in enumerate(SIZES, 1):
        data = payload(size)
        if mode == "multipart":
            response = await client.post("/files", headers=user.auth, files={"file": ("blob.bin", data)})
        elif mode == "raw-post":
            response = await client.post("/files", headers=user.auth, params={"name": "blob.bin"},
                                         content=data)
        else:
            response = await client.put("/files", headers=user.auth, params={"path": f"/rt/{size}.bin"},
                                        content=pieces(data))
        assert response.status_code == 201, (size, response.text)
        body = response.json()
        assert response.headers["location"] == f"/files/{body['id']}"
        assert body["extension"] == "bin"
        await assert_stored(server, body, data)
        assert server.stray_temp_files() == []
        assert len(server.blob_files()) == count


async def test_file_of_exactly_the_limit_is_accepted_raw_and_multipart(
        client: httpx.AsyncClient, server: Server, user: User) -> None:
    data = payload(TEST_MAX_UPLOAD)
    raw = await client.put("/files", headers=user.auth, params={"path": "/limit/raw.bin"}, content=data)
    assert raw.status_code == 201, raw.text
    await assert_stored(server, raw.json(), data)
    # The multipart envelope does not count against the file's bytes.
    multi = await client.post("/files", headers=user.auth, files={"file": ("multi.bin", data)})
    assert multi.status_code == 201, multi.text
    await assert_stored(server, multi.json(), data)


async def test_multipart_closing_delimiter_without_final_crlf_is_complete(
        client: httpx.AsyncClient, server: Server, user: User) -> None:
    data = payload(3000)
    body = multipart([("file", "end.bin", data)]).removesuffix(b"\r\n")
    response = await client.post("/files", headers=form(user), content=body)
    assert response.status_code == 201, response.text
    await assert_stored(server, response.json(), data)


# Chunk sizes for bodies sent piece by piece: where a read ends inside the framing is what matters.
@pytest.mark.parametrize("epilogue", [b"\r\n", b"\r\n\r\n", f"\r\nnot a part\r\n--{BOUNDARY}\r\nnor this\r\n".encode()])
async def test_multipart_epilogue_is_ignored_whatever_the_chunks(
        client: httpx.AsyncClient, server: Server, user: User, epilogue: bytes) -> None:
    # RFC 2046 §5.1.1: what follows the close delimiter is an epilogue, for no one. The body
    # below ends `--boundary--` + epilogue; read in pieces, the close delimiter and the epilogue
    # often arrive together.
    data = payload(200, seed=5)
    for size in CHUNK_SIZES:
        body = multipart([("path", None, b"/epilogue/"), ("file", f"{size}.bin", data)]).removesuffix(b"\r\n")
        response = await post_in_pieces(server, user, body + epilogue, size, MULTIPART_TYPE)
        assert response.status_code == 201, (size, response.text)
        assert response.json()["path"] == f"/epilogue/{size}.bin"
        await assert_stored(server, response.json(), data)
    assert server.stray_temp_files() == []


async def test_multipart_path_field_may_come_after_the_file(
        client: httpx.AsyncClient, server: Server, user: User) -> None:
    data = payload(5000)
    body = multipart([("file", "late.bin", data), ("path", None, b"/after/")])
    response = await client.post("/files", headers=form(user), content=body)
    assert response.status_code == 201, response.text
    assert response.json()["path"] == "/after/late.bin"
    await assert_stored(server, response.json(), data)


# ---- names --------------------------------------------------------------------------------------

NAMES = [
    ("Отчёт за май.mp4", "mp4"),
    ("会议记录 2026年.PDF", "pdf"),
    ("تقرير الربع الأول.docx", "docx"),
    ("🎬 final cut 🎉.MOV", "mov"),
    ("with  two  spaces.tar.gz", "gz"),
    ("no extension", ""),
    (".bashrc", ""),
]
QUOTED_NAMES = [('say "cheese" it\'s.JPG', "jpg"), ("''.txt", "txt")]


async def upload_named(client: httpx.AsyncClient, user: User, channel: str, name: str,
                       data: bytes = b"named") -> httpx.Response:
    if channel == "query":
        return await client.post("/files", headers=user.auth, params={"name": name}, content=data)
    if channel == "disposition":
        disposition = f"attachment; filename*=UTF-8''{quote(name, safe='')}"
        return await client.post("/files", headers={**user.auth, "content-disposition": disposition},
                                 content=data)
    if channel == "put-folder":
        return await client.put("/files", headers=user.auth, params={"path": "/in/", "name": name},
                                content=data)
    assert channel == "multipart"
    return await client.post("/files", headers=user.auth, files={"file": (name, data)})


@pytest.mark.parametrize("channel", ["query", "disposition", "put-folder", "multipart"])
async def test_names_are_kept_as_sent_in_nfc(client: httpx.AsyncClient, user: User, channel: str) -> None:
    # Multipart encoders send " as %22 (WHATWG), which cannot be told from a literal %22.
    names = NAMES if channel == "multipart" else NAMES + QUOTED_NAMES
    for name, extension in names:
        response = await upload_named(client, user, channel, unicodedata.normalize("NFD", name))
        assert response.status_code == 201, (name, response.text)
        body = response.json()
        assert body["name"] == unicodedata.normalize("NFC", name)
        assert body["extension"] == extension, name
        assert body["path"] == (f"/in/{body['name']}" if channel == "put-folder" else None)


async def test_content_disposition_filename_star_wins_and_raw_utf8_is_utf8(
        client: httpx.AsyncClient, user: User) -> None:
    # RFC 6266 §4.3: when both are present, filename* wins; filename is for old recipients.
    name = "Отчёт за май.mp4"
    disposition = f"attachment; filename=\"fallback.txt\"; filename*=UTF-8''{quote(name)}"
    response = await client.post("/files", headers={**user.auth, "content-disposition": disposition},
                                 content=b"x")
    assert response.status_code == 201, response.text
    assert response.json()["name"] == name
    plain = await client.post("/files", content=b"x", headers={
        **user.auth, "content-disposition": 'attachment; filename="a b.txt"'})
    assert plain.json()["name"] == "a b.txt"
    # Raw UTF-8 in a quoted filename (curl -H …) is read as UTF-8, not as latin-1 mojibake.
    raw = await client.post("/files", content=b"x", headers=[
        ("authorization", f"Bearer {user.token}"),
        ("content-disposition", 'attachment; filename="Отчёт №5.txt"'.encode())])
    assert raw.status_code == 201, raw.text
    assert raw.json()["name"] == "Отчёт №5.txt"
    # ?name= wins over the header.
    response = await client.post("/files?name=query.txt", content=b"x", headers={
        **user.auth, "content-disposition": 'attachment; filename="hdr.txt"'})
    assert response.json()["name"] == "query.txt"


DIRECTORY_NAMES = [
    ("../../etc/passwd", "passwd"),
    ("C:\\x\\y.png", "y.png"),
    ("/absolute/dir/z.TXT", "z.TXT"),
    ("mixed/dirs\\and/last.bin", "last.bin"),
]


@pytest.mark.parametrize("channel", ["query", "disposition", "multipart"])
async def test_names_with_directories_keep_only_the_last_component(
        client: httpx.AsyncClient, server: Server, user: User, channel: str) -> None:
    for sent, kept in DIRECTORY_NAMES:
        response = await upload_named(client, user, channel, sent)
        assert response.status_code == 201, (sent, response.text)
        assert response.json()["name"] == kept
    # The name is metadata only: the bytes went to our own blob paths, nowhere else.
    blobs = server.blob_files()
    assert len(blobs) == len(DIRECTORY_NAMES)
    assert {p.relative_to(server.data_dir).parts[0] for p in blobs} == {"files"}


BAD_NAMES = ["", ".", "..", "a\x00b.txt", "line\nbreak.txt", "tab\there.txt", "esc\x1b.txt", "del\x7f.txt",
             "c1\x85.txt", "dir/", "..\\..", "a/."]


@pytest.mark.parametrize("channel", ["query", "disposition", "put-folder"])
async def test_unusable_names_are_422_and_leave_nothing(client: httpx.AsyncClient, server: Server,
                                                        user: User, channel: str) -> None:
    await client.post("/files", headers=user.auth, params={"name": "existing.txt"}, content=b"x")
    before = await snapshot(server)
    for name in BAD_NAMES:
        response = await upload_named(client, user, channel, name, payload(100 * KiB))
        assert response.status_code == 422, (name, response.text)
        assert_problem(response, 422)
    await assert_unchanged(server, before)


async def test_unusable_multipart_filenames_are_422_and_leave_nothing(
        client: httpx.AsyncClient, server: Server, user: User) -> None:
    before = await snapshot(server)
    for filename in ["..", ".", "", "a/..", "ctl\x01.txt", "nul\x00.txt"]:
        body = multipart([("file", filename, payload(200 * KiB))])
        response = await client.post("/files", headers=form(user), content=body)
        assert response.status_code == 422, (filename, response.text)
        assert_problem(response, 422)
    await assert_unchanged(server, before)


# ---- formats ------------------------------------------------------------------------------------

TEXT = b"just some words, nothing magic about them\n"


FORMATS = [  # content, name, declared type (ignored), expected format
    (png_1x1(), "notes.txt", "text/plain", "image/png"),
    (b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n", "scan", "image/png", "application/pdf"),
    (TEXT, "notes.txt", "image/png", "text/plain"),
    (TEXT, "README", "text/plain", "application/octet-stream"),
    (b"", "movie.mp4", "image/png", "video/mp4"),
    (b"", "empty", "text/plain", "application/octet-stream"),
]


@pytest.mark.parametrize("channel", ["raw", "multipart"])
async def test_format_is_detected_from_content_then_extension_never_the_declared_type(
        client: httpx.AsyncClient, user: User, channel: str) -> None:
    for content, name, declared, expected in FORMATS:
        if channel == "raw":
            response = await client.post("/files", headers={**user.auth, "content-type": declared},
                                         params={"name": name}, content=content)
        else:
            response = await client.post("/files", headers=user.auth,
                                         files={"file": (name, content, declared)})
        assert response.status_code == 201, response.text
        assert response.json()["format"] == expected, (name, declared)


# ---- paths --------------------------------------------------------------------------------------

@pytest.mark.parametrize("channel", ["multipart", "raw-post", "put"])
async def test_folder_path_keeps_the_files_own_name(client: httpx.AsyncClient, user: User,
                                                    channel: str) -> None:
    if channel == "multipart":
        response = await client.post("/files", headers=user.auth, data={"path": "/videos/"},
                                     files={"file": ("Отчёт.mp4", b"v")})
    else:
        send = client.post if channel == "raw-post" else client.put
        response = await send("/files", headers=user.auth, params={"path": "/videos/", "name": "Отчёт.mp4"},
                              content=b"v")
    assert response.status_code == 201, response.text
    body = response.json()
    assert (body["name"], body["path"], body["extension"]) == ("Отчёт.mp4", "/videos/Отчёт.mp4", "mp4")


async def test_multipart_takes_the_path_field_else_the_query_path(client: httpx.AsyncClient,
                                                                  user: User) -> None:
    by_query = await client.post("/files?path=/q/", headers=user.auth, files={"file": ("m.txt", b"m")})
    assert by_query.status_code == 201, by_query.text
    assert by_query.json()["path"] == "/q/m.txt"
    both = await client.post("/files?path=/q/", headers=user.auth, data={"path": "/field/"},
                             files={"file": ("m.txt", b"m")})
    assert both.status_code == 201, both.text
    assert both.json()["path"] == "/field/m.txt"


@pytest.mark.parametrize("channel", ["multipart", "raw-post", "put"])
async def test_full_path_names_the_file(client: httpx.AsyncClient, user: User, channel: str) -> None:
    if channel == "multipart":
        response = await client.post("/files", headers=user.auth, data={"path": "/docs/Report.PDF"},
                                     files={"file": ("other.txt", b"%PDF-1.4\n")})
    else:
        send = client.post if channel == "raw-post" else client.put
        response = await send("/files", headers=user.auth,
                              params={"path": "/docs/Report.PDF", "name": "other.txt"}, content=b"%PDF-1.4\n")
    assert response.status_code == 201, response.text
    body = response.json()
    assert (body["name"], body["path"], body["extension"]) == ("Report.PDF", "/docs/Report.PDF", "pdf")


NORMALISED_PATHS = [
    ("//a///b//c.txt", "/a/b/c.txt"),
    ("//x//", "/x/f.txt"),
    ("/", "/f.txt"),
    (unicodedata.normalize("NFD", "/Фото/ёлка.jpg"), "/Фото/ёлка.jpg"),
    ("/with space/and 'quotes\".txt", "/with space/and 'quotes\".txt"),
]


async def test_paths_are_normalised(client: httpx.AsyncClient, user: User) -> None:
    for sent, stored in NORMALISED_PATHS:
        response = await client.post("/files", headers=user.auth, params={"path": sent, "name": "f.txt"},
                                     content=b"p")
        assert response.status_code == 201, (sent, response.text)
        assert response.json()["path"] == stored
        assert response.json()["name"] == stored.rsplit("/", 1)[-1]


BAD_PATHS = ["relative/a.txt", "a.txt", "/a/./b.txt", "/a/../b.txt", "/..", "/a/.", "/a/../", "/a\x00b",
             "/a\nb.txt", "/a\x1fb/", "/a\x7f/"]


@pytest.mark.parametrize("channel", ["multipart", "raw-post", "put"])
async def test_bad_paths_are_422_and_leave_nothing(client: httpx.AsyncClient, server: Server, user: User,
                                                   channel: str) -> None:
    await client.put("/files", headers=user.auth, params={"path": "/a/b.txt"}, content=b"existing")
    before = await snapshot(server)
    data = payload(300 * KiB)
    for path in BAD_PATHS:
        if channel == "multipart":
            body = multipart([("path", None, path.encode()), ("file", "f.txt", data)])
            response = await client.post("/files", headers=form(user), content=body)
        else:
            send = client.post if channel == "raw-post" else client.put
            response = await send("/files", headers=user.auth, params={"path": path, "name": "f.txt"},
                                  content=data)
        assert response.status_code == 422, (path, response.text)
        assert_problem(response, 422)
    await assert_unchanged(server, before)


async def test_put_without_a_path_is_422(client: httpx.AsyncClient, server: Server, user: User) -> None:
    before = await snapshot(server)
    assert_problem(await client.put("/files", headers=user.auth, params={"name": "a.txt"}, content=b"x"), 422)
    assert_problem(await client.put("/files", headers=user.auth, params={"path": "/dir/"}, content=b"x"), 422)
    await assert_unchanged(server, before)


# ---- replacing ----------------------------------------------------------------------------------

async def test_put_to_an_existing_path_replaces_content_under_the_same_id(
        client: httpx.AsyncClient, server: Server, user: User) -> None:
    first, second = payload(300 * KiB, 1), payload(123 * KiB, 2)
    created = await client.put("/files", headers=user.auth, params={"path": "/r/a.bin"}, content=first)
    assert created.status_code == 201
    old_blob = server.blob_files()
    await asyncio.sleep(0.01)
    replaced = await client.put("/files", headers=user.auth, params={"path": "/r/a.bin"},
                                content=pieces(second))
    assert replaced.status_code == 200, replaced.text
    old, new = created.json(), replaced.json()
    assert new["id"] == old["id"]
    assert replaced.headers["location"] == f"/files/{old['id']}"
    assert (new["sha256"], new["size"]) == (sha(second), len(second))
    assert new["created_at"] == old["created_at"] and new["updated_at"] >= old["updated_at"]
    await assert_stored(server, new, second)
    # Exactly one blob for the file: the old bytes are gone from disk.
    blobs = server.blob_files()
    assert len(blobs) == 1 and blobs != old_blob and not old_blob[0].exists()
    rows = await fetch(server, "SELECT count(*) AS n FROM files")
    assert rows[0]["n"] == 1


@pytest.mark.parametrize("channel", ["multipart", "raw-post"])
async def test_post_to_an_existing_path_replaces_too(client: httpx.AsyncClient, server: Server, user: User,
                                                     channel: str) -> None:
    first, second = payload(10 * KiB, 1), payload(20 * KiB, 2)
    created = await client.put("/files", headers=user.auth, params={"path": "/r/b.bin"}, content=first)
    if channel == "multipart":
        replaced = await client.post("/files", headers=user.auth, data={"path": "/r/"},
                                     files={"file": ("b.bin", second)})
    else:
        replaced = await client.post("/files", headers=user.auth, params={"path": "/r/b.bin"}, content=second)
    assert replaced.status_code == 200, replaced.text
    assert replaced.json()["id"] == created.json()["id"]
    await assert_stored(server, replaced.json(), second)
    assert len(server.blob_files()) == 1


async def test_paths_belong_to_their_user(client: httpx.AsyncClient, server: Server, user: User,
                                          other_user: User) -> None:
    mine, theirs = payload(1000, 1), payload(1000, 2)
    a = await client.put("/files", headers=user.auth, params={"path": "/same/x.bin"}, content=mine)
    b = await client.put("/files", headers=other_user.auth, params={"path": "/same/x.bin"}, content=theirs)
    assert (a.status_code, b.status_code) == (201, 201)
    assert a.json()["id"] != b.json()["id"]
    await assert_stored(server, a.json(), mine)
    await assert_stored(server, b.json(), theirs)


async def test_without_a_path_every_upload_is_a_new_file(client: httpx.AsyncClient, server: Server,
                                                         user: User) -> None:
    ids = set()
    for i in range(3):
        response = await client.post("/files", headers=user.auth, params={"name": "same.txt"},
                                     content=b"%d" % i)
        assert response.status_code == 201
        assert response.json()["path"] is None
        ids.add(response.json()["id"])
    multi = await client.post("/files", headers=user.auth, files={"file": ("same.txt", b"m")})
    assert multi.status_code == 201
    ids.add(multi.json()["id"])
    assert len(ids) == 4
    assert len(server.blob_files()) == 4


async def test_concurrent_uploads_to_one_path_leave_one_whole_file(
        client: httpx.AsyncClient, server: Server, user: User) -> None:
    for round_ in range(4):
        bodies = [payload(3 * MiB, 10 * round_ + 1), payload(2 * MiB + 17, 10 * round_ + 2)]
        responses = await asyncio.gather(*(
            client.put("/files", headers=user.auth, params={"path": "/race/one.bin"},
                       content=pieces(body, 64 * KiB))
            for body in bodies))
        statuses = sorted(r.status_code for r in responses)
        assert statuses == ([200, 201] if round_ == 0 else [200, 200]), [r.text for r in responses]
        assert len({r.json()["id"] for r in responses}) == 1
        rows = await fetch(server, "SELECT id, sha256, size, blob_id FROM files")
        assert len(rows) == 1
        assert rows[0]["sha256"] in {sha(b) for b in bodies}
        winner = bodies[0] if sha(bodies[0]) == rows[0]["sha256"] else bodies[1]
        assert rows[0]["size"] == len(winner)
        assert server.blob_files() == [server.data_dir / blob_relpath(rows[0]["blob_id"])]
        assert server.blob_files()[0].read_bytes() == winner
        assert server.stray_temp_files() == []


async def test_uploads_holding_more_than_the_in_flight_bound_all_complete(
        client: httpx.AsyncClient, server: Server, user: User) -> None:
    """40 uploads at once, each pausing after 640 KiB until all have sent as much (25 MiB received
    at one moment, far more than the 4 MiB a process lets its writer threads queue over all
    uploads): they wait for each other's writes, never for ever."""
    bodies = [payload(2 * MiB + n, 200 + n) for n in range(40)]
    held = 640 * KiB
    arrived = 0
    everyone = asyncio.Event()

    async def body(data: bytes) -> AsyncIterator[bytes]:
        nonlocal arrived
        for start in range(0, held, 64 * KiB):
            yield data[start:start + 64 * KiB]
        arrived += 1
        if arrived == len(bodies):
            await asyncio.sleep(1)  # time for the server to read what every upload sent so far
            everyone.set()
        await asyncio.wait_for(everyone.wait(), 60)
        for start in range(held, len(data), 64 * KiB):
            yield data[start:start + 64 * KiB]

    responses = await asyncio.gather(*(
        client.post("/files", headers=user.auth, params={"name": f"crowd{n}.bin"}, content=body(data))
        for n, data in enumerate(bodies)))
    assert [r.status_code for r in responses] == [201] * len(bodies), [r.text for r in responses][:3]
    assert [r.json()["sha256"] for r in responses] == [sha(data) for data in bodies]
    assert server.stray_temp_files() == []


# ---- malformed bodies ---------------------------------------------------------------------------

async def test_raw_upload_without_any_name_is_422_and_leaves_nothing(
        client: httpx.AsyncClient, server: Server, user: User) -> None:
    before = await snapshot(server)
    body = assert_problem(await client.post("/files", headers=user.auth, content=payload(MiB)), 422)
    assert "name" in body["detail"]
    assert_problem(await client.post("/files?name=", headers=user.auth, content=b"x"), 422)
    assert_problem(await client.post("/files", headers={**user.auth, "content-disposition": "attachment"},
                                     content=b"x"), 422)
    await assert_unchanged(server, before)


def _truncated(cut: str) -> bytes:
    body = multipart([("path", None, b"/cut/"), ("file", "cut.bin", payload(400 * KiB))])
    closing = f"\r\n--{BOUNDARY}--\r\n".encode()
    return {
        "mid-file": body[: len(body) // 2],
        "before-closing": body[: -len(closing)],
        "mid-closing": body[: -3],
    }[cut]


MALFORMED = {  # case: (Content-Type, body)
    "no-boundary": ("multipart/form-data", multipart([("file", "a.bin", b"abc")])),
    "wrong-boundary": ("multipart/form-data; boundary=other", multipart([("file", "a.bin", b"abc")])),
    "garbage": (MULTIPART_TYPE, b"this is not multipart at all"),
    "empty": (MULTIPART_TYPE, b""),
    "truncated-mid-file": (MULTIPART_TYPE, _truncated("mid-file")),
    "truncated-before-closing": (MULTIPART_TYPE, _truncated("before-closing")),
    "truncated-mid-closing": (MULTIPART_TYPE, _truncated("mid-closing")),
    "no-file-part": (MULTIPART_TYPE, multipart([("path", None, b"/x/"), ("other", "a.bin", b"abc")])),
    "two-file-parts": (MULTIPART_TYPE, multipart([("file", "a.bin", payload(100 * KiB, 1)),
                                                  ("file", "b.bin", payload(100 * KiB, 2))])),
    "two-path-fields": (MULTIPART_TYPE, multipart([("path", None, b"/a/"), ("path", None, b"/b/"),
                                                   ("file", "a.bin", b"abc")])),
    "non-utf8-part-header": (MULTIPART_TYPE, multipart([("file", "a.bin", b"abc")]).replace(
        b'filename="a.bin"', b'filename="\xff\xfe.bin"')),
}


async def test_malformed_multipart_is_400_and_leaves_nothing(client: httpx.AsyncClient, server: Server,
                                                             user: User) -> None:
    await client.put("/files", headers=user.auth, params={"path": "/cut/cut.bin"}, content=b"existing")
    before = await snapshot(server)
    for case, (content_type, body) in MALFORMED.items():
        response = await client.post("/files", headers={**user.auth, "content-type": content_type},
                                     content=body)
        assert response.status_code == 400, (case, response.text)
        assert_problem(response, 400)
        await assert_unchanged(server, before)


async def test_truncation_check_does_not_reject_a_complete_body(client: httpx.AsyncClient,
                                                                 user: User) -> None:
    # Control for the truncation cases above: the same body, whole, is accepted.
    body = multipart([("path", None, b"/cut/"), ("file", "cut.bin", payload(400 * KiB))])
    response = await client.post("/files", headers=form(user), content=body)
    assert response.status_code == 201, response.text


async def test_two_file_parts_are_refused_even_when_streamed(client: httpx.AsyncClient, server: Server,
                                                             user: User) -> None:
    before = await snapshot(server)
    body = multipart([("file", "a.bin", payload(2 * MiB, 1)), ("file", "b.bin", payload(2 * MiB, 2))])
    response = await client.post("/files", headers=form(user), content=pieces(body, 100_000))
    assert_problem(response, 400)
    await assert_unchanged(server, before)


# ---- limits -------------------------------------------------------------------------------------

async def test_declared_length_over_the_limit_is_413_before_the_body(
        server: Server, client: httpx.AsyncClient, user: User) -> None:
    before = await snapshot(server)
    octets = "application/octet-stream"
    for method, target, content_type, declared in [
        ("POST", "/files?name=big.bin", octets, TEST_MAX_UPLOAD + 1),
        ("PUT", "/files?path=/big/big.bin", octets, TEST_MAX_UPLOAD + 1),
        ("POST", "/files", MULTIPART_TYPE, TEST_MAX_UPLOAD + ENVELOPE + 1),
        ("PUT", "/files?path=/big/big.bin", octets, 10**15),
    ]:
        async with raw_connection(server) as (reader, writer):
            writer.write(request_head(method, target, {
                "Authorization": f"Bearer {user.token}", "Content-Type": content_type,
                "Content-Length": str(declared)}))
            await writer.drain()
            # Not one byte of the body was sent: the answer can only come from the declared length.
            async with asyncio.timeout(5):
                response = await read_response(reader)
        assert response.status_code == 413, (method, target, declared, response.text)
        assert_problem(response, 413)
        await assert_unchanged(server, before)


@pytest.mark.parametrize("kind", ["raw-post", "raw-put", "multipart"])
async def test_body_growing_past_the_limit_is_413_before_it_ends(
        server: Server, client: httpx.AsyncClient, user: User, kind: str) -> None:
    before = await snapshot(server)
    target = {"raw-post": "/files?name=big.bin", "raw-put": "/files?path=/big/big.bin",
              "multipart": "/files"}[kind]
    content_type = MULTIPART_TYPE if kind == "multipart" else "application/octet-stream"
    prefix = (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"big.bin\"\r\n\r\n"
              .encode() if kind == "multipart" else b"")
    async with raw_connection(server) as (reader, writer):
        writer.write(request_head("PUT" if kind == "raw-put" else "POST", target, {
            "Authorization": f"Bearer {user.token}", "Content-Type": content_type,
            "Transfer-Encoding": "chunked"}))
        await send_past_limit(writer, chunked=True, prefix=prefix)
        # The body never ends (no last chunk): an answer now means the server stopped reading.
        response = await read_response(reader)
    assert_problem(response, 413)
    await assert_unchanged(server, before)


async def test_streamed_body_one_byte_over_the_limit_is_413(client: httpx.AsyncClient, server: Server,
                                                             user: User) -> None:
    before = await snapshot(server)
    response = await client.put("/files", headers=user.auth, params={"path": "/big/one-over.bin"},
                                content=pieces(payload(TEST_MAX_UPLOAD) + b"!", MiB))
    assert_problem(response, 413)
    await assert_unchanged(server, before)


# ---- aborted uploads ----------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["raw-content-length", "raw-chunked", "multipart-chunked"])
async def test_client_disconnect_mid_upload_leaves_nothing(server: Server, client: httpx.AsyncClient,
                                                           user: User, kind: str) -> None:
    await client.put("/files", headers=user.auth, params={"path": "/keep/a.bin"}, content=b"keep me")
    before = await snapshot(server)
    chunked = kind != "raw-content-length"
    headers = {"Authorization": f"Bearer {user.token}"}
    if chunked:
        headers["Transfer-Encoding"] = "chunked"
    else:
        headers["Content-Length"] = str(32 * MiB)
    if kind == "multipart-chunked":
        headers["Content-Type"] = MULTIPART_TYPE
        target = "/files"
        first = (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"path\"\r\n\r\n/keep/a.bin\r\n"
                 f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.bin\"\r\n\r\n"
                 ).encode()
    else:
        target = "/files?path=/keep/a.bin"
        first = b""
    frame = http_chunk if chunked else (lambda data: data)
    async with raw_connection(server) as (_, writer):
        writer.write(request_head("PUT" if kind.startswith("raw") else "POST", target, headers))
        writer.write(frame(first + payload(MiB, 0)))
        for i in range(1, 8):
            writer.write(frame(payload(MiB, i)))
            await writer.drain()
        await wait_for_temp_file(server)
    # The connection is closed with the body unfinished.
    await assert_unchanged(server, before, settle=0.3)
    rows = await fetch(server, "SELECT sha256 FROM files WHERE path = '/keep/a.bin'")
    assert [r["sha256"] for r in rows] == [sha(b"keep me")]


async def test_client_error_in_streamed_body_leaves_nothing(client: httpx.AsyncClient, server: Server,
                                                            user: User) -> None:
    before = await snapshot(server)

    async def failing() -> AsyncIterator[bytes]:
        for i in range(6):
            yield payload(MiB, i)
        raise RuntimeError("the client gave up")

    with pytest.raises(RuntimeError, match="gave up"):
        await client.post("/files", headers=user.auth, params={"name": "gave-up.bin"}, content=failing())
    await assert_unchanged(server, before, settle=0.3)


@pytest.mark.parametrize("failure", ["declared-too-large", "grows-too-large", "truncated-multipart",
                                     "disconnect", "bad-name"])
async def test_failed_replace_keeps_the_previous_content(client: httpx.AsyncClient, server: Server,
                                                         user: User, failure: str) -> None:
    original = payload(200 * KiB, 7)
    created = await client.put("/files", headers=user.auth, params={"path": "/keep/doc.bin"},
                               content=original)
    assert created.status_code == 201
    before = await snapshot(server)
    auth = {"Authorization": f"Bearer {user.token}"}
    if failure == "declared-too-large":
        async with raw_connection(server) as (reader, writer):
            writer.write(request_head("PUT", "/files?path=/keep/doc.bin",
                                      {**auth, "Content-Length": str(TEST_MAX_UPLOAD + 1)}))
            assert_problem(await read_response(reader), 413)
    elif failure == "grows-too-large":
        async with raw_connection(server) as (reader, writer):
            writer.write(request_head("PUT", "/files?path=/keep/doc.bin",
                                      {**auth, "Transfer-Encoding": "chunked"}))
            await send_past_limit(writer, chunked=True)
            assert_problem(await read_response(reader), 413)
    elif failure == "truncated-multipart":
        body = multipart([("path", None, b"/keep/doc.bin"), ("file", "doc.bin", payload(300 * KiB, 8))])
        response = await client.post("/files", headers=form(user),
                                     content=body[: -len(f"--{BOUNDARY}--\r\n") - 2])
        assert_problem(response, 400)
    elif failure == "disconnect":
        async with raw_connection(server) as (_, writer):
            writer.write(request_head("PUT", "/files?path=/keep/doc.bin",
                                      {**auth, "Content-Length": str(16 * MiB)}))
            for i in range(4):
                writer.write(payload(MiB, i))
                await writer.drain()
            await wait_for_temp_file(server)
    else:
        body = multipart([("path", None, b"/keep/"), ("file", "..", payload(300 * KiB, 8))])
        response = await client.post("/files", headers=form(user), content=body)
        assert_problem(response, 422)
    await assert_unchanged(server, before, settle=0.3 if failure == "disconnect" else 0.0)
    shown = (await client.get(f"/files/{created.json()['id']}", headers=user.auth)).json()
    assert shown["sha256"] == sha(original)
    assert await blob_of(server, shown["id"]) == original


async def test_a_content_length_of_other_digits_is_400_not_500(database_url: str, tmp_path: Path) -> None:
    # "²".isdigit() is true, and int("²") raises. uvicorn and Granian refuse such a Content-Length
    # themselves; an ASGI server need not, and the app is driven here as one that passes it on
    # would (its lifespan run, its real database), the header's bytes as they came (latin-1).
    data_dir = tmp_path / "data"
    app = create_app(make_settings(data_dir), database_url)
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with app.router.lifespan_context(app), httpx.AsyncClient(transport=transport, base_url="http://m") as http:
        user = await make_user(http)
        for method, target, content_type in [("PUT", "/files?path=/a.bin", "application/octet-stream"),
                                             ("POST", "/files?name=a.bin", "application/octet-stream"),
                                             ("POST", "/files", MULTIPART_TYPE)]:
            for length in (b"\xb2", b"1\xb9", b"\xb3\xb3"):  # ², 1¹, ³³
                headers = [(b"authorization", f"Bearer {user.token}".encode()),
                           (b"content-type", content_type.encode()), (b"content-length", length)]
                response = await http.request(method, target, headers=headers, content=b"12")
                problem = assert_problem(response, 400)
                assert problem["detail"] == "Content-Length is not a number", (method, target, length)
        assert (await http.get("/files", headers=user.auth)).json()["files"] == []
    assert list((data_dir / "tmp").iterdir()) == []


async def test_uploads_need_a_token_and_leave_nothing_without_one(
        client: httpx.AsyncClient, server: Server) -> None:
    before = await snapshot(server)
    for headers in ({}, {"Authorization": "Bearer not-a-token"}):
        for response in (
            await client.post("/files", params={"name": "a.txt"}, headers=headers, content=b"x"),
            await client.post("/files", headers=headers, files={"file": ("a.txt", b"x")}),
            await client.put("/files", params={"path": "/a.txt"}, headers=headers, content=b"x"),
        ):
            assert_problem(response, 401)
            assert response.headers["www-authenticate"].startswith("Bearer")
    await assert_unchanged(server, before)


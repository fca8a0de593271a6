"""Hostile input: file names built to escape the data dir, break headers or fool a reader,
through every way a name arrives; and request bodies built to confuse or exhaust the multipart
parser and the HTTP framing. Nothing may land outside our own blob paths, nothing may be left behind
by a refused upload, and a stored name goes back out only inside a safe Content-Disposition."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import re
import unicodedata
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

import httpx
import pytest
from conftest import (
    CHUNK_SIZES,
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
    serve_in_thread,
)

from mediad.formdata import Envelope, LimitExceeded, ParseFailedException
from mediad.uploads import MAX_PART_HEADER_BYTES, MAX_PARTS

BOUNDARY = "hostile-boundary-5e1d"
MULTIPART_TYPE = f"multipart/form-data; boundary={BOUNDARY}"
TUS = {"Tus-Resumable": "1.0.0"}
DATA = b"hostile \x00\r\n bytes"

# ---- names --------------------------------------------------------------------------------------

# id: (name as sent, the stored name or the status refusing it) for the channels that take a bare
# name: the last component after any / or \, in NFC; empty, ., .., NUL or controls are 422 (API.md).
NAMES: dict[str, tuple[str, str | int]] = {
    "dot-dot-slash": ("../../etc/passwd", "passwd"),
    "absolute": ("/etc/passwd", "passwd"),
    "drive": ("C:\\x", "x"),
    "unc": ("\\\\server\\share\\x", "x"),
    "nul": ("a\x00b.txt", 422),
    "crlf": ("a\r\nb.txt", 422),
    # U+202E is a format character (Cf), not a control one (Cc): kept as sent, like ZWJ in emoji;
    # the extension is the real one and the ASCII fallback drops it.
    "rtl-override": ("evil\u202etxt.exe", "evil\u202etxt.exe"),
    "5000-chars": ("a" * 4996 + ".txt", 422),
    "CON": ("CON", "CON"),  # Windows' reserved names mean nothing here: metadata only
    "nul.txt": ("nul.txt", "nul.txt"),
    "COM1": ("COM1", "COM1"),
    "LPT9.wav": ("LPT9.wav", "LPT9.wav"),
    "nfd": ("e\u0301t\u0301e\u0301.txt", "\u00e9t\u0301\u00e9.txt"),
    "nfc": ("\u00e9t\u00e9.txt", "\u00e9t\u00e9.txt"),
    "emoji": ("🎬 👨\u200d👩\u200d👧 🎉.mp4", "🎬 👨\u200d👩\u200d👧 🎉.mp4"),
    "dot": (".", 422),
    "dot-dot": ("..", 422),
    "empty": ("", 422),
}

# Where the name is the last segment of a path (`?path=/in/<name>`), path rules apply first:
# absolute, `//` collapsed, no backslash, no . or .. segment, no control characters.
PATH_OUTCOMES: dict[str, str | int] = {
    "dot-dot-slash": 422, "absolute": "passwd", "drive": 422, "unc": 422, "empty": 422,
}


def whatwg_quoted(name: str) -> str:
    """A multipart filename as browsers send it (WHATWG): " CR LF percent-escaped, all else raw."""
    return name.replace('"', "%22").replace("\r", "%0D").replace("\n", "%0A")


def part(disposition: str, content: bytes) -> bytes:
    return f"--{BOUNDARY}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + content + b"\r\n"


def closing() -> bytes:
    return f"--{BOUNDARY}--\r\n".encode()


async def send_named(http: httpx.AsyncClient, user: User, channel: str, name: str) -> httpx.Response:
    """Upload DATA named `name` through one of the ways a name reaches mediad."""
    auth = user.auth
    if channel == "query":
        return await http.post("/files", headers=auth, params={"name": name}, content=DATA)
    if channel == "put-folder":
        return await http.put("/files", headers=auth, params={"path": "/in/", "name": name}, content=DATA)
    if channel == "disposition":
        header = f"attachment; filename*=UTF-8''{quote(name, safe='')}"
        return await http.post("/files", headers={**auth, "content-disposition": header}, content=DATA)
    if channel == "multipart":
        body = part(f'form-data; name="file"; filename="{whatwg_quoted(name)}"', DATA) + closing()
        return await http.post("/files", headers={**auth, "content-type": MULTIPART_TYPE}, content=body)
    if channel == "multipart-star":
        body = part(f"form-data; name=\"file\"; filename*=UTF-8''{quote(name, safe='')}", DATA) + closing()
        return await http.post("/files", headers={**auth, "content-type": MULTIPART_TYPE}, content=body)
    if channel == "path":
        return await http.put("/files", headers=auth, params={"path": "/in/" + name}, content=DATA)
    assert channel == "tus"
    metadata = f"filename {base64.b64encode(name.encode()).decode()}".strip()  # a key alone is empty
    response = await http.post("/uploads", content=DATA, headers={
        **auth, **TUS, "Upload-Length": str(len(DATA)), "Upload-Metadata": metadata,
        "Content-Type": "application/offset+octet-stream"})
    if response.status_code != 201:
        return response
    # The File the completing chunk made, as the other channels answer it.
    return await http.get(f"/files/{response.headers['mediad-file-id']}", headers=auth)


def expected(channel: str, case: str) -> str | int:
    sent, outcome = NAMES[case]
    if channel == "path":
        return PATH_OUTCOMES.get(case, outcome)
    if channel == "multipart" and case == "crlf":
        return "a%0D%0Ab.txt"  # what a browser sends: a literal %0D%0A cannot be told apart
    if channel == "tus" and case == "empty":
        return 400  # tus: a filename is required (an empty one is none), else 400
    return outcome


_FALLBACK = re.compile(r"[A-Za-z0-9 !#$&'()+,.=@\[\]^_`{}~-]+")
_DISPOSITION = re.compile(r"""attachment; filename="([^"]*)"; filename\*=UTF-8''([A-Za-z0-9!#$&+\-.^_`|~%]+)""")


def assert_safe_disposition(header: str, name: str) -> None:
    """An ASCII fallback with no quote, backslash, slash, CR/LF or control character that is not
    a dot name, and the exact name in RFC 8187 `filename*` (RFC 6266 §4.3)."""
    assert header.isascii() and "\r" not in header and "\n" not in header, header
    match = _DISPOSITION.fullmatch(header)
    assert match, header
    fallback, encoded = match.groups()
    assert _FALLBACK.fullmatch(fallback) and fallback.strip(" .") and "\u202e" not in fallback, header
    assert unquote(encoded, errors="strict") == name


def tree(root: Path, skip: Path | None = None) -> set[Path]:
    """Every path under `root` (but not under `skip`)."""
    found = set()
    for directory, subdirs, files in os.walk(root):
        if skip is not None and Path(directory) == skip:
            subdirs.clear()
            continue
        found.update(Path(directory) / f for f in files + subdirs)
    return found


_BLOB = re.compile(r"files/([0-9a-f]{2})/([0-9a-f]{2})/\1\2[0-9a-f]{28}")
_DATA_DIR_FILES = {"node-id", "serve.lock", "cleanup.lock", "link-secret.key"}


def assert_only_our_own_files(server: Server) -> None:
    """Inside the data dir, nothing but blobs at their id-derived paths and the server's own files."""
    for path in tree(server.data_dir):
        if path.is_dir():
            continue
        relative = path.relative_to(server.data_dir).as_posix()
        assert relative in _DATA_DIR_FILES or _BLOB.fullmatch(relative), relative


CHANNELS = ["query", "put-folder", "disposition", "multipart", "multipart-star", "path", "tus"]


@pytest.fixture(scope="module")
def nested_server(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A server whose data dir sits two levels down in a directory of its own, so that whatever a
    `../..` could reach is watched, and nothing else (another server, a database) writes there."""
    root = tmp_path_factory.mktemp("hostile-root")
    with serve_in_thread(make_settings(root / "outer" / "data"), database_url) as running:
        yield running


@pytest.mark.parametrize("channel", CHANNELS)
async def test_hostile_names_are_metadata_or_refused(nested_server: Server, channel: str) -> None:
    server = nested_server
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        await _names_are_metadata_or_refused(client, server, await make_user(client), channel)


async def _names_are_metadata_or_refused(client: httpx.AsyncClient, server: Server, user: User,
                                         channel: str) -> None:
    around = server.data_dir.parent.parent
    outside_before = tree(around, skip=server.data_dir)
    blobs_before = len(server.blob_files())  # the module's server keeps the other channels' files
    passwd_before = os.stat("/etc/passwd")
    stored = []
    for case, (sent, _) in NAMES.items():
        outcome = expected(channel, case)
        response = await send_named(client, user, channel, sent)
        if isinstance(outcome, int):
            assert_problem(response, outcome)
            continue
        path = {"put-folder": f"/in/{outcome}",
                "path": re.sub("/+", "/", unicodedata.normalize("NFC", f"/in/{sent}"))}.get(channel)
        # 201 for a new file; 200 for one that replaces an earlier case's at the same path, and
        # for tus, whose File is read back with a GET.
        replaces = path is not None and path in {f["path"] for f in stored}
        assert response.status_code == (200 if replaces or channel == "tus" else 201), (
            case, response.status_code, response.text)
        file = response.json()
        assert file["name"] == outcome == unicodedata.normalize("NFC", outcome), case
        assert file["path"] == path
        stored.append(file)

    assert stored, "some names must be stored"
    for file in stored:
        download = await client.get(f"/files/{file['id']}/content", headers=user.auth)
        assert download.status_code == 200 and download.content == DATA
        assert_safe_disposition(download.headers["content-disposition"], file["name"])
        if file["path"]:
            by_path = await client.get("/download", params={"path": file["path"]}, headers=user.auth)
            assert by_path.content == DATA
    # Refused names left nothing; stored ones are files of this user and nothing else.
    listing = (await client.get("/files", headers=user.auth)).json()["files"]
    # Same-path uploads replace each other (NFD and NFC names are one path): count by id.
    assert {f["id"] for f in listing} == {f["id"] for f in stored} and len(listing) == len({f["id"] for f in stored})
    assert len(server.blob_files()) == blobs_before + len({f["id"] for f in stored})
    await eventually(lambda: not server.stray_temp_files() and not server.partial_files())
    assert server.stray_temp_files() == [] and server.partial_files() == []
    assert_only_our_own_files(server)
    assert tree(around, skip=server.data_dir) == outside_before
    assert os.stat("/etc/passwd").st_mtime_ns == passwd_before.st_mtime_ns


async def test_nfd_and_nfc_names_are_one_name(client: httpx.AsyncClient, user: User) -> None:
    nfd = await client.put("/files", headers=user.auth, params={"path": "/n/e\u0301.txt"}, content=b"1")
    nfc = await client.put("/files", headers=user.auth, params={"path": "/n/\u00e9.txt"}, content=b"2")
    assert (nfd.status_code, nfc.status_code) == (201, 200)  # the second replaced the first
    assert nfd.json()["id"] == nfc.json()["id"] and nfc.json()["name"] == "\u00e9.txt"


async def test_windows_paths_in_multipart_filenames_keep_the_last_component(
        client: httpx.AsyncClient, user: User) -> None:
    # Browsers send backslashes raw (WHATWG); RFC 2616-style encoders (httpx, curl) escape them as
    # \\. Either way only the name after the last separator is kept.
    for sent, kept in (('C:\\Users\\me\\photo.jpg', "photo.jpg"), ('C:\\\\Users\\\\me\\\\photo.jpg', "photo.jpg"),
                       ('\\\\server\\share\\x', "x"), ('say \\"cheese\\".txt', 'say "cheese".txt')):
        body = part(f'form-data; name="file"; filename="{sent}"', b"x") + closing()
        response = await client.post("/files", headers={**user.auth, "content-type": MULTIPART_TYPE}, content=body)
        assert response.status_code == 201, (sent, response.text)
        assert response.json()["name"] == kept


# ---- bodies -------------------------------------------------------------------------------------

async def listing(http: httpx.AsyncClient, user: User) -> list[dict[str, Any]]:
    files: list[dict[str, Any]] = (await http.get("/files", headers=user.auth)).json()["files"]
    return files


async def assert_nothing_left(http: httpx.AsyncClient, server: Server, user: User,
                              before: list[dict[str, Any]], blobs: list[Path]) -> None:
    """No temp or partial file, no row, no blob: and the server still answers."""
    assert await eventually(lambda: not server.stray_temp_files()), server.stray_temp_files()
    assert server.partial_files() == []
    assert server.blob_files() == blobs
    assert await listing(http, user) == before
    health = await http.get("/health")
    assert health.status_code == 200


async def _pieces(data: bytes, size: int) -> Any:
    for start in range(0, len(data), size):
        yield data[start:start + size]


def many_fields(count: int) -> bytes:
    fields = b"".join(part(f'form-data; name="f{i}"', b"v") for i in range(count))
    return fields + part('form-data; name="file"; filename="a.bin"', b"abc") + closing()


def big_header(size: int) -> bytes:
    padding = "x" * size
    return (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.bin\"\r\n"
            f"X-Padding: {padding}\r\n\r\nabc\r\n").encode() + closing()


BAD_BODIES: dict[str, tuple[str, bytes, str]] = {  # case: (Content-Type, body, words the detail has)
    "no-boundary": ("multipart/form-data", part('form-data; name="file"; filename="a.bin"', b"abc") + closing(),
                    "boundary"),
    "unterminated": (MULTIPART_TYPE, part('form-data; name="file"; filename="a.bin"', b"abc" * 1000),
                     "closing boundary"),
    "two-file-parts": (MULTIPART_TYPE, part('form-data; name="file"; filename="a.bin"', b"a")
                       + part('form-data; name="file"; filename="b.bin"', b"b") + closing(), "more than one"),
    "10000-fields": (MULTIPART_TYPE, many_fields(10_000), f"more than {MAX_PARTS} parts"),
    "1-MiB-part-header": (MULTIPART_TYPE, big_header(1 << 20), f"longer than {MAX_PART_HEADER_BYTES} bytes"),
    "1-MiB-filename": (MULTIPART_TYPE, part(f'form-data; name="file"; filename="{"n" * (1 << 20)}"', b"x")
                       + closing(), "headers are longer"),
    "many-header-lines": (MULTIPART_TYPE, f"--{BOUNDARY}\r\n".encode() + b"A: b\r\n" * 100_000 + b"\r\n"
                          + closing(), "headers are longer"),
    "1-MiB-preamble": (MULTIPART_TYPE, b"\r\n" * (1 << 19) + part('form-data; name="file"; filename="a"', b"x")
                       + closing(), "no boundary in its first"),
}


@pytest.mark.parametrize("case", BAD_BODIES)
async def test_hostile_multipart_bodies_are_4xx_and_leave_nothing(
        client: httpx.AsyncClient, server: Server, user: User, case: str) -> None:
    before, blobs = await listing(client, user), server.blob_files()
    content_type, body, words = BAD_BODIES[case]
    for streamed in (False, True):  # in one piece, and as a chunked body in odd pieces
        content: Any = body if not streamed else _pieces(body, 7777)
        response = await client.post("/files", headers={**user.auth, "content-type": content_type},
                                     content=content)
        problem = assert_problem(response, 400)
        assert words in problem["detail"].lower(), problem
        await assert_nothing_left(client, server, user, before, blobs)


async def test_parts_and_headers_under_the_caps_are_accepted(client: httpx.AsyncClient, user: User) -> None:
    # Control for the caps: as many parts as allowed, and long headers that fit, upload fine.
    response = await client.post("/files", headers={**user.auth, "content-type": MULTIPART_TYPE},
                                 content=many_fields(MAX_PARTS - 1))
    assert response.status_code == 201, response.text
    long_name = "é" * 1000 + ".txt"  # under the name limit, 6 KiB percent-encoded
    body = part(f"form-data; name=\"file\"; filename=\"{long_name}\"; filename*=UTF-8''{quote(long_name)}",
                b"x") + closing()
    response = await client.post("/files", headers={**user.auth, "content-type": MULTIPART_TYPE}, content=body)
    assert response.status_code == 201, response.text
    assert response.json()["name"] == long_name


# Content that looks like the boundary without being a delimiter (RFC 2046 §5.1.1: CRLF, "--",
# the boundary, then CRLF or "--"): no CRLF before it, or only LF, a CR alone, a shorter boundary.
NEAR_MISSES = (f"x--{BOUNDARY}--\r\n\n--{BOUNDARY}--\r--{BOUNDARY}\r\n\r\n-{BOUNDARY}--\r\n"
               f"--{BOUNDARY[:-1]}-x\r\n--{BOUNDARY[:-1]}\r\n").encode()

# The delimiter inside a part: refused, whatever follows it. streaming-form-data took these for
# content, or, depending on where the reads ended, for the close delimiter: "then-a-dash" read 5,
# 21 or 55 bytes at a time was stored as its first 7, 12 or 22 bytes, with a 201.
INSIDE_A_PART = {
    "then-a-dash": f"abc\r\n--{BOUNDARY}-".encode() + b"abcd-" * 20,
    "then-text": f"abc\r\n--{BOUNDARY}x and more".encode(),
    "then-a-space": f"abc\r\n--{BOUNDARY} \r\nand more".encode(),
    "first-in-the-content": f"--{BOUNDARY}--and more".encode(),
}


def test_envelope_reads_the_same_framing_whatever_the_chunks() -> None:
    body = (f"--{BOUNDARY}\r\n\r\n\r\n".encode()  # a part without headers
            + part('form-data; name="path"', b"/in/")
            + part('form-data; name="file"; filename="C:\\x.bin"', NEAR_MISSES)
            + closing() + b"epilogue \r\n--" + BOUNDARY.encode() + b"\r\n")
    close_ends = body.index(closing() + b"epilogue") + len(closing()) - 2  # its CRLF begins the epilogue
    for size in (1, 2, 3, 5, 7, 31, len(body)):
        envelope = Envelope(BOUNDARY.encode(), max_parts=3, max_header_bytes=200)
        taken = [envelope.feed(body[start:start + size]) for start in range(0, len(body), size)]
        assert sum(taken) == close_ends, size  # the parser is handed the body up to there, no more
        assert (envelope.parts, envelope.closed) == (3, True), size
        assert envelope.dispositions == ['form-data; name="path"', 'form-data; name="file"; filename="C:\\x.bin"']
    with pytest.raises(LimitExceeded, match="more than 2 parts"):
        Envelope(BOUNDARY.encode(), max_parts=2, max_header_bytes=200).feed(body)
    with pytest.raises(LimitExceeded, match="longer than 50 bytes"):
        Envelope(BOUNDARY.encode(), max_parts=3, max_header_bytes=50).feed(body)
    in_headers = f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"\r\n--{BOUNDARY}\r\n\r\nx".encode()
    for case, body in [*INSIDE_A_PART.items(), ("in-the-headers", in_headers)]:
        if case != "in-the-headers":
            body = part('form-data; name="file"; filename="a.bin"', body) + closing()
        for size in (1, 2, 3, 5, 7, len(body)):
            envelope = Envelope(BOUNDARY.encode(), max_parts=3, max_header_bytes=200)
            with pytest.raises(ParseFailedException, match="boundary"):
                for start in range(0, len(body), size):
                    envelope.feed(body[start:start + size])
            assert not envelope.closed, (case, size)


async def test_content_like_the_boundary_is_kept_whatever_the_chunks(
        client: httpx.AsyncClient, server: Server, user: User) -> None:
    # Control for the refusals below: near misses of a delimiter are content, stored whole.
    for size in CHUNK_SIZES:
        body = (part('form-data; name="path"', b"/near/") + part(f'form-data; name="file"; filename="{size}.bin"',
                                                                  NEAR_MISSES) + closing())
        response = await post_in_pieces(server, user, body, size, MULTIPART_TYPE)
        assert response.status_code == 201, (size, response.text)
        stored = await client.get("/download", headers=user.auth, params={"path": f"/near/{size}.bin"})
        assert stored.content == NEAR_MISSES, size


@pytest.mark.parametrize("case", INSIDE_A_PART)
async def test_the_boundary_inside_a_part_is_400_whatever_the_chunks(
        client: httpx.AsyncClient, server: Server, user: User, case: str) -> None:
    # RFC 2046 §5.1.1: the boundary must not occur inside a part.
    before, blobs = await listing(client, user), server.blob_files()
    body = (part('form-data; name="path"', b"/inside/")
            + part('form-data; name="file"; filename="a.bin"', INSIDE_A_PART[case]) + closing())
    for size in CHUNK_SIZES:
        problem = assert_problem(await post_in_pieces(server, user, body, size, MULTIPART_TYPE), 400)
        # Mostly the boundary's own refusal; one or two bytes at a time, the parser may fail first.
        assert problem["detail"].startswith("malformed multipart/form-data: "), (size, problem)
        await assert_nothing_left(client, server, user, before, blobs)


async def _answer_or_nothing(reader: asyncio.StreamReader) -> httpx.Response | None:
    """The response, if the server sent one before closing; a cut-off request may get none."""
    with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError, TimeoutError):
        return await read_response(reader)
    return None


def _multipart_head(user: User, **headers: str) -> bytes:
    return request_head("POST", "/files", {"Authorization": f"Bearer {user.token}", "Content-Type": MULTIPART_TYPE,
                                           **headers})


FILE_PART = part('form-data; name="file"; filename="cut.bin"', os.urandom(300_000)) + closing()


@pytest.mark.parametrize("ending", ["half-close", "close"])
@pytest.mark.parametrize("kind", ["multipart", "raw"])
async def test_body_shorter_than_its_content_length_leaves_nothing(
        client: httpx.AsyncClient, server: Server, user: User, kind: str, ending: str) -> None:
    before, blobs = await listing(client, user), server.blob_files()
    auth = {"Authorization": f"Bearer {user.token}"}
    head = (_multipart_head(user, **{"Content-Length": str(len(FILE_PART) + 1000)}) if kind == "multipart" else
            request_head("PUT", "/files?path=/cut/short.bin", {**auth, "Content-Length": str(len(FILE_PART) + 1000)}))
    async with raw_connection(server) as (reader, writer):
        writer.write(head + FILE_PART)  # 1000 bytes fewer than declared
        await writer.drain()
        if ending == "half-close":
            writer.write_eof()
            answer = await _answer_or_nothing(reader)
            if answer is not None:
                assert 400 <= answer.status_code < 500
                assert_problem(answer, answer.status_code)
    await assert_nothing_left(client, server, user, before, blobs)


@pytest.mark.parametrize("at_once", [False, True])
async def test_multipart_body_longer_than_its_content_length_is_400(
        client: httpx.AsyncClient, server: Server, user: User, at_once: bool) -> None:
    # The server reads exactly Content-Length bytes (RFC 9112 §6.3): the multipart body is cut
    # before its close delimiter. The surplus is no request; the server refuses it or hangs up.
    before, blobs = await listing(client, user), server.blob_files()
    declared = len(FILE_PART) - 1000
    async with raw_connection(server) as (reader, writer):
        writer.write(_multipart_head(user, **{"Content-Length": str(declared)}) + FILE_PART[:declared])
        if at_once:  # the surplus arrives with the body: uvicorn may drop the connection unanswered
            writer.write(FILE_PART[declared:])
            answer = await _answer_or_nothing(reader)
            assert answer is None or 400 <= answer.status_code < 500
        else:
            assert_problem(await read_response(reader), 400)
            writer.write(FILE_PART[declared:])
            rest = await _answer_or_nothing(reader)
            assert rest is None or 400 <= rest.status_code < 500
    await assert_nothing_left(client, server, user, before, blobs)


@pytest.mark.parametrize("at_once", [False, True])
async def test_raw_body_longer_than_its_content_length_stores_only_the_declared_bytes(
        client: httpx.AsyncClient, server: Server, user: User, at_once: bool) -> None:
    # Content-Length says where the body ends; what follows is the next request, here garbage
    # that must become nothing. Sent at once, uvicorn may hang up on the garbage before it answers
    # the upload (whose body was complete, so it may still be stored, with the declared bytes).
    declared = 100_000
    async with raw_connection(server) as (reader, writer):
        writer.write(request_head("PUT", "/files?path=/long/x.bin", {
            "Authorization": f"Bearer {user.token}", "Content-Length": str(declared)}) + FILE_PART[:declared])
        if at_once:
            writer.write(FILE_PART[declared:])
        else:
            first = await read_response(reader)
            assert first.status_code == 201 and first.json()["size"] == declared, first.text
            writer.write(FILE_PART[declared:])
        rest = await _answer_or_nothing(reader)
        assert rest is None or 400 <= rest.status_code < 500 or at_once and rest.status_code == 201
    assert await eventually(lambda: not server.stray_temp_files())
    files = await listing(client, user)
    assert [f["path"] for f in files] == ([] if at_once and not files else ["/long/x.bin"])
    if files:
        stored = await client.get("/download", params={"path": "/long/x.bin"}, headers=user.auth)
        assert stored.content == FILE_PART[:declared]


@pytest.mark.parametrize("kind", ["multipart", "raw"])
async def test_chunked_body_cut_off_mid_chunk_leaves_nothing(
        client: httpx.AsyncClient, server: Server, user: User, kind: str) -> None:
    before, blobs = await listing(client, user), server.blob_files()
    chunked = {"Transfer-Encoding": "chunked"}
    head = (_multipart_head(user, **chunked) if kind == "multipart" else request_head(
        "PUT", "/files?path=/cut/chunked.bin", {"Authorization": f"Bearer {user.token}", **chunked}))
    async with raw_connection(server) as (_, writer):
        writer.write(head + http_chunk(FILE_PART[:100_000]))
        writer.write(b"%x\r\n" % 100_000 + FILE_PART[100_000:150_000])  # half a chunk, then nothing
        await writer.drain()
        await asyncio.sleep(0.1)
    await assert_nothing_left(client, server, user, before, blobs)

"""Downloads over HTTP, on uvicorn and on Granian: bytes and validators, owner checks, safe names
(RFC 6266/8187), ranges (RFC 9110 §14), conditionals (§13) and content replaced mid-download."""

from __future__ import annotations

import asyncio
import email.utils
import hashlib
import random
import re
import time
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import unquote

import httpx
import pytest
from conftest import Server, User, assert_problem, make_user, upload

KiB, MiB = 1024, 1024 * 1024
SIZE = 10_000  # the range tests' file
ROUTES = ["content", "download-id", "download-path"]


# ---- helpers ------------------------------------------------------------------------------------

def payload(size: int, seed: int = 0) -> bytes:
    return random.Random(f"{size}/{seed}").randbytes(size)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def target(route: str, file: dict[str, Any]) -> tuple[str, dict[str, str]]:
    """URL and query of one of the three download routes for this File."""
    if route == "content":
        return f"/files/{file['id']}/content", {}
    if route == "download-id":
        return "/download", {"id": file["id"]}
    assert file["path"], "download-path needs a File with a path"
    return "/download", {"path": file["path"]}


async def get(http: httpx.AsyncClient, user: User, file: dict[str, Any], method: str = "GET",
              **headers: str) -> httpx.Response:
    wanted = {k.replace("_", "-"): v for k, v in headers.items()}
    return await http.request(method, f"/files/{file['id']}/content", headers={**user.auth, **wanted})


def http_date(moment: datetime) -> str:
    return email.utils.format_datetime(moment, usegmt=True)


def assert_full(response: httpx.Response, data: bytes) -> None:
    assert response.status_code == 200, (response.status_code, response.headers, response.text[:200])
    assert "content-range" not in response.headers
    assert response.headers["content-length"] == str(len(data))
    assert response.content == data


def assert_single_range(response: httpx.Response, data: bytes, start: int, end: int) -> None:
    """206 carrying exactly data[start:end] (half-open)."""
    assert response.status_code == 206, (response.status_code, response.headers, response.text[:200])
    assert response.headers["content-range"] == f"bytes {start}-{end - 1}/{len(data)}"
    assert response.headers["content-length"] == str(end - start)
    assert response.content == data[start:end]


def assert_unsatisfiable(response: httpx.Response, size: int) -> None:
    assert_problem(response, 416)
    assert response.headers["content-range"] == f"bytes */{size}"


def byteranges(response: httpx.Response) -> list[tuple[dict[str, str], bytes]]:
    """The parts of a multipart/byteranges body (RFC 9110 §14.6, RFC 2046 §5.1.1), parsed here."""
    content_type = response.headers["content-type"]
    match = re.fullmatch(r'multipart/byteranges; ?boundary="?([^";]+)"?', content_type)
    assert match, content_type
    body = response.content
    assert response.headers["content-length"] == str(len(body))
    boundary = match.group(1).encode("ascii")
    delimiter = b"\r\n--" + boundary
    assert body.startswith(b"--" + boundary + b"\r\n"), body[:100]
    closing = body.rindex(delimiter + b"--")
    assert body[closing + len(delimiter) + 2:] in (b"", b"\r\n")
    parts = []
    for piece in (b"\r\n" + body[:closing]).split(delimiter)[1:]:
        assert piece.startswith(b"\r\n")
        head, separator, data = piece[2:].partition(b"\r\n\r\n")
        assert separator, piece[:200]
        fields = dict(line.split(":", 1) for line in head.decode("ascii").split("\r\n"))
        parts.append(({k.strip().lower(): v.strip() for k, v in fields.items()}, data))
    return parts


def served_spans(response: httpx.Response, data: bytes, content_type: str) -> list[tuple[int, int]]:
    """The half-open spans a 206 (single or multipart) carries, each checked against `data`."""
    assert response.status_code == 206
    if response.headers["content-type"].startswith("multipart/byteranges"):
        parts = byteranges(response)
    else:
        parts = [({"content-range": response.headers["content-range"],
                   "content-type": response.headers["content-type"]}, response.content)]
    spans = []
    for fields, body in parts:
        assert fields["content-type"] == content_type
        match = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+)", fields["content-range"])
        assert match, fields["content-range"]
        first, last, size = map(int, match.groups())
        assert size == len(data) and first <= last < size
        assert body == data[first:last + 1]
        spans.append((first, last + 1))
    return spans


def covered(spans: list[tuple[int, int]]) -> set[int]:
    positions: set[int] = set()
    for start, end in spans:
        span = set(range(start, end))
        assert not positions & span, "a byte was sent twice"
        positions |= span
    return positions


# ---- bytes and validators -----------------------------------------------------------------------

@pytest.mark.parametrize("route", ROUTES)
async def test_get_and_head_serve_the_bytes_with_validators(any_client: httpx.AsyncClient,
                                                             route: str) -> None:
    user = await make_user(any_client)
    data = b"hello, downloads\n" * 500
    file = await upload(any_client, user, data, path="/docs/a.txt")
    url, params = target(route, file)
    response = await any_client.get(url, params=params, headers=user.auth)
    assert_full(response, data)
    headers = response.headers
    assert headers["etag"] == f'"{sha(data)}"'
    modified = email.utils.parsedate_to_datetime(headers["last-modified"])
    assert modified == datetime.fromisoformat(file["updated_at"].replace("Z", "+00:00"))
    assert headers["accept-ranges"] == "bytes"
    assert headers["content-type"] == file["format"] == "text/plain"
    assert headers["content-disposition"] == "attachment; filename=\"a.txt\"; filename*=UTF-8''a.txt"

    head = await any_client.head(url, params=params, headers=user.auth)
    assert head.status_code == 200
    assert head.content == b""
    for name in ("etag", "last-modified", "accept-ranges", "content-type", "content-length",
                 "content-disposition"):
        assert head.headers[name] == headers[name], name


async def test_binary_content_is_served_as_detected(any_client: httpx.AsyncClient) -> None:
    user = await make_user(any_client)
    png = bytes.fromhex("89504e470d0a1a0a0000000d49484452") + payload(3000)
    file = await upload(any_client, user, png, name="picture.dat")
    response = await get(any_client, user, file)
    assert_full(response, png)
    assert response.headers["content-type"] == file["format"] == "image/png"


async def test_head_ignores_range(any_client: httpx.AsyncClient) -> None:
    # RFC 9110 §14.2: range handling is defined for GET only; other methods ignore Range.
    user = await make_user(any_client)
    file = await upload(any_client, user, payload(SIZE))
    for header in ("bytes=0-9", f"bytes={SIZE}-"):
        head = await get(any_client, user, file, "HEAD", range=header)
        assert head.status_code == 200, (header, head.status_code)
        assert head.headers["content-length"] == str(SIZE)
        assert "content-range" not in head.headers
        assert head.content == b""


async def test_download_needs_exactly_one_existing_file_path_or_id(any_client: httpx.AsyncClient) -> None:
    user = await make_user(any_client)
    file = await upload(any_client, user, b"x", path="/docs/a.txt")
    for params in ({}, {"id": file["id"], "path": file["path"]}, {"path": "/docs/"},
                   {"path": "docs/a.txt"}, {"path": "/docs/../a.txt"}):
        assert_problem(await any_client.get("/download", params=params, headers=user.auth), 422)
    for params in ({"path": "/docs/b.txt"}, {"path": "/docs"}, {"path": "/DOCS/a.txt"}):
        assert_problem(await any_client.get("/download", params=params, headers=user.auth), 404)
    ok = await any_client.get("/download", params={"path": "//docs//a.txt"}, headers=user.auth)
    assert_full(ok, b"x")  # paths are normalised as at upload


# ---- owners and tokens --------------------------------------------------------------------------

async def test_another_users_file_is_indistinguishable_from_a_missing_one(
        any_client: httpx.AsyncClient) -> None:
    owner, intruder = await make_user(any_client), await make_user(any_client)
    file = await upload(any_client, owner, b"secret", path="/private/s.txt")
    missing = {**file, "id": "0b6f4c1e-7d1a-4f3e-9a55-2a1f3e0c9d11", "path": "/private/none.txt"}
    for route in ROUTES:
        url, params = target(route, file)
        theirs = await any_client.get(url, params=params, headers=intruder.auth)
        body = assert_problem(theirs, 404)
        url, params = target(route, missing)
        assert assert_problem(await any_client.get(url, params=params, headers=intruder.auth), 404) == body
        url, params = target(route, file)
        head = await any_client.head(url, params=params, headers=intruder.auth)
        assert head.status_code == 404 and head.content == b""
    for bad in ("not-a-uuid", "0b6f4c1e", file["id"] + "0"):
        assert_problem(await any_client.get(f"/files/{bad}/content", headers=owner.auth), 404)
        assert_problem(await any_client.get("/download", params={"id": bad}, headers=owner.auth), 404)
    assert (await get(any_client, owner, file)).content == b"secret"


AUTH_HEADERS = [{}, {"Authorization": "Bearer not-a-real-token"}, {"Authorization": "Basic dTpw"},
                {"Authorization": "Bearer " + "x" * 300}, {"Authorization": "bearer"}]


async def test_downloads_need_a_valid_bearer_token(any_client: httpx.AsyncClient) -> None:
    user = await make_user(any_client)
    file = await upload(any_client, user, b"mine", path="/t/a.txt")
    requests = [target(route, file) for route in ROUTES] + [
        # Even a request that names no file answers 401 first, as every route under /files does.
        ("/files/not-a-uuid/content", {}), ("/download", {"id": "nope"}), ("/download", {}),
        ("/download", {"path": "/t/"}),
    ]
    for headers in AUTH_HEADERS:
        for url, params in requests:
            response = await any_client.get(url, params=params, headers=headers)
            assert_problem(response, 401)
            assert response.headers["www-authenticate"].startswith("Bearer"), (url, params, headers)
            assert b"mine" not in response.content


# ---- names --------------------------------------------------------------------------------------

AWKWARD_NAMES = [
    'say "cheese".txt',
    'a;b=c; filename="evil.exe".txt',
    "100% done %22 %0D%0A %.txt",
    "it's (1) [final] {v2} & more+~`^|#$!.txt",
    "Отчёт за май.mp4",
    "会议记录 2026年.pdf",
    "🎬 final cut 🎉.mov",
    "line\u2028separator\u00a0nbsp.txt",
    " .leading and trailing. ",
    "a" * 296 + ".txt",
    "é漢😀 " * 73 + "long.txt",  # 300 characters, several UTF-8 lengths
]
_DISPOSITION = re.compile(r"""(attachment|inline); filename="((?:[^"\\]|\\[\x20-\x7e])*)"; """
                          r"""filename\*=UTF-8''([A-Za-z0-9!#$&+\-.^_`|~%]+)""")


def disposition_name(header: str, kind: str) -> str:
    """The name a Content-Disposition header carries, after checking it is safe and well formed."""
    assert header.isascii() and "\r" not in header and "\n" not in header, header
    match = _DISPOSITION.fullmatch(header)
    assert match, header
    assert match.group(1) == kind
    fallback, encoded = match.group(2), match.group(3)
    assert fallback.strip() and all(0x20 <= ord(c) < 0x7f for c in fallback)
    assert re.fullmatch(r"(?:[^%]|%[0-9A-Fa-f]{2})*", encoded), encoded
    return unquote(encoded, errors="strict")


@pytest.mark.parametrize("name", AWKWARD_NAMES, ids=lambda n: repr(n[:20]))
async def test_awkward_names_reach_content_disposition_exactly(any_client: httpx.AsyncClient,
                                                               name: str) -> None:
    assert len(name) <= 300
    user = await make_user(any_client)
    file = await upload(any_client, user, b"named", name=name)
    assert file["name"] == name
    response = await get(any_client, user, file)
    assert response.content == b"named"
    assert disposition_name(response.headers["content-disposition"], "attachment") == name
    for url, params in (target("content", file), target("download-id", file)):
        inline = await any_client.get(url, params={**params, "inline": "1"}, headers=user.auth)
        assert disposition_name(inline.headers["content-disposition"], "inline") == name


async def test_control_characters_cannot_reach_a_header(any_client: httpx.AsyncClient) -> None:
    user = await make_user(any_client)
    for name in ("evil\r\nSet-Cookie: a=b.txt", "nul\x00.txt", "nel\x85.txt", "tab\t.txt"):
        response = await any_client.post("/files", headers=user.auth, params={"name": name}, content=b"x")
        assert_problem(response, 422)
        response = await any_client.put("/files", headers=user.auth, params={"path": "/in/" + name},
                                        content=b"x")
        assert_problem(response, 422)
    listing = await any_client.get("/files", headers=user.auth)
    assert listing.json()["files"] == []


# ---- ranges -------------------------------------------------------------------------------------

SINGLE_RANGES = [
    ("bytes=0-0", 0, 1),
    ("bytes=0-99", 0, 100),
    ("bytes=9990-", 9990, SIZE),
    ("bytes=-10", SIZE - 10, SIZE),
    ("bytes=-20000", 0, SIZE),
    ("bytes=5000-99999", 5000, SIZE),
    ("bytes=0-", 0, SIZE),
    ("bytes=9999-9999", 9999, SIZE),
    ("Bytes = 10-19", 10, 20),  # the unit is case-insensitive (RFC 9110 §14.1)
    ("bytes=20000-, 0-4", 0, 5),  # the unsatisfiable range is dropped, not the request
    ("bytes=-0,100-109", 100, 110),
]
UNSATISFIABLE = ["bytes=10000-", "bytes=20000-30000", "bytes=10000-10005,20000-", "bytes=-0"]
MALFORMED = ["bytes=abc", "bytes=5-2", "bytes=", "items=0-5", "bytes=--1", "bytes=0-5,abc",
             "bytes 0-5", "bytes=1-2-3", "bytes=+1-5", "bytes=0x10-20", "bytes=-", "bytes=,"]


async def test_ranges(any_client: httpx.AsyncClient) -> None:
    user = await make_user(any_client)
    data = payload(SIZE)
    file = await upload(any_client, user, data)
    for header, start, end in SINGLE_RANGES:
        response = await get(any_client, user, file, range=header)
        assert_single_range(response, data, start, end)
        assert response.headers["etag"] == f'"{sha(data)}"'
        assert response.headers["content-type"] == file["format"]
        assert response.headers["accept-ranges"] == "bytes"
    for header in UNSATISFIABLE:
        assert_unsatisfiable(await get(any_client, user, file, range=header), SIZE)
    for header in MALFORMED:
        assert_full(await get(any_client, user, file, range=header), data)


@pytest.mark.parametrize("route", ROUTES)
async def test_overlong_range_numbers_are_ignored(any_client: httpx.AsyncClient, route: str) -> None:
    """A position of more than 19 digits (past any file; int() refuses 4,300 and more) makes the
    header malformed: ignored with a 200 (RFC 9110 §14.2), by the app and by the cached fast path."""
    user = await make_user(any_client)
    data = payload(SIZE, 3)
    file = await upload(any_client, user, data, path="/r/huge.bin")
    url, params = target(route, file)
    overlong = ["bytes=0-" + "9" * 5000, "bytes=" + "1" * 5000 + "-", "bytes=-" + "9" * 5000,
                "bytes=0-0," + "1" * 5000 + "-5", "bytes=0-" + "9" * 20]
    for header in overlong:
        for _ in range(3):  # the first answer fills the lookup cache; the next come from it
            response = await any_client.get(url, params=params, headers={**user.auth, "Range": header})
            assert_full(response, data)
    # Nineteen digits are still a position: the range runs to the end of the file.
    response = await any_client.get(url, params=params, headers={**user.auth, "Range": "bytes=100-" + "9" * 19})
    assert_single_range(response, data, 100, SIZE)


@pytest.mark.parametrize("route", ROUTES)
async def test_ranges_on_every_route(any_client: httpx.AsyncClient, route: str) -> None:
    user = await make_user(any_client)
    data = payload(SIZE, 1)
    file = await upload(any_client, user, data, path="/r/data.bin")
    url, params = target(route, file)
    response = await any_client.get(url, params=params, headers={**user.auth, "Range": "bytes=100-199"})
    assert_single_range(response, data, 100, 200)


async def test_several_ranges_are_multipart_byteranges(any_client: httpx.AsyncClient) -> None:
    user = await make_user(any_client)
    data = payload(SIZE)
    file = await upload(any_client, user, data)
    response = await get(any_client, user, file, range="bytes=0-9,5000-5009,9990-9999")
    assert served_spans(response, data, file["format"]) == [(0, 10), (5000, 5010), (9990, 10000)]
    assert len(byteranges(response)) == 3
    # Out of order, with a suffix and an unsatisfiable one among them.
    response = await get(any_client, user, file, range="bytes=-5, 20000-, 3000-3003")
    assert sorted(served_spans(response, data, file["format"])) == [(3000, 3004), (SIZE - 5, SIZE)]


async def test_overlapping_ranges_never_send_a_byte_twice(any_client: httpx.AsyncClient) -> None:
    user = await make_user(any_client)
    data = payload(SIZE)
    file = await upload(any_client, user, data)
    for header, wanted in (("bytes=0-499,100-599", set(range(600))),
                           ("bytes=100-199,0-1000,-9000", set(range(SIZE))),
                           ("bytes=0-9,10-19,20-29", set(range(30))),
                           ("bytes=5000-5999,5500-", set(range(5000, SIZE)))):
        response = await get(any_client, user, file, range=header)
        assert covered(served_spans(response, data, file["format"])) == wanted, header


def _many(specs: list[str]) -> str:
    return "bytes=" + ",".join(specs)


async def test_many_ranges_are_not_amplified(any_client: httpx.AsyncClient) -> None:
    user = await make_user(any_client)
    data = payload(SIZE)
    file = await upload(any_client, user, data)
    # Ranges are merged when they overlap or lie closer than a part header (128 bytes); more than
    # 16 after merging are answered with the whole body (RFC 9110 §14.2's advice).
    cases = [
        (_many(["0-9999"] * 200), (0, SIZE)),
        (_many(["-10000"] * 200), (0, SIZE)),
        (_many(["0-"] * 200), (0, SIZE)),
        (_many([f"{i}-{i}" for i in range(0, 400, 2)]), (0, 399)),
        (_many([f"{i}-{i}" for i in range(0, SIZE, 50)]), (0, SIZE - 49)),
        (_many([f"{i}-{i + 9}" for i in range(0, SIZE, 500)]), None),  # 20 spans: the whole body
        (_many([f"{i}-{SIZE - 1}" for i in range(200)]), (0, SIZE)),
    ]
    for header, span in cases:
        response = await get(any_client, user, file, range=header)
        if span is None:
            assert response.status_code == 200 and response.content == data, header[:40]
        else:
            assert covered(served_spans(response, data, file["format"])) == set(range(*span)), header[:40]
            assert len(response.content) <= SIZE + 4 * KiB


async def test_empty_and_one_byte_files(any_client: httpx.AsyncClient) -> None:
    user = await make_user(any_client)
    empty = await upload(any_client, user, b"", name="empty.bin")
    response = await get(any_client, user, empty)
    assert_full(response, b"")
    assert response.headers["etag"] == f'"{sha(b"")}"'
    head = await get(any_client, user, empty, "HEAD")
    assert head.status_code == 200 and head.headers["content-length"] == "0"
    assert_unsatisfiable(await get(any_client, user, empty, range="bytes=0-0"), 0)
    assert_unsatisfiable(await get(any_client, user, empty, range="bytes=0-"), 0)
    # A suffix of an empty representation is the empty representation: Range ignored, 200
    # (RFC 9110 §14.1.3 allows this or a 416; mediad serves it).
    assert_full(await get(any_client, user, empty, range="bytes=-5"), b"")

    one = await upload(any_client, user, b"Z", name="one.bin")
    assert_single_range(await get(any_client, user, one, range="bytes=0-0"), b"Z", 0, 1)
    assert_single_range(await get(any_client, user, one, range="bytes=-1"), b"Z", 0, 1)
    assert_single_range(await get(any_client, user, one, range="bytes=0-100"), b"Z", 0, 1)
    assert_unsatisfiable(await get(any_client, user, one, range="bytes=1-"), 1)


# ---- conditionals -------------------------------------------------------------------------------

async def test_conditional_requests(any_client: httpx.AsyncClient) -> None:
    user = await make_user(any_client)
    data = payload(SIZE)
    file = await upload(any_client, user, data)
    plain = await get(any_client, user, file)
    etag, modified = plain.headers["etag"], plain.headers["last-modified"]
    assert etag == f'"{file["sha256"]}"'
    when = email.utils.parsedate_to_datetime(modified)
    earlier, later = http_date(when - timedelta(hours=1)), http_date(when + timedelta(hours=1))
    weak = "W/" + etag

    not_modified = [
        {"if-none-match": etag},
        {"if-none-match": weak},  # weak comparison (RFC 9110 §13.1.2)
        {"if-none-match": f'"other", {etag}'},
        {"if-none-match": "*"},
        {"if-modified-since": modified},
        {"if-modified-since": later},
        {"if-none-match": etag, "if-modified-since": earlier},  # INM wins over IMS
        {"if-match": etag, "if-none-match": etag},
        {"if-none-match": etag, "range": "bytes=0-9"},  # 304 before ranges
        {"if-none-match": etag, "range": f"bytes={SIZE}-"},
    ]
    for headers in not_modified:
        for method in ("GET", "HEAD"):
            response = await get(any_client, user, file, method, **headers)
            assert response.status_code == 304, (headers, method, response.status_code)
            assert response.content == b""
            assert response.headers["etag"] == etag and response.headers["last-modified"] == modified

    full = [
        {"if-none-match": '"other"'},
        {"if-none-match": f'W/"{"0" * 64}"'},
        {"if-modified-since": earlier},
        {"if-none-match": '"other"', "if-modified-since": later},  # IMS ignored when INM is present
        {"if-modified-since": "not a date"},
        {"if-match": etag},
        {"if-match": f'"other", {etag}'},
        {"if-match": "*"},
        {"if-unmodified-since": modified},
        {"if-unmodified-since": later},
        {"if-match": etag, "if-unmodified-since": earlier},  # IUS ignored when If-Match is present
        {"if-unmodified-since": "garbage"},
    ]
    for headers in full:
        assert_full(await get(any_client, user, file, **headers), data)

    failed = [
        {"if-match": '"other"'},
        {"if-match": weak},  # strong comparison (RFC 9110 §13.1.1)
        {"if-match": f'"{file["sha256"][:-1]}"'},
        {"if-unmodified-since": earlier},
        {"if-match": '"other"', "if-none-match": etag},  # If-Match is evaluated first
        {"if-match": '"other"', "range": f"bytes={SIZE}-"},  # 412 before 416
    ]
    for headers in failed:
        assert_problem(await get(any_client, user, file, **headers), 412)


async def test_if_range(any_client: httpx.AsyncClient) -> None:
    user = await make_user(any_client)
    data = payload(SIZE)
    file = await upload(any_client, user, data)
    plain = await get(any_client, user, file)
    etag, modified = plain.headers["etag"], plain.headers["last-modified"]
    earlier = http_date(email.utils.parsedate_to_datetime(modified) - timedelta(hours=1))
    later = http_date(email.utils.parsedate_to_datetime(modified) + timedelta(hours=1))

    assert_single_range(await get(any_client, user, file, range="bytes=0-9", if_range=etag), data, 0, 10)
    assert_single_range(await get(any_client, user, file, range="bytes=0-9", if_range=modified), data, 0, 10)
    for stale in ('"stale"', "W/" + etag, earlier, later, "garbage"):
        assert_full(await get(any_client, user, file, range="bytes=0-9", if_range=stale), data)
    # A matching validator lets the Range through, unsatisfiable or not; a stale one ignores it.
    assert_unsatisfiable(await get(any_client, user, file, range=f"bytes={SIZE}-", if_range=etag), SIZE)
    assert_full(await get(any_client, user, file, range=f"bytes={SIZE}-", if_range='"stale"'), data)


async def test_if_range_date_is_not_trusted_after_a_replace(any_client: httpx.AsyncClient) -> None:
    """Two versions may share a Last-Modified second, so after a replace a date is no longer a strong
    validator (RFC 9110 §8.8.2.2) and If-Range with it must not splice the new bytes (§13.1.5)."""
    user = await make_user(any_client)
    old, new = payload(SIZE, 1), payload(SIZE, 2)
    file = await upload(any_client, user, old, path="/v/data.bin")
    modified = (await get(any_client, user, file)).headers["last-modified"]
    await upload(any_client, user, new, path="/v/data.bin", replaces=True)
    response = await get(any_client, user, file, range="bytes=5000-", if_range=modified)
    assert_full(response, new)


async def _take_over_within_a_second(http: httpx.AsyncClient, user: User, takeover: str, old: bytes,
                                     new: bytes) -> tuple[str, dict[str, Any], str]:
    """A File of `old` at a path, half of it downloaded by path, then another File of `new` at
    that path (by `takeover`), all within one second so both share a Last-Modified (it has
    one-second resolution). → (the path, the File now there, the shared Last-Modified)."""
    for attempt in range(5):
        if time.time() % 1 > 0.3:  # start early in a second: all of it takes milliseconds
            await asyncio.sleep(1 - time.time() % 1)
        path = f"/{takeover}/{attempt}/a.bin"
        a = await upload(http, user, old, path=path)
        other = await upload(http, user, new, path=f"/{takeover}/{attempt}/b.bin") \
            if takeover == "move-replace" else None
        first = await http.get("/download", params={"path": path}, headers={**user.auth, "Range": "bytes=0-4999"})
        assert_single_range(first, old, 0, 5000)
        if other is not None:
            moved = await http.patch(f"/files/{other['id']}", headers=user.auth, json={"path": path, "replace": True})
            assert moved.status_code == 200, moved.text
            now = moved.json()
        else:
            assert (await http.delete(f"/files/{a['id']}", headers=user.auth)).status_code == 204
            now = await upload(http, user, new, path=path)
        modified = first.headers["last-modified"]
        if (await get(http, user, now, "HEAD")).headers["last-modified"] == modified:
            return path, now, modified
    raise AssertionError("could not upload, download and take over a path within one second")


@pytest.mark.parametrize("takeover", ["move-replace", "delete-upload"])
async def test_a_date_validates_nothing_at_a_path_another_file_took_over(any_client: httpx.AsyncClient,
                                                                         takeover: str) -> None:
    """/download?path= names whatever File holds the path. Another File can take it over with the
    same Last-Modified, so there If-Range with a date must not splice its bytes onto the first
    file's (RFC 9110 §13.1.5); the ETag is the content's and still validates."""
    user = await make_user(any_client)
    old, new = payload(SIZE, 1), payload(SIZE, 2)
    path, now, modified = await _take_over_within_a_second(any_client, user, takeover, old, new)
    params = {"path": path}
    for _ in range(2):  # from the database, then from the lookup cache
        resumed = await any_client.get("/download", params=params,
                                       headers={**user.auth, "Range": "bytes=5000-", "If-Range": modified})
        assert_full(resumed, new)
    etag = f'"{now["sha256"]}"'
    resumed = await any_client.get("/download", params=params,
                                   headers={**user.auth, "Range": "bytes=5000-", "If-Range": etag})
    assert_single_range(resumed, new, 5000, SIZE)
    cached = await any_client.get("/download", params=params, headers={**user.auth, "If-None-Match": etag})
    assert cached.status_code == 304
    # By id, the File is what it always was: its date still validates there.
    by_id = await any_client.get(f"/files/{now['id']}/content",
                                 headers={**user.auth, "Range": "bytes=5000-", "If-Range": modified})
    assert_single_range(by_id, new, 5000, SIZE)


async def test_resumed_download_and_if_range_after_replace(any_client: httpx.AsyncClient) -> None:
    user = await make_user(any_client)
    data = payload(5 * MiB)
    file = await upload(any_client, user, data, path="/big/movie.bin")
    cut = 3 * MiB
    first = await get(any_client, user, file, range=f"bytes=0-{cut - 1}")
    assert_single_range(first, data, 0, cut)
    etag = first.headers["etag"]
    rest = await get(any_client, user, file, range=f"bytes={cut}-", if_range=etag)
    assert_single_range(rest, data, cut, len(data))
    assert sha(first.content + rest.content) == file["sha256"]

    new = payload(5 * MiB, 1)
    replaced = await upload(any_client, user, new, path="/big/movie.bin", replaces=True)
    assert replaced["id"] == file["id"] and replaced["sha256"] != file["sha256"]
    again = await get(any_client, user, file, range=f"bytes={cut}-", if_range=etag)
    assert_full(again, new)
    assert again.headers["etag"] == f'"{replaced["sha256"]}"'


async def test_replacing_during_a_download_never_mixes_versions(any_client: httpx.AsyncClient,
                                                                 any_server: Server) -> None:
    user = await make_user(any_client)
    old, new = payload(20 * MiB, 1), payload(20 * MiB, 2)
    file = await upload(any_client, user, old, path="/live/stream.bin")
    async with any_client.stream("GET", f"/files/{file['id']}/content", headers=user.auth) as response:
        assert response.status_code == 200
        assert response.headers["etag"] == f'"{sha(old)}"'
        chunks = response.aiter_raw()
        head = await chunks.__anext__()
        await upload(any_client, user, new, path="/live/stream.bin", replaces=True)
        body = head + b"".join([chunk async for chunk in chunks])
    assert len(body) == len(old) and len(head) < len(body)
    if any_server.process is None:  # uvicorn in this process: the open file keeps the old bytes
        assert sha(body) == sha(old)
    else:
        assert sha(body) in (sha(old), sha(new))
    assert_full(await get(any_client, user, file), new)

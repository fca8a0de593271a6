"""A full disk: 507 and nothing left behind; a reserve refused up front, before any body byte."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from conftest import assert_problem, make_user

from .conftest import Acked, CloudProcess, MiB, Node, NodeFactory, acked, assert_invariants, query, wait_drained

TUS = {"Tus-Resumable": "1.0.0"}


def _used(node: Node) -> int:
    stat = os.statvfs(node.data_dir)
    return (stat.f_blocks - stat.f_bfree) * stat.f_frsize


async def _nothing_left(node: Node, database_url: str, rows: int) -> None:
    assert list((node.data_dir / "tmp").iterdir()) == []
    assert (await query(database_url, "SELECT count(*) AS n FROM files"))[0]["n"] == rows


async def test_disk_full_on_a_64_mib_tmpfs(nodes: NodeFactory, fault_database: str, cloud: CloudProcess,
                                           small_disk: Path, started: float) -> None:
    """Raw, multipart and tus uploads that do not fit: 507 problem+json, the temp file gone, the disk
    as before; the next small upload succeeds."""
    node = nodes("a", fault_database, cloud=cloud, data_dir=small_disk / "data",
                 MEDIAD_MAX_UPLOAD_BYTES=str(256 * MiB))
    done: list[Acked] = []
    async with node.client(timeout=60) as http:
        user = await make_user(http)
        first = os.urandom(24 * MiB)
        done.append(acked(await http.post("/files?name=first.bin", content=first, headers=user.auth),
                          first, user.auth))
        used = _used(node)
        big = os.urandom(48 * MiB)

        raw = await http.post("/files?name=big.bin", content=big, headers=user.auth)
        assert "disk is full" in assert_problem(raw, 507)["detail"]
        await _nothing_left(node, fault_database, 1)

        multipart = await http.post("/files", files={"file": ("big.bin", big)}, headers=user.auth)
        assert "disk is full" in assert_problem(multipart, 507)["detail"]
        await _nothing_left(node, fault_database, 1)

        meta = "filename " + base64.b64encode(b"big.bin").decode()
        created = await http.post("/uploads", headers={**user.auth, **TUS, "Upload-Length": str(len(big)),
                                                       "Upload-Metadata": meta})
        assert created.status_code == 201
        location = created.headers["location"]
        patch = await http.patch(location, content=big, headers={
            **user.auth, **TUS, "Upload-Offset": "0", "Content-Type": "application/offset+octet-stream"})
        assert "disk is full" in assert_problem(patch, 507)["detail"]
        assert patch.headers["tus-resumable"] == "1.0.0"
        head = await http.head(location, headers={**user.auth, **TUS})
        assert head.headers["upload-offset"] == "0"  # the chunk was discarded, not half kept
        assert (await http.delete(location, headers={**user.auth, **TUS})).status_code == 204
        await _nothing_left(node, fault_database, 1)
        assert _used(node) <= used + MiB, "the failed uploads' bytes are all freed"

        small = os.urandom(MiB)
        done.append(acked(await http.post("/files?name=small.bin", content=small, headers=user.auth),
                          small, user.auth))
    await wait_drained(fault_database)
    await assert_invariants(fault_database, [node], started=started, acked=done, cloud=cloud)


async def _headers_only(node: Node, method: str, target: str, headers: dict[str, str]) -> httpx.Response:
    """Send a request's head and not one byte of its body; → the answer, which must come anyway."""
    parts = urlsplit(node.url)
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    try:
        head = f"{method} {target} HTTP/1.1\r\nHost: {parts.netloc}\r\n"
        head += "".join(f"{name}: {value}\r\n" for name, value in headers.items()) + "\r\n"
        writer.write(head.encode())
        await writer.drain()
        status_line, _, rest = (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)).partition(b"\r\n")
        answer = dict(line.split(": ", 1) for line in rest.decode().strip().split("\r\n"))
        answer = {name.lower(): value for name, value in answer.items()}
        body = await asyncio.wait_for(reader.readexactly(int(answer["content-length"])), 5)
        return httpx.Response(int(status_line.split()[1]), headers=answer, content=body)
    finally:
        writer.close()


async def test_min_free_bytes_refuses_before_the_body_is_read(nodes: NodeFactory, fault_database: str,
                                                              cloud: CloudProcess, tmp_path: Path,
                                                              started: float) -> None:
    """MEDIAD_MIN_FREE_BYTES: an upload whose declared length would eat into the reserve is refused
    with 507 as soon as its head arrives (no body byte is sent here); a small one still fits."""
    free = shutil.disk_usage(tmp_path).free
    if free < 2048 * MiB:
        pytest.skip("needs 2 GiB of free disk to set a reserve below it")
    node = nodes("a", fault_database, cloud=cloud, MEDIAD_MAX_UPLOAD_BYTES=str(1024 * MiB),
                 MEDIAD_MIN_FREE_BYTES=str(free - 256 * MiB))
    declared = str(512 * MiB)
    async with node.client() as http:
        user = await make_user(http)
    auth = user.auth
    answers = {
        "raw POST": await _headers_only(node, "POST", "/files?name=big.bin", {
            **auth, "Content-Type": "application/octet-stream", "Content-Length": declared}),
        "PUT": await _headers_only(node, "PUT", "/files?path=/big.bin", {**auth, "Content-Length": declared}),
        "multipart": await _headers_only(node, "POST", "/files", {
            **auth, "Content-Type": "multipart/form-data; boundary=x", "Content-Length": declared}),
        "tus": await _headers_only(node, "POST", "/uploads", {
            **auth, **TUS, "Upload-Length": declared, "Content-Length": "0",
            "Upload-Metadata": "filename " + base64.b64encode(b"big.bin").decode()}),
    }
    for kind, answer in answers.items():
        body = assert_problem(answer, 507)
        assert "reserve" in body["detail"], (kind, json.dumps(body))
    await _nothing_left(node, fault_database, 0)
    assert (await query(fault_database, "SELECT count(*) AS n FROM uploads"))[0]["n"] == 0

    async with node.client() as http:
        small = os.urandom(MiB)
        done = [acked(await http.post("/files?name=small.bin", content=small, headers=auth), small, auth)]
    await wait_drained(fault_database)
    await assert_invariants(fault_database, [node], started=started, acked=done, cloud=cloud)

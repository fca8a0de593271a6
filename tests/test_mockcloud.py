"""The mock cloud end to end: the real app under uvicorn on loopback, driven with httpx."""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import asgi_in_thread

from mediad.mockcloud import Faults, add_cli, create_mock_cloud

TOKEN = "test-cloud-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@dataclass
class Cloud:
    url: str
    data_dir: Path
    http: httpx.AsyncClient

    async def faults(self, **settings: Any) -> dict[str, Any]:
        response = await self.http.post("/admin/faults", json=settings, headers=AUTH)
        assert response.status_code == 200, response.text
        answer: dict[str, Any] = response.json()
        return answer

    async def stats(self) -> dict[str, Any]:
        response = await self.http.get("/admin/stats", headers=AUTH)
        assert response.status_code == 200, response.text
        answer: dict[str, Any] = response.json()
        return answer

    def temp_files(self) -> list[Path]:
        return sorted((self.data_dir / "tmp").iterdir())


@pytest.fixture
async def cloud(tmp_path: Path) -> AsyncIterator[Cloud]:
    data_dir = tmp_path / "cloud"
    with asgi_in_thread(create_mock_cloud(data_dir, TOKEN, Faults(seed=1))) as url:
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:
            yield Cloud(url, data_dir, http)


def assert_problem(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, (response.status_code, response.text)
    assert response.headers["content-type"].startswith("application/problem+json")
    body: dict[str, Any] = response.json()
    assert body["status"] == status and body["title"] and body["detail"] and body["type"]
    return body


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def test_round_trip_empty_small_and_large(cloud: Cloud) -> None:
    for key, data in [("empty", b""), ("small.txt", b"hello cloud"), ("big.bin", os.urandom(20 << 20))]:
        put = await cloud.http.put(f"/objects/{key}", content=data, headers=AUTH)
        assert put.status_code == 201, put.text
        assert put.json() == {"key": key, "size": len(data), "sha256": sha(data)}
        got = await cloud.http.get(f"/objects/{key}", headers=AUTH)
        assert got.status_code == 200
        assert got.content == data
        assert got.headers["etag"] == f'"{sha(data)}"'
        assert got.headers["x-content-sha256"] == sha(data)
        assert got.headers["accept-ranges"] == "bytes"
        assert got.headers["content-type"] == "application/octet-stream"
        head = await cloud.http.head(f"/objects/{key}", headers=AUTH)
        assert head.status_code == 200 and head.content == b""
        assert head.headers["content-length"] == str(len(data))
        assert head.headers["etag"] == f'"{sha(data)}"'
    assert (await cloud.stats())["objects"] == 3


async def test_streamed_put_from_async_generator(cloud: Cloud) -> None:
    pieces = [os.urandom(65536 + i) for i in range(40)]

    async def body() -> AsyncIterator[bytes]:
        for piece in pieces:
            yield piece
            await asyncio.sleep(0)

    put = await cloud.http.put("/objects/streamed", content=body(), headers=AUTH)
    assert put.status_code == 201, put.text
    whole = b"".join(pieces)
    assert put.json()["sha256"] == sha(whole) and put.json()["size"] == len(whole)
    assert (await cloud.http.get("/objects/streamed", headers=AUTH)).content == whole


async def test_keys_with_slashes_are_stored_under_their_hash(cloud: Cloud) -> None:
    key = "users/42/видео/clip one.mp4"
    put = await cloud.http.put(f"/objects/{key}", content=b"frames", headers=AUTH)
    assert put.status_code == 201 and put.json()["key"] == key
    assert (await cloud.http.get(f"/objects/{key}", headers=AUTH)).content == b"frames"
    assert not (cloud.data_dir / "users").exists()
    assert not list(cloud.data_dir.rglob("clip one.mp4"))


async def test_bearer_token_is_required(cloud: Cloud) -> None:
    await cloud.http.put("/objects/k", content=b"x", headers=AUTH)
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"}):
        for method, path in [("PUT", "/objects/k"), ("GET", "/objects/k"), ("DELETE", "/objects/k"),
                             ("POST", "/admin/faults"), ("GET", "/admin/stats")]:
            response = await cloud.http.request(method, path, content=b"y", headers=headers)
            assert_problem(response, 401)
            assert response.headers["www-authenticate"].startswith("Bearer")
    assert (await cloud.http.get("/objects/k", headers=AUTH)).content == b"x"
    health = await cloud.http.get("/health")
    assert health.status_code == 200 and health.json() == {"status": "ok"}


async def test_absent_object_is_404(cloud: Cloud) -> None:
    assert_problem(await cloud.http.get("/objects/nope", headers=AUTH), 404)
    head = await cloud.http.head("/objects/nope", headers=AUTH)
    assert head.status_code == 404


async def test_ranges(cloud: Cloud) -> None:
    data = bytes(range(256)) * 40  # 10240 bytes
    await cloud.http.put("/objects/r", content=data, headers=AUTH)
    size = len(data)
    for header, start, end in [("bytes=0-9", 0, 10), ("bytes=100-", 100, size),
                               ("bytes=-5", size - 5, size), ("bytes=10000-99999", 10000, size)]:
        response = await cloud.http.get("/objects/r", headers={**AUTH, "Range": header})
        assert response.status_code == 206, header
        assert response.content == data[start:end]
        assert response.headers["content-range"] == f"bytes {start}-{end - 1}/{len(data)}"
        assert response.headers["content-length"] == str(end - start)
    head = await cloud.http.head("/objects/r", headers={**AUTH, "Range": "bytes=0-9"})
    assert head.status_code == 206 and head.headers["content-length"] == "10"
    # Several ranges: the whole body; a malformed header is ignored (RFC 9110 §14.2).
    for header in ("bytes=0-0,5000-5001", "bytes=9-1", "lines=1-2"):
        response = await cloud.http.get("/objects/r", headers={**AUTH, "Range": header})
        assert response.status_code == 200 and response.content == data, header
    unsatisfiable = await cloud.http.get("/objects/r", headers={**AUTH, "Range": "bytes=20000-"})
    assert_problem(unsatisfiable, 416)
    assert unsatisfiable.headers["content-range"] == f"bytes */{len(data)}"


async def test_delete_is_idempotent(cloud: Cloud) -> None:
    await cloud.http.put("/objects/d", content=b"bye", headers=AUTH)
    for _ in range(2):
        assert (await cloud.http.delete("/objects/d", headers=AUTH)).status_code == 204
        assert (await cloud.http.get("/objects/d", headers=AUTH)).status_code == 404
    assert (await cloud.http.delete("/objects/never-was", headers=AUTH)).status_code == 204
    stats = await cloud.stats()
    assert stats["deletes"] == 3 and stats["objects"] == 0
    assert not [p for p in (cloud.data_dir / "files").rglob("*") if p.is_file()]


async def test_replacing_an_object_keeps_one_copy(cloud: Cloud) -> None:
    for content in (b"first", b"second version"):
        assert (await cloud.http.put("/objects/v", content=content, headers=AUTH)).status_code == 201
    assert (await cloud.http.get("/objects/v", headers=AUTH)).content == b"second version"
    assert len([p for p in (cloud.data_dir / "files").rglob("*") if p.is_file()]) == 1


async def test_objects_survive_a_restart(tmp_path: Path) -> None:
    data_dir, data = tmp_path / "cloud", os.urandom(300_000)
    with asgi_in_thread(create_mock_cloud(data_dir, TOKEN, Faults())) as url:
        async with httpx.AsyncClient(base_url=url) as http:
            assert (await http.put("/objects/keep/me", content=data, headers=AUTH)).status_code == 201
    with asgi_in_thread(create_mock_cloud(data_dir, TOKEN, Faults())) as url:
        async with httpx.AsyncClient(base_url=url) as http:
            got = await http.get("/objects/keep/me", headers=AUTH)
            assert got.content == data and got.headers["etag"] == f'"{sha(data)}"'
            stats = (await http.get("/admin/stats", headers=AUTH)).json()
            assert stats["objects"] == 1 and stats["puts"] == 0


async def test_checksum_mismatch_stores_nothing(cloud: Cloud) -> None:
    bad = await cloud.http.put("/objects/c", content=b"payload",
                               headers={**AUTH, "x-content-sha256": sha(b"other")})
    assert_problem(bad, 400)
    assert (await cloud.http.get("/objects/c", headers=AUTH)).status_code == 404
    assert cloud.temp_files() == []
    good = await cloud.http.put("/objects/c", content=b"payload",
                                headers={**AUTH, "x-content-sha256": sha(b"payload").upper()})
    assert good.status_code == 201


async def test_aborted_put_stores_nothing(cloud: Cloud) -> None:
    sent = asyncio.Event()

    async def body() -> AsyncIterator[bytes]:
        for _ in range(8):
            yield os.urandom(256 * 1024)
        sent.set()
        await asyncio.sleep(0.2)  # let the server write some of it
        raise RuntimeError("client gives up")

    with pytest.raises(RuntimeError):
        await cloud.http.put("/objects/aborted", content=body(), headers=AUTH)
    assert sent.is_set()
    for _ in range(250):  # the server notices the disconnect on its own schedule
        if not cloud.temp_files():
            break
        await asyncio.sleep(0.02)
    assert cloud.temp_files() == []
    assert (await cloud.http.get("/objects/aborted", headers=AUTH)).status_code == 404
    assert (await cloud.stats())["put_keys"] == {"aborted": 1}


async def test_fail_rate(cloud: Cloud) -> None:
    settings = await cloud.faults(fail_rate=1)
    assert settings["fail_rate"] == 1 and settings["delay_s"] == 0
    failed = await cloud.http.put("/objects/f", content=b"x", headers=AUTH)
    assert_problem(failed, 503)
    assert failed.headers["retry-after"] == "1"
    assert_problem(await cloud.http.get("/objects/f", headers=AUTH), 503)
    assert (await cloud.http.get("/health")).status_code == 200  # only /objects misbehaves
    await cloud.faults(fail_rate=0.5, seed=7)
    statuses = [(await cloud.http.put(f"/objects/f{i}", content=b"x", headers=AUTH)).status_code
                for i in range(60)]
    assert 10 < statuses.count(503) < 50 and statuses.count(201) == 60 - statuses.count(503)
    await cloud.faults(fail_rate=0)
    assert (await cloud.http.put("/objects/f", content=b"x", headers=AUTH)).status_code == 201


async def test_cut_rate_answers_a_wrong_digest_and_stores_nothing(cloud: Cloud) -> None:
    await cloud.faults(cut_rate=1)
    put = await cloud.http.put("/objects/cut", content=b"precious", headers=AUTH)
    assert put.status_code == 201
    assert put.json()["size"] == 8 and put.json()["sha256"] != sha(b"precious")
    assert (await cloud.http.get("/objects/cut", headers=AUTH)).status_code == 404
    assert cloud.temp_files() == []
    stats = await cloud.stats()
    assert stats["put_keys"] == {"cut": 1} and stats["stored_keys"] == {}


async def test_truncate_rate_cuts_the_body_short(cloud: Cloud) -> None:
    data = os.urandom(1 << 20)
    await cloud.http.put("/objects/t", content=data, headers=AUTH)
    await cloud.faults(truncate_rate=1)
    received = bytearray()
    with pytest.raises(httpx.RemoteProtocolError):
        async with cloud.http.stream("GET", "/objects/t", headers=AUTH) as response:
            assert response.status_code == 200
            assert response.headers["content-length"] == str(len(data))
            async for chunk in response.aiter_raw():
                received += chunk
    assert 0 < len(received) < len(data) and data.startswith(bytes(received))
    head = await cloud.http.head("/objects/t", headers=AUTH)  # HEAD has no body to cut
    assert head.status_code == 200
    await cloud.faults(truncate_rate=0)
    assert (await cloud.http.get("/objects/t", headers=AUTH)).content == data


async def test_delay(cloud: Cloud) -> None:
    await cloud.faults(delay_s=0.3)
    started = time.monotonic()
    assert (await cloud.http.get("/objects/none", headers=AUTH)).status_code == 404
    assert time.monotonic() - started >= 0.3
    started = time.monotonic()
    await cloud.http.get("/health")
    assert time.monotonic() - started < 0.3


async def test_admin_faults_validation(cloud: Cloud) -> None:
    for body in ({"fail_rate": 1.5}, {"delay_s": -1}, {"cut_rate": "half"}, {"bogus": 1},
                 {"truncate_rate": True}, [1]):
        assert_problem(await cloud.http.post("/admin/faults", json=body, headers=AUTH), 422)
    assert_problem(await cloud.http.post("/admin/faults", content=b"{", headers=AUTH), 400)
    assert (await cloud.faults())["fail_rate"] == 0  # nothing was half-applied


async def test_stats_count_puts_per_key_and_reset(cloud: Cloud) -> None:
    for key in ("a", "b", "a"):
        await cloud.http.put(f"/objects/{key}", content=key.encode(), headers=AUTH)
    await cloud.http.get("/objects/a", headers=AUTH)
    await cloud.http.head("/objects/b", headers=AUTH)
    stats = await cloud.stats()
    assert stats == {"puts": 3, "gets": 1, "heads": 1, "deletes": 0, "objects": 2,
                     "put_keys": {"a": 2, "b": 1}, "stored_keys": {"a": 2, "b": 1}}
    assert (await cloud.http.post("/admin/reset-stats", headers=AUTH)).status_code == 204
    stats = await cloud.stats()
    assert stats["puts"] == 0 and stats["put_keys"] == {} and stats["objects"] == 2


def test_faults_from_environment() -> None:
    faults = Faults.from_env({"MOCKCLOUD_FAIL_RATE": "0.25", "MOCKCLOUD_DELAY_S": "1.5",
                              "MOCKCLOUD_CUT_RATE": "", "MOCKCLOUD_TRUNCATE_RATE": "1",
                              "MOCKCLOUD_SEED": "3"})
    assert faults.settings() == {"fail_rate": 0.25, "delay_s": 1.5, "cut_rate": 0.0,
                                 "truncate_rate": 1.0, "seed": 3}
    for bad in ({"MOCKCLOUD_FAIL_RATE": "2"}, {"MOCKCLOUD_DELAY_S": "soon"}, {"MOCKCLOUD_SEED": "x"}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            Faults.from_env(bad)
    with pytest.raises(ValueError):
        Faults(cut_rate=-0.1)


def test_seeded_faults_repeat() -> None:
    first, second = Faults(seed=11), Faults(seed=11)
    assert [first.roll(0.5) for _ in range(32)] == [second.roll(0.5) for _ in range(32)]
    assert not any(Faults(seed=1).roll(0) for _ in range(100))


def test_cli_runs_and_stops_cleanly(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser(prog="mediad")
    add_cli(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["mock-cloud", "--port", "9123"])
    assert (args.host, args.port, args.data_dir, args.token) == ("127.0.0.1", 9123, Path("var/cloud"), None)

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    script = ("import argparse, os, sys; from mediad.mockcloud import add_cli, main_from_args\n"
              "p = argparse.ArgumentParser(); add_cli(p.add_subparsers())\n"
              "sys.exit(main_from_args(p.parse_args(sys.argv[1:]), os.environ))")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MEDIAD_", "MOCKCLOUD_"))}
    proc = subprocess.Popen([sys.executable, "-c", script, "mock-cloud", "--port", str(port),
                             "--data-dir", str(tmp_path / "cloud")],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout is not None
        token = proc.stdout.readline().strip().removeprefix("mock cloud token: ")
        deadline = time.monotonic() + 20
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                assert time.monotonic() < deadline and proc.poll() is None
                time.sleep(0.05)
        put = httpx.put(f"http://127.0.0.1:{port}/objects/x", content=b"1",
                        headers={"Authorization": f"Bearer {token}"})
        assert put.status_code == 201
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

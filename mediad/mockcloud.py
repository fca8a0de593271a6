"""The mock cloud: a small object store for demos and tests (`mediad mock-cloud`).

`PUT`/`GET`/`HEAD`/`DELETE /objects/{key}` behind one bearer token, objects kept on its own disk
so they survive restarts, and injectable faults (503s, delays, corrupted answers, cut-off bodies)
so the cloud replication of mediad can be tested against a misbehaving peer.

Layout under the data dir: `objects/<h[:2]>/<h>.json` (h = sha256 of the key) names the object's
key, size, sha256 and blob; the bytes are `files/ab/cd/<blob uuid>`. A fake shares no code with
what it fakes: its writer and range reading are its own, small and slow-but-simple, so a bug in
mediad's cannot hide in both. Replacing the sidecar with one rename is the commit point,
so a reader never sees new bytes with old metadata. A crash between the blob's rename and the
sidecar's leaves an orphan blob, which is harmless here.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import math
import os
import random
import re
import secrets
import signal
import sys
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import anyio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from .errors import (
    BadRequest,
    MediaError,
    NotFound,
    RangeNotSatisfiable,
    Unauthorized,
    Unprocessable,
    error_response,
    problem,
)
from .storage import fsync_dir  # an OS helper; the mock's writing and range reading are its own

log = logging.getLogger("mediad.mockcloud")

_CHUNK = 256 * 1024
_WRITE_BATCH = 1 << 20  # bytes per hop to a worker thread
_RANGE = re.compile(r"bytes=(\d*)-(\d*)")
_RATES = ("fail_rate", "cut_rate", "truncate_rate")
_ENV = {"fail_rate": "MOCKCLOUD_FAIL_RATE", "delay_s": "MOCKCLOUD_DELAY_S",
        "cut_rate": "MOCKCLOUD_CUT_RATE", "truncate_rate": "MOCKCLOUD_TRUNCATE_RATE",
        "seed": "MOCKCLOUD_SEED"}


@dataclass
class Faults:
    """What share of requests misbehave, and how. Seed it for reproducible tests."""

    fail_rate: float = 0.0  # /objects requests answered 503
    delay_s: float = 0.0  # sleep before answering any /objects request
    cut_rate: float = 0.0  # PUTs answered 201 with a wrong sha256, nothing stored
    truncate_rate: float = 0.0  # GET bodies cut off halfway, the connection dropped
    seed: int | None = None
    rng: random.Random = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.update(self.settings())  # validate what the constructor was given
        self.rng = random.Random(self.seed)

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> Faults:
        """From MOCKCLOUD_* variables; a bad value raises ValueError naming the variable."""
        faults = cls()
        for name, variable in _ENV.items():
            if environ.get(variable, "").strip():
                try:
                    raw = environ[variable]
                    faults.update({name: int(raw) if name == "seed" else float(raw)})
                except ValueError as exc:
                    raise ValueError(f"{variable}: {exc}") from None
        return faults

    def update(self, values: Mapping[str, Any]) -> None:
        """Apply any subset of the settings, all or nothing; `seed` also restarts the generator."""
        unknown = set(values) - set(_ENV)
        if unknown:
            raise ValueError(f"unknown fault settings: {', '.join(sorted(unknown))}")
        checked: dict[str, Any] = {}
        for name, value in values.items():
            if name == "seed":
                if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                    raise ValueError("seed must be an integer or null")
            elif isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise ValueError(f"{name} must be a number")
            elif name in _RATES and not 0 <= value <= 1:
                raise ValueError(f"{name} must be between 0 and 1")
            elif value < 0:
                raise ValueError(f"{name} must not be negative")
            checked[name] = value
        for name, value in checked.items():
            setattr(self, name, value)
        if "seed" in values:
            self.rng = random.Random(self.seed)

    def settings(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in _ENV}

    def roll(self, rate: float) -> bool:
        return rate > 0 and self.rng.random() < rate


@dataclass(frozen=True)
class _Meta:
    key: str
    size: int
    sha256: str
    blob: str  # uuid hex of the bytes under files/


class _Cloud:
    """The store's state: disk layout, counters, faults. One per app."""

    def __init__(self, data_dir: Path, token: str, faults: Faults) -> None:
        if not token:
            raise ValueError("the mock cloud needs a non-empty token")
        self.root = data_dir.resolve()
        self.tmp_dir = self.root / "tmp"
        self.objects = self.root / "objects"
        self.token = token.encode()
        self.faults = faults
        self.counts: Counter[str] = Counter()
        self.put_keys: Counter[str] = Counter()
        self.stored_keys: Counter[str] = Counter()
        # Commits (read old sidecar, rename new, drop old blob) must not interleave, or two PUTs
        # of one key could each delete the other's blob. They are short; one lock is enough.
        self.commit_lock = asyncio.Lock()

    def prepare(self) -> None:
        for directory in (self.tmp_dir, self.root / "files", self.objects):
            directory.mkdir(parents=True, exist_ok=True)
        # Left by a crash mid-PUT. (So one data dir serves one mock cloud process at a time.)
        for stale in self.tmp_dir.iterdir():
            stale.unlink(missing_ok=True)

    def blob_path(self, blob: str) -> Path:
        return self.root / "files" / blob[:2] / blob[2:4] / blob

    def remove_blob(self, blob: str) -> None:
        self.blob_path(blob).unlink(missing_ok=True)

    def sidecar(self, key: str) -> Path:
        digest = hashlib.sha256(key.encode()).hexdigest()
        return self.objects / digest[:2] / f"{digest}.json"

    def read_meta(self, key: str) -> _Meta | None:
        try:
            return _Meta(**json.loads(self.sidecar(key).read_bytes()))
        except FileNotFoundError:
            return None

    def open_object(self, key: str) -> tuple[_Meta, int] | None:
        """The object's metadata and an open fd on its bytes, or None when absent."""
        for _ in range(3):
            meta = self.read_meta(key)
            if meta is None:
                return None
            try:
                return meta, os.open(self.blob_path(meta.blob), os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                continue  # replaced or deleted between the two reads: look again
        return None

    def commit(self, key: str, received: _Received) -> None:
        blob_id = uuid.uuid4().hex
        final_blob = self.blob_path(blob_id)
        final_blob.parent.mkdir(parents=True, exist_ok=True)
        os.replace(received.path, final_blob)
        fsync_dir(final_blob.parent)
        old = self.read_meta(key)
        meta = _Meta(key, received.size, received.sha256, blob_id)
        final = self.sidecar(key)
        if not final.parent.is_dir():
            final.parent.mkdir(exist_ok=True)
            fsync_dir(self.objects)
        temp = self.tmp_dir / f"{blob_id}.json.part"
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o640)
        try:
            os.write(fd, json.dumps(asdict(meta), ensure_ascii=False).encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temp, final)
        fsync_dir(final.parent)
        if old is not None:
            self.remove_blob(old.blob)

    def delete(self, key: str) -> None:
        old = self.read_meta(key)
        if old is not None:
            self.sidecar(key).unlink(missing_ok=True)
            fsync_dir(self.sidecar(key).parent)
            self.remove_blob(old.blob)

    def count_objects(self) -> int:
        return sum(1 for _ in self.objects.glob("*/*.json"))


# ---- HTTP ---------------------------------------------------------------------------------------

def _authorize(request: Request) -> _Cloud:
    cloud: _Cloud = request.app.state.cloud
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), cloud.token):
        raise Unauthorized("a valid bearer token for the mock cloud is required")
    return cloud


async def _enter_objects(request: Request, counter: str) -> tuple[_Cloud, str]:
    """Auth, counting and the faults common to every /objects request."""
    cloud = _authorize(request)
    key = request.path_params["key"]
    if not key or len(key.encode()) > 1024:  # S3's limit
        raise BadRequest("the object key must be 1 to 1024 bytes")
    cloud.counts[counter] += 1
    if counter == "puts":
        cloud.put_keys[key] += 1
    if cloud.faults.delay_s:
        await asyncio.sleep(cloud.faults.delay_s)
    if cloud.faults.roll(cloud.faults.fail_rate):
        raise HTTPException(503, "injected fault: service unavailable", {"Retry-After": "1"})
    return cloud, key


async def put_object(request: Request) -> Response:
    cloud, key = await _enter_objects(request, "puts")
    expected = request.headers.get("x-content-sha256", "").strip().lower() or None
    received = _Received(cloud.tmp_dir / f"{uuid.uuid4().hex}.part")
    try:
        await received.receive(request.stream())
        if expected is not None and expected != received.sha256:
            raise BadRequest(f"the body's sha256 is {received.sha256}, not the x-content-sha256 sent")
        if cloud.faults.roll(cloud.faults.cut_rate):
            await received.discard()  # a corrupted upload: the client is told a wrong digest
            wrong = hashlib.sha256(received.sha256.encode()).hexdigest()
            return JSONResponse({"key": key, "size": received.size, "sha256": wrong}, status_code=201)
        async with cloud.commit_lock:
            await anyio.to_thread.run_sync(cloud.commit, key, received)
    except ClientDisconnect:
        await received.discard()
        return problem(400, "the client went away before the body was complete")  # nobody reads it
    except BaseException:
        await received.discard()
        raise
    cloud.stored_keys[key] += 1
    return JSONResponse({"key": key, "size": received.size, "sha256": received.sha256}, status_code=201)


class _Received:
    """One PUT body in a temp file, hashed as it goes: batches of ~1 MiB, each hashed and written
    in a worker thread, fsynced at the end."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.size = 0
        self.sha256 = ""
        self._hash = hashlib.sha256()

    async def receive(self, stream: AsyncIterator[bytes]) -> None:
        fd = await anyio.to_thread.run_sync(os.open, self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        try:
            batch: list[bytes] = []
            async for chunk in stream:
                batch.append(chunk)
                if sum(map(len, batch)) >= _WRITE_BATCH:
                    await anyio.to_thread.run_sync(self._write, fd, b"".join(batch))
                    batch = []
            await anyio.to_thread.run_sync(self._write, fd, b"".join(batch))
            await anyio.to_thread.run_sync(os.fsync, fd)
        finally:
            os.close(fd)
        self.sha256 = self._hash.hexdigest()

    def _write(self, fd: int, data: bytes) -> None:
        self._hash.update(data)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        self.size += len(data)

    async def discard(self) -> None:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(lambda: self.path.unlink(missing_ok=True))


def _one_range(header: str | None, size: int) -> tuple[int, int] | None:
    """The one byte range [start, end) asked for, or None for the whole body: several ranges and
    malformed headers are answered whole, as RFC 9110 §14.2 allows (a cloud client asks for one
    span at a time). A range that starts past the end raises 416."""
    match = _RANGE.fullmatch(header.strip()) if header else None
    if match is None or match.group(0) == "bytes=-":
        return None
    first, last = match.groups()
    if not first:  # a suffix: the last `last` bytes
        suffix = int(last)
        if suffix == 0 or size == 0:
            raise RangeNotSatisfiable(size)
        return max(size - suffix, 0), size
    start = int(first)
    if last and int(last) < start:
        return None
    if start >= size:
        raise RangeNotSatisfiable(size)
    return start, min(int(last) + 1, size) if last else size


async def get_object(request: Request) -> _ObjectResponse:
    head = request.method == "HEAD"
    cloud, key = await _enter_objects(request, "heads" if head else "gets")
    found = await anyio.to_thread.run_sync(cloud.open_object, key)
    if found is None:
        raise NotFound(f"no object with the key {key!r}")
    meta, fd = found
    headers = {"etag": f'"{meta.sha256}"', "accept-ranges": "bytes", "x-content-sha256": meta.sha256,
               "content-type": "application/octet-stream"}
    try:
        span = _one_range(request.headers.get("range"), meta.size)
    except RangeNotSatisfiable:
        os.close(fd)
        raise
    status, (start, end) = 200, (0, meta.size)
    if span is not None:
        status, (start, end) = 206, span
        headers["content-range"] = f"bytes {start}-{end - 1}/{meta.size}"
    headers["content-length"] = str(end - start)
    truncate = not head and cloud.faults.roll(cloud.faults.truncate_rate)
    return _ObjectResponse(status, headers, fd, (start, end) if not head else (0, 0), truncate)


class _ObjectResponse:
    """Streams a span of an open file in chunks read off the event loop; closes the fd."""

    def __init__(self, status: int, headers: dict[str, str], fd: int, span: tuple[int, int],
                 truncate: bool) -> None:
        self.status, self.headers, self.fd, self.span, self.truncate = status, headers, fd, span, truncate

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await self._send(send)
        except OSError:
            pass  # the client went away (ASGI 2.4 send raises OSError)
        finally:
            os.close(self.fd)

    async def _send(self, send: Send) -> None:
        raw = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in self.headers.items()]
        await send({"type": "http.response.start", "status": self.status, "headers": raw})
        start, end = self.span
        stop = start + (end - start) // 2 if self.truncate else end
        while start < stop:
            chunk = await anyio.to_thread.run_sync(os.pread, self.fd, min(_CHUNK, stop - start), start)
            if not chunk:
                raise RuntimeError("the stored object is shorter than its recorded size")
            start += len(chunk)
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        if self.truncate:
            # Return without finishing: uvicorn logs it and closes the connection, so the client
            # sees fewer bytes than Content-Length, as after a network cut.
            return
        await send({"type": "http.response.body", "body": b""})


async def delete_object(request: Request) -> Response:
    cloud, key = await _enter_objects(request, "deletes")
    async with cloud.commit_lock:
        await anyio.to_thread.run_sync(cloud.delete, key)
    return Response(status_code=204)  # also when absent: DELETE is idempotent


async def health(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def set_faults(request: Request) -> Response:
    cloud = _authorize(request)
    try:
        values = await request.json()
    except ValueError:
        raise BadRequest("the body must be a JSON object") from None
    if not isinstance(values, dict):
        raise Unprocessable("the body must be a JSON object")
    try:
        cloud.faults.update(values)
    except ValueError as exc:
        raise Unprocessable(str(exc)) from None
    log.info("faults now %s", cloud.faults.settings())
    return JSONResponse(cloud.faults.settings())


async def stats(request: Request) -> Response:
    cloud = _authorize(request)
    objects = await anyio.to_thread.run_sync(cloud.count_objects)
    body = {name: cloud.counts[name] for name in ("puts", "gets", "heads", "deletes")}
    return JSONResponse({**body, "objects": objects, "put_keys": dict(cloud.put_keys),
                         "stored_keys": dict(cloud.stored_keys)})


async def reset_stats(request: Request) -> Response:
    cloud = _authorize(request)
    cloud.counts.clear()
    cloud.put_keys.clear()
    cloud.stored_keys.clear()
    return Response(status_code=204)


async def _media_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, MediaError)
    return error_response(exc)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return problem(exc.status_code, exc.detail, headers=exc.headers)


def create_mock_cloud(data_dir: Path, token: str, faults: Faults | None = None) -> Starlette:
    """The mock cloud app; `faults` None means none injected."""
    cloud = _Cloud(data_dir, token, faults if faults is not None else Faults())

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await anyio.to_thread.run_sync(cloud.prepare)
        yield

    app = Starlette(
        routes=[
            Route("/health", health),
            Route("/objects/{key:path}", put_object, methods=["PUT"]),
            Route("/objects/{key:path}", get_object, methods=["GET", "HEAD"]),
            Route("/objects/{key:path}", delete_object, methods=["DELETE"]),
            Route("/admin/faults", set_faults, methods=["POST"]),
            Route("/admin/stats", stats, methods=["GET"]),
            Route("/admin/reset-stats", reset_stats, methods=["POST"]),
        ],
        exception_handlers={MediaError: _media_error, HTTPException: _http_error},
        lifespan=lifespan,
    )
    app.state.cloud = cloud
    return app


def run_mock_cloud(host: str, port: int, data_dir: Path, token: str, faults: Faults) -> None:
    import uvicorn

    config = uvicorn.Config(create_mock_cloud(data_dir, token, faults), host=host, port=port, log_config=None,
                            timeout_graceful_shutdown=5, server_header=False)
    uvicorn.Server(config).run()


# ---- command line (wired into mediad.cli) -------------------------------------------------------

def add_cli(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    command = subparsers.add_parser("mock-cloud", help="run the mock cloud object store")
    command.add_argument("--host", default="127.0.0.1")
    command.add_argument("--port", type=int, default=9000)
    command.add_argument("--data-dir", type=Path, default=Path("./var/cloud"))
    command.add_argument("--token", help="bearer token (default: $MEDIAD_CLOUD_TOKEN, else random)")


def _ignore_signal(signum: int, frame: object) -> None:
    """uvicorn re-raises SIGINT/SIGTERM after a graceful stop; this makes that a no-op (exit 0)."""


def main_from_args(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    """`mediad mock-cloud`: a program of its own, configured by its MOCKCLOUD_* variables and the
    token in MEDIAD_CLOUD_TOKEN (read here, once, from `environ`)."""
    token = args.token or environ.get("MEDIAD_CLOUD_TOKEN")
    if not token:
        token = secrets.token_urlsafe(32)
        print(f"mock cloud token: {token}", flush=True)
    try:
        faults = Faults.from_env(environ)  # fail at start, with the variable's name, not in the app
    except ValueError as exc:
        print(f"mediad: configuration error: {exc}", file=sys.stderr)
        return 2
    if not logging.getLogger().handlers:
        from .logs import setup_logging

        setup_logging()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _ignore_signal)
    log.info("mock cloud on http://%s:%d, data in %s", args.host, args.port, Path(args.data_dir).resolve())
    run_mock_cloud(args.host, args.port, Path(args.data_dir), token, faults)
    return 0

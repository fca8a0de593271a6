"""Shared fixtures: a real PostgreSQL, the app under a real uvicorn on loopback, users.

The database is the one at MEDIAD_TEST_DATABASE_URL when set (a fresh database is created in it
for the session and dropped afterwards), else the embedded PostgreSQL in a temp dir.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import httpx
import pytest
import uvicorn

from mediad import migrate
from mediad.app import create_app
from mediad.config import Settings
from mediad.embedded import embedded_postgres
from mediad.mockcloud import Faults, create_mock_cloud
from mediad.server import uvicorn_config
from ops.harness import free_port, running

TEST_MAX_UPLOAD = 64 * 1024 * 1024


def _with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + name))


def _run(coro: Any) -> Any:
    return asyncio.run(coro)


async def _admin(url: str, sql: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@contextlib.contextmanager
def fresh_database(base_url: str) -> Iterator[str]:
    """A new, empty database on the server of `base_url`, dropped afterwards."""
    name = f"mediad_test_{uuid.uuid4().hex[:12]}"
    _run(_admin(base_url, f'CREATE DATABASE "{name}"'))
    try:
        yield _with_database(base_url, name)
    finally:
        _run(_admin(base_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture(scope="session")
def pg_server_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """URL of a PostgreSQL server tests may create databases on."""
    external = os.environ.get("MEDIAD_TEST_DATABASE_URL")
    if external:
        yield external
        return
    with embedded_postgres(tmp_path_factory.mktemp("pg") / "data") as url:
        yield url


@pytest.fixture(scope="session")
def database_url(pg_server_url: str) -> Iterator[str]:
    """The session's own database, migrated to head through Alembic."""
    with fresh_database(pg_server_url) as url:
        migrate.upgrade(url)
        yield url


@dataclass
class Server:
    """A running mediad: in a thread of the test process, or a `mediad serve` subprocess."""

    url: str
    data_dir: Path
    database_url: str
    process: subprocess.Popen[bytes] | None = None

    def stray_temp_files(self) -> list[Path]:
        return sorted((self.data_dir / "tmp").glob("*"))

    def partial_files(self) -> list[Path]:
        """Partial files of resumable uploads."""
        return sorted((self.data_dir / "uploads").glob("*"))

    def blob_files(self) -> list[Path]:
        return sorted(p for p in (self.data_dir / "files").rglob("*") if p.is_file())


@contextlib.contextmanager
def asgi_in_thread(app: Any, settings: Settings | None = None) -> Iterator[str]:
    """Serve an ASGI app under uvicorn on an ephemeral loopback port, in a thread with its own
    loop; yields its base URL and shuts it down (lifespan included) afterwards. With `settings`,
    uvicorn is configured as `mediad serve` configures it (its protocol limits included)."""
    options: dict[str, Any] = {"host": "127.0.0.1", "port": 0, "lifespan": "on", "timeout_graceful_shutdown": 5}
    if settings is None:
        config = uvicorn.Config(app, log_config=None, **options)
    else:
        config = uvicorn_config(app, settings, **options)
    server = uvicorn.Server(config)  # off the main thread, uvicorn leaves signal handlers alone
    thread = threading.Thread(target=server.run, name="test-server", daemon=True)
    thread.start()
    for _ in range(1000):
        if server.started or not thread.is_alive():
            break
        threading.Event().wait(0.01)
    if not server.started:
        raise RuntimeError("test server did not start")
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(15)


@contextlib.contextmanager
def serve_in_thread(settings: Settings, database_url: str) -> Iterator[Server]:
    """mediad itself under uvicorn in a thread (see asgi_in_thread)."""
    with asgi_in_thread(create_app(settings, database_url), settings) as url:
        yield Server(url, settings.data_dir, database_url)


@contextlib.contextmanager
def mediad_process(data_dir: Path, *, database_url: str | None, server: str = "uvicorn",
                   env: dict[str, str] | None = None, log_path: Path | None = None) -> Iterator[Server]:
    """`mediad serve` as a real subprocess on a free loopback port; SIGTERM (then SIGKILL) at exit.
    With database_url None it starts its embedded PostgreSQL under data_dir, as a user's would."""
    port = free_port()
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("MEDIAD_")}
    full_env.update({"MEDIAD_DATA_DIR": str(data_dir), "MEDIAD_PORT": str(port),
                     "MEDIAD_HOST": "127.0.0.1", "MEDIAD_MAX_UPLOAD_BYTES": str(TEST_MAX_UPLOAD),
                     # One process unless a test asks for more (MEDIAD_TEST_WORKERS runs them all so).
                     "MEDIAD_WORKERS": os.environ.get("MEDIAD_TEST_WORKERS", "1")})
    if database_url:
        full_env["MEDIAD_DATABASE_URL"] = database_url
    full_env.update(env or {})
    log_path = log_path or data_dir.parent / f"mediad-{port}.log"
    data_dir.mkdir(parents=True, exist_ok=True)
    url = f"http://127.0.0.1:{port}"
    with running([sys.executable, "-m", "mediad.cli", "serve", "--server", server], full_env, url + "/health",
                 log_path, start_timeout=90, stop_timeout=30) as proc:
        yield Server(url, data_dir, database_url or "", proc)


def make_settings(data_dir: Path, **overrides: Any) -> Settings:
    base = Settings(data_dir=data_dir, max_upload_bytes=TEST_MAX_UPLOAD, host="127.0.0.1")
    return replace(base, **overrides)


@pytest.fixture(scope="session")
def server(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with serve_in_thread(make_settings(tmp_path_factory.mktemp("data")), database_url) as running:
        yield running


@pytest.fixture(scope="session")
def granian_server(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """`mediad serve --server granian` on the session's database, for tests run on both servers."""
    pytest.importorskip("granian")
    with mediad_process(tmp_path_factory.mktemp("granian") / "data", database_url=database_url,
                        server="granian") as running:
        yield running


@pytest.fixture(params=["uvicorn", "granian"])
def any_server(request: pytest.FixtureRequest) -> Server:
    """The shared uvicorn server or the Granian subprocess: tests using this run on both."""
    return request.getfixturevalue("server" if request.param == "uvicorn" else "granian_server")


@pytest.fixture
async def any_client(any_server: Server) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=any_server.url, timeout=60) as http:
        yield http


@pytest.fixture(autouse=True)
def _clean_state(request: pytest.FixtureRequest) -> Iterator[None]:
    """Every test that used the session database leaves it empty (and the shared server's disk)."""
    uses = request.fixturenames
    database = request.getfixturevalue("database_url") if {"database_url", "server", "any_server"} & set(uses) else None
    shared: Server | None = request.getfixturevalue("server") if {"server", "any_server"} & set(uses) else None
    yield
    if database is None:
        return
    _run(_admin(database, "TRUNCATE users, tokens, files, records, uploads, cloud_deletions, signin_throttle CASCADE"))
    if shared is not None:
        for path in shared.blob_files() + shared.stray_temp_files() + shared.partial_files():
            path.unlink(missing_ok=True)


@pytest.fixture
async def client(server: Server) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=server.url, timeout=60) as http:
        yield http


@dataclass
class User:
    id: str
    name: str
    token: str

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


async def make_user(http: httpx.AsyncClient, name: str | None = None, password: str | None = None) -> User:
    body: dict[str, str] = {"name": name or f"user-{uuid.uuid4().hex[:10]}"}
    if password is not None:
        body["password"] = password
    response = await http.post("/users", json=body)
    assert response.status_code == 201, response.text
    data = response.json()
    return User(data["id"], data["name"], data["token"])


@pytest.fixture
async def user(client: httpx.AsyncClient) -> User:
    return await make_user(client)


@pytest.fixture
async def other_user(client: httpx.AsyncClient) -> User:
    return await make_user(client)


async def upload(http: httpx.AsyncClient, user: User, data: bytes, *, name: str = "data.bin",
                 path: str | None = None, replaces: bool = False) -> dict[str, Any]:
    """A raw upload (PUT to `path`, else POST with `name`) that must store `data`: 201, or 200 when
    it `replaces` the file at `path`."""
    if path is not None:
        response = await http.put("/files", headers=user.auth, params={"path": path}, content=data)
    else:
        response = await http.post("/files", headers=user.auth, params={"name": name}, content=data)
    assert response.status_code == (200 if replaces else 201), response.text
    file: dict[str, Any] = response.json()
    assert file["sha256"] == hashlib.sha256(data).hexdigest() and file["size"] == len(data)
    return file


def tus_metadata(**values: str) -> str:
    """An Upload-Metadata header: each key with its value in base64, comma-separated."""
    return ",".join(f"{k} {base64.b64encode(v.encode()).decode()}" for k, v in values.items())


def assert_problem(response: httpx.Response, status: int) -> dict[str, Any]:
    """The response is an RFC 9457 problem with this status; returns its body."""
    assert response.status_code == status, (response.status_code, response.text)
    assert response.headers["content-type"].startswith("application/problem+json")
    body = response.json()
    assert body["status"] == status
    assert body["type"] and body["title"] and body["detail"]
    return body


# ---- raw HTTP, for what httpx will not send ---------------------------------------------------

async def eventually(predicate: Callable[[], bool], seconds: float = 5) -> bool:
    """Whether `predicate` holds within `seconds`: cleanup after a disconnect trails the request."""
    for _ in range(int(seconds / 0.02)):
        if predicate():
            return True
        await asyncio.sleep(0.02)
    return predicate()


@contextlib.asynccontextmanager
async def raw_connection(server: Server) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    """A bare TCP connection, for what httpx will not do: stop mid-body, read an early answer."""
    url = urlsplit(server.url)
    reader, writer = await asyncio.open_connection(url.hostname, url.port)
    try:
        yield reader, writer
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


def request_head(method: str, target: str, headers: dict[str, str]) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", "Host: 127.0.0.1", *(f"{k}: {v}" for k, v in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def http_chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


async def read_response(reader: asyncio.StreamReader) -> httpx.Response:
    """The next response on a raw connection, as an httpx.Response (for assert_problem)."""
    async with asyncio.timeout(10):
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
        status_line, *lines = head.split("\r\n")[:-2]
        headers = [(k.strip(), v.strip()) for k, v in (line.split(":", 1) for line in lines)]
        length = int(dict((k.lower(), v) for k, v in headers).get("content-length", "0"))
        body = await reader.readexactly(length)
    return httpx.Response(int(status_line.split()[1]), headers=headers, content=body)


# ---- the mock cloud and mediad instances replicating to it ----------------------------------

CLOUD_TOKEN = "cloud-test-token"


@dataclass
class MockCloud:
    url: str
    data_dir: Path

    def client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.url, headers={"Authorization": f"Bearer {CLOUD_TOKEN}"}, timeout=30)

    async def set_faults(self, **faults: float) -> None:
        async with self.client() as http:
            assert (await http.post("/admin/faults", json=faults)).status_code == 200

    async def stats(self) -> dict[str, Any]:
        async with self.client() as http:
            return (await http.get("/admin/stats")).json()

    async def object(self, key: str) -> httpx.Response:
        async with self.client() as http:
            return await http.get(f"/objects/{key}")


@pytest.fixture
def mock_cloud(tmp_path: Path) -> Iterator[MockCloud]:
    with asgi_in_thread(create_mock_cloud(tmp_path / "cloud", CLOUD_TOKEN, Faults())) as url:
        yield MockCloud(url, tmp_path / "cloud")


def cloud_settings(data_dir: Path, cloud: MockCloud, **overrides: Any) -> Any:
    fast = {"cloud_url": cloud.url, "cloud_token": CLOUD_TOKEN, "cloud_poll_s": 0.3, "cloud_lease_s": 5.0,
            "cloud_retry_base_s": 0.1, "cloud_retry_cap_s": 0.5, "cloud_max_attempts": 100}
    return make_settings(data_dir, **{**fast, **overrides})


@pytest.fixture
def cloud_server(database_url: str, tmp_path: Path, mock_cloud: MockCloud) -> Iterator[Server]:
    with serve_in_thread(cloud_settings(tmp_path / "data", mock_cloud), database_url) as running:
        yield running


async def wait_for(check: Callable[[], Awaitable[bool]], timeout: float = 20, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or check}")
        await asyncio.sleep(0.05)




# ---- a webhook receiver -------------------------------------------------------------------------

@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    verified: bool  # the signature checked out with standardwebhooks and the endpoint's secret
    at: float  # time.monotonic() of arrival

    @property
    def event(self) -> dict[str, Any]:
        return json.loads(self.body)


class Receiver:
    """A subscriber's endpoint: a Starlette app under uvicorn on a fixed loopback port, so it can
    go down and come back at the same URL. It verifies every request with the standardwebhooks
    package and answers as told, per path: with `status` (default 204), after `delay_s`, with a
    body of `huge_bytes`."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.secrets: dict[str, str] = {}  # path → the whsec_ secret of the endpoint registered there
        self.received: list[Received] = []
        self.status: dict[str, int] = {}
        self.delay_s: dict[str, float] = {}
        self.huge_bytes: dict[str, int] = {}
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    def url(self, path: str = "/hook") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def events(self, path: str | None = None) -> list[dict[str, Any]]:
        return [r.event for r in self.received if path is None or r.path == path]

    async def _handle(self, request: Any) -> Any:
        from standardwebhooks.webhooks import Webhook, WebhookVerificationError
        from starlette.responses import Response, StreamingResponse

        body = await request.body()
        headers = {k.lower(): v for k, v in request.headers.items()}
        secret = self.secrets.get(request.url.path)
        verified = False
        if secret is not None:
            try:
                Webhook(secret).verify(body, headers)
                verified = True
            except WebhookVerificationError:
                verified = False
        path = request.url.path
        self.received.append(Received(path, headers, body, verified, time.monotonic()))
        status, huge = self.status.get(path, 204), self.huge_bytes.get(path, 0)
        await asyncio.sleep(self.delay_s.get(path, 0.0))
        if huge:
            async def chunks() -> AsyncIterator[bytes]:
                block = b"x" * (1 << 20)
                for _ in range(huge >> 20):
                    yield block
            return StreamingResponse(chunks(), status_code=status)
        return Response(status_code=status)

    def _app(self) -> Any:
        from starlette.applications import Starlette
        from starlette.routing import Route

        return Starlette(routes=[Route("/{path:path}", self._handle, methods=["POST"])])

    def start(self) -> Receiver:
        config = uvicorn.Config(self._app(), host="127.0.0.1", port=self.port, log_config=None, lifespan="off",
                                timeout_graceful_shutdown=1)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name="webhook-receiver", daemon=True)
        self._thread.start()
        for _ in range(1000):
            if self._server.started or not self._thread.is_alive():
                break
            threading.Event().wait(0.01)
        if not self._server.started:
            raise RuntimeError("the webhook receiver did not start")
        return self

    def stop(self) -> None:
        """Down: connections are refused from now on."""
        if self._server is not None and self._thread is not None:
            self._server.should_exit = True
            self._server.force_exit = True
            self._thread.join(15)
        self._server = self._thread = None


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    running = Receiver(free_port()).start()
    try:
        yield running
    finally:
        running.stop()


# ---- S3: moto's server, and boto3 as an independent client ------------------------------------

REGION = "eu-central-1"  # not us-east-1, so that bucket creation sends a LocationConstraint


@dataclass
class Moto:
    url: str
    access_key: str
    secret_key: str


@pytest.fixture(scope="module")
def moto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Moto]:
    """moto's server in a subprocess, with an IAM user and signature checks on: from then on it
    rejects any request whose SigV4 signature is wrong, as S3 does (it checks no content hash)."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("moto") / "moto.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(url + "/moto-api/", timeout=1)
                break
            except httpx.TransportError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto did not start: {log_path.read_text()[-2000:]}") from None
                time.sleep(0.1)
        import boto3  # here, not at the top: only the S3 tests pay for importing it

        iam = boto3.client("iam", endpoint_url=url, region_name="us-east-1", aws_access_key_id="setup",
                           aws_secret_access_key="setup")
        iam.create_user(UserName="mediad")
        iam.put_user_policy(UserName="mediad", PolicyName="s3", PolicyDocument=json.dumps(
            {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}))
        key = iam.create_access_key(UserName="mediad")["AccessKey"]
        assert httpx.post(url + "/moto-api/reset-auth", content=b"0").status_code == 200
        yield Moto(url, key["AccessKeyId"], key["SecretAccessKey"])
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def s3_settings(moto: Moto, tmp_path: Path) -> Settings:
    """Settings of a bucket of its own (not created yet) on the moto server."""
    bucket = f"mediad-{uuid.uuid4().hex[:12]}"
    return make_settings(tmp_path / "data", s3_endpoint_url=moto.url, s3_bucket=bucket,
                         s3_access_key=moto.access_key, s3_secret_key=moto.secret_key, s3_region=REGION)


class Oracle:
    """boto3 on the same bucket: what S3 holds, seen by a client that is not ours."""

    def __init__(self, settings: Settings) -> None:
        import boto3
        from botocore.config import Config

        self.bucket = settings.s3_bucket
        self.client = boto3.client(
            "s3", endpoint_url=settings.s3_endpoint_url, region_name=settings.s3_region,
            aws_access_key_id=settings.s3_access_key, aws_secret_access_key=settings.s3_secret_key,
            config=Config(s3={"addressing_style": "path"}))

    async def call(self, operation: str, **params: Any) -> Any:
        return await asyncio.to_thread(getattr(self.client, operation), Bucket=self.bucket, **params)

    async def keys(self) -> list[str]:
        return [item["Key"] for item in (await self.call("list_objects_v2")).get("Contents", [])]

    async def pending_uploads(self) -> list[Any]:
        return list((await self.call("list_multipart_uploads")).get("Uploads", []))

    async def content(self, key: str) -> bytes:
        return bytes((await self.call("get_object", Key=key))["Body"].read())


# ---- helpers shared by several test modules ------------------------------------------------------

async def probed(http: httpx.AsyncClient, user: User, file_id: str, seconds: float = 40) -> dict[str, Any]:
    """The File once its media is known (probing runs right after the upload)."""
    deadline = time.monotonic() + seconds
    while True:
        response = await http.get(f"/files/{file_id}", headers=user.auth)
        assert response.status_code == 200, response.text
        file: dict[str, Any] = response.json()
        if file["media"] is not None:
            return file
        assert time.monotonic() < deadline, f"not probed within {seconds} s"
        await asyncio.sleep(0.05)


async def file_state(http: httpx.AsyncClient, auth: dict[str, str], file_id: str) -> dict[str, Any]:
    return (await http.get(f"/files/{file_id}", headers=auth)).json()


async def stored(http: httpx.AsyncClient, auth: dict[str, str], file_id: str) -> bool:
    return (await file_state(http, auth, file_id))["cloud"]["state"] == "stored"


async def blob_id(database_url: str, file_id: str) -> uuid.UUID:
    conn = await asyncpg.connect(database_url)
    try:
        return await conn.fetchval("SELECT blob_id FROM files WHERE id = $1", uuid.UUID(file_id))
    finally:
        await conn.close()


async def register(http: httpx.AsyncClient, user: User, receiver: Receiver, path: str = "/hook",
                   events: list[str] | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"url": receiver.url(path)}
    if events is not None:
        body["events"] = events
    response = await http.post("/webhooks", json=body, headers=user.auth)
    assert response.status_code == 201, response.text
    created = response.json()
    assert created["secret"].startswith("whsec_") and len(base64.b64decode(created["secret"][6:])) == 32
    receiver.secrets[path] = created["secret"]
    return created


async def arrived(receiver: Receiver, count: int, what: str, timeout: float = 20) -> None:
    async def enough() -> bool:
        return len(receiver.received) >= count
    await wait_for(enough, timeout, what)


def postgres_running(pgdata: Path) -> bool:
    """Whether the embedded PostgreSQL of `pgdata` runs."""
    pid_file = pgdata / "postmaster.pid"
    if not pid_file.exists():
        return False
    pid = int(pid_file.read_text().split()[0])
    return Path(f"/proc/{pid}").exists()


def stop_postmaster(pgdata: Path) -> None:
    """Stop the embedded PostgreSQL of `pgdata` if it runs: what a killed or failing test may
    leave behind."""
    if postgres_running(pgdata):
        pid = int((pgdata / "postmaster.pid").read_text().split()[0])
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGINT)  # PostgreSQL's fast shutdown
        deadline = time.monotonic() + 20
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.05)


# Send sizes that split a body every way that matters to a parser: at 1, 2, 3 bytes and on.
CHUNK_SIZES = [1, 2, 3, 5, 8, 13, 21, 34, 55, 89]


async def post_in_pieces(server: Server, user: User, body: bytes, size: int,
                         content_type: str) -> httpx.Response:
    """POST /files over a bare connection, the body in `size`-byte sends with a pause after each,
    so that the server reads them one by one; the answer may come before the body is all sent."""
    async with raw_connection(server) as (reader, writer):
        writer.write(request_head("POST", "/files", {"Authorization": f"Bearer {user.token}",
                                                     "Content-Type": content_type, "Content-Length": str(len(body))}))

        async def send() -> None:
            with contextlib.suppress(ConnectionError):
                for start in range(0, len(body), size):
                    writer.write(body[start:start + size])
                    await writer.drain()
                    await asyncio.sleep(0.001)

        sending = asyncio.create_task(send())
        try:
            return await read_response(reader)
        finally:
            sending.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sending


def processes_mentioning(text: str) -> list[str]:
    """Processes (other than this one) whose command line mentions `text`: what a test left running."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if text in cmdline:
                found.append(f"{entry.name}: {cmdline[:200]}")
    return found

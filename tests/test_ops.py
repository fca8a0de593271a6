"""Operations end to end: /metrics, /openapi.json, /docs, SIGTERM mid-upload, the compose file."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import subprocess
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import httpx
import pytest
import yaml
from conftest import (
    MockCloud,
    cloud_settings,
    make_settings,
    make_user,
    mediad_process,
    processes_mentioning,
    serve_in_thread,
    wait_for,
)
from openapi_spec_validator import validate
from prometheus_client.parser import text_string_to_metric_families
from starlette.routing import Mount, Route

from mediad.app import create_app
from mediad.embedded import embedded_postgres

ROOT = Path(__file__).resolve().parent.parent

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


# ---- /metrics ------------------------------------------------------------------------------------

async def scrape(http: httpx.AsyncClient) -> Samples:
    response = await http.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(response.text) for s in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


async def test_metrics_move_with_uploads_downloads_replication_and_cleanup(
        database_url: str, tmp_path: Path, mock_cloud: MockCloud) -> None:
    # Local copies may go as soon as the cloud holds them, so cleanup has something to evict.
    settings = cloud_settings(tmp_path / "data", mock_cloud, cleanup_interval_s=0.3, local_ttl_s=0.0)
    body = os.urandom(256 * 1024 + 3)
    with serve_in_thread(settings, database_url) as running:
        async with httpx.AsyncClient(base_url=running.url, timeout=30) as http:
            before = await scrape(http)
            assert value(before, "mediad_database_up") == 1
            assert value(before, "mediad_disk_free_bytes") > 0 and value(before, "mediad_disk_used_bytes") > 0
            assert value(before, "mediad_uploads_in_flight") == 0
            user = await make_user(http)

            # An upload in flight shows in the gauge while its body streams.
            first_chunk_sent, finish = asyncio.Event(), asyncio.Event()

            async def slow_body() -> AsyncIterator[bytes]:
                yield body[:1024]
                first_chunk_sent.set()
                await finish.wait()
                yield body[1024:]

            upload = asyncio.create_task(http.post("/files?name=a.bin", content=slow_body(),
                                                   headers=user.auth))
            await first_chunk_sent.wait()

            async def in_flight() -> bool:
                return value(await scrape(http), "mediad_uploads_in_flight") == 1

            await wait_for(in_flight, timeout=10, what="an upload in flight")
            finish.set()
            created = await upload
            assert created.status_code == 201
            file_id = created.json()["id"]

            async def evicted() -> bool:
                return value(await scrape(http), "mediad_cleanup_evicted_files_total") >= 1

            await wait_for(evicted, what="the stored file evicted by cleanup")
            downloaded = await http.get(f"/files/{file_id}/content", headers=user.auth)  # from the cloud now
            assert downloaded.status_code == 200 and downloaded.content == body
            assert (await http.get("/no/such/route")).status_code == 404

            after = await scrape(http)
            requests = "mediad_http_requests_total"
            assert value(after, requests, route="/files", method="POST", status="201") == 1
            assert value(after, requests, route="/files/{file_id}/content", method="GET", status="200") == 1
            assert value(after, requests, route="unmatched", method="GET", status="404") == 1
            durations = "mediad_http_request_duration_seconds_count"
            assert value(after, durations, route="/files", method="POST") == 1
            for name in ("mediad_uploaded_bytes_total", "mediad_downloaded_bytes_total"):
                assert value(after, name) - value(before, name) == len(body), name
            assert value(after, "mediad_uploads_in_flight") == 0
            assert value(after, "mediad_cleanup_freed_bytes_total") >= len(body)
            assert value(after, "mediad_cloud_queue_depth") == 0
            assert value(after, "mediad_cloud_push_failures_total") == 0

            # The cloud down: pushes fail, the backlog and its age grow; back up: the backlog drains.
            await mock_cloud.set_faults(fail_rate=1.0)
            queued = await http.post("/files?name=b.bin", content=b"queued", headers=user.auth)
            assert queued.status_code == 201

            async def failing() -> bool:
                samples = await scrape(http)
                return (value(samples, "mediad_cloud_push_failures_total") >= 2
                        and value(samples, "mediad_cloud_queue_depth") == 1
                        and value(samples, "mediad_cloud_queue_oldest_age_seconds") > 0)

            await wait_for(failing, what="failed pushes counted and a backlog of one")
            await mock_cloud.set_faults(fail_rate=0.0)

            async def drained() -> bool:
                return value(await scrape(http), "mediad_cloud_queue_depth") == 0

            await wait_for(drained, what="the backlog drained")


async def test_metrics_registries_are_per_app(database_url: str, tmp_path: Path) -> None:
    with serve_in_thread(make_settings(tmp_path / "a"), database_url) as one, \
            serve_in_thread(make_settings(tmp_path / "b"), database_url) as two:
        async with httpx.AsyncClient(base_url=one.url) as a, httpx.AsyncClient(base_url=two.url) as b:
            for _ in range(3):
                assert (await a.get("/health")).status_code == 200
            health = {"route": "/health", "method": "GET", "status": "200"}
            assert value(await scrape(a), "mediad_http_requests_total", **health) == 3
            assert value(await scrape(b), "mediad_http_requests_total", **health) == 0


# ---- /openapi.json and /docs ---------------------------------------------------------------------

def _template(path: str) -> str:
    return re.sub(r"{([^}:]+):[^}]+}", r"{\1}", path)


async def test_openapi_document_validates_and_covers_every_route(client: httpx.AsyncClient, tmp_path: Path,
                                                                  database_url: str) -> None:
    response = await client.get("/openapi.json")
    assert response.status_code == 200 and response.headers["content-type"].startswith("application/json")
    document = response.json()
    validate(document)
    assert document["openapi"].startswith("3.1")
    paths = document["paths"]

    app = create_app(make_settings(tmp_path), database_url)  # the same code the server runs
    served: dict[str, set[str]] = {}
    for route in app.routes:
        if isinstance(route, Mount):  # static assets (the docs page's), not API
            continue
        assert isinstance(route, Route)
        methods = set(route.methods or ())
        if "GET" in methods and route.path not in ("/files/{file_id}/content", "/download", "/record"):
            methods.discard("HEAD")  # Starlette adds HEAD to any GET; the contract names it where it matters
        served.setdefault(_template(route.path), set()).update(m.lower() for m in route.methods or ())
        documented = paths.get(_template(route.path))
        assert documented is not None, f"{route.path} is not in /openapi.json"
        missing = {m.lower() for m in methods} - documented.keys()
        assert not missing, f"{route.path}: {missing} not documented"
    for path, item in paths.items():  # and the document promises nothing the app lacks
        operations = item.keys() - {"parameters", "summary", "description"}
        assert path in served and operations <= served[path], (path, operations)

    # Every error answer is problem+json, and the upload and download routes say which.
    post_files = paths["/files"]["post"]["responses"]
    assert {"201", "400", "401", "413", "422", "507"} <= post_files.keys()
    problem = document["components"]["responses"]["Problem413"]["content"]["application/problem+json"]
    assert problem["schema"] == {"$ref": "#/components/schemas/Problem"}
    assert {"206", "304", "412", "416"} <= paths["/download"]["get"]["responses"].keys()
    bearer = document["components"]["securitySchemes"]["bearer"]
    assert (bearer["type"], bearer["scheme"]) == ("http", "bearer")
    assert paths["/health"]["get"]["security"] == []


async def test_docs_page_and_its_assets_are_served_by_mediad(client: httpx.AsyncClient) -> None:
    slashed = await client.get("/docs/")  # its relative links would resolve under /docs/docs/
    assert (slashed.status_code, slashed.headers["location"]) == (301, "../docs")
    page = await client.get("/docs")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    links = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert links and not [u for u in links if re.match(r"(?i)([a-z][a-z0-9+.-]*:|//)", u)], links
    expected = {".css": "text/css", ".js": "javascript", ".png": "image/png", ".json": "application/json"}
    for link in links:
        asset = await client.get(httpx.URL(str(page.url)).join(link))
        assert asset.status_code == 200, link
        content_type = asset.headers["content-type"]
        assert expected[Path(link).suffix] in content_type, (link, content_type)
    script = (await client.get("/docs/assets/docs.js")).text
    assert "openapi.json" in script and "validatorUrl: null" in script and "http" not in script
    assert "Apache License" in (await client.get("/docs/assets/LICENSE")).text  # Swagger UI's, next to it


# ---- SIGTERM in the middle of an upload ----------------------------------------------------------

async def _rows(url: str) -> int:
    conn = await asyncpg.connect(url)
    try:
        return int(await conn.fetchval("SELECT count(*) FROM files"))
    finally:
        await conn.close()


async def test_sigterm_during_an_upload_completes_it_or_leaves_no_trace_and_exits_0(tmp_path: Path) -> None:
    data_dir = tmp_path / "var"
    chunk, chunks = os.urandom(64 * 1024), 40  # 2.5 MiB over about 2 s
    with mediad_process(data_dir, database_url=None) as running:
        assert running.process is not None
        async with httpx.AsyncClient(base_url=running.url, timeout=60) as http:
            user = await make_user(http)
            halfway = asyncio.Event()

            async def slow_body() -> AsyncIterator[bytes]:
                for n in range(chunks):
                    if n == chunks // 4:
                        halfway.set()
                    yield chunk
                    await asyncio.sleep(0.05)

            upload = asyncio.create_task(http.post("/files?name=slow.bin", content=slow_body(),
                                                   headers=user.auth))
            await halfway.wait()
            running.process.send_signal(signal.SIGTERM)
            try:
                answer: httpx.Response | None = await upload
            except httpx.HTTPError:
                answer = None
        code = await asyncio.to_thread(running.process.wait, 30)
        assert code == 0, code

    assert not processes_mentioning(str(data_dir)), "PostgreSQL or the mock cloud outlived mediad"
    assert not [p for p in (data_dir / "tmp").glob("*") if p.is_file()], "a temp file was left behind"
    blobs = [p for p in (data_dir / "files").rglob("*") if p.is_file()]
    with embedded_postgres(data_dir / "pg") as url:
        rows = await _rows(url)
    if answer is not None and answer.status_code == 201:
        assert rows == 1 and [b.stat().st_size for b in blobs] == [len(chunk) * chunks]
    else:  # cut off: no row and no bytes
        assert rows == 0 and blobs == [], (answer, rows, blobs)
    assert answer is not None and answer.status_code == 201, "graceful shutdown should let the upload finish"


# ---- deployment files ----------------------------------------------------------------------------

def test_compose_file_names_services_volumes_health_checks_and_dependencies() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services, volumes = compose["services"], compose["volumes"]
    assert {"postgres", "cloud", "mediad"} <= services.keys()
    assert {"pgdata", "mediadata", "clouddata"} <= volumes.keys()
    for name in ("postgres", "cloud", "mediad"):
        assert services[name]["healthcheck"]["test"], f"{name} has no health check"
    assert services["mediad"]["depends_on"] == {"postgres": {"condition": "service_healthy"},
                                                "cloud": {"condition": "service_healthy"}}

    cloud = services["cloud"]
    assert cloud["build"] == services["mediad"]["build"]  # the same image
    assert cloud["command"][:2] == ["mediad", "mock-cloud"]
    assert any(v.startswith("clouddata:") for v in cloud["volumes"])
    assert any(v.startswith("pgdata:") for v in services["postgres"]["volumes"])
    assert any(v.startswith("mediadata:/data") for v in services["mediad"]["volumes"])

    env = services["mediad"]["environment"]
    port = cloud["command"][cloud["command"].index("--port") + 1]
    assert env["MEDIAD_CLOUD_URL"] == f"http://cloud:{port}"
    assert f":{port}/health" in str(cloud["healthcheck"])
    assert env["MEDIAD_LOG_FILE"].startswith("/data/logs/")
    # The cloud token comes from .env, never from the committed file, and both sides share it.
    assert env["MEDIAD_CLOUD_TOKEN"].startswith("${MEDIAD_CLOUD_TOKEN")
    assert cloud["environment"]["MEDIAD_CLOUD_TOKEN"] == env["MEDIAD_CLOUD_TOKEN"]
    example = (ROOT / ".env.example").read_text()
    for variable in ("MEDIAD_CLOUD_URL", "MEDIAD_CLOUD_TOKEN", "MEDIAD_LOG_FILE", "POSTGRES_PASSWORD"):
        assert variable in example
    assert "pg_isready" in str(services["postgres"]["healthcheck"]["test"])
    # Docker's default 10 s before SIGKILL would cut off uploads that the 30 s graceful stop lets finish.
    assert int(services["mediad"]["stop_grace_period"].rstrip("s")) > 30

    # The nginx profile serves ops/nginx.conf over the same data volume, read-only, as mediad's user.
    nginx = services["nginx"]
    assert nginx["profiles"] == ["nginx"]
    assert "./ops/nginx.conf:/etc/mediad/nginx.conf:ro" in nginx["volumes"]
    assert "mediadata:/data:ro" in nginx["volumes"]
    assert env["MEDIAD_ACCEL_REDIRECT"] == "${MEDIAD_ACCEL_REDIRECT:-}"
    for marked in ("127.0.0.1:8000", "listen 80;", "/var/lib/mediad/files/", "http {"):
        assert marked in (ROOT / "ops" / "nginx.conf").read_text()

    lines = (ROOT / "Procfile").read_text().splitlines()
    procfile = dict(line.split(":", 1) for line in lines if line.strip())
    assert {"web", "cloud", "cleanup"} <= procfile.keys()
    assert "mock-cloud" in procfile["cloud"] and "serve" in procfile["web"]
    # web and cloud share one token, or every push is refused with 401: a missing one stops both.
    for name in ("web", "cloud"):
        assert "MEDIAD_CLOUD_TOKEN=${MEDIAD_CLOUD_TOKEN:?" in procfile[name], name
    for name, line in procfile.items():
        unset = subprocess.run(["sh", "-c", line.replace("mediad ", "true ")], capture_output=True, text=True,
                               env={k: v for k, v in os.environ.items() if k != "MEDIAD_CLOUD_TOKEN"})
        assert (unset.returncode != 0) == (name in ("web", "cloud")), (name, unset.stderr)
        assert name == "cleanup" or "set MEDIAD_CLOUD_TOKEN in .env" in unset.stderr


def _compose_command() -> list[str] | None:
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    return [legacy] if legacy else None


def test_docker_compose_config_accepts_the_file_and_wants_a_token(tmp_path: Path) -> None:
    compose = _compose_command()
    if compose is None:
        pytest.skip("neither docker compose nor docker-compose is installed here")
    empty = tmp_path / "empty.env"  # so that a developer's own .env does not decide the outcome
    empty.write_text("")
    command = [*compose, "--env-file", str(empty), "-f", str(ROOT / "docker-compose.yml"), "config",
               "--quiet"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MEDIAD_", "POSTGRES_"))}
    with_token = subprocess.run(command, capture_output=True, text=True, timeout=60,
                                env={**env, "MEDIAD_CLOUD_TOKEN": uuid.uuid4().hex})
    assert with_token.returncode == 0, with_token.stderr
    without = subprocess.run(command, capture_output=True, text=True, timeout=60, env=env)
    assert without.returncode != 0 and "MEDIAD_CLOUD_TOKEN" in without.stderr

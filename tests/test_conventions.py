"""Conventions every route follows: 405's Allow, trailing slashes, JSON's charset, names in headers."""

from __future__ import annotations

import httpx
import pytest
from conftest import assert_problem, make_user, upload

from mediad.config import ConfigError, load_settings
from mediad.downloads import content_disposition


def allow(response: httpx.Response) -> set[str]:
    return {method.strip() for method in response.headers["allow"].split(",")}


async def test_405_allow_lists_every_method_of_the_resource(client: httpx.AsyncClient) -> None:
    response = await client.patch("/files")
    assert_problem(response, 405)
    assert allow(response) == {"GET", "HEAD", "POST", "PUT"}  # HEAD: served wherever GET is
    response = await client.put("/files/8b1f0c55-7a4e-4a8e-9a55-2a3d1f6f6b11")
    assert_problem(response, 405)
    assert {"DELETE", "GET", "HEAD"} <= allow(response) and not {"POST", "PUT"} & allow(response)
    response = await client.put("/uploads/8b1f0c55-7a4e-4a8e-9a55-2a3d1f6f6b11")
    assert allow(response) == {"DELETE", "GET", "HEAD", "PATCH"}
    response = await client.delete("/health")
    assert allow(response) == {"GET", "HEAD"}


async def test_a_trailing_slash_serves_the_same_route(client: httpx.AsyncClient) -> None:
    created = await client.post("/users/", json={"name": "slash"})
    assert created.status_code == 201, created.text
    user = created.json()
    auth = {"Authorization": f"Bearer {user['token']}"}
    posted = await client.post("/files/?name=a.txt", content=b"slashed", headers=auth)
    assert posted.status_code == 201 and posted.json()["name"] == "a.txt"
    file_id = posted.json()["id"]
    listed = await client.get("/files/", headers=auth)
    assert [f["id"] for f in listed.json()["files"]] == [file_id]
    assert (await client.get(f"/files/{file_id}/content/", headers=auth)).content == b"slashed"
    assert (await client.get("/health/")).json() == {"status": "ok"}
    assert (await client.get("/users/me/", headers=auth)).json()["name"] == "slash"
    assert_problem(await client.get("/no/such/route/"), 404)


async def test_json_answers_name_their_charset(client: httpx.AsyncClient) -> None:
    user = await make_user(client)
    for response in (await client.get("/health"), await client.get("/usage", headers=user.auth),
                     await client.get("/files", headers=user.auth), await client.get("/openapi.json")):
        assert response.headers["content-type"] == "application/json; charset=utf-8", response.url
    assert (await client.get("/usage")).headers["content-type"] == "application/problem+json"


async def test_a_user_without_a_name_is_told_the_name_is_required(client: httpx.AsyncClient) -> None:
    assert assert_problem(await client.post("/users", json={}), 422)["detail"] == "name is required"


@pytest.mark.parametrize(("name", "fallback"), [
    ("my 🎉 party notes.txt", "my _ party notes.txt"),
    ("café.txt", "cafe.txt"),  # a decomposable letter keeps its base letter
    ("Отчёт за май.mp4", "_____ __ ___.mp4"),
    ("🎬.mp4", "_.mp4"),
    ("日本", "__"),
    ('quote".txt', "quote_.txt"),
    ("plain.txt", "plain.txt"),
])
def test_the_ascii_fallback_marks_each_dropped_character(name: str, fallback: str) -> None:
    header = content_disposition(name)
    assert header.startswith(f'attachment; filename="{fallback}"; filename*=UTF-8\'\''), header


async def test_a_download_keeps_the_exact_name_in_filename_star(client: httpx.AsyncClient) -> None:
    user = await make_user(client)
    file = await upload(client, user, b"party", name="my 🎉 party notes.txt")
    response = await client.get(f"/files/{file['id']}/content", headers=user.auth)
    assert response.headers["content-disposition"] == (
        "attachment; filename=\"my _ party notes.txt\"; filename*=UTF-8''my%20%F0%9F%8E%89%20party%20notes.txt")


async def test_without_cors_origins_answers_carry_no_cors_headers(client: httpx.AsyncClient) -> None:
    answer = await client.get("/health", headers={"Origin": "http://127.0.0.1:9"})
    assert answer.status_code == 200
    assert not [name for name in answer.headers if name.startswith("access-control-")]
    preflight = await client.options("/files", headers={"Origin": "http://127.0.0.1:9",
                                                         "Access-Control-Request-Method": "POST"})
    assert_problem(preflight, 405)
    assert "access-control-allow-origin" not in preflight.headers


@pytest.mark.parametrize("value", ["example.com", "https://app.example.com/path", "ftp://x", "https://a, b"])
def test_cors_origins_must_be_origins(value: str) -> None:
    with pytest.raises(ConfigError, match="MEDIAD_CORS_ORIGINS"):
        load_settings({"MEDIAD_CORS_ORIGINS": value}, env_file=None)


def test_cors_origins_accept_a_list_or_a_star() -> None:
    settings = load_settings({"MEDIAD_CORS_ORIGINS": "https://a.example, http://127.0.0.1:5173/"}, env_file=None)
    assert settings.cors_origin_list == ["https://a.example", "http://127.0.0.1:5173"]
    assert load_settings({"MEDIAD_CORS_ORIGINS": "*"}, env_file=None).cors_origin_list == ["*"]


async def test_problem_titles_are_rfc_9110_names(client: httpx.AsyncClient) -> None:
    """Whatever Python runs the server: its http.HTTPStatus said "Request Entity Too Large",
    "Requested Range Not Satisfiable" and "Unprocessable Entity" before 3.13."""
    user = await make_user(client)
    file = await upload(client, user, b"0123456789", name="t.txt")
    too_large = await client.post("/uploads", headers={**user.auth, "Tus-Resumable": "1.0.0",
                                                       "Upload-Length": str(10**15),
                                                       "Upload-Metadata": "filename dC50eHQ="})
    unsatisfiable = await client.get(f"/files/{file['id']}/content", headers={**user.auth, "Range": "bytes=50-"})
    invalid = await client.get("/files", headers=user.auth, params={"limit": "0"})
    titles = [assert_problem(answer, status)["title"]
              for answer, status in ((too_large, 413), (unsatisfiable, 416), (invalid, 422))]
    assert titles == ["Content Too Large", "Range Not Satisfiable", "Unprocessable Content"]

"""docs/api.md documents every route /openapi.json has, and nothing it does not (unless planned).

The convention (docs/api.md says it too): each route is a level-3 heading naming its method and
path in backticks, ``### `GET /files/{id}` ``; several may share one heading; a route of the
contract that is not served yet carries `(planned)` in its heading. Path parameters compare by
position, not name (`{id}` in the docs is `{file_id}` in the document).
"""

from __future__ import annotations

import re
from pathlib import Path

import httpx

ROOT = Path(__file__).parents[1]
API_DOC = ROOT / "docs" / "api.md"
_ROUTE = re.compile(r"`(GET|HEAD|POST|PUT|PATCH|DELETE|OPTIONS) (/[^`\s]*)`")
_METHODS = {"get", "head", "post", "put", "patch", "delete", "options"}

Route = tuple[str, str]


def _normal(path: str) -> str:
    return re.sub(r"\{[^}]*\}", "{}", path.rstrip("/") or "/")


def documented(text: str) -> tuple[set[Route], set[Route]]:
    """(routes documented as served, routes documented as planned) of a docs/api.md text."""
    served: set[Route] = set()
    planned: set[Route] = set()
    for line in text.splitlines():
        if not line.startswith("### "):
            continue
        # "(planned)" right after a route marks that route; a heading of planned routes marks each.
        for match in _ROUTE.finditer(line):
            route = (match.group(1), _normal(match.group(2)))
            rest = line[match.end():].lstrip()
            (planned if rest.startswith("(planned)") else served).add(route)
    return served, planned


def in_document(document: dict) -> set[Route]:
    return {(method.upper(), _normal(path)) for path, item in document["paths"].items()
            for method in item if method in _METHODS}


def test_the_convention_is_parsed_as_written() -> None:
    served, planned = documented(
        "### `GET /files/{id}` · `DELETE /files/{file_id}`\n"
        "### `PATCH /files/{id}` (planned)\n"
        "### `GET /folders` (planned) · `DELETE /folders` (planned)\n"
        "Text mentioning `PUT /elsewhere` is not a heading.\n")
    assert served == {("GET", "/files/{}"), ("DELETE", "/files/{}")}
    assert planned == {("PATCH", "/files/{}"), ("GET", "/folders"), ("DELETE", "/folders")}


async def test_docs_api_md_covers_exactly_the_served_routes(client: httpx.AsyncClient) -> None:
    served_routes = in_document((await client.get("/openapi.json")).json())
    served, planned = documented(API_DOC.read_text())
    missing = sorted(served_routes - served - planned)
    assert not missing, f"routes in /openapi.json that docs/api.md does not document: {missing}"
    unknown = sorted(served - served_routes)
    assert not unknown, f"docs/api.md documents routes /openapi.json does not have (mark them (planned)?): {unknown}"
    landed = sorted(planned & served_routes)
    assert not landed, f"docs/api.md marks served routes as planned (remove the mark): {landed}"


def test_the_readme_links_the_reference_and_the_docs_page() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "(docs/api.md)" in readme and "/docs" in readme

"""Hostile input from the contract itself: Schemathesis fuzzes a running mediad from its OpenAPI document.

Every operation gets generated requests, valid and invalid (Schemathesis' examples, coverage and
fuzzing phases), with a valid bearer token; then a state machine follows the document's `links`
(create a File → read it, download it, link it, delete it). Every answer must be
- no server error (5xx),
- a status code, content type, headers and body the document declares for that operation,
- for every error: `application/problem+json` with `type`, `title`, `status` (= the HTTP status) and
  `detail` (RFC 9457), as API.md promises.

The per-operation tests are generated at collection from `openapi.document()`, the function that
serves /openapi.json: Schemathesis' lazy fixture loader (`schemathesis.pytest.from_fixture`) sets
`request.node._nodeid`, which pytest 9.2 no longer has. The `target` fixture checks that the live
/openapi.json is that same document, and the state machine loads the live one.

Locally each run draws new inputs; under CI=true generation is derandomized, so CI repeats the same
inputs and a new find shows up in a local run rather than as a flaky CI failure.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections import Counter
from typing import Any

import httpx
import pytest
import schemathesis
from conftest import Server, User, make_user
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.generation.meta import CoverageScenario, coverage_scenario
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from mediad import openapi

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
# MEDIAD_FUZZ_SCALE=10 for a deeper local run; the defaults keep the file well under a minute and a half.
SCALE = float(os.environ.get("MEDIAD_FUZZ_SCALE", "1"))
EXAMPLES_PER_OPERATION = int(25 * SCALE)  # fuzzing phase; the examples and coverage phases add their own
STATEFUL_SCENARIOS = int(40 * SCALE)
STATEFUL_STEPS = 8
MIN_CASES = 1000

# What the checks saw: (method, path template, status) per validated response.
SEEN: Counter[tuple[str, str, int]] = Counter()

# tus answers with its own octet stream; the bytes are the body as generated.
schemathesis.serializer.alias("application/offset+octet-stream", "application/octet-stream")


def _content_type(response: schemathesis.Response) -> str:
    values = response.headers.get("content-type") or [""]
    return values[0].split(";")[0].strip().lower()


@schemathesis.check
def problem_details(ctx: schemathesis.CheckContext, response: schemathesis.Response,
                    case: schemathesis.Case) -> bool | None:
    """Every 4xx/5xx is RFC 9457 problem+json whose `status` is the HTTP status (HEAD: headers only)."""
    SEEN[(case.method.upper(), case.operation.path, response.status_code)] += 1
    if response.status_code < 400:
        return None
    kind = _content_type(response)
    assert kind == "application/problem+json", f"a {response.status_code} answered {kind or 'no content type'}"
    if case.method.upper() == "HEAD":
        assert not response.content, "a HEAD answer has a body"
        return None
    try:
        body = json.loads(response.content)
    except ValueError:
        raise AssertionError(f"the problem body is not JSON: {response.content[:200]!r}") from None
    assert isinstance(body, dict), f"the problem body is not an object: {body!r}"
    for member in ("type", "title", "detail"):
        assert isinstance(body.get(member), str) and body[member], f"problem member {member!r} missing: {body!r}"
    assert body.get("status") == response.status_code, \
        f"problem status {body.get('status')!r} is not the HTTP status {response.status_code}"
    return None


@schemathesis.check
def status_listed(ctx: schemathesis.CheckContext, response: schemathesis.Response,
                  case: schemathesis.Case) -> bool | None:
    """Below 500, the status is listed for its operation by number. Schemathesis' own
    status_code_conformance accepts anything when there is a `default` response, and every mediad
    operation has one: for the unexpected 500, not to document its 4xx answers."""
    if response.status_code >= 500 or coverage_scenario(case) == CoverageScenario.UNSPECIFIED_HTTP_METHOD:
        return None  # 5xx: not_a_server_error; a method the path does not have: 405 by definition
    listed = [code for code in case.operation.definition.raw["responses"] if code != "default"]
    assert any(code in (str(response.status_code), f"{response.status_code // 100}XX") for code in listed), \
        f"{response.status_code} is not among the documented {', '.join(listed)}"
    return None


CHECKS = [not_a_server_error, status_code_conformance, status_listed, content_type_conformance,
          response_headers_conformance, response_schema_conformance, problem_details]

SETTINGS = settings(
    deadline=None,  # a shared 2-core machine: latency is not what this test measures
    derandomize=IN_CI,
    database=None if IN_CI else settings.default.database,
    # One user per operation serves all its cases (function_scoped_fixture), on purpose.
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large,
                           HealthCheck.function_scoped_fixture],
    print_blob=IN_CI,
)

schema = schemathesis.openapi.from_dict(openapi.document())


@pytest.fixture(scope="module")
def live_document(server: Server) -> dict[str, Any]:
    """The document the running server serves; it must be the one the tests were generated from."""
    document: dict[str, Any] = httpx.get(server.url + "/openapi.json", timeout=30).json()
    assert document == json.loads(json.dumps(openapi.document())), "/openapi.json is not openapi.document()"
    return document


@pytest.fixture
def target(server: Server, live_document: dict[str, Any], user: User) -> tuple[str, User]:
    return server.url, user


@schema.parametrize()
@settings(SETTINGS, max_examples=EXAMPLES_PER_OPERATION)
def test_every_operation_answers_by_its_contract(case: schemathesis.Case, target: tuple[str, User]) -> None:
    base_url, user = target
    case.call_and_validate(base_url=base_url, headers=user.auth, checks=CHECKS)


def _stateful_schema(server: Server, document: dict[str, Any]) -> Any:
    """The live document, plus links only Schemathesis understands: tus answers a new upload's id in
    `Location: /uploads/<id>`, which an OpenAPI runtime expression cannot cut out."""
    document = json.loads(json.dumps(document))
    to_upload = {f"{method.capitalize()}Upload": {
        "operationRef": "#/paths/~1uploads~1{upload_id}/" + method,
        "parameters": {"upload_id": "$response.header.Location#regex:/uploads/(.+)$"}}
        for method in ("head", "get", "patch", "delete")}
    document["paths"]["/uploads"]["post"]["responses"]["201"].setdefault("links", {}).update(to_upload)
    # POST /records needs a WAV that decodes, which generated bytes never are (the per-operation
    # test fuzzes it): as a scenario's first step it would only spend the budget on 415s.
    loaded = schemathesis.openapi.from_dict(document).exclude(method="POST", path="/records")
    loaded.config.update(base_url=server.url)
    # Only the document's links: the test shows that they chain create → read → delete.
    loaded.config.phases.stateful.inference.algorithms = []
    # Valid inputs, so that chains get deep; the per-operation test sends the invalid ones.
    loaded.config.phases.stateful.generation.update(modes=[schemathesis.GenerationMode.POSITIVE])
    return loaded


def _new_user(server: Server) -> User:
    async def create() -> User:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
            return await make_user(http)

    return asyncio.run(create())


def test_linked_operations_chain_by_their_contract(server: Server, live_document: dict[str, Any]) -> None:
    before = SEEN.copy()

    class Machine(_stateful_schema(server, live_document).as_state_machine()):  # type: ignore[misc]
        def setup(self) -> None:
            # A new user per scenario: the same inputs meet the same (empty) state, so a PUT to a
            # path is a 201 in every run, never a 200 because an earlier scenario used that path.
            # Hypothesis requires that determinism of a state machine's rules.
            self.user = _new_user(server)

        def get_call_kwargs(self, case: schemathesis.Case) -> dict[str, Any]:
            return {"headers": self.user.auth}

        def validate_response(self, response: schemathesis.Response, case: schemathesis.Case,
                              additional_checks: Any = None, **kwargs: Any) -> None:
            case.validate_response(response, checks=CHECKS, headers=self.user.auth)

    Machine.run(settings=settings(SETTINGS, max_examples=STATEFUL_SCENARIOS, stateful_step_count=STATEFUL_STEPS))
    seen = SEEN - before
    # The links were followed: files were created, then read and deleted through them.
    created = seen[("POST", "/files", 201)] + seen[("PUT", "/files", 201)]
    read = sum(seen[(method, path, 200)] for method, path in (
        ("GET", "/files/{file_id}"), ("GET", "/files/{file_id}/content"), ("HEAD", "/files/{file_id}/content"),
        ("GET", "/download")))
    deleted = seen[("DELETE", "/files/{file_id}", 204)]
    assert created and read and deleted, seen


def test_enough_cases_ran() -> None:
    """The two tests above ran (this file, in order) and together made at least MIN_CASES requests."""
    total = sum(SEEN.values())
    print(f"\n{total} fuzz cases; by answer: {sorted(Counter(status for *_, status in SEEN.elements()).items())}")
    assert total >= MIN_CASES, f"only {total} fuzz cases ran: {SEEN.most_common(10)}"

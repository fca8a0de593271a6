"""Accounts on a network: who may sign up, sign-in throttling, password changes, the security log.

Client addresses are simulated with X-Forwarded-For through a server that trusts its loopback
peer as a proxy (MEDIAD_TRUSTED_PROXIES=127.0.0.1); the shared `server` fixture trusts nobody.
"""

from __future__ import annotations

import asyncio
import json
import socket
import statistics
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import Server, assert_problem, make_settings, make_user, mediad_process, serve_in_thread

from mediad import throttle
from mediad.config import ConfigError, Settings, load_settings

PASSWORD = "correct horse battery"
BLOCK_S = 1.0  # the first block, shortened for the tests (default 60 s)


def addr(n: int) -> dict[str, str]:
    """Headers that make a request come from client address 10.0.<n>.1 (behind the trusted proxy)."""
    return {"X-Forwarded-For": f"203.0.113.7, 10.0.{n}.1"}


def fresh_name() -> str:
    return f"u-{uuid.uuid4().hex[:10]}"


@pytest.fixture(scope="module")
def proxied(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    settings = make_settings(tmp_path_factory.mktemp("proxied"), trusted_proxies="127.0.0.1",
                             signin_block_s=BLOCK_S)
    with serve_in_thread(settings, database_url) as running:
        yield running


@pytest.fixture
async def http(proxied: Server, database_url: str) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=proxied.url, timeout=60) as client:
        yield client


async def login(http: httpx.AsyncClient, name: str, password: str, n: int = 1) -> httpx.Response:
    return await http.post("/auth/login", json={"name": name, "password": password}, headers=addr(n))


async def signed_up(http: httpx.AsyncClient, name: str | None = None) -> dict[str, Any]:
    response = await http.post("/users", json={"name": name or fresh_name(), "password": PASSWORD})
    assert response.status_code == 201, response.text
    return dict(response.json())


def assert_throttled(response: httpx.Response, at_most: float) -> int:
    assert_problem(response, 429)
    wait = int(response.headers["Retry-After"])
    assert 1 <= wait <= at_most, wait
    return wait


# ---- sign-up ------------------------------------------------------------------------------------

@pytest.mark.parametrize(("environ", "is_open"), [
    ({}, True),  # MEDIAD_HOST defaults to 127.0.0.1
    ({"MEDIAD_HOST": "127.0.0.1"}, True),
    ({"MEDIAD_HOST": "::1"}, True),
    ({"MEDIAD_HOST": "localhost"}, True),
    ({"MEDIAD_HOST": "0.0.0.0"}, False),
    ({"MEDIAD_HOST": "::"}, False),
    ({"MEDIAD_HOST": "192.168.1.20"}, False),
    ({"MEDIAD_HOST": "media.example"}, False),
    ({"MEDIAD_HOST": "0.0.0.0", "MEDIAD_SIGNUP": "open"}, True),
    ({"MEDIAD_HOST": "127.0.0.1", "MEDIAD_SIGNUP": "closed"}, False),
])
def test_signup_follows_the_host_unless_set(environ: dict[str, str], is_open: bool) -> None:
    assert load_settings(environ, env_file=None).signup_open is is_open


@pytest.mark.parametrize("variable", ["MEDIAD_SIGNUP=maybe", "MEDIAD_TRUSTED_PROXIES=10.0.0.0/33",
                                      "MEDIAD_TOKEN_TTL_S=0", "MEDIAD_SIGNIN_BLOCK_S=-1"])
def test_bad_account_settings_fail_at_start(variable: str) -> None:
    name, value = variable.split("=")
    with pytest.raises(ConfigError, match=name):
        load_settings({name: value}, env_file=None)


@pytest.mark.parametrize(("overrides", "is_open"), [
    ({}, True),
    ({"host": "0.0.0.0"}, False),
    ({"host": "0.0.0.0", "signup": "open"}, True),
    ({"signup": "closed"}, False),
])
async def test_sign_up_over_http(database_url: str, tmp_path: Path, overrides: dict[str, str],
                                 is_open: bool) -> None:
    # Served on loopback whatever `host` says: only the setting under test differs.
    with serve_in_thread(make_settings(tmp_path / "data", **overrides), database_url) as running:
        async with httpx.AsyncClient(base_url=running.url, timeout=30) as client:
            config = (await client.get("/auth/config")).json()
            response = await client.post("/users", json={"name": fresh_name()})
            document = (await client.get("/openapi.json")).json()
    assert config == {"signup": "open" if is_open else "closed", "token_ttl_s": None, "token_idle_s": None}
    documented = set(document["paths"]["/users"]["post"]["responses"])
    if is_open:
        assert response.status_code == 201, response.text
        assert documented == {"201", "400", "409", "422", "503", "default"}
    else:
        body = assert_problem(response, 403)
        assert body["detail"] == "sign-up is closed; an operator creates accounts with `mediad users create`"
        assert documented == {"403", "default"}


# ---- throttling ---------------------------------------------------------------------------------

async def test_five_failures_block_a_name_even_for_the_right_password(http: httpx.AsyncClient) -> None:
    alice = (await signed_up(http))["name"]
    for n in range(5):  # from five different addresses: the name is what counts
        assert_problem(await login(http, alice, "wrong-password", n), 401)
    wait = assert_throttled(await login(http, alice, PASSWORD, 9), BLOCK_S)
    assert wait == 1
    # Another name from another address is unaffected; so is a name that merely resembles it.
    bob = (await signed_up(http))["name"]
    assert (await login(http, bob, PASSWORD, 20)).status_code == 200
    # The block ends after Retry-After, and then the right password works.
    await asyncio.sleep(wait + 0.1)
    assert (await login(http, alice, PASSWORD, 9)).status_code == 200


async def test_a_name_that_does_not_exist_is_throttled_alike(http: httpx.AsyncClient) -> None:
    ghost = fresh_name()
    alice = (await signed_up(http))["name"]
    for name in (ghost, alice):
        for n in range(5):
            assert_problem(await login(http, name, "wrong-password", n), 401)
    missing, existing = await login(http, ghost, PASSWORD, 30), await login(http, alice, PASSWORD, 31)
    assert_throttled(missing, BLOCK_S)
    assert_throttled(existing, BLOCK_S)
    assert missing.json() == existing.json()


async def test_thirty_failures_from_one_address_block_it(http: httpx.AsyncClient) -> None:
    carol = (await signed_up(http))["name"]
    for i in range(30):  # thirty different names, four failures at most per name
        assert_problem(await login(http, f"ghost-{i // 4}-{uuid.uuid4().hex[:6]}", "wrong-password", 40), 401)
    assert_throttled(await login(http, carol, PASSWORD, 40), BLOCK_S)  # even a right one, for another name
    assert (await login(http, carol, PASSWORD, 41)).status_code == 200  # from elsewhere: fine


async def test_blocks_double(http: httpx.AsyncClient) -> None:
    name = fresh_name()
    waits = []
    for _ in range(3):
        for _ in range(5):
            assert_problem(await login(http, name, "wrong-password", 50), 401)
        waits.append(assert_throttled(await login(http, name, "wrong-password", 51), 4 * BLOCK_S))
        await asyncio.sleep(waits[-1] + 0.1)
    assert waits == [1, 2, 4]


async def test_a_success_resets_the_name(http: httpx.AsyncClient) -> None:
    dave = (await signed_up(http))["name"]
    for _ in range(4):
        assert_problem(await login(http, dave, "wrong-password", 60), 401)
    assert (await login(http, dave, PASSWORD, 60)).status_code == 200
    for _ in range(4):  # four more: still below the limit, the count started over
        assert_problem(await login(http, dave, "wrong-password", 60), 401)
    assert_problem(await login(http, dave, "wrong-password", 60), 401)
    assert_throttled(await login(http, dave, PASSWORD, 60), BLOCK_S)


async def test_concurrent_guesses_cannot_overrun_the_limit(http: httpx.AsyncClient) -> None:
    erin = (await signed_up(http))["name"]
    answers = await asyncio.gather(*(login(http, erin, f"guess-{i:04d}", 70 + i) for i in range(20)))
    assert Counter(r.status_code for r in answers) == {401: 5, 429: 15}


async def test_two_nodes_on_one_database_share_the_counts(proxied: Server, http: httpx.AsyncClient,
                                                          database_url: str, tmp_path: Path) -> None:
    other = make_settings(tmp_path / "node2", trusted_proxies="127.0.0.1", signin_block_s=BLOCK_S)
    frank = (await signed_up(http))["name"]
    with serve_in_thread(other, database_url) as node2:
        async with httpx.AsyncClient(base_url=node2.url, timeout=30) as http2:
            for client in (http, http2, http, http2, http):
                assert_problem(await login(client, frank, "wrong-password", 80), 401)
            assert_throttled(await login(http2, frank, PASSWORD, 81), BLOCK_S)
            assert_throttled(await login(http, frank, PASSWORD, 82), BLOCK_S)


async def test_x_forwarded_for_is_ignored_from_an_untrusted_peer(any_client: httpx.AsyncClient) -> None:
    # The shared servers trust no proxy: every request below comes from 127.0.0.1, whatever it
    # claims, on uvicorn (whose own default would trust X-Forwarded-For from 127.0.0.1) and Granian.
    client = any_client
    for i in range(30):
        response = await client.post("/auth/login", json={"name": fresh_name(), "password": "wrong-password"},
                                     headers=addr(100 + i))
        assert_problem(response, 401)
    user = await make_user(client, password=PASSWORD)
    response = await client.post("/auth/login", json={"name": user.name, "password": PASSWORD},
                                 headers=addr(200))
    assert_throttled(response, 60)


def _scope(peer: str, *forwarded: str) -> dict[str, Any]:
    return {"client": (peer, 50000), "headers": [(b"x-forwarded-for", value.encode()) for value in forwarded]}


@pytest.mark.parametrize(("trusted", "scope", "client"), [
    (None, _scope("127.0.0.1", "10.1.1.1"), "127.0.0.1"),  # trust none: the peer, whatever it claims
    ("127.0.0.1", _scope("127.0.0.1", "6.6.6.6, 10.1.1.1"), "10.1.1.1"),  # the proxy's entry, not the claim
    ("127.0.0.1", _scope("127.0.0.1", "6.6.6.6", "10.1.1.1"), "10.1.1.1"),  # several header lines
    ("10.0.0.0/8, 192.168.0.1", _scope("10.9.8.7", "2001:db8::1"), "2001:db8::1"),
    ("10.0.0.0/8", _scope("192.168.0.1", "10.1.1.1"), "192.168.0.1"),  # peer not trusted
    ("127.0.0.1", _scope("127.0.0.1"), "127.0.0.1"),  # no header: the proxy itself
    ("127.0.0.1", _scope("127.0.0.1", "not-an-address"), "127.0.0.1"),
    # A dual-stack listener sees an IPv4 proxy as ::ffff:a.b.c.d: still the proxy, either way listed.
    ("10.0.0.5", _scope("::ffff:10.0.0.5", "203.0.113.9"), "203.0.113.9"),
    ("10.0.0.0/8", _scope("::ffff:10.9.8.7", "203.0.113.9"), "203.0.113.9"),
    ("::ffff:10.0.0.5", _scope("::ffff:10.0.0.5", "203.0.113.9"), "203.0.113.9"),
    ("10.0.0.5", _scope("::ffff:10.0.0.6", "203.0.113.9"), "::ffff:10.0.0.6"),  # another peer
])
def test_client_address(trusted: str | None, scope: dict[str, Any], client: str) -> None:
    assert throttle.client_address(scope, Settings(trusted_proxies=trusted)) == client


def _dual_stack() -> bool:
    """Whether this machine can listen on [::] for IPv4 too (IPV6_V6ONLY off)."""
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            sock.bind(("::", 0))
    except OSError:
        return False
    return True


async def test_a_proxy_seen_through_a_dual_stack_listener_is_trusted(database_url: str, tmp_path: Path) -> None:
    """`mediad serve --server granian` on MEDIAD_HOST=:: takes IPv4 connections too, their peer
    written ::ffff:127.0.0.1; MEDIAD_TRUSTED_PROXIES=127.0.0.1 must still name that proxy, or every
    client behind it shares one failure count."""
    pytest.importorskip("granian")
    if not _dual_stack():
        pytest.skip("this machine cannot listen on [::] for IPv4 connections")
    env = {"MEDIAD_HOST": "::", "MEDIAD_SIGNUP": "open", "MEDIAD_TRUSTED_PROXIES": "127.0.0.1",
           "MEDIAD_SIGNIN_BLOCK_S": "1"}
    with mediad_process(tmp_path / "data", database_url=database_url, server="granian", env=env) as running:
        async with httpx.AsyncClient(base_url=running.url, timeout=60) as client:  # to 127.0.0.1
            carol = (await signed_up(client))["name"]
            for i in range(30):  # thirty names, from one client behind the proxy
                assert_problem(await login(client, f"ghost-{i // 4}-{uuid.uuid4().hex[:6]}", "wrong-password", 1), 401)
            assert_throttled(await login(client, carol, PASSWORD, 1), BLOCK_S)
            assert (await login(client, carol, PASSWORD, 2)).status_code == 200  # another client: fine


def test_ipv6_clients_count_per_64() -> None:
    assert throttle.address_key("2001:db8:1:2:aaaa::1") == throttle.address_key("2001:db8:1:2:ffff::9")
    assert throttle.address_key("2001:db8:1:2::1") != throttle.address_key("2001:db8:1:3::1")
    assert throttle.address_key("::ffff:10.1.1.1") == throttle.address_key("10.1.1.1") == "addr:10.1.1.1"


async def _seconds(answer: Any) -> float:
    started = time.perf_counter()
    assert_problem(await answer, 401)
    return time.perf_counter() - started


async def _median_seconds(send: Any, times: int = 5) -> float:
    spent = []
    for _ in range(times):
        started = time.perf_counter()
        await send()
        spent.append(time.perf_counter() - started)
    return statistics.median(spent)


async def test_wrong_passwords_cost_the_same_for_known_and_unknown_names(http: httpx.AsyncClient) -> None:
    known = (await signed_up(http))["name"]
    # Four tries per name and address: under every limit, so each one runs scrypt.
    known_times, unknown_times = [], []
    for _ in range(4):  # interleaved, so that the shared machine's load falls on both alike
        known_times.append(await _seconds(login(http, known, "wrong-password", 90)))
        unknown_times.append(await _seconds(login(http, fresh_name(), "wrong-password", 91)))
    known_s, unknown_s = statistics.median(known_times), statistics.median(unknown_times)
    throttled_known = (await _blocked(http, known, 92))
    throttled_unknown = (await _blocked(http, fresh_name(), 93))
    # scrypt dominates a failure (tens of ms); without the dummy hash an unknown name answers ~10×
    # faster. Generous bounds: the machine is shared, but a skipped scrypt is far outside them.
    assert 0.4 < unknown_s / known_s < 2.5, (known_times, unknown_times)
    # A throttled answer is given before the name is looked up, and runs no scrypt: the same
    # fast path whether the name exists or not.
    assert max(throttled_known, throttled_unknown) < known_s / 2, (known_s, throttled_known, throttled_unknown)
    assert 0.2 < throttled_unknown / throttled_known < 5, (throttled_known, throttled_unknown)


async def _blocked(http: httpx.AsyncClient, name: str, n: int) -> float:
    """Block `name`, then the median time of its 429 answers."""
    for _ in range(5):
        await login(http, name, "wrong-password", n)

    async def refused() -> None:
        assert_throttled(await login(http, name, PASSWORD, n), BLOCK_S)

    return await _median_seconds(refused, 5)


# ---- password changes ---------------------------------------------------------------------------

async def test_password_change_keeps_this_token_and_revokes_the_others(http: httpx.AsyncClient) -> None:
    created = await signed_up(http)
    name, first = created["name"], created["token"]
    second = (await login(http, name, PASSWORD)).json()["token"]
    change = {"password": PASSWORD, "new_password": "new horse battery"}
    for wrong in ({**change, "password": "not-the-password"}, {**change, "password": None},
                  {"new_password": "new horse battery"}):
        response = await http.post("/users/me/password", json=wrong, headers=bearer(second))
        assert assert_problem(response, 403)["detail"] == "the current password is wrong"
    assert (await http.post("/users/me/password", json=change, headers=bearer(second))).status_code == 204
    assert (await http.get("/files", headers=bearer(second))).status_code == 200  # kept
    assert_problem(await http.get("/files", headers=bearer(first)), 401)  # revoked
    assert_problem(await login(http, name, PASSWORD), 401)
    assert (await login(http, name, "new horse battery")).status_code == 200


async def test_a_token_only_user_sets_a_first_password(http: httpx.AsyncClient) -> None:
    response = await http.post("/users", json={"name": fresh_name()})
    user = response.json()
    auth = bearer(user["token"])
    refused = await http.post("/users/me/password", json={"password": "made-up-one", "new_password": PASSWORD},
                              headers=auth)
    assert_problem(refused, 403)
    assert_problem(await http.post("/users/me/password", json={"password": None, "new_password": "short"},
                                   headers=auth), 422)
    response = await http.post("/users/me/password", json={"password": None, "new_password": PASSWORD}, headers=auth)
    assert response.status_code == 204
    assert (await login(http, user["name"], PASSWORD)).status_code == 200
    assert_problem(await http.post("/users/me/password", json={"new_password": PASSWORD}), 401)


async def test_wrong_current_passwords_count_as_failed_sign_ins(http: httpx.AsyncClient) -> None:
    created = await signed_up(http)
    auth = {**bearer(created["token"]), **addr(110)}
    for _ in range(5):
        response = await http.post("/users/me/password", json={"password": "guess-guess", "new_password": PASSWORD},
                                   headers=auth)
        assert_problem(response, 403)
    response = await http.post("/users/me/password", json={"password": PASSWORD, "new_password": "new horse battery"},
                               headers=auth)
    assert_throttled(response, BLOCK_S)
    assert_throttled(await login(http, created["name"], PASSWORD, 111), BLOCK_S)


async def test_wrong_passwords_deleting_the_account_count_as_failed_sign_ins(http: httpx.AsyncClient) -> None:
    """A token alone must not allow unthrottled guessing of the account's password."""
    created = await signed_up(http)
    auth = {**bearer(created["token"]), **addr(115)}
    for _ in range(5):
        response = await http.request("DELETE", "/users/me", json={"password": "guess-guess"}, headers=auth)
        assert_problem(response, 403)
    wait = assert_throttled(await http.request("DELETE", "/users/me", json={"password": PASSWORD}, headers=auth),
                            BLOCK_S)
    assert_throttled(await login(http, created["name"], PASSWORD, 116), BLOCK_S)  # the name is blocked
    assert (await http.get("/users/me", headers=auth)).status_code == 200  # nothing was deleted
    await asyncio.sleep(wait + 0.1)
    assert (await http.request("DELETE", "/users/me", json={"password": PASSWORD}, headers=auth)).status_code == 204
    assert_problem(await login(http, created["name"], PASSWORD, 117), 401)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


# ---- the security log ---------------------------------------------------------------------------

def security_lines(log_path: Path) -> list[dict[str, Any]]:
    lines = []
    for line in log_path.read_text(errors="replace").splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if entry.get("logger") == "mediad.security":
            lines.append(entry)
    return lines


def test_security_events_are_logged_once_without_secrets(database_url: str, tmp_path: Path) -> None:
    log_path = tmp_path / "mediad.log"
    env = {"MEDIAD_TRUSTED_PROXIES": "127.0.0.1", "MEDIAD_SIGNIN_BLOCK_S": "1"}
    name, new_password, wrong = fresh_name(), "brand new secret 42", "wrong secret 17"
    with mediad_process(tmp_path / "data", database_url=database_url, env=env, log_path=log_path) as running:
        with httpx.Client(base_url=running.url, timeout=30, headers=addr(7)) as client:
            created = client.post("/users", json={"name": name, "password": PASSWORD},
                                  headers={"X-Request-Id": "req-signup"}).json()
            signed_in = client.post("/auth/login", json={"name": name, "password": PASSWORD},
                                    headers={"X-Request-Id": "req-login"}).json()
            refused = client.post("/users/me/password", json={"password": wrong, "new_password": new_password},
                                  headers={**bearer(created["token"]), "X-Request-Id": "req-refused"})
            changed = client.post("/users/me/password", json={"password": PASSWORD, "new_password": new_password},
                                  headers={**bearer(created["token"]), "X-Request-Id": "req-change"})
            for i in range(5):  # the change's success reset the name: five failures, a block
                client.post("/auth/login", json={"name": name, "password": wrong},
                            headers={"X-Request-Id": f"req-fail-{i}"})
            throttled = client.post("/auth/login", json={"name": name, "password": new_password},
                                    headers={"X-Request-Id": "req-throttled"})
            signed_out = client.delete("/auth/token", headers={**bearer(created["token"]),
                                                               "X-Request-Id": "req-signout"})
    assert (refused.status_code, changed.status_code, throttled.status_code, signed_out.status_code) == (
        403, 204, 429, 204)
    user_id = created["id"]
    events = security_lines(log_path)
    assert Counter(e["event"] for e in events) == {
        "user.created": 1, "token.created": 2, "signin.success": 1, "password.change_refused": 1,
        "password.changed": 1, "token.revoked": 2, "signin.failure": 5, "signin.blocked": 1,
        "signin.throttled": 1}
    for entry in events:
        assert entry["client"] == "10.0.7.1", entry
        assert entry["request_id"].startswith("req-"), entry
        assert entry["msg"] == entry["event"]
        assert entry.get("user_id") == user_id or entry.get("user_name") == name, entry
    by_request = {e["request_id"]: e for e in events if e["event"] not in ("token.created", "user.created")}
    assert by_request["req-login"]["event"] == "signin.success"
    assert by_request["req-change"]["event"] in ("password.changed", "token.revoked")
    revoked = next(e for e in events if e["event"] == "token.revoked")
    assert (revoked["tokens"], revoked["request_id"]) == (1, "req-change")
    assert (by_request["req-signout"]["event"], by_request["req-signout"]["via"]) == ("token.revoked", "sign-out")
    blocked = next(e for e in events if e["event"] == "signin.blocked")
    assert (blocked["by"], blocked["block_s"], blocked["request_id"]) == ("name", 1, "req-fail-4")
    assert next(e for e in events if e["event"] == "signin.throttled")["retry_after"] == 1
    # No password and no token anywhere in the server's whole log output.
    text = log_path.read_text(errors="replace")
    for secret in (PASSWORD, new_password, wrong, created["token"], signed_in["token"]):
        assert secret not in text
    assert "sign-up is open: MEDIAD_HOST=127.0.0.1 is a loopback address" in text

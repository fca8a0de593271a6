"""The web app on a server whose sign-up is closed: sign-in only, then a password change."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import Server, fresh_database, make_settings, mediad_process, serve_in_thread

expect = pytest.importorskip(
    "playwright.sync_api", reason="Playwright for Python is missing: pip install -e '.[test]'").expect

PASSWORD = "correct horse battery"
NEW_PASSWORD = "a new horse battery"


@pytest.fixture(scope="module")
def closed_server(pg_server_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """`mediad serve` with MEDIAD_SIGNUP=closed on a database of its own (it migrates it). Set up
    before the browser and torn down after it: creating and dropping the database runs asyncio,
    which cannot run while Playwright's sync API holds this thread's loop."""
    root = tmp_path_factory.mktemp("closed")
    with fresh_database(pg_server_url) as url, \
            mediad_process(root / "data", database_url=url, env={"MEDIAD_SIGNUP": "closed"},
                           log_path=root / "mediad.log") as running:
        yield running


def test_closed_sign_up_shows_sign_in_only_and_the_password_form_works(
        closed_server: Server, page: Any, tmp_path: Path) -> None:
    # The account comes from an operator; here, from another node on the same database whose
    # sign-up is open.
    with serve_in_thread(make_settings(tmp_path / "open-node"), closed_server.database_url) as open_node:
        created = httpx.post(open_node.url + "/users", json={"name": "olga", "password": PASSWORD}).json()
    assert httpx.post(closed_server.url + "/users", json={"name": "mallory"}).status_code == 403

    page.goto(closed_server.url + "/")
    expect(page.locator("#auth-closed")).to_be_visible()
    expect(page.locator("#auth-title")).to_have_text("Sign in")
    expect(page.get_by_role("button", name="Create account")).to_be_hidden()
    expect(page.locator("#sign-up")).to_be_hidden()

    page.get_by_label("Name", exact=True).fill("olga")
    page.get_by_label("Password", exact=True).fill(PASSWORD)
    page.get_by_role("button", name="Sign in").click()
    expect(page.locator("#workspace")).to_be_visible()

    page.get_by_label("Current password", exact=True).fill("not the password")
    page.get_by_label("New password", exact=True).fill(NEW_PASSWORD)
    page.get_by_role("button", name="Change password").click()
    expect(page.locator("#alert")).to_contain_text("Could not change the password: the current password is wrong")

    page.get_by_label("Current password", exact=True).fill(PASSWORD)
    page.get_by_label("New password", exact=True).fill(NEW_PASSWORD)
    page.get_by_role("button", name="Change password").click()
    expect(page.locator("#password-status")).to_have_text(
        "Password changed. Every other session of this account was signed out.")
    expect(page.get_by_label("Current password", exact=True)).to_have_value("")
    # The sign-up token was another session: revoked. The page's own still works.
    headers = {"Authorization": f"Bearer {created['token']}"}
    assert httpx.get(closed_server.url + "/files", headers=headers).status_code == 401
    page_token = page.evaluate("() => sessionStorage.getItem('mediad.token')")
    assert httpx.get(closed_server.url + "/files", headers={"Authorization": f"Bearer {page_token}"}).status_code == 200

    page.get_by_role("button", name="Sign out").click()
    page.get_by_label("Name", exact=True).fill("olga")
    page.get_by_label("Password", exact=True).fill(NEW_PASSWORD)
    page.get_by_role("button", name="Sign in").click()
    expect(page.locator("#workspace")).to_be_visible()

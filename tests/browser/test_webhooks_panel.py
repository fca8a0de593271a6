"""The web app's webhooks panel: add an endpoint (its secret shown once), see a delivery, remove it."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Receiver, Server, mediad_process

from .conftest import sign_up

expect = pytest.importorskip(
    "playwright.sync_api", reason="Playwright for Python is missing: pip install -e '.[test]'").expect


@pytest.fixture(scope="module")
def hooks_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("web-hooks")
    with mediad_process(root / "data", database_url=None, log_path=root / "mediad.log",
                        env={"MEDIAD_WEBHOOK_ALLOW_PRIVATE": "true", "MEDIAD_WEBHOOK_POLL_S": "0.5"}) as running:
        yield running


def test_add_a_webhook_see_its_delivery_and_remove_it(page: Any, hooks_server: Server, receiver: Receiver,
                                                     tmp_path: Path) -> None:
    sign_up(page, hooks_server.url, "hooked")
    page.get_by_label("Endpoint URL").fill(receiver.url("/hook"))
    page.get_by_label("file.created").check()
    page.get_by_role("button", name="Add webhook").click()
    secret_box = page.get_by_label("Signing secret — copy it now, it is not shown again")
    expect(secret_box).to_be_visible()
    secret = secret_box.input_value()
    assert secret.startswith("whsec_")
    receiver.secrets["/hook"] = secret
    item = page.locator("#hooks li")
    expect(item).to_have_count(1)
    expect(item).to_contain_text(receiver.url("/hook"))
    expect(item).to_contain_text("file.created")
    page.get_by_role("button", name="I have copied it").click()
    expect(secret_box).to_be_hidden()

    (tmp_path / "hello.txt").write_bytes(b"hello webhooks\n")
    page.locator("#file-input").set_input_files(str(tmp_path / "hello.txt"))
    expect(page.locator('#uploads li[data-name="hello.txt"]')).to_have_attribute("data-state", "done")
    deadline = time.monotonic() + 20
    while not receiver.received and time.monotonic() < deadline:
        time.sleep(0.1)
    [got] = receiver.received
    assert got.verified and got.event["type"] == "file.created" and got.event["data"]["file"]["name"] == "hello.txt"

    item.get_by_role("button", name="Deliveries").click()
    row = item.locator(".deliveries tbody tr")
    expect(row).to_have_count(1)
    expect(row).to_contain_text("file.created")
    expect(row).to_contain_text("delivered")

    item.get_by_role("button", name="Remove").click()
    page.locator("#confirm-ok").click()
    expect(page.locator("#hooks li")).to_have_count(0)
    expect(page.locator("#hooks-status")).to_have_text("No webhooks yet.")

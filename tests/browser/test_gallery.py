"""The grid view in Chromium: thumbnails through signed thumbnail links, a duration on the video,
dimensions on the photo, the details dialog by keyboard, and a layout that fits 375 px."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import media_samples as samples
import pytest
from conftest import Server

from .conftest import sign_up, watched_page

expect = pytest.importorskip(
    "playwright.sync_api", reason="Playwright for Python is missing: pip install -e '.[test]'").expect
# Probing starts a worker process on first use; on a loaded machine that alone can take seconds.
PROBED_MS = 30_000


def _upload_samples(page: Any, tmp_path: Path) -> None:
    clip, photo = tmp_path / "clip.mp4", tmp_path / "photo.jpg"
    clip.write_bytes(samples.video(seconds=3.0))
    photo.write_bytes(samples.photo(width=400, height=300, orientation=6))
    page.locator("#file-input").set_input_files([str(clip), str(photo)])
    for name in ("clip.mp4", "photo.jpg"):
        expect(page.locator(f'#uploads li[data-name="{name}"]')).to_have_attribute("data-state", "done")


def test_the_grid_shows_thumbnails_durations_and_details(page: Any, web_server: Server, tmp_path: Path) -> None:
    sign_up(page, web_server.url, "gallery-owner")
    _upload_samples(page, tmp_path)
    page.get_by_role("button", name="Grid").click()
    expect(page.locator("#files")).to_be_hidden()
    clip = page.locator("#gallery li", has_text="clip.mp4")
    photo = page.locator("#gallery li", has_text="photo.jpg")
    # The grid re-lists while probing runs, until every file is read.
    expect(clip.locator(".tile-meta")).to_have_text("0:03", timeout=PROBED_MS)
    expect(photo.locator(".tile-meta")).to_have_text("300×400", timeout=PROBED_MS)
    for tile in (clip, photo):
        picture = tile.locator(".picture img")
        expect(picture).to_have_attribute("src", re.compile(r"/thumbnail\?size=256&.*signature="))
        page.wait_for_function("(img) => img.complete && img.naturalWidth > 0", arg=picture.element_handle())
    assert page.evaluate("() => document.querySelector('#gallery li img').naturalHeight") <= 256

    # Keyboard: the tile is a button; Enter opens its details, Escape closes them.
    photo.locator("button.tile").focus()
    page.keyboard.press("Enter")
    details = page.locator("#details")
    expect(details).to_be_visible()
    expect(details.locator("dl")).to_contain_text("300 × 400 px")
    expect(details.locator("dl")).to_contain_text("Canon EOS R5")
    assert "GPS" not in details.inner_text()
    page.keyboard.press("Escape")
    expect(details).to_be_hidden()
    clip.locator("button.tile").click()
    expect(details.locator("dl")).to_contain_text("h264")
    expect(details.locator("dl")).to_contain_text("0:03")
    details.get_by_role("button", name="Close").click()

    # The choice is remembered: a reload shows the grid again.
    page.reload()
    expect(page.locator("#gallery li")).to_have_count(2)


def test_the_grid_fits_a_narrow_phone(browser: Any, web_server: Server, tmp_path: Path) -> None:
    with watched_page(browser, tmp_path / "narrow.png") as page:
        page.set_viewport_size({"width": 375, "height": 800})
        sign_up(page, web_server.url, "gallery-phone")
        _upload_samples(page, tmp_path)
        page.get_by_role("button", name="Grid").click()
        expect(page.locator("#gallery li")).to_have_count(2)
        expect(page.locator("#gallery li", has_text="clip.mp4").locator(".tile-meta")).to_have_text(
            "0:03", timeout=PROBED_MS)
        assert page.evaluate("() => document.documentElement.scrollWidth") <= 375
        boxes = [page.locator("#gallery li").nth(i).bounding_box() for i in range(2)]
        assert boxes[0]["y"] == boxes[1]["y"]  # two tiles side by side

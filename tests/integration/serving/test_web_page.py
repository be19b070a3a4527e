"""The web page in a real headless Chromium: upload an image, see the overlay and the result."""

from __future__ import annotations

from pathlib import Path

import pytest
from playwright.sync_api import sync_playwright

CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: install Debian's chromium (make dev does)")
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        yield launched
        launched.close()


@pytest.mark.parametrize(
    ("task", "expected"), [("count", "flowers"), ("segment", "% buildings")], ids=["count", "segment"]
)
def test_upload_shows_the_overlay_and_the_result(browser, server, images, tmp_path, task, expected) -> None:
    picture = tmp_path / "upload.png"
    picture.write_bytes(
        images.png(images.field(1, 120, 160, 9) if task == "count" else images.aerial(1, 120, 160))
    )
    page = browser.new_page()
    try:
        page.goto(server.url + "/")
        page.set_input_files("#file", str(picture))
        page.select_option("#task", task)
        page.click("#run")
        page.wait_for_function(
            "document.getElementById('result-image').naturalWidth > 0"
            " && document.getElementById('result-image').style.display === 'block'",
            timeout=30_000,
        )
        assert page.eval_on_selector("#result-image", "img => img.naturalWidth") == 160
        assert page.eval_on_selector("#result-image", "img => img.naturalHeight") == 120
        assert page.eval_on_selector("#result-image", "img => img.src").startswith("data:image/png;base64,")
        assert expected in page.inner_text("#result-text")
        assert "version local-" in page.inner_text("#result-model")
    finally:
        page.close()


def test_an_error_is_shown_not_swallowed(browser, server, tmp_path) -> None:
    bogus = tmp_path / "notes.png"
    bogus.write_bytes(b"this is not an image")
    page = browser.new_page()
    try:
        page.goto(server.url + "/")
        page.set_input_files("#file", str(bogus))
        page.click("#run")
        page.wait_for_selector("#result-text.error", timeout=30_000)
        assert "error 415" in page.inner_text("#result-text")
    finally:
        page.close()

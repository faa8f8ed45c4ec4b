"""The playground page of `charlstm serve` in a real headless Chromium (through Playwright):
the model card, a streamed generation that grows on the page, and the Stop button.

The browser is the system's Chromium (.ci/run installs it where it can); without one the test
skips and says so."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_server import Server, start_server, wait_idle

playwright_api = pytest.importorskip("playwright.sync_api")

# The first browser found: $CHARLSTM_CHROMIUM, then the usual names of Chromium and Chrome.
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
# Headless and quiet: no sandbox (containers run as root), no GPU, nothing fetched by the
# browser itself, so the page's own requests are the only ones.
ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
TIMEOUT_MS = 30_000


def find_browser() -> str | None:
    given = os.environ.get("CHARLSTM_CHROMIUM")
    if given:
        return given
    return next((path for path in map(shutil.which, BROWSERS) if path), None)


BROWSER = find_browser()
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        BROWSER is None,
        reason="no Chromium or Chrome on this machine (install the chromium package, or set "
        "CHARLSTM_CHROMIUM to a browser binary)",
    ),
]


@pytest.fixture(scope="module")
def server(trained_run: Path, session_data_dir: Path) -> Iterator[Server]:
    """A server that accepts generations long enough to be stopped by hand."""
    yield from start_server(trained_run, session_data_dir, "--max-tokens", "1000000")


@pytest.fixture
def page(server: Server) -> Iterator[playwright_api.Page]:
    with playwright_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=BROWSER, args=ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            page.set_default_timeout(TIMEOUT_MS)
            yield page
        finally:
            browser.close()


def generated_length(page: playwright_api.Page) -> int:
    return page.evaluate("document.getElementById('generated').textContent.length")


def set_slider(page: playwright_api.Page, slider: str, value: str) -> None:
    """Move a range input as a user would: its value, then the input event."""
    page.eval_on_selector(
        f"#{slider}",
        "(el, value) => { el.value = value === 'max' ? el.max : value; "
        "el.dispatchEvent(new Event('input')); }",
        value,
    )


def test_generate_streams_and_stop_stops(
    server: Server, page: playwright_api.Page, tmp_path: Path
) -> None:
    expect = playwright_api.expect
    requests: list[str] = []
    page.on("request", lambda request: requests.append(request.url))
    page.goto(f"{server.url}/")

    # The model card, with the run's loss curves.
    expect(page.locator("#model-name")).to_have_text("tiny")
    expect(page.locator("#card-cell")).to_have_text("LSTM")
    expect(page.locator("#card-layers")).to_have_text("2 \u00d7 64")  # 2 x 64
    expect(page.locator("#card-bpc")).to_contain_text("bpc")
    page.wait_for_function("document.getElementById('card-curves').naturalWidth > 0")

    # A generation far too long to finish: it streams until Stop.
    page.fill("#prompt", "ROMEO:")
    page.fill("#seed", "42")
    set_slider(page, "length", "max")
    expect(page.locator("#length-value")).to_have_text("1000000")
    page.click("#generate")
    page.wait_for_function("document.getElementById('generated').textContent.length > 0")
    first = generated_length(page)
    page.wait_for_function(
        f"document.getElementById('generated').textContent.length > {first + 200}"
    )
    assert generated_length(page) > first  # it grew while we watched
    expect(page.locator("#stop")).to_be_enabled()
    page.screenshot(path=tmp_path / "streaming.png")

    page.click("#stop")
    expect(page.locator("#status")).to_contain_text("stopped")
    expect(page.locator("#generate")).to_be_enabled()
    stopped = generated_length(page)
    time.sleep(0.5)
    assert generated_length(page) == stopped  # nothing more arrives
    wait_idle(server)  # the server cancelled the sequence when the browser let go

    # A whole generation, to its end.
    set_slider(page, "length", "600")
    set_slider(page, "temperature", "0.7")
    page.click("#generate")
    expect(page.locator("#status")).to_contain_text("600 characters in")
    expect(page.locator("#status")).to_contain_text("length")
    assert generated_length(page) == 600
    page.screenshot(path=tmp_path / "playground.png")

    assert all(url.startswith(server.url) for url in requests), requests  # works offline

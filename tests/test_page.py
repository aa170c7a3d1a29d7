"""The web page in a real headless Chromium (Debian's, driven by playwright): type a query, see images load."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from fashionbert.catalog.readers import open_catalog
from fashionbert.runtime.exported import ExportedModel
from fashionbert.index.build import build

from .test_service import Server

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


@pytest.fixture(scope="module")
def server(tiny_model_dir, demo_catalog, tmp_path_factory):
    index = tmp_path_factory.mktemp("page") / "index"
    build(ExportedModel(tiny_model_dir), open_catalog(demo_catalog), index, progress=False)
    s = Server(tiny_model_dir, index).start()
    yield s
    s.stop()


def test_typing_a_query_shows_result_images(server, demo_catalog, tmp_path):
    from playwright.sync_api import sync_playwright

    assert Path(CHROMIUM).exists(), "Debian's chromium is missing: `make install` installs it"
    caption = next(open_catalog(demo_catalog).items()).caption
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run", "--disable-quic"])
        try:
            page = browser.new_page()
            page.goto(server.url + "/", timeout=30000)
            page.fill("#q", caption)
            page.click("button[type=submit]")
            page.wait_for_selector("#results .card img", timeout=30000)
            # Every result image decodes (naturalWidth > 0 once loaded).
            page.wait_for_function("""() => {
                const imgs = [...document.querySelectorAll('#results .card img')];
                return imgs.length > 0 && imgs.every(i => i.complete && i.naturalWidth === 256);
            }""", timeout=30000)
            cards = page.locator("#results .card")
            assert cards.count() == 24
            status = page.inner_text("#status")
            assert "24 results" in status and "top 20 reranked" in status and "rerank " in status  # the stage timing
            assert page.locator("#results .card .scores").first.inner_text().startswith("score ")
            page.screenshot(path=str(tmp_path / "page.png"))

            page.fill("#q", "")
            page.click("button[type=submit]")
            assert "Type what you are looking for" in page.inner_text("#status")
        finally:
            browser.close()

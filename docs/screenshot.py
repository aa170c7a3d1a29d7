"""Screenshot of the search page for the README: a running server, one query, Debian's chromium.

    .venv/bin/python docs/screenshot.py --url http://127.0.0.1:8000 --query "navy striped long sleeve shirt with a spread collar"

Prints the result names in page order, so the README can say what the picture shows.
"""

from __future__ import annotations

import argparse
import shutil


def main() -> None:
    from playwright.sync_api import sync_playwright

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--query", default="navy striped long sleeve shirt with a spread collar")
    ap.add_argument("--out", default="docs/page.png")
    args = ap.parse_args()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=shutil.which("chromium") or "/usr/bin/chromium",
                                    args=["--no-sandbox", "--disable-gpu", "--no-first-run"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(args.url + "/", timeout=30000)
            page.fill("#q", args.query)
            page.click("button[type=submit]")
            page.wait_for_function("""() => {
                const imgs = [...document.querySelectorAll('#results .card img')];
                return imgs.length > 0 && imgs.every(i => i.complete && i.naturalWidth > 0);
            }""", timeout=30000)
            print(page.inner_text("#status"))
            for name in page.locator("#results .card .name").all_inner_texts()[:10]:
                print(name)  # "rank. name"
            page.screenshot(path=args.out)
        finally:
            browser.close()


if __name__ == "__main__":
    main()

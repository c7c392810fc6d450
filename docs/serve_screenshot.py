"""Draw docs/serve.png: the page of a running `jaxcell serve` after a few uploads, in headless Chromium.

    jaxcell serve --workdir runs/r &
    python docs/serve_screenshot.py http://127.0.0.1:8000/ docs/serve.png image1.jpg image2.png ...

The images are uploaded one after another (the newest answer is drawn on top), and the page is captured
whole once every answer is in.
"""

import sys

from playwright.sync_api import expect, sync_playwright


def main(url: str, out: str, images: list[str]) -> None:
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1100, "height": 900})
        page.goto(url)
        expect(page.locator("#card-body table")).to_be_visible()
        for image in images:
            page.set_input_files("#files", image)
            expect(page.locator(".result").first.locator(".status")).to_be_hidden(timeout=120_000)
        page.screenshot(path=out, full_page=True)
        browser.close()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])

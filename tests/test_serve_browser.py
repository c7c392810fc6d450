"""The page of `jaxcell serve` in a real browser: Playwright drives Debian's headless Chromium (no
browser can be downloaded here, so it is launched by its path) against the server on loopback."""

import os
import re

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi", reason="jaxcell serve needs the serve extra: pip install -e '.[serve]'")
pytest.importorskip("playwright.sync_api", reason="the browser test needs playwright (the test extra)")

from conftest import dev_data_path  # noqa: E402
from test_serve import engine, serve_workdir, server, smear  # noqa: E402,F401  (fixtures shared with the API tests)

pytestmark = pytest.mark.integration

CHROMIUM = "/usr/bin/chromium"


def a_real_image(tmp_path) -> str:
    """An image of the real data when it is beside the checkout, else a synthetic smear."""
    for root, _, files in sorted(os.walk(dev_data_path())):
        for name in sorted(files):
            if name.lower().endswith((".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")):
                return os.path.join(root, name)
    path = tmp_path / "smear.png"
    path.write_bytes(smear(0, 96))
    return str(path)


def answer_for(engine, path: str) -> dict:
    """What the server's program answers for one file (without HTTP)."""
    from jaxcell.data.images import load_image

    image = load_image(path, engine.predictor.image_size)
    (future,) = engine.submit(image[None])
    return future.result(timeout=60)[0]


def a_flagged_image(engine, tmp_path) -> str:
    """The first of a few plainly foreign pictures that the run's detector flags."""
    rng = np.random.default_rng(0)
    candidates = {"noise": rng.integers(0, 256, (96, 96, 3), dtype=np.uint8),
                  "green": np.tile(np.array([20, 200, 40], np.uint8), (96, 96, 1)),
                  "stripes": np.where((np.arange(96) // 6 % 2)[None, :, None], 255, 0).repeat(96, 0).repeat(3, 2)
                  .astype(np.uint8)}
    for name, array in candidates.items():
        path = tmp_path / f"foreign-{name}.png"
        Image.fromarray(array).save(path)
        if answer_for(engine, str(path))["in_distribution"] is False:
            return str(path)
    pytest.fail(f"the detector flags none of {', '.join(candidates)}")


def test_the_page_shows_answers_errors_and_the_warning_in_chromium(server, engine, tmp_path):
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} not found: install Debian's chromium (apt-get install -y chromium, or make chromium)")
    from playwright.sync_api import expect, sync_playwright

    real = a_real_image(tmp_path)
    real_answer = answer_for(engine, real)
    text = tmp_path / "notes.jpg"
    text.write_text("a text file, named like a picture\n")
    flagged = a_flagged_image(engine, tmp_path)

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 900})
            page.goto(server)
            expect(page.locator("#notice")).to_contain_text("not a diagnostic device")
            expect(page.locator("#card-body table")).to_contain_text("lightnetcell")
            expect(page.locator("#card-body table")).to_contain_text("threshold")

            page.set_input_files("#files", real)
            item = page.locator(".result").first
            expect(item.locator(".class")).to_have_text(real_answer["class"])
            expect(item.locator(".bar")).to_have_count(len(engine.predictor.class_names))
            overlay = item.locator("img.overlay")
            expect(overlay).to_have_attribute("src", re.compile(r"^data:image/png;base64,"))
            page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=overlay.element_handle())
            expect(item.locator(".ood-warning")).to_be_visible(visible=real_answer["in_distribution"] is False)

            page.set_input_files("#files", str(text))
            item = page.locator(".result").first
            expect(item.locator(".error")).to_contain_text("not an image file (PIL cannot identify it): notes.jpg")
            expect(item.locator(".bar")).to_have_count(0)

            page.set_input_files("#files", flagged)
            item = page.locator(".result").first
            expect(item.locator(".ood-warning")).to_be_visible()
            expect(item.locator(".ood-warning")).to_contain_text("unlike the images the model was trained on")
            expect(item.locator(".bar")).to_have_count(len(engine.predictor.class_names))
            page.screenshot(path=str(tmp_path / "serve.png"), full_page=True)
        finally:
            browser.close()

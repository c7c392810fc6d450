"""`jaxcell report`: one self-contained HTML page whose every figure renders in a real browser,
and `jaxcell predict --cam`."""

import base64
import os
import re
import subprocess

import numpy as np
import pytest
from PIL import Image

from jaxcell.cli import main
from test_evaluate import trained_workdir

CHROMIUM = "/usr/bin/chromium"
# The tiny run has an out-of-distribution detector (train fits one), so its score figure is there too.
FIGURES = ["confusion", "roc", "reliability", "training", "ood", "gradcam_right", "gradcam_wrong"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return trained_workdir(tmp_path_factory, 16, "(8,16,16)")


@pytest.fixture(scope="module")
def report(workdir, tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "report.html"
    assert main(["report", "--workdir", workdir, "--out", str(out), "--cams", "3"]) == 0
    return out


def test_the_page_is_self_contained_and_matches_the_png_files(report):
    page = report.read_text()
    sources = re.findall(r'<img [^>]*src="([^"]+)"', page)
    assert len(sources) == len(FIGURES)  # a tiny model gets some right and some wrong
    for key, src in zip(FIGURES, sources):
        assert src.startswith("data:image/png;base64,")
        png = report.parent / f"report_{key}.png"
        assert base64.b64decode(src.split(",", 1)[1]) == png.read_bytes()
        with Image.open(png) as im:
            assert im.format == "PNG" and im.width > 100 and im.height > 100
    # Nothing is fetched from elsewhere.
    assert not re.search(r'(src|href)="(?!data:)', page) and "<link" not in page and "<script" not in page
    for text in ("accuracy", "95% CI", "weighted F1", "ROC-AUC", "ECE", "patient"):
        assert text in page


@pytest.mark.integration
def test_every_figure_renders_in_headless_chromium(report, tmp_path):
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} not found: install Debian's chromium (apt-get install -y chromium)")
    # A copy with a probe that writes what the browser decoded into the DOM once the page has loaded.
    probe = ("<script>window.addEventListener('load', () => { document.body.setAttribute('data-rendered', "
             "Array.from(document.images).map(i => i.complete + ':' + i.naturalWidth + 'x' + i.naturalHeight)"
             ".join(' ')); });</script>")
    page = tmp_path / "probe.html"
    page.write_text(report.read_text().replace("</body>", probe + "</body>"))
    run = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
         "--virtual-time-budget=5000", "--dump-dom", page.as_uri()],
        capture_output=True, text=True, timeout=120)
    found = re.search(r'data-rendered="([^"]*)"', run.stdout)
    assert found, f"no probe output; chromium said: {run.stderr[-2000:]}"
    rendered = found.group(1).split()
    assert len(rendered) == len(FIGURES)
    for item, key in zip(rendered, FIGURES):
        complete, size = item.split(":")
        width, height = (int(v) for v in size.split("x"))
        with Image.open(report.parent / f"report_{key}.png") as im:
            assert complete == "true" and (width, height) == im.size, key


def test_report_refuses_a_non_html_name(workdir, tmp_path, capsys):
    assert main(["report", "--workdir", workdir, "--out", str(tmp_path / "r.pdf")]) == 2
    assert "HTML" in capsys.readouterr().err


def test_predict_writes_cam_overlays(workdir, tmp_path, capsys):
    import json

    rng = np.random.default_rng(0)
    files = []
    for i, size in enumerate((16, 30)):
        path = tmp_path / f"cell{i}.png"
        Image.fromarray(rng.integers(0, 255, (size, size, 3), np.uint8)).save(path)
        files.append(str(path))
    out = tmp_path / "cams"
    assert main(["predict", "--workdir", workdir, "--cam", str(out), *files]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert [line["file"] for line in lines] == files
    for line in lines:
        with Image.open(line["cam"]) as im:
            assert im.size == (16, 16) and im.mode == "RGB"  # the model's input size
    assert sorted(os.listdir(out)) == ["0000_cell0_cam.png", "0001_cell1_cam.png"]
    assert main(["predict", "--workdir", workdir, "--cam", str(out), "--cam-layer", "nope", files[0]]) == 2
    assert "no layer 'nope'" in capsys.readouterr().err

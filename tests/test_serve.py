"""`jaxcell serve`: the API against a tiny trained run, each bad input, the token, the refusal to
listen beyond loopback without one, and the persistent compilation cache."""

import io
import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi", reason="jaxcell serve needs the serve extra: pip install -e '.[serve]'")
from fastapi.testclient import TestClient  # noqa: E402

from test_evaluate import trained_workdir  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def smear(seed: int = 0, size: int = 40) -> bytes:
    """A synthetic smear image as PNG bytes."""
    from jaxcell.data import synthetic

    images, _ = synthetic.make_smears(4, size, seed=seed)
    return png_bytes(np.asarray(images[seed % 4]))


def bomb_png(side: int = 30000) -> bytes:
    """A real, valid side x side one-bit PNG of about 100 KB that decodes to side^2 pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\x00" * (1 + (side + 7) // 8)  # filter byte + packed bits
    packer = zlib.compressobj(9)
    body = b"".join(packer.compress(row) for _ in range(side)) + packer.flush()
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", body) + chunk(b"IEND", b""))


@pytest.fixture(scope="session")
def serve_workdir(tmp_path_factory):
    return trained_workdir(tmp_path_factory, 16, "(8,16,16)")


@pytest.fixture(scope="session")
def engine(serve_workdir):
    from jaxcell.inference import Predictor
    from jaxcell.serve.engine import Engine

    engine = Engine(Predictor.load(serve_workdir, fit_temperature=True), batch_size=4, max_wait_ms=5)
    yield engine
    engine.close()


def make_app(engine, **kwargs):
    from jaxcell.serve.app import create_app
    from jaxcell.serve.card import model_card

    return create_app(engine, model_card(engine.predictor, engine.startup), **kwargs)


@pytest.fixture(scope="session")
def client(engine):
    with TestClient(make_app(engine, max_upload_bytes=2**20)) as c:
        yield c


@pytest.fixture(scope="session")
def server(engine):
    """The app on a real uvicorn server on loopback, a free port, in a thread of this process."""
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = uvicorn.Config(make_app(engine), host="127.0.0.1", port=port, log_level="warning")
    instance = uvicorn.Server(config)
    thread = threading.Thread(target=instance.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not instance.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    instance.should_exit = True
    thread.join(timeout=10)


def test_predict_answers_each_image_with_calibrated_probabilities_and_an_overlay(client, engine):
    r = client.post("/predict", files=[("image", ("one.png", smear(0), "image/png")),
                                       ("image", ("two.png", smear(1, 64), "image/png"))])
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [a["file"] for a in results] == ["one.png", "two.png"]
    names = engine.predictor.class_names
    for a in results:
        # fit_temperature: the tiny run's data is synthetic, always there to fit it on
        for p in (a["probabilities"], a["calibrated_probabilities"]):
            assert set(p) == set(names) and sum(p.values()) == pytest.approx(1, abs=1e-5)
            assert max(p, key=p.get) == a["class"]
        # `jaxcell train` fitted the run's detector
        assert isinstance(a["ood_score"], float)
        assert a["in_distribution"] is (a["ood_score"] <= engine.predictor.detector.threshold)
        assert a["cam"].startswith("data:image/png;base64,")
        cam = Image.open(io.BytesIO(__import__("base64").b64decode(a["cam"].split(",", 1)[1])))
        assert cam.format == "PNG" and cam.mode == "RGB"
        # drawn on the image the model saw, at its size (the page scales it up)
        assert cam.size == (engine.predictor.image_size, engine.predictor.image_size)


def test_the_batched_program_gives_what_predict_gives(client, engine, serve_workdir, tmp_path, capsys):
    """Concurrent requests go through the padded, batched program; each answer equals `jaxcell predict`'s
    probabilities for the same file after the same temperature."""
    from concurrent.futures import ThreadPoolExecutor

    from jaxcell.cli import main

    paths = []
    for i in range(6):
        paths.append(tmp_path / f"s{i}.png")
        paths[-1].write_bytes(smear(i, 32 + 8 * i))
    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda p: client.post("/predict", files={"image": (p.name, p.read_bytes())}), paths))
    assert all(a.status_code == 200 for a in answers)
    assert main(["predict", "--workdir", serve_workdir, *map(str, paths)]) == 0
    offline = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    names = engine.predictor.class_names
    for answer, line in zip(answers, offline):
        (served,) = answer.json()["results"]
        for key in ("probabilities", "calibrated_probabilities"):
            np.testing.assert_allclose([served[key][n] for n in names], [line[key][n] for n in names], atol=2e-5)
        assert served["ood_score"] == pytest.approx(line["ood_score"], rel=1e-4, abs=1e-4)
        assert served["in_distribution"] == line["in_distribution"] and served["class"] == line["class"]
    assert engine.batches >= 1 and engine.sizes == [1, 2, 4]  # powers of two up to --batch-size


@pytest.mark.parametrize("case", ["text named jpg", "truncated jpeg", "decompression bomb", "over the size limit",
                                  "no image", "wrong content type", "empty file"])
def test_bad_input_is_refused_with_a_json_error_and_the_server_goes_on(client, case):
    jpeg = io.BytesIO()
    Image.fromarray(np.full((64, 64, 3), 128, np.uint8)).save(jpeg, format="JPEG")
    expected = {
        "text named jpg": (dict(files={"image": ("notes.jpg", b"hello, not a picture\n", "image/jpeg")}), 422,
                           "not an image file (PIL cannot identify it): notes.jpg"),
        "truncated jpeg": (dict(files={"image": ("cut.jpg", jpeg.getvalue()[:300], "image/jpeg")}), 422,
                           "cannot decode image file cut.jpg: "),  # then PIL's words for it, which vary
        "decompression bomb": (dict(files={"image": ("bomb.png", bomb_png(), "image/png")}), 413,
                               "bomb.png: Image size (900000000 pixels) exceeds limit"),
        "over the size limit": (dict(files={"image": ("big.png", b"\0" * (2**20 + 1), "image/png")}), 413,
                                "big.png: over the upload limit of 1 MB (--max-upload-mb)"),
        "no image": (dict(files={"picture": ("a.png", smear(), "image/png")}), 400,
                     "no image: send one or more multipart fields named 'image'"),
        "wrong content type": (dict(content=smear(), headers={"content-type": "image/png"}), 415,
                               "wrong content type (image/png): send the images as multipart/form-data"),
        "empty file": (dict(files={"image": ("none.png", b"", "image/png")}), 422, "none.png: empty file"),
    }
    request, status, message = expected[case]
    r = client.post("/predict", **request)
    assert r.status_code == status, r.text
    assert r.json()["error"].startswith(message), r.json()
    if case == "truncated jpeg":
        assert "truncated" in r.json()["error"].lower()
    assert client.post("/predict", files={"image": ("ok.png", smear())}).status_code == 200  # still serving


def test_an_image_over_the_pixel_limit_is_refused_from_its_header(engine):
    with TestClient(make_app(engine, max_pixels=1000)) as c:
        r = c.post("/predict", files={"image": ("wide.png", smear(0, 40))})
    assert r.status_code == 413 and r.json()["error"] == "wide.png: 40x40 pixels, more than the 1,000 allowed"


def test_model_card_and_health(client, engine, serve_workdir):
    card = client.get("/model").json()
    assert card["architecture"]["name"] == "lightnetcell" and card["architecture"]["input_size"] == [16, 16, 3]
    assert card["architecture"]["parameters"] > 0
    assert card["training"]["sizes"] == {"train": 56, "val": 12, "test": 12}
    assert card["validation"]["accuracy"] == json.loads(open(os.path.join(serve_workdir, "metrics.jsonl"))
                                                        .read().splitlines()[-1])["val_accuracy"]
    assert card["calibration"]["temperature"] > 0
    assert card["detector"]["threshold"] == engine.predictor.detector.threshold and card["detector_note"] is None
    assert "not a diagnostic device" in card["notice"] and card["version"]
    health = client.get("/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert client.get("/page.js").status_code == 200 and client.get("/page.css").status_code == 200
    assert client.get("/etc/passwd").status_code == 404  # no route takes a path


def test_the_card_lists_the_evaluations_recorded_in_the_workdir(client, engine, serve_workdir):
    from jaxcell.cli import main
    from jaxcell.serve.card import evaluations

    out = os.path.join(serve_workdir, "eval-test-shifted.json")
    try:
        assert main(["evaluate", "--workdir", serve_workdir, "--stain-shift", "0.03", "--bootstrap", "0",
                     "--out", out]) == 0
        (found,) = evaluations(serve_workdir, engine.predictor.step)
        report = json.load(open(out))
        assert found["stain_shift"] == 0.03
        assert found["accuracy"] == report["accuracy"] and found["ece"] == report["ece"]
    finally:
        os.remove(out)


def test_the_token_is_needed_everywhere_but_health(engine):
    with TestClient(make_app(engine, token="s3cret")) as c:
        for path in ("/", "/model", "/page.js"):
            r = c.get(path)
            assert r.status_code == 401 and "Authorization: Bearer" in r.json()["error"], path
        assert c.post("/predict", files={"image": ("a.png", smear())}).status_code == 401
        assert c.get("/model", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert c.get("/health").status_code == 200
        good = {"Authorization": "Bearer s3cret"}
        assert c.get("/model", headers=good).status_code == 200
        assert c.post("/predict", files={"image": ("a.png", smear())}, headers=good).status_code == 200


def test_serve_refuses_a_public_address_without_a_token(serve_workdir, capsys, monkeypatch):
    from jaxcell.cli import main
    from jaxcell.serve import check_exposure, is_loopback

    monkeypatch.delenv("JAXCELL_TOKEN", raising=False)
    assert main(["serve", "--workdir", serve_workdir, "--host", "0.0.0.0"]) == 2
    assert "refusing to listen on 0.0.0.0 without a token" in capsys.readouterr().err
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.5") and not is_loopback("lab-server")
    check_exposure("0.0.0.0", "a-token")  # a token makes it acceptable
    check_exposure("127.0.0.1", None)


def test_serve_says_when_its_port_is_taken_before_loading_anything(capsys):
    from jaxcell.cli import main

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", "--workdir", "/nonexistent", "--port", str(port)]) == 2
    assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in capsys.readouterr().err


def test_serving_an_exported_safetensors_file_gives_the_workdirs_logits(engine, serve_workdir, tmp_path):
    from jaxcell.export import export_workdir
    from jaxcell.inference import Predictor

    weights, _ = export_workdir(serve_workdir, str(tmp_path / "m.safetensors"))
    exported = Predictor.load(weights)
    assert exported.workdir is None and exported.temperature is None and exported.class_names == \
        engine.predictor.class_names
    images = np.stack([np.asarray(Image.open(io.BytesIO(smear(i))).resize((16, 16))) for i in range(3)])
    import jax

    a = jax.jit(exported.program())(exported.variables, images)["logits"]
    b = jax.jit(engine.predictor.program())(engine.predictor.variables, images)["logits"]
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # No detector travels with an exported file: the answers say so instead of guessing.
    assert exported.detector is None
    assert all(x["in_distribution"] is None and x["ood_score"] is None and x["calibrated_probabilities"] is None
               for x in exported.answers(np.asarray(a)))


@pytest.mark.integration
def test_a_restart_reads_the_program_from_the_persistent_cache(serve_workdir, tmp_path):
    """Two processes build the server's engine with one cache directory: the second compiles nothing."""
    script = ("import json, sys; from jaxcell import compilation_cache; from jaxcell.serve.engine import Engine; "
              "from jaxcell.inference import Predictor; compilation_cache.enable(sys.argv[2], min_compile_seconds=0); "
              "print(json.dumps(Engine(Predictor.load(sys.argv[1]), batch_size=2).startup))")
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    runs = []
    for _ in range(2):
        done = subprocess.run([sys.executable, "-c", script, serve_workdir, str(tmp_path / "xla")], env=env,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    assert runs[0]["from_persistent_cache"] is False and runs[1]["from_persistent_cache"] is True
    assert os.listdir(tmp_path / "xla")


def test_a_cancelled_request_does_not_stop_the_batcher(engine):
    """A client that goes away cancels its futures; the batch leaves those images out and answers the rest."""
    from concurrent.futures import Future

    from jaxcell.serve.engine import _Item

    image = np.zeros((engine.predictor.image_size, engine.predictor.image_size, 3), np.uint8)
    gone, kept = Future(), Future()
    assert gone.cancel()
    engine._answer([_Item(image, gone), _Item(image, kept)])  # what the worker does with a batch
    assert kept.result(timeout=0)[0]["class"] in engine.predictor.class_names
    (later,) = engine.submit(image[None])
    assert later.result(timeout=60)[0]["class"] in engine.predictor.class_names


def test_a_batch_waits_from_its_first_image_arrival(engine, monkeypatch):
    """--max-wait-ms counts from when the first image of a batch arrived: a lone fresh image waits it out
    for company, one that queued while another batch ran (here: a second ago) goes at once."""
    from concurrent.futures import Future

    from jaxcell.serve.engine import _Item

    monkeypatch.setattr(engine, "max_wait", 1.0)
    image = np.zeros((engine.predictor.image_size, engine.predictor.image_size, 3), np.uint8)
    start = time.perf_counter()
    (fresh,) = engine.submit(image[None])
    fresh.result(timeout=60)
    assert time.perf_counter() - start >= 1.0
    waited = Future()
    start = time.perf_counter()
    engine._queue.put(_Item(image, waited, queued_at=start - 1.0))
    waited.result(timeout=60)
    assert time.perf_counter() - start < 1.0


def test_two_batches_run_at_once(engine, monkeypatch):
    """With the default two batchers, a batch starts while another still computes: here the first
    batch's program holds until a second batch has entered it. One batcher, as --concurrent-batches 1
    gives, would wait out the hold alone."""
    import threading

    entered, both_in = threading.Event(), threading.Barrier(2, timeout=30)
    run = engine._run

    def held(batch):
        entered.set()
        both_in.wait()  # breaks (and fails the futures) unless a second batch arrives while this one waits
        return run(batch)

    monkeypatch.setattr(engine, "_run", held)
    image = np.zeros((engine.predictor.image_size, engine.predictor.image_size, 3), np.uint8)
    (first,) = engine.submit(image[None])
    assert entered.wait(timeout=30)  # the first batch is in the program, with its one image
    (second,) = engine.submit(image[None])
    for future in (first, second):
        assert future.result(timeout=60)[0]["class"] in engine.predictor.class_names
    assert len(engine._workers) == 2


def test_a_detector_that_cannot_score_the_model_fails_at_start_up(engine):
    """An ood.npz of another format (or model) is refused before the server listens, not on each request."""
    import dataclasses

    from jaxcell.errors import UserError
    from jaxcell.serve.engine import Engine

    class Stale:
        threshold = 0.0

        def score(self, features, logits):
            raise KeyError("block_widths")

    predictor = dataclasses.replace(engine.predictor, detector=Stale())
    with pytest.raises(UserError, match="its OOD detector cannot score this model's features .*jaxcell ood --workdir"):
        Engine(predictor, batch_size=1)

"""jaxcell.preprocessing against OpenCV (CLAHE) and torch (resize), and against its torch twin.

CLAHE is checked for bit equality with OpenCV, stricter than the one-grey-level contract: the
jax version emulates OpenCV's float32 roundings on purpose (XLA's FMA contraction would
otherwise flip ~3e-4 of the pixels by one level), and only equality guards that.
"""

import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from jaxcell import preprocessing as P
from torch_ref import preprocessing as T

cv2 = pytest.importorskip("cv2", reason="opencv-python-headless (the test extra) is needed for the CLAHE reference")

DATA = Path(os.environ.get("JAXCELL_DEV_DATA", Path(__file__).resolve().parents[2] / "shared/data/all4class-dev"))
CLASSES = ("Benign", "Early", "Pre", "Pro")


@pytest.fixture(scope="module")
def real_rgb():
    """8 real smears (2 per class), RGB uint8, 224x224."""
    if not all((DATA / c).is_dir() for c in CLASSES):
        pytest.skip(f"real development data not found at {DATA} (set JAXCELL_DEV_DATA)")
    images = []
    for c in CLASSES:
        files = sorted((DATA / c).glob("*.jpg"))
        for f in (files[0], files[len(files) // 2]):
            bgr = cv2.imread(str(f), cv2.IMREAD_COLOR)
            assert bgr is not None, f
            images.append(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
    assert {im.shape for im in images} == {(224, 224, 3)}
    return np.stack(images)


@pytest.fixture(scope="module")
def real_grey(real_rgb):
    return np.stack([cv2.cvtColor(im, cv2.COLOR_RGB2GRAY) for im in real_rgb])


def _opencv_clahe(images: np.ndarray, clip: float, grid: tuple[int, int]) -> np.ndarray:
    c = cv2.createCLAHE(clipLimit=clip, tileGridSize=grid)
    flat = images.reshape(-1, *images.shape[-2:])
    return np.stack([c.apply(np.ascontiguousarray(im)) for im in flat]).reshape(images.shape)


def _check_clahe(images: np.ndarray, clip: float, grid: tuple[int, int]) -> None:
    ref = _opencv_clahe(images, clip, grid)
    out_jax = np.asarray(P.clahe(jnp.asarray(images), clip, grid))
    out_torch = T.clahe(torch.from_numpy(images), clip, grid).numpy()
    assert out_jax.dtype == np.uint8 and out_jax.shape == images.shape
    diff = np.abs(out_jax.astype(np.int32) - ref)
    assert diff.max() <= 1, f"jax vs OpenCV: max {diff.max()} grey levels"
    assert diff.max() == 0, f"jax vs OpenCV: {np.mean(diff > 0):.2e} of the pixels off by one"
    np.testing.assert_array_equal(out_torch, ref, err_msg="torch twin vs OpenCV")


# Sizes: native 224, odd sizes, an axis divisible and the other not (OpenCV then pads both),
# smaller than the grid, and one row.
ODD_SIZES = [(37, 53), (100, 77), (9, 15), (224, 100), (5, 6)]


@pytest.mark.parametrize("clip", [1.0, 2.0, 4.0])
@pytest.mark.parametrize("grid", [(8, 8), (4, 6)])
def test_clahe_matches_opencv_real_224(real_grey, clip, grid):
    _check_clahe(real_grey, clip, grid)


@pytest.mark.parametrize("size", ODD_SIZES)
@pytest.mark.parametrize("clip,grid", [(2.0, (8, 8)), (4.0, (4, 6))])
def test_clahe_matches_opencv_real_odd_sizes(real_grey, size, clip, grid):
    h, w = size
    small = np.stack([cv2.resize(im, (w, h), interpolation=cv2.INTER_AREA) for im in real_grey])
    _check_clahe(small, clip, grid)


@pytest.mark.parametrize("size,clip,grid", [
    ((64, 64), 2.0, (8, 8)),
    ((61, 47), 40.0, (3, 5)),   # OpenCV's default clip: almost no clipping
    ((33, 20), 0.0, (8, 8)),    # clip <= 0: no clipping at all
    ((3, 3), 2.0, (8, 8)),      # reflect-101 padding longer than the image, repeated
    ((1, 7), 1.0, (2, 2)),      # one row: the padded rows all repeat it
])
def test_clahe_matches_opencv_random(size, clip, grid):
    rng = np.random.default_rng(sum(size))
    noise = rng.integers(0, 256, (4, *size), dtype=np.uint8)
    noise[1] = noise[1] // 8 + 100       # a narrow histogram: heavy clipping and redistribution
    noise[2] = np.sort(noise[2], axis=None).reshape(size)  # a gradient: smooth LUT blends
    _check_clahe(noise, clip, grid)


def test_mul_helpers_round_like_float32():
    """The FMA-proof products equal IEEE float32 products (numpy's), under jit."""
    rng = np.random.default_rng(0)
    w = np.concatenate([[0.0, 1.0, 0.5, 1 - 2 ** -24, 2 ** -20], rng.random(59)]).astype(np.float32)
    levels = np.arange(256, dtype=np.float32)[:, None]
    got = jax.jit(lambda v: P._mul_lut_weight(v, w, (1, -1)))(jnp.broadcast_to(levels, (256, w.size)))
    np.testing.assert_array_equal(np.asarray(got), levels * w[None, :])
    s = np.concatenate([[0.0, 255.0, 1.0, 127.5], rng.random(4092) * 256, rng.random(4096) * 1e-3])
    s = s.astype(np.float32).reshape(-1, 64)
    got = jax.jit(lambda v: P._mul_rn(v, w, (1, -1)))(jnp.asarray(s))
    np.testing.assert_array_equal(np.asarray(got), s * w[None, :])


def test_clahe_batch_shapes_jit_and_vmap():
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (2, 3, 24, 40), dtype=np.uint8)
    want = _opencv_clahe(x, 2.0, (4, 4))
    np.testing.assert_array_equal(np.asarray(P.clahe(jnp.asarray(x), 2.0, (4, 4))), want)
    inside = jax.jit(lambda v: P.clahe(v, 2.0, [4, 4]))(jnp.asarray(x))
    np.testing.assert_array_equal(np.asarray(inside), want)
    mapped = jax.vmap(lambda v: P.clahe(v, 2.0, (4, 4)))(jnp.asarray(x.astype(np.int32)))
    np.testing.assert_array_equal(np.asarray(mapped), want)
    np.testing.assert_array_equal(T.clahe(torch.from_numpy(x), 2.0, (4, 4)).numpy(), want)
    # colour with two leading axes: channel planes are the grey images above
    rgb = np.moveaxis(x, 1, -1)[:, None]                  # (2, 1, 24, 40, 3)
    np.testing.assert_array_equal(np.asarray(P.clahe_rgb(jnp.asarray(rgb), 2.0, (4, 4))),
                                  np.moveaxis(want, 1, -1)[:, None])
    with pytest.raises(ValueError, match="integer dtype"):
        P.clahe(jnp.zeros((8, 8), jnp.float32))
    with pytest.raises(ValueError, match="integer dtype"):
        T.clahe(torch.zeros(8, 8))
    with pytest.raises(ValueError, match="tile_grid_size"):
        P.clahe(jnp.zeros((8, 8), jnp.uint8), 2.0, (0, 8))


def test_clahe_rgb_is_per_channel_opencv(real_rgb):
    x = real_rgb[:4, :100, :77]
    want = np.stack([np.stack([cv2.createCLAHE(2.0, (8, 8)).apply(np.ascontiguousarray(im[..., k]))
                               for k in range(3)], -1) for im in x])
    np.testing.assert_array_equal(np.asarray(P.clahe_rgb(jnp.asarray(x))), want)
    np.testing.assert_array_equal(T.clahe_rgb(torch.from_numpy(x)).numpy(), want)


def test_clahe_rgb_float_quantizes_jits_and_blocks_gradients():
    rng = np.random.default_rng(2)
    u8 = rng.integers(0, 256, (2, 30, 45, 3), dtype=np.uint8)
    x = u8.astype(np.float32) / 255.0                     # ToTensor-style input
    want = np.asarray(P.clahe_rgb(jnp.asarray(u8), 2.0, (4, 6))).astype(np.float32) / 255.0
    f = jax.jit(lambda v: P.clahe_rgb_float(v, 2.0, (4, 6)))
    got = f(jnp.asarray(x))
    assert got.dtype == jnp.float32 and got.shape == x.shape
    np.testing.assert_array_equal(np.asarray(got), want)
    # twin: NCHW in torch
    got_t = T.clahe_rgb_float(torch.from_numpy(x).permute(0, 3, 1, 2), 2.0, (4, 6)).permute(0, 2, 3, 1)
    np.testing.assert_array_equal(got_t.numpy(), want)
    # out-of-range inputs are clamped, and no gradient reaches the input
    np.testing.assert_array_equal(np.asarray(f(jnp.asarray(x) * 3 - 1)),
                                  np.asarray(f(jnp.asarray(np.clip(x * 3 - 1, 0, 1)))))
    grad = jax.grad(lambda v: jnp.sum(P.clahe_rgb_float(v, 2.0, (4, 6)) * v))(jnp.asarray(x))
    np.testing.assert_array_equal(np.asarray(grad), want)  # d(sum(c * v))/dv = c, c constant


RESIZE_CASES = [((7, 9), (14, 14)), ((13, 13), (28, 30)), ((37, 40), (19, 23)),
                ((28, 28), (56, 56)), ((56, 50), (28, 25)), ((224, 224), (37, 100)), ((10, 3), (10, 7))]


# one compiled program per size and method, as the input pipeline runs it (op by op, ~10 each)
resize = jax.jit(P.resize, static_argnums=(1, 2))


@pytest.mark.parametrize("method", ["bilinear", "nearest", "nearest-exact"])
def test_resize_matches_torch_interpolate(method):
    rng = np.random.default_rng(3)
    for (h, w), size in RESIZE_CASES:
        x = rng.random((2, 3, h, w), dtype=np.float32)
        want = F.interpolate(torch.from_numpy(x), size=size, mode=method,
                             **({"align_corners": False, "antialias": False} if method == "bilinear" else {}))
        np.testing.assert_array_equal(T.resize(torch.from_numpy(x), size, method).numpy(), want.numpy())
        got = np.asarray(resize(jnp.asarray(x.transpose(0, 2, 3, 1)), size, method)).transpose(0, 3, 1, 2)
        assert got.shape == want.shape
        if method == "bilinear":   # summation order / FMA may differ: a few ulps
            np.testing.assert_allclose(got, want.numpy(), rtol=0, atol=1e-6, err_msg=f"{(h, w)} -> {size}")
        else:                      # a pure gather: bit equality
            np.testing.assert_array_equal(got, want.numpy(), err_msg=f"{(h, w)} -> {size}")


def test_resize_bilinear_weights_are_torchs():
    """Probe both with one-hot rows: the interpolation weights themselves agree to the bit."""
    for n_in, n_out in [(37, 19), (13, 28), (7, 14), (56, 28), (224, 37), (100, 161), (5, 2)]:
        eye = np.eye(n_in, dtype=np.float32).reshape(n_in, 1, 1, n_in)
        want = F.interpolate(torch.from_numpy(eye), size=(1, n_out), mode="bilinear",
                             align_corners=False, antialias=False).numpy().reshape(n_in, n_out)
        got = np.asarray(resize(jnp.asarray(eye.transpose(0, 2, 3, 1)), (1, n_out))).reshape(n_in, n_out)
        np.testing.assert_array_equal(got, want, err_msg=f"{n_in} -> {n_out}")


@pytest.mark.parametrize("method", ["bilinear", "nearest"])
@pytest.mark.parametrize("shape,size", [((13, 13), (28, 28)), ((37, 40), (19, 23))])
def test_resize_gradient_matches_torch(method, shape, size):
    rng = np.random.default_rng(4)
    x = rng.random((2, 3, *shape), dtype=np.float32)
    r = rng.random((2, 3, *size), dtype=np.float32)
    xt = torch.from_numpy(x).requires_grad_(True)
    (T.resize(xt, size, method) * torch.from_numpy(r)).sum().backward()
    g = jax.jit(jax.grad(lambda v: jnp.sum(P.resize(v, size, method) * r.transpose(0, 2, 3, 1))))(
        jnp.asarray(x.transpose(0, 2, 3, 1)))
    np.testing.assert_allclose(np.asarray(g).transpose(0, 3, 1, 2), xt.grad.numpy(), rtol=0, atol=1e-6)


def test_resize_shapes_and_errors():
    x = jnp.zeros((2, 13, 13, 3), jnp.float32)
    assert jax.jit(lambda v: P.resize(v, (28, 27)))(x).shape == (2, 28, 27, 3)
    assert P.resize(x[0], (5, 6), "nearest").shape == (5, 6, 3)    # unbatched HWC
    with pytest.raises(ValueError, match="unknown resize method"):
        P.resize(x, (4, 4), "bicubic")
    with pytest.raises(ValueError, match="float"):
        P.resize(x.astype(jnp.uint8), (4, 4))


def test_normalize_matches_twin_and_formula():
    rng = np.random.default_rng(5)
    u8 = rng.integers(0, 256, (2, 5, 6, 3), dtype=np.uint8)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    got = np.asarray(P.normalize(jnp.asarray(u8), mean, std))
    assert got.dtype == np.float32
    want = (u8.astype(np.float32) / np.float32(255) - np.float32(mean)) / np.float32(std)
    np.testing.assert_array_equal(got, want)
    got_t = T.normalize(torch.from_numpy(u8).permute(0, 3, 1, 2), mean, std).permute(0, 2, 3, 1).numpy()
    np.testing.assert_array_equal(got_t, want)
    np.testing.assert_array_equal(np.asarray(jax.jit(lambda v: P.normalize(v, 0.5, 0.25))(jnp.asarray(u8))),
                                  (u8.astype(np.float32) / np.float32(255) - np.float32(0.5)) / np.float32(0.25))
    with pytest.raises(ValueError, match="channel statistics"):
        P.normalize(jnp.asarray(u8[..., :2]), mean, std)


def test_od_center_matches_twin_and_cancels_a_stain_shift():
    from jaxcell import models
    from jaxcell.train import prepare, standardize

    rng = np.random.default_rng(6)
    u8 = rng.integers(20, 240, (3, 9, 7, 3), dtype=np.uint8)
    pre = models.preprocessing("resnet18", 9, od_center=True)
    assert pre["od_center"] and pre["mean"] == [0.0] * 3 and pre["std"] == [models.OD_SCALE] * 3
    x = u8.astype(np.float32) / 255
    od = -np.log(x)
    want = (od - od.mean(axis=(1, 2), keepdims=True)) / models.OD_SCALE
    got = np.asarray(prepare(jnp.asarray(u8), pre))
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-6)
    got_t = T.standardize(torch.from_numpy(x).permute(0, 3, 1, 2), pre).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(got_t, got, rtol=0, atol=2e-6)
    # Dimming one channel of an image by a factor (an additive shift of its optical density, as a
    # longer staining time gives) changes nothing; the plain mean/std input moves with it.
    dimmed = x * np.array([0.8, 0.9, 0.7], np.float32)
    np.testing.assert_allclose(np.asarray(standardize(jnp.asarray(dimmed), pre)), got, rtol=0, atol=2e-5)
    plain = models.preprocessing("resnet18", 9)
    assert "od_center" not in plain
    assert np.abs(np.asarray(standardize(jnp.asarray(dimmed), plain) - standardize(jnp.asarray(x), plain))).max() > 0.1
    # Black pixels are floored at 1/255 rather than sent to infinity.
    assert np.isfinite(np.asarray(prepare(jnp.zeros((1, 4, 4, 3), jnp.uint8), pre))).all()

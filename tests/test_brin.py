"""BRIN: each of its nine parts, standalone, computes what its torch twin computes; so does the
whole model, layer by layer, in eval and in train mode; odd sizes work; bad settings are refused.

All on the small preset and small images (the paper-scale model is only shape-checked)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import parity
import torch_ref
from jaxcell.errors import UserError
from jaxcell.twins import BRIN_PRESETS, brin_config
from jaxcell.models import brin as fb
from jaxcell.models import create
from parity.compare import compare, format_table, randomize_torch_model
from torch_ref import brin as tb

TOL = 1e-5
SMALL = {"preset": "small"}
W = BRIN_PRESETS["small"]["width"]
G = BRIN_PRESETS["small"]["groups"]


@pytest.fixture(scope="module")
def twins():
    """A small torch BRIN with random weights and BN statistics, and its flax variables."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        tmodel = randomize_torch_model(tb.BRIN(image_size=75, **SMALL), seed=0).eval()
        with torch.no_grad():  # keep DAIN's divisor away from its eps guard, as trained weights are
            for fc in (tmodel.input.adaptive.shift_fc, tmodel.input.adaptive.scale_fc):
                fc.weight.copy_(torch.eye(3) + 0.1 * torch.randn(3, 3))
            tmodel.cross_stitch.alpha.uniform_(-1.0, 1.0)
    variables = parity.torch_to_flax("brin", tmodel.state_dict(), image_size=75, **SMALL)
    return tmodel, variables


def _sub(variables: dict, name: str) -> dict:
    return {coll: tree[name] for coll, tree in variables.items() if name in tree}


def _nchw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def _rel(got, ref: torch.Tensor) -> float:
    ref = ref.detach().numpy()
    if ref.ndim == 4:
        ref = ref.transpose(0, 2, 3, 1)
    got = np.asarray(got)
    assert got.shape == ref.shape
    return float(np.abs(got.astype(np.float64) - ref).max() / np.abs(ref).max())


def _randn(*shape, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


# Each part: its flax module (standalone), its inputs (NHWC, odd sizes where it matters), and how
# each side is called. 19, 10, 5 are the stage sizes of a 75-pixel image.
PARTS = {
    "input": (fb.InputProcessing(2.0, 8), lambda: [np.random.default_rng(1).random((2, 75, 75, 3), np.float32)]),
    "stem": (fb.DualPathStem(W), lambda: [_randn(2, 75, 75, 3)]),
    "stage1_0": (fb.BiForkedBlock(W, 1, G), lambda: [_randn(2, 19, 19, W)]),
    "stage2_0": (fb.BiForkedBlock(2 * W, 2, G), lambda: [_randn(2, 19, 19, W)]),
    "progressive": (fb.ProgressiveResolution(W),
                    lambda: [[_randn(2, 19, 19, W, seed=1), _randn(2, 10, 10, 2 * W, seed=2),
                              _randn(2, 5, 5, 4 * W, seed=3)]]),
    "inception": (fb.MultiReceptiveInception(W), lambda: [_randn(2, 19, 19, W)]),
    "cross_stitch": (fb.CrossStitch(), lambda: [_randn(2, 19, 19, W, seed=1), _randn(2, 19, 19, W, seed=2)]),
    "scconv": (fb.SCConv(2 * W), lambda: [_randn(2, 19, 19, 2 * W)]),
    "non_local": (fb.NonLocalBlock(), lambda: [_randn(2, 19, 19, 2 * W)]),
    "head": (fb.ClassificationHead(4, 0.3), lambda: [_randn(2, 19, 19, 2 * W)]),
}


@pytest.mark.parametrize("part", list(PARTS))
def test_part_parity(twins, part):
    tmodel, variables = twins
    fmodule, make_inputs = PARTS[part]
    inputs = make_inputs()
    kw = {} if part == "cross_stitch" else {"train": False}
    nested = isinstance(inputs[0], list)
    f_in = [[jnp.asarray(a) for a in inputs[0]]] if nested else [jnp.asarray(a) for a in inputs]
    t_in = [[_nchw(a) for a in inputs[0]]] if nested else [_nchw(a) for a in inputs]
    with jax.default_matmul_precision("highest"):  # one program, as in the model (not op by op)
        got = jax.jit(lambda v, *x: fmodule.apply(v, *x, **kw))(_sub(variables, part), *f_in)
    with torch.no_grad():
        ref = getattr(tmodel, part)(*t_in)
    err = _rel(got, ref)
    assert err < TOL, f"{part}: max rel error {err:.3e}"


@pytest.mark.parametrize("image_size", [64, 75])
def test_whole_model_layer_by_layer(image_size):
    rows = compare("brin", image_size=image_size, batch=2, **SMALL)
    names = {r.layer for r in rows}
    for part in ("input", "stem", "stage1_0", "stage2_0", "stage3_0", "progressive", "inception",
                 "cross_stitch", "scconv", "non_local", "head", "logits"):
        assert part in names, f"{part} missing from the parity table"
    bad = [r for r in rows if not r.within(TOL)]
    assert not bad, format_table(rows, TOL)


def test_train_mode_parity_and_batch_stats(twins):
    """Train mode, dropout 0: same logits and same updated running statistics (torch keeps the
    unbiased variance; our BatchNorm does too); every counter moves by one."""
    tmodel, variables = twins
    t_train = tb.BRIN(image_size=75, dropout=0.0, **SMALL)
    t_train.load_state_dict(tmodel.state_dict())
    x = np.random.default_rng(2).random((3, 75, 75, 3), np.float32)
    with torch.no_grad():
        ref = t_train.train()(_nchw(x))
    model = create("brin", image_size=75, dropout=0.0, **SMALL)
    with jax.default_matmul_precision("highest"):
        got, upd = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(variables, x)
    assert _rel(got, ref) < TOL
    want = parity.torch_to_flax("brin", t_train.state_dict(), image_size=75, **SMALL)["batch_stats"]
    for (path, a), b, old in zip(jax.tree_util.tree_leaves_with_path(upd["batch_stats"]),
                                 jax.tree.leaves(want), jax.tree.leaves(variables["batch_stats"])):
        where, (a, b, old) = jax.tree_util.keystr(path), (np.asarray(v) for v in (a, b, old))
        if "num_batches_tracked" in where:
            assert a == b == old + 1, where
        else:
            assert not np.array_equal(a, old), f"{where} was not updated"
            assert np.abs(a - b).max() / np.abs(b).max() < TOL, where


def test_head_dropout_acts_in_train_mode_only():
    head = fb.ClassificationHead(4, 0.3)
    x = jnp.asarray(_randn(2, 5, 5, 8))
    v = head.init(jax.random.key(0), x)
    y1 = head.apply(v, x, train=True, rngs={"dropout": jax.random.key(1)})
    y2 = head.apply(v, x, train=True, rngs={"dropout": jax.random.key(2)})
    assert not np.allclose(y1, y2)
    np.testing.assert_array_equal(head.apply(v, x), head.apply(v, x, train=False))


def test_initial_values_match_torch():
    """The parts with their own initializers start where their torch twins start: DAIN as
    identity maps (plain per-image standardization), cross-stitch at [[0.9, 0.1], [0.1, 0.9]]."""
    x = jnp.zeros((1, 5, 5, 3))
    p = fb.AdaptiveNormalization().init(jax.random.key(0), x)["params"]
    t = tb.AdaptiveNormalization(3)
    for name in ("shift_fc", "scale_fc"):
        np.testing.assert_array_equal(p[name]["kernel"], np.eye(3))
        np.testing.assert_array_equal(getattr(t, name).weight.detach().numpy(), np.eye(3))
    alpha = fb.CrossStitch().init(jax.random.key(0), x, x)["params"]["alpha"]
    np.testing.assert_allclose(alpha, tb.CrossStitch(3).alpha.detach().numpy(), rtol=0, atol=0)
    np.testing.assert_allclose(alpha[:, :, 0], [[0.9, 0.1], [0.1, 0.9]], rtol=1e-7)


@pytest.mark.parametrize("image_size", [224, 96, 128, 100, 33])
def test_sizes_in_both_frameworks(image_size):
    fmodel = create("brin", image_size=image_size, **SMALL)
    x = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
    out = jax.eval_shape(lambda x: fmodel.apply(fmodel.init(jax.random.key(0), x), x), x)
    assert out.shape == (1, 4)
    tmodel = torch_ref.create("brin", image_size=image_size, **SMALL).eval()
    with torch.no_grad():
        y = tmodel(torch.rand(1, 3, image_size, image_size))
    assert y.shape == (1, 4) and bool(torch.isfinite(y).all())


def test_presets_and_parameter_counts_agree():
    for preset in ("paper", "small"):
        fmodel = create("brin", preset=preset)
        v = jax.eval_shape(lambda x: fmodel.init(jax.random.key(0), x), jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32))
        n_flax = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(v["params"]))
        with torch.device("meta"):
            n_torch = sum(p.numel() for p in torch_ref.create("brin", preset=preset).parameters())
        assert n_flax == n_torch
    # The default is the paper scale; explicit arguments override the preset.
    assert brin_config(None, None, None, None) == (64, (2, 2, 2), 8)
    assert brin_config("small", 32, None, None) == (32, (1, 1, 1), 4)


@pytest.mark.parametrize("kw,match", [({"preset": "huge"}, "preset"), ({"width": 18}, "multiple of 4"),
                                      ({"depth": (2, 0)}, "depth"), ({"groups": 5}, "groups")])
def test_bad_settings_are_refused(kw, match):
    with pytest.raises(UserError, match=match):
        create("brin", **kw)
    with pytest.raises(ValueError, match=match):
        torch_ref.create("brin", **kw)


def test_ceil_pooling_helpers_agree_and_keep_the_border():
    x = _randn(2, 19, 11, 3)
    a = fb.avg_pool_ceil(jnp.asarray(x), 4)
    assert a.shape == (2, 5, 3, 3)
    np.testing.assert_allclose(a[:, 4, 2], x[:, 16:, 8:].mean((1, 2)), rtol=1e-6)  # 3x3 partial window
    assert _rel(a, tb.avg_pool_ceil(_nchw(x), 4)) < 1e-6
    m = fb.max_pool_ceil2(jnp.asarray(x))
    assert m.shape == (2, 10, 6, 3)
    np.testing.assert_array_equal(m[:, 9, 5], x[:, 18, 10])  # the lone last pixel survives
    assert _rel(m, tb.max_pool_ceil2(_nchw(x))) == 0.0

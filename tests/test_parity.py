"""parity: the mechanical torch<->flax key map, round trips, layer-by-layer comparison, errors."""

import math

import flax.linen as fnn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn as tnn

import jaxcell.models
import parity
import torch_ref
from jaxcell import cli
from jaxcell.errors import UserError
from parity import compare as cmp
from parity import convert

TOL = 1e-5


def torch_model(image_size=37, seed=0, **kw):
    torch.manual_seed(seed)
    return cmp.randomize_torch_model(torch_ref.create("lightnetcell", image_size=image_size, **kw), seed).eval()


def flax_variables(image_size, seed=0, **kw):
    """Random flax variables for lightnetcell (no eager init: it compiles op by op and is slow)."""
    model = jaxcell.models.create("lightnetcell", image_size=image_size, **kw)
    abstract = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False),
                              jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32))
    return random_like(abstract, seed)


def random_like(tree, seed=0):
    """Random values in every leaf (floats normal, ints positive), so round trips test real numbers."""
    leaves, treedef = jax.tree.flatten(tree)
    rng = np.random.default_rng(seed)
    out = [jnp.asarray(rng.integers(1, 1000, x.shape).astype(x.dtype)) if jnp.issubdtype(x.dtype, jnp.integer)
           else jnp.asarray(rng.standard_normal(x.shape).astype(x.dtype)) for x in leaves]
    return jax.tree.unflatten(treedef, out)


def test_naming_rule():
    assert convert.flax_module_path("layer1.0.downsample.0") == ("layer1_0", "downsample_0")
    assert convert.flax_module_path("features.denseblock1.denselayer1.norm1") == (
        "features", "denseblock1", "denselayer1", "norm1")
    assert convert.flax_module_path("blocks.0.1.fc") == ("blocks_0_1", "fc")
    assert convert.flax_module_path("") == ()


def test_key_map_is_total():
    entries = parity.key_map("lightnetcell", image_size=37)
    sd = torch_ref.create("lightnetcell", image_size=37).state_dict()
    keys = [k for e in entries for k in e.torch_keys]
    assert sorted(keys) == sorted(sd)  # every torch key exactly once
    paths = [p for e in entries for p in e.flax_paths]
    assert len(paths) == len(set(paths))
    abstract = jax.eval_shape(lambda x: jaxcell.models.create("lightnetcell", image_size=37).init(
        jax.random.key(0), x), jax.ShapeDtypeStruct((1, 37, 37, 3), jnp.float32))
    assert sorted(paths) == sorted(tuple(p.key for p in kp) for kp, _ in jax.tree_util.tree_leaves_with_path(abstract))
    rules = {e.torch_keys[0]: (e.flax_paths[0], e.rule) for e in entries}
    assert rules["block2.conv.weight"][0] == ("params", "block2", "conv", "kernel")
    assert rules["block2.bn.running_var"][0] == ("batch_stats", "block2", "bn", "var")
    assert rules["fc1.weight"][0] == ("params", "fc1", "kernel")


def test_torch_flax_torch_bit_exact():
    model = torch_model(37)
    sd = model.state_dict()
    variables = parity.torch_to_flax("lightnetcell", sd, image_size=37)
    assert set(variables) == {"params", "batch_stats"}
    assert variables["batch_stats"]["block1"]["bn"]["num_batches_tracked"].dtype == jnp.int32
    np.testing.assert_array_equal(variables["params"]["block1"]["conv"]["kernel"],
                                  sd["block1.conv.weight"].numpy().transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(variables["params"]["fc1"]["kernel"], sd["fc1.weight"].numpy().T)
    back = parity.flax_to_torch("lightnetcell", variables, image_size=37)
    assert list(back) == list(sd)
    for k in sd:
        assert back[k].dtype == sd[k].dtype, k
        assert torch.equal(back[k], sd[k]), k
    torch_ref.create("lightnetcell", image_size=37).load_state_dict(back, strict=True)


def test_flax_torch_flax_bit_exact():
    variables = flax_variables(37, seed=3)
    sd = parity.flax_to_torch("lightnetcell", variables, image_size=37)
    assert sd["block1.bn.num_batches_tracked"].dtype == torch.int64
    twin = torch_ref.create("lightnetcell", image_size=37)
    twin.load_state_dict(sd, strict=True)
    back = parity.torch_to_flax("lightnetcell", twin.state_dict(), image_size=37)
    flat_a = jax.tree_util.tree_leaves_with_path(variables)
    flat_b = dict(jax.tree_util.tree_leaves_with_path(back))
    assert len(flat_a) == len(flat_b)
    for path, a in flat_a:
        b = flat_b[path]
        assert a.dtype == b.dtype and a.shape == b.shape, path
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=str(path))


def test_num_classes_is_read_from_the_weights():
    sd = torch_ref.create("lightnetcell", num_classes=10, image_size=32).state_dict()
    variables = parity.torch_to_flax("lightnetcell", sd, image_size=32)
    assert variables["params"]["fc2"]["kernel"].shape == (256, 10)
    back = parity.flax_to_torch("lightnetcell", variables, image_size=32)
    assert back["fc2.weight"].shape == (10, 256)
    torch_ref.create("lightnetcell", num_classes=10, image_size=32).load_state_dict(back, strict=True)


@pytest.mark.parametrize("image_size,batch", [(32, 1), (37, 3), (48, 5)])
def test_layer_by_layer(image_size, batch):
    rows = cmp.compare("lightnetcell", image_size=image_size, batch=batch, seed=image_size)
    assert rows[-1].layer == "logits" and rows[-1].shape == (batch, 4)
    assert rows[-1].max_rel < TOL
    bad = [r for r in rows if not r.within(TOL)]
    assert not bad, cmp.format_table(rows, TOL)
    twin = torch_ref.create("lightnetcell", image_size=image_size)
    layers = [n for n, m in twin.named_modules() if isinstance(m, (tnn.Conv2d, tnn.BatchNorm2d, tnn.Linear))]
    covered = [r.layer for r in rows]
    assert [n for n in covered if n in layers] == layers  # every conv/bn/fc, in forward order
    # Feature maps really are compared (NCHW -> NHWC), and not trivially zero.
    conv = next(r for r in rows if r.layer == "block1.conv")
    assert conv.shape == (batch, 64, image_size, image_size)
    assert all(np.isfinite(r.max_abs) for r in rows)


def test_compare_leaves_global_precision_settings():
    before = (jax.config.jax_default_matmul_precision, torch.backends.cuda.matmul.fp32_precision,
              torch.backends.cudnn.conv.fp32_precision)
    cmp.compare("lightnetcell", image_size=16, batch=1)
    assert before == (jax.config.jax_default_matmul_precision, torch.backends.cuda.matmul.fp32_precision,
                      torch.backends.cudnn.conv.fp32_precision)


# --- errors -------------------------------------------------------------------------------------

def test_error_wrong_shape_names_key_and_shapes():
    sd = torch_ref.create("lightnetcell", image_size=32).state_dict()
    with pytest.raises(convert.ConversionError, match=r"'fc1\.weight'.*\(256, 4096\).*\(256, 9216\)"):
        parity.torch_to_flax("lightnetcell", sd, image_size=48)
    assert issubclass(convert.ConversionError, UserError) and issubclass(convert.ConversionError, ValueError)


def test_error_missing_and_extra_torch_keys():
    sd = torch_ref.create("lightnetcell", image_size=32).state_dict()
    missing = {k: v for k, v in sd.items() if k != "block2.bn.running_var"}
    with pytest.raises(convert.ConversionError, match=r"missing 'block2\.bn\.running_var'"):
        parity.torch_to_flax("lightnetcell", missing, image_size=32)
    extra = {**sd, "block2.extra.weight": torch.zeros(3)}
    with pytest.raises(convert.ConversionError, match=r"unexpected 'block2\.extra\.weight'"):
        parity.torch_to_flax("lightnetcell", extra, image_size=32)


def test_error_flax_side_names_path():
    variables = flax_variables(32)
    del variables["batch_stats"]["block3"]["bn"]["var"]
    with pytest.raises(convert.ConversionError, match="missing batch_stats/block3/bn/var"):
        parity.flax_to_torch("lightnetcell", variables, image_size=32)
    variables = flax_variables(32)
    variables["params"]["block1"]["extra"] = jnp.zeros(3)
    with pytest.raises(convert.ConversionError, match="unexpected params/block1/extra"):
        parity.flax_to_torch("lightnetcell", variables, image_size=32)
    variables = flax_variables(32)
    with pytest.raises(convert.ConversionError, match=r"params/fc1/kernel has shape \(4096, 256\).*\(9216, 256\)"):
        parity.flax_to_torch("lightnetcell", variables, image_size=48)


def test_error_unknown_model():
    with pytest.raises(UserError, match="unknown model 'nosuchnet'"):
        parity.torch_to_flax("nosuchnet", {})


# --- the command and its ability to fail --------------------------------------------------------

def test_main_passes_on_the_real_conversion(capsys):
    assert cli.main(["parity", "--model", "lightnetcell", "--image-size", "32", "--batch", "3"]) == 0
    out = capsys.readouterr().out
    assert "PASS" in out and "logits" in out and "first beyond" not in out


def test_main_fails_on_a_perturbed_weight(monkeypatch, capsys):
    real = cmp.torch_to_flax

    def perturbed(name, sd, **kw):
        v = real(name, sd, **kw)
        v["params"]["block2"]["bn"]["scale"] = v["params"]["block2"]["bn"]["scale"] * (1 + 1e-3)
        return v

    monkeypatch.setattr(cmp, "torch_to_flax", perturbed)
    assert cli.main(["parity", "--model", "lightnetcell", "--image-size", "32"]) == 1
    marked = [line for line in capsys.readouterr().out.splitlines() if "first beyond tolerance" in line]
    assert len(marked) == 1 and marked[0].startswith("block2.bn ")


def test_compare_catches_a_layout_bug(monkeypatch):
    # Swap kh and kw in the conv rule: shapes still fit (3x3), values do not.
    rules = [(t, dict(table)) for t, table in convert._LEAF_RULES]
    conv_table = next(table for t, table in rules if t is tnn.modules.conv._ConvNd)
    wrong = (lambda x: x.transpose(3, 2, 1, 0), lambda y: y.transpose(3, 2, 1, 0))
    conv_table["weight"] = ("params", "kernel", "wrong", wrong)
    monkeypatch.setattr(convert, "_LEAF_RULES", rules)
    monkeypatch.setattr(convert, "_PLANS", {})
    rows = cmp.compare("lightnetcell", image_size=16, batch=2)
    first = next(r for r in rows if not r.within(TOL))
    assert first.layer == "block1.conv" and first.max_rel > 1e-2


def test_format_table_marks_first_failure():
    rows = [cmp.LayerDiff("a", (1, 2), 1e-7, 1e-7), cmp.LayerDiff("b", (1, 2), 1e-3, 2e-3),
            cmp.LayerDiff("c", (1, 2), 1e-3, math.nan), cmp.LayerDiff("logits", (1, 4), 1.0, 0.5)]
    lines = cmp.format_table(rows, TOL).splitlines()
    assert lines[0].split()[:2] == ["layer", "shape"]
    marked = [line for line in lines if "<--" in line]
    assert len(marked) == 1 and marked[0].startswith("b ")
    assert "max|flax - torch| / max|torch|" in lines[-1]
    assert not rows[2].within(TOL)


# --- attention: the group rule, proven on a tiny twin before the hybrid model exists ------------

class TorchTinyAttention(tnn.Module):
    def __init__(self, num_classes=4, image_size=4, dim=24, heads=4):
        super().__init__()
        self.embed = tnn.Linear(3, dim)
        self.pos_embed = tnn.Parameter(torch.zeros(1, image_size * image_size, dim))
        self.attn = tnn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm = tnn.LayerNorm(dim, eps=1e-5)
        self.head = tnn.Linear(dim, num_classes)

    def forward(self, x):
        t = self.embed(x.flatten(2).transpose(1, 2)) + self.pos_embed
        t = self.norm(t + self.attn(t, t, t, need_weights=False)[0])
        return self.head(t.mean(1))


class FlaxTinyAttention(fnn.Module):
    num_classes: int = 4
    image_size: int = 4
    dim: int = 24
    heads: int = 4

    @fnn.compact
    def __call__(self, x, train=False):
        b, h, w, c = x.shape
        t = fnn.Dense(self.dim, name="embed")(x.reshape(b, h * w, c))
        t = t + self.param("pos_embed", fnn.initializers.normal(0.02), (1, h * w, self.dim))
        a = fnn.MultiHeadDotProductAttention(num_heads=self.heads, qkv_features=self.dim, out_features=self.dim,
                                             deterministic=not train, name="attn")(t)
        t = fnn.LayerNorm(epsilon=1e-5, use_fast_variance=False, name="norm")(t + a)
        return fnn.Dense(self.num_classes, name="head")(t.mean(1))


@pytest.fixture
def tiny_attention(monkeypatch):
    monkeypatch.setitem(jaxcell.models.REGISTRY, "tinyattention",
                        jaxcell.models.ModelSpec("tinyattention", FlaxTinyAttention))
    monkeypatch.setitem(torch_ref.REGISTRY, "tinyattention", TorchTinyAttention)
    return "tinyattention"


def test_attention_group_rule(tiny_attention):
    entries = parity.key_map(tiny_attention, image_size=4)
    by_key = {e.torch_keys[0]: e.flax_paths for e in entries}
    assert by_key["attn.in_proj_weight"] == tuple(("params", "attn", n, "kernel") for n in ("query", "key", "value"))
    assert by_key["attn.out_proj.weight"] == (("params", "attn", "out", "kernel"),)
    assert by_key["pos_embed"] == (("params", "pos_embed"),)

    torch.manual_seed(0)
    model = cmp.randomize_torch_model(TorchTinyAttention(), seed=0)
    sd = model.state_dict()
    variables = parity.torch_to_flax(tiny_attention, sd, image_size=4)
    assert variables["params"]["attn"]["query"]["kernel"].shape == (24, 4, 6)
    assert variables["params"]["attn"]["out"]["kernel"].shape == (4, 6, 24)
    back = parity.flax_to_torch(tiny_attention, variables, image_size=4)
    assert all(torch.equal(back[k], sd[k]) for k in sd) and list(back) == list(sd)

    rows = cmp.compare(tiny_attention, image_size=4, batch=3, seed=2)
    layers = [r.layer for r in rows]
    assert layers == ["embed", "attn", "norm", "head", "logits"], layers
    assert all(r.within(TOL) for r in rows), cmp.format_table(rows, TOL)


def test_attention_head_mismatch_is_an_error(tiny_attention, monkeypatch):
    monkeypatch.setitem(jaxcell.models.REGISTRY, tiny_attention, jaxcell.models.ModelSpec(
        tiny_attention, lambda num_classes, image_size: FlaxTinyAttention(num_classes, image_size, heads=2)))
    with pytest.raises(convert.ConversionError, match=r"twins disagree: torch key 'attn\.in_proj_weight'"):
        parity.key_map(tiny_attention, image_size=4)

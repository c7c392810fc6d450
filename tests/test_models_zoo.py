"""The model zoo: hybrid_vit, resnet18/34/50 and densenet121, each against its torch twin.

Parity goes through the generic converter and the layer-by-layer comparison (every layer within
1e-5 relative, float32, highest precision). The torchvision models have torchvision's exact
state_dict layout, checked by key, shape and parameter count, and by loading a torchvision-format
file; and torch_ref is compared with torchvision itself (the test extra).
"""

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn as tnn

import jaxcell.models
import parity
import torch_ref
from jaxcell.errors import UserError
from parity.compare import compare, format_table, randomize_torch_model

TOL = 1e-5
ZOO = ("hybrid_vit", "resnet18", "resnet34", "resnet50", "densenet121")
TORCHVISION = ("resnet18", "resnet34", "resnet50", "densenet121")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    # These forwards are tiny; on a shared 2-core machine torch's spinning worker threads cost more
    # than they give (seconds instead of tenths). Restored after the module.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def twin_layers(name, types, **kw):
    """The torch twin's layers of the given types, in definition order; attention counts as one
    layer (its out_proj Linear is part of the packed group, compared as the attention's output)."""
    model = torch_ref.create(name, **kw)
    groups = [n + "." for n, m in model.named_modules() if isinstance(m, tnn.MultiheadAttention)]
    return [n for n, m in model.named_modules() if isinstance(m, types) and not n.startswith(tuple(groups))]


def assert_parity(name, image_size, types, batch=2, **kw):
    # num_classes given: skips the converter's probe of a second class count (reading it from the
    # weights is tested on its own below).
    rows = compare(name, image_size=image_size, batch=batch, num_classes=4, **kw)
    bad = [r for r in rows if not r.within(TOL)]
    assert not bad, format_table(rows, TOL)
    assert rows[-1].layer == "logits" and rows[-1].shape == (batch, 4)
    # Every weighted layer of the torch twin was matched and compared, in forward order.
    covered = [r.layer for r in rows]
    expected = twin_layers(name, types, image_size=image_size, **kw)
    assert [n for n in covered if n in expected] == expected
    return rows


# --- registry ------------------------------------------------------------------------------------

def test_registry_and_preprocessing():
    assert set(ZOO) <= set(jaxcell.models.names()) and set(ZOO) <= set(torch_ref.names())
    for name in TORCHVISION:
        spec = jaxcell.models.spec(name)
        assert (spec.mean, spec.std) == (IMAGENET_MEAN, IMAGENET_STD)
    assert jaxcell.models.spec("hybrid_vit").mean == (0.0, 0.0, 0.0)


@pytest.mark.parametrize("name", ZOO)
def test_same_constructor_arguments_both_sides(name):
    build = jaxcell.models.spec(name).build
    flax_args = {k: f.default for k, f in build.__dataclass_fields__.items() if k not in ("parent", "name")}
    torch_args = {k: p.default for k, p in inspect.signature(torch_ref.REGISTRY[name]).parameters.items()}
    assert flax_args == torch_args


def test_hybrid_vit_constructor():
    want = dict(num_classes=4, image_size=224, widths=(32, 64, 128), dim=128, depth=4, heads=4, mlp_ratio=2.0,
                dropout=0.1)
    args = inspect.signature(torch_ref.REGISTRY["hybrid_vit"]).parameters
    assert {k: args[k].default for k in want} == want


def test_unknown_argument_is_refused():
    with pytest.raises(UserError, match="'resnet50' takes no argument layers"):
        jaxcell.models.create("resnet50", layers=(1, 1, 1, 1))
    with pytest.raises(ValueError, match="'densenet121' takes no argument growth_rate"):
        torch_ref.create("densenet121", growth_rate=12)


# --- torchvision's layout ------------------------------------------------------------------------

# torchvision's published parameter counts (1000 classes) and state_dict sizes (weights + buffers).
TORCHVISION_COUNTS = {"resnet18": (11_689_512, 122), "resnet34": (21_797_672, 218),
                      "resnet50": (25_557_032, 320), "densenet121": (7_978_856, 727)}
TORCHVISION_KEYS = {
    "resnet18": {"conv1.weight": (64, 3, 7, 7), "bn1.running_var": (64,), "layer1.1.conv2.weight": (64, 64, 3, 3),
                 "layer2.0.downsample.0.weight": (128, 64, 1, 1), "layer2.0.downsample.1.num_batches_tracked": (),
                 "layer4.1.bn2.bias": (512,), "fc.weight": (1000, 512), "fc.bias": (1000,)},
    "resnet34": {"layer3.5.conv2.weight": (256, 256, 3, 3), "layer4.0.downsample.1.weight": (512,),
                 "fc.weight": (1000, 512)},
    "resnet50": {"layer1.0.downsample.0.weight": (256, 64, 1, 1), "layer1.0.conv3.weight": (256, 64, 1, 1),
                 "layer2.0.conv2.weight": (128, 128, 3, 3), "layer4.2.bn3.running_mean": (2048,),
                 "fc.weight": (1000, 2048)},
    "densenet121": {"features.conv0.weight": (64, 3, 7, 7), "features.norm0.running_mean": (64,),
                    "features.denseblock1.denselayer1.norm1.weight": (64,),
                    "features.denseblock1.denselayer1.conv1.weight": (128, 64, 1, 1),
                    "features.denseblock1.denselayer1.norm2.num_batches_tracked": (),
                    "features.denseblock1.denselayer6.conv2.weight": (32, 128, 3, 3),
                    "features.transition1.norm.weight": (256,), "features.transition1.conv.weight": (128, 256, 1, 1),
                    "features.denseblock4.denselayer16.norm1.weight": (992,),
                    "features.transition3.conv.weight": (512, 1024, 1, 1), "features.norm5.weight": (1024,),
                    "classifier.weight": (1000, 1024)},
}


@pytest.mark.parametrize("name", TORCHVISION)
def test_torchvision_state_dict_layout(name):
    with torch.device("meta"):
        model = torch_ref.create(name, num_classes=1000)
    sd = model.state_dict()
    n_params, n_keys = TORCHVISION_COUNTS[name]
    assert sum(p.numel() for p in model.parameters()) == n_params
    assert len(sd) == n_keys
    for key, shape in TORCHVISION_KEYS[name].items():
        assert tuple(sd[key].shape) == shape, key
    abstract = jax.eval_shape(lambda x: jaxcell.models.create(name, num_classes=1000).init(jax.random.key(0), x),
                              jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32))
    assert sum(x.size for x in jax.tree.leaves(abstract["params"])) == n_params


def test_resnet50_is_v1_5():
    # torchvision's v1.5: the stride of a Bottleneck sits on its 3x3 conv, not on the first 1x1.
    block = torch_ref.create("resnet50").layer2[0]
    assert block.conv1.stride == (1, 1) and block.conv2.stride == (2, 2)
    assert block.downsample[0].stride == (2, 2)


def test_torchvision_format_file_loads_with_1000_classes(tmp_path):
    torch.manual_seed(0)
    model = randomize_torch_model(torch_ref.create("resnet18", num_classes=1000), seed=1).eval()
    path = tmp_path / "resnet18.pth"
    torch.save(model.state_dict(), path)
    sd = torch.load(path, weights_only=True)
    variables = parity.torch_to_flax("resnet18", sd)  # class count read from the weights
    assert variables["params"]["fc"]["kernel"].shape == (512, 1000)
    x = np.random.default_rng(0).standard_normal((2, 3, 40, 40)).astype(np.float32)
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    flax_model = jaxcell.models.create("resnet18", num_classes=1000)
    with jax.default_matmul_precision("highest"):
        got = jax.jit(lambda v, x: flax_model.apply(v, x, train=False))(variables, x.transpose(0, 2, 3, 1))
    assert got.shape == (2, 1000)
    assert np.abs(np.asarray(got) - ref).max() <= TOL * np.abs(ref).max()


_TORCHVISION_SCHEMAS = None  # the operator library import_torchvision() declares, kept alive


def import_torchvision():
    """torchvision, for its model definitions (plain torch.nn code).

    PyPI's torchvision wheels are built against the CUDA build of torch: beside the CPU build the
    Makefile installs, their C++ operators (detection ops: nms, roi_align, ...) cannot load, and
    the import then stops where it registers fake kernels for torchvision::nms and ::qnms. No
    model uses those operators, so when the library does not load, only their two schemas are
    declared (no kernel: calling them would fail) and the import goes on.
    """
    global _TORCHVISION_SCHEMAS
    import importlib.util
    import pathlib

    spec = importlib.util.find_spec("torchvision")
    if spec is None:
        pytest.skip("torchvision (the test extra) is needed for this comparison")
    library = next(pathlib.Path(spec.submodule_search_locations[0]).glob("_C.*"), None)
    try:
        torch.ops.load_library(str(library))
    except (OSError, RuntimeError, TypeError):
        if _TORCHVISION_SCHEMAS is None:
            _TORCHVISION_SCHEMAS = torch.library.Library("torchvision", "DEF")
            for op in ("nms", "qnms"):
                _TORCHVISION_SCHEMAS.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    import torchvision

    return torchvision


@pytest.mark.parametrize("name", TORCHVISION)
def test_matches_torchvision(name):
    torchvision = import_torchvision()
    torch.manual_seed(0)
    theirs = randomize_torch_model(getattr(torchvision.models, name)(weights=None, num_classes=4), seed=2).eval()
    ours = torch_ref.create(name).eval()
    assert list(ours.state_dict()) == list(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.from_numpy(np.random.default_rng(0).standard_normal((2, 3, 64, 64)).astype(np.float32))
    with torch.no_grad():
        a, b = ours(x).numpy(), theirs(x).numpy()
    assert np.abs(a - b).max() <= TOL * np.abs(b).max()


# --- layer-by-layer parity -----------------------------------------------------------------------

CNN_LAYERS = (tnn.Conv2d, tnn.BatchNorm2d, tnn.Linear)
VIT_LAYERS = (tnn.Conv2d, tnn.BatchNorm2d, tnn.LayerNorm, tnn.MultiheadAttention, tnn.Linear)


@pytest.mark.parametrize("name,image_size", [("resnet18", 33), ("resnet34", 32), ("resnet50", 32),
                                             ("densenet121", 32)])
def test_parity_torchvision_models(name, image_size):
    rows = assert_parity(name, image_size, CNN_LAYERS)
    if name == "densenet121":  # the concatenation order shows in the block outputs
        block = next(r for r in rows if r.layer == "features.denseblock1")
        assert block.shape == (2, 64 + 6 * 32, 8, 8)


@pytest.mark.parametrize("image_size,pos_image_size", [(64, 224), (48, 32)])
def test_parity_hybrid_vit_at_other_sizes(image_size, pos_image_size):
    # Position embeddings stored for a 14x14 grid used at 4x4 (downsampled), and 2x2 used at 3x3.
    # Attention dropout on: evaluation must switch it off on both sides.
    rows = assert_parity("hybrid_vit", image_size, VIT_LAYERS, pos_image_size=pos_image_size,
                         attention_dropout=0.2)
    layers = [r.layer for r in rows]
    for sub in ("encoder.0.attn", "encoder.0.mlp", "encoder.3.mlp.fc2", "norm", "head"):
        assert sub in layers
    g = image_size // 16
    assert next(r for r in rows if r.layer == "encoder.0.attn").shape == (2, g * g, 128)


@pytest.mark.slow
@pytest.mark.parametrize("name", ZOO)
def test_parity_224(name):
    kw = {"pos_image_size": 64} if name == "hybrid_vit" else {}
    types = VIT_LAYERS if name == "hybrid_vit" else CNN_LAYERS
    assert_parity(name, 224, types, **kw)


# --- hybrid_vit: one checkpoint at several sizes, training mode ---------------------------------

def _flax_logits(name, variables, x_nchw, **kw):
    model = jaxcell.models.create(name, **kw)
    with jax.default_matmul_precision("highest"):  # one program, as inference runs it (not op by op)
        return np.asarray(jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x_nchw.transpose(0, 2, 3, 1)))


def test_hybrid_vit_one_checkpoint_many_sizes():
    torch.manual_seed(0)
    model = randomize_torch_model(torch_ref.create("hybrid_vit", image_size=64, depth=1), seed=3).eval()
    with torch.no_grad():  # large embeddings, so a wrong resize of them cannot hide in rounding
        model.pos_embed.mul_(50.0)
    variables = parity.torch_to_flax("hybrid_vit", model.state_dict(), image_size=64, depth=1)
    assert variables["params"]["pos_embed"].shape == (1, 16, 128)
    rng = np.random.default_rng(0)
    for h, w in [(64, 64), (33, 100)]:  # the reference size; non-square, odd, 2x6 tokens
        x = rng.random((2, 3, h, w)).astype(np.float32)
        with torch.no_grad():
            ref = model(torch.from_numpy(x)).numpy()
        got = _flax_logits("hybrid_vit", variables, x, image_size=64, depth=1)
        assert np.abs(got - ref).max() <= TOL * np.abs(ref).max(), (h, w)
    # The embeddings are really resized, not cropped or ignored: a 3x5 grid from the 4x4 one.
    grid = model.position_embeddings(3, 5)
    assert grid.shape == (1, 15, 128)
    full = model.pos_embed.reshape(1, 4, 4, 128).permute(0, 3, 1, 2)
    want = torch.nn.functional.interpolate(full, size=(3, 5), mode="bilinear", align_corners=False)
    assert torch.equal(grid, want.permute(0, 2, 3, 1).reshape(1, 15, 128))


# ResNet18 at 64 px, not 32: at 32 px its last stage's maps are 1x1, so with 4 images each of its
# BatchNorms normalizes 4 numbers per channel, which magnifies float32 rounding about 100-fold (1e-4
# in layer4, with XLA's convolutions as with oneDNN's, which are bit for bit torch's); the logits
# then landed 0.7e-5 (XLA) or 1.7e-5 (oneDNN) from torch's, and torch's own 0.7e-5 from float64.
# At 64 px (2x2 maps): 0.3e-5 / 0.5e-5 from torch's, torch's 0.16e-5 from float64.
@pytest.mark.parametrize("name,kw,size", [("hybrid_vit", {"dropout": 0.0, "depth": 2}, 32), ("resnet18", {}, 64)])
def test_training_mode_parity(name, kw, size):
    """One training-mode forward (batch statistics, no dropout): logits and updated running stats."""
    torch.manual_seed(0)
    model = randomize_torch_model(torch_ref.create(name, image_size=size, **kw), seed=4)
    variables = parity.torch_to_flax(name, model.state_dict(), image_size=size, **kw)
    x = np.random.default_rng(1).standard_normal((4, 3, size, size)).astype(np.float32)
    with torch.no_grad():
        ref = model.train()(torch.from_numpy(x)).numpy()
    flax_model = jaxcell.models.create(name, image_size=size, **kw)
    with jax.default_matmul_precision("highest"):
        got, state = jax.jit(lambda v, x: flax_model.apply(v, x, train=True, mutable=["batch_stats"],
                                                           rngs={"dropout": jax.random.key(0)}))(
            variables, jnp.asarray(x.transpose(0, 2, 3, 1)))
    assert np.abs(np.asarray(got) - ref).max() <= TOL * np.abs(ref).max()
    after = parity.flax_to_torch(name, {"params": variables["params"], **state}, image_size=size, **kw)
    for key, value in model.state_dict().items():
        if "running" in key:
            a, b = after[key].numpy(), value.numpy()
            assert np.abs(a - b).max() <= TOL * np.abs(b).max(), key
        elif key.endswith("num_batches_tracked"):
            assert int(after[key]) == int(value), key


def test_hybrid_vit_dropout_is_active_in_training_only():
    # Attention dropout is covered by the eval-mode parity above (it must be off there); each
    # dropout site costs about a second of XLA compile time on CPU (the random bits), so this
    # tiny model keeps four.
    model = jaxcell.models.create("hybrid_vit", image_size=32, depth=1, dim=32, heads=2, widths=(8, 8, 8),
                                  dropout=0.1)
    x = jnp.asarray(np.random.default_rng(0).random((2, 32, 32, 3)), jnp.float32)
    abstract = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), x)
    variables = random_like(abstract)

    @jax.jit  # one compilation for all of it
    def outputs(variables, x):
        train = [model.apply(variables, x, train=True, mutable=["batch_stats"], rngs={"dropout": jax.random.key(k)})[0]
                 for k in (1, 2, 1)]
        evaluate = [model.apply(variables, x, train=False, rngs={"dropout": jax.random.key(k)}) for k in (1, 2)]
        return train, evaluate

    (a, b, a_again), (e1, e2) = outputs(variables, x)
    assert not np.allclose(a, b) and np.array_equal(a, a_again)
    assert np.array_equal(e1, e2)


def random_like(tree, seed=0):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda a: jnp.asarray(rng.integers(1, 100, a.shape).astype(a.dtype))
                        if jnp.issubdtype(a.dtype, jnp.integer) else
                        jnp.asarray(rng.uniform(0.5, 1.5, a.shape).astype(a.dtype)), tree)


# --- errors ------------------------------------------------------------------------------------

def test_errors_name_the_value():
    x = jnp.zeros((1, 24, 24, 3))
    with pytest.raises(UserError, match="heads=3 must divide dim=128"):
        jaxcell.models.create("hybrid_vit", heads=3).init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
    with pytest.raises(ValueError, match="heads=3 must divide dim=128"):
        torch_ref.create("hybrid_vit", heads=3)
    with pytest.raises(ValueError, match="reference image size of at least 16 pixels.*got 8"):
        torch_ref.create("hybrid_vit", image_size=8)
    with pytest.raises(UserError, match="at least 16x16 pixels, got 8x24"):
        jax.eval_shape(lambda: jaxcell.models.create("hybrid_vit", image_size=64).init(
            jax.random.key(0), jnp.zeros((1, 8, 24, 3))))
    with pytest.raises(UserError, match="densenet needs images of at least 29x29 pixels, got 24x24"):
        jax.eval_shape(lambda: jaxcell.models.create("densenet121").init(jax.random.key(0), x))
    with pytest.raises(ValueError, match="densenet needs images of at least 29x29 pixels, got 24x24"):
        torch_ref.create("densenet121")(torch.zeros(1, 3, 24, 24))
    with pytest.raises(parity.ConversionError, match="pos_embed"):
        sd = torch_ref.create("hybrid_vit", image_size=64).state_dict()
        parity.torch_to_flax("hybrid_vit", sd, image_size=224)

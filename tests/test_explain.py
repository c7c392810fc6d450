"""Grad-CAM: the flax version against the torch twin (hooks), layer choice, overlays."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jaxcell.models
import torch_ref
from jaxcell import explain
from jaxcell.errors import UserError
from parity.compare import randomize_torch_model
from parity.convert import torch_to_flax
from torch_ref import explain as texplain

TOL = 1e-5

# Small configurations of every registered model (image size, constructor arguments).
CASES = {
    "lightnetcell": (32, dict(widths=(8, 16, 16), hidden=16)),
    "resnet18": (64, {}),
    "hybrid_vit": (32, dict(widths=(8, 8, 8), dim=16, depth=1, heads=2)),
    "brin": (32, dict(preset="small")),
    "densenet121": (64, {}),
}
SLOW = {"densenet121"}  # ~40 s on two cores


def twins(name, seed=0):
    size, kw = CASES[name]
    torch.manual_seed(seed)
    tmodel = randomize_torch_model(torch_ref.create(name, image_size=size, **kw), seed).eval()
    variables = torch_to_flax(name, tmodel.state_dict(), image_size=size, **kw)
    return tmodel, jaxcell.models.create(name, image_size=size, **kw), variables, size


def rel(a, b):
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


@pytest.mark.parametrize("name", [pytest.param(n, marks=[pytest.mark.slow] if n in SLOW else []) for n in CASES])
def test_gradcam_matches_the_torch_twin(name):
    tmodel, fmodel, variables, size = twins(name)
    x = np.random.default_rng(1).standard_normal((3, size, size, 3)).astype(np.float32)
    with jax.default_matmul_precision("highest"):
        # Given classes too, where it is cheap (each call compiles once more).
        for class_index in (None, [0, 2, 3]) if name in ("lightnetcell", "hybrid_vit") else (None,):
            cam = explain.gradcam(fmodel, variables, x, class_index=class_index)
            ref = texplain.gradcam(tmodel, torch.from_numpy(x.transpose(0, 3, 1, 2)), class_index=class_index)
            assert cam.layer == ref["layer"] == {"lightnetcell": "block3", "resnet18": "layer4_1", "brin": "non_local",
                                                 "hybrid_vit": "norm", "densenet121": "features"}[name]
            np.testing.assert_array_equal(cam.class_index, ref["class_index"])
            assert cam.raw.shape == ref["raw"].shape and cam.maps.shape == (3, size, size)
            if class_index is None:
                assert cam.raw.max() > 0  # a map of zeros would agree trivially
            assert rel(cam.raw, ref["raw"]) < TOL
            assert rel(cam.maps, ref["maps"]) < TOL
            if class_index is None:
                np.testing.assert_array_equal(cam.class_index, cam.logits.argmax(-1))
            else:
                np.testing.assert_array_equal(cam.class_index, class_index)


def test_gradcam_weights_are_the_gradient_of_the_class_score():
    """Check the interception trick against a model split by hand: lightnetcell's head applied
    to block3's output, differentiated directly."""
    _, model, variables, size = twins("lightnetcell")
    x = jnp.asarray(np.random.default_rng(2).standard_normal((2, size, size, 3)), jnp.float32)
    with jax.default_matmul_precision("highest"):
        cam = explain.gradcam(model, variables, x, class_index=1)
        _, inter = model.apply(variables, x, train=False, capture_intermediates=True)
        act = inter["intermediates"]["block3"]["__call__"][0]

        def head(a):
            from jaxcell.models.layers import flatten_like_torch

            h = jax.nn.relu(flatten_like_torch(a) @ variables["params"]["fc1"]["kernel"]
                            + variables["params"]["fc1"]["bias"])
            return (h @ variables["params"]["fc2"]["kernel"] + variables["params"]["fc2"]["bias"])[:, 1].sum()

        grads = jax.grad(head)(act)
    expected = jax.nn.relu(jnp.einsum("nhwc,nc->nhw", act, grads.mean((1, 2))))
    assert rel(cam.raw, np.asarray(expected)) < TOL


def test_layer_names_in_either_spelling_and_errors():
    assert explain.torch_path_to_flax("layer4.1") == "layer4_1"
    assert explain.torch_path_to_flax("features.denseblock1.denselayer2") == "features/denseblock1/denselayer2"
    assert explain.torch_path_to_flax("layer3_1/conv2") == "layer3_1/conv2"
    assert texplain.flax_spelling("layer4.1.downsample.0") == "layer4_1/downsample_0"
    tmodel, model, variables, size = twins("lightnetcell")
    x = np.zeros((1, size, size, 3), np.float32)
    cam = explain.gradcam(model, variables, x, target_layer="block2.conv")
    assert cam.layer == "block2/conv" and cam.raw.shape == (1, 16, 16)
    assert texplain.gradcam(tmodel, torch.zeros(1, 3, size, size), target_layer="block2/conv")["layer"] == "block2/conv"
    with pytest.raises(UserError, match="no layer 'layer9'"):
        explain.gradcam(model, variables, x, target_layer="layer9")
    with pytest.raises(UserError, match="feature map"):
        explain.gradcam(model, variables, x, target_layer="fc1")
    with pytest.raises(ValueError, match="no layer 'layer9'"):
        texplain.gradcam(tmodel, torch.zeros(1, 3, size, size), target_layer="layer9")


def test_the_default_follows_the_depth_of_the_model():
    model = jaxcell.models.create("lightnetcell", image_size=16, widths=(4, 8), hidden=8)
    variables = jax.jit(lambda x: model.init(jax.random.key(0), x, train=False))(jnp.zeros((1, 16, 16, 3)))
    assert explain.gradcam(model, variables, np.ones((1, 16, 16, 3), np.float32)).layer == "block2"
    tmodel = torch_ref.create("lightnetcell", image_size=16, widths=(4, 8), hidden=8)
    assert texplain.gradcam(tmodel, torch.ones(1, 3, 16, 16))["layer"] == "block2"


def test_every_registered_model_has_a_declared_default():
    assert set(explain.TARGET_LAYERS) == set(jaxcell.models.names())


def test_choose_layer_without_a_table_entry_takes_the_last_feature_map():
    calls = [("a", (2, 8, 8, 4)), ("a/b", (2, 4, 4, 8)), ("c", (2, 1, 1, 8)), ("d", (2, 4)), ("", (2, 4))]
    assert explain.choose_layer(calls, None, None) == "a/b"
    assert explain.choose_layer(calls, "lightnetcell", "c") == "c"


def test_overlay_and_colours():
    colours = explain.heat_colors(np.array([0.0, 0.5, 1.0]))
    assert colours.dtype == np.uint8
    assert colours[0, 2] > colours[0, 0] and colours[2, 0] > colours[2, 2]  # cold is blue, hot is red
    image = np.full((10, 12, 3), 200, np.uint8)
    out = explain.overlay(image, np.zeros((5, 6), np.float32))
    assert out.shape == image.shape and out.dtype == np.uint8
    assert not np.array_equal(explain.overlay(image, np.ones((10, 12))), out)

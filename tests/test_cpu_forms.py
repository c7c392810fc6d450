"""jaxcell.cpu_forms: the same values and gradients as lax's convolution, autodiff's BatchNorm
and the stock max pooling, in the forms XLA:CPU runs fast; and the CPU compiler options the
trainer compiles them with (jaxcell.train.compiler_options). oneDNN's own checks are in
tests/test_onednn.py."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax import lax

from jaxcell import cpu_forms, kernels, onednn, train
from jaxcell.kernels import Kernels
from jaxcell.models import layers


@pytest.fixture
def onednn_if(request):
    """onednn_if(True) skips the test where oneDNN's convolutions are not built here."""
    def check(on: bool) -> bool:
        if on:
            request.getfixturevalue("onednn_built")
        return on
    return check


@functools.partial(jax.jit, static_argnums=0)
def _values_and_vjp(f, cotangent, *args):
    """f(*args) and the gradients of `cotangent` . f for every argument, as one compiled program (as
    in a training step; op by op, a check compiled dozens). f is part of the cache key: a function
    that reads a kernel choice must be made per choice."""
    values, vjp = jax.vjp(f, *args)
    return values, vjp(cotangent)


@pytest.mark.parametrize("size,window,stride,padding,ceil", [
    (8, 2, 2, 0, False), (9, 2, 2, 0, False), (9, 3, 2, 1, False), (8, 3, 1, 1, False),
    (9, 2, 2, 0, True), (8, 3, 2, 1, True), (10, 3, 2, 1, True), (7, 3, 3, 1, True), (5, 2, 2, 1, True)])
def test_max_pool_gradient_is_torchs_first_maximum(size, window, stride, padding, ceil):
    """layers.max_pool with XLA's kernels (select_and_scatter) and with the CPU form: the same
    values, and torch's gradient."""
    rng = np.random.default_rng(size + window)
    x = rng.standard_normal((2, size, size, 3)).astype(np.float32)
    x[0, :3, :3, 0] = 1.5  # ties: the first maximum of each window takes the gradient
    x[1] = np.maximum(x[1], 0)  # zeros tie after a ReLU

    def pool_with(choice):
        def pool(a):
            with kernels.use(choice):  # read as the program is traced
                return layers.max_pool(a, window, stride, padding, ceil)
        return pool

    g = rng.standard_normal(jax.eval_shape(pool_with(Kernels.XLA), x).shape).astype(np.float32)
    outs = {}
    for on in (False, True):
        y, (dx,) = _values_and_vjp(pool_with(Kernels.CPU_FORMS if on else Kernels.XLA), g, x)
        outs[on] = (np.asarray(y), np.asarray(dx), g)
    xt = torch.from_numpy(x).permute(0, 3, 1, 2).requires_grad_()
    y_torch = torch.nn.functional.max_pool2d(xt, window, stride, padding, ceil_mode=ceil)
    y_torch.backward(torch.from_numpy(outs[False][2]).permute(0, 3, 1, 2))
    grad_torch = xt.grad.permute(0, 2, 3, 1).numpy()
    np.testing.assert_array_equal(outs[True][0], outs[False][0])
    np.testing.assert_allclose(outs[True][1], grad_torch, rtol=1e-6, atol=1e-6)  # overlaps: sums in another order
    np.testing.assert_allclose(outs[False][1], grad_torch, rtol=1e-6, atol=1e-6)


# (map size, kernel, stride, padding, dilation, in, out, groups): small maps (XLA would swap the
# operands), maps smaller than the kernel's weights (the patches product), flipped maps or flipped
# kernel in the input gradient, grouped convolutions (one per group).
CONVS = [(2, 3, 1, 1, 1, 8, 8, 1), (4, 3, 2, 1, 1, 8, 16, 1), (1, 3, 1, 1, 1, 4, 4, 1), (2, 3, 1, 1, 1, 16, 256, 1),
         (4, 3, 2, 1, 1, 8, 256, 1), (9, 3, 2, 1, 1, 32, 32, 1), (16, 3, 1, 1, 1, 8, 8, 1), (17, 7, 2, 3, 1, 3, 8, 1),
         (8, 3, 1, 2, 2, 4, 4, 1), (8, 1, 2, 0, 1, 4, 8, 1), (8, 3, 1, 1, 1, 16, 16, 8), (7, 3, 2, 1, 1, 8, 4, 2)]


@pytest.mark.parametrize("with_onednn", [False, True], ids=["xla", "onednn"])
@pytest.mark.parametrize("size,k,stride,pad,dil,cin,cout,groups", CONVS)
def test_cpu_convolutions_match_lax(onednn_if, size, k, stride, pad, dil, cin, cout, groups, with_onednn):
    onednn_if(with_onednn)
    rng = np.random.default_rng(size * k + cout)
    x = jnp.asarray(rng.standard_normal((2, size, size, cin)).astype(np.float32))
    w = jnp.asarray(rng.standard_normal((k, k, cin // groups, cout)).astype(np.float32))
    dn = ("NHWC", "HWIO", "NHWC")
    args = dict(window_strides=(stride, stride), padding=((pad, pad), (pad, pad)), rhs_dilation=(dil, dil),
                feature_group_count=groups)
    ref = lambda x, w: lax.conv_general_dilated(x, w, dimension_numbers=dn, **args)  # noqa: E731
    ours = lambda x, w: cpu_forms.conv_general_dilated(  # noqa: E731
        x, w, dimension_numbers=lax.conv_dimension_numbers(x.shape, w.shape, dn), use_onednn=with_onednn, **args)
    jaxpr = str(jax.make_jaxpr(ours)(x, w))
    assert (onednn.TARGET in jaxpr) if with_onednn else ("custom_vjp" in jaxpr or "dot_general" in jaxpr)
    g = rng.standard_normal(jax.eval_shape(ref, x, w).shape).astype(np.float32)
    (y1, grads1), (y0, grads0) = _values_and_vjp(ours, g, x, w), _values_and_vjp(ref, g, x, w)
    for a, b in zip((y1, *grads1), (y0, *grads0)):
        a, b = np.asarray(a), np.asarray(b)
        assert np.abs(a - b).max() <= 2e-6 * np.abs(b).max()  # float32 rounding of sums in another order


def test_small_maps_compile_to_no_swapped_convolution():
    """ResNet's last stage at 64 px: 3x3 kernels on 2x2 maps. XLA swaps such convolutions'
    operands into a layout XLA:CPU loops over (window reversal in the HLO); ours never get there."""
    x = jnp.zeros((4, 2, 2, 64))
    w = jnp.zeros((3, 3, 64, 64))
    dn = lax.conv_dimension_numbers(x.shape, w.shape, ("NHWC", "HWIO", "NHWC"))

    def loss(x, w, conv):
        return conv(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=dn).sum()

    def hlo(conv):
        return jax.jit(jax.grad(lambda x, w: loss(x, w, conv), argnums=(0, 1))).lower(x, w).compile().as_text()

    # (plain lax.conv_general_dilated gives "rhs_reversal=1x1" with jax 0.10.2)
    assert "rhs_reversal" not in hlo(cpu_forms.conv_general_dilated)


@pytest.mark.parametrize("shape", [(4, 5, 5, 3), (2, 1, 1, 8), (8, 3, 3, 16)])
def test_batch_norm_gradient_is_autodiffs(shape):
    """The custom VJP (torch's two sums) against autodiff of the same function, with cotangents
    on the batch mean and variance too (they feed the running statistics)."""
    rng = np.random.default_rng(len(shape) + shape[-1])
    x = jnp.asarray(rng.standard_normal(shape).astype(np.float32) * 3 + 1)
    scale, bias = (jnp.asarray(rng.standard_normal(shape[-1]).astype(np.float32)) for _ in range(2))
    outs = {}
    ours = lambda *a: cpu_forms.batch_norm_train(layers.batch_norm_train, *a)  # noqa: E731
    shapes = jax.eval_shape(lambda *a: layers.batch_norm_train(*a, 1e-5), x, scale, bias)
    cotangents = tuple(jnp.asarray(rng.standard_normal(v.shape).astype(np.float32)) for v in shapes)
    for f in (layers.batch_norm_train, ours):
        values, grads = _values_and_vjp(lambda *a, f=f: f(*a, 1e-5), cotangents, x, scale, bias)
        outs[f] = (*values, *grads)
    for mine, ref in zip(outs[ours], outs[layers.batch_norm_train]):
        assert float(jnp.abs(mine - ref).max()) <= 1e-6 * float(jnp.abs(ref).max())


def test_materialized_is_the_identity_bit_for_bit():
    # (No subnormals: XLA:CPU flushes them to zero in every arithmetic op, a ReLU's too.)
    x = jnp.asarray([0.0, -0.0, 1.2e-38, -3.5, 3e38, np.inf, -np.inf, np.nan], jnp.float32)
    for dtype in (jnp.float32, jnp.bfloat16):
        y = jax.jit(cpu_forms._materialized)(x.astype(dtype))
        bits = np.uint16 if dtype == jnp.bfloat16 else np.uint32
        np.testing.assert_array_equal(np.asarray(y).view(bits), np.asarray(x.astype(dtype)).view(bits))


def test_weight_gradient_transposes_do_not_recompute_batch_norm():
    """XLA:CPU fuses a convolution input's producer (BatchNorm + ReLU) into the transposes of the
    weight gradient, which then recompute it in slow loops; `_materialized` stops it. With every
    operand used twice (the input gradient is taken too), each fused transpose must be a plain copy."""
    block = _ConvBnReluConv()
    x = jnp.zeros((8, 16, 16, 8))
    variables = block.init(jax.random.key(0), x)

    def loss(params, x):
        return (block.apply({**variables, "params": params}, x, mutable=["batch_stats"])[0] ** 2).sum()

    options = train.compiler_options(train.Placement.over(jax.devices()[:1]))
    grad = kernels.jit(jax.grad(loss, argnums=(0, 1)), Kernels.CPU_FORMS, compiler_options=options)
    text = grad.lower(variables["params"], x).compile().as_text()
    fused = [c for c in text.split("\n\n") if " transpose(" in c and not c.startswith("ENTRY")]
    assert fused
    for computation in fused:
        assert not any(f" {op}(" in computation for op in ("maximum", "rsqrt", "subtract")), computation


class _ConvBnReluConv(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = layers.conv(8, 3, bias=False)(x)
        x = nn.relu(layers.BatchNorm()(x, True))
        return layers.conv(8, 3, bias=False)(x)


def test_cpu_compiler_options_keep_convolutions_off_ynnpack():
    placement = train.Placement.over(jax.devices()[:1])
    options = train.compiler_options(placement)
    if options is None:
        pytest.skip("this jaxlib does not know xla_cpu_experimental_ynn_fusion_type's values")
    x, w = jax.ShapeDtypeStruct((8, 32, 32, 32), jnp.float32), jax.ShapeDtypeStruct((3, 3, 32, 32), jnp.float32)
    conv = lambda x, w: lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))  # noqa: E731
    ours = jax.jit(conv, compiler_options=options).lower(x, w).compile().as_text()
    assert "__ynn_fusion" not in ours and "convolution(" in ours  # (jax 0.10.2's default: a __ynn_fusion)


@pytest.mark.parametrize("with_onednn", [False, True], ids=["xla", "onednn"])
def test_cpu_convolutions_of_an_empty_batch(onednn_if, with_onednn):
    """No images: an empty output, and a weight gradient of zeros, as lax gives."""
    onednn_if(with_onednn)
    x, w = jnp.zeros((0, 6, 6, 3)), jnp.ones((3, 3, 3, 4))
    dims = lax.conv_dimension_numbers(x.shape, w.shape, ("NHWC", "HWIO", "NHWC"))
    y, back = jax.vjp(lambda x, w: cpu_forms.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)),
                                                                   dimension_numbers=dims, use_onednn=with_onednn), x, w)
    dx, dw = back(jnp.zeros(y.shape))
    assert y.shape == (0, 6, 6, 4) and dx.shape == x.shape
    np.testing.assert_array_equal(dw, np.zeros(w.shape))

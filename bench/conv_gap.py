"""The CPU convolution gap, one convolution at a time: forward, input gradient and weight gradient
under XLA:CPU's defaults (YNNPACK), under jaxcell's CPU options (Eigen: jaxcell.train.
CPU_COMPILER_OPTIONS), through jaxcell.onednn (oneDNN inside XLA) and in PyTorch (oneDNN); plus
the weight gradient as an im2col product, and the three together as a training step computes
them: jaxcell's convolution (`jaxcell.cpu_forms.conv_general_dilated`, with oneDNN where it is
built, and with XLA's Eigen and its CPU custom VJP) against torch's forward and backward.

    .venv/bin/python bench/conv_gap.py [--shapes 32x64x64x128x3x1,...|resnet18-224] [--rounds 7]

A shape is BATCHxSIZExCINxCOUTxKERNELxSTRIDE (NHWC, padding (kernel - 1) // 2). A preset names a
model's convolutions with their counts (the first layer without an input gradient) and adds the
weighted total. Every variant runs once per round, round-robin, so that a busy machine slows all
of them alike; the figure is the median over rounds, in ms. The JAX variants are checked against
autodiff before timing. As in `jaxcell bench`, the process keeps freed memory (jaxcell._malloc)
and torch's OpenMP threads wait passively: without the first, every output's pages fault in
afresh on each call (the stem's forward measured 63 ms instead of 30).
"""

import argparse
import os
import statistics
import time

from jaxcell import _malloc

_malloc.keep_freed_memory()  # before JAX starts its threads
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch starts its own

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from jax import lax  # noqa: E402

from jaxcell import kernels, onednn  # noqa: E402
from jaxcell.train import CPU_COMPILER_OPTIONS  # noqa: E402

DN = ("NHWC", "HWIO", "NHWC")


def im2col_weight_grad(x, dy, k, s, p):
    """dL/dw as one product: patches (N*Ho*Wo, k*k*Cin) transposed, times dy (N*Ho*Wo, Cout)."""
    xp = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
    n, ho, wo, _ = dy.shape
    taps = [xp[:, i:i + (ho - 1) * s + 1:s, j:j + (wo - 1) * s + 1:s, :] for i in range(k) for j in range(k)]
    g = lax.dot_general(jnp.concatenate(taps, -1), dy, (((0, 1, 2), (0, 1, 2)), ((), ())))
    return g.reshape(k, k, x.shape[-1], dy.shape[-1])


# ResNet18 at 224 px, batch 16 (the CPU table's setting): (shape, count, input gradient needed).
PRESETS = {"resnet18-224": [("16x224x3x64x7x2", 1, False), ("16x56x64x64x3x1", 4, True),
                            ("16x56x64x128x3x2", 1, True), ("16x56x64x128x1x2", 1, True),
                            ("16x28x128x128x3x1", 3, True), ("16x28x128x256x3x2", 1, True),
                            ("16x28x128x256x1x2", 1, True), ("16x14x256x256x3x1", 3, True),
                            ("16x14x256x512x3x2", 1, True), ("16x14x256x512x1x2", 1, True),
                            ("16x7x512x512x3x1", 3, True)]}


def measure(b, h, cin, cout, k, s, rounds, needs_dx=True):
    p = (k - 1) // 2
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((b, h, h, cin), np.float32))
    w = jnp.asarray(rng.standard_normal((k, k, cin, cout), np.float32) / np.sqrt(k * k * cin))
    fwd = lambda x, w: lax.conv_general_dilated(x, w, (s, s), ((p, p), (p, p)), dimension_numbers=DN)  # noqa: E731
    y = fwd(x, w)
    dy = jnp.asarray(rng.standard_normal(y.shape, np.float32))
    _, vjp = jax.vjp(fwd, x, w)
    ref_dx, ref_dw = vjp(dy)

    runs = {}
    # The training step's three convolutions, as jaxcell computes them on a CPU.
    dims = lax.conv_dimension_numbers(x.shape, w.shape, DN)

    def ours(x, w):
        return kernels.conv_general_dilated(x, w, (s, s), ((p, p), (p, p)), dimension_numbers=dims)

    def step(x, w, dy):
        y, back = jax.vjp(ours, x, w)
        dx, dw = back(dy)
        return (y, dx, dw) if needs_dx else (y, dw)

    for name, with_onednn in (("jaxcell step", True), ("jaxcell eigen step", False)):
        choice = kernels.Kernels.ONEDNN if with_onednn else kernels.Kernels.CPU_FORMS
        compiled = kernels.jit(step, choice, compiler_options=CPU_COMPILER_OPTIONS).lower(x, w, dy).compile()
        assert (onednn.TARGET in compiled.as_text()) == (with_onednn and onednn.available()), name
        for got, want in zip(compiled(x, w, dy), (y, ref_dx, ref_dw) if needs_dx else (y, ref_dw)):
            err = float(jnp.abs(got - want).max() / jnp.abs(want).max())
            assert err < 1e-4, (name, err)
        runs[name] = lambda compiled=compiled: jax.block_until_ready(compiled(x, w, dy))
    via_onednn = lambda x, w: onednn.conv(x, w, (s, s), ((p, p), (p, p)), (1, 1))  # noqa: E731
    for tag, options, conv in (("xla", None, fwd), ("eigen", CPU_COMPILER_OPTIONS, fwd),
                               ("onednn", CPU_COMPILER_OPTIONS, via_onednn)):
        if tag == "onednn" and not onednn.available():
            continue
        jit = lambda f: jax.jit(f, compiler_options=options)  # noqa: E731
        variants = {"fwd": (jit(conv), (x, w)),
                    "dx": (jit(lambda x, w, dy, conv=conv: jax.vjp(conv, x, w)[1](dy)[0]), (x, w, dy)),
                    "dw": (jit(lambda x, w, dy, conv=conv: jax.vjp(conv, x, w)[1](dy)[1]), (x, w, dy))}
        if tag == "xla":
            variants["dw im2col"] = (jit(lambda x, dy: im2col_weight_grad(x, dy, k, s, p)), (x, dy))
        for name, (f, args) in variants.items():
            out = f(*args)
            want = {"fwd": y, "dx": ref_dx}.get(name, ref_dw)
            err = float(jnp.abs(out - want).max() / jnp.abs(want).max())
            assert err < 1e-4, (tag, name, err)  # float32 sums over N*Ho*Wo terms, in other orders
            runs[f"{tag} {name}"] = lambda f=f, args=args: f(*args).block_until_ready()

    xt = torch.from_numpy(np.array(x)).permute(0, 3, 1, 2).contiguous()
    wt = torch.from_numpy(np.array(w)).permute(3, 2, 0, 1).contiguous()
    dyt = torch.from_numpy(np.array(dy)).permute(0, 3, 1, 2).contiguous()
    geometry = ([s, s], [p, p], [1, 1], False, [0, 0], 1)
    back = lambda mask: lambda: torch.ops.aten.convolution_backward(dyt, xt, wt, None, *geometry, mask)  # noqa: E731
    runs["torch fwd"] = lambda: torch.nn.functional.conv2d(xt, wt, None, s, p)
    runs["torch dx"] = back([True, False, False])
    runs["torch dw"] = back([False, True, False])
    runs["torch step"] = lambda: (torch.nn.functional.conv2d(xt, wt, None, s, p), back([needs_dx, True, False])())

    times = {name: [] for name in runs}
    with torch.no_grad():
        for f in runs.values():
            f()
        for _ in range(rounds):
            for name, f in runs.items():
                t = time.perf_counter()
                f()
                times[name].append(time.perf_counter() - t)
    return {name: statistics.median(ts) * 1e3 for name, ts in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="32x64x64x128x3x1", help="shapes, comma-separated, or a preset: "
                        + ", ".join(PRESETS))
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    shapes = PRESETS.get(args.shapes) or [(shape, 1, True) for shape in args.shapes.split(",")]
    total = {"jaxcell": 0.0, "jaxcell eigen": 0.0, "torch": 0.0}
    for shape, count, needs_dx in shapes:
        b, h, cin, cout, k, s = (int(v) for v in shape.split("x"))
        ms = measure(b, h, cin, cout, k, s, args.rounds, needs_dx)
        for key in total:
            total[key] += count * ms[key + " step"]
        libraries = [lib for lib in ("xla", "eigen", "onednn", "torch") if f"{lib} fwd" in ms]
        print(f"batch {b}, {h} px, {cin}->{cout}, {k}x{k}/{s} x{count} (load {os.getloadavg()[0]:.1f}), ms: "
              + "  ".join(f"{op}: " + " ".join(f"{lib} {ms[f'{lib} {op}']:.1f}" for lib in libraries)
                          for op in ("fwd", "dx", "dw"))
              + f"  dw im2col (xla): {ms['xla dw im2col']:.1f}"
              + f"  step{'' if needs_dx else ' (no dx)'}: "
              + f"jaxcell {ms['jaxcell step']:.1f} jaxcell-eigen {ms['jaxcell eigen step']:.1f} "
              + f"torch {ms['torch step']:.1f}",
              flush=True)
    if len(shapes) > 1:
        print("total over the convolutions, each times its count, ms: "
              + ", ".join(f"{key} {ms_:.0f}" for key, ms_ in total.items())
              + f"; torch / jaxcell {total['torch'] / total['jaxcell']:.2f}")


if __name__ == "__main__":
    main()

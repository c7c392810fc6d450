"""The CPU convolution gap, one convolution at a time: forward, input gradient and weight gradient
under XLA:CPU's defaults (YNNPACK), under jaxcell's CPU options (Eigen: jaxcell.train.
CPU_COMPILER_OPTIONS) and in PyTorch (oneDNN); plus the weight gradient as an im2col product.

    .venv/bin/python bench/conv_gap.py [--shapes 32x64x64x128x3x1,...] [--rounds 7]

A shape is BATCHxSIZExCINxCOUTxKERNELxSTRIDE (NHWC, padding (kernel - 1) // 2). Every variant
runs once per round, round-robin, so that a busy machine slows all of them alike; the figure is
the median over rounds, in ms. The JAX variants are checked against autodiff before timing.
"""

import argparse
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
from jax import lax

from jaxcell.train import CPU_COMPILER_OPTIONS

DN = ("NHWC", "HWIO", "NHWC")


def im2col_weight_grad(x, dy, k, s, p):
    """dL/dw as one product: patches (N*Ho*Wo, k*k*Cin) transposed, times dy (N*Ho*Wo, Cout)."""
    xp = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
    n, ho, wo, _ = dy.shape
    taps = [xp[:, i:i + (ho - 1) * s + 1:s, j:j + (wo - 1) * s + 1:s, :] for i in range(k) for j in range(k)]
    g = lax.dot_general(jnp.concatenate(taps, -1), dy, (((0, 1, 2), (0, 1, 2)), ((), ())))
    return g.reshape(k, k, x.shape[-1], dy.shape[-1])


def measure(b, h, cin, cout, k, s, rounds):
    p = (k - 1) // 2
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((b, h, h, cin), np.float32))
    w = jnp.asarray(rng.standard_normal((k, k, cin, cout), np.float32) / np.sqrt(k * k * cin))
    fwd = lambda x, w: lax.conv_general_dilated(x, w, (s, s), ((p, p), (p, p)), dimension_numbers=DN)  # noqa: E731
    y = fwd(x, w)
    dy = jnp.asarray(rng.standard_normal(y.shape, np.float32))
    _, vjp = jax.vjp(fwd, x, w)
    ref_dw = vjp(dy)[1]

    runs = {}
    for tag, options in (("xla", None), ("eigen", CPU_COMPILER_OPTIONS)):
        jit = lambda f: jax.jit(f, compiler_options=options)  # noqa: E731
        variants = {"fwd": (jit(fwd), (x, w)),
                    "dx": (jit(lambda x, w, dy: jax.vjp(fwd, x, w)[1](dy)[0]), (x, w, dy)),
                    "dw": (jit(lambda x, w, dy: jax.vjp(fwd, x, w)[1](dy)[1]), (x, w, dy))}
        if tag == "xla":
            variants["dw im2col"] = (jit(lambda x, dy: im2col_weight_grad(x, dy, k, s, p)), (x, dy))
        for name, (f, args) in variants.items():
            out = f(*args)
            if name.startswith("dw"):
                err = float(jnp.abs(out - ref_dw).max() / jnp.abs(ref_dw).max())
                assert err < 1e-4, (name, err)  # float32 sums over N*Ho*Wo terms, in other orders
            runs[f"{tag} {name}"] = lambda f=f, args=args: f(*args).block_until_ready()

    xt = torch.from_numpy(np.array(x)).permute(0, 3, 1, 2).contiguous()
    wt = torch.from_numpy(np.array(w)).permute(3, 2, 0, 1).contiguous()
    dyt = torch.from_numpy(np.array(dy)).permute(0, 3, 1, 2).contiguous()
    geometry = ([s, s], [p, p], [1, 1], False, [0, 0], 1)
    back = lambda mask: lambda: torch.ops.aten.convolution_backward(dyt, xt, wt, None, *geometry, mask)  # noqa: E731
    runs["torch fwd"] = lambda: torch.nn.functional.conv2d(xt, wt, None, s, p)
    runs["torch dx"] = back([True, False, False])
    runs["torch dw"] = back([False, True, False])

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
    parser.add_argument("--shapes", default="32x64x64x128x3x1")
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    for shape in args.shapes.split(","):
        b, h, cin, cout, k, s = (int(v) for v in shape.split("x"))
        ms = measure(b, h, cin, cout, k, s, args.rounds)
        print(f"batch {b}, {h} px, {cin}->{cout}, {k}x{k}/{s} (load {os.getloadavg()[0]:.1f}), ms: "
              + "  ".join(f"{op}: xla {ms['xla ' + op]:.1f} eigen {ms['eigen ' + op]:.1f} torch {ms['torch ' + op]:.1f}"
                          for op in ("fwd", "dx", "dw"))
              + f"  dw im2col (xla): {ms['xla dw im2col']:.1f}", flush=True)


if __name__ == "__main__":
    main()

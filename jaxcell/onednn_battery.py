"""The check that jaxcell.onednn's convolutions compute what XLA's do, on this machine, at the ISA
oneDNN uses here: a battery of small convolutions, each one's forward pass, input gradient and
weight gradient against lax.conv_general_dilated and its jax.vjp.

The battery spans what oneDNN chooses its kernels by: 1x1 kernels with and without stride
(strided ones are copied to unit stride inside oneDNN), 3x3, 5x5 and the 3-channel 7x7 stride-2
stem, dilation, channel counts that fill SIMD blocks of 8 and 16 or leave a tail, maps smaller than
the kernel, batch 1. Grouped convolutions reach oneDNN as one ordinary convolution per group
(jaxcell.cpu_forms), so theirs is the narrow-channel geometry of one group, which is here.
Each oneDNN computation runs twice: the second finds its primitive's scratch memory holding the
first's data, as in a training loop (oneDNN 3.2's strided 1x1 weight gradient went wrong only
so; jaxcell.onednn._weight_gradient).

`python -m jaxcell.onednn_battery` prints the verdict as JSON; jaxcell.onednn runs it in a
child process (a kernel that writes out of bounds must not take the caller down) and caches it.
"""

import json
import sys
import time
from typing import NamedTuple

import numpy as np

# max |ours - XLA's| <= BOUND * max |XLA's|, for each of the three: float32 sums of a few hundred
# products taken in another order differ by a few units in the 7th digit (2^-23 = 1.2e-7 each).
BOUND = 2e-6
PARTS = ("forward", "input gradient", "weight gradient")


class Case(NamedTuple):
    batch: int
    size: int      # square maps
    kernel: int
    stride: int
    padding: int
    dilation: int
    cin: int
    cout: int

    def describe(self) -> str:
        return (f"{self.kernel}x{self.kernel} stride {self.stride} padding {self.padding} dilation {self.dilation}, "
                f"{self.cin} -> {self.cout} channels, {self.size}x{self.size} maps, batch {self.batch}")

    def shapes(self):
        """(x, w, strides, padding, dilation) as jaxcell.onednn.conv takes them."""
        return ((self.batch, self.size, self.size, self.cin), (self.kernel, self.kernel, self.cin, self.cout),
                (self.stride,) * 2, ((self.padding,) * 2,) * 2, (self.dilation,) * 2)


BATTERY = [
    Case(2, 8, 1, 1, 0, 1, 4, 8),       # 1x1, unit stride, a partial channel block
    Case(2, 8, 1, 1, 0, 1, 64, 32),     # 1x1 (ResNet50's bottleneck)
    Case(2, 8, 1, 2, 0, 1, 4, 8),       # 1x1 stride 2, fewer channels than a block: oneDNN 3.2's bug
    Case(2, 8, 1, 2, 0, 1, 12, 24),     # ... a block and a tail
    Case(2, 8, 1, 2, 0, 1, 16, 32),     # ... the narrowest left to oneDNN's copy (onednn._weight_gradient)
    Case(2, 8, 1, 2, 0, 1, 64, 128),    # ... whole blocks (ResNet's downsampling)
    Case(1, 8, 1, 2, 0, 1, 8, 16),      # ... batch 1
    Case(2, 9, 1, 3, 0, 1, 6, 10),      # 1x1 stride 3
    Case(2, 7, 1, 2, 0, 1, 4, 8),       # 1x1 stride 2 on an odd map (no unit-stride copy in oneDNN)
    Case(2, 8, 1, 2, 1, 1, 4, 8),       # 1x1 stride 2 with padding
    Case(2, 17, 7, 2, 3, 1, 3, 8),      # the 3-channel 7x7 stride-2 stem
    Case(1, 32, 7, 2, 3, 1, 3, 64),     # ... ResNet's, batch 1
    Case(2, 8, 3, 1, 1, 1, 16, 16),     # 3x3, whole blocks
    Case(2, 8, 3, 1, 1, 1, 5, 7),       # 3x3, neither a block
    Case(2, 8, 3, 1, 1, 1, 2, 2),       # one group of a grouped convolution (BRIN's)
    Case(2, 9, 3, 2, 1, 1, 12, 20),     # 3x3 stride 2, tails
    Case(2, 9, 5, 1, 2, 1, 8, 8),       # 5x5
    Case(2, 8, 3, 1, 2, 2, 4, 4),       # dilated, narrow
    Case(2, 9, 3, 1, 3, 3, 16, 24),     # dilated 3, whole blocks
    Case(2, 2, 3, 1, 1, 1, 16, 32),     # maps smaller than the kernel
    Case(2, 1, 3, 1, 1, 1, 4, 4),       # a 1x1 map
    Case(1, 4, 3, 2, 1, 1, 8, 256),     # small map, stride 2, wide output (ResNet's last stage)
]


def run(cases=BATTERY) -> dict:
    """The verdict: oneDNN's version and ISA, and per case its category, the three errors
    relative to XLA's largest value, and whether all three are within BOUND."""
    import jax
    from jax import lax

    from jaxcell import onednn

    if not onednn.available():
        raise onednn.BuildError("oneDNN convolutions are not available (see the warning)")
    start = time.perf_counter()
    rng = np.random.default_rng(0)
    inputs = []
    for case in cases:
        x_shape, w_shape, strides, padding, dilation = case.shapes()
        y_shape = onednn.output_shape(x_shape, w_shape, strides, padding, dilation)
        inputs.append(tuple(rng.standard_normal(s).astype(np.float32) for s in (x_shape, w_shape, y_shape)))

    def outputs(conv):
        def all_cases(inputs):
            out = []
            for case, (x, w, g) in zip(cases, inputs):
                _, _, strides, padding, dilation = case.shapes()
                y, vjp = jax.vjp(lambda x, w: conv(x, w, strides, padding, dilation), x, w)  # noqa: B023
                out.append((y, *vjp(g)))
            return out
        return jax.jit(all_cases)

    def xla(x, w, strides, padding, dilation):
        return lax.conv_general_dilated(x, w, strides, padding, rhs_dilation=dilation,
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))

    ours = outputs(onednn.conv)
    runs = [jax.device_get(ours(inputs)) for _ in range(2)]
    reference = jax.device_get(outputs(xla)(inputs))
    results = []
    for i, case in enumerate(cases):
        errors = {part: max(float(np.abs(r[i][k] - reference[i][k]).max()) for r in runs)
                  / max(float(np.abs(reference[i][k]).max()), np.finfo(np.float32).tiny)
                  for k, part in enumerate(PARTS)}
        x_shape, w_shape, strides, _, dilation = case.shapes()
        results.append({"case": case.describe(), "geometry": list(case),
                        "category": onednn.category(x_shape, w_shape, strides, dilation),
                        "errors": errors, "agrees": all(e <= BOUND for e in errors.values())})
    return {**onednn.library(), "bound": BOUND, "cases": results, "seconds": round(time.perf_counter() - start, 2)}


if __name__ == "__main__":
    json.dump(run(), sys.stdout)

"""oneDNN's convolutions inside XLA:CPU programs, through one FFI handler (onednn_conv.cc).

XLA:CPU computes every convolution with Eigen's tensor contraction. On ResNet18's shapes oneDNN,
the library PyTorch uses on CPUs, is 1.2x to 2x faster (docs/benchmarks.md, "What was
tried", cause 8), and the convolutions are most of a CNN's training step. `conv` is a float32
NHWC/HWIO convolution whose forward pass, input gradient and weight gradient are each one call
into oneDNN; programs compiled with Kernels.ONEDNN (jaxcell.kernels: the trainer's, evaluate's,
predict's and serve's on one CPU device) route plain float32 convolutions to it.

The handler is compiled on first use, with the machine's C++ compiler, against the installed
jaxlib's FFI headers and the oneDNN of the `onednn-cpu-gomp` and `onednn-devel-cpu-gomp` wheels
(a dependency on Linux x86-64), and cached under $JAXCELL_CACHE/onednn or ~/.cache/jaxcell/onednn,
keyed by everything that goes into it; processes that need it at once take turns on a lock there,
so that one builds and the others load its file. Where something is missing (another OS, no compiler),
`available()` is False, one warning says why, and XLA's own convolutions are used: the same
results to float32 rounding. JAXCELL_ONEDNN=0 turns it off.

The guard: before a model routes its first convolution here, the build is checked against XLA's
convolutions at the ISA oneDNN uses in this process (jaxcell.onednn_battery, in a child process,
a few seconds once; the verdict is cached beside the build, keyed by the build, oneDNN's version
and the ISA). A battery case that disagrees sends every convolution of its `category` to XLA,
with one warning that names it. `convolutions()` is the record of it in a run's files.
"""

import contextlib
import ctypes
import functools
import hashlib
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

try:
    import fcntl
except ImportError:  # not POSIX: no lock, and the build refuses anyway (Linux only)
    fcntl = None

import jax
import jax.numpy as jnp
import numpy as np

from jaxcell import cache_dir

TARGET = "jaxcell_onednn_conv"
SOURCE = Path(__file__).with_name("onednn_conv.cc")
FORWARD, INPUT_GRADIENT, WEIGHT_GRADIENT = 0, 1, 2  # the handler's "kind"


class BuildError(RuntimeError):
    """The handler could not be built or loaded; the message says what is missing."""


def _wheel_file(distribution: str, name: str) -> Path:
    try:
        files = importlib.metadata.distribution(distribution).files or []
    except importlib.metadata.PackageNotFoundError:
        raise BuildError(f"the {distribution} package is not installed") from None
    for f in files:
        path = Path(os.path.normpath(f.locate()))  # RECORD names files relative to site-packages
        if path.as_posix().endswith("/" + name):
            return path
    raise BuildError(f"{distribution} has no {name}")


def _compiler() -> str:
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    raise BuildError("no C++ compiler found (set CXX, or install g++)")


def build() -> Path:
    """The compiled handler, built now unless the cache already holds it."""
    if not sys.platform.startswith("linux"):
        raise BuildError(f"built on Linux only, not on {sys.platform}")
    include = _wheel_file("onednn-devel-cpu-gomp", "include/oneapi/dnnl/dnnl.hpp").parents[2]
    lib = _wheel_file("onednn-cpu-gomp", "lib/libdnnl.so").parent
    cxx = _compiler()
    command = [cxx, "-O2", "-std=c++17", "-shared", "-fPIC", "-w", "-I", jax.ffi.include_dir(), "-I", str(include),
               str(SOURCE), "-L", str(lib), "-ldnnl", f"-Wl,-rpath,{lib}"]
    key = hashlib.sha256("\0".join([SOURCE.read_text(), *command, jax.__version__,
                                    importlib.metadata.version("jaxlib")]).encode()).hexdigest()[:16]
    target = cache_dir("onednn") / f"onednn_conv-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)  # an OSError here: available() warns and says why
    # One build at a time per cache: the processes of a job that start together on a new machine wait
    # for the first one's build instead of compiling the same C++ side by side.
    with _exclusive(target.parent / "build.lock"):
        if target.exists():
            return target
        # Written under a temporary name and renamed: a process never loads half a file.
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            out = Path(tmp) / target.name
            done = subprocess.run([*command, "-o", str(out)], capture_output=True, text=True, timeout=600)
            if done.returncode != 0:
                raise BuildError(f"{Path(cxx).name} failed (exit status {done.returncode}) building {SOURCE.name}: "
                                 + (done.stderr.strip()[-2000:] or "no message"))
            os.replace(out, target)
    return target


@contextlib.contextmanager
def _exclusive(lock: Path):
    """Holds an exclusive lock on the file `lock` while the block runs (other processes wait for
    it); runs the block without one where the file cannot be opened (an unwritable cache)."""
    try:
        f = open(lock, "a")
    except OSError:
        yield
        return
    with f:
        if fcntl is not None:
            fcntl.flock(f, fcntl.LOCK_EX)  # released when the file closes
        yield


_LIBRARY: list[ctypes.CDLL] = []  # the loaded handler, once available()


@functools.cache
def available() -> bool:
    """Whether the handler is built, loaded and registered with XLA (once per process)."""
    if os.environ.get("JAXCELL_ONEDNN", "1") == "0":
        return False
    try:
        path = build()
        try:
            library = ctypes.CDLL(str(path))
        except OSError as e:
            raise BuildError(f"cannot load {path}: {e}") from None
        jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(library.JaxcellOnednnConv), platform="cpu")
        _LIBRARY[:] = [library]
    except (BuildError, OSError, subprocess.SubprocessError) as e:  # OSError: e.g. an unwritable cache
        warnings.warn(f"jaxcell: oneDNN convolutions unavailable, XLA's are used instead: {e}", stacklevel=2)
        return False
    return True


class _Version(ctypes.Structure):  # dnnl_version_t
    _fields_ = [("major", ctypes.c_int), ("minor", ctypes.c_int), ("patch", ctypes.c_int)]


# dnnl_cpu_isa_t (oneapi/dnnl/dnnl_types.h): what oneDNN's kernels use here, the CPU's best or
# less where ONEDNN_MAX_CPU_ISA caps it (read once per process, at oneDNN's first use).
_ISAS = {0x1: "sse41", 0x3: "avx", 0x7: "avx2", 0xf: "avx2_vnni", 0x1f: "avx2_vnni_2", 0x27: "avx512_core",
         0x67: "avx512_core_vnni", 0xe7: "avx512_core_bf16", 0x1ef: "avx512_core_fp16", 0xfef: "avx512_core_amx",
         0x1fef: "avx512_core_amx_fp16"}


def library() -> dict:
    """{"version": oneDNN's, "isa": the one its kernels use in this process, "build": the handler's
    file}; call only when available()."""
    (lib,) = _LIBRARY
    lib.dnnl_version.restype = ctypes.POINTER(_Version)  # libdnnl's, found through the handler
    v = lib.dnnl_version().contents
    isa = lib.dnnl_get_effective_cpu_isa()
    return {"version": f"{v.major}.{v.minor}.{v.patch}", "isa": _ISAS.get(isa, hex(isa)), "build": Path(lib._name).stem}


def _channels(c: int) -> str:
    return "16k" if c % 16 == 0 else "8k" if c % 8 == 0 else "<8" if c < 8 else "tail"


def category(x_shape, w_shape, strides, dilation) -> list[str]:
    """What oneDNN chooses a convolution's kernel by: 1x1 or not, strided, dilated, whether the
    channel counts fill its SIMD blocks of 8 (AVX2) or 16 (AVX-512) or leave a tail, and maps
    smaller than the kernel. Geometries of one category run the same kernels and code paths."""
    kh, kw, cin, cout = w_shape
    return ["1x1" if (kh, kw) == (1, 1) else "kxk", "strided" if max(strides) > 1 else "unit stride",
            "dilated" if max(dilation) > 1 else "undilated", f"in {_channels(cin)}", f"out {_channels(cout)}",
            "map < kernel" if x_shape[1] < kh or x_shape[2] < kw else "map >= kernel"]


@functools.cache
def verdict() -> dict:
    """The battery's verdict for this build, oneDNN version and ISA (jaxcell.onednn_battery): read
    from the cache, else computed in a child process (which inherits ONEDNN_MAX_CPU_ISA) and
    cached. Where the check itself fails, "error" says how and every convolution goes to XLA.
    One warning names what goes to XLA. Call only when available()."""
    info = library()
    # the build (onednn_conv.cc), and the Python that calls it and checks it
    code = hashlib.sha256("\0".join([info["build"], Path(__file__).read_text(),
                                     Path(__file__).with_name("onednn_battery.py").read_text()]).encode())
    path = cache_dir("onednn") / f"verdict-{code.hexdigest()[:16]}-{info['version']}-{info['isa']}.json"
    found = _read_verdict(path)
    if found is None:
        with contextlib.suppress(OSError):
            path.parent.mkdir(parents=True, exist_ok=True)
        with _exclusive(path.parent / "verdict.lock"):  # one battery at a time, as one build
            found = _read_verdict(path)
            if found is None:
                found = _run_battery(info)
                try:
                    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as f:
                        json.dump(found, f, indent=1)
                    os.replace(f.name, path)
                except OSError:  # an unwritable cache: checked again by the next process
                    pass
    if found.get("error"):
        warnings.warn(f"jaxcell: the check of oneDNN {info['version']} ({info['isa']}) against XLA's convolutions "
                      f"failed, so XLA's are used for all: {found['error']}", stacklevel=2)
    for case in found["cases"]:
        if not case["agrees"]:
            parts = ", ".join(f"{part} {error:.2g}" for part, error in case["errors"].items() if error > found["bound"])
            warnings.warn(f"jaxcell: oneDNN {info['version']} ({info['isa']}) disagrees with XLA on a {case['case']} "
                          f"convolution ({parts} relative); convolutions of its kind ({', '.join(case['category'])}) "
                          "use XLA's", stacklevel=2)
    return found


def _read_verdict(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _run_battery(info: dict) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SOURCE.parents[1]), os.environ.get("PYTHONPATH", "")])}
    try:
        done = subprocess.run([sys.executable, "-m", "jaxcell.onednn_battery"], capture_output=True, text=True,
                              env=env, timeout=600)
    except subprocess.TimeoutExpired:
        return {**info, "error": "it ran past 600 s", "cases": []}
    if done.returncode != 0:
        return {**info, "error": f"exit status {done.returncode}: {done.stderr.strip()[-1000:] or 'no message'}",
                "cases": []}
    try:
        found = json.loads(done.stdout)
    except ValueError:
        return {**info, "error": f"it printed no verdict: {done.stdout[-300:]!r}", "cases": []}
    if (found["version"], found["isa"]) != (info["version"], info["isa"]):
        return {**info, "error": f"the check ran oneDNN {found['version']} ({found['isa']})", "cases": []}
    return found


def verified(x_shape, w_shape, strides, dilation) -> bool:
    """Whether a convolution of this geometry may run here: its category passed the battery."""
    found = verdict()
    failed = [case["category"] for case in found["cases"] if not case["agrees"]]
    return not found.get("error") and category(x_shape, w_shape, strides, dilation) not in failed


def convolutions() -> dict:
    """The record of a program whose convolutions go here (jaxcell.kernels.convolutions):
    {"backend": "onednn", "version", "isa", "routed_to_xla": [categories the battery sends to
    XLA]}. Call only when available()."""
    found = verdict()
    routed = (["all (the check failed)"] if found.get("error") else
              [", ".join(case["category"]) for case in found["cases"] if not case["agrees"]])
    return {"backend": "onednn", "version": found["version"], "isa": found["isa"], "routed_to_xla": routed}


def _call(kind, a, b, out_shape, strides, padding, dilation):
    ints = lambda v: np.asarray(v, np.int64)  # noqa: E731
    return jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct(out_shape, jnp.float32), vmap_method="sequential")(
        a, b, kind=np.int64(kind), strides=ints(strides), dilation=ints(dilation),
        padding_lo=ints([lo for lo, _ in padding]), padding_hi=ints([hi for _, hi in padding]))


def output_shape(x_shape, w_shape, strides, padding, dilation):
    """(N, Ho, Wo, Co) of an NHWC x and an HWIO w."""
    n, *spatial, _ = x_shape
    out = [(size + lo + hi - (k - 1) * d - 1) // s + 1
           for size, (lo, hi), k, d, s in zip(spatial, padding, w_shape[:2], dilation, strides)]
    return (n, *out, w_shape[3])


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def conv(x: jax.Array, w: jax.Array, strides, padding, dilation) -> jax.Array:
    """lax.conv_general_dilated(x, w, strides, padding, rhs_dilation=dilation) for float32 NHWC x
    and HWIO w, one group; padding is ((lo, hi), (lo, hi)). Call only when available()."""
    return _call(FORWARD, x, w, output_shape(x.shape, w.shape, strides, padding, dilation), strides, padding,
                 dilation)


def _conv_fwd(x, w, strides, padding, dilation):
    return conv(x, w, strides, padding, dilation), (x, w)


def _conv_bwd(strides, padding, dilation, residuals, dy):
    x, w = residuals
    return (_call(INPUT_GRADIENT, dy, w, x.shape, strides, padding, dilation),
            _weight_gradient(x, dy, w.shape, strides, padding, dilation))


def _weight_gradient(x, dy, w_shape, strides, padding, dilation):
    if w_shape[:2] == (1, 1) and tuple(strides) != (1, 1) and w_shape[2] < 16:
        # oneDNN 3.2's jit_1x1 weight gradient (jit_avx2_1x1_convolution_bwd_weights_t) first
        # copies a strided input into scratch memory at unit stride ("rtus"). With NHWC maps each
        # thread's copy is laid out at Ci floats a pixel (space_per_thread_ = is * ic) but placed at
        # sp * ic_block: with fewer input channels than the SIMD block (Ci < 8 on AVX2) it runs
        # past its thread's slice, into the next thread's copy (a wrong gradient: 0.3 relative for
        # 4 -> 8 channels, 8x8 maps, stride 2) or past the end of the scratch memory (heap
        # corruption with one thread). bench/onednn_strided_1x1.cc shows it without jaxcell. The
        # AVX-512 kernel places its copy the same way (Ci < 16 there): on an Intel Xeon with AVX-512
        # its gradients came out right, but with 2 threads and batch 1 it wrote up to 1.8 KB past
        # its scratch memory. oneDNN's main branch (March 2025) still has both.
        # The weight gradient of a 1x1 convolution only sees the pixels its stride lands on, so
        # for Ci < 16 it is computed, exactly, as the unit-stride one of those pixels: no copy
        # inside oneDNN, one slice here. Not for wider inputs, where oneDNN's copy fits and is
        # 1.0-1.5x faster than the slice (ResNet18's downsampling at 64 px); the battery checks
        # both sides of the line. (Forward passes and input gradients place their copies right.)
        (lo_h, hi_h), (lo_w, hi_w) = padding
        if any(p for pair in padding for p in pair):
            x = jnp.pad(x, ((0, 0), (lo_h, hi_h), (lo_w, hi_w), (0, 0)))
        ho, wo = dy.shape[1:3]
        x = x[:, :(ho - 1) * strides[0] + 1:strides[0], :(wo - 1) * strides[1] + 1:strides[1], :]
        strides, padding = (1, 1), ((0, 0), (0, 0))
    return _call(WEIGHT_GRADIENT, x, dy, w_shape, strides, padding, dilation)


conv.defvjp(_conv_fwd, _conv_bwd)

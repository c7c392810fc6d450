"""torch_ref <-> jaxcell weights, by one mechanical rule for every model.

The key map is never written by hand. It is derived from the two twins themselves:

* the torch twin's state_dict keys and shapes (built on the "meta" device: no memory, no init cost);
* the flax twin's abstract variables (`jax.eval_shape` of `init`, batch 1);
* the naming rule: the flax module path is the torch module path split on ".", with a purely
  numeric segment joined to the previous one by "_" (`layer1.0.conv1` -> `layer1_0/conv1`);
* per-leaf rules chosen by the torch module's type (conv, linear, norm layers, embeddings), one
  group rule for nn.MultiheadAttention (packed q/k/v), and identity for the bare parameters and
  buffers of our own modules (`pos_embed` <-> a flax `self.param("pos_embed")` of the same shape).

The result, `key_map(name, **kw)`, is a list of `Entry` (torch keys, flax paths, rule). It is
total: every torch key is consumed once, every flax leaf filled once, every shape checked, and
anything else raises `ConversionError` naming the first key or path that does not fit.

`num_classes` need not be given: it is read from the weights themselves. The twins are probed at
two class counts; the leaf whose shape follows the class count (the classifier head) tells on
which axis to read it. So a torchvision file with a 1000-class head loads without arguments.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Mapping
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import torch
import torch.nn as tnn

import jaxcell.models
import torch_ref
from jaxcell.errors import UserError
from jaxcell.twins import flax_path

Path = tuple[str, ...]  # (collection, module, ..., leaf), e.g. ("params", "block1", "conv", "kernel")


class ConversionError(UserError, ValueError):
    """Weights that do not fit the model: wrong shape, missing or unknown key, no rule."""


@dataclasses.dataclass(frozen=True)
class Entry:
    """One step of the map: torch tensors <-> flax leaves, with both transforms.

    Most entries are one-to-one; attention's packed in_proj is one torch key to three flax leaves.
    The transforms use only array methods (and `_concat`), so they run on numpy arrays for real
    conversions and on tracers under `jax.eval_shape` for the shape check of the plan.
    """

    torch_keys: tuple[str, ...]
    flax_paths: tuple[Path, ...]
    rule: str
    to_flax: Callable[[list], list] = dataclasses.field(repr=False, compare=False)
    to_torch: Callable[[list], list] = dataclasses.field(repr=False, compare=False)


def flax_module_path(torch_path: str) -> tuple[str, ...]:
    """The naming rule: `layer1.0.downsample.0` -> ("layer1_0", "downsample_0")."""
    return flax_path(torch_path)


def _show(path: Path) -> str:
    return "/".join(path)


def _concat(xs: list) -> Any:
    if any(isinstance(x, jax.Array) for x in xs):
        return jnp.concatenate(xs, axis=0)
    return np.concatenate(xs, axis=0)


# --- per-leaf transforms: (to_flax, to_torch) on one array ---------------------------------------

def _conv_perm(ndim: int) -> tuple[int, ...]:
    # torch (O, I/g, *spatial) -> flax (*spatial, I/g, O)
    return tuple(range(2, ndim)) + (1, 0)


IDENTITY = (lambda x: x, lambda y: y)
TRANSPOSE = (lambda x: x.T, lambda y: y.T)
CONV = (lambda x: x.transpose(_conv_perm(x.ndim)),
        lambda y: y.transpose(tuple(int(i) for i in np.argsort(_conv_perm(y.ndim)))))

# torch module type -> {torch leaf: (flax collection, flax leaf, rule name, transforms)}.
# A torch.nn type that is not listed (and has weights) is an error, never a silent identity.
_LEAF_RULES: list[tuple[type, dict[str, tuple[str, str, str, tuple]]]] = [
    (tnn.modules.conv._ConvNd, {
        "weight": ("params", "kernel", "conv OI..->..IO", CONV),
        "bias": ("params", "bias", "identity", IDENTITY)}),
    (tnn.Linear, {
        "weight": ("params", "kernel", "linear (O,I)->(I,O)", TRANSPOSE),
        "bias": ("params", "bias", "identity", IDENTITY)}),
    (tnn.modules.batchnorm._BatchNorm, {
        "weight": ("params", "scale", "identity", IDENTITY),
        "bias": ("params", "bias", "identity", IDENTITY),
        "running_mean": ("batch_stats", "mean", "identity", IDENTITY),
        "running_var": ("batch_stats", "var", "identity (unbiased, torch's convention)", IDENTITY),
        "num_batches_tracked": ("batch_stats", "num_batches_tracked", "int64<->int32", IDENTITY)}),
    ((tnn.LayerNorm, tnn.GroupNorm), {
        "weight": ("params", "scale", "identity", IDENTITY),
        "bias": ("params", "bias", "identity", IDENTITY)}),
    (tnn.Embedding, {
        "weight": ("params", "embedding", "identity", IDENTITY)}),
]


def _one(key: str, path: Path, rule: str, fns: tuple) -> Entry:
    fwd, bwd = fns
    return Entry((key,), (path,), rule, lambda xs: [fwd(xs[0])], lambda ys: [bwd(ys[0])])


def _leaf_entries(module: tnn.Module, keys: dict[str, str], fpath: tuple[str, ...],
                  abstract: dict[Path, Any]) -> list[Entry]:
    for types, table in _LEAF_RULES:
        if isinstance(module, types) and not getattr(module, "transposed", False):
            entries = []
            for leaf, key in keys.items():
                if leaf not in table:
                    raise ConversionError(f"no conversion rule for torch key {key!r} "
                                          f"({type(module).__name__} leaf {leaf!r})")
                coll, fleaf, rule, fns = table[leaf]
                entries.append(_one(key, (coll, *fpath, fleaf), rule, fns))
            return entries
    if type(module).__module__.startswith("torch."):
        raise ConversionError(f"no conversion rule for torch module type {type(module).__name__} "
                              f"(key {next(iter(keys.values()))!r}); add one to parity/convert.py")
    # Our own module's bare nn.Parameter / buffer: a flax variable of the same name, same layout,
    # in whichever collection the flax twin keeps it.
    entries = []
    for leaf, key in keys.items():
        hits = [p for p in abstract if p[1:] == (*fpath, leaf)]
        if len(hits) != 1:
            where = _show(("*", *fpath, leaf))
            raise ConversionError(f"torch key {key!r} has no flax counterpart {where}"
                                  if not hits else f"torch key {key!r} matches several flax leaves: "
                                  + ", ".join(map(_show, hits)))
        entries.append(_one(key, hits[0], "identity (bare parameter)", IDENTITY))
    return entries


def _attention_entries(module: tnn.MultiheadAttention, prefix: str, keys: list[str],
                       fpath: tuple[str, ...]) -> list[Entry]:
    """nn.MultiheadAttention <-> flax MultiHeadDotProductAttention.

    torch packs q, k, v as rows of in_proj_weight (3E, E) (or q/k/v_proj_weight when kdim/vdim
    differ) with head h owning output features h*D:(h+1)*D; flax keeps kernels (E_in, H, D) and
    out (H, D, E). So: split rows, transpose, reshape the output axis into (H, D).
    """
    if module.bias_k is not None:
        raise ConversionError(f"torch key {prefix + 'bias_k'!r}: add_bias_kv has no flax counterpart")
    e, h = module.embed_dim, module.num_heads
    d = e // h
    names = ("query", "key", "value")
    p = lambda *leaf: ("params", *fpath, *leaf)  # noqa: E731
    entries = []
    to_heads = (lambda x: x.T.reshape(x.shape[1], h, d), lambda y: y.reshape(y.shape[0], h * d).T)
    for key in keys:
        leaf = key[len(prefix):]
        if leaf == "in_proj_weight":
            entries.append(Entry(
                (key,), tuple(p(n, "kernel") for n in names),
                "attention in_proj_weight (3E,E) -> query/key/value kernels (E,H,D)",
                lambda xs: [xs[0][i * e:(i + 1) * e].T.reshape(e, h, d) for i in range(3)],
                lambda ys: [_concat([y.reshape(y.shape[0], h * d).T for y in ys])]))
        elif leaf == "in_proj_bias":
            entries.append(Entry(
                (key,), tuple(p(n, "bias") for n in names),
                "attention in_proj_bias (3E,) -> query/key/value biases (H,D)",
                lambda xs: [xs[0][i * e:(i + 1) * e].reshape(h, d) for i in range(3)],
                lambda ys: [_concat([y.reshape(h * d) for y in ys])]))
        elif leaf in ("q_proj_weight", "k_proj_weight", "v_proj_weight"):
            entries.append(_one(key, p(names["qkv".index(leaf[0])], "kernel"),
                                "attention proj weight (E,Ein) -> kernel (Ein,H,D)", to_heads))
        elif leaf == "out_proj.weight":
            entries.append(_one(key, p("out", "kernel"), "attention out_proj (E,E) -> out kernel (H,D,E)",
                                (lambda x: x.T.reshape(h, d, x.shape[0]),
                                 lambda y: y.reshape(h * d, y.shape[-1]).T)))
        elif leaf == "out_proj.bias":
            entries.append(_one(key, p("out", "bias"), "identity", IDENTITY))
        else:
            raise ConversionError(f"no conversion rule for torch key {key!r} (MultiheadAttention)")
    return entries


# Group rules claim every key under their module, children included (out_proj is a Linear).
_GROUP_RULES: list[tuple[type, Callable]] = [(tnn.MultiheadAttention, _attention_entries)]


# --- templates: what the twins expect -----------------------------------------------------------

def _defaults() -> dict[str, Any]:
    params = inspect.signature(jaxcell.models.create).parameters
    return {"num_classes": params["num_classes"].default, "image_size": params["image_size"].default}


def _torch_template(name: str, kw: dict) -> tnn.Module:
    try:
        with torch.device("meta"):
            return torch_ref.create(name, **kw)
    except ValueError as exc:  # unknown name or argument: the user's to fix
        raise ConversionError(f"torch_ref: {exc}") from None
    except (NotImplementedError, RuntimeError):
        return torch_ref.create(name, **kw)  # a model that cannot be built on "meta": pay for init


def _flax_abstract(name: str, kw: dict) -> dict[Path, jax.ShapeDtypeStruct]:
    model = jaxcell.models.create(name, **kw)
    s = kw["image_size"]

    def init(x):
        rngs = {"params": jax.random.key(0), "dropout": jax.random.key(1)}
        return model.init(rngs, x, train=False)

    variables = jax.eval_shape(init, jax.ShapeDtypeStruct((1, s, s, 3), jnp.float32))
    return _flatten(variables)


def _flatten(tree: Mapping, prefix: Path = ()) -> dict[Path, Any]:
    out: dict[Path, Any] = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(_flatten(v, (*prefix, str(k))))
        else:
            out[(*prefix, str(k))] = v
    return out


def _unflatten(flat: dict[Path, Any]) -> dict:
    out: dict = {}
    for path, v in flat.items():
        node = out
        for seg in path[:-1]:
            node = node.setdefault(seg, {})
        node[path[-1]] = v
    return out


@dataclasses.dataclass(frozen=True)
class Plan:
    entries: tuple[Entry, ...]
    torch_shapes: dict[str, tuple[tuple[int, ...], torch.dtype]]  # state_dict order
    flax_shapes: dict[Path, jax.ShapeDtypeStruct]


_PLANS: dict[tuple, Plan] = {}


def _plan(name: str, kw: dict) -> Plan:
    # Keyed by the model classes too: tests register temporary models under reused names.
    key = (name, jaxcell.models.spec(name).build, torch_ref.REGISTRY.get(name), repr(sorted(kw.items())))
    if key not in _PLANS:
        if len(_PLANS) >= 32:
            _PLANS.pop(next(iter(_PLANS)))
        _PLANS[key] = _build_plan(name, kw)
    return _PLANS[key]


def _build_plan(name: str, kw: dict) -> Plan:
    tmodel = _torch_template(name, kw)
    sd = tmodel.state_dict()
    torch_shapes = {k: (tuple(v.shape), v.dtype) for k, v in sd.items()}
    abstract = _flax_abstract(name, kw)

    by_module: dict[str, dict[str, str]] = {}
    for key in sd:
        mpath, _, leaf = key.rpartition(".")
        by_module.setdefault(mpath, {})[leaf] = key

    entries: list[Entry] = []
    claimed: set[str] = set()
    for mpath, module in tmodel.named_modules():
        prefix = mpath + "." if mpath else ""
        fpath = flax_module_path(mpath)
        group = next((fn for t, fn in _GROUP_RULES if isinstance(module, t)), None)
        if group is not None:
            keys = [k for k in sd if k.startswith(prefix) and k not in claimed]
            if keys:
                entries += group(module, prefix, keys, fpath)
                claimed.update(keys)
            continue
        keys = {leaf: k for leaf, k in by_module.get(mpath, {}).items() if k not in claimed}
        if keys:
            entries += _leaf_entries(module, keys, fpath, abstract)
            claimed.update(keys.values())
    unclaimed = [k for k in sd if k not in claimed]
    if unclaimed:
        raise ConversionError(f"torch key {unclaimed[0]!r} is not reached by any module rule")

    filled: dict[Path, str] = {}
    for e in entries:
        for path in e.flax_paths:
            if path not in abstract:
                raise ConversionError(f"torch key {e.torch_keys[0]!r} maps to flax {_show(path)}, "
                                      f"which the flax {name!r} does not have")
            if path in filled:
                raise ConversionError(f"flax {_show(path)} is filled twice: by {filled[path]!r} "
                                      f"and {e.torch_keys[0]!r}")
            filled[path] = e.torch_keys[0]
    for path in abstract:
        if path not in filled:
            raise ConversionError(f"flax {_show(path)} {abstract[path].shape} has no torch counterpart "
                                  f"in torch_ref {name!r}")

    # The twins must agree on shapes through the transforms, before any data is touched.
    for e in entries:
        ins = [jax.ShapeDtypeStruct(torch_shapes[k][0], jnp.float32) for k in e.torch_keys]
        outs = jax.eval_shape(lambda *xs, e=e: e.to_flax(list(xs)), *ins)
        for path, out in zip(e.flax_paths, outs):
            if tuple(out.shape) != tuple(abstract[path].shape):
                raise ConversionError(
                    f"twins disagree: torch key {e.torch_keys[0]!r} {torch_shapes[e.torch_keys[0]][0]} "
                    f"gives {tuple(out.shape)} by rule '{e.rule}', flax {_show(path)} is "
                    f"{tuple(abstract[path].shape)}")
    return Plan(tuple(entries), torch_shapes, abstract)


def _resolve_kwargs(name: str, model_kwargs: dict, given: dict, side: str) -> dict:
    """Fill the registry defaults; read num_classes from the weights when it is not given.

    The plan is built at two class counts; a leaf whose size along some axis is the class count in
    both is the classifier head, and the given weights' size along that axis is their class count.
    Weights without that leaf keep the default and fail the totality check by name.
    """
    jaxcell.models.spec(name)  # unknown names fail here, as a UserError listing the known ones
    kw = {**_defaults(), **model_kwargs}
    if "num_classes" in model_kwargs:
        return kw
    a, b = kw["num_classes"], kw["num_classes"] + 3
    if side == "torch":  # the torch twin's shapes alone, built on "meta": no flax model traced for the probe
        shapes = [{k: tuple(v.shape) for k, v in _torch_template(name, {**kw, "num_classes": n}).state_dict().items()}
                  for n in (a, b)]
    else:
        shapes = [{k: tuple(v.shape) for k, v in _plan(name, {**kw, "num_classes": n}).flax_shapes.items()}
                  for n in (a, b)]
    for key, sa in shapes[0].items():
        sb, sg = shapes[1].get(key), given.get(key)
        if sg is None or sb is None or len(sa) != len(sb) or len(sg) != len(sa):
            continue
        for ax, (na, nb) in enumerate(zip(sa, sb)):
            if (na, nb) == (a, b):
                kw["num_classes"] = int(sg[ax])
                return kw
    return kw


# --- the public conversions ---------------------------------------------------------------------

def key_map(name: str, **model_kwargs) -> list[Entry]:
    """The explicit map for a model, for inspection: one Entry per torch key (or attention group)."""
    return list(_plan(name, _resolve_kwargs(name, model_kwargs, {}, "torch")).entries)


def _numpy_from_torch(v: Any) -> np.ndarray:
    if isinstance(v, torch.Tensor):
        v = v.detach().cpu()
        return (v.float() if v.dtype == torch.bfloat16 else v).numpy()
    return np.asarray(v)


def _shape(v: Any) -> tuple[int, ...]:
    return tuple(v.shape) if hasattr(v, "shape") else np.shape(v)


def _check_names(given: list, expected: list, show: Callable, what: str) -> None:
    exp, giv = set(expected), set(given)
    missing = [k for k in expected if k not in giv]
    if missing:
        raise ConversionError(f"{what} is missing {show(missing[0])}"
                              + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    extra = [k for k in given if k not in exp]
    if extra:
        raise ConversionError(f"{what} has unexpected {show(extra[0])}"
                              + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""))


def torch_to_flax(name: str, state_dict: Mapping[str, Any], **model_kwargs) -> dict:
    """A torch_ref (or torchvision) state dict -> {"params": ..., "batch_stats": ...} for jaxcell.

    model_kwargs are the constructor arguments; num_classes is read from the weights if not given.
    "batch_stats" is present only if the model has batch statistics. Values are jnp arrays in the
    flax twin's dtypes (num_batches_tracked int64 -> int32).
    """
    given = {k: _shape(v) for k, v in state_dict.items()}
    kw = _resolve_kwargs(name, model_kwargs, given, "torch")
    plan = _plan(name, kw)
    _check_names(list(given), list(plan.torch_shapes), repr, f"state dict for {name!r}")
    for key, (shape, _) in plan.torch_shapes.items():
        if given[key] != shape:
            raise ConversionError(f"torch key {key!r} has shape {given[key]}, model {name!r} "
                                  f"({_args(kw)}) expects {shape}")
    flat: dict[Path, Any] = {}
    for e in plan.entries:
        outs = e.to_flax([_numpy_from_torch(state_dict[k]) for k in e.torch_keys])
        for path, y in zip(e.flax_paths, outs):
            want = plan.flax_shapes[path]
            # Our own copy, as JAX may share an aligned array's memory (y may view a torch tensor
            # that goes on training); device_put, as JAX 0.10's jnp.asarray of an ndarray compiles
            # an identity program per shape (69 for DenseNet121).
            flat[path] = jax.device_put(np.array(y, dtype=want.dtype, copy=True))
    return _unflatten(flat)


def flax_to_torch(name: str, variables: Mapping, *, dtype: torch.dtype | None = None,
                  **model_kwargs) -> dict[str, torch.Tensor]:
    """jaxcell variables ({"params", "batch_stats"}) -> a state dict that the torch_ref twin loads
    with strict=True, in its own key order and dtypes (floating ones in `dtype` if given: training
    parity's float64 mode). num_classes is read if not given."""
    flat = _flatten(variables)
    given = {p: _shape(v) for p, v in flat.items()}
    kw = _resolve_kwargs(name, model_kwargs, given, "flax")
    plan = _plan(name, kw)
    _check_names(list(given), list(plan.flax_shapes), _show, f"flax variables for {name!r}")
    for path, want in plan.flax_shapes.items():
        if given[path] != tuple(want.shape):
            raise ConversionError(f"flax {_show(path)} has shape {given[path]}, model {name!r} "
                                  f"({_args(kw)}) expects {tuple(want.shape)}")
    out: dict[str, torch.Tensor] = {}
    for e in plan.entries:
        ins = []
        for path in e.flax_paths:
            y = np.asarray(flat[path])
            ins.append(y.astype(np.float32) if y.dtype.name == "bfloat16" else y)
        for key, x in zip(e.torch_keys, e.to_torch(ins)):
            want = plan.torch_shapes[key][1]
            out[key] = torch.from_numpy(np.array(x)).to(dtype if dtype is not None and want.is_floating_point else want)
    return {k: out[k] for k in plan.torch_shapes}


def _args(kw: dict) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in kw.items())

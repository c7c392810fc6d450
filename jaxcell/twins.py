"""What the flax models and their torch_ref twins share, in plain Python (no jax, no torch):
the naming rule that maps one framework's module paths onto the other's, each model's presets
(input normalization, learning rate, head, Grad-CAM layer), and the constructor checks of the
configurable models, so both frameworks accept and refuse the same arguments with the same words.

torch_ref imports this module (and jaxcell.settings, jaxcell.data) without jax: tests/test_imports.py
checks that importing them loads no jax."""

from collections.abc import Sequence

from jaxcell.errors import UserError


class ConfigError(UserError, ValueError):
    """A model constructor argument that cannot be built (a ValueError to torch users)."""


def flax_path(torch_path: str) -> tuple[str, ...]:
    """The naming rule: torch `layer1.0.downsample.0` is flax ("layer1_0", "downsample_0")."""
    out: list[str] = []
    for seg in torch_path.replace("/", ".").split("."):
        if seg.isdigit() and out:
            out[-1] += "_" + seg
        elif seg:
            out.append(seg)
    return tuple(out)


# --- presets per model -------------------------------------------------------------------------

# torchvision's input normalization, so its ImageNet checkpoints see what they were trained on.
IMAGENET = {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}

# Per model: input normalization of images scaled to [0, 1], (x - mean) / std (default: none);
# Adam's peak learning rate when the user gives none (default 1e-3); the top-level module that
# maps features to classes (default "head": replaced when fine-tuning for other classes, trained
# alone with --head-epochs / --freeze-backbone).
MODEL_PRESETS: dict[str, dict] = {
    # A dense layer on flattened features has a huge fan-in (16,384 at 64 px): Adam's early,
    # gradient-size-blind steps of about lr per weight then swamp it at 1e-3.
    "lightnetcell": {"lr": 3e-4, "head": "fc2"},
    "brin": {},
    "hybrid_vit": {},
    "resnet18": {"head": "fc", **IMAGENET},
    "resnet34": {"head": "fc", **IMAGENET},
    "resnet50": {"head": "fc", **IMAGENET},
    "densenet121": {"head": "classifier", **IMAGENET},
}

# Optical-density centring (--od-center): the input is -ln(x) per channel minus its mean over the
# image, divided by this (about the spread of the centred density on the ALL smears), instead of
# the model's mean/std. A stain's overall shift (HED jitter, another lab's staining time) moves
# every pixel's optical density by nearly the same amount per channel, so centring removes most
# of it; what remains is the shape of the density map: nuclei, chromatin, cytoplasm.
OD_SCALE = 0.25


def model_preset(name: str) -> dict:
    """A model's presets with every default filled in: mean, std, lr, head."""
    if name not in MODEL_PRESETS:
        raise ConfigError(f"unknown model {name!r}; known models: {', '.join(sorted(MODEL_PRESETS))}")
    return {"mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0), "lr": 1e-3, "head": "head", **MODEL_PRESETS[name]}


def preprocessing(name: str, image_size: int, od_center: bool = False) -> dict:
    """The input preprocessing a model trained at `image_size` declares (config.json, export sidecars)."""
    p = model_preset(name)
    pre = {"scale": 1 / 255, "mean": list(p["mean"]), "std": list(p["std"]), "image_size": image_size}
    if od_center:
        pre.update(mean=[0.0] * 3, std=[OD_SCALE] * 3, od_center=True)
    return pre


# Default Grad-CAM layer per model: a regular expression over flax module paths ("/"-joined); of
# the modules that match, the one called last is taken (so the pattern fits every depth and width
# of a model). The last spatial feature map before pooling is the usual choice: fine enough to
# localize, deep enough to carry the class. A model missing here: the last module (any depth)
# whose output is a 4-D feature map (jaxcell.explain.choose_layer).
TARGET_LAYERS = {
    "lightnetcell": r"block\d+",        # the last conv block (after its pool)
    "resnet18": r"layer4_\d+",          # the last residual block
    "resnet34": r"layer4_\d+",
    "resnet50": r"layer4_\d+",
    "densenet121": r"features",         # norm5, the last feature map
    "brin": r"non_local",               # the last spatial block before the head
    "hybrid_vit": r"norm",              # final LayerNorm over the token grid, before mean pooling
}


# --- BRIN -------------------------------------------------------------------------------------

BRIN_PRESETS: dict[str, dict] = {
    "paper": {"width": 64, "depth": (2, 2, 2), "groups": 8},
    "small": {"width": 16, "depth": (1, 1, 1), "groups": 4},
}


def brin_config(preset: str | None, width: int | None, depth: Sequence[int] | None,
                groups: int | None) -> tuple[int, tuple[int, ...], int]:
    """(width, depth, groups) from a preset name and overrides; refuses what cannot be built."""
    name = "paper" if preset is None else preset
    if name not in BRIN_PRESETS:
        raise ConfigError(f"BRIN preset {preset!r} unknown; known presets: {', '.join(BRIN_PRESETS)}")
    p = BRIN_PRESETS[name]
    width = p["width"] if width is None else int(width)
    depth = p["depth"] if depth is None else tuple(int(d) for d in depth)
    groups = p["groups"] if groups is None else int(groups)
    if width < 4 or width % 4:
        raise ConfigError(f"BRIN width must be a positive multiple of 4 (inception has 4 branches), got {width}")
    if not depth or min(depth) < 1:
        raise ConfigError(f"BRIN depth must be one or more positive block counts per stage, got {depth}")
    if groups < 1 or (width // 2) % groups:
        raise ConfigError(f"BRIN groups={groups} must divide the efficient pathway's {width // 2} "
                          f"bottleneck channels (width / 2)")
    return width, depth, groups


# --- the CNN-Transformer hybrid -----------------------------------------------------------------

HYBRID_PATCH = 2  # patch_embed kernel and stride


def hybrid_reduction(stages: int) -> int:
    """Pixels per token along each axis: a 2x2 max pool per conv stage, then the patch."""
    return 2 ** stages * HYBRID_PATCH


def hybrid_token_grid(size: int, stages: int) -> int:
    """Tokens along one axis for an image side of `size` pixels (every step floors, so one
    floor division does)."""
    return size // hybrid_reduction(stages)


def hybrid_config(image_size: int, widths: Sequence[int], dim: int, depth: int, heads: int, mlp_ratio: float,
                  pos_image_size: int | None) -> int:
    """Validate the hybrid's constructor arguments; returns the reference token grid g."""
    if not widths or min(widths) < 1:
        raise ConfigError(f"hybrid_vit widths must be positive channel counts, one per conv stage, "
                          f"got {tuple(widths)}")
    ref, r = image_size if pos_image_size is None else pos_image_size, hybrid_reduction(len(widths))
    if ref < r:
        raise ConfigError(f"hybrid_vit needs a reference image size of at least {r} pixels "
                          f"(one token per {r}x{r}), got {ref}")
    if heads < 1 or dim % heads:
        raise ConfigError(f"hybrid_vit heads={heads} must divide dim={dim}")
    if depth < 0 or int(dim * mlp_ratio) < 1:
        raise ConfigError(f"hybrid_vit needs depth >= 0 and dim * mlp_ratio >= 1, got depth={depth}, "
                          f"mlp_ratio={mlp_ratio}")
    return hybrid_token_grid(ref, len(widths))

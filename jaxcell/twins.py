"""What the flax models and their torch_ref twins share, in plain Python (no jax, no torch):
the naming rule that maps one framework's module paths onto the other's, and the constructor
checks of the configurable models, so both frameworks accept and refuse the same arguments
with the same words."""

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

"""Foreign test sets for the out-of-distribution detector, built from what the repository already has.

    python -m jaxcell.foreign_sets --workdir RUN --out DIR [--split test] [--per-set 200]

writes one folder of PNG files per set under DIR, each a kind of image the model was not trained on:

  stain_heavy       held-out images under a heavy HED stain shift (strength 0.1; training jitters 0.03-0.05)
  hue_rotated       held-out images with the hue turned by a third of a circle (another stain chemistry)
  zoom_in           the central quarter of held-out images enlarged (twice the magnification)
  zoom_out          2 x 2 held-out images shrunk into one (half the magnification: many cells per image)
  blur              held-out images out of focus (Gaussian blur, radius 3% of the side)
  synthetic_smears  jaxcell's own synthetic smears (jaxcell.data.synthetic): drawn blood, not photographed
  photographs       crops of the sample photographs matplotlib ships (no blood at all)
  textures          noise, smooth noise, stripes and terrain maps in colour maps (no blood, no photograph)

The held-out images are the files of the run's --split (default test), so none was trained on. None of
these sets contains healthy cells from another laboratory: the target "healthy foreign cells called
leukemia" cannot be measured on them.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

# The sets made image by image from the held-out split, in its order: the model's accuracy on them is measurable.
PER_IMAGE = ("stain_heavy", "hue_rotated", "zoom_in", "blur")
SETS = ("stain_heavy", "hue_rotated", "zoom_in", "zoom_out", "blur", "synthetic_smears", "photographs", "textures")
HEAVY_STAIN = 0.1
HUE_TURN = 1 / 3


def _held_out(workdir: str, split: str) -> tuple[list[str], np.ndarray]:
    """(paths, images at their own size, uint8) of the run's held-out split."""
    from jaxcell import evaluate
    from jaxcell.data.images import load_images
    from jaxcell.errors import UserError

    member = evaluate.restore(workdir)
    ds = evaluate.Datasets(None).get(member)
    paths = ds.files.get(split) or []
    if not paths:
        raise UserError(f"{workdir}: its data has no image files in the {split!r} split (synthetic data?)")
    from PIL import Image

    with Image.open(paths[0]) as im:
        side = max(im.size)
    return paths, load_images(paths, side)


def _hue_rotate(images: np.ndarray, turns: float) -> np.ndarray:
    import jax.numpy as jnp

    from jaxcell.data.augment import hue_matrices  # the rotation of the hue augmentation

    m = np.asarray(hue_matrices(jnp.full((1,), turns, jnp.float32)))[0]
    x = np.einsum("nhwc,dc->nhwd", images.astype(np.float32) / 255.0, m)
    return np.clip(np.round(x * 255), 0, 255).astype(np.uint8)


def _pil(images: np.ndarray, fn) -> np.ndarray:
    from PIL import Image

    return np.stack([np.asarray(fn(Image.fromarray(im))) for im in images])


def derived_sets(images: np.ndarray, seed: int = 0) -> dict[str, np.ndarray]:
    """The held-out images changed: stain, hue, magnification, focus."""
    from PIL import ImageFilter

    from jaxcell.evaluate import stain_shift

    n, side = len(images), images.shape[1]
    q = side // 4
    rng = np.random.default_rng(seed)
    groups = rng.permutation(n - n % 4).reshape(-1, 4)

    def zoom_out(idx):
        from PIL import Image

        half = side // 2
        tiles = [np.asarray(Image.fromarray(images[i]).resize((half, half), Image.Resampling.BILINEAR)) for i in idx]
        return np.concatenate([np.concatenate(tiles[:2], 1), np.concatenate(tiles[2:], 1)], 0)

    return {
        "stain_heavy": stain_shift(images, HEAVY_STAIN, seed=seed + 1),
        "hue_rotated": _hue_rotate(images, HUE_TURN),
        "zoom_in": _pil(images[:, q:side - q, q:side - q], lambda im: im.resize((side, side), 2)),
        "zoom_out": np.stack([zoom_out(g) for g in groups]),
        "blur": _pil(images, lambda im: im.filter(ImageFilter.GaussianBlur(0.03 * side))),
    }


def photographs(count: int, side: int, seed: int = 0) -> np.ndarray:
    """Random square crops (a fifth to the whole of the shorter side) of matplotlib's sample photographs."""
    import matplotlib
    from PIL import Image

    folder = os.path.join(matplotlib.get_data_path(), "sample_data")
    sources = []
    for name in ("grace_hopper.jpg", "Minduka_Present_Blue_Pack.png", "logo2.png"):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            with Image.open(path) as im:
                sources.append(np.asarray(im.convert("RGB")))
    if not sources:
        return np.zeros((0, side, side, 3), np.uint8)
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        src = sources[i % len(sources)]
        h, w = src.shape[:2]
        s = int(rng.uniform(0.2, 1.0) * min(h, w))
        y, x = rng.integers(0, h - s + 1), rng.integers(0, w - s + 1)
        out.append(np.asarray(Image.fromarray(src[y:y + s, x:x + s]).resize((side, side), Image.Resampling.BILINEAR)))
    return np.stack(out)


def textures(count: int, side: int, seed: int = 0) -> np.ndarray:
    """White noise, smooth noise, stripes and matplotlib's terrain samples in colour maps, in turn."""
    import matplotlib
    from PIL import Image, ImageFilter

    rng = np.random.default_rng(seed)
    folder = os.path.join(matplotlib.get_data_path(), "sample_data")
    terrains = []
    for name, key in (("topobathy.npz", "topo"), ("jacksboro_fault_dem.npz", "elevation")):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            with np.load(path, allow_pickle=False) as z:
                terrains.append(np.asarray(z[key], np.float64))
    cmaps = [matplotlib.colormaps[n] for n in ("viridis", "terrain", "magma", "Purples", "RdPu")]
    out = []
    for i in range(count):
        kind = i % 4
        if kind == 0:
            im = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
        elif kind == 1:
            noise = Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8))
            im = np.asarray(noise.filter(ImageFilter.GaussianBlur(rng.uniform(2, 8))))
            lo, hi = im.min((0, 1)), im.max((0, 1))
            im = ((im - lo) / np.maximum(hi - lo, 1) * 255).astype(np.uint8)
        elif kind == 2:
            yy, xx = np.mgrid[:side, :side]
            angle, period = rng.uniform(0, np.pi), rng.uniform(4, side / 3)
            wave = 0.5 + 0.5 * np.sin(2 * np.pi * (xx * np.cos(angle) + yy * np.sin(angle)) / period)
            im = (cmaps[rng.integers(len(cmaps))](wave)[..., :3] * 255).astype(np.uint8)
        else:
            if not terrains:
                im = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
            else:
                t = terrains[rng.integers(len(terrains))]
                s = int(rng.uniform(0.2, 1.0) * min(t.shape))
                y, x = rng.integers(0, t.shape[0] - s + 1), rng.integers(0, t.shape[1] - s + 1)
                crop = t[y:y + s, x:x + s]
                crop = (crop - crop.min()) / max(np.ptp(crop), 1e-9)
                rgb = (cmaps[rng.integers(len(cmaps))](crop)[..., :3] * 255).astype(np.uint8)
                im = np.asarray(Image.fromarray(rgb).resize((side, side), Image.Resampling.BILINEAR))
        out.append(im)
    return np.stack(out)


def build(workdir: str, out: str, split: str = "test", per_set: int = 200, seed: int = 0,
          log=print) -> dict[str, int]:
    """Write every set under `out`/<set>/; returns the image count of each."""
    from PIL import Image

    from jaxcell.data.synthetic import make_smears

    paths, images = _held_out(workdir, split)
    side = images.shape[1]
    sets = derived_sets(images, seed)
    sets["synthetic_smears"] = make_smears(per_set, side, seed + 7)[0]
    sets["photographs"] = photographs(per_set, side, seed)
    sets["textures"] = textures(per_set, side, seed)
    counts = {}
    for name in SETS:
        folder = os.path.join(out, name)
        os.makedirs(folder, exist_ok=True)
        for i, im in enumerate(sets[name]):
            Image.fromarray(im).save(os.path.join(folder, f"{name}_{i:04d}.png"))
        counts[name] = len(sets[name])
        log(f"{name}: {counts[name]} images in {folder}")
    return counts


def main(argv: list[str] | None = None) -> int:
    from jaxcell.errors import UserError

    p = argparse.ArgumentParser(prog="python -m jaxcell.foreign_sets", description=__doc__.split("\n")[0])
    p.add_argument("--workdir", required=True, help="a trained run on image folders: its held-out split is used")
    p.add_argument("--out", required=True, help="the folder to write the sets into (one subfolder per set)")
    p.add_argument("--split", default="test", choices=["val", "test"])
    p.add_argument("--per-set", type=int, default=200, help="images of each set not derived from the split")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    try:
        build(args.workdir, args.out, args.split, args.per_set, args.seed)
    except UserError as error:
        print(f"foreign_sets: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Decode image files into uint8 RGB arrays of one size.

Every PIL mode is converted, never refused: palette and grey images become RGB, alpha is
composited over white (a slide's background), CMYK and other colour spaces go through PIL's
conversion, and 16/32-bit integer or float images are scaled to 8 bits (see `_to_uint8`).
An EXIF orientation tag, if any, is applied. Images of another size are resized with PIL's
bilinear filter, which averages over the source pixels when shrinking (antialiased), and a
non-square image is stretched, not cropped.

A file that is missing, unreadable, truncated or not an image raises UserError naming it;
truncation is detected because the pixels are decoded here (`Image.load`), and PIL's
LOAD_TRUNCATED_IMAGES stays off.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import numpy as np
from PIL import Image, ImageOps

from jaxcell.errors import UserError

_ALPHA_MODES = {"LA", "La", "PA", "RGBA", "RGBa"}
_INT_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N"}


class ImageTooLarge(UserError):
    """An image with more pixels than the caller allows (a decompression bomb, or just too big)."""


def open_image(source, name: str, max_pixels: int | None = None) -> Image.Image:
    """Decode one image (a path or a binary file object; `name` for messages) as an RGB PIL image.

    max_pixels: refuse larger images from their header, before their pixels are decoded (PIL's
    own limit, Image.MAX_IMAGE_PIXELS, refuses at twice its value and only warns below)."""
    try:
        with Image.open(source) as im:
            if max_pixels is not None and im.width * im.height > max_pixels:
                raise ImageTooLarge(f"{name}: {im.width}x{im.height} pixels, more than the "
                                    f"{max_pixels:,} allowed")
            im.load()  # decode now, so truncated files fail here and not later
            return _to_rgb(ImageOps.exif_transpose(im) if im.getexif().get(0x0112) else im)
    except UserError:
        raise
    except FileNotFoundError:
        raise UserError(f"image file not found: {name}") from None
    except IsADirectoryError:
        raise UserError(f"expected an image file, found a folder: {name}") from None
    except PermissionError:
        raise UserError(f"cannot read image file (permission denied): {name}") from None
    except Image.DecompressionBombError as e:
        raise ImageTooLarge(f"{name}: {e}") from None
    except Image.UnidentifiedImageError:
        raise UserError(f"not an image file (PIL cannot identify it): {name}") from None
    except Exception as e:  # PIL reports corrupt data as OSError, SyntaxError, ValueError, ...
        raise UserError(f"cannot decode image file {name}: {e}") from e


def resize_square(im: Image.Image, size: int) -> np.ndarray:
    """An RGB PIL image as uint8 (size, size, 3): bilinear (antialiased when shrinking), stretched."""
    if im.size != (size, size):
        im = im.resize((size, size), Image.Resampling.BILINEAR)
    out = np.asarray(im, dtype=np.uint8)
    assert out.shape == (size, size, 3), out.shape
    return out


def load_image(path: str | os.PathLike, size: int) -> np.ndarray:
    """Read one image file as uint8 RGB of shape (size, size, 3)."""
    return resize_square(open_image(path, str(path)), size)


def load_images(paths: Sequence[str | os.PathLike], size: int, workers: int | None = None) -> np.ndarray:
    """Read many files into one (N, size, size, 3) uint8 array, in the order given.

    PIL releases the GIL while decoding, so a few threads decode in parallel.
    """
    out = np.empty((len(paths), size, size, 3), np.uint8)
    if len(paths) == 0:
        return out
    workers = workers or min(8, os.cpu_count() or 1, len(paths))

    def one(i):
        out[i] = load_image(paths[i], size)

    if workers == 1:
        for i in range(len(paths)):
            one(i)
    else:
        with ThreadPoolExecutor(workers) as pool:
            for _ in pool.map(one, range(len(paths))):  # re-raises the first error
                pass
    return out


def _to_rgb(im: Image.Image) -> Image.Image:
    mode = im.mode
    if mode == "RGB":
        return im
    if mode == "P" and "transparency" in im.info:
        im, mode = im.convert("RGBA"), "RGBA"
    if mode in _ALPHA_MODES:
        rgba = (im.convert("LA") if mode == "La" else im).convert("RGBA")  # no direct La -> RGBA
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if mode in _INT_MODES or mode == "F" or mode.startswith("I;"):
        grey = Image.fromarray(_to_uint8(np.asarray(im), is_float=mode == "F"))
        return grey.convert("RGB")
    return im.convert("RGB")  # 1, L, P, CMYK, YCbCr, LAB, HSV


def _to_uint8(a: np.ndarray, is_float: bool) -> np.ndarray:
    """Scale a high-bit-depth grey image to 0..255 by its range.

    Float images with values in [0, 1] are taken as fractions of full scale. Non-negative whole
    numbers are divided by the full scale of the smallest bit depth that holds the maximum (8, 10,
    12, 14, 16 bits, ...), so a 12-bit camera image stored in 16 bits keeps its brightness and
    8-bit values stored in 16 bits pass through unchanged. Anything else (negative values,
    fractional floats beyond 1) is stretched from its minimum to its maximum.
    """
    a = a.astype(np.float64)
    finite = a[np.isfinite(a)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
    a = np.nan_to_num(a, nan=lo, posinf=hi, neginf=lo)
    integral = bool(np.all(finite == np.round(finite)))
    if is_float and lo >= 0 and hi <= 1:
        scaled = a * 255.0
    elif lo >= 0 and integral:
        bits = 8
        while hi > 2**bits - 1:
            bits += 2
        scaled = a * (255.0 / (2**bits - 1))
    else:
        scaled = (a - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(a)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)

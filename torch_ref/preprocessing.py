"""The torch twins of jaxcell.preprocessing (torch only, no jax): CLAHE, resize, normalize.

`clahe` is the same algorithm as the jax one, i.e. OpenCV's `createCLAHE(...).apply`: reflect-101
padding to a multiple of the grid when H or W is not divisible (both axes, as OpenCV does),
clip limit max(int(clip * tile_area / 256), 1), even redistribution plus OpenCV's residual
step, LUT = round(cdf * float32(255 / tile_area)), bilinear blend of the four nearest tile
LUTs in float32. Eager torch rounds every product and sum on its own, which is OpenCV's
arithmetic, so the plain expression gives the same bits (the jax version has to work around
XLA's FMA contraction to get them).

Layouts follow the torch convention where one exists: `clahe_rgb_float` and `resize` take
NCHW, `normalize` takes channels at dim -3. `clahe` and `clahe_rgb` take the decoder layouts
(..., H, W) and (..., H, W, 3), as their jax twins do.
"""

from collections.abc import Sequence

import torch
import torch.nn.functional as F

_BINS = 256


def _reflect101(n_out: int, n: int) -> torch.Tensor:
    """Source indices of an axis of length n extended to n_out with BORDER_REFLECT_101."""
    if n == 1:
        return torch.zeros(n_out, dtype=torch.long)
    period = 2 * (n - 1)
    i = torch.arange(n_out) % period
    return torch.where(i < n, i, period - i)


def _tile_coords(n: int, tile: int, tiles: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Neighbouring tile indices and the second one's weight, float32 as OpenCV computes them."""
    inv = torch.tensor(1.0, dtype=torch.float32) / tile
    t = torch.arange(n, dtype=torch.float32) * inv - 0.5
    t1 = torch.floor(t)
    a = t - t1
    t1 = t1.long()
    return t1.clamp(min=0), (t1 + 1).clamp(max=tiles - 1), a


def _check_grid(tile_grid_size: Sequence[int]) -> tuple[int, int]:
    grid = tuple(int(g) for g in tile_grid_size)
    if len(grid) != 2 or min(grid) < 1:
        raise ValueError(f"tile_grid_size must be two positive integers, got {tile_grid_size!r}")
    return grid


@torch.no_grad()
def clahe(images: torch.Tensor, clip_limit: float = 2.0,
          tile_grid_size: tuple[int, int] = (8, 8)) -> torch.Tensor:
    """CLAHE of 8-bit grey images (..., H, W) -> uint8, as cv2.createCLAHE(clip_limit,
    tile_grid_size).apply; tile_grid_size is OpenCV's (tiles across x, tiles down y). Any
    integer dtype; values outside [0, 255] are clipped."""
    if images.dim() < 2:
        raise ValueError(f"clahe expects images shaped (..., H, W), got shape {tuple(images.shape)}")
    if images.is_floating_point() or images.is_complex() or images.dtype == torch.bool:
        raise ValueError(f"clahe expects 8-bit levels in an integer dtype, got {images.dtype} "
                         "(for float images in [0, 1] use clahe_rgb_float)")
    tiles_x, tiles_y = _check_grid(tile_grid_size)
    *lead, h, w = images.shape
    x = images.long().clamp(0, _BINS - 1).reshape(-1, h, w)
    b = x.shape[0]
    if h % tiles_y or w % tiles_x:
        hp, wp = h + tiles_y - h % tiles_y, w + tiles_x - w % tiles_x
        xp = x[:, _reflect101(hp, h)][:, :, _reflect101(wp, w)]
    else:
        hp, wp, xp = h, w, x
    th, tw = hp // tiles_y, wp // tiles_x
    area, t = th * tw, tiles_y * tiles_x

    tiles = xp.reshape(b, tiles_y, th, tiles_x, tw).permute(0, 1, 3, 2, 4).reshape(b, t, area)
    offset = (torch.arange(b * t) * _BINS).reshape(b, t, 1)
    flat = (offset + tiles).reshape(-1)
    if torch.onnx.is_in_onnx_export():  # ONNX has no bincount; a scatter-add counts the same
        hist = torch.zeros(b * t * _BINS, dtype=torch.long).scatter_add(0, flat, torch.ones_like(flat))
    else:
        hist = torch.bincount(flat, minlength=b * t * _BINS)
    hist = hist.reshape(b, t, _BINS)
    if clip_limit > 0:
        limit = max(int(clip_limit * area / _BINS), 1)
        excess = (hist - limit).clamp(min=0).sum(-1, keepdim=True)
        hist = hist.clamp(max=limit)
        batch = excess // _BINS
        residual = excess - batch * _BINS
        step = (_BINS // residual.clamp(min=1)).clamp(min=1)
        i = torch.arange(_BINS)
        hist = hist + batch + ((residual > 0) & (i % step == 0) & (i // step < residual)).long()
    scale = torch.tensor(float(_BINS - 1), dtype=torch.float32) / area
    lut = torch.round(hist.cumsum(-1).float() * scale).clamp(0, 255).reshape(-1)

    ty1, ty2, ya = _tile_coords(h, th, tiles_y)
    tx1, tx2, xa = _tile_coords(w, tw, tiles_x)
    base = (torch.arange(b) * (t * _BINS)).reshape(b, 1, 1) + x
    r1, r2 = (ty1 * tiles_x * _BINS)[:, None], (ty2 * tiles_x * _BINS)[:, None]
    c1, c2 = (tx1 * _BINS)[None, :], (tx2 * _BINS)[None, :]
    l11, l12 = lut[base + r1 + c1], lut[base + r1 + c2]
    l21, l22 = lut[base + r2 + c1], lut[base + r2 + c2]
    xa, ya = xa[None, :], ya[:, None]
    xa1, ya1 = 1.0 - xa, 1.0 - ya
    res = (l11 * xa1 + l12 * xa) * ya1 + (l21 * xa1 + l22 * xa) * ya
    return torch.round(res).clamp(0, 255).to(torch.uint8).reshape(*lead, h, w)


def clahe_rgb(images: torch.Tensor, clip_limit: float = 2.0,
              tile_grid_size: tuple[int, int] = (8, 8)) -> torch.Tensor:
    """CLAHE of 8-bit colour images (..., H, W, 3), each channel on its own (why: see
    jaxcell.preprocessing.clahe_rgb)."""
    if images.dim() < 3 or images.shape[-1] != 3:
        raise ValueError(f"clahe_rgb expects images shaped (..., H, W, 3), got shape {tuple(images.shape)}")
    return clahe(images.movedim(-1, -3), clip_limit, tile_grid_size).movedim(-3, -1)


def quantize(x: torch.Tensor) -> torch.Tensor:
    """Float images in [0, 1] -> uint8 levels round(x * 255) (half to even), clamped."""
    return torch.round(x.detach().float().clamp(0.0, 1.0) * 255.0).to(torch.uint8)


def clahe_rgb_float(x: torch.Tensor, clip_limit: float = 2.0,
                    tile_grid_size: tuple[int, int] = (8, 8)) -> torch.Tensor:
    """Per-channel CLAHE of float images (..., C, H, W) in [0, 1] (NCHW; any C): quantize to
    256 levels, equalize, return float in [0, 1] in the input's float dtype, detached."""
    if x.dim() < 3:
        raise ValueError(f"clahe_rgb_float expects images shaped (..., C, H, W), got shape {tuple(x.shape)}")
    dtype = x.dtype if x.is_floating_point() else torch.float32
    return (clahe(quantize(x), clip_limit, tile_grid_size).float() / 255.0).to(dtype)


def resize(x: torch.Tensor, size: tuple[int, int], method: str = "bilinear") -> torch.Tensor:
    """F.interpolate on NCHW with align_corners=False and no antialiasing; method is
    "bilinear", "nearest" (legacy) or "nearest-exact"."""
    if method not in ("bilinear", "nearest", "nearest-exact"):
        raise ValueError(f"unknown resize method {method!r}; known: bilinear, nearest, nearest-exact")
    size = (int(size[0]), int(size[1]))
    if method == "bilinear":
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=False)
    return F.interpolate(x, size=size, mode=method)


def od_center(x: torch.Tensor) -> torch.Tensor:
    """Float images in [0, 1], channels at dim -3 -> per image and channel, the optical density
    -ln(max(x, 1/255)) minus its mean over the image (jaxcell.preprocessing.od_center)."""
    od = -torch.log(torch.clamp(x, min=1 / 255))
    return od - od.mean(dim=(-2, -1), keepdim=True)


def standardize(x: torch.Tensor, preprocessing: dict) -> torch.Tensor:
    """Float images in [0, 1], channels at dim -3 -> the model's input as `preprocessing` (a
    jaxcell config's or sidecar's) declares it: optical-density centring if asked, then
    (x - mean) / std (jaxcell.train.standardize)."""
    if preprocessing.get("od_center"):
        x = od_center(x)
    mean = torch.as_tensor(preprocessing["mean"], dtype=torch.float32, device=x.device).reshape(-1, 1, 1)
    std = torch.as_tensor(preprocessing["std"], dtype=torch.float32, device=x.device).reshape(-1, 1, 1)
    return (x - mean) / std


def normalize(images_uint8: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(x / 255 - mean) / std in float32, channels at dim -3 (CHW or NCHW)."""
    x = images_uint8.float() / 255.0
    mean_t = torch.as_tensor(mean, dtype=torch.float32).reshape(-1, 1, 1)
    std_t = torch.as_tensor(std, dtype=torch.float32).reshape(-1, 1, 1)
    return (x - mean_t) / std_t

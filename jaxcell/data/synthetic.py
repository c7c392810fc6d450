"""Procedural blood-smear images: the default data set when no folder is given.

Each image shows one to three leukocytes of its class on a field of red blood cells and a few
platelets. The four classes (jaxcell.CLASS_NAMES: Benign, Early, Pre, Pro) differ only in cell
morphology:

    class   nucleus/cell area  nucleus shape            chromatin          cytoplasm
    Benign  0.30-0.46          round (some indented)    coarse clumps      wide rim, smooth
    Early   0.67-0.85          round (some irregular)   fine               scant rim, smooth
    Pre     0.46-0.64          indented (kidney)        fine-intermediate  moderate, vacuoles
    Pro     0.30-0.49          irregular / lobed        coarse, nucleoli   wide rim, granular

Stain colours (background, red cells, cytoplasm, nucleus), cell counts, zoom, blur and noise are
drawn per image from one distribution shared by every class. The nucleus area comes from one
shared distribution too (the cell size follows from it and the class's nucleus/cell ratio);
cytoplasm shares the red cells' colours and the red cells fill a class-independent pale area;
textures differ in grain size, not contrast. So colour histograms, and the amounts of dark and
pale stain, carry almost no class signal (a logistic regression on them scores about chance): a
model has to look at shapes and textures.

Rendering works in optical density (Beer-Lambert): each stain adds density maps times a colour
vector, and the image is background * exp(-density). Everything is vectorised numpy; image i
depends only on (seed, i).
"""

from __future__ import annotations

import numpy as np

from jaxcell import CLASS_NAMES

# Per-class morphology. q: nucleus radius / cell radius (ranges overlap a little on purpose),
# shapes: probabilities of round/indented/irregular/lobed, chromatin: clump size as a fraction
# of the nucleus radius, granular: pixel-fine cytoplasm grain (else smooth mottling of the same
# contrast), vacuoles/nucleoli: probability per site.
_CLASSES = {
    "Benign": dict(q=(0.55, 0.68), shapes=(0.9, 0.1, 0.0, 0.0), chromatin=0.4,
                   granular=False, vacuoles=0.0, nucleoli=0.0),
    "Early": dict(q=(0.82, 0.92), shapes=(0.85, 0.0, 0.15, 0.0), chromatin=0.1,
                  granular=False, vacuoles=0.1, nucleoli=0.3),
    "Pre": dict(q=(0.68, 0.80), shapes=(0.1, 0.85, 0.05, 0.0), chromatin=0.16,
                granular=False, vacuoles=0.6, nucleoli=0.4),
    "Pro": dict(q=(0.55, 0.70), shapes=(0.0, 0.05, 0.45, 0.5), chromatin=0.4,
                granular=True, vacuoles=0.1, nucleoli=0.7),
}
_SHAPES = ("round", "indented", "irregular", "lobed")

# Reference optical-density directions (R, G, B absorbance) of the stains; each image jitters them.
_NUCLEUS_OD = np.array([0.84, 1.45, 0.40])  # purple (~ RGB 110, 60, 170 at density 1)
# Cytoplasm and red cells draw their colours from one shared pale grey-lilac distribution, so a
# histogram cannot count cytoplasm pixels (whose area follows the nucleus/cell ratio) apart from
# red-cell pixels (whose area is random).
_PALE_OD = np.array([0.40, 0.46, 0.20])


def make_smears(n: int, image_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Return (images uint8 (n, s, s, 3), labels int32 (n,)); classes balanced, order shuffled."""
    if n < 0 or image_size < 16:
        raise ValueError(f"need n >= 0 and image_size >= 16, got n={n}, image_size={image_size}")
    rng = np.random.default_rng([seed, 2**31])
    labels = rng.permutation(np.arange(n) % len(CLASS_NAMES)).astype(np.int32)
    images = np.empty((n, image_size, image_size, 3), np.uint8)
    for i in range(n):
        images[i] = _render(np.random.default_rng([seed, i]), int(labels[i]), image_size)
    return images, labels


def _render(rng: np.random.Generator, label: int, size: int, masks: dict | None = None) -> np.ndarray:
    """One smear image. If `masks` is a dict, it receives the nucleus and cell coverage maps."""
    spec = _CLASSES[CLASS_NAMES[label]]
    s = size
    zoom = rng.uniform(0.85, 1.2)
    d_nuc = np.zeros((s, s), np.float32)  # density maps, in units of the stain's OD vector
    d_cyt = np.zeros((s, s), np.float32)
    d_rbc = np.zeros((s, s), np.float32)
    m_nuc = np.zeros((s, s), np.float32)
    m_cell = np.zeros((s, s), np.float32)

    # Leukocytes: the nucleus area is drawn from one distribution for all classes.
    n_cells = rng.choice([1, 2, 3], p=[0.5, 0.35, 0.15])
    placed = []
    for _ in range(n_cells):
        rn = 0.13 * s * zoom * rng.uniform(0.85, 1.15)
        q = rng.uniform(*spec["q"])
        radius = rn / q
        center = _place(rng, placed, radius, s)
        if center is None:
            continue
        placed.append((center[0], center[1], radius))
        _draw_leukocyte(rng, spec, center, radius, rn, s, d_nuc, d_cyt, m_nuc, m_cell)

    # Red cells, everywhere except on top of leukocytes, drawn all at once by broadcasting. They
    # fill a pale area drawn for all classes alike, less the leukocytes' cytoplasm (same colours):
    # the number of pale pixels then says nothing about the nucleus/cell ratio.
    r_rbc = 0.05 * s * zoom
    pale = rng.uniform(0.2, 0.55) * s * s - float((m_cell - m_nuc).sum())
    span = (s + 2 * r_rbc) ** 2
    free = max(1.0 - sum(np.pi * (rad + 0.6 * r_rbc) ** 2 for _, _, rad in placed) / span, 0.2)
    n_rbc = max(int(pale / (np.pi * r_rbc**2) * span / (s * s) / free), 0)
    cy, cx = rng.uniform(-r_rbc, s + r_rbc, (2, n_rbc))
    keep = np.ones(n_rbc, bool)
    for y, x, rad in placed:
        keep &= np.hypot(cy - y, cx - x) > rad + 0.6 * r_rbc
    cy, cx = cy[keep], cx[keep]
    radii = r_rbc * rng.uniform(0.88, 1.12, cy.size)
    d_rbc += _discs(s, cy, cx, radii, pallor=rng.uniform(0.35, 0.7))

    # A few platelets: small dense dots in the nuclear stain.
    n_plt = rng.integers(0, 5)
    py, px = rng.uniform(0, s, (2, n_plt))
    d_nuc += 0.7 * _discs(s, py, px, 0.012 * s * zoom * rng.uniform(0.8, 1.3, n_plt), pallor=0.0)

    # Per-image stain: the same distribution for every class.
    bg_od = rng.uniform(0.0, 0.12, 3) + rng.uniform(0.0, 0.06)
    nuc = _jitter(rng, _NUCLEUS_OD) * rng.uniform(0.75, 1.3)
    cyt = _jitter(rng, _PALE_OD) * rng.uniform(0.6, 1.4)
    rbc = _jitter(rng, _PALE_OD) * rng.uniform(0.6, 1.4)
    stains = np.stack([nuc, cyt, rbc]).astype(np.float32)  # (3 stains, 3 channels)
    od = np.stack([d_nuc, d_cyt, d_rbc], -1) @ stains + bg_od.astype(np.float32)

    # Focus blur at large sizes (a [1, 2, 1] filter, once or twice; small images are blurred by
    # their own coarse sampling) and sensor noise.
    for _ in range(rng.integers(1, 3) if s >= 128 else 0):
        od = _blur121(od)
    noise = rng.standard_normal(od.shape, dtype=np.float32) * np.float32(rng.uniform(1.0, 4.0))
    img = np.float32(255.0) * np.exp(-od) + noise
    if masks is not None:
        masks["nucleus"], masks["cell"] = m_nuc, m_cell
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def _jitter(rng, od):
    return od * np.exp(rng.normal(0.0, 0.18, 3))


def _place(rng, placed, radius, s):
    """A centre keeping the cell inside the image and off the others (None after 20 tries)."""
    lo, hi = radius + 1, s - radius - 1
    if hi <= lo:
        return (s / 2, s / 2) if not placed else None
    for _ in range(20):
        y, x = rng.uniform(lo, hi, 2)
        if all(np.hypot(y - py, x - px) > 0.9 * (radius + pr) for py, px, pr in placed):
            return y, x
    return None


def _discs(s, cy, cx, radii, pallor):
    """Sum of soft-edged discs; `pallor` thins the centre (red cells' biconcave shape).

    Each disc is evaluated on its own small window only, all windows at once, and scattered into
    the image with bincount.
    """
    if cy.size == 0:
        return np.zeros((s, s), np.float32)
    half = int(np.ceil(radii.max() + 1.5))
    off = np.arange(-half, half + 1)
    py = np.floor(cy).astype(np.int64)[:, None, None] + off[None, :, None]  # (n, P, 1)
    px = np.floor(cx).astype(np.int64)[:, None, None] + off[None, None, :]  # (n, 1, P)
    rho = np.hypot(py - cy[:, None, None], px - cx[:, None, None])
    r = radii[:, None, None]
    edge = np.clip(r - rho + 0.5, 0.0, 1.0)
    value = edge * (1.0 - pallor * np.clip(1.0 - (rho / r) ** 2, 0.0, 1.0) ** 2)
    inside = (py >= 0) & (py < s) & (px >= 0) & (px < s) & (edge > 0)
    index = np.broadcast_to(py * s + px, inside.shape)[inside]
    flat = np.bincount(index, weights=value[inside], minlength=s * s)
    return flat.reshape(s, s).astype(np.float32)


def _outline(rng, shape):
    """Nucleus outline as a function r(theta) for unit radius (area normalised by the caller)."""
    if shape == "round":
        e, phase = rng.uniform(0.0, 0.1), rng.uniform(0, 2 * np.pi)
        return lambda t: 1.0 + e * np.cos(2 * t) + 0.02 * np.cos(3 * t + phase)
    if shape == "indented":
        depth, width = rng.uniform(0.55, 0.75), rng.uniform(0.45, 0.7)
        return lambda t: (1.0 + 0.08 * np.cos(2 * t)) * (
            1.0 - depth * np.exp(-((np.angle(np.exp(1j * t)) / width) ** 2)))
    if shape == "irregular":
        amps, phases = rng.uniform(0.04, 0.12, 5), rng.uniform(0, 2 * np.pi, 5)
        return lambda t: 1.0 + sum(
            a * np.cos(k * t + p) for k, a, p in zip(range(3, 8), amps, phases))
    k, amp = rng.choice([2, 3]), rng.uniform(0.22, 0.32)  # lobed
    return lambda t: 1.0 + amp * np.cos(k * t)


def _noise(rng, shape, scale):
    """Zero-mean, unit-std noise with blobs about `scale` pixels wide (bilinear upsampling)."""
    h, w = shape
    scale = max(scale, 1.0)
    gy, gx = int(h / scale) + 3, int(w / scale) + 3
    grid = rng.normal(size=(gy, gx)).astype(np.float32)
    u = np.arange(h, dtype=np.float32) / scale + rng.uniform(0, 1)
    v = np.arange(w, dtype=np.float32) / scale + rng.uniform(0, 1)
    iu, iv = u.astype(int), v.astype(int)
    fu, fv = (u - iu)[:, None], (v - iv)[None, :]
    a = grid[iu][:, iv]
    b = grid[iu][:, iv + 1]
    c = grid[iu + 1][:, iv]
    d = grid[iu + 1][:, iv + 1]
    out = (a * (1 - fv) + b * fv) * (1 - fu) + (c * (1 - fv) + d * fv) * fu
    return (out - out.mean()) / (out.std() + 1e-6)


def _draw_leukocyte(rng, spec, center, radius, rn, s, d_nuc, d_cyt, m_nuc, m_cell):
    cy, cx = center
    y0, y1 = max(int(cy - radius - 2), 0), min(int(cy + radius + 3), s)
    x0, x1 = max(int(cx - radius - 2), 0), min(int(cx + radius + 3), s)
    yy = np.arange(y0, y1, dtype=np.float32)[:, None] - cy
    xx = np.arange(x0, x1, dtype=np.float32)[None, :] - cx

    # Cell outline: a slightly wobbly circle.
    theta = np.arctan2(yy, xx)
    outline = 1.0 + sum(
        rng.uniform(0.0, 0.04) * np.cos(k * theta + rng.uniform(0, 2 * np.pi)) for k in (2, 3)
    )
    cell = np.clip(radius * outline - np.hypot(yy, xx) + 0.5, 0.0, 1.0)

    # Nucleus: class shape, area normalised to pi * rn^2, shifted off-centre in the free space.
    outline_n = _outline(rng, _SHAPES[rng.choice(4, p=spec["shapes"])])
    unit = np.sqrt(np.mean(outline_n(np.linspace(0, 2 * np.pi, 256, endpoint=False)) ** 2))
    rot = rng.uniform(0, 2 * np.pi)
    shift = (radius - rn) * rng.uniform(0.0, 0.6)
    ang = rng.uniform(0, 2 * np.pi)
    ny, nx = yy - shift * np.sin(ang), xx - shift * np.cos(ang)
    r_n = outline_n(np.arctan2(ny, nx) - rot)
    nucleus = np.clip(rn / unit * r_n - np.hypot(ny, nx) + 0.5, 0.0, 1.0) * cell

    # Chromatin: same contrast for all classes, only the clump size differs.
    clump = spec["chromatin"] * rn * rng.uniform(0.8, 1.25)
    texture = 1.0 + 0.32 * _noise(rng, nucleus.shape, clump)
    for _ in range(rng.binomial(3, spec["nucleoli"])):
        oy, ox = rng.normal(0, 0.35 * rn, 2)
        dist = np.hypot(ny - oy, nx - ox)
        texture = texture * (1.0 - 0.45 * np.clip(0.18 * rn - dist + 0.5, 0.0, 1.0))
    dens_n = rng.uniform(0.85, 1.15)
    d_nuc[y0:y1, x0:x1] += nucleus * dens_n * np.clip(texture, 0.2, None)

    # Cytoplasm: the ring around the nucleus, with granules and vacuoles by class.
    cyto = cell - nucleus
    # Granules or smooth mottling: the same contrast, so the same pixel histogram.
    grain = 1.0 + 0.4 * _noise(rng, cyto.shape, 1.0 if spec["granular"] else 0.25 * radius)
    for _ in range(rng.binomial(4, spec["vacuoles"])):
        a, f = rng.uniform(0, 2 * np.pi), rng.uniform(0.5, 0.9)
        vy = (rn + f * (radius - rn)) * np.sin(a) * 0.9
        vx = (rn + f * (radius - rn)) * np.cos(a) * 0.9
        vr = max(0.12 * radius, 0.8)
        grain = grain * (1.0 - 0.8 * np.clip(vr - np.hypot(yy - vy, xx - vx) + 0.5, 0.0, 1.0))
    d_cyt[y0:y1, x0:x1] += cyto * rng.uniform(0.8, 1.2) * np.clip(grain, 0.0, None)
    m_nuc[y0:y1, x0:x1] = np.maximum(m_nuc[y0:y1, x0:x1], nucleus)
    m_cell[y0:y1, x0:x1] = np.maximum(m_cell[y0:y1, x0:x1], cell)


def _blur121(x):
    """Separable [1, 2, 1] / 4 blur with edge replication, on an (H, W, C) array."""
    p = np.pad(x, ((1, 1), (1, 1), (0, 0)), mode="edge")
    p = 0.25 * p[:-2] + 0.5 * p[1:-1] + 0.25 * p[2:]
    return 0.25 * p[:, :-2] + 0.5 * p[:, 1:-1] + 0.25 * p[:, 2:]

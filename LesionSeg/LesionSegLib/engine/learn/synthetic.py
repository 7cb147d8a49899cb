"""Synthetic lung lesions, inserted into lung tissue of real chest CT training patches.

    lung = lung_mask(hu, spacing)                      # once per scan (model grid)
    centres = lung_centres(lung, spacing)              # where a lesion may be centred
    hu_patch, mask = insert_lesion(hu_patch, lung_patch, spacing, rng)   # per training patch

Used by ``lesionseg finetune --synthetic-lesions P`` (a fraction ``P`` of the corrected-case
patches gets one inserted lesion) when a corrected case holds lung; scans without lung (the
sarcoma training data) never get one.  Each lesion is a lobulated solid nodule:

* **shape**: an ellipsoid (radius ``RADIUS_MM`` drawn log-uniformly, axis ratios 0.7-1.3,
  random rotation) whose boundary is perturbed by a smooth random field (lobulation), and cut to
  the lung (so a juxta-pleural lesion is flattened against the wall, as real ones are);
* **density**: solid soft tissue, ``HU_MEAN`` +- ``HU_SPREAD`` per lesion, with a smooth internal
  texture (std ``TEXTURE_HU``) and the scanner's own noise kept (the lesion is blended into the
  patch, not pasted over it);
* **partial volume**: the mask's edge is blurred by about one voxel before blending, so the
  boundary looks like a real one resampled onto the model grid.

These are training aids only: every figure computed on real lesions says whether synthetic
lesions were used (``finetune_chest.json`` reports real-only runs separately).
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

LUNG_HU = -400.0  # lung parenchyma and airways lie below this
MIN_LUNG_ML = 200.0  # a scan holds lung when its inner-air regions sum to this much
RADIUS_MM = (4.0, 20.0)
HU_MEAN = 30.0
HU_SPREAD = 20.0
TEXTURE_HU = 15.0
LOBULATION = 0.25
NOISE_CLIP_HU = 60.0


def lung_mask(hu: np.ndarray, spacing) -> np.ndarray:
    """Lung (and airways): voxels below ``LUNG_HU`` inside the body, i.e. not connected to the
    air around the patient (the components of low-density voxels that touch the array's in-plane
    border are outside air); empty when there is less than ``MIN_LUNG_ML`` of it."""
    import cc3d

    low = hu < LUNG_HU
    lab = cc3d.connected_components(low, connectivity=6)
    border = np.unique(np.concatenate([lab[:, 0, :].ravel(), lab[:, -1, :].ravel(), lab[:, :, 0].ravel(), lab[:, :, -1].ravel()]))
    inside = low & ~np.isin(lab, border)
    ml = float(inside.sum()) * float(np.prod(spacing)) / 1000.0
    if ml < MIN_LUNG_ML:
        return np.zeros(hu.shape, dtype=bool)
    # close small vessels and nodules inside the lung so that they count as lung tissue
    return ndimage.binary_closing(inside, structure=np.ones((3, 3, 3), bool), iterations=2) | inside


def lung_centres(lung: np.ndarray, spacing, margin_mm: float = 5.0, max_points: int = 20000, seed: int = 0) -> np.ndarray:
    """(N, 3) voxel indices at least ``margin_mm`` inside the lung (a random subset of them)."""
    if not lung.any():
        return np.zeros((0, 3), dtype=int)
    dist = ndimage.distance_transform_edt(lung, sampling=spacing)
    pts = np.argwhere(dist >= margin_mm)
    if len(pts) > max_points:
        pts = pts[np.random.default_rng(seed).choice(len(pts), max_points, replace=False)]
    return pts


def _rotation(rng) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    return q * np.sign(np.diag(r))


def lesion_shape(shape, centre, spacing, rng, radius_mm: float | None = None) -> np.ndarray:
    """A soft (0-1) lobulated ellipsoid of ``shape`` voxels centred at voxel ``centre``."""
    sp = np.asarray(spacing, dtype=np.float64)
    r = radius_mm if radius_mm is not None else float(np.exp(rng.uniform(*np.log(RADIUS_MM))))
    axes = r * rng.uniform(0.7, 1.3, size=3)
    grid = np.stack(np.meshgrid(*[(np.arange(n) - c) * s for n, c, s in zip(shape, centre, sp)], indexing="ij"), -1)
    local = grid @ _rotation(rng)
    rho = np.sqrt(((local / axes) ** 2).sum(-1))
    field = ndimage.gaussian_filter(rng.normal(size=shape), sigma=np.maximum(0.35 * r / sp, 0.5))
    field /= field.std() + 1e-6
    inside = (rho + LOBULATION * field * np.clip(rho, 0, 1.5) / 1.5) < 1.0
    soft = ndimage.gaussian_filter(inside.astype(np.float32), sigma=0.6)
    soft[soft < 1e-3] = 0.0  # the blur's far tail: leave those voxels exactly as they were
    return soft


def insert_lesion(hu: np.ndarray, lung: np.ndarray, spacing, rng, centre=None) -> tuple[np.ndarray, np.ndarray]:
    """``(hu with one synthetic lesion, its mask)`` for a patch ``hu`` (z, y, x) with its lung
    mask; the lesion is centred at voxel ``centre`` (default: a random lung voxel of the patch)
    and confined to the lung.  Without lung in the patch: the patch unchanged and an empty mask."""
    if centre is None:
        pts = np.argwhere(lung)
        if len(pts) == 0:
            return hu, np.zeros(hu.shape, dtype=bool)
        centre = pts[rng.integers(len(pts))]
    soft = lesion_shape(hu.shape, np.asarray(centre, dtype=np.float64), spacing, rng)
    soft *= ndimage.binary_dilation(lung, iterations=1)  # cut to the lung: flattened against the wall
    mask = soft >= 0.5
    if not mask.any():
        return hu, mask
    density = HU_MEAN + HU_SPREAD * rng.normal()
    texture = ndimage.gaussian_filter(rng.normal(size=hu.shape), sigma=1.0)
    texture *= TEXTURE_HU / (texture.std() + 1e-6)
    # the scanner's noise, kept (clipped: the high-pass of the lung also holds vessel edges)
    noise = np.clip(hu - ndimage.gaussian_filter(hu.astype(np.float32), sigma=1.0), -NOISE_CLIP_HU, NOISE_CLIP_HU)
    lesion = density + texture + noise
    out = hu * (1.0 - soft) + lesion * soft
    return out.astype(hu.dtype, copy=False), mask


def synthetic_volume(hu: np.ndarray, label: np.ndarray, spacing, rng, n_lesions: int = 3, lung=None, centres=None,
                     half_side_mm: float = 48.0) -> tuple[np.ndarray, np.ndarray, int]:
    """``(hu, label, inserted)``: a copy of a whole scan with up to ``n_lesions`` synthetic lesions in
    its lung, away from its real lesions; ``label`` is the real label plus the inserted lesions."""
    lung = lung_mask(hu, spacing) if lung is None else lung
    centres = lung_centres(lung, spacing, seed=int(rng.integers(1 << 31))) if centres is None else centres
    out, lab = hu.astype(np.float32, copy=True), label.copy()
    half = np.ceil(half_side_mm / np.asarray(spacing, dtype=np.float64)).astype(int)
    inserted = 0
    for _ in range(4 * n_lesions):
        if inserted == n_lesions or len(centres) == 0:
            break
        c = centres[rng.integers(len(centres))]
        lo, hi = np.maximum(c - half, 0), np.minimum(c + half + 1, hu.shape)
        sl = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
        if lab[sl].any():  # keep clear of real (and earlier) lesions
            continue
        h, m = insert_lesion(out[sl], lung[sl], spacing, rng, centre=c - lo)
        if m.any():
            out[sl], lab[sl] = h, np.where(m, 1, lab[sl])
            inserted += 1
    return out, lab, inserted

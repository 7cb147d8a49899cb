"""Per-cluster classifier inputs: the adaptive patch (CLCS) and tabular features.

Adaptive patch: a cube centred on the cluster's bounding box whose side follows the cluster's
largest extent, ``side = max(extent) * (1 + 2 * MARGIN_FRACTION) + 2 * MARGIN_MM`` (at least
``MIN_SIDE_MM``), cut from the image, probability map and cluster mask and resampled to
``PATCH_SIZE`` voxels.  Channels: soft-tissue HU window scaled to [0, 1], probability, mask.
"""
from __future__ import annotations

import numpy as np

from ..runtime.ops import resize_linear
from .clusters import ClusterStats, max_diameter_mm

PATCH_SIZE = (32, 32, 32)
PATCH_CHANNELS = 3
PATCH_WINDOW = (-200.0, 300.0)
MARGIN_FRACTION = 0.25
MARGIN_MM = 5.0
MIN_SIDE_MM = 24.0

FEATURE_NAMES = [
    "log_volume_ml",
    "log_diameter_mm",
    "log_extent_z_mm",
    "log_extent_y_mm",
    "log_extent_x_mm",
    "bbox_fill",
    "sphericity",
    "mean_prob",
    "max_prob",
    "std_prob",
    "frac_prob_gt_09",
    "mean_hu",
    "std_hu",
    "p10_hu",
    "p90_hu",
    "rel_volume",
    "log_n_clusters",
    "touches_border",
]


def _gather(arr: np.ndarray, axes_idx: list[np.ndarray], fill: float) -> np.ndarray:
    """``arr`` sampled at the index grid ``axes_idx`` (per axis); out-of-range indices -> ``fill``."""
    clipped = [np.clip(ix, 0, n - 1) for ix, n in zip(axes_idx, arr.shape)]
    out = arr[np.ix_(*clipped)].astype(np.float32)
    for axis, (ix, n) in enumerate(zip(axes_idx, arr.shape)):
        bad = (ix < 0) | (ix >= n)
        if bad.any():
            sl = [slice(None)] * 3
            sl[axis] = bad
            out[tuple(sl)] = fill
    return out


def adaptive_patch(hu: np.ndarray, prob: np.ndarray, labels: np.ndarray, c: ClusterStats, spacing_zyx) -> np.ndarray:
    sp = np.asarray(spacing_zyx, dtype=float)
    lo = np.array([s.start for s in c.bbox])
    hi = np.array([s.stop for s in c.bbox])
    extent_mm = (hi - lo) * sp
    side = max(float(extent_mm.max()) * (1 + 2 * MARGIN_FRACTION) + 2 * MARGIN_MM, MIN_SIDE_MM)
    centre = (lo + hi) / 2.0
    half = np.ceil(side / sp / 2.0).astype(int)
    plo = np.floor(centre).astype(int) - half
    phi = np.floor(centre).astype(int) + half
    # Sample at most 2x the patch size per axis (a plain stride) before the final linear resize, so a
    # huge cluster on a fine grid never needs a full-resolution copy of its neighbourhood.  Neither
    # step low-pass filters (the scan itself was, on its way to the model grid: io.resample); the
    # shipped classifiers were trained on patches made this way, so it stays as it is.
    idx = []
    for a, b, p in zip(plo, phi, PATCH_SIZE):
        step = max(1, (b - a) // (2 * p))
        idx.append(np.arange(a, b, step))
    img = _gather(hu, idx, -1024.0)
    img = (np.clip(img, *PATCH_WINDOW) - PATCH_WINDOW[0]) / (PATCH_WINDOW[1] - PATCH_WINDOW[0])
    pr = _gather(prob, idx, 0.0)
    mk = (_gather(labels, idx, 0) == c.label).astype(np.float32)
    # trilinear, align_corners=False: torch's F.interpolate in NumPy (see runtime.ops)
    return resize_linear(np.stack([img, pr, mk]), PATCH_SIZE).astype(np.float16)


def tabular_features(
    hu: np.ndarray, prob: np.ndarray, labels: np.ndarray, c: ClusterStats, spacing_zyx, largest_voxels: int, n_clusters: int
) -> tuple[dict[str, float], dict[str, float]]:
    """(classifier features, human-readable measurements) of one cluster."""
    sp = np.asarray(spacing_zyx, dtype=float)
    sub = labels[c.bbox] == c.label
    hu_v = hu[c.bbox][sub].astype(np.float64)
    pr_v = prob[c.bbox][sub].astype(np.float64)
    volume_mm3 = c.n_voxels * float(np.prod(sp))
    extent = np.array([s.stop - s.start for s in c.bbox]) * sp
    diameter = max_diameter_mm(sub, sp)
    sphere = np.pi / 6.0 * diameter**3 if diameter > 0 else volume_mm3
    touches = any(s.start == 0 or s.stop == n for s, n in zip(c.bbox, labels.shape))
    p10, p90 = np.percentile(hu_v, [10, 90])
    feats = {
        "log_volume_ml": float(np.log(volume_mm3 / 1000.0 + 1e-6)),
        "log_diameter_mm": float(np.log1p(diameter)),
        "log_extent_z_mm": float(np.log1p(extent[0])),
        "log_extent_y_mm": float(np.log1p(extent[1])),
        "log_extent_x_mm": float(np.log1p(extent[2])),
        "bbox_fill": float(c.n_voxels / max(1, np.prod([s.stop - s.start for s in c.bbox]))),
        # the fill of the sphere whose diameter is the largest one (volume / (pi/6 d^3)): 1 for a ball,
        # 0.39 for a cube (whose true sphericity is 0.81); the cards' classifiers know it by this key
        "sphericity": float(min(1.0, volume_mm3 / sphere)) if sphere > 0 else 0.0,
        "mean_prob": float(pr_v.mean()),
        "max_prob": float(pr_v.max()),
        "std_prob": float(pr_v.std()),
        "frac_prob_gt_09": float((pr_v > 0.9).mean()),
        "mean_hu": float(hu_v.mean() / 100.0),
        "std_hu": float(hu_v.std() / 100.0),
        "p10_hu": float(p10 / 100.0),
        "p90_hu": float(p90 / 100.0),
        "rel_volume": float(c.n_voxels / max(1, largest_voxels)),
        "log_n_clusters": float(np.log(max(1, n_clusters))),
        "touches_border": float(touches),
    }
    measures = {
        "volume_ml": volume_mm3 / 1000.0,
        "diameter_mm": diameter,
        "mean_probability": float(pr_v.mean()),
        "max_probability": float(pr_v.max()),
        "mean_hu": float(hu_v.mean()),
    }
    return feats, measures


def feature_matrix(dicts: list[dict[str, float]]) -> np.ndarray:
    return np.array([[d[n] for n in FEATURE_NAMES] for d in dicts], dtype=np.float32).reshape(len(dicts), len(FEATURE_NAMES))

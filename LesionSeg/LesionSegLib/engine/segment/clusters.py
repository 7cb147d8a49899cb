"""Probability map -> lesion candidates (26-connected clusters, cc3d), and their measurements."""
from __future__ import annotations

from dataclasses import dataclass

import cc3d
import numpy as np


def nonzero_box(array: np.ndarray) -> tuple[slice, slice, slice] | None:
    """The tightest box (z, y, x slices) holding every non-zero voxel of ``array``; None if there is none."""
    nz = np.asarray(array) != 0
    out = []
    for axis in range(nz.ndim):
        idx = np.flatnonzero(nz.any(axis=tuple(a for a in range(nz.ndim) if a != axis)))
        if idx.size == 0:
            return None
        out.append(slice(int(idx[0]), int(idx[-1]) + 1))
    return tuple(out)


@dataclass
class ClusterStats:
    label: int
    n_voxels: int
    bbox: tuple[slice, slice, slice]  # (z, y, x) slices on the grid the clusters were found on
    centroid_zyx: tuple[float, float, float]  # voxel index


def find_clusters(prob: np.ndarray, threshold: float, spacing_zyx, min_size_mm3: float) -> tuple[np.ndarray, list[ClusterStats]]:
    """Threshold ``prob``, take 26-connected components, drop those below ``min_size_mm3``.

    Returns a label image (1..n, consecutive, in raster order of their first voxel; uint16, or
    uint32 beyond 65,535 clusters: a whole-body scan's label image is half the size) and the
    clusters' statistics.  Components and statistics are computed once, inside the box that holds
    the thresholded voxels.
    """
    mask = np.asarray(prob) >= threshold
    box = nonzero_box(mask)
    if box is None:
        return np.zeros(mask.shape, dtype=np.uint16), []
    sub = cc3d.connected_components(np.ascontiguousarray(mask[box]), connectivity=26)
    del mask
    st = cc3d.statistics(sub)
    voxel_mm3 = float(np.prod(spacing_zyx))
    min_voxels = int(np.ceil(min_size_mm3 / voxel_mm3)) if min_size_mm3 > 0 else 0
    counts = np.asarray(st["voxel_counts"])
    keep = counts >= max(1, min_voxels)
    keep[0] = False
    dtype = np.uint16 if int(keep.sum()) < 65536 else np.uint32
    lut = np.zeros(len(counts), dtype=dtype)
    lut[keep] = np.arange(1, int(keep.sum()) + 1, dtype=dtype)
    labels = np.zeros(prob.shape, dtype=dtype)
    labels[box] = lut[sub]
    return labels, _collect(st, np.flatnonzero(keep), lut, box)


def extract_clusters(prob: np.ndarray, threshold: float, spacing_zyx, min_size_mm3: float) -> tuple[np.ndarray, int]:
    """The label image of :func:`find_clusters` and the number of clusters."""
    labels, stats = find_clusters(prob, threshold, spacing_zyx, min_size_mm3)
    return labels, len(stats)


def cluster_stats(labels: np.ndarray, n: int) -> list[ClusterStats]:
    """Voxel count, bounding box and centroid of clusters 1..n of a label image."""
    box = nonzero_box(labels) if n else None
    if box is None:
        return []
    st = cc3d.statistics(np.ascontiguousarray(labels[box]))
    ids = np.arange(1, min(n, len(st["voxel_counts"]) - 1) + 1)
    return _collect(st, ids[np.asarray(st["voxel_counts"])[ids] > 0], np.arange(len(st["voxel_counts"])), box)


def _collect(st: dict, ids, new_ids, box) -> list[ClusterStats]:
    """ClusterStats of components ``ids`` of ``cc3d.statistics`` output ``st`` computed inside ``box``, renumbered by ``new_ids``."""
    offset = [s.start for s in box]
    out = []
    for k in ids:
        bbox = tuple(slice(b.start + o, b.stop + o) for b, o in zip(st["bounding_boxes"][k], offset))
        centroid = tuple(float(c) + o for c, o in zip(st["centroids"][k], offset))
        out.append(ClusterStats(int(new_ids[k]), int(st["voxel_counts"][k]), bbox, centroid))
    return out


def _surface(mask: np.ndarray) -> np.ndarray:
    """Voxels of ``mask`` with a 6-neighbour outside it (``mask & ~binary_erosion(mask)``, border = outside)."""
    p = np.pad(mask, 1)
    inner = p[1:-1, 1:-1, 1:-1].copy()
    for axis in range(3):
        for shift in (0, 2):
            sl = [slice(1, -1)] * 3
            sl[axis] = slice(shift, shift + mask.shape[axis])
            inner &= p[tuple(sl)]
    return mask & ~inner


def max_diameter_mm(mask: np.ndarray, spacing_zyx) -> float:
    """Longest 3D diameter (maximum Feret diameter) of a binary mask, in mm.

    Measured between voxel centres of the surface voxels (+ the smallest voxel side, so a single voxel has a non-zero
    diameter).
    """
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return 0.0
    surface = _surface(mask)
    pts = np.argwhere(surface).astype(np.float64) * np.asarray(spacing_zyx, dtype=np.float64)
    if len(pts) > 64:
        try:
            from scipy.spatial import ConvexHull

            pts = pts[ConvexHull(pts).vertices]
        except Exception:  # flat (single-slice) lesions: fall back to a sample of the points
            if len(pts) > 4000:
                pts = pts[np.random.default_rng(0).choice(len(pts), 4000, replace=False)]
    best = 0.0
    for i in range(0, len(pts), 512):
        d = ((pts[i : i + 512, None, :] - pts[None, :, :]) ** 2).sum(-1)
        best = max(best, float(d.max()))
    return float(np.sqrt(best) + min(spacing_zyx))

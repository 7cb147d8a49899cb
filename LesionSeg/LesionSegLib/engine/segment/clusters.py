"""Probability map -> lesion candidates (26-connected clusters, cc3d), and their measurements."""
from __future__ import annotations

from dataclasses import dataclass

import cc3d
import numpy as np
from scipy import ndimage


def extract_clusters(prob: np.ndarray, threshold: float, spacing_zyx, min_size_mm3: float) -> tuple[np.ndarray, int]:
    """Threshold ``prob``, take 26-connected components and drop those below ``min_size_mm3``.

    Returns a uint32 label image (1..n, consecutive) and n.
    """
    mask = np.asarray(prob) >= threshold
    voxel_mm3 = float(np.prod(spacing_zyx))
    min_voxels = int(np.ceil(min_size_mm3 / voxel_mm3)) if min_size_mm3 > 0 else 0
    if min_voxels > 1:
        mask = cc3d.dust(mask, threshold=min_voxels, connectivity=26, in_place=True)
    labels, n = cc3d.connected_components(mask, connectivity=26, return_N=True)
    return labels.astype(np.uint32, copy=False), int(n)


@dataclass
class ClusterStats:
    label: int
    n_voxels: int
    bbox: tuple[slice, slice, slice]  # (z, y, x) slices on the grid the clusters were found on
    centroid_zyx: tuple[float, float, float]  # voxel index


def cluster_stats(labels: np.ndarray, n: int) -> list[ClusterStats]:
    if n == 0:
        return []
    st = cc3d.statistics(labels)
    out = []
    for k in range(1, n + 1):
        count = int(st["voxel_counts"][k])
        if count == 0:
            continue
        out.append(ClusterStats(k, count, tuple(st["bounding_boxes"][k]), tuple(float(c) for c in st["centroids"][k])))
    return out


def max_diameter_mm(mask: np.ndarray, spacing_zyx) -> float:
    """Longest 3D diameter (maximum Feret diameter) of a binary mask, in mm.

    Measured between voxel centres of the surface voxels (+ the smallest voxel side, so a single voxel has a non-zero
    diameter).
    """
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return 0.0
    surface = mask & ~ndimage.binary_erosion(mask)
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

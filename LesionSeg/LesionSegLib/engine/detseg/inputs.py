"""Network inputs of both DetSeg3D stages, shared by training and inference.

Stage 1 sees the scan on a coarse grid (``grid_spacing_zyx`` mm, e.g. 6x4x4) laid over the
body box; stage 2 sees one fixed-size RoI per box (:mod:`.roi`).  Both are sampled from the
canonical (LPS) HU array with :func:`..io.resample.sample_box` (anti-aliased when shrinking),
and windowed into one [0, 1] channel per HU window.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..io.resample import sample_box
from .roi import RoI, crop

AIR_HU = -1000.0  # what lies outside the scan
DEFAULT_DETECTOR_LEVELS = 4  # encoder levels of the default detector (networks.DEFAULT_DETECTOR)


def detector_divisor(cfg: dict) -> int:
    """Detector inputs must be a multiple of this along every axis (2 ** number of stride-2 levels)."""
    return 2 ** (len(cfg.get("channels", [0] * DEFAULT_DETECTOR_LEVELS)) - 1)


def windows(hu: np.ndarray, hu_windows: Sequence[Sequence[float]]) -> np.ndarray:
    """One float32 channel per HU window, clipped and scaled to [0, 1]: (C, z, y, x)."""
    hu = np.asarray(hu, dtype=np.float32)
    out = np.empty((len(hu_windows),) + hu.shape, dtype=np.float32)
    for c, (lo, hi) in enumerate(hu_windows):
        np.clip(hu, lo, hi, out=out[c])
        out[c] -= lo
        out[c] *= 1.0 / (hi - lo)
    return out


@dataclass
class Grid:
    """A detection grid over a canonical array: grid voxel ``j`` is at ``origin + j * spacing`` mm
    (array mm: voxel ``i`` of the array is at ``i * array_spacing``)."""

    origin: np.ndarray
    spacing: np.ndarray
    shape: tuple[int, int, int]

    def sample(self, hu: np.ndarray, array_spacing, hu_windows) -> np.ndarray:
        sp = np.asarray(array_spacing, dtype=np.float64)
        x = sample_box(hu, self.origin / sp, self.spacing / sp, self.shape, fill=AIR_HU)
        return windows(x, hu_windows)


def grid_over(lo_idx, hi_idx, array_spacing, grid_spacing, divisor: int) -> Grid:
    """The smallest grid (each side a multiple of ``divisor``) covering array voxels
    ``[lo_idx, hi_idx)``, centred on them."""
    sp = np.asarray(array_spacing, dtype=np.float64)
    g = np.asarray(grid_spacing, dtype=np.float64)
    a = (np.asarray(lo_idx, dtype=np.float64) - 0.5) * sp
    b = (np.asarray(hi_idx, dtype=np.float64) - 0.5) * sp
    n = np.maximum(divisor, np.ceil((b - a) / g / divisor) * divisor).astype(int)
    centre = (a + b) / 2
    origin = centre - (n - 1) / 2 * g
    return Grid(origin, g, tuple(int(v) for v in n))


def roi_input(hu: np.ndarray, roi: RoI, hu_windows) -> np.ndarray:
    """The stage-2 input of one RoI: (C, *roi.shape) float32."""
    return windows(crop(hu, roi), hu_windows)


def flip_average(run, x: np.ndarray, flips, undo=None, report=None) -> np.ndarray:
    """Test-time augmentation by flips: the mean over ``flips`` (lists of spatial axes 0-2 = z, y,
    x; ``[]`` is the input as is) of ``run`` on the flipped batch ``x`` (n, C, z, y, x), each output
    flipped back; ``undo(out, axes)`` then fixes what a flip changes beyond position (in place).
    ``report(fraction)`` is called after each flip."""
    total = None
    n = len(flips or [[]])
    for done, axes in enumerate(flips or [[]], start=1):
        dims = [2 + int(a) for a in axes]
        out = run(np.ascontiguousarray(np.flip(x, dims)) if dims else x)
        if dims:
            out = np.flip(out, dims).copy()
            if undo is not None:
                undo(out, axes)
        total = out if total is None else total + out
        if report is not None:
            report(done / n)
    return total / max(1, n)

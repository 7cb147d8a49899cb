"""RoI geometry: a box (mm) -> a fixed-size crop with context, and the crop's output pasted back.

The RoI of a box spans, per axis, ``side = max(size * (1 + 2 * margin_fraction) + 2 * margin_mm,
min_side_mm, longest_side / max_aspect)`` millimetres around the box centre, sampled on
``roi_shape`` voxels (so each lesion is seen at its own scale; anisotropic when the box is).
Sampling and pasting both use :func:`..io.resample.sample_box` (anti-aliased when shrinking).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..io.resample import sample_box

DEFAULT_CONTEXT = {"margin_fraction": 0.25, "margin_mm": 8.0, "min_side_mm": 32.0, "max_aspect": 2.0}


@dataclass
class RoI:
    """Sampling of one RoI on a (z, y, x) array: voxel ``u`` of the RoI is array index ``lo + u * step``."""

    lo: np.ndarray
    step: np.ndarray
    shape: tuple[int, int, int]

    def index_range(self, array_shape) -> tuple[np.ndarray, np.ndarray]:
        """Array voxels ``[a, b)`` per axis whose centres fall inside the RoI's sampled span."""
        first = self.lo
        last = self.lo + (np.asarray(self.shape) - 1) * self.step
        a = np.clip(np.ceil(first - 0.5 * self.step).astype(int), 0, array_shape)
        b = np.clip(np.floor(last + 0.5 * self.step).astype(int) + 1, 0, array_shape)
        return a, b


def roi_for_box(box_mm, spacing, roi_shape, context: dict | None = None) -> RoI:
    ctx = {**DEFAULT_CONTEXT, **(context or {})}
    centre = np.asarray(box_mm[:3], dtype=np.float64)
    size = np.maximum(np.asarray(box_mm[3:6], dtype=np.float64), 1.0)
    side = size * (1 + 2 * ctx["margin_fraction"]) + 2 * ctx["margin_mm"]
    side = np.maximum(side, ctx["min_side_mm"])
    side = np.maximum(side, side.max() / ctx["max_aspect"])
    sp = np.asarray(spacing, dtype=np.float64)
    n = np.asarray(roi_shape, dtype=np.float64)
    step = side / n / sp  # array voxels per RoI voxel
    lo = (centre - side / 2) / sp + 0.5 * step
    return RoI(lo, step, tuple(int(v) for v in roi_shape))


def crop(array: np.ndarray, roi: RoI, order: int = 1) -> np.ndarray:
    """The RoI sampled from ``array`` (edges replicated outside it)."""
    return sample_box(array, roi.lo, roi.step, roi.shape, order=order)


def paste_local(values: np.ndarray, roi: RoI, array_shape) -> tuple[np.ndarray, np.ndarray]:
    """``(a, region)``: RoI ``values`` resampled back onto the array voxels ``[a, b)`` of its span
    (:meth:`RoI.index_range`); ``region`` is empty when the RoI lies outside the array."""
    a, b = roi.index_range(array_shape)
    if np.any(b <= a):
        return a, np.zeros((0, 0, 0), dtype=np.float32)
    return a, sample_box(values, (a - roi.lo) / roi.step, 1.0 / roi.step, tuple(int(v) for v in b - a))


def paste_max(target: np.ndarray, values: np.ndarray, roi: RoI) -> None:
    """``target = max(target, values resampled back onto target's grid)`` inside the RoI."""
    a, back = paste_local(values, roi, target.shape)
    if back.size == 0:
        return
    region = tuple(slice(int(x), int(x) + n) for x, n in zip(a, back.shape))
    np.maximum(target[region], back, out=target[region])

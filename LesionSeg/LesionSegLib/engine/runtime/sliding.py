"""Sliding-window inference in NumPy, the twin of MONAI's ``sliding_window_inference``.

Same tiling (MONAI's scan interval ``int(roi * (1 - overlap))``, last window shifted back to
end at the border, inputs smaller than the window zero-padded symmetrically) and the same
blending (``constant`` or ``gaussian`` importance map with sigma = 0.125 x roi, clamped below at
its minimum or 1e-3): ``out = sum(w * pred) / sum(w)``.  Tested against MONAI on random input.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np

from ..errors import CancelledError

SIGMA_SCALE = 0.125


def scan_interval(image_size: Sequence[int], roi: Sequence[int], overlap: float) -> tuple[int, ...]:
    out = []
    for n, r in zip(image_size, roi):
        out.append(int(r) if r == n else max(1, int(r * (1 - overlap))))
    return tuple(out)


def window_starts(image_size: Sequence[int], roi: Sequence[int], overlap: float) -> list[tuple[int, ...]]:
    """Start corner of every window, in MONAI's order (last axis fastest).  ``image_size`` >= ``roi``."""
    per_axis = []
    for n, r, step in zip(image_size, roi, scan_interval(image_size, roi, overlap)):
        count = next((d for d in range(int(math.ceil(n / step))) if d * step + r >= n), 0) + 1
        per_axis.append([d * step - max(d * step + r - n, 0) for d in range(count)])
    grid = np.meshgrid(*per_axis, indexing="ij")
    return [tuple(int(v) for v in p) for p in np.stack([g.ravel() for g in grid], 1)]


def importance_map(roi: Sequence[int], mode: str = "gaussian") -> np.ndarray:
    if mode == "constant":
        return np.ones(tuple(roi), dtype=np.float32)
    if mode != "gaussian":
        raise ValueError(f"unknown blending mode {mode!r}; use constant or gaussian")
    w = None
    for r in roi:
        x = np.arange(-(r - 1) / 2.0, (r - 1) / 2.0 + 1, dtype=np.float32)
        g = np.exp(x**2 / np.float32(-2 * (r * SIGMA_SCALE) ** 2)).astype(np.float32)
        w = g if w is None else w[..., None] * g
    return np.maximum(w, max(float(w.min()), 1e-3)).astype(np.float32)


def sliding_window(
    x: np.ndarray,
    roi: Sequence[int],
    predictor: Callable[[np.ndarray], np.ndarray],
    overlap: float = 0.25,
    mode: str = "gaussian",
    batch_size: int = 1,
    progress: Callable[[float], None] | None = None,
    cancel: Callable[[], bool] | None = None,
) -> np.ndarray:
    """Blend ``predictor`` over windows of ``x`` (C, z, y, x); returns (K, z, y, x) float32.

    ``predictor`` maps a batch (B, C, *roi) to (B, K, *roi).
    """
    x = np.asarray(x, dtype=np.float32)
    spatial = x.shape[1:]
    pads = [((r - n) // 2, r - n - (r - n) // 2) if r > n else (0, 0) for n, r in zip(spatial, roi)]
    if any(p != (0, 0) for p in pads):
        x = np.pad(x, [(0, 0)] + pads)
    size = x.shape[1:]
    starts = window_starts(size, roi, overlap)
    weight = importance_map(roi, mode)
    out = None
    count = np.zeros(size, dtype=np.float32)
    for b in range(0, len(starts), batch_size):
        if cancel is not None and cancel():
            raise CancelledError("segmentation cancelled")
        group = starts[b : b + batch_size]
        slabs = [tuple(slice(s, s + r) for s, r in zip(st, roi)) for st in group]
        pred = np.asarray(predictor(np.stack([x[(slice(None),) + sl] for sl in slabs])), dtype=np.float32)
        if out is None:
            out = np.zeros((pred.shape[1],) + size, dtype=np.float32)
        for p, sl in zip(pred, slabs):
            out[(slice(None),) + sl] += p * weight
            count[sl] += weight
        if progress is not None:
            progress(min(1.0, (b + len(group)) / len(starts)))
    out /= count
    crop = tuple(slice(lo, lo + n) for (lo, _), n in zip(pads, spatial))
    return np.ascontiguousarray(out[(slice(None),) + crop])

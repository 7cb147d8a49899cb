"""NumPy twins of the torch operations on the inference path, so ONNX runtimes need no torch.

``resize_linear`` is ``torch.nn.functional.interpolate(mode="(tri)linear", align_corners=False)``
computed separably, axis by axis, with torch's source-index rule (``(dst + 0.5) * in / out - 0.5``,
clamped at 0; the upper neighbour clamped at the edge).  Same formula, float32: the two agree to
float rounding (|diff| < 1e-5 on [0, 1] data; tested against torch).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np


def _axis_weights(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    scale = np.float32(n_in / n_out)
    src = (np.arange(n_out, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5)
    src = np.maximum(src, np.float32(0.0))
    i0 = np.minimum(src.astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    w1 = (src - i0).astype(np.float32)
    return i0, i1, w1


def resize_linear(array: np.ndarray, shape: Sequence[int], out: np.ndarray | None = None) -> np.ndarray:
    """Resample the last ``len(shape)`` axes of ``array`` to ``shape`` (float32, field of view kept).
    ``out``: a float32 array (or view) of the result's shape to write into; when the last pass runs
    along the outermost axis (upsampling a probability map to the scan), it is written there slab by
    slab, with no full-size temporary (a whole-body map is hundreds of MB)."""
    res = np.asarray(array, dtype=np.float32)
    lead = res.ndim - len(shape)
    # Shrinking axes first (less data for the later passes); growing axes innermost first, so the
    # largest pass runs along the outermost axis, where it copies whole contiguous slabs.
    ratios = [shape[a] / res.shape[lead + a] for a in range(len(shape))]
    order = sorted(range(len(shape)), key=lambda a: (ratios[a] > 1, -a if ratios[a] > 1 else ratios[a]))
    passes = [lead + a for a in order if res.shape[lead + a] != int(shape[a])]
    for n, axis in enumerate(passes, start=1):
        res = _resize_axis(res, axis, int(shape[axis - lead]), out if n == len(passes) and axis == 0 else None)
    if out is None:
        return np.ascontiguousarray(res, dtype=np.float32)
    if res is not out:
        out[...] = res
    return out


def _resize_axis(src: np.ndarray, axis: int, n_out: int, out: np.ndarray | None = None) -> np.ndarray:
    i0, i1, w1 = _axis_weights(src.shape[axis], n_out)
    if axis == 0:  # slab by slab: no gathered temporaries of the full output size
        out = np.empty((n_out,) + src.shape[1:], dtype=np.float32) if out is None else out
        for k in range(n_out):
            np.subtract(src[i1[k]], src[i0[k]], out=out[k])
            out[k] *= w1[k]
            out[k] += src[i0[k]]
        return out
    bshape = [1] * src.ndim
    bshape[axis] = n_out
    lo = np.take(src, i0, axis=axis)
    hi = np.take(src, i1, axis=axis)
    hi -= lo
    hi *= w1.reshape(bshape)
    lo += hi
    return lo


def hu_windows(hu: np.ndarray, windows: Sequence[Sequence[float]]) -> np.ndarray:
    """One channel per HU window, clipped and scaled to [0, 1] (``preprocess.normalize`` in NumPy)."""
    hu = np.asarray(hu, dtype=np.float32)
    out = np.empty((len(windows),) + hu.shape, dtype=np.float32)
    for c, (lo, hi) in enumerate(windows):
        np.clip(hu, lo, hi, out=out[c])
        out[c] -= np.float32(lo)
        out[c] /= np.float32(hi - lo)
    return out


def sigmoid(x: np.ndarray) -> np.ndarray:
    """Numerically safe logistic function (float32 in, float32 out)."""
    x = np.asarray(x, dtype=np.float32)
    return (0.5 * (np.tanh(0.5 * x) + 1.0)).astype(np.float32)

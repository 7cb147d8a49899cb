"""THE resampling of LesionSeg: anti-aliased, separable, numpy/scipy only.

Every change of grid goes through :func:`sample_box` (or :func:`resample`, its whole-field-of-view
form): the HU volume to a model's spacing (training and inference), a lesion's box to the RoI
segmenter's fixed size, the RoI probabilities pasted back onto the input grid, and the CLCS
adaptive patch.

A box is sampled at continuous voxel indices ``lo + i * step`` (voxel centres at integers) per
axis.  Linear interpolation between the two neighbouring voxels; indices outside the array are
clamped to the edge (``fill=None``) or give ``fill``.  When ``step > 1`` (fewer output than input
samples) the axis is first low-pass filtered with a Gaussian of ``sigma = (step - 1) / 2`` input
voxels (the anti-aliasing rule of scikit-image and MONAI's ``Resize(anti_aliasing=True)``),
computed only on the part of the axis the samples need.  Axes are processed one at a time, the
most reduced first, so the work shrinks as early as possible.

``resample(a, shape)`` keeps the field of view, i.e. the index mapping of
``torch.nn.functional.interpolate(mode="trilinear", align_corners=False)``; without
anti-aliasing the two agree to float rounding (tested).
"""
from __future__ import annotations

import contextlib
from typing import Sequence

import numpy as np
from threadpoolctl import threadpool_limits

TRUNCATE = 4.0  # Gaussian kernel radius in standard deviations


def aa_sigma(step: float) -> float:
    """Anti-aliasing Gaussian sigma (input voxels) for sampling every ``step`` voxels."""
    return max(0.0, (float(step) - 1.0) / 2.0)


def _gaussian(sigma: float) -> np.ndarray:
    """scipy.ndimage's sampled Gaussian kernel (same radius and normalisation)."""
    radius = int(TRUNCATE * sigma + 0.5)
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    k = np.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def axis_weights(size: int, lo: float, step: float, n: int, antialias: bool = True) -> tuple[np.ndarray, int]:
    """(W, first): ``out = W @ a[first:first + W.shape[1]]`` samples one axis of length ``size``.

    W is the Gaussian pre-filter (edge-replicated, ``step > 1``) followed by linear
    interpolation (clamped at the edges), as one (n, columns) matrix.
    """
    pos = lo + step * np.arange(n, dtype=np.float64)
    p = np.clip(pos, 0.0, size - 1)
    i0 = np.floor(p).astype(np.int64)
    i1 = np.minimum(i0 + 1, size - 1)
    w1 = p - i0
    rows = np.arange(n)
    if antialias and step > 1.0 + 1e-6 and size > 1:
        k = _gaussian(aa_sigma(step))
        r = len(k) // 2
        offs = np.arange(-r, r + 1)
        cols = np.concatenate([np.clip(i0[:, None] + offs, 0, size - 1), np.clip(i1[:, None] + offs, 0, size - 1)], 1)
        vals = np.concatenate([(1 - w1)[:, None] * k, w1[:, None] * k], 1)
        rr = np.repeat(rows, cols.shape[1])
    else:
        cols = np.stack([i0, i1], 1)
        vals = np.stack([1 - w1, w1], 1)
        rr = np.repeat(rows, 2)
    first = int(cols.min())
    W = np.zeros((n, int(cols.max()) - first + 1), dtype=np.float64)
    np.add.at(W, (rr, cols.ravel() - first), vals.ravel())
    return W.astype(np.float32), first


def _lerp(a: np.ndarray, axis: int, pos: np.ndarray) -> np.ndarray:
    """Linear interpolation along ``axis`` at ``pos`` (clamped): two gathers, cheaper than a
    matrix product when no pre-filter is needed."""
    size = a.shape[axis]
    p = np.clip(pos, 0.0, size - 1)
    i0 = np.floor(p).astype(np.int64)
    i1 = np.minimum(i0 + 1, size - 1)
    shape = [1] * a.ndim
    shape[axis] = len(pos)
    w = (p - i0).astype(np.float32).reshape(shape)
    v0 = np.take(a, i0, axis=axis)
    return v0 + (np.take(a, i1, axis=axis) - v0) * w


def _one_blas_thread():
    return threadpool_limits(limits=1, user_api="blas")


def _matmul_axis(a: np.ndarray, axis: int, W: np.ndarray) -> np.ndarray:
    """``W @ a`` along ``axis`` with BLAS (one thread, see :func:`sample_box`): (pre, size, post) -> (pre, n, post)."""
    a = np.ascontiguousarray(a)
    pre = int(np.prod(a.shape[:axis], dtype=np.int64))
    post = int(np.prod(a.shape[axis + 1:], dtype=np.int64))
    if post == 1:
        out = a.reshape(pre, -1) @ W.T
    else:
        out = np.matmul(W, a.reshape(pre, a.shape[axis], post))
    return out.reshape(a.shape[:axis] + (W.shape[0],) + a.shape[axis + 1:])


def sample_box(
    array: np.ndarray,
    lo: Sequence[float],
    step: Sequence[float],
    shape: Sequence[int],
    *,
    order: int = 1,
    antialias: bool = True,
    fill: float | None = None,
) -> np.ndarray:
    """Sample the last three axes of ``array`` at indices ``lo + i * step`` (``i < shape``).

    ``order`` 1 (linear, float32 result) or 0 (nearest, ``array``'s dtype).  Leading axes
    (channels) are carried along.
    """
    a = np.asarray(array)
    off = a.ndim - 3
    pos = [float(lo[k]) + float(step[k]) * np.arange(int(shape[k]), dtype=np.float64) for k in range(3)]
    sizes = a.shape[off:]
    if order == 0:
        idx = [np.clip(np.floor(p + 0.5).astype(np.int64), 0, n - 1) for p, n in zip(pos, sizes)]
        out = a[(Ellipsis,) + np.ix_(*idx)]
    else:
        # the part of the array the samples need, per axis (with the filter's reach)
        plans, cut = [], []
        for k in range(3):
            filt = antialias and step[k] > 1.0 + 1e-6 and sizes[k] > 1
            if filt:
                W, first = axis_weights(sizes[k], lo[k], step[k], int(shape[k]), True)
                plans.append(("matmul", W))
                cut.append(slice(first, first + W.shape[1]))
            else:
                p = np.clip(pos[k], 0, sizes[k] - 1)
                first = int(np.floor(p.min()))
                plans.append(("lerp", pos[k] - first))
                cut.append(slice(first, min(sizes[k], int(np.floor(p.max())) + 2)))
        out = a[(Ellipsis,) + tuple(cut)]
        if out.dtype != np.float32:
            out = out.astype(np.float32)
        # One BLAS thread for the filtered axes: a multi-threaded sum changes its rounding with the
        # thread count, and the same scan must give the same result in any process (a 1-thread Ray
        # worker and a 2-thread `segment` write identical files).
        with _one_blas_thread() if any(kind == "matmul" for kind, _ in plans) else contextlib.nullcontext():
            for k in sorted(range(3), key=lambda k: -float(step[k])):  # most reduced axis first
                kind, arg = plans[k]
                if kind == "lerp" and len(arg) == out.shape[off + k] and np.all(arg == np.arange(len(arg))):
                    continue  # the samples are the voxels themselves
                out = _matmul_axis(out, off + k, arg) if kind == "matmul" else _lerp(out, off + k, arg)
    if fill is not None:
        outside = [(p < -0.5) | (p > n - 0.5) for p, n in zip(pos, sizes)]
        if any(o.any() for o in outside):
            out = np.array(out, copy=True)  # never write into a view of the input
            for k in range(3):
                sl = [slice(None)] * out.ndim
                sl[off + k] = outside[k]
                out[tuple(sl)] = fill
    return np.ascontiguousarray(out)


def fov_mapping(in_shape: Sequence[int], out_shape: Sequence[int]) -> tuple[list[float], list[float]]:
    """(lo, step) mapping ``out_shape`` samples over the field of view of ``in_shape`` voxels."""
    step = [n_in / n_out for n_in, n_out in zip(in_shape, out_shape)]
    lo = [0.5 * s - 0.5 for s in step]
    return lo, step


def resample(array: np.ndarray, shape: Sequence[int], *, order: int = 1, antialias: bool = True) -> np.ndarray:
    """Resample the last three axes of ``array`` to ``shape`` keeping the field of view."""
    a = np.asarray(array)
    shape = tuple(int(s) for s in shape)
    if tuple(a.shape[-3:]) == shape:
        return a.astype(np.float32) if order == 1 and a.dtype != np.float32 else a
    lo, step = fov_mapping(a.shape[-3:], shape)
    return sample_box(a, lo, step, shape, order=order, antialias=antialias)

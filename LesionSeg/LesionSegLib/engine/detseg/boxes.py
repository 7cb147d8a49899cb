"""Boxes for the anchor-free detector: ground-truth boxes, heatmap targets, decoding and 3D NMS.

A box is ``(centre_z, centre_y, centre_x, size_z, size_y, size_x)`` in millimetres on the
canonical (LPS) array, measured from the centre of voxel (0, 0, 0); detections carry a score
(probability) and a logit as two more columns.

A detection grid is described by ``origin`` (mm of its voxel 0) and ``spacing`` (mm per
voxel), both (z, y, x): voxel ``j`` is at ``origin + j * spacing``.
"""
from __future__ import annotations

import numpy as np

SIZE_REF_MM = 32.0  # the size head predicts log(size / SIZE_REF_MM)
SIGMA_FRACTION = 0.12  # heatmap Gaussian sigma, as a fraction of the box size (per axis)
SIGMA_MIN = 0.8  # ... and at least this many grid voxels
REG_RADIUS = 0.5  # size/offset are learnt where the target heatmap >= this
#: heatmap voxels counted as positives: the centre and its close neighbours (CenterNet uses only
#: the peak, 1.0; a small core of positives learns much faster on few steps)
POS_MIN = 0.8
#: channels of the detector output: heatmap logit, log size (z, y, x), centre offset (z, y, x)
HEAT_CH, SIZE_CH, OFFSET_CH = 0, slice(1, 4), slice(4, 7)


def gt_boxes(label: np.ndarray, spacing) -> np.ndarray:
    """One box (mm) per 26-connected lesion of ``label`` (z, y, x): bounding-box centre and size."""
    import cc3d

    sp = np.asarray(spacing, dtype=np.float64)
    lab, n = cc3d.connected_components(np.asarray(label) > 0, connectivity=26, return_N=True)
    if n == 0:
        return np.zeros((0, 6))
    st = cc3d.statistics(lab)
    out = []
    for k in range(1, n + 1):
        bb = st["bounding_boxes"][k]
        lo = np.array([s.start for s in bb], dtype=np.float64)
        hi = np.array([s.stop for s in bb], dtype=np.float64)
        out.append(np.concatenate([(lo + hi - 1) / 2 * sp, (hi - lo) * sp]))
    return np.array(out)


def heatmap_targets(boxes: np.ndarray, shape, origin, spacing) -> dict[str, np.ndarray]:
    """Training targets on a grid: ``heat`` (1, z, y, x), ``size``/``offset`` (3, z, y, x),
    ``reg_mask`` (1, z, y, x) where size and offset are learnt, and the per-object weights
    ``pos_weight`` / ``reg_weight`` (1, z, y, x).

    Each voxel belongs to the object whose Gaussian is highest there; an object's heatmap
    positives (``heat >= POS_MIN``) each weigh 1 / (its number of positives) and its regression
    voxels 1 / (its number of regression voxels), so every object sums to 1 in each map whatever
    its size (each map's sum is the number of objects that have such voxels in the grid).
    """
    shape = tuple(int(s) for s in shape)
    origin = np.asarray(origin, dtype=np.float64)
    g = np.asarray(spacing, dtype=np.float64)
    heat = np.zeros(shape, np.float32)
    size = np.zeros((3,) + shape, np.float32)
    offset = np.zeros((3,) + shape, np.float32)
    owner = np.zeros(shape, np.float32)  # the heat value that set size/offset at each voxel
    obj = np.full(shape, -1, np.int64)  # the object whose Gaussian is highest at each voxel
    axes = [np.arange(n, dtype=np.float64) for n in shape]
    for k, b in enumerate(np.asarray(boxes, dtype=np.float64).reshape(-1, 6)):
        q = (b[:3] - origin) / g
        sigma = np.maximum(SIGMA_MIN, SIGMA_FRACTION * b[3:] / g)
        g1 = [np.exp(-0.5 * ((ax - qa) / s) ** 2) for ax, qa, s in zip(axes, q, sigma)]
        h = (g1[0][:, None, None] * g1[1][None, :, None] * g1[2][None, None, :]).astype(np.float32)
        peak = np.round(q).astype(int)
        if np.all((peak >= 0) & (peak < np.array(shape))):
            h[tuple(peak)] = 1.0
        take = (h >= REG_RADIUS) & (h > owner)
        if take.any():
            idx = np.nonzero(take)
            logsize = np.log(np.maximum(b[3:], 1.0) / SIZE_REF_MM)
            for a in range(3):
                size[a][idx] = logsize[a]
                offset[a][idx] = q[a] - idx[a]
            owner[take] = h[take]
        obj[h > heat] = k
        np.maximum(heat, h, out=heat)
    reg = owner >= REG_RADIUS
    return {"heat": heat[None], "size": size, "offset": offset, "reg_mask": reg.astype(np.float32)[None],
            "pos_weight": _per_object_weight(obj, heat >= POS_MIN - 1e-6)[None],
            "reg_weight": _per_object_weight(obj, reg)[None]}


def _per_object_weight(obj: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """1 / (number of ``mask`` voxels of the voxel's object) on ``mask``, 0 elsewhere."""
    w = np.zeros(obj.shape, np.float32)
    ids = obj[mask]
    if ids.size:
        w[mask] = (1.0 / np.bincount(ids)[ids]).astype(np.float32)
    return w


def decode(out: np.ndarray, origin, spacing, threshold: float, max_detections: int) -> np.ndarray:
    """Detections ``(N, 8)``: box (mm), score, logit; local maxima (3x3x3) of the heatmap above
    ``threshold``, best first, at most ``max_detections``."""
    from scipy.ndimage import maximum_filter

    logit = np.asarray(out[HEAT_CH], dtype=np.float32)
    peaks = (logit == maximum_filter(logit, size=3, mode="nearest")) & (logit >= _logit(threshold))
    idx = np.argwhere(peaks)
    if len(idx) == 0:
        return np.zeros((0, 8))
    z = logit[tuple(idx.T)]
    order = np.argsort(-z, kind="stable")[:max_detections]
    idx, z = idx[order], z[order].astype(np.float64)
    sel = (slice(None),) + tuple(idx.T)
    offs = out[OFFSET_CH][sel].T.astype(np.float64)
    sizes = np.exp(out[SIZE_CH][sel].T.astype(np.float64)) * SIZE_REF_MM
    centre = np.asarray(origin) + (idx + offs) * np.asarray(spacing)
    score = 1.0 / (1.0 + np.exp(-z))
    return np.concatenate([centre, sizes, score[:, None], z[:, None]], 1)


def _logit(p: float) -> float:
    p = min(max(float(p), 1e-6), 1 - 1e-6)
    return float(np.log(p / (1 - p)))


def box_overlaps(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(IoU, intersection over the smaller box) between the boxes of ``a`` (N, >=6) and ``b`` (M, >=6)."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, a.shape[-1] if np.ndim(a) > 1 else 6)
    b = np.asarray(b, dtype=np.float64).reshape(-1, b.shape[-1] if np.ndim(b) > 1 else 6)
    alo, ahi = a[:, None, :3] - a[:, None, 3:6] / 2, a[:, None, :3] + a[:, None, 3:6] / 2
    blo, bhi = b[None, :, :3] - b[None, :, 3:6] / 2, b[None, :, :3] + b[None, :, 3:6] / 2
    inter = np.prod(np.clip(np.minimum(ahi, bhi) - np.maximum(alo, blo), 0, None), -1)
    va, vb = np.prod(a[:, 3:6], -1)[:, None], np.prod(b[:, 3:6], -1)[None, :]
    iou = inter / np.maximum(va + vb - inter, 1e-9)
    iomin = inter / np.maximum(np.minimum(va, vb), 1e-9)
    return iou, iomin


def nms(dets: np.ndarray, iou_threshold: float = 0.25, contain_threshold: float = 0.7) -> np.ndarray:
    """Greedy 3D non-maximum suppression (``dets`` sorted or not; score in column 6).

    A box is dropped when it overlaps a better one by IoU > ``iou_threshold`` or lies mostly
    inside it (intersection / smaller volume > ``contain_threshold``).
    """
    dets = np.asarray(dets, dtype=np.float64)
    if len(dets) == 0:
        return dets.reshape(0, 8)
    dets = dets[np.argsort(-dets[:, 6], kind="stable")]
    iou, iomin = box_overlaps(dets, dets)
    keep = []
    dropped = np.zeros(len(dets), bool)
    for i in range(len(dets)):
        if dropped[i]:
            continue
        keep.append(i)
        dropped |= (iou[i] > iou_threshold) | (iomin[i] > contain_threshold)
    return dets[keep]

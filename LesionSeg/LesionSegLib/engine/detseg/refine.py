"""Fit a RoI to its lesion: segment a box, take the lesion at a point, re-fit the box to that lesion.

    fits = fit_boxes(engine, hu, spacing, boxes_mm, points_mm)      # one RoI pass per box
    fits = refit(engine, hu, spacing, fits, refits=3)                # re-fitted where the fit is poor

The RoI segmenter learnt on boxes within 0.75-1.35x of their lesion.  A box that is much larger
or smaller than the lesion found in it, or whose lesion touches the RoI's edge (where the array
goes on beyond it), is replaced by the lesion's own box (a side grown by ``EDGE_GROWTH`` where the
lesion touched the edge) and segmented again, at most ``refits`` times; a re-fit that loses the
lesion keeps the previous fit.  Shared by the click tool (the point is the click) and by
``segment`` with a card whose ``roi_segmenter.refits`` is set (the point is a detection's centre).

Everything is computed on each RoI's own span of the array (:meth:`.roi.RoI.index_range`), so a
full chest scan with 32 detections never holds more than one RoI-sized region per box.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import cc3d
import numpy as np

from .roi import RoI, paste_local

SNAP_MM = 6.0  # a point off the lesion takes the nearest lesion voxel within this distance
EDGE_GROWTH = 1.4  # a side whose lesion touches the RoI's edge grows by this much at a re-fit
REFIT_TOLERANCE = 1.5  # a side of the lesion's box off the RoI's box by more than this factor re-fits


@dataclass
class Fit:
    """One box's RoI pass: the probability on array voxels ``[lo, lo + prob.shape)`` and the
    lesion's component there (None when no voxel of it lies at the point)."""

    box: np.ndarray
    point_mm: np.ndarray
    roi: RoI
    lo: np.ndarray
    prob: np.ndarray
    comp: np.ndarray | None
    threshold: float | None

    @property
    def region(self) -> tuple[slice, slice, slice]:
        return tuple(slice(int(a), int(a) + n) for a, n in zip(self.lo, self.prob.shape))

    @cached_property
    def _extent(self) -> tuple[np.ndarray, np.ndarray]:
        """The lesion's first and last voxel per axis, on the region (one pass over the mask)."""
        pts = np.argwhere(self.comp)
        return pts.min(0), pts.max(0)

    def lesion_box(self, spacing) -> np.ndarray:
        """The lesion's box (centre, size) in array mm."""
        first, last = self._extent
        lo, hi = first + self.lo, last + 1 + self.lo
        sp = np.asarray(spacing)
        return np.concatenate([(lo + hi - 1) / 2 * sp, (hi - lo) * sp])

    def edges_touched(self, array_shape) -> np.ndarray:
        """Per axis: does the lesion reach the RoI's span where the array goes on beyond it?"""
        first, last = self._extent
        hi = self.lo + np.asarray(self.prob.shape)
        return ((first == 0) & (self.lo > 0)) | ((last + 1 >= self.prob.shape) & (hi < np.asarray(array_shape)))

    def misfit(self, spacing, array_shape) -> float:
        """Mean |log(lesion side / box side)|, plus 1 when the lesion touches the RoI's edge."""
        sides = np.maximum(self.lesion_box(spacing)[3:], 1e-3)
        return float(np.mean(np.abs(np.log(sides / np.maximum(self.box[3:], 1e-3))))) + float(self.edges_touched(array_shape).any())

    def full(self, shape) -> tuple[np.ndarray, np.ndarray]:
        """(component, probability) on a whole array of ``shape`` (zeros outside the RoI)."""
        comp, prob = np.zeros(shape, dtype=bool), np.zeros(shape, dtype=np.float32)
        prob[self.region] = self.prob
        if self.comp is not None:
            comp[self.region] = self.comp
        return comp, prob


def component_at(prob: np.ndarray, threshold: float, p: np.ndarray, spacing, snap_mm: float = SNAP_MM) -> np.ndarray | None:
    """The 26-connected component of ``prob >= threshold`` at voxel ``p`` (may lie outside ``prob``),
    or the nearest one within ``snap_mm``; None without one."""
    if prob.size == 0:
        return None
    lab = cc3d.connected_components(prob >= threshold, connectivity=26)
    inside = np.all(p >= 0) and np.all(p < np.asarray(prob.shape))
    v = lab[tuple(p)] if inside else 0
    if v == 0:
        r = np.ceil(snap_mm / np.asarray(spacing)).astype(int)
        lo = np.maximum(p - r, 0)
        hi = np.maximum(p + r + 1, 0)
        win = lab[tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))]
        pts = np.argwhere(win > 0)
        if len(pts) == 0:
            return None
        d = np.linalg.norm((pts + lo - p) * np.asarray(spacing), axis=1)
        if d.min() > snap_mm:
            return None
        v = win[tuple(pts[int(np.argmin(d))])]
    return lab == v


def lesion_component(prob: np.ndarray, threshold: float, p: np.ndarray, spacing, snap_mm: float = SNAP_MM):
    """(component, threshold used) of the lesion at voxel ``p`` (:func:`component_at`) at
    ``threshold``, else at half of it; (None, None) when there is none."""
    for t in (threshold, 0.5 * threshold):
        comp = component_at(prob, t, p, spacing, snap_mm)
        if comp is not None:
            return comp, t
    return None, None


def fit_boxes(engine, hu: np.ndarray, spacing, boxes, points_mm, snap_mm: float = SNAP_MM, cancel=None) -> list[Fit]:
    """One RoI pass per box (batched); the lesion of each is the component at its point, at the
    engine's probability threshold, else at half of it."""
    sp = np.asarray(spacing, dtype=np.float64)
    fits = []
    for box, point, (roi, p) in zip(boxes, points_mm, engine.roi_outputs(hu, spacing, boxes, cancel)):
        lo, local = paste_local(p, roi, hu.shape)
        p_idx = np.clip(np.round(np.asarray(point) / sp).astype(int), 0, np.asarray(hu.shape) - 1) - lo
        comp, thr = lesion_component(local, engine.prob_threshold, p_idx, sp, snap_mm)
        fits.append(Fit(np.asarray(box, dtype=np.float64), np.asarray(point, dtype=np.float64), roi, lo, local, comp, thr))
    return fits


def refit(engine, hu: np.ndarray, spacing, fits: list[Fit], refits: int, tolerance: float = REFIT_TOLERANCE,
          cancel=None, progress=None, snap_mm: float = SNAP_MM, growth: float = 1.0) -> list[Fit]:
    """Re-fit each poorly fitting box to its lesion, at most ``refits`` times (see the module); the
    new box is the lesion's box with every side times ``growth``."""
    fits = list(fits)
    done = [f.comp is None for f in fits]
    for it in range(refits):
        todo, boxes = [], []
        for i, f in enumerate(fits):
            if done[i]:
                continue
            fitted = f.lesion_box(spacing)
            edge = f.edges_touched(hu.shape)
            ratio = fitted[3:] / np.maximum(f.box[3:], 1e-3)
            if not (edge.any() or np.any(ratio > tolerance) or np.any(ratio < 1 / tolerance)):
                done[i] = True
                continue
            fitted[3:] = np.where(edge, fitted[3:] * EDGE_GROWTH, fitted[3:]) * growth
            todo.append(i)
            boxes.append(fitted)
        if not todo:
            break
        for i, new in zip(todo, fit_boxes(engine, hu, spacing, boxes, [fits[i].point_mm for i in todo], snap_mm, cancel)):
            if new.comp is None:
                done[i] = True
            else:
                fits[i] = new
        if progress is not None:
            progress((it + 1) / refits)
    return fits

"""Click to segment: one point (LPS mm) -> the lesion under it, in-process, on a crop of the scan.

    from LesionSegLib.engine.segment.pipeline import Engine
    from LesionSegLib.engine.detseg.click import click
    result = click(Engine("sts-detseg"), image, [(x, y, z)])   # a SegmentationResult

Per point: a crop of ``CLICK_RADIUS_MM`` around it is oriented like the model expects.  Boxes of
``BOX_SIDES_MM`` centred on the point are each segmented by the RoI segmenter, and the scale whose
lesion (the 26-connected component under the point, or the nearest within ``SNAP_MM``) fits its
box best is kept: the RoI segmenter learnt on boxes within 0.75-1.35x of their lesion, and a
lesion that touches the RoI's edge fits badly.  The RoI is then re-fitted to the component while
it touches the edge or a side is off by more than 1.5x (at most ``REFITS`` times).  This design was
chosen on training-case clicks (``Resources/evaluation/detseg/click_train*.json``: mean Dice 0.53
against 0.33 for the earlier single 50 mm box with one re-fit), never on the validation lesions.
Measurements, patch and confidence are those of ``segment``, so the CSV has the same columns and
the lesion can go to the feedback store.

Points outside the volume, or on air (mean HU of the 3x3x3 voxels around it below
``AIR_HU_LIMIT``), are refused with an :class:`InputError` naming the point; nothing is returned
for any point when one is bad.
"""
from __future__ import annotations

import time
from typing import Sequence

import numpy as np
import SimpleITK as sitk

from ..errors import InputError
from ..segment.result import SegmentationResult
from .refine import REFIT_TOLERANCE, SNAP_MM, fit_boxes, refit

CLICK_RADIUS_MM = 100.0
DEFAULT_BOX_MM = 50.0
BOX_SIDES_MM = (30.0, DEFAULT_BOX_MM, 80.0, 120.0, 180.0)  # the point's box sizes tried (the best fit wins)
REFITS = 3
AIR_HU_LIMIT = -500.0


def _fmt(p) -> str:
    return "(" + ", ".join(f"{v:.1f}" for v in p) + ") mm LPS"


def check_point(image: sitk.Image, point_lps) -> np.ndarray:
    """The continuous (x, y, z) index of ``point_lps``; InputError when it is outside the volume."""
    if len(point_lps) != 3 or not all(np.isfinite(v) for v in point_lps):
        raise InputError(f"point {point_lps!r} is not three finite coordinates X,Y,Z (mm LPS)")
    idx = np.asarray(image.TransformPhysicalPointToContinuousIndex([float(v) for v in point_lps]))
    size = np.asarray(image.GetSize())
    if np.any(idx < -0.5) or np.any(idx > size - 0.5):
        raise InputError(f"point {_fmt(point_lps)} is outside the volume (voxel index {tuple(np.round(idx, 1))}, size {tuple(size)})")
    return idx


def crop_around(image: sitk.Image, idx_xyz, radius_mm: float = CLICK_RADIUS_MM) -> tuple[sitk.Image, np.ndarray]:
    """(crop, its start index (x, y, z)): the voxels within ``radius_mm`` of the index along each axis."""
    sp = np.asarray(image.GetSpacing())
    size = np.asarray(image.GetSize())
    c = np.round(idx_xyz).astype(int)
    r = np.ceil(radius_mm / sp).astype(int)
    start = np.clip(c - r, 0, size - 1)
    stop = np.clip(c + r + 1, 1, size)
    return sitk.RegionOfInterest(image, [int(v) for v in stop - start], [int(v) for v in start]), start


def lesion_mask(engine, hu: np.ndarray, sp, p_mm: np.ndarray, cancel=None) -> tuple[np.ndarray, np.ndarray, float] | None:
    """(component mask, probability, threshold used) of the lesion at ``p_mm`` on a canonical crop; None if none
    (see the module's docstring for the scale choice and the re-fits)."""
    p_mm = np.asarray(p_mm, dtype=np.float64)
    trials = [np.concatenate([p_mm, [side] * 3]) for side in BOX_SIDES_MM]
    # the scale: of the boxes tried, the one whose lesion fits it best (the RoI segmenter learnt on
    # boxes within 0.75-1.35x of their lesion); a lesion touching the RoI's edge fits badly
    found = [f for f in fit_boxes(engine, hu, sp, trials, [p_mm] * len(trials), SNAP_MM, cancel) if f.comp is not None]
    if not found:
        return None
    best = min(found, key=lambda f: f.misfit(sp, hu.shape))  # the first of equals: the smaller box
    best = refit(engine, hu, sp, [best], REFITS, REFIT_TOLERANCE, cancel)[0]
    comp, prob = best.full(hu.shape)
    return comp, prob, best.threshold


def click(engine, image: sitk.Image, points_lps: Sequence[Sequence[float]], cancel=None, source: str | None = None) -> SegmentationResult:
    """Segment the lesion under each point; lesion ``k`` (label ``k``) is point ``k`` (1-based).

    ``engine`` is a DetSeg3D engine (it needs ``segment_boxes``).  The labelmap is
    on ``image``'s grid; where two points' lesions overlap the earlier point keeps the voxel.
    """
    from ..io.images import validate_ct

    if not hasattr(engine, "segment_boxes"):
        raise InputError(f"model {engine.card.id} ({engine.card.architecture}) cannot segment from a click; use a detseg model")
    validate_ct(image, source)
    if not points_lps:
        raise InputError("no point given")
    idxs = [check_point(image, p) for p in points_lps]  # all points checked before any work
    t0 = time.perf_counter()
    full = np.zeros(sitk.GetArrayViewFromImage(image).shape, dtype=np.uint16)
    lesions = []
    for k, (p, idx) in enumerate(zip(points_lps, idxs), start=1):
        crop, start = crop_around(image, idx)
        canonical, hu, sp = engine.prepare(crop)
        c = np.asarray(canonical.TransformPhysicalPointToContinuousIndex([float(v) for v in p]))[::-1]
        v = np.clip(np.round(c).astype(int), 0, np.asarray(hu.shape) - 1)
        near = hu[tuple(slice(max(0, a - 1), a + 2) for a in v)]
        if float(near.mean()) < AIR_HU_LIMIT:
            raise InputError(f"point {_fmt(p)} is on air or outside the body (mean {near.mean():.0f} HU around it); click inside the lesion")
        found = lesion_mask(engine, hu, sp, c * np.asarray(sp), cancel)
        if found is None:
            raise InputError(f"no lesion found at point {_fmt(p)}: the RoI segmenter gives no lesion voxels there")
        comp, prob, thr = found
        res = engine.lesions_from_probability(crop, canonical, hu, sp, prob * comp, {}, 0.0, keep_patches=True,
                                              prob_threshold=thr, min_size_mm3=0.0)
        if not res.lesions:
            raise InputError(f"no lesion found at point {_fmt(p)}")
        les = res.lesions[0]
        sub = res.labelmap == les.lesion_id
        z0, y0, x0 = start[2], start[1], start[0]
        region = full[z0 : z0 + sub.shape[0], y0 : y0 + sub.shape[1], x0 : x0 + sub.shape[2]]
        region[sub & (region == 0)] = k
        (a, b) = les.bbox_ijk
        les.bbox_ijk = (tuple(int(u + s) for u, s in zip(a, start)), tuple(int(u + s) for u, s in zip(b, start)))
        les.lesion_id = k
        lesions.append(les)
    return SegmentationResult(labelmap=full, lesions=lesions, reference=image, model_id=engine.card.id, threshold=0.0,
                              timings={"click": time.perf_counter() - t0}, device=str(engine.device), messages=list(engine.messages))

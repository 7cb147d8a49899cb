"""A reviewer simulated from ground truth, writing corrections as the Slicer module would.

For each proposal of the model (confidence >= the model's threshold): a proposal that hits a
ground-truth lesion (matching rule of :mod:`..evaluate.matching`) is **edited**, its mask replaced
by that lesion's ground truth; a proposal that hits none is **deleted** (rejected).  Every
ground-truth lesion that no shown proposal hits is **added** (a missed lesion, as with a click).
The proposals are the model's uncapped ones (the OOD cap is off, as if the reviewer lowered the
threshold on a flagged scan), so the false positives it would show get rejected.  Used by the
adaptation experiment (``Testing/benchmarks/finetune_chest.py``) and the tests.
"""
from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from ..evaluate.matching import gt_components, match
from ..feedback.codec import lesion_key
from ..feedback.corrections import Correction, save_case
from ..feedback.grid import mask_to_model_grid, model_grid


def simulate(engine, image: sitk.Image, label: np.ndarray):
    """(model grid, corrections, counts) of a reviewer who follows ``label`` (z, y, x on ``image``)."""
    grid = model_grid(image, engine.seg_cfg["spacing_zyx"])
    own, engine.ood = engine.ood, None  # the reviewer sees the proposals uncapped (flagged as OOD in Slicer)
    try:
        res = engine.segment(image)
    finally:
        engine.ood = own
    gt, n_gt = gt_components(label)
    m = match(res.labelmap, gt, len(res.lesions), n_gt)
    out, hit = [], set()
    for les, g in zip(res.lesions, m.pred_to_gt):
        key = lesion_key(les.centroid_lps, les.lesion_id)
        if g and int(g) not in hit:
            hit.add(int(g))
            mask = mask_to_model_grid(gt == g, image, grid)
            kind = "edited"
        else:
            mask = mask_to_model_grid(res.labelmap == les.lesion_id, image, grid)
            kind = "deleted"
        if mask.any():
            out.append(Correction(kind, mask, key, les.lesion_id, les.confidence))
    for g in range(1, n_gt + 1):
        if g not in hit:
            mask = mask_to_model_grid(gt == g, image, grid)
            if mask.any():
                out.append(Correction("added", mask))
    counts = {k: sum(c.kind == k for c in out) for k in ("edited", "added", "deleted")}
    return grid, out, counts


def review_into(store, engine, image, label, case_name: str, reviewer: str = "simulated") -> dict:
    """Simulate the review of one case and save its corrections; returns the counts."""
    from ..segment.pipeline import case_hash

    grid, corr, counts = simulate(engine, image, label)
    save_case(store, case_hash(image), case_name, engine.card.id, grid, corr, reviewer=reviewer)
    return counts

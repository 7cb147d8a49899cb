"""A click on a detseg model: the lesion at a point of a canonical crop, from the RoI segmenter.

The driver (points, crops, refusals, the result) is :func:`LesionSegLib.engine.click.click`; this
module is its detseg part.  Boxes of ``BOX_SIDES_MM`` centred on the point are each segmented by
the RoI segmenter, and the scale whose lesion (the 26-connected component under the point, or the
nearest within ``SNAP_MM``) fits its box best is kept: the RoI segmenter learnt on boxes within
0.75-1.35x of their lesion, and a lesion that touches the RoI's edge fits badly.  The RoI is then
re-fitted to the component while it touches the edge or a side is off by more than 1.5x (at most
``REFITS`` times).  This design was chosen on training-case clicks
(``Resources/evaluation/detseg/click_train*.json``: mean Dice 0.53 against 0.33 for the earlier
single 50 mm box with one re-fit), never on the validation lesions.
"""
from __future__ import annotations

import numpy as np

from .refine import REFIT_TOLERANCE, SNAP_MM, fit_boxes, refit

DEFAULT_BOX_MM = 50.0
BOX_SIDES_MM = (30.0, DEFAULT_BOX_MM, 80.0, 120.0, 180.0)  # the point's box sizes tried (the best fit wins)
REFITS = 3


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

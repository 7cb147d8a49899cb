"""The confidence colormap and the review colours, shared by the CLI outputs and Slicer.

Confidence colormap ("LesionSeg confidence"): a perceptually ordered ramp, sampled from
matplotlib's *plasma*, from dark blue-violet (confidence 0) through magenta and orange to
yellow (confidence 1).  Review decisions override it: accepted lesions are green, rejected
lesions grey, so the decision is visible at a glance.
"""
from __future__ import annotations

import numpy as np

#: (confidence, (r, g, b)) stops of the confidence colormap, from matplotlib's plasma.
CONFIDENCE_STOPS = (
    (0.00, (0.050, 0.030, 0.528)),
    (0.25, (0.494, 0.012, 0.658)),
    (0.50, (0.798, 0.280, 0.470)),
    (0.75, (0.973, 0.585, 0.255)),
    (1.00, (0.940, 0.975, 0.131)),
)
ACCEPTED_COLOR = (0.10, 0.80, 0.25)
REJECTED_COLOR = (0.55, 0.55, 0.55)


def confidence_color(confidence: float) -> tuple[float, float, float]:
    """RGB in [0, 1] for a confidence in [0, 1] (values outside are clipped)."""
    c = float(np.clip(confidence, 0.0, 1.0))
    xs = [s[0] for s in CONFIDENCE_STOPS]
    rgb = [float(np.interp(c, xs, [s[1][i] for s in CONFIDENCE_STOPS])) for i in range(3)]
    return (rgb[0], rgb[1], rgb[2])


def status_color(status: str, confidence: float) -> tuple[float, float, float]:
    """Colour of a lesion given its review status ('accepted', 'rejected', else unreviewed)."""
    if status == "accepted":
        return ACCEPTED_COLOR
    if status == "rejected":
        return REJECTED_COLOR
    return confidence_color(confidence)

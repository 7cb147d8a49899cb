"""Lesion-level metrics: Dice, FROC / CPM, cluster AUC and calibration (ECE), all on MONAI.

* Dice: MONAI ``DiceMetric`` (1.0 when both masks are empty).
* FROC: MONAI ``compute_froc_curve_data`` / ``compute_froc_score`` (CAMELYON interpolation) at
  1/8 ... 8 false positives per case; CPM is the mean of those seven sensitivities.
* Cluster AUC: MONAI ``compute_roc_auc`` of a score separating TP from FP clusters.
* Calibration: MONAI ``CalibrationErrorMetric`` (expected calibration error, equal-width bins)
  and ``calibration_binning`` for the reliability diagram.
"""
from __future__ import annotations

import warnings
from typing import Sequence

import numpy as np

#: false positives per case at which the FROC is read; CPM is the mean of the sensitivities there
FROC_FP_RATES = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
SENS_AT_FP = 0.5
ECE_BINS = 10


def dice_score(pred_mask: np.ndarray, gt_mask: np.ndarray) -> float:
    """Dice of two volumes of one shape with MONAI's DiceMetric (1.0 when both are empty); any
    nonzero voxel is foreground, so a labelmap of lesion ids may be passed as it is (a cast to
    uint8 made id 256 background, and an id above 1 skewed the score).  Shapes must match:
    broadcasting a slice against a volume gave a Dice above 1."""
    import torch
    from monai.metrics import DiceMetric

    pred, gt = np.asarray(pred_mask) > 0, np.asarray(gt_mask) > 0
    if pred.shape != gt.shape:
        raise ValueError(f"masks of different shapes: prediction {pred.shape}, ground truth {gt.shape}")
    metric = DiceMetric(include_background=True, reduction="none", ignore_empty=False)
    p = torch.from_numpy(pred.view(np.uint8))[None, None]
    g = torch.from_numpy(gt.view(np.uint8))[None, None]
    return float(metric(y_pred=p, y=g).reshape(-1)[0])


def froc(tp_scores: Sequence[float | None], fp_scores: Sequence[float], n_cases: int) -> dict | None:
    """FROC over all cases with MONAI's CAMELYON-style utilities.

    ``tp_scores``: one entry per ground-truth lesion, the score of its detection or None when
    missed; ``fp_scores``: scores of the false-positive clusters.  MONAI takes 0 as "missed" and
    skips the lowest distinct score as a threshold, so real scores are shifted to >= 1 and a 0 is
    always present: every real score is then an operating point.
    """
    from monai.metrics import compute_froc_curve_data, compute_froc_score

    n_targets = len(tp_scores)
    if n_targets == 0:
        return None
    real = [s for s in tp_scores if s is not None] + list(fp_scores)
    lo = min(real) if real else 0.0
    shift = lambda v: 1.0 + (float(v) - lo)  # noqa: E731  (monotone, keeps ties)
    tp = np.array([shift(s) if s is not None else 0.0 for s in tp_scores], dtype=np.float64)
    fp = np.array([shift(s) for s in fp_scores] + [0.0], dtype=np.float64)
    fps, sens = compute_froc_curve_data(fp_probs=fp, tp_probs=tp, num_targets=n_targets, num_images=n_cases)
    original = {shift(v): float(v) for v in real}
    thresholds = [original[t] for t in sorted(set(tp.tolist()) | set(fp.tolist()))[1:]]
    at = {rate: float(compute_froc_score(fps, sens, (rate,))) for rate in FROC_FP_RATES}
    return {
        "fp_rates": list(FROC_FP_RATES),
        "sensitivity": [at[r] for r in FROC_FP_RATES],
        "cpm": float(compute_froc_score(fps, sens, FROC_FP_RATES)),
        "sensitivity_at_0.5fp": float(compute_froc_score(fps, sens, (SENS_AT_FP,))),
        "max_sensitivity": float(np.max(sens)) if len(sens) else 0.0,
        "max_fp_per_case": float(np.max(fps)) if len(fps) else 0.0,
        # operating points: score >= threshold[i] gives fp_per_case[i], sensitivity[i]; the last is "nothing"
        "curve": {
            "threshold": [float(t) for t in thresholds] + [None],
            "fp_per_case": [float(v) for v in fps],
            "sensitivity": [float(v) for v in sens],
        },
    }


def _sensitivity_curve(fr: dict, rates: np.ndarray) -> np.ndarray:
    from monai.metrics import compute_froc_score

    fps = np.asarray(fr["curve"]["fp_per_case"])
    sens = np.asarray(fr["curve"]["sensitivity"])
    return np.array([compute_froc_score(fps, sens, (float(r),)) for r in rates])


def cluster_auc(scores: Sequence[float], is_tp: Sequence[bool]) -> float | None:
    """ROC AUC of ``scores`` for TP (1) against FP (0) clusters; None unless both are present."""
    import torch
    from monai.metrics import compute_roc_auc

    y = np.asarray(is_tp, dtype=np.int64)
    if y.size == 0 or y.min() == y.max():
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(compute_roc_auc(torch.as_tensor(np.asarray(scores, dtype=np.float64)), torch.as_tensor(y)))


def calibration(scores: Sequence[float], is_tp: Sequence[bool], n_bins: int = ECE_BINS) -> dict | None:
    """ECE (count-weighted, ``n_bins`` equal-width bins on [0, 1]) and the reliability-diagram bins.
    MONAI's binning closes each bin on the right: a score exactly on an edge (0.5) falls in the bin
    below it, (0.4, 0.5]; the first bin is [0, 0.1]."""
    import torch
    from monai.metrics import CalibrationErrorMetric, calibration_binning

    if len(scores) == 0:
        return None
    p = torch.as_tensor(np.asarray(scores, dtype=np.float32))[None, None]
    y = torch.as_tensor(np.asarray(is_tp, dtype=np.float32))[None, None]
    metric = CalibrationErrorMetric(num_bins=n_bins, calibration_reduction="expected", metric_reduction="mean")
    metric(y_pred=p, y=y)
    ece = float(metric.aggregate())
    mean_p, mean_y, counts = (t[0, 0].tolist() for t in calibration_binning(p, y, num_bins=n_bins))
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    bins = []
    for b in range(n_bins):
        n = int(counts[b])
        bins.append(
            {
                "lo": float(edges[b]),
                "hi": float(edges[b + 1]),
                "count": n,
                "mean_score": None if n == 0 else float(mean_p[b]),
                "fraction_tp": None if n == 0 else float(mean_y[b]),
            }
        )
    return {"ece": ece, "n_bins": n_bins, "bins": bins}

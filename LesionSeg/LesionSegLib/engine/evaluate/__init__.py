"""Evaluation: the matching rule, lesion-level metrics, and the ``lesionseg evaluate`` report."""
from .matching import INSIDE_MIN, IOU_MIN, Match, detections, gt_components, match
from .metrics import ECE_BINS, FROC_FP_RATES, calibration, cluster_auc, dice_score, froc
from .report import evaluate, evaluate_case, report_markdown, write_report

__all__ = [
    "INSIDE_MIN", "IOU_MIN", "Match", "detections", "gt_components", "match",
    "ECE_BINS", "FROC_FP_RATES", "calibration", "cluster_auc", "dice_score", "froc",
    "evaluate", "evaluate_case", "report_markdown", "write_report",
]

"""The out-of-distribution warning of a result, kept on its segmentation node (MRML, no Qt).

The engine gives every result a scan-level OOD score and, above the model's threshold, a warning
(``result.ood``; see ``engine/segment/ood.py``).  :func:`annotate` stores both as node attributes
so they survive scene save/reload; the panel shows :func:`warning` (empty when in domain).
"""
from __future__ import annotations

ATTR_SCORE = "LesionSeg.OODScore"
ATTR_WARNING = "LesionSeg.OODWarning"


def annotate(segmentation_node, result) -> None:
    ood = getattr(result, "ood", None) or {}
    if "scan_score" in ood:
        segmentation_node.SetAttribute(ATTR_SCORE, f"{float(ood['scan_score']):.4f}")
    segmentation_node.SetAttribute(ATTR_WARNING, ood.get("warning") or "")


def warning(segmentation_node) -> str:
    return segmentation_node.GetAttribute(ATTR_WARNING) or ""


def score(segmentation_node) -> float | None:
    text = segmentation_node.GetAttribute(ATTR_SCORE)
    try:
        return float(text) if text else None
    except ValueError:
        return None

"""``lesionseg evaluate``: Dice, lesion-wise FROC, cluster AUC and calibration of segment outputs.

    lesionseg evaluate --pred OUTDIR --gt GTDIR [-o REPORTDIR] [--split val | --cases A B ...]

``OUTDIR`` is what ``lesionseg segment`` wrote: for each case ``<stem>_lesions.nii.gz`` (instance
labelmap, voxel value k = lesion k) and ``<stem>_lesions.csv`` (one row per lesion, with
``confidence`` and ``mean_probability``).  Files may also sit one folder down
(``OUTDIR/<case>/image_lesions.nii.gz``).  ``GTDIR`` holds the ground truth either as case folders
(``GTDIR/<case>/label.nii.gz``, the layout of the shared data) or flat, like ``--pred``
(``GTDIR/<case>_lesions.nii.gz``, ``<case>_label.nii.gz``, ``<case>_seg.*``, ``<case>_mask.*``).
Any non-zero ground-truth voxel is lesion.

Everything is recomputed from those files; nothing is read from model cards or earlier reports.

Metrics
-------
* **Dice** per case on the union of lesions (prediction > 0 against ground truth > 0, MONAI
  ``DiceMetric``; 1.0 when both are empty), their mean, and the global Dice pooled over all
  voxels of all cases.  ``dice_threshold`` restricts the prediction to lesions with
  ``confidence >= T`` (for outputs written with ``--threshold 0``).
* **Lesion-wise detection** with the matching rule of :mod:`.matching` (ground-truth lesions
  are the 26-connected components of the label; a predicted lesion hits a ground-truth lesion
  when IoU >= 0.1 or >= 50 % of its voxels lie inside it; each ground-truth lesion is
  detected at most once, by its highest-scoring hit; further hits are duplicates, neither
  detections nor false positives; a lesion hitting nothing is a false positive).
  FROC (MONAI ``compute_froc_curve_data`` / ``compute_froc_score``, whose linear interpolation
  between operating points is the CAMELYON convention) at 1/8, 1/4, 1/2, 1, 2, 4 and 8 false
  positives per case, ranked by the CSV ``confidence``; CPM is the mean of those seven; and
  the sensitivity at 0.5 FP/case.  The same is computed with ``mean_probability`` as score.
* **Cluster AUC**: ROC AUC (MONAI ``compute_roc_auc``) of ``confidence`` separating true
  positive clusters (those hitting a ground-truth lesion, duplicates included: the
  classifier's target) from false positive ones, beside the AUC of ``mean_probability``.
* **Calibration**: expected calibration error over 10 equal-width bins (MONAI
  ``CalibrationErrorMetric``; per-bin values from ``calibration_binning``) of ``confidence`` as
  the probability that a cluster is a true positive, and a reliability diagram.

Outputs of :func:`write_report`: ``report.json``, ``report.md``, ``froc.png``, ``reliability.png``.
"""
from __future__ import annotations

import datetime as _dt
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import SimpleITK as sitk

from ..errors import InputError
from ..atomic import AtomicWriter
from ..io.images import same_grid
from .matching import INSIDE_MIN, IOU_MIN, detections, gt_components, match
from .metrics import ECE_BINS, FROC_FP_RATES, calibration, cluster_auc, dice_score, froc
from .plots import _rate_label, plot_froc, plot_reliability
from .pairing import SCORE_LABELS, SCORES, CasePair, _grid_text, _read_volume, pair_cases, read_table

REPORT_FILES = ("report.json", "report.md", "froc.png", "reliability.png")

MATCHING_RULE = (
    "Ground-truth lesions are the 26-connected components (cc3d) of label > 0. A predicted lesion "
    f"hits a ground-truth lesion when their IoU >= {IOU_MIN:g} or >= {INSIDE_MIN:.0%} of the predicted "
    "lesion's voxels lie inside it (it is assigned to the hit with the highest IoU). Each ground-truth "
    "lesion is detected at most once, by its highest-scoring hit; further hits on it are duplicates, "
    "counted neither as detections nor as false positives. A predicted lesion hitting no ground-truth "
    "lesion is a false positive. For cluster AUC and calibration a cluster is positive when it hits "
    "any ground-truth lesion (duplicates included)."
)


# ------------------------------------------------------------------------------ per case
@dataclass
class CaseResult:
    case: str
    files: dict[str, str]
    dice: float
    voxels: dict[str, int]  # intersection, prediction, ground_truth (after dice_threshold)
    n_gt: int
    gt_voxels: list[int]
    #: per cluster: lesion_id, scores, gt (0: none), iou, role (per score ranking)
    clusters: list[dict] = field(default_factory=list)
    #: per score: tp_scores (per GT lesion, None when missed), fp_scores
    by_score: dict[str, dict] = field(default_factory=dict)

    def summary(self) -> dict:
        conf = self.by_score["confidence"]
        roles = [c["role"] for c in self.clusters]
        return {
            "case": self.case,
            "dice": self.dice,
            "n_gt_lesions": self.n_gt,
            "n_clusters": len(self.clusters),
            "n_detected": sum(s is not None for s in conf["tp_scores"]),
            "n_false_positives": roles.count("fp"),
            "n_duplicates": roles.count("duplicate"),
            "voxels": self.voxels,
            "files": self.files,
        }


def evaluate_case(pair: CasePair, dice_threshold: float | None = None) -> CaseResult:
    assert pair.label is not None
    pred_img = _read_volume(pair.labelmap, "prediction labelmap")
    gt_img = _read_volume(pair.label, "ground-truth label")
    if not same_grid(pred_img, gt_img):
        raise InputError(
            f"prediction grid ({_grid_text(pred_img)}) differs from its ground truth {pair.label} ({_grid_text(gt_img)})",
            str(pair.labelmap),
        )
    pred = sitk.GetArrayFromImage(pred_img)
    if pred.dtype.kind == "f":
        if not np.all(np.isfinite(pred)) or np.any(pred != np.round(pred)):
            raise InputError("prediction labelmap holds non-integer values; an instance labelmap is required", str(pair.labelmap))
    if pred.min() < 0:
        raise InputError("prediction labelmap holds negative values", str(pair.labelmap))
    pred = pred.astype(np.int64, copy=False)
    table = read_table(pair.table)

    ids_map = np.unique(pred)
    ids_map = ids_map[ids_map > 0]
    counts = np.bincount(pred.ravel(), minlength=int(ids_map.max()) + 1 if ids_map.size else 1)
    no_row = sorted(set(ids_map.tolist()) - set(table))
    if no_row:
        raise InputError(f"labelmap {pair.labelmap.name} holds lesion id(s) {no_row[:10]} with no row in the table", str(pair.table))
    no_vox = sorted(set(table) - set(ids_map.tolist()))
    if no_vox:
        raise InputError(f"table row(s) for lesion id(s) {no_vox[:10]} have no voxels in labelmap {pair.labelmap.name}", str(pair.table))
    bad = [lid for lid, r in table.items() if "n_voxels" in r and r["n_voxels"] != int(counts[lid])]
    if bad:
        lid = bad[0]
        raise InputError(
            f"lesion {lid}: table says {table[lid]['n_voxels']} voxels, labelmap {pair.labelmap.name} has {int(counts[lid])}; "
            "table and labelmap do not belong together",
            str(pair.table),
        )

    ids = sorted(table)
    lut = np.zeros(int(max(ids, default=0)) + 1, dtype=np.int64)
    lut[ids] = np.arange(1, len(ids) + 1)
    pred_c = lut[pred]
    del pred
    gt_inst, n_gt = gt_components(sitk.GetArrayViewFromImage(gt_img))
    m = match(pred_c, gt_inst, n_pred=len(ids), n_gt=n_gt)
    scores = {s: np.array([table[i][s] for i in ids], dtype=float) for s in SCORES}

    by_score = {}
    roles_by_score = {}
    for s in SCORES:
        det, fp = detections(m, scores[s])
        tp_scores: list[float | None] = [None] * n_gt
        for k in np.flatnonzero(det):
            tp_scores[int(m.pred_to_gt[k]) - 1] = float(scores[s][k])
        by_score[s] = {
            "tp_scores": tp_scores,
            "fp_scores": [float(v) for v in scores[s][fp]],
            "cluster_scores": [float(v) for v in scores[s]],
        }
        roles_by_score[s] = np.where(det, "detection", np.where(fp, "fp", "duplicate"))
    clusters = []
    for k, lid in enumerate(ids):
        clusters.append(
            {
                "lesion_id": int(lid),
                "confidence": float(scores["confidence"][k]),
                "mean_probability": float(scores["mean_probability"][k]),
                "n_voxels": int(counts[lid]),
                "gt_lesion": int(m.pred_to_gt[k]),
                "iou": round(float(m.pred_iou[k]), 6),
                "is_tp": bool(m.pred_to_gt[k] > 0),
                "role": str(roles_by_score["confidence"][k]),
            }
        )

    # Dice on the union of lesions (optionally only lesions with confidence >= dice_threshold)
    if dice_threshold is None:
        pred_mask = pred_c > 0
    else:
        keep = np.concatenate([[False], scores["confidence"] >= dice_threshold])
        pred_mask = keep[pred_c]
    del pred_c
    gt_mask = gt_inst > 0
    voxels = {
        "intersection": int(np.count_nonzero(pred_mask & gt_mask)),
        "prediction": int(np.count_nonzero(pred_mask)),
        "ground_truth": int(np.count_nonzero(gt_mask)),
    }
    dice = dice_score(pred_mask, gt_mask)
    files = {"prediction": str(pair.labelmap), "table": str(pair.table), "ground_truth": str(pair.label)}
    return CaseResult(pair.case, files, dice, voxels, n_gt, [int(v) for v in m.gt_sizes], clusters, by_score)


def _mean(values: Iterable[float]) -> float | None:
    v = [x for x in values if x is not None and math.isfinite(x)]
    return float(np.mean(v)) if v else None


def _version() -> str | None:
    try:
        from importlib.metadata import version

        return version("lesionseg")
    except Exception:  # not installed as a distribution (e.g. inside Slicer)
        return None


def evaluate(
    pred_dir: str | Path,
    gt_dir: str | Path,
    cases: Sequence[str] | None = None,
    dice_threshold: float | None = None,
    progress=None,
) -> dict:
    """Evaluate the ``lesionseg segment`` outputs in ``pred_dir`` against ``gt_dir``; return the report."""
    pairs, unpredicted = pair_cases(pred_dir, gt_dir, cases)
    results: list[CaseResult] = []
    for i, pair in enumerate(pairs):
        results.append(evaluate_case(pair, dice_threshold))
        if progress is not None:
            progress(i + 1, len(pairs), pair.case)
    n_cases = len(results)

    inter = sum(r.voxels["intersection"] for r in results)
    denom = sum(r.voxels["prediction"] + r.voxels["ground_truth"] for r in results)
    dice_global = 1.0 if denom == 0 else 2.0 * inter / denom
    per_case_dice = {r.case: r.dice for r in results}

    clusters = [c for r in results for c in r.clusters]
    is_tp = [c["is_tp"] for c in clusters]
    n_gt = sum(r.n_gt for r in results)
    roles = [c["role"] for c in clusters]

    detection: dict = {
        "n_cases": n_cases,
        "n_gt_lesions": n_gt,
        "n_clusters": len(clusters),
        "n_tp_clusters": int(sum(is_tp)),
        "n_fp_clusters": roles.count("fp"),
        "n_duplicates": roles.count("duplicate"),
        "n_detected": roles.count("detection"),
        "fp_per_case": roles.count("fp") / n_cases,
        "froc": {},
    }
    auc, cal = {}, {}
    for s in SCORES:
        tp_scores = [v for r in results for v in r.by_score[s]["tp_scores"]]
        fp_scores = [v for r in results for v in r.by_score[s]["fp_scores"]]
        detection["froc"][s] = froc(tp_scores, fp_scores, n_cases)
        auc[s] = cluster_auc([c[s] for c in clusters], is_tp)
        cal[s] = calibration([c[s] for c in clusters], is_tp)

    conf_froc = detection["froc"]["confidence"] or {}
    mp_froc = detection["froc"]["mean_probability"] or {}
    summary = {
        "n_cases": n_cases,
        "n_gt_lesions": n_gt,
        "n_clusters": len(clusters),
        "dice_mean": _mean(per_case_dice.values()),
        "dice_global": dice_global,
        "sensitivity_at_0.5fp": conf_froc.get("sensitivity_at_0.5fp"),
        "cpm": conf_froc.get("cpm"),
        "max_sensitivity": conf_froc.get("max_sensitivity"),
        "fp_per_case": detection["fp_per_case"],
        "cluster_auc": auc["confidence"],
        "cluster_auc_mean_probability": auc["mean_probability"],
        "ece": cal["confidence"]["ece"] if cal["confidence"] else None,
        "ece_mean_probability": cal["mean_probability"]["ece"] if cal["mean_probability"] else None,
        "sensitivity_at_0.5fp_mean_probability": mp_froc.get("sensitivity_at_0.5fp"),
        "cpm_mean_probability": mp_froc.get("cpm"),
    }
    notes = []
    if unpredicted:
        notes.append(f"{len(unpredicted)} ground-truth case(s) have no prediction and were not evaluated: {', '.join(unpredicted[:20])}")
    if conf_froc and conf_froc["max_fp_per_case"] < FROC_FP_RATES[-1]:
        notes.append(
            f"the predictions hold at most {conf_froc['max_fp_per_case']:.3g} FP/case; FROC points beyond that repeat the last "
            "sensitivity (run `lesionseg segment --threshold 0` to keep every candidate)"
        )
    if auc["confidence"] is None:
        notes.append("cluster AUC is undefined: the clusters are all true or all false positives")
    min_conf = min((c["confidence"] for c in clusters), default=None)

    return {
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "lesionseg_version": _version(),
        "pred_dir": str(Path(pred_dir).resolve()),
        "gt_dir": str(Path(gt_dir).resolve()),
        "cases_evaluated": [r.case for r in results],
        "cases_without_prediction": unpredicted,
        "dice_threshold": dice_threshold,
        "lowest_confidence_present": min_conf,
        "matching": {"rule": MATCHING_RULE, "iou_min": IOU_MIN, "inside_min": INSIDE_MIN, "gt_connectivity": 26},
        "summary": summary,
        "dice": {"per_case": per_case_dice, "mean": summary["dice_mean"], "global": dice_global},
        "detection": detection,
        "cluster_auc": {**auc, "n_tp": int(sum(is_tp)), "n_fp": int(len(is_tp) - sum(is_tp))},
        "calibration": cal,
        "notes": notes,
        "cases": [dict(r.summary(), clusters=r.clusters, gt_lesion_voxels=r.gt_voxels) for r in results],
    }


# ---------------------------------------------------------------------------------- report
def format_cell(v, digits: int = 3, missing: str = "n/a") -> str:
    """A report cell: floats to ``digits`` decimals, None as ``missing``."""
    if v is None:
        return missing
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def report_markdown(report: dict) -> str:
    s = report["summary"]
    d = report["detection"]
    lines = [
        "# LesionSeg evaluation report",
        "",
        f"- predictions: `{report['pred_dir']}`",
        f"- ground truth: `{report['gt_dir']}`",
        f"- cases: {s['n_cases']} ({', '.join(report['cases_evaluated'])})",
        f"- ground-truth lesions: {s['n_gt_lesions']}; predicted clusters: {s['n_clusters']}",
        f"- created: {report['created']}",
    ]
    if report.get("command"):
        lines.append(f"- command: `{report['command']}`")
    if report["dice_threshold"] is not None:
        lines.append(f"- Dice uses lesions with confidence >= {report['dice_threshold']:g}")
    lines += [
        "",
        "## Summary",
        "",
        "| metric | confidence (ours) | mean probability (baseline) |",
        "| --- | --- | --- |",
        f"| Dice, mean per case | {format_cell(s['dice_mean'])} | |",
        f"| Dice, global (all voxels pooled) | {format_cell(s['dice_global'])} | |",
        f"| sensitivity at 0.5 FP/case | {format_cell(s['sensitivity_at_0.5fp'])} | {format_cell(s['sensitivity_at_0.5fp_mean_probability'])} |",
        f"| CPM (mean sensitivity at 1/8..8 FP/case) | {format_cell(s['cpm'])} | {format_cell(s['cpm_mean_probability'])} |",
        f"| cluster AUC (TP vs FP clusters) | {format_cell(s['cluster_auc'])} | {format_cell(s['cluster_auc_mean_probability'])} |",
        f"| ECE ({ECE_BINS} bins) | {format_cell(s['ece'])} | {format_cell(s['ece_mean_probability'])} |",
        "",
        f"Detections {d['n_detected']} of {d['n_gt_lesions']} lesions (max sensitivity {format_cell(s['max_sensitivity'])}), "
        f"{d['n_fp_clusters']} false-positive clusters ({d['fp_per_case']:.2f} per case), {d['n_duplicates']} duplicate hits.",
        "",
        "## FROC",
        "",
        "| score | " + " | ".join(_rate_label(r) for r in FROC_FP_RATES) + " | CPM |",
        "| --- " * (len(FROC_FP_RATES) + 2) + "|",
    ]
    for sc in SCORES:
        fr = d["froc"].get(sc)
        if fr:
            lines.append(f"| {SCORE_LABELS[sc]} | " + " | ".join(f"{v:.3f}" for v in fr["sensitivity"]) + f" | {fr['cpm']:.3f} |")
    lines += ["", "![FROC](froc.png)", "", "## Calibration", "", "![Reliability diagram](reliability.png)", ""]
    cal = report["calibration"].get("confidence")
    if cal:
        lines += ["| bin | clusters | mean confidence | fraction TP |", "| --- | --- | --- | --- |"]
        for b in cal["bins"]:
            lines.append(f"| {b['lo']:.1f}-{b['hi']:.1f} | {b['count']} | {format_cell(b['mean_score'])} | {format_cell(b['fraction_tp'])} |")
        lines.append("")
    lines += [
        "## Per case",
        "",
        "| case | Dice | GT lesions | detected | FP clusters | duplicates | clusters |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for c in report["cases"]:
        lines.append(
            f"| {c['case']} | {c['dice']:.3f} | {c['n_gt_lesions']} | {c['n_detected']} | {c['n_false_positives']} | {c['n_duplicates']} | {c['n_clusters']} |"
        )
    lines += ["", "## Matching rule", "", report["matching"]["rule"], ""]
    if report["notes"]:
        lines += ["## Notes", ""] + [f"- {n}" for n in report["notes"]] + [""]
    return "\n".join(lines) + "\n"


def _json_safe(obj):
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, np.generic):
        return _json_safe(obj.item())
    return obj


def write_report(report: dict, outdir: str | Path) -> list[Path]:
    """Write ``report.json``, ``report.md``, ``froc.png`` and ``reliability.png`` into ``outdir``."""
    out = Path(outdir)
    with AtomicWriter(out) as w:
        p = w.path("report.json")
        Path(p).write_text(json.dumps(_json_safe(report), indent=2, allow_nan=False) + "\n", encoding="utf-8")
        p = w.path("report.md")
        Path(p).write_text(report_markdown(report), encoding="utf-8")
        plot_froc(report, w.path("froc.png"))
        plot_reliability(report, w.path("reliability.png"))
    return [out / n for n in REPORT_FILES]

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

import argparse
import csv
import datetime as _dt
import json
import math
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import SimpleITK as sitk

from .errors import InputError, LesionSegError
from .io import IMAGE_SUFFIXES, same_grid
from .matching import INSIDE_MIN, IOU_MIN, detections, gt_components, match

#: false positives per case at which the FROC is read; CPM is the mean of the sensitivities there
FROC_FP_RATES = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
SENS_AT_FP = 0.5
ECE_BINS = 10
#: CSV columns that are ranked / calibrated: our confidence and the mean-probability baseline
SCORES = ("confidence", "mean_probability")
SCORE_LABELS = {"confidence": "confidence (CLCS classifier)", "mean_probability": "mean probability (baseline)"}
LESIONS_TAG = "_lesions"
GT_TAGS = ("_label", "_lesions", "_seg", "_mask", "_gt")
#: file stems that name no case (``<case>/image.nii.gz``): the folder names the case instead
GENERIC_STEMS = {"image", "img", "ct", "volume", "scan"}
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


# ------------------------------------------------------------------------------ pairing files
@dataclass
class CasePair:
    case: str
    labelmap: Path
    table: Path
    label: Path | None = None
    #: other names under which the ground truth may be filed (e.g. the output folder's name)
    hints: tuple[str, ...] = ()


def _strip_suffix(name: str) -> tuple[str, str] | None:
    low = name.lower()
    for suf in IMAGE_SUFFIXES:
        if low.endswith(suf):
            return name[: -len(suf)], suf
    return None


def find_predictions(pred_dir: str | Path) -> list[CasePair]:
    """Every ``<stem>_lesions.<image suffix>`` under ``pred_dir`` (one folder deep) with its CSV."""
    root = Path(pred_dir)
    if not root.exists():
        raise InputError("prediction folder not found", str(root))
    if not root.is_dir():
        raise InputError("--pred must be the folder `lesionseg segment` wrote, not a file", str(root))
    files = [f for f in sorted(root.iterdir()) if f.is_file()]
    for sub in sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")):
        files += [f for f in sorted(sub.iterdir()) if f.is_file()]
    by_case: dict[str, CasePair] = {}
    for f in files:
        if f.name.startswith("."):  # temporary files of an atomic write
            continue
        split = _strip_suffix(f.name)
        if split is None or not split[0].endswith(LESIONS_TAG):
            continue
        base = split[0][: -len(LESIONS_TAG)]
        hints: tuple[str, ...] = ()
        case = base
        if base.lower() in GENERIC_STEMS:
            if f.parent != root:
                case, hints = f.parent.name, (base,)
            else:
                hints = (root.name,)
        table = f.with_name(f"{base}{LESIONS_TAG}.csv")
        if not table.is_file():
            raise InputError(f"lesion table {table.name} is missing beside the labelmap (expected {table})", str(f))
        if case in by_case:
            raise InputError(f"two predictions for case {case!r}: {by_case[case].labelmap} and {f}", str(root))
        by_case[case] = CasePair(case, f, table, hints=hints)
    if not by_case:
        raise InputError(
            "no `<case>_lesions.nii.gz` labelmaps found; --pred must be a folder written by `lesionseg segment`",
            str(root),
        )
    return list(by_case.values())


def _gt_candidates(gt_dir: Path, name: str) -> list[Path]:
    out = []
    for suf in IMAGE_SUFFIXES:
        out.append(gt_dir / name / f"label{suf}")
    for tag in GT_TAGS:
        for suf in IMAGE_SUFFIXES:
            out.append(gt_dir / f"{name}{tag}{suf}")
    for suf in IMAGE_SUFFIXES:
        out.append(gt_dir / name / f"{name}_label{suf}")
    return out


def find_label(gt_dir: str | Path, pair: CasePair) -> Path:
    """The ground-truth label of ``pair``; an :class:`InputError` naming the prediction if none."""
    gt = Path(gt_dir)
    tried: list[Path] = []
    for name in (pair.case, *pair.hints):
        tried += _gt_candidates(gt, name)
    if pair.case.lower() in GENERIC_STEMS or any(h.lower() in GENERIC_STEMS for h in pair.hints):
        # a single case: GTDIR may be that case's folder itself
        tried += [gt / f"label{suf}" for suf in IMAGE_SUFFIXES]
    for p in tried:
        if p.is_file():
            return p
    shown = ", ".join(str(p) for p in tried if p.name.endswith(".nii.gz"))
    raise InputError(f"no ground truth for case {pair.case!r} in {gt} (looked for {shown}, also .nii/.nrrd/.mha)", str(pair.labelmap))


def list_ground_truth(gt_dir: str | Path) -> dict[str, Path]:
    """Ground-truth labels found in ``gt_dir``, by case name (both layouts)."""
    gt = Path(gt_dir)
    found: dict[str, Path] = {}
    if not gt.is_dir():
        return found
    for d in sorted(gt.iterdir()):
        if d.is_dir():
            for suf in IMAGE_SUFFIXES:
                if (d / f"label{suf}").is_file():
                    found[d.name] = d / f"label{suf}"
                    break
        elif d.is_file():
            split = _strip_suffix(d.name)
            if split is None:
                continue
            for tag in GT_TAGS:
                if split[0].endswith(tag) and len(split[0]) > len(tag):
                    found.setdefault(split[0][: -len(tag)], d)
    return found


def pair_cases(pred_dir, gt_dir, cases: Sequence[str] | None = None) -> tuple[list[CasePair], list[str]]:
    """Predictions paired with their labels, and the ground-truth cases that have no prediction."""
    gt = Path(gt_dir)
    if not gt.exists():
        raise InputError("ground-truth folder not found", str(gt))
    if not gt.is_dir():
        raise InputError("--gt must be a folder of cases", str(gt))
    preds = find_predictions(pred_dir)
    if cases:
        wanted = list(dict.fromkeys(cases))
        have = {p.case: p for p in preds}
        missing = [c for c in wanted if c not in have]
        if missing:
            raise InputError(
                f"no prediction for case(s) {', '.join(missing)} (expected {Path(pred_dir) / (missing[0] + LESIONS_TAG + '.nii.gz')})",
                str(pred_dir),
            )
        preds = [have[c] for c in wanted]
    for p in preds:
        p.label = find_label(gt, p)
    used = {p.label.resolve() for p in preds}
    unpredicted = sorted(c for c, path in list_ground_truth(gt).items() if path.resolve() not in used)
    if cases:
        unpredicted = []
    return preds, unpredicted


# --------------------------------------------------------------------------------- reading
def _read_volume(path: Path, what: str) -> sitk.Image:
    try:
        img = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        raise InputError(f"cannot read {what}: {lines[-1][:200] if lines else 'unreadable'}", str(path)) from None
    if img.GetDimension() != 3 or img.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"{what} must be a single-channel 3D image, not {img.GetDimension()}D with {img.GetNumberOfComponentsPerPixel()} component(s)", str(path))
    return img


def _grid_text(img: sitk.Image) -> str:
    r = lambda v: tuple(round(x, 3) for x in v)  # noqa: E731
    return f"size {img.GetSize()}, spacing {r(img.GetSpacing())}, origin {r(img.GetOrigin())}"


def read_table(path: Path) -> dict[int, dict[str, float]]:
    """``lesion_id -> {confidence, mean_probability, n_voxels?}`` from a segment CSV."""
    try:
        with open(path, newline="") as fh:
            reader = csv.DictReader(fh)
            columns = reader.fieldnames or []
            need = ["lesion_id", *SCORES]
            lacking = [c for c in need if c not in columns]
            if lacking:
                raise InputError(f"lesion table lacks column(s) {', '.join(lacking)} (has {', '.join(columns) or 'none'})", str(path))
            rows: dict[int, dict[str, float]] = {}
            for line, row in enumerate(reader, start=2):
                try:
                    lid = int(row["lesion_id"])
                    rec = {s: float(row[s]) for s in SCORES}
                    if row.get("n_voxels") not in (None, ""):
                        rec["n_voxels"] = int(float(row["n_voxels"]))
                except (TypeError, ValueError):
                    raise InputError(f"line {line}: non-numeric lesion_id/confidence/mean_probability", str(path)) from None
                for s in SCORES:
                    if not (math.isfinite(rec[s]) and 0.0 <= rec[s] <= 1.0):
                        raise InputError(f"line {line}: {s} {rec[s]} is not a probability in [0, 1]", str(path))
                if lid < 1:
                    raise InputError(f"line {line}: lesion_id {lid} must be >= 1", str(path))
                if lid in rows:
                    raise InputError(f"line {line}: lesion_id {lid} appears twice", str(path))
                rows[lid] = rec
    except OSError as exc:
        raise InputError(f"cannot read lesion table: {exc.strerror or exc}", str(path)) from None
    return rows


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


def dice_score(pred_mask: np.ndarray, gt_mask: np.ndarray) -> float:
    """Dice of two binary volumes with MONAI's DiceMetric (1.0 when both are empty)."""
    import torch
    from monai.metrics import DiceMetric

    metric = DiceMetric(include_background=True, reduction="none", ignore_empty=False)
    p = torch.from_numpy(np.ascontiguousarray(pred_mask, dtype=np.uint8))[None, None]
    g = torch.from_numpy(np.ascontiguousarray(gt_mask, dtype=np.uint8))[None, None]
    return float(metric(y_pred=p, y=g).reshape(-1)[0])


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


# ------------------------------------------------------------------------------ aggregate
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
    """ECE (count-weighted, ``n_bins`` equal-width bins on [0, 1]) and the reliability-diagram bins."""
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
def _fmt(v, digits: int = 3) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _rate_label(r: float) -> str:
    return f"1/{int(round(1 / r))}" if r < 1 else f"{r:g}"


def plot_froc(report: dict, path: str | Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    fig = Figure(figsize=(6.4, 4.8), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    rates = np.geomspace(FROC_FP_RATES[0] / 1.5, FROC_FP_RATES[-1] * 1.5, 200)
    styles = {"confidence": ("tab:blue", "-", "o"), "mean_probability": ("tab:orange", "--", "s")}
    handles = []
    for s in SCORES:
        fr = report["detection"]["froc"].get(s)
        if not fr:
            continue
        color, ls, marker = styles[s]
        ax.plot(rates, _sensitivity_curve(fr, rates), color=color, ls=ls, lw=1.8)
        ax.plot(fr["fp_rates"], fr["sensitivity"], color=color, ls="none", marker=marker)
        handles.append(Line2D([], [], color=color, ls=ls, marker=marker, label=f"{SCORE_LABELS[s]}: CPM {fr['cpm']:.3f}"))
    ax.set_xscale("log", base=2)
    ax.set_xticks(FROC_FP_RATES)
    ax.set_xticklabels([_rate_label(r) for r in FROC_FP_RATES])
    ax.set_xlim(rates[0], rates[-1])
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("false positives per case")
    ax.set_ylabel("lesion sensitivity")
    d = report["detection"]
    ax.set_title(f"FROC: {d['n_cases']} case(s), {d['n_gt_lesions']} lesion(s), {d['n_clusters']} cluster(s)")
    ax.grid(True, which="both", alpha=0.3)
    if handles:
        ax.legend(handles=handles, loc="best", fontsize=8)
    else:
        ax.text(0.5, 0.5, "no ground-truth lesions: FROC undefined", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    fig.savefig(str(path))


def plot_reliability(report: dict, path: str | Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 6.4), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_axes([0.12, 0.36, 0.83, 0.56])
    hx = fig.add_axes([0.12, 0.08, 0.83, 0.2], sharex=ax)
    ax.plot([0, 1], [0, 1], color="0.5", ls=":", lw=1, label="perfect calibration")
    styles = {"confidence": ("tab:blue", "-", "o", -0.02), "mean_probability": ("tab:orange", "--", "s", 0.02)}
    n_bins = ECE_BINS
    for s in SCORES:
        cal = report["calibration"].get(s)
        if not cal:
            continue
        color, ls, marker, dx = styles[s]
        n_bins = cal["n_bins"]
        xs = [b["mean_score"] for b in cal["bins"] if b["count"]]
        ys = [b["fraction_tp"] for b in cal["bins"] if b["count"]]
        ax.plot(xs, ys, color=color, ls=ls, marker=marker, label=f"{SCORE_LABELS[s]}: ECE {cal['ece']:.3f}")
        centers = [(b["lo"] + b["hi"]) / 2 + dx for b in cal["bins"]]
        hx.bar(centers, [b["count"] for b in cal["bins"]], width=0.8 / n_bins / 2, color=color, alpha=0.8)
    ax.set_xlim(0, 1)
    ax.set_ylim(-0.02, 1.02)
    ax.set_ylabel("fraction of clusters that are true positives")
    ax.set_title(f"Reliability ({n_bins} bins, {report['detection']['n_clusters']} clusters)")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    ax.tick_params(labelbottom=False)
    hx.set_xlabel("score (bin mean)")
    hx.set_ylabel("clusters")
    hx.grid(True, alpha=0.3)
    fig.savefig(str(path))


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
    if report["dice_threshold"] is not None:
        lines.append(f"- Dice uses lesions with confidence >= {report['dice_threshold']:g}")
    lines += [
        "",
        "## Summary",
        "",
        "| metric | confidence (ours) | mean probability (baseline) |",
        "| --- | --- | --- |",
        f"| Dice, mean per case | {_fmt(s['dice_mean'])} | |",
        f"| Dice, global (all voxels pooled) | {_fmt(s['dice_global'])} | |",
        f"| sensitivity at 0.5 FP/case | {_fmt(s['sensitivity_at_0.5fp'])} | {_fmt(s['sensitivity_at_0.5fp_mean_probability'])} |",
        f"| CPM (mean sensitivity at 1/8..8 FP/case) | {_fmt(s['cpm'])} | {_fmt(s['cpm_mean_probability'])} |",
        f"| cluster AUC (TP vs FP clusters) | {_fmt(s['cluster_auc'])} | {_fmt(s['cluster_auc_mean_probability'])} |",
        f"| ECE ({ECE_BINS} bins) | {_fmt(s['ece'])} | {_fmt(s['ece_mean_probability'])} |",
        "",
        f"Detections {d['n_detected']} of {d['n_gt_lesions']} lesions (max sensitivity {_fmt(s['max_sensitivity'])}), "
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
            lines.append(f"| {b['lo']:.1f}-{b['hi']:.1f} | {b['count']} | {_fmt(b['mean_score'])} | {_fmt(b['fraction_tp'])} |")
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
    from .io import AtomicWriter

    out = Path(outdir)
    with AtomicWriter(out) as w:
        p = w.path("report.json")
        Path(p).write_text(json.dumps(_json_safe(report), indent=2, allow_nan=False) + "\n")
        p = w.path("report.md")
        Path(p).write_text(report_markdown(report))
        plot_froc(report, w.path("froc.png"))
        plot_reliability(report, w.path("reliability.png"))
    return [out / n for n in REPORT_FILES]


# --------------------------------------------------------------------------------------- CLI
def _case_list(args) -> list[str] | None:
    names: list[str] = []
    if getattr(args, "split", None):
        from . import data

        names += list(data.STS_VAL if args.split == "val" else data.STS_TRAIN)
    for item in getattr(args, "cases", None) or []:
        names += [c for c in item.split(",") if c]
    return names or None


def cmd_evaluate(args) -> int:
    outdir = Path(args.output) if args.output else Path(args.pred) / "evaluation"
    try:
        report = evaluate(args.pred, args.gt, cases=_case_list(args), dice_threshold=args.dice_threshold)
        files = write_report(report, outdir)
    except LesionSegError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    s = report["summary"]
    print(
        f"{s['n_cases']} case(s), {s['n_gt_lesions']} lesion(s), {s['n_clusters']} cluster(s): "
        f"Dice {_fmt(s['dice_mean'])} (global {_fmt(s['dice_global'])}), "
        f"sensitivity@0.5FP {_fmt(s['sensitivity_at_0.5fp'])}, CPM {_fmt(s['cpm'])}, "
        f"cluster AUC {_fmt(s['cluster_auc'])} (mean probability {_fmt(s['cluster_auc_mean_probability'])}), "
        f"ECE {_fmt(s['ece'])}"
    )
    for n in report["notes"]:
        print(f"note: {n}", file=sys.stderr)
    print(f"report: {', '.join(str(f) for f in files)}")
    return 0


def register_cli(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "evaluate",
        help="Dice, FROC, cluster AUC and calibration of segment outputs against ground truth",
        description=(
            "Evaluate `lesionseg segment` outputs against ground-truth labels and write report.json, report.md, "
            "froc.png and reliability.png. " + MATCHING_RULE
        ),
    )
    p.add_argument("--pred", required=True, metavar="OUTDIR", help="folder written by `lesionseg segment` (<case>_lesions.nii.gz + .csv)")
    p.add_argument("--gt", required=True, metavar="GTDIR", help="ground truth: <case>/label.nii.gz folders or flat <case>_label/_lesions files")
    p.add_argument("-o", "--output", default=None, metavar="REPORTDIR", help="where to write the report (default: OUTDIR/evaluation)")
    p.add_argument("--cases", nargs="+", default=None, metavar="CASE", help="evaluate only these cases (names or comma lists); each must exist")
    p.add_argument("--split", choices=["val", "train"], default=None, help="evaluate the fixed STS validation (STS_034-041) or training split")
    p.add_argument(
        "--dice-threshold", type=float, default=None, metavar="T",
        help="Dice over lesions with confidence >= T only (default: every lesion in the labelmap)",
    )
    p.set_defaults(func=cmd_evaluate)
    return p


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="lesionseg")
    register_cli(ap.add_subparsers(dest="command", required=True))
    args = ap.parse_args(["evaluate", *(sys.argv[1:] if argv is None else argv)])
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())

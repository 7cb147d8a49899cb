"""Pairing ``lesionseg segment`` outputs with their ground-truth labels, and reading them."""
from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import SimpleITK as sitk

from ..errors import InputError
from ..io.images import GENERIC_STEMS, IMAGE_SUFFIXES

#: CSV columns that are ranked / calibrated: our confidence and the mean-probability baseline
SCORES = ("confidence", "mean_probability")
SCORE_LABELS = {"confidence": "confidence (CLCS classifier)", "mean_probability": "mean probability (baseline)"}
LESIONS_TAG = "_lesions"
GT_TAGS = ("_label", "_lesions", "_seg", "_mask", "_gt")


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
        if p.label.resolve() == Path(p.labelmap).resolve():  # --gt is the prediction folder: every case scores 1.0
            raise InputError(f"the ground truth found for case {p.case!r} is its own prediction ({p.label}): give the "
                             "folder of the reference labels as --gt, not the segment output folder", str(gt))
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
        raise InputError(f"{what} must be a single-channel 3D image, not {img.GetDimension()}D with "
                         f"{img.GetNumberOfComponentsPerPixel()} component(s)", str(path))
    return img


def _grid_text(img: sitk.Image) -> str:
    r = lambda v: tuple(round(x, 3) for x in v)  # noqa: E731
    return f"size {img.GetSize()}, spacing {r(img.GetSpacing())}, origin {r(img.GetOrigin())}, direction {r(img.GetDirection())}"


def read_table(path: Path) -> dict[int, dict[str, float]]:
    """``lesion_id -> {confidence, mean_probability, n_voxels?}`` from a segment CSV."""
    try:
        with open(path, newline="", encoding="utf-8") as fh:
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

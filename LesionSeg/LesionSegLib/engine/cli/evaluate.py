"""``lesionseg evaluate``: Dice, FROC, cluster AUC and calibration of segment outputs."""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from .. import data
from ..errors import LesionSegError
from ..evaluate.report import MATCHING_RULE, evaluate, format_cell, write_report
from .common import one_line, output_problem, unit_interval


def _case_list(args) -> list[str] | None:
    names: list[str] = []
    if getattr(args, "split", None):
        names += list(data.STS_VAL if args.split == "val" else data.STS_TRAIN)
    for item in getattr(args, "cases", None) or []:
        names += [c for c in item.split(",") if c]
    return names or None


def cmd_evaluate(args) -> int:
    outdir = Path(args.output) if args.output else Path(args.pred) / "evaluation"
    try:
        report = evaluate(args.pred, args.gt, cases=_case_list(args), dice_threshold=args.dice_threshold)
        if getattr(args, "argv", None) is not None:  # what made this report (the README cites it beside each figure)
            report = {"command": "lesionseg " + shlex.join(args.argv), **report}
    except LesionSegError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    problem = output_problem(outdir)
    try:
        if problem:
            raise LesionSegError(problem)
        files = write_report(report, outdir)
    except (LesionSegError, OSError) as exc:
        print(f"error: the report was not written: {one_line(exc)}", file=sys.stderr)
        return 2
    s = report["summary"]
    print(
        f"{s['n_cases']} case(s), {s['n_gt_lesions']} lesion(s), {s['n_clusters']} cluster(s): "
        f"Dice {format_cell(s['dice_mean'])} (global {format_cell(s['dice_global'])}), "
        f"sensitivity@0.5FP {format_cell(s['sensitivity_at_0.5fp'])}, CPM {format_cell(s['cpm'])}, "
        f"cluster AUC {format_cell(s['cluster_auc'])} (mean probability {format_cell(s['cluster_auc_mean_probability'])}), "
        f"ECE {format_cell(s['ece'])}"
    )
    for n in report["notes"]:
        print(f"note: {n}", file=sys.stderr)
    print(f"report: {', '.join(str(f) for f in files)}")
    return 0


def register(subparsers) -> argparse.ArgumentParser:
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
    which = p.add_mutually_exclusive_group()
    which.add_argument("--cases", nargs="+", default=None, metavar="CASE", help="evaluate only these cases (names or comma lists); each must exist")
    which.add_argument("--split", choices=["val", "train"], default=None,
                       help="evaluate the fixed STS validation (STS_034-041) or training split; every case of it must exist")
    p.add_argument(
        "--dice-threshold", type=unit_interval, default=None, metavar="T",
        help="Dice over lesions with confidence >= T only (default: every lesion in the labelmap)",
    )
    p.set_defaults(func=cmd_evaluate)
    return p


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="lesionseg")
    register(ap.add_subparsers(dest="command", required=True))
    args = ap.parse_args(["evaluate", *(sys.argv[1:] if argv is None else argv)])
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())

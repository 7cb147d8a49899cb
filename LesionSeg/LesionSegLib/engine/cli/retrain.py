"""``lesionseg retrain``: retrain the confidence classifier from review feedback (+ ground truth)."""
from __future__ import annotations

import json
import sys

from ..errors import LesionSegError
from ..learn.labels import MIN_LABELS, MIN_PER_CLASS
from ..learn.retrain import retrain
from ..learn.validation import DEFAULT_FOLDS
from .common import Progress, emit, unit_interval


def _cmd_retrain(args) -> int:
    bar = Progress(args.progress, "retrain")
    try:
        res = retrain(
            args.feedback, args.base_model, args.include_gt, args.output, gt_cases=args.gt_cases,
            gt_prob_thresholds=args.gt_prob_threshold,
            model_ids=args.only_model, all_models=args.all_models, mode=args.mode, folds=args.folds, epochs=args.epochs, seed=args.seed,
            min_labels=args.min_labels, min_per_class=args.min_per_class, activate=args.activate,
            progress=bar if args.progress != "none" else None,
        )
    except (LesionSegError, OSError) as exc:  # one line, never a traceback
        bar.close()
        emit(args, {"event": "error", "message": str(exc)})
        print(f"error: {exc}", file=sys.stderr)
        return 2
    bar.close()
    if args.progress == "json":
        print(json.dumps({"event": "done", "model": res.card.id, "folder": str(res.card.folder),
                          "metrics": res.metrics, "labels": res.label_counts, "seconds": round(res.seconds, 2)}), flush=True)
    else:
        print(res.summary())
    return 0


def register(subparsers) -> None:
    """``lesionseg retrain``."""
    p = subparsers.add_parser("retrain", help="retrain the confidence classifier from review feedback (+ ground truth)")
    p.add_argument("--feedback", default=None, help="feedback database (e.g. ~/.lesionseg/feedback.db)")
    p.add_argument("--base-model", default=None, help="model whose classifier is retrained (default: the active model)")
    p.add_argument("--include-gt", default=None, metavar="DIR", help="add labels from DIR/<case>/image.nii.gz + label.nii.gz")
    p.add_argument("--gt-cases", nargs="*", default=None, help="only these case folders of --include-gt")
    p.add_argument("--gt-prob-threshold", type=unit_interval, nargs="+", default=None, metavar="T",
                   help="probability thresholds forming the ground-truth candidates (default: the model's; "
                        "e.g. 0.5 0.3 adds low-probability false positives, as the original classifier training does)")
    p.add_argument("-o", "--output", default=None, metavar="NEW_MODEL",
                   help="name, name@version or folder of the new model (default: base name, next version)")
    p.add_argument("--only-model", action="append", default=None, help="use only decisions made with this model id (repeatable)")
    p.add_argument("--all-models", action="store_true",
                   help="use decisions made with any model (default: only models sharing the base model's segmenter)")
    p.add_argument("--mode", choices=["head", "full"], default="head", help="head: frozen patch encoder (fast); full: whole network")
    p.add_argument("--folds", type=int, default=DEFAULT_FOLDS, help="cross-validation folds (grouped by patient)")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--min-labels", type=int, default=MIN_LABELS)
    p.add_argument("--min-per-class", type=int, default=MIN_PER_CLASS)
    p.add_argument("--activate", action="store_true", help="make the new version the active model")
    p.add_argument("--progress", choices=["bar", "json", "none"], default="bar")
    p.set_defaults(func=_cmd_retrain)

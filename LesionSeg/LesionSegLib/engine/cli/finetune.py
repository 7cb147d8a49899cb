"""``lesionseg finetune``: fine-tune the segmenter on reviewers' corrections (+ ``fit-ood``)."""
from __future__ import annotations

import json
import sys

from ..errors import CancelledError, ModelError
from ..feedback import FeedbackStoreError
from ..learn import ood_fit
from ..learn.finetune import (DEFAULT_LOSS, DEFAULT_LR, DEFAULT_LUNG_NEGATIVES, DEFAULT_STEPS, FINETUNE_LOSSES, MIN_CASES,
                              FinetuneError, finetune)
from ..learn.labels import RetrainError
from .common import Progress, emit


def replay_names(text: str | None) -> list[str] | None:
    """``--replay-cases``: None (the base training split), [] for "none", else the comma-separated names."""
    if text is None or not text.strip():
        return None
    names = [n.strip() for n in text.split(",") if n.strip()]
    return [] if [n.lower() for n in names] == ["none"] else names


def _cmd_finetune(args) -> int:
    bar = Progress(args.progress, "finetune")
    try:
        res = finetune(args.feedback, args.base_model, args.output, steps=args.steps, minutes=args.minutes, lr=args.lr,
                       replay=args.replay, replay_cases=replay_names(args.replay_cases),
                       cls_replay_cases=args.cls_replay_cases, held_apart=args.held_apart, min_cases=args.min_cases, seed=args.seed,
                       activate=args.activate, synthetic=args.synthetic_lesions, lung_negatives=args.lung_negatives,
                       routing={"auto": None, "on": True, "off": False}[args.routing], decoder_lr_mult=args.decoder_lr_mult,
                       loss=args.loss, progress=bar if args.progress != "none" else None)
    except (FinetuneError, RetrainError, FeedbackStoreError, ModelError, CancelledError) as exc:
        emit(args, {"event": "error", "message": str(exc)})
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        bar.close()
    done = {"event": "done", "model": res.card.id, "folder": str(res.card.folder),
            "metrics": res.card.data["metrics"], "seconds": round(res.seconds, 2),
            "routing": {k: v for k, v in (res.card.data.get("routing") or {}).items() if k in ("enabled", "parent", "via", "gives_up")}}
    print(json.dumps(done) if args.progress == "json" else res.summary(), flush=True)
    return 0


def register(subparsers) -> None:
    """``lesionseg finetune`` and ``lesionseg fit-ood``."""
    p = subparsers.add_parser("finetune", help="fine-tune the segmenter on the corrections in a feedback database")
    p.add_argument("--feedback", required=True, help="feedback database holding corrections")
    p.add_argument("--base-model", default=None, help="model whose segmenter is fine-tuned (default: the active one)")
    p.add_argument("-o", "--output", default=None, metavar="NEW_MODEL", help="new model: name, name@version or folder "
                   "(default: the base model's name, next version)")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="training steps (batch of 2)")
    p.add_argument("--minutes", type=float, default=None, help="wall-clock budget of the training loop")
    p.add_argument("--lr", type=float, default=DEFAULT_LR, help="peak learning rate (AdamW, cosine decay)")
    p.add_argument("--decoder-lr-mult", type=float, default=1.0, metavar="M",
                   help="the decoder (up-sampling blocks and output heads) learns at M times --lr (default 1)")
    p.add_argument("--loss", choices=FINETUNE_LOSSES, default=DEFAULT_LOSS,
                   help="lesion-balanced (default): class-balanced CE + focal Tversky on the corrected patches that hold a "
                        "lesion (learns a new domain's lesions, which DiceCE barely moves), DiceCE on replay and lesion-free "
                        "patches; dicece: the base training's DiceCE on every patch (use a lower --lr, e.g. 1e-4)")
    p.add_argument("--replay", type=float, default=0.5, help="fraction of each batch from the base training data")
    p.add_argument("--replay-cases", default=None, metavar="NAMES", help="comma-separated cases of the data folder "
                   "replayed (default: the base training split STS_001-033; 'none': no replay)")
    p.add_argument("--cls-replay-cases", type=int, default=6, help="replay cases whose clusters also retrain the classifier")
    p.add_argument("--synthetic-lesions", type=float, default=0.0, metavar="P",
                   help="fraction of the corrected-case patches that get one synthetic lesion inserted in lung tissue "
                        "(corrected cases with lung only; default 0: real corrections only)")
    p.add_argument("--lung-negatives", type=float, default=DEFAULT_LUNG_NEGATIVES, metavar="Q",
                   help="with --synthetic-lesions: fraction of those lung patches left without a synthetic lesion, so the "
                        f"segmenter also learns lesion-free lung as background (default {DEFAULT_LUNG_NEGATIVES:g})")
    p.add_argument("--routing", choices=["auto", "on", "off"], default="auto",
                   help="keep the base model for scans of its own domain (auto: when every corrected case lies outside it); "
                        "when the base model itself routes, the model it routes to (the shipped one) is kept instead")
    p.add_argument("--held-apart", type=int, default=None, help="corrected cases kept out for before/after figures")
    p.add_argument("--min-cases", type=int, default=MIN_CASES)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--activate", action="store_true", help="make the new version the active model")
    p.add_argument("--progress", choices=["bar", "json", "none"], default="bar")
    p.set_defaults(func=_cmd_finetune)
    ood_fit.register(subparsers)

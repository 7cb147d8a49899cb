"""``lesionseg`` command line: one module per command.

    lesionseg segment INPUT... -o OUTDIR [--model NAME] [--device auto|cpu|cuda] [--threshold T]
    lesionseg click IMAGE --point X,Y,Z [--point ...] -o OUTDIR [--model NAME]
    lesionseg evaluate --pred OUTDIR --gt GTDIR [-o REPORTDIR]
    lesionseg retrain --feedback DB [--base-model NAME] [--include-gt DIR] [-o NEW_MODEL]
    lesionseg train-seg --images DIR -o OUTDIR
    lesionseg train-detseg -o MODEL_DIR [--parallel]
    lesionseg feedback stats|export|import|check
    lesionseg models list|activate|rollback|history
"""
from __future__ import annotations

import argparse
import importlib
import sys

#: the command modules of this package; each has ``register(subparsers)``
COMMANDS = ("segment", "click", "evaluate", "retrain", "train_seg", "train_detseg", "feedback", "models")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="lesionseg", description="CT lesion segmentation with per-lesion confidence")
    sub = ap.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        importlib.import_module(f"{__name__}.{name}").register(sub)
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())

"""``lesionseg`` command line: one module per command.

    lesionseg segment INPUT... -o OUTDIR [--model NAME] [--device auto|cpu|cuda] [--threshold T]
    lesionseg click IMAGE --point X,Y,Z [--point ...] -o OUTDIR [--model NAME]
    lesionseg evaluate --pred OUTDIR --gt GTDIR [-o REPORTDIR]
    lesionseg retrain --feedback DB [--base-model NAME] [--include-gt DIR] [-o NEW_MODEL]
    lesionseg batch MANIFEST_OR_DIR -o OUTDIR [--address ray://HOST:PORT|auto|local] [--num-workers N]
    lesionseg train-seg --images DIR -o OUTDIR [--nproc N]
    lesionseg click IMAGE --point=X,Y,Z [--point=...] -o OUTDIR [--model NAME]
    lesionseg train-detseg -o MODEL_DIR [--no-parallel]
    lesionseg train-gate -o GATE_DIR
    lesionseg feedback stats|export|import|check
    lesionseg models list|activate|rollback|history|export
    lesionseg finetune --feedback DB [--base-model NAME] [-o NEW_MODEL]
    lesionseg fit-ood [--model NAME]
"""
from __future__ import annotations

import argparse
import importlib
import sys

#: the command modules of this package; each has ``register(subparsers)``
COMMANDS = ("segment", "click", "batch", "evaluate", "retrain", "train_seg", "train_detseg", "train_gate", "feedback", "models", "finetune")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="lesionseg", description="CT lesion segmentation with per-lesion confidence")
    sub = ap.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        importlib.import_module(f"{__name__}.{name}").register(sub)
    return ap


def _exit_on_sigterm() -> None:
    """A terminated command unwinds as on Ctrl-C (temporary files and uncommitted outputs are
    removed by their context managers) instead of dying where it stands."""
    import signal
    import threading

    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


def main(argv=None) -> int:
    """Run one command.  Errors a command does not report itself still end in one ``error:``
    line (exit code 1), never a traceback."""
    from ..errors import LesionSegError
    from .common import one_line

    try:  # importing the commands takes a moment: Ctrl-C then is "interrupted" too, not a traceback
        args = build_parser().parse_args(argv)
        args.argv = list(sys.argv[1:] if argv is None else argv)  # the command as given, for the records it writes
        _exit_on_sigterm()
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (LesionSegError, OSError, MemoryError) as exc:
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

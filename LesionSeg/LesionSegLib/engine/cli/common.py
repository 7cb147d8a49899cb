"""What every ``lesionseg`` command shares: progress reporting, machine-readable events, option
types that refuse a bad value up front, the output-folder check (:func:`..atomic.output_problem`)
and the one-line error text."""
from __future__ import annotations

import argparse
import json
import math
import sys

from ..atomic import output_problem  # noqa: F401  (the commands' output-folder check, re-exported)


class Progress:
    """Progress reporting: a tqdm bar, JSON lines on stdout, or nothing."""

    def __init__(self, mode: str, label: str):
        self.mode = mode
        self.label = label
        self.bar = None
        if mode == "bar":
            from tqdm import tqdm

            self.bar = tqdm(total=100, desc=label, unit="%", file=sys.stderr, leave=False, bar_format="{desc}: {percentage:3.0f}%|{bar}| {postfix}")

    def __call__(self, fraction: float, stage: str) -> None:
        if self.mode == "json":
            print(json.dumps({"event": "progress", "fraction": round(fraction, 4), "stage": stage, "input": self.label}), flush=True)
        elif self.bar is not None:
            self.bar.n = int(round(fraction * 100))
            self.bar.set_postfix_str(stage, refresh=False)
            self.bar.refresh()

    def close(self):
        if self.bar is not None:
            self.bar.close()


def emit(args, obj) -> None:
    if getattr(args, "progress", None) == "json":
        print(json.dumps(obj), flush=True)


# ------------------------------------------------------------------------------ option types
def unit_interval(text: str) -> float:
    """argparse type: a number in [0, 1] (a confidence or Dice threshold)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (math.isfinite(value) and 0.0 <= value <= 1.0):
        raise argparse.ArgumentTypeError(f"{text} is not within [0, 1]")
    return value


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (threads, workers)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not >= 1")
    return value


# ------------------------------------------------------------------------------ errors
def one_line(exc: BaseException) -> str:
    """An exception as one line for ``error:``; an OSError as 'what: file', without its errno."""
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.strerror}: {exc.filename}" if exc.filename else exc.strerror
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def error_line(exc: BaseException, path) -> str:
    """The one-line error for a failed input (segment, click, batch), naming it."""
    msg = one_line(exc)
    return msg if str(path) in msg else f"{path}: {msg}"

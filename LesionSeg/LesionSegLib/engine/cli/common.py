"""What every ``lesionseg`` command shares: progress reporting, machine-readable events, option
types that refuse a bad value up front, the output-folder check and the one-line error text."""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
from pathlib import Path


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


# ------------------------------------------------------------------------------ output folder and errors
def output_problem(folder) -> str | None:
    """Why ``folder`` cannot take outputs (it is a file, or it or the folder it would be made in
    cannot be written), or None.  Nothing is created: a refused command leaves no folder behind.
    Commands check it before loading a model or training, so a wrong ``-o`` costs nothing and
    is not blamed on an input."""
    path = Path(folder)
    if path.exists() and not path.is_dir():
        return f"output folder {path} is a file, not a folder"
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return f"output folder {path} cannot be made: {existing} is a file, not a folder"
    try:
        fd, probe = tempfile.mkstemp(prefix=".lesionseg-probe-", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        where = "" if existing == path else f" (in {existing})"
        return f"output folder {path} cannot be written{where}: {exc.strerror or exc}"
    return None


def one_line(exc: BaseException) -> str:
    """An exception as one line for ``error:``; an OSError as 'what: file', without its errno."""
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.strerror}: {exc.filename}" if exc.filename else exc.strerror
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__

"""What every ``lesionseg`` command shares: progress reporting and machine-readable events."""
from __future__ import annotations

import json
import sys


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

"""Two model versions, the whole ``lesionseg segment`` command each, in turns on one scan: is one slower?

    python Testing/benchmarks/ab_versions.py --a runs/v110/LesionSeg/LesionSegLib/models/sts-clcs --b sts-clcs \\
        -o Resources/evaluation/ab_sts-clcs_1.1.0_1.2.0.json

Each round runs A then B as fresh processes on the same scan (default ``fullscan/lung1``); the first
round only warms the caches (ONNX exports, file cache) and is not counted.  Run in turns, so a
machine that slows down or speeds up between runs slows both alike; ``bench_segment.py`` compares a
version with the fixed yardstick, this compares two versions with each other.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--a", required=True, help="model A (name, name@version or folder)")
    ap.add_argument("--b", required=True, help="model B")
    ap.add_argument("--case", default="fullscan/lung1", help="scan under $LESIONSEG_DATA (its image.nii.gz)")
    ap.add_argument("--rounds", type=int, default=4, help="rounds, the first one not counted")
    ap.add_argument("-o", "--out", required=True)
    args = ap.parse_args(argv)
    sys.path.insert(0, str(REPO / "LesionSeg"))
    from LesionSegLib.engine import data as dataset
    from LesionSegLib.engine.models import get_card

    image = dataset.data_root() / args.case / "image.nii.gz"
    exe = [sys.executable, "-m", "LesionSegLib.engine.cli", "segment"]
    ids = {k: get_card(m).id for k, m in (("a", args.a), ("b", args.b))}
    times = {"a": [], "b": []}
    load = os.getloadavg()
    with tempfile.TemporaryDirectory() as work:
        for r in range(args.rounds):
            for k, m in (("a", args.a), ("b", args.b)):
                t0 = time.perf_counter()
                subprocess.run(exe + [str(image), "-o", f"{work}/{k}", "--model", m, "--progress", "none"],
                               check=True, capture_output=True)
                if r:
                    times[k].append(round(time.perf_counter() - t0, 3))
    out = {"command": f"python Testing/benchmarks/ab_versions.py --a {args.a} --b {args.b} -o {args.out}"
                      + ("" if args.case == "fullscan/lung1" else f" --case {args.case}"),
           "case": args.case, "load_average_at_start": [round(v, 2) for v in load],
           "load_average_at_end": [round(v, 2) for v in os.getloadavg()], "cpu_count": os.cpu_count(),
           **{k: {"model": ids[k], "median_s": statistics.median(v), "runs_s": v} for k, v in times.items()}}
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n", encoding="utf-8")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

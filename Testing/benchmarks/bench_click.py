"""Click-to-segment accuracy and time on the validation lesions (STS_034-041), from the Python API (any model).

    python Testing/benchmarks/bench_click.py --model sts-detseg -o Resources/evaluation/detseg/click.json

For every lesion (26-connected component of the label) of each validation case: one click at its
centre of mass (the voxel nearest to it inside the lesion when the centre falls outside), and one
at a random voxel inside it (seeded).  Dice of the click's label against that lesion; seconds per
click from ``click()`` (the image already in memory; the engine loaded once).  Timings on a shared
2-core CPU are upper bounds; the JSON names the machine, threads and load average.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np


def _split(data, cases) -> str:
    if cases == data.STS_VAL:
        return "validation STS_034-041 (never used for training)"
    if set(cases) <= set(data.STS_TRAIN):
        return "training cases (design choices)"
    return "cases outside the models' training data (" + ", ".join(cases) + ")"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="sts-detseg")
    ap.add_argument("--fallback-model", default=None, help="the model that answers a point where --model finds no lesion "
                    "(as lesionseg click; default none here)")
    ap.add_argument("-o", "--output", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cases", default=None, help="comma-separated cases (default: the validation split STS_034-041); "
                    "click-design choices are made on training cases, never on the reported split")
    args = ap.parse_args(argv)
    import SimpleITK as sitk
    import torch

    from LesionSegLib.engine import data
    from LesionSegLib.engine.click import centre_click, click
    from LesionSegLib.engine.errors import InputError
    from LesionSegLib.engine.evaluate.matching import gt_components
    from LesionSegLib.engine.segment.pipeline import Engine

    torch.set_num_threads(args.threads)
    engine = Engine(args.model, device="cpu")
    fallback = Engine(args.fallback_model, device="cpu") if args.fallback_model else None
    rng = np.random.default_rng(args.seed)
    rows = []
    cases = args.cases.split(",") if args.cases else data.STS_VAL
    for name in cases:
        case = data.case(name)
        img = sitk.ReadImage(str(case.image))
        comps, n = gt_components(sitk.GetArrayFromImage(sitk.ReadImage(str(case.label))))
        for k in range(1, n + 1):
            lesion = comps == k
            pts = np.argwhere(lesion)
            for kind, zyx in (("centre", centre_click(pts)), ("random", pts[rng.integers(len(pts))])):
                p = img.TransformContinuousIndexToPhysicalPoint([float(v) for v in zyx[::-1]])
                t = time.perf_counter()
                try:
                    res = click(engine, img, [p], fallback=fallback)
                    mask = res.labelmap == 1
                    dice = float(2 * (mask & lesion).sum() / (mask.sum() + lesion.sum()))
                    err = None
                except InputError as exc:
                    dice, err = 0.0, str(exc)
                rows.append({"case": name, "lesion": k, "click": kind, "dice": round(dice, 4),
                             "answered_by": None if err else res.model_id,
                             "seconds": round(time.perf_counter() - t, 3), "lesion_ml": round(float(lesion.sum() * np.prod(img.GetSpacing()) / 1000), 2),
                             "error": err})
                print(json.dumps(rows[-1]), flush=True)
    summary = {kind: {"mean_dice": round(float(np.mean([r["dice"] for r in rows if r["click"] == kind])), 4),
                      "mean_seconds": round(float(np.mean([r["seconds"] for r in rows if r["click"] == kind])), 3),
                      "max_seconds": round(float(np.max([r["seconds"] for r in rows if r["click"] == kind])), 3)}
               for kind in ("centre", "random")}
    summary["all"] = {"mean_dice": round(float(np.mean([r["dice"] for r in rows])), 4)}
    out = {"command": "python Testing/benchmarks/bench_click.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "model": engine.card.id, "fallback_model": fallback.card.id if fallback else None, "cases": cases,
           "split": _split(data, cases),
           "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores", "threads": args.threads,
           "load_average_at_end": os.getloadavg(), "targets": {"mean_dice": 0.80, "seconds_per_click": 1.5},
           "summary": summary, "clicks": rows}
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The RoI segmenter alone, given the true boxes: how much of DetSeg3D's gap is stage 2, how much the detector.

    python Testing/benchmarks/detseg_roi_oracle.py --model sts-detseg -o Resources/evaluation/detseg/roi_oracle.json

For each lesion (26-connected component of the label) of the validation cases STS_034-041: its
true box goes through the engine's own stage 2 (``segment_boxes``: RoI with context, RoI
segmenter, probability pasted back onto the canonical grid), and the Dice of ``p >= 0.5``
against the lesion is taken inside the RoI's span.  No detector, no classifier, no threshold on
confidence.  The mean over lesions, set beside ``lesionseg evaluate``'s Dice of the whole model,
says how much the detector's boxes cost.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO / "LesionSeg")]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="sts-detseg", help="a detseg model name or folder")
    ap.add_argument("-o", "--output", required=True)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    import torch

    from LesionSegLib.engine import data
    from LesionSegLib.engine.atomic import write_text
    from LesionSegLib.engine.learn.train_detseg import Case
    from LesionSegLib.engine.segment.pipeline import Engine

    torch.set_num_threads(args.threads)
    engine = Engine(args.model, device="cpu")
    if not hasattr(engine, "segment_boxes"):
        raise SystemExit(f"error: {engine.card.id} is not a detseg model")
    rows = []
    for name in data.STS_VAL:
        case = Case(data.case(name))
        for k, box in enumerate(case.boxes, start=1):
            pasted = np.zeros(case.hu.shape, dtype=np.float32)
            roi = engine.segment_boxes(case.hu, case.spacing, [box], pasted)[0]  # stage 2 exactly as `segment` runs it
            a, b = roi.index_range(case.hu.shape)
            region = tuple(slice(int(u), int(v)) for u, v in zip(a, b))
            mask, gt = pasted[region] >= 0.5, case.label[region] > 0.5
            dice = float(2 * (mask & gt).sum() / max(1, mask.sum() + gt.sum()))
            rows.append({"case": name, "lesion": k, "box_size_mm": [round(float(v), 1) for v in box[3:]], "dice": round(dice, 4)})
            print(name, k, rows[-1]["dice"], flush=True)
    out = {"command": "python Testing/benchmarks/detseg_roi_oracle.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "model": engine.card.id, "split": "validation STS_034-041", "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores",
           "mean_dice": round(float(np.mean([r["dice"] for r in rows])), 4), "lesions": rows}
    write_text(args.output, json.dumps(out, indent=1) + "\n")
    print(json.dumps({k: out[k] for k in ("model", "mean_dice")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

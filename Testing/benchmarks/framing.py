"""How the shipped model answers when a validation scan is framed otherwise than its training crops.

    python Testing/benchmarks/framing.py -o Resources/evaluation/framing.json
    python Testing/benchmarks/framing.py -o Resources/evaluation/framing_sts-detseg.json --model LesionSeg/LesionSegLib/models/sts-detseg

The 33 training scans are IBSI crops, each centred on its tumour with about 5 cm around it, and
the segmenter never saw a scan without a tumour.  For each validation case STS_034-041 (never
fitted on), voxel-exact sub-volumes of the scan (no resampling) are segmented at the default
threshold and compared with the ground truth:

* ``crops``: the tumour's bounding box plus a margin of 40, 20 and 5 mm (clipped to the scan): Dice,
  volume, and the volume of the original scan's result;
* ``tumour_free``: each slab of whole slices at least 10 mm from the tumour and at least 12 slices
  thick, above and below it, when the scan has one (``engine.learn.tumour_free.tumour_free_slabs``): lesions shown (confidence >= the default
  threshold) and their highest confidence.  Every lesion there is false.

It measures a limit of the model (README, "What the model expects"); it tunes nothing.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO / "LesionSeg")]
VAL = [f"STS_{i:03d}" for i in range(34, 42)]
MARGINS_MM = (40.0, 20.0, 5.0)


def _dice(a: np.ndarray, b: np.ndarray) -> float | None:
    s = int(a.sum() + b.sum())
    return round(2.0 * float((a & b).sum()) / s, 4) if s else None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-o", "--out", required=True)
    ap.add_argument("--model", default=str(REPO / "LesionSeg" / "LesionSegLib" / "models" / "sts-clcs"))
    args = ap.parse_args(argv)
    import SimpleITK as sitk

    from LesionSegLib.engine import data as dataset
    from LesionSegLib.engine.io.images import read_image, read_label
    from LesionSegLib.engine.learn.tumour_free import crop, tumour_free_slabs
    from LesionSegLib.engine.segment.pipeline import Engine

    engine = Engine(args.model, device="cpu")
    t0 = time.perf_counter()
    default = ap.get_default("model")
    command = "python Testing/benchmarks/framing.py -o " + args.out + ("" if args.model == default else " --model " + args.model)
    out = {"command": command, "model": engine.card.id,
           "threshold": engine.default_threshold,
           "margins_mm": list(MARGINS_MM), "cases": {}}
    for name in VAL:
        case = dataset.case(name)
        img = read_image(case.image)
        gt = sitk.GetArrayFromImage(read_label(case.label, img)) > 0
        sp = np.array(img.GetSpacing())  # x y z
        zyx = np.argwhere(gt)
        lo_zyx, hi_zyx = zyx.min(0), zyx.max(0) + 1
        lo, hi, size = lo_zyx[::-1], hi_zyx[::-1], np.array(img.GetSize())
        whole = engine.segment(img)
        rec = {"gt_ml": round(float(gt.sum() * sp.prod()) / 1000, 2),
               "whole": {"lesions": len(whole.lesions), "dice": _dice(whole.labelmap > 0, gt),
                         "ml": round(sum(les.volume_ml for les in whole.lesions), 2)},
               "crops": {}, "tumour_free": {}}
        for m in MARGINS_MM:
            pad = np.ceil(m / sp).astype(int)
            clo, chi = np.maximum(lo - pad, 0), np.minimum(hi + pad, size)
            res = engine.segment(crop(img, clo, chi))
            sub = gt[clo[2]:chi[2], clo[1]:chi[1], clo[0]:chi[0]]
            rec["crops"][f"{m:g}mm"] = {"size_xyz": (chi - clo).tolist(), "lesions": len(res.lesions),
                                        "dice": _dice(res.labelmap > 0, sub),
                                        "ml": round(sum(les.volume_ml for les in res.lesions), 2)}
        for side, slab in tumour_free_slabs(img, gt).items():
            res = engine.segment(slab)
            rec["tumour_free"][side] = {"slices": int(slab.GetSize()[2]), "lesions": len(res.lesions),
                                        "max_confidence": round(max((les.confidence for les in res.lesions), default=0.0), 3),
                                        "scan_ood": round(float(res.ood["scan_score"]), 3) if res.ood else None}
        out["cases"][name] = rec
        print(name, json.dumps(rec), file=sys.stderr)
    cases = out["cases"].values()
    slabs = [s for c in cases for s in c["tumour_free"].values()]
    out["summary"] = {
        "whole_mean_dice": round(float(np.mean([c["whole"]["dice"] or 0 for c in cases])), 4),
        **{f"crop_{k}_mean_dice": round(float(np.mean([c["crops"][k]["dice"] or 0 for c in cases])), 4)
           for k in (f"{m:g}mm" for m in MARGINS_MM)},
        **{f"crop_{k}_found": sum(c["crops"][k]["lesions"] > 0 for c in cases) for k in (f"{m:g}mm" for m in MARGINS_MM)},
        "tumour_free_slabs": len(slabs),
        "tumour_free_slabs_with_a_false_lesion": sum(s["lesions"] > 0 for s in slabs),
        "tumour_free_false_lesions": sum(s["lesions"] for s in slabs),
        "tumour_free_max_confidence": max((s["max_confidence"] for s in slabs), default=None),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out["summary"], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

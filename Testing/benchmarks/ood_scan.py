"""Scan-level OOD score of the shipped model on the sarcoma validation scans and the chest scans.

    python Testing/benchmarks/ood_scan.py -o Resources/evaluation/ood_scan.json

No inference: the scan descriptor (``engine/segment/ood.py``) of each scan is scored against the
model card's OOD reference (fitted on STS_001-033 by ``lesionseg fit-ood``).  Reports every score
and the AUROC of chest (positive) vs STS_034-041 (negative), and which scans get the warning.

Regridding: each STS_034-041 scan is also resampled (linear, SimpleITK) to three clinical grids
(``REGRID``, x y z in mm) and scored again.  The image content is the same, so none of them may
change side of the warning threshold (``regridded.crossings`` lists any that do).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO / "LesionSeg")]
CHEST = ["lung1", "lung2", "LIDC-IDRI-0001"]
REGRID = [(1.0, 1.0, 2.5), (0.8, 0.8, 1.25), (0.7, 0.7, 5.0)]


def regrid(image, spacing_xyz):
    """``image`` linearly resampled onto ``spacing_xyz`` over the same extent (air outside)."""
    import SimpleITK as sitk

    size = [max(1, int(round(n * s / t))) for n, s, t in zip(image.GetSize(), image.GetSpacing(), spacing_xyz)]
    return sitk.Resample(image, size, sitk.Transform(), sitk.sitkLinear, image.GetOrigin(), spacing_xyz,
                         image.GetDirection(), -1024.0, image.GetPixelID())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-o", "--out", required=True)
    ap.add_argument("--model", default=str(REPO / "LesionSeg" / "LesionSegLib" / "models" / "sts-clcs"))
    args = ap.parse_args(argv)
    from LesionSegLib.engine import data as dataset
    from LesionSegLib.engine.atomic import write_text
    from LesionSegLib.engine.evaluate.metrics import cluster_auc
    from LesionSegLib.engine.io.images import read_image
    from LesionSegLib.engine.learn.ood_fit import descriptor_of
    from LesionSegLib.engine.models import get_card
    from LesionSegLib.engine.segment.ood import OODModel

    card = get_card(args.model)
    ood = OODModel.from_card(card)
    images = {n: read_image(dataset.case(n).image) for n in dataset.STS_VAL + CHEST}
    scores = {n: ood.scan_score(descriptor_of(img)) for n, img in images.items()}
    regridded = {"x".join(f"{v:g}" for v in sp): {n: round(ood.scan_score(descriptor_of(regrid(images[n], sp))), 4)
                                                   for n in dataset.STS_VAL} for sp in REGRID}
    crossings = sorted({f"{n} at {g}" for g, row in regridded.items() for n, v in row.items()
                        if (v > ood.scan_threshold) != (scores[n] > ood.scan_threshold)})
    neg = [scores[n] for n in dataset.STS_VAL]
    pos = [scores[n] for n in CHEST]
    out = {
        "command": "python Testing/benchmarks/ood_scan.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "model": card.id, "reference": "33 training scans STS_001-033 (scan descriptors)",
        "scan_threshold": ood.scan_threshold,
        "scores": {n: round(v, 4) for n, v in scores.items()},
        "auroc_chest_vs_sts_val": cluster_auc(neg + pos, [False] * len(neg) + [True] * len(pos)),
        "warned": sorted(n for n, v in scores.items() if ood.warning(v)),
        "scan_descriptor": card.data["ood"].get("scan_descriptor", 1),
        "regridded": {"grids_mm_xyz": list(regridded), "scores": regridded, "crossings": crossings},
    }
    write_text(args.out, json.dumps(out, indent=1) + "\n")
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

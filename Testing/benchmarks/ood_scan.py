"""Scan-level OOD score of the shipped model on the sarcoma validation scans and the chest scans.

    python Testing/benchmarks/ood_scan.py -o Resources/evaluation/ood_scan.json

No inference: the scan descriptor (``engine/segment/ood.py``) of each scan is scored against the
model card's OOD reference (fitted on STS_001-033 by ``lesionseg fit-ood``).  Reports every score
and the AUROC of chest (positive) vs STS_034-041 (negative), and which scans get the warning.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO / "LesionSeg")]
CHEST = ["lung1", "lung2", "LIDC-IDRI-0001"]


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
    scores = {n: ood.scan_score(descriptor_of(read_image(dataset.case(n).image))) for n in dataset.STS_VAL + CHEST}
    neg = [scores[n] for n in dataset.STS_VAL]
    pos = [scores[n] for n in CHEST]
    out = {
        "command": "python Testing/benchmarks/ood_scan.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "model": card.id, "reference": "33 training scans STS_001-033 (scan descriptors)",
        "scan_threshold": ood.scan_threshold,
        "scores": {n: round(v, 4) for n, v in scores.items()},
        "auroc_chest_vs_sts_val": cluster_auc(neg + pos, [False] * len(neg) + [True] * len(pos)),
        "warned": sorted(n for n, v in scores.items() if ood.warning(v)),
        "note": "the descriptor includes the log voxel volume, which is the same for every STS crop, so a scan on any "
                "other grid is far out; the scores are large numbers for that reason",
    }
    write_text(args.out, json.dumps(out, indent=1) + "\n")
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Does the review loop (reject the false lesions, then ``lesionseg retrain``) fix the false lesions
that a model shows on tumour-free regions (``framing.json``)?

    git archive a670f86 LesionSeg/LesionSegLib/models/sts-clcs | tar -x -C runs/v110   # sts-clcs 1.1.0
    python Testing/benchmarks/tumour_free_retrain.py -o Resources/evaluation/tumour_free_retrain.json \\
        --model runs/v110/LesionSeg/LesionSegLib/models/sts-clcs

Fitted on the training side only (STS_001-033): their tumour-free slabs
(``engine.learn.tumour_free``: whole slices at least 10 mm from the tumour, 12 slices or more),
segmented by the base model at threshold 0, every cluster recorded as *rejected* in a fresh
feedback database, as a reviewer would.  Two arms retrain the confidence classifier's head
(``retrain(mode="head")``, what ``lesionseg retrain`` runs) with the training cases' own
ground-truth clusters (``include_gt``):

* ``slabs``: with those rejections (what ``python -m LesionSegLib.engine.learn.tumour_free``
  builds and ships as sts-clcs 1.2.0);
* ``control``: without them, so the effect of retraining alone is told apart.

Measured only on STS_034-041 (nothing is fitted there): the whole scans (mean Dice and tumours
detected at the default threshold, cluster AUC and ECE at threshold 0) and their tumour-free slabs
(lesions shown at the default threshold, highest confidence).  The rule it answers was written
before it ran (``rule31`` in the session notes; the README gives the outcome).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO / "LesionSeg")]
TRAIN = [f"STS_{i:03d}" for i in range(1, 34)]
VAL = [f"STS_{i:03d}" for i in range(34, 42)]


def measure(folder) -> dict:
    from LesionSegLib.engine.evaluate.metrics import calibration, cluster_auc, dice_score
    from LesionSegLib.engine.learn.labels import candidates_with_labels
    from LesionSegLib.engine.learn.tumour_free import read_case, slab_figures
    from LesionSegLib.engine.segment.pipeline import Engine

    engine = Engine(str(folder), device="cpu")
    thr = engine.default_threshold
    scores, tps, dice, found = [], [], [], 0
    for name in VAL:
        img, lab, gt = read_case(name)
        res, m, _, n_gt = candidates_with_labels(engine, img, lab)
        conf = np.array([les.confidence for les in res.lesions])
        scores += conf.tolist()
        tps += m.is_tp.tolist()
        shown = [les.lesion_id for les in res.lesions if les.confidence >= thr]
        dice.append(round(dice_score(np.isin(res.labelmap, shown), gt), 4))
        found += len({int(g) for g, c in zip(m.pred_to_gt, conf) if g and c >= thr})
    cal = calibration(scores, tps)
    return {"model": engine.card.id, "mean_dice": round(float(np.mean(dice)), 4), "tumours_detected": found,
            "clusters": len(scores), "auc": cluster_auc(scores, tps), "ece": cal["ece"] if cal else None,
            **slab_figures(engine, VAL)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-o", "--out", required=True)
    ap.add_argument("--model", required=True, help="folder of the base CLCS model (the README names the one measured)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="tumour-free-"))
    os.environ["LESIONSEG_MODELS"] = str(work / "models")  # the retrained versions stay out of the user's folder
    from LesionSegLib.engine.learn.tumour_free import retrain_with_slabs
    from LesionSegLib.engine.models import get_card

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    t0 = time.perf_counter()
    base = get_card(args.model)
    out = {"command": f"python Testing/benchmarks/tumour_free_retrain.py -o {args.out} --model {args.model}",
           "base": base.id, "arms": {}}
    folders = {}
    for arm in ("control", "slabs"):
        t = time.perf_counter()
        res, n = retrain_with_slabs(base, TRAIN, work, args.seed, arm == "slabs", log)
        if n:
            out["training_slab_clusters_rejected"] = n
        out["arms"][arm] = {"model": res.card.id, "retrain_seconds": round(time.perf_counter() - t, 1),
                            "label_counts": res.label_counts, "selected": res.metrics.get("selected")}
        folders[arm] = res.card.folder
        log(f"{arm}: {res.card.id} {res.label_counts}")
    out["validation"] = {"base": measure(args.model), **{arm: measure(f) for arm, f in folders.items()}}
    out["minutes"] = round((time.perf_counter() - t0) / 60, 1)
    Path(args.out).write_text(json.dumps(out, indent=1, default=float) + "\n")
    for k, v in out["validation"].items():
        print(k, {m: v[m] for m in v if m != "per_slab"})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

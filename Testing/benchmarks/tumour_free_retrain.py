"""Does the review loop (reject the false lesions, then ``lesionseg retrain``) fix the false lesions
that the shipped model shows on tumour-free regions (``framing.json``)?

    python Testing/benchmarks/tumour_free_retrain.py -o Resources/evaluation/tumour_free_retrain.json

Fitted on the training side only (STS_001-033): their tumour-free slabs (``framing.tumour_free_slabs``:
whole slices at least 10 mm from the tumour, 12 slices or more), segmented by the base model at
threshold 0, every cluster recorded as *rejected* in a fresh feedback database, as a reviewer
would.  Two arms retrain the confidence classifier's head (``retrain(mode="head")``, what
``lesionseg retrain`` runs) with the training cases' own ground-truth clusters (``include_gt``):

* ``slabs``: with those rejections;
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
sys.path[:0] = [str(REPO / "LesionSeg"), str(Path(__file__).resolve().parent)]
TRAIN = [f"STS_{i:03d}" for i in range(1, 34)]
VAL = [f"STS_{i:03d}" for i in range(34, 42)]


def _label(case):
    import SimpleITK as sitk

    from LesionSegLib.engine.io.images import read_image, read_label

    img = read_image(case.image)
    lab = read_label(case.label, img)
    return img, lab, sitk.GetArrayFromImage(lab) > 0


def slab_rejections(engine, log) -> list:
    from framing import tumour_free_slabs
    from LesionSegLib.engine import data as dataset
    from LesionSegLib.engine.segment.pipeline import case_hash
    from LesionSegLib.review import Decision

    out = []
    for name in TRAIN:
        img, _, gt = _label(dataset.case(name))
        for side, slab in tumour_free_slabs(img, gt).items():
            res = engine.segment(slab, threshold=0.0, keep_patches=True)
            h = case_hash(slab)
            out += [Decision.from_lesion(f"{name}-{side}", h, res.model_id, les, "rejected", "simulated") for les in res.lesions]
            log(f"  {name} {side}: {len(res.lesions)} cluster(s), highest {max((l.confidence for l in res.lesions), default=0):.2f}")
    return out


def measure(folder) -> dict:
    from framing import _dice, tumour_free_slabs
    from LesionSegLib.engine import data as dataset
    from LesionSegLib.engine.evaluate.metrics import calibration, cluster_auc
    from LesionSegLib.engine.learn.labels import candidates_with_labels
    from LesionSegLib.engine.segment.pipeline import Engine

    engine = Engine(str(folder), device="cpu")
    thr = engine.default_threshold
    scores, tps, dice, found, slabs = [], [], [], 0, []
    for name in VAL:
        img, lab, gt = _label(dataset.case(name))
        res, m, _, n_gt = candidates_with_labels(engine, img, lab)
        conf = np.array([l.confidence for l in res.lesions])
        scores += conf.tolist()
        tps += m.is_tp.tolist()
        shown = [l.lesion_id for l in res.lesions if l.confidence >= thr]
        dice.append(_dice(np.isin(res.labelmap, shown), gt) or 0.0)
        found += len({int(g) for g, c in zip(m.pred_to_gt, conf) if g and c >= thr})
        for side, slab in tumour_free_slabs(img, gt).items():
            r = engine.segment(slab)
            slabs.append({"case": name, "side": side, "lesions": len(r.lesions),
                          "max_confidence": round(max((l.confidence for l in r.lesions), default=0.0), 3)})
    cal = calibration(scores, tps)
    return {"model": engine.card.id, "mean_dice": round(float(np.mean(dice)), 4), "tumours_detected": found,
            "clusters": len(scores), "auc": cluster_auc(scores, tps), "ece": cal["ece"] if cal else None,
            "slabs": len(slabs), "slabs_with_a_false_lesion": sum(s["lesions"] > 0 for s in slabs),
            "slab_false_lesions": sum(s["lesions"] for s in slabs),
            "slab_max_confidence": max(s["max_confidence"] for s in slabs), "per_slab": slabs}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-o", "--out", required=True)
    ap.add_argument("--model", default=str(REPO / "LesionSeg" / "LesionSegLib" / "models" / "sts-clcs"))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="tumour-free-"))
    os.environ["LESIONSEG_MODELS"] = str(work / "models")  # the retrained versions stay out of the user's folder
    from LesionSegLib.engine import data as dataset
    from LesionSegLib.engine.feedback import FeedbackStore
    from LesionSegLib.engine.learn.retrain import retrain
    from LesionSegLib.engine.segment.pipeline import Engine

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    t0 = time.perf_counter()
    base = Engine(args.model, device="cpu")
    rejected = slab_rejections(base, log)
    db = work / "slabs.db"
    store = FeedbackStore(db)
    store.record_many(rejected)
    store.close()
    gt_root = dataset.case(TRAIN[0]).image.parent.parent
    out = {"command": "python Testing/benchmarks/tumour_free_retrain.py -o " + args.out, "base": base.card.id,
           "training_slab_clusters_rejected": len(rejected), "arms": {}}
    arms = {"control": None, "slabs": db}
    for arm, feedback in arms.items():
        t = time.perf_counter()
        res = retrain(feedback, args.model, include_gt=gt_root, output=f"tf-{arm}", gt_cases=TRAIN, mode="head",
                      seed=args.seed, all_models=True)
        out["arms"][arm] = {"model": res.card.id, "retrain_seconds": round(time.perf_counter() - t, 1),
                            "label_counts": res.label_counts, "selected": res.metrics.get("selected"),
                            "folder": str(res.card.folder)}
        log(f"{arm}: {res.card.id} {res.label_counts}")
    out["validation"] = {"base": measure(args.model)}
    for arm in arms:
        out["validation"][arm] = measure(out["arms"][arm].pop("folder"))
    out["minutes"] = round((time.perf_counter() - t0) / 60, 1)
    Path(args.out).write_text(json.dumps(out, indent=1, default=float) + "\n")
    for k, v in out["validation"].items():
        print(k, {m: v[m] for m in v if m != "per_slab"})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

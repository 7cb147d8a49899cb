"""Adapting the sarcoma model to chest CT from simulated corrections, leave-one-case-out.

    OMP_NUM_THREADS=1 python Testing/benchmarks/finetune_chest.py -o Resources/evaluation/finetune_chest.json \
        [--steps 30] [--replay-cases 8] [--lr 1e-4] [--decoder-lr-mult 1] [--loss dicece]
    OMP_NUM_THREADS=1 python Testing/benchmarks/finetune_chest.py -o Resources/evaluation/finetune_chest_base.json --base-only

1. Start from the shipped sarcoma model (``sts-clcs``).
2. A reviewer is simulated from ground truth on each chest CT of ``$LESIONSEG_DATA``
   (``fullscan/lung1``, ``fullscan/lung2``, ``lidc/LIDC-IDRI-0001``;
   :mod:`LesionSegLib.engine.learn.simulate_review`: false proposals deleted, hit ones replaced
   by the ground truth, missed lesions added), into one feedback store.
3. For each chest case, the model is fine-tuned (``lesionseg finetune``) on the corrections of
   the *other two* cases only, with replay of sarcoma training cases.
4. The held-out chest case is scored before and after: sensitivity, FP at the default threshold,
   Dice; and the sarcoma validation cases STS_034-041 likewise (forgetting).
5. OOD: AUROC of the scan-level score (chest vs STS validation scans) and of the two per-lesion
   scores (clusters on chest scans vs clusters on STS validation scans); ECE of the confidences of
   chest-scan clusters before (capped and uncapped) and after fine-tuning.
6. On each chest scan, before and after (``chest_held_out.per_case.*.coverage``): the share of the
   tumour at p > 0.5, the p > 0.5 voxels elsewhere (and their share in the lung), and the
   candidate cluster that holds the tumour (size, Dice, uncapped confidence).

Every figure is on real scans and real labels (``--synthetic`` adds synthetic lesions to the
training patches only).  Folds run as parallel processes with one thread each.  Everything is
written to one JSON.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO / "LesionSeg")]
CHEST = ["lung1", "lung2", "LIDC-IDRI-0001"]
HELD_OUT_KEYS = ("n_gt", "detected", "fp", "dice", "scan_ood", "coverage")  # per held-out chest scan, before and after
BASE = str(REPO / "LesionSeg" / "LesionSegLib" / "models" / "sts-clcs")


def _setup():
    import torch

    torch.set_num_threads(1)


def _score(engine, names):
    from LesionSegLib.engine import data as dataset
    from LesionSegLib.engine.learn.finetune import _read_case, score_case

    out = {}
    for n in names:
        img, lab = _read_case(dataset.case(n))
        out[n] = score_case(engine, img, lab)
    return out


def _coverage(engine, name) -> dict:
    """Where the segmenter stands on a chest scan's tumour (confidences uncapped): the share of
    its voxels at p > 0.5, the p > 0.5 voxels outside it and the share of those inside the lung
    (:func:`synthetic.lung_mask`), and the candidate cluster that holds most of the tumour."""
    import SimpleITK as sitk

    from LesionSegLib.engine import data as dataset
    from LesionSegLib.engine.learn import synthetic as syn
    from LesionSegLib.engine.learn.finetune import _read_case

    img, lab = _read_case(dataset.case(name))
    ood, engine.ood = engine.ood, None
    try:
        res = engine.segment(img, threshold=0.0, keep_probability=True)
    finally:
        engine.ood = ood
    p = np.asarray(res.probability, np.float32)
    gt = lab > 0
    outside = (p > 0.5) & ~gt
    lung = syn.lung_mask(sitk.GetArrayFromImage(img).astype(np.int16), tuple(reversed(img.GetSpacing())))
    best = None
    for i, les in enumerate(res.lesions, 1):
        m = res.labelmap == i
        ov = int((m & gt).sum())
        if ov and (best is None or ov > best["tumour_voxels_in_it"]):
            best = {"voxels": int(m.sum()), "tumour_voxels_in_it": ov, "dice": round(2 * ov / (int(m.sum()) + int(gt.sum())), 4),
                    "raw_confidence": round(float(les.confidence), 4)}
    return {"tumour_voxels": int(gt.sum()), "tumour_max_p": round(float(p[gt].max()), 4),
            "tumour_share_p_over_0.5": round(float((p[gt] > 0.5).mean()), 4),
            "voxels_p_over_0.5_outside": int(outside.sum()),
            "outside_share_in_lung": round(float((outside & lung).sum() / max(int(outside.sum()), 1)), 4),
            "cluster_holding_tumour": best}


def task_base(name):
    _setup()
    from LesionSegLib.engine.segment.pipeline import Engine

    engine = Engine(BASE, device="cpu")
    out = _score(engine, [name])[name]
    if name in CHEST:
        out["coverage"] = _coverage(engine, name)
    return name, out


def task_fold(args):
    held, db, steps, n_replay, models_dir, lr, synthetic, lung_negatives, decoder_lr_mult, loss = args
    _setup()
    os.environ["LESIONSEG_MODELS"] = models_dir
    from LesionSegLib.engine import data as dataset
    from LesionSegLib.engine.learn.finetune import finetune
    from LesionSegLib.engine.segment.pipeline import Engine

    t = time.perf_counter()
    train = [c for c in CHEST if c != held]
    res = finetune(db, BASE, f"chest-loco-{held.lower()}", steps=steps, cases=train, held_apart=0, **({"lr": lr} if lr else {}),
                   replay_cases=dataset.STS_TRAIN[:n_replay], cls_replay_cases=2, min_cases=2, synthetic=synthetic,
                   lung_negatives=lung_negatives, decoder_lr_mult=decoder_lr_mult, loss=loss)
    t_ft = time.perf_counter() - t
    new = Engine(res.card, device="cpu")
    out = {"held_out": held, "train_cases": train, "finetune_minutes": round(t_ft / 60, 2),
           "finetuning": {k: v for k, v in res.card.data["finetuning"].items() if k not in ("evaluation",)},
           "routing": res.card.data.get("routing"),
           "chest_after": _score(new, [held]), "sts_after": _score(new, dataset.STS_VAL)}
    out["chest_after"][held]["coverage"] = _coverage(new, held)
    if new.in_domain is not None:  # the fine-tuned networks alone, on the scans that routing hands to the parent
        new.in_domain = None
        out["sts_after_unrouted"] = _score(new, dataset.STS_VAL)
    out["seconds"] = time.perf_counter() - t
    return out


def _auroc(neg, pos):
    from LesionSegLib.engine.evaluate.metrics import cluster_auc

    vals = list(neg) + list(pos)
    return cluster_auc(vals, [False] * len(neg) + [True] * len(pos)) if neg and pos else None


def _ece(cands, key="confidence"):
    from LesionSegLib.engine.evaluate.metrics import calibration

    if not cands:
        return None
    c = calibration([x[key] for x in cands], [x["tp"] for x in cands])
    return None if c is None else round(float(c["ece"]), 4)


def _summary(rows: dict) -> dict:
    vals = list(rows.values())
    n_gt = sum(r["n_gt"] for r in vals)
    return {"sensitivity": round(sum(r["detected"] for r in vals) / n_gt, 4) if n_gt else None,
            "fp_per_case": round(sum(r["fp"] for r in vals) / len(vals), 3),
            "dice_mean": round(float(np.mean([r["dice"] for r in vals])), 4), "n_cases": len(vals)}


def main(argv=None) -> int:
    from LesionSegLib.engine.learn.finetune_train import FINETUNE_LOSSES

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-o", "--out", required=True)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--replay-cases", type=int, default=8)
    ap.add_argument("--lr", type=float, default=None, help="fine-tuning learning rate (default: lesionseg finetune's)")
    ap.add_argument("--decoder-lr-mult", type=float, default=1.0,
                    help="lesionseg finetune --decoder-lr-mult: the decoder learns at this multiple of --lr (default 1)")
    ap.add_argument("--loss", choices=FINETUNE_LOSSES, default="dicece",
                    help="lesionseg finetune --loss (default dicece, the loss of every run made before the option existed, "
                         "so that their printed commands still reproduce them)")
    ap.add_argument("--synthetic", type=float, default=0.0, help="lesionseg finetune --synthetic-lesions (default 0: real only)")
    ap.add_argument("--lung-negatives", type=float, default=0.0,
                    help="lesionseg finetune --lung-negatives (default 0, that of every run made before the option existed)")
    ap.add_argument("--processes", type=int, default=4, help="parallel processes for the base model's scoring")
    ap.add_argument("--base-only", action="store_true",
                    help="only the base model: OOD AUROCs and chest calibration before fine-tuning (no folds)")
    args = ap.parse_args(argv)
    _setup()
    from LesionSegLib.engine import data as dataset
    from LesionSegLib.engine.atomic import write_text
    from LesionSegLib.engine.feedback import FeedbackStore
    from LesionSegLib.engine.learn.finetune import _read_case
    from LesionSegLib.engine.learn.simulate_review import review_into
    from LesionSegLib.engine.segment.pipeline import Engine

    t0 = time.perf_counter()
    load_at_start = [round(x, 2) for x in os.getloadavg()]
    work = Path(tempfile.mkdtemp(prefix="finetune_chest-"))
    db = work / "feedback.db"
    base = Engine(BASE, device="cpu")
    ctx = mp.get_context("spawn")
    with ctx.Pool(args.processes) as pool:
        scored = dict(pool.map(task_base, CHEST + dataset.STS_VAL))
    chest_before = {n: scored[n] for n in CHEST}
    sts_before = {n: scored[n] for n in dataset.STS_VAL}
    folds, review = [], {}
    if not args.base_only:
        store = FeedbackStore(db)
        for n in CHEST:
            img, lab = _read_case(dataset.case(n))
            review[n] = review_into(store, base, img, lab, n)
            print(n, review[n], flush=True)
        store.close()
        with ctx.Pool(len(CHEST)) as pool:
            folds = pool.map(task_fold, [(h, str(db), args.steps, args.replay_cases, str(work / "models"), args.lr, args.synthetic,
                                          args.lung_negatives, args.decoder_lr_mult, args.loss) for h in CHEST])
    t_base = time.perf_counter() - t0
    chest_after = {f["held_out"]: f["chest_after"][f["held_out"]] for f in folds}
    sts_after = {f["held_out"]: _summary(f["sts_after"]) for f in folds}
    sts_unrouted = {f["held_out"]: _summary(f["sts_after_unrouted"]) for f in folds if "sts_after_unrouted" in f}
    chest_c_before = [c for r in chest_before.values() for c in r["candidates"]]
    chest_c_after = [c for r in chest_after.values() for c in r["candidates"]]
    sts_c = [c for r in sts_before.values() for c in r["candidates"]]
    confident_false = [c for c in chest_c_before if c["confidence"] >= 0.5 and not c["tp"]]
    result = {
        "command": "OMP_NUM_THREADS=1 python Testing/benchmarks/finetune_chest.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores; the folds run side by side, one process each",
        "load_average_at_start": load_at_start,
        "base_model": base.card.id,
        "protocol": "leave-one-case-out over the 3 chest CTs; simulated reviewer from ground truth; " + (
            f"training patches of the corrected chest scans get synthetic lung lesions (fraction {args.synthetic}; "
            f"lung negatives {args.lung_negatives:g}), and synthetic "
            "copies of them join the classifier's training scans; every figure is on real scans and real labels"
            if args.synthetic else "real scans and labels only"),
        "simulated_review": review if folds else None,
        "chest_held_out": {"before": _summary(chest_before), "after": _summary(chest_after) if folds else None,
                           "per_case": {n: {"before": {k: chest_before[n][k] for k in HELD_OUT_KEYS},
                                            "after": {k: chest_after[n][k] for k in HELD_OUT_KEYS} if folds else None}
                                        for n in CHEST}},
        "sts_val": {"before": _summary(sts_before), "after_per_fold": sts_after,
                    **({"after_per_fold_unrouted": sts_unrouted,
                        "unrouted_means": "the fine-tuned segmenter and classifier alone, without routing the sarcoma scans "
                                          "to the parent (what the fine-tuning itself kept)"} if sts_unrouted else {})},
        "ood": {
            "scan_auroc_chest_vs_sts_val": _auroc([r["scan_ood"] for r in sts_before.values()], [r["scan_ood"] for r in chest_before.values()]),
            "scan_scores": {**{n: r["scan_ood"] for n, r in sts_before.items()}, **{n: r["scan_ood"] for n, r in chest_before.items()}},
            "lesion_auroc_knn": _auroc([c["ood_knn"] for c in sts_c], [c["ood_knn"] for c in chest_c_before]),
            "lesion_auroc_mahalanobis": _auroc([c["ood_mahalanobis"] for c in sts_c], [c["ood_mahalanobis"] for c in chest_c_before]),
            "n_clusters": {"sts_val": len(sts_c), "chest": len(chest_c_before)},
        },
        "chest_calibration": {"ece_before_uncapped": _ece(chest_c_before, "raw_confidence"), "ece_before_capped": _ece(chest_c_before),
                              "ece_after": _ece(chest_c_after), "n_clusters_before": len(chest_c_before), "n_clusters_after": len(chest_c_after),
                              "confident_false_before_cap": sum(c["raw_confidence"] >= 0.5 and not c["tp"] for c in chest_c_before),
                              "confident_false_before": len(confident_false)},
        "folds": [{k: v for k, v in f.items() if k not in ("chest_after", "sts_after", "sts_after_unrouted")} for f in folds],
        "timings": {"base_and_review_minutes": round(t_base / 60, 2), "total_minutes": round((time.perf_counter() - t0) / 60, 2)},
        "raw": {"chest_before": chest_before, "chest_after": chest_after, "sts_before": sts_before},
    }
    write_text(args.out, json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: result[k] for k in ("chest_held_out", "sts_val", "ood", "chest_calibration", "timings")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

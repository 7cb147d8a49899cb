"""The closing proof: does retraining from review feedback cut false positives on unseen cases?

    python Testing/benchmarks/feedback_loop.py [--model sts-clcs] [--n-review 0] [--folds 0] [-o report.json]

1. Model and cases it was not trained on: the default model (its classifier and segmenter were
   trained on STS_001-033, the temperature on their out-of-fold clusters since sts-clcs 1.1.0) and
   STS_034-041 (its validation split: nothing was fitted there), the full-scan lung case and the
   LIDC case.
2. Candidates: the model segments each case with threshold 0 (every cluster, with its features,
   adaptive patch and confidence); each is labelled by the matching rule (:mod:`matching`).
3. Simulated reviewer: for the cases of the training side of a split, a reviewer accepts every
   candidate that is a true lesion and rejects every false positive (``--n-review N``: only N
   randomly chosen lesions per split), recorded through ``FeedbackStore.record`` into a fresh
   feedback database.
4. Retrain with ``retrain()`` (what ``lesionseg retrain`` runs) -> a new model version.
5. Evaluate on the held-out cases only (lesions never used for retraining): splits are by case
   (``--folds 0``: leave one case out; K: K folds by case), so every case is scored exactly once
   by a model that never saw it.  Pooled over the splits: FP/case at fixed sensitivities (the
   FROC operating points of the base model and of the retrained models), cluster AUC and ECE,
   before and after.

Detection rule (as ``lesionseg evaluate``): a ground-truth lesion is detected at threshold t when
one of its hitting candidates has confidence >= t; a candidate hitting no lesion is a false
positive; further hits on a lesion are neither.  FP/case at sensitivity S is the FP count at the
highest threshold reaching S, over the number of cases.

Prints a table and the JSON report.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parents[2] / "LesionSeg"))

SENSITIVITIES = (0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


@dataclass
class CaseCandidates:
    name: str
    group: str
    case_hash: str
    decisions: list  # Decision per candidate (accepted = TP, rejected = FP)
    patches: np.ndarray
    features: np.ndarray
    old_conf: np.ndarray
    gt_of: np.ndarray  # GT lesion id hit by each candidate (0 = false positive)
    n_gt: int


def collect(engine, cases, log) -> list[CaseCandidates]:
    from LesionSegLib.engine.segment.features import PATCH_CHANNELS, PATCH_SIZE, feature_matrix
    from LesionSegLib.engine.io.images import read_image, read_label
    from LesionSegLib.engine.segment.pipeline import case_hash
    from LesionSegLib.engine.learn.labels import candidates_with_labels
    from LesionSegLib.review import Decision

    out = []
    for c in cases:
        t = time.perf_counter()
        img = read_image(c.image)
        lab = read_label(c.label, img)
        res, m, _, n_gt = candidates_with_labels(engine, img, lab)
        h = case_hash(img)
        decisions = [
            Decision.from_lesion(c.name, h, res.model_id, les, "accepted" if tp else "rejected", "simulated")
            for les, tp in zip(res.lesions, m.is_tp)
        ]
        patches = (np.stack([les.patch for les in res.lesions]) if res.lesions
                   else np.zeros((0, PATCH_CHANNELS, *PATCH_SIZE), np.float16))
        out.append(CaseCandidates(c.name, c.group, h, decisions, patches, feature_matrix([les.features for les in res.lesions]),
                                  np.array([les.confidence for les in res.lesions]), m.pred_to_gt.copy(), int(n_gt)))
        log(f"  {c.name} ({c.group}): {len(res.lesions)} candidates, {int(m.is_tp.sum())} true, {n_gt} GT lesion(s) "
            f"[{time.perf_counter() - t:.1f} s]")
    return out


def operating_points(conf_per_case, gt_per_case, n_gt_per_case) -> dict:
    """FP/case at each sensitivity of :data:`SENSITIVITIES` (None when not reachable)."""
    best = []  # per GT lesion: highest confidence among its hits (-inf: missed by every candidate)
    fp_scores = []
    for conf, gt, n_gt in zip(conf_per_case, gt_per_case, n_gt_per_case):
        b = np.full(n_gt, -np.inf)
        for s, g in zip(conf, gt):
            if g > 0:
                b[g - 1] = max(b[g - 1], s)
            else:
                fp_scores.append(s)
        best.extend(b.tolist())
    best = np.sort(np.asarray(best))[::-1]
    fp_scores = np.asarray(fp_scores)
    n_cases = len(conf_per_case)
    total = len(best)
    out = {}
    for s in SENSITIVITIES:
        k = int(math.ceil(s * total - 1e-9))
        if total == 0 or k == 0:
            out[s] = 0.0
            continue
        t = best[k - 1]
        out[s] = None if not np.isfinite(t) else float((fp_scores >= t).sum()) / n_cases
    out["max_sensitivity"] = float(np.isfinite(best).sum() / total) if total else None
    return out


def at_threshold(conf_per_case, gt_per_case, n_gt_per_case, t: float) -> dict:
    """Sensitivity and FP/case keeping the lesions with confidence >= ``t`` (the operating point)."""
    detected = fps = total = 0
    for conf, gt, n_gt in zip(conf_per_case, gt_per_case, n_gt_per_case):
        keep = np.asarray(conf) >= t
        detected += len({int(g) for g, k in zip(gt, keep) if k and g > 0})
        fps += int(np.sum(keep & (np.asarray(gt) == 0)))
        total += n_gt
    return {"threshold": t, "sensitivity": detected / total if total else None, "fp_per_case": fps / len(conf_per_case)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="base model (default: the shipped default model)")
    ap.add_argument("--cases", nargs="*", default=None, help="case names (default: STS_034-041, lung1, LIDC-IDRI-0001)")
    ap.add_argument("--n-review", type=int, default=0, help="reviewed lesions per split (0: every candidate of the training side)")
    ap.add_argument("--folds", type=int, default=0, help="0: leave one case out; K: K folds by case")
    ap.add_argument("--retrain-folds", type=int, default=5, help="inner cross-validation folds of retrain()")
    ap.add_argument("--min-labels", type=int, default=10)
    ap.add_argument("--min-per-class", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("-o", "--output", default=None, help="write the JSON report here")
    args = ap.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="feedback_loop_"))
    os.environ["LESIONSEG_MODELS"] = str(work / "models")  # retrained versions stay out of ~/.lesionseg

    from LesionSegLib.engine import data as dataset
    from LesionSegLib.engine import models
    from LesionSegLib.engine.segment.classifier import ConfidenceModel
    from LesionSegLib.engine.errors import LesionSegError
    from LesionSegLib.engine.feedback import FeedbackStore
    from LesionSegLib.engine.segment.pipeline import Engine
    from LesionSegLib.engine.learn.validation import score_metrics
    from LesionSegLib.engine.learn.retrain import retrain

    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    base = models.get_card(args.model or models.DEFAULT_MODEL)
    trained_on = set(base.data.get("data", {}).get("train_cases", dataset.STS_TRAIN))
    names = args.cases or (dataset.STS_VAL + [c.name for c in dataset.cases("fullscan")] + [c.name for c in dataset.cases("lidc")])
    overlap = sorted(set(names) & trained_on)
    if overlap:
        log(f"warning: the model was trained on {overlap}")
    cases = [dataset.case(n) for n in names]
    t0 = time.perf_counter()
    log(f"base model {base.id}; segmenting {len(cases)} cases it was not trained on...")
    engine = Engine(base, device="cpu")
    cand = collect(engine, cases, log)
    collect_s = time.perf_counter() - t0

    k = len(cand) if args.folds <= 0 else min(args.folds, len(cand))
    split_of = np.arange(len(cand)) % k
    if args.folds > 0:
        split_of = np.random.default_rng(args.seed).permutation(split_of)
    rng = np.random.default_rng(args.seed)
    new_conf = [None] * len(cand)
    splits = []
    for f in range(k):
        test = [i for i in range(len(cand)) if split_of[i] == f]
        train = [i for i in range(len(cand)) if split_of[i] != f]
        decisions = [d for i in train for d in cand[i].decisions]
        if args.n_review and len(decisions) > args.n_review:
            decisions = [decisions[j] for j in sorted(rng.choice(len(decisions), args.n_review, replace=False))]
        db = work / f"feedback_split{f}.db"
        store = FeedbackStore(db)
        store.record_many(decisions)
        store.close()
        n_pos = sum(d.decision == "accepted" for d in decisions)
        info = {"held_out": [cand[i].name for i in test], "reviewed": len(decisions), "reviewed_true": n_pos}
        t = time.perf_counter()
        try:
            res = retrain(db, str(base.folder), output=f"loop-split{f}",
                          folds=args.retrain_folds, seed=args.seed, min_labels=args.min_labels, min_per_class=args.min_per_class)
            cm = ConfidenceModel.from_card(res.card)
            info.update({"model": res.card.id, "seconds": round(time.perf_counter() - t, 1),
                         "selected": res.metrics.get("selected"),
                         "inner_cv_auc_old": res.metrics["old"]["auc"], "inner_cv_auc_new": res.metrics["new"]["auc"]})
            for i in test:
                c = cand[i]
                new_conf[i] = cm.predict(c.patches.astype(np.float32), c.features) if len(c.old_conf) else np.zeros(0)
        except LesionSegError as exc:  # too few labels on this side: the base model stays in use
            info["refused"] = str(exc)
            for i in test:
                new_conf[i] = cand[i].old_conf
        splits.append(info)
        log(f"  split {f + 1}/{k}: held out {info['held_out']}, {len(decisions)} reviewed ({n_pos} true) -> "
            f"{info.get('model', 'refused: ' + info.get('refused', ''))}")

    gt = [c.gt_of for c in cand]
    n_gt = [c.n_gt for c in cand]
    old = [c.old_conf for c in cand]
    before = operating_points(old, gt, n_gt)
    after = operating_points(new_conf, gt, n_gt)
    threshold = float(base.data.get("confidence_threshold", 0.5))
    op_before = at_threshold(old, gt, n_gt, threshold)
    op_after = at_threshold(new_conf, gt, n_gt, threshold)
    y = np.concatenate([(c.gt_of > 0).astype(int) for c in cand])
    m_old = score_metrics(y, np.concatenate(old))
    m_new = score_metrics(y, np.concatenate(new_conf))
    by_group = {}
    for g in sorted({c.group for c in cand}):
        idx = [i for i, c in enumerate(cand) if c.group == g]
        sel = lambda xs: [xs[i] for i in idx]  # noqa: E731
        by_group[g] = {"cases": len(idx), "before": operating_points(sel(old), sel(gt), sel(n_gt)),
                       "after": operating_points(sel(new_conf), sel(gt), sel(n_gt)),
                       "op_before": at_threshold(sel(old), sel(gt), sel(n_gt), threshold),
                       "op_after": at_threshold(sel(new_conf), sel(gt), sel(n_gt), threshold)}
    report = {
        "command": "python Testing/benchmarks/feedback_loop.py " + " ".join(sys.argv[1:]),
        "base_model": base.id,
        "cases": [c.name for c in cand],
        "n_cases": len(cand),
        "gt_lesions": int(sum(n_gt)),
        "candidates": int(len(y)),
        "true_candidates": int(y.sum()),
        "splits": splits,
        "protocol": ("leave-one-case-out" if args.folds <= 0 else f"{k}-fold by case") +
                    "; reviewer = ground truth; evaluation only on held-out cases",
        "fp_per_case_at_sensitivity": {"before": {str(s): before[s] for s in SENSITIVITIES},
                                       "after": {str(s): after[s] for s in SENSITIVITIES}},
        "max_sensitivity": before["max_sensitivity"],
        "at_operating_threshold": {"before": op_before, "after": op_after},
        "cluster_auc": {"before": m_old["auc"], "after": m_new["auc"]},
        "ece": {"before": m_old["ece"], "after": m_new["ece"]},
        "by_group": {g: {"cases": v["cases"],
                         "fp_per_case_at_sensitivity": {"before": {str(s): v["before"][s] for s in SENSITIVITIES},
                                                        "after": {str(s): v["after"][s] for s in SENSITIVITIES}},
                         "at_operating_threshold": {"before": v["op_before"], "after": v["op_after"]}}
                     for g, v in by_group.items()},
        "seconds": {"segmentation": round(collect_s, 1), "total": round(time.perf_counter() - t0, 1)},
    }
    f = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    print(f"feedback loop on {len(cand)} unseen cases ({', '.join(c.name for c in cand)})")
    print(f"  base model {base.id}; {report['protocol']}")
    print(f"  {report['candidates']} candidates, {report['true_candidates']} true; {report['gt_lesions']} GT lesions; "
          f"max sensitivity of the candidates {f(before['max_sensitivity'])}")
    print(f"  {'sensitivity':>12s} {'FP/case before':>15s} {'FP/case after':>14s}")
    for s in SENSITIVITIES:
        print(f"  {s:12.2f} {f(before[s]):>15s} {f(after[s]):>14s}")
    print(f"  at confidence >= {threshold:.2f}: sensitivity {f(op_before['sensitivity'])} -> {f(op_after['sensitivity'])}, "
          f"FP/case {f(op_before['fp_per_case'])} -> {f(op_after['fp_per_case'])}")
    for g, v in by_group.items():
        print(f"    {g:9s} ({v['cases']} case(s)): sensitivity {f(v['op_before']['sensitivity'])} -> {f(v['op_after']['sensitivity'])}, "
              f"FP/case {f(v['op_before']['fp_per_case'])} -> {f(v['op_after']['fp_per_case'])}")
    print(f"  cluster AUC {f(m_old['auc'])} -> {f(m_new['auc'])}; ECE {f(m_old['ece'])} -> {f(m_new['ece'])}")
    kept = sum(1 for sp in splits if sp.get("selected") == {"l2sp": None})
    print(f"  {kept} of {len(splits)} retrained versions kept the base weights (cross-validation found no better ranking); "
          "the others fine-tuned the classifier head")
    text = json.dumps(report, indent=2)
    if args.output:
        Path(args.output).write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

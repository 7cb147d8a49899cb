"""Does the review order matter?  A simulated-reviewer experiment for LesionSeg's "Next" order.

    python Testing/benchmarks/review_order.py --budgets 8 16 --seeds 0 1 2 3 4 -o review_order.json

(the committed ``Resources/evaluation/review_order.json`` was made with a smaller run that fits a
shared, overloaded 2-core machine: ``--review-cases STS_001 ... STS_008 --held-cases
LIDC-IDRI-0001 lung1 STS_034 STS_035 --pool-cases 6 --budgets 5 --seeds 0 1 2 3 4``.  The
held-apart side needs the chest scans: every STS validation case gives exactly one, true,
candidate, so an STS-only held-apart set has no false positive to rank.)

For the same number of reviewed lesions, is a classifier retrained from the lesions reviewed
*most uncertain first* better than one retrained from those reviewed *by confidence* (LesionSeg's
default order) or in *random* order?

1. Candidates: the default model segments every case at threshold 0 (every cluster, with the
   features, patch and confidence it would show), and the matching rule labels each candidate
   true or false (:mod:`feedback_loop.collect`, the same code as the feedback-loop benchmark).
2. Review pool: for each seed, a random ``--pool-cases`` of the review cases (default: the
   training cases STS_001-033; a worklist of scans).  Their candidates are pooled into one queue and ordered by
   :func:`LesionSegLib.review.review_queue` (``confidence``: highest first; ``uncertainty``:
   confidence nearest the model's threshold first) or shuffled with the seed (``random``).
3. Simulated reviewer: the first B lesions of the queue get their true label (accepted = true
   lesion, rejected = false positive), recorded through ``FeedbackStore`` into a fresh database.
4. Retrain with ``retrain()`` (what the Retrain button runs), guards lowered to
   ``--min-labels`` / ``--min-per-class``.  A refused retraining (e.g. a queue that only showed
   true lesions) leaves the base classifier in use, and is counted as such.
5. Score on held-apart cases, never reviewed (default: STS_034-041, the validation split, lung1,
   lung2 and LIDC-IDRI-0001).  Cluster AUC (TP vs FP; the primary figure, unaffected by temperature),
   Brier score, ECE, and sensitivity / FP per case at the model's threshold.  Caveat: the base
   classifier's temperature was fitted on STS_034-041, so its own ECE there is optimistic; the
   retrained versions refit theirs on the reviewed lesions only.

The orders are compared per seed (same pool, same budget) and summarised as mean and standard
deviation over the seeds; "wins" counts, per budget, the seeds where an order had the best AUC
(or Brier score; ties shared).  AUC is None when the held-apart candidates hold one class only.  Prints a table and the JSON report.
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

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parents[2] / "LesionSeg"))

from feedback_loop import at_threshold, collect  # noqa: E402

ORDERS = ("confidence", "uncertainty", "random")


def queue(pool: list, order: str, threshold: float, rng) -> list[tuple[int, int]]:
    """(case index, candidate index) of every pooled candidate, in review order."""
    from LesionSegLib.review import review_queue

    flat = [(ci, k) for ci, c in pool for k in range(len(c.decisions))]
    if order == "random":
        return [flat[j] for j in rng.permutation(len(flat))]
    cases = dict(pool)
    records = [{"lesion_id": j, "confidence": float(cases[ci].old_conf[k]), "volume_ml": cases[ci].decisions[k].volume_ml}
               for j, (ci, k) in enumerate(flat)]
    return [flat[j] for j in review_queue(records, order, threshold)]


def score(conf, held) -> dict:
    from LesionSegLib.engine.learn.validation import score_metrics

    y = np.concatenate([(c.gt_of > 0).astype(int) for c in held])
    m = score_metrics(y, np.concatenate(conf))
    return {"auc": m["auc"], "brier": m.get("brier"), "ece": m["ece"]}


def _mean_sd(values) -> dict:
    v = [x for x in values if x is not None]
    return {"mean": float(np.mean(v)) if v else None, "sd": float(np.std(v)) if v else None}


def _f(v, fmt=".3f") -> str:
    return "-" if v is None else format(v, fmt)


def summarise(runs: list, budgets, seeds) -> dict:
    """Per budget and order: mean and sd over the seeds, refusals and AUC wins (ties shared)."""
    summary = {}
    for budget in budgets:
        rows = {o: [r for r in runs if r["budget"] == budget and r["order"] == o] for o in ORDERS}
        wins = {k: dict.fromkeys(ORDERS, 0.0) for k in ("auc", "brier")}
        for seed in seeds:
            for k, sign in (("auc", 1.0), ("brier", -1.0)):  # higher AUC, lower Brier is better
                got = {o: next(r[k] for r in rows[o] if r["seed"] == seed) for o in ORDERS}
                if any(v is None for v in got.values()):
                    continue
                best = [o for o in ORDERS if sign * got[o] >= max(sign * v for v in got.values()) - 1e-9]
                for o in best:
                    wins[k][o] += 1.0 / len(best)
        summary[str(budget)] = {
            o: {**{k: _mean_sd([r[k] for r in rows[o]]) for k in ("auc", "brier", "ece", "sensitivity", "fp_per_case")},
                "reviewed_true_mean": float(np.mean([r["reviewed_true"] for r in rows[o]])),
                "refused": sum(not r["retrained"] for r in rows[o]),
                "auc_wins": wins["auc"][o], "brier_wins": wins["brier"][o]}
            for o in ORDERS}
    return summary


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="base model (default: the shipped default model)")
    ap.add_argument("--budgets", type=int, nargs="+", default=[8, 16], help="reviewed lesions per retraining")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--review-cases", nargs="*", default=None, help="cases the worklists are drawn from (default: STS_001-033)")
    ap.add_argument("--held-cases", nargs="*", default=None,
                    help="held-apart cases (default: STS_034-041, the fullscan and LIDC cases)")
    ap.add_argument("--pool-cases", type=int, default=24, help="cases in each seed's worklist")
    ap.add_argument("--retrain-folds", type=int, default=3)
    ap.add_argument("--min-labels", type=int, default=4)
    ap.add_argument("--min-per-class", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("-o", "--output", default=None, help="write the JSON report here")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="review_order_"))
    os.environ["LESIONSEG_MODELS"] = str(work / "models")  # retrained versions stay out of ~/.lesionseg

    from LesionSegLib.engine import data as dataset
    from LesionSegLib.engine import models
    from LesionSegLib.engine.errors import LesionSegError
    from LesionSegLib.engine.feedback import FeedbackStore
    from LesionSegLib.engine.learn.retrain import retrain
    from LesionSegLib.engine.segment.classifier import ConfidenceModel
    from LesionSegLib.engine.segment.pipeline import Engine

    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    t0 = time.perf_counter()
    load0 = [round(v, 2) for v in os.getloadavg()]
    base = models.get_card(args.model or models.DEFAULT_MODEL)
    threshold = float(base.data.get("confidence_threshold", 0.5))
    held_names = args.held_cases or (dataset.STS_VAL + [c.name for c in dataset.cases("fullscan")] + [c.name for c in dataset.cases("lidc")])
    review_names = args.review_cases or dataset.STS_TRAIN
    if set(held_names) & set(review_names):
        ap.error(f"held-apart cases must never be reviewed: {sorted(set(held_names) & set(review_names))}")
    engine = Engine(base, device="cpu")
    log(f"base model {base.id}; candidates of {len(review_names)} review cases and {len(held_names)} held-apart cases...")
    train = collect(engine, [dataset.case(n) for n in review_names], log)
    held = collect(engine, [dataset.case(n) for n in held_names], log)
    collect_s = time.perf_counter() - t0
    gt, n_gt = [c.gt_of for c in held], [c.n_gt for c in held]
    base_conf = [c.old_conf for c in held]
    base_row = {**score(base_conf, held), **at_threshold(base_conf, gt, n_gt, threshold)}

    def write_report(runs: list, seeds: list) -> dict:
        report = {
            "command": "python Testing/benchmarks/review_order.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "base_model": base.id,
            "review_cases": review_names,
            "protocol": (f"per seed: {args.pool_cases} random cases of review_cases pooled into one review queue; "
                         "the first B lesions get their true label; retrain(); scored on held-apart cases never reviewed"),
            "held_apart_cases": held_names,
            "held_apart_candidates": int(sum(len(c.old_conf) for c in held)),
            "held_apart_true_candidates": int(sum((c.gt_of > 0).sum() for c in held)),
            "review_candidates_all_review_cases": int(sum(len(c.decisions) for c in train)),
            "threshold": threshold,
            "budgets": args.budgets,
            "seeds": seeds,
            "retrain_folds": args.retrain_folds,
            "guards": {"min_labels": args.min_labels, "min_per_class": args.min_per_class},
            "base": base_row,
            "summary": summarise(runs, args.budgets, seeds),
            "runs": runs,
            "base_temperature_fit_on": base.data.get("classifier", {}).get("training", {}).get("temperature_fit_on"),
            "machine": f"{os.cpu_count()}-core CPU, torch threads {args.threads}",
            "load_average_at_start": load0,
            "seconds": {"candidates": round(collect_s, 1), "total": round(time.perf_counter() - t0, 1)},
        }
        if args.output:  # written after every seed: an interrupted run keeps its complete seeds
            from LesionSegLib.engine.atomic import write_text

            write_text(args.output, json.dumps(report, indent=2) + "\n")
        return report

    runs = []
    for n, seed in enumerate(args.seeds):
        rng = np.random.default_rng(seed)
        chosen = sorted(rng.choice(len(train), min(args.pool_cases, len(train)), replace=False).tolist())
        pool = [(i, train[i]) for i in chosen]
        n_pool = sum(len(c.decisions) for _, c in pool)
        for budget in args.budgets:
            for order in ORDERS:
                picked = queue(pool, order, threshold, np.random.default_rng(1000 + seed))[:budget]
                decisions = [train[ci].decisions[k] for ci, k in picked]
                db = work / f"s{seed}_b{budget}_{order}.db"
                with FeedbackStore(db) as store:
                    store.record_many(decisions)
                n_true = sum(d.decision == "accepted" for d in decisions)
                run = {"seed": seed, "budget": budget, "order": order, "pool_cases": [train[i].name for i in chosen],
                       "pool_candidates": n_pool, "reviewed": len(decisions), "reviewed_true": n_true}
                t = time.perf_counter()
                try:
                    res = retrain(db, str(base.folder), output=f"ro-s{seed}-b{budget}-{order}", folds=args.retrain_folds,
                                  seed=seed, min_labels=args.min_labels, min_per_class=args.min_per_class)
                    cm = ConfidenceModel.from_card(res.card)
                    conf = [cm.predict(c.patches.astype(np.float32), c.features) if len(c.old_conf) else np.zeros(0)
                            for c in held]
                    run["retrained"] = True
                except LesionSegError as exc:  # the guards refused: the base classifier stays in use
                    conf = base_conf
                    run.update({"retrained": False, "refused": str(exc)})
                run.update({**score(conf, held), **at_threshold(conf, gt, n_gt, threshold),
                            "seconds": round(time.perf_counter() - t, 1)})
                runs.append(run)
                log(f"  seed {seed} budget {budget:3d} {order:11s}: {len(decisions)} reviewed ({n_true} true) -> "
                    f"AUC {_f(run['auc'])} Brier {_f(run['brier'])}" + ("" if run["retrained"] else "  (refused: base kept)"))
        report = write_report(runs, args.seeds[: n + 1])

    print(f"review order on {report['held_apart_candidates']} held-apart candidates "
          f"({report['held_apart_true_candidates']} true); base AUC {_f(base_row['auc'])}, Brier {_f(base_row['brier'])}")
    print(f"  {'budget':>6s} {'order':11s} {'AUC mean+-sd':>16s} {'Brier':>7s} {'FP/case':>8s} {'true rev.':>9s} {'refused':>7s} "
          f"{'AUC wins':>8s} {'Brier wins':>10s}")
    for budget, by_order in report["summary"].items():
        for o, v in by_order.items():
            print(f"  {budget:>6s} {o:11s} {_f(v['auc']['mean']):>8s}+-{_f(v['auc']['sd'])} {_f(v['brier']['mean']):>7s} "
                  f"{_f(v['fp_per_case']['mean'], '.2f'):>8s} {v['reviewed_true_mean']:9.1f} {v['refused']:7d} "
                  f"{v['auc_wins']:8.1f} {v['brier_wins']:10.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark: retrain the confidence classifier from 500 reviewed lesions (target <= 30 s on 2 CPU cores).

    python Testing/benchmarks/bench_retrain.py [--model NAME|FOLDER] [--n 500] [--threads 2] \
        [--json Resources/evaluation/bench_retrain.json]

1. Reviewed lesions: the model segments the shared cases with confidence threshold 0 (every
   candidate, with its features and adaptive patch; probability threshold ``--prob-threshold``,
   low so that false positives appear, as in the classifier's own training), first the original
   images, then perturbed copies (``train_cls.perturbed``: flips, noise, HU shift), and a reviewer
   following the ground truth accepts (true lesion) or rejects (false positive) each one; the
   decisions go into a fresh feedback database through the same ``FeedbackStore.record`` the
   LesionSeg module uses.  Should that still give fewer than ``--n`` candidates, the remainder are
   mirrored copies of real ones (patch flipped along an axis, same features and label); the
   printout says how many.
2. Timed: ``retrain()`` end to end, exactly what ``lesionseg retrain --feedback DB`` runs:
   reading and decompressing the decisions, patch embeddings, 5-fold cross-validation grouped by
   patient (a perturbed copy ``<case>~k`` is in its case's fold; old vs new AUC / ECE), the final fit, writing the new model version (card, sha256,
   weights, validation plot).

Prints a table and a JSON line (with ``--json``, also written to that file, with the command
line, the number of real candidates and of mirrored copies, and the load average of the machine).
Not a timed test: the figure depends on the machine.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parents[2] / "LesionSeg"))


def default_model() -> str:
    from LesionSegLib.engine import models

    builtin = [c for c in models.list_models() if c.builtin and c.name == models.DEFAULT_MODEL]
    if builtin:
        return str(builtin[0].folder)
    raise SystemExit("no model: install the default model or pass --model")


def collect(engine, n: int, case_names, views: int, log):
    """Reviewed lesions from the original cases first, then from perturbed copies (view 1, 2...)."""
    from LesionSegLib.engine import data as dataset
    from LesionSegLib.engine.io.images import read_image, read_label
    from LesionSegLib.engine.segment.pipeline import case_hash
    from LesionSegLib.engine.learn.labels import candidates_with_labels
    from LesionSegLib.engine.learn.train_cls import perturbed
    from LesionSegLib.review import Decision

    rng = np.random.default_rng(0)
    out = []
    for view in range(views + 1):
        for name in case_names:
            c = dataset.case(name)
            img = read_image(c.image)
            lab = read_label(c.label, img)
            if view:
                img, lab = perturbed(img, lab, rng)
            res, m, _, _ = candidates_with_labels(engine, img, lab)
            h = case_hash(img)
            label = name if not view else f"{name}~{view}"
            for les, tp in zip(res.lesions, m.is_tp):
                out.append(Decision.from_lesion(label, h, res.model_id, les, "accepted" if tp else "rejected", "bench"))
            log(f"  {label}: {len(res.lesions)} candidates ({int(m.is_tp.sum())} true); {len(out)} so far")
            if len(out) >= n:
                return out[:n]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--prob-threshold", type=float, default=0.1,
                    help="probability threshold forming the candidates (low: more false positives, as in classifier training)")
    ap.add_argument("--views", type=int, default=3, help="perturbed copies of each case to draw more candidates from")
    ap.add_argument("--workdir", default=None, help="keep the database and model here (default: a temporary folder)")
    ap.add_argument("--reuse-db", action="store_true", help="time retraining on <workdir>/feedback.db from an earlier run")
    ap.add_argument("--json", default=None, help="also write the report to this JSON file")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench_retrain_"))
    work.mkdir(parents=True, exist_ok=True)
    os.environ["LESIONSEG_MODELS"] = str(work / "models")  # new versions go here, not into ~/.lesionseg

    from LesionSegLib.engine import data as dataset
    from LesionSegLib.engine.feedback import FeedbackStore
    from LesionSegLib.engine.segment.pipeline import Engine
    from LesionSegLib.engine.learn.retrain import retrain
    from dataclasses import replace

    model = args.model or default_model()
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    db = work / "feedback.db"
    if args.reuse_db and db.exists():
        log(f"reusing {db}")
        with FeedbackStore(db, readonly=True) as st:
            rows = st.decisions()
        n_real = sum(1 for r in rows if r["lesion_id"] < 100_000)
        n_total = len(rows)
        collect_s = record_s = 0.0
    else:
        log(f"model {model}; collecting {args.n} reviewed lesions...")
        t = time.perf_counter()
        engine = Engine(model, device="cpu")
        engine.prob_threshold = args.prob_threshold
        pool = [c.name for c in dataset.cases()]  # all STS cases, the full-scan lung CT and the LIDC case
        decisions = collect(engine, args.n, pool, args.views, log)
        n_real = len(decisions)
        rng = np.random.default_rng(0)
        k = 0
        while len(decisions) < args.n:  # mirrored copies of real lesions
            src = decisions[k % n_real]
            axis = 1 + int(rng.integers(3))
            cx, cy, cz = src.centroid_lps
            decisions.append(replace(src, patch=np.ascontiguousarray(np.flip(src.patch, axis)),
                                     centroid_lps=(cx + 1000.0 + k, cy, cz), lesion_id=100_000 + k))
            k += 1
        collect_s = time.perf_counter() - t
        if db.exists():
            db.unlink()
        store = FeedbackStore(db)
        t = time.perf_counter()
        store.record_many(decisions)
        record_s = time.perf_counter() - t
        store.close()
        n_total = len(decisions)

    t = time.perf_counter()
    res = retrain(db, model, output=f"bench@{int(time.time())}", folds=args.folds, min_labels=10, min_per_class=2)
    retrain_s = time.perf_counter() - t
    tm = res.card.data["retraining"]["timings"]
    c = res.label_counts
    report = {
        "lesions": n_total,
        "real_candidates": n_real,
        "mirrored_copies": n_total - n_real,
        "labels": {"true": c["positive"], "false": c["negative"], "cases": c["cases"]},
        "retrain_seconds": round(retrain_s, 2),
        "target_seconds": 30,
        "within_target": retrain_s <= 30.0,
        "stages_s": tm,
        "record_seconds": round(record_s, 2),
        "db_mb": round(db.stat().st_size / 1e6, 2),
        "collect_seconds": round(collect_s, 1),
        "validation": res.metrics["validation"],
        "auc_before": res.metrics["old"]["auc"],
        "auc_after": res.metrics["new"]["auc"],
        "ece_before": res.metrics["old"]["ece"],
        "ece_after": res.metrics["new"]["ece"],
        "model": res.card.id,
        "base_model": res.card.data["parent"]["id"],
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "load_average": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "command": "python Testing/benchmarks/bench_retrain.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    f = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    print(f"retrain benchmark: {report['lesions']} reviewed lesions ({n_real} engine candidates, "
          f"{report['mirrored_copies']} mirrored copies; {c['positive']} true / {c['negative']} false; {c['cases']} cases)")
    print(f"  base model {report['base_model']} -> {report['model']}; {report['threads']} torch threads on "
          f"{report['cpu_count']} cores; load average {report['load_average']}")
    print(f"  {'stage':28s} {'seconds':>8s}")
    for name, key in (("patch embeddings", "embeddings_s"), (f"{args.folds}-fold CV (by patient)", "cross_validation_s"),
                      ("final fit", "final_fit_s")):
        print(f"  {name:28s} {tm[key]:8.2f}")
    print(f"  {'retrain() total':28s} {retrain_s:8.2f}   target <= 30 s: {'PASS' if report['within_target'] else 'MISS'}")
    if args.reuse_db:
        print(f"  (database reused from an earlier run: {report['db_mb']} MB)")
    else:
        print(f"  (recording the {n_total} decisions: {record_s:.2f} s; database {report['db_mb']} MB; "
              f"collecting the candidates took {collect_s:.0f} s)")
    print(f"  AUC before {f(report['auc_before'])} after {f(report['auc_after'])}; "
          f"ECE before {f(report['ece_before'])} after {f(report['ece_after'])}")
    print(json.dumps(report))
    if args.json:
        from LesionSegLib.engine.atomic import write_text

        write_text(Path(args.json), json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

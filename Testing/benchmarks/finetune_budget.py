"""Time ``lesionseg finetune`` with its defaults on 5 corrected scans (issue budget: <= 15 min on 2 cores).

    python Testing/benchmarks/finetune_budget.py -o Resources/evaluation/finetune_budget.json

A reviewer is simulated from ground truth (:mod:`LesionSegLib.engine.learn.simulate_review`) on
five real scans of ``$LESIONSEG_DATA``: the three chest CTs and two sarcoma training cases
(STS_001, STS_002), into a fresh feedback store.  Then the whole ``lesionseg finetune --feedback DB
--base-model sts-clcs -o NAME`` command runs as a user would start it (default steps, replay,
threads, held-apart cases), into a temporary model folder, and its wall time is measured.  The
JSON holds the command, the wall time, the card's own timing breakdown, its held-apart and
base-domain figures, and the load average.
Timing only: the accuracy of fine-tuning is ``finetune_chest.py``'s.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO / "LesionSeg")]
SCANS = ["lung1", "lung2", "LIDC-IDRI-0001", "STS_001", "STS_002"]
BUDGET_MIN = 15.0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-o", "--out", required=True)
    ap.add_argument("--base-model", default="sts-clcs")
    args = ap.parse_args(argv)
    from LesionSegLib.engine import data as dataset
    from LesionSegLib.engine.atomic import write_text
    from LesionSegLib.engine.feedback import FeedbackStore
    from LesionSegLib.engine.learn.finetune import _read_case
    from LesionSegLib.engine.learn.simulate_review import review_into
    from LesionSegLib.engine.segment.pipeline import Engine

    work = Path(tempfile.mkdtemp(prefix="finetune_budget-"))
    db = work / "feedback.db"
    base = Engine(args.base_model, device="cpu")
    store = FeedbackStore(db)
    review = {}
    t = time.perf_counter()
    for n in SCANS:
        img, lab = _read_case(dataset.case(n))
        review[n] = review_into(store, base, img, lab, n)
        print(n, review[n], flush=True)
    store.close()
    t_review = time.perf_counter() - t
    env = {**os.environ, "LESIONSEG_MODELS": str(work / "models")}
    cmd = [sys.executable, "-m", "LesionSegLib.engine.cli", "finetune", "--feedback", str(db), "--base-model", args.base_model,
           "-o", "budget-check", "--progress", "none"]
    load = [round(x, 2) for x in os.getloadavg()]
    t = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        print(proc.stderr[-2000:], file=sys.stderr)
        return 1
    card = json.loads(next((work / "models").rglob("card.json")).read_text())
    ft = card["finetuning"]
    result = {
        "command": "python Testing/benchmarks/finetune_budget.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "timed_command": "lesionseg finetune --feedback DB --base-model " + args.base_model + " -o budget-check --progress none",
        "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores", "load_average_at_start": load,
        "corrected_scans": SCANS, "simulated_review": review, "review_minutes": round(t_review / 60, 2),
        "wall_minutes": round(wall / 60, 2), "budget_minutes": BUDGET_MIN, "within_budget": wall / 60 <= BUDGET_MIN,
        "card_timing": {k: ft.get(k) for k in ("minutes", "total_minutes", "steps", "batch", "lr", "threads")},
        "train_cases": ft.get("train_cases"), "held_apart_cases": ft.get("held_apart_cases"),
        "replay_excluded_held_apart": ft.get("replay_excluded_held_apart"),
        "evaluation": ft.get("evaluation"), "base_domain_check": ft.get("base_domain_check"),
    }
    write_text(args.out, json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: result[k] for k in ("wall_minutes", "within_budget", "card_timing")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Does the segmenter fine-tuning fit the corrections it is trained on?

    OMP_NUM_THREADS=1 python Testing/benchmarks/finetune_fit.py -o Resources/evaluation/finetune_fit.json \
        [--lr 3e-4 1e-3 3e-4x10 1e-3:lesion-balanced 5e-4:lesion-balanced:neg0.5] [--steps 200] [--seeds 0 1]

The training half of one fold of ``finetune_chest.py`` (lung1 held out), judged on its own
training scans only, so no held-out scan is looked at:

1. A reviewer is simulated from ground truth on ``lung2`` and ``LIDC-IDRI-0001`` (as in
   ``finetune_chest.py``) with the shipped ``sts-clcs``.
2. For each ``--lr`` (one process each, one per core at a time, one thread; ``LRxM``: the decoder at ``M``
   times ``LR``, ``train_segmenter(decoder_lr_mult=M)``; ``LR:LOSS``: the fine-tuning loss,
   ``dicece`` by default or ``lesion-balanced``; ``:negQ``: lung negatives ``Q``, the fraction of the
   synthetic lung patches left lesion-free; ``--seeds``: each run once per seed), the segmenter is fine-tuned exactly as
   ``lesionseg finetune`` trains it (:class:`PatchSampler` with replay of STS_001-008 at 0.5 and
   synthetic lung lesions at 0.5, :func:`train_segmenter`, deep supervision, batch 2, seed 0 or ``--seeds``).
3. On the two training scans, with 4 synthetic lesions inserted into each (``synthetic_volume``,
   rng seed 5, the same for every run), a lesion counts as fitted when >= 50 % of its voxels have
   p > 0.5.  Also: p > 0.5 voxels outside the lesions, and Dice on three replay cases (STS_001-003,
   model grid) against the base model's.
"""
from __future__ import annotations

import argparse
import copy
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
BASE = str(REPO / "LesionSeg" / "LesionSegLib" / "models" / "sts-clcs")
TRAIN = ["lung2", "LIDC-IDRI-0001"]


def _score(engine, corrected, replay) -> dict:
    import cc3d

    from LesionSegLib.engine.learn.finetune_checks import segmenter_dice
    from LesionSegLib.engine.learn.synthetic import synthetic_volume
    from LesionSegLib.engine.runtime.ops import hu_windows

    windows = engine.seg_cfg["hu_windows"]
    lesions, outside = [], 0
    for c in corrected:
        real = c.label > 0
        hu, lab, _ = synthetic_volume(c.hu, real.astype(np.uint8), c.geometry["spacing_zyx"], np.random.default_rng(5), n_lesions=4)
        prob = engine.runner.probability(hu_windows(hu.astype(np.float32), windows))
        comps = cc3d.connected_components(lab > 0, connectivity=26)
        for k in range(1, int(comps.max()) + 1):
            m = comps == k
            lesions.append({"scan": c.case_name, "real": bool((m & real).any()), "voxels": int(m.sum()),
                            "fraction_p_over_half": round(float((prob[m] > 0.5).mean()), 3), "max_p": round(float(prob[m].max()), 3)})
        outside += int(((prob > 0.5) & ~(lab > 0)).sum())
    dice = [segmenter_dice(engine, x, y) for x, y in replay[:3]]
    fit = [les for les in lesions if les["fraction_p_over_half"] >= 0.5]
    return {"fitted": len(fit), "fitted_real": sum(les["real"] for les in fit), "lesions_real": sum(les["real"] for les in lesions),
            "lesions_synthetic": sum(not les["real"] for les in lesions), "p_over_half_voxels_outside": outside,
            "replay_dice_sts001_003": dice, "replay_dice_mean": round(float(np.mean(dice)), 4), "lesions": lesions}


def _load(db):
    import torch

    from LesionSegLib.engine import data as dataset
    from LesionSegLib.engine.learn.finetune import load_corrected
    from LesionSegLib.engine.learn.train_seg import load_training_case
    from LesionSegLib.engine.segment.pipeline import Engine

    torch.set_num_threads(1)
    engine = Engine(BASE, device="cpu", runtime="torch")
    seg = engine.seg_cfg
    corrected = load_corrected(db, None, 2, TRAIN)
    by = {c.name: c for c in dataset.cases()}
    replay = [load_training_case(by[n], seg["spacing_zyx"], seg["hu_windows"]) for n in dataset.STS_TRAIN[:8]]
    return engine, corrected, replay


def task(args):
    db, spec, steps, seed, named_seed = args
    import torch

    from LesionSegLib.engine.learn.finetune_train import PatchSampler, train_segmenter

    engine, corrected, replay = _load(db)
    if spec is None:
        return "base", {"train": None, **_score(engine, corrected, replay)}
    lr, mult, loss, neg = _spec(spec)
    torch.manual_seed(seed)
    seg = engine.seg_cfg
    net = copy.deepcopy(engine.segmenter)
    sampler = PatchSampler(corrected, replay, seg["roi_size"], seg["hu_windows"], seed, 0.5, neg)
    log = train_segmenter(net, sampler, steps, None, lr, 2, 0.5, decoder_lr_mult=mult, loss=loss)
    engine.segmenter = net
    name = (f"lr {lr:g}" + (f" decoder x{mult:g}" if mult != 1 else "") + (f" {loss}" if loss != "dicece" else "")
            + (f" lung-negatives {neg:g}" if neg else "") + (f" seed {seed}" if named_seed else ""))
    return name, {"train": {"lr": lr, "decoder_lr_mult": mult, "loss": loss, "lung_negatives": neg, "seed": seed,
                            "synthetic_patches": sampler.n_synthetic, "lung_negative_patches": sampler.n_lung_negatives, **log},
                  **_score(engine, corrected, replay)}


def _spec(text: str) -> tuple[float, float, str, float]:
    """``"3e-4"`` -> (3e-4, 1.0, "dicece", 0.0); ``"3e-4x10"`` -> (3e-4, 10.0, "dicece", 0.0);
    ``"1e-3:lesion-balanced"`` -> (1e-3, 1.0, "lesion-balanced", 0.0);
    ``"5e-4:lesion-balanced:neg0.5"`` -> (5e-4, 1.0, "lesion-balanced", 0.5) (lung negatives)."""
    from LesionSegLib.engine.learn.finetune_train import FINETUNE_LOSSES

    text, _, rest = text.partition(":")
    loss, _, neg = rest.partition(":")
    lr, _, mult = text.partition("x")
    loss = loss or "dicece"
    if loss not in FINETUNE_LOSSES or (neg and not neg.startswith("neg")):
        raise ValueError(rest)
    q = float(neg[3:]) if neg else 0.0
    if not 0.0 <= q <= 1.0:
        raise ValueError(neg)
    return float(lr), float(mult or 1), loss, q


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-o", "--out", required=True)
    ap.add_argument("--lr", nargs="+", default=["3e-4", "1e-3"], help="peak learning rates; LRxM: decoder at M x LR; "
                    "LR[xM]:LOSS: the loss (dicece, lesion-balanced); LR[xM]:LOSS:negQ: lung negatives Q")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0], help="every run once per seed (sampler and torch)")
    args = ap.parse_args(argv)
    try:
        [_spec(s) for s in args.lr]
    except ValueError:
        ap.error(f"--lr: expected LR, LRxM or LR[xM]:LOSS[:negQ] (dicece, lesion-balanced; 0 <= Q <= 1), got {' '.join(args.lr)}")
    from LesionSegLib.engine import data as dataset
    from LesionSegLib.engine.atomic import write_text
    from LesionSegLib.engine.feedback import FeedbackStore
    from LesionSegLib.engine.learn.finetune import _read_case
    from LesionSegLib.engine.learn.simulate_review import review_into
    from LesionSegLib.engine.segment.pipeline import Engine

    t0 = time.perf_counter()
    load = [round(x, 2) for x in os.getloadavg()]
    db = Path(tempfile.mkdtemp(prefix="finetune_fit-")) / "feedback.db"
    base = Engine(BASE, device="cpu")
    store = FeedbackStore(db)
    review = {}
    for n in TRAIN:
        img, lab = _read_case(dataset.case(n))
        review[n] = review_into(store, base, img, lab, n)
    store.close()
    named = len(args.seeds) > 1
    jobs = [(str(db), None, args.steps, 0, False)] + [(str(db), lr, args.steps, seed, named) for seed in args.seeds for lr in args.lr]
    with mp.get_context("spawn").Pool(min(len(jobs), os.cpu_count() or 1)) as pool:
        runs = dict(pool.map(task, jobs, chunksize=1))
    result = {
        "command": "OMP_NUM_THREADS=1 python Testing/benchmarks/finetune_fit.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores; one process per run, {min(len(jobs), os.cpu_count() or 1)} at a time",
        "load_average_at_start": load, "base_model": base.card.id, "training_scans": TRAIN, "simulated_review": review,
        "protocol": "segmenter fine-tuned as lesionseg finetune trains it (replay STS_001-008 at 0.5, synthetic lung lesions at 0.5, "
                    f"batch 2, seed {' / '.join(map(str, args.seeds))}); scored on its own training scans with 4 synthetic lesions "
                    "inserted into each (rng seed 5); "
                    "a lesion is fitted when >= 50 % of its voxels have p > 0.5",
        "runs": runs, "minutes": round((time.perf_counter() - t0) / 60, 2),
    }
    write_text(args.out, json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: {kk: vv for kk, vv in v.items() if kk != "lesions"} for k, v in runs.items()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

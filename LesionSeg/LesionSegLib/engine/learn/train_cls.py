"""Train the CLCS confidence classifier for a trained segmenter and assemble the model.

    python -m LesionSegLib.engine.learn.train_cls --segmenter runs/seg -o LesionSeg/LesionSegLib/models/sts-clcs

``--segmenter`` is a folder written by ``train_seg`` (``segmenter.json`` + weights) or a model
folder whose ``card.json`` names the segmenter (its ``segmenter`` section and the record of how
the segmenter was trained are kept; ``-o`` may be that same folder).

1. Candidates: the segmenter runs on the training cases (STS_001-033), on the original image
   and on ``--views`` perturbed copies (flips, noise, HU shift).  Clusters are formed at the
   model's probability threshold (0.5, as at inference) and at ``--low-threshold``; a
   low-threshold cluster that contains a cluster of the model's threshold is the same object
   and is not added again, so each object counts once per image.  The perturbed copies are
   augmented samples of the same objects: the card counts them apart from the distinct clusters
   of the original images.
2. Labels: the matching rule of :mod:`..evaluate.matching` (IoU >= 0.1 or >= 50 % inside a GT lesion).
3. The classifier is trained on all of them.  Its calibration is fitted on **out-of-fold logits
   of the training clusters** by Platt scaling (a temperature and a shift: the class-weighted loss
   raises every logit by about log(N- / N+), which a temperature alone cannot undo; the shift is
   folded into the head's last bias, see :func:`..segment.classifier.fit_platt`), with
   ``--cal-folds``-fold cross-validation grouped by case over the
   training cases (a case and its perturbed copies are in one fold), each fold's classifier
   scoring the clusters of the original images of its held-out cases.  The validation cases
   are never used to fit anything.
4. The model card gets validation figures on STS_034-041 only: Dice (confidence >= 0.5, union of
   lesions, on the original grid), FROC sensitivity at 0.5 FP/case, CPM, cluster AUC and ECE
   (labelled with where the calibration was fitted), and the sha256 of every file.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .. import data as dataset
from ..atomic import write_text
from ..evaluate.matching import detections, gt_components, match
from ..io.images import read_image, read_label
from ..models import CARD_NAME, ModelCard, sha256_file
from ..segment.classifier import fit_platt, fit_temperature, save_classifier, train_classifier
from ..segment.features import feature_matrix
from ..segment.pipeline import Engine
from .labels import candidates_with_labels

CAL_FOLDS = 5


def perturbed(image: sitk.Image, label: sitk.Image, rng: np.random.Generator):
    """A flipped / noisy / HU-shifted copy of image and label on the same grid."""
    a = sitk.GetArrayFromImage(image).astype(np.float32)
    b = sitk.GetArrayFromImage(label)
    for axis in (0, 1, 2):
        if rng.random() < 0.5:
            a = np.flip(a, axis)
            b = np.flip(b, axis)
    a = a + rng.normal(0, rng.uniform(5, 25), a.shape).astype(np.float32) + rng.uniform(-30, 30)
    img = sitk.GetImageFromArray(np.ascontiguousarray(a))
    img.CopyInformation(image)
    lab = sitk.GetImageFromArray(np.ascontiguousarray(b))
    lab.CopyInformation(label)
    return img, lab


def image_clusters(engine: Engine, image, label, thresholds) -> tuple[list, list[int], int]:
    """Clusters of one image at ``thresholds`` (the model's first), each object once.

    Returns ``(lesions, is_tp, n_dropped)``: a cluster at a later (lower) threshold overlapping a
    cluster already taken is the same object grown and is dropped (counted in ``n_dropped``).
    """
    canonical, hu, sp = engine.prepare(image)
    prob, timings = engine.probability(hu, sp)
    gt, n_gt = gt_components(sitk.GetArrayFromImage(label))
    taken = None
    lesions, is_tp, dropped = [], [], 0
    for thr in thresholds:
        res = engine.lesions_from_probability(image, canonical, hu, sp, prob, timings, 0.0, keep_patches=True,
                                              prob_threshold=thr)
        m = match(res.labelmap, gt, len(res.lesions), n_gt)
        seen = set(np.unique(res.labelmap[taken]).tolist()) if taken is not None else set()
        for les, tp in zip(res.lesions, m.is_tp):
            if les.lesion_id in seen:
                dropped += 1
                continue
            lesions.append(les)
            is_tp.append(int(tp))
        mask = res.labelmap > 0
        taken = mask if taken is None else (taken | mask)
    return lesions, is_tp, dropped


def collect_training_clusters(engine: Engine, names, by_name, views: int, low_threshold: float, rng, log=print) -> dict:
    """Labelled clusters of the training cases (original images and ``views`` perturbed copies)."""
    patches, feats, labels, groups, view_of = [], [], [], [], []
    dropped = 0
    thresholds = [engine.prob_threshold] + ([low_threshold] if low_threshold < engine.prob_threshold else [])
    for i, n in enumerate(names):
        img = read_image(by_name[n].image)
        lab = read_label(by_name[n].label, img)
        todo = [(img, lab)] + [perturbed(img, lab, rng) for _ in range(views)]
        for v, (im, lb) in enumerate(todo):
            lesions, is_tp, d = image_clusters(engine, im, lb, thresholds)
            dropped += d
            for les, tp in zip(lesions, is_tp):
                patches.append(les.patch)
                feats.append(les.features)
                labels.append(tp)
                groups.append(n)
                view_of.append(v)
        log(f"[{i + 1}/{len(names)}] {n}: {len(labels)} samples so far ({int(np.sum(labels))} TP)")
    return {"patches": np.stack(patches).astype(np.float32), "features": feature_matrix(feats),
            "labels": np.asarray(labels, np.int64), "groups": groups, "view": np.asarray(view_of),
            "dropped_same_object": dropped, "thresholds": thresholds}


def sample_counts(d: dict) -> dict:
    """What the training set holds: distinct clusters of the original images vs augmented samples."""
    y, orig = d["labels"], d["view"] == 0
    return {
        "samples": int(len(y)), "samples_tp": int(y.sum()), "samples_fp": int(len(y) - y.sum()),
        "distinct_clusters_original_images": int(orig.sum()), "distinct_tp": int(y[orig].sum()),
        "distinct_fp": int(orig.sum() - y[orig].sum()),
        "augmented_samples": int((~orig).sum()), "cases": len(set(d["groups"])),
        "dropped_same_object_at_low_threshold": int(d["dropped_same_object"]),
        "prob_thresholds": [float(t) for t in d["thresholds"]],
    }


def out_of_fold_calibration(d: dict, k: int, epochs: int, seed: int, log=print) -> dict:
    """Platt calibration (temperature and shift) from out-of-fold logits of the original-image
    training clusters (folds grouped by case)."""
    from sklearn.model_selection import StratifiedGroupKFold

    from ..evaluate.metrics import calibration, cluster_auc

    y = d["labels"]
    orig = d["view"] == 0
    k = max(2, min(k, len(set(d["groups"]))))
    oof = np.full(len(y), np.nan)
    cv = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    for f, (train, test) in enumerate(cv.split(np.zeros(len(y)), y, groups=d["groups"])):
        test = test[orig[test]]
        cm, _ = train_classifier(d["patches"][train], d["features"][train], y[train], epochs=epochs, seed=seed + 1 + f)
        oof[test] = cm.logits(d["patches"][test], d["features"][test])
        log(f"calibration fold {f + 1}/{k}: {len(test)} held-out clusters scored")
    s = ~np.isnan(oof)
    t, shift = fit_platt(oof[s], y[s])
    cal = calibration(1.0 / (1.0 + np.exp(-(oof[s] + shift) / t)), y[s])
    alone = calibration(1.0 / (1.0 + np.exp(-oof[s] / fit_temperature(oof[s], y[s]))), y[s])  # for the record
    return {"method": "platt", "temperature": float(t), "shift": float(shift), "folds": k, "n": int(s.sum()), "n_tp": int(y[s].sum()),
            "oof_auc": cluster_auc(oof[s], y[s]), "oof_ece_after_fit": None if cal is None else cal["ece"],
            "oof_ece_temperature_alone": None if alone is None else alone["ece"]}


def evaluate_cases(engine: Engine, names, by_name, threshold: float) -> dict:
    """Validation figures for the model card, with the metric functions of ``lesionseg evaluate``."""
    from ..evaluate.metrics import calibration, cluster_auc, dice_score, froc

    dices, tp_scores, fp_scores, conf_all, mp_all, tp_all = {}, [], [], [], [], []
    for n in names:
        img = read_image(by_name[n].image)
        lab = read_label(by_name[n].label, img)
        res, m, gt, n_gt = candidates_with_labels(engine, img, lab)
        conf = np.array([les.confidence for les in res.lesions])
        det, fp = detections(m, conf)
        tp_scores += conf[det].tolist() + [None] * (n_gt - int(det.sum()))
        fp_scores += conf[fp].tolist()
        conf_all.append(conf)
        mp_all.append(np.array([les.mean_probability for les in res.lesions]))
        tp_all.append(m.is_tp)
        keep_ids = [les.lesion_id for les in res.lesions if les.confidence >= threshold]
        dices[n] = dice_score(np.isin(res.labelmap, keep_ids) & (res.labelmap > 0), gt > 0)
    conf_all = np.concatenate(conf_all)
    tp_all = np.concatenate(tp_all)
    fr = froc(tp_scores, fp_scores, len(names))
    cal = calibration(conf_all, tp_all)
    cal_mp = calibration(np.concatenate(mp_all), tp_all)
    return {
        "dice_mean": float(np.mean(list(dices.values()))),
        "dice_per_case": {k: round(v, 4) for k, v in dices.items()},
        "n_clusters": int(len(tp_all)),
        "n_tp_clusters": int(tp_all.sum()),
        "cluster_auc": cluster_auc(conf_all, tp_all),
        "cluster_auc_mean_probability": cluster_auc(np.concatenate(mp_all), tp_all),
        "ece": None if cal is None else cal["ece"],
        "ece_mean_probability": None if cal_mp is None else cal_mp["ece"],
        "sensitivity_at_fp": dict(zip(fr["fp_rates"], fr["sensitivity"])),
        "cpm": fr["cpm"],
    }


def _git_commit() -> dict:
    """The commit of the code that runs (and whether the engine had uncommitted changes)."""
    root = Path(__file__).resolve().parents[4]
    try:
        run = dict(capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=10)  # not the locale's code page
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], **run)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--", "LesionSeg/LesionSegLib/engine"], **run)
    except (OSError, subprocess.SubprocessError):
        return {"commit": None}
    if head.returncode != 0:
        return {"commit": None}
    return {"commit": head.stdout.strip(), "engine_modified": bool(dirty.stdout.strip())}


def read_segmenter(src: Path) -> tuple[dict, dict, Path]:
    """``(segmenter section, its training record, weights file)`` of a train_seg folder or a model folder."""
    if (src / "segmenter.json").exists():
        cfg = json.loads((src / "segmenter.json").read_text(encoding="utf-8"))
        training = cfg.pop("training", {})
    elif (src / CARD_NAME).exists():
        card = json.loads((src / CARD_NAME).read_text(encoding="utf-8"))
        cfg = dict(card["segmenter"])
        training = dict(card.get("training", {}).get("segmenter", {}))
    else:
        raise SystemExit(f"{src} holds neither segmenter.json nor {CARD_NAME}")
    weights = src / cfg["file"]
    if cfg.get("sha256") and sha256_file(weights) != cfg["sha256"]:
        raise SystemExit(f"{weights} does not match the sha256 recorded beside it")
    return cfg, training, weights


def _r(v, digits=4):
    return None if v is None else round(float(v), digits)


def card_metrics(v: dict) -> dict:
    """The card's ``metrics`` from :func:`evaluate_cases`'s figures on the validation cases."""
    return {
        "val_dice": _r(v["dice_mean"]),
        "val_froc_sensitivity_at_0.5_fp": _r(v["sensitivity_at_fp"][0.5]),
        "val_cpm": _r(v["cpm"]),
        "val_cluster_auc": _r(v["cluster_auc"]),
        "val_cluster_auc_mean_probability": _r(v["cluster_auc_mean_probability"]),
        "val_ece": _r(v["ece"]),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--segmenter", required=True, help="folder written by train_seg, or a model folder (card.json)")
    ap.add_argument("-o", "--out", required=True, help="model folder to write (card.json + weights)")
    ap.add_argument("--name", default="sts-clcs")
    ap.add_argument("--version", default="1.0.0")
    ap.add_argument("--views", type=int, default=2, help="perturbed copies of each training case")
    ap.add_argument("--low-threshold", type=float, default=0.3, help="extra probability threshold for candidates")
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--cal-folds", type=int, default=CAL_FOLDS, help="folds (grouped by case) for the Platt calibration")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--segmenter-commit", default=None, help="commit that trained the segmenter (recorded in the card)")
    ap.add_argument("--segmenter-command", default=None, help="command that trained the segmenter (recorded in the card)")
    args = ap.parse_args(argv)
    t_start = time.time()
    code = _git_commit()  # before anything runs: the code that trains
    seg_cfg, training, weights = read_segmenter(Path(args.segmenter))
    if args.segmenter_command:
        training["command"] = args.segmenter_command
    if args.segmenter_commit:
        training["commit"] = args.segmenter_commit
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if weights.resolve() != (out / "segmenter.safetensors").resolve():
        shutil.copy(weights, out / "segmenter.safetensors")
    seg_cfg["file"] = "segmenter.safetensors"
    seg_cfg["sha256"] = sha256_file(out / "segmenter.safetensors")
    card = {
        "name": args.name,
        "version": args.version,
        "architecture": "clcs",
        "description": "CLCS on soft-tissue sarcoma CT: DynUNet segmenter + patch TP/FP classifier",
        "segmenter": seg_cfg,
        "postprocess": {"prob_threshold": 0.5, "min_size_mm3": 100.0},
        "confidence_threshold": 0.5,
    }
    engine = Engine(ModelCard(out, card), device="cpu", runtime="torch")
    by_name = {c.name: c for c in dataset.cases()}
    train_names = training.get("train_cases", dataset.STS_TRAIN)
    val_names = training.get("val_cases", dataset.STS_VAL)
    if set(train_names) & set(val_names):
        raise SystemExit(f"training and validation cases overlap: {sorted(set(train_names) & set(val_names))}")
    rng = np.random.default_rng(args.seed)

    d = collect_training_clusters(engine, train_names, by_name, args.views, args.low_threshold, rng)
    counts = sample_counts(d)
    print(f"classifier training set: {json.dumps(counts)}", flush=True)
    cal = out_of_fold_calibration(d, args.cal_folds, args.epochs, args.seed)
    cm, info = train_classifier(d["patches"], d["features"], d["labels"], epochs=args.epochs, seed=args.seed)
    cm.shift_logits(cal["shift"])  # into the head's last bias: the card keeps its one temperature field
    cm.temperature = cal["temperature"]
    fit_on = (f"out-of-fold logits of the {cal['n']} original-image training clusters of {counts['cases']} training "
              f"cases ({cal['folds']}-fold cross-validation grouped by case); the validation cases were not used")
    card["classifier"] = save_classifier(cm, out)
    card["classifier"]["training"] = {**info, "views": args.views, "low_threshold": args.low_threshold,
                                      "samples": counts, "temperature_fit_on": fit_on, "temperature_fit": cal}
    engine = Engine(ModelCard(out, card), device="cpu", runtime="torch")
    metrics = evaluate_cases(engine, val_names, by_name, card["confidence_threshold"])
    card["metrics"] = card_metrics(metrics)
    card["validation"] = {k: v for k, v in metrics.items() if k not in ("sensitivity_at_fp",)}
    card["validation"]["sensitivity_at_fp"] = {str(k): round(v, 4) for k, v in metrics["sensitivity_at_fp"].items()}
    card["validation"]["cases"] = list(val_names)
    card["validation"]["temperature_fit_on"] = fit_on
    card["data"] = {
        "source": "IBSI validation soft-tissue sarcoma CT (TCIA Soft-tissue-Sarcoma), CC BY 3.0; stored at ~1.95x1.95x3.27 mm",
        "train_cases": list(train_names),
        "val_cases": list(val_names),
        "matching_rule": "TP if IoU >= 0.1 or >= 50% of the cluster inside a GT lesion (26-connected, cc3d)",
    }
    card["training"] = {
        "segmenter": training,
        "classifier_command": "python -m LesionSegLib.engine.learn.train_cls " + " ".join(argv if argv is not None else sys.argv[1:]),
        "classifier_code": code,
        "classifier_minutes": round((time.time() - t_start) / 60, 1),
    }
    card["files"] = {f: sha256_file(out / f) for f in ("segmenter.safetensors", "classifier.safetensors")}
    write_text(out / CARD_NAME, json.dumps(card, indent=2) + "\n")
    print(json.dumps({"metrics": card["metrics"], "samples": counts, "temperature": cal}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

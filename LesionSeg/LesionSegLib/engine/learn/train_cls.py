"""Train the CLCS confidence classifier for a trained segmenter and assemble the model.

    python -m LesionSegLib.engine.learn.train_cls --segmenter runs/seg -o LesionSeg/LesionSegLib/models/sts-clcs

1. Candidates: the segmenter runs on the training cases (STS_001-033), on the original image
   and on ``--views`` perturbed copies (flips, noise, HU shift), at probability thresholds
   0.5 and ``--low-threshold``, so the classifier sees false positives as well as true ones.
2. Labels: the matching rule of :mod:`matching` (IoU >= 0.1 or >= 50 % inside a GT lesion).
3. The classifier is trained on those; its temperature is fitted on the validation clusters
   (STS_034-041, segmented once, as at inference).
4. The model card gets validation Dice (confidence >= 0.5, union of lesions, on the original
   grid), FROC sensitivity at 0.5 FP/case, CPM and cluster AUC, and the sha256 of every file.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .. import data as dataset
from ..segment.classifier import fit_temperature, save_classifier, train_classifier
from ..segment.features import feature_matrix
from ..io.images import read_image, read_label
from ..evaluate.matching import detections, gt_components, match
from .labels import candidates_with_labels
from ..models import ModelCard, sha256_file
from ..segment.pipeline import Engine


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


def evaluate_cases(engine: Engine, names, by_name, threshold: float) -> dict:
    """Validation figures for the model card, with the metric functions of ``lesionseg evaluate``."""
    from ..evaluate.metrics import cluster_auc, dice_score, froc

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
    return {
        "dice_mean": float(np.mean(list(dices.values()))),
        "dice_per_case": {k: round(v, 4) for k, v in dices.items()},
        "n_clusters": int(len(tp_all)),
        "n_tp_clusters": int(tp_all.sum()),
        "cluster_auc": cluster_auc(conf_all, tp_all),
        "cluster_auc_mean_probability": cluster_auc(np.concatenate(mp_all), tp_all),
        "sensitivity_at_fp": dict(zip(fr["fp_rates"], fr["sensitivity"])),
        "cpm": fr["cpm"],
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--segmenter", required=True, help="folder written by train_seg (segmenter.json + .safetensors)")
    ap.add_argument("-o", "--out", required=True, help="model folder to write (card.json + weights)")
    ap.add_argument("--name", default="sts-clcs")
    ap.add_argument("--version", default="1.0.0")
    ap.add_argument("--views", type=int, default=2, help="perturbed copies of each training case")
    ap.add_argument("--low-threshold", type=float, default=0.3, help="extra probability threshold for candidates")
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    t_start = time.time()
    seg_dir = Path(args.segmenter)
    seg_cfg = json.loads((seg_dir / "segmenter.json").read_text())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if seg_dir.resolve() != out.resolve():
        shutil.copy(seg_dir / seg_cfg["file"], out / "segmenter.safetensors")
    seg_cfg["file"] = "segmenter.safetensors"
    seg_cfg["sha256"] = sha256_file(out / "segmenter.safetensors")
    training = seg_cfg.pop("training", {})
    card = {
        "name": args.name,
        "version": args.version,
        "architecture": "clcs",
        "description": "CLCS on soft-tissue sarcoma CT: DynUNet segmenter + patch TP/FP classifier",
        "segmenter": seg_cfg,
        "postprocess": {"prob_threshold": 0.5, "min_size_mm3": 100.0},
        "confidence_threshold": 0.5,
    }
    engine = Engine(ModelCard(out, card), device="cpu")
    by_name = {c.name: c for c in dataset.cases()}
    train_names = training.get("train_cases", dataset.STS_TRAIN)
    val_names = training.get("val_cases", dataset.STS_VAL)
    rng = np.random.default_rng(args.seed)

    patches, feats, labels = [], [], []
    for i, n in enumerate(train_names):
        img = read_image(by_name[n].image)
        lab = read_label(by_name[n].label, img)
        views = [(img, lab)] + [perturbed(img, lab, rng) for _ in range(args.views)]
        for im, lb in views:
            canonical, hu, sp = engine.prepare(im)
            prob, timings = engine.probability(hu, sp)
            gt, n_gt = gt_components(sitk.GetArrayFromImage(lb))
            for thr in (engine.prob_threshold, args.low_threshold):
                res = engine.lesions_from_probability(im, canonical, hu, sp, prob, timings, 0.0, keep_patches=True, prob_threshold=thr)
                m = match(res.labelmap, gt, len(res.lesions), n_gt)
                for les, tp in zip(res.lesions, m.is_tp):
                    patches.append(les.patch)
                    feats.append(les.features)
                    labels.append(int(tp))
        print(f"[{i + 1}/{len(train_names)}] {n}: {len(labels)} candidates so far ({int(np.sum(labels))} TP)", flush=True)
    P = np.stack(patches).astype(np.float32)
    X = feature_matrix(feats)
    y = np.array(labels)
    print(f"classifier training set: {len(y)} clusters, {int(y.sum())} TP, {int(len(y) - y.sum())} FP", flush=True)
    cm, info = train_classifier(P, X, y, epochs=args.epochs, seed=args.seed)

    # temperature on the validation clusters (segmented once, as at inference)
    vp, vf, vy = [], [], []
    for n in val_names:
        img = read_image(by_name[n].image)
        lab = read_label(by_name[n].label, img)
        res, m, _, _ = candidates_with_labels(engine, img, lab)
        for les, tp in zip(res.lesions, m.is_tp):
            vp.append(les.patch)
            vf.append(les.features)
            vy.append(int(tp))
    if vy:
        cm.temperature = fit_temperature(cm.logits(np.stack(vp).astype(np.float32), feature_matrix(vf)), np.array(vy))
    card["classifier"] = save_classifier(cm, out)
    card["classifier"]["training"] = {**info, "views": args.views, "low_threshold": args.low_threshold, "temperature_fit_on": "validation clusters"}
    engine = Engine(ModelCard(out, card), device="cpu")
    metrics = evaluate_cases(engine, val_names, by_name, card["confidence_threshold"])
    card["metrics"] = {
        "val_dice": round(metrics["dice_mean"], 4),
        "val_froc_sensitivity_at_0.5_fp": round(metrics["sensitivity_at_fp"][0.5], 4),
        "val_cpm": round(metrics["cpm"], 4),
        "val_cluster_auc": None if metrics["cluster_auc"] is None else round(metrics["cluster_auc"], 4),
        "val_cluster_auc_mean_probability": None if metrics["cluster_auc_mean_probability"] is None else round(metrics["cluster_auc_mean_probability"], 4),
    }
    card["validation"] = {k: v for k, v in metrics.items() if k not in ("sensitivity_at_fp",)}
    card["validation"]["sensitivity_at_fp"] = {str(k): round(v, 4) for k, v in metrics["sensitivity_at_fp"].items()}
    card["data"] = {
        "source": "IBSI validation soft-tissue sarcoma CT (TCIA Soft-tissue-Sarcoma), CC BY 3.0; stored at ~1.95x1.95x3.27 mm",
        "train_cases": train_names,
        "val_cases": val_names,
        "matching_rule": "TP if IoU >= 0.1 or >= 50% of the cluster inside a GT lesion (26-connected, cc3d)",
    }
    card["training"] = {
        "segmenter": training,
        "classifier_command": "python -m LesionSegLib.engine.learn.train_cls " + " ".join(argv if argv is not None else sys.argv[1:]),
        "classifier_minutes": round((time.time() - t_start) / 60, 1),
    }
    card["files"] = {f: sha256_file(out / f) for f in ("segmenter.safetensors", "classifier.safetensors")}
    ModelCard(out, card).save()
    print(json.dumps(card["metrics"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

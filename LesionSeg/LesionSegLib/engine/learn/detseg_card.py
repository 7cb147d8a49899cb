"""Assemble a DetSeg3D model from the two trained stages and measure it (the model card).

    python -m LesionSegLib.engine.learn.detseg_card --run runs/detseg -o LesionSeg/LesionSegLib/models/sts-detseg

1. The stage weights (``detector.safetensors``, ``roi_segmenter.safetensors``) are copied with
   their configs; the patch classifier is taken from ``--classifier-from`` (default ``sts-clcs``,
   checksum verified), so CLCS confidences, review and retraining work unchanged.  With
   ``--classifier-own`` its head is then retrained on this model's own stage-2 clusters of the
   TRAINING cases (labelled by the matching rule; cross-validated grouped by case, temperature
   from the out-of-fold logits), because a classifier fitted on another segmenter's clusters
   mis-scores these masks (sts-clcs 1.1.0's classifier on sts-detseg 1.0.0: Dice 0.012).
2. The detector score's temperature is fitted on the clusters of the TRAINING cases
   (STS_001-033), never on the validation cases.
3. The confidence source (``classifier`` or ``detector``) is chosen on the TRAINING cases'
   clusters (:func:`choose_source`): the higher cluster AUC wins, ties going to the classifier.
   An own classifier counts with its out-of-fold AUC, since it was fitted on those clusters.
4. Both sources are then scored on the validation cases (STS_034-041), which choose nothing:
   cluster AUC, ECE, Dice at the confidence threshold, FROC sensitivity at 0.5 FP/case and CPM;
   the chosen source's figures become the card's ``metrics``.

    python -m LesionSegLib.engine.learn.detseg_card --rechoose MODEL_DIR

makes step 3 again for a built card (its weights unchanged) and writes the choice into it.
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
from ..evaluate.matching import detections
from ..evaluate.metrics import calibration, cluster_auc, dice_score, froc
from ..io.images import read_image, read_label
from ..io.preprocess import to_canonical
from ..models import ModelCard, get_card, sha256_file
from ..segment.classifier import fit_temperature

STAGES = ("detector", "roi_segmenter")


def assemble(run: Path, out: Path, name: str, version: str, classifier_from: str | None, roi_inference: dict | None = None,
             detector_inference: dict | None = None) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    card = {"name": name, "version": version, "architecture": "detseg",
            "description": "",
            "postprocess": {"prob_threshold": 0.5, "min_size_mm3": 100.0}, "confidence_threshold": 0.5,
            "confidence_source": "classifier"}
    for stage, src in zip(STAGES, ("detector", "roi")):
        part = json.loads((run / f"{src}.json").read_text(encoding="utf-8"))
        init = (part.get("training") or {}).get("init") or {}
        earlier = run / (Path(str(init.get("weights", ""))).stem + ".json") if init.get("weights") else None
        if earlier is not None and earlier.is_file():  # continued from earlier weights: their training counts too
            init["training"] = json.loads(earlier.read_text(encoding="utf-8")).get("training")
        fname = f"{stage}.safetensors"
        shutil.copy(run / part["file"], out / fname)
        part["file"], part["sha256"] = fname, sha256_file(out / fname)
        card[stage] = part
    card["detector"].update(detector_inference or {})  # stage-1 inference settings (flip TTA): see engine.DetSegEngine.detect
    roi = card["roi_segmenter"]
    roi.update(roi_inference or {})  # stage-2 inference settings (box re-fits, paste mode, flip TTA): see engine.DetSegEngine
    init = (roi.get("training") or {}).get("init") or {}
    card["description"] = (
        "DetSeg3D on soft-tissue sarcoma CT: anchor-free CenterFPN detector on a "
        f"{'x'.join(f'{v:g}' for v in card['detector']['grid_spacing_zyx'])} mm grid + MONAI {roi['network']['type']} per RoI "
        f"({'x'.join(str(v) for v in roi['roi_shape'])}, context"
        + (f", started from {init['from_model']}'s segmenter" if init.get("from_model") else "") + "), CLCS patch classifier")
    if classifier_from:
        parent = get_card(classifier_from)
        src = parent.verified_path("classifier")
        shutil.copy(src, out / "classifier.safetensors")
        card["classifier"] = {**parent.data["classifier"], "file": "classifier.safetensors",
                              "sha256": sha256_file(out / "classifier.safetensors"), "from_model": parent.id}
    return card


def from_model(model: Path, out: Path, name: str, version: str, classifier_from: str | None) -> dict:
    """A card to build again from a built model's stage weights (``--from-model``): the detector and
    RoI segmenter (checksum-verified), their configs and training records are kept; everything
    fitted after the stages (detector threshold and temperature, the classifier, the confidence
    source, the validation figures; the OOD statistics and ONNX records, which ``fit-ood`` and
    ``models export --write-card`` make) is made again by :func:`main`."""
    from ..models import read_card
    from .model_writer import release_history

    old = read_card(model)
    if old.architecture != "detseg":
        raise SystemExit(f"error: {old.id} is a {old.architecture} model, not a DetSeg3D one")
    out.mkdir(parents=True, exist_ok=True)
    card = {k: json.loads(json.dumps(v)) for k, v in old.data.items()
            if k not in ("classifier", "confidence_choice", "metrics", "validation", "ood", "onnx", "files")}
    shas = {f"{k}_sha256": old.data[k]["sha256"] for k in (*STAGES, "classifier", "ood")
            if isinstance(old.data.get(k), dict) and old.data[k].get("sha256")}  # reviews made with it count (labels.recorded_identities)
    card.update(name=name, version=version, built_from={"model": old.id, **shas, "training": old.data.get("training")},
                release_notes=release_history(name, version, old.data.get("release_notes")))
    for stage in STAGES:
        part = card[stage]
        shutil.copyfile(old.verified_path(stage), out / part["file"])
        part["sha256"] = sha256_file(out / part["file"])
        part["training"] = (old.data.get("training") or {}).get(stage)
        for k in ("temperature", "temperature_fit_on", "threshold_fit"):
            part.pop(k, None)
    card.pop("training", None)
    if classifier_from:
        parent = get_card(classifier_from)
        shutil.copy(parent.verified_path("classifier"), out / "classifier.safetensors")
        card["classifier"] = {**parent.data["classifier"], "file": "classifier.safetensors",
                              "sha256": sha256_file(out / "classifier.safetensors"), "from_model": parent.id}
    return card


def fit_detector_threshold(engine, names, by_name, recall: float = 0.9, lo: float = 0.01, hi: float = 0.1) -> tuple[float, dict]:
    """The detector's low threshold: the highest value in [lo, hi] at which ``recall`` of the
    lesions of ``names`` (training cases) still have a detection centred inside their box."""
    from ..detseg.boxes import gt_boxes

    best = []
    cfg = engine.det_cfg
    saved = cfg.get("threshold", hi)
    cfg["threshold"] = 1e-3
    try:
        for n in names:
            img = read_image(by_name[n].image)
            canonical, hu, sp = engine.prepare(img)
            lab = sitk.GetArrayFromImage(to_canonical(read_label(by_name[n].label, img)))
            dets = engine.detect(hu, sp)
            for b in gt_boxes(lab, sp):
                inside = np.all(np.abs(dets[:, :3] - b[:3]) <= b[3:] / 2, axis=1) if len(dets) else np.zeros(0, bool)
                best.append(float(dets[inside, 6].max()) if inside.any() else 0.0)
    finally:
        cfg["threshold"] = saved
    t = float(np.clip(np.quantile(best, 1 - recall), lo, hi)) if best else hi
    found = float(np.mean(np.asarray(best) >= t)) if best else 0.0
    return round(t, 4), {"lesions": len(best), "recall_at_threshold": round(found, 4), "target_recall": recall, "range": [lo, hi]}


def scored_cases(engine, names, by_name, sources=("classifier",)) -> dict[str, list[dict]]:
    """Per confidence source, per case: confidences, the match against the label, the labelmap
    and GT mask (for Dice).  The two stages run once per case; only the confidence differs."""
    from ..evaluate.matching import gt_components, match

    out = {s: [] for s in sources}
    for n in names:
        img = read_image(by_name[n].image)
        gt, n_gt = gt_components(sitk.GetArrayFromImage(read_label(by_name[n].label, img)))
        canonical, hu, sp = engine.prepare(img)
        prob, timings = engine.probability(hu, sp)
        for s in sources:
            engine.confidence_source = s
            res = engine.lesions_from_probability(img, canonical, hu, sp, prob, timings, 0.0)
            out[s].append({"case": n, "conf": np.array([les.confidence for les in res.lesions]),
                           "m": match(res.labelmap, gt, len(res.lesions), n_gt), "n_gt": n_gt,
                           "labelmap": res.labelmap, "ids": [les.lesion_id for les in res.lesions], "gt": gt > 0})
    return out


def figures(cases: list[dict], threshold: float) -> dict:
    tp_scores, fp_scores, dices = [], [], {}
    for c in cases:
        det, fp = detections(c["m"], c["conf"])
        tp_scores += c["conf"][det].tolist() + [None] * (c["n_gt"] - int(det.sum()))
        fp_scores += c["conf"][fp].tolist()
        keep = [i for i, s in zip(c["ids"], c["conf"]) if s >= threshold]
        dices[c["case"]] = round(dice_score(np.isin(c["labelmap"], keep) & (c["labelmap"] > 0), c["gt"]), 4)
    conf = np.concatenate([c["conf"] for c in cases])
    tp = np.concatenate([c["m"].is_tp for c in cases])
    fr = froc(tp_scores, fp_scores, len(cases))
    cal = calibration(conf, tp)
    sens = dict(zip(fr["fp_rates"], fr["sensitivity"])) if fr else {}
    return {"dice_mean": round(float(np.mean(list(dices.values()))), 4), "dice_per_case": dices,
            "sensitivity_at_0.5_fp": None if 0.5 not in sens else round(float(sens[0.5]), 4),
            "sensitivity_at_fp": {str(k): round(float(v), 4) for k, v in sens.items()},
            "cpm": None if not fr else round(float(fr["cpm"]), 4),
            "cluster_auc": None if (a := cluster_auc(conf, tp)) is None else round(a, 4),
            "ece": None if cal is None else round(cal["ece"], 4),
            "n_clusters": int(len(tp)), "n_tp_clusters": int(tp.sum())}


def card_metrics(measured: dict) -> dict:
    """The card's ``metrics`` from one confidence source's validation :func:`figures`."""
    m = measured
    return {"val_dice": m["dice_mean"], "val_froc_sensitivity_at_0.5_fp": m["sensitivity_at_0.5_fp"],
            "val_cpm": m["cpm"], "val_cluster_auc": m["cluster_auc"], "val_ece": m["ece"]}


def choose_source(card: dict, train_cases: dict[str, list[dict]], train_names) -> dict:
    """``{"source", "training_auc", "rule"}``: the confidence source with the higher cluster AUC on
    the training cases' clusters (``train_cases``: :func:`scored_cases` of them for both sources;
    an own classifier's AUC is its out-of-fold one); ties go to the classifier."""
    auc = {}
    for s, cases in train_cases.items():
        a = cluster_auc(np.concatenate([c["conf"] for c in cases]), np.concatenate([c["m"].is_tp for c in cases]))
        auc[s] = None if a is None else round(float(a), 4)
    oof = (((card.get("classifier") or {}).get("training") or {}).get("validation") or {}).get("new", {}).get("auc")
    if oof is not None:  # an own classifier was fitted on these clusters: its out-of-fold AUC is the fair one
        auc["classifier"] = round(float(oof), 4)
    best = "detector" if (auc.get("detector") or 0.0) > (auc.get("classifier") or 0.0) else "classifier"
    return {"source": best, "training_auc": auc,
            "rule": f"higher cluster AUC on the clusters of the training cases {train_names[0]}-{train_names[-1]} "
                    "(an own classifier: its out-of-fold AUC); ties go to the classifier; the validation cases choose nothing"}


def rechoose(folder: Path, train_names, by_name, threads: int) -> dict:
    """Choose a built card's confidence source again on the training cases and write it into the card."""
    from ..models import read_card
    from ..segment.pipeline import Engine

    card = read_card(folder)
    engine = Engine(card, device="cpu", threads=threads, runtime="torch")
    choice = choose_source(card.data, scored_cases(engine, train_names, by_name, ("classifier", "detector")), train_names)
    card.data["confidence_source"] = choice["source"]
    card.data["confidence_choice"] = choice
    v = card.data.get("validation") or {}
    if choice["source"] in v.get("confidence_sources", {}):
        m = v["confidence_sources"][choice["source"]]
        card.data["metrics"] = card_metrics(m)
        v["chosen"] = f"{choice['source']}: chosen on the training cases (see confidence_choice), not on these"
    card.save()
    return choice


def stage_minutes(record: dict) -> float:
    """A stage's training minutes, with those of the weights it continued from (``init.training``)."""
    earlier = ((record.get("init") or {}).get("training") or {})
    return float(record["minutes"]) + (stage_minutes(earlier) if earlier else 0.0)


def own_classifier(engine, names, by_name, out: Path) -> dict:
    """The card's classifier section after retraining its head on ``engine``'s clusters of ``names``."""
    from ..segment.classifier import save_classifier
    from .finetune import _read_case, retrain_classifier

    items = [(n, *_read_case(by_name[n])) for n in names]
    cm, info, _ = retrain_classifier(engine, items, engine.classifier)
    if not info.get("retrained"):
        raise SystemExit(f"error: the classifier could not be retrained: {info.get('reason')}")
    section = save_classifier(cm, out, "classifier.safetensors")
    section["from_model"] = engine.card.data["classifier"].get("from_model")
    section["training"] = {"what": "head retrained on this model's stage-2 clusters (thresholds 0.5 and 0.3)",
                           "cases": f"{names[0]}-{names[-1]} ({len(names)}, training)",
                           "label_counts": info["label_counts"], "validation": info["validation"], "trainer": info.get("trainer")}
    return section


def main(argv=None) -> int:
    from ..segment.pipeline import Engine

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", help="folder with detector.* and roi.* from train_detseg")
    ap.add_argument("-o", "--out")
    ap.add_argument("--rechoose", metavar="MODEL_DIR", help="only choose the confidence source of a built card again (step 3)")
    ap.add_argument("--from-model", metavar="MODEL", help="build from a built DetSeg3D model's stage weights instead of --run "
                    "(everything fitted after the stages is made again, e.g. with a mended calibration)")
    ap.add_argument("--name", default="sts-detseg")
    ap.add_argument("--version", default="1.0.0")
    ap.add_argument("--classifier-from", default="sts-clcs")
    ap.add_argument("--classifier-own", action="store_true",
                    help="retrain the classifier head on this model's clusters of the training cases")
    ap.add_argument("--roi-inference", default=None, metavar="JSON",
                    help='stage-2 inference keys for the card, e.g. \'{"refits": 3, "refit_tolerance": 1.2, "refit_growth": 1.1, '
                         '"paste": "lesion", "dedupe": true}\' (default: one pass per box, whole RoIs pasted)')
    ap.add_argument("--detector-inference", default=None, metavar="JSON",
                    help='stage-1 inference keys for the card, e.g. \'{"tta_flips": [[], [0], [1], [2], [0, 1], [0, 2], [1, 2], [0, 1, 2]]}\' '
                         "(default: one pass, no flips)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--train", nargs="*", default=None, help="cases for the temperature (default STS_001-033)")
    ap.add_argument("--val", nargs="*", default=None, help="cases scored (default STS_034-041)")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    by_name = {c.name: c for c in dataset.cases()}
    train_names, val_names = args.train or dataset.STS_TRAIN, args.val or dataset.STS_VAL
    if args.rechoose:
        print(json.dumps(rechoose(Path(args.rechoose), train_names, by_name, args.threads), indent=2))
        return 0
    if not ((args.run or args.from_model) and args.out):
        ap.error("--run (or --from-model) and -o are needed to build a card")
    t0 = time.time()
    out = Path(args.out)
    if args.from_model:
        card = from_model(args.from_model, out, args.name, args.version, args.classifier_from)
        for stage, extra in (("roi_segmenter", args.roi_inference), ("detector", args.detector_inference)):
            card[stage].update(json.loads(extra) if extra else {})
    else:
        card = assemble(Path(args.run), out, args.name, args.version, args.classifier_from,
                        json.loads(args.roi_inference) if args.roi_inference else None,
                        json.loads(args.detector_inference) if args.detector_inference else None)
    engine = Engine(ModelCard(out, card), device="cpu", threads=args.threads, runtime="torch")
    card["detector"]["threshold"], fit = fit_detector_threshold(engine, train_names, by_name)
    card["detector"]["threshold_fit"] = {**fit, "cases": f"{train_names[0]}-{train_names[-1]} (training)"}
    print(f"detector threshold {card['detector']['threshold']} ({fit})", flush=True)
    engine = Engine(ModelCard(out, card), device="cpu", threads=args.threads, runtime="torch")
    if args.classifier_own:
        card["classifier"] = own_classifier(engine, train_names, by_name, out)
        print(f"classifier retrained on own clusters: {json.dumps(card['classifier']['training']['label_counts'])}", flush=True)
        engine = Engine(ModelCard(out, card), device="cpu", threads=args.threads, runtime="torch")
    # detector-score temperature: fitted on the training cases' clusters, which also choose the source
    train_scored = scored_cases(engine, train_names, by_name, ("classifier", "detector"))
    tr = train_scored["detector"]
    p = np.clip(np.concatenate([c["conf"] for c in tr]), 1e-6, 1 - 1e-6)
    y = np.concatenate([c["m"].is_tp for c in tr])
    card["detector"]["temperature"] = round(fit_temperature(np.log(p / (1 - p)), y), 4)
    card["detector"]["temperature_fit_on"] = f"{len(y)} clusters ({int(y.sum())} TP) of the training cases {train_names[0]}-{train_names[-1]}"
    print(f"detector temperature {card['detector']['temperature']} from {len(y)} training clusters", flush=True)
    engine = Engine(ModelCard(out, card), device="cpu", threads=args.threads, runtime="torch")
    measured = {}
    for source, cases in scored_cases(engine, val_names, by_name, ("classifier", "detector")).items():
        measured[source] = figures(cases, card["confidence_threshold"])
        print(source, json.dumps({k: v for k, v in measured[source].items() if k != "dice_per_case"}), flush=True)
    choice = choose_source(card, train_scored, train_names)
    best = choice["source"]
    card["confidence_source"], card["confidence_choice"] = best, choice
    v = measured[best]
    card["metrics"] = card_metrics(v)
    card["validation"] = {"cases": val_names, "confidence_sources": measured,
                          "chosen": f"{best}: chosen on the training cases (see confidence_choice), not on these"}
    card["data"] = {"source": "IBSI validation soft-tissue sarcoma CT (TCIA Soft-tissue-Sarcoma), CC BY 3.0; stored at ~1.95x1.95x3.27 mm",
                    "train_cases": train_names, "val_cases": val_names,
                    "matching_rule": "TP if IoU >= 0.1 or >= 50% of the cluster inside a GT lesion (26-connected, cc3d)"}
    card["training"] = {stage: card[stage].pop("training") for stage in STAGES}
    card["training"]["card_minutes"] = round((time.time() - t0) / 60, 1)
    card["training"]["total_minutes_stages"] = round(sum(stage_minutes(card["training"][s]) for s in STAGES), 1)
    card["files"] = {f: sha256_file(out / f) for f in sorted(p.name for p in out.glob("*.safetensors"))}
    ModelCard(out, card).save()
    print(json.dumps(card["metrics"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

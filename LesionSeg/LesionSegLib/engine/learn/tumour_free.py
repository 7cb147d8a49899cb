"""Teach a CLCS confidence classifier what the tumour-free parts of a scan look like, the way a
reviewer would: every cluster the model shows there is rejected, then ``lesionseg retrain``.

    python -m LesionSegLib.engine.learn.tumour_free --from-model DIR -o OUT --version 1.2.0 [--base-commit REV]
    lesionseg models export OUT --write-card

Why: a model whose training scans are crops around one tumour has never been shown a scan region
without one, and its classifier calls some of the clusters it finds there lesions
(``Testing/benchmarks/framing.py``: sts-clcs 1.1.0 showed a false lesion on 7 of the 13
tumour-free slabs of the validation cases, up to confidence 0.86).

How (training cases of the base card only, ``data.train_cases``):

1. :func:`tumour_free_slabs`: the whole slices at least :data:`FREE_GAP_MM` from the tumour, in
   slabs of at least :data:`FREE_MIN_SLICES` slices, above and below it where the scan has them.
2. :func:`slab_rejections`: the base model segments each slab at threshold 0 (every candidate);
   each cluster is recorded as *rejected* in a feedback database, as the review panel records it.
3. :func:`~.retrain.retrain` (``mode="head"``, the training cases' own ground-truth clusters with
   ``include_gt``): the frozen patch encoder, the head fine-tuned, Platt calibration fitted on
   out-of-fold logits of those labels.
4. The release card (:func:`release_card`): the base's data and training records, the
   retraining's own record (labels, cross-validation), and validation on ``data.val_cases`` only
   (nothing is fitted there): the figures ``train_cls`` gives, plus the tumour-free slabs of those
   cases (:func:`slab_figures`).  Then ``lesionseg models export OUT --write-card`` records the
   ONNX exports.

The experiment behind it, with a control arm retrained without the slabs, is
``Testing/benchmarks/tumour_free_retrain.py``.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from .. import models

#: slabs of whole slices at least this far from the tumour ...
FREE_GAP_MM = 10.0
#: ... and at least this many slices thick
FREE_MIN_SLICES = 12
_SIDE_KEYS = ("below", "above")


def crop(image, lo, hi):
    """The sub-image of voxels ``lo`` (inclusive) to ``hi`` (exclusive), x y z."""
    import SimpleITK as sitk

    return sitk.RegionOfInterest(image, [int(b - a) for a, b in zip(lo, hi)], [int(v) for v in lo])


def tumour_free_slabs(img, gt: np.ndarray) -> dict:
    """``{"below"|"above": sub-image}``: the slabs of whole slices at least :data:`FREE_GAP_MM` from
    the tumour (``gt``, z y x) and at least :data:`FREE_MIN_SLICES` thick, where the scan has them."""
    z = np.flatnonzero(gt.any(axis=(1, 2)))
    if not z.size:
        raise ValueError("the label holds no tumour, so no slab can be told tumour-free")
    gap = int(np.ceil(FREE_GAP_MM / img.GetSpacing()[2]))
    size = img.GetSize()
    out = {}
    for side, (z0, z1) in zip(_SIDE_KEYS, ((0, int(z[0]) - gap), (int(z[-1]) + 1 + gap, size[2]))):
        if z1 - z0 >= FREE_MIN_SLICES:
            out[side] = crop(img, [0, 0, z0], [size[0], size[1], z1])
    return out


def read_case(name: str):
    """``(image, label image, tumour mask z y x)`` of a dataset case."""
    import SimpleITK as sitk

    from .. import data as dataset
    from ..io.images import read_image, read_label

    c = dataset.case(name)
    img = read_image(c.image)
    lab = read_label(c.label, img)
    return img, lab, sitk.GetArrayFromImage(lab) > 0


def iter_slabs(cases):
    """``(case name, side, slab image)`` for every tumour-free slab of the dataset ``cases``."""
    for name in cases:
        img, _, gt = read_case(name)
        for side, slab in tumour_free_slabs(img, gt).items():
            yield name, side, slab


def slab_rejections(engine, cases, log=print) -> list[dict]:
    """A *rejected* decision (the fields of ``review.Decision``) for every cluster ``engine``
    finds at threshold 0 on the tumour-free slabs of ``cases``.  Its case name is the patient's, so
    cross-validation keeps a patient's slabs and tumour in one fold (``labels.patient_of``)."""
    from ..segment.pipeline import case_hash

    out = []
    for name, side, slab in iter_slabs(cases):
        res = engine.segment(slab, threshold=0.0, keep_patches=True)
        h = case_hash(slab)
        out += [{"case_name": name, "case_hash": h, "lesion_id": les.lesion_id, "decision": "rejected",
                 "confidence": les.confidence, "model_id": res.model_id, "centroid_lps": les.centroid_lps,
                 "volume_ml": les.volume_ml, "diameter_mm": les.diameter_mm, "bbox_ijk": les.bbox_ijk,
                 "features": dict(les.features), "patch": les.patch, "reviewer": "simulated (tumour-free slab)"}
                for les in res.lesions]
        log(f"  {name} {side}: {len(res.lesions)} cluster(s), highest "
            f"{max((les.confidence for les in res.lesions), default=0):.2f}")
    return out


def slab_figures(engine, cases) -> dict:
    """The lesions ``engine`` shows (default threshold) on the tumour-free slabs of ``cases``."""
    slabs = []
    for name, side, slab in iter_slabs(cases):
        r = engine.segment(slab)
        slabs.append({"case": name, "side": side, "lesions": len(r.lesions),
                      "max_confidence": round(max((les.confidence for les in r.lesions), default=0.0), 3)})
    return {"slabs": len(slabs), "slabs_with_a_false_lesion": sum(s["lesions"] > 0 for s in slabs),
            "slab_false_lesions": sum(s["lesions"] for s in slabs),
            "slab_max_confidence": max((s["max_confidence"] for s in slabs), default=0.0), "per_slab": slabs}


def retrain_with_slabs(base: models.ModelCard, train, work: Path, seed: int, with_slabs: bool = True, log=print):
    """Retrain ``base``'s head on ``train``'s ground truth (and, ``with_slabs``, their slab
    rejections) into ``work``; returns ``(RetrainResult, number of rejections)``.  The feedback
    database and the new version stay inside ``work`` (the user's model folder is never touched)."""
    from .. import data as dataset
    from ..feedback import FeedbackStore
    from ..segment.pipeline import Engine
    from .retrain import retrain

    db, n = None, 0
    if with_slabs:
        rejected = slab_rejections(Engine(base, device="cpu"), train, log)
        db, n = work / "slabs.db", len(rejected)
        store = FeedbackStore(db)
        try:
            store.record_many(rejected)
        finally:
            store.close()
    gt_root = dataset.case(train[0]).image.parent.parent
    res = retrain(db, str(base.folder), include_gt=gt_root, output=work / ("slabs" if with_slabs else "control"),
                  gt_cases=list(train), mode="head", seed=seed, all_models=True)
    return res, n


def release_card(base: models.ModelCard, new: dict, version: str, n_rejected: int, validation: dict,
                 slabs: dict, command: str, code: dict, minutes: float, base_commit: str | None = None) -> dict:
    """The card of the shipped version: what runs it from the retrained card ``new``, its records
    from ``base`` and the retraining, validation on the base's validation cases only."""
    from .model_writer import parent_link, release_history
    from .train_cls import card_metrics

    card = {k: copy.deepcopy(v) for k, v in new.items()
            if k not in ("parent", "data", "validation", "metrics", "retraining", "created", "description")}
    card.update(name=base.name, version=version, description=base.data.get("description", base.name)
                + "; classifier taught the scan's tumour-free regions")
    link = {k: v for k, v in parent_link(base).items() if k != "folder"}
    how = (f"; the base folder is {base.id} of commit {base_commit}: mkdir -p <dir> && git archive {base_commit} "
           f"LesionSeg/LesionSegLib/models/{base.name} | tar -x -C <dir>, then <dir>/LesionSeg/LesionSegLib/models/"
           f"{base.name}") if base_commit else ""
    train, val = base.data["data"]["train_cases"], base.data["data"]["val_cases"]
    rt = new["retraining"]
    card["built_from"] = {"model": base.id, "commit": base_commit, **{k: v for k, v in link.items() if k != "id"}}
    card["data"] = {**copy.deepcopy(base.data["data"]), "tumour_free_negatives": {
        "what": f"every cluster {base.id} finds at threshold 0 on the tumour-free slabs of the training cases "
                f"(whole slices >= {FREE_GAP_MM:g} mm from the tumour, >= {FREE_MIN_SLICES} slices), recorded as rejected",
        "clusters": n_rejected, "cases": list(train)}, "retraining_label_counts": rt["label_counts"]}
    card["training"] = {**copy.deepcopy(base.data.get("training", {})), "classifier_retraining": {
        "command": command, "code": code, "minutes": round(minutes, 1), "mode": "head", "seed": rt["seed"],
        "trainer": rt["trainer"], "cross_validation": rt["validation"],
        "calibration_fit_on": "out-of-fold logits of the retraining labels (training cases only)"}}
    card["metrics"] = {**card_metrics(validation),
                       "val_tumour_free_slabs_with_a_false_lesion": slabs["slabs_with_a_false_lesion"]}
    v = {k: w for k, w in validation.items() if k != "sensitivity_at_fp"}
    v["sensitivity_at_fp"] = {str(k): round(w, 4) for k, w in validation["sensitivity_at_fp"].items()}
    fit_on = card["training"]["classifier_retraining"]["calibration_fit_on"]
    card["classifier"].setdefault("training", {})["temperature_fit_on"] = fit_on  # where train_cls records it
    card["validation"] = {**v, "cases": list(val), "tumour_free_slabs": slabs, "temperature_fit_on": fit_on}
    card["release_notes"] = release_history(base.name, version, {
        version: f"{base.id}'s segmenter, OOD reference and inference settings (same weights); the confidence "
                 f"classifier's head retrained (patch encoder frozen) with {n_rejected} rejected clusters of the "
                 "training cases' tumour-free slabs and the training cases' ground-truth clusters, as "
                 "`lesionseg retrain --mode head` does. Rules set before it ran: rule31 (experiment), rule32 (adoption).",
        **copy.deepcopy(base.data.get("release_notes") or {base.version: f"{base.data.get('description', base.id)}; "
                                                                       f"its card: commit {base_commit or 'unknown'}"})})
    out = command.split(" -o ", 1)[1].split()[0] if " -o " in command else "OUT"
    card["build_command"] = f"{command} && lesionseg models export {out} --write-card   (from the repository root{how})"
    return card


def build(from_model, out, version: str, seed: int = 0, command: str = "", base_commit: str | None = None,
          log=print) -> dict:
    """Build the release into the empty or new folder ``out``; returns its card."""
    from .. import data as dataset
    from ..segment.pipeline import Engine
    from .model_writer import WEIGHT_FILES, write_version
    from .train_cls import _git_commit, evaluate_cases

    t0 = time.perf_counter()
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):  # before an hour of work, not after
        raise SystemExit(f"{out} exists and is not an empty folder")
    code = _git_commit()
    base = models.get_card(str(from_model))
    d = base.data.get("data") or {}
    train, val = d.get("train_cases"), d.get("val_cases")
    if base.data.get("architecture") != "clcs" or "classifier" not in base.data or not train or not val:
        raise SystemExit(f"{base.id} is not a CLCS model card with a classifier and data.train_cases / data.val_cases")
    if set(train) & set(val):
        raise SystemExit(f"training and validation cases overlap: {sorted(set(train) & set(val))}")
    with tempfile.TemporaryDirectory(prefix="tumour-free-") as work:
        work = Path(work)
        saved = os.environ.get("LESIONSEG_MODELS")
        os.environ["LESIONSEG_MODELS"] = str(work / "models")
        try:
            res, n = retrain_with_slabs(base, train, work, seed, True, log)
            log(res.summary())
            engine = Engine(res.card, device="cpu", runtime="torch")
            by_name = {c.name: c for c in dataset.cases()}
            validation = evaluate_cases(engine, val, by_name, engine.default_threshold)
            slabs = slab_figures(engine, val)
        finally:
            if saved is None:
                os.environ.pop("LESIONSEG_MODELS", None)
            else:
                os.environ["LESIONSEG_MODELS"] = saved
        card = release_card(base, res.card.data, version, n, validation, slabs, command, code,
                            (time.perf_counter() - t0) / 60, base_commit)

        def fill(tmp: Path) -> dict:
            for name in sorted(set(WEIGHT_FILES.values())):
                if (res.card.folder / name).exists():
                    shutil.copyfile(res.card.folder / name, tmp / name)
            card["files"] = {f.name: models.sha256_file(f) for f in sorted(tmp.glob("*.safetensors"))}
            return card

        write_version(out, fill)  # atomic; every weight the card names is checked before the card is written
    models.get_card(Path(out))  # schema and checksums, as every load does (a path: "runs" alone is no model id)
    return card


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--from-model", required=True, help="folder of the base CLCS model (its card names the cases)")
    ap.add_argument("-o", "--out", required=True, help="new model folder (must not exist, or be empty)")
    ap.add_argument("--version", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--base-commit", help="the commit whose model folder --from-model is (recorded in the card)")
    args = ap.parse_args(argv)
    command = "python -m LesionSegLib.engine.learn.tumour_free " + " ".join(argv if argv is not None else sys.argv[1:])
    card = build(args.from_model, args.out, args.version, args.seed, command, args.base_commit,
                 log=lambda m: print(m, file=sys.stderr, flush=True))
    print(json.dumps({"model": f"{card['name']}@{card['version']}", "metrics": card["metrics"]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

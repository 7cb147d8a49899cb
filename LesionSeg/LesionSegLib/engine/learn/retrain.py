"""Retrain the confidence classifier from reviewed lesions (and optional ground truth).

    lesionseg retrain --feedback DB [--base-model NAME] [--include-gt DIR] [-o NEW_MODEL] [--activate]

Labels (see :mod:`.labels`)
------
* **Review**: every *accepted* (1) and *rejected* (0) lesion in the feedback database whose
  stored features match this engine's ``FEATURE_NAMES`` and that has a readable patch; *unsure*
  ones are left out; a lesion reviewed twice counts once, with its latest decision.  Only
  decisions made with models sharing the base model's segmenter (same segmenter sha256) are
  used, unless ``all_models`` (``--all-models``) or ``model_ids`` (``--only-model``) say
  otherwise; how many were left out is in the label counts and the summary.
* **Ground truth** (``--include-gt DIR``, folders ``DIR/<case>/image.nii.gz`` + ``label.nii.gz``):
  the base model segments each image with threshold 0 (every candidate) and each candidate is
  labelled by the matching rule of :mod:`.matching` (TP when IoU >= 0.1 or >= 50 % inside a
  ground-truth lesion).  When a lesion is both reviewed and in the ground truth, the human
  decision wins.

Training
--------
``mode="head"`` (default): the base classifier's patch encoder (a 3D CNN) is kept frozen and
its embeddings are computed once; the feature branch and the head are fine-tuned from the base
weights on (embedding, standardised features).  This is what makes 500 reviewed lesions
retrain in well under 30 s on two CPU cores, and with a few hundred labels it also overfits
less than re-learning the CNN.  ``mode="full"`` retrains the whole network with
:func:`classifier.train_classifier` (slow on CPU; meant for a GPU and thousands of labels).

Validation
----------
K-fold cross-validation grouped by patient (the case name: a patient's lesions, from any of its
scans or copies, are never split between training and test; stratified by label), giving an
out-of-fold confidence for every labelled lesion.  The calibration of fold k (Platt scaling: a
temperature and a logit shift, :func:`classifier.fit_platt`; a temperature alone cannot undo
the offset that the class-weighted training loss puts on every logit) is fitted on the
out-of-fold logits of the other folds, so the reported ECE is honest too.  The base model is
scored on exactly the same lesions: AUC (ROC, TP vs FP) and ECE (10 equal-width bins) for old
and new, from :mod:`..evaluate`.  In ``head`` mode the
pull towards the base weights is chosen among :attr:`HeadTrainer.SETTINGS` by the best
out-of-fold AUC, then the lowest log-loss, then the stronger pull (disclosed in the card as
slightly optimistic).  The final model is trained on all labels, calibrated on all out-of-fold
logits (the shift folded into the head's last bias, the temperature in the card).

Guards: fewer than ``min_labels`` labels, or fewer than ``min_per_class`` of either class,
raise :class:`RetrainError` with the counts.

Output
------
A new model version in the user model folder (see :mod:`.model_writer`): the parent's run
sections and segmenter weights (checksum verified), the new ``classifier``, a ``parent`` link
(id, sha256), its own ``data`` (labels used), ``validation`` and ``metrics`` (cross-validated,
never the parent's), ``retraining`` (trainer, timings) and the sha256 of every weight file.  A
``validation.png`` (ROC and reliability diagram, old vs new) is written beside the card.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from .. import models
from ..common import Progress, check_cancel, span, utc_now
from ..errors import ModelError
from .labels import MIN_LABELS, MIN_PER_CLASS, RetrainError, TrainingData, check_labels, find_gt_cases, from_ground_truth, from_store, merge
from .model_writer import resolve_output, write_model
from .validation import DEFAULT_FOLDS, fit_and_validate

def _describe_setting(setting: dict | None) -> str:
    if not setting or "l2sp" not in setting:
        return "whole network retrained"
    if setting["l2sp"] is None:
        return "base weights kept, calibration refitted"
    return f"head fine-tuned, pull to base {setting['l2sp']:g}"


@dataclass
class RetrainResult:
    card: models.ModelCard
    metrics: dict
    label_counts: dict
    seconds: float
    oof: dict
    plot: Path | None
    activated: bool = False

    def summary(self) -> str:
        o, n = self.metrics["old"], self.metrics["new"]
        f = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
        c = self.label_counts
        left = "".join(f"; {v} {k}" for k, v in sorted(c.get("skipped", {}).items()))
        return (
            f"new model {self.card.id} ({self.card.folder})\n"
            f"  labels: {c['total']} ({c['positive']} true, {c['negative']} false) from {c['cases']} patients{left}\n"
            f"  {self.metrics['validation']}, {self.metrics['evaluated']} lesions scored\n"
            f"  {'':8s} {'AUC':>7s} {'ECE':>7s} {'Brier':>7s}\n"
            f"  {'before':8s} {f(o['auc']):>7s} {f(o['ece']):>7s} {f(o['brier']):>7s}   ({self.card.data['parent']['id']})\n"
            f"  {'after':8s} {f(n['auc']):>7s} {f(n['ece']):>7s} {f(n['brier']):>7s}   ({_describe_setting(self.metrics.get('selected'))})\n"
            f"  {self.seconds:.1f} s" + ("; activated" if self.activated else "")
        )


def retrain(
    feedback=None,
    base_model: str | None = None,
    include_gt: str | os.PathLike | None = None,
    output: str | os.PathLike | None = None,
    *,
    gt_cases: Sequence[str] | None = None,
    gt_prob_thresholds: Sequence[float] | None = None,
    model_ids: Sequence[str] | None = None,
    all_models: bool = False,
    mode: str = "head",
    folds: int = DEFAULT_FOLDS,
    epochs: int | None = None,
    seed: int = 0,
    min_labels: int = MIN_LABELS,
    min_per_class: int = MIN_PER_CLASS,
    activate: bool = False,
    device: str = "cpu",
    progress: Progress | None = None,
    cancel=None,
) -> RetrainResult:
    """Retrain the confidence classifier of ``base_model`` (default: the active model) from the
    feedback store ``feedback`` (path or store; None = no review labels) and/or ground truth.

    Review decisions: those of ``model_ids`` if given, all of them with ``all_models``, else those
    made with models sharing the base model's segmenter."""
    from ..segment.classifier import ConfidenceModel

    t0 = time.perf_counter()
    parent = models.get_card(base_model)
    if "classifier" not in parent.data:
        raise RetrainError(f"model {parent.id} has no classifier to retrain")
    resolve_output(parent, output)  # a bad or taken output name fails before any training (R2)
    try:
        base = ConfidenceModel.from_card(parent)
    except ModelError as exc:
        raise RetrainError(f"cannot load the classifier of {parent.id}: {exc}") from None
    if feedback is None and include_gt is None:
        raise RetrainError("nothing to learn from: give a feedback database and/or --include-gt")
    if progress:
        progress(0.0, f"reading labels (base model {parent.id})")
    parts = []
    review = None
    if feedback is not None:
        review = from_store(feedback, model_ids, parent=None if all_models else parent)
        parts.append(review)
    if include_gt is not None:
        from ..segment.pipeline import Engine

        find_gt_cases(include_gt)  # fail fast on a bad folder
        engine = Engine(parent, device=device)
        parts.append(from_ground_truth(include_gt, engine, gt_cases, span(progress, 0.02, 0.4), cancel, gt_prob_thresholds))
    try:
        data = merge(*parts)
    except RetrainError:
        data = TrainingData.empty(len(base.feature_names))
        if review is not None:
            data.skipped = dict(review.skipped)
    check_labels(data, min_labels, min_per_class)
    counts = data.counts()
    lo = 0.4 if include_gt is not None else 0.05
    fv = fit_and_validate(data, base, mode, folds, seed, epochs, span(progress, lo, 0.95), cancel)
    check_cancel(cancel, "retraining")
    if progress:
        progress(0.96, "writing the new model version")
    seconds = time.perf_counter() - t0
    retraining = {
        "created": utc_now(),
        "feedback_db": str(getattr(feedback, "path", feedback)) if feedback is not None else None,
        "ground_truth": str(include_gt) if include_gt is not None else None,
        "gt_prob_thresholds": list(gt_prob_thresholds) if gt_prob_thresholds else None,
        "label_counts": counts,
        "validation": fv["metrics"],
        "trainer": fv["trainer"],
        "timings": {**fv["timings"], "total_s": round(seconds, 2)},
        "seed": seed,
    }
    data_section = {
        "feedback_db": retraining["feedback_db"],
        "decisions_from": list(model_ids) if model_ids else ("all models" if all_models else
                                                              f"models sharing the segmenter of {parent.id}"),
        "ground_truth": retraining["ground_truth"],
        "cases": sorted(set(data.case_names)),
        "label_counts": counts,
    }
    card = write_model(parent, fv["model"], output, retraining, fv["metrics"], fv["oof"], data_section)
    activated = False
    if activate:
        from .versions import activate as _activate

        _activate(card.id)
        activated = True
    plot = card.folder / "validation.png"
    if progress:
        progress(1.0, f"done: {card.id}")
    return RetrainResult(card, fv["metrics"], counts, time.perf_counter() - t0, fv["oof"],
                         plot if plot.exists() else None, activated)

"""Cross-validation grouped by patient, setting selection and the final fit of a retrained classifier."""
from __future__ import annotations

import time
from typing import Sequence

import numpy as np

from ..common import Progress, check_cancel, span
from .labels import RetrainError, TrainingData
from .trainers import HEAD_EPOCHS, FullTrainer, HeadTrainer, _sigmoid

DEFAULT_FOLDS = 5


def score_metrics(labels, probs) -> dict:
    """AUC and ECE (the definitions of ``lesionseg evaluate``) plus the Brier score."""
    from ..evaluate.metrics import calibration, cluster_auc

    y = np.asarray(labels, dtype=np.int64)
    p = np.asarray(probs, dtype=np.float64)
    cal = calibration(p, y) if len(y) else None
    return {
        "auc": cluster_auc(p, y),
        "ece": None if cal is None else cal["ece"],
        "brier": float(np.mean((p - y) ** 2)) if len(y) else None,
        "n": int(len(y)),
        "n_positive": int(y.sum()),
    }


def make_folds(labels: np.ndarray, groups: Sequence[str], k: int, seed: int = 0) -> tuple[list[np.ndarray], str]:
    """Test-index arrays of a stratified K-fold grouped by ``groups`` (patients; by lesion when
    there is only one)."""
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    y = np.asarray(labels)
    n_groups = len(set(groups))
    if n_groups >= 2:
        k = max(2, min(k, n_groups))
        cv = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
        splits = cv.split(np.zeros(len(y)), y, groups=list(groups))
        how = f"{k}-fold cross-validation grouped by patient ({n_groups} patients)"
    else:
        k = max(2, min(k, int(min(y.sum(), len(y) - y.sum()))))
        cv = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
        splits = cv.split(np.zeros(len(y)), y)
        how = f"{k}-fold cross-validation by lesion (all labels come from one patient)"
    return [test for _, test in splits], how


def cross_validate(trainer, labels: np.ndarray, folds: list[np.ndarray], setting: dict | None = None, seed: int = 0,
                   progress: Progress | None = None, cancel=None) -> dict:
    """Out-of-fold new-model confidences for one training ``setting``, each fold calibrated by
    Platt scaling (:func:`fit_platt`: a temperature and a logit shift) fitted on the other folds'
    out-of-fold logits; ``temperature`` and ``logit_shift`` are the calibration fitted on all of them."""
    from ..segment.classifier import fit_platt

    y = np.asarray(labels)
    setting = setting or {}
    oof_logit = np.full(len(y), np.nan)
    fold_of = np.full(len(y), -1)
    for f, test in enumerate(folds):
        check_cancel(cancel, "retraining")
        train = np.setdiff1d(np.arange(len(y)), test)
        if y[train].min() == y[train].max():
            continue  # this fold's training part has one class: its lesions stay unscored
        fitted = trainer.fit(train, y, seed=seed + f, cancel=cancel, **setting)
        oof_logit[test] = trainer.logits(fitted, test)
        fold_of[test] = f
        if progress:
            progress((f + 1) / len(folds), f"cross-validation fold {f + 1}/{len(folds)}")
    scored = ~np.isnan(oof_logit)
    oof_prob = np.full(len(y), np.nan)
    for f in range(len(folds)):
        m = fold_of == f
        if not m.any():
            continue
        other = scored & ~m
        t, shift = fit_platt(oof_logit[other], y[other]) if other.any() and len(set(y[other])) == 2 else (1.0, 0.0)
        oof_prob[m] = _sigmoid((oof_logit[m] + shift) / t)
    t_all, shift_all = fit_platt(oof_logit[scored], y[scored]) if scored.any() else (1.0, 0.0)
    p = np.clip(oof_prob[scored], 1e-6, 1 - 1e-6)
    logloss = float(-np.mean(y[scored] * np.log(p) + (1 - y[scored]) * np.log(1 - p))) if scored.any() else float("inf")
    # ranking on the out-of-fold logits: per-fold calibrations must not reorder lesions across folds
    from ..evaluate.metrics import cluster_auc

    auc = cluster_auc(oof_logit[scored], y[scored]) if scored.any() else None
    return {"logits": oof_logit, "probs": oof_prob, "scored": scored, "temperature": float(t_all),
            "logit_shift": float(shift_all), "logloss": logloss, "auc": auc}


def fit_and_validate(data: TrainingData, base, mode: str = "head", folds: int = DEFAULT_FOLDS, seed: int = 0,
                     epochs: int | None = None, progress: Progress | None = None, cancel=None) -> dict:
    """Cross-validate, select the setting, then train the final model on all labels.

    In ``head`` mode the strength of the pull towards the base weights is chosen by
    cross-validation from :attr:`HeadTrainer.SETTINGS`: the best out-of-fold AUC (rounded to 4
    digits), then the lowest log-loss, then the stronger pull; the strongest keeps the base
    weights and only refits the calibration, so a handful of labels cannot make the ranking worse than the base model's
    unless the held-out folds say so.  Returns the new :class:`ConfidenceModel`, old/new
    metrics on the same lesions, the out-of-fold scores and the selection table.
    """
    if mode == "head":
        trainer = HeadTrainer(base, epochs=epochs or HEAD_EPOCHS)
    elif mode == "full":
        trainer = FullTrainer(base, epochs=epochs or 30)
    else:
        raise RetrainError(f"unknown retraining mode {mode!r} (head or full)")
    t0 = time.perf_counter()
    trainer.prepare(data, span(progress, 0.0, 0.3), cancel)
    t_prep = time.perf_counter() - t0
    y = np.asarray(data.labels)
    old_prob = _sigmoid(trainer.base_logits() / float(base.temperature))
    t1 = time.perf_counter()
    fold_idx, how = make_folds(y, data.groups, folds, seed)
    results = []
    n_set = len(trainer.settings)
    for i, setting in enumerate(trainer.settings):
        cv = cross_validate(trainer, y, fold_idx, setting, seed, span(progress, 0.3 + 0.55 * i / n_set, 0.3 + 0.55 * (i + 1) / n_set), cancel)
        results.append((setting, cv))
    # best ranking (AUC: what FP/case at a fixed sensitivity depends on), then log-loss, then the
    # stronger pull towards the base model
    best_i = min(range(n_set), key=lambda i: (-round(results[i][1]["auc"] if results[i][1]["auc"] is not None else 0.0, 4),
                                             round(results[i][1]["logloss"], 4), i))
    setting, cv = results[best_i]
    t_cv = time.perf_counter() - t1
    check_cancel(cancel, "retraining")
    if progress:
        progress(0.88, "training the final model on all labels")
    t2 = time.perf_counter()
    fitted = trainer.fit(np.arange(len(y)), y, seed=seed, cancel=cancel, **setting)
    model = trainer.to_model(fitted, cv["temperature"], cv["logit_shift"])
    t_final = time.perf_counter() - t2
    s = cv["scored"]
    selection = []
    for st, r in results:
        sc = r["scored"]
        sm = score_metrics(y[sc], r["probs"][sc])
        selection.append({**st, "auc": r["auc"], "logloss": round(r["logloss"], 5), "ece": sm["ece"], "n": int(sc.sum())})
    new_metrics = score_metrics(y[s], cv["probs"][s])
    new_metrics["auc"] = cv["auc"]
    metrics = {
        "validation": how,
        "evaluated": int(s.sum()),
        "old": score_metrics(y[s], old_prob[s]),
        "new": new_metrics,
        "temperature": cv["temperature"],
        "logit_shift": cv["logit_shift"],
        "calibration": "Platt: sigmoid((logit + logit_shift) / temperature), the shift folded into the head's last bias",
        "selected": setting,
        "selection": selection,
    }
    metrics["note"] = "new AUC from the pooled out-of-fold logits; ECE and Brier from per-fold calibrated confidences"
    if n_set > 1:
        metrics["note"] += (f"; 'new' is the best of {n_set} settings (AUC, then log-loss) on these folds, "
                            "which makes its figures slightly optimistic")
    return {
        "model": model,
        "metrics": metrics,
        "oof": {"labels": y[s], "old": old_prob[s], "new": cv["probs"][s], "new_rank": cv["logits"][s],
                "sources": [data.sources[i] for i in np.flatnonzero(s)]},
        "trainer": {**trainer.describe(), "selected": setting},
        "timings": {"embeddings_s": round(t_prep, 2), "cross_validation_s": round(t_cv, 2), "final_fit_s": round(t_final, 2)},
    }

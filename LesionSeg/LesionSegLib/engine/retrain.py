"""Retrain the confidence classifier from reviewed lesions (and optional ground truth).

    lesionseg retrain --feedback DB [--base-model NAME] [--include-gt DIR] [-o NEW_MODEL] [--activate]

Labels
------
* **Review**: every *accepted* (1) and *rejected* (0) lesion in the feedback database whose
  stored features match this engine's ``FEATURE_NAMES`` and that has a patch; *unsure* ones
  are left out.
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
K-fold cross-validation grouped by case (a case's lesions are never split between training and
test; stratified by label), giving an out-of-fold confidence for every labelled lesion.  The
temperature of fold k is fitted on the out-of-fold logits of the other folds, so the reported
ECE is honest too.  The base model is scored on exactly the same lesions: AUC (ROC, TP vs FP)
and ECE (10 equal-width bins) for old and new, from :mod:`.evaluate`.  The final model is
trained on all labels, with the temperature fitted on all out-of-fold logits.

Guards: fewer than ``min_labels`` labels, or fewer than ``min_per_class`` of either class,
raise :class:`RetrainError` with the counts.

Output
------
A new model version in the user model folder: the parent's card with the new ``classifier``
section, ``parent`` (id, classifier sha256, metrics), ``retraining`` (label counts, validation,
timings), ``metrics`` (the new cross-validated figures) and the sha256 of every weight file; the
segmenter weights are copied from the parent (checksum verified).  A ``validation.png`` (ROC
and reliability diagram, old vs new) is written beside the card.
"""
from __future__ import annotations

import copy
import datetime as _dt
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from . import models
from .errors import CancelledError, LesionSegError, ModelError

MIN_LABELS = 20
MIN_PER_CLASS = 5
DEFAULT_FOLDS = 5
HEAD_EPOCHS = 300

Progress = Callable[[float, str], None]


class RetrainError(LesionSegError):
    """Retraining refused or failed (too few labels, one class, incompatible data...)."""


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _check(cancel) -> None:
    if cancel is not None and cancel():
        raise CancelledError("retraining cancelled")


def _span(progress: Progress | None, lo: float, hi: float) -> Progress | None:
    if progress is None:
        return None
    return lambda f, msg: progress(lo + (hi - lo) * min(1.0, max(0.0, f)), msg)


# ----------------------------------------------------------------------------- training data
@dataclass
class TrainingData:
    patches: np.ndarray  # (N, C, z, y, x) float16
    features: np.ndarray  # (N, F) float32, columns = FEATURE_NAMES
    labels: np.ndarray  # (N,) int 1 = true lesion, 0 = false positive
    groups: list[str]  # case hash per lesion (cross-validation groups)
    sources: list[str]  # "review" or "gt"
    case_names: list[str]
    keys: list[str] = field(default_factory=list)  # case_hash|lesion_key, for de-duplication
    skipped: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return int(len(self.labels))

    @classmethod
    def empty(cls, n_features: int, patch_shape=(3, 32, 32, 32)) -> "TrainingData":
        return cls(np.zeros((0, *patch_shape), np.float16), np.zeros((0, n_features), np.float32),
                   np.zeros(0, np.int64), [], [], [], [])

    def subset(self, idx) -> "TrainingData":
        idx = np.asarray(idx, dtype=np.int64)
        pick = lambda xs: [xs[i] for i in idx]  # noqa: E731
        return TrainingData(self.patches[idx], self.features[idx], self.labels[idx], pick(self.groups),
                            pick(self.sources), pick(self.case_names), pick(self.keys) if self.keys else [],
                            dict(self.skipped))

    def counts(self) -> dict:
        out = {"total": len(self), "positive": int(self.labels.sum()), "negative": int(len(self) - self.labels.sum()),
               "cases": len(set(self.groups)), "by_source": {}}
        for src in sorted(set(self.sources)):
            m = np.array([s == src for s in self.sources])
            pos = int(self.labels[m].sum())
            out["by_source"][src] = {"positive": pos, "negative": int(m.sum()) - pos}
        if self.skipped:
            out["skipped"] = dict(self.skipped)
        return out


def merge(*parts: TrainingData) -> TrainingData:
    """Concatenate, keeping the first occurrence of a lesion (pass the reviewed data first)."""
    parts = [p for p in parts if p is not None and len(p)]
    if not parts:
        raise RetrainError("no labelled lesions at all")
    seen: set[str] = set()
    keep: list[tuple[int, int]] = []
    skipped: dict[str, int] = {}
    for pi, p in enumerate(parts):
        for k, v in p.skipped.items():
            skipped[k] = skipped.get(k, 0) + v
        for i in range(len(p)):
            key = p.keys[i] if p.keys else None
            if key is not None and key in seen:
                skipped["duplicate of a reviewed lesion"] = skipped.get("duplicate of a reviewed lesion", 0) + 1
                continue
            if key is not None:
                seen.add(key)
            keep.append((pi, i))
    shapes = {p.patches.shape[1:] for p in parts}
    if len(shapes) > 1:
        raise RetrainError(f"patches of different shapes {sorted(shapes)} cannot be combined")
    return TrainingData(
        np.stack([parts[pi].patches[i] for pi, i in keep]),
        np.stack([parts[pi].features[i] for pi, i in keep]).astype(np.float32),
        np.array([parts[pi].labels[i] for pi, i in keep], dtype=np.int64),
        [parts[pi].groups[i] for pi, i in keep],
        [parts[pi].sources[i] for pi, i in keep],
        [parts[pi].case_names[i] for pi, i in keep],
        [parts[pi].keys[i] if parts[pi].keys else "" for pi, i in keep],
        skipped,
    )


def from_store(store, model_ids: Sequence[str] | None = None) -> TrainingData:
    """Accepted / rejected lesions of a feedback store (path or :class:`FeedbackStore`)."""
    from .feedback import FeedbackStore, lesion_key
    from .features import FEATURE_NAMES, feature_matrix

    own = not isinstance(store, FeedbackStore)
    st = FeedbackStore(store, readonly=True) if own else store
    try:
        ls = st.labelled(model_ids=model_ids, feature_names=FEATURE_NAMES, with_patches=True)
    finally:
        if own:
            st.close()
    if len(ls) == 0:
        d = TrainingData.empty(len(FEATURE_NAMES))
        d.skipped = dict(ls.skipped)
        return d
    feats = np.nan_to_num(feature_matrix(ls.features), nan=0.0, posinf=0.0, neginf=0.0)
    keys = [f"{h}|{lesion_key(c, 0)}" for h, c in zip(ls.case_hashes, ls.centroids)]
    return TrainingData(ls.patches, feats, ls.labels, list(ls.case_hashes), ["review"] * len(ls),
                        list(ls.case_names), keys, dict(ls.skipped))


def find_gt_cases(folder: str | os.PathLike) -> list[tuple[str, Path, Path]]:
    """``(name, image, label)`` for ``folder/<case>/image.nii.gz`` + ``label.nii.gz`` (also one level deeper)."""
    root = Path(folder)
    if not root.is_dir():
        raise RetrainError(f"ground-truth folder {root} does not exist")

    def scan(d: Path):
        return [(c.name, c / "image.nii.gz", c / "label.nii.gz") for c in sorted(d.iterdir())
                if c.is_dir() and (c / "image.nii.gz").exists() and (c / "label.nii.gz").exists()]

    found = scan(root)
    if not found:
        for sub in sorted(p for p in root.iterdir() if p.is_dir()):
            found.extend(scan(sub))
    if not found:
        raise RetrainError(f"{root} holds no <case>/image.nii.gz + <case>/label.nii.gz pairs")
    return found


def candidates_with_labels(engine, image, label_image):
    """Run ``engine`` at threshold 0 and label every candidate with the matching rule."""
    import SimpleITK as sitk

    from .matching import gt_components, match

    res = engine.segment(image, threshold=0.0, keep_patches=True)
    gt, n_gt = gt_components(sitk.GetArrayFromImage(label_image))
    m = match(res.labelmap, gt, len(res.lesions), n_gt)
    return res, m, gt, n_gt


def from_ground_truth(folder, engine, cases: Sequence[str] | None = None, progress: Progress | None = None,
                      cancel=None, prob_thresholds: Sequence[float] | None = None) -> TrainingData:
    """Candidates of the base model on ``folder``'s images, labelled from their ground truth.

    ``prob_thresholds``: the probability thresholds that form the candidates (default: the
    model's own); adding a lower one, as the original classifier training does, yields more
    false positives to learn from.
    """
    from .features import FEATURE_NAMES, feature_matrix
    from .feedback import lesion_key
    from .io import read_image, read_label
    from .pipeline import case_hash

    items = find_gt_cases(folder)
    if cases:
        wanted = set(cases)
        items = [it for it in items if it[0] in wanted]
        if not items:
            raise RetrainError(f"none of the cases {sorted(wanted)} is in {folder}")
    patches, feats, labels, groups, names, keys = [], [], [], [], [], []
    thresholds = list(prob_thresholds) if prob_thresholds else [engine.prob_threshold]
    own = engine.prob_threshold
    try:
        for k, (name, img_path, lab_path) in enumerate(items):
            _check(cancel)
            img = read_image(img_path)
            lab = read_label(lab_path, img)
            h = case_hash(img)
            seen = set()
            n = 0
            for thr in thresholds:
                engine.prob_threshold = float(thr)
                res, m, _, _ = candidates_with_labels(engine, img, lab)
                for les, tp in zip(res.lesions, m.is_tp):
                    key = f"{h}|{lesion_key(les.centroid_lps, les.lesion_id)}"
                    if key in seen:  # the same cluster at two thresholds
                        continue
                    seen.add(key)
                    patches.append(les.patch)
                    feats.append(les.features)
                    labels.append(int(tp))
                    groups.append(h)
                    names.append(name)
                    keys.append(key)
                    n += 1
            if progress:
                progress((k + 1) / len(items), f"ground truth {name}: {n} candidates")
    finally:
        engine.prob_threshold = own
    if not labels:
        return TrainingData.empty(len(FEATURE_NAMES))
    f = np.nan_to_num(feature_matrix(feats), nan=0.0, posinf=0.0, neginf=0.0)
    return TrainingData(np.stack(patches).astype(np.float16), f, np.asarray(labels, np.int64), groups,
                        ["gt"] * len(labels), names, keys)


def check_labels(data: TrainingData, min_labels: int = MIN_LABELS, min_per_class: int = MIN_PER_CLASS) -> None:
    """Refuse to retrain on too few labels or a single class (clear message with the counts)."""
    n = len(data)
    pos = int(data.labels.sum()) if n else 0
    neg = n - pos
    skipped = ""
    if data.skipped:
        skipped = " (left out: " + ", ".join(f"{v} {k}" for k, v in sorted(data.skipped.items())) + ")"
    if n < min_labels:
        raise RetrainError(
            f"too few labels to retrain: {n} usable lesions ({pos} accepted/true, {neg} rejected/false){skipped}; "
            f"at least {min_labels} are needed. Review more lesions or add ground truth (--include-gt)."
        )
    if pos == 0 or neg == 0:
        which = "accepted (true lesions)" if pos else "rejected (false positives)"
        raise RetrainError(
            f"only one class: all {n} labels are {'rejected' if neg else 'accepted'}; the classifier needs "
            f"{which} examples too{skipped}."
        )
    if min(pos, neg) < min_per_class:
        raise RetrainError(
            f"too few labels of one class: {pos} accepted/true and {neg} rejected/false{skipped}; at least "
            f"{min_per_class} of each are needed."
        )


# ----------------------------------------------------------------------------- metrics
def score_metrics(labels, probs) -> dict:
    """AUC and ECE (the definitions of ``lesionseg evaluate``) plus the Brier score."""
    from .evaluate import calibration, cluster_auc

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


def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-np.clip(z, -60, 60)))


# ----------------------------------------------------------------------------- trainers
class _AdamW:
    """AdamW (decoupled weight decay) for a handful of small tensors.

    ``torch.optim`` is avoided on purpose: creating its first optimizer imports TorchDynamo,
    which costs seconds on a small CPU, more than the whole head fit.
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2):
        import torch

        self.params = [p for p in params if p.requires_grad]
        self.lr, self.b1, self.b2, self.eps, self.wd = lr, betas[0], betas[1], eps, weight_decay
        self.m = [torch.zeros_like(p) for p in self.params]
        self.v = [torch.zeros_like(p) for p in self.params]
        self.t = 0
        self.torch = torch

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def step(self) -> None:
        self.t += 1
        c1 = 1 - self.b1 ** self.t
        c2 = 1 - self.b2 ** self.t
        with self.torch.no_grad():
            for p, m, v in zip(self.params, self.m, self.v):
                if p.grad is None:
                    continue
                g = p.grad
                p.mul_(1 - self.lr * self.wd)
                m.mul_(self.b1).add_(g, alpha=1 - self.b1)
                v.mul_(self.b2).addcmul_(g, g, value=1 - self.b2)
                p.addcdiv_(m / c1, (v / c2).sqrt_().add_(self.eps), value=-self.lr)


class HeadTrainer:
    """Fine-tune the feature branch and head of a base :class:`ConfidenceModel` on frozen patch
    embeddings (computed once)."""

    name = "head"

    #: strengths of the pull towards the base weights tried by cross-validation, strongest first;
    #: ``None`` keeps the base weights (only the temperature is refitted)
    SETTINGS = (None, 1.0, 0.1, 0.01, 0.0)

    def __init__(self, base, epochs: int = HEAD_EPOCHS, lr: float = 3e-3, weight_decay: float = 1e-2,
                 settings=SETTINGS):
        import torch

        self.torch = torch
        self.settings = [{"l2sp": v} for v in settings]
        self.base = base
        self.epochs = epochs
        self.lr = lr
        self.weight_decay = weight_decay
        net = base.net
        for attr in ("encoder", "features", "head"):
            if not hasattr(net, attr):
                raise RetrainError(f"the base classifier network has no '{attr}' part; use mode='full'")
        mean = np.asarray(base.feature_mean, dtype=np.float32)
        std = np.asarray(base.feature_std, dtype=np.float32)
        # an untrained base (identity normalisation) gets its normalisation from the labels
        self.keep_normalisation = not (np.allclose(mean, 0.0) and np.allclose(std, 1.0))
        self.emb = None

    def prepare(self, data: TrainingData, progress: Progress | None = None, cancel=None, batch: int = 64) -> None:
        torch = self.torch
        enc = self.base.net.encoder
        self.base.net.eval()
        out = []
        n = len(data)
        with torch.inference_mode():
            for i in range(0, n, batch):
                _check(cancel)
                x = torch.as_tensor(np.asarray(data.patches[i:i + batch], dtype=np.float32))
                out.append(enc(x).float())
                if progress:
                    progress(min(1.0, (i + batch) / max(n, 1)), f"patch embeddings {min(n, i + batch)}/{n}")
        self.emb = torch.cat(out) if out else torch.zeros((0, 1))
        self.feats = np.asarray(data.features, dtype=np.float32)

    def _norm(self, idx):
        if self.keep_normalisation:
            return np.asarray(self.base.feature_mean, np.float32), np.asarray(self.base.feature_std, np.float32)
        f = self.feats[idx]
        return f.mean(0), f.std(0) + 1e-3

    def base_logits(self) -> np.ndarray:
        torch = self.torch
        f = (self.feats - np.asarray(self.base.feature_mean, np.float32)) / np.asarray(self.base.feature_std, np.float32)
        net = self.base.net
        with torch.inference_mode():
            z = net.head(torch.cat([self.emb, net.features(torch.as_tensor(f))], 1))[:, 0]
        return z.numpy().astype(np.float64)

    def fit(self, idx, labels, seed: int = 0, cancel=None, l2sp: float | None = 0.0):
        """Fine-tune on ``idx``.  ``l2sp``: weight of ``sum((w - w_base)^2)`` in the loss (a pull
        towards the base model, "L2-SP"); ``None`` returns the base weights unchanged."""
        torch = self.torch
        idx = np.asarray(idx)
        feat_mod = copy.deepcopy(self.base.net.features)
        head = copy.deepcopy(self.base.net.head)
        if l2sp is None:
            feat_mod.eval()
            head.eval()
            return {"features": feat_mod, "head": head, "mean": np.asarray(self.base.feature_mean, np.float32),
                    "std": np.asarray(self.base.feature_std, np.float32), "loss": None, "l2sp": None}
        mean, std = self._norm(idx)
        torch.manual_seed(seed)
        params = list(feat_mod.parameters()) + list(head.parameters())
        anchors = [p.detach().clone() for p in params]
        opt = _AdamW(params, lr=self.lr, weight_decay=0.0 if l2sp > 0 else self.weight_decay)
        emb = self.emb[torch.as_tensor(idx)]
        f = torch.as_tensor((self.feats[idx] - mean) / std, dtype=torch.float32)
        y = torch.as_tensor(np.asarray(labels)[idx], dtype=torch.float32)
        n_pos = float(y.sum())
        pos_weight = torch.tensor((len(y) - n_pos) / max(n_pos, 1.0))
        loss_fn = torch.nn.BCEWithLogitsLoss(pos_weight=pos_weight)
        feat_mod.train()
        head.train()
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # tiny full-batch steps: extra threads only add overhead
        try:
            with torch.enable_grad():
                for epoch in range(self.epochs):
                    if epoch % 50 == 0:
                        _check(cancel)
                    out = head(torch.cat([emb, feat_mod(f)], 1))[:, 0]
                    loss = loss_fn(out, y)
                    if l2sp > 0:
                        loss = loss + l2sp * sum(((p - a) ** 2).sum() for p, a in zip(params, anchors))
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
        finally:
            torch.set_num_threads(threads)
        feat_mod.eval()
        head.eval()
        return {"features": feat_mod, "head": head, "mean": mean, "std": std, "loss": float(loss.item()), "l2sp": l2sp}

    def logits(self, fitted, idx) -> np.ndarray:
        torch = self.torch
        idx = np.asarray(idx)
        f = torch.as_tensor((self.feats[idx] - fitted["mean"]) / fitted["std"], dtype=torch.float32)
        with torch.inference_mode():
            z = fitted["head"](torch.cat([self.emb[torch.as_tensor(idx)], fitted["features"](f)], 1))[:, 0]
        return z.numpy().astype(np.float64)

    def to_model(self, fitted, temperature: float):
        from .classifier import ConfidenceModel

        net = copy.deepcopy(self.base.net)
        net.features = fitted["features"]
        net.head = fitted["head"]
        net.eval()
        return ConfidenceModel(net, list(self.base.feature_names), np.asarray(fitted["mean"], np.float32),
                               np.asarray(fitted["std"], np.float32), float(temperature), dict(self.base.net_config))

    def describe(self) -> dict:
        return {"mode": "head", "frozen": "patch encoder", "epochs": self.epochs, "lr": self.lr,
                "weight_decay": self.weight_decay, "optimiser": "AdamW, full batch",
                "normalisation": "base model's" if self.keep_normalisation else "from the labels",
                "l2sp_grid": [st["l2sp"] for st in self.settings]}


class FullTrainer:
    """Retrain the whole classifier network with :func:`classifier.train_classifier`."""

    name = "full"

    def __init__(self, base, epochs: int = 30, progress: Progress | None = None):
        self.base = base
        self.epochs = epochs
        self.progress = progress
        self.settings = [{}]

    def prepare(self, data: TrainingData, progress=None, cancel=None) -> None:
        self.data = data

    def base_logits(self) -> np.ndarray:
        return self.base.logits(self.data.patches, self.data.features)

    def fit(self, idx, labels, seed: int = 0, cancel=None):
        from .classifier import train_classifier

        idx = np.asarray(idx)
        cm, info = train_classifier(np.asarray(self.data.patches[idx], np.float32), self.data.features[idx],
                                    np.asarray(labels)[idx], epochs=self.epochs, seed=seed, cancel=cancel)
        return {"model": cm, "info": info}

    def logits(self, fitted, idx) -> np.ndarray:
        idx = np.asarray(idx)
        return fitted["model"].logits(np.asarray(self.data.patches[idx], np.float32), self.data.features[idx])

    def to_model(self, fitted, temperature: float):
        cm = fitted["model"]
        cm.temperature = float(temperature)
        return cm

    def describe(self) -> dict:
        return {"mode": "full", "epochs": self.epochs, "trainer": "classifier.train_classifier"}


def make_folds(labels: np.ndarray, groups: Sequence[str], k: int, seed: int = 0) -> tuple[list[np.ndarray], str]:
    """Test-index arrays of a stratified K-fold grouped by case (by lesion when there is one case)."""
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    y = np.asarray(labels)
    n_groups = len(set(groups))
    if n_groups >= 2:
        k = max(2, min(k, n_groups))
        cv = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
        splits = cv.split(np.zeros(len(y)), y, groups=list(groups))
        how = f"{k}-fold cross-validation grouped by case ({n_groups} cases)"
    else:
        k = max(2, min(k, int(min(y.sum(), len(y) - y.sum()))))
        cv = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
        splits = cv.split(np.zeros(len(y)), y)
        how = f"{k}-fold cross-validation by lesion (all labels come from one case)"
    return [test for _, test in splits], how


def cross_validate(trainer, labels: np.ndarray, folds: list[np.ndarray], setting: dict | None = None, seed: int = 0,
                   progress: Progress | None = None, cancel=None) -> dict:
    """Out-of-fold new-model confidences for one training ``setting`` (per-fold temperature
    fitted on the other folds' out-of-fold logits)."""
    from .classifier import fit_temperature

    y = np.asarray(labels)
    setting = setting or {}
    oof_logit = np.full(len(y), np.nan)
    fold_of = np.full(len(y), -1)
    for f, test in enumerate(folds):
        _check(cancel)
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
        t = fit_temperature(oof_logit[other], y[other]) if other.any() and len(set(y[other])) == 2 else 1.0
        oof_prob[m] = _sigmoid(oof_logit[m] / t)
    t_all = fit_temperature(oof_logit[scored], y[scored]) if scored.any() else 1.0
    p = np.clip(oof_prob[scored], 1e-6, 1 - 1e-6)
    logloss = float(-np.mean(y[scored] * np.log(p) + (1 - y[scored]) * np.log(1 - p))) if scored.any() else float("inf")
    # ranking on the out-of-fold logits: per-fold temperatures must not reorder lesions across folds
    from .evaluate import cluster_auc

    auc = cluster_auc(oof_logit[scored], y[scored]) if scored.any() else None
    return {"logits": oof_logit, "probs": oof_prob, "scored": scored, "temperature": float(t_all), "logloss": logloss,
            "auc": auc}


def fit_and_validate(data: TrainingData, base, mode: str = "head", folds: int = DEFAULT_FOLDS, seed: int = 0,
                     epochs: int | None = None, progress: Progress | None = None, cancel=None) -> dict:
    """Cross-validate, select the setting, then train the final model on all labels.

    In ``head`` mode the strength of the pull towards the base weights is chosen by
    cross-validation (lowest out-of-fold log-loss, ties to the stronger pull) from
    :attr:`HeadTrainer.SETTINGS`; the strongest keeps the base weights and only refits the
    temperature, so a handful of labels cannot make the ranking worse than the base model's
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
    trainer.prepare(data, _span(progress, 0.0, 0.3), cancel)
    t_prep = time.perf_counter() - t0
    y = np.asarray(data.labels)
    old_prob = _sigmoid(trainer.base_logits() / float(base.temperature))
    t1 = time.perf_counter()
    fold_idx, how = make_folds(y, data.groups, folds, seed)
    results = []
    n_set = len(trainer.settings)
    for i, setting in enumerate(trainer.settings):
        cv = cross_validate(trainer, y, fold_idx, setting, seed, _span(progress, 0.3 + 0.55 * i / n_set, 0.3 + 0.55 * (i + 1) / n_set), cancel)
        results.append((setting, cv))
    # best ranking (AUC: what FP/case at a fixed sensitivity depends on), then log-loss, then the
    # stronger pull towards the base model
    best_i = min(range(n_set), key=lambda i: (-round(results[i][1]["auc"] if results[i][1]["auc"] is not None else 0.0, 4),
                                             round(results[i][1]["logloss"], 4), i))
    setting, cv = results[best_i]
    t_cv = time.perf_counter() - t1
    _check(cancel)
    if progress:
        progress(0.88, "training the final model on all labels")
    t2 = time.perf_counter()
    fitted = trainer.fit(np.arange(len(y)), y, seed=seed, cancel=cancel, **setting)
    model = trainer.to_model(fitted, cv["temperature"])
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


# ----------------------------------------------------------------------------- model output
def resolve_output(parent: models.ModelCard, output: str | os.PathLike | None) -> tuple[str, str, Path]:
    """(name, version, folder) of the new model: ``None`` (parent's name, next version), ``name``,
    ``name@version``, or a folder path (outside the registry unless under the user models folder)."""
    from .versions import next_version

    text = "" if output is None else str(output)
    if text and (os.sep in text or "/" in text or text.startswith(".")):
        folder = Path(text).expanduser().resolve()
        return folder.name, "1", folder
    name, _, version = (text or parent.name).partition("@")
    if not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
        raise RetrainError(f"invalid model name {name!r} (letters, digits, '-', '_' and '.' only)")
    version = version or next_version(name)
    if any(c.name == name and c.version == version for c in models.list_models()):
        raise RetrainError(f"model {name}@{version} already exists; choose another name or version")
    return name, version, models.user_models_dir() / name / version


def write_model(parent: models.ModelCard, cm, output, retraining: dict, metrics: dict, oof: dict | None = None) -> models.ModelCard:
    """Write the new version atomically (temporary folder renamed into place) and return its card."""
    from .classifier import save_classifier

    name, version, folder = resolve_output(parent, output)
    if folder.exists() and any(folder.iterdir()):
        raise RetrainError(f"output folder {folder} exists and is not empty")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f".tmp-{folder.name}-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        data = copy.deepcopy(parent.data)
        files = {}
        for key, part in parent.data.items():
            if key == "classifier" or not (isinstance(part, dict) and "file" in part):
                continue
            src = parent.verified_path(key)  # checksum verified before copying
            shutil.copy2(src, tmp / part["file"])
            files[part["file"]] = part["sha256"]
        section = save_classifier(cm, tmp, "classifier.safetensors")
        section["training"] = {k: v for k, v in retraining.items() if k in ("trainer", "timings", "seed")}
        files[section["file"]] = section["sha256"]
        parent_cls = parent.data.get("classifier", {})
        data.update(
            {
                "name": name,
                "version": version,
                "created": _now(),
                "description": f"{parent.data.get('description', parent.id)} | confidence classifier retrained "
                f"on {retraining['label_counts']['total']} labelled lesions",
                "classifier": section,
                "parent": {
                    "id": parent.id,
                    "classifier_sha256": parent_cls.get("sha256"),
                    "folder": str(parent.folder),
                    "metrics": parent.data.get("metrics", {}),
                },
                "retraining": retraining,
                "metrics": {
                    "retrain_cv_auc": metrics["new"]["auc"],
                    "retrain_cv_ece": metrics["new"]["ece"],
                    "parent_auc_same_labels": metrics["old"]["auc"],
                    "parent_ece_same_labels": metrics["old"]["ece"],
                    "n_labels": retraining["label_counts"]["total"],
                },
                "files": files,
            }
        )
        if oof is not None:
            try:
                save_validation_plot(oof, tmp / "validation.png", title=f"{name}@{version} vs {parent.id}")
            except Exception as exc:  # a plot must never fail the retraining
                print(f"warning: no validation plot: {exc}", file=sys.stderr)
        for key in ("segmenter", "classifier"):  # everything the card names is there and matches
            if key in data:
                models.ModelCard(tmp, data).verified_path(key)
        # the card appears last, so a killed job never leaves a folder that looks like a model
        (tmp / "card.partial.json").write_text(json.dumps(data, indent=2) + "\n")
        os.replace(tmp / "card.partial.json", tmp / models.CARD_NAME)
        if folder.exists():
            folder.rmdir()
        os.rename(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return models.read_card(folder)


def save_validation_plot(oof: dict, path: str | os.PathLike, title: str = "") -> Path:
    """ROC curve and reliability diagram of the old and the new classifier (PNG, Agg backend)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from sklearn.metrics import roc_curve

    y = np.asarray(oof["labels"])
    fig = Figure(figsize=(7.2, 3.4), dpi=100)
    FigureCanvasAgg(fig)
    ax1, ax2 = fig.subplots(1, 2)
    bins = np.linspace(0, 1, 11)
    for key, color, label in (("old", "#888888", "before"), ("new", "#1f77b4", "after")):
        p = np.asarray(oof[key])
        rank = np.asarray(oof.get(f"{key}_rank", p))  # the new model's ROC uses its out-of-fold logits
        if len(set(y.tolist())) == 2:
            from .evaluate import cluster_auc

            fpr, tpr, _ = roc_curve(y, rank)
            ax1.plot(fpr, tpr, color=color, label=f"{label} AUC {cluster_auc(rank, y):.3f}")
        idx = np.clip(np.digitize(p, bins) - 1, 0, 9)
        xs, ys = [], []
        for b in range(10):
            sel = idx == b
            if sel.any():
                xs.append(p[sel].mean())
                ys.append(y[sel].mean())
        ece = score_metrics(y, p)["ece"]
        ax2.plot(xs, ys, "o-", color=color, label=f"{label} ECE {ece:.3f}" if ece is not None else label)
    ax1.plot([0, 1], [0, 1], ":", color="#bbbbbb")
    ax1.set(xlabel="false-positive rate", ylabel="true-positive rate", title="ROC (out-of-fold)")
    ax2.plot([0, 1], [0, 1], ":", color="#bbbbbb")
    ax2.set(xlabel="confidence", ylabel="fraction true lesions", title="reliability", xlim=(0, 1), ylim=(0, 1))
    for ax in (ax1, ax2):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="lower right", fontsize=8)
    if len(set(y.tolist())) < 2:
        ax1.text(0.5, 0.5, "one class only:\nno ROC", ha="center", va="center", transform=ax1.transAxes)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, format="png")
    return path


# ----------------------------------------------------------------------------- the command
def _describe_setting(setting: dict | None) -> str:
    if not setting or "l2sp" not in setting:
        return "whole network retrained"
    if setting["l2sp"] is None:
        return "base weights kept, temperature refitted"
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
        return (
            f"new model {self.card.id} ({self.card.folder})\n"
            f"  labels: {c['total']} ({c['positive']} true, {c['negative']} false) from {c['cases']} cases\n"
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
    feedback store ``feedback`` (path or store; None = no review labels) and/or ground truth."""
    from .classifier import ConfidenceModel

    t0 = time.perf_counter()
    parent = models.get_card(base_model)
    if "classifier" not in parent.data:
        raise RetrainError(f"model {parent.id} has no classifier to retrain")
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
        review = from_store(feedback, model_ids)
        parts.append(review)
    if include_gt is not None:
        from .pipeline import Engine

        find_gt_cases(include_gt)  # fail fast on a bad folder
        engine = Engine(parent, device=device)
        parts.append(from_ground_truth(include_gt, engine, gt_cases, _span(progress, 0.02, 0.4), cancel, gt_prob_thresholds))
    try:
        data = merge(*parts)
    except RetrainError:
        data = TrainingData.empty(len(base.feature_names))
        if review is not None:
            data.skipped = dict(review.skipped)
    check_labels(data, min_labels, min_per_class)
    counts = data.counts()
    lo = 0.4 if include_gt is not None else 0.05
    fv = fit_and_validate(data, base, mode, folds, seed, epochs, _span(progress, lo, 0.95), cancel)
    _check(cancel)
    if progress:
        progress(0.96, "writing the new model version")
    seconds = time.perf_counter() - t0
    retraining = {
        "created": _now(),
        "feedback_db": str(getattr(feedback, "path", feedback)) if feedback is not None else None,
        "ground_truth": str(include_gt) if include_gt is not None else None,
        "gt_prob_thresholds": list(gt_prob_thresholds) if gt_prob_thresholds else None,
        "label_counts": counts,
        "validation": fv["metrics"],
        "trainer": fv["trainer"],
        "timings": {**fv["timings"], "total_s": round(seconds, 2)},
        "seed": seed,
    }
    card = write_model(parent, fv["model"], output, retraining, fv["metrics"], fv["oof"])
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


# ----------------------------------------------------------------------------- CLI
def _cmd_retrain(args) -> int:
    from .feedback import FeedbackStoreError

    bar = None
    if args.progress == "bar":
        from tqdm import tqdm

        bar = tqdm(total=100, desc="retrain", unit="%", file=sys.stderr, leave=False, bar_format="{desc}: {percentage:3.0f}%|{bar}| {postfix}")

    def progress(f, msg):
        if args.progress == "json":
            print(json.dumps({"event": "progress", "fraction": round(f, 4), "stage": msg}), flush=True)
        elif bar is not None:
            bar.n = int(round(f * 100))
            bar.set_postfix_str(msg, refresh=False)
            bar.refresh()

    try:
        res = retrain(
            args.feedback, args.base_model, args.include_gt, args.output, gt_cases=args.gt_cases,
            gt_prob_thresholds=args.gt_prob_threshold,
            model_ids=args.only_model, mode=args.mode, folds=args.folds, epochs=args.epochs, seed=args.seed,
            min_labels=args.min_labels, min_per_class=args.min_per_class, activate=args.activate,
            progress=progress if args.progress != "none" else None,
        )
    except (RetrainError, FeedbackStoreError, ModelError, CancelledError) as exc:
        if bar is not None:
            bar.close()
        if args.progress == "json":
            print(json.dumps({"event": "error", "message": str(exc)}), flush=True)
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if bar is not None:
        bar.close()
    if args.progress == "json":
        print(json.dumps({"event": "done", "model": res.card.id, "folder": str(res.card.folder),
                          "metrics": res.metrics, "labels": res.label_counts, "seconds": round(res.seconds, 2)}), flush=True)
    else:
        print(res.summary())
    return 0


def _cmd_train_seg(args) -> int:
    from .jobs import SegmenterTrainingJob, register_segmenter

    job = SegmenterTrainingJob(args.images, args.output, minutes=args.minutes, max_steps=args.max_steps,
                               val=args.val, extra=args.extra or [])
    try:
        job.check_inputs()
    except LesionSegError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    job.start()
    bar = None
    if args.progress == "bar":
        from tqdm import tqdm

        bar = tqdm(total=100, desc="train-seg", unit="%", file=sys.stderr, bar_format="{desc}: {percentage:3.0f}%|{bar}| {postfix}")
    last = None
    try:
        while job.poll() is None:
            time.sleep(0.5)
            for line in job.new_lines():
                if args.progress == "json":
                    print(json.dumps({"event": "log", "line": line}), flush=True)
                elif bar is None:
                    print(line, flush=True)
            if (job.fraction, job.status) != last:
                last = (job.fraction, job.status)
                if args.progress == "json":
                    print(json.dumps({"event": "progress", "fraction": round(job.fraction, 4), "stage": job.status}), flush=True)
                elif bar is not None:
                    bar.n = int(round(job.fraction * 100))
                    bar.set_postfix_str(job.status[:60], refresh=False)
                    bar.refresh()
    except KeyboardInterrupt:
        job.cancel()
        print("cancelled", file=sys.stderr)
        return 130
    finally:
        if bar is not None:
            bar.close()
    for line in job.new_lines():
        print(line, flush=True)
    if job.returncode != 0:
        print(f"error: segmenter training failed (exit {job.returncode}): {job.error_text()}", file=sys.stderr)
        return 1
    print(f"segmenter written to {args.output}")
    if args.register:
        card = register_segmenter(args.output, args.base_model, args.register)
        print(f"registered {card.id} ({card.folder}); its classifier is the parent's: retrain it with "
              f"`lesionseg retrain --base-model {card.id} --include-gt {args.images}`")
    return 0


def register_cli(subparsers) -> None:
    """``lesionseg retrain`` and ``lesionseg train-seg``."""
    p = subparsers.add_parser("retrain", help="retrain the confidence classifier from review feedback (+ ground truth)")
    p.add_argument("--feedback", default=None, help="feedback database (e.g. ~/.lesionseg/feedback.db)")
    p.add_argument("--base-model", default=None, help="model whose classifier is retrained (default: the active model)")
    p.add_argument("--include-gt", default=None, metavar="DIR", help="add labels from DIR/<case>/image.nii.gz + label.nii.gz")
    p.add_argument("--gt-cases", nargs="*", default=None, help="only these case folders of --include-gt")
    p.add_argument("--gt-prob-threshold", type=float, nargs="+", default=None, metavar="T",
                   help="probability thresholds forming the ground-truth candidates (default: the model's; "
                        "e.g. 0.5 0.3 adds low-probability false positives, as the original classifier training does)")
    p.add_argument("-o", "--output", default=None, metavar="NEW_MODEL",
                   help="name, name@version or folder of the new model (default: base name, next version)")
    p.add_argument("--only-model", action="append", default=None, help="use only decisions made with this model id")
    p.add_argument("--mode", choices=["head", "full"], default="head", help="head: frozen patch encoder (fast); full: whole network")
    p.add_argument("--folds", type=int, default=DEFAULT_FOLDS, help="cross-validation folds (grouped by case)")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--min-labels", type=int, default=MIN_LABELS)
    p.add_argument("--min-per-class", type=int, default=MIN_PER_CLASS)
    p.add_argument("--activate", action="store_true", help="make the new version the active model")
    p.add_argument("--progress", choices=["bar", "json", "none"], default="bar")
    p.set_defaults(func=_cmd_retrain)

    q = subparsers.add_parser("train-seg", help="train a new segmenter from a folder of images + labels (long-running)")
    q.add_argument("--images", required=True, metavar="DIR", help="folder of <case>/image.nii.gz + <case>/label.nii.gz")
    q.add_argument("-o", "--output", required=True, help="output folder (segmenter.safetensors + segmenter.json)")
    q.add_argument("--minutes", type=float, default=45.0, help="wall-clock training budget")
    q.add_argument("--max-steps", type=int, default=0)
    q.add_argument("--val", nargs="*", default=None, help="case folders used for validation Dice only")
    q.add_argument("--register", metavar="NAME", default=None,
                   help="register the result as a new model version NAME[@VERSION] (classifier copied from --base-model)")
    q.add_argument("--base-model", default=None)
    q.add_argument("--progress", choices=["bar", "json", "log"], default="log")
    q.add_argument("extra", nargs="*", help="further train_seg arguments after --, e.g. -- --loss dicefocal")
    q.set_defaults(func=_cmd_train_seg)

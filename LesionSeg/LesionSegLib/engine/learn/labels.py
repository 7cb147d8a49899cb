"""Labelled lesions for the confidence classifier: from the feedback store and from ground truth.

* **Review**: every *accepted* (1) and *rejected* (0) lesion in the feedback database whose
  stored features match this engine's ``FEATURE_NAMES`` and that has a readable patch; *unsure*
  ones are left out.  A lesion is identified by its case and stored lesion key: its centroid
  (the same lesion whichever model found it, as long as the segmenter is the same) or, without
  a centroid, its lesion id within that model's run.  When one lesion was reviewed more than
  once (under two model versions), the **latest** decision is its label; the older ones are
  counted as "superseded by a later review".  By default only decisions made with models that
  share the base model's segmenter are used (:func:`compatible_models`).
* **Ground truth** (folders ``DIR/<case>/image.nii.gz`` + ``label.nii.gz``): the model segments
  each image with threshold 0 (every candidate) and each candidate is labelled by the matching
  rule of :mod:`..evaluate.matching`.  When a lesion is both reviewed and in the ground truth,
  the human decision wins (pass the reviewed data first to :func:`merge`).

Cross-validation groups are **patients**: the case name (:func:`patient_of`), so two scans or
copies of one patient never sit on both sides of a fold.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from ..common import Progress, check_cancel
from ..errors import LesionSegError

MIN_LABELS = 20
MIN_PER_CLASS = 5


class RetrainError(LesionSegError):
    """Retraining refused or failed (too few labels, one class, incompatible data...)."""


@dataclass
class TrainingData:
    patches: np.ndarray  # (N, C, z, y, x) float16
    features: np.ndarray  # (N, F) float32, columns = FEATURE_NAMES
    labels: np.ndarray  # (N,) int 1 = true lesion, 0 = false positive
    groups: list[str]  # patient (case name) per lesion: the cross-validation groups
    sources: list[str]  # "review" or "gt"
    case_names: list[str]
    keys: list[str] = field(default_factory=list)  # lesion identity (see :func:`review_key`), for de-duplication
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


#: why a ground-truth label was left out when merging
REVIEW_WINS = "ground-truth label of a reviewed lesion (the review wins)"
SUPERSEDED = "superseded by a later review"
OTHER_SEGMENTER = "made with a model of another segmenter or one not installed (--all-models or --only-model takes them)"


def patient_of(case_name: str, case_hash: str = "") -> str:
    """The cross-validation group of a case: its name, with a ``~k`` copy suffix removed (perturbed
    copies ``<case>~1`` belong to ``<case>``); the case hash when there is no name."""
    name = (case_name or "").strip()
    base, sep, tail = name.rpartition("~")
    if sep and base and tail.isdigit():
        name = base
    return name or case_hash


def review_key(case_hash: str, model_id: str, stored_key: str) -> str:
    """Identity of a reviewed lesion: ``case|c:<centroid>`` (any model of one segmenter finds the
    same lesion at the same centroid), or ``case|model|id:<n>`` when no centroid was stored (lesion
    ids are numbers within one model's run)."""
    if stored_key.startswith("c:"):
        return f"{case_hash}|{stored_key}"
    return f"{case_hash}|{model_id}|{stored_key}"


def merge(*parts: TrainingData) -> TrainingData:
    """Concatenate, keeping the first occurrence of a lesion (pass the reviewed data first: a
    ground-truth label of a reviewed lesion is left out, counted as :data:`REVIEW_WINS`)."""
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
                skipped[REVIEW_WINS] = skipped.get(REVIEW_WINS, 0) + 1
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


#: the networks that propose a card's clusters
_PROPOSERS = ("segmenter", "detector", "roi_segmenter")


def segmenter_identity(card) -> tuple | None:
    """The sha256s of the networks that propose a card's clusters (CLCS: the segmenter; DetSeg3D:
    detector and RoI segmenter), or None when the card names none."""
    shas = tuple((card.data.get(k) or {}).get("sha256") for k in _PROPOSERS)
    return shas if any(shas) else None


def recorded_identities(cards) -> dict[str, tuple]:
    """Segmenter identities of models that may no longer be installed, as ``cards`` record where
    they came from: a shipped release's ``built_from`` (sts-clcs 1.2.0 names 1.1.0, which an update
    replaced) and a user version's ``parent``, each with the sha256s of its proposing networks."""
    out: dict[str, tuple] = {}
    for card in cards:
        for key in ("built_from", "parent"):
            link = card.data.get(key)
            if not isinstance(link, dict):
                continue
            mid = link.get("model") or link.get("id")
            shas = tuple(link.get(f"{k}_sha256") for k in _PROPOSERS)
            if isinstance(mid, str) and any(shas):
                out.setdefault(mid, shas)
    return out


def compatible_models(store, parent) -> tuple[list[str], dict[str, int]]:
    """Model ids in ``store`` whose segmenter is ``parent``'s (same segmenter sha256), and the
    number of decisions made with each other model.  A model no longer installed counts by the
    identity an installed card records for it (:func:`recorded_identities`), else as other."""
    from .. import models

    seg = segmenter_identity(parent)
    cards = models.list_models()
    registry = {c.id: c for c in cards}
    recorded = recorded_identities([parent, *cards])
    keep, other = [], {}
    for mid, counts in store.stats()["by_model"].items():
        card = parent if mid == parent.id else registry.get(mid)
        ident = segmenter_identity(card) if card is not None else recorded.get(mid)
        if seg and ident == seg:
            keep.append(mid)
        else:
            other[mid] = int(sum(counts.values()))
    return keep, other


def from_store(store, model_ids: Sequence[str] | None = None, parent=None) -> TrainingData:
    """Accepted / rejected lesions of a feedback store (path or :class:`FeedbackStore`).

    ``model_ids``: only decisions made with these models; else, with ``parent`` (a model card),
    only those of models sharing its segmenter (the others are counted as left out); else all.
    """
    from ..feedback import FeedbackStore
    from ..feedback.schema import parse_time
    from ..segment.features import FEATURE_NAMES, feature_matrix

    own = not isinstance(store, FeedbackStore)
    st = FeedbackStore(store, readonly=True) if own else store
    skipped: dict[str, int] = {}
    try:
        if not model_ids and parent is not None:
            model_ids, other = compatible_models(st, parent)
            if other:
                skipped[OTHER_SEGMENTER] = sum(other.values())
        ls = st.labelled(model_ids=model_ids, feature_names=FEATURE_NAMES) if model_ids is None or model_ids else None
    finally:
        if own:
            st.close()
    if ls is not None:
        skipped.update(ls.skipped)
    if ls is None or len(ls) == 0:
        d = TrainingData.empty(len(FEATURE_NAMES))
        d.skipped = skipped
        return d
    keys = [review_key(h, m, k) for h, m, k in zip(ls.case_hashes, ls.model_ids, ls.lesion_keys)]
    # one label per lesion: the latest decision (ties, or unreadable times: the later row)
    times = [parse_time(t) for t in ls.decided_at]

    def order(i: int):
        return (times[i] is not None, times[i].timestamp() if times[i] else 0.0, i)

    latest: dict[str, int] = {}
    for i, k in enumerate(keys):
        if k not in latest or order(i) > order(latest[k]):
            latest[k] = i
    keep = sorted(latest.values())
    if len(keep) < len(keys):
        skipped[SUPERSEDED] = len(keys) - len(keep)
    feats = np.nan_to_num(feature_matrix([ls.features[i] for i in keep]), nan=0.0, posinf=0.0, neginf=0.0)
    return TrainingData(ls.patches[keep], feats, ls.labels[keep],
                        [patient_of(ls.case_names[i], ls.case_hashes[i]) for i in keep], ["review"] * len(keep),
                        [ls.case_names[i] for i in keep], [keys[i] for i in keep], skipped)


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

    from ..evaluate.matching import gt_components, match

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
    from ..segment.features import FEATURE_NAMES, feature_matrix
    from ..feedback import lesion_key
    from ..io.images import read_image, read_label
    from ..segment.pipeline import case_hash

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
            check_cancel(cancel, "retraining")
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
                    groups.append(patient_of(name, h))
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
        which = "rejected (false positives)" if pos else "accepted (true lesions)"  # the missing class
        raise RetrainError(
            f"only one class: all {n} labels are {'rejected' if neg else 'accepted'}; the classifier needs "
            f"{which} examples too{skipped}."
        )
    if min(pos, neg) < min_per_class:
        raise RetrainError(
            f"too few labels of one class: {pos} accepted/true and {neg} rejected/false{skipped}; at least "
            f"{min_per_class} of each are needed."
        )

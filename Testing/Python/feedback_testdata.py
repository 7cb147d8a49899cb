"""Shared test data for the feedback / retraining / LesionSegTraining tests.

Real reviewed lesions: the engine segments a few small STS cases with confidence threshold 0
(every candidate, with its features and patch), each candidate is labelled from the ground truth
with the matching rule, and turned into a :class:`~LesionSegLib.review.Decision` (accepted = true
lesion, rejected = false positive), as a reviewer following the ground truth would.  The shipped
model finds few false positives on STS, so, as its own classifier training does, candidates are
formed at a low probability threshold (``PROB_THRESHOLD``) and also on one perturbed copy of each
case (flips, noise, HU shift: ``train_cls.perturbed``; case name ``<case>~1``), until both classes
have enough examples.  Computed once per test session (cached).

The model is the shipped default (``$LESIONSEG_TEST_MODEL`` overrides it); a missing model fails;
tests skip (with the reason) only when the data folder is absent.
"""
from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np
import pytest

from LesionSegLib.engine import data as dataset
from LesionSegLib.engine import models

CASES = ["STS_041", "STS_012", "STS_037", "STS_035", "STS_002", "STS_034", "STS_038", "STS_040"]
PROB_THRESHOLD = 0.1
MIN_PER_CLASS = 6
MIN_TOTAL = 30


def require_data() -> Path:
    root = dataset.data_root()
    if not (root / "manifest.csv").exists():
        pytest.skip(f"shared CT data not found at {root} (set LESIONSEG_DATA)")
    return root


def model_folder() -> Path:
    """Folder of the model used for real features (``$LESIONSEG_TEST_MODEL``, else the shipped default)."""
    override = os.environ.get("LESIONSEG_TEST_MODEL")
    if override:
        return models.get_card(override).folder
    builtin = [c for c in models.list_models() if c.builtin and c.name == models.DEFAULT_MODEL]
    if builtin:
        return max(builtin, key=lambda c: models._version_key(c.version)).folder
    pytest.fail(f"no model: {models.DEFAULT_MODEL} is not in LesionSegLib/models (it ships there; set LESIONSEG_TEST_MODEL)")


def user_models_with_base(tmp_path, monkeypatch):
    """Point ``$LESIONSEG_MODELS`` at ``tmp_path/models`` holding the base model; return its card."""
    import shutil

    monkeypatch.setenv("LESIONSEG_MODELS", str(tmp_path / "models"))
    src = model_folder()
    card = models.read_card(src)
    if not card.builtin:
        shutil.copytree(src, tmp_path / "models" / card.name / card.version)
    return models.get_card(card.id)


@functools.lru_cache(maxsize=None)
def _candidates(folder: str, case_names: tuple[str, ...], views: int = 1):
    import torch

    from LesionSegLib.engine.io.images import read_image, read_label
    from LesionSegLib.engine.segment.pipeline import Engine, case_hash
    from LesionSegLib.engine.learn.labels import candidates_with_labels
    from LesionSegLib.engine.learn.train_cls import perturbed

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    engine = Engine(folder, device="cpu")
    engine.prob_threshold = PROB_THRESHOLD
    rng = np.random.default_rng(0)
    out = []
    n_tp = n_fp = 0
    for name in case_names:
        c = dataset.case(name)
        img = read_image(c.image)
        lab = read_label(c.label, img)
        todo = [(name, img, lab)] + [(f"{name}~{v + 1}", *perturbed(img, lab, rng)) for v in range(views)]
        for view_name, im, lb in todo:
            res, m, _, _ = candidates_with_labels(engine, im, lb)
            out.append((view_name, case_hash(im), res, m.is_tp.copy()))
            n_tp += int(m.is_tp.sum())
            n_fp += int((~m.is_tp).sum())
        if n_tp >= MIN_PER_CLASS and n_fp >= MIN_PER_CLASS and n_tp + n_fp >= MIN_TOTAL and len(out) >= 4:
            break
    return out


def candidate_cases():
    """[(case name, case hash, SegmentationResult, is_tp)] for a few small STS cases and perturbed copies."""
    require_data()
    return _candidates(str(model_folder()), tuple(CASES))


def real_decisions(reviewer: str = "sim-reviewer", unsure_every: int = 0):
    """Reviewer decisions derived from the ground truth for every candidate of :func:`candidate_cases`."""
    from LesionSegLib.review import Decision

    out = []
    k = 0
    for name, h, res, is_tp in candidate_cases():
        for les, tp in zip(res.lesions, is_tp):
            k += 1
            decision = "unsure" if unsure_every and k % unsure_every == 0 else ("accepted" if tp else "rejected")
            out.append(Decision.from_lesion(name, h, res.model_id, les, decision, reviewer))
    return out


def synthetic_decision(i: int, decision: str = "accepted", case: str = "caseA", model_id: str = "m@1",
                       with_patch: bool = True, rng_seed: int | None = None):
    """A decision with a smooth random patch and all features (for store-only tests)."""
    from LesionSegLib.engine.segment.features import FEATURE_NAMES
    from LesionSegLib.review import Decision

    rng = np.random.default_rng(i if rng_seed is None else rng_seed)
    patch = None
    if with_patch:
        base = rng.normal(size=(3, 8, 8, 8)).astype(np.float32)
        patch = np.kron(base, np.ones((1, 4, 4, 4), np.float32)).astype(np.float16)  # (3, 32, 32, 32)
    return Decision(
        case_name=case, case_hash=f"hash-{case}", lesion_id=i, decision=decision,
        confidence=float(rng.random()), model_id=model_id,
        centroid_lps=(10.0 + i, -20.5, 30.25 * (i % 3)), volume_ml=1.5 * i, diameter_mm=3.0 + i,
        bbox_ijk=((i, 2, 3), (i + 4, 6, 7)),
        features={n: float(rng.normal()) for n in FEATURE_NAMES}, patch=patch, reviewer="tester",
    )

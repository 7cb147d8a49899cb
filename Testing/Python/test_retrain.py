"""Retraining the confidence classifier from the feedback store, model versions, the CLI.

Real features: the engine runs on small STS cases (see ``feedback_testdata``) and a reviewer
following the ground truth accepts / rejects every candidate.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

import feedback_testdata as td
from LesionSegLib.engine import models
from LesionSegLib.engine.learn import versions
from LesionSegLib.engine.errors import ModelError
from LesionSegLib.engine.feedback import FeedbackStore
from LesionSegLib.engine.learn.labels import REVIEW_WINS, RetrainError, check_labels, from_store, patient_of
from LesionSegLib.engine.learn.retrain import retrain


@pytest.fixture
def user_models(tmp_path, monkeypatch):
    d = tmp_path / "user_models"
    monkeypatch.setenv("LESIONSEG_MODELS", str(d))
    return d


@pytest.fixture
def base_model(user_models):
    """The base model, registered under the (temporary) user model folder so that versions work."""
    src = td.model_folder()
    card = models.read_card(src)
    if card.builtin:
        return card
    import shutil

    dst = user_models / card.name / card.version
    shutil.copytree(src, dst)
    return models.read_card(dst)


@pytest.fixture
def review_db(tmp_path):
    decisions = td.real_decisions(unsure_every=7)
    store = FeedbackStore(tmp_path / "feedback.db")
    store.record_many(decisions)
    return store, decisions


# ----------------------------------------------------------------------------- guards
def _store_with(tmp_path, labels, name="g.db", model_id="m@1"):
    store = FeedbackStore(tmp_path / name)
    store.record_many([td.synthetic_decision(i, lab, case=f"c{i % 4}", model_id=model_id) for i, lab in enumerate(labels)])
    return store


def test_guard_too_few_labels(tmp_path, base_model):
    store = _store_with(tmp_path, ["accepted", "rejected"] * 4 + ["unsure"] * 30, model_id=base_model.id)
    with pytest.raises(RetrainError, match=r"too few labels to retrain: 8 usable lesions \(4 accepted/true, 4 rejected/false\).*30 unsure"):
        retrain(store, base_model.id, output="x")


def test_guard_one_class(tmp_path, base_model):
    store = _store_with(tmp_path, ["rejected"] * 40, model_id=base_model.id)
    with pytest.raises(RetrainError, match=r"only one class: all 40 labels are rejected; the classifier needs accepted \(true lesions\) examples too"):
        retrain(store, base_model.id, output="x")
    store = _store_with(tmp_path, ["accepted"] * 30, name="acc.db", model_id=base_model.id)
    with pytest.raises(RetrainError, match=r"only one class: all 30 labels are accepted; the classifier needs rejected \(false positives\) examples too"):
        retrain(store, base_model.id, output="x")


def test_guard_too_few_of_one_class(tmp_path, base_model):
    store = _store_with(tmp_path, ["accepted"] * 2 + ["rejected"] * 40, model_id=base_model.id)
    with pytest.raises(RetrainError, match="too few labels of one class: 2 accepted/true and 40 rejected/false"):
        retrain(store, base_model.id, output="x")


def test_guard_empty_and_incompatible(tmp_path, base_model):
    empty = FeedbackStore(tmp_path / "empty.db")
    with pytest.raises(RetrainError, match="0 usable lesions"):
        retrain(empty, base_model.id)
    # decisions from a model with other features are counted as left out, not silently used
    store = FeedbackStore(tmp_path / "other.db")
    ds = [td.synthetic_decision(i, "accepted" if i % 2 else "rejected", model_id=base_model.id) for i in range(30)]
    for d in ds:
        d.features = {"some_other_feature": 1.0}
    store.record_many(ds)
    with pytest.raises(RetrainError, match="30 missing features"):
        retrain(store, base_model.id)
    with pytest.raises(RetrainError, match="nothing to learn from"):
        retrain(None, base_model.id)
    assert not any(c.version != base_model.version for c in models.list_models() if c.name == base_model.name)


def test_check_labels_accepts_enough(tmp_path):
    store = _store_with(tmp_path, ["accepted", "rejected"] * 10)
    data = from_store(store)
    check_labels(data)  # no exception
    assert data.counts()["by_source"]["review"] == {"positive": 10, "negative": 10}


# ----------------------------------------------------------------------------- real retraining
def test_retrain_on_real_features_writes_a_new_version(review_db, base_model, user_models):
    store, decisions = review_db
    labelled = [d for d in decisions if d.decision != "unsure"]
    n_pos = sum(d.decision == "accepted" for d in labelled)
    steps = []
    res = retrain(store, base_model.id, folds=3, min_labels=10, min_per_class=2,
                  progress=lambda f, m: steps.append((f, m)))
    card = res.card
    # a new version in the user model folder, with a full card
    assert card.folder.parent.parent == user_models
    assert card.name == base_model.name and card.version.isdigit()
    assert card.id != base_model.id
    assert card.data["parent"]["id"] == base_model.id
    assert card.data["parent"]["classifier_sha256"] == base_model.data["classifier"]["sha256"]
    counts = card.data["retraining"]["label_counts"]
    assert counts["total"] == len(labelled) and counts["positive"] == n_pos
    assert counts["skipped"]["unsure"] == len(decisions) - len(labelled)
    assert counts["cases"] == len({patient_of(d.case_name) for d in labelled})  # patients, not scans
    assert counts["cases"] < len({d.case_hash for d in labelled})  # the perturbed copies join their patient
    # sha256 of every weight file matches, the segmenter is the parent's
    for key in ("segmenter", "classifier"):
        assert models.sha256_file(card.weights_path(key)) == card.data[key]["sha256"]
        assert card.data["files"][card.data[key]["file"]] == card.data[key]["sha256"]
    assert card.data["segmenter"]["sha256"] == base_model.data["segmenter"]["sha256"]
    # head mode keeps the patch encoder: the parent's OOD statistics (scans and clusters) apply as they are
    assert card.data["ood"]["sha256"] == base_model.data["ood"]["sha256"] and card.data["ood"]["n_clusters"] > 0
    _chest_is_warned_and_capped(card)
    selected = card.data["retraining"]["validation"]["selected"]
    assert [r["l2sp"] for r in card.data["retraining"]["validation"]["selection"]] == [None, 1.0, 0.1, 0.01, 0.0]
    if selected["l2sp"] is not None:  # fine-tuned head: new weights
        assert card.data["classifier"]["sha256"] != base_model.data["classifier"]["sha256"]
    assert card.data["classifier"]["temperature"] == pytest.approx(card.data["retraining"]["validation"]["temperature"])
    # validation: old and new on the same lesions
    v = card.data["retraining"]["validation"]
    assert v["old"]["n"] == v["new"]["n"] == v["evaluated"] > 0
    assert "grouped by patient" in v["validation"]
    for who in ("old", "new"):
        assert 0.0 <= v[who]["ece"] <= 1.0 and 0.0 <= v[who]["brier"] <= 1.0
        assert v[who]["auc"] is None or 0.0 <= v[who]["auc"] <= 1.0
    assert card.data["metrics"]["retrain_cv_auc"] == v["new"]["auc"]
    assert res.oof["labels"].shape == res.oof["new"].shape == res.oof["old"].shape
    assert (card.folder / "validation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert steps[-1][0] == 1.0 and all(a[0] <= b[0] for a, b in zip(steps, steps[1:]))
    json.loads((card.folder / "card.json").read_text(encoding="utf-8"))

    # the new model runs in the engine, with different confidences than its parent
    from LesionSegLib.engine.segment.classifier import ConfidenceModel
    from LesionSegLib.engine.segment.features import feature_matrix

    new, old = ConfidenceModel.from_card(card), ConfidenceModel.from_card(base_model)
    P = np.stack([d.patch for d in labelled[:8]]).astype(np.float32)
    F = feature_matrix([d.features for d in labelled[:8]])
    p_new, p_old = new.predict(P, F), old.predict(P, F)
    assert np.all((p_new >= 0) & (p_new <= 1))
    if selected["l2sp"] is None:  # base weights kept: same ranking, refitted temperature
        z = old.logits(P, F)
        np.testing.assert_allclose(p_new, 1 / (1 + np.exp(-z / new.temperature)), rtol=1e-5)
    else:
        assert not np.allclose(p_new, p_old)
    assert "before" in res.summary() and "after" in res.summary()

    # versions: list, activate, roll back
    ids = [r["id"] for r in versions.list_versions(base_model.name)]
    assert base_model.id in ids and card.id in ids
    assert versions.activate(card.id) == card.id
    assert models.active_model_id() == card.id and models.get_card(None).id == card.id
    assert [r["id"] for r in versions.list_versions() if r["active"]] == [card.id]
    assert versions.rollback() == models.default_model_id()
    assert models.active_model_id() == models.default_model_id()
    with pytest.raises(ModelError, match="nothing to roll back"):
        versions.rollback()
    versions.activate(base_model.id)
    versions.activate(card.id)
    assert versions.rollback() == base_model.id
    events = [e["event"] for e in versions.history()]
    assert events == ["activate", "rollback", "activate", "activate", "rollback"]
    # a damaged version can never be activated
    w = card.weights_path("classifier")
    w.write_bytes(w.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(ModelError, match="checksum mismatch"):
        versions.activate(card.id)
    assert models.active_model_id() == base_model.id
    # a second retrain gets the next version; an existing id is refused
    with pytest.raises(RetrainError, match="already exists"):
        retrain(store, base_model.id, output=card.id, folds=2, min_labels=10, min_per_class=2)


def test_retrain_with_ground_truth_labels(tmp_path, base_model, user_models):
    """``--include-gt``: labels from the matching rule on <dir>/<case>/image+label."""
    root = td.require_data()
    cases = [c for c in td.candidate_cases() if "~" not in c[0]][:3]  # original images only
    gt_dir = tmp_path / "gt"
    for name, *_ in cases:
        (gt_dir / name).mkdir(parents=True)
        for f in ("image.nii.gz", "label.nii.gz"):
            (gt_dir / name / f).symlink_to(root / "sts" / name / f)
    expected_pos = sum(int(tp.sum()) for *_, tp in cases)
    expected = sum(len(tp) for *_, tp in cases)
    # the first case was also reviewed: the human decision wins, nothing is counted twice
    store = FeedbackStore(tmp_path / "fb.db")
    reviewed = [d for d in td.real_decisions() if d.case_name == cases[0][0]]
    for d in reviewed:
        d.decision = "accepted"  # the reviewer disagrees with the ground truth on every false positive
    store.record_many(reviewed)
    res = retrain(store, base_model.id, include_gt=gt_dir, output="gt-retrained", folds=3,
                  gt_prob_thresholds=[td.PROB_THRESHOLD], min_labels=4, min_per_class=1)
    counts = res.label_counts
    assert counts["total"] == expected
    assert counts["by_source"]["review"] == {"positive": len(reviewed), "negative": 0}
    gt_part = counts["by_source"]["gt"]
    assert gt_part["positive"] + gt_part["negative"] == expected - len(reviewed)
    assert counts["skipped"][REVIEW_WINS] == len(reviewed)
    assert gt_part["positive"] == expected_pos - int(cases[0][3].sum())
    assert res.card.id == "gt-retrained@1"
    assert res.card.data["retraining"]["gt_prob_thresholds"] == [td.PROB_THRESHOLD]


def test_cli_retrain_and_models(review_db, base_model, user_models, tmp_path, capsys):
    from LesionSegLib.engine.cli import main

    store, _ = review_db
    rc = main(["retrain", "--feedback", str(store.path), "--base-model", base_model.id, "-o", "cli-model",
               "--folds", "2", "--min-labels", "10", "--min-per-class", "2", "--progress", "json", "--activate"])
    out = capsys.readouterr().out.strip().splitlines()
    assert rc == 0, out
    events = [json.loads(x) for x in out]
    assert events[-1]["event"] == "done" and events[-1]["model"] == "cli-model@1"
    assert any(e["event"] == "progress" for e in events)
    assert models.active_model_id() == "cli-model@1"
    assert main(["models", "list", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {"cli-model@1", base_model.id} <= {r["id"] for r in rows}
    assert main(["models", "rollback"]) == 0
    assert models.active_model_id() == models.default_model_id()
    # refusal is a clean error, exit code 2
    empty = FeedbackStore(tmp_path / "empty.db")
    assert main(["retrain", "--feedback", str(empty.path), "--base-model", base_model.id, "--progress", "none"]) == 2
    assert "too few labels" in capsys.readouterr().err


def test_cli_train_seg_refuses_bad_folders(tmp_path, capsys):
    from LesionSegLib.engine.cli import main

    assert main(["train-seg", "--images", str(tmp_path / "absent"), "-o", str(tmp_path / "out")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["train-seg", "--images", str(tmp_path / "empty"), "-o", str(tmp_path / "out")]) == 2
    assert "holds no <case>/image.nii.gz" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_full_mode_retrains_the_whole_network(review_db, base_model, user_models):
    store, _ = review_db
    res = retrain(store, base_model.id, output="full-mode", mode="full", epochs=1, folds=2, min_labels=10, min_per_class=2)
    tr = res.card.data["retraining"]["trainer"]
    assert tr["mode"] == "full" and tr["epochs"] == 1
    assert res.card.data["classifier"]["sha256"] != base_model.data["classifier"]["sha256"]
    assert res.metrics["old"]["n"] == res.metrics["new"]["n"] > 0
    # its encoder changed: the parent's scan-level check and cap stay, its cluster reference does not
    ood = res.card.data["ood"]
    assert ood["n_scans"] == base_model.data["ood"]["n_scans"] and ood["n_clusters"] == 0 and "lesion_reference" in ood
    _chest_is_warned_and_capped(res.card)


def _chest_is_warned_and_capped(card):
    """A retrained version keeps its parent's out-of-distribution check: a chest CT is warned and no
    lesion on it reaches the threshold. A retrained card had no ``ood`` section, so the chest's false
    lesions were shown at full confidence, without a word (an audit)."""
    from LesionSegLib.engine.io.images import read_image
    from LesionSegLib.engine.segment.pipeline import Engine

    root = td.require_data()
    res = Engine(card, device="cpu").segment(read_image(root / "lidc" / "LIDC-IDRI-0001" / "image.nii.gz"), threshold=0.0)
    assert res.ood is not None and res.ood["warning"] and res.ood["scan_score"] > 1.5
    assert all(les.confidence < card.data["confidence_threshold"] for les in res.lesions)
    assert card.data["domain"] == models.read_card(card.data["parent"]["folder"]).data["domain"]

"""The tumour-free negatives build (``engine.learn.tumour_free``) and the sts-clcs version it made.

The pieces run on made-up images and a stand-in engine (what they compute is exactly checkable);
the shipped card is checked for what the build promises: validation on cases it was never fitted
on, its own figures, where it came from, and no machine-local path.
"""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import SimpleITK as sitk

from LesionSegLib.engine import models
from LesionSegLib.engine.feedback import FeedbackStore
from LesionSegLib.engine.learn import tumour_free as tf
from LesionSegLib.engine.learn.labels import from_store
from LesionSegLib.engine.segment.features import FEATURE_NAMES


def _image(nz=40, spacing=(2.0, 2.0, 3.0)):
    img = sitk.GetImageFromArray(np.full((nz, 16, 16), 40, np.int16))
    img.SetSpacing(spacing)
    img.SetOrigin((-10.0, 5.0, 100.0))
    return img


def _gt(nz, z0, z1):
    gt = np.zeros((nz, 16, 16), bool)
    gt[z0:z1, 6:9, 6:9] = True
    return gt


def test_slabs_keep_their_distance_from_the_tumour_and_their_place_in_space():
    img = _image()
    slabs = tf.tumour_free_slabs(img, _gt(40, 20, 23))  # tumour on slices 20-22; gap ceil(10 / 3) = 4 slices
    assert set(slabs) == {"below", "above"}
    assert slabs["below"].GetSize() == (16, 16, 16)  # slices 0-15 (16 is 4 slices below 20)
    assert slabs["above"].GetSize() == (16, 16, 13)  # slices 27-39
    assert slabs["above"].GetOrigin() == pytest.approx((-10.0, 5.0, 100.0 + 27 * 3.0))  # voxel-exact, not resampled
    assert slabs["below"].GetSpacing() == img.GetSpacing()


def test_a_side_thinner_than_twelve_slices_gives_no_slab():
    slabs = tf.tumour_free_slabs(_image(), _gt(40, 5, 30))  # 5 - 4 = 1 slice below; 40 - 34 = 6 above
    assert slabs == {}
    slabs = tf.tumour_free_slabs(_image(), _gt(40, 16, 30))  # exactly 12 below
    assert list(slabs) == ["below"] and slabs["below"].GetSize()[2] == 12


def test_a_label_without_a_tumour_is_refused():
    with pytest.raises(ValueError, match="no tumour"):
        tf.tumour_free_slabs(_image(), np.zeros((40, 16, 16), bool))


def _lesion(i, conf):
    return SimpleNamespace(lesion_id=i, confidence=conf, centroid_lps=(float(i), 2.0, 3.0 + i), volume_ml=1.5,
                           diameter_mm=12.0, bbox_ijk=((0, 0, 0), (3, 3, 3)),
                           features={n: 0.1 * k for k, n in enumerate(FEATURE_NAMES)},
                           patch=np.full((3, 32, 32, 32), i, np.float32))


class _Engine:
    """Finds two clusters on every slab, as a model would, and remembers what it was asked."""

    def __init__(self):
        self.calls = []

    def segment(self, image, threshold=None, keep_patches=False):
        self.calls.append((image.GetSize(), threshold, keep_patches))
        return SimpleNamespace(model_id="m@1", lesions=[_lesion(1, 0.9), _lesion(2, 0.05)])


def test_slab_rejections_are_stored_as_a_reviewer_rejection_of_the_patient(monkeypatch, tmp_path):
    img = _image()
    monkeypatch.setattr(tf, "read_case", lambda name: (img, None, _gt(40, 20, 23)))
    engine = _Engine()
    got = tf.slab_rejections(engine, ["P1"], log=lambda m: None)
    assert len(got) == 4 and {d["decision"] for d in got} == {"rejected"}
    assert all(c[1] == 0.0 and c[2] for c in engine.calls)  # every candidate, with its patch
    assert {d["case_name"] for d in got} == {"P1"}  # cross-validation keeps them with the patient
    assert len({d["case_hash"] for d in got}) == 2  # one scan (slab) each side
    store = FeedbackStore(tmp_path / "fb.db")
    try:
        store.record_many(got)
        data = from_store(store)
    finally:
        store.close()
    assert len(data.labels) == 4 and not data.labels.any() and set(data.groups) == {"P1"}
    assert np.allclose(np.sort([p[0, 0, 0, 0] for p in data.patches.astype(np.float32)]), [1, 1, 2, 2])


def test_slab_figures_count_the_lesions_shown_on_the_slabs(monkeypatch):
    img = _image()
    monkeypatch.setattr(tf, "read_case", lambda name: (img, None, _gt(40, 20, 23) if name == "A" else _gt(40, 5, 30)))
    shown = iter([[_lesion(1, 0.7)], []])
    engine = SimpleNamespace(segment=lambda slab: SimpleNamespace(lesions=next(shown)))
    got = tf.slab_figures(engine, ["A", "B"])  # A has two slabs, B none
    assert (got["slabs"], got["slabs_with_a_false_lesion"], got["slab_false_lesions"]) == (2, 1, 1)
    assert got["slab_max_confidence"] == 0.7 and got["per_slab"][0] == {"case": "A", "side": "below", "lesions": 1,
                                                                         "max_confidence": 0.7}


def test_the_build_refuses_a_taken_output_folder_and_a_model_it_cannot_teach(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "x").write_text("keep me")
    with pytest.raises(SystemExit, match="not an empty folder"):
        tf.build("sts-clcs", out, "9.9.9")
    assert (out / "x").read_text() == "keep me"
    with pytest.raises(SystemExit, match="not a CLCS model card with a classifier"):
        tf.build("sts-attention-unet", tmp_path / "new", "9.9.9")
    assert not (tmp_path / "new").exists()


def test_the_build_writes_to_a_bare_relative_output_name(tmp_path, monkeypatch):
    """``-o runs`` (no slash) finished the release and then failed: its last check looked ``runs``
    up as a registered model id.  The training and validation are stood in for here."""
    import copy

    shipped = _shipped()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(tf, "retrain_with_slabs", lambda *a: (SimpleNamespace(card=shipped, summary=lambda: ""), 0))
    monkeypatch.setattr("LesionSegLib.engine.segment.pipeline.Engine", lambda *a, **k: SimpleNamespace(default_threshold=0.5))
    monkeypatch.setattr("LesionSegLib.engine.learn.train_cls.evaluate_cases", lambda *a: {})
    monkeypatch.setattr(tf, "slab_figures", lambda *a: {})
    monkeypatch.setattr(tf, "release_card", lambda base, *a: {**copy.deepcopy(shipped.data), "version": "9.9.9"})
    card = tf.build("sts-clcs", "release", "9.9.9", log=lambda *a: None)
    assert card["version"] == "9.9.9" and models.read_card(tmp_path / "release").version == "9.9.9"


def _shipped() -> models.ModelCard:
    return models.read_card(Path(models.__file__).resolve().parents[1] / "models" / "sts-clcs")


def test_the_shipped_sts_clcs_is_the_tumour_free_build_validated_on_unfitted_cases():
    card = _shipped()
    d = card.data
    assert card.version == "1.2.0" and d["built_from"]["model"] == "sts-clcs@1.1.0" and d["built_from"]["commit"]
    train, val = set(d["data"]["train_cases"]), set(d["validation"]["cases"])
    assert val and not train & val
    assert set(d["data"]["tumour_free_negatives"]["cases"]) <= train
    rt = d["training"]["classifier_retraining"]
    assert rt["code"]["commit"] and rt["code"]["engine_modified"] is False  # built by committed code
    assert rt["command"].startswith("python -m LesionSegLib.engine.learn.tumour_free ") and " --version 1.2.0" in rt["command"]
    slabs = d["validation"]["tumour_free_slabs"]
    assert d["metrics"]["val_tumour_free_slabs_with_a_false_lesion"] == slabs["slabs_with_a_false_lesion"]
    assert {s["case"] for s in slabs["per_slab"]} <= val
    assert d["metrics"]["val_dice"] == round(d["validation"]["dice_mean"], 4)
    # the segmenter and the OOD reference are 1.1.0's bytes, the classifier is new
    assert d["segmenter"]["sha256"] == d["built_from"]["segmenter_sha256"]
    assert d["ood"]["sha256"] == d["built_from"]["ood_sha256"]
    assert d["classifier"]["sha256"] != d["built_from"]["classifier_sha256"]
    for key in ("segmenter", "classifier", "ood"):
        card.verified_bytes(key)


def test_the_shipped_card_names_no_path_of_the_machine_that_built_it():
    text = json.dumps(_shipped().data)
    for local in ("/tmp", "/work", "/home", "tumour-free-", "\\\\Users"):
        assert local not in text, local


def test_reviews_made_with_the_replaced_1_1_0_still_retrain_1_2_0(tmp_path, monkeypatch):
    """An update replaces the shipped sts-clcs 1.1.0 by 1.2.0 (same segmenter).  A user's decisions
    made with 1.1.0 must still count when ``lesionseg retrain`` retrains 1.2.0 without
    ``--all-models``: 1.1.0's card is gone, but 1.2.0's ``built_from`` records its segmenter."""
    from LesionSegLib.engine.learn.labels import OTHER_SEGMENTER, compatible_models

    monkeypatch.setenv("LESIONSEG_MODELS", str(tmp_path / "models"))
    shipped = models.get_card("sts-clcs")
    assert "sts-clcs@1.1.0" not in {c.id for c in models.list_models()}
    rows = [{"case_name": "P", "case_hash": "h" * 64, "lesion_id": i, "decision": "rejected", "confidence": 0.7,
             "model_id": mid, "centroid_lps": (float(i), 1.0, 1.0), "features": {n: 0.0 for n in FEATURE_NAMES},
             "patch": np.zeros((3, 32, 32, 32), np.float32)}
            for i, mid in enumerate(["sts-clcs@1.1.0", "sts-clcs@1.1.0", "sts-clcs@1.2.0", "elsewhere@3"], start=1)]
    store = FeedbackStore(tmp_path / "fb.db")
    try:
        store.record_many(rows)
        keep, other = compatible_models(store, shipped)
        data = from_store(store, parent=shipped)
    finally:
        store.close()
    assert sorted(keep) == ["sts-clcs@1.1.0", "sts-clcs@1.2.0"] and other == {"elsewhere@3": 1}
    assert len(data.labels) == 3 and data.skipped[OTHER_SEGMENTER] == 1


def test_an_activated_1_1_0_runs_the_shipped_1_2_0_but_a_removed_user_version_is_named(tmp_path, monkeypatch):
    """1.2.0's card names 1.1.0 as shipped before it (``built_from``, ``release_notes``), so a user
    who had activated 1.1.0 gets 1.2.0 after the update, with a note; a version of their own that
    they removed (older than 1.2.0 too) is not silently replaced."""
    from LesionSegLib.engine.errors import ModelError
    from LesionSegLib.engine.learn import versions

    monkeypatch.setenv("LESIONSEG_MODELS", str(tmp_path / "models"))
    (tmp_path / "models").mkdir()
    active = tmp_path / "models" / "active.json"
    active.write_text(json.dumps({"active": "sts-clcs@1.1.0", "history": [], "log": []}))
    assert models.get_card(None).id == "sts-clcs@1.2.0"
    assert "replaced by the shipped sts-clcs@1.2.0" in versions.active_state_problem()
    active.write_text(json.dumps({"active": "sts-clcs@1.1.5", "history": [], "log": []}))
    with pytest.raises(ModelError, match="unknown model 'sts-clcs@1.1.5'"):
        models.get_card(None)


def test_the_release_card_keeps_what_runs_the_model_and_reports_only_the_validation_cases():
    base = SimpleNamespace(
        id="m@1.1.0", name="m", version="1.1.0", folder=Path("/somewhere/m"),
        data={"description": "CLCS", "segmenter": {"sha256": "a" * 64}, "classifier": {"sha256": "b" * 64},
              "data": {"train_cases": ["T1", "T2"], "val_cases": ["V1"]}, "training": {"segmenter": {"minutes": 52}}})
    new = {"architecture": "clcs", "segmenter": {"sha256": "a" * 64, "inherited_from": "m@1.1.0"},
           "classifier": {"sha256": "c" * 64, "training": {"seed": 0}}, "parent": {"id": "m@1.1.0", "folder": "/tmp/x"},
           "data": {"feedback_db": "/tmp/x/slabs.db"}, "validation": {"what": "cv"}, "metrics": {"retrain_cv_auc": 1.0},
           "created": "now", "retraining": {"label_counts": {"total": 9}, "seed": 0, "trainer": {"mode": "head"},
                                            "validation": {"new": {"auc": 1.0}}}}
    validation = {"dice_mean": 0.7, "sensitivity_at_fp": {0.5: 1.0, 1.0: 1.0}, "cpm": 1.0, "cluster_auc": 0.9,
                  "cluster_auc_mean_probability": 0.8, "ece": 0.05}
    slabs = {"slabs": 2, "slabs_with_a_false_lesion": 1, "per_slab": []}
    card = tf.release_card(base, new, "1.2.0", 5, validation, slabs,
                           "python -m LesionSegLib.engine.learn.tumour_free --from-model B -o runs/out --version 1.2.0",
                           {"commit": "abc", "engine_modified": False}, 1.04, "a670f86")
    assert (card["name"], card["version"]) == ("m", "1.2.0") and "parent" not in card and "retraining" not in card
    assert card["segmenter"] == new["segmenter"] and card["classifier"]["sha256"] == "c" * 64
    assert card["built_from"] == {"model": "m@1.1.0", "commit": "a670f86", "segmenter_sha256": "a" * 64,
                                  "classifier_sha256": "b" * 64}
    assert card["metrics"]["val_dice"] == 0.7 and card["metrics"]["val_tumour_free_slabs_with_a_false_lesion"] == 1
    assert card["validation"]["cases"] == ["V1"] and card["validation"]["sensitivity_at_fp"] == {"0.5": 1.0, "1.0": 1.0}
    assert card["data"]["train_cases"] == ["T1", "T2"] and card["data"]["tumour_free_negatives"]["clusters"] == 5
    assert card["training"]["segmenter"] == {"minutes": 52} and card["training"]["classifier_retraining"]["minutes"] == 1.0
    assert card["classifier"]["training"]["temperature_fit_on"].startswith("out-of-fold")
    assert set(card["release_notes"]) == {"1.2.0", "1.1.0"} and "a670f86" in card["release_notes"]["1.1.0"]
    assert "lesionseg models export runs/out --write-card" in card["build_command"]
    assert "mkdir -p <dir> && git archive a670f86 LesionSeg/LesionSegLib/models/m" in card["build_command"]
    assert "/tmp" not in json.dumps(card) and "/somewhere" not in json.dumps(card)


def test_models_list_names_the_version_a_shipped_release_was_built_from(tmp_path, monkeypatch):
    from LesionSegLib.engine.learn import versions

    monkeypatch.setenv("LESIONSEG_MODELS", str(tmp_path))
    rows = {r["id"]: r for r in versions.list_versions()}
    assert rows["sts-clcs@1.2.0"]["parent"] == "sts-clcs@1.1.0" and rows["sts-clcs@1.2.0"]["builtin"]
    assert rows["sts-detseg@1.4.1"]["parent"] == "sts-detseg@1.4.0"
    assert rows["sts-attention-unet@1.0.0"]["parent"] is None


@pytest.mark.parametrize("name", ["sts-clcs", "sts-detseg"])
def test_every_shipped_version_is_upgraded_and_its_reviews_count(name, tmp_path, monkeypatch):
    """A user who had activated sts-clcs@1.0.0 or sts-detseg@1.0.0 (which no card named as shipped
    before) got "its folder was removed"; reviews made with sts-detseg 1.4.0, whose networks 1.4.1
    keeps, were left out of its retraining (its built_from recorded no checksums)."""
    from LesionSegLib.engine.learn.labels import recorded_identities, segmenter_identity
    from LesionSegLib.engine.learn.model_writer import release_history

    monkeypatch.setenv("LESIONSEG_MODELS", str(tmp_path))
    shipped = models.get_card(name)
    major = int(shipped.version.split(".")[1])
    for minor in range(major):  # every earlier 1.x.0 release
        assert models.upgraded(f"{name}@1.{minor}.0") == shipped.id
    assert models.upgraded(f"{name}@{shipped.version}-ft.3") == f"{name}@{shipped.version}-ft.3"  # a user's: named
    built = models.built_from_id(shipped)
    assert recorded_identities([shipped])[built] == segmenter_identity(shipped)  # the same networks
    notes = release_history(name, "9.0.0", {"9.0.0": "next"})  # a rebuild keeps every earlier note, newest first
    assert list(notes)[0] == "9.0.0" and set(notes) == {"9.0.0"} | set(shipped.data["release_notes"])
    assert list(notes)[1:] == sorted(shipped.data["release_notes"], key=models._version_key, reverse=True)


def test_reviews_made_with_a_removed_user_version_count_by_its_child_s_parent_link():
    """A retrained or fine-tuned version's ``parent`` link records its parent's networks, so the
    reviews made with that parent count after the user removed it (``labels.recorded_identities``)."""
    from LesionSegLib.engine.learn.labels import recorded_identities

    child = SimpleNamespace(data={"parent": {"id": "mine@1", "segmenter_sha256": "a" * 64, "classifier_sha256": "b" * 64}})
    other = SimpleNamespace(data={"parent": {"id": "mine@1", "segmenter_sha256": "c" * 64}})  # the first record wins
    bare = SimpleNamespace(data={"parent": {"id": "mine@0"}, "built_from": "not a link"})  # no checksum: nothing known
    assert recorded_identities([child, other, bare]) == {"mine@1": ("a" * 64, None, None)}

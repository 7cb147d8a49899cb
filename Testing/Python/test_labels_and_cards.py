"""Training labels from the feedback store (review D1, D2, R1, R7), model cards written by
retraining and segmenter registration (D5), and model resolution / card confinement (R2).
None of these needs the CT data: the shipped model is in the repository."""
from __future__ import annotations

import json
import shutil

import pytest

import feedback_testdata as td
from feedback_testdata import synthetic_decision
from LesionSegLib.engine import models
from LesionSegLib.engine.errors import ModelError
from LesionSegLib.engine.feedback import FeedbackStore
from LesionSegLib.engine.learn.labels import OTHER_SEGMENTER, SUPERSEDED, RetrainError, from_store, merge
from LesionSegLib.engine.learn.model_writer import resolve_output, write_model
from LesionSegLib.engine.learn.validation import make_folds


@pytest.fixture
def shipped(tmp_path, monkeypatch):
    """The shipped model, with an empty user model folder ``tmp_path/models``."""
    return td.user_models_with_base(tmp_path, monkeypatch)


@pytest.fixture
def user_models(shipped, tmp_path):
    return tmp_path / "models"


# ----------------------------------------------------------------------------- D1, D2, R1, R7
def test_centroidless_decisions_keep_their_own_lesion_key(tmp_path):
    """D1: four lesions of one case without a centroid are four labels, not one."""
    store = FeedbackStore(tmp_path / "fb.db")
    ds = [synthetic_decision(i, "accepted" if i % 2 else "rejected") for i in range(1, 5)]
    for d in ds:
        d.centroid_lps = (0.0, 0.0, 0.0)
    store.record_many(ds)
    data = merge(from_store(store))
    assert len(data) == 4 and data.labels.tolist() == [1, 0, 1, 0]
    assert len(set(data.keys)) == 4 and not data.skipped


@pytest.mark.parametrize("newest_first", [False, True])
def test_latest_decision_wins_and_two_models_are_not_a_duplicate(tmp_path, newest_first):
    """D2: accepted under m@1 in January, rejected under m@2 in June: the label is 0, whatever
    the row order; the older review is "superseded", not a "duplicate"."""
    store = FeedbackStore(tmp_path / "fb.db")
    jan = synthetic_decision(3, "accepted", model_id="m@1")
    jan.timestamp = "2026-01-10T10:00:00+00:00"
    jun = synthetic_decision(3, "rejected", model_id="m@2")
    jun.timestamp = "2026-06-10T09:00:00-03:00"
    other = synthetic_decision(4, "accepted", model_id="m@1")
    store.record_many([jun, jan, other] if newest_first else [jan, jun, other])
    assert store.count() == 3  # both reviews are kept in the store
    data = merge(from_store(store))
    assert len(data) == 2
    by_key = dict(zip(data.keys, data.labels.tolist()))
    assert sorted(by_key.values()) == [0, 1]
    assert data.labels[[k.endswith("c:13.0,-20.5,0.0") for k in data.keys].index(True)] == 0
    assert data.skipped == {SUPERSEDED: 1}
    assert not any("duplicate" in k for k in data.skipped)


def test_cross_validation_groups_are_patients(tmp_path):
    """R1: a perturbed copy ``caseA~1`` (another scan hash) is in the same fold as ``caseA``."""
    store = FeedbackStore(tmp_path / "fb.db")
    ds = []
    for case in ("caseA", "caseA~1", "caseB", "caseC", "caseD"):
        for i in range(4):
            d = synthetic_decision(i, "accepted" if i % 2 else "rejected", case=case)
            ds.append(d)
    store.record_many(ds)
    data = from_store(store)
    assert len({d.case_hash for d in ds}) == 5 and sorted(set(data.groups)) == ["caseA", "caseB", "caseC", "caseD"]
    folds, how = make_folds(data.labels, data.groups, 4)
    assert "grouped by patient (4 patients)" in how
    for test in folds:
        names = {data.case_names[i] for i in test}
        assert ("caseA" in names) == ("caseA~1" in names)


def test_retraining_uses_only_decisions_of_the_same_segmenter(tmp_path, shipped):
    """R7: by default, decisions made with a model of another segmenter are left out and counted."""
    store = FeedbackStore(tmp_path / "fb.db")
    store.record_many([synthetic_decision(i, model_id=shipped.id) for i in range(3)]
                      + [synthetic_decision(i, model_id="foreign@1") for i in range(10, 15)])
    data = from_store(store, parent=shipped)
    assert len(data) == 3 and data.skipped == {OTHER_SEGMENTER: 5}
    assert len(from_store(store)) == 8  # no parent, no filter (``--all-models``)


# ----------------------------------------------------------------------------- D5
def _metrics(auc_new=0.9, auc_old=0.8):
    m = {"auc": auc_new, "ece": 0.05, "brier": 0.1, "n": 40}
    return {"new": m, "old": {**m, "auc": auc_old}, "validation": "3-fold cross-validation grouped by patient",
            "evaluated": 40}


def test_retrained_card_holds_its_own_figures_and_a_parent_link(user_models, shipped):
    from LesionSegLib.engine.segment.classifier import ConfidenceModel

    counts = {"total": 40, "positive": 25, "negative": 15, "cases": 5}
    retraining = {"label_counts": counts, "trainer": {"mode": "head"}, "timings": {}, "seed": 0}
    data = {"feedback_db": "fb.db", "cases": ["a", "b"], "label_counts": counts}
    card = write_model(shipped, ConfidenceModel.from_card(shipped), "mine", retraining, _metrics(), None, data)
    d = card.data
    assert card.folder == user_models / "mine" / "1"
    assert d["parent"]["id"] == shipped.id and "metrics" not in d["parent"] and "validation" not in d["parent"]
    assert d["parent"]["classifier_sha256"] == shipped.data["classifier"]["sha256"]
    assert d["data"] == data and "train_cases" not in d["data"]
    assert "dice_per_case" not in d["validation"] and d["validation"]["new"]["auc"] == 0.9
    assert d["metrics"] == {"retrain_cv_auc": 0.9, "retrain_cv_ece": 0.05, "parent_auc_same_labels": 0.8,
                            "parent_ece_same_labels": 0.05, "n_labels": 40}
    assert "training" not in d  # the parent's training record is not this model's
    assert d["segmenter"]["inherited_from"] == shipped.id
    card.verified_bytes("segmenter")
    card.verified_bytes("classifier")


def test_registered_segmenter_card_holds_its_own_data_and_validation(tmp_path, user_models, shipped):
    from LesionSegLib.engine.learn.jobs import register_segmenter

    seg = tmp_path / "seg"
    seg.mkdir()
    shutil.copy(shipped.weights_path("segmenter"), seg / "weights.safetensors")
    cfg = {**shipped.data["segmenter"], "file": "weights.safetensors",
           "training": {"train_cases": ["X_001", "X_002"], "val_cases": ["X_003"],
                        "final_val_dice_model_grid": {"X_003": 0.5}, "steps": 10}}
    (seg / "segmenter.json").write_text(json.dumps(cfg))
    card = register_segmenter(seg, shipped.id, "newseg")
    d = card.data
    assert card.id == "newseg@1"
    assert d["data"] == {"train_cases": ["X_001", "X_002"], "val_cases": ["X_003"]}
    assert d["validation"]["segmenter_dice_model_grid"] == {"X_003": 0.5}
    assert d["metrics"] == {"val_dice_model_grid": 0.5}
    assert d["parent"]["id"] == shipped.id and "metrics" not in d["parent"]
    assert d["classifier"]["inherited_from"] == shipped.id
    assert d["training"] == {"segmenter": cfg["training"]}
    card.verified_bytes("segmenter")
    # a segmenter.json naming a file outside its folder is refused
    cfg["file"] = "../" + seg.name + "/weights.safetensors"
    (seg / "segmenter.json").write_text(json.dumps(cfg))
    with pytest.raises(Exception, match="not a plain file name inside the model folder"):
        register_segmenter(seg, shipped.id, "newseg2")


# ----------------------------------------------------------------------------- R2
def test_a_folder_in_the_working_directory_never_shadows_a_model_name(tmp_path, user_models, shipped, monkeypatch):
    fake = tmp_path / "cwd" / models.DEFAULT_MODEL
    shutil.copytree(shipped.folder, fake)
    data = json.loads((fake / "card.json").read_text(encoding="utf-8"))
    data["version"] = "6.6.6"
    (fake / "card.json").write_text(json.dumps(data))
    monkeypatch.chdir(tmp_path / "cwd")
    assert models.get_card(models.DEFAULT_MODEL).version == shipped.version
    assert models.get_card(None).version == shipped.version
    assert models.get_card(f"./{models.DEFAULT_MODEL}").version == "6.6.6"  # an explicit path is honoured
    (tmp_path / "cwd" / "only-here").mkdir()
    with pytest.raises(ModelError, match=r"unknown model 'only-here'.*write \./only-here"):
        models.get_card("only-here")


def test_a_version_written_but_never_activated_is_not_the_default(user_models, shipped):
    """Retrain and fine-tune name their output "base name, next version" (sts-clcs@2): it runs
    only once activated.  Before, with no activation record, the bare default name resolved to the
    newest version, so an unactivated retrain silently became what segment ran."""
    from LesionSegLib.engine.learn import versions

    newer = user_models / shipped.name / "2"
    shutil.copytree(shipped.folder, newer)
    data = json.loads((newer / "card.json").read_text(encoding="utf-8"))
    data["version"] = "2"
    (newer / "card.json").write_text(json.dumps(data))
    if shipped.name == models.DEFAULT_MODEL:
        assert models.default_model_id() == shipped.id
    assert models.get_card(None).id == shipped.id and models.get_card(shipped.name).id == shipped.id
    assert versions.active_id() == shipped.id
    assert versions.activate(f"{shipped.name}@2") == f"{shipped.name}@2"
    assert models.get_card(None).version == "2" and models.get_card(shipped.name).version == "2"
    assert versions.rollback() == models.default_model_id()
    assert models.get_card(None).id == shipped.id
    # a damaged activation record is said, not silently replaced by the default
    models.active_file().write_text('{"active": null, "history": [], "log": [1]}')
    assert "wrong type" in versions.active_state_problem() and models.get_card(None).id == shipped.id
    models.active_file().write_text('{"active": "gone@9", "history": ["gone@9"], "log": []}')
    with pytest.raises(ModelError, match="it is the active model .*models rollback"):
        models.get_card(None)
    # a model folder outside the registry cannot be activated: the message says to copy it in
    outside = user_models.parent / "elsewhere" / "b"
    shutil.copytree(shipped.folder, outside)
    data = json.loads((outside / "card.json").read_text(encoding="utf-8"))
    data.update(name="b", version="1")
    (outside / "card.json").write_text(json.dumps(data))
    models.active_file().unlink()
    with pytest.raises(ModelError, match=f"is not the registered b@1; copy it into {user_models}"):
        versions.activate(str(outside))


@pytest.mark.parametrize("bad", ["/etc/hostname", "../card.json", "sub/../../x", "link.safetensors"])
def test_card_file_paths_are_confined_to_the_model_folder(tmp_path, shipped, bad):
    folder = tmp_path / "m"
    shutil.copytree(shipped.folder, folder)
    (folder / "link.safetensors").symlink_to(shipped.weights_path("classifier"))
    data = json.loads((folder / "card.json").read_text(encoding="utf-8"))
    data["classifier"]["file"] = bad
    (folder / "card.json").write_text(json.dumps(data))
    card = models.read_card(folder)
    with pytest.raises(ModelError, match="inside the model folder|leads outside the model folder"):
        card.load_state("classifier")


@pytest.mark.parametrize("output", ["name@../../x", "../x@1", "na/me@1", "name@", "name@.hidden", "@1", "x@a@b"])
def test_retraining_output_name_is_checked(user_models, shipped, output):
    with pytest.raises(RetrainError, match="invalid model|not a valid model name"):
        resolve_output(shipped, output)


def test_cli_retrain_refuses_an_escaping_output_before_training(tmp_path, user_models, shipped, capsys):
    from LesionSegLib.engine.cli import main

    store = FeedbackStore(tmp_path / "fb.db")
    store.record_many([synthetic_decision(i, "accepted" if i % 2 else "rejected", model_id=shipped.id) for i in range(30)])
    store.close()
    assert main(["retrain", "--feedback", str(tmp_path / "fb.db"), "-o", "name@../../x", "--progress", "none"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: invalid model version '../../x'") and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists() and not (tmp_path.parent / "x").exists()
    assert not user_models.exists() or not any(user_models.iterdir())


def test_explicit_output_folder_and_default_name(tmp_path, user_models, shipped):
    assert resolve_output(shipped, None)[:2] == (shipped.name, "2")  # after the shipped 1.0.0
    assert resolve_output(shipped, "mine@2.0")[:2] == ("mine", "2.0")
    name, version, folder = resolve_output(shipped, str(tmp_path / "out" / "mymodel"))
    assert (name, version, folder) == ("mymodel", "1", (tmp_path / "out" / "mymodel").resolve())
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep")
    with pytest.raises(RetrainError, match="exists and is not empty"):
        resolve_output(shipped, str(tmp_path / "full"))
    assert (tmp_path / "full" / "x").read_text(encoding="utf-8") == "keep"


def test_saved_weights_are_readable_like_any_file_the_user_writes(tmp_path):
    """safetensors creates 0600 files; model weights get the mode a plain ``open()`` gives (0666
    minus the umask), as cards and every other output do, so a shared model folder stays usable."""
    import stat

    import torch

    from LesionSegLib.engine.atomic import FILE_MODE
    from LesionSegLib.engine.models import save_weights

    for name, obj in (("dict.safetensors", {"w": torch.zeros(3)}), ("module.safetensors", torch.nn.Linear(2, 2))):
        save_weights(obj, tmp_path / name)
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == FILE_MODE, name

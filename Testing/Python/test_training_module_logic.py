"""LesionSegTraining module logic on real MRML (slicer-core) with real reviewed lesions.

Statistics and metrics land in MRML table nodes; retraining and segmenter training run as real
background processes, to completion and cancelled.
"""
from __future__ import annotations

import hashlib
import sqlite3
import sys
import time
from pathlib import Path

import pytest

import feedback_testdata as td
from slicer_app_shim import REPO, slicer_app  # noqa: F401 (fixture)

sys.path.insert(0, str(REPO / "LesionSegTraining"))


@pytest.fixture
def env(tmp_path, monkeypatch, slicer_app):
    """Temporary user model folder holding the base model; a fresh scene."""
    base = td.user_models_with_base(tmp_path, monkeypatch)
    slicer_app.reset()
    yield tmp_path, base
    slicer_app.reset()


@pytest.fixture
def logic():
    from LesionSegTrainingLib.logic import TrainingLogicCore

    lg = TrainingLogicCore()
    yield lg
    lg.close_database()


def wait(job, timeout=240):
    end = time.time() + timeout
    while job.state == "running" and time.time() < end:
        time.sleep(0.2)
    return job.state


def test_statistics_table_and_parameter_node(env, logic):
    import slicer

    from LesionSegTrainingLib.logic import table_rows

    tmp, _ = env
    store = logic.open_database(tmp / "fb.db")
    decisions = td.real_decisions(unsure_every=5)
    store.record_many(decisions)
    table = logic.update_statistics_table()
    assert slicer.mrmlScene.IsNodePresent(table) and table.GetLocked()
    rows = table_rows(table)
    stats = store.stats()
    model_id = decisions[0].model_id
    by_model = {r["Model"]: r for r in rows}
    expected = stats["by_model"][model_id]
    assert by_model[model_id]["Accepted"] == str(expected["accepted"])
    assert by_model[model_id]["Rejected"] == str(expected["rejected"])
    assert by_model[model_id]["Unsure"] == str(expected["unsure"])
    assert by_model["all models"]["Total"] == str(len(decisions))
    assert sum(int(by_model[model_id][k]) for k in ("Accepted", "Rejected", "Unsure")) == len(decisions)
    # the same node is reused, not duplicated
    assert logic.update_statistics_table() is table
    assert logic.parameter_node().GetParameter("FeedbackDatabase") == str(tmp / "fb.db")
    assert "decisions on" in logic.statistics_text(stats)


def test_foreign_file_is_refused_and_untouched(env, logic):
    from LesionSegLib.engine.feedback import FeedbackStoreError

    tmp, _ = env
    foreign = tmp / "photos.db"
    con = sqlite3.connect(foreign)
    con.execute("CREATE TABLE photos (id INTEGER, path TEXT)")
    con.commit()
    con.close()
    before = hashlib.sha256(foreign.read_bytes()).hexdigest()
    with pytest.raises(FeedbackStoreError, match="another application"):
        logic.open_database(foreign)
    assert logic.store is None
    assert hashlib.sha256(foreign.read_bytes()).hexdigest() == before
    with pytest.raises(RuntimeError, match="open a feedback database first"):
        logic.start_retrain()


def test_retrain_in_background_metrics_plot_versions(env, logic):
    from LesionSegLib.engine import models

    from LesionSegTrainingLib.logic import table_rows

    tmp, base = env
    store = logic.open_database(tmp / "fb.db")
    store.record_many(td.real_decisions())
    job = logic.start_retrain(base_model=base.id, output="site-model", folds=3, min_labels=10, min_per_class=2)
    fractions = []
    while job.state == "running":
        fractions.append(job.fraction)
        time.sleep(0.2)
    assert job.state == "finished", job.error
    assert fractions == sorted(fractions)
    result, table, plot = logic.finish_retrain(job)
    assert result["model"] == "site-model@1"
    rows = {r["Metric"]: r for r in table_rows(table)}
    m = result["metrics"]
    assert rows["ECE (10 bins)"]["Before"] == f"{m['old']['ece']:.3f}"
    assert rows["ECE (10 bins)"]["After"] == f"{m['new']['ece']:.3f}"
    assert rows["Lesions scored"]["Before"] == rows["Lesions scored"]["After"] == str(m["evaluated"])
    assert set(rows) == {"AUC (TP vs FP)", "ECE (10 bins)", "Brier score", "Lesions scored"}
    assert plot is not None and plot.read_bytes()[:4] == b"\x89PNG"
    assert logic.parameter_node().GetParameter("LastRetrainedModel") == "site-model@1"
    card = models.get_card("site-model@1")
    assert card.data["parent"]["id"] == base.id
    # versions table, activate, roll back
    versions = {r["Model"]: r for r in table_rows(logic.update_versions_table())}
    assert "site-model@1" in versions and base.id in versions
    # each version's AUC is its own, named by what it was measured on (review D5)
    auc_new = card.data["metrics"]["retrain_cv_auc"]
    assert versions["site-model@1"]["AUC"] == (f"{auc_new:.3f} (CV, {card.data['metrics']['n_labels']} labels)"
                                               if auc_new is not None else "-")
    assert versions[base.id]["AUC"] == f"{base.data['metrics']['val_cluster_auc']:.3f} (validation split)"
    assert "val_cluster_auc" not in card.data["metrics"]
    assert logic.activate("site-model@1") == "site-model@1"
    assert {r["Model"]: r["Active"] for r in table_rows(logic.update_versions_table())}["site-model@1"] == "yes"
    assert logic.rollback() == models.default_model_id()
    assert "yes" not in {r["Model"]: r["Active"] for r in table_rows(logic.update_versions_table())}.get("site-model@1", "")


def test_retrain_refusal_and_cancel(env, logic):
    from LesionSegLib.engine import models

    tmp, base = env
    store = logic.open_database(tmp / "fb.db")
    store.record_many([td.synthetic_decision(i, "rejected", model_id=base.id) for i in range(25)])
    job = logic.start_retrain(base_model=base.id, folds=2)
    assert wait(job) == "failed"
    assert "only one class" in job.error
    with pytest.raises(RuntimeError, match="only one class"):
        logic.finish_retrain(job)

    store.record_many(td.real_decisions())
    job = logic.start_retrain(base_model=base.id, output="never", folds=2, min_labels=10, min_per_class=2)
    time.sleep(1.5)
    assert job.state == "running"
    job.cancel()
    assert job.state == "cancelled" and job.proc.poll() is not None
    assert not any(c.name == "never" for c in models.list_models())
    leftovers = [p for p in (tmp / "models").rglob("card.json") if "never" in str(p)]
    assert leftovers == []


def test_cancel_after_the_model_is_written_lets_the_job_finish(tmp_path):
    """Between the job's "done" event (the version is on disk) and its exit, Cancel used to
    report "cancelled" for a model that exists; now the job finishes and says what it wrote."""
    import json as _json
    import sys

    from LesionSegLib.engine.learn.jobs import RetrainJob

    class Written(RetrainJob):
        def command(self):
            done = _json.dumps({"event": "done", "model": "x@1"})
            return [sys.executable, "-c", f"import time; print({done!r}, flush=True); time.sleep(1.5)"]

    job = Written(feedback=None).start()
    deadline = time.monotonic() + 30
    while not job.status.startswith("done") and time.monotonic() < deadline:
        job.poll()
        time.sleep(0.05)
    assert job.status == "done: x@1" and job.state == "running"
    job.cancel()
    assert not job.cancelled
    assert wait(job) == "finished" and job.result["model"] == "x@1"


def _gt_folder(tmp: Path, names):
    root = td.require_data()
    d = tmp / "train_cases"
    for n in names:
        (d / n).mkdir(parents=True)
        for f in ("image.nii.gz", "label.nii.gz"):
            (d / n / f).symlink_to(root / "sts" / n / f)
    return d


def test_segmenter_training_job_register_and_cancel(env, logic):
    from LesionSegLib.engine import models

    tmp, base = env
    cases = _gt_folder(tmp, ["STS_002", "STS_041"])
    out = tmp / "seg"
    job = logic.start_segmenter_training(cases, out, minutes=0.02, max_steps=1, val=["STS_041"], extra=["--batch", "1"])
    assert wait(job, 300) == "finished", job.error
    assert job.fraction == 1.0 and job.status.startswith("done")
    assert (out / "segmenter.json").exists() and (out / "segmenter.safetensors").exists()
    card = logic.finish_segmenter_training(job, register="newseg", base_model=base.id)
    assert card.id == "newseg@1"
    assert models.sha256_file(card.weights_path("segmenter")) == card.data["segmenter"]["sha256"]
    assert card.data["classifier"]["sha256"] == base.data["classifier"]["sha256"]
    assert card.data["parent"]["id"] == base.id
    assert card.data["training"]["segmenter"]["train_cases"] == ["STS_002"]

    job2 = logic.start_segmenter_training(cases, tmp / "seg2", minutes=30)
    end = time.time() + 120
    while job2.state == "running" and job2.status != "training" and time.time() < end:
        time.sleep(0.2)
    job2.cancel()
    assert job2.state == "cancelled" and job2.proc.poll() is not None
    with pytest.raises(RuntimeError, match="cancelled"):
        logic.finish_segmenter_training(job2)


def test_segmenter_progress_parsing(tmp_path):
    """The lines train_seg prints (format strings from engine/train_seg.py) drive the progress."""
    from LesionSegLib.engine.learn.jobs import SegmenterTrainingJob, TrainingJobError

    job = SegmenterTrainingJob(tmp_path, tmp_path / "out", minutes=10, max_steps=0)
    job._parse("loaded 30 training and 8 validation cases in 12.3s")
    assert job.status == "training"
    job._parse(f"step 25 t={2.5:.1f}min loss={0.81234:.4f} lr={2.9e-3:.2e}")
    assert job.step == 25 and job.loss == pytest.approx(0.8123) and job.fraction == pytest.approx(0.25, abs=0.01)
    job._parse(f"  val dice (model grid) {0.7123:.4f}")
    job._parse(f"step 50 t={5.0:.1f}min loss={0.5:.4f} lr={1e-3:.2e}")
    assert job.val_dice == pytest.approx(0.7123) and "val Dice 0.712" in job.status
    assert job.fraction == pytest.approx(0.5, abs=0.01)
    job._parse(f"step 75 t={12.0:.1f}min loss={0.4:.4f} lr={1e-4:.2e}")
    assert job.fraction == 0.99  # capped until the final save
    job._parse("done: 80 steps in 10.0 min; val dice (model grid) 0.7300")
    assert job.fraction == 1.0
    with pytest.raises(TrainingJobError, match="holds no <case>"):
        SegmenterTrainingJob(tmp_path, tmp_path / "o2").check_inputs()

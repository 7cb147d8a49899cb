"""The LesionSegTraining widget, offscreen (PySide6 harness), driven like a user would.

The unmodified ``LesionSegTraining.py`` and its ``.ui`` run on the Qt harness with real MRML:
open a database (and a foreign file), see the statistics, retrain in the background with
progress, see before/after metrics and the plot, activate and roll back, and start + cancel a
segmenter training.
"""
from __future__ import annotations

import hashlib
import sqlite3
import sys
import time

import pytest

import feedback_testdata as td
from slicer_app_shim import REPO, ensure_module_path, slicer_app  # noqa: F401 (fixture)

MIN_LABELS, MIN_PER_CLASS = 20, 5  # the CLI defaults the widget uses


@pytest.fixture
def widget(tmp_path, monkeypatch, slicer_app):
    pytest.importorskip("PySide6")
    from qt_harness import install

    install()
    import qt

    qt.QSettings.setPath(qt.QSettings.IniFormat, qt.QSettings.UserScope, str(tmp_path / "settings"))
    qt.QSettings.setDefaultFormat(qt.QSettings.IniFormat)
    qt.QSettings().setValue("LesionSeg/FeedbackDatabase", str(tmp_path / "feedback.db"))
    base = td.user_models_with_base(tmp_path, monkeypatch)
    slicer_app.reset()
    ensure_module_path()
    sys.path.insert(0, str(REPO / "LesionSegTraining"))
    import LesionSegTraining

    w = LesionSegTraining.LesionSegTrainingWidget()
    w.tmp = tmp_path
    w.base = base
    yield w
    w.cleanup()
    w.parent.close()
    slicer_app.reset()


def wait_for(predicate, timeout=240):
    from qt_harness import wait_until

    assert wait_until(predicate, timeout=timeout), "timed out"


def rows(view):
    model = view.model()
    return [[model.index(r, c).data() for c in range(model.columnCount())] for r in range(model.rowCount())]


def test_module_metadata_and_ui(widget):
    import LesionSegTraining

    class Parent:
        pass

    mod = LesionSegTraining.LesionSegTraining(Parent())
    assert mod.parent.title == "LesionSeg Training" and mod.parent.dependencies == ["LesionSeg"]
    ui = widget.ui
    for name in ("databasePathEdit", "statsTableView", "retrainButton", "retrainProgressBar", "metricsTableView",
                 "plotLabel", "versionSelector", "activateButton", "rollbackButton", "trainSegmenterButton", "segProgressBar"):
        assert hasattr(ui, name), name
    # the database from the settings was opened (created) at start-up
    assert ui.databasePathEdit.property("text") == str(widget.tmp / "feedback.db")
    assert (widget.tmp / "feedback.db").exists()
    assert "0 decisions" in ui.statsSummaryLabel.property("text")
    assert widget.base.id in [ui.baseModelSelector.itemText(i) for i in range(ui.baseModelSelector.count())]
    assert (REPO / "LesionSegTraining" / "Resources" / "Icons" / "LesionSegTraining.png").read_bytes()[:4] == b"\x89PNG"


def test_foreign_database_is_refused_in_the_panel(widget):
    foreign = widget.tmp / "other.db"
    con = sqlite3.connect(foreign)
    con.execute("CREATE TABLE patients (id INTEGER)")
    con.commit()
    con.close()
    before = hashlib.sha256(foreign.read_bytes()).hexdigest()
    widget.ui.databasePathEdit.setText(str(foreign))
    widget.ui.openDatabaseButton.click()
    assert "Cannot use this file" in widget.ui.statsSummaryLabel.property("text")
    assert widget.logic.store is None
    assert not widget.ui.retrainButton.isEnabled()  # no labels to retrain from
    assert hashlib.sha256(foreign.read_bytes()).hexdigest() == before


def test_review_statistics_retrain_activate_rollback(widget):
    from LesionSegLib.engine import models
    from LesionSegLib.engine.feedback import FeedbackStore

    ui = widget.ui
    decisions = td.real_decisions(unsure_every=6)
    # a LesionSeg session writes to the same file while the panel is open
    other_session = FeedbackStore(widget.tmp / "feedback.db")
    other_session.record_many(decisions)
    ui.refreshStatsButton.click()
    table = rows(ui.statsTableView)
    assert table[-1][0] == "all models" and table[-1][4] == str(len(decisions))
    assert f"{len(decisions)} decisions" in ui.statsSummaryLabel.property("text")

    ui.baseModelSelector.setCurrentIndex([ui.baseModelSelector.itemText(i) for i in range(ui.baseModelSelector.count())].index(widget.base.id))
    ui.outputNameEdit.setText("panel-model")
    ui.foldsSpinBox.setValue(3)
    ui.retrainButton.click()
    assert widget.retrainJob is not None and ui.retrainButton.text() == "Cancel"
    assert not ui.retrainProgressBar.isHidden()
    seen = []
    wait_for(lambda: seen.append(ui.retrainProgressBar.value()) or widget.retrainJob is None)
    assert ui.retrainButton.text() == "Retrain"
    labelled = [d for d in decisions if d.decision != "unsure"]
    n_pos = sum(d.decision == "accepted" for d in labelled)
    enough = len(labelled) >= MIN_LABELS and min(n_pos, len(labelled) - n_pos) >= MIN_PER_CLASS
    status = ui.retrainStatusLabel.property("text")
    if not enough:  # the guard, shown in the panel
        assert "Retraining failed" in status and "too few" in status
        return
    assert status.startswith("New version panel-model@1"), status
    assert seen == sorted(seen)
    metrics = {r[0]: r for r in rows(ui.metricsTableView)}
    assert set(metrics) == {"AUC (TP vs FP)", "ECE (10 bins)", "Brier score", "Lesions scored"}
    assert metrics["Lesions scored"][1] == metrics["Lesions scored"][2]
    pixmap = ui.plotLabel.pixmap()
    assert pixmap is not None and not pixmap.isNull() and pixmap.width() == 400
    assert ui.versionSelector.currentText() == "panel-model@1"

    ui.activateButton.click()
    assert models.active_model_id() == "panel-model@1"
    assert "panel-model@1" in ui.activeModelLabel.property("text")
    active_rows = [r[0] for r in rows(ui.versionsTableView) if r[1] == "yes"]
    assert active_rows == ["panel-model@1"]
    ui.rollbackButton.click()
    assert models.active_model_id() == models.DEFAULT_MODEL
    assert "rolled back" in ui.activeModelLabel.property("text")


def test_retrain_cancel_and_segmenter_training_cancel(widget):
    from LesionSegLib.engine import models
    from LesionSegLib.engine.feedback import FeedbackStore

    ui = widget.ui
    FeedbackStore(widget.tmp / "feedback.db").record_many(td.real_decisions())
    ui.outputNameEdit.setText("cancelled-model")
    ui.retrainButton.click()
    job = widget.retrainJob
    time.sleep(1.0)
    ui.retrainButton.click()  # Cancel
    assert widget.retrainJob is None and job.state == "cancelled"
    assert "cancelled" in ui.retrainStatusLabel.property("text")
    assert not any(c.name == "cancelled-model" for c in models.list_models())

    root = td.require_data()
    cases = widget.tmp / "cases"
    for n in ("STS_002", "STS_041"):
        (cases / n).mkdir(parents=True)
        for f in ("image.nii.gz", "label.nii.gz"):
            (cases / n / f).symlink_to(root / "sts" / n / f)
    ui.trainImagesButton.setProperty("directory", str(cases))
    ui.segOutputEdit.setText(str(widget.tmp / "seg"))
    ui.minutesSpinBox.setValue(30.0)
    ui.trainSegmenterButton.click()
    job = widget.segJob
    assert job is not None and ui.trainSegmenterButton.text() == "Cancel"
    wait_for(lambda: job.status == "training" or job.state != "running", timeout=120)
    wait_for(lambda: ui.segLogText.toPlainText().startswith("loaded 2 training"), timeout=30)
    ui.trainSegmenterButton.click()  # Cancel
    assert widget.segJob is None and job.state == "cancelled" and job.proc.poll() is not None
    assert ui.trainSegmenterButton.text() == "Train segmenter"
    assert "cancelled" in ui.segStatusLabel.property("text")

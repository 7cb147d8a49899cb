"""The LesionSegTraining widget, offscreen (PySide6 harness), driven like a user would.

The unmodified ``LesionSegTraining.py`` and its ``.ui`` run on the Qt harness with real MRML and
the typed parameter node: open a database (and a foreign file), see the statistics, retrain in
the background with progress, see before/after metrics and the plot (screenshot of the panel
after a real retrain: ``Testing/artifacts/LesionSegTraining_panel.png``), follow the log box,
activate and roll back, and start + cancel a segmenter training.  Opening the panel never
creates a database file.
"""
from __future__ import annotations

import dataclasses

import hashlib
import sqlite3
import sys
import time

import pytest

import feedback_testdata as td
from slicer_app_shim import REPO, ensure_module_path, slicer_app  # noqa: F401 (fixture)

ARTIFACTS = REPO / "Testing" / "artifacts"

MIN_LABELS, MIN_PER_CLASS = 20, 5  # the CLI defaults the widget uses


def _module():
    from qt_harness import install

    install()
    ensure_module_path()
    sys.path.insert(0, str(REPO / "LesionSegTraining"))
    import LesionSegTraining

    return LesionSegTraining


@pytest.fixture
def widget(tmp_path, monkeypatch, slicer_app):
    from LesionSegLib import settings

    _module()
    base = td.user_models_with_base(tmp_path, monkeypatch)
    slicer_app.reset()
    settings.set_feedback_database_path(tmp_path / "feedback.db")  # chosen earlier in this panel
    w = _module().LesionSegTrainingWidget()
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
    # the database from the settings is shown, and not created just by opening the panel
    assert ui.databasePathEdit.property("text") == str(widget.tmp / "feedback.db")
    assert not (widget.tmp / "feedback.db").exists()
    assert "No decisions recorded yet" in ui.statsSummaryLabel.property("text")
    widget.enter()
    assert not (widget.tmp / "feedback.db").exists()
    ui.openDatabaseButton.click()  # an explicit Open creates it
    assert (widget.tmp / "feedback.db").exists()
    assert "0 decisions" in ui.statsSummaryLabel.property("text")
    # the panel's inputs are the parameter node's
    p = widget._parameterNode
    ui.foldsSpinBox.setValue(3)
    ui.outputNameEdit.setText("x")
    assert (p.folds, p.outputName) == (3, "x")
    p.folds = 7
    assert ui.foldsSpinBox.value() == 7
    assert p.baseModel == ui.baseModelSelector.currentText()
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
    from PySide6.QtGui import QImage
    from PySide6.QtTest import QTest

    from LesionSegLib.engine import models
    from LesionSegLib.engine.feedback import FeedbackStore

    ui = widget.ui
    decisions = td.real_decisions(unsure_every=6)
    labelled = [d for d in decisions if d.decision != "unsure"]
    n_pos = sum(d.decision == "accepted" for d in labelled)
    assert len(labelled) >= MIN_LABELS and min(n_pos, len(labelled) - n_pos) >= MIN_PER_CLASS, (
        f"the test decisions must pass the retraining guards: {len(labelled)} labels, {n_pos} true")
    # a lesion drawn by hand in the Segment Editor and accepted: no classifier features or patch
    decisions.append(dataclasses.replace(decisions[0], lesion_id=9999, centroid_lps=(1.0, 2.0, 3.0), features={}, patch=None,
                                         confidence=1.0, decision="accepted"))
    # a LesionSeg session writes to the database while the panel is open
    with FeedbackStore(widget.tmp / "feedback.db") as other_session:
        other_session.record_many(decisions)
    ui.refreshStatsButton.click()  # nothing open yet: the file appeared after the panel opened
    ui.openDatabaseButton.click()
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
    status = ui.retrainStatusLabel.property("text")
    assert status.startswith("New version panel-model@1"), status + "\n" + ui.logTextEdit.toPlainText()
    assert "Left out: 1 missing features, " in status  # the drawn lesion (and the unsure ones): said, not silently dropped
    assert seen == sorted(seen)
    assert "retraining " + widget.base.id in ui.logTextEdit.toPlainText() and status in ui.logTextEdit.toPlainText()
    metrics = {r[0]: r for r in rows(ui.metricsTableView)}
    assert set(metrics) == {"AUC (TP vs FP)", "ECE (10 bins)", "Brier score", "Lesions scored"}
    assert metrics["Lesions scored"][1] == metrics["Lesions scored"][2]
    pixmap = ui.plotLabel.pixmap()
    assert pixmap is not None and not pixmap.isNull() and pixmap.width() == 400  # the ROC / reliability plot
    assert ui.versionSelector.currentText() == "panel-model@1"
    assert widget.logic.parameter_node().GetParameter("LastRetrainedModel") == "panel-model@1"

    # screenshot of the panel after the retrain: statistics, metrics, plot, versions, log
    ui.logCollapsibleButton.setProperty("collapsed", False)
    QTest.qWait(50)
    panel = widget.parent  # tall enough for every group at this width (word-wrapped labels need heightForWidth)
    panel.resize(660, max(1500, panel.minimumSizeHint().height(), panel.heightForWidth(660)))
    widget.parent.show()
    widget.parent.layout().activate()
    QTest.qWait(200)
    box = ui.plotLabel.parentWidget()
    assert ui.plotLabel.isVisible() and ui.plotLabel.height() >= pixmap.height()
    assert ui.plotLabel.geometry().bottom() <= box.contentsRect().bottom(), "the plot is cut off in the panel"
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "LesionSegTraining_panel.png"
    assert widget.parent.grab().save(str(shot))
    assert QImage(str(shot)).height() >= 1000

    ui.activateButton.click()
    assert models.active_model_id() == "panel-model@1"
    assert "panel-model@1" in ui.activeModelLabel.property("text")
    active_rows = [r[0] for r in rows(ui.versionsTableView) if r[1] == "yes"]
    assert active_rows == ["panel-model@1"]
    ui.rollbackButton.click()
    assert models.active_model_id() == models.default_model_id()
    assert "rolled back" in ui.activeModelLabel.property("text")


def test_failed_retrain_shows_summary_and_log(widget, monkeypatch):
    import slicer

    from LesionSegLib.engine import models
    from LesionSegLib.engine.feedback import FeedbackStore

    shown = []
    monkeypatch.setattr(slicer.util, "errorDisplay", lambda text, **kw: shown.append((text, kw)))
    base = models.get_card(None).id  # decisions of another segmenter are left out (R7)
    with FeedbackStore(widget.tmp / "feedback.db") as store:
        store.record_many([td.synthetic_decision(i, "rejected", model_id=base) for i in range(25)])  # one class only
    widget.ui.openDatabaseButton.click()
    widget.ui.retrainButton.click()
    wait_for(lambda: widget.retrainJob is None)
    assert len(shown) == 1
    text, kw = shown[0]
    assert text.startswith("Retraining failed:") and "only one class" in text and "\n" not in text
    assert kw["detailedText"] == widget.ui.logTextEdit.toPlainText() and "only one class" in kw["detailedText"]


def test_retrain_cancel_and_segmenter_training_cancel(widget):
    from LesionSegLib.engine import models
    from LesionSegLib.engine.feedback import FeedbackStore

    ui = widget.ui
    with FeedbackStore(widget.tmp / "feedback.db") as store:
        store.record_many(td.real_decisions())
    ui.openDatabaseButton.click()
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

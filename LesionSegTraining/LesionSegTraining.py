"""LesionSegTraining: the feedback database, classifier retraining, model versions, segmenter training.

Thin Slicer module: the widget binds the UI (``Resources/UI/LesionSegTraining.ui``) to the logic in
``LesionSegTrainingLib`` (MRML, no Qt); retraining and segmenter training run in background
processes polled by a timer, so the GUI never blocks and both can be cancelled.

Qt code here sticks to what PythonQt (Slicer) and PySide6 (the offscreen test harness) both
accept: Q_PROPERTY values are read with ``widget.property(name)``, signals are connected with
``signal.connect``.
"""
from __future__ import annotations

import logging
import os
import time

import qt
import slicer
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)

from LesionSegTrainingLib.logic import TrainingLogicCore, default_database_path

log = logging.getLogger("LesionSegTraining")

SETTINGS_KEY = "LesionSeg/FeedbackDatabase"  # same key as LesionSegLib.engine.feedback.SETTINGS_KEY


#
# LesionSegTraining
#
class LesionSegTraining(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "LesionSeg Training"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = ["LesionSeg"]
        self.parent.contributors = ["LesionSeg developers"]
        self.parent.helpText = (
            "Closes the review loop of LesionSeg: every accept / reject / unsure decision is stored in a "
            "feedback database; retrain the per-lesion confidence classifier from them (optionally with "
            "ground-truth labels), compare the new version with the old one on the same lesions "
            "(cross-validated AUC and calibration), activate it or roll back, and train a new segmenter "
            "from a folder of images and corrected masks."
        )
        self.parent.acknowledgementText = "LesionSeg developers. Built on 3D Slicer, PyTorch, MONAI, scikit-learn and SQLite."


#
# LesionSegTrainingWidget
#
class LesionSegTrainingWidget(ScriptedLoadableModuleWidget):
    def __init__(self, parent=None):
        # state first: without a parent, the base class calls setup() from its constructor
        self.logic = None
        self.retrainJob = None
        self.segJob = None
        self.segJobRegister = ""
        self.lastResult = None
        self.jobStarted = 0.0
        ScriptedLoadableModuleWidget.__init__(self, parent)

    # ---------------------------------------------------------------------------- setup
    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/LesionSegTraining.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = LesionSegTrainingLogic()

        self.pollTimer = qt.QTimer()
        self.pollTimer.setInterval(200)
        self.pollTimer.timeout.connect(self.onPoll)

        self.ui.openDatabaseButton.clicked.connect(lambda *a: self.openDatabase(self.ui.databasePathEdit.property("text")))
        self.ui.databasePathEdit.returnPressed.connect(lambda *a: self.openDatabase(self.ui.databasePathEdit.property("text")))
        self.ui.browseDatabaseButton.clicked.connect(self.onBrowseDatabase)
        self.ui.refreshStatsButton.clicked.connect(lambda *a: self.refreshStatistics())
        self.ui.retrainButton.clicked.connect(self.onRetrainButton)
        self.ui.activateButton.clicked.connect(self.onActivate)
        self.ui.rollbackButton.clicked.connect(self.onRollback)
        self.ui.trainSegmenterButton.clicked.connect(self.onTrainSegmenterButton)
        self.ui.includeGtCheckBox.toggled.connect(lambda *a: self.updateButtons())
        self.ui.useFeedbackCheckBox.toggled.connect(lambda *a: self.updateButtons())

        self.ui.retrainProgressBar.setVisible(False)
        self.ui.segProgressBar.setVisible(False)
        self.ui.segOutputEdit.setText(os.path.join(os.path.expanduser("~"), "LesionSeg", "segmenter"))
        self.refreshModels()
        path = self.settingsDatabasePath()
        self.ui.databasePathEdit.setText(path)
        self.openDatabase(path, quiet=True)
        self.updateButtons()

    def cleanup(self):
        self.pollTimer.stop()
        for job in (self.retrainJob, self.segJob):
            if job is not None:
                job.cancel()
        self.retrainJob = self.segJob = None
        if self.logic is not None:
            self.logic.close_database()

    def enter(self):
        self.refreshStatistics()
        self.refreshModels()

    # ------------------------------------------------------------------------ database
    @staticmethod
    def settingsDatabasePath():
        value = qt.QSettings().value(SETTINGS_KEY)
        return str(value) if value else str(default_database_path())

    def onBrowseDatabase(self, *args):
        # a "save" dialog, so that a new file can be named; an existing one is opened, never replaced
        dialog = qt.QFileDialog(self.parent, "Feedback database", self.ui.databasePathEdit.property("text"),
                                "SQLite database (*.db *.sqlite);;All files (*)")
        dialog.setAcceptMode(qt.QFileDialog.AcceptSave)
        dialog.setOption(qt.QFileDialog.DontConfirmOverwrite, True)
        run = getattr(dialog, "exec_", None) or getattr(dialog, "exec")
        if not run():
            return
        files = dialog.selectedFiles()
        path = files[0] if files else ""
        if path:
            self.ui.databasePathEdit.setText(path)
            self.openDatabase(path)

    def openDatabase(self, path, quiet=False):
        path = str(path).strip()
        if not path:
            return False
        try:
            self.logic.open_database(path)
        except Exception as exc:
            self.logic.close_database()
            self.ui.statsSummaryLabel.setText(f"Cannot use this file: {exc}")
            self.ui.statsSummaryLabel.setStyleSheet("color: #c0392b;")
            self.ui.statsTableView.setMRMLTableNode(None)
            if not quiet:
                slicer.util.errorDisplay(f"Cannot open the feedback database:\n{exc}")
            self.updateButtons()
            return False
        qt.QSettings().setValue(SETTINGS_KEY, path)
        self.ui.statsSummaryLabel.setStyleSheet("")
        self.refreshStatistics()
        self.updateButtons()
        return True

    def refreshStatistics(self):
        if self.logic is None or self.logic.store is None:
            return
        try:
            stats = self.logic.statistics()
            table = self.logic.update_statistics_table()
        except Exception as exc:
            self.ui.statsSummaryLabel.setText(f"Cannot read the feedback database: {exc}")
            return
        self.ui.statsTableView.setMRMLTableNode(table)
        self.ui.statsSummaryLabel.setText(self.logic.statistics_text(stats))

    # -------------------------------------------------------------------------- models
    def refreshModels(self):
        try:
            rows = self.logic.model_versions()
            active = self.logic.active_model_id()
            table = self.logic.update_versions_table()
        except Exception as exc:
            self.ui.activeModelLabel.setText(f"Models cannot be listed: {exc}")
            return
        self.ui.versionsTableView.setMRMLTableNode(table)
        current_base = self.ui.baseModelSelector.property("currentText")
        current_version = self.ui.versionSelector.property("currentText")
        for combo in (self.ui.baseModelSelector, self.ui.versionSelector):
            combo.clear()
            for r in rows:
                combo.addItem(r["id"])
        ids = [r["id"] for r in rows]
        base = current_base if current_base in ids else (active if active in ids else None)
        if base is None:
            base = next((r["id"] for r in rows if r["name"] == active), ids[0] if ids else None)
        if base is not None:
            self.ui.baseModelSelector.setCurrentIndex(ids.index(base))
        pick = current_version if current_version in ids else base
        if pick is not None:
            self.ui.versionSelector.setCurrentIndex(ids.index(pick))
        self.ui.activeModelLabel.setText(f"Active model: {active}")
        self.updateButtons()

    def onActivate(self, *args):
        model = self.ui.versionSelector.property("currentText")
        if not model:
            return
        try:
            active = self.logic.activate(model)
        except Exception as exc:
            slicer.util.errorDisplay(f"Cannot activate {model}: {exc}")
            return
        self.refreshModels()
        self.ui.activeModelLabel.setText(f"Active model: {active}")

    def onRollback(self, *args):
        try:
            active = self.logic.rollback()
        except Exception as exc:
            slicer.util.errorDisplay(f"Cannot roll back: {exc}")
            return
        self.refreshModels()
        self.ui.activeModelLabel.setText(f"Active model: {active} (rolled back)")

    # ------------------------------------------------------------------------ retrain
    def onRetrainButton(self, *args):
        if self.retrainJob is not None:
            self.cancelRetrain()
            return
        includeGt = bool(self.ui.includeGtCheckBox.property("checked"))
        gtDir = self.ui.gtDirectoryButton.property("directory") if includeGt else None
        try:
            self.retrainJob = self.logic.start_retrain(
                base_model=self.ui.baseModelSelector.property("currentText") or None,
                include_gt=gtDir or None,
                output=self.ui.outputNameEdit.property("text").strip() or None,
                folds=int(self.ui.foldsSpinBox.property("value")),
                use_feedback=bool(self.ui.useFeedbackCheckBox.property("checked")),
            )
        except Exception as exc:
            self.retrainJob = None
            slicer.util.errorDisplay(f"Cannot start retraining: {exc}")
            return
        self.jobStarted = time.monotonic()
        self.ui.retrainProgressBar.setValue(0)
        self.ui.retrainProgressBar.setVisible(True)
        self.ui.retrainStatusLabel.setText("Retraining: starting...")
        self.pollTimer.start()
        self.updateButtons()

    def cancelRetrain(self):
        job, self.retrainJob = self.retrainJob, None
        if job is not None:
            job.cancel()
        self.ui.retrainProgressBar.setVisible(False)
        self.ui.retrainStatusLabel.setText("Retraining cancelled; no model was written.")
        self.updateButtons()

    def pollRetrain(self):
        job = self.retrainJob
        state = job.state
        self.ui.retrainProgressBar.setValue(int(round(100 * job.fraction)))
        if state == "running":
            self.ui.retrainStatusLabel.setText(f"{job.status}  ({time.monotonic() - self.jobStarted:.0f} s)")
            return
        self.retrainJob = None
        self.ui.retrainProgressBar.setVisible(False)
        try:
            result, table, plot = self.logic.finish_retrain(job)
        except Exception as exc:
            self.ui.retrainStatusLabel.setText(f"Retraining failed: {exc}")
            slicer.util.errorDisplay(f"Retraining failed:\n{exc}")
            self.updateButtons()
            return
        self.lastResult = result
        self.ui.metricsTableView.setMRMLTableNode(table)
        if plot is not None:
            pixmap = qt.QPixmap(str(plot))
            self.ui.plotLabel.setPixmap(pixmap.scaledToWidth(400, qt.Qt.SmoothTransformation))
        self.refreshModels()
        ids = [self.ui.versionSelector.itemText(i) for i in range(self.ui.versionSelector.property("count"))]
        if result["model"] in ids:
            self.ui.versionSelector.setCurrentIndex(ids.index(result["model"]))
        labels = result["labels"]
        self.ui.retrainStatusLabel.setText(
            f"New version {result['model']} from {labels['total']} labels ({labels['positive']} true, {labels['negative']} false) "
            f"in {result['seconds']:.0f} s; {result['metrics']['validation']}. Press Activate to use it.")
        self.updateButtons()

    # ---------------------------------------------------------------------- segmenter
    def onTrainSegmenterButton(self, *args):
        if self.segJob is not None:
            self.cancelSegmenterTraining()
            return
        images = self.ui.trainImagesButton.property("directory")
        output = self.ui.segOutputEdit.property("text").strip()
        try:
            self.segJob = self.logic.start_segmenter_training(
                images, output, minutes=float(self.ui.minutesSpinBox.property("value")))
        except Exception as exc:
            self.segJob = None
            slicer.util.errorDisplay(f"Cannot start segmenter training: {exc}")
            return
        self.segJobRegister = self.ui.registerNameEdit.property("text").strip()
        self.jobStarted = time.monotonic()
        self.ui.segLogText.clear()
        self.ui.segProgressBar.setValue(0)
        self.ui.segProgressBar.setVisible(True)
        self.ui.segStatusLabel.setText("Segmenter training: loading cases...")
        self.pollTimer.start()
        self.updateButtons()

    def cancelSegmenterTraining(self):
        job, self.segJob = self.segJob, None
        if job is not None:
            job.cancel()
        self.ui.segProgressBar.setVisible(False)
        self.ui.segStatusLabel.setText("Segmenter training cancelled.")
        self.updateButtons()

    def pollSegmenter(self):
        job = self.segJob
        state = job.state
        for line in job.new_lines():
            self.ui.segLogText.appendPlainText(line)
        self.ui.segProgressBar.setValue(int(round(100 * job.fraction)))
        if state == "running":
            self.ui.segStatusLabel.setText(f"{job.status}  ({(time.monotonic() - self.jobStarted) / 60:.1f} min)")
            return
        self.segJob = None
        self.ui.segProgressBar.setVisible(False)
        try:
            card = self.logic.finish_segmenter_training(job, register=self.segJobRegister or None,
                                                         base_model=self.ui.baseModelSelector.property("currentText") or None)
        except Exception as exc:
            self.ui.segStatusLabel.setText(f"Segmenter training failed: {exc}")
            slicer.util.errorDisplay(f"Segmenter training failed:\n{exc}")
            self.updateButtons()
            return
        text = f"Segmenter written to {job.output}."
        if card is not None:
            text += f" Registered as {card.id}: retrain its classifier (Add ground truth) before activating it."
            self.refreshModels()
        self.ui.segStatusLabel.setText(text)
        self.updateButtons()

    # --------------------------------------------------------------------------- poll
    def onPoll(self):
        if self.retrainJob is not None:
            self.pollRetrain()
        if self.segJob is not None:
            self.pollSegmenter()
        if self.retrainJob is None and self.segJob is None:
            self.pollTimer.stop()

    def updateButtons(self):
        retraining = self.retrainJob is not None
        training = self.segJob is not None
        useFeedback = bool(self.ui.useFeedbackCheckBox.property("checked"))
        includeGt = bool(self.ui.includeGtCheckBox.property("checked"))
        haveLabels = (useFeedback and self.logic is not None and self.logic.store is not None) or includeGt
        self.ui.retrainButton.setText("Cancel" if retraining else "Retrain")
        self.ui.retrainButton.setEnabled(retraining or (haveLabels and self.ui.baseModelSelector.property("count") > 0))
        self.ui.gtDirectoryButton.setEnabled(includeGt and not retraining)
        for widget in (self.ui.baseModelSelector, self.ui.outputNameEdit, self.ui.foldsSpinBox, self.ui.useFeedbackCheckBox,
                       self.ui.includeGtCheckBox, self.ui.databasePathEdit, self.ui.openDatabaseButton, self.ui.browseDatabaseButton):
            widget.setEnabled(not retraining)
        self.ui.activateButton.setEnabled(not retraining and self.ui.versionSelector.property("count") > 0)
        self.ui.rollbackButton.setEnabled(not retraining)
        self.ui.trainSegmenterButton.setText("Cancel" if training else "Train segmenter")
        for widget in (self.ui.trainImagesButton, self.ui.segOutputEdit, self.ui.minutesSpinBox, self.ui.registerNameEdit):
            widget.setEnabled(not training)


#
# LesionSegTrainingLogic
#
class LesionSegTrainingLogic(ScriptedLoadableModuleLogic, TrainingLogicCore):
    """Headless module logic; see ``LesionSegTrainingLib.logic.TrainingLogicCore``."""

    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)
        TrainingLogicCore.__init__(self)


#
# LesionSegTrainingTest
#
class LesionSegTrainingTest(ScriptedLoadableModuleTest):
    """Feedback database statistics, refusal of a foreign file, and model versions on the real
    registry (no training: that is covered by the pytest suite)."""

    def setUp(self):
        slicer.mrmlScene.Clear(0)

    def runTest(self):
        self.setUp()
        self.test_LesionSegTraining_database_and_versions()

    def test_LesionSegTraining_database_and_versions(self):
        import sqlite3
        import tempfile

        from LesionSegLib.engine.feedback import FeedbackStoreError
        from LesionSegLib.review import Decision

        logic = LesionSegTrainingLogic()
        with tempfile.TemporaryDirectory() as d:
            self.delayDisplay("Feedback database")
            store = logic.open_database(os.path.join(d, "feedback.db"))
            store.record_many([
                Decision("case", "hash", 1, "accepted", 0.9, "m@1", centroid_lps=(1.0, 2.0, 3.0)),
                Decision("case", "hash", 2, "rejected", 0.4, "m@1", centroid_lps=(4.0, 5.0, 6.0)),
            ])
            table = logic.update_statistics_table()
            self.assertEqual(table.GetTable().GetNumberOfRows(), 2)
            self.assertEqual(logic.statistics()["by_class"]["accepted"], 1)
            foreign = os.path.join(d, "foreign.db")
            con = sqlite3.connect(foreign)
            con.execute("CREATE TABLE t (x)")
            con.commit()
            con.close()
            with self.assertRaises(FeedbackStoreError):
                logic.open_database(foreign)
            logic.close_database()
        self.delayDisplay("Model versions")
        table = logic.update_versions_table()
        self.assertEqual(table.GetTable().GetNumberOfRows(), len(logic.model_versions()))
        self.delayDisplay("Test passed")

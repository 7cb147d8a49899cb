"""LesionSegTraining: the feedback database, classifier retraining, model versions, segmenter training.

Thin Slicer module: the widget binds the UI (``Resources/UI/LesionSegTraining.ui``) to its typed
parameter node (``LesionSegTrainingLib/parameters.py``) and to the logic in ``LesionSegTrainingLib``
(MRML, no Qt); retraining and segmenter training run in background processes polled by a timer,
so the GUI never blocks and both can be cancelled.  Their messages go to the log box.

Qt code here sticks to what PythonQt (Slicer) and PySide6 (the offscreen test harness) both
accept: Q_PROPERTY values are read with ``widget.property(name)``, signals are connected with
``signal.connect``.
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import qt
import slicer
import vtk
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

from LesionSegLib import settings
from LesionSegLib.widget_support import LogBox, reload_package
from LesionSegTrainingLib.logic import TrainingLogicCore, default_database_path
from LesionSegTrainingLib.parameters import LesionSegTrainingParameterNode

log = logging.getLogger("LesionSegTraining")


#
# LesionSegTraining
#
class LesionSegTraining(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("LesionSeg Training")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = ["LesionSeg"]
        self.parent.contributors = ["LesionSeg developers"]
        self.parent.helpText = _(
            "Closes the review loop of LesionSeg: every accept / reject / unsure decision is stored in a "
            "feedback database; retrain the per-lesion confidence classifier from them (optionally with "
            "ground-truth labels), compare the new version with the old one on the same lesions "
            "(cross-validated AUC and calibration), activate it or roll back, and train a new segmenter "
            "from a folder of images and corrected masks.")
        self.parent.acknowledgementText = _("LesionSeg developers. Built on 3D Slicer, PyTorch, MONAI, scikit-learn and SQLite.")


#
# LesionSegTrainingWidget
#
class LesionSegTrainingWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None):
        # state first: without a parent, the base class calls setup() from its constructor
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._guiTag = None
        self.retrainJob = None
        self.segJob = None
        self.segJobRegister = ""
        self.lastResult = None
        self.jobStarted = 0.0
        self._stderrSeen = {}
        ScriptedLoadableModuleWidget.__init__(self, parent)

    # ---------------------------------------------------------------------------- setup
    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/LesionSegTraining.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = LesionSegTrainingLogic()
        self.logBox = LogBox(self.ui.logTextEdit, self.ui.logCollapsibleButton)

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
        self.ui.baseModelSelector.currentIndexChanged.connect(self.onBaseModelChanged)

        self.ui.retrainProgressBar.setVisible(False)
        self.ui.segProgressBar.setVisible(False)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, lambda *a: self.initializeParameterNode())
        self.initializeParameterNode()
        self.refreshModels()
        self.showDatabase(default_database_path())
        self.updateButtons()

    def cleanup(self):
        self.pollTimer.stop()
        for job in (self.retrainJob, self.segJob):
            if job is not None:
                job.cancel()
        self.retrainJob = self.segJob = None
        self.setParameterNode(None)
        self.removeObservers()
        if self.logic is not None:
            self.logic.close_database()

    def enter(self):
        self.initializeParameterNode()
        if self.logic.store is None:
            self.showDatabase(default_database_path())
        self.refreshStatistics()
        self.refreshModels()

    def onReload(self):
        self.cleanup()
        reload_package("LesionSegTrainingLib")
        reload_package("LesionSegLib")
        ScriptedLoadableModuleWidget.onReload(self)

    # -------------------------------------------------------------------- parameter node
    def initializeParameterNode(self):
        self.setParameterNode(self.logic.getParameterNode())

    def setParameterNode(self, parameterNode):
        if self._parameterNode is not None:
            self._parameterNode.disconnectGui(self._guiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateButtons)
        self._parameterNode = parameterNode
        if parameterNode is not None:
            self._guiTag = parameterNode.connectGui(self.ui)
            self.addObserver(parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateButtons)

    def onBaseModelChanged(self, *args):
        if self._parameterNode is not None:
            self._parameterNode.baseModel = self.ui.baseModelSelector.property("currentText") or ""

    # ------------------------------------------------------------------------ database
    def showDatabase(self, path):
        """Show the database at ``path``: opened when the file exists, never created just by looking."""
        path = Path(str(path)).expanduser()
        self.ui.databasePathEdit.setText(str(path))
        if path.exists():
            self.openDatabase(path, quiet=True, remember=False)
            return
        self.logic.close_database()
        self.ui.statsTableView.setMRMLTableNode(None)
        self.ui.statsSummaryLabel.setStyleSheet("")
        self.ui.statsSummaryLabel.setText(_("No decisions recorded yet: {path} is created with the first decision LesionSeg records, "
                                            "or when you press Open.").format(path=path))
        self.updateButtons()

    def onBrowseDatabase(self, *args):
        # a "save" dialog, so that a new file can be named; an existing one is opened, never replaced
        dialog = qt.QFileDialog(self.parent, _("Feedback database"), self.ui.databasePathEdit.property("text"),
                                "SQLite database (*.db *.sqlite);;All files (*)")
        dialog.setAcceptMode(qt.QFileDialog.AcceptSave)
        dialog.setOption(qt.QFileDialog.DontConfirmOverwrite, True)
        run = getattr(dialog, "exec_", None) or getattr(dialog, "exec")
        if not run():
            return
        files = dialog.selectedFiles()
        if files and files[0]:
            self.ui.databasePathEdit.setText(files[0])
            self.openDatabase(files[0])

    def openDatabase(self, path, quiet=False, remember=True):
        path = str(path).strip()
        if not path:
            return False
        try:
            self.logic.open_database(path)
        except Exception as exc:
            self.logic.close_database()
            self.ui.statsSummaryLabel.setText(_("Cannot use this file: {error}").format(error=exc))
            self.ui.statsSummaryLabel.setStyleSheet("color: #c0392b;")
            self.ui.statsTableView.setMRMLTableNode(None)
            if not quiet:
                self.logBox.show_error(_("Cannot open the feedback database: {error}").format(error=exc))
            self.updateButtons()
            return False
        if remember:  # LesionSeg records its decisions here from now on
            settings.set_feedback_database_path(path)
        self.logBox.append(f"feedback database: {path}", stamp=True)
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
            self.ui.statsSummaryLabel.setText(_("Cannot read the feedback database: {error}").format(error=exc))
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
            self.ui.activeModelLabel.setText(_("Models cannot be listed: {error}").format(error=exc))
            return
        self.ui.versionsTableView.setMRMLTableNode(table)
        wanted = self._parameterNode.baseModel if self._parameterNode is not None else ""
        current_version = self.ui.versionSelector.property("currentText")
        ids = [r["id"] for r in rows]
        for combo in (self.ui.baseModelSelector, self.ui.versionSelector):
            combo.blockSignals(True)
            combo.clear()
            for i in ids:
                combo.addItem(i)
            combo.blockSignals(False)
        base = wanted if wanted in ids else (active if active in ids else next((r["id"] for r in rows if r["name"] == active), ids[0] if ids else None))
        if base is not None:
            self.ui.baseModelSelector.setCurrentIndex(ids.index(base))
            self.onBaseModelChanged()
        pick = current_version if current_version in ids else base
        if pick is not None:
            self.ui.versionSelector.setCurrentIndex(ids.index(pick))
        self.ui.activeModelLabel.setText(_("Active model: {model}").format(model=active))
        self.updateButtons()

    def onActivate(self, *args):
        model = self.ui.versionSelector.property("currentText")
        if not model:
            return
        try:
            active = self.logic.activate(model)
        except Exception as exc:
            self.logBox.show_error(_("Cannot activate {model}: {error}").format(model=model, error=exc))
            return
        self.refreshModels()
        self.ui.activeModelLabel.setText(_("Active model: {model}").format(model=active))
        self.logBox.append(f"activated {active}", stamp=True)

    def onRollback(self, *args):
        try:
            active = self.logic.rollback()
        except Exception as exc:
            self.logBox.show_error(_("Cannot roll back: {error}").format(error=exc))
            return
        self.refreshModels()
        self.ui.activeModelLabel.setText(_("Active model: {model} (rolled back)").format(model=active))
        self.logBox.append(f"rolled back to {active}", stamp=True)

    # ------------------------------------------------------------------------ jobs
    def logJob(self, job, key):
        """New output of a background job: its non-JSON stdout lines and its stderr lines."""
        self.logBox.append([ln for ln in job.new_lines() if not ln.startswith("{")])
        lines = list(job.stderr_lines)
        seen = self._stderrSeen.get(key, 0)
        self.logBox.append(lines[seen:] if len(lines) >= seen else lines)
        self._stderrSeen[key] = len(lines)

    def onRetrainButton(self, *args):
        if self.retrainJob is not None:
            self.cancelRetrain()
            return
        p = self._parameterNode
        gtDir = str(p.groundTruthDirectory) if p.includeGroundTruth else None
        try:
            self.retrainJob = self.logic.start_retrain(base_model=p.baseModel or None, include_gt=gtDir or None,
                                                       output=p.outputName.strip() or None, folds=int(p.folds),
                                                       use_feedback=bool(p.useFeedback))
        except Exception as exc:
            self.retrainJob = None
            self.logBox.show_error(_("Cannot start retraining: {error}").format(error=exc))
            return
        self._stderrSeen["retrain"] = 0
        self.jobStarted = time.monotonic()
        self.logBox.append(f"retraining {p.baseModel} (folds {p.folds})", stamp=True)
        self.ui.retrainProgressBar.setValue(0)
        self.ui.retrainProgressBar.setVisible(True)
        self.ui.retrainStatusLabel.setText(_("Retraining: starting..."))
        self.pollTimer.start()
        self.updateButtons()

    def cancelRetrain(self):
        job, self.retrainJob = self.retrainJob, None
        if job is not None:
            job.cancel()
        self.ui.retrainProgressBar.setVisible(False)
        self.ui.retrainStatusLabel.setText(_("Retraining cancelled; no model was written."))
        self.logBox.append("retraining cancelled", stamp=True)
        self.updateButtons()

    def pollRetrain(self):
        job = self.retrainJob
        state = job.state
        self.logJob(job, "retrain")
        self.ui.retrainProgressBar.setValue(int(round(100 * job.fraction)))
        if state == "running":
            self.ui.retrainStatusLabel.setText(f"{job.status}  ({time.monotonic() - self.jobStarted:.0f} s)")
            return
        self.retrainJob = None
        self.ui.retrainProgressBar.setVisible(False)
        try:
            result, table, plot = self.logic.finish_retrain(job)
        except Exception as exc:
            self.ui.retrainStatusLabel.setText(_("Retraining failed: {error}").format(error=exc))
            self.logBox.show_error(_("Retraining failed: {error}").format(error=str(exc).splitlines()[0] if str(exc) else exc))
            self.updateButtons()
            return
        self.lastResult = result
        self.ui.metricsTableView.setMRMLTableNode(table)
        if plot is not None:
            pixmap = qt.QPixmap(str(plot)).scaledToWidth(400, qt.Qt.SmoothTransformation)
            self.ui.plotLabel.setPixmap(pixmap)
            self.ui.plotLabel.setMinimumHeight(pixmap.height())  # the whole ROC / reliability plot, not a strip
        self.refreshModels()
        ids = [self.ui.versionSelector.itemText(i) for i in range(self.ui.versionSelector.property("count"))]
        if result["model"] in ids:
            self.ui.versionSelector.setCurrentIndex(ids.index(result["model"]))
        labels = result["labels"]
        text = _("New version {model} from {total} labels ({positive} true, {negative} false) in {seconds:.0f} s; {validation}. "
                 "Press Activate to use it.").format(model=result["model"], total=labels["total"], positive=labels["positive"],
                                                     negative=labels["negative"], seconds=result["seconds"],
                                                     validation=result["metrics"]["validation"])
        self.ui.retrainStatusLabel.setText(text)
        self.logBox.append(text, stamp=True)
        self.updateButtons()

    def onTrainSegmenterButton(self, *args):
        if self.segJob is not None:
            self.cancelSegmenterTraining()
            return
        p = self._parameterNode
        try:
            self.segJob = self.logic.start_segmenter_training(str(p.segmenterImages), p.segmenterOutput.strip(),
                                                              minutes=float(p.segmenterMinutes))
        except Exception as exc:
            self.segJob = None
            self.logBox.show_error(_("Cannot start segmenter training: {error}").format(error=exc))
            return
        self.segJobRegister = p.registerName.strip()
        self._stderrSeen["segmenter"] = 0
        self.jobStarted = time.monotonic()
        self.ui.segLogText.clear()
        self.ui.segProgressBar.setValue(0)
        self.ui.segProgressBar.setVisible(True)
        self.ui.segStatusLabel.setText(_("Segmenter training: loading cases..."))
        self.pollTimer.start()
        self.updateButtons()

    def cancelSegmenterTraining(self):
        job, self.segJob = self.segJob, None
        if job is not None:
            job.cancel()
        self.ui.segProgressBar.setVisible(False)
        self.ui.segStatusLabel.setText(_("Segmenter training cancelled."))
        self.logBox.append("segmenter training cancelled", stamp=True)
        self.updateButtons()

    def pollSegmenter(self):
        job = self.segJob
        state = job.state
        lines = job.new_lines()
        for line in lines:
            self.ui.segLogText.appendPlainText(line)
        self.logBox.append(lines)
        stderr = list(job.stderr_lines)
        self.logBox.append(stderr[self._stderrSeen.get("segmenter", 0):])
        self._stderrSeen["segmenter"] = len(stderr)
        self.ui.segProgressBar.setValue(int(round(100 * job.fraction)))
        if state == "running":
            self.ui.segStatusLabel.setText(f"{job.status}  ({(time.monotonic() - self.jobStarted) / 60:.1f} min)")
            return
        self.segJob = None
        self.ui.segProgressBar.setVisible(False)
        try:
            card = self.logic.finish_segmenter_training(job, register=self.segJobRegister or None,
                                                         base_model=self._parameterNode.baseModel or None)
        except Exception as exc:
            self.ui.segStatusLabel.setText(_("Segmenter training failed: {error}").format(error=exc))
            self.logBox.show_error(_("Segmenter training failed: {error}").format(error=exc))
            self.updateButtons()
            return
        text = _("Segmenter written to {folder}.").format(folder=job.output)
        if card is not None:
            text += " " + _("Registered as {model}: retrain its classifier (Add ground truth) before activating it.").format(model=card.id)
            self.refreshModels()
        self.ui.segStatusLabel.setText(text)
        self.logBox.append(text, stamp=True)
        self.updateButtons()

    # --------------------------------------------------------------------------- poll
    def onPoll(self):
        if self.retrainJob is not None:
            self.pollRetrain()
        if self.segJob is not None:
            self.pollSegmenter()
        if self.retrainJob is None and self.segJob is None:
            self.pollTimer.stop()

    def updateButtons(self, *args):
        if not hasattr(self, "ui") or self._parameterNode is None:
            return
        p = self._parameterNode
        retraining = self.retrainJob is not None
        training = self.segJob is not None
        haveLabels = (p.useFeedback and self.logic is not None and self.logic.store is not None) or p.includeGroundTruth
        self.ui.retrainButton.setText(_("Cancel") if retraining else _("Retrain"))
        self.ui.retrainButton.setEnabled(retraining or (haveLabels and self.ui.baseModelSelector.property("count") > 0))
        self.ui.gtDirectoryButton.setEnabled(p.includeGroundTruth and not retraining)
        for widget in (self.ui.baseModelSelector, self.ui.outputNameEdit, self.ui.foldsSpinBox, self.ui.useFeedbackCheckBox,
                       self.ui.includeGtCheckBox, self.ui.databasePathEdit, self.ui.openDatabaseButton, self.ui.browseDatabaseButton):
            widget.setEnabled(not retraining)
        self.ui.activateButton.setEnabled(not retraining and self.ui.versionSelector.property("count") > 0)
        self.ui.rollbackButton.setEnabled(not retraining)
        self.ui.trainSegmenterButton.setText(_("Cancel") if training else _("Train segmenter"))
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

    def getParameterNode(self):
        return LesionSegTrainingParameterNode(super().getParameterNode())


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

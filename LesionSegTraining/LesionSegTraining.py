"""LesionSegTraining: the feedback database, classifier retraining, segmenter fine-tuning on corrections,
model versions, segmenter training.

Thin Slicer module: the widget binds the UI (``Resources/UI/LesionSegTraining.ui``) to its typed
parameter node (``LesionSegTrainingLib/parameters.py``) and to the logic in ``LesionSegTrainingLib``
(MRML, no Qt); retraining, fine-tuning and segmenter training run in background processes polled by
a timer (``LesionSegTrainingLib.panel_job.PanelJob``: button, progress, Cancel, errors), so the GUI never
blocks and each can be cancelled.  Their messages go to the log box.

Qt code here sticks to what PythonQt (Slicer) and PySide6 (the offscreen test harness) both
accept: Q_PROPERTY values are read with ``widget.property(name)``, signals are connected with
``signal.connect``.
"""
from __future__ import annotations

import logging
import os
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
from LesionSegTrainingLib import finetune
from LesionSegTrainingLib.logic import TrainingLogicCore, default_database_path
from LesionSegTrainingLib.panel_job import PanelJob
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
            "(cross-validated AUC and calibration), fine-tune the segmenter on the corrected cases, activate a "
            "version or roll back, and train a new segmenter from a folder of images and corrected masks.") + \
            _(' See the <a href="{url}">documentation</a>.').format(url="https://github.com/LesionSeg/SlicerLesionSeg#readme")
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
        self.runners = {}  # "retrain" / "finetune" / "segmenter": PanelJob
        self.segJobRegister = ""
        self.lastResult = None
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
        self.ui.finetuneButton.clicked.connect(self.onFinetuneButton)
        self.ui.activateButton.clicked.connect(self.onActivate)
        self.ui.rollbackButton.clicked.connect(self.onRollback)
        self.ui.trainSegmenterButton.clicked.connect(self.onTrainSegmenterButton)
        self.ui.baseModelSelector.currentIndexChanged.connect(self.onBaseModelChanged)
        self.ui.finetuneBaseSelector.currentIndexChanged.connect(self.onBaseModelChanged)
        ui, box = self.ui, self.logBox
        self.runners = {
            "retrain": PanelJob(_("Retraining"), _("Retrain"), ui.retrainButton, ui.retrainProgressBar, ui.retrainStatusLabel,
                                box, self.updateButtons, cancel_note=_("No model was written.")),
            "finetune": PanelJob(_("Fine-tuning"), _("Fine-tune segmenter"), ui.finetuneButton, ui.finetuneProgressBar,
                                 ui.finetuneStatusLabel, box, self.updateButtons, cancel_note=_("No model was written.")),
            "segmenter": PanelJob(_("Segmenter training"), _("Train segmenter"), ui.trainSegmenterButton, ui.segProgressBar,
                                  ui.segStatusLabel, box, self.updateButtons, lines_to=ui.segLogText),
        }
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, lambda *a: self.initializeParameterNode())
        self.initializeParameterNode()
        self.refreshModels()
        self.showDatabase(default_database_path())
        self.updateButtons()

    def cleanup(self):
        self.pollTimer.stop()
        for runner in self.runners.values():
            if runner.running:
                runner.cancel()
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
            self._parameterNode.finetuneBaseModel = self.ui.finetuneBaseSelector.property("currentText") or ""

    # the running job of each kind (None when idle)
    retrainJob = property(lambda self: self.runners["retrain"].job if self.runners else None)
    finetuneJob = property(lambda self: self.runners["finetune"].job if self.runners else None)
    segJob = property(lambda self: self.runners["segmenter"].job if self.runners else None)

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
        self.ui.finetuneCountsLabel.setText(_("No feedback database open."))
        self.ui.statsSummaryLabel.setStyleSheet("")
        self.ui.statsSummaryLabel.setText(_("No decisions recorded yet: {path} is created with the first decision LesionSeg records, "
                                            "or when you press Open.").format(path=path))
        self.updateButtons()

    def onBrowseDatabase(self, *args):
        # a "save" dialog, so that a new file can be named; an existing one is opened, never replaced
        dialog = qt.QFileDialog(self.parent, _("Feedback database"), self.ui.databasePathEdit.property("text"),
                                _("SQLite database (*.db *.sqlite);;All files (*)"))
        dialog.setAcceptMode(qt.QFileDialog.AcceptSave)
        dialog.setOption(qt.QFileDialog.DontConfirmOverwrite, True)
        run = getattr(dialog, "exec_", None) or dialog.exec
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
            corrections = finetune.corrections_text(finetune.correction_counts(self.logic))
        except Exception as exc:
            self.ui.statsSummaryLabel.setText(_("Cannot read the feedback database: {error}").format(error=exc))
            return
        self.ui.statsTableView.setMRMLTableNode(table)
        self.ui.statsSummaryLabel.setText(self.logic.statistics_text(stats))
        self.ui.finetuneCountsLabel.setText(corrections)

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
        p = self._parameterNode
        wanted = p.baseModel if p is not None else ""
        wanted_ft = p.finetuneBaseModel if p is not None else ""
        current_version = self.ui.versionSelector.property("currentText")
        ids = [r["id"] for r in rows]
        ft_ids = [r["id"] for r in rows if r["architecture"] == "clcs" and r.get("has_classifier")]  # a dense segmenter and its classifier
        for combo, items in ((self.ui.baseModelSelector, ids), (self.ui.versionSelector, ids), (self.ui.finetuneBaseSelector, ft_ids)):
            combo.blockSignals(True)
            combo.clear()
            for i in items:
                combo.addItem(i)
            combo.blockSignals(False)
        default = active if active in ids else next((r["id"] for r in rows if r["name"] == active), ids[0] if ids else None)
        base = wanted if wanted in ids else default
        ft = wanted_ft if wanted_ft in ft_ids else (default if default in ft_ids else (ft_ids[0] if ft_ids else None))
        if base is not None:
            self.ui.baseModelSelector.setCurrentIndex(ids.index(base))
            if ft is not None:
                self.ui.finetuneBaseSelector.setCurrentIndex(ft_ids.index(ft))
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
    def startJob(self, key, make, status_text, log_text=None):
        runner = self.runners[key]
        if runner.running:
            runner.cancel()
            return False
        started = runner.start(make, status_text, log_text)
        if started:
            self.pollTimer.start()
        return started

    def onRetrainButton(self, *args):
        p = self._parameterNode
        gtDir = str(p.groundTruthDirectory) if p.includeGroundTruth else None
        self.startJob("retrain", lambda: self.logic.start_retrain(
            base_model=p.baseModel or None, include_gt=gtDir or None, output=p.outputName.strip() or None,
            folds=int(p.folds), use_feedback=bool(p.useFeedback)),
            _("Retraining: starting..."), f"retraining {p.baseModel} (folds {p.folds})")

    def showRetrainResult(self, out):
        result, table, plot = out
        self.lastResult = result
        self.ui.metricsTableView.setMRMLTableNode(table)
        if plot is not None:
            pixmap = qt.QPixmap(str(plot)).scaledToWidth(400, qt.Qt.SmoothTransformation)
            self.ui.plotLabel.setPixmap(pixmap)
            self.ui.plotLabel.setMinimumHeight(pixmap.height())  # the whole ROC / reliability plot, not a strip
        labels = result["labels"]
        text = _("New version {model} from {total} labels ({positive} true, {negative} false) in {seconds:.0f} s; {validation}. "
                 "Press Activate to use it.").format(model=result["model"], total=labels["total"], positive=labels["positive"],
                                                     negative=labels["negative"], seconds=result["seconds"],
                                                     validation=result["metrics"]["validation"])
        skipped = labels.get("skipped") or {}
        if skipped:  # e.g. a lesion drawn by hand: no classifier features or patch to learn from
            text += " " + _("Left out: {reasons}.").format(reasons=", ".join(f"{n} {why}" for why, n in sorted(skipped.items())))
        self.showNewVersion(result["model"], self.ui.retrainStatusLabel, text)

    def showNewVersion(self, model, status_label, text):
        """A job wrote a new model version: list it, select it for Activate, say so."""
        self.refreshModels()
        ids = [self.ui.versionSelector.itemText(i) for i in range(self.ui.versionSelector.property("count"))]
        if model in ids:
            self.ui.versionSelector.setCurrentIndex(ids.index(model))
        status_label.setText(text)
        self.logBox.append(text, stamp=True)

    def onFinetuneButton(self, *args):
        p = self._parameterNode
        self.startJob("finetune", lambda: finetune.start_finetune(
            self.logic, base_model=p.finetuneBaseModel or None, output=p.finetuneOutput.strip() or None,
            steps=int(p.finetuneSteps), replay_cases=p.finetuneReplayCases, synthetic=float(p.finetuneSynthetic)),
            _("Fine-tuning: starting..."), f"fine-tuning {p.finetuneBaseModel} ({p.finetuneSteps} steps)")

    def showFinetuneResult(self, out):
        result, table = out
        self.ui.finetuneTableView.setMRMLTableNode(table)
        self.showNewVersion(result["model"], self.ui.finetuneStatusLabel, finetune.result_text(result))

    def onTrainSegmenterButton(self, *args):
        p = self._parameterNode
        if self.startJob("segmenter", lambda: self.logic.start_segmenter_training(
                str(p.segmenterImages), p.segmenterOutput.strip(), minutes=float(p.segmenterMinutes)),
                _("Segmenter training: loading cases...")):
            self.segJobRegister = p.registerName.strip()

    def finishSegmenter(self, job):
        return job, self.logic.finish_segmenter_training(job, register=self.segJobRegister or None,
                                                         base_model=self._parameterNode.baseModel or None)

    def showSegmenterResult(self, out):
        job, card = out
        text = _("Segmenter written to {folder}.").format(folder=job.output)
        if card is not None:
            text += " " + _("Registered as {model}: retrain its classifier (Add ground truth) before activating it.").format(model=card.id)
            self.refreshModels()
        self.ui.segStatusLabel.setText(text)
        self.logBox.append(text, stamp=True)

    # --------------------------------------------------------------------------- poll
    def onPoll(self):
        finishers = {"retrain": (self.logic.finish_retrain, self.showRetrainResult),
                     "finetune": (lambda job: finetune.finish_finetune(self.logic, job), self.showFinetuneResult),
                     "segmenter": (self.finishSegmenter, self.showSegmenterResult)}
        for key, runner in self.runners.items():
            if runner.running:
                runner.poll(*finishers[key])
        if not any(r.running for r in self.runners.values()):
            self.pollTimer.stop()

    def updateButtons(self, *args):
        if not hasattr(self, "ui") or self._parameterNode is None or not self.runners:
            return
        p, ui = self._parameterNode, self.ui
        retraining, finetuning, training = (self.runners[k].running for k in ("retrain", "finetune", "segmenter"))
        haveDatabase = self.logic is not None and self.logic.store is not None
        haveModels = ui.baseModelSelector.property("count") > 0
        self.runners["retrain"].sync_button(((p.useFeedback and haveDatabase) or p.includeGroundTruth) and haveModels)
        self.runners["finetune"].sync_button(haveDatabase and haveModels)
        self.runners["segmenter"].sync_button(True)
        ui.gtDirectoryButton.setEnabled(p.includeGroundTruth and not retraining)
        for widget in (ui.baseModelSelector, ui.outputNameEdit, ui.foldsSpinBox, ui.useFeedbackCheckBox, ui.includeGtCheckBox):
            widget.setEnabled(not retraining)
        for widget in (ui.finetuneBaseSelector, ui.finetuneStepsSpinBox, ui.finetuneOutputEdit, ui.finetuneReplayEdit,
                       ui.finetuneSyntheticSpinBox):
            widget.setEnabled(not finetuning)
        for widget in (ui.databasePathEdit, ui.openDatabaseButton, ui.browseDatabaseButton, ui.rollbackButton):
            widget.setEnabled(not (retraining or finetuning))
        ui.activateButton.setEnabled(not (retraining or finetuning) and ui.versionSelector.property("count") > 0)
        for widget in (ui.trainImagesButton, ui.segOutputEdit, ui.minutesSpinBox, ui.registerNameEdit):
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

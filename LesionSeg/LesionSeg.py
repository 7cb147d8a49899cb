"""LesionSeg: find CT lesions, colour them by confidence, review them, export them.

Thin Slicer module: the widget binds the UI (``Resources/UI/LesionSeg.ui``) to the typed parameter
node (``LesionSegLib/parameters.py``) and to the logic in ``LesionSegLib`` (MRML, no Qt), and runs
the engine in a background process.  Shared widget helpers (log box, shortcuts, reload) are in
``LesionSegLib/widget_support.py``.

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
import vtk
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

from LesionSegLib import dependencies, mrml, review, sampledata
from LesionSegLib.logic import LesionSegLogicCore
from LesionSegLib.parameters import LesionSegParameterNode
from LesionSegLib.selftest import LesionSegTest  # noqa: F401 (Slicer runs <Module>Test from this module)
from LesionSegLib.panel_sync import confirm_replace, ensure_table, export_text, follow_parameters, show_result_parameters, volume_missing
from LesionSegLib.widget_support import (AddLesionTool, DependencyInstaller, LogBox, SegmentWatch, Shortcuts, panel_feedback_store,
                                         reload_package, save_corrections_from_panel, save_corrections_on_close, style_color_bar, table_lesion_ids)

log = logging.getLogger("LesionSeg")


#
# LesionSeg
#
class LesionSeg(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("LesionSeg")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = []
        self.parent.contributors = ["LesionSeg developers"]
        self.parent.helpText = _(
            "Finds lesions in a CT volume and gives each a confidence that it is a true lesion. "
            "Each lesion becomes a segment coloured by confidence; review them in the lesion table "
            "(A accept, R reject, U unsure, N/P next/previous, in the chosen review order) and export them "
            "as .seg.nrrd, NIfTI, CSV or DICOM SEG. A saved scene reopens with its review. Add lesion adds a missed "
            "lesion from one click in a slice view; corrections are saved for fine-tuning. ") + mrml.colormap_description() + \
            _(' See the <a href="{url}">documentation</a>.').format(url="https://github.com/LesionSeg/SlicerLesionSeg#readme")
        self.parent.acknowledgementText = _(
            "LesionSeg developers. Built on 3D Slicer, MONAI, PyTorch, connected-components-3d, "
            "SimpleITK, slicerio and highdicom. Sample CT: IBSI soft-tissue sarcoma set (TCIA, CC BY 3.0).")
        app = getattr(slicer, "app", None)
        if hasattr(app, "connect"):  # in Slicer: register the sample once the application is up
            app.connect("startupCompleted()", sampledata.register)


#
# LesionSegWidget
#
class LesionSegWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None):
        # state first: without a parent, the base class calls setup() from its constructor
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._guiTag = None
        self.runner = self.runVolume = None
        self.runStarted = 0.0
        self.segmentationNode = self.currentLesion = None
        self.cudaAvailable, self.deviceMessage = False, ""
        self._selecting = False
        ScriptedLoadableModuleWidget.__init__(self, parent)

    # ---------------------------------------------------------------------------- setup
    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/LesionSeg.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        for selector in (self.ui.inputVolumeSelector, self.ui.resultSelector):
            selector.setMRMLScene(slicer.mrmlScene)
        self.ui.resultSelector.addAttribute("vtkMRMLSegmentationNode", mrml.ATTR_ROLE, "segmentation")

        self.logic = LesionSegLogic()
        self.logBox = LogBox(self.ui.logTextEdit, self.ui.logCollapsibleButton)
        self.addLesionTool = AddLesionTool(self)
        self.segmentWatch = SegmentWatch(self)  # segments removed or added outside the panel
        self.shortcuts = Shortcuts([("A", lambda: self.onReview("accepted")), ("R", lambda: self.onReview("rejected")),
                                    ("U", lambda: self.onReview("unsure")), ("N", lambda: self.onStep(+1)),
                                    ("P", lambda: self.onStep(-1))], self.parent)
        self.pollTimer = qt.QTimer()
        self.pollTimer.setInterval(150)
        self.pollTimer.timeout.connect(self.onPoll)

        self.ui.modelSelector.currentIndexChanged.connect(self.onModelChanged)
        self.ui.segmentButton.clicked.connect(self.onSegmentButton)
        self.ui.lesionTableView.clicked.connect(lambda index: self.selectLesionFromRow(index.row()) if index.isValid() else None)
        self.ui.lesionTableView.selectionModel().currentRowChanged.connect(self.onTableCurrentRowChanged)
        for button, decision in ((self.ui.acceptButton, "accepted"), (self.ui.rejectButton, "rejected"), (self.ui.unsureButton, "unsure")):
            button.clicked.connect(lambda *a, d=decision: self.onReview(d))
        self.ui.nextButton.clicked.connect(lambda *a: self.onStep(+1))
        self.ui.previousButton.clicked.connect(lambda *a: self.onStep(-1))
        self.ui.saveCorrectionsButton.clicked.connect(lambda *a: save_corrections_from_panel(self))
        self.ui.addLesionButton.clicked.connect(self.addLesionTool.toggle)
        for button, formats in ((self.ui.exportSegNrrdButton, ("seg.nrrd",)), (self.ui.exportNiftiButton, ("nifti",)),
                                (self.ui.exportCsvButton, ("csv",)), (self.ui.exportDicomSegButton, ("dicomseg",)),
                                (self.ui.exportAllButton, ("seg.nrrd", "nifti", "csv", "dicomseg"))):
            button.clicked.connect(lambda *a, f=formats: self.onExport(f))

        self.ui.progressBar.setVisible(False)
        style_color_bar(self.ui.colorBarLabel, self.ui.acceptedSwatchLabel, self.ui.rejectedSwatchLabel)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.initializeParameterNode()
        self.populateModels()
        self.updateDeviceStatus()
        self.installer = DependencyInstaller(self.logBox, self.ui.statusLabel, self.onDependenciesInstalled)
        if dependencies.resume_pending() is not None:  # an installation waited for this restart
            qt.QTimer.singleShot(0, self.installer.resume)
        self.updateGUI()

    def cleanup(self):
        self.cancelSegmentation(quiet=True)
        self.addLesionTool.cancel(quiet=True)
        self.shortcuts.remove()
        self.setParameterNode(None)
        self.removeObservers()
        if self.logic is not None:
            self.logic.disable_feedback_store()

    def enter(self):
        self.initializeParameterNode()
        self.shortcuts.install()

    def exit(self):
        self.shortcuts.remove()
        self.addLesionTool.cancel(quiet=True)

    def onReload(self):
        """Developer mode: re-import LesionSegLib (engine included), then Slicer reloads this file."""
        self.cleanup()
        reload_package("LesionSegLib")
        ScriptedLoadableModuleWidget.onReload(self)

    # -------------------------------------------------------------------- parameter node
    def initializeParameterNode(self):
        self.setParameterNode(self.logic.getParameterNode())
        p = self._parameterNode
        if p.inputVolume is None:
            first = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if first is not None and first.GetClassName() == "vtkMRMLScalarVolumeNode":
                p.inputVolume = first
        if p.resultSegmentation is None:
            results = mrml.lesion_segmentation_nodes()
            if results:
                p.resultSegmentation = results[-1]

    def setParameterNode(self, parameterNode):
        if self._parameterNode is not None:
            self._parameterNode.disconnectGui(self._guiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified)
        self._parameterNode = parameterNode
        if parameterNode is not None:
            self._guiTag = parameterNode.connectGui(self.ui)
            self.addObserver(parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified)
            self.onParameterNodeModified()

    def onParameterNodeModified(self, caller=None, event=None):
        p = self._parameterNode
        if p is None:
            return
        follow_parameters(self)  # input volume <-> result, threshold, order
        self.ui.oodWarningLabel.setText(p.oodWarning)
        self.ui.oodWarningLabel.setVisible(bool(p.oodWarning))
        self.updateGUI()

    # ------------------------------------------------------------------------- models
    def populateModels(self):
        self.ui.modelSelector.blockSignals(True)
        self.ui.modelSelector.clear()
        cards = self.logic.available_models()
        wanted = self._parameterNode.model if self._parameterNode is not None else ""
        active = self.logic.active_model_id()
        select = 0
        for i, card in enumerate(cards):
            self.ui.modelSelector.addItem(card.id, str(card.folder))
            if str(card.folder) == wanted or (not wanted and card.id == active):
                select = i
        self.ui.modelSelector.blockSignals(False)
        if cards:
            self.ui.modelSelector.setCurrentIndex(select)
        self.onModelChanged()

    def setModel(self, model):
        """Select a model by id, name or folder (a folder not in the registry is added to the list)."""
        try:
            card = self.logic.model_card(model)
        except Exception as exc:
            self.logBox.show_error(_("Cannot use model {model}: {error}").format(model=model, error=exc))
            return
        index = self.ui.modelSelector.findData(str(card.folder))
        if index < 0:
            self.ui.modelSelector.addItem(card.id, str(card.folder))
            index = self.ui.modelSelector.property("count") - 1
        self.ui.modelSelector.setCurrentIndex(index)

    def currentModel(self):
        index = self.ui.modelSelector.property("currentIndex")
        return self.ui.modelSelector.itemData(index) if index is not None and index >= 0 else None

    def onModelChanged(self, *args):
        model = self.currentModel()
        if model is None:
            self.ui.modelCardLabel.setText(_("No model found: register one in the LesionSeg model folder."))
        else:
            try:
                card = self.logic.model_card(model)
                self.ui.modelCardLabel.setText(card.summary())
                if self._parameterNode is not None:
                    self._parameterNode.model = str(card.folder)
                    if self.segmentationNode is None:
                        self._parameterNode.threshold = float(card.data.get("confidence_threshold", 0.5))
            except Exception as exc:
                self.ui.modelCardLabel.setText(_("Model cannot be used: {error}").format(error=exc))
        self.updateGUI()

    def onDependenciesInstalled(self):
        self.populateModels()
        self.updateDeviceStatus()

    # ------------------------------------------------------------------------- device
    def currentDevice(self):
        return self._parameterNode.device if self._parameterNode is not None else "auto"

    def updateDeviceStatus(self):
        self.cudaAvailable, self.deviceMessage = dependencies.cuda_status()
        self.updateGUI()

    # -------------------------------------------------------------------------- state
    def onSceneStartClose(self, caller=None, event=None):
        save_corrections_on_close(self)  # asks first; never stops the close
        self.addLesionTool.cancel(quiet=True)
        self.ui.statusLabel.setText("")  # nothing said about the scene that is closing outlives it
        self.cancelSegmentation(reason=_("the scene was closed"))
        self.setParameterNode(None)
        self.setSegmentationNode(None)

    def onSceneEndClose(self, caller=None, event=None):
        if self.parent.isVisible():
            self.initializeParameterNode()

    def segmentationValid(self):
        node = self.segmentationNode
        if node is not None and not slicer.mrmlScene.IsNodePresent(node):
            self.setSegmentationNode(None)
        ensure_table(self)  # a deleted table node is rebuilt
        return self.segmentationNode is not None

    def updateGUI(self):
        if not hasattr(self, "ui"):
            return
        running = self.runner is not None
        volume = self._parameterNode.inputVolume if self._parameterNode is not None else None
        cudaMissing = self.currentDevice() == "cuda" and not self.cudaAvailable
        self.ui.segmentButton.setEnabled(running or (volume is not None and self.currentModel() is not None and not cudaMissing))
        self.ui.segmentButton.setText(_("Cancel") if running else _("Segment"))
        if cudaMissing:
            self.ui.deviceStatusLabel.setText(_("CUDA was chosen but is not available on this computer. {details}").format(details=self.deviceMessage))
            self.ui.deviceStatusLabel.setStyleSheet("color: #c0392b;")
        else:
            self.ui.deviceStatusLabel.setText(self.deviceMessage)
            self.ui.deviceStatusLabel.setStyleSheet("")
        haveResult = self.segmentationValid()
        haveLesion = haveResult and self.currentLesion is not None
        for button in (self.ui.acceptButton, self.ui.rejectButton, self.ui.unsureButton):
            button.setEnabled(haveLesion)
        for button in (self.ui.nextButton, self.ui.previousButton, self.ui.exportSegNrrdButton, self.ui.exportNiftiButton,
                       self.ui.exportCsvButton, self.ui.exportAllButton, self.ui.saveCorrectionsButton):
            button.setEnabled(haveResult)
        self.ui.exportDicomSegButton.setEnabled(haveResult and bool(self.dicomFiles()))
        self.ui.addLesionButton.setEnabled(haveResult or self.addLesionTool.active)
        volume_missing(self)  # what needs the result's scan waits for it
        for widget in (self.ui.inputVolumeSelector, self.ui.modelSelector, self.ui.deviceSelector):
            widget.setEnabled(not running)
        if haveResult:
            reviewed, total = mrml.review_progress(self.segmentationNode)
            self.ui.reviewCounterLabel.setText(_("{reviewed} of {total} reviewed").format(reviewed=reviewed, total=total))
        else:
            self.ui.reviewCounterLabel.setText("")

    def dicomFiles(self):
        return self.logic.result_dicom_files(self.segmentationNode)

    # ------------------------------------------------------------------------ segment
    def onSegmentButton(self, *args):
        if self.runner is not None:
            self.cancelSegmentation()
            return
        volume = self._parameterNode.inputVolume
        if volume is None or not self.installer.ensure():
            return
        if self.currentDevice() == "cuda" and not self.cudaAvailable:
            self.logBox.show_error(_("CUDA is not available on this computer: choose 'auto' or 'cpu'."))
            return
        try:
            self.runner = self.logic.start_background(volume, model=self.currentModel(), device=self.currentDevice())
        except Exception as exc:
            self.runner = None
            self.ui.statusLabel.setText(_("Segmentation not started."))
            self.logBox.show_error(_("Cannot start the segmentation: {error}").format(error=exc))
            return
        self.runVolume = volume
        self.runStarted = time.monotonic()
        self._stagesLogged = 0
        self.logBox.append(f"segmenting '{volume.GetName()}' with {os.path.basename(str(self.currentModel()))} on {self.currentDevice()}", stamp=True)
        self.ui.progressBar.setValue(0)
        self.ui.progressBar.setVisible(True)
        self.ui.statusLabel.setText(_("Segmenting '{name}'...").format(name=volume.GetName()))
        self.pollTimer.start()
        self.updateGUI()

    def onPoll(self):
        runner = self.runner
        if runner is None:
            self.pollTimer.stop()
            return
        runner.poll()
        self.logBox.append(runner.new_lines())
        for stage in runner.stages[self._stagesLogged:]:  # every stage, also those passed between two polls
            self.logBox.append(f"stage: {stage}", stamp=True)
        self._stagesLogged = len(runner.stages)
        percent = int(round(100 * runner.fraction))
        self.ui.progressBar.setValue(percent)
        if runner.state == "running":
            self.ui.statusLabel.setText(_("{stage}... {percent}%  ({seconds:.0f} s)").format(
                stage=runner.stage.capitalize() if runner.stage else _("Starting"), percent=percent, seconds=time.monotonic() - self.runStarted))
            return
        self.pollTimer.stop()
        self.runner = None
        self.ui.progressBar.setVisible(False)
        if runner.state == "finished" and not slicer.mrmlScene.IsNodePresent(self.runVolume):
            runner.cleanup()
            self.ui.statusLabel.setText(_("Segmentation discarded: volume '{name}' was removed from the scene while it ran.").format(
                name=self.runVolume.GetName()))
        elif runner.state == "finished":
            try:
                segNode, _table = self.logic.finish_background(runner, self.runVolume, threshold=self._parameterNode.threshold)
            except Exception as exc:
                runner.cleanup()
                self.ui.statusLabel.setText(_("Segmentation failed."))
                self.logBox.show_error(_("Cannot load the segmentation result: {error}").format(error=exc))
            else:
                self._parameterNode.resultSegmentation = segNode
                total, shown = len(mrml.lesions(segNode)), len(mrml.visible_lesions(segNode))
                device = (runner.done_event or {}).get("device", runner.device)
                message = _("{total} lesion candidate(s), {shown} at or above the threshold; {seconds:.0f} s on {device}.").format(
                    total=total, shown=shown, seconds=time.monotonic() - self.runStarted, device=device)
                self.ui.statusLabel.setText((message + " " + " ".join(runner.notes)).strip())
                self.logBox.append(message, stamp=True)
        else:
            runner.cleanup()
            self.ui.statusLabel.setText(_("Segmentation failed: {error}").format(error=runner.error))
            self.logBox.show_error(_("Segmentation failed: {error}").format(error=runner.error))
        self.runVolume = None
        self.updateGUI()

    def cancelSegmentation(self, quiet=False, reason=""):
        if self.runner is None:
            return
        self.pollTimer.stop()
        runner, self.runner = self.runner, None
        runner.cancel()
        self.runVolume = None
        self.ui.progressBar.setVisible(False)
        if not quiet:
            self.ui.statusLabel.setText(_("Segmentation cancelled: {reason}.").format(reason=reason) if reason else _("Segmentation cancelled."))
            self.logBox.append(f"segmentation cancelled{': ' + reason if reason else ''}", stamp=True)
        self.updateGUI()

    # ------------------------------------------------------------------------- result
    def setSegmentationNode(self, node):
        """Show ``node`` (a LesionSeg result, e.g. from a reopened scene) in the panel."""
        self.addLesionTool.cancel(quiet=True)
        self.segmentationNode = node
        self.segmentWatch.watch(node)
        self.currentLesion = None
        table = None
        if node is not None:
            table = self.logic.reopen(node)
            show_result_parameters(self, node)  # the panel follows the result's threshold, order and scan
            volume = mrml.reference_volume(node)
            if volume is not None and getattr(slicer.app, "layoutManager", lambda: None)() is not None:
                slicer.util.setSliceViewerLayers(background=volume, fit=True)
        self.ui.lesionTableView.setMRMLTableNode(table)
        self.ui.currentLesionLabel.setText(_("No lesion selected."))
        self.updateGUI()

    # ---------------------------------------------------------------------- selection
    def tableOrder(self):
        """Lesion ids in the order the table shows them (the review queue)."""
        return table_lesion_ids(self.ui.lesionTableView)

    def onTableCurrentRowChanged(self, current, previous=None):
        if not self._selecting and current is not None and current.isValid():
            self.selectLesionFromRow(current.row())

    def selectLesionFromRow(self, row):
        order = self.tableOrder()
        if 0 <= row < len(order):
            self.selectLesion(order[row], updateTable=False)

    def selectLesion(self, lesionId, updateTable=True):
        if not self.segmentationValid() or lesionId is None:
            return
        self.currentLesion = int(lesionId)
        order = self.tableOrder()
        if updateTable and self.currentLesion in order:
            self._selecting = True
            try:
                self.ui.lesionTableView.selectRow(order.index(self.currentLesion))
            finally:
                self._selecting = False
        try:
            self.logic.jump_to_lesion(self.segmentationNode, self.currentLesion)
        except Exception as exc:
            log.warning("cannot centre the views on lesion %s: %s", lesionId, exc)
        info = mrml.lesion_info(mrml.find_segment(self.segmentationNode, self.currentLesion)[1])
        self.ui.currentLesionLabel.setText(_("{name}: {volume_ml:.2f} ml, {diameter_mm:.1f} mm, {review}").format(**info))
        self.updateGUI()

    def onStep(self, step):
        if self.segmentationValid():
            self.selectLesion(mrml.neighbour_lesion(self.tableOrder(), self.currentLesion, step))

    # ------------------------------------------------------------------------- review
    def onReview(self, decision):
        if not self.segmentationValid() or self.currentLesion is None:
            self.ui.statusLabel.setText(_("Select a lesion in the table first."))
            return
        panel_feedback_store(self)  # the decision also goes to the feedback store when "Record feedback" is on
        lesionId = self.currentLesion
        try:
            self.logic.review(self.segmentationNode, lesionId, decision)
        except KeyError:  # the lesion's segment is gone: the table follows, the status line says so
            return self.segmentWatch.changed()
        except RuntimeError as exc:  # a sink failed; the scene has the decision
            slicer.util.warningDisplay(str(exc))
        self.ui.statusLabel.setText(_("Lesion {id}: {decision}.").format(id=lesionId, decision=decision))
        reviewed = {d["lesion_id"] for d in mrml.lesions(self.segmentationNode) if d["review"] != "unreviewed"}
        nextLesion = review.next_unreviewed(self.tableOrder(), reviewed, lesionId) if self._parameterNode.autoAdvance else None
        if self._parameterNode.autoAdvance and nextLesion is None:
            self.ui.statusLabel.setText(_("Lesion {id}: {decision}. Every lesion is reviewed.").format(id=lesionId, decision=decision))
        self.selectLesion(nextLesion if nextLesion is not None else lesionId)

    # ------------------------------------------------------------------------- export
    def onExport(self, formats):
        if not self.segmentationValid():
            return
        outdir = str(self._parameterNode.outputDirectory)
        formats = [f for f in formats if f != "dicomseg" or self.dicomFiles()]
        if not confirm_replace(self, outdir, formats):
            return None
        notes = []
        try:
            paths = self.logic.export(self.segmentationNode, outdir, formats=formats, dicom_files=self.dicomFiles() or None, notes=notes)
        except Exception as exc:
            self.ui.statusLabel.setText(_("Export failed."))
            self.logBox.show_error(_("Export failed: {error}").format(error=exc))
            return
        text = export_text(paths, outdir, notes)
        self.ui.statusLabel.setText(text)
        self.logBox.append(text, stamp=True)
        return paths


#
# LesionSegLogic
#
class LesionSegLogic(ScriptedLoadableModuleLogic, LesionSegLogicCore):
    """Headless module logic; see ``LesionSegLib.logic.LesionSegLogicCore``."""

    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)
        LesionSegLogicCore.__init__(self)

    def getParameterNode(self):
        return LesionSegParameterNode(super().getParameterNode())

"""LesionSeg: find CT lesions, colour them by confidence, review them, export them.

Thin Slicer module: the widget binds the UI (``Resources/UI/LesionSeg.ui``) to the logic in
``LesionSegLib`` (MRML, no Qt) and runs the engine in a background process.

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
from slicer.util import VTKObservationMixin

from LesionSegLib import dependencies, mrml
from LesionSegLib.logic import LesionSegLogicCore

log = logging.getLogger("LesionSeg")

#: QSettings key of the feedback database path, shared with the LesionSegTraining module
FEEDBACK_SETTINGS_KEY = "LesionSeg/FeedbackDatabase"


#
# LesionSeg
#
class LesionSeg(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "LesionSeg"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = []
        self.parent.contributors = ["LesionSeg developers"]
        self.parent.helpText = (
            "Finds lesions in a CT volume and gives each a confidence that it is a true lesion. "
            "Each lesion becomes a segment coloured by confidence; review them in the lesion table "
            "(A accept, R reject, U unsure, N/P next/previous) and export them as .seg.nrrd, NIfTI, CSV "
            "or DICOM SEG. " + mrml.colormap_description()
        )
        self.parent.acknowledgementText = (
            "LesionSeg developers. Built on 3D Slicer, MONAI, PyTorch, connected-components-3d, "
            "SimpleITK, slicerio and highdicom."
        )


#
# LesionSegWidget
#
class LesionSegWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    SHORTCUTS = (("A", "accepted"), ("R", "rejected"), ("U", "unsure"), ("N", +1), ("P", -1))

    def __init__(self, parent=None):
        # state first: without a parent, the base class calls setup() from its constructor
        VTKObservationMixin.__init__(self)
        self.logic = None
        self.runner = None
        self.runVolume = None
        self.runStarted = 0.0
        self.segmentationNode = None
        self.currentLesion = None
        self.cudaAvailable = False
        self.shortcuts = []
        self._selecting = False
        self._dicomCache = {}
        ScriptedLoadableModuleWidget.__init__(self, parent)

    # ---------------------------------------------------------------------------- setup
    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/LesionSeg.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.ui.inputVolumeSelector.setMRMLScene(slicer.mrmlScene)

        self.logic = LesionSegLogic()
        self.pollTimer = qt.QTimer()
        self.pollTimer.setInterval(150)
        self.pollTimer.timeout.connect(self.onPoll)

        self.ui.inputVolumeSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onInputVolumeChanged)
        self.ui.modelSelector.currentIndexChanged.connect(self.onModelChanged)
        self.ui.deviceSelector.currentIndexChanged.connect(self.onDeviceChanged)
        self.ui.thresholdSlider.connect("valueChanged(double)", self.onThresholdChanged)
        self.ui.segmentButton.clicked.connect(self.onSegmentButton)
        self.ui.lesionTableView.clicked.connect(self.onTableClicked)
        self.ui.lesionTableView.selectionModel().currentRowChanged.connect(self.onTableCurrentRowChanged)
        self.ui.acceptButton.clicked.connect(lambda *a: self.onReview("accepted"))
        self.ui.rejectButton.clicked.connect(lambda *a: self.onReview("rejected"))
        self.ui.unsureButton.clicked.connect(lambda *a: self.onReview("unsure"))
        self.ui.nextButton.clicked.connect(lambda *a: self.onStep(+1))
        self.ui.previousButton.clicked.connect(lambda *a: self.onStep(-1))
        self.ui.exportSegNrrdButton.clicked.connect(lambda *a: self.onExport(("seg.nrrd",)))
        self.ui.exportNiftiButton.clicked.connect(lambda *a: self.onExport(("nifti",)))
        self.ui.exportCsvButton.clicked.connect(lambda *a: self.onExport(("csv",)))
        self.ui.exportDicomSegButton.clicked.connect(lambda *a: self.onExport(("dicomseg",)))
        self.ui.exportAllButton.clicked.connect(lambda *a: self.onExport(("seg.nrrd", "nifti", "csv", "dicomseg")))

        self.ui.lesionTableView.sortByColumn(1, qt.Qt.DescendingOrder)  # highest confidence first
        self.ui.outputDirectoryButton.setProperty("directory", os.path.join(os.path.expanduser("~"), "LesionSeg"))
        self.ui.progressBar.setVisible(False)
        self.setupColorBar()
        self.populateModels()
        self.updateDeviceStatus()
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.installShortcuts()
        self.onInputVolumeChanged(self.ui.inputVolumeSelector.currentNode())
        self.updateButtons()

    def cleanup(self):
        self.cancelSegmentation(quiet=True)
        self.removeShortcuts()
        self.removeObservers()
        if self.logic is not None:
            self.logic.disable_feedback_store()

    def enter(self):
        self.installShortcuts()
        if self.ui.inputVolumeSelector.currentNode() is None and self.runner is None:
            first = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if first is not None and first.GetClassName() == "vtkMRMLScalarVolumeNode":
                self.ui.inputVolumeSelector.setCurrentNode(first)

    def exit(self):
        self.removeShortcuts()

    # ---------------------------------------------------------------------- shortcuts
    def shortcutParent(self):
        try:
            mainWindow = slicer.util.mainWindow()
        except Exception:
            mainWindow = None
        return mainWindow if mainWindow is not None else self.parent

    def installShortcuts(self):
        if self.shortcuts:
            return
        parent = self.shortcutParent()
        for key, action in self.SHORTCUTS:
            shortcut = qt.QShortcut(qt.QKeySequence(key), parent)
            if isinstance(action, str):
                shortcut.activated.connect(lambda decision=action: self.onReview(decision))
            else:
                shortcut.activated.connect(lambda step=action: self.onStep(step))
            self.shortcuts.append(shortcut)

    def removeShortcuts(self):
        for shortcut in self.shortcuts:
            shortcut.setParent(None)
            shortcut.deleteLater()
        self.shortcuts = []

    # -------------------------------------------------------------------- colour bar
    def setupColorBar(self):
        from LesionSegLib.engine.segment.colors import ACCEPTED_COLOR, CONFIDENCE_STOPS, REJECTED_COLOR

        def rgb(c):
            return "rgb({}, {}, {})".format(*[int(round(255 * v)) for v in c])

        stops = ", ".join(f"stop:{pos:.2f} {rgb(color)}" for pos, color in CONFIDENCE_STOPS)
        self.ui.colorBarLabel.setStyleSheet(
            f"background: qlineargradient(x1:0, y1:0, x2:1, y2:0, {stops}); border: 1px solid #555;")
        self.ui.colorBarLabel.setToolTip(mrml.colormap_description())
        for label, color in ((self.ui.acceptedSwatchLabel, ACCEPTED_COLOR), (self.ui.rejectedSwatchLabel, REJECTED_COLOR)):
            label.setStyleSheet(f"background: {rgb(color)}; color: black; padding: 1px 4px;")

    # ------------------------------------------------------------------------- models
    def populateModels(self):
        self.ui.modelSelector.clear()
        cards = self.logic.available_models()
        active = self.logic.active_model_id()
        select = 0
        for i, card in enumerate(cards):
            self.ui.modelSelector.addItem(card.id, str(card.folder))
            if card.id == active or (card.name == active and select == 0):
                select = i
        if cards:
            self.ui.modelSelector.setCurrentIndex(select)
        self.onModelChanged()

    def setModel(self, model):
        """Select a model by id, name or folder (a folder not in the registry is added to the list)."""
        try:
            card = self.logic.model_card(model)
        except Exception as exc:
            slicer.util.errorDisplay(f"Cannot use model {model}: {exc}")
            return
        for i in range(self.ui.modelSelector.property("count")):
            if self.ui.modelSelector.itemData(i) == str(card.folder):
                self.ui.modelSelector.setCurrentIndex(i)
                return
        self.ui.modelSelector.addItem(card.id, str(card.folder))
        self.ui.modelSelector.setCurrentIndex(self.ui.modelSelector.property("count") - 1)

    def currentModel(self):
        index = self.ui.modelSelector.property("currentIndex")
        return self.ui.modelSelector.itemData(index) if index is not None and index >= 0 else None

    def onModelChanged(self, *args):
        model = self.currentModel()
        if model is None:
            self.ui.modelCardLabel.setText("No model found: register one in the LesionSeg model folder.")
        else:
            try:
                card = self.logic.model_card(model)
                self.ui.modelCardLabel.setText(card.summary())
                if self.segmentationNode is None:
                    self.ui.thresholdSlider.setValue(float(card.data.get("confidence_threshold", 0.5)))
            except Exception as exc:
                self.ui.modelCardLabel.setText(f"Model cannot be used: {exc}")
        self.updateButtons()

    # ------------------------------------------------------------------------- device
    def currentDevice(self):
        return self.ui.deviceSelector.property("currentText") or "auto"

    def updateDeviceStatus(self):
        self.cudaAvailable, message = dependencies.cuda_status()
        self.deviceMessage = message
        self.onDeviceChanged()

    def onDeviceChanged(self, *args):
        message = getattr(self, "deviceMessage", "")
        if self.currentDevice() == "cuda" and not self.cudaAvailable:
            self.ui.deviceStatusLabel.setText("CUDA was chosen but is not available on this computer. " + message)
            self.ui.deviceStatusLabel.setStyleSheet("color: #c0392b;")
        else:
            self.ui.deviceStatusLabel.setText(message)
            self.ui.deviceStatusLabel.setStyleSheet("")
        self.updateButtons()

    # -------------------------------------------------------------------------- state
    def onInputVolumeChanged(self, node=None):
        self.updateButtons()

    def onSceneStartClose(self, caller=None, event=None):
        self.cancelSegmentation(quiet=True)
        self.setSegmentationNode(None)
        if self.logic is not None:
            self.logic.forget()

    def segmentationValid(self):
        node = self.segmentationNode
        if node is not None and not slicer.mrmlScene.IsNodePresent(node):
            self.setSegmentationNode(None)
        return self.segmentationNode is not None

    def updateButtons(self):
        running = self.runner is not None
        volume = self.ui.inputVolumeSelector.currentNode()
        canRun = volume is not None and self.currentModel() is not None and not (self.currentDevice() == "cuda" and not self.cudaAvailable)
        self.ui.segmentButton.setEnabled(running or canRun)
        self.ui.segmentButton.setText("Cancel" if running else "Segment")
        haveResult = self.segmentationValid()
        haveLesion = haveResult and self.currentLesion is not None
        for button in (self.ui.acceptButton, self.ui.rejectButton, self.ui.unsureButton):
            button.setEnabled(haveLesion)
        for button in (self.ui.nextButton, self.ui.previousButton):
            button.setEnabled(haveResult)
        for button in (self.ui.exportSegNrrdButton, self.ui.exportNiftiButton, self.ui.exportCsvButton, self.ui.exportAllButton):
            button.setEnabled(haveResult)
        self.ui.exportDicomSegButton.setEnabled(haveResult and bool(self.dicomFiles()))
        for widget in (self.ui.inputVolumeSelector, self.ui.modelSelector, self.ui.deviceSelector):
            widget.setEnabled(not running)

    def dicomFiles(self):
        if not self.segmentationValid():
            return []
        volume = mrml.reference_volume(self.segmentationNode)
        if volume is None:
            return []
        key = volume.GetID()
        if key not in self._dicomCache:
            try:
                self._dicomCache[key] = self.logic.dicom_source_files(volume)
            except Exception as exc:
                log.warning("cannot list DICOM source files: %s", exc)
                self._dicomCache[key] = []
        return self._dicomCache[key]

    # ------------------------------------------------------------------------ segment
    def checkDependencies(self):
        missing = dependencies.missing()
        if not missing:
            return True
        text = (f"LesionSeg needs these Python packages, which are not installed in Slicer: {dependencies.describe(missing)}.\n\n"
                "Install them now? This downloads several hundred MB and can take a few minutes.")
        if not slicer.util.confirmOkCancelDisplay(text, windowTitle="LesionSeg: install dependencies"):
            self.ui.statusLabel.setText("Segmentation needs " + dependencies.describe(missing) + ".")
            return False
        self.ui.statusLabel.setText("Installing " + dependencies.describe(missing) + "...")
        slicer.app.processEvents()
        try:
            dependencies.install(missing)
        except Exception as exc:
            slicer.util.errorDisplay(f"Installing the LesionSeg dependencies failed: {exc}")
            self.ui.statusLabel.setText("Dependencies are missing.")
            return False
        self.populateModels()
        self.updateDeviceStatus()
        return True

    def onSegmentButton(self, *args):
        if self.runner is not None:
            self.cancelSegmentation()
            return
        volume = self.ui.inputVolumeSelector.currentNode()
        if volume is None:
            return
        if not self.checkDependencies():
            return
        if self.currentDevice() == "cuda" and not self.cudaAvailable:
            slicer.util.errorDisplay("CUDA is not available on this computer: choose 'auto' or 'cpu'.")
            return
        try:
            self.runner = self.logic.start_background(volume, model=self.currentModel(), device=self.currentDevice())
        except Exception as exc:
            self.runner = None
            slicer.util.errorDisplay(f"Cannot start the segmentation: {exc}")
            return
        self.runVolume = volume
        self.runStarted = time.monotonic()
        self.ui.progressBar.setValue(0)
        self.ui.progressBar.setVisible(True)
        self.ui.statusLabel.setText(f"Segmenting '{volume.GetName()}'...")
        self.pollTimer.start()
        self.updateButtons()

    def onPoll(self):
        runner = self.runner
        if runner is None:
            self.pollTimer.stop()
            return
        runner.poll()
        self.ui.progressBar.setValue(int(round(100 * runner.fraction)))
        if runner.state == "running":
            stage = runner.stage or "starting"
            self.ui.statusLabel.setText(f"{stage.capitalize()}... {int(round(100 * runner.fraction))}%  ({time.monotonic() - self.runStarted:.0f} s)")
            return
        self.pollTimer.stop()
        self.runner = None
        self.ui.progressBar.setVisible(False)
        if runner.state == "finished":
            try:
                segNode, _ = self.logic.finish_background(runner, self.runVolume, threshold=self.thresholdValue())
            except Exception as exc:
                runner.cleanup()
                slicer.util.errorDisplay(f"Cannot load the segmentation result: {exc}")
                self.ui.statusLabel.setText("Segmentation failed.")
            else:
                self.setSegmentationNode(segNode)
                total = len(mrml.lesions(segNode))
                shown = len(mrml.visible_lesions(segNode))
                device = (runner.done_event or {}).get("device", runner.device)
                notes = " ".join(runner.notes)
                self.ui.statusLabel.setText(
                    f"{total} lesion candidate(s), {shown} at or above the threshold; {time.monotonic() - self.runStarted:.0f} s on {device}. {notes}".strip())
        else:
            runner.cleanup()
            self.ui.statusLabel.setText(f"Segmentation failed: {runner.error}")
            slicer.util.errorDisplay(f"Segmentation failed: {runner.error}")
        self.runVolume = None
        self.updateButtons()

    def cancelSegmentation(self, quiet=False):
        if self.runner is None:
            return
        self.pollTimer.stop()
        runner, self.runner = self.runner, None
        runner.cancel()
        self.runVolume = None
        self.ui.progressBar.setVisible(False)
        if not quiet:
            self.ui.statusLabel.setText("Segmentation cancelled.")
        self.updateButtons()

    # ------------------------------------------------------------------------- result
    def setSegmentationNode(self, node):
        self.segmentationNode = node
        self.currentLesion = None
        self._dicomCache = {}
        table = mrml.get_table_node(node) if node is not None else None
        self.ui.lesionTableView.setMRMLTableNode(table)
        self.ui.currentLesionLabel.setText("No lesion selected.")
        if node is not None:
            self.showInViews(node)
        self.updateButtons()

    def showInViews(self, node):
        volume = mrml.reference_volume(node)
        layoutManager = getattr(slicer.app, "layoutManager", lambda: None)()
        if volume is not None and layoutManager is not None:
            slicer.util.setSliceViewerLayers(background=volume, fit=True)

    def thresholdValue(self):
        return float(self.ui.thresholdSlider.property("value"))

    def onThresholdChanged(self, value=None):
        if not self.segmentationValid():
            return
        value = self.thresholdValue() if value is None else float(value)
        shown = self.logic.set_threshold(self.segmentationNode, value)
        total = len(mrml.lesions(self.segmentationNode))
        self.ui.statusLabel.setText(f"{shown} of {total} lesion(s) at or above confidence {value:.2f}.")
        if self.currentLesion is not None and self.currentLesion not in self.tableOrder():
            self.currentLesion = None
            self.ui.currentLesionLabel.setText("No lesion selected.")
        self.updateButtons()

    # ---------------------------------------------------------------------- selection
    def tableOrder(self):
        """Lesion ids in the order the table shows them (respects sorting)."""
        model = self.ui.lesionTableView.model()
        out = []
        for row in range(model.rowCount()):
            value = model.index(row, 0).data()
            try:
                out.append(int(float(value)))
            except (TypeError, ValueError):
                continue
        return out

    def onTableClicked(self, index):
        if index is None or not index.isValid():
            return
        self.selectLesionFromRow(index.row())

    def onTableCurrentRowChanged(self, current, previous=None):
        if self._selecting or current is None or not current.isValid():
            return
        self.selectLesionFromRow(current.row())

    def selectLesionFromRow(self, row):
        value = self.ui.lesionTableView.model().index(row, 0).data()
        try:
            lesionId = int(float(value))
        except (TypeError, ValueError):
            return
        self.selectLesion(lesionId, updateTable=False)

    def selectLesion(self, lesionId, updateTable=True):
        if not self.segmentationValid():
            return
        self.currentLesion = int(lesionId)
        if updateTable:
            order = self.tableOrder()
            if self.currentLesion in order:
                self._selecting = True
                try:
                    self.ui.lesionTableView.selectRow(order.index(self.currentLesion))
                finally:
                    self._selecting = False
        try:
            self.logic.jump_to_lesion(self.segmentationNode, self.currentLesion)
        except Exception as exc:
            log.warning("cannot centre the views on lesion %s: %s", lesionId, exc)
        self.updateCurrentLesionLabel()
        self.updateButtons()

    def updateCurrentLesionLabel(self):
        if self.currentLesion is None or not self.segmentationValid():
            self.ui.currentLesionLabel.setText("No lesion selected.")
            return
        _, segment = mrml.find_segment(self.segmentationNode, self.currentLesion)
        info = mrml.lesion_info(segment)
        self.ui.currentLesionLabel.setText(
            f"{info['name']}: {info['volume_ml']:.2f} ml, {info['diameter_mm']:.1f} mm, {info['review']}")

    def onStep(self, step):
        if not self.segmentationValid():
            return
        nxt = mrml.neighbour_lesion(self.tableOrder(), self.currentLesion, step)
        if nxt is not None:
            self.selectLesion(nxt)

    # ------------------------------------------------------------------------- review
    def onReview(self, decision):
        if not self.segmentationValid() or self.currentLesion is None:
            self.ui.statusLabel.setText("Select a lesion in the table first.")
            return
        if self.ui.feedbackCheckBox.property("checked"):
            try:
                store = self.logic.enable_feedback_store(self.feedbackDatabasePath())
                self.ui.feedbackCheckBox.setToolTip(f"Decisions are also recorded in {store.path}")
            except Exception as exc:
                self.ui.feedbackCheckBox.setChecked(False)
                slicer.util.warningDisplay(f"The feedback store cannot be opened; decisions stay in the scene and exports: {exc}")
        elif self.logic.feedback_store is not None:
            self.logic.disable_feedback_store()
        lesionId = self.currentLesion
        try:
            self.logic.review(self.segmentationNode, lesionId, decision)
        except RuntimeError as exc:  # a sink failed; the scene has the decision
            slicer.util.warningDisplay(str(exc))
        self.ui.statusLabel.setText(f"Lesion {lesionId}: {decision}.")
        order = self.tableOrder()
        if self.ui.autoAdvanceCheckBox.property("checked") and len(order) > 1:
            self.selectLesion(mrml.neighbour_lesion(order, lesionId, +1))
        else:
            self.selectLesion(lesionId)

    @staticmethod
    def feedbackDatabasePath():
        """The database chosen in LesionSeg Training (QSettings), or None for the default."""
        value = qt.QSettings().value(FEEDBACK_SETTINGS_KEY)
        return str(value) if value else None

    # ------------------------------------------------------------------------- export
    def onExport(self, formats):
        if not self.segmentationValid():
            return
        outdir = self.ui.outputDirectoryButton.property("directory")
        formats = [f for f in formats if f != "dicomseg" or self.dicomFiles()]
        try:
            paths = self.logic.export(self.segmentationNode, outdir, formats=formats, dicom_files=self.dicomFiles() or None)
        except Exception as exc:
            slicer.util.errorDisplay(f"Export failed: {exc}")
            return
        self.ui.statusLabel.setText("Exported " + ", ".join(os.path.basename(str(p)) for p in paths.values()) + f" to {outdir}")
        return paths


#
# LesionSegLogic
#
class LesionSegLogic(ScriptedLoadableModuleLogic, LesionSegLogicCore):
    """Headless module logic; see ``LesionSegLib.logic.LesionSegLogicCore``."""

    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)
        LesionSegLogicCore.__init__(self)


#
# LesionSegTest
#
class LesionSegTest(ScriptedLoadableModuleTest):
    """Segment a real CT, review, threshold and export.

    Data: ``$LESIONSEG_DATA/sts/STS_035/image.nii.gz`` (default ``<repo>/../shared/data``); in a
    real Slicer without that folder the CTChest sample is downloaded.  Model: the default one, or
    ``$LESIONSEG_TEST_MODEL``.
    """

    def setUp(self):
        slicer.mrmlScene.Clear(0)

    def runTest(self):
        self.setUp()
        self.test_LesionSeg_segment_review_export()

    def loadCT(self):
        here = os.path.dirname(os.path.abspath(__file__))
        root = os.environ.get("LESIONSEG_DATA", os.path.join(here, "..", "..", "shared", "data"))
        path = os.path.join(root, "sts", "STS_035", "image.nii.gz")
        if os.path.exists(path):
            return mrml.load_volume(path, "STS_035")
        try:
            import SampleData
        except ImportError:
            self.skipTest(f"no CT found at {path} and no SampleData module to download one")
        return SampleData.SampleDataLogic().downloadCTChest()

    def test_LesionSeg_segment_review_export(self):
        import tempfile

        import slicerio

        missing = dependencies.missing()
        if missing:  # a fresh Slicer: install the engine's packages first (no prompt in testing mode)
            self.delayDisplay("Installing " + dependencies.describe(missing))
            dependencies.install(missing)
        self.delayDisplay("Loading a CT")
        volume = self.loadCT()
        logic = LesionSegLogic()
        self.delayDisplay("Segmenting")
        segNode, table = logic.segment(volume, model=os.environ.get("LESIONSEG_TEST_MODEL") or None)
        records = mrml.lesions(segNode)
        self.assertEqual(segNode.GetSegmentation().GetNumberOfSegments(), len(records))
        self.assertIs(mrml.reference_volume(segNode), volume)
        self.assertIs(mrml.get_table_node(segNode), table)
        confidences = [d["confidence"] for d in records]
        self.assertEqual(confidences, sorted(confidences, reverse=True))

        mrml.set_threshold(segNode, 0.0)
        self.assertEqual(table.GetNumberOfRows(), len(records))
        mrml.set_threshold(segNode, 1.01)
        self.assertEqual(table.GetNumberOfRows(), 0)
        mrml.set_threshold(segNode, 0.0)
        if records:
            decision = logic.review(segNode, records[0]["lesion_id"], "accepted")
            self.assertEqual(decision.decision, "accepted")
            self.assertEqual(mrml.segment_status(segNode, records[0]["lesion_id"]), "completed")
            self.assertEqual(len(logic.recorder.log), 1)
        if len(records) > 1:
            logic.review(segNode, records[1]["lesion_id"], "rejected")
            self.assertEqual(mrml.segment_status(segNode, records[1]["lesion_id"]), "flagged")

        self.delayDisplay("Exporting")
        with tempfile.TemporaryDirectory() as outdir:
            paths = logic.export(segNode, outdir, formats=("seg.nrrd", "nifti", "csv"))
            seg = slicerio.read_segmentation(str(paths["seg.nrrd"]))
            self.assertEqual(len(seg["segments"]), len(records))
            if records:
                first = next(s for s in seg["segments"] if s["id"] == mrml.segment_id(records[0]["lesion_id"]))
                self.assertEqual(first["tags"]["LesionSeg.Review"], "accepted")
                self.assertEqual(first["status"], "completed")
            for p in paths.values():
                self.assertTrue(os.path.getsize(p) > 0)
        self.delayDisplay("Test passed")

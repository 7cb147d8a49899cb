"""The real ``LesionSeg/LesionSeg.py`` widget, offscreen under PySide6 (``qt_harness``).

Loads the .ui, clicks Segment (the engine CLI runs in a background process), selects a row,
clicks Accept, uses the keyboard shortcuts, moves the threshold, exports, cancels a run, and
saves a screenshot of the panel to ``Testing/artifacts/LesionSeg_panel.png``.  Also runs the
module's own ``LesionSegTest`` (the ScriptedLoadableModuleTest Slicer runs) on the shim.
"""
from __future__ import annotations

import importlib.util
import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from slicer_app_shim import MODULE_DIR, REPO, data_dir, default_model, ensure_module_path, slicer_app  # noqa: F401

pytest.importorskip("PySide6", reason="PySide6 is needed for the offscreen widget test")

ARTIFACTS = REPO / "Testing" / "artifacts"
CASE = "STS_003"  # 77x79x51 voxels; the default model finds the tumour plus low-confidence candidates here


def _import_module():
    """Import LesionSeg/LesionSeg.py as Slicer does (its folder on sys.path, module name LesionSeg)."""
    ensure_module_path()
    if "LesionSeg" in sys.modules and getattr(sys.modules["LesionSeg"], "__file__", None):
        return sys.modules["LesionSeg"]
    spec = importlib.util.spec_from_file_location("LesionSeg", MODULE_DIR / "LesionSeg.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["LesionSeg"] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def harness(slicer_app):
    os.environ["QT_QPA_PLATFORM"] = "offscreen"
    import qt_harness

    app = qt_harness.install()
    return app, qt_harness, _import_module()


@pytest.fixture
def widget(harness, slicer_app, data_dir, default_model, tmp_path, monkeypatch):
    from LesionSegLib import mrml

    _, qt_harness, module = harness
    import qt

    # the feedback database the widget uses: the QSettings key shared with LesionSegTraining
    qt.QSettings.setPath(qt.QSettings.IniFormat, qt.QSettings.UserScope, str(tmp_path / "settings"))
    qt.QSettings.setDefaultFormat(qt.QSettings.IniFormat)
    qt.QSettings().setValue(module.FEEDBACK_SETTINGS_KEY, str(tmp_path / "feedback.db"))
    monkeypatch.setenv("LESIONSEG_FEEDBACK", str(tmp_path / "unused.db"))
    slicer_app.reset()
    volume = mrml.load_volume(str(data_dir / "sts" / CASE / "image.nii.gz"), CASE)
    w = module.LesionSegWidget()  # no parent: like Slicer, the base class builds the panel and calls setup()
    w.parent.resize(640, 980)
    w.enter()
    w.setModel(str(default_model.folder))
    w.ui.deviceSelector.setCurrentIndex(w.ui.deviceSelector.findText("cpu"))
    w.ui.inputVolumeSelector.setCurrentNode(volume)
    w.ui.outputDirectoryButton.setProperty("directory", str(tmp_path / "export"))
    yield w, volume
    w.cleanup()
    w.parent.close()
    w.parent.deleteLater()
    slicer_app.reset()


@pytest.fixture
def bare_widget(harness, slicer_app):
    """The panel without a model or a volume (what a user sees before installing anything)."""
    _, _, module = harness
    slicer_app.reset()
    w = module.LesionSegWidget()
    yield w
    w.cleanup()
    w.parent.close()
    w.parent.deleteLater()
    slicer_app.reset()


def _click_row(view, row):
    from PySide6.QtCore import Qt
    from PySide6.QtTest import QTest

    rect = view.visualRect(view.model().index(row, 1))
    QTest.mouseClick(view.viewport(), Qt.LeftButton, Qt.NoModifier, rect.center())


def _segmentation_nodes(scene):
    return [scene.GetNthNodeByClass(i, "vtkMRMLSegmentationNode") for i in range(scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode"))]


def test_widget_segment_select_accept_export_screenshot(harness, widget, slicer_app, tmp_path):
    from PySide6.QtCore import Qt
    from PySide6.QtGui import QImage
    from PySide6.QtTest import QTest

    from LesionSegLib import mrml

    app, qt_harness, _ = harness
    w, volume = widget
    ui = w.ui
    assert ui.modelSelector.count() >= 1 and ui.modelCardLabel.text()
    assert "CUDA" in ui.deviceStatusLabel.text()
    assert ui.segmentButton.isEnabled() and ui.segmentButton.text() == "Segment"
    assert not ui.acceptButton.isEnabled()
    assert "qlineargradient" in ui.colorBarLabel.styleSheet()

    QTest.mouseClick(ui.segmentButton, Qt.LeftButton)
    assert ui.segmentButton.text() == "Cancel"
    assert not ui.inputVolumeSelector.isEnabled()
    seen = []
    assert qt_harness.wait_until(lambda: seen.append(ui.progressBar.value()) or w.runner is None, timeout=300), "segmentation did not finish"
    assert w.segmentationNode is not None, ui.statusLabel.text()
    assert ui.segmentButton.text() == "Segment"
    assert "lesion candidate" in ui.statusLabel.text()
    assert max(seen) > 0
    seg = w.segmentationNode
    assert mrml.reference_volume(seg) is volume
    records = mrml.lesions(seg)
    view = ui.lesionTableView
    assert view.model().rowCount() == len(mrml.visible_lesions(seg))  # at the model's default threshold
    # review every candidate: move the threshold to 0 (no recomputation)
    ui.thresholdSlider.setValue(0.0)
    visible = mrml.visible_lesions(seg)
    assert len(visible) == len(records) == view.model().rowCount()
    if not visible:
        pytest.skip("the model found no lesion candidate in this case")
    # the table is sorted by confidence, highest first
    confs = [float(view.model().index(r, 1).data()) for r in range(view.model().rowCount())]
    assert confs == sorted(confs, reverse=True)

    # select a row -> slice views centred on that lesion
    row = min(1, view.model().rowCount() - 1)
    _click_row(view, row)
    lesion_id = int(view.model().index(row, 0).data())
    assert w.currentLesion == lesion_id
    info = next(d for d in records if d["lesion_id"] == lesion_id)
    np.testing.assert_allclose(slicer_app.slice_center_ras("Red"), np.array(info["centroid_lps"]) * [-1, -1, 1], atol=1e-2)
    assert ui.acceptButton.isEnabled()

    # Accept -> status, table, recorder; auto-advance moves to the next row
    QTest.mouseClick(ui.acceptButton, Qt.LeftButton)
    assert mrml.segment_status(seg, lesion_id) == "completed"
    assert mrml.review_state(seg, lesion_id) == "accepted"
    status_col = [view.model().headerData(c, Qt.Horizontal) for c in range(view.model().columnCount())].index("Status")
    statuses = {int(view.model().index(r, 0).data()): view.model().index(r, status_col).data() for r in range(view.model().rowCount())}
    assert statuses[lesion_id] == "accepted"
    assert w.logic.recorder.log[-1].lesion_id == lesion_id and w.logic.recorder.log[-1].decision == "accepted"
    assert w.logic.feedback_store is not None and w.logic.feedback_store.count() == 1
    assert Path(w.logic.feedback_store.path) == tmp_path / "feedback.db"

    # keyboard: R rejects the (advanced) current lesion, P goes back, U marks unsure
    w.parent.show()
    w.parent.activateWindow()
    QTest.qWaitForWindowActive(w.parent, 2000)
    if len(visible) > 1:
        current = w.currentLesion
        assert current != lesion_id
        QTest.keyClick(w.parent, Qt.Key_R)
        assert mrml.review_state(seg, current) == "rejected"
        assert mrml.segment_status(seg, current) == "flagged"
        assert w.currentLesion != current  # auto-advance
        QTest.keyClick(w.parent, Qt.Key_P)
        assert w.currentLesion == current
    QTest.keyClick(w.parent, Qt.Key_N)
    QTest.keyClick(w.parent, Qt.Key_U)
    assert "unsure" in {mrml.review_state(seg, d["lesion_id"]) for d in visible}

    # threshold: hide everything, then show everything again (no recomputation)
    n_segments = seg.GetSegmentation().GetNumberOfSegments()
    ui.thresholdSlider.setValue(1.0)
    above = [d for d in records if d["confidence"] >= 1.0]
    assert view.model().rowCount() == len(above)
    ui.thresholdSlider.setValue(0.0)
    assert view.model().rowCount() == len(records) == n_segments
    assert seg.GetSegmentation().GetNumberOfSegments() == n_segments

    # export (not from DICOM: the DICOM SEG button is disabled)
    assert not ui.exportDicomSegButton.isEnabled()
    QTest.mouseClick(ui.exportAllButton, Qt.LeftButton)
    outdir = tmp_path / "export"
    assert sorted(p.name for p in outdir.iterdir()) == sorted([f"{CASE}.seg.nrrd", f"{CASE}_lesions.nii.gz", f"{CASE}_lesions.csv"])
    assert "Exported" in ui.statusLabel.text()

    # screenshot of the panel: every candidate, with the review decisions in colour and in the table
    _click_row(view, 0)
    QTest.qWait(200)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "LesionSeg_panel.png"
    pixmap = w.parent.grab()
    assert pixmap.save(str(shot))
    assert shot.stat().st_size > 10_000
    image = QImage(str(shot)).convertToFormat(QImage.Format_RGB32)
    assert image.width() >= 400 and image.height() >= 600
    ptr = image.constBits()
    pixels = np.frombuffer(ptr, dtype=np.uint8, count=image.sizeInBytes()).reshape(image.height(), image.bytesPerLine())
    colours = np.unique(pixels[:, : image.width() * 4].reshape(-1, 4)[:, :3], axis=0)
    assert len(colours) > 100  # text, table, colour bar: far from a blank panel


def test_widget_cancel_leaves_nothing(harness, widget, slicer_app):
    from PySide6.QtCore import Qt
    from PySide6.QtTest import QTest

    from LesionSegLib.runner import process_group_alive

    _, qt_harness, _ = harness
    w, volume = widget
    scene = volume.GetScene()
    before = scene.GetNumberOfNodes()
    QTest.mouseClick(w.ui.segmentButton, Qt.LeftButton)
    runner = w.runner
    assert runner is not None and runner.state == "running"
    pid, workdir = runner.proc.pid, runner.workdir
    qt_harness.wait_until(lambda: runner.stage != "" or runner.state != "running", timeout=60)
    QTest.mouseClick(w.ui.segmentButton, Qt.LeftButton)  # the button is Cancel now
    assert w.runner is None
    assert w.ui.segmentButton.text() == "Segment"
    assert "cancelled" in w.ui.statusLabel.text()
    assert not process_group_alive(pid)
    assert not workdir.exists()
    assert scene.GetNumberOfNodes() == before
    assert not _segmentation_nodes(scene)
    QTest.qWait(400)  # the poll timer is stopped: nothing appears later
    assert scene.GetNumberOfNodes() == before


def test_module_selftest_runs_on_shim(harness, slicer_app, data_dir, default_model, monkeypatch):
    """The module's own ScriptedLoadableModuleTest, as Slicer's 'Reload and Test' runs it."""
    _, _, module = harness
    monkeypatch.setenv("LESIONSEG_TEST_MODEL", str(default_model.folder))
    monkeypatch.setenv("LESIONSEG_DATA", str(data_dir))
    slicer_app.reset()
    t = time.perf_counter()
    case = module.LesionSegTest()
    case.runTest()
    assert time.perf_counter() - t < 240
    slicer_app.reset()


def test_module_metadata(harness):
    import types

    _, _, module = harness
    parent = types.SimpleNamespace()
    module.LesionSeg(parent)
    assert parent.title == "LesionSeg"
    assert parent.categories == ["Segmentation"]
    assert parent.contributors == ["LesionSeg developers"]
    assert "confidence" in parent.helpText


def test_dependency_install_flow(harness, bare_widget, monkeypatch):
    """Missing packages: the widget asks (confirmOkCancelDisplay), then installs torch through
    PyTorchUtils and the rest through slicer.util.pip_install."""
    import types

    import slicer

    from LesionSegLib import dependencies

    w = bare_widget
    calls = []
    monkeypatch.setattr(dependencies, "missing", lambda optional=False: ["torch", "monai", "cc3d"])
    monkeypatch.setattr(slicer.util, "confirmOkCancelDisplay", lambda text, **kw: calls.append(("confirm", text)) or True)
    monkeypatch.setattr(slicer.util, "pip_install", lambda reqs: calls.append(("pip", list(reqs))))

    class FakeTorchLogic:
        def installTorch(self, askConfirmation=False, torchVersionRequirement=None, **kw):
            calls.append(("torch", torchVersionRequirement))
            return types.SimpleNamespace(__version__="2.x")

    monkeypatch.setitem(sys.modules, "PyTorchUtils", types.SimpleNamespace(PyTorchUtilsLogic=FakeTorchLogic))
    assert w.checkDependencies() is True
    assert calls[0][0] == "confirm" and "monai" in calls[0][1] and "connected-components-3d" in calls[0][1]
    assert ("torch", dependencies.TORCH_REQUIREMENT) in calls
    assert ("pip", ["monai>=1.4", "connected-components-3d>=3.12"]) in calls

    # the user says no: nothing is installed and Segment does not start
    calls.clear()
    monkeypatch.setattr(slicer.util, "confirmOkCancelDisplay", lambda text, **kw: False)
    assert w.checkDependencies() is False
    assert not calls
    assert not w.ui.segmentButton.isEnabled()  # no input volume yet
    w.onSegmentButton()
    assert w.runner is None

    # no PyTorch extension: a clear error that says what to install
    monkeypatch.setitem(sys.modules, "PyTorchUtils", None)
    with pytest.raises(RuntimeError, match="PyTorch"):
        dependencies.install(["torch"])

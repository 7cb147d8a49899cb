"""The real ``LesionSeg/LesionSeg.py`` widget, offscreen under PySide6 (``qt_harness``).

Loads the .ui, binds the typed parameter node, clicks Segment (the engine CLI runs in a
background process, its stderr lands in the log box), reviews in the chosen order with buttons
and keys, watches the "n of m reviewed" counter, exports, switches results, reopens a saved
scene and reviews further, cancels a run, and saves a screenshot of the panel to
``Testing/artifacts/LesionSeg_panel.png``.  Also runs the module's own ``LesionSegTest`` on the
shim, and checks the shortcuts, reload, error dialogs and i18n.
"""
from __future__ import annotations


import importlib.util
import os
import re
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from slicer_app_shim import MODULE_DIR, REPO, data_dir, default_model, ensure_module_path, slicer_app  # noqa: F401

ARTIFACTS = REPO / "Testing" / "artifacts"
CASE = "STS_041"  # a validation case: the tumour plus a low-confidence candidate


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


def _make_widget(module, slicer_app, volume=None, model=None, tmp_path=None):
    w = module.LesionSegWidget()  # no parent: like Slicer, the base class builds the panel and calls setup()
    w.parent.resize(640, 1100)
    w.enter()
    if model is not None:
        w.setModel(str(model.folder))
    w.ui.deviceSelector.setCurrentIndex(w.ui.deviceSelector.findText("cpu"))
    if volume is not None:
        w.ui.inputVolumeSelector.setCurrentNode(volume)
    if tmp_path is not None:
        w.ui.outputDirectoryButton.setProperty("directory", str(tmp_path / "export"))
    return w


def _close(w):
    w.cleanup()
    w.parent.close()
    w.parent.deleteLater()


@pytest.fixture
def widget(harness, slicer_app, data_dir, default_model, tmp_path, monkeypatch):
    from LesionSegLib import mrml, settings

    _, _, module = harness
    monkeypatch.setenv("LESIONSEG_FEEDBACK", str(tmp_path / "unused.db"))
    slicer_app.reset()
    settings.set_feedback_database_path(tmp_path / "feedback.db")  # what the Training panel stores
    volume = mrml.load_volume(str(data_dir / "sts" / CASE / "image.nii.gz"), CASE)
    w = _make_widget(module, slicer_app, volume, default_model, tmp_path)
    yield w, volume
    _close(w)
    slicer_app.reset()


@pytest.fixture
def bare_widget(harness, slicer_app):
    """The panel without a model or a volume (what a user sees before installing anything)."""
    _, _, module = harness
    slicer_app.reset()
    w = module.LesionSegWidget()
    yield w
    _close(w)
    slicer_app.reset()


def _click_row(view, row):
    from PySide6.QtCore import Qt
    from PySide6.QtTest import QTest

    rect = view.visualRect(view.model().index(row, 1))
    QTest.mouseClick(view.viewport(), Qt.LeftButton, Qt.NoModifier, rect.center())


def _rows(view):
    model = view.model()
    return [[model.index(r, c).data() for c in range(model.columnCount())] for r in range(model.rowCount())]


def _segment(w, qt_harness):
    from PySide6.QtCore import Qt
    from PySide6.QtTest import QTest

    QTest.mouseClick(w.ui.segmentButton, Qt.LeftButton)
    assert w.ui.segmentButton.text() == "Cancel"
    seen = []
    assert qt_harness.wait_until(lambda: seen.append(w.ui.progressBar.value()) or w.runner is None, timeout=300), "segmentation did not finish"
    assert w.segmentationNode is not None, w.ui.statusLabel.text() + "\n" + w.ui.logTextEdit.toPlainText()
    return seen


def _key(w, key):
    from PySide6.QtTest import QTest

    QTest.keyClick(w.parent, key)


def test_widget_segment_review_export_screenshot(harness, widget, slicer_app, tmp_path):
    from PySide6.QtCore import Qt
    from PySide6.QtGui import QImage
    from PySide6.QtTest import QTest

    from LesionSegLib import mrml

    app, qt_harness, _ = harness
    w, volume = widget
    ui = w.ui
    p = w._parameterNode
    assert ui.modelSelector.count() >= 1 and ui.modelCardLabel.text()
    assert "CUDA" in ui.deviceStatusLabel.text()
    assert p.inputVolume is volume and p.device == "cpu"  # the GUI is bound to the parameter node
    assert ui.segmentButton.isEnabled() and ui.segmentButton.text() == "Segment"
    assert not ui.acceptButton.isEnabled()
    assert "qlineargradient" in ui.colorBarLabel.styleSheet()
    button = ui.addLesionButton  # shown, disabled until a result is shown (test_slicer_widget_corrections.py)
    assert button.isVisibleTo(w.parent) and not button.isEnabled() and button.isCheckable()
    assert not ui.saveCorrectionsButton.isEnabled()  # no result yet
    assert not ui.oodWarningLabel.isVisibleTo(w.parent)  # reserved: shown when a result has an OOD warning

    seen = _segment(w, qt_harness)
    assert ui.segmentButton.text() == "Segment" and max(seen) > 0
    assert "lesion candidate" in ui.statusLabel.text()
    seg = w.segmentationNode
    assert p.resultSegmentation is seg and ui.resultSelector.currentNode() is seg
    assert mrml.reference_volume(seg) is volume
    log_text = ui.logTextEdit.toPlainText()
    assert "stage: inference" in log_text and "lesion(s) ->" in log_text  # the engine's stderr is in the log box
    records = mrml.lesions(seg)
    assert len(records) >= 2, f"{CASE} must give at least 2 candidates at threshold 0"
    view = ui.lesionTableView
    assert view.model().rowCount() == len(mrml.visible_lesions(seg))  # at the model's default threshold
    ui.thresholdSlider.setValue(0.0)  # every candidate, nothing recomputed
    assert p.threshold == 0.0 and mrml.get_threshold(seg) == 0.0
    assert view.model().rowCount() == len(records)
    assert ui.reviewCounterLabel.text() == f"0 of {len(records)} reviewed"
    confs = [float(r[1]) for r in _rows(view)]
    assert confs == sorted(confs, reverse=True)  # confidence order
    # most uncertain first: the table and Next follow the queue
    ui.reviewOrderSelector.setCurrentIndex(ui.reviewOrderSelector.findText("uncertainty"))
    assert p.reviewOrder == "uncertainty" and mrml.get_review_order(seg) == "uncertainty"
    queue = mrml.review_queue(seg)
    assert [int(r[0]) for r in _rows(view)] == queue
    assert sorted(queue) == sorted(d["lesion_id"] for d in records)

    # select the second row -> slice views centred on that lesion
    _click_row(view, 1)
    lesion_id = queue[1]
    assert w.currentLesion == lesion_id
    info = next(d for d in records if d["lesion_id"] == lesion_id)
    np.testing.assert_allclose(slicer_app.slice_center_ras("Red"), np.array(info["centroid_lps"]) * [-1, -1, 1], atol=1e-2)
    assert ui.acceptButton.isEnabled()

    # Accept -> status, table, recorder, feedback store; auto-advance to the next unreviewed lesion
    QTest.mouseClick(ui.acceptButton, Qt.LeftButton)
    assert mrml.segment_status(seg, lesion_id) == "completed" and mrml.review_state(seg, lesion_id) == "accepted"
    status_col = [view.model().headerData(c, Qt.Horizontal) for c in range(view.model().columnCount())].index("Status")
    assert {int(r[0]): r[status_col] for r in _rows(view)}[lesion_id] == "accepted"
    last = w.logic.recorder.log[-1]
    assert (last.lesion_id, last.decision, last.queue_position, last.review_order) == (lesion_id, "accepted", 2, "uncertainty")
    assert w.logic.feedback_store is not None and w.logic.feedback_store.count() == 1
    assert Path(w.logic.feedback_store.path) == tmp_path / "feedback.db"
    assert ui.reviewCounterLabel.text() == f"1 of {len(records)} reviewed"
    assert w.currentLesion == next(i for i in queue[2:] + queue[:1])  # the next unreviewed one after it, wrapping

    # Save corrections: nothing was edited, so every shown proposal is saved as kept, with the image
    assert ui.saveCorrectionsButton.isEnabled() and ui.addLesionButton.isEnabled()
    QTest.mouseClick(ui.saveCorrectionsButton, Qt.LeftButton)
    assert ui.statusLabel.text().startswith("corrections saved:") and "kept" in ui.statusLabel.text()
    assert "corrections saved:" in ui.logTextEdit.toPlainText()

    # keyboard (installed on enter): R rejects the current lesion, P goes back, U marks unsure
    w.parent.show()
    w.parent.activateWindow()
    QTest.qWaitForWindowActive(w.parent, 2000)
    current = w.currentLesion
    _key(w, Qt.Key_R)
    assert mrml.review_state(seg, current) == "rejected" and mrml.segment_status(seg, current) == "flagged"
    after = w.currentLesion
    _key(w, Qt.Key_P)
    assert w.currentLesion == mrml.neighbour_lesion(queue, after, -1)
    target = w.currentLesion
    _key(w, Qt.Key_U)
    assert mrml.review_state(seg, target) == "unsure"
    reviewed = sum(d["review"] != "unreviewed" for d in mrml.lesions(seg))
    assert ui.reviewCounterLabel.text() == f"{reviewed} of {len(records)} reviewed"

    # threshold: hide everything, then show everything again (no recomputation)
    n_segments = seg.GetSegmentation().GetNumberOfSegments()
    ui.thresholdSlider.setValue(1.0)
    assert view.model().rowCount() == len([d for d in records if d["confidence"] >= 1.0])
    ui.thresholdSlider.setValue(0.0)
    assert view.model().rowCount() == len(records) == n_segments == seg.GetSegmentation().GetNumberOfSegments()

    # export (not from DICOM: the DICOM SEG button is disabled)
    assert not ui.exportDicomSegButton.isEnabled()
    QTest.mouseClick(ui.exportAllButton, Qt.LeftButton)
    outdir = tmp_path / "export"
    assert sorted(x.name for x in outdir.iterdir()) == sorted([f"{CASE}.seg.nrrd", f"{CASE}_lesions.nii.gz", f"{CASE}_lesions.csv"])
    assert "Exported" in ui.statusLabel.text() and "Exported" in ui.logTextEdit.toPlainText()

    # screenshot of the panel: every candidate, the review decisions in colour and in the table, the log open
    ui.logCollapsibleButton.setProperty("collapsed", False)
    _click_row(view, 0)
    QTest.qWait(200)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "LesionSeg_panel.png"
    assert w.parent.grab().save(str(shot))
    image = QImage(str(shot)).convertToFormat(QImage.Format_RGB32)
    assert image.width() >= 400 and image.height() >= 600
    pixels = np.frombuffer(image.constBits(), dtype=np.uint8, count=image.sizeInBytes()).reshape(image.height(), image.bytesPerLine())
    assert len(np.unique(pixels[:, : image.width() * 4].reshape(-1, 4)[:, :3], axis=0)) > 100  # far from a blank panel


def test_result_selector_and_saved_scene(harness, widget, slicer_app, tmp_path):
    """Two results in one scene: the selector switches the table; a saved .mrb reopens in the panel
    (parameter node, table rebuilt from tags) and the review continues with the keys."""
    from PySide6.QtCore import Qt

    from LesionSegLib import mrml
    from test_slicer_scene import _save_mrb

    app, qt_harness, module = harness
    w, volume = widget
    _segment(w, qt_harness)
    first = w.segmentationNode
    w.ui.thresholdSlider.setValue(0.0)
    second, _ = w.logic.add_result(volume, _result_of(first, volume), "h", threshold=0.9)
    assert w.ui.resultSelector.nodeCount() == 2  # the selector lists LesionSeg results only
    w.ui.resultSelector.setCurrentNode(second)
    assert w.segmentationNode is second and w._parameterNode.threshold == pytest.approx(0.9)
    w.ui.resultSelector.setCurrentNode(first)
    assert w.segmentationNode is first and w._parameterNode.threshold == 0.0
    _click_row(w.ui.lesionTableView, 0)
    decided = w.currentLesion
    w.onReview("rejected")
    w.ui.reviewOrderSelector.setCurrentIndex(w.ui.reviewOrderSelector.findText("size"))
    mrb = _save_mrb(slicer_app, tmp_path / "review.mrb")

    slicer_app.scene.Clear(False)
    assert w.segmentationNode is None and w.ui.lesionTableView.model().rowCount() == 0
    (tmp_path / "unpacked").mkdir()
    assert slicer_app.app_logic.OpenSlicerDataBundle(str(mrb), str(tmp_path / "unpacked"))
    w.enter()  # the user opens the module on the loaded scene
    seg = w.segmentationNode
    assert seg is not None and seg.GetName() == first.GetName(), "the saved result is shown again"
    assert w._parameterNode.reviewOrder == "size" and w._parameterNode.threshold == 0.0
    assert mrml.review_state(seg, decided) == "rejected"
    rows = {int(r[0]): r[-1] for r in _rows(w.ui.lesionTableView)}
    assert rows[decided] == "rejected" and len(rows) == len(mrml.lesions(seg))
    assert [int(r[0]) for r in _rows(w.ui.lesionTableView)] == mrml.review_queue(seg)
    w.parent.show()
    w.parent.activateWindow()
    _key(w, Qt.Key_N)
    current = w.currentLesion
    got = []
    sink = types.SimpleNamespace(record=got.append)  # the sinks (feedback store) get full decisions
    w.logic.recorder.add_sink(sink)
    try:
        _key(w, Qt.Key_A)
    finally:
        w.logic.recorder.remove_sink(sink)
    assert mrml.review_state(seg, current) == "accepted"
    assert got and got[-1].patch is not None  # the patch came back with the scene
    assert w.logic.recorder.log[-1].patch is None  # the session log keeps none (bounded memory, R6)


def _result_of(seg, volume):
    """An engine result holding the segments of ``seg`` (a second result for the selector test)."""
    from LesionSegLib import export, mrml
    from LesionSegLib.engine.segment.result import Lesion, SegmentationResult

    records = mrml.lesions(seg)
    labelmap = export.instance_labelmap(seg, [d["lesion_id"] for d in records], volume)
    lesions = [Lesion(d["lesion_id"], d["confidence"], d["volume_ml"], d["diameter_mm"], d["centroid_lps"], d["mean_probability"],
                      d["max_probability"], d["mean_hu"], d["n_voxels"], d["bbox_ijk"], d["features"], None) for d in records]
    return SegmentationResult(labelmap, lesions, mrml.volume_to_sitk(volume), "copy@1", 0.0)


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
    assert w.runner is None and w.ui.segmentButton.text() == "Segment"
    assert "cancelled" in w.ui.statusLabel.text() and "cancelled" in w.ui.logTextEdit.toPlainText()
    assert not process_group_alive(pid) and not workdir.exists()
    assert scene.GetNumberOfNodes() == before
    QTest.qWait(400)  # the poll timer is stopped: nothing appears later
    assert scene.GetNumberOfNodes() == before


def test_failed_run_shows_summary_and_full_log(harness, widget, monkeypatch, tmp_path):
    """A failing engine run: one-line summary in the dialog, the whole stderr as its detailed text."""
    import slicer

    _, qt_harness, _ = harness
    w, _ = widget
    shown = []
    monkeypatch.setattr(slicer.util, "errorDisplay", lambda text, **kw: shown.append((text, kw)))
    bad = tmp_path / "badmodel"
    (bad).mkdir()
    (bad / "card.json").write_text('{"name": "bad", "version": "1"}')
    w.ui.modelSelector.addItem("bad@1", str(bad))
    w.ui.modelSelector.setCurrentIndex(w.ui.modelSelector.count() - 1)
    w.onSegmentButton()
    assert qt_harness.wait_until(lambda: w.runner is None, timeout=120)
    assert len(shown) == 1
    text, kw = shown[0]
    assert text.startswith("Segmentation failed:") and "\n" not in text
    assert "error:" in kw["detailedText"] and kw["detailedText"] == w.ui.logTextEdit.toPlainText()
    assert not w.ui.logCollapsibleButton.property("collapsed")  # the log opens on an error


def test_shortcuts_only_while_shown(harness, bare_widget):
    w = bare_widget
    assert w.shortcuts.active == []  # built, not shown
    w.enter()
    assert sorted(s.key().toString() for s in w.shortcuts.active) == ["A", "N", "P", "R", "U"]
    w.exit()
    assert w.shortcuts.active == []


def test_setup_installs_no_shortcut(harness, slicer_app):
    _, _, module = harness
    slicer_app.reset()
    w = module.LesionSegWidget()
    try:
        assert w.shortcuts.active == []  # setup alone (module not shown) leaves Slicer's keys alone
    finally:
        _close(w)


RELOAD_SCRIPT = """
import os, sys
sys.path[:0] = [{testing!r}, {module_dir!r}]
os.environ["QT_QPA_PLATFORM"] = "offscreen"
import slicer_app_shim, qt_harness
slicer_app_shim.get_app()
qt_harness.install()
import LesionSeg
from LesionSegLib import review
from LesionSegLib.engine.segment import colors
w = LesionSeg.LesionSegWidget()
original = review.REVIEW_ORDERS
review.REVIEW_ORDERS = ("patched",)
colors.ACCEPTED_COLOR = (0.0, 0.0, 0.0)
w.onReload()
assert review.REVIEW_ORDERS == original, review.REVIEW_ORDERS  # LesionSegLib re-executed
import LesionSegLib.mrml as mrml
assert mrml.REVIEW_ORDERS == original, mrml.REVIEW_ORDERS  # names imported from it are fresh too
assert colors.ACCEPTED_COLOR == (0.10, 0.80, 0.25)  # engine subpackages too
assert w.reloadCount == 1  # then Slicer's own reload of the module file
print("reloaded")
"""


def test_reload_reimports_the_library(harness, tmp_path):
    """In a child process: reloading redefines every class of LesionSegLib, which must not leak
    into the other tests of this session."""
    import subprocess

    script = tmp_path / "reload.py"
    script.write_text(RELOAD_SCRIPT.format(testing=str(REPO / "Testing" / "Python"), module_dir=str(MODULE_DIR)))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "reloaded" in proc.stdout, proc.stderr[-3000:]


def test_module_selftest_runs_on_shim(harness, slicer_app, default_model, monkeypatch):
    """The module's own ScriptedLoadableModuleTest, as Slicer's 'Reload and Test' runs it, on the bundled sample."""
    import slicer

    _, _, module = harness
    monkeypatch.setenv("LESIONSEG_TEST_MODEL", str(default_model.folder))
    installs = []
    monkeypatch.setattr(slicer.util, "pip_install", lambda *a, **k: installs.append(a))
    slicer_app.reset()
    result = __import__("unittest").TestResult()
    module.LesionSegTest("test_LesionSeg_segment_review_export").run(result)
    assert result.wasSuccessful() and not result.skipped, (result.errors, result.failures, result.skipped)
    assert installs == []
    slicer_app.reset()


def test_module_selftest_skips_instead_of_installing(harness, slicer_app, monkeypatch):
    import types
    import unittest

    import slicer

    from LesionSegLib import dependencies

    _, _, module = harness
    missing = [dependencies.Problem(dependencies.Requirement("monai>=99"), "1.6.1")]
    monkeypatch.setattr(dependencies, "check", lambda optional=False: missing)
    calls = []
    monkeypatch.setattr(slicer.util, "pip_install", lambda *a, **k: calls.append(a))
    monkeypatch.setitem(sys.modules, "PyTorchUtils", types.SimpleNamespace(PyTorchUtilsLogic=lambda: calls.append("torch")))
    result = unittest.TestResult()
    module.LesionSegTest("test_LesionSeg_segment_review_export").run(result)
    assert len(result.skipped) == 1 and "never installs" in result.skipped[0][1] and "monai>=99" in result.skipped[0][1]
    assert calls == []
    with dependencies.self_test(), pytest.raises(dependencies.InstallRefused):
        dependencies.install(missing)
    assert calls == []


def test_module_metadata_and_i18n(harness):
    import types

    _, _, module = harness
    parent = types.SimpleNamespace()
    module.LesionSeg(parent)
    assert parent.title == "LesionSeg" and parent.categories == ["Segmentation"]
    assert parent.contributors == ["LesionSeg developers"]
    assert "confidence" in parent.helpText and "CC BY 3.0" in parent.acknowledgementText
    homepage = re.search(r'EXTENSION_HOMEPAGE "([^"]+)"', (MODULE_DIR.parent / "CMakeLists.txt").read_text()).group(1)
    assert f'<a href="{homepage}#readme">documentation</a>' in parent.helpText  # the help links the docs
    source = (MODULE_DIR / "LesionSeg.py").read_text(encoding="utf-8")
    assert "from slicer.i18n import tr as _" in source and 'translate("qSlicerAbstractCoreModule", "Segmentation")' in source

"""The LesionSeg panel's correction tools, offscreen under PySide6 with real MRML on a real case:

* **Add lesion**: the button enters single-point place mode on a temporary fiducial node; a point
  placed on the ground-truth lesion runs the result's own model in this process and adds a
  segment with status ``added``, a table row and a missed-lesion row in the panel's feedback store;
  a point outside the volume gives a one-line error and adds nothing; pressing again or leaving
  place mode (Escape) cancels.
* **Save on close**: closing the scene with unsaved corrections asks first; Yes saves them into the
  feedback store, No saves nothing; nothing unsaved asks nothing; an error never stops the close.
"""
from __future__ import annotations

import numpy as np
import pytest

from slicer_app_shim import data_dir, default_model, slicer_app  # noqa: F401 (fixtures)
from test_slicer_widget import CASE, _close, _make_widget, harness  # noqa: F401 (fixture)

_RESULT: dict = {}  # the automatic pass on CASE, computed once for this file


def _show_result(w, slicer_app, data_dir, default_model):
    """Load CASE and show a real result of the default model on it (the engine runs once per file;
    the nodes are made by ``logic.add_result``, the path a finished background run takes)."""
    from LesionSegLib import mrml
    from LesionSegLib.engine.segment.pipeline import Engine, case_hash

    volume = mrml.load_volume(str(data_dir / "sts" / CASE / "image.nii.gz"), CASE)
    if not _RESULT:
        image = mrml.volume_to_sitk(volume)
        engine = Engine(str(default_model.folder), "cpu")
        _RESULT.update(result=engine.segment(image, threshold=0.0, keep_patches=True, source=CASE), hash=case_hash(image),
                       threshold=engine.default_threshold, region=mrml.anatomic_region(engine.card.data))
    seg, _ = w.logic.add_result(volume, _RESULT["result"], _RESULT["hash"], threshold=_RESULT["threshold"], region=_RESULT["region"])
    w.enter()
    w._parameterNode.inputVolume = volume
    w._parameterNode.resultSegmentation = seg
    assert w.segmentationNode is seg
    return volume, seg


@pytest.fixture
def panel(harness, slicer_app, data_dir, default_model, tmp_path, monkeypatch):
    from LesionSegLib import settings

    _, qt_harness, module = harness
    slicer_app.reset()
    monkeypatch.setenv("LESIONSEG_FEEDBACK", str(tmp_path / "unused.db"))
    settings.set_feedback_database_path(tmp_path / "feedback.db")
    w = _make_widget(module, slicer_app, tmp_path=tmp_path)  # exports go to tmp_path / "export"
    volume, seg = _show_result(w, slicer_app, data_dir, default_model)
    yield w, volume, seg, qt_harness
    _close(w)
    slicer_app.reset()


def _gt_centre_ras(data_dir):
    import SimpleITK as sitk

    label = sitk.ReadImage(str(data_dir / "sts" / CASE / "label.nii.gz"))
    gt = sitk.GetArrayFromImage(label) > 0
    lps = label.TransformContinuousIndexToPhysicalPoint(np.argwhere(gt).mean(0)[::-1].tolist())
    return (-lps[0], -lps[1], lps[2]), gt


def _table_ids(view):
    return [int(float(view.model().index(r, 0).data())) for r in range(view.model().rowCount())]


def _place_nodes(slicer_app):
    return [slicer_app.scene.GetNthNodeByClass(i, "vtkMRMLMarkupsFiducialNode")
            for i in range(slicer_app.scene.GetNumberOfNodesByClass("vtkMRMLMarkupsFiducialNode"))]


def _press_add_lesion(w, slicer_app):
    """Press Add lesion: place mode on a temporary fiducial node; returns that node."""
    from PySide6.QtCore import Qt
    from PySide6.QtTest import QTest

    QTest.mouseClick(w.ui.addLesionButton, Qt.LeftButton)
    app_logic = slicer_app.app_logic
    interaction, selection = app_logic.GetInteractionNode(), app_logic.GetSelectionNode()
    assert w.ui.addLesionButton.isChecked() and w.addLesionTool.active
    assert interaction.GetCurrentInteractionMode() == interaction.Place and interaction.GetPlaceModePersistence() == 0
    node = slicer_app.scene.GetNodeByID(selection.GetActivePlaceNodeID())
    assert node is not None and node.IsA("vtkMRMLMarkupsFiducialNode") and _place_nodes(slicer_app) == [node]
    assert node.GetHideFromEditors() and not node.GetSaveWithScene()
    return node


def _assert_place_mode_left(w, slicer_app):
    interaction = slicer_app.app_logic.GetInteractionNode()
    assert not w.addLesionTool.active and not w.ui.addLesionButton.isChecked()
    assert interaction.GetCurrentInteractionMode() == interaction.ViewTransform
    assert _place_nodes(slicer_app) == []  # the temporary node is gone


def test_add_lesion_click(panel, slicer_app, data_dir, monkeypatch):
    import slicer

    from LesionSegLib import click, export, mrml

    w, volume, seg, qt_harness = panel
    ui = w.ui
    view = ui.lesionTableView
    errors = []
    monkeypatch.setattr(slicer.util, "errorDisplay", lambda text, **kw: errors.append(text))
    assert ui.addLesionButton.isEnabled()  # a result is shown
    before = {d["lesion_id"] for d in mrml.lesions(seg)}
    rows = view.model().rowCount()
    assert rows == len(mrml.visible_lesions(seg)) >= 1  # at the model's threshold
    ras, gt = _gt_centre_ras(data_dir)

    # the automatic pass found this tumour: a click on it is refused (review that lesion instead)
    found = click.lesion_at(seg, ras)
    assert found is not None and found["lesion_id"] in before
    n_decisions = len(w.logic.feedback_store.decisions()) if w.logic.feedback_store is not None else 0
    _press_add_lesion(w, slicer_app).AddControlPoint(*ras)
    assert qt_harness.wait_until(lambda: not w.addLesionTool.active and errors, timeout=120)
    assert len(errors) == 1 and "\n" not in errors[0] and f"inside lesion {found['lesion_id']}" in errors[0], errors
    assert {d["lesion_id"] for d in mrml.lesions(seg)} == before and view.model().rowCount() == rows
    assert (len(w.logic.feedback_store.decisions()) if w.logic.feedback_store is not None else 0) == n_decisions
    errors.clear()

    # the reviewer deletes that proposal (as the Segment Editor would) and clicks the missed tumour:
    # a placed control point, as the markups widget makes it
    seg.GetSegmentation().RemoveSegment(found["segment_id"])
    mrml.update_table_node(mrml.get_table_node(seg), seg)
    before.discard(found["lesion_id"])
    rows = view.model().rowCount()
    assert click.lesion_at(seg, ras) is None
    _press_add_lesion(w, slicer_app).AddControlPoint(*ras)
    assert qt_harness.wait_until(lambda: not w.addLesionTool.active, timeout=300), ui.logTextEdit.toPlainText()
    assert errors == [], errors
    _assert_place_mode_left(w, slicer_app)
    [new] = [d for d in mrml.lesions(seg) if d["lesion_id"] not in before]
    assert new["review"] == click.ADDED and mrml.segment_status(seg, new["lesion_id"]) == "completed"
    # a new id, never the removed proposal's: Save corrections sees a deletion and an addition
    from LesionSegLib import corrections

    assert new["lesion_id"] > max(corrections.proposal_ids(seg)) >= found["lesion_id"]
    kinds = {(c["kind"], c["lesion_id"]) for c in corrections.diff(seg)}
    assert ("deleted", found["lesion_id"]) in kinds and ("added", None) in kinds
    assert not any(k == "edited" and lid == found["lesion_id"] for k, lid in kinds)
    assert view.model().rowCount() == rows + 1
    assert new["lesion_id"] in _table_ids(view)
    assert w.currentLesion == new["lesion_id"] and "added" in ui.statusLabel.text()
    mask = export.instance_labelmap(seg, [new["lesion_id"]]) == new["lesion_id"]
    assert mask.any() and (mask & gt).sum() >= 0.5 * mask.sum(), "the added lesion lies on the ground-truth lesion"
    store = w.logic.feedback_store  # the store Accept / Reject record into
    assert store is not None and str(store.path) == str(w.logic.feedback_database_path())
    [row] = [r for r in store.decisions() if r["source"] == click.MISSED_SOURCE]
    assert row["lesion_id"] == new["lesion_id"] and row["decision"] == "accepted"
    assert row["model_id"] == seg.GetAttribute(mrml.ATTR_MODEL) and row["case_hash"] == _RESULT["hash"]
    # the result's own model answered the click (not the one the model selector happens to show)
    assert mrml.get_tag(mrml.find_segment(seg, new["lesion_id"])[1], mrml.TAG["model"] + "Click") == seg.GetAttribute(mrml.ATTR_MODEL)
    n_rows = len(store.decisions())
    # the threshold hides model proposals, never a lesion the reviewer added
    ui.thresholdSlider.setValue(1.0)
    assert _table_ids(view) == [new["lesion_id"]] and seg.GetDisplayNode().GetSegmentVisibility(new["segment_id"])
    ui.thresholdSlider.setValue(_RESULT["threshold"])

    # a point outside the volume: a one-line error, no segment, nothing recorded
    n_segments = seg.GetSegmentation().GetNumberOfSegments()
    _press_add_lesion(w, slicer_app).AddControlPoint(ras[0] + 5000, ras[1], ras[2])
    assert qt_harness.wait_until(lambda: not w.addLesionTool.active and errors, timeout=120)
    _assert_place_mode_left(w, slicer_app)
    assert len(errors) == 1 and "\n" not in errors[0] and "outside the volume" in errors[0], errors
    assert "outside the volume" in ui.logTextEdit.toPlainText()
    assert seg.GetSegmentation().GetNumberOfSegments() == n_segments and view.model().rowCount() == rows + 1
    assert len(store.decisions()) == n_rows


def test_add_lesion_cancel(panel, slicer_app):
    from PySide6.QtCore import Qt
    from PySide6.QtTest import QTest

    w, volume, seg, qt_harness = panel
    n_segments = seg.GetSegmentation().GetNumberOfSegments()
    _press_add_lesion(w, slicer_app)
    QTest.mouseClick(w.ui.addLesionButton, Qt.LeftButton)  # pressed again
    _assert_place_mode_left(w, slicer_app)
    assert "cancelled" in w.ui.statusLabel.text()
    _press_add_lesion(w, slicer_app)
    interaction = slicer_app.app_logic.GetInteractionNode()
    interaction.SetCurrentInteractionMode(interaction.ViewTransform)  # Escape in a view
    assert qt_harness.wait_until(lambda: not w.addLesionTool.active, timeout=10)
    _assert_place_mode_left(w, slicer_app)
    _press_add_lesion(w, slicer_app)
    w.exit()  # leaving the module
    _assert_place_mode_left(w, slicer_app)
    assert seg.GetSegmentation().GetNumberOfSegments() == n_segments


def _delete_a_lesion(seg):
    from LesionSegLib import corrections, mrml

    assert not corrections.has_unsaved(seg)
    lesion = mrml.visible_lesions(seg)[0]
    seg.GetSegmentation().RemoveSegment(lesion["segment_id"])
    assert corrections.has_unsaved(seg)
    return lesion


def _stored_corrections(w):
    from LesionSegLib.engine.feedback import FeedbackStore
    from LesionSegLib.engine.feedback import corrections as cr

    path = w.logic.feedback_database_path()
    if not path.exists():
        return []
    store = FeedbackStore(path)
    try:
        return cr.rows(store, blobs=False)[1]
    finally:
        store.close()


def test_scene_close_saves_corrections_after_yes(panel, slicer_app, data_dir, default_model, monkeypatch):
    import slicer

    from LesionSegLib import corrections, mrml

    w, volume, seg, _ = panel
    asked = []
    monkeypatch.setattr(slicer.util, "confirmYesNoDisplay", lambda text, **kw: asked.append(text) or True)
    name = seg.GetName()
    deleted = _delete_a_lesion(seg)
    slicer_app.scene.Clear(False)  # closing the scene
    assert len(asked) == 1 and name in asked[0]
    assert w.segmentationNode is None
    rows = _stored_corrections(w)
    assert [r["proposal_lesion_id"] for r in rows if r["kind"] == "deleted"] == [deleted["lesion_id"]]
    assert {r["case_name"] for r in rows} == {CASE} and f"corrections of {name} saved on scene close" in w.ui.logTextEdit.toPlainText()

    # a fresh result, nothing changed: closing asks nothing
    volume, seg = _show_result(w, slicer_app, data_dir, default_model)
    assert mrml.lesions(seg) and not corrections.has_unsaved(seg)
    slicer_app.scene.Clear(False)
    assert len(asked) == 1


def test_scene_close_no_discards_and_errors_never_block(panel, slicer_app, data_dir, default_model, monkeypatch):
    import slicer

    from LesionSegLib import corrections

    w, volume, seg, _ = panel
    asked = []
    monkeypatch.setattr(slicer.util, "confirmYesNoDisplay", lambda text, **kw: asked.append(text) or False)
    _delete_a_lesion(seg)
    slicer_app.scene.Clear(False)
    assert len(asked) == 1 and _stored_corrections(w) == []  # No: nothing saved
    assert slicer_app.scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 0

    # a failure while saving is logged in one line; the scene still closes
    volume, seg = _show_result(w, slicer_app, data_dir, default_model)
    _delete_a_lesion(seg)
    monkeypatch.setattr(slicer.util, "confirmYesNoDisplay", lambda text, **kw: True)
    monkeypatch.setattr(corrections, "save_corrections", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    slicer_app.scene.Clear(False)
    assert slicer_app.scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 0 and w.segmentationNode is None
    assert "error: corrections of STS_041 lesions not saved on scene close: saving failed: disk full" in w.ui.logTextEdit.toPlainText()
    assert _stored_corrections(w) == []


def test_a_segment_removed_outside_the_panel_leaves_the_table_and_review_consistent(panel):
    """The Segment Editor's Remove on the lesion under review: the table drops its row, the lesion
    is deselected and Accept asks for a selection (a KeyError escaped from the Qt slot before, and
    the table kept the row with its counter)."""
    from PySide6.QtCore import Qt
    from PySide6.QtTest import QTest

    from LesionSegLib import mrml

    w, volume, seg, _ = panel
    w._parameterNode.threshold = 0.0  # every candidate in the table (STS_041 has two)
    ids = _table_ids(w.ui.lesionTableView)
    assert len(ids) >= 2
    w.selectLesion(ids[0])
    assert w.currentLesion == ids[0]
    seg.GetSegmentation().RemoveSegment(mrml.segment_id(ids[0]))
    assert _table_ids(w.ui.lesionTableView) == ids[1:] and w.currentLesion is None
    assert "removed" in w.ui.statusLabel.text()
    assert not w.ui.acceptButton.isEnabled()  # no lesion selected: nothing to accept
    w.onReview("accepted")  # and called anyway (a shortcut): it asks for a selection, raises nothing
    assert "Select a lesion" in w.ui.statusLabel.text()
    # a lesion removed while still current in the logic's eyes (no event seen): Accept is refused quietly
    w.selectLesion(ids[1])
    w.segmentWatch.watch(None)  # as if the removal were not observed
    seg.GetSegmentation().RemoveSegment(mrml.segment_id(ids[1]))
    w.segmentWatch.watch(seg)
    assert w.currentLesion == ids[1]
    QTest.mouseClick(w.ui.acceptButton, Qt.LeftButton)
    assert w.currentLesion is None and ids[1] not in _table_ids(w.ui.lesionTableView)
    assert "removed" in w.ui.statusLabel.text()

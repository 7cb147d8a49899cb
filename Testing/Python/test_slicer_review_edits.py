"""What a reviewer does around the LesionSeg panel, offscreen under PySide6 with real MRML on real
cases (each found by an audit of the panel; every test failed on the code before its fix):

* a lesion **painted by hand** (Segment Editor: Add, Paint) becomes an *added* lesion: table row,
  every export, Save corrections;
* **painting or erasing** a lesion measures it again (table, CSV), and a decision made after the
  edit replaces the one made before it (one lesion, one feedback row);
* a decision changes what is **drawn** as it changes the table; a threshold that hides the
  current lesion deselects it;
* a deleted **table node** is rebuilt; a result whose **scan was removed** keeps its review and CSV
  but disables what needs the scan;
* the **input volume and the result shown** follow each other;
* **scene close** saves one result's corrections although another result lost its scan, and a
  Segment run cancelled by the close says so.
"""
from __future__ import annotations

import csv

import numpy as np
import pytest

from slicer_app_shim import data_dir, default_model, slicer_app  # noqa: F401 (fixtures)
from test_slicer_widget import _close, _make_widget, harness  # noqa: F401 (fixture)
from test_slicer_widget_corrections import _stored_corrections, _table_ids
from test_slicer_widget_corrections import panel as corrections_panel  # noqa: F401 (fixture)

OTHER = "STS_032"  # a second scan, for two results side by side
_OTHER: dict = {}


@pytest.fixture
def panel(corrections_panel):
    """The corrections panel (STS_041 and a real result shown, exports to tmp_path / "export"), at threshold 0."""
    corrections_panel[0]._parameterNode.threshold = 0.0
    return corrections_panel


def _click(button):
    from PySide6.QtCore import Qt
    from PySide6.QtTest import QTest

    QTest.mouseClick(button, Qt.LeftButton)


def _other_result(w, data_dir, default_model):
    """A second scan and its result, added the way a finished run adds it (not shown)."""
    from LesionSegLib import mrml
    from LesionSegLib.engine.segment.pipeline import Engine, case_hash

    volume = mrml.load_volume(str(data_dir / "sts" / OTHER / "image.nii.gz"), OTHER)
    if not _OTHER:
        image = mrml.volume_to_sitk(volume)
        _OTHER.update(result=Engine(str(default_model.folder), "cpu").segment(image, threshold=0.0, keep_patches=True, source=OTHER),
                      hash=case_hash(image))
    seg, _ = w.logic.add_result(volume, _OTHER["result"], _OTHER["hash"], threshold=0.0)
    return volume, seg


def _expected(mask, volume):
    """n_voxels, volume (ml) and centroid (LPS mm) of a (k, j, i) mask on ``volume``'s grid."""
    from LesionSegLib import mrml

    k, j, i = np.argwhere(mask).mean(axis=0)
    r, a, s = (mrml.ijk_to_ras(volume) @ np.array([i, j, k, 1.0]))[:3]
    return int(mask.sum()), float(mask.sum() * np.prod(volume.GetSpacing()) / 1000.0), (-r, -a, s)


def _paint(mask, seg, segment_id, volume):
    """What Paint / Erase does to a segment's mask; the panel measures it once Qt's events run."""
    import qt
    import slicer

    slicer.util.updateSegmentBinaryLabelmapFromArray(mask, seg, segment_id, volume)
    qt.QApplication.processEvents()


def _csv(path):
    with open(path) as fh:
        return {int(r["lesion_id"]): r for r in csv.DictReader(fh)}


# ------------------------------------------------------------------------- painted by hand
def test_a_lesion_painted_by_hand_is_an_added_lesion_everywhere(panel, tmp_path):
    import SimpleITK as sitk
    import slicer

    from LesionSegLib import corrections, mrml

    w, volume, seg, _ = panel
    view = w.ui.lesionTableView
    before = _table_ids(view)
    sid = seg.GetSegmentation().AddEmptySegment("", "Missed lesion")
    assert _table_ids(view) == before  # an empty segment is not a lesion yet
    mask = np.zeros(slicer.util.arrayFromVolume(volume).shape, dtype=np.uint8)
    k, j, i = (s // 4 for s in mask.shape)
    mask[k:k + 4, j:j + 6, i:i + 5] = 1
    _paint(mask, seg, sid, volume)

    info = mrml.lesion_info(seg.GetSegmentation().GetSegment(sid), sid)
    n, ml, centroid = _expected(mask > 0, volume)
    assert info["review"] == "added" and info["lesion_id"] not in corrections.proposal_ids(seg) + before
    assert info["n_voxels"] == n == 120 and info["volume_ml"] == pytest.approx(ml, rel=1e-3)
    np.testing.assert_allclose(info["centroid_lps"], centroid, atol=0.01)
    assert info["lesion_id"] in _table_ids(view) and info["name"] == "Missed lesion"

    _click(w.ui.exportAllButton)
    out = tmp_path / "export"
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "STS_041_lesions.nii.gz")))
    assert np.array_equal(labels == info["lesion_id"], mask > 0)
    row = _csv(out / "STS_041_lesions.csv")[info["lesion_id"]]
    assert row["status"] == "added" and int(row["n_voxels"]) == n and row["name"] == "Missed lesion"
    assert "Missed lesion" in (out / "STS_041.seg.nrrd").read_bytes().decode("latin-1")

    _click(w.ui.saveCorrectionsButton)
    assert "1 added" in w.ui.statusLabel.text()
    assert [c["kind"] for c in _stored_corrections(w)].count("added") == 1
    w.selectLesion(info["lesion_id"])
    _click(w.ui.rejectButton)  # the reviewer takes it back: no lesion for fine-tuning (it was stored as one)
    _click(w.ui.saveCorrectionsButton)
    assert "0 added" in w.ui.statusLabel.text() and "added" not in [c["kind"] for c in _stored_corrections(w)]


def test_a_lesion_erased_to_nothing_is_gone_from_review_and_exports(panel, tmp_path):
    import slicer

    from LesionSegLib import mrml

    w, volume, seg, _ = panel
    small = min(mrml.lesions(seg), key=lambda d: d["n_voxels"])
    w.selectLesion(small["lesion_id"])
    _paint(np.zeros(slicer.util.arrayFromVolume(volume).shape, dtype=np.uint8), seg, small["segment_id"], volume)
    assert small["lesion_id"] not in _table_ids(w.ui.lesionTableView) and w.currentLesion is None
    with pytest.raises(KeyError, match="no voxel left"):
        w.logic.review(seg, small["lesion_id"], "accepted")
    _click(w.ui.exportCsvButton)
    assert small["lesion_id"] not in _csv(tmp_path / "export" / "STS_041_lesions.csv")
    _click(w.ui.saveCorrectionsButton)
    assert [c["kind"] for c in _stored_corrections(w) if c["proposal_lesion_id"] == small["lesion_id"]] == ["deleted"]


# ---------------------------------------------------------------------- painted / erased
def test_an_edit_measures_the_lesion_again_and_its_decisions_stay_one(panel, tmp_path):
    import slicer

    from LesionSegLib import mrml

    w, volume, seg, _ = panel
    w._parameterNode.autoAdvance = False
    lesion = max(mrml.lesions(seg), key=lambda d: d["n_voxels"])
    w.selectLesion(lesion["lesion_id"])
    _click(w.ui.acceptButton)
    mask = slicer.util.arrayFromSegmentBinaryLabelmap(seg, lesion["segment_id"], volume)
    mask[np.nonzero(mask)[0].min()] = 0  # erase its first slice
    _paint(mask, seg, lesion["segment_id"], volume)

    info = mrml.lesion_info(mrml.find_segment(seg, lesion["lesion_id"])[1])
    n, ml, centroid = _expected(mask > 0, volume)
    assert 0 < info["n_voxels"] == n < lesion["n_voxels"] and info["volume_ml"] == pytest.approx(ml, rel=1e-3)
    np.testing.assert_allclose(info["centroid_lps"], centroid, atol=0.01)
    assert info["key_centroid_lps"] == pytest.approx(lesion["centroid_lps"])  # its identity is the proposal's
    assert info["confidence"] == lesion["confidence"] and info["features"] == lesion["features"]  # what the model saw
    row = mrml.table_rows(mrml.get_table_node(seg))[_table_ids(w.ui.lesionTableView).index(lesion["lesion_id"])]
    assert row["Volume (ml)"] == pytest.approx(round(ml, 2))

    w.selectLesion(lesion["lesion_id"])
    assert f"{ml:.2f} ml" in w.ui.currentLesionLabel.text()
    _click(w.ui.rejectButton)  # a change of mind after the edit: the same lesion's row, revised
    rows = [r for r in w.logic.feedback_store.decisions() if r["lesion_id"] == lesion["lesion_id"]]
    assert len(rows) == 1 and rows[0]["decision"] == "rejected"
    assert rows[0]["volume_ml"] == pytest.approx(ml, rel=1e-3)  # the edited lesion's size, not the proposal's

    _click(w.ui.exportCsvButton)
    assert int(_csv(tmp_path / "export" / "STS_041_lesions.csv")[lesion["lesion_id"]]["n_voxels"]) == n


# ------------------------------------------------------------------- what is drawn, what is listed
def test_decisions_change_what_is_drawn_and_a_hidden_lesion_is_deselected(panel):
    from LesionSegLib import mrml

    w, volume, seg, _ = panel
    w._parameterNode.autoAdvance = False
    display = seg.GetDisplayNode()
    low = min(mrml.lesions(seg), key=lambda d: d["confidence"])
    assert low["confidence"] < 0.5
    w.selectLesion(low["lesion_id"])
    _click(w.ui.acceptButton)
    w._parameterNode.threshold = 0.5
    assert low["lesion_id"] in _table_ids(w.ui.lesionTableView) and display.GetSegmentVisibility(low["segment_id"])
    w.selectLesion(low["lesion_id"])
    _click(w.ui.rejectButton)  # rejected below the threshold: neither listed nor drawn
    assert low["lesion_id"] not in _table_ids(w.ui.lesionTableView)
    assert not display.GetSegmentVisibility(low["segment_id"])

    w._parameterNode.threshold = 0.0
    w.selectLesion(low["lesion_id"])
    _click(w.ui.acceptButton)  # accepted: drawn again at any threshold
    assert display.GetSegmentVisibility(low["segment_id"])
    mrml.set_review(seg, low["lesion_id"], "unreviewed")
    w.selectLesion(low["lesion_id"])
    w._parameterNode.threshold = 0.5  # hides the current lesion: it is no longer current
    assert w.currentLesion is None and not w.ui.acceptButton.isEnabled()
    assert "threshold hides" in w.ui.currentLesionLabel.text()


def test_a_deleted_table_node_is_rebuilt(panel, slicer_app):
    from LesionSegLib import mrml

    w, volume, seg, _ = panel
    ids = _table_ids(w.ui.lesionTableView)
    slicer_app.scene.RemoveNode(mrml.get_table_node(seg))
    w._parameterNode.threshold = 1.0
    assert mrml.get_table_node(seg) is not None and _table_ids(w.ui.lesionTableView) == []
    w._parameterNode.threshold = 0.0
    assert _table_ids(w.ui.lesionTableView) == ids
    w.selectLesion(ids[0])
    _click(w.ui.rejectButton)
    assert mrml.table_rows(mrml.get_table_node(seg))[0]["Status"] == "rejected"


def test_a_result_whose_scan_was_removed_keeps_review_and_csv_only(panel, slicer_app, tmp_path):
    from LesionSegLib import panel_sync

    w, volume, seg, _ = panel
    ids = _table_ids(w.ui.lesionTableView)
    slicer_app.scene.RemoveNode(volume)
    w.updateGUI()
    for name in panel_sync.NEEDS_VOLUME:
        button = getattr(w.ui, name)
        assert not button.isEnabled() and "removed from the scene" in button.property("toolTip")
    assert w.ui.exportCsvButton.isEnabled()
    w.selectLesion(ids[0])
    _click(w.ui.acceptButton)
    assert [r["decision"] for r in w.logic.feedback_store.decisions()] == ["accepted"]
    _click(w.ui.exportCsvButton)
    assert (tmp_path / "export" / "STS_041_lesions.csv").exists()


# --------------------------------------------------------------------- input volume <-> result
def test_the_input_volume_and_the_result_follow_each_other(panel, data_dir, default_model):
    from LesionSegLib import mrml

    w, volume, seg, _ = panel
    other_volume, other_seg = _other_result(w, data_dir, default_model)
    p = w._parameterNode
    w.ui.inputVolumeSelector.setCurrentNode(other_volume)  # the other scan: its result is shown
    assert w.segmentationNode is other_seg and p.resultSegmentation is other_seg
    w.ui.resultSelector.setCurrentNode(seg)  # the first result: its scan becomes the input
    assert p.inputVolume is volume and w.segmentationNode is seg
    w.ui.inputVolumeSelector.setCurrentNode(other_volume)
    w.selectLesion(_table_ids(w.ui.lesionTableView)[0])
    _click(w.ui.acceptButton)
    assert {r["case_name"] for r in w.logic.feedback_store.decisions()} == {OTHER}
    blank = mrml.load_volume(str(data_dir / "sts" / "STS_001" / "image.nii.gz"), "no result")
    w.ui.inputVolumeSelector.setCurrentNode(blank)  # a scan without a result: none is shown
    assert w.segmentationNode is None and _table_ids(w.ui.lesionTableView) == []


# ------------------------------------------------------------------------------ scene close
def test_scene_close_saves_a_result_when_another_lost_its_scan(panel, slicer_app, data_dir, default_model, monkeypatch):
    import slicer

    from LesionSegLib import corrections, mrml

    w, volume, seg, _ = panel
    asked = []
    monkeypatch.setattr(slicer.util, "confirmYesNoDisplay", lambda text, **kw: asked.append(text) or True)
    other_volume, other_seg = _other_result(w, data_dir, default_model)
    seg.GetSegmentation().RemoveSegment(mrml.visible_lesions(seg)[0]["segment_id"])
    assert corrections.has_unsaved(seg)
    slicer_app.scene.RemoveNode(other_volume)
    assert not corrections.has_unsaved(other_seg)  # no scan, nothing to save it with
    slicer_app.scene.Clear(False)
    assert len(asked) == 1 and "STS_041 lesions" in asked[0]
    assert "corrections of STS_041 lesions saved on scene close" in w.ui.logTextEdit.toPlainText()
    assert [c["kind"] for c in _stored_corrections(w)].count("deleted") == 1


@pytest.fixture
def segmenting(harness, slicer_app, data_dir, default_model, tmp_path):
    """A fresh panel that has just started a Segment run (background) on STS_041: (widget, volume, runner, qt harness)."""
    from LesionSegLib import mrml, settings

    _, qt_harness, module = harness
    slicer_app.reset()
    settings.set_feedback_database_path(tmp_path / "feedback.db")
    w = _make_widget(module, slicer_app, model=default_model, tmp_path=tmp_path)
    volume = mrml.load_volume(str(data_dir / "sts" / "STS_041" / "image.nii.gz"), "STS_041")
    w.ui.inputVolumeSelector.setCurrentNode(volume)
    _click(w.ui.segmentButton)
    assert w.runner is not None
    yield w, volume, w.runner, qt_harness
    _close(w)
    slicer_app.reset()


def test_scene_close_during_a_segment_run_says_it_cancelled_it(segmenting, slicer_app):
    from LesionSegLib.runner import process_group_alive

    w, volume, runner, qt_harness = segmenting
    qt_harness.wait_until(lambda: runner.stage != "" or runner.state != "running", timeout=60)
    slicer_app.scene.Clear(False)
    assert w.runner is None and not process_group_alive(runner.proc.pid) and not runner.workdir.exists()
    assert w.ui.statusLabel.text() == "Segmentation cancelled: the scene was closed."
    assert "segmentation cancelled: the scene was closed" in w.ui.logTextEdit.toPlainText()


def test_the_csv_export_never_starts_a_spreadsheet_formula(panel, tmp_path):
    """A segment name is typed by the reviewer; Excel runs a cell that starts with = + - @ as a
    formula (CSV injection): it is written with a leading apostrophe, numbers stay numbers."""
    from LesionSegLib import mrml

    w, volume, seg, _ = panel
    lesion = mrml.lesions(seg)[0]
    mrml.find_segment(seg, lesion["lesion_id"])[1].SetName('=HYPERLINK("http://example.org","x")')
    _click(w.ui.exportCsvButton)
    row = _csv(tmp_path / "export" / "STS_041_lesions.csv")[lesion["lesion_id"]]
    assert row["name"] == "'=HYPERLINK(\"http://example.org\",\"x\")"
    assert float(row["centroid_x"]) == pytest.approx(lesion["centroid_lps"][0], abs=1e-3) and row["centroid_x"].startswith("-")


# ----------------------------------------------------------------------------- inputs and exports
def test_an_export_asks_before_replacing_files_of_another_result(panel, tmp_path, monkeypatch):
    """Exports are named after the scan, so a second result of it (another model, a re-run) wrote
    over the first one's files without a word (an audit)."""
    import slicer

    w, volume, seg, _ = panel
    csv_path = tmp_path / "export" / "STS_041_lesions.csv"
    _click(w.ui.exportCsvButton)
    csv_path.write_text("the first result's export\n")
    asked = []
    monkeypatch.setattr(slicer.util, "confirmOkCancelDisplay", lambda text, **kw: asked.append(text) or False)
    _click(w.ui.exportCsvButton)
    assert len(asked) == 1 and "STS_041_lesions.csv already in" in asked[0]
    assert csv_path.read_text() == "the first result's export\n" and w.ui.statusLabel.text() == "Export cancelled: nothing was replaced."
    monkeypatch.setattr(slicer.util, "confirmOkCancelDisplay", lambda text, **kw: True)
    _click(w.ui.exportCsvButton)
    assert csv_path.read_text().startswith("lesion_id,") and w.ui.statusLabel.text().startswith("Exported")


def test_an_export_says_what_overlapping_lesions_lose_in_the_labelmap(panel, tmp_path, monkeypatch):
    """A lesion drawn over a proposed one: the NIfTI labelmap holds one id per voxel, so one of
    them lost voxels there while the CSV listed it whole, and nothing said so (stop 29, left alone)."""
    import SimpleITK as sitk
    import slicer

    from LesionSegLib import mrml

    w, volume, seg, _ = panel
    monkeypatch.setattr(slicer.util, "confirmOkCancelDisplay", lambda text, **kw: True)  # replace the first export
    _click(w.ui.exportAllButton)
    assert w.ui.statusLabel.text().startswith("Exported") and "overlapping" not in w.ui.statusLabel.text()
    lesion = mrml.visible_lesions(seg)[0]
    own = slicer.util.arrayFromSegmentBinaryLabelmap(seg, lesion["segment_id"], volume) > 0
    box = np.zeros(own.shape, dtype=np.uint8)
    k, j, i = (int(v) for v in np.argwhere(own).mean(axis=0).round())
    box[k - 2:k + 2, j - 3:j + 3, i - 3:i + 3] = 1  # a box drawn over the tumour's centre
    sid = seg.GetSegmentation().AddEmptySegment("", "Drawn over")
    _paint(box, seg, sid, volume)
    drawn = mrml.lesion_info(seg.GetSegmentation().GetSegment(sid), sid)
    shared = int((own & (box > 0)).sum())
    assert shared == 144

    _click(w.ui.exportAllButton)
    out = tmp_path / "export"
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "STS_041_lesions.nii.gz")))
    rows = _csv(out / "STS_041_lesions.csv")
    held = {lid: int((labels == lid).sum()) for lid in (lesion["lesion_id"], drawn["lesion_id"])}
    assert int(rows[lesion["lesion_id"]]["n_voxels"]) == int(own.sum()) and int(rows[drawn["lesion_id"]]["n_voxels"]) == 144
    assert sum(held.values()) == int(own.sum()) + 144 - shared  # the labelmap gave each shared voxel one id
    short = [lid for lid, n in held.items() if n < int(rows[lid]["n_voxels"])]
    assert len(short) == 1
    text = w.ui.statusLabel.text()
    assert "overlapping lesions: the NIfTI labelmap" in text and f"lesion {short[0]} ({shared:,} of" in text
    assert "the .seg.nrrd and the CSV keep each lesion whole" in text


def test_volumes_the_engine_cannot_take_are_named(panel):
    """Zero spacing gave ITK's multi-line error; a volume without voxels was not named (an audit)."""
    import slicer

    from LesionSegLib import mrml
    from LesionSegLib.engine.errors import InputError

    w, volume, seg, _ = panel
    flat = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "empty one")
    with pytest.raises(InputError, match="volume 'empty one': has no image data"):
        mrml.volume_to_sitk(flat)
    volume.SetSpacing(0.0, 1.0, 1.0)
    with pytest.raises(InputError, match=r"volume 'STS_041': zero, negative or non-finite voxel spacing \(0.0, 1.0, 1.0\) mm"):
        mrml.volume_to_sitk(volume)


def test_a_volume_removed_while_it_is_segmented_is_said_so(segmenting, slicer_app):
    w, volume, runner, qt_harness = segmenting
    slicer_app.scene.RemoveNode(volume)
    assert qt_harness.wait_until(lambda: w.runner is None, timeout=300)
    assert w.ui.statusLabel.text() == "Segmentation discarded: volume 'STS_041' was removed from the scene while it ran."
    assert w.segmentationNode is None and not runner.workdir.exists()

"""Harvesting corrections from a real result in real MRML (slicer-core) on a real STS case:
edit a proposal, add a missed lesion, delete a false one, save, and read them back on the model grid."""
from __future__ import annotations

import numpy as np
import pytest

from slicer_app_shim import data_dir, default_model, slicer_app  # noqa: F401 (fixtures)

CASE = "STS_003"  # the default model finds the tumour plus low-confidence candidates here


@pytest.fixture
def result(slicer_app, data_dir, default_model):
    from LesionSegLib import corrections, mrml
    from LesionSegLib.logic import LesionSegLogicCore

    slicer_app.reset()
    volume = mrml.load_volume(str(data_dir / "sts" / CASE / "image.nii.gz"), CASE)
    logic = LesionSegLogicCore()
    seg, _ = logic.segment(volume, model=str(default_model.folder), device="cpu", threshold=0.0)
    mrml.set_threshold(seg, 0.0)  # every candidate shown
    corrections.remember_proposals(seg)
    yield volume, seg
    slicer_app.reset()


def test_edit_add_delete_are_harvested(result, tmp_path):
    import slicer

    from LesionSegLib import corrections, mrml
    from LesionSegLib.engine.feedback import FeedbackStore
    from LesionSegLib.engine.feedback import corrections as cr

    volume, seg = result
    lesions = mrml.lesions(seg)
    assert len(lesions) >= 2, "STS_003 gives the tumour plus candidates at threshold 0"
    assert not corrections.has_unsaved(seg)  # nothing changed yet
    # 1. edit the tumour: erase its upper half (as the Segment Editor's eraser would)
    sid1, _ = mrml.find_segment(seg, 1)
    m1 = slicer.util.arrayFromSegmentBinaryLabelmap(seg, sid1, volume) > 0
    ks = np.flatnonzero(m1.any((1, 2)))
    edited = m1.copy()
    edited[ks[len(ks) // 2]:] = False
    slicer.util.updateSegmentBinaryLabelmapFromArray(edited.astype(np.uint8), seg, sid1, volume)
    # 2. delete the second proposal
    sid2, _ = mrml.find_segment(seg, 2)
    deleted = slicer.util.arrayFromSegmentBinaryLabelmap(seg, sid2, volume) > 0
    seg.GetSegmentation().RemoveSegment(sid2)
    # 3. add a missed lesion by hand: a small ball away from the tumour
    shape = m1.shape
    k, j, i = np.ogrid[:shape[0], :shape[1], :shape[2]]
    centre = [s // 2 for s in shape]
    far = np.argwhere(~m1)[0]
    centre = [int(c) for c in far] if m1[tuple(centre)] else centre
    ball = ((k - centre[0]) * 3.27 / 1.95) ** 2 + (j - centre[1]) ** 2 + (i - centre[2]) ** 2 <= 16
    ball &= ~m1
    new_id = seg.GetSegmentation().AddEmptySegment("", "hand-painted lesion")
    slicer.util.updateSegmentBinaryLabelmapFromArray(ball.astype(np.uint8), seg, new_id, volume)

    changes = {c["kind"]: c for c in corrections.diff(seg)}
    assert set(changes) >= {"edited", "added", "deleted"}
    np.testing.assert_array_equal(changes["edited"]["mask"], edited)
    np.testing.assert_array_equal(changes["deleted"]["mask"], deleted)
    np.testing.assert_array_equal(changes["added"]["mask"], ball)
    assert changes["edited"]["key"] == corrections._key(lesions[0]) and changes["added"]["key"] is None
    assert corrections.has_unsaved(seg)

    db = tmp_path / "fb.db"
    counts = corrections.save_corrections(seg, str(db), reviewer="dr")
    assert counts["edited"] == 1 and counts["added"] == 1 and counts["deleted"] == 1
    assert counts["kept"] == len(lesions) - 2
    assert not corrections.has_unsaved(seg)
    store = FeedbackStore(db)
    [case] = cr.load_cases(store)
    assert case.case_name == CASE and case.model_ids == [seg.GetAttribute(mrml.ATTR_MODEL)]
    # on the model grid: the label holds the edited tumour and the added ball, not the deleted proposal
    vox_ml = float(np.prod(case.geometry["spacing_zyx"])) / 1000
    in_ml = float(np.prod(volume.GetSpacing())) / 1000
    want = (edited.sum() + ball.sum()) * in_ml
    for les in lesions[2:]:  # kept proposals
        want += les["n_voxels"] * in_ml
    assert case.label.sum() * vox_ml == pytest.approx(want, rel=0.15)
    assert case.rejected.sum() * vox_ml == pytest.approx(deleted.sum() * in_ml, rel=0.3)
    assert case.hu.shape == case.label.shape and case.hu.dtype == np.int16

    # on scene close the confirmation decides; nothing pending after a save
    asked = []
    assert corrections.save_on_close(str(db), lambda names: asked.append(names) or True) == {}
    assert asked == []
    seg.GetSegmentation().RemoveSegment(new_id)
    assert corrections.save_on_close(str(db), lambda names: False) == {}  # declined: not saved
    assert cr.stats(store)["added"] == 1
    saved = corrections.save_on_close(str(db), lambda names: asked.append(names) or True)
    assert asked == [[seg.GetName()]] and saved[seg.GetName()]["added"] == 0
    store.close()
    assert cr.stats(FeedbackStore(db))["added"] == 0


def test_two_results_of_one_scan_save_one_correction_set_and_say_so(result, default_model, tmp_path):  # noqa: F811
    """The store keeps one correction set per scan and model: of two edited results of one scan,
    save on close saves the one edited last and names the other as not saved (both were reported
    saved, and the first was silently replaced)."""
    from LesionSegLib import corrections, mrml
    from LesionSegLib.engine.feedback import FeedbackStore
    from LesionSegLib.engine.feedback import corrections as cr
    from LesionSegLib.logic import LesionSegLogicCore

    volume, first = result
    logic = LesionSegLogicCore()
    second, _ = logic.segment(volume, model=str(default_model.folder), device="cpu", threshold=0.0)
    try:
        # the new pass is drawn alone; showing the first again (the result selector) hides the second
        assert second.GetDisplayNode().GetVisibility() and not first.GetDisplayNode().GetVisibility()
        logic.reopen(first)
        assert first.GetDisplayNode().GetVisibility() and not second.GetDisplayNode().GetVisibility()
        for seg in (first, second):  # each reviewer pass removes one proposal (the last edit: second)
            seg.GetSegmentation().RemoveSegment(mrml.find_segment(seg, 2 if seg is first else 1)[0])
        asked = []
        saved = corrections.save_on_close(str(tmp_path / "fb.db"), lambda names: asked.append(names) or True)
        assert saved[second.GetName()]["deleted"] == 1
        assert "not saved" in saved[first.GetName()] and second.GetName() in saved[first.GetName()]["not saved"]
        assert asked[0][0] == second.GetName() and "not saved" in asked[0][1]  # the question says so before
        [case] = cr.load_cases(FeedbackStore(tmp_path / "fb.db"))
        assert case.case_name == CASE
    finally:
        mrml.remove_result_nodes(second)


def test_ood_warning_is_kept_on_the_node(slicer_app):  # noqa: F811
    import types

    import slicer

    from LesionSegLib import ood

    slicer_app.reset()
    node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "r")
    assert ood.warning(node) == "" and ood.score(node) is None
    text = "this scan looks unlike the model's training data (soft-tissue sarcoma); confidences are not reliable here"
    ood.annotate(node, types.SimpleNamespace(ood={"scan_score": 7.25, "warning": text}))
    assert ood.warning(node) == text and ood.score(node) == 7.25
    ood.annotate(node, types.SimpleNamespace(ood={"scan_score": 0.4, "warning": None}))
    assert ood.warning(node) == "" and ood.score(node) == 0.4
    slicer_app.reset()

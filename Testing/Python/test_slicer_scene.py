"""Saved scenes, terminology, study placement, review order and the feedback database, on real
MRML (slicer-core) and a real CT (validation case STS_041).

* A scene saved as ``.mrb`` with a LesionSeg result, cleared and opened again, is reviewed
  further: the lesion table is rebuilt from the segment tags (decisions included) and new
  decisions reach the same feedback store with their classifier patches.
* Each segment carries SNOMED CT Morphologically Altered Structure / Mass (plus the model card's
  anatomic region), which Slicer's own terminology logic resolves; the result sits under the
  input's study; a DICOM SEG of a CT from the DICOM database is added to that database.
* The review queue orders (confidence, most uncertain first, size), the queue position and time
  recorded with each decision, and the "n of m reviewed" counter.
* Both modules resolve the feedback database through one function (settings key, then
  ``$LESIONSEG_FEEDBACK``, then ``<Slicer settings folder>/LesionSeg/feedback.db``).
"""
from __future__ import annotations

import csv
import os
import sys
import types
import zipfile

import numpy as np
import pytest

from slicer_app_shim import REPO, data_dir, default_model, slicer_app  # noqa: F401 (fixtures)

CASE = "STS_041"


@pytest.fixture(scope="module")
def engine_result(slicer_app, data_dir, default_model):
    """The engine's result on the case (every candidate), computed once."""
    from LesionSegLib import mrml
    from LesionSegLib.engine.segment.pipeline import case_hash
    from LesionSegLib.logic import LesionSegLogicCore

    slicer_app.reset()
    path = data_dir / "sts" / CASE / "image.nii.gz"
    logic = LesionSegLogicCore()
    engine = logic.engine(str(default_model.folder), "cpu")
    volume = mrml.load_volume(str(path), CASE)
    image = mrml.volume_to_sitk(volume)
    result = engine.segment(image, threshold=0.0, keep_patches=True)
    assert len(result.lesions) >= 2, f"{CASE} gave {len(result.lesions)} candidate(s) at threshold 0; these tests need 2"
    slicer_app.reset()
    return types.SimpleNamespace(path=path, result=result, hash=case_hash(image), engine=engine)


@pytest.fixture
def fresh(slicer_app, engine_result, monkeypatch):
    """A clean scene holding the CT and a LesionSeg result of it (threshold 0: every candidate shows)."""
    from LesionSegLib import mrml
    from LesionSegLib.logic import LesionSegLogicCore

    monkeypatch.delenv("LESIONSEG_FEEDBACK", raising=False)
    slicer_app.reset()
    volume = mrml.load_volume(str(engine_result.path), CASE)
    logic = LesionSegLogicCore()
    seg, table = logic.add_result(volume, engine_result.result, engine_result.hash, threshold=0.0)
    yield types.SimpleNamespace(volume=volume, logic=logic, seg=seg, table=table, app=slicer_app, ref=engine_result.result)
    logic.disable_feedback_store()
    slicer_app.reset()


def _save_mrb(app, path):
    """Save the scene as a Slicer data bundle (what File > Save does for .mrb): a zip of the bundle folder."""
    folder = path.parent / (path.stem + "_bundle")
    folder.mkdir()
    assert app.app_logic.SaveSceneToSlicerDataBundleDirectory(str(folder), None)
    with zipfile.ZipFile(path, "w") as z:
        for root, _, files in os.walk(folder):
            for f in files:
                full = os.path.join(root, f)
                z.write(full, os.path.relpath(full, folder.parent))
    return path


# ---------------------------------------------------------------------------- saved scenes
def test_saved_scene_is_reviewed_further(fresh, tmp_path):
    from LesionSegLib import mrml
    from LesionSegLib.engine.feedback import FeedbackStore
    from LesionSegLib.logic import LesionSegLogicCore

    db = tmp_path / "feedback.db"
    fresh.logic.enable_feedback_store(db)
    fresh.logic.set_review_order(fresh.seg, "uncertainty")
    first = mrml.review_queue(fresh.seg)[0]
    fresh.logic.review(fresh.seg, first, "accepted")
    fresh.logic.disable_feedback_store()
    before_rows = mrml.table_rows(fresh.table)
    mrb = _save_mrb(fresh.app, tmp_path / "review.mrb")

    scene = fresh.app.scene
    scene.Clear(False)
    assert not mrml.lesion_segmentation_nodes(scene)
    (tmp_path / "unpacked").mkdir()
    assert fresh.app.app_logic.OpenSlicerDataBundle(str(mrb), str(tmp_path / "unpacked"))

    results = mrml.lesion_segmentation_nodes(scene)
    assert len(results) == 1
    seg = results[0]
    assert mrml.reference_volume(seg).GetName() == CASE
    logic = LesionSegLogicCore()  # a new session: nothing in memory
    table = logic.reopen(seg)
    assert mrml.get_review_order(seg) == "uncertainty"
    assert mrml.table_rows(table) == before_rows  # rebuilt from the tags, decision included
    assert mrml.review_state(seg, first) == "accepted" and mrml.segment_status(seg, first) == "completed"
    assert mrml.review_progress(seg) == (1, len(fresh.ref.lesions))

    # continue the review: the decision carries the classifier patch kept in the scene
    logic.enable_feedback_store(db)
    queue = mrml.review_queue(seg)
    second = next(i for i in queue if i != first)
    d = logic.review(seg, second, "rejected")
    expected = next(les for les in fresh.ref.lesions if les.lesion_id == second)
    assert d.patch is not None and np.array_equal(d.patch, expected.patch.astype(np.float16))
    assert set(d.features) == set(expected.features)
    assert (d.queue_position, d.queue_length, d.review_order) == (queue.index(second) + 1, len(queue), "uncertainty")
    logic.disable_feedback_store()
    with FeedbackStore(db) as store:
        stats = store.stats()
        assert stats["decisions"] == 2 and stats["with_patch"] == 2
    assert mrml.review_progress(seg) == (2, len(fresh.ref.lesions))


def test_lost_table_is_rebuilt_from_tags(fresh):
    from LesionSegLib import mrml

    fresh.logic.review(fresh.seg, 1, "rejected")
    fresh.app.scene.RemoveNode(fresh.table)
    assert mrml.get_table_node(fresh.seg) is None
    table = fresh.logic.reopen(fresh.seg)
    rows = {r["ID"]: r for r in mrml.table_rows(table)}
    assert rows[1]["Status"] == "rejected" and len(rows) == len(fresh.ref.lesions)
    with pytest.raises(ValueError, match="not a LesionSeg result"):
        fresh.logic.reopen(fresh.app.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "other"))


# -------------------------------------------------------------------- terminology, study
def test_terminology_and_study_placement(slicer_app, engine_result):
    import slicer

    from LesionSegLib import mrml
    from LesionSegLib.logic import LesionSegLogicCore

    slicer_app.reset()
    scene = slicer_app.scene
    volume = mrml.load_volume(str(engine_result.path), CASE)
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    patient = sh.CreateSubjectItem(sh.GetSceneItemID(), "Patient 1")
    study = sh.CreateStudyItem(patient, "CT study")
    if sh.GetItemByDataNode(volume):
        sh.SetItemParent(sh.GetItemByDataNode(volume), study)
    else:  # the DICOM module puts a loaded series under its study; here the test does
        sh.CreateItem(study, volume)
    assert sh.GetItemParent(sh.GetItemByDataNode(volume)) == study
    region = ("SCT", "61685007", "Lower limb")
    seg, table = LesionSegLogicCore().add_result(volume, engine_result.result, engine_result.hash, threshold=0.5, region=region)
    try:
        for node in (seg, table):
            assert sh.GetItemParent(sh.GetItemByDataNode(node)) == study
        terminologies = slicer.modules.terminologies.logic()
        for d in mrml.lesions(seg):
            _, segment = mrml.find_segment(seg, d["lesion_id"])
            entry = slicer.vtkSlicerTerminologyEntry()
            assert terminologies.DeserializeTerminologyEntry(mrml.get_tag(segment, segment.GetTerminologyEntryTagName()), entry)
            assert entry.GetCategoryObject().GetCodeValue() == "49755003"
            assert entry.GetTypeObject().GetCodeValue() == "4147007"
            assert entry.GetTypeObject().GetCodeMeaning() == "Mass"
            assert entry.GetRegionObject().GetCodeValue() == "61685007"
            # the type is the one of Slicer's General Anatomy list that the Segment Editor offers
            found = slicer.vtkSlicerTerminologyType()
            category = slicer.vtkSlicerTerminologyCategory()
            assert terminologies.GetNthCategoryInTerminology(mrml.TERMINOLOGY_CONTEXT, _category_index(terminologies), category)
            assert category.GetCodeValue() == "49755003"
            n_types = terminologies.GetNumberOfTypesInTerminologyCategory(mrml.TERMINOLOGY_CONTEXT, category)
            names = [_type_name(terminologies, category, i, found) for i in range(n_types)]
            assert "Mass" in names
            assert mrml.terminology_codes(segment) == {"category": mrml.LESION_CATEGORY, "type": mrml.LESION_TYPE, "region": region}
    finally:
        mrml.remove_result_nodes(seg)
        slicer_app.reset()


def _category_index(terminologies):
    import slicer

    from LesionSegLib import mrml

    category = slicer.vtkSlicerTerminologyCategory()
    for i in range(terminologies.GetNumberOfCategoriesInTerminology(mrml.TERMINOLOGY_CONTEXT)):
        terminologies.GetNthCategoryInTerminology(mrml.TERMINOLOGY_CONTEXT, i, category)
        if category.GetCodeValue() == mrml.LESION_CATEGORY[1]:
            return i
    raise AssertionError("category not in Slicer's General Anatomy list")


def _type_name(terminologies, category, i, out):
    from LesionSegLib import mrml

    terminologies.GetNthTypeInTerminologyCategory(mrml.TERMINOLOGY_CONTEXT, category, i, out)
    return out.GetCodeMeaning()


def test_anatomic_region_from_model_card():
    from LesionSegLib import mrml

    assert mrml.anatomic_region({"anatomic_region": {"scheme": "SCT", "code": "61685007", "meaning": "Lower limb"}}) == ("SCT", "61685007", "Lower limb")
    assert mrml.anatomic_region({"anatomic_region": {"scheme": "SCT"}}) is None
    assert mrml.anatomic_region({}) is None
    assert mrml.terminology_entry().split("~")[2] == "SCT^4147007^Mass"


class _FakeDicomDatabase:
    """``slicer.dicomDatabase``: the instance files it knows, the files inserted."""

    def __init__(self, files_by_uid):
        self.files = dict(files_by_uid)
        self.inserted = []

    def fileForInstance(self, uid):
        return self.files.get(uid, "")

    def insert(self, path, *args):
        self.inserted.append(str(path))


def test_dicom_seg_goes_to_the_dicom_database(fresh, tmp_path, monkeypatch):
    import pydicom
    import slicer

    from LesionSegLib import mrml
    from test_slicer_logic import make_dicom_series

    files = make_dicom_series(mrml.volume_to_sitk(fresh.volume), tmp_path / "dicom")
    uids = [str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files]
    volume = mrml.load_volume(str(files[0]), "CT from DICOM")
    seg, _ = fresh.logic.add_result(volume, fresh.ref, "hash", threshold=0.0)

    # loaded from files, not from the database: nothing is inserted
    db = _FakeDicomDatabase({})
    monkeypatch.setattr(slicer, "dicomDatabase", db, raising=False)
    paths = fresh.logic.export(seg, tmp_path / "a", formats=("dicomseg",))
    assert "dicomseg" in paths and "dicom_database" not in paths and db.inserted == []

    # loaded through the DICOM module: the instance UIDs resolve in the database
    volume.SetAttribute("DICOM.instanceUIDs", " ".join(uids))
    db.files = {u: str(f) for u, f in zip(uids, files)}
    paths = fresh.logic.export(seg, tmp_path / "b", formats=("dicomseg",))
    assert db.inserted == [str(paths["dicomseg"])] and paths["dicom_database"] == paths["dicomseg"]


# ------------------------------------------------------------------------ review order
def test_review_queue_orders():
    from LesionSegLib.review import next_unreviewed, review_queue

    lesions = [
        {"lesion_id": 1, "confidence": 0.95, "volume_ml": 2.0},
        {"lesion_id": 2, "confidence": 0.55, "volume_ml": 9.0},
        {"lesion_id": 3, "confidence": 0.40, "volume_ml": 0.5},
        {"lesion_id": 4, "confidence": 0.05, "volume_ml": 4.0},
    ]
    assert review_queue(lesions, "confidence", 0.5) == [1, 2, 3, 4]
    assert review_queue(lesions, "uncertainty", 0.5) == [2, 3, 1, 4]  # |c - 0.5|: .05, .10, .45, .45 (tie: higher c first)
    assert review_queue(lesions, "uncertainty", 0.9) == [1, 2, 3, 4]
    assert review_queue(lesions, "size", 0.5) == [2, 4, 1, 3]
    with_ood = [dict(d, ood_score=s) for d, s in zip(lesions, (0.1, 0.2, 0.9, 0.3))]
    assert review_queue(with_ood, "uncertainty", 0.5) == [3, 4, 2, 1]  # the OOD score wins once it exists
    with pytest.raises(ValueError):
        review_queue(lesions, "random", 0.5)
    assert next_unreviewed([2, 3, 4, 1], {3}, 2) == 4
    assert next_unreviewed([2, 3, 4, 1], {2, 3, 4, 1}, 2) is None
    assert next_unreviewed([2, 3, 4, 1], set(), None) == 2


def test_queue_position_time_and_counter(fresh, tmp_path):
    from LesionSegLib import mrml
    from LesionSegLib.review import ReviewClock

    now = [100.0]
    fresh.logic.clock = ReviewClock(clock=lambda: now[0])
    seg = fresh.seg
    n = len(fresh.ref.lesions)
    assert mrml.review_progress(seg) == (0, n)
    queue = fresh.logic.set_review_order(seg, "size")
    assert queue == [d["lesion_id"] for d in sorted(mrml.lesions(seg), key=lambda d: (-d["volume_ml"], d["lesion_id"]))]
    assert [r["ID"] for r in mrml.table_rows(fresh.table)] == queue  # the table follows the queue
    target = queue[1]
    fresh.logic.jump_to_lesion(seg, target)
    now[0] += 7.5
    d = fresh.logic.review(seg, target, "rejected")
    assert (d.queue_position, d.queue_length, d.review_order, d.seconds) == (2, n, "size", 7.5)
    info = mrml.lesion_info(mrml.find_segment(seg, target)[1])
    assert (info["queue_position"], info["review_order"], info["review_seconds"]) == (2, "size", 7.5)
    assert mrml.review_progress(seg) == (1, n)
    paths = fresh.logic.export(seg, tmp_path, formats=("csv",))
    with open(paths["csv"], newline="") as fh:
        rows = {int(r["lesion_id"]): r for r in csv.DictReader(fh)}
    assert (rows[target]["queue_position"], rows[target]["review_order"], rows[target]["review_seconds"]) == ("2", "size", "7.5")
    other = next(i for i in queue if i != target)
    assert rows[other]["queue_position"] == "" and rows[other]["status"] == "unreviewed"
    # a higher threshold hides lesions: the counter counts what the reviewer sees
    mrml.set_threshold(seg, 0.5)
    shown = mrml.visible_lesions(seg)
    assert mrml.review_progress(seg) == (sum(x["review"] != "unreviewed" for x in shown), len(shown))
    with pytest.raises(ValueError):
        mrml.set_review_order(seg, "alphabetical")


# ------------------------------------------------------------------- feedback database (R4)
def test_one_feedback_database_for_both_modules(slicer_app, tmp_path, monkeypatch):
    import slicer

    from LesionSegLib import settings
    from LesionSegLib.logic import LesionSegLogicCore

    sys.path.insert(0, str(REPO / "LesionSegTraining"))
    from LesionSegTrainingLib.logic import default_database_path

    slicer_app.reset()
    monkeypatch.delenv("LESIONSEG_FEEDBACK", raising=False)
    both = lambda: (LesionSegLogicCore.feedback_database_path(), default_database_path())  # noqa: E731
    # outside Slicer: the CLI default
    assert both() == (settings.Path.home() / ".lesionseg" / "feedback.db",) * 2
    # inside Slicer: beside Slicer.ini
    slicer.app.slicerUserSettingsFilePath = str(tmp_path / "settings" / "Slicer.ini")
    assert both() == (tmp_path / "settings" / "LesionSeg" / "feedback.db",) * 2
    # $LESIONSEG_FEEDBACK is honoured by both
    monkeypatch.setenv("LESIONSEG_FEEDBACK", str(tmp_path / "env.db"))
    assert both() == (tmp_path / "env.db",) * 2
    # the user's choice (Training panel) wins, for both
    settings.set_feedback_database_path(tmp_path / "chosen.db")
    assert slicer.app.userSettings().value(settings.FEEDBACK_DB_KEY) == str(tmp_path / "chosen.db")
    assert both() == (tmp_path / "chosen.db",) * 2
    settings.set_feedback_database_path(None)
    assert both() == (tmp_path / "env.db",) * 2
    assert not any(tmp_path.rglob("*.db"))  # resolving a path never creates the file

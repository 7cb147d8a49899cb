"""LesionSeg module logic against real MRML (slicer-core) and a real CT.

One engine run in this process (``logic.segment``) is checked against the engine run directly on
the image file; then threshold, review, navigation and every export are checked on it.  The
background CLI runner (the Segment button's path) is in ``test_slicer_background.py``.
"""
from __future__ import annotations

import csv
import time
import types
from pathlib import Path

import numpy as np
import pytest

from slicer_app_shim import data_dir, default_model, slicer_app  # noqa: F401 (fixtures)

CASE = "STS_041"  # a validation case (76x82x53 voxels): the tumour plus a low-confidence candidate at threshold 0
MIN_LESIONS = 2  # what these tests need; the fixture fails (never skips) when the model finds fewer


@pytest.fixture(scope="module")
def run(slicer_app, data_dir, default_model):
    import SimpleITK as sitk

    from LesionSegLib import mrml
    from LesionSegLib.engine.segment.pipeline import case_hash
    from LesionSegLib.logic import LesionSegLogicCore

    slicer_app.reset()
    path = data_dir / "sts" / CASE / "image.nii.gz"
    volume = mrml.load_volume(str(path), CASE)
    logic = LesionSegLogicCore()
    t = time.perf_counter()
    progress = []
    seg, table = logic.segment(volume, model=str(default_model.folder), device="cpu", progress=lambda f, s: progress.append((f, s)))
    seconds = time.perf_counter() - t
    initial_threshold = mrml.get_threshold(seg)
    file_image = sitk.ReadImage(str(path))
    engine = logic.engine(str(default_model.folder), "cpu")
    ref = engine.segment(file_image, threshold=0.0, keep_patches=True)
    assert len(ref.lesions) >= MIN_LESIONS, f"{CASE} gave {len(ref.lesions)} candidate(s) at threshold 0; the tests need {MIN_LESIONS}"
    yield types.SimpleNamespace(path=path, volume=volume, logic=logic, seg=seg, table=table, ref=ref, engine=engine,
                                file_image=file_image, case_hash=case_hash(file_image), seconds=seconds, app=slicer_app,
                                progress=progress, initial_threshold=initial_threshold)
    slicer_app.reset()


def _lesion(ref, lesion_id):
    return next(les for les in ref.lesions if les.lesion_id == lesion_id)


def _as_segmented(run) -> None:
    """Put the shared node back as ``logic.segment`` left it (no lesion reviewed, the model's
    threshold), whatever the tests before this one decided or set."""
    from LesionSegLib import mrml

    for les in run.ref.lesions:
        mrml.set_review(run.seg, les.lesion_id, "unreviewed")
    mrml.set_threshold(run.seg, run.engine.default_threshold)


# ---------------------------------------------------------------------------- geometry
def test_volume_to_sitk_matches_file(run):
    import SimpleITK as sitk

    from LesionSegLib import mrml

    img = mrml.volume_to_sitk(run.volume)
    ref = run.file_image
    assert img.GetSize() == ref.GetSize()
    np.testing.assert_allclose(img.GetSpacing(), ref.GetSpacing(), atol=1e-6)
    np.testing.assert_allclose(img.GetOrigin(), ref.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(img.GetDirection(), ref.GetDirection(), atol=1e-6)
    assert np.array_equal(sitk.GetArrayViewFromImage(img), sitk.GetArrayViewFromImage(ref))
    # a voxel's RAS position (Slicer) is its LPS position (ITK) with x, y negated
    ijk = (5, 7, 11)
    lps = np.array(ref.TransformIndexToPhysicalPoint(ijk))
    ras = mrml.ijk_to_ras(run.volume) @ np.array([*ijk, 1.0])
    np.testing.assert_allclose(ras[:3], lps * [-1, -1, 1], atol=1e-4)


# --------------------------------------------------------------------- segments vs engine
def test_segments_match_engine(run):
    import slicer

    from LesionSegLib import export, mrml
    from LesionSegLib.engine.segment.colors import confidence_color

    _as_segmented(run)
    ref, seg = run.ref, run.seg
    records = mrml.lesions(seg)
    assert len(records) == len(ref.lesions) == seg.GetSegmentation().GetNumberOfSegments()
    assert [d["lesion_id"] for d in records] == [les.lesion_id for les in ref.lesions] == list(range(1, len(records) + 1))
    np.testing.assert_allclose([d["confidence"] for d in records], [les.confidence for les in ref.lesions], atol=1e-5)
    assert [d["n_voxels"] for d in records] == [les.n_voxels for les in ref.lesions]
    # voxels: the segments, exported back on the volume grid, are the engine's labelmap
    labelmap = export.instance_labelmap(seg, [d["lesion_id"] for d in records], run.volume)
    assert np.array_equal(labelmap, ref.labelmap)
    for d in records:
        les = _lesion(ref, d["lesion_id"])
        assert d["name"] == les.name == f"Lesion {les.lesion_id} ({les.confidence:.2f})"
        np.testing.assert_allclose(d["color"], confidence_color(les.confidence), atol=1e-6)
        assert d["review"] == "unreviewed"
        assert mrml.segment_status(seg, les.lesion_id) == "notstarted"
        assert d["model_id"] == run.engine.card.id
        assert d["case_hash"] == run.case_hash
        assert d["features"] and set(d["features"]) == set(les.features)
        np.testing.assert_allclose(d["centroid_lps"], les.centroid_lps, atol=1e-3)
        assert int((labelmap == les.lesion_id).sum()) == les.n_voxels
    # reference geometry is the input volume
    assert mrml.reference_volume(seg) is run.volume
    geometry = seg.GetSegmentation().GetConversionParameter(slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName())
    assert geometry
    assert seg.GetAttribute(mrml.ATTR_CASE_HASH) == run.case_hash
    assert run.seconds < 240


def test_progress_and_cancel_in_process(run):
    from LesionSegLib.engine.errors import CancelledError

    stages = [s for _, s in run.progress]
    assert "inference" in stages and stages[-1] == "confidence"
    fractions = [f for f, _ in run.progress]
    assert fractions == sorted(fractions) and fractions[-1] == pytest.approx(1.0)
    scene = run.volume.GetScene()
    before = scene.GetNumberOfNodes()
    with pytest.raises(CancelledError):
        run.logic.segment(run.volume, model=str(run.engine.card.folder), device="cpu", cancel=lambda: True)
    assert scene.GetNumberOfNodes() == before  # no half-made nodes


# ------------------------------------------------------------------------ table/threshold
def test_table_and_threshold(run):
    from LesionSegLib import mrml

    seg, table, ref = run.seg, run.table, run.ref
    assert [table.GetTable().GetColumn(c).GetName() for c in range(table.GetNumberOfColumns())] == [
        "ID", "Confidence", "Volume (ml)", "Diameter (mm)", "Mean HU", "Status"]
    default = run.engine.default_threshold
    assert run.initial_threshold == pytest.approx(default)  # segment starts at the card's threshold
    _as_segmented(run)
    assert mrml.get_threshold(seg) == pytest.approx(default)
    confidences = sorted({round(les.confidence, 6) for les in ref.lesions})
    layer_before = seg.GetSegmentation().GetSegment("lesion_1").GetRepresentation("Binary labelmap") if ref.lesions else None
    try:
        for thr in [0.0, 1.01] + ([confidences[len(confidences) // 2]] if confidences else []):
            shown = mrml.set_threshold(seg, thr)
            expected = [les for les in ref.lesions if round(les.confidence, 6) >= thr - 1e-9]  # tags hold 6 decimals
            assert shown == len(expected) == table.GetNumberOfRows()
            rows = mrml.table_rows(table)
            assert sorted(r["ID"] for r in rows) == sorted(les.lesion_id for les in expected)
            assert [r["Confidence"] for r in rows] == sorted((r["Confidence"] for r in rows), reverse=True)
            display = seg.GetDisplayNode()
            for les in ref.lesions:
                assert display.GetSegmentVisibility(mrml.segment_id(les.lesion_id)) == (round(les.confidence, 6) >= thr - 1e-9)
            for r in rows:
                les = _lesion(ref, r["ID"])
                assert r["Volume (ml)"] == pytest.approx(les.volume_ml, abs=0.006)
                assert r["Diameter (mm)"] == pytest.approx(les.diameter_mm, abs=0.06)
                assert r["Mean HU"] == pytest.approx(les.mean_hu, abs=0.06)
        # nothing was recomputed: same segments, same labelmap object
        assert seg.GetSegmentation().GetNumberOfSegments() == len(ref.lesions)
        if layer_before is not None:
            assert seg.GetSegmentation().GetSegment("lesion_1").GetRepresentation("Binary labelmap") is layer_before
    finally:
        mrml.set_threshold(seg, 0.0)


def test_a_reviewer_decision_survives_the_threshold_and_hidden_lesions_are_not_added_twice(run):
    """Raising the threshold above an accepted lesion's confidence keeps it in the table and the
    exports (it vanished before, counter "0 of 0"); a click on a lesion that the threshold hides
    is refused with a pointer to the threshold, not added again as a "missed" lesion."""
    from LesionSegLib import click, export, mrml

    seg, table = run.seg, run.table
    top = max(run.ref.lesions, key=lambda les: les.confidence)
    low = min(run.ref.lesions, key=lambda les: les.confidence)
    try:
        run.logic.review(seg, top.lesion_id, "accepted")
        assert mrml.set_threshold(seg, min(1.0, top.confidence + 1e-3)) == 1 == table.GetNumberOfRows()
        assert [d["lesion_id"] for d in mrml.visible_lesions(seg)] == [top.lesion_id]
        assert seg.GetDisplayNode().GetSegmentVisibility(mrml.segment_id(top.lesion_id))
        assert [int(r["lesion_id"]) for r in export.csv_rows(seg)] == [top.lesion_id]  # and it is exported
        # the low-confidence candidate is hidden at the model's threshold; a click on it is refused
        mrml.set_threshold(seg, run.engine.default_threshold)
        assert low.confidence < run.engine.default_threshold
        ras = (-low.centroid_lps[0], -low.centroid_lps[1], low.centroid_lps[2])
        if click.lesion_at(seg, ras) is None:  # a non-convex candidate: use one of its voxels
            k, j, i = np.argwhere(run.ref.labelmap == low.lesion_id)[0]
            lps = run.file_image.TransformIndexToPhysicalPoint((int(i), int(j), int(k)))
            ras = (-lps[0], -lps[1], lps[2])
        n = seg.GetSegmentation().GetNumberOfSegments()
        with pytest.raises(Exception, match=f"inside lesion {low.lesion_id}, which the model found with confidence .* hides"):
            click.add_lesion(run.volume, seg, ras, run.engine)
        assert seg.GetSegmentation().GetNumberOfSegments() == n
    finally:
        run.logic.review(seg, top.lesion_id, "unsure")
        mrml.set_threshold(seg, 0.0)


# ------------------------------------------------------------------------------- review
class _ListSink:
    def __init__(self):
        self.decisions = []

    def record(self, decision):
        self.decisions.append(decision)


class _BrokenSink:
    def record(self, decision):
        raise OSError("disk full")


def test_review_status_colour_tags_and_recorder(run, tmp_path):
    from LesionSegLib import mrml
    from LesionSegLib.engine.segment.colors import ACCEPTED_COLOR, REJECTED_COLOR, confidence_color

    seg, logic = run.seg, run.logic
    sink = _ListSink()
    logic.recorder.add_sink(sink)
    try:
        for lesion_id, decision, status, color in (
            (1, "accepted", "completed", ACCEPTED_COLOR),
            (2, "rejected", "flagged", REJECTED_COLOR),
            (2, "unsure", "inprogress", confidence_color(_lesion(run.ref, 2).confidence)),  # a changed mind
        ):
            d = logic.review(seg, lesion_id, decision)
            assert mrml.segment_status(seg, lesion_id) == status
            assert mrml.review_state(seg, lesion_id) == decision
            _, segment = mrml.find_segment(seg, lesion_id)
            np.testing.assert_allclose(segment.GetColor(), color, atol=1e-6)
            row = next(r for r in mrml.table_rows(run.table) if r["ID"] == lesion_id)
            assert row["Status"] == decision
            les = _lesion(run.ref, lesion_id)
            assert d.decision == decision and d.lesion_id == lesion_id
            assert d.case_hash == run.case_hash and d.model_id == run.engine.card.id
            assert d.confidence == pytest.approx(les.confidence, abs=1e-5)
            assert d.patch is not None and d.patch.shape == les.patch.shape
            assert set(d.features) == set(les.features)
            assert d.bbox_ijk == les.bbox_ijk
        assert [x.lesion_id for x in sink.decisions] == [1, 2, 2]
        assert [x.decision for x in logic.recorder.log[-3:]] == ["accepted", "rejected", "unsure"]
        # a failing sink: the scene keeps the decision, the other sinks still get it, the error surfaces
        logic.recorder.add_sink(_BrokenSink())
        with pytest.raises(RuntimeError, match="disk full"):
            logic.review(seg, 2, "accepted")
        assert mrml.segment_status(seg, 2) == "completed"
        assert sink.decisions[-1].lesion_id == 2 and sink.decisions[-1].decision == "accepted"
        logic.recorder.sinks = [s for s in logic.recorder.sinks if not isinstance(s, _BrokenSink)]
        logic.review(seg, 2, "unsure")
        with pytest.raises(ValueError):
            logic.review(seg, 1, "maybe")
        with pytest.raises(KeyError):
            logic.review(seg, 10_000, "accepted")
    finally:
        logic.recorder.remove_sink(sink)


def test_feedback_store_sink(run, tmp_path):
    seg, logic = run.seg, run.logic
    store = logic.enable_feedback_store(tmp_path / "feedback.db")
    try:
        logic.review(seg, 1, "accepted")
        assert (tmp_path / "feedback.db").exists()
        assert store.count() == 1  # a fresh database, one decision
        (row,) = store.decisions()
        assert (row["lesion_id"], row["decision"], row["case_hash"]) == (1, "accepted", run.case_hash)
        assert row["model_id"] == run.engine.card.id
    finally:
        logic.disable_feedback_store()
        if hasattr(store, "close"):
            store.close()


# --------------------------------------------------------------------------- navigation
def test_jump_to_lesion_centres_slice_views(run):
    from LesionSegLib import mrml

    for les in run.ref.lesions[:3]:
        ras = run.logic.jump_to_lesion(run.seg, les.lesion_id)
        expected = np.array(les.centroid_lps) * [-1, -1, 1]
        np.testing.assert_allclose(ras, expected, atol=1e-2)
        for name in ("Red", "Yellow", "Green"):
            np.testing.assert_allclose(run.app.slice_center_ras(name), expected, atol=1e-2)
    order = [3, 1, 2]
    assert mrml.neighbour_lesion(order, 1, +1) == 2
    assert mrml.neighbour_lesion(order, 2, +1) == 3
    assert mrml.neighbour_lesion(order, 3, -1) == 2
    assert mrml.neighbour_lesion(order, None, +1) == 3
    assert mrml.neighbour_lesion([], None, +1) is None


# ------------------------------------------------------------------------------- export
def test_export_seg_nrrd_nifti_csv(run, tmp_path):
    import SimpleITK as sitk
    import slicerio

    from LesionSegLib import mrml
    from LesionSegLib.engine.segment.colors import ACCEPTED_COLOR, REJECTED_COLOR
    from LesionSegLib.engine.segment.result import ijk_to_lps

    seg, logic, ref = run.seg, run.logic, run.ref
    for les in ref.lesions:  # start from a clean review state
        mrml.set_review(seg, les.lesion_id, "unreviewed")
    logic.review(seg, 1, "accepted")
    logic.review(seg, 2, "rejected")
    thr = ref.lesions[1].confidence  # keeps at least lesions 1 and 2
    mrml.set_threshold(seg, thr)
    try:
        exported = [les for les in ref.lesions if les.confidence >= thr - 1e-9]
        ids = {les.lesion_id for les in exported}
        before = {n.GetID() for n in _nodes(seg.GetScene())}
        paths = logic.export(seg, tmp_path, formats=("seg.nrrd", "nifti", "csv", "dicomseg"))
        assert set(paths) == {"seg.nrrd", "nifti", "csv"}  # not from DICOM: no DICOM SEG
        assert {n.GetID() for n in _nodes(seg.GetScene())} == before  # no helper nodes left behind
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted([f"{CASE}.seg.nrrd", f"{CASE}_lesions.nii.gz", f"{CASE}_lesions.csv"])

        # .seg.nrrd, re-read with slicerio: names, colours, tags, status, geometry, voxels
        s = slicerio.read_segmentation(str(paths["seg.nrrd"]))
        assert {x["id"] for x in s["segments"]} == {mrml.segment_id(i) for i in ids}
        for x in s["segments"]:
            les = _lesion(ref, int(x["tags"]["LesionSeg.LesionId"]))
            assert x["name"] == les.name
            assert float(x["tags"]["LesionSeg.Confidence"]) == pytest.approx(les.confidence, abs=1e-6)
            assert x["tags"]["LesionSeg.Model"] == run.engine.card.id
            assert x["terminology"]["category"][1] == "49755003"  # SCT Morphologically Altered Structure
            assert x["terminology"]["type"][1] == "4147007"  # SCT Mass
            review = {1: "accepted", 2: "rejected"}.get(les.lesion_id)
            if review:
                assert x["tags"]["LesionSeg.Review"] == review
                assert x["status"] == {"accepted": "completed", "rejected": "flagged"}[review]
                np.testing.assert_allclose(x["color"], ACCEPTED_COLOR if review == "accepted" else REJECTED_COLOR, atol=1e-4)
        np.testing.assert_allclose(s["ijkToLPS"], ijk_to_lps(run.file_image), atol=1e-4)
        vox = np.transpose(s["voxels"], (2, 1, 0))  # (i, j, k) -> (k, j, i)
        off = s.get("referenceImageExtentOffset", [0, 0, 0])
        full = np.zeros(ref.labelmap.shape, dtype=np.int64)
        full[off[2]:off[2] + vox.shape[0], off[1]:off[1] + vox.shape[1], off[0]:off[0] + vox.shape[2]] = vox
        label_of = {x["labelValue"]: int(x["tags"]["LesionSeg.LesionId"]) for x in s["segments"]}
        lut = np.zeros(max(label_of) + 1, dtype=np.int64)
        for value, lid in label_of.items():
            lut[value] = lid
        expected = np.where(np.isin(ref.labelmap, list(ids)), ref.labelmap, 0)
        assert np.array_equal(lut[full], expected)

        # NIfTI: input grid, voxel value = lesion id, only exported lesions
        nii = sitk.ReadImage(str(paths["nifti"]))
        assert nii.GetSize() == run.file_image.GetSize()
        np.testing.assert_allclose(nii.GetOrigin(), run.file_image.GetOrigin(), atol=1e-4)
        np.testing.assert_allclose(nii.GetSpacing(), run.file_image.GetSpacing(), atol=1e-5)
        np.testing.assert_allclose(nii.GetDirection(), run.file_image.GetDirection(), atol=1e-6)
        arr = sitk.GetArrayFromImage(nii)
        assert np.array_equal(arr, expected)

        # CSV: the same lesions, statuses, and voxel counts consistent with the NIfTI
        with open(paths["csv"], newline="") as fh:
            rows = list(csv.DictReader(fh))
        assert sorted(int(r["lesion_id"]) for r in rows) == sorted(ids)
        for r in rows:
            lid = int(r["lesion_id"])
            les = _lesion(ref, lid)
            assert r["status"] == {1: "accepted", 2: "rejected"}.get(lid, "unreviewed")
            assert int(r["n_voxels"]) == int((arr == lid).sum()) == les.n_voxels
            assert float(r["confidence"]) == pytest.approx(les.confidence, abs=1e-6)
            assert r["case_hash"] == run.case_hash
        table_ids = sorted(r["ID"] for r in mrml.table_rows(run.table))
        assert table_ids == sorted(ids)
    finally:
        mrml.set_threshold(seg, 0.0)


def _nodes(scene):
    return [scene.GetNthNode(i) for i in range(scene.GetNumberOfNodes())]


def make_dicom_series(image, folder: Path) -> list[Path]:
    """Write ``image`` as a CT DICOM series (one file per slice) with SimpleITK."""
    import SimpleITK as sitk
    from pydicom.uid import generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    d = np.asarray(image.GetDirection()).reshape(3, 3)
    iop = "\\".join(f"{v:.6f}" for v in list(d[:, 0]) + list(d[:, 1]))
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    files = []
    for k in range(image.GetDepth()):
        sl = image[:, :, k]
        ipp = "\\".join(f"{v:.6f}" for v in image.TransformIndexToPhysicalPoint((0, 0, k)))
        for tag, value in {
            "0008|0060": "CT", "0008|0016": "1.2.840.10008.5.1.4.1.1.2", "0008|0018": generate_uid(),
            "0020|000d": study, "0020|000e": series, "0020|0052": frame, "0020|0011": "3", "0020|0013": str(k + 1),
            "0010|0010": "LesionSeg^Test", "0010|0020": "LS-0001", "0008|0020": "20240101", "0008|0030": "120000",
            "0008|103e": "CT for DICOM SEG test", "0020|0032": ipp, "0020|0037": iop,
            "0018|0050": f"{image.GetSpacing()[2]:.6f}", "0028|1052": "0", "0028|1053": "1",
        }.items():
            sl.SetMetaData(tag, value)
        path = folder / f"ct_{k:04d}.dcm"
        writer.SetFileName(str(path))
        writer.Execute(sl)
        files.append(path)
    return files


def test_dicom_seg_export(run, tmp_path):
    import highdicom as hd
    import pydicom

    from LesionSegLib import export, mrml

    ref = run.ref
    files = make_dicom_series(run.file_image, tmp_path / "dicom")
    volume = mrml.load_volume(str(files[0]), "CT from DICOM")
    scene = volume.GetScene()
    try:
        assert sorted(export.dicom_source_files(volume)) == sorted(str(f) for f in files)
        assert export.dicom_source_files(run.volume) == []
        image = mrml.volume_to_sitk(volume)
        np.testing.assert_allclose(image.GetOrigin(), run.file_image.GetOrigin(), atol=1e-3)
        # the engine result of the same voxels, on this volume (what the GUI does after a background run)
        seg, table = run.logic.add_result(volume, ref, run.case_hash, threshold=0.0)
        rejected = ref.lesions[1].lesion_id
        run.logic.review(seg, rejected, "rejected")
        paths = run.logic.export(seg, tmp_path / "out", formats=("dicomseg",))
        dcm = hd.seg.segread(str(paths["dicomseg"]))
        kept = [les for les in ref.lesions if les.lesion_id != rejected]  # rejected lesions are left out
        assert dcm.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4"
        assert dcm.number_of_segments == len(kept)
        labels = [dcm.get_segment_description(n).SegmentLabel for n in range(1, len(kept) + 1)]
        assert labels == [f"Lesion {les.lesion_id} ({les.confidence:.2f}) unreviewed" for les in kept]
        desc = dcm.get_segment_description(1)
        assert desc.segmented_property_category.value == "49755003"  # the segment's terminology travels
        assert desc.segmented_property_type.value == "4147007"
        name, _, version = run.engine.card.id.partition("@")
        assert desc.algorithm_identification[0].AlgorithmName == f"LesionSeg {name}"
        assert desc.algorithm_identification[0].AlgorithmVersion == version
        assert len(desc.RecommendedDisplayCIELabValue) == 3  # the segment colour travels too
        assert str(dcm.StudyInstanceUID) == str(pydicom.dcmread(files[0]).StudyInstanceUID)
        # masks per source slice equal the labelmap slices (segment n = n-th kept lesion)
        datasets = {pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID: k for k, f in enumerate(files)}
        uids = list(datasets)
        pixels = dcm.get_pixels_by_source_instance(
            source_sop_instance_uids=uids, segment_numbers=list(range(1, len(kept) + 1)),
            combine_segments=True, relabel=False, ignore_spatial_locations=True,
            assert_missing_frames_are_empty=True,
        )
        number_of = np.zeros(int(ref.labelmap.max()) + 1, dtype=np.int64)
        for n, les in enumerate(kept, start=1):
            number_of[les.lesion_id] = n
        expected = number_of[ref.labelmap]
        for u, uid in enumerate(uids):
            assert np.array_equal(pixels[u], expected[datasets[uid]]), f"slice {datasets[uid]} differs"
        # every lesion rejected: "Export all" refuses before writing anything (it wrote .seg.nrrd,
        # NIfTI and CSV, then failed on the DICOM SEG and said "Export failed")
        for les in kept:
            run.logic.review(seg, les.lesion_id, "rejected")
        with pytest.raises(ValueError, match="no lesion to export as DICOM SEG .* nothing was written"):
            run.logic.export(seg, tmp_path / "all")
        assert not (tmp_path / "all").exists() or list((tmp_path / "all").iterdir()) == []
        done = run.logic.export(seg, tmp_path / "all", formats=("seg.nrrd", "csv"))
        assert set(done) == {"seg.nrrd", "csv"}
        # a format that fails leaves none of the others, and no temporary file
        afile = tmp_path / "afile"
        afile.write_text("mine")
        with pytest.raises(ValueError, match=f"output folder {afile} is a file, not a folder"):
            run.logic.export(seg, afile)
        run.logic.review(seg, kept[0].lesion_id, "accepted")
        blocked = tmp_path / "blocked"
        (blocked / done["csv"].name).mkdir(parents=True)  # a folder in the way of the CSV
        with pytest.raises(OSError):
            run.logic.export(seg, blocked)
        assert sorted(p.name for p in blocked.iterdir()) == [done["csv"].name]
        mrml.remove_result_nodes(seg)
        assert table.GetScene() is None
    finally:
        scene.RemoveNode(volume)

"""DICOM SEG export of a LesionSeg result in the cases an audit found wrong (real MRML, a real
case written as a DICOM series, read back with highdicom):

* a volume moved by a hardened transform after loading: the SEG marked other anatomy on the
  series (1,361 of 7,249 pixels on the lesion); now refused, and Export all writes nothing;
* a lesion drawn by hand was exported as automatic AI output; a lesion erased in the Segment
  Editor became an empty segment; a model id over 64 characters failed the export (DICOM LO).
"""
from __future__ import annotations

import numpy as np
import pytest

from slicer_app_shim import data_dir, default_model, slicer_app  # noqa: F401 (fixtures)
from test_slicer_logic import make_dicom_series, run  # noqa: F401 (the module's fixture: one in-process run on STS_041)


@pytest.fixture
def from_dicom(run, tmp_path):
    """The run's CT loaded from a DICOM series, with the run's result on it (threshold 0)."""
    from LesionSegLib import mrml

    files = make_dicom_series(run.file_image, tmp_path / "dicom")
    volume = mrml.load_volume(str(files[0]), "CT from DICOM")
    seg, _ = run.logic.add_result(volume, run.ref, run.case_hash, threshold=0.0)
    yield volume, seg, files
    mrml.remove_result_nodes(seg)
    volume.GetScene().RemoveNode(volume)


def test_a_volume_moved_after_loading_is_refused(run, from_dicom, tmp_path):
    import slicer
    import vtk

    volume, seg, files = from_dicom
    transform = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    m = vtk.vtkMatrix4x4()
    m.SetElement(0, 3, 30.0)
    m.SetElement(2, 3, 20.0)
    transform.SetMatrixTransformToParent(m)
    volume.SetAndObserveTransformNodeID(transform.GetID())
    slicer.vtkSlicerTransformLogic().hardenTransform(volume)  # the voxels stay, the geometry moves
    slicer.mrmlScene.RemoveNode(transform)
    seg.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    with pytest.raises(RuntimeError, match=r"volume 'CT from DICOM' no longer matches the DICOM series it was loaded from "
                                           r"\(\d+% of the series' pixels differ .* would mark other anatomy"):
        run.logic.export(seg, tmp_path / "out")
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []  # all or nothing


def test_drawn_erased_and_long_model_ids(run, from_dicom, tmp_path):
    import highdicom as hd
    import slicer

    from LesionSegLib import measure, mrml

    volume, seg, files = from_dicom
    big, small = sorted(mrml.lesions(seg), key=lambda d: -d["n_voxels"])[:2]
    run.logic.review(seg, big["lesion_id"], "accepted")
    empty = np.zeros(slicer.util.arrayFromVolume(volume).shape, dtype=np.uint8)
    slicer.util.updateSegmentBinaryLabelmapFromArray(empty, seg, small["segment_id"], volume)  # erased
    drawn = seg.GetSegmentation().AddEmptySegment("", "Missed nodule")
    mask = empty.copy()
    mask[5:8, 10:16, 10:16] = 1
    slicer.util.updateSegmentBinaryLabelmapFromArray(mask, seg, drawn, volume)
    assert measure.update(seg, drawn) and measure.update(seg, small["segment_id"])  # what the panel's watch does
    long_id = "sts-clcs-finetuned-on-hospital-A-liver-and-lung-metastases-2024@1.1.0-ft.3"
    seg.SetAttribute(mrml.ATTR_MODEL, long_id)

    path = run.logic.export(seg, tmp_path / "out", formats=("dicomseg",))["dicomseg"]
    dcm = hd.seg.segread(str(path))
    described = {dcm.get_segment_description(n).SegmentLabel: dcm.get_segment_description(n)
                 for n in range(1, dcm.number_of_segments + 1)}
    assert set(described) == {f"Lesion {big['lesion_id']} ({big['confidence']:.2f}) accepted", "Missed nodule drawn"}
    auto = described[f"Lesion {big['lesion_id']} ({big['confidence']:.2f}) accepted"]
    assert auto.SegmentAlgorithmType == "SEMIAUTOMATIC"
    assert auto.algorithm_identification[0].AlgorithmName == "LesionSeg sts-clcs-finetuned-on-hospital-A-liver-and-lung-metastases-"[:64]
    assert auto.algorithm_identification[0].AlgorithmVersion == "1.1.0-ft.3"
    assert described["Missed nodule drawn"].SegmentAlgorithmType == "MANUAL"
    assert "SegmentationAlgorithmIdentificationSequence" not in described["Missed nodule drawn"]
    assert str(dcm.SoftwareVersions) == "1.1.0-ft.3"  # the id is over 64 characters (DICOM LO): its version


def test_overlapping_lesions_are_named_when_the_labelmaps_cannot_hold_them(run, from_dicom, tmp_path):
    """The NIfTI and the DICOM SEG are built from one instance labelmap: a lesion drawn over another
    gives the shared voxels to one of them there, which the export now says (the CSV and .seg.nrrd
    keep both whole)."""
    import slicer

    from LesionSegLib import measure, mrml

    volume, seg, files = from_dicom
    big = max(mrml.lesions(seg), key=lambda d: d["n_voxels"])
    own = slicer.util.arrayFromSegmentBinaryLabelmap(seg, big["segment_id"], volume) > 0
    k, j, i = (int(v) for v in np.argwhere(own).mean(axis=0).round())
    box = np.zeros(own.shape, dtype=np.uint8)
    box[k - 1:k + 1, j - 2:j + 2, i - 2:i + 2] = 1
    drawn = seg.GetSegmentation().AddEmptySegment("", "Drawn over")
    slicer.util.updateSegmentBinaryLabelmapFromArray(box, seg, drawn, volume)
    assert measure.update(seg, drawn)
    notes = []
    run.logic.export(seg, tmp_path / "out", formats=("nifti", "dicomseg", "csv"), notes=notes)
    assert len(notes) == 1 and notes[0].startswith("overlapping lesions: the NIfTI and DICOM SEG labelmap holds one lesion per voxel")
    assert f"({int((own & (box > 0)).sum()):,} of " in notes[0]
    notes.clear()
    run.logic.export(seg, tmp_path / "csv-only", formats=("csv",), notes=notes)
    assert notes == []  # the CSV lists each lesion whole

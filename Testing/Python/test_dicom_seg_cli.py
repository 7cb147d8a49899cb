"""``lesionseg segment --dicom-seg``: a DICOM SEG on the source series of a DICOM input (an audit
found no way to get one from the command line), read back with highdicom and compared voxel for
voxel with the NIfTI labelmap; a non-DICOM input gets a note and no file."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from LesionSegLib.engine import cli, data
from test_slicer_logic import make_dicom_series

DATA = Path(os.environ.get("LESIONSEG_DATA", Path(__file__).resolve().parents[3] / "shared" / "data"))
needs_data = pytest.mark.skipif(not (DATA / "manifest.csv").exists(), reason=f"shared CT data folder {DATA} is absent (set LESIONSEG_DATA)")


@needs_data
def test_segment_writes_a_dicom_seg_on_the_source_series(tmp_path, capsys):
    import highdicom as hd
    import pydicom

    image = sitk.ReadImage(str(data.case("STS_041").image))
    files = make_dicom_series(image, tmp_path / "ct")
    out = tmp_path / "out"
    assert cli.main(["segment", str(tmp_path / "ct"), "-o", str(out), "--dicom-seg", "--progress", "none", "--device", "cpu"]) == 0
    stem = next(out.glob("*_lesions.nii.gz")).name[:-len("_lesions.nii.gz")]
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{stem}{s}" for s in (".seg.nrrd", "_lesions.csv", "_lesions.dcm", "_lesions.nii.gz"))
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(out / f"{stem}_lesions.nii.gz")))
    assert labels.max() >= 1

    seg = hd.seg.segread(str(out / f"{stem}_lesions.dcm"))
    source = pydicom.dcmread(files[0], stop_before_pixels=True)
    assert seg.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4" and seg.StudyInstanceUID == source.StudyInstanceUID
    assert seg.FrameOfReferenceUID == source.FrameOfReferenceUID
    assert seg.number_of_segments == int(labels.max())
    first = seg.get_segment_description(1)
    assert first.SegmentLabel.startswith("Lesion 1 (") and first.SegmentAlgorithmType == "AUTOMATIC"
    assert first.algorithm_identification[0].AlgorithmName == "LesionSeg sts-clcs"
    uids = [pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in files]  # slice k = file k
    pixels = seg.get_pixels_by_source_instance(source_sop_instance_uids=uids, combine_segments=True, relabel=False,
                                               ignore_spatial_locations=True, assert_missing_frames_are_empty=True)
    assert np.array_equal(pixels, labels)

    # a cohort folder whose case holds its series below it (cohort/PAT/study/series/*.dcm), as segment and
    # batch read it since d4674e1 (the case is PAT): the SEG must find the series files there too
    (tmp_path / "cohort" / "PAT" / "study").mkdir(parents=True)
    (tmp_path / "ct").rename(tmp_path / "cohort" / "PAT" / "study" / "series")
    assert cli.main(["segment", str(tmp_path / "cohort"), "-o", str(tmp_path / "out3"), "--dicom-seg", "--progress", "none",
                     "--device", "cpu"]) == 0
    again = hd.seg.segread(str(tmp_path / "out3" / "PAT_lesions.dcm"))
    assert np.array_equal(again.get_pixels_by_source_instance(source_sop_instance_uids=uids, combine_segments=True, relabel=False,
                                                              ignore_spatial_locations=True, assert_missing_frames_are_empty=True), labels)

    nifti = tmp_path / "case.nii.gz"
    sitk.WriteImage(image, str(nifti))
    capsys.readouterr()
    assert cli.main(["segment", str(nifti), "-o", str(tmp_path / "out2"), "--dicom-seg", "--progress", "none", "--device", "cpu"]) == 0
    assert "no DICOM SEG written (the input is not a DICOM series)" in capsys.readouterr().err
    assert not list((tmp_path / "out2").glob("*.dcm"))

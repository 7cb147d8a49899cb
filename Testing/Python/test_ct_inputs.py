"""Ordinary clinical encodings of a CT (an audit of valid scans unlike the training crops): the
scanner's out-of-field padding is no tissue, a CT stored without its rescale is named as such even
when padded, and slabs too thin for a 3D result are refused rather than answered with nothing."""
from __future__ import annotations

import os
import sys
import threading

import numpy as np
import pytest
import SimpleITK as sitk

from LesionSegLib.engine.errors import InputError
from LesionSegLib.engine.io import images
from slicer_app_shim import REPO

SAMPLE = REPO / "LesionSeg" / "LesionSegLib" / "sample" / "STS_041" / "image.nii.gz"


def _sample_hu() -> tuple[np.ndarray, sitk.Image]:
    img = sitk.ReadImage(str(SAMPLE))
    return sitk.GetArrayFromImage(img).astype(np.int32), img


def _image(arr: np.ndarray, like: sitk.Image, dtype=np.int16) -> sitk.Image:
    out = sitk.GetImageFromArray(arr.astype(dtype))
    out.CopyInformation(like)
    return out


def _outside_fov(shape) -> np.ndarray:
    """The corners outside a circular reconstruction field of view, in every slice."""
    y, x = np.ogrid[:shape[1], :shape[2]]
    r = min(shape[1], shape[2]) / 2
    return np.broadcast_to(((y - shape[1] / 2) ** 2 + (x - shape[2] / 2) ** 2) > r ** 2, shape)


@pytest.mark.parametrize("padding", [-2048, -3024, -32768])
def test_out_of_field_padding_is_not_tissue(padding):
    """-32768 padding (int16's minimum, a DICOM PixelPaddingValue) made a valid CT "not CT in
    Hounsfield units"; -2048 and -3024 passed."""
    hu, ref = _sample_hu()
    hu[_outside_fov(hu.shape)] = padding
    images.validate_ct(_image(hu, ref))
    assert images._padding(hu, float(hu.min()), float(hu.max())) == (padding, float(hu[hu > padding].min()))


def test_a_ct_stored_without_its_rescale_is_named_even_when_padded():
    """Raw stored values (HU + 1024, air near 0) were refused only without padding: one padding
    value below -100 let them through, to be segmented into nothing under a generic OOD note."""
    hu, ref = _sample_hu()
    raw = hu + 1024
    for arr in (raw, np.where(_outside_fov(hu.shape), -1024, raw)):
        with pytest.raises(InputError, match=r"stored without its rescale"):
            images.validate_ct(_image(arr, ref))


def test_a_body_masked_lean_scan_is_a_ct():
    """A constant background (a body mask's -1000) beside lean tissue near 0 HU, and nothing else
    below -100: not stored values (soft tissue would sit near +1000), so a CT."""
    rng = np.random.default_rng(0)
    a = rng.normal(40, 10, (30, 64, 64))
    a[:, :4] = -1000
    img = sitk.GetImageFromArray(a.astype(np.float32))
    img.SetSpacing((1.5, 1.5, 3.0))
    images.validate_ct(img)


def test_a_ct_clamped_at_minus_1024_is_not_taken_for_padding():
    """Scanners clamp air at -1024: that constant sits next to the air's other values, no gap."""
    hu, ref = _sample_hu()
    hu = np.maximum(hu, -1024)
    assert (hu == -1024).any() and images._padding(hu, -1024.0, float(hu.max()))[0] is None
    images.validate_ct(_image(hu, ref))


@pytest.mark.parametrize("slices, text", [(2, "2 voxels spanning 6.5 mm along axis k"),
                                          (3, "3 voxels spanning 9.8 mm along axis k")])
def test_a_slab_of_two_or_three_slices_is_refused(slices, text):
    """Two or three slices of the tumour ran and answered "0 lesions" without a word."""
    hu, ref = _sample_hu()
    slab = sitk.GetImageFromArray(hu[20:20 + slices].astype(np.int16))
    slab.SetSpacing(ref.GetSpacing())
    with pytest.raises(InputError, match="thin slab") as err:
        images.validate_ct(slab)
    assert text in str(err.value)
    four = sitk.GetImageFromArray(hu[20:24].astype(np.int16))
    four.SetSpacing(ref.GetSpacing())
    images.validate_ct(four)  # 4 slices, 13 mm: a 3D volume
    four.SetSpacing((1.0, 1.0, 1.0))
    with pytest.raises(InputError, match="4 voxels spanning 4.0 mm along axis k"):
        images.validate_ct(four)  # 4 mm: not even the smallest lesion kept fits


def test_a_scan_of_air_is_said_to_hold_no_tissue():
    rng = np.random.default_rng(0)
    air = sitk.GetImageFromArray((rng.normal(-1000, 25, (20, 40, 40))).astype(np.int16))
    with pytest.raises(InputError, match="holds no tissue"):
        images.validate_ct(air)


def test_reads_in_several_threads_leave_stderr_and_itk_warnings_as_they_were(tmp_path):
    """Each read silences fd 2 and ITK's warnings; two threads saved each other's null device, and
    the process's stderr stayed on it for good."""
    warnings = sitk.ProcessObject.GetGlobalWarningDisplay()
    before = os.readlink("/proc/self/fd/2") if os.path.exists("/proc/self/fd/2") else None
    errors = []

    def read():
        try:
            for _ in range(15):
                images.read_image(SAMPLE)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=read) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sitk.ProcessObject.GetGlobalWarningDisplay() == warnings
    if before is not None:
        assert os.readlink("/proc/self/fd/2") == before != os.devnull
    sys.stderr.flush()


def test_a_lesion_cut_by_the_edge_of_the_scan_is_said_so_for_every_scan(tmp_path, capsys, monkeypatch):
    """A tumour cut by the scan's edge was measured as if whole, without a word: its volume and
    diameter cover only the part inside.  The note is the scan's own, so the CLI prints it for each
    input (engine-level notes, such as the CPU fallback, stay once a run)."""
    from LesionSegLib.engine.cli import main
    from LesionSegLib.engine.segment import pipeline
    from LesionSegLib.engine.segment.result import edge_note

    def on_faces(labelmap):
        return sorted({int(v) for a in range(3) for k in (0, -1) for v in np.unique(np.take(labelmap, k, axis=a))} - {0})

    engine = pipeline.Engine()
    res = engine.segment(SAMPLE)  # the real model on the whole sample
    assert any("edge of the scan" in m for m in res.messages) == bool(on_faces(res.labelmap))

    def probability(self, hu, sp, progress=None, cancel=None):  # a lesion on the first slices, by construction
        prob = np.zeros(hu.shape, np.float32)
        prob[:4, 30:45, 30:45] = 1.0
        return prob, {}

    monkeypatch.setattr(type(engine), "probability", probability)
    res = engine.segment(SAMPLE, threshold=0.0)
    assert on_faces(res.labelmap) == [1] and edge_note(res.labelmap) in res.messages
    assert "lesion 1 reaches the edge of the scan: it may continue outside it" in edge_note(res.labelmap)
    for name in ("a", "b"):
        (tmp_path / f"{name}.nii.gz").symlink_to(SAMPLE)
    assert main(["segment", str(tmp_path / "a.nii.gz"), str(tmp_path / "b.nii.gz"), "-o", str(tmp_path / "out"),
                 "--threshold", "0", "--progress", "none", "--runtime", "torch"]) == 0
    assert capsys.readouterr().err.count("reaches the edge of the scan") == 2

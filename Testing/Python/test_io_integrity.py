"""Truncated files, error texts and output-name clashes (issue 8: IO and CLI defects).

Every file here is built in code: small synthetic CTs in each format, and a real STS case written
to a temporary folder and then cut short, as a partly copied scan would be.
"""
from __future__ import annotations

import gzip
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from LesionSegLib.engine import cli, data
from LesionSegLib.engine.cli.segment import unique_inputs
from LesionSegLib.engine.errors import InputError
from LesionSegLib.engine.io.images import read_image, read_label
from LesionSegLib.engine.io.preprocess import from_canonical, to_canonical

DATA = data.data_root()
needs_data = pytest.mark.skipif(not (DATA / "manifest.csv").exists(), reason=f"shared CT data folder {DATA} is absent (set LESIONSEG_DATA)")
ROOT = Path(__file__).resolve().parents[2]


def _ct(shape=(12, 20, 24), seed=0) -> sitk.Image:
    rng = np.random.default_rng(seed)
    a = rng.normal(40, 200, shape).astype(np.int16)
    a[:, :4] = -1000
    img = sitk.GetImageFromArray(a)
    img.SetSpacing((0.8, 0.9, 2.5))
    img.SetOrigin((10.0, -20.0, 30.0))
    return img


def _cut(path: Path, keep: float = 0.5) -> Path:
    raw = path.read_bytes()
    path.write_bytes(raw[: int(len(raw) * keep)])
    return path


def _refused(path, *words) -> str:
    with pytest.raises(InputError) as err:
        read_image(path)
    msg = str(err.value)
    assert str(path) in msg and "\n" not in msg, msg
    for w in words:
        assert w in msg, msg
    return msg


# ------------------------------------------------------------------------------ truncated files
@pytest.mark.parametrize("name, compress", [("ct.nii.gz", True), ("ct.nii", False), ("ct.nrrd", False), ("ct.nrrd", True),
                                            ("ct.mha", False), ("ct.mha", True)])
def test_truncated_single_file_is_refused(tmp_path, name, compress):
    """Half a file, whatever the format or compression, is refused as truncated."""
    p = tmp_path / name
    sitk.WriteImage(_ct(), str(p), useCompression=compress)
    assert read_image(p).GetSize() == (24, 20, 12)  # the whole file reads
    _cut(p)
    _refused(p, "truncated")


@pytest.mark.parametrize("suffix, data_suffix", [(".mhd", ".raw"), (".nhdr", ".raw")])
def test_short_detached_data_file_is_refused(tmp_path, suffix, data_suffix):
    p = tmp_path / f"ct{suffix}"
    sitk.WriteImage(_ct(), str(p))
    (raw,) = [f for f in tmp_path.iterdir() if f != p]
    assert read_image(p).GetSize() == (24, 20, 12)
    raw.write_bytes(raw.read_bytes()[:-100])
    _refused(p, "truncated", "data file")
    raw.unlink()
    _refused(p, "missing")


def test_corrupt_gzip_crc_is_refused(tmp_path):
    p = tmp_path / "ct.nii.gz"
    sitk.WriteImage(_ct(), str(p))
    raw = bytearray(p.read_bytes())
    raw[-8] ^= 0xFF  # the CRC-32 in the gzip trailer
    p.write_bytes(bytes(raw))
    _refused(p, "corrupt", "CRC")


def test_gzip_with_extra_members_and_trailing_bytes_still_reads(tmp_path):
    """Valid streams that are not one plain member are read, not refused."""
    p = tmp_path / "ct.nii"
    sitk.WriteImage(_ct(), str(p))
    raw = p.read_bytes()
    two = tmp_path / "two.nii.gz"
    two.write_bytes(gzip.compress(raw[:1000]) + gzip.compress(raw[1000:]) + b"\0\0\0\0")
    np.testing.assert_array_equal(sitk.GetArrayFromImage(read_image(two)), sitk.GetArrayFromImage(_ct()))


def test_truncated_label_is_refused(tmp_path):
    ct = _ct()
    lab = sitk.Cast(ct > 100, sitk.sitkUInt8)
    p = tmp_path / "label.nii.gz"
    sitk.WriteImage(lab, str(p))
    _cut(p)
    with pytest.raises(InputError, match="truncated"):
        read_label(p, ct)


@needs_data
def test_real_case_cut_in_half_is_refused(tmp_path):
    """The issue's reproduction: a real STS CT, partly copied, used to be segmented as if whole."""
    src = data.case("STS_035").image
    for name in ("STS_035.nii.gz", "STS_035.nrrd"):
        p = tmp_path / name
        sitk.WriteImage(sitk.ReadImage(str(src)), str(p), useCompression=True)
        _cut(p)
        _refused(p, "truncated")
    out = tmp_path / "out"
    rc = cli.main(["segment", str(tmp_path / "STS_035.nii.gz"), "-o", str(out), "--progress", "none"])
    assert rc == 1 and (not out.exists() or not any(out.iterdir()))


def _dicom_series(folder: Path, image: sitk.Image, modality: str = "CT", series_uid: str = "1.2.826.0.1.3680043.2.1125.7",
                  prefix: str = "s", z_of=None, sideways: float = 0.0) -> list[Path]:
    """``image`` as a DICOM series in ``folder``; ``z_of(k)``: slice k's offset from slice 0 (mm)
    along the slice normal, for irregular series (default: k x the image's z spacing);
    ``sideways``: mm each slice steps along the image's j axis too (a gantry tilt)."""
    folder.mkdir(parents=True, exist_ok=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    direction = image.GetDirection()
    normal = np.asarray(direction, dtype=float).reshape(3, 3)[:, 2]
    first = np.asarray(image.TransformIndexToPhysicalPoint((0, 0, 0)), dtype=float)
    files = []
    for k in range(image.GetSize()[2]):
        sl = image[:, :, k]
        pos = image.TransformIndexToPhysicalPoint((0, 0, k)) if z_of is None else tuple(first + z_of(k) * normal)
        pos = tuple(np.asarray(pos) + k * sideways * np.asarray(direction, dtype=float).reshape(3, 3)[:, 1])
        for tag, val in [("0008|0060", modality), ("0020|000e", series_uid), ("0020|000d", "1.2.826.0.1.3680043.2.1125.8"),
                         ("0020|0032", "\\".join(map(str, pos))),
                         ("0020|0037", "\\".join(map(str, (direction[0], direction[3], direction[6], direction[1], direction[4], direction[7])))),
                         ("0020|0013", str(k + 1)), ("0028|0030", f"{image.GetSpacing()[1]}\\{image.GetSpacing()[0]}"),
                         ("0018|0050", str(image.GetSpacing()[2]))]:
            sl.SetMetaData(tag, val)
        files.append(folder / f"{prefix}{k:03d}.dcm")
        writer.SetFileName(str(files[-1]))
        writer.Execute(sl)
    return files


def test_dicom_series_missing_or_short_slice_is_refused(tmp_path):
    ct = _ct()
    files = _dicom_series(tmp_path / "whole", ct)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(read_image(files[0].parent)), sitk.GetArrayFromImage(ct))

    files = _dicom_series(tmp_path / "gap", ct)
    files[5].unlink()
    _refused(files[0].parent, "missing slices")

    files = _dicom_series(tmp_path / "short", ct)
    _cut(files[6], 0.6)
    _refused(files[0].parent, files[6].name)


def test_dicom_series_irregular_other_modality_several_series_and_dicomdir(tmp_path):
    """Found by an audit: an irregular series was put on one even spacing without a word (lesions
    placed and measured wrongly); an MR series with CT-like values ran; of two series in a folder
    one was taken silently; a DICOMDIR layout was "no image files and no DICOM series"."""
    from LesionSegLib.engine.io.images import read_note

    ct = _ct()  # 12 slices, 2.5 mm apart
    ramp = _dicom_series(tmp_path / "ramp", ct, z_of=lambda k: 2.5 * k + 0.04 * k * k)  # gaps 2.54-3.34 mm, none 1.5x
    _refused(ramp[0].parent, "slice spacing varies from 2.54 to 3.34 mm")
    jitter = _dicom_series(tmp_path / "jitter", ct, z_of=lambda k: 2.5 * k + (0.01 if k % 2 else 0.0))  # scanner jitter
    assert read_image(jitter[0].parent).GetSize() == ct.GetSize()
    mr = _dicom_series(tmp_path / "mr", ct, modality="MR")
    _refused(mr[0].parent, "modality is MR, not CT")
    two = tmp_path / "two"
    _dicom_series(two, ct)
    _dicom_series(two, ct[:, :, :4], series_uid="1.2.826.0.1.3680043.2.1125.9", prefix="t")
    img = read_image(two)
    assert img.GetSize() == ct.GetSize()
    assert "2 DICOM series in this folder; segmented the one with the most slices (12), not the others (4 slice(s))" in read_note(img)
    assert read_note(read_image(jitter[0].parent)) is None
    proc = _cli("segment", str(two), "-o", str(tmp_path / "out"), "--progress", "none", "--device", "cpu", cwd=tmp_path)
    assert proc.returncode == 0 and "note: " in proc.stderr and "2 DICOM series in this folder" in proc.stderr, proc.stderr
    cd = tmp_path / "cd"
    _dicom_series(cd / "PT0" / "SE0", ct)
    (cd / "DICOMDIR").write_bytes(b"\0" * 256)
    _refused(cd, f"folder holds a DICOMDIR whose series are in sub-folders; give one of them: {cd / 'PT0' / 'SE0'}")


def test_gantry_tilted_sheared_and_oblique_scans(tmp_path):
    """Found by an audit: a gantry-tilted series was stacked along its slice normal (a lesion came
    out 31 mm from where it is, with no word), a sheared NRRD lost its shear in the NIfTI output and
    its volumes were wrong, and an oblique scan, which the model segments less well, gave no note."""
    from LesionSegLib.engine.io.preprocess import oblique_note

    ct = _ct()  # 2.5 mm slices, 0.8 x 0.9 mm in plane
    tilt = _dicom_series(tmp_path / "tilt", ct, sideways=0.91)  # 20 degrees
    _refused(tilt[0].parent, "gantry-tilted or sheared: its slices step 20.0 degrees off their normal (10.0 mm sideways")
    rounding = _dicom_series(tmp_path / "rounding", ct, sideways=0.02)  # 0.2 mm over the stack: header rounding
    assert read_image(rounding[0].parent).GetSize() == ct.GetSize()

    sheared = sitk.Image(ct)
    c, s = np.cos(np.radians(20)), np.sin(np.radians(20))
    sheared.SetDirection((1, 0, 0, 0, 1, s, 0, 0, c))  # the k axis leans 20 degrees towards j
    sitk.WriteImage(sheared, str(tmp_path / "sheared.nrrd"))
    _refused(tmp_path / "sheared.nrrd", "sheared voxel grid: its axes are not at right angles (i-j 90.0, i-k 90.0, j-k 70.0 degrees)")

    oblique = sitk.Image(ct)
    oblique.SetDirection((c, -s, 0, s, c, 0, 0, 0, 1))  # rotated 20 degrees about z: a regular, oblique grid
    sitk.WriteImage(oblique, str(tmp_path / "oblique.nrrd"))
    assert "axes lie 20 degrees off the patient axes" in oblique_note(read_image(tmp_path / "oblique.nrrd"))
    permuted = sitk.PermuteAxes(ct, [2, 0, 1])  # sagittal storage: axis-aligned, no note
    assert oblique_note(permuted) is None and oblique_note(sitk.Flip(ct, [True, False, True])) is None
    proc = _cli("segment", str(tmp_path / "oblique.nrrd"), "-o", str(tmp_path / "out"), "--progress", "none", "--device", "cpu",
                cwd=tmp_path)
    assert proc.returncode == 0 and "note: the scan is oblique: its axes lie 20 degrees" in proc.stderr, proc.stderr


# ------------------------------------------------------------------------------ error texts
def test_spacing_error_prints_plain_numbers(tmp_path):
    img = _ct()
    img.SetSpacing((0.001, 1.0, 1.0))
    p = tmp_path / "tiny.nrrd"
    sitk.WriteImage(img, str(p))
    msg = _refused(p, "absurd voxel spacing (0.001, 1, 1) mm")
    assert "np." not in msg and "float64" not in msg


def _cli(*argv: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "LesionSeg"), str(ROOT / "LesionSegTraining")]))
    return subprocess.run([sys.executable, "-m", "LesionSegLib.engine.cli", *argv], capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


@pytest.mark.parametrize("content", ["empty", "text", "fake_dicom"])
def test_bad_folder_gives_one_line_on_stderr(tmp_path, content):
    """No ITK/GDCM warning reaches the user: stderr is exactly our one-line error."""
    folder = tmp_path / "in"
    folder.mkdir()
    if content == "text":
        (folder / "notes.txt").write_text("not an image\n")
    elif content == "fake_dicom":
        (folder / "a.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00\x10\x00UI\x04\x00junk" + os.urandom(200))
    proc = _cli("segment", str(folder), "-o", str(tmp_path / "out"), "--progress", "none", "--device", "cpu", cwd=tmp_path)
    lines = proc.stderr.splitlines()
    assert proc.returncode == 1, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(folder) in lines[0], proc.stderr
    assert "no image files and no DICOM series" in lines[0]
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


# ------------------------------------------------------------------------------ output names
def test_inputs_with_the_same_case_name_are_refused(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    for p in (a / "case1.nii.gz", b / "Case1.nrrd", a / "image.nii.gz"):
        sitk.WriteImage(_ct(), str(p))
    kept, clash = unique_inputs([a / "case1.nii.gz", a / "case1.nii.gz", tmp_path / "a" / ".." / "a" / "case1.nii.gz"])
    assert kept == [a / "case1.nii.gz"] and clash is None  # exact repeats are one input
    kept, clash = unique_inputs([a / "case1.nii.gz", a / "image.nii.gz"])  # image.nii.gz is named after its folder "a"
    assert clash is None and len(kept) == 2
    _, clash = unique_inputs([a / "case1.nii.gz", b / "Case1.nrrd"])
    assert clash and "case1" in clash.lower() and str(b / "Case1.nrrd") in clash

    out = tmp_path / "out"
    proc = _cli("segment", str(a / "case1.nii.gz"), str(b / "Case1.nrrd"), "-o", str(out), "--progress", "none", cwd=tmp_path)
    assert proc.returncode == 2 and len(proc.stderr.splitlines()) == 1 and "same case name" in proc.stderr, proc.stderr
    assert not out.exists() or not any(out.iterdir())


@needs_data
def test_each_input_is_validated_once(tmp_path, monkeypatch):
    """``segment`` used to run the full-volume CT checks twice per input (review, small things)."""
    from LesionSegLib.engine.io import images
    from LesionSegLib.engine.segment import pipeline

    seen: list[str] = []
    real = images.validate_ct

    def counting(image, source=None):
        seen.append(str(source))
        return real(image, source)

    monkeypatch.setattr(images, "validate_ct", counting)
    monkeypatch.setattr(pipeline, "validate_ct", counting)
    src = str(data.case("STS_035").image)
    rc = cli.main(["segment", src, "-o", str(tmp_path / "out"), "--progress", "none", "--device", "cpu"])
    assert rc == 0 and seen == [src]


# ------------------------------------------------------------------------------ geometry
def test_from_canonical_checks_the_whole_grid():
    """Equal-sized axes permuted the wrong way used to pass the shape-only assert."""
    img = _ct((10, 16, 16))
    img.SetDirection((0, 1, 0, 1, 0, 0, 0, 0, -1))
    can = to_canonical(img)
    arr = sitk.GetArrayFromImage(can)
    np.testing.assert_array_equal(from_canonical(arr, can, img), sitk.GetArrayFromImage(img))  # bit-identical
    half = arr.astype(np.float16)
    assert from_canonical(half, can, img).dtype == np.float16
    other = sitk.Image(img)
    other.SetDirection((1, 0, 0, 0, 1, 0, 0, 0, -1))  # same size, but x and y not swapped
    wrong = to_canonical(other)
    assert wrong.GetSize() == can.GetSize()  # the old shape-only assert passed
    with pytest.raises(ValueError, match="does not map back"):
        from_canonical(sitk.GetArrayFromImage(wrong), wrong, img)
    with pytest.raises(ValueError, match="not on the canonical grid"):
        from_canonical(arr[:-1], can, img)

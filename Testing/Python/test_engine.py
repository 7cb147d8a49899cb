"""Engine tests: input validation, geometry, model checksums, the segment CLI on real CT."""
from __future__ import annotations

import contextlib
import csv
import gzip
import os
import shutil
import sys

import numpy as np
import pytest
import SimpleITK as sitk

from LesionSegLib.engine import cli
from LesionSegLib.engine import data
from LesionSegLib.engine.segment.clusters import extract_clusters, max_diameter_mm
from LesionSegLib.engine.segment.colors import confidence_color
from LesionSegLib.engine.errors import InputError, ModelError
from LesionSegLib.engine.segment.features import PATCH_SIZE, adaptive_patch
from LesionSegLib.engine.segment.clusters import cluster_stats
from LesionSegLib.engine.io.images import read_image
from LesionSegLib.engine.evaluate.matching import detections, match
from LesionSegLib.engine.models import get_card, read_card
from LesionSegLib.engine.io.preprocess import from_canonical, to_canonical

DATA = data.data_root()
HAVE_DATA = (DATA / "manifest.csv").exists()
needs_data = pytest.mark.skipif(not HAVE_DATA, reason=f"shared CT data folder {DATA} is absent (set LESIONSEG_DATA)")


def _model_arg() -> list[str]:
    m = os.environ.get("LESIONSEG_TEST_MODEL")
    return ["--model", m] if m else []


def _model():
    """The model under test: the shipped one, or LESIONSEG_TEST_MODEL.  A missing model is a
    failure (ModelError), never a skip."""
    return get_card(os.environ.get("LESIONSEG_TEST_MODEL"))


def _write(arr, path, spacing=(1.0, 1.0, 1.0), vector=False):
    img = sitk.GetImageFromArray(arr, isVector=vector)
    if img.GetDimension() == len(spacing):
        img.SetSpacing(spacing)
    sitk.WriteImage(img, str(path))
    return path


def _bytes(d, name, content):
    (d / name).write_bytes(content)
    return d / name


def _ct(shape=(8, 16, 16), seed=0):
    rng = np.random.default_rng(seed)
    a = rng.normal(40, 20, shape).astype(np.int16)
    a[:, :3] = -1000
    return a


# ------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    "make, problem",
    [
        (lambda d: d / "missing.nii.gz", "file not found"),
        (lambda d: _bytes(d, "empty.nii.gz", b""), "empty (0 bytes)"),
        (lambda d: _bytes(d, "junk.nii.gz", gzip.compress(os.urandom(2000))), "corrupt"),
        (lambda d: _bytes(d, "trunc.nrrd", b"NRRD0004\ntype: short\ndimension: 3\nsizes: 10 10 10\nencoding: raw\n\n" + b"\0" * 10), "truncated"),
        (lambda d: _write(_ct((16, 16))[0:16].astype(np.int16), d / "flat.nrrd", (1.0, 1.0)), "2D image"),
        (lambda d: _write(np.stack([_ct()] * 3), d / "four.nrrd", (1.0, 1.0, 1.0, 1.0)), "4D image"),
        (lambda d: _write(np.stack([_ct()] * 3, -1).astype(np.uint8), d / "rgb.nrrd", vector=True), "RGB/vector"),
        (lambda d: _write(_ct()[:1], d / "oneslice.nrrd"), "2D"),
        (lambda d: _write(np.where(np.arange(8 * 16 * 16).reshape(8, 16, 16) == 5, np.nan, _ct()).astype(np.float32), d / "nan.nrrd"), "NaN/Inf"),
        (lambda d: _write(np.where(np.arange(8 * 16 * 16).reshape(8, 16, 16) == 5, np.inf, _ct()).astype(np.float32), d / "inf.nrrd"), "NaN/Inf"),
        # ITK's NIfTI reader turns NaN into 0 (so the array check alone would pass these): io.integrity counts them
        (lambda d: _write(np.where(np.arange(8 * 16 * 16).reshape(8, 16, 16) == 5, np.nan, _ct()).astype(np.float32), d / "nan.nii.gz"), "contains 1 NaN/Inf"),
        (lambda d: _write(np.where(np.arange(8 * 16 * 16).reshape(8, 16, 16) % 7 == 0, np.nan, _ct()).astype(np.float32),
                          d / "nan.nii"), "contains 293 NaN/Inf"),
        (lambda d: _write(np.where(np.arange(8 * 16 * 16).reshape(8, 16, 16) == 5, -np.inf, _ct()).astype(np.float64), d / "inf.nii.gz"), "contains 1 NaN/Inf"),
        (lambda d: _write(np.full((8, 16, 16), np.nan, np.float32), d / "allnan.nii.gz"), "contains 2048 NaN/Inf"),
        (lambda d: _write(np.abs(_ct()).astype(np.int16) + 100, d / "mr.nrrd"), "not CT in Hounsfield units"),
        (lambda d: _write((_ct() * 1000).astype(np.float32), d / "huge.nrrd"), "not CT in Hounsfield units"),
        (lambda d: _write(_ct(), d / "absurd.nrrd", (1.0, 1.0, 500.0)), "absurd voxel spacing"),
        (lambda d: _write(_ct(), d / "tiny.nrrd", (0.001, 1.0, 1.0)), "absurd voxel spacing"),
        (lambda d: _write(np.zeros((8, 16, 16), np.int16), d / "zeros.nrrd"), "empty volume"),
    ],
)
def test_bad_input_is_named(tmp_path, make, problem):
    path = make(tmp_path)
    with pytest.raises(InputError) as err:
        read_image(path)
    msg = str(err.value)
    assert problem in msg and str(path) in msg
    assert "\n" not in msg


def test_zero_spacing_in_header(tmp_path):
    p = tmp_path / "zero.nhdr"
    raw = tmp_path / "zero.raw"
    _ct().tofile(raw)
    p.write_text("NRRD0004\ntype: short\ndimension: 3\nspace: left-posterior-superior\nsizes: 16 16 8\n"
                 "space directions: (0,0,0) (0,1,0) (0,0,1)\nendian: little\nencoding: raw\nspace origin: (0,0,0)\ndata file: zero.raw\n")
    with pytest.raises(InputError) as err:
        read_image(p)
    assert str(p) in str(err.value)


def test_empty_folder(tmp_path):
    with pytest.raises(InputError, match="no image files and no DICOM series"):
        read_image(tmp_path)


# ------------------------------------------------------------------------------ geometry
@pytest.mark.parametrize("direction", [
    (1, 0, 0, 0, 1, 0, 0, 0, 1),
    (-1, 0, 0, 0, -1, 0, 0, 0, 1),  # RAS-style (NIfTI from many tools)
    (0, 0, 1, 1, 0, 0, 0, 1, 0),  # sagittal acquisition
    (1, 0, 0, 0, 0, -1, 0, 1, 0),  # coronal
])
def test_canonical_roundtrip_is_exact(direction):
    a = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)
    img = sitk.GetImageFromArray(a)
    img.SetDirection(direction)
    img.SetSpacing((0.7, 0.8, 2.5))
    img.SetOrigin((10, -20, 30))
    can = to_canonical(img)
    # same physical point holds the same value
    idx = (1, 2, 3)
    phys = img.TransformIndexToPhysicalPoint(idx)
    assert can[can.TransformPhysicalPointToIndex(phys)] == img[idx]
    back = from_canonical(sitk.GetArrayFromImage(can), can, img)
    np.testing.assert_array_equal(back, a)


def test_sphere_diameter_and_patch():
    z, y, x = np.mgrid[:40, :40, :40]
    sphere = ((z - 20) ** 2 + (y - 20) ** 2 + (x - 20) ** 2) <= 10**2
    d = max_diameter_mm(sphere, (1.0, 1.0, 1.0))
    assert 20.0 <= d <= 22.0
    d2 = max_diameter_mm(sphere, (2.0, 1.0, 1.0))  # stretched along z
    assert 40.0 <= d2 <= 43.0
    prob = sphere.astype(np.float32)
    labels, n = extract_clusters(prob, 0.5, (1.0, 1.0, 1.0), 10.0)
    assert n == 1
    (c,) = cluster_stats(labels, n)
    patch = adaptive_patch(np.where(sphere, 50.0, -1000.0).astype(np.float32), prob, labels, c, (1.0, 1.0, 1.0))
    assert patch.shape == (3, *PATCH_SIZE)
    # the mask fills the middle of the patch (cluster + 25 % margin each side + 5 mm)
    assert patch[2, 16, 16, 16] > 0.99 and patch[2, 0, 0, 0] < 0.01


def test_min_size_filter():
    prob = np.zeros((20, 20, 20), np.float32)
    prob[2:4, 2:4, 2:4] = 1  # 8 mm^3
    prob[10:16, 10:16, 10:16] = 1  # 216 mm^3
    _, n = extract_clusters(prob, 0.5, (1, 1, 1), 100)
    assert n == 1
    _, n = extract_clusters(prob, 0.5, (1, 1, 1), 0)
    assert n == 2


def test_matching_rule():
    gt = np.zeros((10, 10, 30), np.uint32)
    gt[2:8, 2:8, 2:8] = 1
    gt[2:8, 2:8, 20:28] = 2
    pred = np.zeros_like(gt)
    pred[2:8, 2:8, 2:8] = 1  # exact -> GT 1
    pred[3:5, 3:5, 21:23] = 2  # small fragment inside GT 2 -> hit by "inside" rule
    pred[0:2, 0:2, 12:14] = 3  # nowhere -> FP
    pred[4:6, 4:6, 4:6] = 0
    pred[4:6, 4:6, 4:6] = 4  # second hit on GT 1 (inside)
    m = match(pred, gt)
    assert list(m.pred_to_gt) == [1, 2, 0, 1]
    det, fp = detections(m, np.array([0.9, 0.8, 0.7, 0.95]))
    assert list(det) == [False, True, False, True]  # GT1 detected once, by the 0.95 hit
    assert list(fp) == [False, False, True, False]


def test_colormap_is_ordered():
    """Plasma, dark blue-violet at 0 to yellow at 1: luminance rises strictly with confidence."""
    import matplotlib

    steps = np.linspace(0, 1, 11)
    colors = [confidence_color(float(v)) for v in steps]
    lum = [0.2126 * r + 0.7152 * g + 0.0722 * b for r, g, b in colors]
    assert all(a < b for a, b in zip(lum, lum[1:])), lum
    np.testing.assert_allclose(colors, [matplotlib.colormaps["plasma"](float(v))[:3] for v in steps], atol=0.05)  # a few plasma anchors, linearly interpolated
    assert confidence_color(-1) == colors[0] and confidence_color(2) == colors[-1]


# ------------------------------------------------------------------------------ models
def test_checksum_failure_is_refused(tmp_path):
    card = _model()
    dst = tmp_path / "broken"
    shutil.copytree(card.folder, dst)
    w = dst / card.data["segmenter"]["file"]
    b = bytearray(w.read_bytes())
    b[-10] ^= 0xFF
    w.write_bytes(bytes(b))
    from LesionSegLib.engine.segment.pipeline import Engine

    with pytest.raises(ModelError, match="checksum mismatch"):
        Engine(str(dst))
    # and through the CLI, on an input that exists and is valid: only the checksum can stop it
    good = _write(_ct(), tmp_path / "x.nrrd")
    read_image(good)
    out = tmp_path / "out"
    rc = cli.main(["segment", str(good), "-o", str(out), "--model", str(dst), "--progress", "none"])
    assert rc == 2
    assert not out.exists() or not any(out.iterdir())


def test_registry_lists_card():
    card = _model()
    assert card.data["segmenter"]["sha256"]
    assert read_card(card.folder).id == card.id


# ------------------------------------------------------------------------------ CLI on real CT
@needs_data
def test_cli_segment_real_case_outputs_agree(tmp_path):
    import slicerio

    _model()
    case = data.case("STS_035")
    out = tmp_path / "out"
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(b"not an image")
    rc = cli.main(["segment", str(case.image), str(bad), "-o", str(out), "--progress", "none", "--threshold", "0", *_model_arg()])
    assert rc == 1  # one input failed...
    files = sorted(p.name for p in out.iterdir())
    assert files == ["STS_035.seg.nrrd", "STS_035_lesions.csv", "STS_035_lesions.nii.gz"]  # ...the other ran, nothing half-written

    image = sitk.ReadImage(str(case.image))
    lab = sitk.ReadImage(str(out / "STS_035_lesions.nii.gz"))
    assert lab.GetSize() == image.GetSize()
    assert np.allclose(lab.GetSpacing(), image.GetSpacing()) and np.allclose(lab.GetOrigin(), image.GetOrigin())
    assert np.allclose(lab.GetDirection(), image.GetDirection())
    arr = sitk.GetArrayFromImage(lab)
    with open(out / "STS_035_lesions.csv") as fh:
        rows = list(csv.DictReader(fh))
    ids = [int(r["lesion_id"]) for r in rows]
    assert ids == list(range(1, len(rows) + 1))
    assert set(np.unique(arr)) - {0} == set(ids)
    counts = np.bincount(arr.ravel())
    spacing = np.prod(image.GetSpacing())
    for r in rows:
        k = int(r["lesion_id"])
        assert int(r["n_voxels"]) == counts[k]
        assert abs(float(r["volume_ml"]) - counts[k] * spacing / 1000) < 1e-3
        assert 0.0 <= float(r["confidence"]) <= 1.0
    confs = [float(r["confidence"]) for r in rows]
    assert confs == sorted(confs, reverse=True)

    seg = slicerio.read_segmentation(str(out / "STS_035.seg.nrrd"))
    assert len(seg["segments"]) == len(rows)
    vox = seg["voxels"]
    np.testing.assert_array_equal(np.transpose(vox, (2, 1, 0)), arr)
    for s, r in zip(sorted(seg["segments"], key=lambda s: s["labelValue"]), rows):
        assert s["labelValue"] == int(r["lesion_id"])
        assert abs(float(s["tags"]["LesionSeg.Confidence"]) - float(r["confidence"])) < 1e-5
        assert np.allclose(s["color"], confidence_color(float(r["confidence"])), atol=1e-3)
    assert np.allclose(seg["ijkToLPS"][:3, 3], image.GetOrigin(), atol=1e-3)

    # the GT tumour is found: one of the lesions overlaps it
    gt = sitk.GetArrayFromImage(sitk.ReadImage(str(case.label)))
    assert (arr[gt > 0] > 0).mean() > 0.3


@needs_data
def test_oriented_input_gives_same_lesions(tmp_path):
    """A flipped/permuted copy of a real CT (same physical image) gives the same labelmap."""
    from LesionSegLib.engine.segment.pipeline import Engine

    card = _model()
    img = sitk.ReadImage(str(data.case("STS_041").image))
    ras = sitk.DICOMOrient(img, "RAS")
    eng = Engine(card, device="cpu")
    a = eng.segment(img, threshold=0)
    b = eng.segment(ras, threshold=0)
    back = sitk.GetImageFromArray(b.labelmap)
    back.CopyInformation(ras)
    back = sitk.GetArrayFromImage(sitk.DICOMOrient(back, "LPS"))
    assert (back > 0).sum() > 0
    np.testing.assert_array_equal(back, a.labelmap)  # the canonical paths are bit-identical


@needs_data
def test_dicom_series_folder(tmp_path):
    """A DICOM series folder is read with its geometry (series written from a real CT)."""
    img = sitk.ReadImage(str(data.case("STS_035").image))
    arr = sitk.GetArrayFromImage(img)
    d = tmp_path / "PAT3" / "study" / "dicom"  # a case folder holding its series below it
    d.mkdir(parents=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(arr.shape[0]):
        sl = img[:, :, k]
        sl = sitk.Cast(sl, sitk.sitkInt16)
        for tag, val in [("0008|0060", "CT"), ("0020|000e", "1.2.826.0.1.3680043.2.1125.1"), ("0020|000d", "1.2.826.0.1.3680043.2.1125.2"),
                         ("0020|0032", "\\".join(map(str, img.TransformIndexToPhysicalPoint((0, 0, k))))),
                         ("0020|0037", "\\".join(map(str, img.GetDirection()[0::3] + img.GetDirection()[1::3]))),  # direction columns
                         ("0020|0013", str(k + 1)), ("0028|0030", f"{img.GetSpacing()[1]}\\{img.GetSpacing()[0]}"),
                         ("0018|0050", str(img.GetSpacing()[2]))]:
            sl.SetMetaData(tag, val)
        writer.SetFileName(str(d / f"s{k:03d}.dcm"))
        writer.Execute(sl)
    back = read_image(d)
    assert back.GetSize() == img.GetSize()
    assert np.allclose(back.GetOrigin(), img.GetOrigin(), atol=1e-3)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), arr)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(read_image(tmp_path / "PAT3")), arr)


def test_a_generic_input_name_is_named_after_its_real_folder(tmp_path, monkeypatch):
    """``../image.nii.gz`` used to give outputs named ``..`` (``.._lesions.nii.gz``, hidden)."""
    from LesionSegLib.engine.io.images import output_stem

    (tmp_path / "case7" / "sub").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "case7" / "sub")
    assert output_stem("../image.nii.gz") == output_stem("./../ct.nrrd") == "case7"
    assert output_stem("image.nii.gz") == "sub" and output_stem("../scan7.nrrd") == "scan7"


def test_model_grid_input_is_antialiased_on_fine_scans(monkeypatch):
    """R3: a 0.6 mm scan is low-pass filtered before it is decimated to the model's 2 mm grid (a
    one-voxel HU checkerboard must not alias into the network's input), while the ~2 mm sarcoma
    crops the model was trained on reach it unfiltered (their axes are not reduced)."""
    from LesionSegLib.engine.runtime.ops import resize_linear
    from LesionSegLib.engine.segment.pipeline import Engine

    engine = Engine(None, device="cpu")
    seen = {}

    def capture(x, progress=None, cancel=None):
        seen["x"] = np.asarray(x, dtype=np.float32)
        return np.zeros(np.asarray(x).shape[-3:], np.float32)

    monkeypatch.setattr(engine.runner, "probability", capture)
    hu = np.full((40, 220, 220), -1000.0, np.float32)
    checker = (np.indices((40, 180, 180)).sum(0) % 2) * 600.0 - 300.0  # +-300 HU, period 2 voxels
    hu[:, 20:200, 20:200] = 40.0 + checker
    image = sitk.GetImageFromArray(hu)
    image.SetSpacing((0.6, 0.6, 1.0))
    _, can_hu, spacing = engine.prepare(image)
    engine.probability(can_hu, spacing)
    wide = seen["x"].reshape((-1,) + seen["x"].shape[-3:])[-1]  # the wide HU window, on the model grid
    inner = tuple(slice(s // 4, s - s // 4) for s in wide.shape)
    lo, hi = engine.seg_cfg["hu_windows"][-1]
    std_hu = float(wide[inner].std()) * (hi - lo)
    assert std_hu < 5.0, f"checkerboard leaked into the model input: std {std_hu:.1f} HU"
    aliased = resize_linear(can_hu[:, 20:200, 20:200], wide.shape)  # plain linear decimation, for contrast
    assert float(aliased[inner].std()) > 20.0 and float(aliased[inner].std()) > 4 * std_hu, (float(aliased[inner].std()), std_hu)


@needs_data
def test_training_domain_input_is_not_filtered():
    """The ~2 mm sarcoma crops reach the model grid as plain linear resampling gives them (to float
    rounding): anti-aliasing changed nothing the shipped segmenter was trained or validated on."""
    from LesionSegLib.engine.io.preprocess import body_box, target_shape
    from LesionSegLib.engine.io.resample import resample
    from LesionSegLib.engine.runtime.ops import resize_linear
    from LesionSegLib.engine.segment.pipeline import Engine

    engine = Engine(None, device="cpu")
    for name in ("STS_020", "STS_041"):
        _, hu, sp = engine.prepare(read_image(data.case(name).image))
        crop = hu[body_box(hu, sp).slices].astype(np.float32)
        shape = target_shape(crop.shape, sp, engine.seg_cfg["spacing_zyx"])
        assert float(np.abs(resample(crop, shape) - resize_linear(crop, shape)).max()) < 0.05


# ------------------------------------------------------------------ AtomicWriter.commit: one set or none
def _old_outputs(folder):
    folder.mkdir()
    for name in ("a_lesions.nii.gz", "a_lesions.csv", "a.seg.nrrd"):
        (folder / name).write_text("old")


def _write_new(writer):
    for name in ("a_lesions.nii.gz", "a_lesions.csv", "a.seg.nrrd"):
        with open(writer.path(name), "w") as fh:
            fh.write("new")


def _contents(folder):
    return {p.name: p.read_text() for p in sorted(folder.iterdir())}


def test_a_failed_rename_in_commit_puts_the_earlier_outputs_back(tmp_path, monkeypatch):
    """A rename failing after the first (an old CSV made immutable) left a new labelmap beside the
    previous run's CSV, and the error named a temporary file."""
    from LesionSegLib.engine import atomic

    out = tmp_path / "out"
    _old_outputs(out)
    real = os.replace

    def replace(src, dst):
        if os.path.basename(dst) == "a_lesions.csv" and os.path.basename(src).startswith(".tmp-") \
                and not os.path.basename(src).startswith(".tmp-old"):
            raise PermissionError(1, "Operation not permitted", str(src))
        return real(src, dst)

    monkeypatch.setattr(atomic.os, "replace", replace)
    w = atomic.AtomicWriter(out)
    _write_new(w)
    with pytest.raises(PermissionError) as exc:
        w.commit()
    assert exc.value.filename == str(out / "a_lesions.csv")  # the output, not a temporary file
    assert _contents(out) == {"a.seg.nrrd": "old", "a_lesions.csv": "old", "a_lesions.nii.gz": "old"}


@contextlib.contextmanager
def _sigterm_exits():
    """SIGTERM ends the test's process as it ends a command (``cli._exit_on_sigterm``).  The tests
    deliver it by calling the installed handler, as Python does, not with a real signal: after
    OpenVINO has loaded in this process the main thread's alternate signal stack is unmapped, and
    a real signal to a Python handler crashed this test process (a terminated ``lesionseg segment``
    still exits 143)."""
    import signal

    previous = signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_sigterm_during_commit_waits_for_the_whole_set(tmp_path, monkeypatch):
    import signal

    from LesionSegLib.engine import atomic

    out = tmp_path / "out"
    _old_outputs(out)
    real, sent = os.replace, []

    def replace(src, dst):
        real(src, dst)
        if os.path.basename(src).startswith(".tmp-") and not os.path.basename(src).startswith(".tmp-old") and not sent:
            sent.append(1)
            signal.getsignal(signal.SIGTERM)(signal.SIGTERM, None)  # delivered (as Python does) after the first new file is in

    monkeypatch.setattr(atomic.os, "replace", replace)
    w = atomic.AtomicWriter(out)
    _write_new(w)
    with _sigterm_exits(), pytest.raises(SystemExit):
        w.commit()
    assert sent and _contents(out) == {"a.seg.nrrd": "new", "a_lesions.csv": "new", "a_lesions.nii.gz": "new"}


def test_sigterm_between_creating_and_recording_a_temporary_leaves_none(tmp_path, monkeypatch):
    import signal
    import tempfile

    from LesionSegLib.engine import atomic

    real = tempfile.mkstemp

    def mkstemp(*a, **k):
        made = real(*a, **k)
        signal.getsignal(signal.SIGTERM)(signal.SIGTERM, None)  # delivered right after the file is made
        return made

    monkeypatch.setattr(atomic.tempfile, "mkstemp", mkstemp)
    with _sigterm_exits(), pytest.raises(SystemExit):
        with atomic.AtomicWriter(tmp_path / "out") as w:
            w.path("a_lesions.csv")
    assert list((tmp_path / "out").iterdir()) == []


def test_a_commit_waits_while_another_process_commits_into_the_folder(tmp_path):
    """Two runs of one scan into one folder interleaved their renames (a mixed set)."""
    import fcntl
    import threading
    import time

    from LesionSegLib.engine import atomic

    out = tmp_path / "out"
    _old_outputs(out)
    w = atomic.AtomicWriter(out)
    _write_new(w)
    fd = os.open(out, os.O_RDONLY)  # what the other process's commit holds
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        t = threading.Thread(target=w.commit)
        t.start()
        time.sleep(0.3)
        assert t.is_alive() and _contents(out)["a_lesions.csv"] == "old"
    finally:
        os.close(fd)
    t.join(5)
    assert _contents(out) == {"a.seg.nrrd": "new", "a_lesions.csv": "new", "a_lesions.nii.gz": "new"}

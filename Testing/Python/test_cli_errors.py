"""Command-line mistakes end in one ``error:`` line, early, never a traceback (a new-user trial).

* a bad option value (a threshold outside [0, 1], zero threads, --cases with --split) is an
  argparse error before anything runs;
* an output folder that is a file or cannot be written is refused before a model loads or a
  training starts, and is not blamed on an input;
* errors a command does not report itself (an unknown model to ``models activate``, nothing to
  roll back, an unknown case to ``fit-ood``, an OSError) still give one line from ``cli.main``;
* a terminated command unwinds: the inflated copy of a ``.nii.gz`` it was reading is removed,
  and copies left by killed processes are swept once stale.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from LesionSegLib.engine import cli
from LesionSegLib.engine.io import integrity

ROOT = Path(__file__).resolve().parents[2]


def _ct(path: Path) -> Path:
    a = np.random.default_rng(0).normal(40, 200, (12, 20, 24)).astype(np.int16)
    a[:, :4] = -1000
    sitk.WriteImage(sitk.GetImageFromArray(a), str(path))
    return path


def _one_error(capsys, rc, expected_rc, *texts):
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == expected_rc, err
    assert lines and lines[-1].startswith(("error: ", "lesionseg ")) and "Traceback" not in err, err
    for t in texts:
        assert t in lines[-1], (t, err)
    return lines[-1]


@pytest.mark.parametrize("argv, text", [
    (["segment", "x.nii.gz", "-o", "out", "--threshold", "2"], "--threshold: 2 is not within [0, 1]"),
    (["segment", "x.nii.gz", "-o", "out", "--threshold", "nan"], "nan is not within [0, 1]"),
    (["segment", "x.nii.gz", "-o", "out", "--threads", "0"], "--threads: 0 is not >= 1"),
    (["click", "x.nii.gz", "--point=1,2,3", "-o", "out", "--threads", "-3"], "-3 is not >= 1"),
    (["evaluate", "--pred", "p", "--gt", "g", "--dice-threshold", "5"], "--dice-threshold: 5 is not within [0, 1]"),
    (["evaluate", "--pred", "p", "--gt", "g", "--cases", "STS_034", "--split", "val"], "not allowed with argument"),
    (["batch", "d", "-o", "out", "--threshold", "-0.1"], "is not within [0, 1]"),
])
def test_bad_option_values_are_refused_before_anything_runs(argv, text, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    _one_error(capsys, exc.value.code, 2, text)
    assert not (tmp_path / "out").exists()


def test_an_output_folder_that_is_a_file_is_refused_before_the_model_loads(tmp_path, capsys, monkeypatch):
    from LesionSegLib.engine.segment import pipeline

    def no_model(*a, **k):
        raise AssertionError("the model was loaded before the output folder was checked")

    monkeypatch.setattr(pipeline, "Engine", no_model)
    image = _ct(tmp_path / "case.nrrd")
    afile = tmp_path / "afile"
    afile.write_text("mine")
    for argv in (["segment", str(image), "-o", str(afile), "--progress", "none"],
                 ["click", str(image), "--point=0,0,0", "-o", str(afile)],
                 ["train-gate", "-o", str(afile)],
                 ["train-detseg", "-o", str(afile)],
                 ["train-seg", "--images", str(tmp_path), "-o", str(afile)]):
        rc = cli.main(argv)
        line = _one_error(capsys, rc, 2, f"output folder {afile} is a file, not a folder")
        assert str(image) not in line  # not blamed on the input
    assert afile.read_text() == "mine"


def test_an_unwritable_output_folder_is_refused(tmp_path, capsys, monkeypatch):
    """A folder the user may not write in (simulated: root writes anywhere, so the probe file's
    creation is made to fail as it does for a user in a read-only or foreign folder)."""
    from LesionSegLib.engine import atomic

    def denied(*a, **k):
        raise PermissionError(13, "Permission denied", k.get("dir"))

    monkeypatch.setattr(atomic.tempfile, "mkstemp", denied)
    ro = tmp_path / "ro"
    ro.mkdir()
    rc = cli.main(["segment", str(_ct(tmp_path / "case.nrrd")), "-o", str(ro), "--progress", "none"])
    _one_error(capsys, rc, 2, f"output folder {ro} cannot be written: Permission denied")
    rc = cli.main(["segment", str(tmp_path / "case.nrrd"), "-o", str(ro / "new" / "sub"), "--progress", "none"])
    _one_error(capsys, rc, 2, f"cannot be written (in {ro}): Permission denied")
    assert not (ro / "new").exists()


def test_a_dangling_symlink_output_folder_is_refused_up_front(tmp_path, capsys, monkeypatch):
    """``-o`` naming a dangling link passed the check (Path.exists follows links) and every input
    then failed with exit 1, blamed on the input."""
    from LesionSegLib.engine.segment import pipeline

    def no_model(*a, **k):
        raise AssertionError("the model was loaded before the output folder was checked")

    monkeypatch.setattr(pipeline, "Engine", no_model)
    image = _ct(tmp_path / "case.nrrd")
    link = tmp_path / "out"
    link.symlink_to(tmp_path / "does-not-exist")
    rc = cli.main(["segment", str(image), "-o", str(link), "--progress", "none"])
    line = _one_error(capsys, rc, 2, f"output folder {link} is a symbolic link to {tmp_path / 'does-not-exist'}, which does not exist")
    assert str(image) not in line
    rc = cli.main(["segment", str(image), "-o", str(link / "sub"), "--progress", "none"])
    _one_error(capsys, rc, 2, f"cannot be made: {link} is a symbolic link")


def test_errors_the_commands_do_not_catch_are_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LESIONSEG_MODELS", str(tmp_path / "models"))
    rc = cli.main(["models", "activate", "no-such-model"])
    _one_error(capsys, rc, 1, "unknown model 'no-such-model'")
    rc = cli.main(["models", "rollback"])
    _one_error(capsys, rc, 1, "nothing to roll back")
    rc = cli.main(["fit-ood", "--model", "no-such-model"])
    _one_error(capsys, rc, 1, "unknown model")
    # an OSError inside a command: one line with its text and file, without "[Errno ..]"
    import argparse

    def broken(args):
        raise PermissionError(13, "Permission denied", "/x/active.json")

    def parser():
        ap = argparse.ArgumentParser()
        ap.set_defaults(func=broken)
        return ap

    monkeypatch.setattr(cli, "build_parser", parser)
    line = _one_error(capsys, cli.main([]), 1, "error: Permission denied: /x/active.json")
    assert "Errno" not in line


def test_ctrl_c_while_the_commands_load_is_interrupted_not_a_traceback(monkeypatch, capsys):
    def interrupted():
        raise KeyboardInterrupt  # Ctrl-C in the first half second, while the command modules import

    monkeypatch.setattr(cli, "build_parser", interrupted)
    assert cli.main(["models", "list"]) == 130
    assert capsys.readouterr().err.strip() == "interrupted"


def test_a_full_disk_names_the_file_in_models_activate_and_the_folder_in_retrain(tmp_path, capsys, monkeypatch):
    import errno

    from safetensors import SafetensorError

    from LesionSegLib.engine import atomic
    from LesionSegLib.engine.learn import model_writer
    from LesionSegLib.engine.learn.labels import RetrainError

    monkeypatch.setenv("LESIONSEG_MODELS", str(tmp_path / "models"))

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(atomic.os, "fsync", full)
    _one_error(capsys, cli.main(["models", "activate", "sts-detseg"]), 1,
               f"error: No space left on device: {tmp_path / 'models' / 'active.json'}")
    assert not [p for p in (tmp_path / "models").iterdir() if p.name.startswith(".tmp-")]

    def build(tmp):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    with pytest.raises(RetrainError, match=f"cannot be written to {tmp_path / 'new'} \\(No space left on device\\)"):
        model_writer.write_version(tmp_path / "new", build)
    assert not (tmp_path / "new").exists()


def test_fit_ood_names_an_unknown_case(tmp_path, capsys, monkeypatch):
    from LesionSegLib.engine import data

    if not (data.data_root() / "manifest.csv").exists():
        pytest.skip(f"shared CT data folder {data.data_root()} is absent (set LESIONSEG_DATA)")
    monkeypatch.setenv("LESIONSEG_MODELS", str(tmp_path / "models"))
    with pytest.raises(data.UnknownCaseError, match="case 'STS_999' is not in the manifest") as exc:
        data.case("STS_999")
    assert isinstance(exc.value, KeyError)  # still a lookup error for callers that catch KeyError


def test_a_terminated_read_removes_its_inflated_copy(tmp_path):
    """SIGTERM while a ``.nii.gz`` is inflated: the CLI's handler turns it into SystemExit, so the
    temporary ``.nii`` is removed and the exit code is 128 + 15."""
    image = _ct(tmp_path / "case.nii.gz")
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    code = (
        "import os, signal, sys, time\n"
        "from pathlib import Path\n"
        "from LesionSegLib.engine.cli import _exit_on_sigterm\n"
        "from LesionSegLib.engine.io.integrity import verified\n"
        "_exit_on_sigterm()\n"
        "with verified(Path(sys.argv[1])) as p:\n"
        "    print(p, flush=True)\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    time.sleep(30)\n"
    )
    env = dict(os.environ, TMPDIR=str(tmp), PYTHONPATH=str(ROOT / "LesionSeg"))
    proc = subprocess.run([sys.executable, "-c", code, str(image)], capture_output=True, text=True, env=env, timeout=60)
    inflated = Path(proc.stdout.strip())
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr
    assert inflated.parent == tmp and inflated.name.startswith("lesionseg-")
    assert not inflated.exists() and list(tmp.iterdir()) == []


def test_stale_inflated_copies_are_swept(tmp_path, monkeypatch):
    """A copy a SIGKILLed process left behind (older than STALE_SECONDS) is removed by the next
    read; a fresh one (another process may be reading it) and other files are kept."""
    monkeypatch.setattr(integrity.tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(integrity, "_SWEPT", set())
    stale, fresh, other = tmp_path / "lesionseg-old.nii", tmp_path / "lesionseg-new.nii", tmp_path / "mine.nii"
    for p in (stale, fresh, other):
        p.write_bytes(b"\0" * 10)
    old = time.time() - integrity.STALE_SECONDS - 60
    os.utime(stale, (old, old))
    os.utime(other, (old, old))
    image = _ct(tmp_path / "case.nii.gz")
    with integrity.verified(image) as inflated:
        assert inflated.exists()
    assert not stale.exists() and fresh.exists() and other.exists() and not inflated.exists()


def test_folders_expand_as_a_user_lays_them_out(tmp_path):
    """A case folder gives its image, never the label beside it (``segment STS_041/`` used to
    segment label.nii.gz too and fail on it); a folder of case folders gives one image per case,
    as ``batch`` reads it; a folder of scans gives each scan but the label maps beside them; a
    DICOM series folder stays itself."""
    from LesionSegLib.engine.batch.cases import read_cases
    from LesionSegLib.engine.io.images import expand_inputs

    root = tmp_path / "data"
    for case in ("c1", "c2"):
        (root / case).mkdir(parents=True)
        _ct(root / case / "image.nii.gz")
        _ct(root / case / "label.nii.gz")
    (root / "notes.md").write_text("a data folder's README")
    dicom = tmp_path / "dicom"
    dicom.mkdir()
    (dicom / "IM0001").write_bytes(b"\0" * 132)
    scans = tmp_path / "scans"
    scans.mkdir()
    for n in ("a.nrrd", "b.nii.gz", "ct.nii.gz", "a_mask.nrrd", "b.seg.nrrd"):
        _ct(scans / n)
    assert expand_inputs([root / "c1"]) == [root / "c1" / "image.nii.gz"]
    assert expand_inputs([root]) == [root]  # files but no image: read_image names the problem
    (root / "notes.md").unlink()
    assert expand_inputs([root]) == [root / "c1" / "image.nii.gz", root / "c2" / "image.nii.gz"]
    assert [c.input for c in read_cases(root)] == [str(p) for p in expand_inputs([root])]
    assert expand_inputs([scans]) == [scans / "a.nrrd", scans / "b.nii.gz", scans / "ct.nii.gz"]  # no labels
    labels_only = tmp_path / "labels"
    labels_only.mkdir()
    _ct(labels_only / "label.nii.gz")
    assert expand_inputs([labels_only]) == [labels_only / "label.nii.gz"]  # then read_image says it is no CT
    assert expand_inputs([dicom, scans / "a.nrrd"]) == [dicom, scans / "a.nrrd"]


# ------------------------------------------------------------------------- memory and progress
def test_running_out_of_memory_is_said_as_such(tmp_path, capsys, monkeypatch):
    """Found by an audit of whole-body scans: ITK failing to allocate the image was reported as a
    corrupt file (a radiologist would discard a good scan), and OpenVINO's "can't alloc" while
    compiling the model ended in a traceback, then in "model cannot be loaded"."""
    from LesionSegLib.engine.io import images
    from LesionSegLib.engine.segment import pipeline

    scan = _ct(tmp_path / "scan.nrrd")

    def no_memory(*a, **k):
        raise RuntimeError("Exception thrown in SimpleITK ReadImage: itkImportImageContainer.hxx:192: Failed to allocate memory for image.")

    with monkeypatch.context() as m:
        m.setattr(images.sitk, "ReadImage", no_memory)
        with pytest.raises(MemoryError, match="scan.nrrd: not enough memory to read this scan \\(the file is not damaged"):
            images.read_image(scan)
        rc = cli.main(["segment", str(scan), "-o", str(tmp_path / "out"), "--progress", "none"])
        _one_error(capsys, rc, 1, "not enough memory to read this scan")

    def cannot_compile(*a, **k):
        raise RuntimeError("Exception from src/inference/src/cpp/core.cpp:132:\nException from src/plugins/intel_cpu/src/plugin.cpp:59: can't alloc")

    monkeypatch.setattr(pipeline, "Engine", cannot_compile)
    with pytest.raises(MemoryError, match="not enough memory to load model sts-clcs@1.2.0 .*can't alloc|not enough memory to load model"):
        pipeline.load_engine("sts-clcs", "cpu")
    rc = cli.main(["segment", str(scan), "-o", str(tmp_path / "out2"), "--progress", "none"])
    _one_error(capsys, rc, 1, "not enough memory to load model sts-clcs@1.2.0")


def test_progress_covers_reading_detection_clusters_and_writing(tmp_path, capsys):
    """The bar stood still for most of a whole-body DetSeg run (the detector's eight flips reported
    nothing) and through reading, resizing, clustering and writing (an audit)."""
    import json

    from LesionSegLib.engine.data import SAMPLE_IMAGE

    rc = cli.main(["segment", str(SAMPLE_IMAGE), "-o", str(tmp_path / "out"), "--model", "sts-detseg", "--progress", "json",
                   "--device", "cpu"])
    assert rc == 0
    events = [json.loads(ln) for ln in capsys.readouterr().out.splitlines() if ln.startswith("{")]
    steps = [(e["stage"], e["fraction"]) for e in events if e["event"] == "progress"]
    stages = list(dict.fromkeys(s for s, _ in steps))
    assert stages[0] == "read" and stages[-1] == "write" and {"detect", "roi_segmentation", "clusters"} <= set(stages)
    detect = [f for s, f in steps if s == "detect"]
    assert len(detect) >= 9 and detect == sorted(detect) and detect[0] == pytest.approx(0.1)  # start, then each of 8 flips


def test_an_over_long_case_name_is_refused_before_the_scan_is_read(tmp_path, capsys, monkeypatch):
    """An input named with 241-248 characters was read and segmented, then failed at the write with
    "File name too long" (``<stem>_lesions.nii.gz`` passes 255 bytes); from 219 bytes the first run
    worked, and every re-run into the same folder failed so, when the earlier outputs were moved
    aside (``.tmp-old-<12 hex>-<name>``). ``batch`` refused names over 200 bytes up front;
    ``segment`` and ``click`` now do too, and the other inputs still run."""
    from LesionSegLib.engine.io import images

    good = _ct(tmp_path / "good.nii.gz")
    long = tmp_path / ("c" * 230 + ".nii.gz")
    long.symlink_to(good)
    read = []
    real = images.read_image
    monkeypatch.setattr(images, "read_image", lambda p, *a, **k: read.append(Path(p).name) or real(p, *a, **k))
    out = tmp_path / "out"
    rc = cli.main(["segment", str(long), str(good), "-o", str(out)])
    err = capsys.readouterr().err
    assert rc == 1 and "case name too long (230 bytes; at most 200)" in err and "rename the input" in err
    assert read == ["good.nii.gz"] and sorted(p.name for p in out.iterdir()) == [
        "good.seg.nrrd", "good_lesions.csv", "good_lesions.nii.gz"]
    rc = cli.main(["click", str(long), "--point", "0,0,0", "-o", str(tmp_path / "clicks")])
    assert rc == 1 and "case name too long (230 bytes" in capsys.readouterr().err
    assert read == ["good.nii.gz"] and not (tmp_path / "clicks").exists()

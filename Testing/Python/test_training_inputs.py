"""Bad training inputs are refused in one line naming the file, before any training starts:
train-seg's cases (labels not 0/1, another grid, non-CT or corrupt images, a case without a
label, no lesion at all) and its ``--register`` name; train-gate's case lists and labels;
train-detseg's ``--detector-init`` file."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from LesionSegLib.engine import cli, models
from LesionSegLib.engine.errors import InputError, LesionSegError
from LesionSegLib.engine.learn import jobs

DATA = Path(os.environ.get("LESIONSEG_DATA", "/work/shared/data")) / "sts"
CASES = ("STS_001", "STS_002")


def _dataset(root: Path) -> Path:
    """A training folder of two real cases; images symlinked, labels copied (so tests may damage them)."""
    for c in CASES:
        (root / c).mkdir(parents=True)
        os.symlink(DATA / c / "image.nii.gz", root / c / "image.nii.gz")
        shutil.copyfile(DATA / c / "label.nii.gz", root / c / "label.nii.gz")
    return root


def _rewrite(path: Path, fn, source: Path | None = None) -> None:
    im = sitk.ReadImage(str(source or path))
    out = sitk.GetImageFromArray(fn(sitk.GetArrayFromImage(im)))
    out.CopyInformation(im)
    path.unlink(missing_ok=True)
    sitk.WriteImage(out, str(path))


def _damage(ds: Path, kind: str) -> Path:
    """Damage STS_001 of ``ds`` (or both labels for 'empty'); return the file the error must name."""
    lab, img = ds / "STS_001" / "label.nii.gz", ds / "STS_001" / "image.nii.gz"
    if kind == "labels012":
        _rewrite(lab, lambda a: np.where(a > 0, 2, a).astype(np.uint8))
    elif kind == "labels255":
        _rewrite(lab, lambda a: np.where(a > 0, 255, 0).astype(np.uint8))
    elif kind == "float":
        _rewrite(lab, lambda a: (a * 0.5).astype(np.float32))
    elif kind == "grid":
        im = sitk.ReadImage(str(lab))
        im.SetSpacing((1.0, 1.0, 1.0))
        sitk.WriteImage(im, str(lab))
    elif kind == "mr":
        _rewrite(img, lambda a: ((a.astype(np.float32) + 1024) / 4).clip(0, 1500).astype(np.int16), DATA / "STS_001" / "image.nii.gz")
        return img
    elif kind == "corrupt_image":
        img.unlink()
        img.write_bytes((DATA / "STS_001" / "image.nii.gz").read_bytes()[:3000])
        return img
    elif kind == "corrupt_label":
        lab.write_bytes(b"not a nifti")
    elif kind == "missing_label":
        lab.unlink()
        return ds / "STS_001"
    elif kind == "empty":
        for c in CASES:
            _rewrite(ds / c / "label.nii.gz", np.zeros_like)
        return Path("no lesion voxel")
    return lab


@pytest.mark.parametrize("kind", ["labels012", "labels255", "float", "grid", "mr", "corrupt_image", "corrupt_label",
                                  "missing_label", "empty"])
def test_train_seg_refuses_bad_cases_before_training(tmp_path, kind):
    ds = _dataset(tmp_path / "ds")
    named = _damage(ds, kind)
    job = jobs.SegmenterTrainingJob(ds, tmp_path / "out", max_steps=1)
    with pytest.raises(LesionSegError) as err:
        job.check_inputs()
    msg = str(err.value)
    assert str(named) in msg and "\n" not in msg
    assert job.proc is None and not (tmp_path / "out").exists()


def test_train_seg_cli_refuses_bad_label_in_one_line(tmp_path, monkeypatch, capsys):
    ds = _dataset(tmp_path / "ds")
    lab = _damage(ds, "labels012")
    monkeypatch.setattr(jobs.SegmenterTrainingJob, "start", lambda self: pytest.fail("training started"))
    rc = cli.main(["train-seg", "--images", str(ds), "-o", str(tmp_path / "out"), "--max-steps", "1"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.count("\n") == 0 and err.startswith("error:") and str(lab) in err and "found 2" in err


def test_good_cases_pass_the_check_and_are_read_once(tmp_path, monkeypatch):
    ds = _dataset(tmp_path / "ds")
    job = jobs.SegmenterTrainingJob(ds, tmp_path / "out", max_steps=1, val=["STS_002"])
    assert [c.name for c in job.check_inputs()] == list(CASES)
    monkeypatch.setattr(jobs, "check_case_files", lambda *a, **k: pytest.fail("cases read twice"))
    assert [c.name for c in job.check_inputs()] == list(CASES)  # start() checks again: cached


@pytest.mark.parametrize("name", ["../evil", "a/b", "x@../../y", "..", "evil@.."])
def test_register_name_with_a_path_is_refused(tmp_path, name):
    with pytest.raises(LesionSegError):
        jobs.check_register_name(name, None)
    seg = tmp_path / "seg"  # register_segmenter itself refuses it too, before writing anything
    seg.mkdir()
    (seg / "segmenter.safetensors").write_bytes(b"x")
    import hashlib
    import json

    (seg / "segmenter.json").write_text(json.dumps({"file": "segmenter.safetensors", "sha256": hashlib.sha256(b"x").hexdigest()}))
    with pytest.raises(LesionSegError):
        jobs.register_segmenter(seg, None, name)
    assert not (tmp_path / "evil").exists() and not (Path(models.user_models_dir()).parent / "evil").exists()


def test_train_seg_register_checked_before_training(tmp_path, monkeypatch, capsys):
    ds = _dataset(tmp_path / "ds")
    monkeypatch.setattr(jobs.SegmenterTrainingJob, "start", lambda self: pytest.fail("training started"))
    shipped = models.get_card(None)
    for bad in ("../evil", f"{shipped.name}@{shipped.version}", "ok@bad/version", "-bad"):
        rc = cli.main(["train-seg", "--images", str(ds), "-o", str(tmp_path / "out"), "--max-steps", "1", f"--register={bad}"])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and err.startswith("error:") and "\n" not in err, (bad, err)
    assert shipped.id in err or "already exists" in err or "invalid" in err


def test_child_prints_one_error_line(monkeypatch, capsys):
    from LesionSegLib.engine.learn import train_seg

    def boom():
        raise InputError("label values must be 0 (background) or 1 (lesion); found 2", "/x/label.nii.gz")

    monkeypatch.setattr(train_seg, "main", boom)
    assert train_seg._main_one_line_errors() == 1
    err = capsys.readouterr().err
    assert err == "error: /x/label.nii.gz: label values must be 0 (background) or 1 (lesion); found 2\n"
    job = jobs.SegmenterTrainingJob("x", "y")
    job.stderr_lines.append(err.strip())
    assert job.error_text() == "/x/label.nii.gz: label values must be 0 (background) or 1 (lesion); found 2"


def test_cancelled_training_leaves_no_checkpoint_without_description(tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "segmenter.safetensors").write_bytes(b"half")
    job = jobs.SegmenterTrainingJob(tmp_path, out)
    monkeypatch.setattr(jobs.ChildProcessJob, "cancel", lambda self, grace=3.0: setattr(self, "cancelled", True))
    job.cancel()
    assert not (out / "segmenter.safetensors").exists()


def test_gate_refuses_duplicate_and_lesion_free_case_lists(capsys, tmp_path):
    from LesionSegLib.engine.gate.train import case_list_problem, slab_problem

    assert "STS_001" in case_list_problem(["STS_001", "STS_001"], ["STS_034"])
    assert "STS_034" in case_list_problem(["STS_001"], ["STS_034", "STS_034"])
    assert "both" in case_list_problem(["STS_001"], ["STS_001"])
    assert case_list_problem(["STS_001", "STS_002"], ["STS_034"]) is None
    y = np.zeros((16, 4, 4), np.uint8)
    yl = y.copy()
    yl[3, 1, 1] = 1
    assert "training cases" in slab_problem(np.zeros(2), ["A"], {"V": (None, yl)}, 8, 1)
    assert "calibration cases ['V']" in slab_problem(np.ones(2), ["A"], {"V": (None, y)}, 8, 1)
    assert slab_problem(np.ones(2), ["A"], {"V": (None, yl)}, 8, 1) is None
    rc = cli.main(["train-gate", "-o", str(tmp_path / "g"), "--max-steps", "1", "--train", "STS_001", "STS_002",
                   "--extra-cases", "STS_001", "--val", "STS_034"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "more than once" in err and "STS_001" in err and "\n" not in err
    assert not (tmp_path / "g").exists()


def test_gate_refuses_labels_not_0_1(tmp_path):
    from LesionSegLib.engine import data as dataset
    from LesionSegLib.engine.gate.train import load_gate_case

    ds = _dataset(tmp_path / "ds")
    lab = _damage(ds, "labels255")
    seg = models.get_card(None).part("segmenter")
    with pytest.raises(InputError) as err:
        load_gate_case(dataset.Case("STS_001", "sts", ds / "STS_001" / "image.nii.gz", lab), seg["spacing_zyx"], seg["hu_windows"])
    assert str(lab) in str(err.value) and "255" in str(err.value)


@pytest.mark.parametrize("content", [None, b"", b"not safetensors at all", "dir"])
def test_detseg_init_checked_before_any_stage(tmp_path, monkeypatch, capsys, content):
    import subprocess

    monkeypatch.setattr(subprocess, "call", lambda *a, **k: pytest.fail("a stage started"))
    monkeypatch.setattr(subprocess, "Popen", lambda *a, **k: pytest.fail("a stage started"))
    init = tmp_path / "d.safetensors"
    if content == "dir":
        init.mkdir()
    elif content is not None:
        init.write_bytes(content)
    rc = cli.main(["train-detseg", "-o", str(tmp_path / "m"), "--detector-init", str(init)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("error: --detector-init") and str(init) in err and "\n" not in err


def test_train_seg_refused_at_its_start_leaves_no_empty_output_folder(tmp_path, capsys):
    """A bad ``train_seg`` option passed after ``--`` (here UniMatch's --min-confident 1.5) is
    refused by the training process at its start; the output folder the command had made for it
    was left behind empty (README audit).  A folder that existed before is kept."""
    ds = _dataset(tmp_path / "ds")
    for out, existed in ((tmp_path / "new", False), (tmp_path / "old", True)):
        if existed:
            out.mkdir()
        rc = cli.main(["train-seg", "--images", str(ds), "-o", str(out), "--max-steps", "1", "--unlabeled", str(ds),
                       "--", "--min-confident", "1.5"])
        err = capsys.readouterr().err
        assert rc == 1 and "--min-confident must lie in [0, 1]" in err
        assert out.exists() == existed

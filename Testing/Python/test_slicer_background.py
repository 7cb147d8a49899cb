"""The Segment button's path: the engine CLI in a background process (``runner.py``), run to
completion and compared with the in-process result of ``test_slicer_logic.py`` (OOD record
included), on a chest scan (the OOD warning), cancelled, and failing (errors name the volume)."""
from __future__ import annotations

import time

import numpy as np
import pytest

from slicer_app_shim import data_dir, default_model, slicer_app  # noqa: F401 (fixtures)
from test_slicer_logic import _nodes, run  # noqa: F401 (the module's fixture: one in-process run on STS_041)


# --------------------------------------------------------------------- background runner
def test_runner_keeps_every_stage_between_polls():
    """A fast run passes several stages between two polls of the GUI timer: none is lost (CI saw
    'stage: inference' missing from the log box when the whole engine run took 0.6 s)."""
    from LesionSegLib.runner import BackgroundSegmentation

    runner = BackgroundSegmentation(None, "case")
    for fraction, stage in ((0.1, "preprocess"), (0.2, "preprocess"), (0.5, "inference"), (0.9, "clusters")):
        runner._events.put({"event": "progress", "fraction": fraction, "stage": stage})
    runner.poll()
    assert runner.stages == ["preprocess", "inference", "clusters"] and runner.stage == "clusters"
    assert runner.fraction == 0.9
    runner._events.put({"event": "progress", "fraction": 1.0, "stage": "clusters"})
    runner.poll()
    assert runner.stages == ["preprocess", "inference", "clusters"]  # a repeated stage is not a new one


def test_background_run_matches_in_process(run):
    from LesionSegLib import mrml

    before = {n.GetID() for n in _nodes(run.volume.GetScene())}
    runner = run.logic.start_background(run.volume, model=str(run.engine.card.folder), device="cpu")
    workdir = runner.workdir
    assert runner.wait(timeout=300) == "finished", runner.error
    assert runner.fraction == 1.0 and runner.stage
    assert {"preprocess", "inference"} <= set(runner.stages)  # every stage is kept for the log box
    assert {n.GetID() for n in _nodes(run.volume.GetScene())} == before  # nothing before finish
    seg, table = run.logic.finish_background(runner, run.volume, threshold=0.3)
    try:
        assert not workdir.exists()  # temporary files removed
        records = mrml.lesions(seg)
        assert [d["lesion_id"] for d in records] == [les.lesion_id for les in run.ref.lesions]
        np.testing.assert_allclose([d["confidence"] for d in records], [les.confidence for les in run.ref.lesions], atol=1e-5)
        assert mrml.get_threshold(seg) == pytest.approx(0.3)
        assert seg.GetAttribute(mrml.ATTR_CASE_HASH) == run.case_hash
        # the OOD record travels too (the Segment button runs this path): scan score, warning, per-lesion scores
        from LesionSegLib import ood

        assert run.ref.ood is not None and ood.score(seg) == pytest.approx(run.ref.ood["scan_score"], abs=1e-4)
        assert ood.warning(seg) == (run.ref.ood["warning"] or "")
        np.testing.assert_allclose([d["ood_score"] for d in records], [les.ood_score for les in run.ref.lesions], atol=1e-4)
        from LesionSegLib import export

        assert np.array_equal(export.instance_labelmap(seg, [d["lesion_id"] for d in records], run.volume), run.ref.labelmap)
        d = run.logic.review(seg, 1, "accepted")
        assert d.patch is not None and d.patch.shape == (3, 32, 32, 32)
    finally:
        mrml.remove_result_nodes(seg)


def test_background_run_on_a_chest_scan_shows_the_ood_warning(run, data_dir):
    """A chest CT segmented with the Segment button (background CLI): the sarcoma model's warning
    reaches the node and the panel's parameter, as in-process (the CLI's CSV had the scores, but
    the panel's results carried none)."""
    from LesionSegLib import mrml, ood

    volume = mrml.load_volume(str(data_dir / "lidc" / "LIDC-IDRI-0001" / "image.nii.gz"), "LIDC-IDRI-0001")
    try:
        runner = run.logic.start_background(volume, model=str(run.engine.card.folder), device="cpu")
        assert runner.wait(timeout=300) == "finished", runner.error
        seg, _ = run.logic.finish_background(runner, volume)
        try:
            assert "unlike the model's training data" in ood.warning(seg) and ood.score(seg) > 1.0
            assert all(d["ood_score"] is not None for d in mrml.lesions(seg))
        finally:
            mrml.remove_result_nodes(seg)
    finally:
        volume.GetScene().RemoveNode(volume)


def test_background_cancel_leaves_nothing(run):
    from LesionSegLib.runner import process_group_alive

    scene = run.volume.GetScene()
    before = {n.GetID() for n in _nodes(scene)}
    runner = run.logic.start_background(run.volume, model=str(run.engine.card.folder), device="cpu")
    pid, workdir = runner.proc.pid, runner.workdir
    assert workdir.exists() and process_group_alive(pid)
    deadline = time.monotonic() + 60
    while runner.state == "running" and not runner.stage and time.monotonic() < deadline:  # cancel mid-run
        runner.poll()
        time.sleep(0.05)
    runner.cancel()
    assert runner.state == "cancelled"
    assert runner.proc.poll() is not None
    assert not process_group_alive(pid)
    assert not workdir.exists()
    assert {n.GetID() for n in _nodes(scene)} == before
    with pytest.raises(RuntimeError):
        runner.load_result()


def test_background_failure_is_reported(run, tmp_path):
    from LesionSegLib.runner import BackgroundSegmentation

    runner = BackgroundSegmentation(run.file_image, stem="bad", model=str(tmp_path / "no-such-model"), device="cpu")
    runner.start()
    workdir = runner.workdir
    assert runner.wait(timeout=120) == "failed"
    assert "model" in runner.error.lower()
    assert not workdir.exists()
    # a bad volume: the error names the volume, not the temporary file the engine read (gone by then)
    import SimpleITK as sitk

    mask = sitk.Cast(run.file_image > 0, sitk.sitkInt16)  # a label map, 0/1: not CT
    mask.CopyInformation(run.file_image)
    runner = BackgroundSegmentation(mask, stem="tumour mask", model=str(run.engine.card.folder), device="cpu")
    runner.start()
    workdir = runner.workdir
    assert runner.wait(timeout=120) == "failed"
    assert runner.error.startswith("volume 'tumour mask': intensity range [0, 1] is not CT"), runner.error
    assert str(workdir) not in runner.error and not workdir.exists()


def test_a_volume_named_image_is_segmented_in_the_background(run):
    """Found by an audit: a volume named "image", "CT", "Volume", "scan" or "img" (Add Data names
    STS_041/image.nii.gz "image") ran to the end, then "Cannot load the segmentation result": the
    CLI names a generic file after its folder, and the runner looked for "image_lesions.nii.gz"."""
    from LesionSegLib import mrml

    name = run.volume.GetName()
    run.volume.SetName("image")
    try:
        runner = run.logic.start_background(run.volume, model=str(run.engine.card.folder), device="cpu")
        assert runner.wait(timeout=300) == "finished", runner.error
        seg, _table = run.logic.finish_background(runner, run.volume, threshold=0.3)
        assert [d["lesion_id"] for d in mrml.lesions(seg)] == [les.lesion_id for les in run.ref.lesions]
        mrml.remove_result_nodes(seg)
    finally:
        run.volume.SetName(name)

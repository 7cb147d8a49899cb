"""Click to segment with a dense (CLCS) model: the model's segmenter on a crop around the point.

The crop starts at ``DENSE_RADIUS_MM`` and grows while the lesion reaches its side; the cascade
gate is bypassed; a routing (fine-tuned) model routes the click on the whole scan's descriptor
(tested in ``test_finetune.py``).  Refusals (outside the volume, on air, nothing found) name the
point.  The detseg click is tested in ``test_detseg.py`` and ``test_runtime_detseg.py``.
"""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from LesionSegLib.engine import click as click_module
from LesionSegLib.engine import data
from LesionSegLib.engine.cli import main as cli_main
from LesionSegLib.engine.click import click
from LesionSegLib.engine.errors import InputError
from LesionSegLib.engine.segment.pipeline import ClcsEngine, Engine
from LesionSegLib.engine.segment.result import CSV_COLUMNS

DATA = data.data_root()
needs_data = pytest.mark.skipif(not (DATA / "manifest.csv").exists(), reason=f"shared CT data folder {DATA} is absent (set LESIONSEG_DATA)")
CLCS = "sts-clcs"


@pytest.fixture(scope="module")
def clcs():
    return Engine(CLCS, device="cpu")


def _case(name):
    case = data.case(name)
    img = sitk.ReadImage(str(case.image))
    gt = sitk.GetArrayFromImage(sitk.ReadImage(str(case.label))) > 0
    return img, gt


def _centre_lps(img, gt):
    pts = np.argwhere(gt)
    com = pts.mean(0)
    v = com if gt[tuple(np.round(com).astype(int))] else pts[np.argmin(np.linalg.norm(pts - com, axis=1))]
    return img.TransformContinuousIndexToPhysicalPoint([float(a) for a in v[::-1]])


def _dice(a, b) -> float:
    return 2.0 * (a & b).sum() / max(1, a.sum() + b.sum())


@needs_data
def test_dense_click_segments_the_lesion_under_the_point(clcs):
    img, gt = _case("STS_041")
    res = click(clcs, img, [_centre_lps(img, gt)])
    assert res.model_id == clcs.card.id and res.labelmap.shape == gt.shape
    assert set(np.unique(res.labelmap)) == {0, 1} and len(res.lesions) == 1
    assert _dice(res.labelmap == 1, gt) > 0.6
    les = res.lesions[0]
    assert les.lesion_id == 1 and 0.0 <= les.confidence <= 1.0 and les.patch is not None
    # the lesion's box (start, stop) is on the input grid and holds the label
    (lo, hi) = les.bbox_ijk
    zz, yy, xx = np.nonzero(res.labelmap)
    assert (min(xx), min(yy), min(zz)) == tuple(lo) and (max(xx) + 1, max(yy) + 1, max(zz) + 1) == tuple(hi)  # stop exclusive


@needs_data
def test_two_points_on_one_lesion_give_one_lesion(clcs):
    """Two clicks on one tumour (its centre, and another voxel of it) are one lesion: label 1 and
    one row, and a message that point 2 added nothing (the CSV had a row 2 with no voxel 2)."""
    img, gt = _case("STS_041")
    centre = _centre_lps(img, gt)
    inside = np.argwhere(gt)[len(np.argwhere(gt)) // 3]
    other = img.TransformIndexToPhysicalPoint([int(v) for v in inside[::-1]])
    res = click(clcs, img, [centre, other])
    assert set(np.unique(res.labelmap)) == {0, 1} and [les.lesion_id for les in res.lesions] == [1]
    assert any("point 2" in m and "lies on the lesion of point 1" in m for m in res.messages)
    assert _dice(res.labelmap == 1, gt) > 0.6


@needs_data
def test_dense_click_grows_the_crop_while_the_lesion_reaches_its_side(clcs, monkeypatch):
    """STS_034's tumour (547 ml, ~12 cm) in an 80 mm crop is cut by the crop; growing it recovers the tumour."""
    img, gt = _case("STS_034")
    point = _centre_lps(img, gt)
    monkeypatch.setattr(click_module, "DENSE_RADIUS_MM", 40.0)
    monkeypatch.setattr(click_module, "MAX_RADIUS_MM", 40.0)
    cut = click(clcs, img, [point]).labelmap == 1
    monkeypatch.setattr(click_module, "MAX_RADIUS_MM", 225.0)
    grown = click(clcs, img, [point]).labelmap == 1
    assert grown.sum() > 2 * cut.sum()
    assert _dice(grown, gt) > _dice(cut, gt) + 0.2 and _dice(grown, gt) > 0.6


def test_dense_click_bypasses_the_cascade_gate(clcs, monkeypatch):
    """The reviewer says a lesion is there: the gate must not skip the crop."""
    class Gate:
        def apply(self, x, infer):
            raise AssertionError("the gate ran on a click")

    monkeypatch.setattr(clcs, "gate", Gate())
    seen = []

    def probability(self, hu, sp, progress=None, cancel=None, use_gate=True, click_zyx=None):
        seen.append(use_gate)
        prob = np.zeros(hu.shape, np.float32)
        c = np.asarray(hu.shape) // 2
        prob[c[0] - 3 : c[0] + 4, c[1] - 5 : c[1] + 6, c[2] - 5 : c[2] + 6] = 0.9
        return prob, {}

    monkeypatch.setattr(ClcsEngine, "probability", probability)
    img = _soft_tissue()
    centre = img.TransformContinuousIndexToPhysicalPoint([32.0, 32.0, 15.0])
    res = click(clcs, img, [centre])
    assert seen == [False] and len(res.lesions) == 1 and res.labelmap.sum() > 0


def _soft_tissue():
    rng = np.random.default_rng(0)
    a = rng.normal(40, 10, (30, 64, 64)).astype(np.float32)
    a[:, :4] = -1000  # rows 0-3 are air
    img = sitk.GetImageFromArray(a)
    img.SetSpacing((1.5, 1.5, 3.0))
    return img


def test_dense_click_refusals_name_the_point(clcs, monkeypatch):
    img = _soft_tissue()
    with pytest.raises(InputError, match=r"point \(500.0, 10.0, 10.0\) mm LPS is outside the volume "
                                         r"\(voxel index \(333.3, 6.7, 3.3\), size \(64, 64, 30\)\)"):
        click(clcs, img, [(20.0, 20.0, 20.0), (500.0, 10.0, 10.0)])
    with pytest.raises(InputError, match=r"point \(30.0, 2.0, 40.0\) mm LPS is on air"):
        click(clcs, img, [(30.0, 2.0, 40.0)])
    with pytest.raises(InputError, match="no point"):
        click(clcs, img, [])
    # a segmenter that finds nothing there: refused by name, not an empty lesion
    monkeypatch.setattr(ClcsEngine, "probability", lambda self, hu, sp, **kw: (np.zeros(hu.shape, np.float32), {}))
    with pytest.raises(InputError, match=r"no lesion found at point \(20.0, 20.0, 20.0\) mm LPS: sts-clcs@\S+ gives no"):
        click(clcs, img, [(20.0, 20.0, 20.0)])
    # nor the fallback: both are named
    with pytest.raises(InputError, match=r"neither sts-clcs@\S+ nor sts-clcs@\S+ gives lesion voxels there"):
        click(clcs, img, [(20.0, 20.0, 20.0)], fallback=clcs)


def test_a_point_just_outside_the_volume_is_refused():
    """The volume ends half a voxel beyond its outer voxel centres: a point inside that margin is
    taken (its index returned), one beyond it, by a fraction of a voxel or one voxel, is refused
    (not clamped onto the edge voxel)."""
    img = _soft_tissue()  # 64 x 64 x 30 voxels of 1.5 x 1.5 x 3 mm
    img.SetOrigin((-40.0, 12.5, 300.0))
    for idx in ([-0.4, 0.0, 0.0], [63.4, 63.0, 29.4], [31.0, -0.45, 15.0]):
        point = img.TransformContinuousIndexToPhysicalPoint(idx)
        np.testing.assert_allclose(click_module.check_point(img, point), idx, atol=1e-6)
    for idx in ([-0.6, 5.0, 5.0], [-1.0, 5.0, 5.0], [5.0, 63.6, 5.0], [5.0, 64.0, 5.0], [5.0, 5.0, 29.6], [5.0, 5.0, 31.0]):
        with pytest.raises(InputError, match="is outside the volume"):
            click_module.check_point(img, img.TransformContinuousIndexToPhysicalPoint(idx))


@needs_data
def test_click_cli_default_model_is_dense(tmp_path):
    from LesionSegLib.engine.cli.click import DEFAULT_CLICK_MODEL

    assert DEFAULT_CLICK_MODEL == CLCS
    case = data.case("STS_038")
    img, gt = _case("STS_038")
    point = ",".join(f"{v:.3f}" for v in _centre_lps(img, gt))
    out = tmp_path / "out"
    assert cli_main(["click", str(case.image), f"--point={point}", "-o", str(out), "--device", "cpu"]) == 0
    lab = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "STS_038_click.nii.gz")))
    assert _dice(lab == 1, gt) > 0.6
    header, row = [line.split(",") for line in (out / "STS_038_click.csv").read_text().splitlines()[:2]]
    assert header == list(CSV_COLUMNS)
    assert 0.0 <= float(dict(zip(header, row))["scan_ood_score"]) < 1.5  # the scan's OOD score, as segment writes it
    # a bad point writes nothing; exit code 1 (a bad input, as in segment), 2 for a malformed --point
    bad = tmp_path / "bad"
    assert cli_main(["click", str(case.image), "--point=9999,0,0", "-o", str(bad), "--device", "cpu"]) == 1
    assert cli_main(["click", str(case.image), "--point=1,2", "-o", str(bad), "--device", "cpu"]) == 2
    assert not bad.exists() or not any(bad.iterdir())


@needs_data
def test_fallback_answers_where_the_model_finds_nothing(clcs, monkeypatch, tmp_path):
    """A dense model that finds nothing at the point: the fallback (sts-detseg) answers, and says so."""
    img, gt = _case("STS_041")
    point = _centre_lps(img, gt)
    monkeypatch.setattr(ClcsEngine, "probability", lambda self, hu, sp, **kw: (np.zeros(hu.shape, np.float32), {}))
    loads = []

    def load():
        loads.append(1)
        return Engine("sts-detseg", device="cpu")

    res = click(clcs, img, [point], fallback=load)
    assert loads == [1] and res.model_id.startswith("sts-detseg@") and _dice(res.labelmap == 1, gt) > 0.5
    assert any(f"{clcs.card.id} found no lesion there; sts-detseg" in m for m in res.messages)
    # the CLI loads sts-detseg as the fallback of a dense model by default; --fallback-model none refuses
    case = data.case("STS_041")
    arg = ",".join(f"{v:.3f}" for v in point)
    assert cli_main(["click", str(case.image), f"--point={arg}", "-o", str(tmp_path / "a"), "--device", "cpu"]) == 0
    assert (tmp_path / "a" / "STS_041_click.nii.gz").exists()
    assert cli_main(["click", str(case.image), f"--point={arg}", "-o", str(tmp_path / "b"), "--device", "cpu",
                     "--fallback-model", "none"]) == 1
    assert not (tmp_path / "b").exists() or not any((tmp_path / "b").iterdir())


def test_a_larger_crop_that_loses_the_lesion_keeps_the_previous_one(clcs, monkeypatch):
    calls = []

    def first_at_side_then_nothing(engine, hu, sp, voxel, cancel=None):
        calls.append(hu.shape)
        if len(calls) > 1:
            return None
        comp = np.zeros(hu.shape, bool)
        comp[:, voxel[1] - 2 : voxel[1] + 3, voxel[2] - 2 : voxel[2] + 3] = True  # reaches the crop's z sides
        return comp, comp.astype(np.float32), 0.5

    monkeypatch.setattr(click_module, "dense_lesion_mask", first_at_side_then_nothing)
    monkeypatch.setattr(click_module, "DENSE_RADIUS_MM", 20.0)
    img = _soft_tissue()
    res = click(clcs, img, [img.TransformContinuousIndexToPhysicalPoint([32.0, 32.0, 15.0])])
    assert len(calls) == 2 and calls[1] != calls[0]  # it grew once, then lost the lesion
    assert len(res.lesions) == 1 and res.labelmap.any()


def test_an_untrained_click_segmenter_answers_like_the_base_model(tmp_path):
    """The click channel starts silent (its weights at zero), so before training the click
    segmenter is the base segmenter: same lesion from the same click, on torch and OpenVINO."""
    import shutil

    from LesionSegLib.engine.learn.train_click import attach, guided_network
    from LesionSegLib.engine.models import get_card, read_card, save_weights

    base = get_card(CLCS)
    folder = tmp_path / "clcs-click"
    shutil.copytree(base.folder, folder, ignore=shutil.ignore_patterns("onnx-cache", "*.onnx"))
    net, cfg = guided_network(base)
    save_weights(net, tmp_path / "w.safetensors")
    card = read_card(folder)
    part = attach(card, tmp_path / "w.safetensors", cfg, version="9.9.9")
    assert part["guidance"]["channel"] == 2 and part["network"]["in_channels"] == 3
    card = read_card(folder)
    assert card.id.endswith("@9.9.9") and card.verified_path("click_segmenter").exists()
    img = _soft_tissue()
    a = np.zeros((30, 64, 64), np.float32)
    a[:] = sitk.GetArrayFromImage(img)
    a[10:20, 25:40, 25:40] += 60.0  # a brighter blob: whatever the base makes of it, the click net must agree
    blob = sitk.GetImageFromArray(a)
    blob.CopyInformation(img)
    for runtime in ("torch", "openvino"):
        eng = Engine(card, device="cpu", runtime=runtime)
        hu = sitk.GetArrayFromImage(blob)
        plain, _ = eng.probability(hu, (3.0, 1.5, 1.5), use_gate=False)
        guided, _ = eng.probability(hu, (3.0, 1.5, 1.5), click_zyx=(15, 32, 32))
        assert eng.click_runner is not None and eng.click_runner.part == "click_segmenter"
        assert np.abs(plain - guided).max() < 1e-3, runtime


def test_centre_click_is_the_centre_of_mass_or_the_nearest_lesion_voxel():
    """The benchmark's and the click trainer's "centre" click: a block's centre of mass, and for a
    C-shaped lesion (centre outside it) the lesion voxel nearest to that centre."""
    block = np.zeros((10, 10, 10), bool)
    block[2:7, 3:8, 1:6] = True
    assert np.allclose(click_module.centre_click(np.argwhere(block)), [4.0, 5.0, 3.0])
    ring = np.zeros((5, 21, 21), bool)
    zz, yy, xx = np.mgrid[:5, :21, :21]
    r = np.hypot(yy - 10, xx - 10)
    ring[(r >= 6) & (r <= 8) & (xx <= 14)] = True  # a C: its centre of mass lies in the hole
    pts = np.argwhere(ring)
    com = pts.mean(0)
    assert not ring[tuple(np.round(com).astype(int))]
    c = click_module.centre_click(pts)
    assert ring[tuple(c)] and np.isclose(np.linalg.norm(c - com), np.linalg.norm(pts - com, axis=1).min())


def test_click_patches_put_the_click_in_the_lesion():
    """Training patches: three channels, the guidance peak on the clicked lesion, label and guidance flipped together."""
    import torch

    from LesionSegLib.engine.learn.train_click import ClickPatches

    x = torch.zeros((2, 40, 80, 80), dtype=torch.float16)
    y = torch.zeros((1, 40, 80, 80), dtype=torch.uint8)
    y[0, 15:25, 30:50, 20:40] = 1
    patches = ClickPatches({"c": (x, y)}, (3.0, 2.0, 2.0), (16, 32, 32), sigma_mm=6.0, seed=1)
    peaks_on_lesion = 0
    for _ in range(30):
        xc, yc = patches.sample()
        assert xc.shape == (3, 16, 32, 32) and yc.shape == (1, 16, 32, 32)
        g = xc[2]
        assert 0.0 <= float(g.min()) and float(g.max()) <= 1.0
        if float(g.max()) > 0.99:  # the click is inside this patch: it lies on the lesion
            peaks_on_lesion += int(yc[0].reshape(-1)[int(torch.argmax(g))] == 1)
            assert yc[0].reshape(-1)[int(torch.argmax(g))] == 1
    assert peaks_on_lesion > 0


@needs_data
def test_train_click_runs_and_attaches(tmp_path):
    import json
    import shutil

    from LesionSegLib.engine.learn import train_click
    from LesionSegLib.engine.models import get_card, read_card

    run = tmp_path / "run"
    assert train_click.main(["--base", CLCS, "-o", str(run), "--minutes", "0.01", "--holdout",
                             ",".join(data.STS_TRAIN[2:])]) == 0  # two training cases, a step or two
    cfg = json.loads((run / "click_segmenter.json").read_text())
    assert cfg["training"]["train_cases"] == data.STS_TRAIN[:2] and cfg["training"]["steps"] >= 1
    assert cfg["guidance"]["channel"] == 2 and "sha256" in cfg
    folder = tmp_path / "model"
    shutil.copytree(get_card(CLCS).folder, folder)
    assert train_click.main(["--attach", str(run), "--to", str(folder), "--version", "1.9.0"]) == 0
    card = read_card(folder)
    assert card.version == "1.9.0" and "adds click_segmenter" in card.data["release_notes"]["1.9.0"]
    card.verified_path("click_segmenter")

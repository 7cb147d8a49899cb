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

    def probability(self, hu, sp, progress=None, cancel=None, use_gate=True):
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
    with pytest.raises(InputError, match=r"point \(500.0, 10.0, 10.0\) mm LPS is outside the volume"):
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
    header = (out / "STS_038_click.csv").read_text().splitlines()[0].split(",")
    assert header == list(CSV_COLUMNS)
    # a bad point writes nothing
    bad = tmp_path / "bad"
    assert cli_main(["click", str(case.image), "--point=9999,0,0", "-o", str(bad), "--device", "cpu"]) == 2
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
                     "--fallback-model", "none"]) == 2
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

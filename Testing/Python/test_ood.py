"""The scan-level OOD descriptor (``engine/segment/ood.py``, descriptor 2): the body mask it is
measured in, its indifference to the voxel grid, a real sarcoma scan on a clinical grid kept in
the domain (descriptor 1 scored it about 10^6 and hid its lesion), and cards fitted with the old
descriptor running without OOD and saying so."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import SimpleITK as sitk

from feedback_testdata import model_folder, require_data
from LesionSegLib.engine.io.preprocess import body_mask
from LesionSegLib.engine.segment import ood as ood_module
from LesionSegLib.engine.segment.ood import OODModel, scan_descriptor


def _chest(shape=(20, 80, 80)):
    """A chest-like phantom: a soft-tissue ellipse with two lungs inside, a fat rim, a table below."""
    z, y, x = np.mgrid[: shape[0], : shape[1], : shape[2]]
    hu = np.full(shape, -1000.0)
    body = ((y - 36) / 28.0) ** 2 + ((x - 40) / 34.0) ** 2 < 1
    hu[body] = -100.0
    hu[((y - 36) / 24.0) ** 2 + ((x - 40) / 30.0) ** 2 < 1] = 40.0
    for cx in (26, 54):
        hu[((y - 36) / 16.0) ** 2 + ((x - cx) / 10.0) ** 2 < 1] = -850.0  # lungs
    hu[:, 72:74, 10:70] = 200.0  # the table, apart from the body
    return hu, body


def test_body_mask_holds_the_lungs_not_the_air_or_the_table():
    hu, body = _chest()
    mask = body_mask(hu)
    assert np.array_equal(mask, body)  # lungs inside, air around and table out
    assert not body_mask(np.full((4, 8, 8), -1000.0)).any()


def test_the_descriptor_ignores_the_voxel_grid():
    """The same content on a 2x finer grid (and a 1.7x coarser one) gives the same band fractions."""
    hu, _ = _chest()
    d = scan_descriptor(hu)
    assert d.shape == (6,) and np.isclose(d.sum(), 1.0) and d[0] > 0.2  # lung is a quarter of this body
    fine = np.repeat(np.repeat(hu, 2, axis=1), 2, axis=2)
    coarse = hu[:, ::2, ::2]
    assert np.abs(scan_descriptor(fine) - d).max() < 0.01
    assert np.abs(scan_descriptor(coarse) - d).max() < 0.03


def test_a_descriptor_of_another_size_is_refused():
    with pytest.raises(ValueError, match="scan descriptors must be"):
        OODModel(np.zeros((5, 10)), np.zeros((0, 4)))


@pytest.fixture(scope="module")
def engine():
    """The default model's engine, loaded once for the tests that segment a real scan."""
    from LesionSegLib.engine.segment.pipeline import Engine

    require_data()
    return Engine(str(model_folder()), device="cpu")


def test_a_sarcoma_scan_on_a_clinical_grid_stays_in_the_domain(engine):
    """STS_041 (validation) resampled to 1 x 1 x 2.5 mm: no OOD warning, and its tumour is found at
    the default threshold (descriptor 1 gave it a score of about 860,000 and capped it away)."""
    from LesionSegLib.engine import data as dataset

    case = dataset.case("STS_041")
    img = sitk.ReadImage(str(case.image))
    lab = sitk.ReadImage(str(case.label))
    spacing = (1.0, 1.0, 2.5)
    size = [int(round(n * s / t)) for n, s, t in zip(img.GetSize(), img.GetSpacing(), spacing)]
    grid = dict(size=size, transform=sitk.Transform(), outputOrigin=img.GetOrigin(), outputSpacing=spacing,
                outputDirection=img.GetDirection())
    img = sitk.Resample(img, interpolator=sitk.sitkLinear, defaultPixelValue=-1024.0, outputPixelType=img.GetPixelID(), **grid)
    lab = sitk.GetArrayFromImage(sitk.Resample(lab, interpolator=sitk.sitkNearestNeighbor, **grid)) > 0
    res = engine.segment(img)
    assert res.ood is not None and res.ood["warning"] is None and res.ood["scan_score"] <= 1.5, res.ood
    assert res.lesions and max(les.confidence for les in res.lesions) >= 0.5
    pred = res.labelmap > 0
    assert 2 * (pred & lab).sum() / (pred.sum() + lab.sum()) > 0.6


def test_a_chest_scan_is_warned_and_its_confident_false_lesion_capped(engine, monkeypatch):
    """lung2, a chest CT (outside the sarcoma domain): before the cap its largest false cluster
    scores about 0.59 with sts-clcs 1.2.0 (lung1's scored 0.85 with 1.1.0; 1.2.0, taught tumour-free
    regions, gives it 0.18, so lung1 no longer proves the cap).
    Through ``Engine.segment`` the scan is warned and every confidence is capped below the
    threshold; the raw confidences, seen on their way into the cap, prove the input needs it."""
    root = require_data()
    raw, cap = [], engine.ood.apply

    def spy(confidences, scan_score):
        raw.append(np.array(confidences, float))
        return cap(confidences, scan_score)

    monkeypatch.setattr(engine.ood, "apply", spy)
    res = engine.segment(sitk.ReadImage(str(root / "fullscan" / "lung2" / "image.nii.gz")), threshold=0.0)
    assert res.ood["warning"] and res.ood["scan_score"] > engine.ood.scan_threshold, res.ood
    assert res.lesions and max(les.confidence for les in res.lesions) <= engine.ood.cap < engine.default_threshold
    assert len(raw) == 1 and raw[0].max() >= engine.default_threshold, raw  # uncapped, a false lesion would show
    assert sorted(les.confidence for les in res.lesions) == pytest.approx(sorted(np.minimum(raw[0], engine.ood.cap)))


def test_a_card_fitted_with_the_old_descriptor_runs_without_ood_and_says_so(tmp_path):
    from test_corrections import synthetic_ct
    from LesionSegLib.engine.models import read_card
    from LesionSegLib.engine.segment.pipeline import Engine

    folder = tmp_path / "old"
    shutil.copytree(model_folder(), folder)
    card_file = folder / "card.json"
    data = json.loads(card_file.read_text())
    data["ood"].pop("scan_descriptor")  # as every card fitted before descriptor 2
    card_file.write_text(json.dumps(data))
    engine = Engine(read_card(folder), device="cpu")
    assert engine.ood is None
    res = engine.segment(synthetic_ct(0)[0], threshold=0.0)
    note = [m for m in res.messages if "scan descriptor 1" in m]
    assert note and "lesionseg fit-ood" in note[0] and res.ood is None
    assert ood_module.DESCRIPTOR_VERSION == 2


def _stub_fit_ood(monkeypatch):
    """``fit_card`` with the engine runs and scan reading stubbed out (a second, no data needed)."""
    import types

    from LesionSegLib.engine import data as dataset
    from LesionSegLib.engine.io import images
    from LesionSegLib.engine.learn import ood_fit
    from LesionSegLib.engine.segment import pipeline

    rng = np.random.default_rng(0)
    fitted = OODModel(rng.normal(size=(6, len(ood_module.HU_BANDS) - 1)), rng.normal(size=(8, 4)))
    monkeypatch.setattr(pipeline, "Engine", lambda card, device=None: None)
    monkeypatch.setattr(dataset, "case", lambda name: types.SimpleNamespace(image=name))
    monkeypatch.setattr(images, "read_image", lambda path: None)
    monkeypatch.setattr(ood_fit, "references", lambda engine, imgs: (None, fitted.lesions))
    monkeypatch.setattr(ood_fit, "from_candidates", lambda imgs, embs, domain: fitted)
    return ood_fit


@pytest.mark.parametrize("fail", ["killed", "disk_full"])
def test_fit_ood_interrupted_before_the_card_leaves_a_loadable_model(tmp_path, monkeypatch, fail):
    """fit-ood rewrote ood.safetensors in place and the card after it: killed (or out of disk)
    between the two, the card's sha256 no longer matched and the model could never load again."""
    from LesionSegLib.engine import atomic
    from LesionSegLib.engine.errors import ModelError
    from LesionSegLib.engine.learn import versions
    from LesionSegLib.engine.models import read_card

    folder = tmp_path / "m"
    shutil.copytree(model_folder(), folder)
    before = (folder / "card.json").read_text()
    ood_fit = _stub_fit_ood(monkeypatch)
    real = atomic.write_text

    def card_write(path, text):
        if str(path).endswith("card.json"):
            raise SystemExit(143) if fail == "killed" else OSError(28, "No space left on device", str(path))
        return real(path, text)

    monkeypatch.setattr(atomic, "write_text", card_write)
    monkeypatch.setattr(ood_fit, "write_text", card_write, raising=False)
    with pytest.raises(SystemExit if fail == "killed" else (OSError, ModelError)):
        ood_fit.fit_card(str(folder), ["STS_001", "STS_002"], 1)
    assert (folder / "card.json").read_text() == before
    versions.verify(read_card(folder))  # every file still matches its card
    assert not [p.name for p in folder.iterdir() if p.name.startswith(".tmp-")]


def test_fit_ood_replaces_the_statistics_and_a_full_disk_is_one_error_line(tmp_path, monkeypatch, capsys):
    from safetensors import SafetensorError

    from LesionSegLib.engine import models
    from LesionSegLib.engine.cli import main
    from LesionSegLib.engine.learn import versions

    folder = tmp_path / "m"
    shutil.copytree(model_folder(), folder)
    _stub_fit_ood(monkeypatch)
    assert main(["fit-ood", "--model", str(folder), "--cases", "STS_001", "STS_002"]) == 0
    card = models.read_card(folder)
    assert card.data["ood"]["cluster_cases"] == ["STS_001", "STS_002"]
    versions.verify(card)
    assert sorted(p.name for p in folder.glob("ood*.safetensors")) == [card.data["ood"]["file"]]  # the old file is gone
    before = (folder / "card.json").read_text()

    def full(*a, **k):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(models, "save_weights", full)
    assert main(["fit-ood", "--model", str(folder), "--cases", "STS_003"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and "No space left on device" in err[-1] and str(folder) in err[-1]
    assert (folder / "card.json").read_text() == before
    versions.verify(models.read_card(folder))


def test_fit_ood_refuses_a_model_fine_tuned_on_corrected_cases(tmp_path, monkeypatch, capsys):
    """fit-ood on a fine-tuned model refitted its reference on the sarcoma training scans alone: the
    corrected (chest) domain it was fine-tuned for was then warned and capped as unlike the model,
    while its ``domain`` still named the corrected cases."""
    from LesionSegLib.engine.cli import main

    folder = tmp_path / "ft"
    shutil.copytree(model_folder(), folder)
    data = json.loads((folder / "card.json").read_text())
    data["domain"] = dict(data["domain"], corrected_cases=["lung1", "LIDC-IDRI-0001"])
    (folder / "card.json").write_text(json.dumps(data))
    before = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    _stub_fit_ood(monkeypatch)
    assert main(["fit-ood", "--model", str(folder)]) == 1
    err = capsys.readouterr().err
    assert "fine-tuned on 2 corrected case(s) (lung1, LIDC-IDRI-0001)" in err and "unchanged" in err
    assert {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()} == before

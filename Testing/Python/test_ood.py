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


def test_a_sarcoma_scan_on_a_clinical_grid_stays_in_the_domain():
    """STS_041 (validation) resampled to 1 x 1 x 2.5 mm: no OOD warning, and its tumour is found at
    the default threshold (descriptor 1 gave it a score of about 860,000 and capped it away)."""
    from LesionSegLib.engine import data as dataset
    from LesionSegLib.engine.segment.pipeline import Engine

    require_data()
    case = dataset.case("STS_041")
    img = sitk.ReadImage(str(case.image))
    lab = sitk.ReadImage(str(case.label))
    spacing = (1.0, 1.0, 2.5)
    size = [int(round(n * s / t)) for n, s, t in zip(img.GetSize(), img.GetSpacing(), spacing)]
    grid = dict(size=size, transform=sitk.Transform(), outputOrigin=img.GetOrigin(), outputSpacing=spacing,
                outputDirection=img.GetDirection())
    img = sitk.Resample(img, interpolator=sitk.sitkLinear, defaultPixelValue=-1024.0, outputPixelType=img.GetPixelID(), **grid)
    lab = sitk.GetArrayFromImage(sitk.Resample(lab, interpolator=sitk.sitkNearestNeighbor, **grid)) > 0
    res = Engine(str(model_folder()), device="cpu").segment(img)
    assert res.ood is not None and res.ood["warning"] is None and res.ood["scan_score"] <= 1.5, res.ood
    assert res.lesions and max(les.confidence for les in res.lesions) >= 0.5
    pred = res.labelmap > 0
    assert 2 * (pred & lab).sum() / (pred.sum() + lab.sum()) > 0.6


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

"""DetSeg3D in the LesionSeg module logic (real MRML, slicer-core): the "Add lesion" click logic,
the model selector listing sts-detseg, and retraining a detseg model from accept/reject."""
from __future__ import annotations

import numpy as np
import pytest

from slicer_app_shim import data_dir, slicer_app  # noqa: F401 (fixtures)

DETSEG = "sts-detseg"
CASE = "STS_041"
CLICK_DICE_FLOOR = 0.6


def test_model_selector_lists_registry_models():
    from LesionSegLib.logic import LesionSegLogicCore

    names = {c.name: c.architecture for c in LesionSegLogicCore.available_models()}
    assert names.get(DETSEG) == "detseg" and names.get("sts-clcs") == "clcs"


def test_add_lesion_from_a_click(slicer_app, data_dir, tmp_path):
    import SimpleITK as sitk

    from LesionSegLib import click, mrml
    from LesionSegLib.engine.errors import InputError
    from LesionSegLib.engine.feedback import FeedbackStore
    from LesionSegLib.engine.models import get_card
    from LesionSegLib.engine.segment.result import SegmentationResult
    from LesionSegLib.logic import LesionSegLogicCore

    path = data_dir / "sts" / CASE / "image.nii.gz"
    volume = mrml.load_volume(str(path), CASE)
    image = sitk.ReadImage(str(path))
    gt = sitk.GetArrayFromImage(sitk.ReadImage(str(data_dir / "sts" / CASE / "label.nii.gz"))) > 0
    logic = LesionSegLogicCore()
    # an automatic pass that found nothing: the lesion is a miss of model "auto@1"
    empty = SegmentationResult(np.zeros(gt.shape, np.uint16), [], image, "auto@1", 0.5)
    seg, table = logic.add_result(volume, empty, "hash-041", threshold=0.5)
    store = FeedbackStore(tmp_path / "feedback.db")
    # the model that answers a click is the result's own; one the registry does not know gives the default
    assert click.click_model(seg) == click.DEFAULT_CLICK_MODEL
    seg.SetAttribute(mrml.ATTR_MODEL, DETSEG)
    assert click.click_model(seg) == get_card(DETSEG).id
    seg.SetAttribute(mrml.ATTR_MODEL, "auto@1")
    engine = logic.engine(DETSEG, "cpu")
    lps = image.TransformContinuousIndexToPhysicalPoint(np.argwhere(gt).mean(0)[::-1].tolist())
    ras = (-lps[0], -lps[1], lps[2])
    with pytest.raises(InputError, match="outside the volume"):
        click.add_lesion(volume, seg, (ras[0] + 5000, ras[1], ras[2]), engine, store)
    assert seg.GetSegmentation().GetNumberOfSegments() == 0 and store.count() == 0
    info = click.add_lesion(volume, seg, ras, engine, store, reviewer="tester")
    assert info["lesion_id"] == 1 and info["review"] == click.ADDED
    sid, segment = mrml.find_segment(seg, 1)
    assert mrml.segment_status(seg, 1) == "completed"
    assert mrml.get_tag(segment, mrml.TAG["model"]) == "auto@1"
    from LesionSegLib import export

    mask = export.instance_labelmap(seg, [1]) == 1
    dice = 2 * (mask & gt).sum() / (mask.sum() + gt.sum())
    assert dice >= CLICK_DICE_FLOOR, f"click Dice {dice:.3f}"
    rows = store.decisions(patches=True)
    assert len(rows) == 1
    r = rows[0]
    assert r["decision"] == "accepted" and r["source"] == click.MISSED_SOURCE and r["model_id"] == "auto@1"
    assert r["case_hash"] == "hash-041" and r["reviewer"] == "tester"
    mrml.remove_result_nodes(seg)
    volume.GetScene().RemoveNode(volume)

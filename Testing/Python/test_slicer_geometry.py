"""Geometry of the MRML layer against real MRML (slicer-core): oblique volumes round-trip through
the engine, and the layer works without a model (split from test_slicer_logic.py)."""
from __future__ import annotations

import numpy as np

from slicer_app_shim import data_dir, slicer_app  # noqa: F401 (fixtures)

CASE = "STS_041"


def test_oblique_geometry_roundtrip(slicer_app):
    import SimpleITK as sitk

    from LesionSegLib import mrml

    img = sitk.GetImageFromArray(np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6))
    a = np.deg2rad(30)
    rot = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]]) @ np.array([[1, 0, 0], [0, 0, -1], [0, 1, 0]])
    img.SetDirection(tuple(rot.ravel()))
    img.SetSpacing((0.7, 0.8, 2.5))
    img.SetOrigin((10.0, -20.0, 30.0))
    node = mrml.volume_from_sitk(img, "oblique")
    try:
        back = mrml.volume_to_sitk(node)
        np.testing.assert_allclose(back.GetDirection(), img.GetDirection(), atol=1e-9)
        np.testing.assert_allclose(back.GetOrigin(), img.GetOrigin(), atol=1e-9)
        np.testing.assert_allclose(back.GetSpacing(), img.GetSpacing(), atol=1e-9)
        assert np.array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(img))
        lps = np.array(img.TransformIndexToPhysicalPoint((3, 2, 1)))
        ras = mrml.ijk_to_ras(node) @ np.array([3, 2, 1, 1.0])
        np.testing.assert_allclose(ras[:3], lps * [-1, -1, 1], atol=1e-9)
    finally:
        node.GetScene().RemoveNode(node)


def test_mrml_layer_without_model(slicer_app, data_dir, tmp_path):
    """Nodes, threshold, review and export from a result built on the real CT's ground-truth
    label (split into three 'lesions'), so the MRML layer is covered even without a model."""
    import SimpleITK as sitk
    import slicerio

    from LesionSegLib import export, mrml
    from LesionSegLib.engine.segment.result import Lesion, SegmentationResult
    from LesionSegLib.logic import LesionSegLogicCore

    case = data_dir / "sts" / CASE
    volume = mrml.load_volume(str(case / "image.nii.gz"), CASE)
    image = sitk.ReadImage(str(case / "image.nii.gz"))
    label = sitk.GetArrayFromImage(sitk.ReadImage(str(case / "label.nii.gz"))) > 0
    zs = np.nonzero(label.any(axis=(1, 2)))[0]
    cuts = np.linspace(zs[0], zs[-1] + 1, 4).astype(int)
    labelmap = np.zeros(label.shape, np.uint16)
    lesions = []
    for k, conf in enumerate((0.9, 0.6, 0.3), start=1):
        part = label.copy()
        part[: cuts[k - 1]] = False
        part[cuts[k]:] = False
        labelmap[part] = k
        z, y, x = np.nonzero(part)
        centroid = image.TransformContinuousIndexToPhysicalPoint((float(x.mean()), float(y.mean()), float(z.mean())))
        lesions.append(Lesion(k, conf, part.sum() * np.prod(image.GetSpacing()) / 1000, 10.0, tuple(centroid), 0.8, 0.99, 40.0,
                              int(part.sum()), ((int(x.min()), int(y.min()), int(z.min())), (int(x.max()) + 1, int(y.max()) + 1, int(z.max()) + 1)),
                              {"f": 1.0}, np.zeros((3, 32, 32, 32), np.float16)))
    result = SegmentationResult(labelmap, lesions, image, "groundtruth@0", 0.0)
    logic = LesionSegLogicCore()
    seg, table = logic.add_result(volume, result, "hash", threshold=0.5)
    assert seg.GetSegmentation().GetNumberOfSegments() == 3 and table.GetNumberOfRows() == 2
    assert np.array_equal(export.instance_labelmap(seg, [1, 2, 3]), labelmap)
    logic.review(seg, 1, "accepted")
    logic.review(seg, 2, "rejected")
    assert [r["Status"] for r in mrml.table_rows(table)] == ["accepted", "rejected"]
    np.testing.assert_allclose(mrml.lesion_center_ras(seg, 2), np.array(lesions[1].centroid_lps) * [-1, -1, 1], atol=1e-3)
    paths = logic.export(seg, tmp_path)
    s = slicerio.read_segmentation(str(paths["seg.nrrd"]))
    assert [x["name"] for x in s["segments"]] == ["Lesion 1 (0.90)", "Lesion 2 (0.60)"]
    assert [x["status"] for x in s["segments"]] == ["completed", "flagged"]
    assert np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(paths["nifti"]))), np.where(labelmap <= 2, labelmap, 0))
    mrml.set_threshold(seg, 0.0)
    assert table.GetNumberOfRows() == 3
    mrml.remove_result_nodes(seg)  # the scene is shared with the module fixture: clean up our nodes
    volume.GetScene().RemoveNode(volume)

"""The lesion measurements: the CSV columns recomputed in the test, without the engine's helpers,
from the written labelmap, the image's geometry and the probability map; and the candidate filter
(minimum size in mm^3, its boundary included, 26-connected clusters)."""
from __future__ import annotations

import csv

import numpy as np
import pytest
import SimpleITK as sitk
from scipy.spatial import ConvexHull

from feedback_testdata import model_folder, require_data
from LesionSegLib.engine.segment.clusters import extract_clusters

CASE = "STS_041"  # a validation case (76x82x53 voxels): the tumour and low-confidence candidates at threshold 0


def _longest_chord_mm(zyx: np.ndarray, spacing_zyx) -> float:
    """The largest distance between two voxel centres (mm), over all pairs (convex hull first when
    it exists: the farthest pair are two of its vertices)."""
    pts = zyx.astype(float) * np.asarray(spacing_zyx, float)
    try:
        pts = pts[ConvexHull(pts).vertices]
    except Exception:  # fewer than 4 points, or all in one plane: every pair
        pass
    d2 = ((pts[:, None, :] - pts[None, :, :]) ** 2).sum(-1)
    return float(np.sqrt(d2.max()))


def test_csv_measurements_match_the_labelmap_the_geometry_and_the_probability(tmp_path):
    """Each CSV row against values computed here: the centroid (LPS mm) is origin + direction x
    (spacing x the mean voxel index of the lesion's voxels), volume is voxels x voxel volume,
    diameter the longest chord between voxel centres + the smallest voxel side (the documented
    definition), mean HU and the probability statistics are taken under the lesion's mask."""
    from LesionSegLib.engine.segment.pipeline import Engine

    root = require_data()
    image = sitk.ReadImage(str(root / "sts" / CASE / "image.nii.gz"))
    engine = Engine(str(model_folder()), device="cpu")
    res = engine.segment(image, threshold=0.0, keep_probability=True)
    res.write_csv(str(tmp_path / "lesions.csv"))
    res.write_labelmap(str(tmp_path / "lesions.nii.gz"))
    with open(tmp_path / "lesions.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) >= 2, rows  # the tumour and at least one small candidate

    written = sitk.ReadImage(str(tmp_path / "lesions.nii.gz"))
    assert written.GetSize() == image.GetSize()
    np.testing.assert_allclose(written.GetOrigin(), image.GetOrigin(), atol=1e-4)
    labels = sitk.GetArrayFromImage(written)
    hu = sitk.GetArrayFromImage(image).astype(np.float64)
    prob = np.asarray(res.probability, np.float64)  # on the input grid (float16)
    assert prob.shape == labels.shape
    spacing_xyz = np.array(image.GetSpacing())
    origin = np.array(image.GetOrigin())
    direction = np.array(image.GetDirection()).reshape(3, 3)
    assert sorted(int(r["lesion_id"]) for r in rows) == list(range(1, len(rows) + 1)) == sorted(set(np.unique(labels)) - {0})
    for r in rows:
        mask = labels == int(r["lesion_id"])
        zyx = np.argwhere(mask)
        assert int(r["n_voxels"]) == len(zyx)
        centre_xyz = zyx.mean(0)[::-1]
        want = origin + direction @ (spacing_xyz * centre_xyz)
        got = np.array([float(r[k]) for k in ("centroid_x", "centroid_y", "centroid_z")])
        np.testing.assert_allclose(got, want, atol=2e-3, err_msg=f"lesion {r['lesion_id']} centroid")
        assert float(r["volume_ml"]) == pytest.approx(len(zyx) * spacing_xyz.prod() / 1000.0, abs=1e-4)
        diameter = _longest_chord_mm(zyx, spacing_xyz[::-1]) + spacing_xyz.min()
        assert float(r["diameter_mm"]) == pytest.approx(diameter, abs=0.01), r["lesion_id"]
        assert float(r["mean_hu"]) == pytest.approx(hu[mask].mean(), abs=0.01)
        p = prob[mask]
        assert float(r["mean_probability"]) == pytest.approx(p.mean(), abs=1e-3)
        assert float(r["max_probability"]) == pytest.approx(p.max(), abs=1e-3)
        assert p.min() >= engine.prob_threshold - 1e-3  # every voxel of a cluster passed the probability threshold
    tumour = max(rows, key=lambda r: int(r["n_voxels"]))
    assert float(tumour["max_probability"]) > float(tumour["mean_probability"]) + 0.01  # the columns are not one value


def test_min_size_is_in_mm3_inclusive_and_26_connected():
    """The card's minimum size is in mm^3 on the clusters' own grid: at 2.5 x 2 x 2.5 mm a voxel is
    12.5 mm^3, so 8 voxels are exactly 100 mm^3 (kept at 100, dropped at 100.1; counted in voxels,
    every cluster under 100 voxels would go), and voxels touching at a corner are one cluster."""
    spacing = (2.5, 2.0, 2.5)
    prob = np.zeros((20, 20, 20), np.float32)
    prob[2:4, 2:4, 2:4] = 0.9  # 8 voxels = 100 mm^3
    prob[10:15, 10:15, 10:15] = 0.75  # 125 voxels: kept at either minimum
    labels, n = extract_clusters(prob, 0.5, spacing, 100.0)
    assert n == 2 and (labels > 0).sum() == 8 + 125
    labels, n = extract_clusters(prob, 0.5, spacing, 100.1)
    assert n == 1 and (labels > 0).sum() == 125 and not labels[2:4, 2:4, 2:4].any()
    assert extract_clusters(prob, 0.75, spacing, 0.0)[1] == 2  # the probability threshold is inclusive too
    corner = np.zeros((6, 6, 6), np.float32)
    corner[1, 1, 1] = corner[2, 2, 2] = corner[3, 3, 2] = 1.0  # a corner, then an edge, apart
    labels, n = extract_clusters(corner, 0.5, (1.0, 1.0, 1.0), 0.0)
    assert n == 1 and set(np.unique(labels)) == {0, 1}

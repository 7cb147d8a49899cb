"""Proof of what the views show: the red slice view and the 3D view rendered offscreen with
Slicer's own displayable managers (slicer-core via trame-slicer), on a real CT (validation case
STS_041) segmented by the shipped model.

* In the slice view, the pixel at each lesion's centroid is that lesion's colormap colour blended
  over the CT with the display's fill opacity (the outline colour itself where the outline
  passes), and it turns green after Accept.
* In the 3D view, the surface under the tumour's centroid has the tumour's colour (shaded), and
  turns green after Accept.

Screenshots: ``Testing/artifacts/LesionSeg_slice.png`` (before review), ``LesionSeg_slice_accepted.png``
and ``LesionSeg_3d.png``.
"""
from __future__ import annotations

import types

import numpy as np
import pytest

from slicer_app_shim import REPO, data_dir, default_model, slicer_app  # noqa: F401 (fixtures)

ARTIFACTS = REPO / "Testing" / "artifacts"
CASE = "STS_041"
TOLERANCE = 4  # per channel, 0..255: rounding of the blend and of the 8-bit CT


@pytest.fixture(scope="module")
def scene(slicer_app, data_dir, default_model):
    from LesionSegLib import export, mrml
    from LesionSegLib.logic import LesionSegLogicCore

    slicer_app.reset()
    volume = mrml.load_volume(str(data_dir / "sts" / CASE / "image.nii.gz"), CASE)
    volume.GetDisplayNode().SetAutoWindowLevel(False)
    volume.GetDisplayNode().SetWindowLevel(400, 40)
    logic = LesionSegLogicCore()
    seg, _ = logic.segment(volume, model=str(default_model.folder), device="cpu", threshold=0.0)
    records = mrml.lesions(seg)
    assert len(records) >= 2, f"{CASE} must give at least 2 candidates at threshold 0"
    labelmap = export.instance_labelmap(seg, [d["lesion_id"] for d in records], volume)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    yield types.SimpleNamespace(app=slicer_app, volume=volume, seg=seg, logic=logic, records=records, labelmap=labelmap)
    slicer_app.reset()


def _inside_point(scene, lesion_id):
    """The lesion's centroid (RAS), or the lesion voxel nearest to it when the centroid falls outside."""
    from LesionSegLib import mrml

    ras = np.array(mrml.lesion_center_ras(scene.seg, lesion_id))
    ijk_to_ras = mrml.ijk_to_ras(scene.volume)
    ijk = np.linalg.inv(ijk_to_ras) @ np.array([*ras, 1.0])
    i, j, k = (int(round(v)) for v in ijk[:3])
    if scene.labelmap[k, j, i] == lesion_id:
        return ras
    kk, jj, ii = np.nonzero(scene.labelmap == lesion_id)
    pts = (ijk_to_ras @ np.stack([ii, jj, kk, np.ones_like(ii)]).astype(float))[:3].T
    return pts[np.argmin(np.linalg.norm(pts - ras, axis=1))]


def _slice_pixels(view, scene, point):
    """(pixel with the lesions, the same pixel without them) on the axial slice through ``point``."""
    from LesionSegLib import mrml

    mrml.jump_slices_to(point, scene.app.scene)
    row, col = view.pixel_of(point)
    shown = view.render()
    display = scene.seg.GetDisplayNode()
    display.SetVisibility(False)
    hidden = view.render()
    display.SetVisibility(True)
    return shown, hidden[row, col].astype(float), (row, col)


def _assert_colour(pixel, background, colour, opacity, what):
    colour = np.asarray(colour) * 255.0
    fill = opacity * colour + (1.0 - opacity) * background
    error = min(np.abs(pixel - fill).max(), np.abs(pixel - colour).max())  # fill, or the outline itself
    assert error <= TOLERANCE, f"{what}: pixel {pixel} is neither the blend {fill.round()} nor the outline {colour.round()} (CT {background})"
    assert np.abs(pixel - background).max() > 20, f"{what}: the lesion is not visible over the CT"


def test_slice_view_shows_confidence_colours_then_green(scene):
    from LesionSegLib import mrml
    from LesionSegLib.engine.segment.colors import ACCEPTED_COLOR, confidence_color
    from offscreen_views import RedSliceView, save_png

    view = RedSliceView(scene.app, scene.volume)
    opacity = scene.seg.GetDisplayNode().GetOpacity2DFill() * scene.seg.GetDisplayNode().GetOpacity()
    assert opacity == pytest.approx(0.45)
    for d in scene.records:
        point = _inside_point(scene, d["lesion_id"])
        image, background, (row, col) = _slice_pixels(view, scene, point)
        np.testing.assert_allclose(d["color"], confidence_color(d["confidence"]), atol=1e-6)
        _assert_colour(image[row, col].astype(float), background, d["color"], opacity, f"lesion {d['lesion_id']} ({d['confidence']:.2f})")
        if d["lesion_id"] == scene.records[0]["lesion_id"]:
            save_png(image, ARTIFACTS / "LesionSeg_slice.png")

    first = scene.records[0]["lesion_id"]
    scene.logic.review(scene.seg, first, "accepted")
    try:
        image, background, (row, col) = _slice_pixels(view, scene, _inside_point(scene, first))
        _assert_colour(image[row, col].astype(float), background, ACCEPTED_COLOR, opacity, "accepted lesion")
        save_png(image, ARTIFACTS / "LesionSeg_slice_accepted.png")
    finally:
        mrml.set_review(scene.seg, first, "unreviewed")
    assert (ARTIFACTS / "LesionSeg_slice.png").read_bytes()[:4] == b"\x89PNG"


def _direction(rgb):
    v = np.asarray(rgb, dtype=float)
    return v / np.linalg.norm(v)


def test_3d_view_shows_the_tumour_colour_then_green(scene):
    from LesionSegLib import mrml
    from LesionSegLib.engine.segment.colors import ACCEPTED_COLOR
    from offscreen_views import ThreeD, save_png

    scene.seg.CreateClosedSurfaceRepresentation()
    view = ThreeD(scene.app)
    view.fit()
    tumour = max(scene.records, key=lambda d: d["volume_ml"])
    point = mrml.lesion_center_ras(scene.seg, tumour["lesion_id"])

    def look():
        image = view.render()
        row, col = view.pixel_of(point)
        scene.seg.GetDisplayNode().SetVisibility(False)
        empty = view.render()
        scene.seg.GetDisplayNode().SetVisibility(True)
        return image, image[row - 2:row + 3, col - 2:col + 3].reshape(-1, 3).mean(axis=0), empty[row, col].astype(float)

    image, pixel, background = look()
    assert np.abs(pixel - background).max() > 40, "no surface under the tumour's centroid"
    cosine = float(_direction(pixel) @ _direction(tumour["color"]))
    assert cosine > 0.98, f"3D colour {pixel.round()} is not the tumour's colour {np.round(np.array(tumour['color']) * 255)} (cos {cosine:.3f})"
    save_png(image, ARTIFACTS / "LesionSeg_3d.png")

    scene.logic.review(scene.seg, tumour["lesion_id"], "accepted")
    try:
        _, pixel, _ = look()
        cosine = float(_direction(pixel) @ _direction(ACCEPTED_COLOR))
        assert cosine > 0.98, f"3D colour after Accept {pixel.round()} is not green (cos {cosine:.3f})"
    finally:
        mrml.set_review(scene.seg, tumour["lesion_id"], "unreviewed")

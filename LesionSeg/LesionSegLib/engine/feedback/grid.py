"""The model grid: where corrections and their image are stored, and where the segmenter trains.

The model grid of an image is what the segmenter sees: the image permuted/flipped to LPS (no
interpolation), cropped to the body (:func:`..io.preprocess.body_box`) and resampled to the
model's spacing (z, y, x) exactly as :meth:`..segment.pipeline.Engine.probability` does.  The
image is kept on that grid as int16 HU (clipped to -1024..3071), masks as booleans.  The
geometry (origin, spacing, direction of the grid, the input's size and the crop box) is kept so
that a stored mask can be placed back in the patient.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from ..io.preprocess import body_box, resample, spacing_zyx, target_shape, to_canonical
from ..io.resample import resample as resample_antialiased

HU_RANGE = (-1024, 3071)


@dataclass
class ModelGrid:
    """An image on the model grid plus the mapping from its input grid."""

    hu: np.ndarray  # (z, y, x) int16
    geometry: dict  # origin_lps, spacing_zyx, direction, input_size_xyz, box_lo/hi (canonical zyx)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.hu.shape)


def model_grid(image: sitk.Image, spacing: "list[float] | tuple[float, ...]") -> ModelGrid:
    """``image`` (a CT in HU) on the model grid of spacing ``spacing`` (z, y, x mm)."""
    canonical = to_canonical(image)
    hu = sitk.GetArrayFromImage(canonical).astype(np.float32, copy=False)
    sp = spacing_zyx(canonical)
    box = body_box(hu, sp)
    crop = hu[box.slices]
    shape = target_shape(crop.shape, sp, spacing)
    grid = resample_antialiased(crop, shape)
    arr = np.clip(np.rint(grid), *HU_RANGE).astype(np.int16)
    actual = [c * s / n for c, s, n in zip(crop.shape, sp, shape)]
    lo = box.lo
    origin = canonical.TransformIndexToPhysicalPoint([int(lo[2]), int(lo[1]), int(lo[0])])
    geometry = {
        "origin_lps": [round(float(v), 4) for v in origin],
        "spacing_zyx": [round(float(v), 6) for v in actual],
        "direction": [round(float(v), 6) for v in canonical.GetDirection()],
        "input_size_xyz": [int(v) for v in image.GetSize()],
        "box_lo_zyx": [int(v) for v in box.lo],
        "box_hi_zyx": [int(v) for v in box.hi],
    }
    return ModelGrid(arr, geometry)


def mask_to_model_grid(mask: np.ndarray, image: sitk.Image, grid: ModelGrid) -> np.ndarray:
    """A (z, y, x) mask on ``image``'s grid -> a boolean mask on ``grid`` (linear, > 0.5)."""
    m = sitk.GetImageFromArray(np.ascontiguousarray(np.asarray(mask) > 0).astype(np.uint8))
    m.CopyInformation(image)
    arr = sitk.GetArrayFromImage(to_canonical(m)).astype(np.float32)
    g = grid.geometry
    sl = tuple(slice(a, b) for a, b in zip(g["box_lo_zyx"], g["box_hi_zyx"]))
    return (resample(arr[sl], grid.shape).numpy() > 0.5)


def grid_image(hu: np.ndarray, geometry: dict) -> sitk.Image:
    """The stored model-grid image as a SimpleITK image with its physical geometry."""
    img = sitk.GetImageFromArray(np.asarray(hu, dtype=np.int16))
    sz, sy, sx = geometry["spacing_zyx"]
    img.SetSpacing((sx, sy, sz))
    img.SetOrigin(tuple(geometry["origin_lps"]))
    img.SetDirection(tuple(geometry["direction"]))
    return img

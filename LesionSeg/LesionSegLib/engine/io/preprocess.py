"""Orientation, resampling, HU windowing and body cropping shared by training and inference."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import numpy as np
import SimpleITK as sitk

if TYPE_CHECKING:  # torch is imported where used: the ONNX inference path runs without it
    import torch

from .images import same_grid

CANONICAL = "LPS"  # array axes (z, y, x) then run inferior->superior, anterior->posterior, right->left


def orientation_of(image: sitk.Image) -> str:
    return sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(image.GetDirection())


def to_canonical(image: sitk.Image) -> sitk.Image:
    """Permute/flip axes (no interpolation) so the image is closest to LPS (axial slices)."""
    if orientation_of(image) == CANONICAL:
        return image
    return sitk.DICOMOrient(image, CANONICAL)


def from_canonical(array: np.ndarray, canonical: sitk.Image, original: sitk.Image) -> np.ndarray:
    """Map an array on ``canonical``'s grid back onto ``original``'s grid (exact: permute/flip).

    ``canonical`` must be :func:`to_canonical` of ``original``: the permuted/flipped grid has
    to land on ``original``'s size, spacing, origin and direction, else a ``ValueError`` says
    so (a wrong permutation of equal-sized axes would otherwise pass unnoticed).
    """
    if tuple(array.shape) != tuple(reversed(canonical.GetSize())):
        raise ValueError(f"array of shape {tuple(array.shape)} is not on the canonical grid {tuple(reversed(canonical.GetSize()))}")
    if orientation_of(original) == CANONICAL:
        back, out = canonical, array
    else:
        bits = array.view(np.uint16) if array.dtype == np.float16 else array  # SimpleITK has no float16: move the bits
        img = sitk.GetImageFromArray(bits)
        img.CopyInformation(canonical)
        back = sitk.DICOMOrient(img, orientation_of(original))
        out = sitk.GetArrayFromImage(back).view(array.dtype)
    if not same_grid(back, original):
        raise ValueError("the canonical grid does not map back onto the input grid (size, spacing, origin or direction differ)")
    return out


#: an input whose axes lie further than this off the patient axes gets a note (:func:`oblique_note`)
OBLIQUE_NOTE_DEGREES = 5.0


def obliquity_degrees(image: sitk.Image) -> float:
    """How far (degrees) the image's axes lie from the nearest patient axes (0 for an axial,
    sagittal or coronal grid, however permuted or flipped)."""
    direction = np.abs(np.asarray(image.GetDirection(), dtype=float).reshape(3, 3))
    return float(np.degrees(np.arccos(np.clip(direction.max(axis=0), -1.0, 1.0))).max())


def oblique_note(image: sitk.Image) -> str | None:
    """A note for an oblique scan: the networks see its voxels as they are (only permuted and
    flipped, never interpolated), so its anatomy is rotated against what they learnt on."""
    degrees = obliquity_degrees(image)
    if degrees <= OBLIQUE_NOTE_DEGREES:
        return None
    return (f"the scan is oblique: its axes lie {degrees:.0f} degrees off the patient axes, and the model learnt on "
            "axis-aligned scans, so it may find and outline lesions less well; resample it onto an axial grid "
            "(e.g. Slicer's Resample Scalar Volume with an axial reference) for the model's usual accuracy")


def spacing_zyx(image: sitk.Image) -> tuple[float, float, float]:
    sx, sy, sz = image.GetSpacing()
    return (sz, sy, sx)


def target_shape(shape: Sequence[int], spacing: Sequence[float], new_spacing: Sequence[float]) -> tuple[int, ...]:
    return tuple(max(1, int(round(n * s / t))) for n, s, t in zip(shape, spacing, new_spacing))


def resample(array: np.ndarray | torch.Tensor, shape: Sequence[int], mode: str = "trilinear") -> torch.Tensor:
    """Resample a (z, y, x) or (C, z, y, x) array to ``shape`` keeping the field of view."""
    import torch
    import torch.nn.functional as F

    t = torch.as_tensor(array)
    squeeze = t.ndim == 3
    if squeeze:
        t = t[None]
    t = t[None].float()
    if tuple(t.shape[2:]) != tuple(shape):
        if mode == "nearest":
            t = F.interpolate(t, size=tuple(shape), mode="nearest-exact")
        else:
            t = F.interpolate(t, size=tuple(shape), mode="trilinear", align_corners=False)
    t = t[0]
    return t[0] if squeeze else t


def normalize(hu: np.ndarray | torch.Tensor, windows: Sequence[Sequence[float]]) -> torch.Tensor:
    """One channel per HU window, each clipped and scaled to [0, 1]."""
    import torch

    t = torch.as_tensor(hu).float()
    chans = [((t.clamp(lo, hi) - lo) / (hi - lo)) for lo, hi in windows]
    return torch.stack(chans, 0)


@dataclass
class Box:
    """A box of array indices: ``lo`` inclusive, ``hi`` exclusive, (z, y, x)."""

    lo: tuple[int, int, int]
    hi: tuple[int, int, int]

    @property
    def slices(self) -> tuple[slice, slice, slice]:
        return tuple(slice(a, b) for a, b in zip(self.lo, self.hi))

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(b - a for a, b in zip(self.lo, self.hi))


def body_box(hu: np.ndarray, spacing: Sequence[float], threshold: float = -500.0, margin_mm: float = 10.0) -> Box:
    """Bounding box of the body (voxels above ``threshold`` HU) plus a margin.

    Air around the patient and scanner padding (-2048 / -3024) are cut away so that the
    network does not spend time on them.  When nothing is above the threshold the whole
    volume is kept.
    """
    shape = hu.shape
    mask = hu > threshold
    if not mask.any():
        return Box((0, 0, 0), tuple(shape))
    lo, hi = [], []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        prof = mask.any(axis=other)
        # every voxel above the threshold counts: a speck far from the body (noise, a table
        # fragment) widens the box, which costs time but never cuts a lesion away
        idx = np.flatnonzero(prof)
        m = int(np.ceil(margin_mm / spacing[axis]))
        lo.append(max(0, int(idx[0]) - m))
        hi.append(min(shape[axis], int(idx[-1]) + 1 + m))
    return Box(tuple(lo), tuple(hi))


def body_mask(hu: np.ndarray, threshold: float = -500.0, min_fraction: float = 0.1) -> np.ndarray:
    """The patient's body in a (z, y, x) HU array: voxels above ``threshold`` with their holes
    filled slice by slice (lungs, airways and bowel gas count as body; the air around the patient
    does not), keeping the 26-connected parts of at least ``min_fraction`` of the largest (two
    legs, not the table or specks).  All False when nothing is above the threshold.  Uses cc3d
    only (scipy's import alone would cost the whole command half a second)."""
    import cc3d

    mask = np.asarray(hu) > threshold
    if not mask.any():
        return mask
    filled = mask.copy()
    for z, tissue in enumerate(mask):
        if not tissue.any():
            continue
        outside = cc3d.connected_components(~tissue, connectivity=4)  # the air regions of the slice
        edge = np.unique(np.concatenate([outside[0], outside[-1], outside[:, 0], outside[:, -1]]))
        filled[z] |= (outside > 0) & ~np.isin(outside, edge)  # air that does not reach the slice's edge: a hole
    labels = cc3d.connected_components(filled, connectivity=26)
    counts = np.bincount(labels.ravel())
    counts[0] = 0
    return np.isin(labels, np.flatnonzero(counts >= min_fraction * counts.max()))

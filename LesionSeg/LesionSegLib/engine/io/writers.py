"""Writing results: images on a reference grid, CSV tables and Slicer ``.seg.nrrd`` files.

Callers write into the temporary paths of an :class:`~LesionSegLib.engine.atomic.AtomicWriter`,
so every output appears complete or not at all.
"""
from __future__ import annotations

import csv
from typing import Iterable, Sequence

import numpy as np
import SimpleITK as sitk

#: Slicer segment status tag values used for review decisions.
SLICER_STATUS = {"accepted": "completed", "rejected": "flagged", "unsure": "inprogress", "unreviewed": "notstarted"}


def write_image(array: np.ndarray, reference: sitk.Image, path: str, compression_level: int = 1) -> None:
    """Write ``array`` (z, y, x) with exactly the geometry of ``reference``.

    Label volumes are mostly zeros: fast zlib (level 1) compresses them about as well as the
    default level and many times faster on a 512x512 scan.
    """
    img = sitk.GetImageFromArray(array)
    img.CopyInformation(reference)
    sitk.WriteImage(img, path, useCompression=True, compressionLevel=compression_level)


def write_csv(rows: Iterable[dict], columns: Sequence[str], path: str) -> None:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow(row)


def ijk_to_lps(image: sitk.Image) -> np.ndarray:
    """4x4 matrix from voxel (i, j, k) to LPS millimetres."""
    m = np.eye(4)
    d = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)
    m[:3, :3] = d * np.asarray(image.GetSpacing(), dtype=float)[None, :]
    m[:3, 3] = image.GetOrigin()
    return m


def write_seg_nrrd(path: str, labelmap: np.ndarray, segments: list[dict], reference: sitk.Image) -> None:
    """A Slicer ``.seg.nrrd`` with one layer: ``segments`` are slicerio segment dicts
    (id, name, color, labelValue, status, tags) whose ``labelValue`` is the labelmap value."""
    import slicerio

    dtype = np.uint8 if int(labelmap.max(initial=0)) < 256 else np.uint16
    seg = {
        # a transposed view: pynrrd writes it in Fortran order, which is the labelmap's own C order (no copy)
        "voxels": np.transpose(labelmap.astype(dtype, copy=False), (2, 1, 0)),
        "ijkToLPS": ijk_to_lps(reference),
        "containedRepresentationNames": ["Binary labelmap"],
        "masterRepresentation": "Binary labelmap",
        "referenceImageExtentOffset": [0, 0, 0],
        "segments": [dict(s, layer=0) for s in segments],
    }
    # zlib level 9 is pathologically slow on mostly-empty label volumes; level 1 is ~100x faster
    slicerio.write_segmentation(path, seg, compression_level=1)

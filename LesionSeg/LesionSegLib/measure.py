"""Lesion measurements from the masks as they are now, and lesions drawn by hand (MRML, no Qt).

The engine measures each lesion once (volume, longest diameter, mean HU, voxels, centroid, box)
and those figures go to the segment's tags (``mrml.TAG``), which the table, the CSV export, the
decisions and the navigation read.  A reviewer who paints or erases in the Segment Editor
changes the mask, so :func:`update` measures the segment again from its current binary labelmap
on the reference volume's grid and rewrites those tags.  What stays the model's: the confidence,
the probabilities, the classifier features and the patch (they describe what the model saw).
The lesion's identity in the feedback store (its centroid key, ``engine.feedback.codec.lesion_key``)
stays that of the proposal: the first re-measure keeps the model's centroid in
:data:`KEY_CENTROID_TAG`, and decisions use it (``mrml.lesion_info``'s ``key_centroid_lps``), so a
decision after an edit replaces the one before it instead of adding a second lesion.

A segment without a lesion id (Segment Editor: Add, then Paint) becomes a lesion as soon as it
holds voxels: it gets the next lesion id (never one a proposal had), review status ``added``
(Slicer's *completed*), source :data:`DRAWN`, confidence 1 (the reviewer's, not a model's) and its
measurements, so the table, the counter and every export list it.  Save corrections stores it as
an *added* correction, as it always did.

:class:`~LesionSegLib.widget_support.SegmentWatch` calls :func:`update` when a segment of the
result shown in the panel is modified, and :func:`refresh` when a result is shown (edits made
while it was not).
"""
from __future__ import annotations

import numpy as np
import slicer

from . import mrml

DRAWN = "drawn"  # LesionSeg.Source of a lesion drawn by hand in the Segment Editor
SOURCE_TAG = "LesionSeg.Source"
KEY_CENTROID_TAG = mrml.KEY_CENTROID_TAG  # the proposal's centroid: the lesion's identity in the feedback store
DRAWN_CONFIDENCE = 1.0
_BINARY = "Binary labelmap"


def measure(segmentation_node, segment_id: str, volume=None) -> dict:
    """Measurements of one segment's current mask on the reference volume's grid: ``n_voxels``,
    ``volume_ml``, ``diameter_mm``, ``mean_hu``, ``centroid_lps`` and ``bbox_ijk`` (only
    ``n_voxels`` = 0 for an empty mask)."""
    from .engine.segment.clusters import max_diameter_mm, nonzero_box

    volume = volume or mrml.reference_volume(segmentation_node)
    if volume is None:
        raise ValueError(f"'{segmentation_node.GetName()}' has no reference volume to measure its lesions on")
    mask = slicer.util.arrayFromSegmentBinaryLabelmap(segmentation_node, segment_id, volume) > 0
    box = nonzero_box(mask)
    if box is None:
        return {"n_voxels": 0}
    sub = mask[box]
    spacing_zyx = tuple(float(s) for s in reversed(volume.GetSpacing()))
    hu = slicer.util.arrayFromVolume(volume)[box][sub].astype(np.float64)
    k, j, i = (np.argwhere(sub).mean(axis=0) + [s.start for s in box]).tolist()
    r, a, s = (mrml.ijk_to_ras(volume) @ np.array([i, j, k, 1.0]))[:3]
    bz, by, bx = box
    return {
        "n_voxels": int(sub.sum()),
        "volume_ml": float(sub.sum()) * float(np.prod(spacing_zyx)) / 1000.0,
        "diameter_mm": max_diameter_mm(sub, spacing_zyx),
        "mean_hu": float(hu.mean()),
        "centroid_lps": (-float(r), -float(a), float(s)),
        "bbox_ijk": ((bx.start, by.start, bz.start), (bx.stop, by.stop, bz.stop)),
    }


def _tag_values(m: dict) -> dict[str, str]:
    """The measurement tags (``mrml.TAG`` keys) of measurements ``m``: an emptied lesion keeps
    only 0 voxels, 0 ml and 0 mm (a deleted lesion for Save corrections; nothing left to measure)."""
    if not m["n_voxels"]:
        return {"n_voxels": "0", "volume_ml": f"{0.0:.4f}", "diameter_mm": f"{0.0:.2f}"}
    x, y, z = m["centroid_lps"]
    (i0, j0, k0), (i1, j1, k1) = m["bbox_ijk"]
    return {"n_voxels": str(int(m["n_voxels"])), "volume_ml": f"{m['volume_ml']:.4f}", "diameter_mm": f"{m['diameter_mm']:.2f}",
            "mean_hu": f"{m['mean_hu']:.2f}", "centroid_lps": f"{x:.3f},{y:.3f},{z:.3f}", "bbox_ijk": f"{i0},{j0},{k0},{i1},{j1},{k1}"}


def _write(segment, values: dict[str, str]) -> None:
    if values["n_voxels"] != "0" and not segment.HasTag(KEY_CENTROID_TAG) and segment.HasTag(mrml.TAG["centroid_lps"]):
        segment.SetTag(KEY_CENTROID_TAG, mrml.get_tag(segment, mrml.TAG["centroid_lps"]))  # the proposal's: its identity
    for key, value in values.items():
        segment.SetTag(mrml.TAG[key], value)


def _adopt(segmentation_node, segment, m: dict) -> int:
    """Make a segment drawn by hand (no lesion id, ``m``: its measurements) an added lesion."""
    from .click import ADDED, next_lesion_id
    from .engine.segment.colors import status_color

    lesion_id = next_lesion_id(segmentation_node)
    seg_logic = slicer.vtkSlicerSegmentationsModuleLogic
    segment.SetTag(mrml.TAG["lesion_id"], str(lesion_id))
    segment.SetTag(mrml.TAG["confidence"], f"{DRAWN_CONFIDENCE:.6f}")
    segment.SetTag(mrml.TAG["model"], segmentation_node.GetAttribute(mrml.ATTR_MODEL) or "")
    segment.SetTag(mrml.TAG["review"], ADDED)
    segment.SetTag(SOURCE_TAG, DRAWN)
    case_hash = segmentation_node.GetAttribute(mrml.ATTR_CASE_HASH) or ""
    if case_hash:
        segment.SetTag(mrml.TAG["case_hash"], case_hash)
    x, y, z = m["centroid_lps"]
    segment.SetTag(KEY_CENTROID_TAG, f"{x:.3f},{y:.3f},{z:.3f}")
    if segment.GetColorAutoGenerated():  # a colour the reviewer chose is kept
        segment.SetColor(*status_color("accepted", DRAWN_CONFIDENCE))
        segment.SetColorAutoGenerated(False)
    seg_logic.SetSegmentStatus(segment, seg_logic.GetSegmentStatusFromMachineReadableString("completed"))
    return lesion_id


def update(segmentation_node, segment_id: str, volume=None) -> bool:
    """Measure one segment again and rewrite its measurement tags; a segment drawn by hand that
    holds voxels becomes an added lesion.  Returns whether a lesion's record changed (the table
    then needs a refresh); False for a segment that is gone, or an empty one without a lesion id."""
    segment = segmentation_node.GetSegmentation().GetSegment(segment_id)
    if segment is None:
        return False
    m = measure(segmentation_node, segment_id, volume)
    values = _tag_values(m)
    was = segmentation_node.StartModify()
    try:
        if not segment.HasTag(mrml.TAG["lesion_id"]):
            if not m["n_voxels"]:
                return False
            _adopt(segmentation_node, segment, m)
        elif all(mrml.get_tag(segment, mrml.TAG[k]) == values[k] for k in CHANGE_KEYS if k in values):
            return False  # a modified event that changed no voxel (a rename, a colour, a decision)
        _write(segment, values)
    finally:
        segmentation_node.EndModify(was)
    return True


#: the tags that tell a changed mask from a modified event that changed no voxel
CHANGE_KEYS = ("n_voxels", "volume_ml", "mean_hu", "centroid_lps")


def layer_counts(segmentation_node) -> dict[str, int]:
    """Voxels of every segment, counted on the segmentation's own labelmap layers (one pass per
    layer, slice by slice): the cheap check of :func:`refresh`."""
    from vtkmodules.util import numpy_support

    seg = segmentation_node.GetSegmentation()
    out: dict[str, int] = {}
    for layer in range(seg.GetNumberOfLayers()):
        image = seg.GetLayerDataObject(layer)
        sids = list(seg.GetSegmentIDsForLayer(layer))
        scalars = image.GetPointData().GetScalars() if image is not None else None
        if scalars is None:
            out.update({sid: 0 for sid in sids})
            continue
        ni, nj, nk = image.GetDimensions()
        arr = numpy_support.vtk_to_numpy(scalars).reshape(nk, nj * ni)
        counts = np.zeros(int(arr.max(initial=0)) + 1, dtype=np.int64)
        for plane in arr:
            c = np.bincount(plane, minlength=counts.size)
            counts += c
        for sid in sids:
            value = int(seg.GetSegment(sid).GetLabelValue())
            out[sid] = int(counts[value]) if 0 < value < counts.size else 0
    return out


def refresh(segmentation_node) -> list[str]:
    """Measure again the lesions whose voxel count no longer matches their tags, and adopt the
    segments drawn by hand; returns the segment ids updated."""
    if mrml.reference_volume(segmentation_node) is None:
        return []
    seg = segmentation_node.GetSegmentation()
    done = []
    for sid, n in layer_counts(segmentation_node).items():
        segment = seg.GetSegment(sid)
        if segment is None:
            continue
        tagged = segment.HasTag(mrml.TAG["lesion_id"])
        if (tagged and mrml.get_tag(segment, mrml.TAG["n_voxels"]) != str(n)) or (not tagged and n):
            if update(segmentation_node, sid):
                done.append(sid)
    return done


def stamp(segmentation_node, segment_id: str) -> int | None:
    """When the segment's mask last changed (its labelmap's VTK modified time), or None."""
    segment = segmentation_node.GetSegmentation().GetSegment(segment_id)
    rep = segment.GetRepresentation(_BINARY) if segment is not None else None
    return None if rep is None else int(rep.GetMTime())

"""Add a missed lesion from one click (MRML logic, no Qt): the "Add lesion" tool of the LesionSeg module.

    from LesionSegLib import click
    info = click.add_lesion(volume_node, segmentation_node, ras_point, engine, store=feedback_store)

The click runs the model's segmenter in-process on a crop around the point
(:func:`LesionSegLib.engine.click.click`; a dense model's sliding windows, or a detseg model's RoI
segmenter), adds the lesion to ``segmentation_node`` as a new
segment with review status ``added`` (Slicer status *completed*, the accepted colour) and records
it in the feedback store as a missed lesion: a true lesion (decision ``accepted``) with
``source = "missed"``, attributed to the model of the automatic pass, so it counts as one of that
pass's false negatives and its features/patch can teach the classifier.

Wiring in the widget (``LesionSeg.py``, owned by the widget): on "Add lesion", wait for one click
in a slice view (e.g. a ``vtkMRMLMarkupsFiducialNode`` placed with the interaction node), read its
RAS position and call :func:`add_lesion` with the current result and the engine of
:func:`click_model` (the model that made the result); show an ``InputError`` message as it is (it names the point).
"""
from __future__ import annotations

import numpy as np
import slicer

from . import mrml
from .engine.cli.click import DEFAULT_CLICK_MODEL
from .engine.click import click as click_engine
from .engine.click import default_fallback
from .engine.errors import InputError
from .engine.feedback.store import MISSED
from .engine.segment.colors import status_color
from .review import Decision

ADDED = "added"  # review state of a lesion added by the reviewer
MISSED_SOURCE = MISSED  # feedback-store source of a lesion the automatic pass did not find


def _volume_to_sitk(volume_node):
    try:  # the Slicer-module layer may keep volume helpers in their own module
        from .volumes import volume_to_sitk
    except ImportError:
        volume_to_sitk = mrml.volume_to_sitk
    return volume_to_sitk(volume_node)


def next_lesion_id(segmentation_node) -> int:
    """An id no segment and no proposal of this result has had: a removed proposal's id is never
    reused, since Save corrections matches segments to proposals by id (a reused id made the
    added lesion an "edit" of the deleted false positive)."""
    from .corrections import proposal_ids

    seg = segmentation_node.GetSegmentation()
    ids = [int(mrml.get_tag(seg.GetSegment(seg.GetNthSegmentID(i)), mrml.TAG["lesion_id"], "0") or 0)
           for i in range(seg.GetNumberOfSegments())]
    return max(ids + proposal_ids(segmentation_node), default=0) + 1


def lesion_at(segmentation_node, point_ras) -> dict | None:
    """The lesion of this result (shown, or hidden by the threshold) whose mask contains
    ``point_ras``, or None."""
    import vtk

    rep = slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName()
    seg = segmentation_node.GetSegmentation()
    world_to_ijk = vtk.vtkMatrix4x4()
    for les in mrml.lesions(segmentation_node):
        segment = seg.GetSegment(les["segment_id"])
        image = segment.GetRepresentation(rep) if segment is not None else None
        if image is None:
            continue
        image.GetWorldToImageMatrix(world_to_ijk)
        i, j, k = (int(round(v)) for v in world_to_ijk.MultiplyPoint((*map(float, point_ras), 1.0))[:3])
        e = image.GetExtent()
        if e[0] <= i <= e[1] and e[2] <= j <= e[3] and e[4] <= k <= e[5] and \
                image.GetScalarComponentAsDouble(i, j, k, 0) == segment.GetLabelValue():
            return les
    return None


def click_model(segmentation_node) -> str:
    """The model that answers a click on this result: the one that made it, so that the added
    lesion's patch, features and confidence are that model's, like those of the lesions it found
    (the feedback store attributes the missed lesion to it); ``DEFAULT_CLICK_MODEL`` when the
    result names no model the registry knows."""
    from .engine.models import ModelError, get_card

    model_id = segmentation_node.GetAttribute(mrml.ATTR_MODEL) or ""
    try:
        return get_card(model_id).id if model_id else DEFAULT_CLICK_MODEL
    except ModelError:
        return DEFAULT_CLICK_MODEL


def click_fallback(engine, load):
    """A function that loads the fallback of ``engine`` (:func:`~.engine.click.default_fallback`)
    with ``load(name)`` when first needed (:func:`~.engine.click.click`); None when it has none."""
    name = default_fallback(engine)
    return None if name is None else (lambda: load(name))


def add_lesion(volume_node, segmentation_node, point_ras, engine, store=None, reviewer: str = "", fallback=None) -> dict:
    """Segment the lesion under ``point_ras`` and add it; returns the new lesion's record
    (:func:`mrml.lesion_info`).  Raises the engine's ``InputError`` (naming the point) and adds
    nothing when the point is outside the volume, on air, no lesion is found there, or the point
    is inside a lesion that is already shown (that one is reviewed with Accept / Reject instead).
    ``fallback``: an engine, or a function returning one, that answers when ``engine`` finds no
    lesion there (:func:`click_fallback`); the record's ``click_model`` names the model that answered."""
    r, a, s = (float(v) for v in point_ras)
    found = lesion_at(segmentation_node, (r, a, s))
    if found is not None:
        where = f"the point ({r:.1f}, {a:.1f}, {s:.1f}) mm RAS is inside lesion {found['lesion_id']}"
        thr = mrml.get_threshold(segmentation_node)
        if mrml.shown_at(found, thr):
            raise InputError(f"{where}, which is already shown: review it with Accept / Reject instead of adding it again")
        raise InputError(f"{where}, which the model found with confidence {found['confidence']:.2f} but the threshold "
                         f"({thr:.2f}) hides: lower the threshold to review it instead of adding it again")
    image = _volume_to_sitk(volume_node)
    res = click_engine(engine, image, [(-r, -a, s)], fallback=fallback)
    les = res.lesions[0]
    les.lesion_id = next_lesion_id(segmentation_node)
    mask = (res.labelmap == 1).astype(np.uint16) * les.lesion_id
    model_id = segmentation_node.GetAttribute(mrml.ATTR_MODEL) or res.model_id
    case_hash = segmentation_node.GetAttribute(mrml.ATTR_CASE_HASH) or ""
    seg_logic = slicer.vtkSlicerSegmentationsModuleLogic
    segment = slicer.vtkSegment()
    segment.SetName(f"Lesion {les.lesion_id} (added)")
    segment.SetNameAutoGenerated(False)
    segment.SetColor(*status_color("accepted", les.confidence))
    segment.SetColorAutoGenerated(False)
    segment.SetLabelValue(int(les.lesion_id))
    segment.AddRepresentation(slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName(),
                              mrml._oriented_labelmap(mask, volume_node))
    for k, v in mrml.lesion_tags(les, model_id, ADDED, case_hash).items():
        segment.SetTag(k, v)
    segment.SetTag(mrml.TAG["model"] + "Click", res.model_id)
    seg_logic.SetSegmentStatus(segment, seg_logic.GetSegmentStatusFromMachineReadableString("completed"))
    sid = mrml.segment_id(les.lesion_id)
    if not segmentation_node.GetSegmentation().AddSegment(segment, sid):
        raise RuntimeError(f"cannot add segment for lesion {les.lesion_id}")
    table = mrml.get_table_node(segmentation_node)
    if table is not None:
        mrml.update_table_node(table, segmentation_node)
    if store is not None:
        store.record(Decision(
            case_name=segmentation_node.GetAttribute(mrml.ATTR_CASE_NAME) or volume_node.GetName(), case_hash=case_hash,
            lesion_id=les.lesion_id, decision="accepted", confidence=les.confidence, model_id=model_id,
            centroid_lps=les.centroid_lps, volume_ml=les.volume_ml, diameter_mm=les.diameter_mm, bbox_ijk=les.bbox_ijk,
            features=dict(les.features), patch=les.patch, reviewer=reviewer,
        ), source=MISSED_SOURCE)
    return {**mrml.lesion_info(segment, sid), "click_model": res.model_id}

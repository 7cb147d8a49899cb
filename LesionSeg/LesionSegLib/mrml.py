"""MRML side of the LesionSeg module: lesion segments, their tags, terminology, study placement,
review state and the classifier patches kept in the scene.

Everything here works on a ``vtkMRMLScene`` through ``slicer`` (MRML, VTK) and imports no Qt,
so it runs headless: in Slicer, in ``PythonSlicer`` and on the PyPI ``slicer-core`` wheel.
Volumes and their geometry are in :mod:`.volumes`, the lesion table in :mod:`.table`, terminology
and study placement in :mod:`.terminology`.

Conventions
-----------
* One segmentation node per run.  Segment ``lesion_<k>`` holds lesion ``k`` (ids 1..n in
  order of decreasing confidence); all segments share one labelmap layer whose value ``k`` is
  lesion ``k``.  The node's reference geometry is the input volume, and it sits beside that
  volume in the subject hierarchy (under its study).
* Per-lesion data lives in segment tags (``LesionSeg.*``, see :data:`TAG`), so it survives
  scene save/load and ``.seg.nrrd`` export; the review state is both the ``LesionSeg.Review``
  tag and Slicer's own segment status (``Segmentation.Status``: completed = accepted,
  flagged = rejected, inprogress = unsure, notstarted = unreviewed).
* Each segment carries a standard terminology entry: SNOMED CT category *Morphologically Altered
  Structure* (49755003), type *Mass* (4147007) from Slicer's General Anatomy list, and the
  anatomic region when the model card names one (``anatomic_region``).
* The classifier's adaptive patches (its image inputs, needed to learn from a decision) are kept
  in a text node referenced by the segmentation node (:data:`REF_PATCHES`), so a review continued
  in a reopened scene still feeds the feedback store with everything retraining needs.
"""
from __future__ import annotations

import base64
import json

import slicer
import vtk

from .engine.io.writers import SLICER_STATUS
from .engine.segment.colors import ACCEPTED_COLOR, CONFIDENCE_STOPS, REJECTED_COLOR, confidence_color, status_color
from .engine.segment.result import segment_tags
from .review import REVIEW_ORDERS
from .terminology import (  # noqa: F401 (re-exported: the module's historical API)
    LESION_CATEGORY, LESION_TYPE, REGION_CONTEXT, TERMINOLOGY_CONTEXT, anatomic_region, place_beside, terminology_codes,
    terminology_entry,
)
from .volumes import (  # noqa: F401 (re-exported: the module's historical API)
    _RAS_LPS, _scene, ijk_to_ras, load_volume, set_volume_geometry_from_sitk, volume_from_sitk,
    volume_geometry_lps, volume_to_sitk,
)

#: Segment tag names (a result's scan-level OOD score and warning are node attributes: ``ood.py``).
TAG = {
    "confidence": "LesionSeg.Confidence",
    "lesion_id": "LesionSeg.LesionId",
    "model": "LesionSeg.Model",
    "review": "LesionSeg.Review",
    "volume_ml": "LesionSeg.VolumeMl",
    "diameter_mm": "LesionSeg.DiameterMm",
    "mean_hu": "LesionSeg.MeanHU",
    "n_voxels": "LesionSeg.NVoxels",
    "centroid_lps": "LesionSeg.CentroidLPS",
    "mean_probability": "LesionSeg.MeanProbability",
    "max_probability": "LesionSeg.MaxProbability",
    "bbox_ijk": "LesionSeg.BBoxIJK",
    "features": "LesionSeg.Features",
    "case_hash": "LesionSeg.CaseHash",
    # the review queue when the decision was made (see review.review_queue)
    "queue_position": "LesionSeg.QueuePosition",
    "review_order": "LesionSeg.ReviewOrder",
    "review_seconds": "LesionSeg.ReviewSeconds",
    # reserved: an out-of-distribution score per lesion; 'uncertainty' order uses it when present
    "ood_score": "LesionSeg.OODScore",
}
#: Node attributes of a LesionSeg segmentation node.
#: the proposal's centroid, kept when the reviewer's edit re-measures a lesion (see measure.py)
KEY_CENTROID_TAG = "LesionSeg.KeyCentroidLPS"
ATTR_THRESHOLD = "LesionSeg.Threshold"
ATTR_MODEL = "LesionSeg.Model"
ATTR_CASE_HASH = "LesionSeg.CaseHash"
ATTR_CASE_NAME = "LesionSeg.CaseName"
ATTR_DEVICE = "LesionSeg.Device"
ATTR_ORDER = "LesionSeg.ReviewOrder"
ATTR_ROLE = "LesionSeg.Role"  # "segmentation" / "table" / "patches"
#: Node reference roles (segmentation -> table / patches, table -> segmentation).
REF_TABLE = "LesionSegTable"
REF_SEGMENTATION = "LesionSegSegmentation"
REF_PATCHES = "LesionSegPatches"

REVIEW_STATES = ("unreviewed", "accepted", "rejected", "unsure")

def segment_id(lesion_id: int) -> str:
    return f"lesion_{int(lesion_id)}"


def colormap_description() -> str:
    stops = ", ".join(f"{c:.2f}: rgb({r:.2f}, {g:.2f}, {b:.2f})" for c, (r, g, b) in CONFIDENCE_STOPS)
    return (
        "Unreviewed lesions are coloured by confidence on the 'LesionSeg confidence' colormap "
        f"(matplotlib plasma, {stops}); accepted lesions are green {ACCEPTED_COLOR}, rejected lesions grey {REJECTED_COLOR}."
    )


# ------------------------------------------------------------------------------------ helpers
def _segmentations_logic():
    mods = getattr(slicer, "modules", None)
    seg = getattr(mods, "segmentations", None) if mods is not None else None
    if seg is not None:
        return seg.logic()
    return slicer.vtkSlicerSegmentationsModuleLogic


def get_tag(segment, name: str, default: str = "") -> str:
    value = vtk.reference("")
    if segment.GetTag(name, value):
        return str(value)
    return default


# ---------------------------------------------------------------------- result -> segments
def lesion_tags(lesion, model_id: str, review: str = "unreviewed", case_hash: str = "") -> dict[str, str]:
    """Every ``LesionSeg.*`` tag of a lesion segment (the engine's tags plus geometry and features)."""
    x, y, z = lesion.centroid_lps
    (i0, j0, k0), (i1, j1, k1) = lesion.bbox_ijk
    tags = segment_tags(lesion, model_id, review)
    tags.update({
        TAG["mean_hu"]: f"{lesion.mean_hu:.2f}",
        TAG["n_voxels"]: str(int(lesion.n_voxels)),
        TAG["centroid_lps"]: f"{x:.3f},{y:.3f},{z:.3f}",
        TAG["mean_probability"]: f"{lesion.mean_probability:.6f}",
        TAG["max_probability"]: f"{lesion.max_probability:.6f}",
        TAG["bbox_ijk"]: f"{i0},{j0},{k0},{i1},{j1},{k1}",
    })
    if lesion.features:
        tags[TAG["features"]] = json.dumps({k: round(float(v), 6) for k, v in lesion.features.items()}, sort_keys=True)
    if case_hash:
        tags[TAG["case_hash"]] = case_hash
    if getattr(lesion, "ood_score", None) is not None:  # "most uncertain first" uses it too
        tags[TAG["ood_score"]] = f"{lesion.ood_score:.4f}"
    return tags


def _oriented_labelmap(labelmap, volume_node):
    """A vtkOrientedImageData holding ``labelmap`` (k, j, i) on the volume's voxel grid."""
    import numpy as np
    from vtkmodules.util import numpy_support

    from .volumes import _vtk_matrix

    n_max = int(labelmap.max()) if labelmap.size else 0
    dtype, vtk_type = (np.uint8, vtk.VTK_UNSIGNED_CHAR) if n_max < 256 else (np.uint16, vtk.VTK_UNSIGNED_SHORT)
    img = slicer.vtkOrientedImageData()
    k, j, i = labelmap.shape
    img.SetExtent(0, i - 1, 0, j - 1, 0, k - 1)
    img.SetImageToWorldMatrix(_vtk_matrix(ijk_to_ras(volume_node)))
    flat = np.ascontiguousarray(labelmap.astype(dtype, copy=False)).ravel()
    arr = numpy_support.numpy_to_vtk(flat, deep=True, array_type=vtk_type)
    arr.SetName("ImageScalars")
    img.GetPointData().SetScalars(arr)
    return img


def _new_node(scene, cls: str, name: str, role: str):
    """A node with its LesionSeg role set *before* it enters the scene (so filtered selectors see it)."""
    node = scene.CreateNodeByClass(cls)
    node.UnRegister(None)
    node.SetName(name)
    node.SetAttribute(ATTR_ROLE, role)
    return scene.AddNode(node)


def create_segmentation_node(volume_node, result, case_hash: str = "", name: str | None = None, threshold: float | None = None,
                             scene=None, region: tuple | None = None):
    """One segmentation node with one segment per lesion of an engine ``SegmentationResult``.

    ``result.labelmap`` must be on ``volume_node``'s voxel grid.  Segments below ``threshold``
    (default: the result's threshold) are created but hidden.  The node goes beside the volume in
    the subject hierarchy; the lesions' patches go to a text node it references.
    """
    scene = _scene(scene)
    shape = tuple(int(v) for v in reversed(volume_node.GetImageData().GetDimensions()))
    if tuple(result.labelmap.shape) != shape:
        raise ValueError(f"result labelmap shape {result.labelmap.shape} does not match the volume's voxel grid {shape}")
    seg_logic = slicer.vtkSlicerSegmentationsModuleLogic
    name = name or scene.GenerateUniqueName(f"{volume_node.GetName()} lesions")
    node = scene.CreateNodeByClass("vtkMRMLSegmentationNode")
    node.UnRegister(None)
    node.SetName(name)
    for key, value in ((ATTR_ROLE, "segmentation"), (ATTR_MODEL, result.model_id), (ATTR_CASE_HASH, case_hash),
                       (ATTR_CASE_NAME, volume_node.GetName()), (ATTR_DEVICE, str(result.device)), (ATTR_ORDER, REVIEW_ORDERS[0])):
        node.SetAttribute(key, value)
    node = scene.AddNode(node)
    try:
        node.CreateDefaultDisplayNodes()
        node.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)
        if volume_node.GetParentTransformNode() is not None:
            node.SetAndObserveTransformNodeID(volume_node.GetParentTransformNode().GetID())
        segmentation = node.GetSegmentation()
        binary = slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName()
        if hasattr(segmentation, "SetSourceRepresentationName"):
            segmentation.SetSourceRepresentationName(binary)
        else:  # Slicer < 5.4
            segmentation.SetMasterRepresentationName(binary)
        layer = _oriented_labelmap(result.labelmap, volume_node)
        entry = terminology_entry(region)
        was = node.StartModify()
        try:
            for les in result.lesions:
                seg = slicer.vtkSegment()
                seg.SetName(les.name)
                seg.SetNameAutoGenerated(False)
                seg.SetColor(*confidence_color(les.confidence))
                seg.SetColorAutoGenerated(False)
                seg.SetLabelValue(int(les.lesion_id))
                seg.AddRepresentation(binary, layer)
                seg.SetTag(slicer.vtkSegment.GetTerminologyEntryTagName(), entry)
                for k, v in lesion_tags(les, result.model_id, "unreviewed", case_hash).items():
                    seg.SetTag(k, v)
                seg_logic.SetSegmentStatus(seg, seg_logic.NotStarted)
                if not segmentation.AddSegment(seg, segment_id(les.lesion_id)):
                    raise RuntimeError(f"cannot add segment for lesion {les.lesion_id}")
        finally:
            node.EndModify(was)
        display = node.GetDisplayNode()
        display.SetOpacity2DFill(0.45)
        display.SetOpacity2DOutline(1.0)
        store_patches(node, {les.lesion_id: les.patch for les in result.lesions if les.patch is not None})
        set_threshold(node, result.threshold if threshold is None else threshold, update_table=False)
        place_beside(node, volume_node)
    except Exception:
        remove_result_nodes(node, scene)
        raise
    return node


# ---------------------------------------------------------------------------- patches
def store_patches(segmentation_node, patches: dict) -> None:
    """Keep the classifier patches ({lesion id: (C, z, y, x) array}) in the scene."""
    if not patches:
        return
    from .engine.feedback.codec import PATCH_CODEC, encode_patch

    lesions = {}
    for lesion_id, patch in patches.items():
        blob, shape = encode_patch(patch)
        lesions[str(int(lesion_id))] = {"shape": shape, "data": base64.b64encode(blob).decode("ascii")}
    node = segmentation_node.GetNodeReference(REF_PATCHES)
    if node is None:
        node = _new_node(segmentation_node.GetScene(), "vtkMRMLTextNode", f"{segmentation_node.GetName()} patches", "patches")
        node.SetHideFromEditors(True)
        node.SetForceCreateStorageNode(slicer.vtkMRMLTextNode.CreateStorageNodeAlways)
        segmentation_node.SetNodeReferenceID(REF_PATCHES, node.GetID())
    node.SetText(json.dumps({"codec": PATCH_CODEC, "lesions": lesions}))


def lesion_patch(segmentation_node, lesion_id: int):
    """The classifier patch of a lesion kept in the scene, or None."""
    node = segmentation_node.GetNodeReference(REF_PATCHES)
    if node is None or not node.GetText():
        return None
    from .engine.feedback.codec import decode_patch

    try:
        data = json.loads(node.GetText())
        entry = data["lesions"].get(str(int(lesion_id)))
        if entry is None:
            return None
        return decode_patch(base64.b64decode(entry["data"]), entry["shape"], data.get("codec"))
    except (ValueError, KeyError, TypeError):  # an edited or foreign text node: no patch, not a crash
        return None


# --------------------------------------------------------------------------- lesion records
def lesion_info(segment, segment_id_: str = "") -> dict:
    """Lesion record of one segment, from its tags."""
    def f(key, default=0.0):
        try:
            return float(get_tag(segment, TAG[key], str(default)))
        except ValueError:
            return default

    def point(tag):
        try:
            xyz = tuple(float(v) for v in get_tag(segment, tag, "0,0,0").split(","))
        except ValueError:
            return (0.0, 0.0, 0.0)
        return xyz if len(xyz) == 3 else (0.0, 0.0, 0.0)

    centroid = point(TAG["centroid_lps"])
    bbox = [int(v) for v in get_tag(segment, TAG["bbox_ijk"], "0,0,0,0,0,0").split(",")]
    feats = get_tag(segment, TAG["features"], "")
    review = get_tag(segment, TAG["review"], "unreviewed") or "unreviewed"
    return {
        "segment_id": segment_id_,
        "name": segment.GetName(),
        "lesion_id": int(f("lesion_id", 0)),
        "confidence": f("confidence"),
        "volume_ml": f("volume_ml"),
        "diameter_mm": f("diameter_mm"),
        "mean_hu": f("mean_hu"),
        "n_voxels": int(f("n_voxels", 0)),
        "mean_probability": f("mean_probability"),
        "max_probability": f("max_probability"),
        "centroid_lps": centroid,
        # the lesion's identity in the feedback store: the proposal's centroid, kept when an edit re-measures it (measure.py)
        "key_centroid_lps": point(KEY_CENTROID_TAG) if segment.HasTag(KEY_CENTROID_TAG) else centroid,
        "bbox_ijk": (tuple(bbox[:3]), tuple(bbox[3:])) if len(bbox) == 6 else ((0, 0, 0), (0, 0, 0)),
        "features": json.loads(feats) if feats else {},
        "model_id": get_tag(segment, TAG["model"], ""),
        "case_hash": get_tag(segment, TAG["case_hash"], ""),
        "review": review,
        "queue_position": int(f("queue_position", 0)),
        "review_order": get_tag(segment, TAG["review_order"], ""),
        "review_seconds": f("review_seconds"),
        "ood_score": f("ood_score") if segment.HasTag(TAG["ood_score"]) else None,
        # erased in the Segment Editor (measure.py writes 0 voxels): gone from the table, the exports and the review
        "erased": segment.HasTag(TAG["n_voxels"]) and get_tag(segment, TAG["n_voxels"]) == "0",
        "color": tuple(segment.GetColor()),
    }


def lesions(segmentation_node) -> list[dict]:
    """Lesion records of every LesionSeg segment, ordered by lesion id."""
    seg = segmentation_node.GetSegmentation()
    out = []
    for i in range(seg.GetNumberOfSegments()):
        sid = seg.GetNthSegmentID(i)
        segment = seg.GetSegment(sid)
        if segment.HasTag(TAG["lesion_id"]):
            out.append(lesion_info(segment, sid))
    return sorted(out, key=lambda d: d["lesion_id"])


def find_segment(segmentation_node, lesion_id: int):
    """(segment id, vtkSegment) of lesion ``lesion_id``; raises KeyError when absent."""
    seg = segmentation_node.GetSegmentation()
    sid = segment_id(lesion_id)
    segment = seg.GetSegment(sid)
    if segment is not None and get_tag(segment, TAG["lesion_id"]) == str(int(lesion_id)):
        return sid, segment
    for i in range(seg.GetNumberOfSegments()):  # renamed segment ids (edited scenes)
        other = seg.GetNthSegmentID(i)
        if get_tag(seg.GetSegment(other), TAG["lesion_id"]) == str(int(lesion_id)):
            return other, seg.GetSegment(other)
    raise KeyError(f"no lesion {lesion_id} in segmentation '{segmentation_node.GetName()}'")


def get_threshold(segmentation_node) -> float:
    try:
        return float(segmentation_node.GetAttribute(ATTR_THRESHOLD) or 0.0)
    except ValueError:
        return 0.0


def shown_at(lesion: dict, threshold: float) -> bool:
    """Whether a lesion shows at ``threshold``: confidence at or above it, or accepted or added by
    the reviewer (a lesion the reviewer said is there is never hidden by the model's confidence:
    raising the threshold must not drop it from the table, the counter or the exports); never
    once erased to no voxel."""
    if lesion.get("erased"):  # no voxel left: nothing to show, review or export
        return False
    return lesion["confidence"] >= float(threshold) - 1e-9 or lesion["review"] in ("accepted", "added")


def visible_lesions(segmentation_node, threshold: float | None = None) -> list[dict]:
    """Lesions shown at the threshold (the node's current one by default; see :func:`shown_at`), by lesion id."""
    thr = get_threshold(segmentation_node) if threshold is None else float(threshold)
    return [d for d in lesions(segmentation_node) if shown_at(d, thr)]


# ----------------------------------------------------------------------------- threshold
def set_threshold(segmentation_node, threshold: float, update_table: bool = True) -> int:
    """Show the lesions with confidence >= ``threshold``, hide the others; return how many show.

    Only segment visibility and table rows change; nothing is recomputed.
    """
    threshold = float(threshold)
    segmentation_node.SetAttribute(ATTR_THRESHOLD, f"{threshold:.6f}")
    display = segmentation_node.GetDisplayNode()
    shown = 0
    if display is not None:
        was = display.StartModify()
        for d in lesions(segmentation_node):
            visible = shown_at(d, threshold)
            shown += visible
            display.SetSegmentVisibility(d["segment_id"], visible)
        display.EndModify(was)
    if update_table:
        table = get_table_node(segmentation_node)
        if table is not None:
            update_table_node(table, segmentation_node)
    return shown


# ---------------------------------------------------------------------------- review order
def get_review_order(segmentation_node) -> str:
    order = segmentation_node.GetAttribute(ATTR_ORDER) or REVIEW_ORDERS[0]
    return order if order in REVIEW_ORDERS else REVIEW_ORDERS[0]


def set_review_order(segmentation_node, order: str) -> None:
    """Order of the review queue and of the table rows (see ``review.review_queue``)."""
    if order not in REVIEW_ORDERS:
        raise ValueError(f"review order must be one of {REVIEW_ORDERS}, not {order!r}")
    segmentation_node.SetAttribute(ATTR_ORDER, order)
    table = get_table_node(segmentation_node)
    if table is not None:
        update_table_node(table, segmentation_node)


def review_queue(segmentation_node) -> list[int]:
    """Ids of the visible lesions in the node's review order."""
    from .review import review_queue as order_lesions

    return order_lesions(visible_lesions(segmentation_node), get_review_order(segmentation_node), get_threshold(segmentation_node))


def review_progress(segmentation_node) -> tuple[int, int]:
    """(reviewed, total) among the visible lesions: the panel's "12 of 31 reviewed"."""
    shown = visible_lesions(segmentation_node)
    return sum(d["review"] != "unreviewed" for d in shown), len(shown)


# -------------------------------------------------------------------------------- review
def set_review(segmentation_node, lesion_id: int, decision: str, queue_position: int = 0, order: str = "",
               seconds: float = 0.0) -> dict:
    """Set a lesion's review state: tags, Slicer segment status, colour, visibility at the
    threshold (:func:`shown_at`); refresh its table row.

    ``decision``: 'accepted', 'rejected', 'unsure' or 'unreviewed'.  The queue position, order and
    seconds of the decision are kept in tags too.  Returns the lesion record.
    """
    if decision not in REVIEW_STATES:
        raise ValueError(f"review decision must be one of {REVIEW_STATES}, not {decision!r}")
    sid, segment = find_segment(segmentation_node, lesion_id)
    seg_logic = slicer.vtkSlicerSegmentationsModuleLogic
    confidence = float(get_tag(segment, TAG["confidence"], "0") or 0)
    was = segmentation_node.StartModify()
    try:
        segment.SetTag(TAG["review"], decision)
        if decision != "unreviewed" and queue_position:
            segment.SetTag(TAG["queue_position"], str(int(queue_position)))
            segment.SetTag(TAG["review_order"], order)
            segment.SetTag(TAG["review_seconds"], f"{float(seconds):.1f}")
        seg_logic.SetSegmentStatus(segment, seg_logic.GetSegmentStatusFromMachineReadableString(SLICER_STATUS[decision]))
        segment.SetColor(*status_color(decision, confidence))
    finally:
        segmentation_node.EndModify(was)
    info = lesion_info(segment, sid)
    display = segmentation_node.GetDisplayNode()
    if display is not None:  # drawn as the table lists it: an accepted lesion shows, a rejected one below the threshold hides
        display.SetSegmentVisibility(sid, shown_at(info, get_threshold(segmentation_node)))
    table = get_table_node(segmentation_node)
    if table is not None:
        update_table_node(table, segmentation_node)
    return info


def review_state(segmentation_node, lesion_id: int) -> str:
    return get_tag(find_segment(segmentation_node, lesion_id)[1], TAG["review"], "unreviewed") or "unreviewed"


def segment_status(segmentation_node, lesion_id: int) -> str:
    """Slicer's machine-readable segment status of a lesion ('completed', 'flagged', ...)."""
    seg_logic = slicer.vtkSlicerSegmentationsModuleLogic
    segment = find_segment(segmentation_node, lesion_id)[1]
    return seg_logic.GetSegmentStatusAsMachineReadableString(seg_logic.GetSegmentStatus(segment))


# ------------------------------------------------------------------------------ discovery
def lesion_segmentation_nodes(scene=None) -> list:
    """Every LesionSeg result in the scene (the result selector lists the same nodes)."""
    scene = _scene(scene)
    out = []
    for i in range(scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode")):
        node = scene.GetNthNodeByClass(i, "vtkMRMLSegmentationNode")
        if node.GetAttribute(ATTR_ROLE) == "segmentation":
            out.append(node)
    return out


def reference_volume(segmentation_node):
    return segmentation_node.GetNodeReference(slicer.vtkMRMLSegmentationNode.GetReferenceImageGeometryReferenceRole())


def remove_result_nodes(segmentation_node, scene=None) -> None:
    """Remove a LesionSeg segmentation node, its table and its patches."""
    scene = scene or segmentation_node.GetScene() or _scene()
    for role in (REF_TABLE, REF_PATCHES):
        other = segmentation_node.GetNodeReference(role)
        if other is not None:
            scene.RemoveNode(other)
    scene.RemoveNode(segmentation_node)


# the lesion table (.table) and navigation (.navigation) use this module; imported last, re-exported here
from .table import TABLE_COLUMNS, create_table_node, ensure_table_node, get_table_node, table_rows, update_table_node  # noqa: E402,F401
from .navigation import jump_slices_to, jump_to_lesion, lesion_center_ras, neighbour_lesion  # noqa: E402,F401

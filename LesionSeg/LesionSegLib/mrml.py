"""MRML side of the LesionSeg module: volumes, lesion segments, the lesion table, review state.

Everything here works on a ``vtkMRMLScene`` through ``slicer`` (MRML, VTK) and imports no Qt,
so it runs headless: in Slicer, in ``PythonSlicer`` and on the PyPI ``slicer-core`` wheel.

Conventions
-----------
* Slicer works in RAS, files and the engine in LPS: ``LPS = diag(-1, -1, 1) @ RAS``.  Voxel
  arrays are (k, j, i) = (z, y, x) in both ``slicer.util.arrayFromVolume`` and SimpleITK.
* One segmentation node per run.  Segment ``lesion_<k>`` holds lesion ``k`` (ids 1..n in
  order of decreasing confidence); all segments share one labelmap layer whose value ``k`` is
  lesion ``k``.  The node's reference geometry is the input volume.
* Per-lesion data lives in segment tags (``LesionSeg.*``, see :data:`TAG`), so it survives
  scene save/load and ``.seg.nrrd`` export; the review state is both the ``LesionSeg.Review``
  tag and Slicer's own segment status (``Segmentation.Status``: completed = accepted,
  flagged = rejected, inprogress = unsure, notstarted = unreviewed).
* The lesion table (``vtkMRMLTableNode``) lists the lesions at or above the current confidence
  threshold; the threshold only toggles segment visibility and table rows, nothing is
  recomputed.
"""
from __future__ import annotations

import json

import numpy as np
import slicer
import vtk

from .engine.segment.colors import ACCEPTED_COLOR, CONFIDENCE_STOPS, REJECTED_COLOR, confidence_color, status_color

#: Segment tag names.
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
}
#: Node attributes of a LesionSeg segmentation node.
ATTR_THRESHOLD = "LesionSeg.Threshold"
ATTR_MODEL = "LesionSeg.Model"
ATTR_CASE_HASH = "LesionSeg.CaseHash"
ATTR_CASE_NAME = "LesionSeg.CaseName"
ATTR_DEVICE = "LesionSeg.Device"
ATTR_ROLE = "LesionSeg.Role"  # "segmentation" / "table"
#: Node reference roles (segmentation -> table, table -> segmentation).
REF_TABLE = "LesionSegTable"
REF_SEGMENTATION = "LesionSegSegmentation"

REVIEW_STATES = ("unreviewed", "accepted", "rejected", "unsure")
#: review state -> Slicer segment status (machine-readable value of ``Segmentation.Status``)
SLICER_STATUS = {"accepted": "completed", "rejected": "flagged", "unsure": "inprogress", "unreviewed": "notstarted"}

#: Lesion table columns: (name, vtk array class, value getter from a lesion info dict)
TABLE_COLUMNS = (
    ("ID", "vtkIntArray", lambda d: d["lesion_id"], "lesion id (segment lesion_<id>)"),
    ("Confidence", "vtkDoubleArray", lambda d: round(d["confidence"], 3), "TP/FP confidence, 0..1"),
    ("Volume (ml)", "vtkDoubleArray", lambda d: round(d["volume_ml"], 2), "lesion volume in millilitres"),
    ("Diameter (mm)", "vtkDoubleArray", lambda d: round(d["diameter_mm"], 1), "largest diameter in millimetres"),
    ("Mean HU", "vtkDoubleArray", lambda d: round(d["mean_hu"], 1), "mean CT value inside the lesion"),
    ("Status", "vtkStringArray", lambda d: d["review"], "review decision"),
)

#: DICOM / Slicer terminology of every lesion segment: Morphologically Abnormal Structure / Lesion.
LESION_TERMINOLOGY = (
    "Segmentation category and type - 3D Slicer General Anatomy list"
    "~SCT^49755003^Morphologically Altered Structure~SCT^52988006^Lesion~^^"
    "~Anatomic codes - DICOM master list~^^~^^"
)

_RAS_LPS = np.diag([-1.0, -1.0, 1.0])


def segment_id(lesion_id: int) -> str:
    return f"lesion_{int(lesion_id)}"


def colormap_description() -> str:
    stops = ", ".join(f"{c:.2f}: rgb({r:.2f}, {g:.2f}, {b:.2f})" for c, (r, g, b) in CONFIDENCE_STOPS)
    return (
        "Unreviewed lesions are coloured by confidence on the 'LesionSeg confidence' colormap "
        f"(matplotlib plasma, {stops}); accepted lesions are green {ACCEPTED_COLOR}, rejected lesions grey {REJECTED_COLOR}."
    )


# ------------------------------------------------------------------------------------ helpers
def _scene(scene=None):
    scene = scene or getattr(slicer, "mrmlScene", None)
    if scene is None:
        raise RuntimeError("no MRML scene: set slicer.mrmlScene or pass scene=")
    return scene


def _segmentations_logic():
    mods = getattr(slicer, "modules", None)
    seg = getattr(mods, "segmentations", None) if mods is not None else None
    if seg is not None:
        return seg.logic()
    return slicer.vtkSlicerSegmentationsModuleLogic


def _vtk_matrix(m: np.ndarray) -> vtk.vtkMatrix4x4:
    out = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            out.SetElement(r, c, float(m[r, c]))
    return out


def _np_matrix(m: vtk.vtkMatrix4x4) -> np.ndarray:
    return np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])


def get_tag(segment, name: str, default: str = "") -> str:
    value = vtk.reference("")
    if segment.GetTag(name, value):
        return str(value)
    return default


# ------------------------------------------------------------------------- volumes <-> ITK
def ijk_to_ras(volume_node) -> np.ndarray:
    m = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(m)
    return _np_matrix(m)


def volume_geometry_lps(volume_node) -> tuple[tuple, tuple, tuple]:
    """(spacing, origin, direction) of ``volume_node`` in LPS, as SimpleITK wants them."""
    m = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASDirectionMatrix(m)  # columns: unit RAS directions of i, j, k
    direction = _RAS_LPS @ _np_matrix(m)[:3, :3]
    origin = _RAS_LPS @ np.asarray(volume_node.GetOrigin(), dtype=float)
    spacing = tuple(float(s) for s in volume_node.GetSpacing())
    return spacing, tuple(float(v) for v in origin), tuple(float(v) for v in direction.ravel())


def volume_to_sitk(volume_node):
    """The voxels and geometry of a scalar volume node as a SimpleITK image (LPS).

    The node's own IJK-to-RAS geometry is used; a parent transform is not applied (the result
    nodes are placed under the same transform, so they line up with the volume).
    """
    import SimpleITK as sitk

    if volume_node is None or volume_node.GetImageData() is None:
        raise ValueError("the input volume has no image data")
    if volume_node.GetImageData().GetNumberOfScalarComponents() != 1:
        raise ValueError(f"volume '{volume_node.GetName()}' has several components per voxel; a single-channel CT is required")
    arr = slicer.util.arrayFromVolume(volume_node)
    image = sitk.GetImageFromArray(np.ascontiguousarray(arr))  # copies
    spacing, origin, direction = volume_geometry_lps(volume_node)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(direction)
    return image


def set_volume_geometry_from_sitk(volume_node, image) -> None:
    """Copy a SimpleITK image's geometry (LPS) onto a volume node (RAS)."""
    d = np.eye(4)
    d[:3, :3] = _RAS_LPS @ np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)
    volume_node.SetIJKToRASDirectionMatrix(_vtk_matrix(d))
    volume_node.SetOrigin(*(_RAS_LPS @ np.asarray(image.GetOrigin(), dtype=float)))
    volume_node.SetSpacing(*image.GetSpacing())


def volume_from_sitk(image, name: str, labelmap: bool = False, scene=None):
    """A new scalar (or labelmap) volume node holding ``image``'s voxels and geometry."""
    import SimpleITK as sitk

    scene = _scene(scene)
    cls = "vtkMRMLLabelMapVolumeNode" if labelmap else "vtkMRMLScalarVolumeNode"
    node = scene.AddNewNodeByClass(cls, name)
    slicer.util.updateVolumeFromArray(node, sitk.GetArrayFromImage(image))
    set_volume_geometry_from_sitk(node, image)
    node.CreateDefaultDisplayNodes()
    return node


def load_volume(path: str, name: str | None = None, scene=None):
    """Load an image file (or the series of a DICOM file) as a scalar volume node.

    Uses the Volumes module logic (``slicer.modules.volumes.logic()``), which exists in Slicer
    and in the headless test application.
    """
    import os

    logic = slicer.modules.volumes.logic()
    if name is None:
        base = os.path.basename(str(path))
        for suffix in (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd", ".dcm"):
            if base.lower().endswith(suffix):
                base = base[: -len(suffix)]
        name = base
    node = logic.AddArchetypeScalarVolume(str(path), name, 0, None)
    if node is None:
        raise RuntimeError(f"cannot load volume {path}")
    node.CreateDefaultDisplayNodes()
    return node


# ---------------------------------------------------------------------- result -> segments
def lesion_tags(lesion, model_id: str, review: str = "unreviewed", case_hash: str = "") -> dict[str, str]:
    """Every ``LesionSeg.*`` tag of a lesion segment."""
    x, y, z = lesion.centroid_lps
    (i0, j0, k0), (i1, j1, k1) = lesion.bbox_ijk
    tags = {
        TAG["confidence"]: f"{lesion.confidence:.6f}",
        TAG["lesion_id"]: str(int(lesion.lesion_id)),
        TAG["model"]: model_id,
        TAG["review"]: review,
        TAG["volume_ml"]: f"{lesion.volume_ml:.4f}",
        TAG["diameter_mm"]: f"{lesion.diameter_mm:.2f}",
        TAG["mean_hu"]: f"{lesion.mean_hu:.2f}",
        TAG["n_voxels"]: str(int(lesion.n_voxels)),
        TAG["centroid_lps"]: f"{x:.3f},{y:.3f},{z:.3f}",
        TAG["mean_probability"]: f"{lesion.mean_probability:.6f}",
        TAG["max_probability"]: f"{lesion.max_probability:.6f}",
        TAG["bbox_ijk"]: f"{i0},{j0},{k0},{i1},{j1},{k1}",
    }
    if lesion.features:
        tags[TAG["features"]] = json.dumps({k: round(float(v), 6) for k, v in lesion.features.items()}, sort_keys=True)
    if case_hash:
        tags[TAG["case_hash"]] = case_hash
    return tags


def _oriented_labelmap(labelmap: np.ndarray, volume_node):
    """A vtkOrientedImageData holding ``labelmap`` (k, j, i) on the volume's voxel grid."""
    from vtkmodules.util import numpy_support

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


def create_segmentation_node(volume_node, result, case_hash: str = "", name: str | None = None, threshold: float | None = None, scene=None):
    """One segmentation node with one segment per lesion of an engine ``SegmentationResult``.

    ``result.labelmap`` must be on ``volume_node``'s voxel grid.  Segments below ``threshold``
    (default: the result's threshold) are created but hidden.
    """
    scene = _scene(scene)
    shape = tuple(int(v) for v in reversed(volume_node.GetImageData().GetDimensions()))
    if tuple(result.labelmap.shape) != shape:
        raise ValueError(f"result labelmap shape {result.labelmap.shape} does not match the volume's voxel grid {shape}")
    seg_logic = slicer.vtkSlicerSegmentationsModuleLogic
    name = name or scene.GenerateUniqueName(f"{volume_node.GetName()} lesions")
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
    try:
        node.SetAttribute(ATTR_ROLE, "segmentation")
        node.SetAttribute(ATTR_MODEL, result.model_id)
        node.SetAttribute(ATTR_CASE_HASH, case_hash)
        node.SetAttribute(ATTR_CASE_NAME, volume_node.GetName())
        node.SetAttribute(ATTR_DEVICE, str(result.device))
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
                seg.SetTag(slicer.vtkSegment.GetTerminologyEntryTagName(), LESION_TERMINOLOGY)
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
        set_threshold(node, result.threshold if threshold is None else threshold, update_table=False)
    except Exception:
        scene.RemoveNode(node)
        raise
    return node


# --------------------------------------------------------------------------- lesion records
def lesion_info(segment, segment_id_: str = "") -> dict:
    """Lesion record of one segment, from its tags."""
    def f(key, default=0.0):
        try:
            return float(get_tag(segment, TAG[key], str(default)))
        except ValueError:
            return default

    centroid = tuple(float(v) for v in get_tag(segment, TAG["centroid_lps"], "0,0,0").split(","))
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
        "centroid_lps": centroid if len(centroid) == 3 else (0.0, 0.0, 0.0),
        "bbox_ijk": (tuple(bbox[:3]), tuple(bbox[3:])) if len(bbox) == 6 else ((0, 0, 0), (0, 0, 0)),
        "features": json.loads(feats) if feats else {},
        "model_id": get_tag(segment, TAG["model"], ""),
        "case_hash": get_tag(segment, TAG["case_hash"], ""),
        "review": review,
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


def visible_lesions(segmentation_node, threshold: float | None = None) -> list[dict]:
    """Lesions at or above the threshold (the node's current one by default), by lesion id."""
    thr = get_threshold(segmentation_node) if threshold is None else float(threshold)
    return [d for d in lesions(segmentation_node) if d["confidence"] >= thr - 1e-9]


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
            visible = d["confidence"] >= threshold - 1e-9
            shown += visible
            display.SetSegmentVisibility(d["segment_id"], visible)
        display.EndModify(was)
    if update_table:
        table = get_table_node(segmentation_node)
        if table is not None:
            update_table_node(table, segmentation_node)
    return shown


# --------------------------------------------------------------------------------- table
def get_table_node(segmentation_node):
    return segmentation_node.GetNodeReference(REF_TABLE)


def create_table_node(segmentation_node, name: str | None = None, scene=None):
    """The lesion table of a segmentation node (columns: :data:`TABLE_COLUMNS`)."""
    scene = _scene(scene)
    table = scene.AddNewNodeByClass("vtkMRMLTableNode", name or f"{segmentation_node.GetName()} table")
    try:
        table.SetAttribute(ATTR_ROLE, "table")
        if hasattr(table, "SetUseColumnTitleAsColumnHeader"):  # Slicer >= 5.4
            table.SetUseColumnTitleAsColumnHeader(True)
        else:
            table.SetUseColumnNameAsColumnHeader(True)
        for col_name, cls, _, description in TABLE_COLUMNS:
            arr = getattr(vtk, cls)()
            arr.SetName(col_name)
            table.AddColumn(arr)
            table.SetColumnDescription(col_name, description)
            if hasattr(table, "SetColumnTitle"):
                table.SetColumnTitle(col_name, col_name)
        table.SetColumnUnitLabel("Volume (ml)", "ml")
        table.SetColumnUnitLabel("Diameter (mm)", "mm")
        table.SetColumnUnitLabel("Mean HU", "HU")
        table.SetLocked(True)
        table.SetNodeReferenceID(REF_SEGMENTATION, segmentation_node.GetID())
        segmentation_node.SetNodeReferenceID(REF_TABLE, table.GetID())
        update_table_node(table, segmentation_node)
    except Exception:
        scene.RemoveNode(table)
        raise
    return table


def update_table_node(table_node, segmentation_node) -> None:
    """Refill the table with the visible lesions (one row each, by decreasing confidence)."""
    rows = sorted(visible_lesions(segmentation_node), key=lambda d: (-d["confidence"], d["lesion_id"]))
    vtable = table_node.GetTable()
    was = table_node.StartModify()
    vtable.SetNumberOfRows(len(rows))
    for c, (col_name, cls, getter, _) in enumerate(TABLE_COLUMNS):
        arr = vtable.GetColumnByName(col_name)
        arr.SetNumberOfTuples(len(rows))
        for r, d in enumerate(rows):
            arr.SetValue(r, getter(d))
        arr.Modified()
    vtable.Modified()
    table_node.Modified()
    table_node.EndModify(was)


def table_rows(table_node) -> list[dict]:
    """The table's content as dicts (column name -> value), in row order."""
    vtable = table_node.GetTable()
    out = []
    for r in range(vtable.GetNumberOfRows()):
        row = {}
        for c in range(vtable.GetNumberOfColumns()):
            arr = vtable.GetColumn(c)
            v = arr.GetValue(r)
            row[arr.GetName()] = v
        out.append(row)
    return out


# -------------------------------------------------------------------------------- review
def set_review(segmentation_node, lesion_id: int, decision: str) -> dict:
    """Set a lesion's review state: tag, Slicer segment status, colour; refresh the table row.

    ``decision``: 'accepted', 'rejected', 'unsure' or 'unreviewed'.  Returns the lesion record.
    """
    if decision not in REVIEW_STATES:
        raise ValueError(f"review decision must be one of {REVIEW_STATES}, not {decision!r}")
    sid, segment = find_segment(segmentation_node, lesion_id)
    seg_logic = slicer.vtkSlicerSegmentationsModuleLogic
    confidence = float(get_tag(segment, TAG["confidence"], "0") or 0)
    was = segmentation_node.StartModify()
    try:
        segment.SetTag(TAG["review"], decision)
        seg_logic.SetSegmentStatus(segment, seg_logic.GetSegmentStatusFromMachineReadableString(SLICER_STATUS[decision]))
        segment.SetColor(*status_color(decision, confidence))
    finally:
        segmentation_node.EndModify(was)
    table = get_table_node(segmentation_node)
    if table is not None:
        _update_status_cell(table, lesion_id, decision)
    return lesion_info(segment, sid)


def _update_status_cell(table_node, lesion_id: int, decision: str) -> None:
    vtable = table_node.GetTable()
    ids = vtable.GetColumnByName("ID")
    status = vtable.GetColumnByName("Status")
    for r in range(vtable.GetNumberOfRows()):
        if int(ids.GetValue(r)) == int(lesion_id):
            status.SetValue(r, decision)
            status.Modified()
            vtable.Modified()
            table_node.Modified()
            return


def review_state(segmentation_node, lesion_id: int) -> str:
    return get_tag(find_segment(segmentation_node, lesion_id)[1], TAG["review"], "unreviewed") or "unreviewed"


def segment_status(segmentation_node, lesion_id: int) -> str:
    """Slicer's machine-readable segment status of a lesion ('completed', 'flagged', ...)."""
    seg_logic = slicer.vtkSlicerSegmentationsModuleLogic
    segment = find_segment(segmentation_node, lesion_id)[1]
    return seg_logic.GetSegmentStatusAsMachineReadableString(seg_logic.GetSegmentStatus(segment))


# ------------------------------------------------------------------------------ navigation
def lesion_center_ras(segmentation_node, lesion_id: int) -> tuple[float, float, float]:
    """World RAS position of a lesion's centroid (parent transforms applied)."""
    sid, segment = find_segment(segmentation_node, lesion_id)
    if segment.HasTag(TAG["centroid_lps"]):
        x, y, z = (float(v) for v in get_tag(segment, TAG["centroid_lps"]).split(","))
        ras = [-x, -y, z]
    else:  # segments without engine tags: Slicer's own estimate
        ras = list(segmentation_node.GetSegmentCenterRAS(sid))
    parent = segmentation_node.GetParentTransformNode()
    if parent is not None:
        transform = vtk.vtkGeneralTransform()
        parent.GetTransformToWorld(transform)
        ras = list(transform.TransformPoint(ras))
    return (float(ras[0]), float(ras[1]), float(ras[2]))


def jump_slices_to(ras, scene=None, view_group: int = -1) -> None:
    """Centre every slice view on ``ras``: the Markups module's jump in Slicer, else MRML's."""
    scene = _scene(scene)
    x, y, z = (float(v) for v in ras)
    markups = getattr(getattr(slicer, "modules", None), "markups", None)
    if markups is not None and hasattr(markups, "logic"):
        markups.logic().JumpSlicesToLocation(x, y, z, True, view_group)
        return
    slicer.vtkMRMLSliceNode.JumpAllSlices(scene, x, y, z, slicer.vtkMRMLSliceNode.CenteredJumpSlice, view_group, None)


def jump_to_lesion(segmentation_node, lesion_id: int, scene=None) -> tuple[float, float, float]:
    ras = lesion_center_ras(segmentation_node, lesion_id)
    jump_slices_to(ras, scene or segmentation_node.GetScene())
    return ras


def neighbour_lesion(order: list[int], current: int | None, step: int) -> int | None:
    """The lesion ``step`` places after ``current`` in ``order`` (wraps around)."""
    if not order:
        return None
    if current not in order:
        return order[0] if step >= 0 else order[-1]
    return order[(order.index(current) + step) % len(order)]


# ------------------------------------------------------------------------------ discovery
def lesion_segmentation_nodes(scene=None) -> list:
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
    """Remove a LesionSeg segmentation node and its table."""
    scene = _scene(scene)
    table = get_table_node(segmentation_node)
    if table is not None:
        scene.RemoveNode(table)
    scene.RemoveNode(segmentation_node)

"""Navigation between lesions: centroid positions, jumping the slice views, stepping a queue.

No Qt here.
"""
from __future__ import annotations

import slicer
import vtk

from .volumes import _scene


def lesion_center_ras(segmentation_node, lesion_id: int) -> tuple[float, float, float]:
    """World RAS position of a lesion's centroid (parent transforms applied)."""
    sid, segment = mrml.find_segment(segmentation_node, lesion_id)
    if segment.HasTag(mrml.TAG["centroid_lps"]):
        x, y, z = (float(v) for v in mrml.get_tag(segment, mrml.TAG["centroid_lps"]).split(","))
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


from . import mrml  # noqa: E402 (imported last: mrml re-exports this module's names at its end)

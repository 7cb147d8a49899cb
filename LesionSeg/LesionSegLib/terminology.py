"""Terminology and study placement of LesionSeg results (MRML, no Qt).

* Each lesion segment carries a standard terminology entry: SNOMED CT category *Morphologically
  Altered Structure* (49755003), type *Mass* (4147007) from Slicer's General Anatomy list, and the
  anatomic region when the model card names one (``anatomic_region``).  Slicer's Segment Editor
  shows it, and the DICOM SEG export (:mod:`.export`) takes its codes from it.
* A result's nodes sit under the input volume's study in the subject hierarchy (:func:`place_beside`).
"""
from __future__ import annotations

import slicer
import vtk

from .engine.io.dicom_seg import LESION_CATEGORY, LESION_TYPE  # noqa: F401 (re-exported: the DICOM SEG codes)

#: Terminology of every lesion segment (coding scheme, code value, code meaning).
TERMINOLOGY_CONTEXT = "Segmentation category and type - 3D Slicer General Anatomy list"
REGION_CONTEXT = "Anatomic codes - DICOM master list"


# ------------------------------------------------------------------------------ terminology
def _code(code) -> str:
    return "^".join(code) if code else "^^"


def terminology_entry(region: tuple | None = None) -> str:
    """Slicer's serialised terminology entry of a lesion segment (``region``: scheme, value, meaning)."""
    return "~".join([TERMINOLOGY_CONTEXT, _code(LESION_CATEGORY), _code(LESION_TYPE), "^^", REGION_CONTEXT, _code(region), "^^"])


def anatomic_region(card_data: dict | None) -> tuple | None:
    """The model card's optional ``anatomic_region`` ({"scheme", "code", "meaning"}) as a code triple."""
    region = (card_data or {}).get("anatomic_region")
    if isinstance(region, dict) and all(region.get(k) for k in ("scheme", "code", "meaning")):
        return (str(region["scheme"]), str(region["code"]), str(region["meaning"]))
    return None


def terminology_codes(segment) -> dict:
    """{"category", "type", "region"} code triples (or None) of a segment's terminology tag."""
    value = vtk.reference("")
    entry = str(value) if segment.GetTag(slicer.vtkSegment.GetTerminologyEntryTagName(), value) else ""
    parts = entry.split("~")
    codes = {}
    for key, index in (("category", 1), ("type", 2), ("region", 5)):
        fields = parts[index].split("^") if len(parts) > index else []
        codes[key] = tuple(fields) if len(fields) == 3 and all(fields) else None
    return codes


# --------------------------------------------------------------------------- study placement
def place_beside(node, volume_node) -> None:
    """Put ``node`` under the same subject hierarchy parent (the study) as ``volume_node``."""
    scene = volume_node.GetScene()
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene) if scene is not None else None
    if sh is None:
        return
    volume_item = sh.GetItemByDataNode(volume_node)
    if not volume_item:
        return
    parent = sh.GetItemParent(volume_item)
    item = sh.GetItemByDataNode(node)
    if not item:  # Slicer's subject hierarchy plugins create items for new nodes; without them, make one
        sh.CreateItem(parent, node)
    elif parent != sh.GetItemParent(item):
        sh.SetItemParent(item, parent)

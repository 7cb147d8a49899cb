"""The lesion table of a LesionSeg result: one ``vtkMRMLTableNode`` row per visible lesion, in
the result's review order (``mrml.review_queue``).

The table is derived data: it is rebuilt from the segments' tags whenever the threshold, the
order or a decision changes, and when a saved scene is reopened.  No Qt here.
"""
from __future__ import annotations

import vtk

from .volumes import _scene

#: Lesion table columns: (name, vtk array class, value getter from a lesion info dict, description)
TABLE_COLUMNS = (
    ("ID", "vtkIntArray", lambda d: d["lesion_id"], "lesion id (segment lesion_<id>)"),
    ("Confidence", "vtkDoubleArray", lambda d: round(d["confidence"], 3), "TP/FP confidence, 0..1"),
    ("Volume (ml)", "vtkDoubleArray", lambda d: round(d["volume_ml"], 2), "lesion volume in millilitres"),
    ("Diameter (mm)", "vtkDoubleArray", lambda d: round(d["diameter_mm"], 1), "largest diameter in millimetres"),
    ("Mean HU", "vtkDoubleArray", lambda d: round(d["mean_hu"], 1), "mean CT value inside the lesion"),
    ("Status", "vtkStringArray", lambda d: d["review"], "review decision"),
)
UNITS = {"Volume (ml)": "ml", "Diameter (mm)": "mm", "Mean HU": "HU"}


def get_table_node(segmentation_node):
    return segmentation_node.GetNodeReference(mrml.REF_TABLE)


def create_table_node(segmentation_node, name: str | None = None, scene=None):
    """The lesion table of a segmentation node (columns: :data:`TABLE_COLUMNS`), beside it in the study."""
    scene = _scene(scene)
    table = mrml._new_node(scene, "vtkMRMLTableNode", name or f"{segmentation_node.GetName()} table", "table")
    try:
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
            if col_name in UNITS:
                table.SetColumnUnitLabel(col_name, UNITS[col_name])
        table.SetLocked(True)
        table.SetNodeReferenceID(mrml.REF_SEGMENTATION, segmentation_node.GetID())
        segmentation_node.SetNodeReferenceID(mrml.REF_TABLE, table.GetID())
        update_table_node(table, segmentation_node)
        volume = mrml.reference_volume(segmentation_node)
        if volume is not None:
            mrml.place_beside(table, volume)
    except Exception:
        scene.RemoveNode(table)
        raise
    return table


def ensure_table_node(segmentation_node):
    """The result's table, rebuilt from the segment tags (created when the scene lost it)."""
    table = get_table_node(segmentation_node)
    if table is None or table.GetTable().GetColumnByName("ID") is None:
        if table is not None:
            segmentation_node.GetScene().RemoveNode(table)
        return create_table_node(segmentation_node, scene=segmentation_node.GetScene())
    update_table_node(table, segmentation_node)
    return table


def update_table_node(table_node, segmentation_node) -> None:
    """Refill the table with the visible lesions, one row each, in the review order."""
    records = {d["lesion_id"]: d for d in mrml.visible_lesions(segmentation_node)}
    rows = [records[i] for i in mrml.review_queue(segmentation_node)]
    vtable = table_node.GetTable()
    was = table_node.StartModify()
    vtable.SetNumberOfRows(len(rows))
    for col_name, _, getter, _ in TABLE_COLUMNS:
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
        out.append({vtable.GetColumn(c).GetName(): vtable.GetColumn(c).GetValue(r) for c in range(vtable.GetNumberOfColumns())})
    return out


from . import mrml  # noqa: E402 (imported last: mrml imports this module's names at its end)

"""Keeps the LesionSeg panel in step with the scene and its parameter node (the widget side: it
drives the widget's Qt controls; the MRML work is in :mod:`.mrml` and :mod:`.logic`).

* The input volume and the result shown belong together: choosing another input volume shows its
  newest result (or none), and showing a result selects its scan as the input, so Accept and
  Reject never act on a result of another scan than the one chosen.
* The threshold and the review order go to the result; a current lesion that the threshold hides
  is deselected (Accept would otherwise act on a lesion neither listed nor drawn).
* A result whose table node was deleted gets its table rebuilt from the segments' tags.
* A result whose scan was removed from the scene can still be reviewed and its CSV exported, but
  what needs the scan (the labelmap exports, Save corrections, Add lesion) is disabled, and the
  status line says why.
* An export that would replace files already in the folder (exports are named after the scan, so
  two results of one scan share names) asks first.
"""
from __future__ import annotations

import slicer
from slicer.i18n import tr as _

from . import mrml, ood

#: panel buttons that need the result's scan (voxels and geometry)
NEEDS_VOLUME = ("exportSegNrrdButton", "exportNiftiButton", "exportAllButton", "exportDicomSegButton",
                "saveCorrectionsButton", "addLesionButton")


def follow_parameters(widget) -> None:
    """``onParameterNodeModified``: the input volume, the result, its threshold and order."""
    p = widget._parameterNode
    volume = p.inputVolume
    if volume is not getattr(widget, "_followedInput", None):
        widget._followedInput = volume
        result = p.resultSegmentation
        if volume is not None and (result is None or mrml.reference_volume(result) is not volume):
            mine = [n for n in mrml.lesion_segmentation_nodes() if mrml.reference_volume(n) is volume]
            if (mine[-1] if mine else None) is not result:
                p.resultSegmentation = mine[-1] if mine else None
                return  # the change comes back through the parameter node's modified event
    if p.resultSegmentation is not widget.segmentationNode:
        widget.setSegmentationNode(p.resultSegmentation)
    elif widget.segmentationNode is not None:
        node = widget.segmentationNode
        if abs(mrml.get_threshold(node) - p.threshold) > 1e-9:
            widget.logic.set_threshold(node, p.threshold)
        if mrml.get_review_order(node) != p.reviewOrder:
            widget.logic.set_review_order(node, p.reviewOrder)
        if widget.currentLesion is not None and widget.currentLesion not in widget.tableOrder():
            widget.currentLesion = None
            widget.ui.currentLesionLabel.setText(_("No lesion selected: the threshold hides the lesion that was selected."))


def show_result_parameters(widget, node) -> None:
    """``setSegmentationNode``: the panel follows the result's own threshold, order, OOD warning
    and scan (the input volume selector shows the scan the result was made from)."""
    p = widget._parameterNode
    if p is None or node is None:
        return
    volume = mrml.reference_volume(node)
    was = p.StartModify()
    p.threshold = mrml.get_threshold(node)
    p.reviewOrder = mrml.get_review_order(node)
    p.oodWarning = ood.warning(node)
    if volume is not None and p.inputVolume is not volume:
        widget._followedInput = volume
        p.inputVolume = volume
    p.EndModify(was)


def ensure_table(widget) -> None:
    """The shown result's table, rebuilt (and shown in the panel) when its node was deleted."""
    node = widget.segmentationNode
    if node is not None and mrml.get_table_node(node) is None:
        widget.ui.lesionTableView.setMRMLTableNode(widget.logic.reopen(node))


def volume_missing(widget) -> bool:
    """Whether the shown result's scan was removed from the scene; then :data:`NEEDS_VOLUME` are
    disabled and their tooltips say why (their own tooltips come back with the scan)."""
    node = widget.segmentationNode
    missing = node is not None and slicer.mrmlScene.IsNodePresent(node) and mrml.reference_volume(node) is None
    tips = widget.__dict__.setdefault("_ownToolTips", {name: getattr(widget.ui, name).property("toolTip") or ""
                                                          for name in NEEDS_VOLUME})
    for name in NEEDS_VOLUME:
        button = getattr(widget.ui, name)
        if missing:
            button.setEnabled(False)
        button.setToolTip(scan_removed_text() if missing else tips[name])
    return missing


def scan_removed_text() -> str:
    return _("The scan of this result was removed from the scene: load it again to export labelmaps, "
             "save corrections or add lesions (the CSV export and the review still work).")


def confirm_replace(widget, outdir: str, formats) -> bool:
    """Before an export: when it would replace files already in ``outdir`` (an earlier export, or
    another result of the same scan, which is named the same), ask first; True to go on."""
    from . import export

    existing = export.existing_outputs(widget.segmentationNode, outdir, formats)
    if not existing:
        return True
    files = ", ".join(p.name for p in existing)
    if slicer.util.confirmOkCancelDisplay(_("{files} already in {folder} (an earlier export, or another result of this scan) "
                                            "will be replaced. Replace them?").format(files=files, folder=outdir),
                                          windowTitle=_("LesionSeg: export")):
        return True
    widget.ui.statusLabel.setText(_("Export cancelled: nothing was replaced."))
    return False


def export_text(paths: dict, outdir: str, notes=()) -> str:
    """The status line after an export: the files, where, and what a format could not hold."""
    import os

    names = sorted({os.path.basename(str(p)) for p in paths.values()})
    text = _("Exported {files} to {folder}").format(files=", ".join(names), folder=outdir)
    if "dicom_database" in paths:
        text += " " + _("(DICOM SEG added to the DICOM database)")
    return text + "".join(". " + _("Note: {note}").format(note=n) for n in notes)

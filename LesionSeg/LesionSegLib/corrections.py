"""Harvest a reviewer's corrections from a LesionSeg result into the feedback store (MRML, no Qt).

1. :func:`remember_proposals` (right after a result is created) keeps the proposals as the model
   made them: a hidden labelmap volume (voxel = lesion id, every lesion, hidden ones included)
   referenced from the segmentation node, saved with the scene.
2. :func:`diff` compares the segmentation as the reviewer left it with those proposals:

   * a proposal segment whose mask changed (Segment Editor: paint, erase, islands, smoothing)
     is **edited**; its current mask is the correction;
   * a segment that no proposal had (painted by hand, or from the click tool) is **added**, unless
     the reviewer rejected it (then it is left out: no lesion, and no proposal to call false);
   * a proposal segment that was removed, emptied, or rejected is **deleted**; its proposed mask
     is kept (a false positive);
   * a shown proposal left as it was is **kept** (so the case's whole label is known).
     Proposals below the display threshold that were never reviewed nor edited are left out.

3. :func:`save_corrections` puts them on the model grid (:mod:`.engine.feedback.grid`) and saves
   them with the image into the feedback store (replacing what was saved for this case before).
   The widget calls it on **Save corrections**, and :func:`save_on_close` on scene close, after
   the confirmation callback it passes says yes.
"""
from __future__ import annotations

import hashlib
import json

import numpy as np
import slicer

from . import mrml, volumes

PROPOSALS_ROLE = "LesionSeg.Proposals"
ATTR_PROPOSALS = "LesionSeg.ProposalInfo"
ATTR_SAVED = "LesionSeg.CorrectionsSaved"  # digest of the state last saved


def proposals_node(segmentation_node):
    return segmentation_node.GetNodeReference(PROPOSALS_ROLE)


def remember_proposals(segmentation_node):
    """Keep the model's proposals (once per result); returns the hidden labelmap volume node."""
    from .export import instance_labelmap

    node = proposals_node(segmentation_node)
    if node is not None:
        return node
    info = {str(d["lesion_id"]): {"key": _key(d), "confidence": d["confidence"]} for d in mrml.lesions(segmentation_node)}
    arr = instance_labelmap(segmentation_node, [int(k) for k in info])
    scene = segmentation_node.GetScene()
    volume = mrml.reference_volume(segmentation_node)
    node = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", scene.GenerateUniqueName(f"{segmentation_node.GetName()} proposals"))
    node.SetHideFromEditors(True)
    node.SetAttribute(ATTR_PROPOSALS, json.dumps(info))
    node.SetIJKToRASMatrix(volumes._vtk_matrix(mrml.ijk_to_ras(volume)))
    slicer.util.updateVolumeFromArray(node, arr.astype(np.uint16))
    segmentation_node.SetNodeReferenceID(PROPOSALS_ROLE, node.GetID())
    return node


def proposal_ids(segmentation_node) -> list[int]:
    """The lesion ids of the model's proposals for this result (removed ones included)."""
    node = proposals_node(segmentation_node)
    try:
        return [int(k) for k in json.loads(node.GetAttribute(ATTR_PROPOSALS) or "{}")] if node is not None else []
    except (ValueError, TypeError):
        return []


def _key(d: dict) -> str:
    from .engine.feedback.codec import lesion_key

    return lesion_key(d["key_centroid_lps"], d["lesion_id"])


def _segment_mask(segmentation_node, segment_id: str, volume) -> np.ndarray:
    return slicer.util.arrayFromSegmentBinaryLabelmap(segmentation_node, segment_id, volume) > 0


def diff(segmentation_node) -> list[dict]:
    """The reviewer's corrections, on the reference volume's grid: dicts with ``kind``, ``mask``
    (k, j, i bool), ``lesion_id``, ``key`` and ``confidence`` (of the proposal; None for added)."""
    prop = proposals_node(segmentation_node)
    if prop is None:
        raise RuntimeError(f"'{segmentation_node.GetName()}' has no remembered proposals; call remember_proposals() when the result is created")
    volume = mrml.reference_volume(segmentation_node)
    before = slicer.util.arrayFromVolume(prop)
    info = json.loads(prop.GetAttribute(ATTR_PROPOSALS) or "{}")
    threshold = mrml.get_threshold(segmentation_node)
    seg = segmentation_node.GetSegmentation()
    out, present = [], set()
    for i in range(seg.GetNumberOfSegments()):
        sid = seg.GetNthSegmentID(i)
        segment = seg.GetSegment(sid)
        lid = mrml.get_tag(segment, mrml.TAG["lesion_id"], "")
        mask = _segment_mask(segmentation_node, sid, volume)
        if not lid or lid not in info:  # drawn or click-added: a lesion, unless the reviewer rejected it
            if mask.any() and mrml.get_tag(segment, mrml.TAG["review"], "") != "rejected":
                out.append({"kind": "added", "mask": mask, "lesion_id": None, "key": None, "confidence": None})
            continue
        present.add(lid)
        p = info[lid]
        old = before == int(lid)
        review = mrml.get_tag(segment, mrml.TAG["review"], "unreviewed")
        if review == "rejected" or not mask.any():
            kind, mask = "deleted", old
        elif np.array_equal(mask, old):
            if p["confidence"] < threshold and review == "unreviewed":
                continue  # never shown, never touched
            kind = "kept"
        else:
            kind = "edited"
        out.append({"kind": kind, "mask": mask, "lesion_id": int(lid), "key": p["key"], "confidence": p["confidence"]})
    for lid, p in info.items():
        if lid not in present and (before == int(lid)).any():
            out.append({"kind": "deleted", "mask": before == int(lid), "lesion_id": int(lid), "key": p["key"],
                        "confidence": p["confidence"]})
    return out


def _digest(changes: list[dict]) -> str:
    h = hashlib.sha256()
    for c in sorted(changes, key=lambda c: (c["kind"], str(c["key"]))):
        h.update(f"{c['kind']}|{c['key']}|".encode())
        h.update(np.packbits(c["mask"]).tobytes())
    return h.hexdigest()


def has_unsaved(segmentation_node) -> bool:
    """Whether the reviewer changed something since the last save (False without proposals, and
    for a result whose scan was removed from the scene: there is no image to save them with)."""
    if proposals_node(segmentation_node) is None or mrml.reference_volume(segmentation_node) is None:
        return False
    changes = diff(segmentation_node)
    if not any(c["kind"] != "kept" for c in changes):
        return False
    return _digest(changes) != segmentation_node.GetAttribute(ATTR_SAVED)


def save_corrections(segmentation_node, store, reviewer: str = "") -> dict:
    """Diff ``segmentation_node`` against its proposals and save the corrections (and the image on
    the model grid) into ``store`` (a :class:`FeedbackStore` or a path); returns the counts."""
    from .engine.feedback import FeedbackStore
    from .engine.feedback.corrections import Correction, save_case
    from .engine.feedback.grid import mask_to_model_grid, model_grid
    from .engine.models import get_card
    from .engine.segment.pipeline import case_hash

    changes = diff(segmentation_node)
    image = mrml.volume_to_sitk(mrml.reference_volume(segmentation_node))
    model_id = segmentation_node.GetAttribute(mrml.ATTR_MODEL) or ""
    try:
        spacing = get_card(model_id).part("segmenter")["spacing_zyx"]
    except Exception:  # model no longer installed: the default model grid
        spacing = [3.0, 2.0, 2.0]
    grid = model_grid(image, spacing)
    corr = []
    for c in changes:
        m = mask_to_model_grid(c["mask"], image, grid)
        if m.any():
            corr.append(Correction(c["kind"], m, c["key"], c["lesion_id"], c["confidence"]))
    h = segmentation_node.GetAttribute(mrml.ATTR_CASE_HASH) or case_hash(image)
    name = segmentation_node.GetAttribute(mrml.ATTR_CASE_NAME) or segmentation_node.GetName()
    own = not isinstance(store, FeedbackStore)
    st = FeedbackStore(store) if own else store
    try:
        counts = save_case(st, h, name, model_id, grid, corr, reviewer=reviewer)
    finally:
        if own:
            st.close()
    segmentation_node.SetAttribute(ATTR_SAVED, _digest(changes))
    return counts


def save_on_close(store, confirm, reviewer: str = "", scene=None) -> dict:
    """On scene close: the results with unsaved corrections are listed to ``confirm(names) -> bool``;
    when it says yes they are saved.  Returns ``{result name: counts}`` (empty when nothing was saved).

    The store keeps one correction set per scan and model, so of several results of one scan by
    one model only the one edited last is saved; the others are named in the question and get
    ``{"not saved": "<why>"}`` instead of counts (they used to be reported saved, then replaced).
    A result that cannot be read or saved gets ``{"not saved": "<error>", "error": True}``, and
    never costs the other results theirs; a result whose scan was removed has nothing to save."""
    pending, failed = [], {}
    for n in mrml.lesion_segmentation_nodes(scene):  # one result that cannot be read never costs the others theirs
        try:
            if has_unsaved(n):
                pending.append(n)
        except Exception as exc:  # noqa: BLE001
            failed[n.GetName()] = f"its corrections could not be read: {exc}"
    groups: dict[tuple, list] = {}
    for n in pending:
        groups.setdefault((n.GetAttribute(mrml.ATTR_CASE_HASH) or n.GetID(), n.GetAttribute(mrml.ATTR_MODEL) or ""), []).append(n)
    saved, superseded = [], {}
    for nodes in groups.values():
        last = max(nodes, key=lambda n: n.GetSegmentation().GetMTime())
        saved.append(last)
        for n in nodes:
            if n is not last:
                superseded[n.GetName()] = (f"the same scan and model as '{last.GetName()}', whose corrections are saved "
                                           "(the store keeps one set per scan and model)")
    names = [n.GetName() for n in saved] + [f"{name} (not saved: {why})" for name, why in superseded.items()]
    if not pending or not confirm(names):
        return {name: {"not saved": why, "error": True} for name, why in failed.items()}
    out = {}
    for n in saved:
        try:
            out[n.GetName()] = save_corrections(n, store, reviewer)
        except Exception as exc:  # noqa: BLE001 (the next result is still saved)
            out[n.GetName()] = {"not saved": f"saving failed: {exc}", "error": True}
    out.update({name: {"not saved": why} for name, why in superseded.items()})
    out.update({name: {"not saved": why, "error": True} for name, why in failed.items()})
    return out

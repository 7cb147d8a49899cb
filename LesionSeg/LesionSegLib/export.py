"""Export a LesionSeg segmentation: ``.seg.nrrd`` with tags, NIfTI instance labelmap, CSV, DICOM SEG.

Which lesions: the ones the clinician sees, i.e. confidence at or above the node's threshold
(``include_hidden=True`` exports every candidate).  Lesion ids are never renumbered, so the
files and the lesion table agree.  Rejected lesions stay in ``.seg.nrrd`` (status flagged, tag
``LesionSeg.Review=rejected``), in the NIfTI labelmap and in the CSV, with their status; the
DICOM SEG, a clinical object, leaves them out (``include_rejected=True`` keeps them).  Its segments
carry each segment's terminology codes (SNOMED CT category, type and anatomic region), and when
the CT came from Slicer's DICOM database the DICOM SEG is added to that database too.

Every file is written through the engine's atomic-write helper (``engine.atomic``).

No Qt; MRML through ``slicer``.  DICOM SEG needs ``highdicom`` and ``pydicom``.
"""
from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
import slicer
import vtk

from . import mrml
from .engine.atomic import atomic_file
from .engine.errors import InputError
from .engine.io.csv_cells import safe_cell
from .engine.io.images import safe_stem

CSV_COLUMNS = (
    "lesion_id", "name", "confidence", "status", "volume_ml", "diameter_mm", "mean_hu", "n_voxels",
    "centroid_x", "centroid_y", "centroid_z", "mean_probability", "max_probability", "model_id", "case_hash",
    "queue_position", "review_order", "review_seconds",
)


def _selected(segmentation_node, include_hidden: bool = False, include_rejected: bool = True) -> list[dict]:
    rows = mrml.lesions(segmentation_node) if include_hidden else mrml.visible_lesions(segmentation_node)
    if not include_rejected:
        rows = [d for d in rows if d["review"] != "rejected"]
    return rows


# ------------------------------------------------------------------------------ .seg.nrrd
def export_seg_nrrd(segmentation_node, path, include_hidden: bool = False) -> Path:
    """Write the lesion segments (names, colours, tags, status) with Slicer's segmentation storage node."""
    path = Path(path)
    keep = {d["segment_id"] for d in _selected(segmentation_node, include_hidden)}
    scene = segmentation_node.GetScene()
    source = segmentation_node.GetSegmentation()
    all_ids = [source.GetNthSegmentID(i) for i in range(source.GetNumberOfSegments())]
    tmp_node = None
    node = segmentation_node
    if set(all_ids) != keep:  # write a copy without the left-out segments
        tmp_node = slicer.vtkMRMLSegmentationNode()
        tmp_node.GetSegmentation().DeepCopy(source)
        for sid in all_ids:
            if sid not in keep:
                tmp_node.GetSegmentation().RemoveSegment(sid)
        node = tmp_node
    storage = slicer.vtkMRMLSegmentationStorageNode()
    if scene is not None:
        storage.SetScene(scene)
    storage.SetUseCompression(True)
    with atomic_file(path) as tmp:
        storage.SetFileName(tmp)
        if not storage.WriteData(node):
            raise RuntimeError(f"cannot write {path}")
    return path


# ----------------------------------------------------------------------- instance labelmap
def instance_labelmap(segmentation_node, lesion_ids=None, reference_volume=None) -> np.ndarray:
    """(k, j, i) uint16 array on the reference volume's grid; voxel value = lesion id."""
    reference_volume = reference_volume or mrml.reference_volume(segmentation_node)
    if reference_volume is None:
        raise RuntimeError("the segmentation has no reference volume")
    if lesion_ids is None:
        lesion_ids = [d["lesion_id"] for d in mrml.visible_lesions(segmentation_node)]
    shape = tuple(int(v) for v in reversed(reference_volume.GetImageData().GetDimensions()))
    out = np.zeros(shape, dtype=np.uint16)
    if not lesion_ids:
        return out
    ids = vtk.vtkStringArray()
    order = []
    for lid in lesion_ids:
        sid, _ = mrml.find_segment(segmentation_node, lid)
        ids.InsertNextValue(sid)
        order.append(int(lid))
    scene = segmentation_node.GetScene()
    existing = {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "__LesionSeg_export__")
    try:
        logic = mrml._segmentations_logic()
        if not logic.ExportSegmentsToLabelmapNode(segmentation_node, ids, labelmap, reference_volume):
            raise RuntimeError("export of the lesion segments to a labelmap failed")
        arr = slicer.util.arrayFromVolume(labelmap)  # values 1..n in the order of `ids`
        if arr.shape != shape:
            raise RuntimeError(f"exported labelmap {arr.shape} is not on the reference grid {shape}")
        lut = np.zeros(len(order) + 1, dtype=np.uint16)
        lut[1:] = order
        out[...] = lut[np.clip(arr, 0, len(order)).astype(np.intp)]
    finally:
        # remove the temporary labelmap and what the export made for it (display and colour nodes)
        made = [scene.GetNthNode(i) for i in range(scene.GetNumberOfNodes())]
        for node in made:
            if node.GetID() not in existing and node is not labelmap:
                scene.RemoveNode(node)
        scene.RemoveNode(labelmap)
    return out


def overlap_losses(segmentation_node, lesions: list[dict], labelmap: np.ndarray, volume) -> list[str]:
    """What an instance labelmap (NIfTI, DICOM SEG) could not hold: lesions that overlap others (a
    lesion drawn over a tumour) give each shared voxel to one of them, so a lesion listed with N
    voxels holds fewer there.  One "lesion k (lost of N voxels)" per such lesion."""
    counts = np.bincount(labelmap.ravel(), minlength=max([int(d["lesion_id"]) for d in lesions] + [0]) + 1)
    short = []
    for d in lesions:
        lid, held = int(d["lesion_id"]), int(counts[int(d["lesion_id"])])
        if held >= int(d.get("n_voxels") or 0):
            continue  # whole (the tag is checked against the mask only for the lesions that look short)
        whole = int(np.count_nonzero(slicer.util.arrayFromSegmentBinaryLabelmap(segmentation_node, d["segment_id"], volume)))
        if held < whole:
            short.append(f"lesion {lid} ({whole - held:,} of {whole:,} voxels)")
    return short


def overlap_note(losses: dict[str, list[str]]) -> str | None:
    """One note from :func:`overlap_losses` per format (``{"NIfTI": [...], "DICOM SEG": [...]}``)."""
    losses = {fmt: lost for fmt, lost in losses.items() if lost}
    if not losses:
        return None
    lost = sorted({x for v in losses.values() for x in v}, key=lambda x: int(x.split()[1]))
    return (f"overlapping lesions: the {' and '.join(losses)} labelmap holds one lesion per voxel, so {', '.join(lost)} "
            "went to the lesion over it there; the .seg.nrrd and the CSV keep each lesion whole")


def export_nifti(segmentation_node, path, include_hidden: bool = False, losses: list | None = None) -> Path:
    """NIfTI instance labelmap (value k = lesion k) on the input volume's exact grid; what
    overlapping lesions lose there is added to ``losses`` (:func:`overlap_losses`)."""
    import SimpleITK as sitk

    path = Path(path)
    volume = mrml.reference_volume(segmentation_node)
    lesions = _selected(segmentation_node, include_hidden)
    arr = instance_labelmap(segmentation_node, [d["lesion_id"] for d in lesions], volume)
    if losses is not None:
        losses += overlap_losses(segmentation_node, lesions, arr, volume)
    img = sitk.GetImageFromArray(arr)
    spacing, origin, direction = mrml.volume_geometry_lps(volume)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    img.SetDirection(direction)
    with atomic_file(path) as tmp:
        sitk.WriteImage(img, tmp, useCompression=True)
    return path


# ---------------------------------------------------------------------------------- CSV
def csv_rows(segmentation_node, include_hidden: bool = False) -> list[dict]:
    case_hash = segmentation_node.GetAttribute(mrml.ATTR_CASE_HASH) or ""
    out = []
    for d in sorted(_selected(segmentation_node, include_hidden), key=lambda d: d["lesion_id"]):
        x, y, z = d["centroid_lps"]
        out.append({
            "lesion_id": d["lesion_id"], "name": d["name"], "confidence": f"{d['confidence']:.6f}", "status": d["review"],
            "volume_ml": f"{d['volume_ml']:.4f}", "diameter_mm": f"{d['diameter_mm']:.2f}", "mean_hu": f"{d['mean_hu']:.2f}",
            "n_voxels": d["n_voxels"], "centroid_x": f"{x:.3f}", "centroid_y": f"{y:.3f}", "centroid_z": f"{z:.3f}",
            "mean_probability": f"{d['mean_probability']:.6f}", "max_probability": f"{d['max_probability']:.6f}",
            "model_id": d["model_id"], "case_hash": d["case_hash"] or case_hash,
            "queue_position": d["queue_position"] or "", "review_order": d["review_order"],
            "review_seconds": f"{d['review_seconds']:.1f}" if d["queue_position"] else "",
        })
    return out


def export_csv(segmentation_node, path, include_hidden: bool = False) -> Path:
    """The lesion table (plus centroid, probabilities, model and case) as CSV; centroids in LPS mm.
    Text that a spreadsheet would run as a formula (a segment named ``=HYPERLINK(...)``) is written
    with a leading apostrophe (``engine.io.csv_cells``)."""
    path = Path(path)
    with atomic_file(path) as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(CSV_COLUMNS))
            writer.writeheader()
            # a segment name is typed by the reviewer: no cell may start a spreadsheet formula (CSV injection)
            writer.writerows({k: safe_cell(v) for k, v in row.items()} for row in csv_rows(segmentation_node, include_hidden))
    return path


# ---------------------------------------------------------------------------- DICOM SEG
def _is_dicom(path: str) -> bool:
    try:
        with open(path, "rb") as fh:
            fh.seek(128)
            return fh.read(4) == b"DICM"
    except OSError:
        return False


def dicom_source_files(volume_node) -> list[str]:
    """The DICOM files a volume was loaded from, or [] when it did not come from DICOM.

    Looks at (1) the ``DICOM.instanceUIDs`` attribute that Slicer's DICOM module sets, resolved
    through ``slicer.dicomDatabase``; (2) the volume's storage node: a DICOM archetype file and
    the other files of its series in the same folder.
    """
    if volume_node is None:
        return []
    uids = (volume_node.GetAttribute("DICOM.instanceUIDs") or "").split()
    db = getattr(slicer, "dicomDatabase", None)
    if uids and db is not None:
        files = [db.fileForInstance(uid) for uid in uids]
        files = [f for f in files if f and os.path.exists(f)]
        if len(files) == len(uids):
            return files
    storage = volume_node.GetStorageNode()
    if storage is None or not storage.GetFileName():
        return []
    first = storage.GetFileName()
    if not _is_dicom(first):
        return []
    names = [storage.GetNthFileName(i) for i in range(storage.GetNumberOfFileNames())]
    candidates = [first] + [n if os.path.isabs(n) else os.path.join(os.path.dirname(first), n) for n in names]
    if len(set(candidates)) <= 1:  # archetype only: the rest of the series is in its folder
        folder = os.path.dirname(first)
        candidates = [os.path.join(folder, f) for f in sorted(os.listdir(folder))]
    import pydicom

    series = pydicom.dcmread(first, stop_before_pixels=True).SeriesInstanceUID
    files = []
    for f in dict.fromkeys(candidates):
        if os.path.isfile(f) and _is_dicom(f):
            try:
                ds = pydicom.dcmread(f, stop_before_pixels=True, specific_tags=["SeriesInstanceUID", "SOPClassUID"])
            except Exception:
                continue
            if getattr(ds, "SeriesInstanceUID", None) == series:
                files.append(f)
    return files


def export_dicom_seg(segmentation_node, path, source_files=None, include_hidden: bool = False,
                     include_rejected: bool = False, series_description: str = "LesionSeg lesions", losses: list | None = None) -> Path:
    """A DICOM Segmentation (binary, one segment per lesion) referencing the source CT series
    (built by :mod:`.engine.io.dicom_seg`, which ``lesionseg segment --dicom-seg`` uses too).

    Each segment: label ``Lesion <id> (<confidence>) <status>`` (or the reviewer's own ASCII name),
    tracking id ``LesionSeg lesion <id>``, property category / type / anatomic region from the
    segment's terminology (SNOMED CT Morphologically Altered Structure / Mass by default),
    algorithm ``LesionSeg <model name>`` version ``<model version>`` (AUTOMATIC; SEMIAUTOMATIC once
    reviewed or added by a click; MANUAL, with no algorithm, for a lesion drawn by hand), display
    colour = the segment's colour.  Lesions with no voxel (erased) are left out.  A volume that no
    longer matches its series (moved by a hardened transform, resampled, edited: its voxels differ
    from the series' pixels they map onto) is refused, since the SEG would mark other anatomy.
    """
    from .engine.io import dicom_seg

    path = Path(path)
    volume = mrml.reference_volume(segmentation_node)
    files = list(source_files) if source_files else dicom_source_files(volume)
    if not files:
        raise RuntimeError(f"volume '{volume.GetName()}' was not loaded from DICOM: no DICOM SEG can reference it")
    datasets = dicom_seg.read_series(files)
    rows = _selected(segmentation_node, include_hidden, include_rejected)
    if not rows:
        raise RuntimeError("no lesion to export (all hidden or rejected)")
    labelmap = instance_labelmap(segmentation_node, [d["lesion_id"] for d in rows], volume)
    if losses is not None:
        losses += overlap_losses(segmentation_node, rows, labelmap, volume)
    present = set(np.unique(labelmap).tolist())
    rows = [d for d in rows if d["lesion_id"] in present]  # a lesion erased in the Segment Editor holds no pixel
    if not rows:
        raise RuntimeError("no lesion to export: every exported lesion is empty (erased)")
    # the DICOM geometry describes the volume's own (untransformed) frame
    lps_to_ijk = np.linalg.inv(mrml.ijk_to_ras(volume)) @ np.diag([-1.0, -1.0, 1.0, 1.0])
    try:
        pixels = dicom_seg.frames(datasets, labelmap, lps_to_ijk, slicer.util.arrayFromVolume(volume),
                                  {d["lesion_id"]: n for n, d in enumerate(rows, start=1)}, f"volume '{volume.GetName()}'")
    except InputError as exc:
        raise RuntimeError(exc.problem) from None
    segments = []
    for d in rows:
        segment = mrml.find_segment(segmentation_node, d["lesion_id"])[1]
        drawn = mrml.get_tag(segment, "LesionSeg.Source") == "drawn"
        terms = mrml.terminology_codes(segment)
        segments.append(dicom_seg.Segment(
            value=d["lesion_id"], label=_segment_label(d, drawn), color_rgb=d["color"], region=terms["region"],
            kind="MANUAL" if drawn else "SEMIAUTOMATIC" if d["review"] in ("accepted", "rejected", "added") else "AUTOMATIC",
            category=terms["category"] or mrml.LESION_CATEGORY, type=terms["type"] or mrml.LESION_TYPE,
        ))
    model_id = segmentation_node.GetAttribute(mrml.ATTR_MODEL) or rows[0]["model_id"] or "unknown"
    seg = dicom_seg.build(datasets, pixels, segments, model_id, series_description, "LesionSeg 3D Slicer module")
    with atomic_file(path) as tmp:
        dicom_seg.save(seg, tmp)
    return path


def _segment_label(d: dict, drawn: bool) -> str:
    """``Lesion <id> (<confidence>) <status>``, or the reviewer's own segment name when it is plain
    ASCII; a drawn lesion has no model confidence.  64 characters at most (DICOM LO)."""
    default = f"Lesion {d['lesion_id']}" + ("" if drawn else f" ({d['confidence']:.2f})")
    name = d["name"] if d["name"].isascii() and d["name"].isprintable() and d["name"].strip() else default
    return f"{name} {'drawn' if drawn else d['review']}"[:64]


# ---------------------------------------------------------------------------------- all
FORMATS = ("seg.nrrd", "nifti", "csv", "dicomseg")


def export_names(segmentation_node, stem: str | None = None) -> dict[str, str]:
    """{format: file name} of an export: named after the scan (the result's case name)."""
    stem = _stem(stem or segmentation_node.GetAttribute(mrml.ATTR_CASE_NAME) or segmentation_node.GetName())
    return {"seg.nrrd": f"{stem}.seg.nrrd", "nifti": f"{stem}_lesions.nii.gz", "csv": f"{stem}_lesions.csv",
            "dicomseg": f"{stem}_lesions.dcm"}


def existing_outputs(segmentation_node, outdir, formats=FORMATS) -> list[Path]:
    """The files an export of ``formats`` into ``outdir`` would replace (another result of the same
    scan, or an earlier export): the panel asks before replacing them."""
    names = export_names(segmentation_node)
    return [Path(outdir) / names[f] for f in formats if f in names and (Path(outdir) / names[f]).exists()]


def export_all(segmentation_node, outdir, stem: str | None = None, formats=FORMATS, include_hidden: bool = False,
               dicom_files=None, notes: list | None = None) -> dict[str, Path]:
    """Write the requested formats into ``outdir``; returns {format: path}.  What a format could
    not hold (overlapping lesions in the NIfTI labelmap) is appended to ``notes``.

    All of them appear together or none does (one :class:`~.engine.atomic.AtomicWriter`): a
    format that fails leaves no other behind.  What can be known beforehand is refused before
    anything is written: an output folder that is a file or cannot be written, and a DICOM SEG
    with no lesion to hold (every shown lesion rejected).  ``dicomseg`` is skipped (not an error)
    when the volume did not come from DICOM and no ``dicom_files`` are given.
    """
    from .engine.atomic import AtomicWriter, output_problem

    for fmt in formats:
        if fmt not in FORMATS:
            raise ValueError(f"unknown export format {fmt!r}; use one of {FORMATS}")
    problem = output_problem(outdir)
    if problem:
        raise ValueError(problem)
    volume = mrml.reference_volume(segmentation_node)
    files = (dicom_files or dicom_source_files(volume)) if "dicomseg" in formats else []
    if files and not [d for d in _selected(segmentation_node, include_hidden, include_rejected=False) if d["n_voxels"] > 0]:
        raise ValueError("no lesion to export as DICOM SEG (every shown lesion is rejected, hidden or erased); "
                         "nothing was written: export the other formats on their own")
    outdir = Path(outdir)
    names = export_names(segmentation_node, stem)
    losses = {"NIfTI": [], "DICOM SEG": []}
    writers = {"seg.nrrd": export_seg_nrrd, "nifti": lambda node, path, hidden: export_nifti(node, path, hidden, losses["NIfTI"]),
               "csv": export_csv,
               "dicomseg": lambda node, path, hidden: export_dicom_seg(node, path, files, hidden, losses=losses["DICOM SEG"])}
    out: dict[str, Path] = {}
    with AtomicWriter(outdir) as writer:  # commits every file on success, removes them all on an error
        for fmt in formats:
            if fmt == "dicomseg" and not files:
                continue
            writers[fmt](segmentation_node, writer.path(names[fmt]), include_hidden)
            out[fmt] = outdir / names[fmt]
    note = overlap_note(losses)
    if note and notes is not None:
        notes.append(note)
    if "dicomseg" in out and add_to_dicom_database(out["dicomseg"], volume):
        out["dicom_database"] = out["dicomseg"]
    return out


def from_dicom_database(volume_node) -> bool:
    """Whether the volume was loaded from Slicer's DICOM database (its instance UIDs resolve there)."""
    uids = (volume_node.GetAttribute("DICOM.instanceUIDs") or "").split() if volume_node is not None else []
    db = getattr(slicer, "dicomDatabase", None)
    return bool(uids) and db is not None and all(db.fileForInstance(uid) for uid in uids[:1])


def add_to_dicom_database(path, volume_node) -> bool:
    """Add an exported DICOM SEG to Slicer's DICOM database when the CT came from it."""
    if not from_dicom_database(volume_node):
        return False
    slicer.dicomDatabase.insert(str(path))
    return True


def _stem(name: str) -> str:
    return safe_stem(name, "lesions")  # never "CON.seg.nrrd", a device on Windows

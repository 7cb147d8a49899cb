"""Click to segment: one point (LPS mm) -> the lesion under it, in-process, on a crop of the scan.

    from LesionSegLib.engine.segment.pipeline import Engine
    from LesionSegLib.engine.click import click
    result = click(Engine("sts-clcs"), image, [(x, y, z)])   # a SegmentationResult

Every model can answer a click; how depends on its architecture:

* **dense** models (``clcs``: sts-clcs, sts-attention-unet, fine-tuned ones): the model's own
  segmenter (or its card's ``click_segmenter``, given the click as a guidance channel, see
  :mod:`.learn.train_click`; no shipped card has one) runs over sliding windows on a crop of
  ``DENSE_RADIUS_MM`` around the point (the
  cascade gate, if any, is bypassed: the reviewer says there is a lesion), and the lesion is the
  26-connected component under the point, or the nearest one within ``SNAP_MM``, at the model's
  probability threshold, else at half of it.  While that lesion comes within ``SIDE_MARGIN_MM`` of a
  side of the crop where the scan goes on, the crop grows by ``GROWTH`` (to ``MAX_RADIUS_MM`` at most), so a large
  sarcoma clicked off-centre is not cut by the crop; a larger crop that loses the lesion keeps the
  previous crop's.  (Growing only the sides the lesion nears was tried on the training clicks:
  0.790 against 0.792 mean Dice, and less robust, since a lesion cut short in a small crop does not
  reach the sides it should grow towards.)
* **detseg** models: the RoI segmenter on boxes centred on the point (:mod:`.detseg.click`).

Where the model finds no lesion at a point, a ``fallback`` model may answer it (the CLI and the
Slicer module use ``FALLBACK_CLICK_MODEL``, sts-detseg, for dense models): its RoI segmenter sees
every lesion at the same scale, so it still outlines lung nodules that the sarcoma-trained dense
segmenter does not see at all (``Resources/evaluation/click_chest.json``).

The crop's radius and its growth were chosen on training-case clicks
(``Resources/evaluation/click_train_*.json``), never on the validation lesions.

A fine-tuned model that routes (``routing`` in its card) routes a click as it routes a scan: on the
whole scan's descriptor, so a click on a scan of the parent's domain runs the parent's networks.
The lesion's confidence and OOD score use the whole scan's descriptor too, not the crop's.
Measurements, patch and confidence are those of ``segment``, so the CSV has the same columns and
the lesion can go to the feedback store.

Points outside the volume, or on air (mean HU of the 3x3x3 voxels around it below
``AIR_HU_LIMIT``), are refused with an :class:`InputError` naming the point; nothing is returned
for any point when one is bad.
"""
from __future__ import annotations

import os
import time
from typing import Sequence

import numpy as np
import SimpleITK as sitk

from .errors import InputError
from .segment.result import SegmentationResult

CLICK_RADIUS_MM = 100.0  # the crop of a detseg click (its largest RoI is 180 mm)
DENSE_RADIUS_MM = 150.0  # the first crop of a dense click
GROWTH = 1.5
MAX_RADIUS_MM = 225.0
SIDE_MARGIN_MM = 10.0  # a lesion this close to a side of the crop grows the crop
AIR_HU_LIMIT = -500.0
FALLBACK_CLICK_MODEL = "sts-detseg"  # answers the points where a dense model finds no lesion


def default_fallback(engine) -> str | None:
    """The model that answers where ``engine`` finds no lesion: ``FALLBACK_CLICK_MODEL`` for a dense
    model, none for a detseg one (it would be asked the same question twice)."""
    return None if hasattr(engine, "segment_boxes") else FALLBACK_CLICK_MODEL


def centre_click(pts: np.ndarray) -> np.ndarray:
    """Where a reviewer clicks "the middle" of a lesion given as its voxel indices ``pts`` (N x 3):
    its centre of mass when that falls inside the lesion, else the lesion voxel nearest to it (a
    C-shaped lesion's centre lies outside it).  The rule of the click benchmark and of the click
    segmenter's training patches alike."""
    pts = np.asarray(pts)
    com = pts.mean(0)
    if (pts == np.round(com).astype(pts.dtype)).all(1).any():
        return com
    return pts[np.argmin(np.linalg.norm(pts - com, axis=1))]


def guidance_channel(shape, voxel_zyx, spacing_zyx, sigma_mm: float) -> np.ndarray:
    """A click as an input channel (DeepGrow-style guidance): a Gaussian of ``sigma_mm`` at voxel
    ``voxel_zyx`` (may lie outside the array) on an array of ``shape`` with ``spacing_zyx``; float32, peak 1."""
    axes = [((np.arange(n) - float(v)) * float(s)) ** 2 for n, v, s in zip(shape, voxel_zyx, spacing_zyx)]
    d2 = axes[0][:, None, None] + axes[1][None, :, None] + axes[2][None, None, :]
    return np.exp(-d2 / (2.0 * sigma_mm**2)).astype(np.float32)


def _fmt(p) -> str:
    return "(" + ", ".join(f"{v:.1f}" for v in p) + ") mm LPS"


def check_point(image: sitk.Image, point_lps) -> np.ndarray:
    """The continuous (x, y, z) index of ``point_lps``; InputError when it is outside the volume."""
    if len(point_lps) != 3 or not all(np.isfinite(v) for v in point_lps):
        raise InputError(f"point {point_lps!r} is not three finite coordinates X,Y,Z (mm LPS)")
    idx = np.asarray(image.TransformPhysicalPointToContinuousIndex([float(v) for v in point_lps]))
    size = np.asarray(image.GetSize())
    if np.any(idx < -0.5) or np.any(idx > size - 0.5):
        at = ", ".join(f"{v:.1f}" for v in idx)
        raise InputError(f"point {_fmt(point_lps)} is outside the volume (voxel index ({at}), size {tuple(int(v) for v in size)})")
    return idx


def crop_bounds(image: sitk.Image, idx_xyz, radius_mm: float) -> tuple[np.ndarray, np.ndarray]:
    """(start, stop) index (x, y, z) of the voxels within ``radius_mm`` of the index along each axis."""
    sp = np.asarray(image.GetSpacing())
    size = np.asarray(image.GetSize())
    c = np.round(idx_xyz).astype(int)
    r = np.ceil(radius_mm / sp).astype(int)
    return np.clip(c - r, 0, size - 1), np.clip(c + r + 1, 1, size)


def crop_around(image: sitk.Image, idx_xyz, radius_mm: float = CLICK_RADIUS_MM) -> tuple[sitk.Image, np.ndarray]:
    """(crop, its start index (x, y, z)): the voxels within ``radius_mm`` of the index along each axis."""
    start, stop = crop_bounds(image, idx_xyz, radius_mm)
    return sitk.RegionOfInterest(image, [int(v) for v in stop - start], [int(v) for v in start]), start


def dense_lesion_mask(engine, hu: np.ndarray, sp, voxel: np.ndarray, cancel=None) -> tuple[np.ndarray, np.ndarray, float] | None:
    """(component, probability, threshold) of the lesion at ``voxel`` from a dense model's segmenter
    on the whole (canonical) crop; None when no lesion voxel lies at or near it."""
    from .detseg.refine import lesion_component

    prob, _ = engine.probability(hu, sp, cancel=cancel, use_gate=False, click_zyx=voxel)
    comp, t = lesion_component(prob, engine.prob_threshold, voxel, sp)
    return None if comp is None else (comp, prob, t)


def _near_side(comp: np.ndarray, sp) -> bool:
    """Does the lesion come within ``SIDE_MARGIN_MM`` of a side of the crop?  (The segmenter sees
    less context near a side, so a cut lesion often stops just short of it.)"""
    pts = np.argwhere(comp)
    m = np.ceil(SIDE_MARGIN_MM / np.asarray(sp, dtype=float)).astype(int)
    return bool(np.any(pts.min(0) < m) or np.any(pts.max(0) >= np.asarray(comp.shape) - m))


def _scan_context(engine, image: sitk.Image, descriptor: np.ndarray | None = None):
    """(the engine that answers clicks on this scan, the scan's descriptor or None, a routing note);
    ``descriptor``: the scan's :func:`~.segment.ood.scan_descriptor`, when already computed (it does
    not depend on the model)."""
    if engine.in_domain is None and engine.ood is None:
        return engine, descriptor, None
    if descriptor is None:
        from .segment.ood import scan_descriptor

        descriptor = scan_descriptor(engine.prepare(image)[1])
    routed = engine.route(None, None, descriptor)
    if routed is None:
        return engine, descriptor, None
    parent, score = routed
    return parent, descriptor, (f"this scan lies in the domain of {parent.card.id} (scan OOD score {score:.2f} under it), "
                                f"so {parent.card.id}'s networks answered the click, as {engine.card.id}'s card says")


def _lesion_at(engine, image: sitk.Image, p, idx, cancel=None):
    """(crop, its start index, canonical crop, HU, spacing, (component, probability, threshold) or None)
    for the lesion at point ``p`` (continuous index ``idx``) by ``engine`` (see the module)."""
    dense = not hasattr(engine, "segment_boxes")
    radius = DENSE_RADIUS_MM if dense else CLICK_RADIUS_MM
    last = None  # the previous crop's answer, kept if a larger crop loses the lesion
    while True:
        crop, start = crop_around(image, idx, radius)
        canonical, hu, sp = engine.prepare(crop)
        c = np.asarray(canonical.TransformPhysicalPointToContinuousIndex([float(v) for v in p]))[::-1]
        v = np.clip(np.round(c).astype(int), 0, np.asarray(hu.shape) - 1)
        near = hu[tuple(slice(max(0, a - 1), a + 2) for a in v)]
        if float(near.mean()) < AIR_HU_LIMIT:
            raise InputError(f"point {_fmt(p)} is on air or outside the body (mean {near.mean():.0f} HU around it); click inside the lesion")
        if dense:
            found = dense_lesion_mask(engine, hu, sp, v, cancel)
        else:
            from .detseg.click import lesion_mask

            found = lesion_mask(engine, hu, sp, c * np.asarray(sp), cancel)
        if found is None and last is not None:
            return last
        if not dense or found is None or radius >= MAX_RADIUS_MM or not _near_side(found[0], sp):
            return crop, start, canonical, hu, sp, found
        # the lesion reaches the crop's side: a larger crop, unless the crop already is the scan there
        last = crop, start, canonical, hu, sp, found
        radius = min(radius * GROWTH, MAX_RADIUS_MM)
        if all(np.array_equal(a, b) for a, b in zip(crop_bounds(image, idx, radius), (start, start + crop.GetSize()))):
            return crop, start, canonical, hu, sp, found


#: a point's lesion with at least this share of its voxels already labelled by earlier points is
#: one of theirs (two clicks on one lesion), not a new lesion
SAME_LESION_SHARE = 0.5


def click(engine, image: sitk.Image | str | os.PathLike, points_lps: Sequence[Sequence[float]], cancel=None,
          source: str | None = None, fallback=None) -> SegmentationResult:
    """Segment the lesion under each point; lesion ``k`` (label ``k``) is point ``k`` (1-based).

    ``engine``: any :class:`~.segment.pipeline.Engine`.  ``image``: a ``SimpleITK.Image``, or the
    path of an image file or DICOM folder.  ``fallback``: an engine, or a function
    that returns one (called at most once, when first needed), that answers a point where
    ``engine`` finds no lesion; the result's messages say which points it answered.  The labelmap
    is on ``image``'s grid; where two points' lesions overlap the earlier point keeps the voxel.  A
    point whose lesion lies mostly (:data:`SAME_LESION_SHARE`) on an earlier point's is that
    lesion: it gets no label and no row, and a message says so.
    """
    from .io.images import validate_ct
    from .segment.arguments import as_image

    image, source = as_image(image, source)
    validate_ct(image, source)
    if not points_lps:
        raise InputError("no point given")
    idxs = [check_point(image, p) for p in points_lps]  # all points checked before any work
    t0 = time.perf_counter()
    primary = engine
    engine, descriptor, note = _scan_context(engine, image)
    from .io.preprocess import oblique_note

    notes = [n for n in (note, oblique_note(image)) if n]
    backup = None  # (fallback engine, its scan descriptor), once needed
    full = np.zeros(sitk.GetArrayViewFromImage(image).shape, dtype=np.uint16)
    lesions, n_fallback = [], 0
    scan_ood: dict[bool, dict | None] = {}  # by "answered by the clicked model" (else the fallback)
    for k, (p, idx) in enumerate(zip(points_lps, idxs), start=1):
        eng, desc = engine, descriptor
        crop, start, canonical, hu, sp, found = _lesion_at(eng, image, p, idx, cancel)
        if found is None and fallback is not None:
            if backup is None:
                fb, fb_desc, fb_note = _scan_context(fallback() if callable(fallback) else fallback, image, descriptor)
                backup = (fb, fb_desc)
                notes += [fb_note] if fb_note else []
            eng, desc = backup
            crop, start, canonical, hu, sp, found = _lesion_at(eng, image, p, idx, cancel)
            if found is not None:
                notes.append(f"point {k} {_fmt(p)}: {engine.card.id} found no lesion there; {eng.card.id} "
                             f"({eng.card.architecture}) answered it")
        if found is None:
            who = f"neither {engine.card.id} nor {backup[0].card.id} gives" if backup else f"{engine.card.id} gives no"
            raise InputError(f"no lesion found at point {_fmt(p)}: {who} lesion voxels there")
        comp, prob, thr = found
        res = eng.lesions_from_probability(crop, canonical, hu, sp, prob * comp, {}, 0.0, keep_patches=True,
                                           prob_threshold=thr, min_size_mm3=0.0, descriptor=desc)
        if not res.lesions:
            raise InputError(f"no lesion found at point {_fmt(p)}")
        scan_ood.setdefault(eng is engine, res.ood)  # the scan's OOD record, as segment writes it
        les = res.lesions[0]
        sub = res.labelmap == les.lesion_id
        z0, y0, x0 = start[2], start[1], start[0]
        region = full[z0 : z0 + sub.shape[0], y0 : y0 + sub.shape[1], x0 : x0 + sub.shape[2]]
        taken = region[sub]
        if taken.size and np.count_nonzero(taken) >= SAME_LESION_SHARE * taken.size:
            # an earlier point's lesion: one lesion, one label and one row (not a row without voxels)
            j = int(np.bincount(taken[taken > 0]).argmax())
            notes.append(f"point {k} {_fmt(p)} lies on the lesion of point {j}; it adds no lesion (no label {k})")
            continue
        region[sub & (region == 0)] = k
        (a, b) = les.bbox_ijk
        les.bbox_ijk = (tuple(int(u + s) for u, s in zip(a, start)), tuple(int(u + s) for u, s in zip(b, start)))
        les.lesion_id = k
        lesions.append(les)
        n_fallback += eng is not engine
    # the model named: the one asked, unless the fallback answered every point
    model_id = backup[0].card.id if n_fallback == len(lesions) else primary.card.id
    messages = list(dict.fromkeys(list(res.messages) + notes))  # the engines' notes and the scan's OOD warning
    return SegmentationResult(labelmap=full, lesions=lesions, reference=image, model_id=model_id, threshold=0.0,
                              timings={"click": time.perf_counter() - t0}, device=str(engine.device), messages=messages,
                              ood=scan_ood.get(True, scan_ood.get(False)))

"""The CLCS pipeline: read -> preprocess -> infer -> clusters -> patch classifier -> result.

    from LesionSegLib.engine.pipeline import Engine
    result = Engine().segment(SimpleITK.ReadImage("ct.nii.gz"))

Geometry: the image is permuted/flipped (no interpolation) to the LPS-closest orientation,
cropped to the body, resampled to the model's spacing, segmented with MONAI sliding windows,
and the probability map is resampled back onto the (canonical) input grid.  Clusters,
measurements and patches are computed there; the labelmap is finally permuted back onto the
input's exact grid.
"""
from __future__ import annotations

import hashlib
import os
import time
from typing import Callable

import numpy as np
import SimpleITK as sitk
import torch

from .classifier import ConfidenceModel
from .clusters import cluster_stats, extract_clusters
from ..errors import CancelledError, InputError
from .features import adaptive_patch, feature_matrix, tabular_features
from .inference import select_device, sliding_window_probability
from ..io.images import validate_ct
from ..models import ModelCard, get_card
from .networks import build_segmenter
from ..io.preprocess import body_box, from_canonical, normalize, resample, spacing_zyx, target_shape, to_canonical
from .result import Lesion, SegmentationResult

STAGES = ("read", "preprocess", "inference", "clusters", "confidence", "write")
#: fraction of the progress bar given to each stage
_STAGE_SPAN = {"preprocess": (0.0, 0.1), "inference": (0.1, 0.8), "detect": (0.1, 0.3), "roi_segmentation": (0.3, 0.8), "clusters": (0.8, 0.85), "confidence": (0.85, 1.0)}

DEFAULT_PROB_THRESHOLD = 0.5
DEFAULT_MIN_SIZE_MM3 = 100.0
DEFAULT_CONFIDENCE_THRESHOLD = 0.5


def case_hash(image: sitk.Image) -> str:
    """sha256 of the voxel values and the geometry (size, spacing, origin, direction)."""
    h = hashlib.sha256()
    arr = sitk.GetArrayViewFromImage(image)
    h.update(str(arr.dtype).encode())
    h.update(np.ascontiguousarray(arr).tobytes())
    geo = (image.GetSize(), image.GetSpacing(), image.GetOrigin(), image.GetDirection())
    h.update(repr(tuple(tuple(round(v, 6) for v in g) for g in geo)).encode())
    return h.hexdigest()


#: architecture name -> "module:Class" (relative to this package), imported when first used
ARCHITECTURES = {"clcs": ".pipeline:ClcsEngine", "detseg": "..detseg.engine:DetSegEngine"}


def engine_class(architecture: str) -> type["Engine"]:
    """The engine class registered for ``architecture`` (a model card's ``architecture``)."""
    import importlib

    where = ARCHITECTURES.get(architecture)
    if where is None:
        raise InputError(f"unknown model architecture {architecture!r}; this engine runs: {', '.join(sorted(ARCHITECTURES))}")
    module, _, name = where.partition(":")
    return getattr(importlib.import_module(module, __package__), name)


class Engine:
    """A loaded model, ready to segment images.

    ``Engine(model, device, threads)`` returns the engine registered for the model card's
    ``architecture`` (:data:`ARCHITECTURES`); the subclasses provide :meth:`load_networks` and
    :meth:`probability` (foreground probability on the canonical input grid), everything from
    clusters on (measurements, patches, confidence, result) is shared.
    """

    architecture: str | None = None

    def __new__(cls, model: str | os.PathLike | ModelCard | None = None, device: str = "auto", threads: int | None = None):
        if cls is Engine:
            cls = engine_class((model if isinstance(model, ModelCard) else get_card(model)).architecture)
        return super().__new__(cls)

    def __init__(self, model: str | os.PathLike | ModelCard | None = None, device: str = "auto", threads: int | None = None):
        self.card = model if isinstance(model, ModelCard) else get_card(model)
        if self.card.architecture != self.architecture:
            raise InputError(f"model {self.card.id} uses architecture {self.card.architecture!r}, which {type(self).__name__} cannot run")
        self.device, self.messages = select_device(device)
        if threads:
            torch.set_num_threads(threads)
        self.load_networks()
        self.classifier = ConfidenceModel.from_card(self.card) if "classifier" in self.card.data else None
        post = self.card.data.get("postprocess", {})
        self.prob_threshold = float(post.get("prob_threshold", DEFAULT_PROB_THRESHOLD))
        self.min_size_mm3 = float(post.get("min_size_mm3", DEFAULT_MIN_SIZE_MM3))
        self.default_threshold = float(self.card.data.get("confidence_threshold", DEFAULT_CONFIDENCE_THRESHOLD))

    def load_networks(self) -> None:
        raise NotImplementedError

    def probability(self, canonical_hu: np.ndarray, spacing, progress=None, cancel=None) -> tuple[np.ndarray, dict]:
        """Foreground probability on the canonical input grid, and stage timings."""
        raise NotImplementedError

    def cluster_confidence(self, labels: np.ndarray, stats, measures, patches, feats) -> np.ndarray:
        """Confidence per cluster: the patch classifier's, else the mean probability."""
        if stats and self.classifier is not None:
            return self.classifier.predict(np.stack(patches), feature_matrix(feats))
        return np.array([m["mean_probability"] for m in measures])

    def segment(
        self,
        image: sitk.Image,
        threshold: float | None = None,
        progress: Callable[[float, str], None] | None = None,
        cancel: Callable[[], bool] | None = None,
        keep_patches: bool = False,
        keep_probability: bool = False,
        source: str | None = None,
    ) -> SegmentationResult:
        """Segment ``image`` (a validated 3D CT in HU) and return lesions with confidences.

        ``threshold``: keep lesions with confidence >= threshold (None: the model's default;
        0 keeps every candidate).  ``progress(fraction, stage)`` is called as work proceeds;
        when ``cancel()`` returns True a :class:`CancelledError` is raised.
        """
        validate_ct(image, source)
        threshold = self.default_threshold if threshold is None else float(threshold)
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"confidence threshold must be within [0, 1], not {threshold}")
        _check(cancel)
        canonical, hu, sp = self.prepare(image)
        prob, timings = self.probability(hu, sp, progress, cancel)
        _check(cancel)
        return self.lesions_from_probability(
            image, canonical, hu, sp, prob, timings, threshold, progress, cancel, keep_patches, keep_probability
        )

    @staticmethod
    def prepare(image: sitk.Image) -> tuple[sitk.Image, np.ndarray, tuple[float, float, float]]:
        """(canonical image, its HU array (z, y, x) float32, its spacing (z, y, x))."""
        canonical = to_canonical(image)
        hu = sitk.GetArrayFromImage(canonical).astype(np.float32, copy=False)
        return canonical, hu, spacing_zyx(canonical)

    def lesions_from_probability(
        self,
        image: sitk.Image,
        canonical: sitk.Image,
        hu: np.ndarray,
        sp,
        prob: np.ndarray,
        timings: dict,
        threshold: float,
        progress=None,
        cancel=None,
        keep_patches: bool = False,
        keep_probability: bool = False,
        prob_threshold: float | None = None,
        min_size_mm3: float | None = None,
    ) -> SegmentationResult:
        """Clusters, measurements, patches and confidences from a canonical probability map."""
        timings = dict(timings)
        prob_threshold = self.prob_threshold if prob_threshold is None else prob_threshold
        t = time.perf_counter()
        min_size = self.min_size_mm3 if min_size_mm3 is None else min_size_mm3
        labels, n = extract_clusters(prob, prob_threshold, sp, min_size)
        stats = cluster_stats(labels, n)
        timings["clusters"] = time.perf_counter() - t
        _report(progress, "clusters", 1.0)

        t = time.perf_counter()
        largest = max((c.n_voxels for c in stats), default=1)
        feats, measures, patches = [], [], []
        for i, c in enumerate(stats):
            _check(cancel)
            f, m = tabular_features(hu, prob, labels, c, sp, largest, len(stats))
            feats.append(f)
            measures.append(m)
            patches.append(adaptive_patch(hu, prob, labels, c, sp))
            _report(progress, "confidence", (i + 1) / (len(stats) + 1))
        conf = self.cluster_confidence(labels, stats, measures, patches, feats)

        order = [i for i in np.argsort(-conf, kind="stable") if conf[i] >= threshold]
        lut = np.zeros(n + 1, dtype=np.uint16)
        lesions = []
        for new_id, i in enumerate(order, start=1):
            c = stats[i]
            lut[c.label] = new_id
            centroid = canonical.TransformContinuousIndexToPhysicalPoint([c.centroid_zyx[2], c.centroid_zyx[1], c.centroid_zyx[0]])
            m = measures[i]
            lesions.append(
                Lesion(
                    lesion_id=new_id,
                    confidence=float(conf[i]),
                    volume_ml=float(m["volume_ml"]),
                    diameter_mm=float(m["diameter_mm"]),
                    centroid_lps=tuple(float(v) for v in centroid),
                    mean_probability=float(m["mean_probability"]),
                    max_probability=float(m["max_probability"]),
                    mean_hu=float(m["mean_hu"]),
                    n_voxels=int(c.n_voxels),
                    features=feats[i],
                    patch=patches[i] if keep_patches else None,
                )
            )
        labelmap = from_canonical(lut[labels], canonical, image)
        _fill_bboxes(labelmap, lesions)
        timings["confidence"] = time.perf_counter() - t
        _report(progress, "confidence", 1.0)
        probability = from_canonical(prob.astype(np.float16), canonical, image) if keep_probability else None
        return SegmentationResult(
            labelmap=labelmap,
            lesions=lesions,
            reference=image,
            model_id=self.card.id,
            threshold=threshold,
            probability=probability,
            timings=timings,
            device=str(getattr(self, "used_device", self.device)),
            messages=list(self.messages),
        )


class ClcsEngine(Engine):
    """CLCS: a dense MONAI segmenter over sliding windows at the model spacing."""

    architecture = "clcs"

    def load_networks(self) -> None:
        seg = self.card.part("segmenter")
        self.seg_cfg = seg
        self.segmenter = build_segmenter(seg["network"])
        self.card.load_into("segmenter", self.segmenter)
        self.segmenter.eval()

    def probability(self, canonical_hu: np.ndarray, spacing, progress=None, cancel=None) -> tuple[np.ndarray, dict]:
        timings = {}
        t = time.perf_counter()
        box = body_box(canonical_hu, spacing)
        crop = canonical_hu[box.slices]
        shape = target_shape(crop.shape, spacing, self.seg_cfg["spacing_zyx"])
        x = normalize(resample(crop, shape), self.seg_cfg["hu_windows"])
        timings["preprocess"] = time.perf_counter() - t
        _report(progress, "preprocess", 1.0)
        t = time.perf_counter()
        prob_model, used, msgs = sliding_window_probability(
            self.segmenter,
            x,
            self.seg_cfg["roi_size"],
            float(self.seg_cfg.get("overlap", 0.25)),
            self.device,
            progress=(lambda f: _report(progress, "inference", f)) if progress else None,
            cancel=cancel,
        )
        self.messages.extend(m for m in msgs if m not in self.messages)
        self.used_device = used
        prob = np.zeros(canonical_hu.shape, dtype=np.float32)
        prob[box.slices] = resample(prob_model, crop.shape).numpy()
        timings["inference"] = time.perf_counter() - t
        return prob, timings


def _fill_bboxes(labelmap: np.ndarray, lesions: list[Lesion]) -> None:
    import cc3d

    if not lesions:
        return
    st = cc3d.statistics(np.ascontiguousarray(labelmap))
    for les in lesions:
        bz, by, bx = st["bounding_boxes"][les.lesion_id]
        les.bbox_ijk = ((bx.start, by.start, bz.start), (bx.stop, by.stop, bz.stop))


def _report(progress, stage: str, fraction: float) -> None:
    if progress is None:
        return
    lo, hi = _STAGE_SPAN[stage]
    progress(lo + (hi - lo) * min(1.0, max(0.0, fraction)), stage)


def _check(cancel) -> None:
    if cancel is not None and cancel():
        raise CancelledError("segmentation cancelled")

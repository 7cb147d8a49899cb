"""The CLCS pipeline: read -> preprocess -> infer -> clusters -> patch classifier -> result.

    from LesionSegLib.engine.segment.pipeline import Engine
    result = Engine().segment("ct.nii.gz")   # or a SimpleITK.Image

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

from .clusters import cluster_stats, find_clusters
from .arguments import as_image, check_threads, confidence_threshold
from ..errors import CancelledError, InputError
from .features import adaptive_patch, feature_matrix, tabular_features
from .inference import Segmenter
from ..io.images import validate_ct
from ..models import ModelCard, get_card
from ..io.preprocess import (CANONICAL, body_box, from_canonical, oblique_note, orientation_of, spacing_zyx, target_shape,
                             to_canonical)
from ..io.resample import resample as resample_antialiased
from ..runtime.ops import hu_windows, resize_linear
from .ood import OODModel, scan_descriptor
from .result import Lesion, SegmentationResult, edge_note

STAGES = ("read", "preprocess", "inference", "clusters", "confidence", "write")
#: fraction of the progress bar given to each stage
_STAGE_SPAN = {"preprocess": (0.0, 0.1), "inference": (0.1, 0.8), "clusters": (0.8, 0.85), "confidence": (0.85, 1.0),
               "detect": (0.1, 0.3), "roi_segmentation": (0.3, 0.8)}  # the last two: DetSeg3D's inference

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


def load_engine(model=None, device: str = "auto", **kw) -> "Engine":
    """``Engine(model, device, **kw)``; any failure that is not already a LesionSeg error (a card
    value a network library rejects, an allocation a card asks for) becomes a :class:`ModelError`
    naming the model, so it is never blamed on the CT that is segmented next (the CLI and the
    Slicer module load engines through it)."""
    from ..errors import LesionSegError, ModelError, out_of_memory
    from ..models import one_line_text

    card = model if isinstance(model, ModelCard) else get_card(model)  # a bad card is named by its schema check
    try:
        return Engine(card, device, **kw)
    except (LesionSegError, KeyboardInterrupt):
        raise
    except Exception as exc:  # noqa: BLE001
        if out_of_memory(exc):  # OpenVINO's "can't alloc", a std::bad_alloc: the machine's memory, not the model
            raise MemoryError(f"not enough memory to load model {card.id} ({one_line_text(exc)[:200]})") from None
        raise ModelError(f"model {card.id} ({card.folder}) cannot be loaded ({type(exc).__name__}: {one_line_text(exc)[:300]})") from None


def engine_class(architecture: str) -> type["Engine"]:
    """The engine class registered for ``architecture`` (a model card's ``architecture``)."""
    import importlib

    where = ARCHITECTURES.get(architecture)
    if where is None:
        raise InputError(f"unknown model architecture {architecture!r}; this engine runs: {', '.join(sorted(ARCHITECTURES))}")
    module, _, name = where.partition(":")
    return getattr(importlib.import_module(module, __package__), name)


def kept_model_folder(card: ModelCard):
    """The folder of the model ``card`` keeps for the scans of its parent's domain (its ``routing``
    section, written by ``lesionseg finetune``), its card checksum-verified like a weight file and
    never outside ``card``'s folder; None when the card does not route.  A :class:`ModelError` names
    a malformed section, a missing folder or a failed checksum."""
    from ..errors import ModelError
    from ..models import confined, sha256_file

    routing = card.data.get("routing")
    if not routing:
        return None
    if not isinstance(routing, dict) or not isinstance(routing.get("enabled", False), bool):
        raise ModelError(f"model {card.id}: the card's routing section must be an object with enabled true or false")
    if not routing.get("enabled"):
        return None
    if not isinstance(routing.get("folder"), str) or not isinstance(routing.get("card_sha256"), str):
        raise ModelError(f"model {card.id}: the card's routing section needs a folder and a card_sha256 (texts)")
    folder = confined(card.folder, routing["folder"], "routing folder")
    card_file = folder / "card.json"
    if folder.is_symlink() or not card_file.is_file() or card_file.is_symlink() \
            or sha256_file(card_file) != routing["card_sha256"]:
        raise ModelError(f"model {card.id}: the in-domain model {folder} is missing or fails its checksum")
    return folder


class Engine:
    """A loaded model, ready to segment images.

    ``Engine(model, device, threads, runtime, gate)`` returns the engine registered for the model
    card's ``architecture`` (:data:`ARCHITECTURES`).  Subclasses provide :meth:`setup_networks`
    (or just :meth:`load_networks` for PyTorch networks) and :meth:`probability` (foreground
    probability on the canonical input grid); everything from clusters on (measurements,
    patches, confidence, OOD, result) is shared.

    ``threads`` (None: every core) bounds the whole pipeline, as the CLI's ``--threads`` does: it
    sets SimpleITK's process-wide default thread count, and torch's on the torch runtime, for the
    rest of the process (other engines and the caller's own ITK/torch code included), not only for
    this engine.  One engine may be shared by threads, but its network calls take turns (a lock
    per network): for parallel segmentation use one engine per thread (or process).
    """

    architecture: str | None = None

    def __new__(cls, model: str | os.PathLike | ModelCard | None = None, *args, **kwargs):
        if cls is Engine:
            cls = engine_class((model if isinstance(model, ModelCard) else get_card(model)).architecture)
        return super().__new__(cls)

    def __init__(
        self, model: str | os.PathLike | ModelCard | None = None, device: str = "auto", threads: int | None = None,
        runtime: str | None = None, gate: str | os.PathLike | None = None,
    ):
        check_threads(threads)  # before any model loads: a bad argument is never blamed on the model
        self.card = model if isinstance(model, ModelCard) else get_card(model)
        if self.card.architecture != self.architecture:
            raise InputError(f"model {self.card.id} uses architecture {self.card.architecture!r}, which {type(self).__name__} cannot run")
        if threads:  # --threads bounds the whole pipeline: ITK's resampling and writing too, not only the network
            import SimpleITK as sitk

            sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(int(threads))
        self.setup_networks(device, runtime, threads)
        self.classifier = _confidence_model(self.card, self.runtime, threads) if "classifier" in self.card.data else None
        self.messages.extend(getattr(self.classifier, "notes", []))
        self.ood = OODModel.from_card(self.card, self.messages) if self.classifier is not None else None
        post = self.card.data.get("postprocess", {})
        self.prob_threshold = float(post.get("prob_threshold", DEFAULT_PROB_THRESHOLD))
        self.min_size_mm3 = float(post.get("min_size_mm3", DEFAULT_MIN_SIZE_MM3))
        self.default_threshold = float(self.card.data.get("confidence_threshold", DEFAULT_CONFIDENCE_THRESHOLD))
        self.gate = None  # cascade gate: the card's, a gate folder, or 'off' (torch only when there is one)
        if gate not in ("off", "none") and (gate is not None or "gate" in self.card.data):
            from ..gate.model import load_gate

            self.gate = load_gate(gate, self.card)
        self.gate_info: dict | None = None
        self.in_domain = self._load_in_domain(device, threads, runtime)

    def _load_in_domain(self, device, threads, runtime) -> "Engine | None":
        """The parent model kept inside a fine-tuned one for the parent's own domain (``routing``
        in the card, written by ``lesionseg finetune`` when the corrected cases lie outside the
        parent's domain); its card is checksum-verified like a weight file."""
        from ..errors import LesionSegError, ModelError
        from ..models import checked_card, read_card

        folder = kept_model_folder(self.card)
        if folder is None:
            return None
        try:
            parent = Engine(checked_card(read_card(folder)), device=device, threads=threads, runtime=runtime)
        except LesionSegError:
            raise
        except Exception as exc:  # a bad kept copy is this model's fault, never the CT's
            why = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelError(f"model {self.card.id}: its in-domain model {folder} cannot be loaded: {why}") from None
        if parent.ood is None:  # no usable OOD statistics in the kept copy: nothing can be routed
            self.messages.append(f"model {self.card.id}: routing to {parent.card.id} is off, because the copy of it kept in this "
                                 f"model has no usable out-of-distribution statistics; every scan runs this model's fine-tuned "
                                 f"networks. Fine-tune again (lesionseg finetune) to restore routing")
        return parent

    def route(self, hu: np.ndarray, sp, descriptor: np.ndarray | None = None) -> "tuple[Engine, float] | None":
        """(the in-domain parent engine, the scan's OOD score under the parent) when this scan lies
        inside the parent's training domain, else None (this model's own networks run).
        ``descriptor``: the scan's :func:`scan_descriptor`, when already computed."""
        if self.in_domain is None or self.in_domain.ood is None:
            return None
        score = self.in_domain.ood.scan_score(scan_descriptor(hu) if descriptor is None else descriptor)
        return (self.in_domain, score) if score <= self.in_domain.ood.scan_threshold else None

    def setup_networks(self, device: str, runtime: str | None, threads: int | None) -> None:
        """Default: PyTorch networks (:meth:`load_networks`) on the selected device."""
        import torch

        from .inference import select_device

        if runtime not in (None, "auto", "torch"):
            raise InputError(f"model {self.card.id} ({self.architecture}) runs on the torch runtime only, not {runtime!r}")
        self.runtime = "torch"
        self.device, self.messages = select_device(device)
        if threads:
            torch.set_num_threads(threads)
        self.load_networks()

    def load_networks(self) -> None:
        raise NotImplementedError

    def probability(self, canonical_hu: np.ndarray, spacing, progress=None, cancel=None) -> tuple[np.ndarray, dict]:
        """Foreground probability on the canonical input grid, and stage timings."""
        raise NotImplementedError

    def cluster_scores(self, labels: np.ndarray, stats, measures, patches, feats) -> tuple[np.ndarray, np.ndarray | None]:
        """Confidence per cluster (the patch classifier's, else the mean probability) and the
        classifier embedding used for the lesion OOD score (one encoder pass gives both)."""
        if stats and self.classifier is not None:
            logit, embedding = self.classifier.logits_and_embedding(np.stack(patches), feature_matrix(feats))
            return 1.0 / (1.0 + np.exp(-logit / self.classifier.temperature)), embedding
        return np.array([m["mean_probability"] for m in measures]), None

    def segment(
        self,
        image: sitk.Image | str | os.PathLike,
        threshold: float | None = None,
        progress: Callable[[float, str], None] | None = None,
        cancel: Callable[[], bool] | None = None,
        keep_patches: bool = False,
        keep_probability: bool = False,
        source: str | None = None,
    ) -> SegmentationResult:
        """Segment ``image`` (a 3D CT in HU: a ``SimpleITK.Image``, or the path of an image file or
        DICOM folder) and return lesions with confidences; a bad image or argument is an :class:`InputError`.

        ``threshold``: keep lesions with confidence >= threshold (None: the model's default;
        0 keeps every candidate).  ``progress(fraction, stage)`` is called as work proceeds;
        when ``cancel()`` returns True a :class:`CancelledError` is raised.
        """
        threshold = confidence_threshold(threshold, self.default_threshold)
        image, source = as_image(image, source)
        validate_ct(image, source)
        _check(cancel)
        canonical, hu, sp = self.prepare(image)
        # a routing model scores the scan against its parent first; the same descriptor serves its own OOD check
        descriptor = scan_descriptor(hu) if self.in_domain is not None else None
        routed = self.route(hu, sp, descriptor)
        if routed is not None:
            parent, score = routed
            res = parent.segment(image, threshold, progress, cancel, keep_patches, keep_probability, source)
            res.model_id = self.card.id
            res.messages.append(f"this scan lies in the domain of {parent.card.id} (scan OOD score {score:.2f} under it), "
                                f"so {parent.card.id}'s segmenter and classifier ran, as this fine-tuned model's card says")
            return res
        prob, timings = self.probability(hu, sp, progress, cancel)
        _check(cancel)
        res = self.lesions_from_probability(
            image, canonical, hu, sp, prob, timings, threshold, progress, cancel, keep_patches, keep_probability,
            descriptor=descriptor,
        )
        if (note := oblique_note(image)) is not None:
            res.messages.append(note)
        if (note := edge_note(res.labelmap)) is not None:
            res.messages.append(note)
        if self.gate is not None and self.gate_info:
            g = self.gate_info
            res.messages.append(f"cascade gate: segmenter ran on {g['open']} of {g['slabs']} slabs ({g['skipped_fraction']:.0%} skipped)")
        return res

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
        descriptor: np.ndarray | None = None,
    ) -> SegmentationResult:
        """Clusters, measurements, patches and confidences from a canonical probability map
        (``descriptor``: the scan's :func:`scan_descriptor`, when already computed)."""
        timings = dict(timings)
        prob_threshold = self.prob_threshold if prob_threshold is None else prob_threshold
        t = time.perf_counter()
        _report(progress, "clusters", 0.0)  # a whole-body scan spends seconds here: the bar says where
        labels, stats = find_clusters(prob, prob_threshold, sp, self.min_size_mm3 if min_size_mm3 is None else min_size_mm3)
        n = len(stats)
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
        conf, embedding = self.cluster_scores(labels, stats, measures, patches, feats)
        ood, ood_lesion = self.ood_scores(hu, sp, embedding, descriptor)
        if ood is not None:
            conf = self.ood.apply(conf, ood["scan_score"])

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
                    ood_score=float(ood_lesion[i]) if ood_lesion is not None else None,
                )
            )
        labelmap = from_canonical(lut[labels], canonical, image)
        same_grid = orientation_of(image) == CANONICAL  # then the clusters' boxes are the lesions' boxes
        _fill_bboxes(labelmap, lesions, {k: stats[i].bbox for k, i in enumerate(order, start=1)} if same_grid else None)
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
            messages=list(self.messages) + ([ood["warning"]] if ood and ood["warning"] else []),
            ood=ood,
        )

    def ood_scores(self, hu, sp, embedding, descriptor: np.ndarray | None = None):
        """({"scan_score", "warning", "domain"}, per-cluster scores) or (None, None) without OOD stats."""
        if self.ood is None:
            return None, None
        score = self.ood.scan_score(scan_descriptor(hu) if descriptor is None else descriptor)
        per = self.ood.lesion_scores(embedding) if embedding is not None and len(embedding) and len(self.ood.lesions) else None
        return {"scan_score": score, "warning": self.ood.warning(score), "domain": self.ood.domain}, per


class ClcsEngine(Engine):
    """CLCS: a dense segmenter over sliding windows at the model spacing, on the fastest runtime."""

    architecture = "clcs"

    def setup_networks(self, device: str, runtime: str | None, threads: int | None) -> None:
        self.seg_cfg = self.card.part("segmenter")
        # runtime: auto (OpenVINO > ONNX Runtime > torch), openvino, onnxruntime or torch; see engine/runtime
        self.runner = Segmenter(self.card, device, runtime, threads)
        self.runtime, self.device, self.messages = self.runner.runtime, self.runner.device, self.runner.messages
        self._click_args = (device, runtime, threads)
        self._click_runner = None

    @property
    def click_runner(self) -> Segmenter | None:
        """The card's ``click_segmenter`` (the segmenter with the click as a guidance channel, see
        :mod:`..learn.train_click`) on the same runtime, built on first use; None without one."""
        if self._click_runner is None and "click_segmenter" in self.card.data:
            self._click_runner = Segmenter(self.card, *self._click_args, part="click_segmenter")
        return self._click_runner

    @property
    def segmenter(self):
        """The segmenter as a PyTorch module (built on first use; the ONNX runtimes do not need it)."""
        return self.runner.net

    @segmenter.setter
    def segmenter(self, net):
        """Run an in-memory network (fine-tuning, retraining): PyTorch runtime only."""
        if self.runtime != "torch":
            raise ValueError("an in-memory segmenter needs runtime='torch'")
        self.runner._net = net

    def probability(self, canonical_hu: np.ndarray, spacing, progress=None, cancel=None, use_gate: bool = True,
                    click_zyx=None) -> tuple[np.ndarray, dict]:
        """``use_gate=False`` runs the segmenter everywhere even with a cascade gate (a click);
        ``click_zyx`` (a voxel of ``canonical_hu``) runs the card's click segmenter with that click as
        its guidance channel instead (the gate is not used then)."""
        timings = {}
        t = time.perf_counter()
        box = body_box(canonical_hu, spacing)
        crop = canonical_hu[box.slices]
        shape = target_shape(crop.shape, spacing, self.seg_cfg["spacing_zyx"])
        # HU to the model grid low-pass filtered where the grid is coarser (a 0.6 mm chest CT is
        # decimated ~3x); the ~2 mm training crops are not filtered (no axis is reduced by > 1 voxel)
        x = hu_windows(resample_antialiased(crop, shape), self.seg_cfg["hu_windows"])
        runner = self.runner
        if click_zyx is not None and self.click_runner is not None:
            from ..click import guidance_channel
            from ..io.resample import fov_mapping

            runner, use_gate = self.click_runner, False
            lo, step = fov_mapping(crop.shape, shape)  # model voxel j lies at crop index lo + j * step
            at = [(c - b - a) / s for c, b, a, s in zip(click_zyx, box.lo, lo, step)]
            g = guidance_channel(shape, at, self.seg_cfg["spacing_zyx"], float(runner.cfg["guidance"]["sigma_mm"]))
            x = np.concatenate([x, g[None]])
        timings["preprocess"] = time.perf_counter() - t
        _report(progress, "preprocess", 1.0)
        t = time.perf_counter()

        def infer(xx):
            return runner.probability(xx, (lambda f: _report(progress, "inference", f)) if progress else None, cancel)

        if self.gate is None or not use_gate:
            prob_model = infer(x)
        else:  # cascade gate: the segmenter runs only on the slabs the gate lets through
            prob_model, self.gate_info = self.gate.apply(x, infer)
        self.used_device = runner.used_device
        prob = np.zeros(canonical_hu.shape, dtype=np.float32)
        resize_linear(prob_model, crop.shape, out=prob[box.slices])  # straight into the map: no full-size temporary
        timings["inference"] = time.perf_counter() - t
        return prob, timings


def _confidence_model(card: ModelCard, runtime: str, threads: int | None):
    if runtime == "torch":
        from .classifier import ConfidenceModel

        return ConfidenceModel.from_card(card)
    from ..runtime.models import OnnxConfidenceModel

    return OnnxConfidenceModel(card, runtime, threads)


def _fill_bboxes(labelmap: np.ndarray, lesions: list[Lesion], boxes: dict | None = None) -> None:
    """Each lesion's box on the input grid (``boxes``: lesion id -> (z, y, x) slices when already known)."""
    if boxes is None:
        boxes = {c.label: c.bbox for c in cluster_stats(labelmap, max((les.lesion_id for les in lesions), default=0))}
    for les in lesions:
        bz, by, bx = boxes[les.lesion_id]
        les.bbox_ijk = ((bx.start, by.start, bz.start), (bx.stop, by.stop, bz.stop))


def _report(progress, stage: str, fraction: float) -> None:
    if progress is None:
        return
    lo, hi = _STAGE_SPAN.get(stage, (0.0, 1.0))
    progress(lo + (hi - lo) * min(1.0, max(0.0, fraction)), stage)


def _check(cancel) -> None:
    if cancel is not None and cancel():
        raise CancelledError("segmentation cancelled")

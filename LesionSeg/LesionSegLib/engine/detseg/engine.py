"""The DetSeg3D engine: coarse anchor-free detection, then one fixed-size RoI segmentation per box.

    Engine("sts-detseg").segment(image)        # Engine dispatches on the card's architecture

Stage 1 runs the detector once over the body box on the coarse grid, keeps heatmap peaks above
a low threshold and removes duplicates with 3D NMS.  Stage 2 samples each box's RoI (with
context, at the lesion's own scale), runs the RoI U-Net on batches of RoIs and pastes the
probabilities back onto the canonical input grid (maximum where RoIs overlap).  From there the
shared CLCS machinery makes clusters, measurements, patches and the confidence, so the CSV,
segments, colours, review, feedback and retraining are the same as for ``clcs`` models.

Runtime: as CLCS, ``auto`` runs both networks' ONNX exports on OpenVINO (else ONNX Runtime), so
the command imports neither torch nor MONAI; ``torch`` (and any CUDA device) runs them eagerly.

Confidence (``confidence_source`` in the card): ``classifier`` (the patch classifier on each
stage-2 cluster, as CLCS) or ``detector`` (the best temperature-calibrated detector score of
the boxes whose centre falls in the cluster, else of the nearest box).
"""
from __future__ import annotations

import time

import numpy as np

from ..io.preprocess import body_box
from ..runtime.ops import sigmoid
from ..segment.pipeline import Engine, _check, _report
from .boxes import OFFSET_CH, decode, nms
from .inputs import detector_divisor, flip_average, grid_over, roi_input
from .refine import REFIT_TOLERANCE, SNAP_MM, fit_boxes, refit
from .roi import paste_max, roi_for_box

ROI_BATCH = 4


class DetSegEngine(Engine):
    architecture = "detseg"

    def setup_networks(self, device: str, runtime: str | None, threads: int | None) -> None:
        """Both stages on ``runtime`` (see :mod:`..runtime`): ``self.run_detector`` and
        ``self.run_roi`` map float32 NumPy batches to NumPy outputs on any runtime."""
        from ..segment.inference import choose_runtime

        self.det_cfg = self.card.part("detector")
        self.roi_cfg = self.card.part("roi_segmenter")
        self.confidence_source = self.card.data.get("confidence_source", "classifier")
        self.last_detections = np.zeros((0, 8))
        self.runtime, notes = choose_runtime(device, runtime)
        if self.runtime == "torch":
            super().setup_networks(device, "torch", threads)  # -> load_networks
            self.messages = notes + self.messages
            return
        from ..runtime.models import onnx_detseg

        self.device = "cpu"
        self.run_detector, self.run_roi, more = onnx_detseg(self.card, self.runtime, threads)
        self.messages = notes + more

    def load_networks(self) -> None:
        """The eager PyTorch networks (runtime ``torch``) on ``self.device``."""
        import torch

        from .networks import build_detector, build_roi_segmenter

        self.detector = self.card.load_into("detector", build_detector(self.det_cfg["network"])).eval().to(self.device)
        self.roi_net = self.card.load_into("roi_segmenter", build_roi_segmenter(self.roi_cfg["network"])).eval().to(self.device)

        def eager(net):
            @torch.inference_mode()
            def run(x: np.ndarray) -> np.ndarray:
                return net(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(self.device)).float().cpu().numpy()

            return run

        self.run_detector, self.run_roi = eager(self.detector), eager(self.roi_net)

    # ------------------------------------------------------------------------------ stage 1
    def detect(self, hu: np.ndarray, spacing, lo=None, hi=None, report=None) -> np.ndarray:
        """Detections ``(N, 8)`` on the canonical array (box mm, calibrated score, raw logit),
        best first, over array voxels ``[lo, hi)`` (default: the body box); ``report(fraction)``
        after each test-time flip."""
        if lo is None:
            box = body_box(hu, spacing)
            lo, hi = box.lo, box.hi
        cfg = self.det_cfg
        grid = grid_over(lo, hi, spacing, cfg["grid_spacing_zyx"], detector_divisor(cfg["network"]))
        # tta_flips (card): the maps averaged over flipped inputs; a flip negates its axis' centre offset
        out = flip_average(self.run_detector, grid.sample(hu, spacing, cfg["hu_windows"])[None], cfg.get("tta_flips"), _unflip_offsets, report)[0]
        dets = decode(out, grid.origin, grid.spacing, float(cfg.get("threshold", 0.1)), int(cfg.get("max_detections", 32)))
        dets = nms(dets, float(cfg.get("nms_iou", 0.25)))
        if len(dets):
            dets[:, 6] = 1.0 / (1.0 + np.exp(-dets[:, 7] / float(cfg.get("temperature", 1.0))))
        return dets

    # ------------------------------------------------------------------------------ stage 2
    def roi_outputs(self, hu: np.ndarray, spacing, boxes, cancel=None, progress=None) -> list:
        """``[(RoI, probability on the RoI's own grid)]`` of each box: RoI with context, RoI segmenter."""
        cfg = self.roi_cfg
        rois = [roi_for_box(b, spacing, cfg["roi_shape"], cfg.get("context")) for b in boxes]
        out = []
        for i in range(0, len(rois), ROI_BATCH):
            _check(cancel)
            chunk = rois[i : i + ROI_BATCH]
            x = np.stack([roi_input(hu, r, cfg["hu_windows"]) for r in chunk])
            p = flip_average(lambda b: sigmoid(self.run_roi(b)), x, cfg.get("tta_flips"))[:, 0]  # tta_flips: mean probability
            out.extend(zip(chunk, p))
            if progress is not None:
                progress(min(1.0, (i + len(chunk)) / len(rois)))
        return out

    def segment_boxes(self, hu: np.ndarray, spacing, boxes, target: np.ndarray, cancel=None, progress=None) -> list:
        """Segment the RoI of each box and paste its probability into ``target`` (max); returns the RoIs."""
        out = self.roi_outputs(hu, spacing, boxes, cancel, progress)
        for r, p in out:
            paste_max(target, p, r)
        return [r for r, _ in out]

    def probability(self, canonical_hu: np.ndarray, spacing, progress=None, cancel=None) -> tuple[np.ndarray, dict]:
        timings = {}
        t = time.perf_counter()
        _report(progress, "detect", 0.0)
        dets = self.detect(canonical_hu, spacing, **({"report": lambda f: _report(progress, "detect", f)} if progress else {}))
        self.last_detections = dets
        timings["detect"] = time.perf_counter() - t
        _report(progress, "detect", 1.0)
        t = time.perf_counter()
        prob = np.zeros(canonical_hu.shape, dtype=np.float32)
        report = (lambda f: _report(progress, "roi_segmentation", f)) if progress else None
        refits = int(self.roi_cfg.get("refits", 0))
        if refits and len(dets):
            # each box re-fitted to the lesion found at its centre (the RoI segmenter learnt on boxes
            # within 0.75-1.35x of their lesion); then per final box either its lesion only
            # (paste "lesion") or its whole RoI (paste "roi") goes into the map (max)
            fits = fit_boxes(self, canonical_hu, spacing, dets[:, :6], dets[:, :3], float(self.roi_cfg.get("snap_mm", SNAP_MM)), cancel)
            fits = refit(self, canonical_hu, spacing, fits, refits, float(self.roi_cfg.get("refit_tolerance", REFIT_TOLERANCE)), cancel, report,
                         growth=float(self.roi_cfg.get("refit_growth", 1.0)))
            if self.roi_cfg.get("paste", "roi") == "lesion":
                # one lesion per re-fitted box, its own component only; with "dedupe", boxes that
                # converged on the same lesion are removed by NMS on the lesions' boxes (else: union)
                rows = [np.concatenate([f.lesion_box(spacing), d[6:8], [i]]) for i, (f, d) in enumerate(zip(fits, dets)) if f.comp is not None]
                kept = np.array(rows).reshape(-1, 9)
                if self.roi_cfg.get("dedupe", True):
                    kept = nms(kept, float(self.det_cfg.get("nms_iou", 0.25)))
                self.last_detections = kept[:, :8]
                for i in kept[:, 8].astype(int):
                    f = fits[i]
                    np.maximum(prob[f.region], np.where(f.comp, f.prob, 0.0), out=prob[f.region])
            else:
                for f in fits:
                    np.maximum(prob[f.region], f.prob, out=prob[f.region])
        else:
            self.segment_boxes(canonical_hu, spacing, dets[:, :6], prob, cancel, report)
        timings["roi_segmentation"] = time.perf_counter() - t
        self.used_device = self.device
        return prob, timings

    # ------------------------------------------------------------------------------ confidence
    def cluster_scores(self, labels: np.ndarray, stats, measures, patches, feats):
        if self.confidence_source != "detector":
            return super().cluster_scores(labels, stats, measures, patches, feats)
        return detector_confidence(labels, stats, self.last_detections, self._spacing), None

    def lesions_from_probability(self, image, canonical, hu, sp, *args, **kwargs):
        self._spacing = sp
        return super().lesions_from_probability(image, canonical, hu, sp, *args, **kwargs)


def _unflip_offsets(out: np.ndarray, axes) -> None:
    """Detector maps (n, 7, z, y, x) flipped back along ``axes``: the centre offsets along them change sign."""
    for a in axes:
        out[:, OFFSET_CH.start + int(a)] *= -1


def detector_confidence(labels: np.ndarray, stats, dets: np.ndarray, spacing) -> np.ndarray:
    """Per cluster: the best score of the detections whose centre voxel lies in it, else the
    score of the detection whose centre is nearest to the cluster's centroid (0 with none)."""
    sp = np.asarray(spacing, dtype=np.float64)
    conf = np.zeros(len(stats))
    if len(dets) == 0:
        return conf
    idx = np.clip(np.round(dets[:, :3] / sp).astype(int), 0, np.asarray(labels.shape) - 1)
    hit = labels[tuple(idx.T)]
    for i, c in enumerate(stats):
        inside = dets[hit == c.label, 6]
        if len(inside):
            conf[i] = inside.max()
        else:
            d = np.linalg.norm(dets[:, :3] - np.asarray(c.centroid_zyx) * sp, axis=1)
            conf[i] = dets[int(np.argmin(d)), 6]
    return conf

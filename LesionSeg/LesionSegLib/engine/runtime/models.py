"""A model card's networks on an ONNX runtime: the CLCS segmenter and patch classifier, and the
two DetSeg3D networks (the detector, on any grid shape, and the RoI segmenter, on batches of RoIs).

Both are exported lazily (see :mod:`.export`) from the checksum-verified safetensors weights;
PyTorch and MONAI are imported only for that export, never to run a cached export.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from ..models import ModelCard
from .backends import open_backend
from .export import cached_onnx


def _segmenter_module(card: ModelCard, part: str = "segmenter"):
    """A segmenter part as a torch module giving the foreground-minus-background logit (B, 1, ...)."""
    import torch

    from ..segment.networks import build_segmenter

    net = build_segmenter(card.part(part)["network"])
    card.load_into(part, net)
    net.eval()

    class LogitDifference(torch.nn.Module):
        # softmax(l)[1] == sigmoid(l1 - l0), and blending is linear: one channel is enough
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            y = self.inner(x)
            return y[:, 1:2] - y[:, 0:1]

    return LogitDifference(net).eval()


def onnx_segmenter(card: ModelCard, runtime: str, threads: int | None = None,
                   part: str = "segmenter") -> tuple[Callable[[np.ndarray], np.ndarray], list[str]]:
    """``f(batch (1, C, *roi)) -> logit difference (1, 1, *roi)`` on ``runtime``, and notes
    (``part``: the card's ``segmenter``, or another dense network such as ``click_segmenter``)."""
    seg = card.part(part)
    in_ch = int(seg["network"].get("in_channels", 1))
    if int(seg["network"].get("out_channels", 2)) != 2:
        raise ValueError("the ONNX path supports two-class segmenters only")
    shape = [1, in_ch, *[int(v) for v in seg["roi_size"]]]
    spec = {"image": shape, "output": "logit_difference"}

    def build():
        import torch

        return _segmenter_module(card, part), (torch.zeros(shape),), ["image"], ["logit"], None

    onnx, notes = cached_onnx(card, part, spec, build)
    run = open_backend(runtime, onnx, threads)
    return (lambda batch: run({"image": batch})), notes


def onnx_detseg(card: ModelCard, runtime: str, threads: int | None = None) -> tuple[Callable, Callable, list[str]]:
    """The DetSeg3D stages on ``runtime``: ``detector(x (1, C, z, y, x)) -> (1, 7, z, y, x)`` for
    any grid shape (dynamic axes), ``roi(x (n, C, *roi_shape)) -> logits (n, 1, *roi_shape)``; and notes."""
    det, roi = card.part("detector"), card.part("roi_segmenter")
    det_ch = int(det["network"].get("in_channels", 2))
    roi_ch = int(roi["network"].get("in_channels", 2))
    roi_shape = [int(v) for v in roi["roi_shape"]]
    det_spec = {"image": [1, det_ch, "z", "y", "x"], "output": "maps"}
    roi_spec = {"image": ["n", roi_ch, *roi_shape], "output": "logit"}

    def build_detector():
        import torch

        from ..detseg.networks import build_detector as build, detector_divisor

        net = card.load_into("detector", build(det["network"])).eval()
        d = detector_divisor(det["network"])
        axes = {"image": {2: "z", 3: "y", 4: "x"}, "maps": {2: "z", 3: "y", 4: "x"}}
        return net, (torch.zeros(1, det_ch, 2 * d, 4 * d, 4 * d),), ["image"], ["maps"], axes

    def build_roi():
        import torch

        from ..detseg.networks import build_roi_segmenter

        net = card.load_into("roi_segmenter", build_roi_segmenter(roi["network"])).eval()
        axes = {"image": {0: "n"}, "logit": {0: "n"}}
        return net, (torch.zeros(2, roi_ch, *roi_shape),), ["image"], ["logit"], axes

    det_onnx, notes = cached_onnx(card, "detector", det_spec, build_detector)
    roi_onnx, more = cached_onnx(card, "roi_segmenter", roi_spec, build_roi)
    run_det, run_roi = open_backend(runtime, det_onnx, threads), open_backend(runtime, roi_onnx, threads)
    return (lambda x: run_det({"image": x})), (lambda x: run_roi({"image": x})), notes + more


class OnnxConfidenceModel:
    """:class:`~..segment.classifier.ConfidenceModel`'s ``predict`` on an ONNX runtime."""

    def __init__(self, card: ModelCard, runtime: str, threads: int | None = None):
        from ..segment.features import FEATURE_NAMES, PATCH_CHANNELS, PATCH_SIZE

        part = card.part("classifier")
        self.feature_mean = np.asarray(part["feature_mean"], dtype=np.float32)
        self.feature_std = np.asarray(part["feature_std"], dtype=np.float32)
        self.temperature = float(part.get("temperature", 1.0))
        names = list(part.get("feature_names", FEATURE_NAMES))
        spec = {"patch": [-1, PATCH_CHANNELS, *PATCH_SIZE], "features": [-1, len(names)], "output": ["logit", "embedding"]}

        def build():
            import torch

            from ..segment.classifier import ConfidenceModel

            class LogitAndEmbedding(torch.nn.Module):
                def __init__(self, inner):
                    super().__init__()
                    self.inner = inner

                def forward(self, patch, feats):
                    return self.inner.forward_with_embedding(patch, feats)

            net = LogitAndEmbedding(ConfidenceModel.from_card(card).net.eval()).eval()
            example = (torch.zeros(2, PATCH_CHANNELS, *PATCH_SIZE), torch.zeros(2, len(names)))
            axes = {"patch": {0: "n"}, "features": {0: "n"}, "logit": {0: "n"}, "embedding": {0: "n"}}
            return net, example, ["patch", "features"], ["logit", "embedding"], axes

        onnx, self.notes = cached_onnx(card, "classifier", spec, build)
        self._run = open_backend(runtime, onnx, threads, outputs=2)

    def logits_and_embedding(self, patches, feats) -> tuple[np.ndarray, np.ndarray]:
        """Each cluster's logit and its embedding (patch encoder output + standardised features)."""
        p = np.asarray(patches, dtype=np.float32)
        f = (np.asarray(feats, dtype=np.float32) - self.feature_mean) / self.feature_std
        if len(p) == 0:
            return np.zeros(0, dtype=np.float64), np.zeros((0, 0))
        logit, emb = self._run({"patch": p, "features": f})
        emb = np.concatenate([np.asarray(emb, np.float64).reshape(len(p), -1), f.astype(np.float64)], 1)
        return np.asarray(logit, dtype=np.float64).reshape(len(p)), emb

    def logits(self, patches, feats) -> np.ndarray:
        return self.logits_and_embedding(patches, feats)[0]

    def predict(self, patches, feats) -> np.ndarray:
        """Calibrated confidence in [0, 1] that each cluster is a true lesion."""
        z = self.logits(patches, feats) / self.temperature
        return 1.0 / (1.0 + np.exp(-z))

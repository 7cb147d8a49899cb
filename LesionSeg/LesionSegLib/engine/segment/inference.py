"""The segmentation network on its runtime: device selection, sliding windows, OOM fallback.

:class:`Segmenter` runs a card's segmenter either on an ONNX runtime (OpenVINO / ONNX Runtime,
NumPy sliding windows, no torch import) or with eager PyTorch + MONAI's
``sliding_window_inference`` (CUDA, or when no ONNX runtime is installed); see
:mod:`..runtime`.  Both take the same NumPy input and give the same probability map (within
the tolerance the runtime tests state).
"""
from __future__ import annotations

import importlib.util
import math
import re
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np

from ..errors import CancelledError, LesionSegError

if TYPE_CHECKING:
    import torch

NO_CUDA_NOTE = "CUDA is not available (no GPU or a CPU-only torch build): running on CPU"


def torch_has_cuda_build() -> bool:
    """Whether the installed torch is a CUDA build, read from ``torch/version.py`` without importing torch."""
    try:
        spec = importlib.util.find_spec("torch")
    except (ImportError, ValueError):
        return False
    if spec is None or not spec.submodule_search_locations:
        return False
    try:
        text = (Path(list(spec.submodule_search_locations)[0]) / "version.py").read_text(encoding="utf-8")
    except OSError:
        return True  # unknown: let torch answer
    m = re.search(r"^cuda\b[^=\n]*=\s*(\S+)", text, re.M)
    return m is None or m.group(1) != "None"


def select_device(name: str = "auto") -> tuple[torch.device, list[str]]:
    """``auto``: CUDA when present, else CPU.  ``cuda`` without CUDA is an error that says so."""
    import torch

    name = (name or "auto").lower()
    messages: list[str] = []
    if name not in ("auto", "cpu", "cuda") and not name.startswith("cuda:"):
        raise LesionSegError(f"unknown device {name!r}; use auto, cpu or cuda")
    if name == "cpu":
        return torch.device("cpu"), messages
    if torch.cuda.is_available():
        return torch.device("cuda" if name == "auto" else name), messages
    if name == "auto":
        messages.append(NO_CUDA_NOTE)
        return torch.device("cpu"), messages
    raise LesionSegError(f"device {name!r} requested but CUDA is not available (torch {torch.__version__}, no GPU found)")


def count_windows(shape, roi, overlap: float) -> int:
    n = 1
    for size, r in zip(shape, roi):
        if size <= r:
            continue
        step = max(1, int(r * (1 - overlap)))
        n *= math.ceil((size - r) / step) + 1
    return n


def sliding_window_probability(
    net: torch.nn.Module,
    x: torch.Tensor,
    roi,
    overlap: float,
    device: torch.device,
    progress: Callable[[float], None] | None = None,
    cancel: Callable[[], bool] | None = None,
) -> tuple[torch.Tensor, torch.device, list[str]]:
    """Foreground probability (z, y, x) on CPU for input ``x`` (C, z, y, x).

    On CUDA out-of-memory the pass is retried on the CPU, and a message says so.
    """
    import torch
    from monai.inferers import sliding_window_inference

    total = max(1, count_windows(x.shape[1:], roi, overlap))
    messages: list[str] = []

    def run(dev: torch.device) -> torch.Tensor:
        done = [0]
        net.to(dev)

        def predictor(batch: torch.Tensor) -> torch.Tensor:
            if cancel is not None and cancel():
                raise CancelledError("segmentation cancelled")
            out = net(batch)
            done[0] += batch.shape[0]
            if progress is not None:
                progress(min(1.0, done[0] / total))
            return out

        with torch.inference_mode():  # the input stays where it is: MONAI moves each window to ``dev``
            logits = sliding_window_inference(
                x[None], tuple(roi), 1, predictor, overlap=overlap, mode="gaussian", sw_device=dev, device=dev
            )
            prob = torch.softmax(logits.float(), 1)[0, 1]
        return prob.cpu()

    try:
        return run(device), device, messages
    except torch.cuda.OutOfMemoryError:
        if device.type != "cuda":
            raise
        torch.cuda.empty_cache()
        messages.append("CUDA ran out of memory: retried on the CPU")
        cpu = torch.device("cpu")
        return run(cpu), cpu, messages


def _wants_cuda(device: str) -> bool:
    """Whether ``device`` will run on CUDA; torch is imported only when it could."""
    name = (device or "auto").lower()
    if name == "cpu":
        return False
    if name == "auto" and not torch_has_cuda_build():
        return False
    import torch

    return torch.cuda.is_available() or name != "auto"  # an explicit cuda without CUDA fails in select_device


def choose_runtime(device: str, runtime: str | None) -> tuple[str, list[str]]:
    """(runtime, notes) for ``device``: :func:`..runtime.backends.resolve`; an ONNX runtime runs on
    the CPU and, when the device was ``auto``, says that CUDA is not used."""
    from ..runtime.backends import resolve

    name, notes = resolve(runtime, _wants_cuda(device))
    if name != "torch" and (device or "auto").lower() == "auto":
        notes = notes + [NO_CUDA_NOTE]
    return name, notes


class Segmenter:
    """A card's segmentation network on the chosen runtime (``auto``, ``openvino``, ``onnxruntime``, ``torch``).

    ``probability(x)`` maps the preprocessed input (C, z, y, x) to the foreground probability
    (z, y, x) on the same grid, blending sliding windows with MONAI's Gaussian weights.  Threads
    sharing it take turns: per window on an ONNX runtime (see :func:`..runtime.backends.open_backend`),
    per pass with PyTorch, whose pass may move the network (to the CPU after a CUDA out-of-memory).
    """

    def __init__(self, card, device: str = "auto", runtime: str | None = None, threads: int | None = None,
                 part: str = "segmenter"):
        self.card, self.part = card, part
        self.cfg = card.part(part)
        self.roi = tuple(int(v) for v in self.cfg["roi_size"])
        self.overlap = float(self.cfg.get("overlap", 0.25))
        self.threads = threads
        self._lock = threading.Lock()
        self.runtime, self.messages = choose_runtime(device, runtime)
        if self.runtime == "torch":
            import torch

            self.device, msgs = select_device(device)
            self.messages += msgs
            if threads:
                torch.set_num_threads(threads)
            self._net = None
        else:
            from ..runtime.models import onnx_segmenter

            self.device = "cpu"
            self._run, notes = onnx_segmenter(card, self.runtime, threads, part)
            self.messages += notes
        self.used_device = self.device

    @property
    def net(self):
        """The PyTorch network (built and loaded on first use)."""
        if getattr(self, "_net", None) is None:
            from .networks import build_segmenter

            self._net = build_segmenter(self.cfg["network"])
            self.card.load_into(self.part, self._net)
            self._net.eval()
        return self._net

    def probability(self, x: np.ndarray, progress=None, cancel=None) -> np.ndarray:
        if self.runtime == "torch":
            import torch

            with self._lock:
                prob, self.used_device, msgs = sliding_window_probability(
                    self.net, torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)), self.roi, self.overlap, self.device, progress, cancel
                )
                self.messages.extend(m for m in msgs if m not in self.messages)
            return prob.numpy()
        from ..runtime.ops import sigmoid
        from ..runtime.sliding import sliding_window

        logit = sliding_window(x, self.roi, self._run, self.overlap, "gaussian", 1, progress, cancel)
        return sigmoid(logit[0])

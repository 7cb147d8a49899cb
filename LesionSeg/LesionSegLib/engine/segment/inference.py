"""Device selection and MONAI sliding-window inference with progress, cancel and OOM fallback."""
from __future__ import annotations

import math
from typing import Callable

import torch

from ..errors import CancelledError, LesionSegError


def select_device(name: str = "auto") -> tuple[torch.device, list[str]]:
    """``auto``: CUDA when present, else CPU.  ``cuda`` without CUDA is an error that says so."""
    name = (name or "auto").lower()
    messages: list[str] = []
    if name not in ("auto", "cpu", "cuda") and not name.startswith("cuda:"):
        raise LesionSegError(f"unknown device {name!r}; use auto, cpu or cuda")
    if name == "cpu":
        return torch.device("cpu"), messages
    if torch.cuda.is_available():
        return torch.device("cuda" if name == "auto" else name), messages
    if name == "auto":
        messages.append("CUDA is not available (no GPU or a CPU-only torch build): running on CPU")
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

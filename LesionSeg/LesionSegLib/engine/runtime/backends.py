"""ONNX runtimes: OpenVINO and ONNX Runtime behind one call, ``backend({name: array}) -> array``.

``resolve(name, cuda)`` picks the runtime: ``auto`` is OpenVINO, else ONNX Runtime, else torch
(eager PyTorch) -- and torch whenever the computation runs on CUDA.  A runtime that cannot be
imported is skipped by ``auto`` with a note, and is an error when named explicitly.
"""
from __future__ import annotations

import importlib
import os
import sys
import threading
from typing import Callable

import numpy as np

from ..errors import LesionSegError

RUNTIMES = ("auto", "openvino", "onnxruntime", "torch")
#: ``auto`` tries these in order (measured on the 2-core CPU: OpenVINO fastest, see the README)
AUTO_ORDER = ("openvino", "onnxruntime")


def _no_telemetry(name: str) -> None:
    """``import openvino`` sends a usage event and writes a client id and counters under
    ``~/intel`` (the ``openvino_telemetry`` package, a dependency of the wheel).  A clinical tool
    does neither: unless this process loaded that package already, it is blocked before OpenVINO
    is imported, and OpenVINO falls back to its own no-op stub."""
    if name == "openvino":
        for mod in ("openvino_telemetry", "openvino_telemetry.backend"):
            sys.modules.setdefault(mod, None)  # an import of it raises ImportError


def importable(name: str) -> bool:
    """Whether the runtime package ``name`` imports (the import is what a missing package fails).
    A Ctrl-C (or SIGTERM) during the import arrives after it: inside, a package's own error
    handling could turn it into an import failure, which would lose it and just skip the runtime."""
    from ..atomic import signals_held

    _no_telemetry(name)
    try:
        with signals_held():
            importlib.import_module(name)
        return True
    except Exception:  # ImportError, or a broken binary wheel
        return False


def resolve(name: str | None, cuda: bool = False) -> tuple[str, list[str]]:
    """(runtime to use, notes) for the requested ``name`` (auto/openvino/onnxruntime/torch)."""
    name = (name or os.environ.get("LESIONSEG_RUNTIME") or "auto").lower()
    if name not in RUNTIMES:
        raise LesionSegError(f"unknown runtime {name!r}; use {', '.join(RUNTIMES)}")
    if name == "torch":
        return "torch", []
    if cuda:
        if name == "auto":
            return "torch", []
        raise LesionSegError(f"runtime {name!r} runs on the CPU only; use --device cpu or --runtime torch on CUDA")
    if name != "auto":
        if not importable(name):
            raise LesionSegError(f"runtime {name!r} requested but the {name} package cannot be imported; install it or use --runtime torch")
        return name, []
    for cand in AUTO_ORDER:
        if importable(cand):
            return cand, []
    return "torch", ["neither openvino nor onnxruntime can be imported: running the networks with PyTorch (slower)"]


def _threads(threads: int | None) -> int:
    return int(threads) if threads else max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def open_backend(runtime: str, onnx: bytes, threads: int | None = None, outputs: int = 1) -> Callable[[dict], np.ndarray]:
    """A callable running the ONNX model ``onnx`` (the verified bytes of the export, never a path to
    read again): ``f({input: array}) -> first output`` (or the tuple of the first ``outputs``
    outputs when ``outputs > 1``).

    Calls from several threads take turns (one lock per callable): OpenVINO's single infer request
    fails with "Infer Request is busy" when two threads run it, and its outputs live in that request
    until copied out; ONNX Runtime's ``run`` is thread-safe, but taking turns keeps an engine within
    its ``threads`` on either runtime."""
    if not isinstance(onnx, (bytes, bytearray)):
        raise TypeError("open_backend takes the verified bytes of an ONNX model")
    lock = threading.Lock()
    if runtime == "openvino":
        _no_telemetry("openvino")
        import openvino as ov

        core = ov.Core()
        config = {"INFERENCE_NUM_THREADS": _threads(threads), "PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32"}
        compiled = core.compile_model(core.read_model(bytes(onnx)), "CPU", config)
        request = compiled.create_infer_request()

        def run_ov(feeds: dict):
            feeds = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in feeds.items()}
            with lock:  # the copies too: the next call overwrites the request's output tensors
                res = request.infer(feeds)
                return np.array(res[0]) if outputs == 1 else tuple(np.array(res[i]) for i in range(outputs))

        return run_ov
    if runtime == "onnxruntime":
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = _threads(threads)
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        session = ort.InferenceSession(bytes(onnx), opts, providers=["CPUExecutionProvider"])

        def run_ort(feeds: dict):
            feeds = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in feeds.items()}
            with lock:
                res = session.run(None, feeds)
            return res[0] if outputs == 1 else tuple(res[:outputs])

        return run_ort
    raise LesionSegError(f"runtime {runtime!r} does not run ONNX models")

"""Python dependencies of the engine inside Slicer, and the CUDA report.

:func:`missing` is cheap (``importlib.util.find_spec``: nothing is imported).  :func:`install`
installs what is missing into Slicer's Python: torch through the PyTorch extension's
``PyTorchUtils`` (it picks the CUDA/CPU build that fits the computer), everything else through
``slicer.util.pip_install``.  The module widget asks the user before calling it.
No Qt here.
"""
from __future__ import annotations

import importlib
import importlib.util
import logging

log = logging.getLogger("LesionSeg")

TORCH_REQUIREMENT = ">=2.0"
#: import name -> pip requirement (torch is handled by PyTorchUtils)
REQUIREMENTS = {
    "torch": "torch" + TORCH_REQUIREMENT,
    "monai": "monai>=1.4",
    "cc3d": "connected-components-3d>=3.12",
    "safetensors": "safetensors>=0.4",
    "scipy": "scipy>=1.10",
    "sklearn": "scikit-learn>=1.3",
    "SimpleITK": "SimpleITK>=2.3",
    "slicerio": "slicerio>=1.1",
    "tqdm": "tqdm>=4.60",
}
#: only needed for DICOM SEG export
OPTIONAL = {"highdicom": "highdicom>=0.22", "pydicom": "pydicom>=2.4"}
#: fast CPU runtimes for the networks (engine/runtime); without them segmentation runs on PyTorch,
#: so they are installed best-effort and never block the module
RUNTIMES = {"openvino": "openvino>=2026.4,<2027", "onnxruntime": "onnxruntime>=1.32,<2", "onnx": "onnx>=1.23,<2"}


def _present(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def missing(optional: bool = False) -> list[str]:
    """Import names of the required (and, with ``optional``, optional) packages not installed."""
    names = list(REQUIREMENTS) + (list(OPTIONAL) if optional else [])
    return [n for n in names if not _present(n)]


def describe(names: list[str]) -> str:
    reqs = {**REQUIREMENTS, **OPTIONAL}
    return ", ".join(reqs.get(n, n) for n in names)


def install(names: list[str]) -> None:
    """Install ``names`` into Slicer's Python (needs ``slicer.util``; torch needs the PyTorch extension)."""
    import slicer

    names = list(names)
    if "torch" in names:
        try:
            import PyTorchUtils  # from the "PyTorch" Slicer extension
        except ModuleNotFoundError:
            raise RuntimeError(
                "LesionSeg needs PyTorch. Install the 'PyTorch' extension from the Extensions Manager, "
                "restart Slicer, and press Segment again."
            ) from None
        torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=False, torchVersionRequirement=TORCH_REQUIREMENT)
        if torch is None:
            raise RuntimeError("PyTorch was not installed")
        names.remove("torch")
    reqs = [{**REQUIREMENTS, **OPTIONAL}[n] for n in names if n in REQUIREMENTS or n in OPTIONAL]
    if reqs:
        log.info("installing %s", " ".join(reqs))
        slicer.util.pip_install(reqs)
    install_runtimes()
    importlib.invalidate_caches()
    still = [n for n in names if not _present(n)]
    if still:
        raise RuntimeError(f"these packages are still missing after installation: {describe(still)}")


def install_runtimes() -> list[str]:
    """Install the missing fast runtimes (OpenVINO, ONNX Runtime) best-effort; return those still missing.

    A failure is logged, not raised: the engine's ``auto`` runtime then falls back to PyTorch.
    """
    import slicer

    todo = [n for n in RUNTIMES if not _present(n)]
    for name in todo:
        try:
            slicer.util.pip_install(RUNTIMES[name])
        except Exception as exc:  # no wheel for this platform, no network...
            log.warning("could not install %s (%s): segmentation will run on PyTorch", RUNTIMES[name], exc)
    importlib.invalidate_caches()
    return [n for n in todo if not _present(n)]


def cuda_status() -> tuple[bool, str]:
    """(CUDA usable, a sentence for the user).  Imports torch (call it once, lazily)."""
    if not _present("torch"):
        return False, "PyTorch is not installed yet: it will be installed when you press Segment."
    try:
        import torch
    except Exception as exc:  # a broken install must not break the widget
        return False, f"PyTorch cannot be imported ({exc}); segmentation will fail until it is reinstalled."
    if torch.cuda.is_available():
        try:
            name = torch.cuda.get_device_name(0)
        except Exception:
            name = "a CUDA GPU"
        return True, f"CUDA is available ({name}); 'auto' uses the GPU."
    build = "a CPU-only PyTorch build" if not torch.version.cuda else "no CUDA GPU/driver found"
    return False, f"CUDA is not available ({build}, torch {torch.__version__}): segmentation runs on the CPU, which is slower."

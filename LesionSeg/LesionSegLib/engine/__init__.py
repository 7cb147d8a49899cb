"""The LesionSeg segmentation engine: pure Python on numpy, torch, MONAI, cc3d and SimpleITK.

The names of the Python API, imported on first use so that ``import LesionSegLib.engine`` stays
light (no torch, no network runtime)::

    from LesionSegLib.engine import Engine, read_image, case_hash, FeedbackStore
    from LesionSegLib.engine.click import click            # modules of the same name as
    from LesionSegLib.engine.evaluate import evaluate      # these functions: import them from there
"""

_EXPORTS = {
    "Engine": "segment.pipeline", "load_engine": "segment.pipeline", "case_hash": "segment.pipeline",
    "SegmentationResult": "segment.result", "Lesion": "segment.result", "read_image": "io.images",
    "FeedbackStore": "feedback", "LesionSegError": "errors", "InputError": "errors", "ModelError": "errors",
    "CancelledError": "errors",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    globals()[name] = value  # looked up once
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))

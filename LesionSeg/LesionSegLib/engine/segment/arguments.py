"""The Python API's arguments (``Engine``, ``Engine.segment``, ``click``), checked before any work.

A script that catches :class:`~..errors.LesionSegError` must see every wrong argument as one: a
wrong type surfaced as an ``AttributeError`` deep in validation, a negative ``threads`` as an
``OverflowError`` from ITK, which ``load_engine`` then blamed on the model (a ``ModelError``).
"""
from __future__ import annotations

import numbers
import os

import SimpleITK as sitk

from ..errors import InputError


def as_image(image, source: str | None = None) -> tuple[sitk.Image, str | None]:
    """(the image, the source its errors name) for ``image``: a ``SimpleITK.Image``, or the path of
    an image file or DICOM series folder, read as the CLI reads it but not yet validated (the caller
    runs :func:`..io.images.validate_ct` once, whichever it was given)."""
    if isinstance(image, (str, os.PathLike)):
        from ..io.images import read_image

        return read_image(image, validate=False), source or os.fspath(image)
    if not isinstance(image, sitk.Image):
        t = type(image)
        kind = t.__qualname__ if t.__module__ == "builtins" else f"{t.__module__}.{t.__qualname__}"
        raise InputError(f"the image is a {kind}, not a SimpleITK.Image or a path; make an array an image with "
                         "SimpleITK.GetImageFromArray and set its spacing, origin and direction")
    return image, source


def confidence_threshold(value, default: float) -> float:
    """``value`` as a confidence threshold in [0, 1] (None: ``default``)."""
    if value is None:
        return default
    try:
        threshold = float(value)
    except (TypeError, ValueError):
        raise InputError(f"confidence threshold {value!r} is not a number") from None
    if not 0.0 <= threshold <= 1.0:
        raise InputError(f"confidence threshold must be within [0, 1], not {threshold}")
    return threshold


def check_threads(threads) -> None:
    """``threads`` is None (every core) or a positive integer."""
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, numbers.Integral) or threads < 1):
        raise InputError(f"threads must be a positive integer, or None for every core; not {threads!r}")

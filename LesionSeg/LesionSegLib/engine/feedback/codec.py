"""Compact patch storage and lesion identity within a case.

Patches (the classifier's adaptive patch, float16) are stored byte-shuffled and zlib-compressed
(codec ``f16-shuffle-zlib``; version-1 files used plain ``f16-zlib``).
"""
from __future__ import annotations

import math
import zlib
from typing import Sequence

import numpy as np

from .schema import FeedbackStoreError

PATCH_CODEC = "f16-shuffle-zlib"  # current codec for new patches

def encode_patch(patch: np.ndarray | None, codec: str = PATCH_CODEC) -> tuple[bytes | None, str | None]:
    """Compress a patch as float16 -> (blob, "c,z,y,x")."""
    if patch is None:
        return None, None
    a = np.ascontiguousarray(np.asarray(patch, dtype=np.float16))
    shape = ",".join(str(s) for s in a.shape)
    raw = a.view(np.uint8)
    if codec == "f16-shuffle-zlib":
        raw = np.ascontiguousarray(raw.reshape(-1, 2).T)  # all low bytes, then all high bytes
    elif codec != "f16-zlib":
        raise ValueError(f"unknown patch codec {codec!r}")
    return zlib.compress(raw.tobytes(), 6), shape


def decode_patch(blob: bytes | None, shape: str | None, codec: str = PATCH_CODEC) -> np.ndarray | None:
    if blob is None or not shape:
        return None
    dims = tuple(int(s) for s in shape.split(","))
    raw = np.frombuffer(zlib.decompress(blob), dtype=np.uint8)
    if codec == "f16-shuffle-zlib":
        raw = np.ascontiguousarray(raw.reshape(2, -1).T)
    elif codec != "f16-zlib":
        raise FeedbackStoreError(f"unknown patch codec {codec!r} (written by a newer LesionSeg?)")
    return raw.view(np.float16).reshape(dims).copy()


def lesion_key(centroid_lps: Sequence[float] | None, lesion_id: int) -> str:
    """Identity of a lesion within (case, model): its centroid rounded to 0.1 mm."""
    if centroid_lps is not None:
        c = [float(v) for v in centroid_lps]
        if len(c) == 3 and all(math.isfinite(v) for v in c) and any(v != 0.0 for v in c):
            return "c:" + ",".join(f"{round(v, 1) + 0.0:.1f}" for v in c)
    return f"id:{int(lesion_id)}"

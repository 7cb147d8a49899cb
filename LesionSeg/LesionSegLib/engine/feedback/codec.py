"""Compact patch storage and lesion identity within a case.

Patches (the classifier's adaptive patch, float16) are stored byte-shuffled and zlib-compressed
(codec ``f16-shuffle-zlib``; version-1 files used plain ``f16-zlib``).
"""
from __future__ import annotations

import json
import math
import zlib
from typing import Sequence

import numpy as np

from .schema import FeedbackStoreError, _now

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


PATCH_CODECS = ("f16-shuffle-zlib", "f16-zlib")
#: limits on a stored patch: 4 dimensions (channels, z, y, x), at most MAX_PATCH_CHANNELS channels
#: and MAX_PATCH_SIDE voxels a side, so a decoded patch is at most MAX_PATCH_BYTES (today's
#: patches are 3 x 32^3 float16 = 192 KiB)
MAX_PATCH_CHANNELS = 8
MAX_PATCH_SIDE = 128
MAX_PATCH_BYTES = 2 * MAX_PATCH_CHANNELS * 64**3  # 4 MiB


def max_blob_bytes(raw_bytes: int) -> int:
    """The largest compressed blob accepted for a patch of ``raw_bytes`` (zlib's worst case is 5
    bytes per 16 KiB block plus 6)."""
    return raw_bytes + raw_bytes // 1000 + 64


def parse_patch_shape(shape) -> tuple[int, ...]:
    """``"c,z,y,x"`` as a tuple after checking it against the limits (:class:`FeedbackStoreError`)."""
    text = str(shape)
    try:
        dims = tuple(int(s) for s in text.split(","))
    except ValueError:
        raise FeedbackStoreError(f"patch shape {text[:40]!r} is not four integers 'c,z,y,x'") from None
    if len(dims) != 4 or min(dims) < 1 or dims[0] > MAX_PATCH_CHANNELS or max(dims[1:]) > MAX_PATCH_SIDE:
        raise FeedbackStoreError(f"patch shape {text[:40]!r} is not a plausible patch (c<={MAX_PATCH_CHANNELS}, "
                                 f"sides<={MAX_PATCH_SIDE})")
    if 2 * math.prod(dims) > MAX_PATCH_BYTES:
        raise FeedbackStoreError(f"patch shape {text!r} is larger than {MAX_PATCH_BYTES >> 20} MiB")
    return dims


def decode_patch(blob: bytes | None, shape: str | None, codec: str = PATCH_CODEC) -> np.ndarray | None:
    """Decompress a patch; raises :class:`FeedbackStoreError` on an unknown codec, an implausible
    shape or a blob that does not decompress to exactly that shape.  Never inflates more than the
    shape allows (a bounded ``decompressobj``), so a crafted blob cannot exhaust memory."""
    if blob is None or not shape:
        return None
    if codec not in PATCH_CODECS:
        raise FeedbackStoreError(f"unknown patch codec {str(codec)[:40]!r} (written by a newer LesionSeg?)")
    dims = parse_patch_shape(shape)
    expected = 2 * math.prod(dims)
    if len(blob) > max_blob_bytes(expected):
        raise FeedbackStoreError(f"patch blob of {len(blob)} bytes is too large for shape {shape}")
    d = zlib.decompressobj()
    try:
        raw = d.decompress(bytes(blob), expected + 1)
    except zlib.error as exc:
        raise FeedbackStoreError(f"patch blob is not valid zlib data ({exc})") from None
    if len(raw) != expected or not d.eof or d.unused_data:
        raise FeedbackStoreError(f"patch blob does not decompress to shape {shape} ({expected} bytes)")
    a = np.frombuffer(raw, dtype=np.uint8)
    if codec == "f16-shuffle-zlib":
        a = np.ascontiguousarray(a.reshape(2, -1).T)
    return a.view(np.float16).reshape(dims).copy()


def lesion_key(centroid_lps: Sequence[float] | None, lesion_id: int) -> str:
    """Identity of a lesion within (case, model): its centroid rounded to 0.1 mm."""
    if centroid_lps is not None:
        c = [float(v) for v in centroid_lps]
        if len(c) == 3 and all(math.isfinite(v) for v in c) and any(v != 0.0 for v in c):
            return "c:" + ",".join(f"{round(v, 1) + 0.0:.1f}" for v in c)
    return f"id:{int(lesion_id)}"


def decision_row(d) -> dict:
    """A :class:`~LesionSegLib.review.Decision` (or a dict with its fields) as a DB row dict."""
    get = (lambda k, default=None: d.get(k, default)) if isinstance(d, dict) else (lambda k, default=None: getattr(d, k, default))
    centroid = tuple(float(v) for v in (get("centroid_lps") or (0.0, 0.0, 0.0)))
    lesion_id = int(get("lesion_id", 0))
    patch, shape = encode_patch(get("patch"))
    feats = {str(k): float(v) for k, v in (get("features") or {}).items()}
    bbox = get("bbox_ijk")
    return {
        "case_hash": str(get("case_hash") or ""),
        "case_name": str(get("case_name") or ""),
        "model_id": str(get("model_id") or ""),
        "lesion_key": lesion_key(centroid, lesion_id),
        "lesion_id": lesion_id,
        "decision": str(get("decision")),
        "confidence": float(get("confidence", 0.0)),
        "centroid": centroid,
        "volume_ml": float(get("volume_ml", 0.0) or 0.0),
        "diameter_mm": float(get("diameter_mm", 0.0) or 0.0),
        "bbox": json.dumps(plain_json(bbox)) if bbox is not None else None,
        "features": json.dumps(feats, sort_keys=True),
        "patch": patch,
        "patch_shape": shape,
        "patch_codec": PATCH_CODEC if patch is not None else None,
        "reviewer": str(get("reviewer") or ""),
        "decided_at": str(get("timestamp") or _now()),
    }


def plain_json(x):
    if isinstance(x, (list, tuple, np.ndarray)):
        return [plain_json(v) for v in x]
    if isinstance(x, np.generic):
        return x.item()
    return x

"""Corrections: what a reviewer changed in a case's segmentation, kept to teach the segmenter.

Tables (schema migration 3, :mod:`.schema`):

* ``correction_images``: one row per corrected case: the image on the model grid
  (:mod:`.grid`) as int16 HU, byte-shuffled and zlib-compressed (codec ``i16-shuffle-zlib``),
  with its shape and geometry.  Enough to fine-tune the segmenter without the original file.
* ``corrections``: one row per segment of the reviewed result, of a ``kind``:

  ``edited``   a proposal whose mask the reviewer changed (paint, erase, islands, smoothing):
               the corrected mask;
  ``added``    a segment the reviewer added (by hand or with the click tool): a missed lesion;
  ``deleted``  a proposal the reviewer deleted (rejected): its proposed mask, a false positive;
  ``kept``     a proposal left unchanged: needed so that the case's full label is known.

  Each mask is stored as its bounding box on the model grid plus the packed bits of the mask
  inside it, zlib-compressed; with the case hash, the model that proposed it and the
  ``proposal_key`` (the lesion key of :func:`.codec.lesion_key`, as in ``decisions``) and id of
  the proposal it corrects (none for ``added``).

Saving a case (:func:`save_case`) replaces that case's corrections for that model in one
transaction: the reviewed segmentation is the truth as the reviewer left it.  Import merges by
``(case_hash, model_id, target_key)`` and keeps the newer row.

Limits (enforced on save and on import; :class:`FeedbackStoreError` names the one exceeded):
``MAX_IMAGE_VOXELS`` voxels and ``MAX_BLOB_BYTES`` compressed bytes per image,
``MAX_MASK_VOXELS`` voxels per mask bounding box, ``MAX_PER_CASE`` corrections per case and
model, ``MAX_CASES`` corrected cases per store.
"""
from __future__ import annotations

import json
import re
import uuid
import zlib
from dataclasses import dataclass, field

import numpy as np

from .codec import lesion_key
from .grid import ModelGrid
from .schema import FeedbackStoreError, _now

KINDS = ("edited", "added", "deleted", "kept")
IMAGE_CODEC = "i16-shuffle-zlib"
MASK_CODEC = "bits-zlib"
MAX_IMAGE_VOXELS = 64_000_000  # e.g. 400 x 400 x 400 on the model grid
MAX_BLOB_BYTES = 64 * 1024 * 1024
MAX_MASK_VOXELS = 16_000_000
MAX_PER_CASE = 256
MAX_CASES = 5_000
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


# ----------------------------------------------------------------------------- codecs
def encode_image(hu: np.ndarray) -> bytes:
    a = np.ascontiguousarray(np.asarray(hu, dtype=np.int16))
    if a.ndim != 3 or a.size > MAX_IMAGE_VOXELS:
        raise FeedbackStoreError(f"correction image of shape {a.shape} is over the limit of {MAX_IMAGE_VOXELS} voxels (3D)")
    raw = np.ascontiguousarray(a.view(np.uint8).reshape(-1, 2).T)
    blob = zlib.compress(raw.tobytes(), 6)
    if len(blob) > MAX_BLOB_BYTES:
        raise FeedbackStoreError(f"compressed correction image is {len(blob)} bytes, over the limit of {MAX_BLOB_BYTES}")
    return blob


def _inflate(blob: bytes, expected: int, what: str) -> bytes:
    """``blob`` decompressed, never inflating more than ``expected`` bytes (+1 to see an
    overlong blob): a crafted blob (a zlib bomb) cannot exhaust memory."""
    d = zlib.decompressobj()
    try:
        raw = d.decompress(bytes(blob), expected + 1)
    except zlib.error as exc:
        raise FeedbackStoreError(f"corrupt correction {what} ({exc})") from None
    if len(raw) > expected or (len(raw) == expected and (not d.eof or d.unused_data)):
        raise FeedbackStoreError(f"correction {what} decompresses to more than the {expected} bytes its shape allows")
    return raw


def decode_image(blob: bytes, shape) -> np.ndarray:
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < 1 or int(np.prod(shape)) > MAX_IMAGE_VOXELS:
        raise FeedbackStoreError(f"correction image shape {shape} is invalid or over the limit of {MAX_IMAGE_VOXELS} voxels")
    n = int(np.prod(shape))
    raw = np.frombuffer(_inflate(blob, 2 * n, "image"), dtype=np.uint8)
    if raw.size != 2 * n:
        raise FeedbackStoreError(f"correction image holds {raw.size // 2} voxels, its shape {shape} says {n}")
    return np.ascontiguousarray(raw.reshape(2, -1).T).view(np.int16).reshape(shape).copy()


def encode_mask(mask: np.ndarray) -> tuple[list, bytes, int]:
    """A boolean mask -> (bbox [[z0,y0,x0],[z1,y1,x1]] (hi exclusive), packed-bits blob, n voxels)."""
    m = np.asarray(mask, dtype=bool)
    idx = np.argwhere(m)
    if len(idx) == 0:
        raise FeedbackStoreError("an empty mask cannot be stored as a correction")
    lo, hi = idx.min(0), idx.max(0) + 1
    crop = m[tuple(slice(a, b) for a, b in zip(lo, hi))]
    if crop.size > MAX_MASK_VOXELS:
        raise FeedbackStoreError(f"correction mask box {crop.shape} is over the limit of {MAX_MASK_VOXELS} voxels")
    return [lo.tolist(), hi.tolist()], zlib.compress(np.packbits(crop.ravel()).tobytes(), 6), int(len(idx))


def decode_mask(bbox, blob: bytes, n_voxels: int | None = None) -> np.ndarray:
    """The mask inside its box (shape hi - lo)."""
    lo, hi = np.asarray(bbox[0], int), np.asarray(bbox[1], int)
    shape = tuple(int(v) for v in hi - lo)
    if len(shape) != 3 or min(shape) < 1 or int(np.prod(shape)) > MAX_MASK_VOXELS:
        raise FeedbackStoreError(f"invalid correction mask box {bbox}")
    n = int(np.prod(shape))
    bits = np.unpackbits(np.frombuffer(_inflate(blob, (n + 7) // 8, "mask"), dtype=np.uint8))
    if bits.size < n or bits.size - n >= 8:
        raise FeedbackStoreError(f"correction mask holds {bits.size} bits, its box {shape} needs {n}")
    m = bits[:n].reshape(shape).astype(bool)
    if n_voxels is not None and int(m.sum()) != int(n_voxels):
        raise FeedbackStoreError(f"correction mask has {int(m.sum())} voxels, its record says {n_voxels}")
    return m


# ----------------------------------------------------------------------------- records
@dataclass
class Correction:
    """One segment of a reviewed result, as the reviewer left it (mask on the model grid)."""

    kind: str
    mask: np.ndarray  # boolean, the model grid's shape
    proposal_key: str | None = None
    proposal_lesion_id: int | None = None
    proposal_confidence: float | None = None


@dataclass
class CorrectedCase:
    """A corrected case ready for training: image and labels on the model grid."""

    case_hash: str
    case_name: str
    model_ids: list[str]
    hu: np.ndarray  # int16
    geometry: dict
    label: np.ndarray  # uint8: edited + added + kept masks
    rejected: np.ndarray  # bool: deleted proposals (false positives) not covered by the label
    counts: dict = field(default_factory=dict)


def _target_key(c: Correction, spacing) -> str:
    if c.kind != "added":
        if not c.proposal_key:
            raise FeedbackStoreError(f"a '{c.kind}' correction needs the key of the proposal it corrects")
        return c.proposal_key
    centroid = np.argwhere(c.mask).mean(0) * np.asarray(spacing, float)
    return "a" + lesion_key(tuple(centroid[::-1]), 0)


def save_case(store, case_hash: str, case_name: str, model_id: str, grid: ModelGrid, corrections: list[Correction],
              reviewer: str = "", decided_at: str | None = None, source: str = "review") -> dict:
    """Store the reviewed state of one case (replacing what was stored for it with this model)."""
    if not _HEX64.match(str(case_hash)):
        raise FeedbackStoreError(f"invalid case hash {case_hash!r} (64 hex digits expected)")
    if len(corrections) > MAX_PER_CASE:
        raise FeedbackStoreError(f"{len(corrections)} corrections for one case, over the limit of {MAX_PER_CASE}")
    decided_at = decided_at or _now()
    rows = []
    for c in corrections:
        if c.kind not in KINDS:
            raise FeedbackStoreError(f"invalid correction kind {c.kind!r}; expected one of {KINDS}")
        if tuple(c.mask.shape) != grid.shape:
            raise FeedbackStoreError(f"correction mask shape {c.mask.shape} differs from the model grid {grid.shape}")
        bbox, blob, n = encode_mask(c.mask)
        vox_ml = float(np.prod(grid.geometry["spacing_zyx"])) / 1000.0
        rows.append({
            "uid": uuid.uuid4().hex, "case_hash": case_hash, "case_name": case_name, "model_id": model_id,
            "kind": c.kind, "target_key": _target_key(c, grid.geometry["spacing_zyx"]),
            "proposal_key": c.proposal_key, "proposal_lesion_id": c.proposal_lesion_id,
            "proposal_confidence": c.proposal_confidence, "bbox": json.dumps(bbox), "mask": blob,
            "codec": MASK_CODEC, "n_voxels": n, "volume_ml": round(n * vox_ml, 4), "reviewer": reviewer,
            "decided_at": decided_at,
        })
    image = {"case_hash": case_hash, "case_name": case_name, "shape": json.dumps(list(grid.shape)),
             "geometry": json.dumps(grid.geometry), "image": encode_image(grid.hu), "codec": IMAGE_CODEC}
    with store.transaction() as con:
        _put_image(con, image, source)
        con.execute("DELETE FROM corrections WHERE case_hash = ? AND model_id = ?", (case_hash, model_id))
        for r in rows:
            _insert(con, r, source)
    counts = {k: sum(r["kind"] == k for r in rows) for k in KINDS}
    return counts


def _put_image(con, image: dict, source: str) -> None:
    have = con.execute("SELECT 1 FROM correction_images WHERE case_hash = ?", (image["case_hash"],)).fetchone()
    if have:
        return
    n = con.execute("SELECT COUNT(*) FROM correction_images").fetchone()[0]
    if n >= MAX_CASES:
        raise FeedbackStoreError(f"the store already holds {n} corrected cases, the limit ({MAX_CASES})")
    con.execute(
        "INSERT INTO correction_images (case_hash, case_name, shape, geometry, image, codec, created_at, source) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        (image["case_hash"], image["case_name"], image["shape"], image["geometry"], image["image"], image["codec"],
         _now(), source),
    )


def _insert(con, r: dict, source: str) -> None:
    now = _now()
    con.execute(
        "INSERT INTO corrections (uid, case_hash, case_name, model_id, kind, target_key, proposal_key, "
        "proposal_lesion_id, proposal_confidence, bbox, mask, codec, n_voxels, volume_ml, reviewer, decided_at, "
        "created_at, updated_at, source) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (r["uid"], r["case_hash"], r["case_name"], r["model_id"], r["kind"], r["target_key"], r["proposal_key"],
         r["proposal_lesion_id"], r["proposal_confidence"], r["bbox"], r["mask"], r["codec"], r["n_voxels"],
         r["volume_ml"], r["reviewer"], r["decided_at"], now, now, source),
    )
    n = con.execute("SELECT COUNT(*) FROM corrections WHERE case_hash = ? AND model_id = ?",
                    (r["case_hash"], r["model_id"])).fetchone()[0]
    if n > MAX_PER_CASE:
        raise FeedbackStoreError(f"more than {MAX_PER_CASE} corrections for case {r['case_name'] or r['case_hash'][:12]}")


# ----------------------------------------------------------------------------- reading
def stats(store) -> dict:
    """Counts of corrections per kind, corrected cases and stored image bytes."""
    out = {k: 0 for k in KINDS}
    for kind, n in store._query("SELECT kind, COUNT(*) FROM corrections GROUP BY kind"):
        out[kind] = int(n)
    one = store._query("SELECT COUNT(*), COALESCE(SUM(LENGTH(image)), 0) FROM correction_images")[0]
    out["cases"] = int(one[0])
    out["image_bytes"] = int(one[1])
    out["mask_bytes"] = int(store._query("SELECT COALESCE(SUM(LENGTH(mask)), 0) FROM corrections")[0][0])
    return out


def rows(store, blobs: bool = True) -> tuple[list[dict], list[dict]]:
    """(image rows, correction rows) as plain dicts (blobs included when ``blobs``)."""
    icols = "case_hash, case_name, shape, geometry, codec, created_at, source" + (", image" if blobs else "")
    ccols = ("uid, case_hash, case_name, model_id, kind, target_key, proposal_key, proposal_lesion_id, "
             "proposal_confidence, bbox, codec, n_voxels, volume_ml, reviewer, decided_at, source" + (", mask" if blobs else ""))
    images = [dict(r) for r in store._query(f"SELECT {icols} FROM correction_images ORDER BY case_hash")]
    corr = [dict(r) for r in store._query(f"SELECT {ccols} FROM corrections ORDER BY id")]
    return images, corr


def load_cases(store, model_ids=None, cases=None) -> list[CorrectedCase]:
    """Every corrected case (optionally of these models / case names or hashes) with its labels."""
    images, corr = rows(store)
    out = []
    for im in images:
        if cases and im["case_name"] not in cases and im["case_hash"] not in cases:
            continue
        mine = [c for c in corr if c["case_hash"] == im["case_hash"] and (not model_ids or c["model_id"] in model_ids)]
        if not mine:
            continue
        hu = decode_image(im["image"], json.loads(im["shape"]))
        label = np.zeros(hu.shape, np.uint8)
        rejected = np.zeros(hu.shape, bool)
        for c in mine:
            bbox = json.loads(c["bbox"])
            sl = tuple(slice(a, b) for a, b in zip(bbox[0], bbox[1]))
            m = decode_mask(bbox, c["mask"], c["n_voxels"])
            if c["kind"] == "deleted":
                rejected[sl] |= m
            else:
                label[sl] |= m.astype(np.uint8)
        rejected &= label == 0
        counts = {k: sum(c["kind"] == k for c in mine) for k in KINDS}
        out.append(CorrectedCase(im["case_hash"], im["case_name"], sorted({c["model_id"] for c in mine}), hu,
                                 json.loads(im["geometry"]), label, rejected, counts))
    return out

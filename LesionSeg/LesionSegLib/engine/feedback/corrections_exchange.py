"""Sharing corrections between sites: ``lesionseg feedback export|import`` carry them too.

``export OUT.csv`` (or ``.parquet``) writes the decisions to ``OUT.csv`` and, when the store holds
corrections, the corrected cases' images and corrections to ``OUT.corrections.csv`` (same
format; blobs base64-encoded in CSV, binary in Parquet).  One row per image (``record=image``)
and one per correction (``record=correction``).

``import`` of a decisions file also imports its ``.corrections`` sibling when present; a
corrections file can also be imported on its own.  Every row is validated before anything is
written (kind, case hash, codec, shapes, the mask against its box and voxel count, the box
inside its case's image, the limits of :mod:`.corrections`); one bad row refuses the whole file
with a one-line error naming the row, and the store is left as it was.
"""
from __future__ import annotations

import base64
import csv
import json
import sys
from pathlib import Path

import numpy as np

from ..atomic import atomic_file
from . import corrections as cr
from .schema import FeedbackStoreError, _now

FIELDS = ("record", "uid", "case_hash", "case_name", "model_id", "kind", "target_key", "proposal_key",
          "proposal_lesion_id", "proposal_confidence", "bbox", "shape", "geometry", "codec", "n_voxels", "volume_ml",
          "reviewer", "decided_at", "blob")
SUFFIX = ".corrections"


def sidecar(path: str | Path) -> Path:
    """``x.csv`` -> ``x.corrections.csv`` (``x.parquet`` -> ``x.corrections.parquet``)."""
    p = Path(path)
    return p.with_name(p.stem + SUFFIX + p.suffix)


def is_corrections_file(path: str | Path) -> bool:
    return Path(path).stem.endswith(SUFFIX)


def export(store, out: str | Path) -> int:
    """Write images + corrections to ``out`` (.csv or .parquet); returns the correction count."""
    out = Path(out)
    images, corr = cr.rows(store)
    recs = [{"record": "image", "case_hash": i["case_hash"], "case_name": i["case_name"], "shape": i["shape"],
             "geometry": i["geometry"], "codec": i["codec"], "blob": i["image"]} for i in images]
    recs += [{"record": "correction", **{k: c[k] for k in FIELDS if k in c}, "blob": c["mask"]} for c in corr]
    with atomic_file(out) as tmp:
        if out.suffix.lower() == ".csv":
            with open(tmp, "w", newline="") as fh:
                w = csv.writer(fh)
                w.writerow(FIELDS)
                for r in recs:
                    w.writerow([_csv_value(k, r.get(k)) for k in FIELDS])
        else:
            import pyarrow as pa
            import pyarrow.parquet as pq

            cols = {k: pa.array([None if r.get(k) is None else str(r[k]) for r in recs], type=pa.string())
                    for k in FIELDS if k != "blob"}
            cols["blob"] = pa.array([r["blob"] for r in recs], type=pa.binary())
            pq.write_table(pa.table(cols), tmp, compression="zstd")
    return len(corr)


def _csv_value(key, v):
    if v is None:
        return ""
    return base64.b64encode(v).decode("ascii") if key == "blob" else v


def _read(src: Path) -> list[dict]:
    if src.suffix.lower() == ".csv":
        csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
        with open(src, newline="") as fh:
            reader = csv.DictReader(fh)
            if "record" not in (reader.fieldnames or []) or "blob" not in (reader.fieldnames or []):
                raise FeedbackStoreError(f"{src} is not a LesionSeg corrections export (no 'record'/'blob' columns)")
            out = []
            for r in reader:
                r = {k: (v if v != "" else None) for k, v in r.items()}
                try:
                    r["blob"] = base64.b64decode(r["blob"] or "", validate=True)
                except ValueError:
                    raise FeedbackStoreError(f"{src}: a row's blob is not valid base64") from None
                out.append(r)
            return out
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(src)
    except Exception as exc:
        raise FeedbackStoreError(f"cannot read {src} as Parquet: {exc}") from None
    if "record" not in table.column_names or "blob" not in table.column_names:
        raise FeedbackStoreError(f"{src} is not a LesionSeg corrections export (no 'record'/'blob' columns)")
    return table.to_pylist()


def _validate(src: Path, recs: list[dict], store) -> tuple[dict, list[dict]]:
    images: dict[str, dict] = {}
    corr = []
    for i, r in enumerate(recs, start=2):
        where = f"{src.name} row {i}"
        h = r.get("case_hash") or ""
        if not cr._HEX64.match(h):
            raise FeedbackStoreError(f"{where}: invalid case hash {h[:20]!r}")
        if r.get("record") == "image":
            if r.get("codec") != cr.IMAGE_CODEC:
                raise FeedbackStoreError(f"{where}: unknown image codec {r.get('codec')!r}")
            try:
                shape = [int(v) for v in json.loads(r["shape"])]
                json.loads(r["geometry"])
            except (TypeError, ValueError):
                raise FeedbackStoreError(f"{where}: invalid image shape or geometry") from None
            if len(shape) != 3 or min(shape) < 1 or int(np.prod(shape)) > cr.MAX_IMAGE_VOXELS or len(r["blob"]) > cr.MAX_BLOB_BYTES:
                raise FeedbackStoreError(f"{where}: image of shape {shape} is invalid or over the limits")
            cr.decode_image(r["blob"], shape)  # raises on a corrupt blob
            images[h] = {"case_hash": h, "case_name": r.get("case_name") or "", "shape": json.dumps(shape),
                         "geometry": r["geometry"], "image": r["blob"], "codec": r["codec"]}
        elif r.get("record") == "correction":
            corr.append((where, r))
        else:
            raise FeedbackStoreError(f"{where}: unknown record type {r.get('record')!r}")
    shapes = {h: json.loads(im["shape"]) for h, im in images.items()}
    for h, s in store._query("SELECT case_hash, shape FROM correction_images"):
        shapes.setdefault(h, json.loads(s))
    out = []
    for where, r in corr:
        if r.get("kind") not in cr.KINDS:
            raise FeedbackStoreError(f"{where}: invalid correction kind {r.get('kind')!r}")
        if r.get("codec") != cr.MASK_CODEC or not r.get("model_id") or not r.get("target_key"):
            raise FeedbackStoreError(f"{where}: a correction needs model_id, target_key and codec {cr.MASK_CODEC!r}")
        if r["case_hash"] not in shapes:
            raise FeedbackStoreError(f"{where}: no image for case {r['case_hash'][:12]} in the file or the store")
        try:
            bbox = json.loads(r["bbox"])
            n = int(float(r["n_voxels"]))
        except (TypeError, ValueError):
            raise FeedbackStoreError(f"{where}: invalid bbox or n_voxels") from None
        shape = shapes[r["case_hash"]]
        ok = (isinstance(bbox, list) and len(bbox) == 2 and all(len(b) == 3 for b in bbox)
              and all(0 <= a < b <= s for a, b, s in zip(bbox[0], bbox[1], shape)))
        if not ok:
            raise FeedbackStoreError(f"{where}: mask box {r['bbox']} lies outside its image {shape}")
        try:
            cr.decode_mask(bbox, r["blob"], n)
        except FeedbackStoreError as exc:
            raise FeedbackStoreError(f"{where}: {exc}") from None
        out.append({**{k: r.get(k) for k in FIELDS}, "mask": r["blob"], "n_voxels": n,
                    "proposal_lesion_id": int(float(r["proposal_lesion_id"])) if r.get("proposal_lesion_id") not in (None, "") else None,
                    "proposal_confidence": float(r["proposal_confidence"]) if r.get("proposal_confidence") not in (None, "") else None,
                    "volume_ml": float(r["volume_ml"] or 0.0), "case_name": r.get("case_name") or "",
                    "reviewer": r.get("reviewer") or "", "decided_at": r.get("decided_at") or _now()})
    return images, out


def import_file(store, src: str | Path, source: str | None = None) -> dict:
    """Validate then merge a corrections export; the newer row wins per (case, model, target)."""
    src = Path(src)
    if not src.exists():
        raise FeedbackStoreError(f"import file {src} not found")
    source = source or f"import:{src.name}"
    images, corr = _validate(src, _read(src), store)
    counts = {"images": 0, "inserted": 0, "updated": 0, "unchanged": 0}
    with store.transaction() as con:
        for im in images.values():
            before = con.total_changes
            cr._put_image(con, im, source)
            counts["images"] += int(con.total_changes > before)
        for r in corr:
            cur = con.execute("SELECT id, decided_at FROM corrections WHERE case_hash = ? AND model_id = ? AND target_key = ?",
                              (r["case_hash"], r["model_id"], r["target_key"])).fetchone()
            if cur is not None and str(r["decided_at"]) <= str(cur["decided_at"]):
                counts["unchanged"] += 1
                continue
            if cur is not None:
                con.execute("DELETE FROM corrections WHERE id = ?", (cur["id"],))
            exists = con.execute("SELECT 1 FROM corrections WHERE uid = ?", (r["uid"],)).fetchone()
            if not r.get("uid") or exists:
                r["uid"] = cr.uuid.uuid4().hex
            cr._insert(con, r, source)
            counts["updated" if cur is not None else "inserted"] += 1
    counts["rows"] = len(corr)
    return counts


# ----------------------------------------------------------------------------- CLI helpers
stats = cr.stats


def format_stats(c: dict) -> str:
    return (f"  corrections on {c['cases']} cases: {c['edited']} edited, {c['added']} added (missed), "
            f"{c['deleted']} deleted (rejected), {c['kept']} kept; images {c['image_bytes'] / 1e6:.1f} MB, "
            f"masks {c['mask_bytes'] / 1e3:.1f} kB")


def cli_export(db, output) -> None:
    """After ``feedback export OUT``: write ``OUT``'s corrections sibling when there are corrections."""
    from .store import FeedbackStore

    with FeedbackStore(db, readonly=True) as store:
        if not store._query("SELECT COUNT(*) FROM corrections")[0][0]:
            return
        n = export(store, sidecar(output))
    print(f"exported {n} corrections to {sidecar(output)}")


def cli_import(store, f) -> bool:
    """Import a corrections file (True: ``f`` was one), or ``f``'s corrections sibling if present."""
    target = Path(f) if is_corrections_file(f) else sidecar(f)
    if not target.exists():
        return False
    c = import_file(store, target)
    print(f"{target}: {c['rows']} corrections, {c['inserted']} new, {c['updated']} updated, "
          f"{c['unchanged']} unchanged; {c['images']} new images")
    return is_corrections_file(f)

"""Sharing decisions between sites: export to and import from CSV or Parquet.

An export carries the current decisions (patches base64-encoded in CSV, binary in Parquet).
An import merges by lesion identity and keeps the newer decision.
"""
from __future__ import annotations

import base64
import csv
import json
import os
import sys
from pathlib import Path
from typing import Iterator, Sequence

from ..atomic import atomic_file
from .codec import PATCH_CODEC, lesion_key
from .schema import SCHEMA_VERSION, FeedbackStoreError, _now
from .store import COLUMNS, FEATURE_PREFIX


def export(store, out: str | os.PathLike, patches: bool = True, model_ids: Sequence[str] | None = None) -> int:
    """Write the current decisions to ``.csv`` or ``.parquet`` (by suffix); returns the row count."""
    out = Path(out)
    fmt = _format_of(out)
    rows = store.decisions(model_ids, patches=patches)
    feat_names = sorted({k for r in rows for k in r["features"]})
    columns = list(COLUMNS) + [FEATURE_PREFIX + n for n in feat_names]
    if patches:
        columns += ["patch_shape", "patch_codec", "patch"]
    with atomic_file(out) as tmp:
        if fmt == "csv":
            with open(tmp, "w", newline="") as fh:
                w = csv.writer(fh)
                w.writerow(columns)
                for r in rows:
                    vals = [r[c] for c in COLUMNS] + [r["features"].get(n, "") for n in feat_names]
                    if patches:
                        vals += [r["patch_shape"] or "", r["patch_codec"] or "",
                                 base64.b64encode(r["patch"]).decode("ascii") if r["patch"] is not None else ""]
                    w.writerow(["" if v is None else v for v in vals])
        else:
            pa, pq = _pyarrow()
            data = {c: [r[c] for r in rows] for c in COLUMNS}
            for n in feat_names:
                data[FEATURE_PREFIX + n] = [r["features"].get(n) for r in rows]
            types = {c: pa.string() for c in COLUMNS}
            types.update({c: pa.float64() for c in ("confidence", "centroid_x", "centroid_y", "centroid_z",
                                                     "volume_ml", "diameter_mm")})
            types.update({"lesion_id": pa.int64(), "revision": pa.int64()})
            arrays = {c: pa.array(data[c], type=types[c]) for c in COLUMNS}
            for n in feat_names:
                arrays[FEATURE_PREFIX + n] = pa.array(data[FEATURE_PREFIX + n], type=pa.float64())
            if patches:
                arrays["patch_shape"] = pa.array([r["patch_shape"] for r in rows], type=pa.string())
                arrays["patch_codec"] = pa.array([r["patch_codec"] for r in rows], type=pa.string())
                arrays["patch"] = pa.array([r["patch"] for r in rows], type=pa.binary())
            table = pa.table(arrays)
            table = table.replace_schema_metadata({"lesionseg.feedback.schema": str(SCHEMA_VERSION)})
            pq.write_table(table, tmp, compression="zstd")
    return len(rows)


def import_file(store, src: str | os.PathLike, source: str | None = None) -> dict:
    """Merge an exported CSV/Parquet file: new lesions are inserted, a lesion already here is
    updated only when the imported decision is newer (with history).  One transaction."""
    src = Path(src)
    fmt = _format_of(src)
    if not src.exists():
        raise FeedbackStoreError(f"import file {src} not found")
    source = source or f"import:{src.name}"
    rows = list(_read_csv(src) if fmt == "csv" else _read_parquet(src))
    counts = {"inserted": 0, "updated": 0, "unchanged": 0}
    with store.transaction() as con:
        for r in rows:
            counts[store._upsert(con, r, source, only_if_newer=True)] += 1
    counts["rows"] = len(rows)
    return counts



def _format_of(path: Path) -> str:
    name = path.name.lower()
    if name.endswith(".csv"):
        return "csv"
    if name.endswith((".parquet", ".pq")):
        return "parquet"
    raise FeedbackStoreError(f"{path}: unknown export format; use a .csv or .parquet file name")


def _pyarrow():
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:  # pragma: no cover - pyarrow is a test dependency
        raise FeedbackStoreError("Parquet needs pyarrow: pip install 'lesionseg[parquet]'") from None
    return pa, pq


def _imported_row(get) -> dict:
    for required in ("case_hash", "model_id", "decision"):
        if not get(required):
            raise FeedbackStoreError(f"import: a row lacks '{required}'")
    cx, cy, cz = (float(get(k) or 0.0) for k in ("centroid_x", "centroid_y", "centroid_z"))
    lesion_id = int(float(get("lesion_id") or 0))
    return {
        "uid": get("uid") or None,
        "case_hash": get("case_hash"),
        "case_name": get("case_name") or "",
        "model_id": get("model_id"),
        "lesion_key": get("lesion_key") or lesion_key((cx, cy, cz), lesion_id),
        "lesion_id": lesion_id,
        "decision": get("decision"),
        "confidence": float(get("confidence") or 0.0),
        "centroid": (cx, cy, cz),
        "volume_ml": float(get("volume_ml") or 0.0),
        "diameter_mm": float(get("diameter_mm") or 0.0),
        "bbox": get("bbox") or None,
        "reviewer": get("reviewer") or "",
        "decided_at": get("decided_at") or _now(),
    }


def _read_csv(src: Path) -> Iterator[dict]:
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    with open(src, newline="") as fh:
        reader = csv.DictReader(fh)
        missing = {"case_hash", "model_id", "decision"} - set(reader.fieldnames or [])
        if missing:
            raise FeedbackStoreError(f"{src} is not a LesionSeg feedback export (missing columns {sorted(missing)})")
        for raw in reader:
            row = _imported_row(lambda k: raw.get(k) or None)
            feats = {k[len(FEATURE_PREFIX):]: float(v) for k, v in raw.items() if k.startswith(FEATURE_PREFIX) and v not in ("", None)}
            row["features"] = json.dumps(feats, sort_keys=True)
            blob = base64.b64decode(raw["patch"]) if raw.get("patch") else None
            row["patch"], row["patch_shape"] = blob, (raw.get("patch_shape") or None) if blob else None
            row["patch_codec"] = (raw.get("patch_codec") or PATCH_CODEC) if blob else None
            yield row


def _read_parquet(src: Path) -> Iterator[dict]:
    pa, pq = _pyarrow()
    try:
        table = pq.read_table(src)
    except Exception as exc:
        raise FeedbackStoreError(f"cannot read {src} as Parquet: {exc}") from None
    missing = {"case_hash", "model_id", "decision"} - set(table.column_names)
    if missing:
        raise FeedbackStoreError(f"{src} is not a LesionSeg feedback export (missing columns {sorted(missing)})")
    cols = table.to_pydict()
    fcols = [c for c in table.column_names if c.startswith(FEATURE_PREFIX)]
    for i in range(table.num_rows):
        row = _imported_row(lambda k: cols[k][i] if k in cols else None)
        feats = {c[len(FEATURE_PREFIX):]: float(cols[c][i]) for c in fcols if cols[c][i] is not None}
        row["features"] = json.dumps(feats, sort_keys=True)
        blob = cols["patch"][i] if "patch" in cols else None
        row["patch"], row["patch_shape"] = blob, (cols["patch_shape"][i] if blob else None)
        row["patch_codec"] = (cols.get("patch_codec", [PATCH_CODEC] * table.num_rows)[i] or PATCH_CODEC) if blob else None
        yield row

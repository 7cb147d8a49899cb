"""Sharing decisions between sites: export to and import from CSV or Parquet.

An export carries the current decisions (patches base64-encoded in CSV, binary in Parquet).
An import merges by lesion identity and keeps the newer decision.

Imported files are not trusted.  Every row is checked before it can touch the database, and a
bad row is skipped and counted by reason (never aborting the import); the file as a whole is
refused with one line only when it is not a feedback export at all:

* ``decision`` is one of accepted / rejected / unsure; ``case_hash`` and ``model_id`` are present;
  text fields are short, without control characters; ``uid`` is a plain token;
* ``decided_at`` is an ISO-8601 time, not later than now plus :data:`CLOCK_SKEW` (a future-dated
  row could otherwise win every "newer decision" comparison); "newer" compares times, not text;
* numbers (confidence in [0, 1], centroid, volume, diameter, lesion id, features) are finite and
  in range; ``bbox`` is two integer triples; at most :data:`MAX_FEATURES` features;
* a patch is valid base64 (CSV), has a known codec and a plausible ``patch_shape``, and
  decompresses (with a hard limit, see :func:`.codec.decode_patch`) to exactly that shape with
  finite values;
* the lesion key is recomputed from the centroid / lesion id, never taken from the file;
* CSV records are read with a size bound (:data:`MAX_RECORD_BYTES`) without changing the ``csv``
  module's process-wide field size limit: the patch, the last column of an export, is split off
  before the rest of the record goes to :mod:`csv`.

Valid rows are written in batches of :data:`BATCH_ROWS`, each in one transaction; importing a
file again changes nothing, so an interrupted import can simply be repeated.
"""
from __future__ import annotations

import base64
import binascii
import contextlib
import csv
import datetime as _dt
import json
import math
import re
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from ..atomic import atomic_file
from ..io.csv_cells import safe_cell, unescape_cell
from .codec import MAX_PATCH_BYTES, PATCH_CODEC, PATCH_CODECS, decode_patch, lesion_key, max_blob_bytes
from .schema import DECISION_VALUES, SCHEMA_VERSION, FeedbackStoreError, parse_time
from .store import COLUMNS, FEATURE_PREFIX, MISSED

CLOCK_SKEW = _dt.timedelta(minutes=5)
MAX_FEATURES = 256
MAX_IMPORT_ROWS = 1_000_000
BATCH_ROWS = 256
#: the longest CSV record accepted: the largest patch in base64 plus 64 KiB for everything else
MAX_RECORD_BYTES = 4 * (max_blob_bytes(MAX_PATCH_BYTES) + 2) // 3 + 65536
MAX_HEADER_BYTES = 65536
MAX_ERRORS_KEPT = 20
TEXT_LIMITS = {"uid": 64, "case_hash": 128, "case_name": 512, "model_id": 200, "reviewer": 200, "decided_at": 40,
               "bbox": 1024, "patch_shape": 40, "patch_codec": 40}
REQUIRED = ("case_hash", "model_id", "decision")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_UID = re.compile(r"^[0-9A-Za-z_-]{1,64}$")


class RowError(Exception):
    """One imported row is unusable: ``reason`` (counted) and a one-line detail."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


# ----------------------------------------------------------------------------- export
def export(store, out, patches: bool = True, model_ids: Sequence[str] | None = None) -> int:
    """Write the current decisions to ``.csv`` or ``.parquet`` (by suffix); returns the row count.
    An existing ``out`` is replaced atomically; a missing folder is not created."""
    out = check_output(out)
    with output_errors(out), atomic_file(out) as tmp:
        return write_decisions(store, tmp, _format_of(out), patches, model_ids)


def check_output(out, corrections_ok: bool = False) -> Path:
    """``out`` after checking that an export can be written there (one-line error otherwise):
    a known format, not a ``.corrections`` name (those are the corrections written beside an
    export), not a folder, in a folder that exists (nothing is created outside it)."""
    out = Path(out)
    _format_of(out)
    if not corrections_ok and out.stem.lower().endswith(".corrections"):
        raise FeedbackStoreError(f"{out}: names ending .corrections{out.suffix} are kept for the corrections written "
                                 "beside an export; choose another output name")
    if out.is_dir():
        raise FeedbackStoreError(f"cannot write {out}: it is a folder")
    if not out.parent.is_dir():
        raise FeedbackStoreError(f"cannot write {out}: the folder {out.parent} does not exist")
    return out


@contextlib.contextmanager
def output_errors(out: Path):
    """An OS error while writing ``out`` (its temporary file, the rename) as one line naming ``out``."""
    try:
        yield
    except OSError as exc:
        raise FeedbackStoreError(f"cannot write {out}: {exc.strerror or exc}") from None


def write_decisions(store, tmp, fmt: str, patches: bool = True, model_ids: Sequence[str] | None = None) -> int:
    """Write the current decisions to the file ``tmp`` in format ``fmt``; returns the row count.
    CSV text cells are written so that a spreadsheet does not run them (:mod:`..io.csv_cells`)."""
    rows = store.decisions(model_ids, patches=patches)
    feat_names = sorted({k for r in rows for k in r["features"]})
    columns = list(COLUMNS) + [FEATURE_PREFIX + n for n in feat_names]
    if patches:
        columns += ["patch_shape", "patch_codec", "patch"]  # the patch last: see the module notes
    if fmt == "csv":
        with open(tmp, "w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh)
            w.writerow(columns)
            for r in rows:
                vals = [r[c] for c in COLUMNS] + [r["features"].get(n, "") for n in feat_names]
                if patches:
                    vals += [r["patch_shape"] or "", r["patch_codec"] or ""]
                vals = [safe_cell("" if v is None else v) for v in vals]
                if patches:  # base64 (it may begin with '+') is not escaped: the patch is never text
                    vals.append(base64.b64encode(r["patch"]).decode("ascii") if r["patch"] is not None else "")
                w.writerow(vals)
    else:
        pa, pq = _pyarrow()
        types = {c: pa.string() for c in COLUMNS}
        types.update({c: pa.float64() for c in ("confidence", "centroid_x", "centroid_y", "centroid_z",
                                                 "volume_ml", "diameter_mm")})
        types.update({"lesion_id": pa.int64(), "revision": pa.int64()})
        arrays = {c: pa.array([r[c] for r in rows], type=types[c]) for c in COLUMNS}
        for n in feat_names:
            arrays[FEATURE_PREFIX + n] = pa.array([r["features"].get(n) for r in rows], type=pa.float64())
        if patches:
            arrays["patch_shape"] = pa.array([r["patch_shape"] for r in rows], type=pa.string())
            arrays["patch_codec"] = pa.array([r["patch_codec"] for r in rows], type=pa.string())
            arrays["patch"] = pa.array([r["patch"] for r in rows], type=pa.binary())
        table = pa.table(arrays).replace_schema_metadata({"lesionseg.feedback.schema": str(SCHEMA_VERSION)})
        pq.write_table(table, tmp, compression="zstd", row_group_size=BATCH_ROWS)
    return len(rows)


# ----------------------------------------------------------------------------- import
def import_file(store, src, source: str | None = None) -> dict:
    """Merge an exported CSV/Parquet file (see the module notes).  Returns the counts:
    ``rows``, ``inserted``, ``updated``, ``unchanged``, ``skipped``, ``skipped_by_reason`` and the
    first :data:`MAX_ERRORS_KEPT` row errors (``errors``)."""
    src, fmt = _import_source(src)
    source = source or f"import:{src.name[:180]}"
    counts = {"rows": 0, "inserted": 0, "updated": 0, "unchanged": 0, "skipped": 0, "skipped_by_reason": {}, "errors": []}
    now = _dt.datetime.now(_dt.timezone.utc)
    batch: list[dict] = []
    for where, item in (_csv_rows(src, now) if fmt == "csv" else _parquet_rows(src, now)):
        counts["rows"] += 1
        if counts["rows"] > MAX_IMPORT_ROWS:
            item = RowError("beyond the row limit", f"more than {MAX_IMPORT_ROWS} rows")
        if isinstance(item, RowError):
            counts["skipped"] += 1
            counts["skipped_by_reason"][item.reason] = counts["skipped_by_reason"].get(item.reason, 0) + 1
            if len(counts["errors"]) < MAX_ERRORS_KEPT:
                counts["errors"].append(f"{where}: {item}")
            continue
        batch.append(item)
        if len(batch) >= BATCH_ROWS:
            _write(store, batch, source, counts)
            batch = []
    _write(store, batch, source, counts)
    return counts


def _write(store, rows: list[dict], source: str, counts: dict) -> None:
    if not rows:
        return
    with store.transaction() as con:
        for r in rows:
            counts[store._upsert(con, r, source, only_if_newer=True)] += 1


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


# ----------------------------------------------------------------------------- row checks
def _text(get, key: str, required: bool = False, limits: dict | None = None) -> str:
    """A text field (``limits``: characters allowed per key, default :data:`TEXT_LIMITS`; 512 for others)."""
    limits = TEXT_LIMITS if limits is None else limits
    v = get(key)
    if v is None or v == "":
        if required:
            raise RowError("missing field", f"no '{key}'")
        return ""
    if not isinstance(v, str):
        raise RowError("wrong type", f"'{key}' is a {type(v).__name__}, not text")
    if len(v) > limits.get(key, 512):
        raise RowError("text too long", f"'{key}' has {len(v)} characters (at most {limits.get(key, 512)})")
    if _CONTROL.search(v):
        raise RowError("control characters", f"'{key}' holds control characters")
    return v


def _number(v, key: str, lo: float, hi: float, default: float | None = 0.0) -> float:
    if v is None or v == "":
        if default is None:
            raise RowError("missing field", f"no '{key}'")
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float, str)) or (isinstance(v, str) and len(v) > 40):
        raise RowError("wrong type", f"'{key}' is not a number")
    try:
        x = float(v)
    except ValueError:
        raise RowError("bad number", f"'{key}' = {str(v)[:20]!r} is not a number") from None
    if not math.isfinite(x) or not lo <= x <= hi:
        raise RowError("bad number", f"'{key}' = {x:g} is not finite or outside [{lo:g}, {hi:g}]")
    return x


def _bbox(text: str) -> str | None:
    if not text:
        return None
    try:
        b = json.loads(text)
    except ValueError:
        raise RowError("bad bbox", "'bbox' is not JSON") from None
    ok = (isinstance(b, list) and len(b) == 2 and all(isinstance(t, list) and len(t) == 3 for t in b)
          and all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**31 for t in b for v in t))
    if not ok:
        raise RowError("bad bbox", "'bbox' is not two triples of voxel indices")
    return json.dumps(b)


def _patch(blob, shape, codec) -> tuple:
    if blob is None or blob == b"":
        return None, None, None
    if not isinstance(blob, (bytes, bytearray)):
        raise RowError("wrong type", "'patch' is not binary")
    if not isinstance(shape, str) or not shape:
        raise RowError("bad patch", "a patch without 'patch_shape'")
    codec = codec or PATCH_CODEC
    if not isinstance(codec, str) or codec not in PATCH_CODECS:
        raise RowError("bad patch", f"unknown patch codec {str(codec)[:40]!r}")
    try:
        p = decode_patch(bytes(blob), shape, codec)
    except FeedbackStoreError as exc:
        raise RowError("bad patch", str(exc)) from None
    if not np.isfinite(p).all():
        raise RowError("bad patch", "the patch holds NaN or infinite values")
    return bytes(blob), shape, codec


def _validated(get, features: list[tuple[str, object]], blob, now: _dt.datetime) -> dict:
    """A database row from an imported row (``get(column)``), or :class:`RowError`."""
    row = {k: _text(get, k, k in REQUIRED) for k in ("case_hash", "model_id", "case_name", "reviewer")}
    decision = get("decision")
    if decision not in DECISION_VALUES:
        raise RowError("bad decision", f"decision {str(decision)[:20]!r} is not one of {', '.join(DECISION_VALUES)}")
    decided = _text(get, "decided_at", required=True)
    t = parse_time(decided)
    if t is None:
        raise RowError("bad timestamp", f"decided_at {decided[:40]!r} is not an ISO-8601 time")
    if t > now + CLOCK_SKEW:
        raise RowError("decided in the future", f"decided_at {decided} is later than now ({now.isoformat(timespec='seconds')})")
    uid = _text(get, "uid")
    if uid and not _UID.match(uid):
        raise RowError("bad uid", "'uid' is not a plain token")
    centroid = tuple(_number(get(k), k, -1e6, 1e6) for k in ("centroid_x", "centroid_y", "centroid_z"))
    lesion_id = _number(get("lesion_id"), "lesion_id", 0, 2**31 - 1)
    if lesion_id != int(lesion_id):
        raise RowError("bad number", "'lesion_id' is not an integer")
    if len(features) > MAX_FEATURES:
        raise RowError("too many features", f"{len(features)} features (at most {MAX_FEATURES})")
    feats = {}
    for name, v in features:
        if len(name) > 64 or _CONTROL.search(name):
            raise RowError("bad features", "a feature name is too long or holds control characters")
        if v is not None and v != "":
            feats[name] = _number(v, FEATURE_PREFIX + name[:30], -1e12, 1e12)
    patch, shape, codec = _patch(blob, get("patch_shape"), get("patch_codec"))
    row.update({
        "uid": uid or None,
        "lesion_key": lesion_key(centroid, int(lesion_id)),
        "lesion_id": int(lesion_id),
        "decision": decision,
        "confidence": _number(get("confidence"), "confidence", 0.0, 1.0),
        "centroid": centroid,
        "volume_ml": _number(get("volume_ml"), "volume_ml", 0.0, 1e7),
        "diameter_mm": _number(get("diameter_mm"), "diameter_mm", 0.0, 1e5),
        "bbox": _bbox(_text(get, "bbox")),
        "decided_at": decided.strip(),
        "features": json.dumps(feats, sort_keys=True),
        "patch": patch, "patch_shape": shape, "patch_codec": codec,
        # a lesion the automatic pass missed stays "missed" through an exchange (FROC counts it)
        "kept_source": MISSED if get("source") == MISSED else None,
    })
    return row


def _checked_columns(src: Path, names) -> None:
    missing = set(REQUIRED) - set(names)
    if missing:
        raise FeedbackStoreError(f"{src} is not a LesionSeg feedback export (missing columns {sorted(missing)})")


# ----------------------------------------------------------------------------- CSV
def _records(fh, limit: int, lineno: int = 0) -> Iterator[tuple[int, str | None]]:
    """``(first line number, record text)`` of each CSV record (a quoted field may span lines);
    ``None`` for a record longer than ``limit`` bytes or not UTF-8, which is skipped."""
    while True:
        start = lineno + 1
        parts, size, bad = [], 0, False
        while True:
            line = fh.readline(limit + 1)
            if not line:
                break
            if not line.endswith(b"\n") and len(line) > limit:  # consume the rest of this line
                while line and not line.endswith(b"\n"):
                    line = fh.readline(limit + 1)
                lineno += 1
                bad = True
                break
            lineno += 1
            parts.append(line)
            size += len(line)
            if size > limit:
                bad = True
                break
            if b"".join(parts).count(b'"') % 2 == 0:
                break
        if not parts and not bad:
            return
        if bad:
            yield start, None
            continue
        try:
            yield start, b"".join(parts).decode("utf-8")
        except UnicodeDecodeError:
            yield start, None


def _split(text: str, patch_last: bool) -> list[str]:
    """Fields of one record; with ``patch_last`` the trailing base64 patch is split off first, so
    :mod:`csv` only sees short fields (its default field size limit stays in force)."""
    text = text.rstrip("\r\n")
    tail = None
    if patch_last:
        text, _, tail = text.rpartition(",")
        tail = tail.strip('"')
    fields = next(csv.reader([text], strict=True)) if text else [""]
    return fields + ([tail] if patch_last else [])


def _csv_rows(src: Path, now) -> Iterator[tuple[str, dict | RowError]]:
    with open(src, "rb") as fh:
        first, header = next(_records(fh, MAX_HEADER_BYTES), (1, ""))
        if header is None:  # a header record too long (or not UTF-8) to read: not "missing columns"
            raise FeedbackStoreError(f"{src} is not a LesionSeg feedback export (its header line is longer than "
                                     f"{MAX_HEADER_BYTES} bytes or not UTF-8 text)")
        try:
            columns = next(csv.reader([header.rstrip("\r\n")], strict=True)) if header else []
        except csv.Error:
            columns = []
        _checked_columns(src, columns)
        if "patch" in columns and columns[-1] != "patch":  # the record reader needs the patch last
            raise FeedbackStoreError(f"{src}: its 'patch' column is not the last one (column {columns.index('patch') + 1} "
                                     f"of {len(columns)}); LesionSeg exports write it last. Re-export the file")
        patch_last = columns[-1] == "patch"
        fcols = [(i, c[len(FEATURE_PREFIX):]) for i, c in enumerate(columns) if c.startswith(FEATURE_PREFIX)]
        for start, text in _records(fh, MAX_RECORD_BYTES, lineno=first):
            where = f"{src.name} line {start}"
            if text is None:
                yield where, RowError("unreadable record", f"longer than {MAX_RECORD_BYTES} bytes or not UTF-8 text")
                continue
            if not text.strip():
                continue
            try:
                vals = _split(text, patch_last)
                if len(vals) != len(columns):
                    raise RowError("malformed record", f"{len(vals)} fields, the header has {len(columns)}")
                vals = [v if c == "patch" else unescape_cell(v) for c, v in zip(columns, vals)]
                raw = dict(zip(columns, vals))
                blob = None
                if raw.get("patch"):
                    try:
                        blob = base64.b64decode(raw["patch"], validate=True)
                    except (binascii.Error, ValueError):
                        raise RowError("bad base64", "'patch' is not valid base64") from None
                yield where, _validated(lambda k: raw.get(k) or None, [(n, vals[i]) for i, n in fcols], blob, now)
            except csv.Error as exc:
                yield where, RowError("malformed record", f"not CSV ({exc})")
            except RowError as exc:
                yield where, exc


# ----------------------------------------------------------------------------- Parquet
def _parquet_file(src: Path):
    """The open ``pyarrow.parquet.ParquetFile``, its columns and its uncompressed sizes checked."""
    pa, pq = _pyarrow()
    try:
        pf = pq.ParquetFile(src)
    except Exception as exc:
        raise FeedbackStoreError(f"cannot read {src} as Parquet: {str(exc).splitlines()[0][:200]}") from None
    _checked_columns(src, pf.schema_arrow.names)
    _checked_sizes(src, pf)
    return pf


def _parquet_rows(src: Path, now) -> Iterator[tuple[str, dict | RowError]]:
    pa, _ = _pyarrow()
    pf = _parquet_file(src)
    fcols = [c for c in pf.schema_arrow.names if c.startswith(FEATURE_PREFIX)]
    n = 0
    try:
        for batch in pf.iter_batches(batch_size=BATCH_ROWS):
            for raw in batch.to_pylist():
                n += 1
                where = f"{src.name} row {n}"
                try:
                    blob = raw.get("patch")
                    if blob is not None and isinstance(blob, (bytes, bytearray)) and len(blob) > max_blob_bytes(MAX_PATCH_BYTES):
                        raise RowError("bad patch", f"patch of {len(blob)} bytes is too large")
                    yield where, _validated(lambda k: raw.get(k), [(c[len(FEATURE_PREFIX):], raw[c]) for c in fcols], blob, now)
                except RowError as exc:
                    yield where, exc
    except (OSError, ValueError, pa.ArrowException) as exc:
        raise FeedbackStoreError(f"cannot read {src} as Parquet after {n} rows: {str(exc).splitlines()[0][:200]}") from None


def _checked_sizes(src: Path, pf) -> None:
    """Refuse, from the file's metadata and before anything is decompressed, a Parquet file whose
    columns would inflate beyond what valid rows can hold (a 400 MB text compresses to a few kB)."""
    meta = pf.metadata
    for g in range(meta.num_row_groups):
        rg = meta.row_group(g)
        for c in range(rg.num_columns):
            col = rg.column(c)
            name = col.path_in_schema
            per_row = 4 * max_blob_bytes(MAX_PATCH_BYTES) if name == "patch" else 4 * TEXT_LIMITS.get(name, 1024)
            if col.total_uncompressed_size > rg.num_rows * per_row + 65536:
                raise FeedbackStoreError(
                    f"{src}: column {name!r} would decompress to {col.total_uncompressed_size} bytes for {rg.num_rows} "
                    "rows, more than a LesionSeg export holds")


def _import_source(src) -> tuple[Path, str]:
    """(path, "csv" or "parquet") of a file to import: refused when missing or not a file."""
    src = Path(src)
    fmt = _format_of(src)
    if not src.exists():
        raise FeedbackStoreError(f"import file {src} not found")
    if not src.is_file():
        raise FeedbackStoreError(f"import file {src} is not a file")
    return src, fmt


def check_file(src) -> None:
    """Refuse (one line) a file that cannot be a decisions export, reading only its header:
    missing, not a file, an unknown format, missing columns.  Nothing is opened for writing."""
    src, fmt = _import_source(src)
    if fmt == "csv":
        next(iter(_csv_rows(src, _dt.datetime.now(_dt.timezone.utc))), None)  # reads and checks the header
        return
    _parquet_file(src)

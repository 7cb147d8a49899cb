"""Sharing corrections between sites: ``lesionseg feedback export|import`` carry them too.

``export OUT.csv`` (or ``.parquet``) writes the decisions to ``OUT.csv`` and, when the store holds
corrections, the corrected cases' images and corrections to ``OUT.corrections.csv`` (same
format; blobs base64-encoded in CSV, binary in Parquet).  One row per image (``record=image``)
and one per correction (``record=correction``).  Both files are renamed into place together; a
``.corrections`` sibling left by an earlier export is removed when the store holds none, so it is
never imported with the new file.  CSV text cells are escaped against spreadsheet formulas
(:mod:`..io.csv_cells`).

``import`` of a decisions file also imports its ``.corrections`` sibling when present; a
corrections file can also be imported on its own.  Every row is validated before anything is
written (kind, case hash, codec, shapes, the image geometry, the mask against its box and voxel
count, the box inside its case's image, finite numbers, short printable texts, a decision time
not in the future, the limits of :mod:`.corrections`; see :mod:`.corrections_checks`); blobs are
inflated with a bound (no decompression bomb); one bad row refuses the whole file with a
one-line error naming the row, and the store is left as it was.  The newer row wins, comparing
times, not text.
"""
from __future__ import annotations

import base64
import contextlib
import csv
import datetime as _dt
import json
import os
from pathlib import Path

from ..atomic import AtomicWriter, atomic_file
from ..io.csv_cells import safe_cell, unescape_cell
from . import corrections as cr
from . import corrections_checks as ck
from .exchange import _format_of, _pyarrow, check_output, output_errors, write_decisions
from .schema import FeedbackStoreError, is_newer

FIELDS = ("record", "uid", "case_hash", "case_name", "model_id", "kind", "target_key", "proposal_key",
          "proposal_lesion_id", "proposal_confidence", "bbox", "shape", "geometry", "codec", "n_voxels", "volume_ml",
          "reviewer", "decided_at", "blob")
SUFFIX = ".corrections"
#: the longest CSV field accepted: a compressed image of the largest size, in base64
MAX_FIELD_CHARS = 4 * (cr.MAX_BLOB_BYTES + 2) // 3 + 16


def sidecar(path: str | Path) -> Path:
    """``x.csv`` -> ``x.corrections.csv`` (``x.parquet`` -> ``x.corrections.parquet``)."""
    p = Path(path)
    return p.with_name(p.stem + SUFFIX + p.suffix)


def is_corrections_file(path: str | Path) -> bool:
    return Path(path).stem.endswith(SUFFIX)


def export(store, out: str | Path) -> int:
    """Write images + corrections to ``out`` (.csv or .parquet); returns the correction count."""
    out = check_output(out, corrections_ok=True)
    with output_errors(out), atomic_file(out) as tmp:
        return write_corrections(store, tmp, _format_of(out))


def write_corrections(store, tmp, fmt: str) -> int:
    """Write images + corrections to the file ``tmp`` in format ``fmt``; returns the correction count."""
    images, corr = cr.rows(store)
    recs = [{"record": "image", "case_hash": i["case_hash"], "case_name": i["case_name"], "shape": i["shape"],
             "geometry": i["geometry"], "codec": i["codec"], "blob": i["image"]} for i in images]
    recs += [{"record": "correction", **{k: c[k] for k in FIELDS if k in c}, "blob": c["mask"]} for c in corr]
    if fmt == "csv":
        with open(tmp, "w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh)
            w.writerow(FIELDS)
            for r in recs:
                w.writerow([_csv_value(k, r.get(k)) for k in FIELDS])
    else:
        pa, pq = _pyarrow()
        cols = {k: pa.array([None if r.get(k) is None else str(r[k]) for r in recs], type=pa.string())
                for k in FIELDS if k != "blob"}
        cols["blob"] = pa.array([r["blob"] for r in recs], type=pa.binary())
        pq.write_table(pa.table(cols), tmp, compression="zstd")
    return len(corr)


def export_all(store, out, patches: bool = True, model_ids=None) -> tuple[int, int | None, bool]:
    """``feedback export OUT``: the decisions to ``OUT`` and, when the store holds corrections,
    them to ``OUT``'s ``.corrections`` sibling, both renamed into place together.  A sibling left
    by an earlier export of a store with corrections is removed, so it is never imported with the
    new file.  Returns (decisions, corrections or None, whether a stale sibling was removed)."""
    out = check_output(out)
    side = sidecar(out)
    fmt = _format_of(out)
    has_corr = bool(store._query("SELECT COUNT(*) FROM corrections")[0][0])
    removed = False
    with output_errors(out):
        w = AtomicWriter(out.parent)  # the folder exists (check_output): nothing is created
        try:
            n = write_decisions(store, w.path(out.name), fmt, patches, model_ids)
            n_corr = write_corrections(store, w.path(side.name), fmt) if has_corr else None
            if not has_corr and (side.exists() or side.is_symlink()):
                if side.is_dir():
                    raise FeedbackStoreError(f"cannot write {out}: a folder {side.name} is beside it")
                os.unlink(side)  # last step before the renames: never a new export with an old sibling
                removed = True
        except BaseException:
            w.abort()
            raise
        w.commit()
    return n, n_corr, removed


def _csv_value(key, v):
    if v is None:
        return ""
    return base64.b64encode(v).decode("ascii") if key == "blob" else safe_cell(v)


@contextlib.contextmanager
def _field_size_limit(n: int):
    """``csv``'s field size limit raised to ``n`` for the block, then put back."""
    old = csv.field_size_limit()
    csv.field_size_limit(n)
    try:
        yield
    finally:
        csv.field_size_limit(old)


def _read(src: Path) -> list[dict]:
    if src.suffix.lower() == ".csv":
        try:
            with _field_size_limit(MAX_FIELD_CHARS), open(src, newline="", encoding="utf-8") as fh:
                reader = csv.DictReader(fh)
                names = reader.fieldnames or []
                if "record" not in names or "blob" not in names:
                    raise FeedbackStoreError(f"{src} is not a LesionSeg corrections export (no 'record'/'blob' columns)")
                out = []
                for r in reader:
                    if None in r or None in r.values():
                        raise FeedbackStoreError(f"{src} line {reader.line_num}: {len(r) - (None in r)} fields where the "
                                                 f"header has {len(names)}")
                    r = {k: (None if v == "" else v if k == "blob" else unescape_cell(v)) for k, v in r.items()}
                    try:
                        r["blob"] = base64.b64decode(r["blob"] or "", validate=True)
                    except ValueError:
                        raise FeedbackStoreError(f"{src} line {reader.line_num}: the blob is not valid base64") from None
                    out.append(r)
                return out
        except UnicodeDecodeError as exc:
            raise FeedbackStoreError(f"{src} is not a LesionSeg corrections export (not UTF-8 text at byte "
                                     f"{exc.start})") from None
        except csv.Error as exc:
            raise FeedbackStoreError(f"{src} is not a LesionSeg corrections export (not CSV: {exc})") from None
    pa, pq = _pyarrow()
    try:
        pf = pq.ParquetFile(src)
    except Exception as exc:
        raise FeedbackStoreError(f"cannot read {src} as Parquet: {str(exc).splitlines()[0][:200]}") from None
    names = pf.schema_arrow.names
    if "record" not in names or "blob" not in names:
        raise FeedbackStoreError(f"{src} is not a LesionSeg corrections export (no 'record'/'blob' columns)")
    meta = pf.metadata
    for g in range(meta.num_row_groups):  # from the metadata, before anything is decompressed
        rg = meta.row_group(g)
        for c in range(rg.num_columns):
            col = rg.column(c)
            per_row = cr.MAX_BLOB_BYTES if col.path_in_schema == "blob" else 4 * ck.LIMITS.get(col.path_in_schema, 1024)
            if col.total_uncompressed_size > rg.num_rows * per_row + 65536:
                raise FeedbackStoreError(f"{src}: column {col.path_in_schema!r} would decompress to "
                                         f"{col.total_uncompressed_size} bytes, more than a LesionSeg export holds")
    try:
        return pf.read().to_pylist()
    except Exception as exc:
        raise FeedbackStoreError(f"cannot read {src} as Parquet: {str(exc).splitlines()[0][:200]}") from None


def check_file(src) -> None:
    """Refuse (one line) a file that is not a corrections export, before any database is opened."""
    src = Path(src)
    _format_of(src)
    if not src.is_file():
        raise FeedbackStoreError(f"import file {src} {'is not a file' if src.exists() else 'not found'}")
    if src.suffix.lower() != ".csv":  # Parquet: the schema, from the footer
        pa, pq = _pyarrow()
        try:
            names = pq.ParquetFile(src).schema_arrow.names
        except Exception as exc:
            raise FeedbackStoreError(f"cannot read {src} as Parquet: {str(exc).splitlines()[0][:200]}") from None
        if "record" not in names or "blob" not in names:
            raise FeedbackStoreError(f"{src} is not a LesionSeg corrections export (no 'record'/'blob' columns)")
        return
    with open(src, "rb") as fh:
        raw = fh.readline(65536)
    try:
        head = raw.decode("utf-8").lstrip("\ufeff").rstrip("\r\n")
    except UnicodeDecodeError:
        raise FeedbackStoreError(f"{src} is not a LesionSeg corrections export (its header is not UTF-8 text)") from None
    try:
        names = next(csv.reader([head]), []) if head else []
    except csv.Error:
        names = []
    if "record" not in names or "blob" not in names:
        raise FeedbackStoreError(f"{src} is not a LesionSeg corrections export (no 'record'/'blob' columns)")


def _validate(src: Path, recs: list[dict], store) -> tuple[dict, list[dict]]:
    images: dict[str, dict] = {}
    corr = []
    now = _dt.datetime.now(_dt.timezone.utc)
    for i, r in enumerate(recs, start=2):
        where = f"{src.name} row {i}"
        if not isinstance(r.get("blob"), (bytes, bytearray)):
            raise FeedbackStoreError(f"{where}: the blob is not binary")
        h = ck.text(r, "case_hash", where, required=True)
        if not cr._HEX64.match(h):
            raise FeedbackStoreError(f"{where}: invalid case hash {h[:20]!r}")
        record = ck.text(r, "record", where)
        if record == "image":
            if ck.text(r, "codec", where) != cr.IMAGE_CODEC:
                raise FeedbackStoreError(f"{where}: unknown image codec {str(r.get('codec'))[:40]!r}")
            shape = ck.shape(r, where)
            geometry = ck.geometry(r, where)
            if len(r["blob"]) > cr.MAX_BLOB_BYTES:
                raise FeedbackStoreError(f"{where}: image blob of {len(r['blob'])} bytes is over the limit of {cr.MAX_BLOB_BYTES}")
            try:
                cr.decode_image(r["blob"], shape)  # raises on a corrupt blob (bounded: never a bomb)
            except FeedbackStoreError as exc:
                raise ck.fail(where, exc) from None
            images[h] = {"case_hash": h, "case_name": ck.text(r, "case_name", where), "shape": json.dumps(shape),
                         "geometry": geometry, "image": bytes(r["blob"]), "codec": cr.IMAGE_CODEC}
        elif record == "correction":
            corr.append((where, r))
        else:
            raise FeedbackStoreError(f"{where}: unknown record type {record[:20]!r}")
    shapes = {h: json.loads(im["shape"]) for h, im in images.items()}
    for h, s in store._query("SELECT case_hash, shape FROM correction_images"):
        shapes.setdefault(h, json.loads(s))
    out = []
    for where, r in corr:
        kind = ck.text(r, "kind", where)
        if kind not in cr.KINDS:
            raise FeedbackStoreError(f"{where}: invalid correction kind {kind[:20]!r}")
        model_id = ck.text(r, "model_id", where)
        target = ck.plain_key(r, "target_key", where)
        if ck.text(r, "codec", where) != cr.MASK_CODEC or not model_id or not target:
            raise FeedbackStoreError(f"{where}: a correction needs model_id, target_key and codec {cr.MASK_CODEC!r}")
        if r["case_hash"] not in shapes:
            raise FeedbackStoreError(f"{where}: no image for case {r['case_hash'][:12]} in the file or the store")
        bbox = ck.bbox(r, where, shapes[r["case_hash"]])
        n = ck.number(r, "n_voxels", where, 1, cr.MAX_MASK_VOXELS, integer=True, required=True)
        try:
            cr.decode_mask(bbox, r["blob"], n)
        except FeedbackStoreError as exc:
            raise ck.fail(where, exc) from None
        out.append({"uid": ck.uid(r, where), "case_hash": r["case_hash"], "case_name": ck.text(r, "case_name", where),
                    "model_id": model_id, "kind": kind, "target_key": target,
                    "proposal_key": ck.plain_key(r, "proposal_key", where) or None,
                    "proposal_lesion_id": ck.number(r, "proposal_lesion_id", where, 0, 2**31 - 1, integer=True),
                    "proposal_confidence": ck.number(r, "proposal_confidence", where, 0.0, 1.0),
                    "bbox": json.dumps(bbox), "mask": bytes(r["blob"]), "codec": cr.MASK_CODEC, "n_voxels": n,
                    "volume_ml": ck.number(r, "volume_ml", where, 0.0, 1e7) or 0.0,
                    "reviewer": ck.text(r, "reviewer", where), "decided_at": ck.decided_at(r, where, now)})
    return images, out


def import_file(store, src: str | Path, source: str | None = None) -> dict:
    """Validate then merge a corrections export; the newer row wins per (case, model, target)
    ("newer" compares times, not text)."""
    src = Path(src)
    check_file(src)
    source = source or f"import:{src.name[:180]}"
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
            if cur is not None and not is_newer(r["decided_at"], cur["decided_at"]):
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


def cli_import(store, f) -> bool:
    """Import a corrections file (True: ``f`` was one), or ``f``'s corrections sibling if present."""
    target = Path(f) if is_corrections_file(f) else sidecar(f)
    if not target.exists():
        return False
    c = import_file(store, target)
    print(f"{target}: {c['rows']} corrections, {c['inserted']} new, {c['updated']} updated, "
          f"{c['unchanged']} unchanged; {c['images']} new images")
    return is_corrections_file(f)

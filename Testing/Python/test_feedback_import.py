"""Importing feedback files from another site (review D4): every row is validated; a bad row is
skipped and counted, never aborting the import or a later retraining; a future-dated row never
overwrites a local decision; hostile input (decompression bombs, implausible shapes, path-like
tokens) is refused by name; the user never sees a traceback."""
from __future__ import annotations

import base64
import csv
import datetime as dt
import zlib
from collections import Counter

import numpy as np
import pytest

from feedback_testdata import synthetic_decision
from LesionSegLib.engine.feedback import FeedbackStore, FeedbackStoreError
from LesionSegLib.engine.feedback.codec import decode_patch
from LesionSegLib.engine.learn.labels import from_store


def _exported_rows(tmp_path, decisions) -> tuple[list[str], list[dict]]:
    """Header and rows of a real CSV export of ``decisions`` (the test then edits the rows)."""
    src = FeedbackStore(tmp_path / "src.db")
    src.record_many(decisions)
    out = tmp_path / "src.csv"
    src.export(out)
    src.close()
    with open(out, newline="") as fh:
        r = csv.DictReader(fh)
        return list(r.fieldnames), list(r)


def _write(path, header, rows) -> None:
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, header)
        w.writeheader()
        w.writerows(rows)


def test_future_dated_row_never_overwrites_a_local_decision(tmp_path):
    local = FeedbackStore(tmp_path / "local.db")
    mine = synthetic_decision(1, "accepted")
    mine.reviewer = "me"
    local.record(mine)
    header, rows = _exported_rows(tmp_path, [synthetic_decision(1, "rejected")])
    hostile = []
    for stamp in ("9999", "9999-01-01T00:00:00+00:00", "2099-06-01T00:00:00Z", "not a time"):
        hostile.append({**rows[0], "decided_at": stamp, "reviewer": "mallory"})
    path = tmp_path / "hostile.csv"
    _write(path, header, hostile)

    c = local.import_file(path)
    assert c["rows"] == 4 and c["skipped"] == 4 and c["updated"] == c["inserted"] == 0
    assert c["skipped_by_reason"] == {"decided in the future": 2, "bad timestamp": 2}
    assert all("hostile.csv line" in e for e in c["errors"])
    (row,) = local.decisions()
    assert row["decision"] == "accepted" and row["reviewer"] == "me" and row["revision"] == 1

    # a genuinely newer row (a minute ago, after the local one) does travel; "newer" compares times
    later = (dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=1)).isoformat()
    with local.transaction() as con:
        con.execute("UPDATE decisions SET decided_at = '2026-01-01T10:00:00+01:00'")
    _write(path, header, [{**rows[0], "decided_at": later, "reviewer": "colleague"}])
    assert local.import_file(path)["updated"] == 1
    assert local.decisions()[0]["decision"] == "rejected"


def test_bad_rows_are_skipped_and_counted_and_retraining_still_runs(tmp_path):
    decisions = [synthetic_decision(i, "accepted" if i % 2 else "rejected") for i in range(8)]
    header, rows = _exported_rows(tmp_path, decisions)
    shape_of_other = "3,16,32,32"  # the blob is 3x32^3: it does not decompress to this shape
    rows[1]["patch_shape"] = shape_of_other
    rows[2]["patch"] = "!!not base64!!"
    rows[3]["decision"] = "maybe"
    rows[4]["confidence"] = "nan"
    rows[5]["uid"] = "../../etc/passwd"  # path-like token
    rows[6]["model_id"] = "m@1\x07"  # control character
    rows[7]["bbox"] = '[[0, 0, 0], [1, 1, "x"]]'
    path = tmp_path / "mixed.csv"
    _write(path, header, rows)

    store = FeedbackStore(tmp_path / "fb.db")
    c = store.import_file(path)
    assert c["rows"] == 8 and c["inserted"] == 1 and c["skipped"] == 7
    assert c["skipped_by_reason"] == {"bad patch": 1, "bad base64": 1, "bad decision": 1, "bad number": 1,
                                      "bad uid": 1, "control characters": 1, "bad bbox": 1}
    assert any("line 3" in e and "does not decompress to shape 3,16,32,32" in e for e in c["errors"])
    assert store.count() == 1
    # nothing unreadable reached the database: labelled() and from_store() work
    assert len(store.labelled()) == 1 and len(from_store(store)) == 1


def test_out_of_range_values_are_refused_by_name(tmp_path):
    """Finite but impossible values: a confidence above 1, a negative volume or voxel index, a
    fractional lesion id, and a patch of NaN (it would reach the training data)."""
    from LesionSegLib.engine.feedback.codec import encode_patch

    header, rows = _exported_rows(tmp_path, [synthetic_decision(i) for i in range(1, 7)])
    nan_blob, nan_shape = encode_patch(np.full((3, 32, 32, 32), np.nan, np.float32))
    bad = {"confidence": ("1.5", "bad number", "'confidence' = 1.5 is not finite or outside [0, 1]"),
           "volume_ml": ("-2", "bad number", "'volume_ml' = -2 is not finite or outside"),
           "bbox": ("[[-5, 0, 0], [1, 1, 1]]", "bad bbox", "not two triples of voxel indices"),
           "lesion_id": ("2.5", "bad number", "'lesion_id' is not an integer"),
           "patch": (base64.b64encode(nan_blob).decode(), "bad patch", "NaN or infinite values")}
    for row, (column, (value, _, _)) in zip(rows, bad.items()):
        row[column] = value
    assert rows[4]["patch_shape"] == nan_shape
    path = tmp_path / "range.csv"
    _write(path, header, rows)

    store = FeedbackStore(tmp_path / "fb.db")
    c = store.import_file(path)
    assert c["rows"] == 6 and c["inserted"] == 1 and c["skipped"] == 5, c
    assert c["skipped_by_reason"] == {"bad number": 3, "bad bbox": 1, "bad patch": 1} \
        == dict(Counter(reason for _, reason, _ in bad.values()))
    for line, (_, _, text) in enumerate(bad.values(), start=2):
        assert any(f"line {line}" in e and text in e for e in c["errors"]), (line, text, c["errors"])
    (kept,) = store.decisions()
    assert kept["lesion_id"] == 6 and len(store.labelled()) == 1


def test_decompression_bomb_and_implausible_shapes_are_refused(tmp_path):
    # 64 MiB of zeros compress to ~64 KiB: inflating it is bounded by the declared patch size
    bomb = zlib.compress(b"\0" * (64 << 20), 9)
    with pytest.raises(FeedbackStoreError, match="does not decompress to shape"):
        decode_patch(bomb, "3,32,32,32")
    for shape, why in (("3,4096,4096,4096", "not a plausible patch"), ("3,32,32", "not a plausible patch"),
                       ("a,b,c,d", "not four integers"), ("-1,32,32,32", "not a plausible patch")):
        with pytest.raises(FeedbackStoreError, match=why):
            decode_patch(bomb, shape)
    with pytest.raises(FeedbackStoreError, match="too large for shape"):
        decode_patch(b"x" * 300_000, "3,32,32,32")
    with pytest.raises(FeedbackStoreError, match="unknown patch codec"):
        decode_patch(bomb, "3,32,32,32", codec="pickle")

    header, rows = _exported_rows(tmp_path, [synthetic_decision(0), synthetic_decision(1)])
    rows[0]["patch"] = base64.b64encode(bomb).decode()
    rows[1]["patch_shape"] = "3,4096,4096,4096"
    path = tmp_path / "bomb.csv"
    _write(path, header, rows)
    store = FeedbackStore(tmp_path / "fb.db")
    c = store.import_file(path)
    assert c["skipped"] == 2 and c["skipped_by_reason"] == {"bad patch": 2} and store.count() == 0


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_parquet_and_csv_rows_are_checked_alike(tmp_path, fmt):
    import pyarrow

    pa = pyarrow if fmt == "parquet" else None
    src = FeedbackStore(tmp_path / "src.db")
    ds = [synthetic_decision(i) for i in range(3)]
    ds[1].timestamp = "2999-01-01T00:00:00+00:00"
    src.record_many(ds)
    out = tmp_path / f"x.{fmt}"
    src.export(out)
    if pa is not None:  # corrupt one blob in the Parquet file too
        import pyarrow.parquet as pq

        t = pq.read_table(out)
        blobs = t.column("patch").to_pylist()
        blobs[2] = blobs[2][: len(blobs[2]) // 2]
        t = t.set_column(t.schema.get_field_index("patch"), "patch", pa.array(blobs, type=pa.binary()))
        pq.write_table(t, out)
    dst = FeedbackStore(tmp_path / "dst.db")
    c = dst.import_file(out)
    assert c["skipped_by_reason"].get("decided in the future") == 1
    assert c["inserted"] == (1 if pa is not None else 2)


def test_a_bad_stored_patch_is_skipped_by_retraining_not_a_traceback(tmp_path, capsys):
    """A row that slipped into the database (older version, manual edit) with a patch that does
    not match its shape is skipped and counted; the CLI prints one line, never a traceback."""
    from LesionSegLib.engine.cli import main

    store = FeedbackStore(tmp_path / "fb.db")
    store.record_many([synthetic_decision(i, "accepted" if i % 2 else "rejected") for i in range(6)])
    with store.transaction() as con:
        con.execute("UPDATE decisions SET patch_shape = '3,16,32,32' WHERE lesion_id = 2")
        con.execute("UPDATE decisions SET patch = ? WHERE lesion_id = 3", (b"garbage",))
    ls = store.labelled()
    assert len(ls) == 4 and ls.skipped == {"unreadable patch": 2}
    store.close()
    rc = main(["retrain", "--feedback", str(tmp_path / "fb.db"), "--all-models", "--progress", "none"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "too few labels" in err and "2 unreadable patch" in err


def test_cli_import_reports_skips_and_refuses_foreign_files_in_one_line(tmp_path, capsys):
    from LesionSegLib.engine.cli import main

    header, rows = _exported_rows(tmp_path, [synthetic_decision(0), synthetic_decision(1)])
    rows[1]["decided_at"] = "3000-01-01T00:00:00+00:00"
    good = tmp_path / "good.csv"
    _write(good, header, rows)
    foreign = tmp_path / "foreign.csv"
    foreign.write_text("a,b\n1,2\n")
    db = tmp_path / "fb.db"
    assert main(["feedback", "import", "--db", str(db), str(good), str(foreign), str(tmp_path / "absent.csv")]) == 2
    out, err = capsys.readouterr()
    assert "1 new" in out and "1 skipped" in out and "1 decided in the future" in out
    assert "Traceback" not in err and len(err.strip().splitlines()) == 2
    assert "foreign.csv is not a LesionSeg feedback export" in err and "absent.csv not found" in err
    assert FeedbackStore(db).count() == 1
    # a header too long to read is said as such, not as "missing columns"
    wide = tmp_path / "wide.csv"
    wide.write_text(",".join(["case_hash", "model_id", "decision"] + [f"c{i}" for i in range(20000)]) + "\n")
    assert main(["feedback", "import", "--db", str(db), str(wide)]) == 2
    err = capsys.readouterr().err
    assert "header line is longer than 65536 bytes" in err and "missing columns" not in err
    # only missing files: refused before the database is opened, so none is created
    fresh = tmp_path / "new.db"
    assert main(["feedback", "import", "--db", str(fresh), str(tmp_path / "absent.csv")]) == 2
    assert "absent.csv not found; nothing was imported" in capsys.readouterr().err and not fresh.exists()


def test_oversized_csv_record_is_skipped(tmp_path):
    header, rows = _exported_rows(tmp_path, [synthetic_decision(0), synthetic_decision(1)])
    rows[0]["patch"] = "A" * (12 << 20)  # a 12 MB field: longer than any real record
    path = tmp_path / "big.csv"
    _write(path, header, rows)
    store = FeedbackStore(tmp_path / "fb.db")
    c = store.import_file(path)
    assert c["skipped_by_reason"] == {"unreadable record": 1} and c["inserted"] == 1
    assert np.array_equal(store.patch(store.decisions()[0]["uid"]), synthetic_decision(1).patch)

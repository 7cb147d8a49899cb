"""Hostile corrections files (``x.corrections.csv`` / ``.parquet``): every bad row refuses the file
in one line naming the row, nothing reaches the store, no decompression bomb inflates, dates are
compared as times, the CLI never shows a traceback and still imports the other files."""
from __future__ import annotations

import base64
import csv
import hashlib
import json
import zlib

import numpy as np
import pytest

from feedback_testdata import synthetic_decision
from LesionSegLib.engine.cli import main as cli_main
from LesionSegLib.engine.feedback import FeedbackStore, FeedbackStoreError
from LesionSegLib.engine.feedback import corrections as cr
from LesionSegLib.engine.feedback import corrections_exchange as cx
from LesionSegLib.engine.feedback.grid import ModelGrid

GEOMETRY = {"origin_lps": [0, 0, 0], "spacing_zyx": [3, 2, 2], "direction": [1, 0, 0, 0, 1, 0, 0, 0, 1],
            "input_size_xyz": [30, 30, 20], "box_lo_zyx": [0, 0, 0], "box_hi_zyx": [20, 30, 30]}


def corrected_store(path, case="CORR", model="m@1", when=None):
    """A store with one corrected case (20x30x30 grid): one added and one deleted correction."""
    g = ModelGrid(np.full((20, 30, 30), -500, np.int16), dict(GEOMETRY))
    m1 = np.zeros(g.shape, bool)
    m1[5:8, 5:9, 5:9] = True
    m2 = np.zeros(g.shape, bool)
    m2[10:12, 20:22, 20:23] = True
    store = FeedbackStore(path)
    cr.save_case(store, hashlib.sha256(case.encode()).hexdigest(), case, model, g,
                 [cr.Correction("added", m1), cr.Correction("deleted", m2, "c:1.0,2.0,3.0", 1, 0.4)],
                 decided_at=when)
    return store


@pytest.fixture()
def exported(tmp_path):
    """(header, image row, correction rows) of a real corrections export, and a store holding them."""
    src = corrected_store(tmp_path / "src.db", when="2024-01-01T00:00:00+00:00")
    out = tmp_path / "src.corrections.csv"
    cx.export(src, out)
    with open(out, newline="") as fh:
        rows = list(csv.DictReader(fh))
    header = list(rows[0].keys())
    image = next(r for r in rows if r["record"] == "image")
    corr = [r for r in rows if r["record"] == "correction"]
    return src, header, image, corr


def write(path, header, rows):
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, header)
        w.writeheader()
        w.writerows(rows)
    return path


def bomb(n_bytes: int) -> str:
    return base64.b64encode(zlib.compress(b"\0" * n_bytes, 9)).decode()


def test_zlib_bombs_are_refused_without_inflating(tmp_path, exported):
    """D1: an image or mask blob inflating far beyond its shape is refused by the bounded decoder."""
    src, header, image, corr = exported
    with pytest.raises(FeedbackStoreError, match="decompresses to more than the 2 bytes"):
        cr.decode_image(zlib.compress(b"\0" * (64 << 20)), (1, 1, 1))
    with pytest.raises(FeedbackStoreError, match="decompresses to more than"):
        cr.decode_mask([[0, 0, 0], [3, 4, 4]], zlib.compress(b"\0" * (64 << 20)))
    dst = FeedbackStore(tmp_path / "dst.db")
    img_bomb = {**image, "blob": bomb(32 << 20), "shape": "[1, 1, 1]"}
    with pytest.raises(FeedbackStoreError, match=r"row 2: correction image decompresses to more"):
        cx.import_file(dst, write(tmp_path / "i.corrections.csv", header, [img_bomb]))
    mask_bomb = {**corr[0], "blob": bomb(32 << 20)}
    with pytest.raises(FeedbackStoreError, match=r"row 3: correction mask decompresses to more"):
        cx.import_file(dst, write(tmp_path / "m.corrections.csv", header, [image, mask_bomb]))
    assert cr.stats(dst)["cases"] == 0


@pytest.mark.parametrize("field,value,message", [
    ("proposal_lesion_id", "nan", "'proposal_lesion_id' = nan is not finite"),
    ("proposal_lesion_id", "abc", "'proposal_lesion_id' = 'abc' is not a number"),
    ("proposal_lesion_id", "1.5", "is not an integer"),
    ("n_voxels", "inf", "'n_voxels' = inf is not finite"),
    ("proposal_confidence", "nan", "'proposal_confidence' = nan"),
    ("volume_ml", "-inf", "'volume_ml' = -inf"),
    ("case_name", "N" * 100_000, "'case_name' has 100000 characters"),
    ("model_id", "m\x00x", "'model_id' holds control characters"),
    ("reviewer", "a\x1bb", "'reviewer' holds control characters"),
    ("uid", "../../x", "'uid' is not a plain token"),
])
def test_bad_numbers_and_texts_refuse_the_file_in_one_line(tmp_path, exported, field, value, message):
    """D2: numbers are finite and in range, texts short and printable; one line names the row."""
    src, header, image, corr = exported
    dst = FeedbackStore(tmp_path / "dst.db")
    rows = [image, {**corr[1], field: value}]
    with pytest.raises(FeedbackStoreError) as err:
        cx.import_file(dst, write(tmp_path / "bad.corrections.csv", header, rows))
    text = str(err.value)
    assert "bad.corrections.csv row 3" in text and message in text and "\n" not in text and len(text) < 300
    assert cr.stats(dst)["cases"] == 0


def test_non_utf8_and_binary_files_are_refused_by_name(tmp_path, exported, capsys):
    """D2: a Latin-1 or binary file is one line (via the CLI: no traceback), nothing imported."""
    src, header, image, corr = exported
    latin = tmp_path / "latin.corrections.csv"
    latin.write_bytes((",".join(header) + "\n").encode() + b"image,,caf\xe9\n")
    binary = tmp_path / "bin.corrections.csv"
    binary.write_bytes(np.random.default_rng(0).bytes(3000))
    dst = FeedbackStore(tmp_path / "dst.db")
    with pytest.raises(FeedbackStoreError, match="not UTF-8"):
        cx.import_file(dst, latin)
    dst.close()
    for f in (latin, binary):
        assert cli_main(["feedback", "import", "--db", str(tmp_path / "dst.db"), str(f)]) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and str(f) in err and "UTF-8" in err and len(err.strip().splitlines()) == 1


def test_future_and_garbage_dates_are_refused_and_compared_as_times(tmp_path, exported):
    """D3: a future or unreadable decided_at is refused; a stored unreadable one loses to a real
    later time; an earlier row never replaces a later one (times, not text)."""
    src, header, image, corr = exported
    dst = FeedbackStore(tmp_path / "dst.db")
    cx.import_file(dst, tmp_path / "src.corrections.csv")
    for stamp, message in (("9999-12-31T00:00:00+00:00", "later than now"), ("zzzz", "not an ISO-8601 time"), ("", "no 'decided_at'")):
        with pytest.raises(FeedbackStoreError, match=message):
            cx.import_file(dst, write(tmp_path / "t.corrections.csv", header,
                                      [image, {**corr[0], "decided_at": stamp, "reviewer": "mallory"}]))
    assert {c["reviewer"] for c in cr.rows(dst, blobs=False)[1]} == {""}
    # a row stored (by an older version) with a garbage date is replaced by a genuinely later one
    with dst.transaction() as con:
        con.execute("UPDATE corrections SET decided_at = 'zzzz' WHERE kind = 'added'")
    later = {**corr[0], "decided_at": "2025-01-01T00:00:00+00:00", "reviewer": "legit"}
    assert cx.import_file(dst, write(tmp_path / "l.corrections.csv", header, [image, later]))["updated"] == 1
    # "2024-06-01T00:00:00+05:00" sorts after "2024-06-01T00:00:00+00:00" as text but is earlier
    a = {**corr[1], "decided_at": "2024-06-01T00:00:00+00:00", "reviewer": "utc"}
    b = {**corr[1], "decided_at": "2024-06-01T03:00:00+05:00", "reviewer": "east"}
    cx.import_file(dst, write(tmp_path / "a.corrections.csv", header, [image, a]))
    assert cx.import_file(dst, write(tmp_path / "b.corrections.csv", header, [image, b]))["unchanged"] == 1
    reviewers = {c["kind"]: c["reviewer"] for c in cr.rows(dst, blobs=False)[1]}
    assert reviewers == {"added": "legit", "deleted": "utc"}


@pytest.mark.parametrize("geometry,message", [
    ("1", "not a JSON object"),
    ('{"spacing_zyx": [NaN, 0, -1]}', "'origin_lps'"),
    (json.dumps({**GEOMETRY, "spacing_zyx": [0, 2, 2]}), "'spacing_zyx'"),
    (json.dumps({**GEOMETRY, "direction": [0] * 9}), "not a rotation"),
    (json.dumps({**GEOMETRY, "origin_lps": [0, 0]}), "'origin_lps'"),
    (json.dumps({k: v for k, v in GEOMETRY.items() if k != "direction"}), "'direction'"),
    ("not json", "not JSON"),
])
def test_bad_image_geometry_is_refused(tmp_path, exported, geometry, message):
    """D4: a geometry fine-tuning could not use (not an object, NaN, zero spacing, no rotation)."""
    src, header, image, corr = exported
    dst = FeedbackStore(tmp_path / "dst.db")
    h = "b" * 64
    rows = [{**image, "geometry": geometry, "case_hash": h}, {**corr[0], "case_hash": h}]
    with pytest.raises(FeedbackStoreError, match=message) as err:
        cx.import_file(dst, write(tmp_path / "g.corrections.csv", header, rows))
    assert "g.corrections.csv row 2" in str(err.value)
    assert cr.stats(dst)["cases"] == 0
    # the valid geometry of a real export loads back as a case fine-tuning can use
    cx.import_file(dst, tmp_path / "src.corrections.csv")
    (case,) = cr.load_cases(dst)
    assert case.geometry["spacing_zyx"] == [3, 2, 2]


def test_parquet_field_bomb_is_refused_from_metadata(tmp_path, exported):
    """D5: a Parquet text field that would inflate to megabytes is refused from the footer."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from LesionSegLib.engine.feedback import exchange

    src, *_ = exported
    src.record_many([synthetic_decision(i) for i in range(3)])
    out = tmp_path / "d.parquet"
    src.export(out)
    t = pq.read_table(out).slice(0, 1)
    i = t.schema.get_field_index("case_name")
    pq.write_table(t.set_column(i, "case_name", pa.array(["Z" * 8_000_000])), tmp_path / "bomb.parquet",
                   compression="zstd")
    dst = FeedbackStore(tmp_path / "dst.db")
    with pytest.raises(FeedbackStoreError, match="'case_name' would decompress to 8000"):
        exchange.import_file(dst, tmp_path / "bomb.parquet")
    assert dst.count() == 0
    # and a corrections Parquet file
    cout = tmp_path / "c.corrections.parquet"
    cx.export(src, cout)
    ct = pq.read_table(cout)
    j = ct.schema.get_field_index("reviewer")
    pq.write_table(ct.set_column(j, "reviewer", pa.array(["R" * 8_000_000] * ct.num_rows)), tmp_path / "b.corrections.parquet",
                   compression="zstd")
    with pytest.raises(FeedbackStoreError, match="'reviewer' would decompress"):
        cx.import_file(dst, tmp_path / "b.corrections.parquet")
    assert cx.import_file(dst, cout)["inserted"] == 2  # the genuine file still imports


def test_a_bad_corrections_file_does_not_stop_the_other_files(tmp_path, exported, capsys):
    """D8: a bad sidecar is one error line; its decisions file and the other files are imported."""
    src, header, image, corr = exported
    src.record_many([synthetic_decision(i, case="A") for i in range(3)])
    src.export(tmp_path / "a.csv")
    other = FeedbackStore(tmp_path / "other.db")
    other.record_many([synthetic_decision(i, case="B") for i in range(4)])
    other.export(tmp_path / "b.csv")
    other.close()
    write(tmp_path / "a.corrections.csv", header, [image, {**corr[0], "bbox": "[[0,0,0],[999,999,999]]"}])
    bad_alone = write(tmp_path / "z.corrections.csv", header, [image, {**corr[0], "n_voxels": "nan"}])
    db = tmp_path / "dst.db"
    rc = cli_main(["feedback", "import", "--db", str(db), str(tmp_path / "a.csv"), str(bad_alone), str(tmp_path / "b.csv")])
    out, err = capsys.readouterr()
    assert rc == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 2
    assert "a.corrections.csv row 3: mask box" in err and "z.corrections.csv row 3" in err
    dst = FeedbackStore(db)
    assert dst.count() == 7 and cr.stats(dst)["cases"] == 0


def test_field_size_limit_is_restored(tmp_path, exported):
    """D15: importing a corrections CSV leaves csv's process-wide field size limit as it was."""
    src, *_ = exported
    before = csv.field_size_limit()
    csv.field_size_limit(131072)  # csv's default, whatever an earlier test left
    dst = FeedbackStore(tmp_path / "dst.db")
    assert cx.import_file(dst, tmp_path / "src.corrections.csv")["inserted"] == 2
    assert csv.field_size_limit() == 131072
    try:
        assert cx.import_file(dst, tmp_path / "src.corrections.csv")["unchanged"] == 2
        assert csv.field_size_limit() == 131072
        with pytest.raises(FeedbackStoreError):
            cx.import_file(dst, write(tmp_path / "x.corrections.csv", ["record", "blob"], [{"record": "image", "blob": "!"}]))
        assert csv.field_size_limit() == 131072
    finally:
        csv.field_size_limit(before)


def test_corrections_csv_cells_are_not_formulas_and_round_trip(tmp_path):
    """D13: a case name or reviewer starting with = + - @ is written with a leading apostrophe and
    read back exactly."""
    store = corrected_store(tmp_path / "a.db", case="=HYPERLINK(\"x\")")
    with store.transaction() as con:
        con.execute("UPDATE corrections SET reviewer = '@SUM(A1)'")
    out = tmp_path / "s.corrections.csv"
    cx.export(store, out)
    text = out.read_text()
    assert "'=HYPERLINK" in text and "'@SUM(A1)" in text
    with open(out, newline="") as fh:
        cells = [c for row in csv.reader(fh) for c in row]
    assert not any(c.startswith(("=", "+", "@", "\t", "\r")) for c in cells if len(c) < 200)
    dst = FeedbackStore(tmp_path / "b.db")
    cx.import_file(dst, out)
    images, corr = cr.rows(dst, blobs=False)
    assert images[0]["case_name"] == "=HYPERLINK(\"x\")" and {c["reviewer"] for c in corr} == {"@SUM(A1)"}


def test_safe_cell_escapes_formulas_and_keeps_numbers():
    """D13: the escaping function leaves numbers (negative ones too) and plain text alone."""
    from LesionSegLib.engine.io.csv_cells import safe_cell, unescape_cell

    for v in (-1.5, 3, "-1.5", "+2e3", "12", None, "a=b", "", "'plain"):
        assert safe_cell(v) == v
    for v in ("=1+1", "+cmd", "-x", "@A", "\tx", "\rx", "'=x", "-", "-inf"):
        assert safe_cell(v) == "'" + v and unescape_cell(safe_cell(v)) == v
    assert unescape_cell("'plain") == "'plain"

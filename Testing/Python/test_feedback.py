"""The feedback store: records, history, schema migrations, refusal of bad files, export/import,
the DecisionRecorder hook and the CLI."""
from __future__ import annotations

import hashlib
import json
import sqlite3
import zlib

import numpy as np
import pytest

from feedback_testdata import real_decisions, synthetic_decision
from LesionSegLib.engine import feedback as fb
from LesionSegLib.engine.cli import feedback as fb_cli
from LesionSegLib.engine.feedback import schema as fb_schema
from LesionSegLib.engine.feedback import FeedbackStore, FeedbackStoreError
from LesionSegLib.review import DecisionRecorder


def sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_record_everything_and_read_back(tmp_path):
    store = FeedbackStore(tmp_path / "fb.db")
    decisions = [synthetic_decision(i, "accepted" if i % 3 else "rejected") for i in range(12)]
    decisions.append(synthetic_decision(99, "unsure"))
    assert store.record_many(decisions) == ["inserted"] * 13
    assert store.count() == 13

    rows = {r["lesion_id"]: r for r in store.decisions()}
    d = decisions[4]
    r = rows[4]
    assert r["case_name"] == d.case_name and r["case_hash"] == d.case_hash
    assert r["decision"] == "accepted" and r["confidence"] == pytest.approx(d.confidence)
    assert r["model_id"] == "m@1" and r["reviewer"] == "tester" and r["decided_at"] == d.timestamp
    assert (r["centroid_x"], r["centroid_y"], r["centroid_z"]) == pytest.approx(d.centroid_lps)
    assert r["volume_ml"] == pytest.approx(d.volume_ml) and r["diameter_mm"] == pytest.approx(d.diameter_mm)
    assert json.loads(r["bbox"]) == [list(v) for v in d.bbox_ijk]
    assert r["features"] == pytest.approx(d.features)

    ls = store.labelled(feature_names=list(d.features))
    assert len(ls) == 12 and ls.skipped == {"unsure": 1}  # unsure lesions are not training labels
    assert ls.labels.tolist() == [1 if i % 3 else 0 for i in range(12)]
    # patches come back bit-exact (float16, lossless compression)
    assert ls.patches.dtype == np.float16 and ls.patches.shape == (12, 3, 32, 32, 32)
    np.testing.assert_array_equal(ls.patches[4], decisions[4].patch)

    s = store.stats()
    assert s["decisions"] == 13 and s["by_model"]["m@1"] == {"accepted": 8, "rejected": 4, "unsure": 1}
    assert s["by_class"] == {"accepted": 8, "rejected": 4, "unsure": 1} and s["cases"] == 1
    assert "m@1" in fb_cli.format_stats(s)


def test_wal_and_pragmas(tmp_path):
    store = FeedbackStore(tmp_path / "fb.db")
    con = store._conn()
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert con.execute("PRAGMA application_id").fetchone()[0] == fb.APPLICATION_ID
    assert con.execute("PRAGMA user_version").fetchone()[0] == fb.SCHEMA_VERSION
    assert con.execute("PRAGMA busy_timeout").fetchone()[0] == fb_schema.BUSY_TIMEOUT_MS
    # a failing batch is rolled back as a whole (explicit transaction)
    good = synthetic_decision(1)
    bad = synthetic_decision(2)
    bad.decision = "maybe"  # bypasses Decision's own check
    with pytest.raises(FeedbackStoreError, match="invalid decision"):
        store.record_many([good, bad])
    assert store.count() == 0


def test_changing_a_decision_updates_and_keeps_history(tmp_path):
    store = FeedbackStore(tmp_path / "fb.db")
    d = synthetic_decision(5, "accepted")
    assert store.record(d) == "inserted"
    assert store.record(d) == "unchanged"  # the same click twice is not a change

    d2 = synthetic_decision(5, "rejected")
    d2.reviewer = "second-opinion"
    d2.timestamp = "2030-01-01T00:00:00+00:00"
    assert store.record(d2) == "updated"
    d3 = synthetic_decision(5, "unsure")
    # a re-run that renumbered the lesion (other threshold) still finds it by its centroid
    d3.lesion_id = 17
    assert store.record(d3) == "updated"

    assert store.count() == 1
    row = store.decisions()[0]
    assert row["decision"] == "unsure" and row["revision"] == 3 and row["lesion_id"] == 17
    hist = store.history(d.case_hash, d.model_id, d.centroid_lps)
    assert [h["decision"] for h in hist] == ["accepted", "rejected", "unsure"]
    assert [h["revision"] for h in hist] == [1, 2, 3]
    assert hist[1]["reviewer"] == "second-opinion" and hist[1]["decided_at"] == "2030-01-01T00:00:00+00:00"
    # the panel keys decisions by centroid; its lesion id (the last one recorded) finds them too
    assert [h["decision"] for h in store.history(d.case_hash, d.model_id, 17)] == ["accepted", "rejected", "unsure"]
    assert store.history(d.case_hash, d.model_id, 5) == []
    assert store.stats()["changes"] == 2
    # the patch recorded first is kept when later decisions carry none
    d4 = synthetic_decision(5, "accepted", with_patch=False)
    store.record(d4)
    np.testing.assert_array_equal(store.patch(row["uid"]), d.patch)


def test_lesions_without_centroid_are_keyed_by_id(tmp_path):
    store = FeedbackStore(tmp_path / "fb.db")
    a = synthetic_decision(1)
    b = synthetic_decision(2)
    a.centroid_lps = b.centroid_lps = (0.0, 0.0, 0.0)
    store.record_many([a, b])
    assert store.count() == 2
    assert store.history(a.case_hash, a.model_id, 1)[0]["decision"] == "accepted"


def test_recorder_routes_accept_reject_into_the_store(tmp_path):
    rec = DecisionRecorder(reviewer="dr-who")
    store = FeedbackStore(tmp_path / "site.db")
    rec.add_sink(store)
    d = synthetic_decision(3, "rejected")
    d.reviewer = ""
    rec.record(d)
    row = store.decisions()[0]
    assert row["decision"] == "rejected" and row["reviewer"] == "dr-who"
    rec.remove_sink(store)
    rec.record(synthetic_decision(4))
    assert store.count() == 1 and rec.sinks == []


def test_recorder_log_is_bounded_and_keeps_no_patches(tmp_path, monkeypatch):
    """R6: a long session's log does not grow without bound nor hold ~192 KiB patches; the
    sinks still get the full decision."""
    monkeypatch.setattr(DecisionRecorder, "LOG_LIMIT", 5)
    rec = DecisionRecorder(reviewer="me")
    store = FeedbackStore(tmp_path / "fb.db")
    rec.add_sink(store)
    for i in range(8):
        rec.record(synthetic_decision(i))
    assert [d.lesion_id for d in rec.log] == [3, 4, 5, 6, 7] and all(d.patch is None for d in rec.log)
    assert store.count() == 8 and store.stats()["with_patch"] == 8


def test_schema_migration_from_version_1(tmp_path):
    path = tmp_path / "old.db"
    con = sqlite3.connect(path, isolation_level=None)
    fb_schema._migrate(con, target=1)  # a database as the first release wrote it
    patch = np.arange(3 * 32 * 32 * 32, dtype=np.float16).reshape(3, 32, 32, 32) / 1000
    v1_blob = zlib.compress(patch.view(np.uint8).tobytes())  # version-1 codec: plain zlib
    con.execute(
        "INSERT INTO decisions (uid, case_hash, case_name, model_id, lesion_key, lesion_id, decision, confidence, "
        "features, patch, patch_shape, reviewer, decided_at, created_at, updated_at) VALUES "
        "('u1', 'h', 'case', 'm@1', 'id:1', 1, 'rejected', 0.7, '{\"a\": 1.0}', ?, '3,32,32,32', 'r', 't0', 't0', 't0')",
        (v1_blob,),
    )
    con.execute("INSERT INTO history (decision_id, revision, decision, confidence, reviewer, decided_at, recorded_at) "
                "VALUES (1, 1, 'rejected', 0.7, 'r', 't0', 't0')")
    con.close()
    assert fb.inspect_file(path)["schema_version"] == 1
    before = sha(path)

    with pytest.raises(FeedbackStoreError, match="older feedback schema"):
        FeedbackStore(path, readonly=True)  # read-only never migrates
    store = FeedbackStore(path)
    assert store.schema_version == fb.SCHEMA_VERSION
    backup = tmp_path / "old.db.schema1.bak"
    assert backup.exists() and fb.inspect_file(backup)["schema_version"] == 1
    row = store.decisions()[0]
    assert row["decision"] == "rejected" and row["source"] == "review"  # new column, default filled in
    np.testing.assert_array_equal(store.patch("u1"), patch)  # old codec still decodes
    # new rows use the new codec; the old history is kept and extended
    d = synthetic_decision(1, "accepted", case="case", model_id="m@1")
    d.case_hash, d.centroid_lps = "h", (0.0, 0.0, 0.0)
    assert store.record(d) == "updated"
    assert [h["decision"] for h in store.history("h", "m@1", 1)] == ["rejected", "accepted"]
    codec = store._query("SELECT patch_codec FROM decisions WHERE uid='u1'")[0][0]
    assert codec == fb.PATCH_CODEC
    assert before != sha(path)


def test_newer_schema_is_refused_untouched(tmp_path):
    path = tmp_path / "future.db"
    FeedbackStore(path).close()
    con = sqlite3.connect(path)
    con.execute("PRAGMA user_version = 99")
    con.commit()
    con.close()
    before = sha(path)
    with pytest.raises(FeedbackStoreError, match="newer than this LesionSeg supports"):
        FeedbackStore(path)
    assert sha(path) == before


@pytest.mark.parametrize("kind", ["random-bytes", "text", "foreign-sqlite", "damaged-pages", "truncated"])
def test_corrupt_or_foreign_file_is_refused_and_never_overwritten(tmp_path, kind):
    path = tmp_path / "feedback.db"
    if kind == "random-bytes":
        path.write_bytes(np.random.default_rng(0).bytes(50_000))
    elif kind == "text":
        path.write_text("case,decision\nA,accepted\n")
    elif kind == "foreign-sqlite":
        con = sqlite3.connect(path)
        con.execute("CREATE TABLE invoices (id INTEGER, amount REAL)")
        con.execute("INSERT INTO invoices VALUES (1, 9.5)")
        con.commit()
        con.close()
    else:
        store = FeedbackStore(path)
        store.record_many([synthetic_decision(i) for i in range(30)])
        store.close()
        con = sqlite3.connect(path)
        con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        con.execute("PRAGMA journal_mode = DELETE")
        con.close()
        raw = bytearray(path.read_bytes())
        if kind == "damaged-pages":  # header intact, b-tree pages overwritten
            raw[4096:4096 * 4] = np.random.default_rng(1).bytes(4096 * 3)
        else:
            raw = raw[: len(raw) // 3]
        path.write_bytes(bytes(raw))
    before = sha(path)
    with pytest.raises(FeedbackStoreError) as err:
        store = FeedbackStore(path)
        store.record(synthetic_decision(1000))  # must never get this far on a bad file
        store.labelled()
    msg = str(err.value)
    assert str(path) in msg and ("not a LesionSeg feedback database" in msg or "corrupt" in msg)
    assert sha(path) == before
    with pytest.raises(FeedbackStoreError):
        FeedbackStore(path, readonly=True)
    assert sha(path) == before


def test_directory_and_missing_file(tmp_path):
    with pytest.raises(FeedbackStoreError, match="is a folder"):
        FeedbackStore(tmp_path)
    with pytest.raises(FeedbackStoreError, match="no feedback database"):
        FeedbackStore(tmp_path / "absent.db", readonly=True)
    assert not (tmp_path / "absent.db").exists()


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_export_import_round_trip(tmp_path, fmt):
    a = FeedbackStore(tmp_path / "site_a.db")
    decisions = [synthetic_decision(i, "accepted" if i % 2 else "rejected") for i in range(10)]
    decisions[7].patch = None
    a.record_many(decisions)
    a.record(synthetic_decision(3, "rejected"))  # a changed decision (revision 2)
    out = tmp_path / f"export.{fmt}"
    assert a.export(out) == 10

    b = FeedbackStore(tmp_path / "site_b.db")
    c = b.import_file(out)
    assert {k: c[k] for k in ("inserted", "updated", "unchanged", "rows", "skipped")} == \
        {"inserted": 10, "updated": 0, "unchanged": 0, "rows": 10, "skipped": 0}
    assert c["skipped_by_reason"] == {} and c["errors"] == []
    key = lambda r: r["uid"]  # noqa: E731
    ra, rb = sorted(a.decisions(), key=key), sorted(b.decisions(), key=key)
    for x, y in zip(ra, rb):
        for col in ("uid", "case_name", "case_hash", "model_id", "lesion_id", "lesion_key", "decision", "reviewer", "decided_at", "bbox"):
            assert x[col] == y[col], col
        for col in ("confidence", "centroid_x", "centroid_y", "centroid_z", "volume_ml", "diameter_mm"):
            assert x[col] == pytest.approx(y[col]), col
        assert x["features"] == pytest.approx(y["features"])
        assert y["source"] == f"import:export.{fmt}"
        pa, pb = a.patch(x["uid"]), b.patch(y["uid"])
        assert (pa is None and pb is None) or np.array_equal(pa, pb)
    # importing the same file again changes nothing
    assert b.import_file(out)["unchanged"] == 10
    # a newer decision at site A travels; an older one does not override a newer local one
    newer = synthetic_decision(4, "accepted")  # later than site B's copy, not in the future
    newer.timestamp = fb_schema._now()
    a.record(newer)
    older = synthetic_decision(6, "accepted")
    older.timestamp = "2000-01-01T00:00:00+00:00"
    a.record(older)
    b.record(synthetic_decision(6, "unsure"))  # site B's own, newer than "2000"
    a.export(out)
    c = b.import_file(out)
    assert c["updated"] == 1
    assert {r["lesion_id"]: r["decision"] for r in b.decisions()}[4] == "accepted"
    assert {r["lesion_id"]: r["decision"] for r in b.decisions()}[6] == "unsure"
    assert [h["decision"] for h in b.history("hash-caseA", "m@1", decisions[4].centroid_lps)] == ["rejected", "accepted"]
    # features-only export
    a.export(tmp_path / f"nopatch.{fmt}", patches=False)
    d = FeedbackStore(tmp_path / "site_d.db")
    d.import_file(tmp_path / f"nopatch.{fmt}")
    assert d.count() == 10 and d.stats()["with_patch"] == 0


def test_import_rejects_foreign_files(tmp_path):
    store = FeedbackStore(tmp_path / "fb.db")
    bad = tmp_path / "other.csv"
    bad.write_text("a,b\n1,2\n")
    with pytest.raises(FeedbackStoreError, match="not a LesionSeg feedback export"):
        store.import_file(bad)
    with pytest.raises(FeedbackStoreError, match="unknown export format"):
        store.export(tmp_path / "x.xlsx")
    assert store.count() == 0


def test_cli_stats_export_import(tmp_path, capsys):
    from LesionSegLib.engine.cli import main

    db = tmp_path / "fb.db"
    store = FeedbackStore(db)
    store.record_many([synthetic_decision(i, "accepted" if i % 2 else "rejected") for i in range(6)])
    store.close()
    assert main(["feedback", "stats", "--db", str(db), "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["by_class"] == {"accepted": 3, "rejected": 3, "unsure": 0}
    assert main(["feedback", "export", "--db", str(db), str(tmp_path / "x.parquet")]) == 0
    assert main(["feedback", "import", "--db", str(tmp_path / "new.db"), str(tmp_path / "x.parquet")]) == 0
    assert "6 new" in capsys.readouterr().out
    assert main(["feedback", "check", "--db", str(tmp_path / "new.db")]) == 0
    assert "integrity ok" in capsys.readouterr().out


def test_a_missed_lesion_stays_missed_and_an_edit_updates_the_size(tmp_path):
    """Found by an audit of the review-to-retrain loop: a later decision on a lesion added by a click
    turned its source "missed" into "review" (and an exchange into "import:..."), and a decision
    repeated or changed after the reviewer edited the mask kept the proposal's volume and diameter."""
    from LesionSegLib.engine.feedback import exchange

    store = FeedbackStore(tmp_path / "fb.db")
    d = synthetic_decision(7, "accepted")
    store.record(d, source="missed")
    d2 = synthetic_decision(7, "rejected")
    d2.volume_ml, d2.diameter_mm = 1.25, 9.5  # measured again after an edit
    assert store.record(d2, source="review") == "updated"
    row = store.decisions()[0]
    assert row["source"] == "missed" and (row["volume_ml"], row["diameter_mm"]) == (1.25, 9.5)
    assert [h["source"] for h in store.history(d.case_hash, d.model_id, d.centroid_lps)] == ["missed", "review"]
    d3 = synthetic_decision(7, "rejected")
    d3.volume_ml, d3.diameter_mm = 0.5, 4.0  # edited again, the same decision
    assert store.record(d3, source="review") == "unchanged"
    assert (store.decisions()[0]["volume_ml"], store.decisions()[0]["diameter_mm"]) == (0.5, 4.0)

    exchange.export(store, tmp_path / "x.csv")
    other = FeedbackStore(tmp_path / "other.db")
    assert exchange.import_file(other, tmp_path / "x.csv")["inserted"] == 1
    assert other.decisions()[0]["source"] == "missed"  # through an exchange too


def test_real_patches_are_stored_compressed_and_bit_exact(tmp_path):
    """The compression check ran on a synthetic block patch (``np.kron``, 0.04 of its raw size),
    which any codec squeezes; real clusters' patches (CT texture, probabilities) give 0.17-0.46."""
    decisions = real_decisions()
    store = FeedbackStore(tmp_path / "fb.db")
    store.record_many(decisions)
    blobs = {(r[0], r[1]): r[2] for r in store._query("SELECT case_name, lesion_id, patch FROM decisions")}
    raw = [d.patch.nbytes for d in decisions]
    stored = [len(blobs[(d.case_name, d.lesion_id)]) for d in decisions]
    assert len(decisions) >= 10 and max(s / r for s, r in zip(stored, raw)) < 0.6 and sum(stored) < 0.4 * sum(raw)
    back = store.labelled(feature_names=list(decisions[0].features)).patches
    assert back.dtype == np.float16 and sorted(map(bytes, back)) == sorted(bytes(d.patch) for d in decisions)

"""The feedback database file and export files: refused files get nothing created beside them,
read-only folders, a busy database, schema-upgrade backups, and what ``feedback export`` writes
(atomic replacement, no stale corrections file, no new folders, no spreadsheet formulas)."""
from __future__ import annotations

import base64
import csv
import sqlite3
import time

import numpy as np
import pytest

from feedback_testdata import synthetic_decision
from LesionSegLib.engine.cli import main as cli_main
from LesionSegLib.engine.feedback import FeedbackStore, FeedbackStoreError
from LesionSegLib.engine.feedback import corrections as cr
from LesionSegLib.engine.feedback import schema as fb_schema
from LesionSegLib.engine.feedback import store as fb_store
from LesionSegLib.engine.feedback.codec import encode_patch
from test_feedback_corrections_import import corrected_store


def _side_files(path):
    return sorted(p.name for p in path.parent.iterdir() if p.name.startswith(path.name) and p != path)


def _db(path, n=4, case="caseA"):
    store = FeedbackStore(path)
    store.record_many([synthetic_decision(i, "accepted" if i % 2 else "rejected", case=case) for i in range(n)])
    store.close()
    return path


def _quiet(path):
    """Checkpoint and drop the -wal/-shm (as after every program closed the file)."""
    con = sqlite3.connect(path)
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    con.close()
    for s in ("-wal", "-shm"):
        (path.parent / (path.name + s)).unlink(missing_ok=True)


# ----------------------------------------------------------------------------- K1, K2, K3
@pytest.mark.parametrize("damage", ["newer", "truncated", "foreign-id"])
def test_refused_database_gets_no_wal_or_shm(tmp_path, damage, capsys):
    """K1: a newer, truncated or foreign (application id) WAL database is refused from its header;
    no -wal/-shm file appears beside it."""
    path = _db(tmp_path / "fb.db", n=30)
    con = sqlite3.connect(path)
    if damage == "newer":
        con.execute("PRAGMA user_version = 99")
    elif damage == "foreign-id":
        con.execute("PRAGMA application_id = 1234")
    con.commit()
    con.close()
    _quiet(path)
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    before = path.read_bytes()
    for cmd in (["stats"], ["check"], ["import", str(tmp_path / "none.csv")]):
        (tmp_path / "none.csv").write_text("case_hash,model_id,decision\n")
        assert cli_main(["feedback", cmd[0], "--db", str(path), *cmd[1:]]) == 2
        err = capsys.readouterr().err
        assert str(path) in err and len(err.strip().splitlines()) == 1
        assert _side_files(path) == [] and path.read_bytes() == before


def test_rejected_import_creates_no_database_or_folder(tmp_path, capsys):
    """K2: files that are not exports are refused before the database (and its folder) is created."""
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1,2\n")
    nocsv = tmp_path / "x.corrections.csv"
    nocsv.write_bytes(b"\xff\xfe garbage")
    db = tmp_path / "new" / "sub" / "fb.db"
    assert cli_main(["feedback", "import", "--db", str(db), str(bad), str(nocsv), str(tmp_path / "missing.csv")]) == 2
    err = capsys.readouterr().err
    assert "missing columns" in err and "UTF-8" in err and "not found" in err and "Traceback" not in err
    assert not (tmp_path / "new").exists()


def test_export_refuses_a_missing_folder_and_keeps_the_default_folder(tmp_path, monkeypatch, capsys):
    """K3: export never creates folders; the default database's own folder is still created."""
    db = _db(tmp_path / "fb.db")
    out = tmp_path / "no" / "such" / "x.csv"
    assert cli_main(["feedback", "export", "--db", str(db), str(out)]) == 2
    err = capsys.readouterr().err
    assert f"the folder {out.parent} does not exist" in err and not (tmp_path / "no").exists()
    monkeypatch.setenv("LESIONSEG_FEEDBACK", str(tmp_path / "home" / ".lesionseg" / "feedback.db"))
    FeedbackStore().close()
    assert (tmp_path / "home" / ".lesionseg" / "feedback.db").exists()


# ----------------------------------------------------------------------------- D12, D7, D13, D14
def test_export_replaces_atomically_and_names_the_users_path(tmp_path, capsys):
    """D12: an existing output is replaced (atomically: no temporary file left); a .corrections
    name is refused; an error names the user's path in one line, not a temporary file."""
    db = _db(tmp_path / "fb.db")
    out = tmp_path / "x.csv"
    out.write_text("old content\n")
    assert cli_main(["feedback", "export", "--db", str(db), str(out)]) == 0
    assert out.read_text().startswith("uid,") and not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]
    capsys.readouterr()
    assert cli_main(["feedback", "export", "--db", str(db), str(tmp_path / "share.corrections.csv")]) == 2
    assert "names ending .corrections.csv are kept" in capsys.readouterr().err
    assert not (tmp_path / "share.corrections.csv").exists()
    (tmp_path / "d.csv").mkdir()
    assert cli_main(["feedback", "export", "--db", str(db), str(tmp_path / "d.csv")]) == 2
    err = capsys.readouterr().err
    assert f"cannot write {tmp_path / 'd.csv'}" in err and ".tmp-" not in err and "Errno" not in err
    assert len(err.strip().splitlines()) == 1


def test_stale_corrections_file_is_removed_by_a_new_export(tmp_path, capsys):
    """D7: exporting a store without corrections over an earlier export removes its stale
    .corrections file, so an import of the new file does not pick up the old corrections."""
    a = corrected_store(tmp_path / "a.db")
    a.close()
    b = _db(tmp_path / "b.db")
    out = tmp_path / "share.csv"
    assert cli_main(["feedback", "export", "--db", str(tmp_path / "a.db"), str(out)]) == 0
    assert (tmp_path / "share.corrections.csv").exists()
    assert cli_main(["feedback", "export", "--db", str(b), str(out)]) == 0
    assert "removed" in capsys.readouterr().out
    assert not (tmp_path / "share.corrections.csv").exists()
    assert cli_main(["feedback", "import", "--db", str(tmp_path / "recv.db"), str(out)]) == 0
    recv = FeedbackStore(tmp_path / "recv.db")
    assert recv.count() == 4 and cr.stats(recv)["cases"] == 0


def test_decisions_csv_has_no_formulas_and_round_trips(tmp_path):
    """D13: text cells starting with = + - @ are escaped with an apostrophe; numbers (negative
    ones included) are not; an import gives the original text back."""
    src = FeedbackStore(tmp_path / "a.db")
    d = synthetic_decision(1)
    d.case_name, d.reviewer = "=cmd|' /C calc'!A0", "+1-555"
    src.record(d)
    out = tmp_path / "x.csv"
    src.export(out)
    with open(out, newline="") as fh:
        row = next(csv.DictReader(fh))
    assert row["case_name"] == "'=cmd|' /C calc'!A0" and row["reviewer"] == "'+1-555"
    assert row["centroid_y"] == "-20.5"  # a negative number is left as it is
    dst = FeedbackStore(tmp_path / "b.db")
    assert dst.import_file(out)["inserted"] == 1
    (r,) = dst.decisions()
    assert r["case_name"] == "=cmd|' /C calc'!A0" and r["reviewer"] == "+1-555"


def test_reordered_csv_is_refused_in_one_line(tmp_path):
    """D14: a CSV whose patch column is not the last one is refused by name, not row by row."""
    src = FeedbackStore(tmp_path / "a.db")
    src.record_many([synthetic_decision(i) for i in range(2)])
    out = tmp_path / "x.csv"
    src.export(out)
    with open(out, newline="") as fh:
        rows = list(csv.reader(fh))
    moved = [[r[-1]] + r[:-1] for r in rows]
    with open(tmp_path / "r.csv", "w", newline="") as fh:
        csv.writer(fh).writerows(moved)
    dst = FeedbackStore(tmp_path / "b.db")
    with pytest.raises(FeedbackStoreError, match="'patch' column is not the last one"):
        dst.import_file(tmp_path / "r.csv")
    assert dst.count() == 0


# ----------------------------------------------------------------------------- D6
def test_one_odd_patch_shape_does_not_drop_the_local_rows(tmp_path):
    """D6: an imported row whose patch has another shape (stored first) is skipped; the local
    lesions with the classifier's patch shape are all kept."""
    src = FeedbackStore(tmp_path / "remote.db")
    src.record(synthetic_decision(100, case="remote"))
    out = tmp_path / "remote.csv"
    src.export(out)
    with open(out, newline="") as fh:
        header, row = list(csv.reader(fh))
    blob, shape = encode_patch(np.zeros((1, 4, 4, 4), np.float16))
    row[header.index("patch")], row[header.index("patch_shape")] = base64.b64encode(blob).decode(), shape
    with open(out, "w", newline="") as fh:
        csv.writer(fh).writerows([header, row])
    store = FeedbackStore(tmp_path / "fb.db")
    assert store.import_file(out)["inserted"] == 1
    store.record_many([synthetic_decision(i, "accepted" if i % 2 else "rejected") for i in range(10)])
    ls = store.labelled()
    assert len(ls) == 10 and ls.skipped == {"patch shape": 1} and ls.patches.shape == (10, 3, 32, 32, 32)
    assert len(store.labelled(patch_shape=(1, 4, 4, 4))) == 1


# ----------------------------------------------------------------------------- D9, D10, D11
def _schema2(path):
    con = sqlite3.connect(path, isolation_level=None)
    con.execute("PRAGMA journal_mode = WAL")
    fb_schema._migrate(con, target=2)
    con.close()


def test_upgrade_backup_is_made_under_the_lock_and_never_overwritten(tmp_path):
    """D9: an existing backup is kept (the new one gets another name); a store opened after
    another program migrated the file makes no backup of the migrated file."""
    path = tmp_path / "fb.db"
    _schema2(path)
    old = tmp_path / "fb.db.schema2.bak"
    old.write_bytes(b"an earlier backup")
    calls = []
    real = fb_store.FeedbackStore._backup

    def spy(self, version):
        calls.append(version)
        return real(self, version)

    fb_store.FeedbackStore._backup = spy
    try:
        FeedbackStore(path).close()
        assert old.read_bytes() == b"an earlier backup"
        new = tmp_path / "fb.db.schema2.1.bak"
        assert fb_schema.inspect_file(new)["schema_version"] == 2 and calls == [2]
        # the version is read again under the write lock: a migrated file is not backed up
        path2 = tmp_path / "fb2.db"
        _schema2(path2)
        con = sqlite3.connect(path2, isolation_level=None)
        fb_schema._migrate(con, backup=lambda v: calls.append(("second", v)))  # "the other program" migrates
        con.close()
        assert calls == [2, ("second", 2)]
        con = sqlite3.connect(path2, isolation_level=None)
        fb_schema._migrate(con, backup=lambda v: calls.append(("third", v)))
        con.close()
        assert calls == [2, ("second", 2)]
    finally:
        fb_store.FeedbackStore._backup = real
    assert not (tmp_path / "fb.db.schema2.2.bak").exists()


def test_busy_database_says_so_and_that_it_waits(tmp_path, monkeypatch):
    """D10: with another program holding the write lock, opening a current database does not
    wait; a write says the database is busy and that it is waiting, then fails in one line."""
    path = _db(tmp_path / "fb.db")
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    monkeypatch.setattr(fb_schema, "BUSY_TIMEOUT_MS", 1000)
    try:
        told = []
        t = time.monotonic()
        store = FeedbackStore(path, on_wait=told.append)
        assert time.monotonic() - t < 5 and store.count() == 4  # no migration: no lock needed
        with pytest.raises(FeedbackStoreError) as err:
            store.record(synthetic_decision(50))
        assert "busy: another program" in str(err.value) and "\n" not in str(err.value)
        assert len(told) == 1 and "busy" in told[0] and "waiting" in told[0]
        assert time.monotonic() - t < 15
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    store.record(synthetic_decision(51))
    assert store.count() == 5


def test_read_only_folder_is_read_not_called_corrupt(tmp_path, monkeypatch, capsys):
    """D11: in a folder that cannot be written, read-only commands work without lock files and
    writers are told the folder is read-only (not that the database is corrupt)."""
    path = _db(tmp_path / "fb.db")
    _quiet(path)
    monkeypatch.setattr(fb_schema, "folder_writable", lambda p: False)
    monkeypatch.setattr(fb_store, "folder_writable", lambda p: False)
    assert cli_main(["feedback", "stats", "--db", str(path)]) == 0
    assert "4 decisions" in capsys.readouterr().out
    out = tmp_path / "out"
    out.mkdir()
    assert cli_main(["feedback", "export", "--db", str(path), str(out / "x.csv")]) == 0
    assert cli_main(["feedback", "check", "--db", str(path)]) == 0
    capsys.readouterr()
    with FeedbackStore(path, readonly=True) as store:
        assert len(store.labelled()) == 4
    assert _side_files(path) == []  # read as an immutable file: no -wal/-shm
    (tmp_path / "imp.csv").write_bytes((out / "x.csv").read_bytes())
    assert cli_main(["feedback", "import", "--db", str(path), str(tmp_path / "imp.csv")]) == 2
    err = capsys.readouterr().err
    assert "its folder is read-only" in err and "corrupt" not in err

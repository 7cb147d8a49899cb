"""The feedback store: every accept / reject / unsure decision, in one SQLite file.

Each decision keeps what is needed to retrain the confidence classifier without the original
volume: the case (name + content hash of voxels and geometry), the lesion (id, centroid, volume,
diameter, bounding box), the decision and the confidence shown when it was made, the model id,
the classifier inputs (tabular features as JSON and the adaptive patch, compressed), the
reviewer and a timestamp.

Rules
-----
* One row per lesion in ``decisions`` (its current state).  A lesion is identified by
  ``(case_hash, model_id, lesion_key)``, where ``lesion_key`` is its centroid rounded to
  0.1 mm (the lesion id when no centroid is known), so re-running with another threshold, which
  renumbers the lesions, still finds the same record.  Changing a decision updates that row and
  appends to ``history``; nothing is ever deleted.
* The schema is versioned (``PRAGMA user_version``, ``PRAGMA application_id``) and created by
  running the migrations in order; an older file is backed up (``<file>.schema<N>.bak``) and
  migrated in one transaction when opened for writing.
* WAL journal, ``synchronous=FULL``, a busy timeout, and explicit ``BEGIN IMMEDIATE``
  transactions: a writer killed at any moment loses only its uncommitted batch, and two writers
  (two Slicer sessions on one file) wait for each other instead of failing or losing rows.
* A file that is not SQLite, a foreign SQLite database, a newer schema or a corrupt database is
  refused with :class:`FeedbackStoreError`; the file is never written to.

Export / import to CSV and Parquet (:meth:`FeedbackStore.export`, :meth:`FeedbackStore.import_file`)
carries the current decisions (patches base64-encoded in CSV, binary in Parquet) for sharing
between sites; import merges by lesion identity and keeps the newer decision.

Pure Python (sqlite3, numpy; pyarrow only for Parquet).
"""
from __future__ import annotations

import base64
import contextlib
import csv
import datetime as _dt
import json
import math
import os
import sqlite3
import sys
import random
import threading
import time
import uuid
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from .errors import LesionSegError

#: ``PRAGMA application_id`` of a LesionSeg feedback database ("LSFB").
APPLICATION_ID = 0x4C534642
SQLITE_HEADER = b"SQLite format 3\x00"
BUSY_TIMEOUT_MS = 30_000
PATCH_CODEC = "f16-shuffle-zlib"  # current codec for new patches
DECISION_VALUES = ("accepted", "rejected", "unsure")


class FeedbackStoreError(LesionSegError):
    """The feedback database cannot be used (not ours, corrupt, newer schema, locked...)."""


# ----------------------------------------------------------------------------- schema
#: Migration ``k`` (1-based) brings the schema from version k-1 to k.  A new database is created
#: by running all of them, so every migration runs on every fresh file.
MIGRATIONS: list[str] = [
    # 1: decisions (current state), their history, metadata
    """
    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    CREATE TABLE decisions (
        id          INTEGER PRIMARY KEY,
        uid         TEXT NOT NULL UNIQUE,
        case_hash   TEXT NOT NULL,
        case_name   TEXT NOT NULL,
        model_id    TEXT NOT NULL,
        lesion_key  TEXT NOT NULL,
        lesion_id   INTEGER NOT NULL,
        decision    TEXT NOT NULL CHECK (decision IN ('accepted', 'rejected', 'unsure')),
        confidence  REAL NOT NULL,
        centroid_x  REAL, centroid_y REAL, centroid_z REAL,
        volume_ml   REAL, diameter_mm REAL,
        bbox        TEXT,
        features    TEXT NOT NULL DEFAULT '{}',
        patch       BLOB,
        patch_shape TEXT,
        reviewer    TEXT NOT NULL DEFAULT '',
        decided_at  TEXT NOT NULL,
        created_at  TEXT NOT NULL,
        updated_at  TEXT NOT NULL,
        revision    INTEGER NOT NULL DEFAULT 1,
        UNIQUE (case_hash, model_id, lesion_key)
    );
    CREATE TABLE history (
        id          INTEGER PRIMARY KEY,
        decision_id INTEGER NOT NULL REFERENCES decisions(id),
        revision    INTEGER NOT NULL,
        decision    TEXT NOT NULL,
        confidence  REAL NOT NULL,
        reviewer    TEXT NOT NULL,
        decided_at  TEXT NOT NULL,
        recorded_at TEXT NOT NULL
    );
    CREATE INDEX history_decision ON history(decision_id);
    """,
    # 2: provenance (local review or an imported file) and a patch codec column.  Version-1
    #    patches were plain zlib of float16 ('f16-zlib'); new ones are byte-shuffled first,
    #    which compresses CT patches markedly better.
    """
    ALTER TABLE decisions ADD COLUMN source TEXT NOT NULL DEFAULT 'review';
    ALTER TABLE decisions ADD COLUMN patch_codec TEXT NOT NULL DEFAULT 'f16-zlib';
    ALTER TABLE history ADD COLUMN source TEXT NOT NULL DEFAULT 'review';
    CREATE INDEX decisions_model ON decisions(model_id, decision);
    CREATE INDEX decisions_case ON decisions(case_hash);
    """,
]
SCHEMA_VERSION = len(MIGRATIONS)


#: QSettings key under which both Slicer modules keep a user-chosen database path
SETTINGS_KEY = "LesionSeg/FeedbackDatabase"


def default_path() -> Path:
    """``$LESIONSEG_FEEDBACK`` or ``~/.lesionseg/feedback.db`` (the CLI default; Slicer passes its own)."""
    env = os.environ.get("LESIONSEG_FEEDBACK")
    return Path(env).expanduser() if env else Path.home() / ".lesionseg" / "feedback.db"


def slicer_default_path(user_settings_file: str | os.PathLike) -> Path:
    """Default inside Slicer: ``<Slicer settings folder>/LesionSeg/feedback.db``, where the folder
    is that of ``slicer.app.slicerUserSettingsFilePath``."""
    return Path(user_settings_file).expanduser().parent / "LesionSeg" / "feedback.db"


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="microseconds")


# ----------------------------------------------------------------------------- patches
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


def decode_patch(blob: bytes | None, shape: str | None, codec: str = PATCH_CODEC) -> np.ndarray | None:
    if blob is None or not shape:
        return None
    dims = tuple(int(s) for s in shape.split(","))
    raw = np.frombuffer(zlib.decompress(blob), dtype=np.uint8)
    if codec == "f16-shuffle-zlib":
        raw = np.ascontiguousarray(raw.reshape(2, -1).T)
    elif codec != "f16-zlib":
        raise FeedbackStoreError(f"unknown patch codec {codec!r} (written by a newer LesionSeg?)")
    return raw.view(np.float16).reshape(dims).copy()


def lesion_key(centroid_lps: Sequence[float] | None, lesion_id: int) -> str:
    """Identity of a lesion within (case, model): its centroid rounded to 0.1 mm."""
    if centroid_lps is not None:
        c = [float(v) for v in centroid_lps]
        if len(c) == 3 and all(math.isfinite(v) for v in c) and any(v != 0.0 for v in c):
            return "c:" + ",".join(f"{round(v, 1) + 0.0:.1f}" for v in c)
    return f"id:{int(lesion_id)}"


# ----------------------------------------------------------------------------- file checks
def inspect_file(path: str | os.PathLike, check: bool = False) -> dict:
    """Read-only look at ``path``: ``{"exists", "schema_version", "empty"}``; raises on a bad file.

    Never writes to the file: a non-SQLite file, a foreign SQLite database, a newer schema or
    an unreadable/corrupt database raise :class:`FeedbackStoreError` naming the file.  With
    ``check``, ``PRAGMA quick_check`` runs too (before anything could write to the file).
    """
    p = Path(path)
    if not p.exists():
        return {"exists": False, "schema_version": 0, "empty": True}
    if p.is_dir():
        raise FeedbackStoreError(f"{p} is a folder, not a feedback database file")
    size = p.stat().st_size
    if size == 0:
        return {"exists": True, "schema_version": 0, "empty": True}
    with open(p, "rb") as fh:
        header = fh.read(len(SQLITE_HEADER))
    if header != SQLITE_HEADER:
        raise FeedbackStoreError(
            f"{p} is not a LesionSeg feedback database (not an SQLite file, or its header is corrupt); "
            "it was left untouched. Choose another file."
        )
    try:
        con = sqlite3.connect(f"{p.resolve().as_uri()}?mode=ro", uri=True, timeout=BUSY_TIMEOUT_MS / 1000)
    except sqlite3.Error as exc:
        raise FeedbackStoreError(f"cannot open {p} read-only: {exc}") from None
    try:
        app_id = con.execute("PRAGMA application_id").fetchone()[0]
        version = con.execute("PRAGMA user_version").fetchone()[0]
        tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        problems = [r[0] for r in con.execute("PRAGMA quick_check(5)")] if check and app_id == APPLICATION_ID else ["ok"]
    except sqlite3.DatabaseError as exc:
        raise FeedbackStoreError(f"{p} is a corrupt SQLite database ({exc}); it was left untouched") from None
    finally:
        con.close()
    if app_id != APPLICATION_ID:
        if app_id == 0 and not tables:
            return {"exists": True, "schema_version": 0, "empty": True}
        what = f"application id {app_id:#x}" if app_id else "tables " + ", ".join(sorted(tables)[:5])
        raise FeedbackStoreError(
            f"{p} is an SQLite database of another application ({what}), not a LesionSeg feedback "
            "database; it was left untouched. Choose another file."
        )
    if problems != ["ok"]:
        raise FeedbackStoreError(
            f"{p} is a corrupt feedback database (integrity check: {'; '.join(problems)}); it was left untouched"
        )
    if version > SCHEMA_VERSION:
        raise FeedbackStoreError(
            f"{p} has feedback schema version {version}, newer than this LesionSeg supports "
            f"({SCHEMA_VERSION}); update LesionSeg. The file was left untouched."
        )
    return {"exists": True, "schema_version": int(version), "empty": False}


def _retry_busy(fn, timeout_s: float = BUSY_TIMEOUT_MS / 1000):
    """Call ``fn`` again while SQLite says the database is locked/busy, up to ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return fn()
        except sqlite3.OperationalError as exc:
            text = str(exc).lower()
            if ("locked" not in text and "busy" not in text) or time.monotonic() > deadline:
                raise
            time.sleep(random.uniform(0.01, 0.05))


def _migrate(con: sqlite3.Connection, target: int = SCHEMA_VERSION) -> int:
    """Run the migrations from the file's version up to ``target`` in one transaction."""
    con.execute("BEGIN IMMEDIATE")
    try:
        current = con.execute("PRAGMA user_version").fetchone()[0]
        for version in range(current + 1, target + 1):
            for stmt in MIGRATIONS[version - 1].split(";"):
                if stmt.strip():
                    con.execute(stmt)
            con.execute(f"PRAGMA user_version = {version}")
        if current == 0:
            con.execute(f"PRAGMA application_id = {APPLICATION_ID}")
            con.execute("INSERT OR REPLACE INTO meta VALUES ('created_at', ?)", (_now(),))
        if target > current:
            con.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (f"migrated_to_{target}", _now()))
        con.execute("COMMIT")
    except BaseException:
        con.execute("ROLLBACK")
        raise
    return current


# ----------------------------------------------------------------------------- records
@dataclass
class LabelledSet:
    """Reviewed lesions as classifier training data."""

    labels: np.ndarray  # (N,) 1 = accepted (true lesion), 0 = rejected
    features: list[dict]  # feature name -> value, per lesion
    patches: np.ndarray | None  # (N, C, z, y, x) float16 or None when not loaded / missing
    case_hashes: list[str]
    case_names: list[str]
    model_ids: list[str]
    confidences: np.ndarray  # confidence shown at decision time
    uids: list[str]
    centroids: np.ndarray = field(default_factory=lambda: np.zeros((0, 3)))
    skipped: dict = field(default_factory=dict)  # reason -> count

    def __len__(self) -> int:
        return int(len(self.labels))


COLUMNS = (
    "uid", "case_name", "case_hash", "model_id", "lesion_id", "lesion_key", "decision", "confidence",
    "centroid_x", "centroid_y", "centroid_z", "volume_ml", "diameter_mm", "bbox", "reviewer",
    "decided_at", "created_at", "updated_at", "revision", "source",
)
FEATURE_PREFIX = "f."


class FeedbackStore:
    """One SQLite feedback database.  Also a :class:`~LesionSegLib.review.DecisionRecorder` sink.

    Safe to use from several threads (one connection per thread) and several processes.
    """

    def __init__(self, path: str | os.PathLike | None = None, readonly: bool = False, check: bool = True):
        self.path = Path(path).expanduser() if path else default_path()
        self.readonly = readonly
        self._local = threading.local()
        self._all: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        info = inspect_file(self.path, check=check)
        if readonly:
            if not info["exists"] or info["empty"]:
                raise FeedbackStoreError(f"no feedback database at {self.path}")
            if info["schema_version"] < SCHEMA_VERSION:
                raise FeedbackStoreError(
                    f"{self.path} has the older feedback schema {info['schema_version']}; open it once for "
                    "writing to migrate it"
                )
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if info["exists"] and not info["empty"] and info["schema_version"] < SCHEMA_VERSION:
                self._backup(info["schema_version"])
        con = self._conn()
        if not readonly:
            try:
                _retry_busy(lambda: _migrate(con))
            except sqlite3.Error as exc:
                raise FeedbackStoreError(f"cannot initialise or migrate {self.path}: {exc}") from None

    @classmethod
    def default(cls) -> "FeedbackStore":
        return cls(default_path())

    # ------------------------------------------------------------------ connections
    def _conn(self) -> sqlite3.Connection:
        con = getattr(self._local, "con", None)
        if con is not None:
            return con
        def connect() -> sqlite3.Connection:
            if self.readonly:
                c = sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=ro", uri=True,
                                    timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None)
            else:
                c = sqlite3.connect(str(self.path), timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None)
            try:
                c.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
                if not self.readonly:
                    mode = c.execute("PRAGMA journal_mode = WAL").fetchone()[0]
                    if str(mode).lower() != "wal":
                        raise FeedbackStoreError(f"{self.path}: cannot switch to WAL journal (got {mode!r})")
                    c.execute("PRAGMA synchronous = FULL")
                c.execute("PRAGMA foreign_keys = ON")
            except BaseException:
                c.close()
                raise
            return c

        try:
            # Switching a brand-new file to WAL while another process creates it returns
            # SQLITE_BUSY at once (SQLite's busy handler is not used there): retry.
            con = _retry_busy(connect)
        except sqlite3.DatabaseError as exc:
            raise FeedbackStoreError(f"cannot open feedback database {self.path}: {exc}") from None
        con.row_factory = sqlite3.Row
        self._local.con = con
        with self._lock:
            self._all.append(con)
        return con

    def close(self) -> None:
        with self._lock:
            for con in self._all:
                with contextlib.suppress(Exception):
                    con.close()
            self._all.clear()
        self._local = threading.local()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def __repr__(self) -> str:
        return f"FeedbackStore({str(self.path)!r})"

    def _backup(self, old_version: int) -> Path:
        dest = self.path.with_name(f"{self.path.name}.schema{old_version}.bak")
        src = sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=ro", uri=True)
        try:
            dst = sqlite3.connect(str(dest))
            with dst:
                src.backup(dst)
            dst.close()
        finally:
            src.close()
        return dest

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """An explicit write transaction (``BEGIN IMMEDIATE`` ... ``COMMIT``; rolled back on error)."""
        if self.readonly:
            raise FeedbackStoreError(f"{self.path} was opened read-only")
        con = self._conn()
        if con.in_transaction:  # nested: join the outer transaction
            yield con
            return
        try:
            con.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            raise FeedbackStoreError(f"{self.path} is busy or read-only: {exc}") from None
        try:
            yield con
        except sqlite3.Error as exc:
            con.execute("ROLLBACK")
            raise FeedbackStoreError(f"cannot write to {self.path}: {exc}") from None
        except BaseException:
            con.execute("ROLLBACK")
            raise
        else:
            try:
                con.execute("COMMIT")
            except sqlite3.Error as exc:
                with contextlib.suppress(sqlite3.Error):
                    con.execute("ROLLBACK")
                raise FeedbackStoreError(f"cannot commit to {self.path}: {exc}") from None

    def _query(self, sql: str, params: Sequence = ()) -> list[sqlite3.Row]:
        try:
            return self._conn().execute(sql, params).fetchall()
        except sqlite3.DatabaseError as exc:
            raise FeedbackStoreError(f"cannot read {self.path}: {exc}") from None

    @property
    def schema_version(self) -> int:
        return int(self._query("PRAGMA user_version")[0][0])

    # ------------------------------------------------------------------ writing
    def record(self, decision, source: str = "review") -> str:
        """Record one decision (the :class:`DecisionRecorder` sink API); returns
        ``"inserted"``, ``"updated"`` or ``"unchanged"``."""
        return self.record_many([decision], source=source)[0]

    def record_many(self, decisions: Iterable, source: str = "review") -> list[str]:
        """Record decisions in a single transaction: all of them are committed, or none."""
        out = []
        with self.transaction() as con:
            for d in decisions:
                out.append(self._upsert(con, _decision_row(d), source))
        return out

    def _upsert(self, con: sqlite3.Connection, row: dict, source: str, only_if_newer: bool = False) -> str:
        if row["decision"] not in DECISION_VALUES:
            raise FeedbackStoreError(f"invalid decision {row['decision']!r}; expected one of {DECISION_VALUES}")
        now = _now()
        cur = con.execute(
            "SELECT id, decision, reviewer, revision, decided_at, patch FROM decisions "
            "WHERE case_hash = ? AND model_id = ? AND lesion_key = ?",
            (row["case_hash"], row["model_id"], row["lesion_key"]),
        ).fetchone()
        if cur is None:
            uid = row.get("uid") or uuid.uuid4().hex
            con.execute(
                "INSERT INTO decisions (uid, case_hash, case_name, model_id, lesion_key, lesion_id, decision, "
                "confidence, centroid_x, centroid_y, centroid_z, volume_ml, diameter_mm, bbox, features, patch, "
                "patch_shape, patch_codec, reviewer, decided_at, created_at, updated_at, revision, source) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 1, ?)",
                (
                    uid, row["case_hash"], row["case_name"], row["model_id"], row["lesion_key"], row["lesion_id"],
                    row["decision"], row["confidence"], *row["centroid"], row["volume_ml"], row["diameter_mm"],
                    row["bbox"], row["features"], row["patch"], row["patch_shape"], row["patch_codec"] or PATCH_CODEC,
                    row["reviewer"], row["decided_at"], now, now, source,
                ),
            )
            did = con.execute("SELECT id FROM decisions WHERE uid = ?", (uid,)).fetchone()[0]
            self._history(con, did, 1, row, now, source)
            return "inserted"
        if cur["decision"] == row["decision"] and cur["reviewer"] == row["reviewer"]:
            if cur["patch"] is None and row["patch"] is not None:  # fill in a missing patch
                con.execute("UPDATE decisions SET patch = ?, patch_shape = ?, patch_codec = ? WHERE id = ?",
                            (row["patch"], row["patch_shape"], row["patch_codec"], cur["id"]))
            return "unchanged"
        if only_if_newer and row["decided_at"] <= cur["decided_at"]:
            return "unchanged"
        rev = int(cur["revision"]) + 1
        con.execute(
            "UPDATE decisions SET decision = ?, confidence = ?, reviewer = ?, decided_at = ?, updated_at = ?, "
            "revision = ?, lesion_id = ?, case_name = ?, source = ?, "
            "features = CASE WHEN ? = '{}' THEN features ELSE ? END, "
            "patch = COALESCE(?, patch), patch_shape = COALESCE(?, patch_shape), "
            "patch_codec = CASE WHEN ? IS NULL THEN patch_codec ELSE ? END WHERE id = ?",
            (
                row["decision"], row["confidence"], row["reviewer"], row["decided_at"], now, rev,
                row["lesion_id"], row["case_name"], source, row["features"], row["features"],
                row["patch"], row["patch_shape"], row["patch"], row["patch_codec"], cur["id"],
            ),
        )
        self._history(con, cur["id"], rev, row, now, source)
        return "updated"

    @staticmethod
    def _history(con, decision_id, revision, row, now, source) -> None:
        con.execute(
            "INSERT INTO history (decision_id, revision, decision, confidence, reviewer, decided_at, recorded_at, source) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (decision_id, revision, row["decision"], row["confidence"], row["reviewer"], row["decided_at"], now, source),
        )

    # ------------------------------------------------------------------ reading
    def count(self) -> int:
        return int(self._query("SELECT COUNT(*) FROM decisions")[0][0])

    def stats(self) -> dict:
        """Counts of current decisions per model and class, cases, reviewers, revisions."""
        by_model: dict[str, dict[str, int]] = {}
        for r in self._query("SELECT model_id, decision, COUNT(*) FROM decisions GROUP BY model_id, decision"):
            by_model.setdefault(r[0], {k: 0 for k in DECISION_VALUES})[r[1]] = int(r[2])
        totals = {k: sum(m[k] for m in by_model.values()) for k in DECISION_VALUES}
        one = self._query(
            "SELECT COUNT(*), COUNT(DISTINCT case_hash), COUNT(DISTINCT reviewer), MAX(decided_at), "
            "SUM(patch IS NOT NULL) FROM decisions"
        )[0]
        return {
            "path": str(self.path),
            "schema_version": self.schema_version,
            "decisions": int(one[0]),
            "cases": int(one[1]),
            "reviewers": int(one[2]),
            "last_decision": one[3],
            "with_patch": int(one[4] or 0),
            "changes": int(self._query("SELECT COUNT(*) FROM history")[0][0]) - int(one[0]),
            "by_class": totals,
            "by_model": by_model,
        }

    def decisions(self, model_ids: Sequence[str] | None = None) -> list[dict]:
        """Current decisions as dicts (no patches; ``features`` decoded)."""
        sql = f"SELECT {', '.join(COLUMNS)}, features FROM decisions"
        params: list = []
        if model_ids:
            sql += f" WHERE model_id IN ({','.join('?' * len(model_ids))})"
            params = list(model_ids)
        rows = []
        for r in self._query(sql + " ORDER BY id", params):
            d = {k: r[k] for k in COLUMNS}
            d["features"] = json.loads(r["features"] or "{}")
            rows.append(d)
        return rows

    def history(self, case_hash: str, model_id: str, lesion: int | Sequence[float]) -> list[dict]:
        """All revisions of one lesion, oldest first (``lesion``: centroid or lesion id)."""
        key = lesion_key(lesion, 0) if isinstance(lesion, (tuple, list, np.ndarray)) else lesion_key(None, lesion)
        rows = self._query(
            "SELECT h.revision, h.decision, h.confidence, h.reviewer, h.decided_at, h.recorded_at, h.source "
            "FROM history h JOIN decisions d ON d.id = h.decision_id "
            "WHERE d.case_hash = ? AND d.model_id = ? AND d.lesion_key = ? ORDER BY h.revision",
            (case_hash, model_id, key),
        )
        return [dict(r) for r in rows]

    def patch(self, uid: str) -> np.ndarray | None:
        r = self._query("SELECT patch, patch_shape, patch_codec FROM decisions WHERE uid = ?", (uid,))
        return decode_patch(r[0][0], r[0][1], r[0][2]) if r else None

    def labelled(self, model_ids: Sequence[str] | None = None, feature_names: Sequence[str] | None = None,
                 with_patches: bool = True) -> LabelledSet:
        """Accepted (1) and rejected (0) lesions as training data; unsure ones are left out.

        With ``feature_names``, lesions lacking any of them are skipped (counted in ``skipped``);
        with ``with_patches``, lesions without a patch are skipped.
        """
        sql = ("SELECT uid, case_hash, case_name, model_id, decision, confidence, features, patch, patch_shape, "
               "patch_codec, centroid_x, centroid_y, centroid_z FROM decisions WHERE decision != 'unsure'")
        params: list = []
        if model_ids:
            sql += f" AND model_id IN ({','.join('?' * len(model_ids))})"
            params = list(model_ids)
        skipped: dict[str, int] = {}
        n_unsure = self._query("SELECT COUNT(*) FROM decisions WHERE decision = 'unsure'")[0][0]
        if n_unsure:
            skipped["unsure"] = int(n_unsure)
        labels, feats, patches, hashes, names, models, confs, uids, cents = [], [], [], [], [], [], [], [], []
        con = self._conn()
        try:
            cursor = con.execute(sql + " ORDER BY id", params)
            for r in cursor:
                f = json.loads(r["features"] or "{}")
                if feature_names is not None and any(n not in f for n in feature_names):
                    skipped["missing features"] = skipped.get("missing features", 0) + 1
                    continue
                p = None
                if with_patches:
                    p = decode_patch(r["patch"], r["patch_shape"], r["patch_codec"])
                    if p is None:
                        skipped["no patch"] = skipped.get("no patch", 0) + 1
                        continue
                    if patches and p.shape != patches[0].shape:
                        skipped["patch shape"] = skipped.get("patch shape", 0) + 1
                        continue
                    patches.append(p)
                labels.append(1 if r["decision"] == "accepted" else 0)
                feats.append(f)
                hashes.append(r["case_hash"])
                names.append(r["case_name"])
                models.append(r["model_id"])
                confs.append(r["confidence"])
                uids.append(r["uid"])
                cents.append((r["centroid_x"] or 0.0, r["centroid_y"] or 0.0, r["centroid_z"] or 0.0))
        except sqlite3.DatabaseError as exc:
            raise FeedbackStoreError(f"cannot read {self.path}: {exc}") from None
        return LabelledSet(
            labels=np.asarray(labels, dtype=np.int64),
            features=feats,
            patches=np.stack(patches) if patches else None,
            case_hashes=hashes,
            case_names=names,
            model_ids=models,
            confidences=np.asarray(confs, dtype=float),
            uids=uids,
            centroids=np.asarray(cents, dtype=float).reshape(-1, 3),
            skipped=skipped,
        )

    def verify(self) -> list[str]:
        """Full ``PRAGMA integrity_check``; ``["ok"]`` when the file is sound."""
        return [r[0] for r in self._query("PRAGMA integrity_check")]

    # ------------------------------------------------------------------ export / import
    def export(self, out: str | os.PathLike, patches: bool = True, model_ids: Sequence[str] | None = None) -> int:
        """Write the current decisions to ``.csv`` or ``.parquet`` (by suffix); returns the row count."""
        out = Path(out)
        fmt = _format_of(out)
        rows = self._export_rows(patches, model_ids)
        feat_names = sorted({k for r in rows for k in r["features"]})
        columns = list(COLUMNS) + [FEATURE_PREFIX + n for n in feat_names]
        if patches:
            columns += ["patch_shape", "patch_codec", "patch"]
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.tmp")
        try:
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
            os.replace(tmp, out)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        return len(rows)

    def _export_rows(self, patches: bool, model_ids) -> list[dict]:
        sql = f"SELECT {', '.join(COLUMNS)}, features" + (", patch, patch_shape, patch_codec" if patches else "")
        sql += " FROM decisions"
        params: list = []
        if model_ids:
            sql += f" WHERE model_id IN ({','.join('?' * len(model_ids))})"
            params = list(model_ids)
        out = []
        for r in self._query(sql + " ORDER BY id", params):
            d = {k: r[k] for k in COLUMNS}
            d["features"] = json.loads(r["features"] or "{}")
            if patches:
                d["patch"], d["patch_shape"], d["patch_codec"] = r["patch"], r["patch_shape"], r["patch_codec"]
            out.append(d)
        return out

    def import_file(self, src: str | os.PathLike, source: str | None = None) -> dict:
        """Merge an exported CSV/Parquet file: new lesions are inserted, a lesion already here is
        updated only when the imported decision is newer (with history).  One transaction."""
        src = Path(src)
        fmt = _format_of(src)
        if not src.exists():
            raise FeedbackStoreError(f"import file {src} not found")
        source = source or f"import:{src.name}"
        rows = list(_read_csv(src) if fmt == "csv" else _read_parquet(src))
        counts = {"inserted": 0, "updated": 0, "unchanged": 0}
        with self.transaction() as con:
            for r in rows:
                counts[self._upsert(con, r, source, only_if_newer=True)] += 1
        counts["rows"] = len(rows)
        return counts


# ----------------------------------------------------------------------------- helpers
def _decision_row(d) -> dict:
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
        "bbox": json.dumps(_plain(bbox)) if bbox is not None else None,
        "features": json.dumps(feats, sort_keys=True),
        "patch": patch,
        "patch_shape": shape,
        "patch_codec": PATCH_CODEC if patch is not None else None,
        "reviewer": str(get("reviewer") or ""),
        "decided_at": str(get("timestamp") or _now()),
    }


def _plain(x):
    if isinstance(x, (list, tuple, np.ndarray)):
        return [_plain(v) for v in x]
    if isinstance(x, np.generic):
        return x.item()
    return x


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


# ----------------------------------------------------------------------------- recorder hook
_ATTACHED: dict[str, FeedbackStore] = {}


def attach_feedback_store(recorder, path: str | os.PathLike | None = None) -> FeedbackStore:
    """Route a :class:`~LesionSegLib.review.DecisionRecorder`'s decisions into the store at
    ``path`` (default :func:`default_path`).  Idempotent; any store previously attached to this
    recorder for another file is detached first.  Returns the store."""
    p = Path(path).expanduser() if path else default_path()
    for sink in list(getattr(recorder, "sinks", [])):
        if isinstance(sink, FeedbackStore):
            if sink.path.resolve() == p.resolve():
                return sink
            recorder.remove_sink(sink)
    key = str(p.resolve())
    store = _ATTACHED.get(key)
    if store is None:
        store = FeedbackStore(p)
        _ATTACHED[key] = store
    recorder.add_sink(store)
    return store


def detach_feedback_store(recorder) -> None:
    for sink in list(getattr(recorder, "sinks", [])):
        if isinstance(sink, FeedbackStore):
            recorder.remove_sink(sink)


# ----------------------------------------------------------------------------- CLI
def format_stats(s: dict) -> str:
    lines = [
        f"feedback database {s['path']} (schema {s['schema_version']})",
        f"  {s['decisions']} decisions on {s['cases']} cases by {s['reviewers']} reviewer(s); "
        f"{s['changes']} changed decisions; {s['with_patch']} with patches; last {s['last_decision'] or '-'}",
        f"  {'model':32s} {'accepted':>9s} {'rejected':>9s} {'unsure':>7s}",
    ]
    for m, c in sorted(s["by_model"].items()):
        lines.append(f"  {m:32s} {c['accepted']:9d} {c['rejected']:9d} {c['unsure']:7d}")
    t = s["by_class"]
    lines.append(f"  {'total':32s} {t['accepted']:9d} {t['rejected']:9d} {t['unsure']:7d}")
    return "\n".join(lines)


def _cmd_stats(args) -> int:
    with FeedbackStore(args.db, readonly=True) as store:
        s = store.stats()
    print(json.dumps(s, indent=2) if args.json else format_stats(s))
    return 0


def _cmd_export(args) -> int:
    with FeedbackStore(args.db, readonly=True) as store:
        n = store.export(args.output, patches=not args.no_patches, model_ids=args.model or None)
    print(f"exported {n} decisions to {args.output}")
    return 0


def _cmd_import(args) -> int:
    with FeedbackStore(args.db) as store:
        total = {"inserted": 0, "updated": 0, "unchanged": 0, "rows": 0}
        for f in args.files:
            c = store.import_file(f)
            print(f"{f}: {c['rows']} rows, {c['inserted']} new, {c['updated']} updated, {c['unchanged']} unchanged")
            for k in total:
                total[k] += c[k]
        print(f"{store.path}: {total['inserted']} new, {total['updated']} updated; now {store.count()} decisions")
    return 0


def _cmd_check(args) -> int:
    with FeedbackStore(args.db, readonly=True) as store:
        res = store.verify()
    print(f"{args.db}: integrity {'; '.join(res)}")
    return 0 if res == ["ok"] else 1


def register_cli(subparsers) -> None:
    """``lesionseg feedback stats|export|import|check``."""
    p = subparsers.add_parser("feedback", help="the review feedback database: stats, export, import")
    sub = p.add_subparsers(dest="feedback_cmd", required=True)

    def db_arg(q):
        q.add_argument("--db", default=str(default_path()), help="feedback database (default: %(default)s)")

    q = sub.add_parser("stats", help="decisions per model and class")
    db_arg(q)
    q.add_argument("--json", action="store_true", help="print JSON")
    q.set_defaults(func=_cmd_stats)
    q = sub.add_parser("export", help="write the decisions to .csv or .parquet (for sharing)")
    db_arg(q)
    q.add_argument("output", help="output .csv or .parquet file")
    q.add_argument("--no-patches", action="store_true", help="leave out the image patches (features only)")
    q.add_argument("--model", action="append", help="only decisions made with this model id (repeatable)")
    q.set_defaults(func=_cmd_export)
    q = sub.add_parser("import", help="merge exported .csv/.parquet files (newer decisions win)")
    db_arg(q)
    q.add_argument("files", nargs="+")
    q.set_defaults(func=_cmd_import)
    q = sub.add_parser("check", help="full integrity check of the database")
    db_arg(q)
    q.set_defaults(func=_cmd_check)

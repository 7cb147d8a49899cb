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

import contextlib
import json
import os
import sqlite3
import threading
import uuid
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from .codec import PATCH_CODEC, decision_row, decode_patch, lesion_key
from .labelled import LABELLED_PATCH_BYTES_LIMIT, LabelledSet, labelled  # noqa: F401  (re-exported)
from .schema import (
    BUSY_TIMEOUT_MS,
    DECISION_VALUES,
    SCHEMA_VERSION,
    FeedbackStoreError,
    _migrate,
    _now,
    _retry_busy,
    begin_immediate,
    default_path,
    folder_writable,
    has_wal,
    inspect_file,
    is_newer,
    read_uri,
    rollback,
)

COLUMNS = (
    "uid", "case_name", "case_hash", "model_id", "lesion_id", "lesion_key", "decision", "confidence",
    "centroid_x", "centroid_y", "centroid_z", "volume_ml", "diameter_mm", "bbox", "reviewer",
    "decided_at", "created_at", "updated_at", "revision", "source",
)
FEATURE_PREFIX = "f."
#: the source of a lesion the automatic pass missed (added by a click): kept by every later
#: decision on it and through an exchange, since it is what the lesion is, not where a decision came from
MISSED = "missed"


class FeedbackStore:
    """One SQLite feedback database.  Also a :class:`~LesionSegLib.review.DecisionRecorder` sink.

    Safe to use from several threads (one connection per thread) and several processes.
    """

    def __init__(self, path: str | os.PathLike | None = None, readonly: bool = False, check: bool = False,
                 on_wait=None):
        """Open (and create or migrate, unless ``readonly``) the database at ``path``.  ``check``
        runs ``PRAGMA quick_check`` first, which reads the whole file: ask for it explicitly.
        ``on_wait`` (a function of one line of text) is told (once) when another program holds the write
        lock and this one waits for it."""
        self.path = Path(path).expanduser() if path else default_path()
        self.readonly = readonly
        self.on_wait = on_wait
        self._waited = False
        self._immutable = False
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
            # a folder that cannot be written (a read-only share): read the file as it is, without
            # the lock files SQLite would otherwise create beside it
            self._immutable = not folder_writable(self.path) and not has_wal(self.path)
        else:
            self._check_writable()
        con = self._conn()
        if not readonly and info["schema_version"] != SCHEMA_VERSION:  # current: no write lock needed
            try:
                _retry_busy(lambda: _migrate(con, backup=self._backup, path=self.path, on_wait=self._notify))
            except sqlite3.Error as exc:
                raise FeedbackStoreError(f"cannot initialise or migrate {self.path}: {exc}") from None

    def _notify(self, message: str) -> None:
        """Tell ``on_wait`` the first time this store waits for another program's write lock."""
        if self.on_wait is not None and not self._waited:
            self._waited = True
            self.on_wait(message)

    def _check_writable(self) -> None:
        """Refuse (one line) a database that cannot be written, before anything is created."""
        if self.path.exists() and not os.access(self.path, os.W_OK):
            raise FeedbackStoreError(f"cannot write to {self.path}: the file is read-only")
        if not self.path.parent.exists():
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise FeedbackStoreError(f"cannot create the folder of {self.path}: {exc.strerror or exc}") from None
        if not folder_writable(self.path):
            raise FeedbackStoreError(f"cannot write to {self.path}: its folder is read-only (SQLite needs to create "
                                     "its journal files there)")

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
                c = sqlite3.connect(read_uri(self.path, immutable=self._immutable), uri=True,
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
        """Copy the file (schema ``old_version``) to ``<file>.schema<N>.bak`` before migrating it;
        called under the write lock.  An existing backup is never overwritten (``.schema<N>.1.bak``...)."""
        for k in range(1000):
            dest = self.path.with_name(f"{self.path.name}.schema{old_version}{f'.{k}' if k else ''}.bak")
            if not dest.exists():
                break
        else:
            raise FeedbackStoreError(f"too many backups of {self.path}; remove old ones")
        tmp = dest.with_name(f".tmp-{uuid.uuid4().hex[:8]}-{dest.name}")
        src = sqlite3.connect(read_uri(self.path), uri=True)
        try:
            dst = sqlite3.connect(str(tmp))
            try:
                with dst:
                    src.backup(dst)
            finally:
                dst.close()
            os.link(tmp, dest)  # fails rather than replace a backup made meanwhile
        except (OSError, sqlite3.Error) as exc:
            raise FeedbackStoreError(f"cannot back up {self.path} to {dest} before upgrading it: {exc}") from None
        finally:
            src.close()
            with contextlib.suppress(OSError):
                tmp.unlink()
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
        begin_immediate(con, self.path, self._notify)
        try:
            yield con
        except sqlite3.Error as exc:
            rollback(con)  # never masks the original error
            raise FeedbackStoreError(f"cannot write to {self.path}: {exc}") from None
        except BaseException:
            rollback(con)
            raise
        else:
            try:
                con.execute("COMMIT")
            except sqlite3.Error as exc:
                rollback(con)
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
        """Record decisions in a single transaction: all of them are committed, or none.  Patches
        are compressed before the write lock is taken, so other writers wait only for the inserts."""
        rows = [decision_row(d) for d in decisions]
        out = []
        with self.transaction() as con:
            for row in rows:
                out.append(self._upsert(con, row, source))
        return out

    def _upsert(self, con: sqlite3.Connection, row: dict, source: str, only_if_newer: bool = False) -> str:
        if row["decision"] not in DECISION_VALUES:
            raise FeedbackStoreError(f"invalid decision {row['decision']!r}; expected one of {DECISION_VALUES}")
        for key in ("case_hash", "model_id"):  # the row's identity: an empty one let other cases' decisions overwrite it
            if not row[key]:
                raise FeedbackStoreError(f"the decision on lesion {row['lesion_id']} of case {row['case_name']!r} has no {key} "
                                         "(case_hash: engine.segment.pipeline.case_hash(image); model_id: the result's)")
        now = _now()
        source = row.get("kept_source") or source
        cur = con.execute(
            "SELECT id, decision, reviewer, revision, decided_at, patch, volume_ml, diameter_mm, bbox FROM decisions "
            "WHERE case_hash = ? AND model_id = ? AND lesion_key = ?",
            (row["case_hash"], row["model_id"], row["lesion_key"]),
        ).fetchone()
        if cur is None:
            uid = row.get("uid") or uuid.uuid4().hex
            if row.get("uid") and con.execute("SELECT 1 FROM decisions WHERE uid = ?", (uid,)).fetchone():
                uid = uuid.uuid4().hex  # an imported uid already names another lesion here
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
            if not only_if_newer and (cur["volume_ml"], cur["diameter_mm"], cur["bbox"]) != (row["volume_ml"], row["diameter_mm"], row["bbox"]):
                # the reviewer edited the lesion's mask: the same decision on its new measurements
                con.execute("UPDATE decisions SET volume_ml = ?, diameter_mm = ?, bbox = ?, updated_at = ? WHERE id = ?",
                            (row["volume_ml"], row["diameter_mm"], row["bbox"], now, cur["id"]))
            return "unchanged"
        if only_if_newer and not is_newer(row["decided_at"], cur["decided_at"]):
            return "unchanged"
        rev = int(cur["revision"]) + 1
        con.execute(
            "UPDATE decisions SET decision = ?, confidence = ?, reviewer = ?, decided_at = ?, updated_at = ?, "
            "revision = ?, lesion_id = ?, case_name = ?, source = CASE WHEN source = ? THEN source ELSE ? END, "
            "volume_ml = ?, diameter_mm = ?, bbox = ?, "
            "features = CASE WHEN ? = '{}' THEN features ELSE ? END, "
            "patch = COALESCE(?, patch), patch_shape = COALESCE(?, patch_shape), "
            "patch_codec = CASE WHEN ? IS NULL THEN patch_codec ELSE ? END WHERE id = ?",
            (
                row["decision"], row["confidence"], row["reviewer"], row["decided_at"], now, rev,
                row["lesion_id"], row["case_name"], MISSED, source, row["volume_ml"], row["diameter_mm"], row["bbox"],
                row["features"], row["features"],
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

    def decisions(self, model_ids: Sequence[str] | None = None, patches: bool = False) -> list[dict]:
        """Current decisions as dicts (``features`` decoded; the raw patch blob, shape and codec too
        when ``patches``), oldest first."""
        sql = f"SELECT {', '.join(COLUMNS)}, features" + (", patch, patch_shape, patch_codec" if patches else "")
        sql += " FROM decisions"
        params: list = []
        if model_ids:
            sql += f" WHERE model_id IN ({','.join('?' * len(model_ids))})"
            params = list(model_ids)
        rows = []
        for r in self._query(sql + " ORDER BY id", params):
            d = {k: r[k] for k in COLUMNS}
            d["features"] = json.loads(r["features"] or "{}")
            if patches:
                d["patch"], d["patch_shape"], d["patch_codec"] = r["patch"], r["patch_shape"], r["patch_codec"]
            rows.append(d)
        return rows

    def history(self, case_hash: str, model_id: str, lesion: int | Sequence[float]) -> list[dict]:
        """All revisions of one lesion, oldest first (``lesion``: its centroid, or its lesion id in
        that model's result: the panel keys decisions by centroid, so an id matches those too)."""
        if isinstance(lesion, (tuple, list, np.ndarray)):
            where, args = "d.lesion_key = ?", (lesion_key(lesion, 0),)
        else:
            where, args = "(d.lesion_key = ? OR d.lesion_id = ?)", (lesion_key(None, lesion), int(lesion))
        rows = self._query(
            "SELECT h.revision, h.decision, h.confidence, h.reviewer, h.decided_at, h.recorded_at, h.source "
            "FROM history h JOIN decisions d ON d.id = h.decision_id "
            f"WHERE d.case_hash = ? AND d.model_id = ? AND {where} ORDER BY h.revision",
            (case_hash, model_id, *args),
        )
        return [dict(r) for r in rows]

    def patch(self, uid: str) -> np.ndarray | None:
        r = self._query("SELECT patch, patch_shape, patch_codec FROM decisions WHERE uid = ?", (uid,))
        return decode_patch(r[0][0], r[0][1], r[0][2]) if r else None

    def model_ids(self) -> list[str]:
        """The model ids that decisions were made with."""
        return [r[0] for r in self._query("SELECT DISTINCT model_id FROM decisions ORDER BY model_id")]

    def labelled(self, model_ids: Sequence[str] | None = None, feature_names: Sequence[str] | None = None,
                 with_patches: bool = True, patch_shape: Sequence[int] | None = None) -> LabelledSet:
        """Accepted (1) and rejected (0) lesions as training data (see :func:`.labelled.labelled`)."""
        return labelled(self, model_ids, feature_names, with_patches, patch_shape)

    def verify(self) -> list[str]:
        """Full ``PRAGMA integrity_check``; ``["ok"]`` when the file is sound."""
        return [r[0] for r in self._query("PRAGMA integrity_check")]

    # ------------------------------------------------------------------ export / import
    def export(self, out: str | os.PathLike, patches: bool = True, model_ids: Sequence[str] | None = None) -> int:
        """Write the current decisions to ``.csv`` or ``.parquet`` (by suffix); returns the row count."""
        from .exchange import export

        return export(self, out, patches, model_ids)

    def import_file(self, src: str | os.PathLike, source: str | None = None) -> dict:
        """Merge an exported CSV/Parquet file (see :func:`.exchange.import_file`)."""
        from .exchange import import_file

        return import_file(self, src, source)

"""The feedback database file: schema, migrations and read-only checks of a file before use.

* The schema is versioned (``PRAGMA user_version``, ``PRAGMA application_id``) and created by
  running the migrations in order; an older file is backed up (``<file>.schema<N>.bak``) and
  migrated in one transaction when opened for writing.
* A file that is not SQLite, a foreign SQLite database, a newer schema or a corrupt database is
  refused with :class:`FeedbackStoreError`; the file is never written to.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import os
import random
import sqlite3
import time
from pathlib import Path, PurePath

from ..errors import LesionSegError

#: ``PRAGMA application_id`` of a LesionSeg feedback database ("LSFB").
APPLICATION_ID = 0x4C534642
SQLITE_HEADER = b"SQLite format 3\x00"
BUSY_TIMEOUT_MS = 30_000
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
    # 3: corrections (edited / added / deleted / kept segments) and the corrected cases' images
    #    on the model grid, for fine-tuning the segmenter (see corrections.py)
    """
    CREATE TABLE correction_images (
        case_hash   TEXT PRIMARY KEY,
        case_name   TEXT NOT NULL,
        shape       TEXT NOT NULL,
        geometry    TEXT NOT NULL,
        image       BLOB NOT NULL,
        codec       TEXT NOT NULL,
        created_at  TEXT NOT NULL,
        source      TEXT NOT NULL DEFAULT 'review'
    );
    CREATE TABLE corrections (
        id          INTEGER PRIMARY KEY,
        uid         TEXT NOT NULL UNIQUE,
        case_hash   TEXT NOT NULL REFERENCES correction_images(case_hash),
        case_name   TEXT NOT NULL,
        model_id    TEXT NOT NULL,
        kind        TEXT NOT NULL CHECK (kind IN ('edited', 'added', 'deleted', 'kept')),
        target_key  TEXT NOT NULL,
        proposal_key TEXT,
        proposal_lesion_id INTEGER,
        proposal_confidence REAL,
        bbox        TEXT NOT NULL,
        mask        BLOB NOT NULL,
        codec       TEXT NOT NULL,
        n_voxels    INTEGER NOT NULL,
        volume_ml   REAL,
        reviewer    TEXT NOT NULL DEFAULT '',
        decided_at  TEXT NOT NULL,
        created_at  TEXT NOT NULL,
        updated_at  TEXT NOT NULL,
        source      TEXT NOT NULL DEFAULT 'review',
        UNIQUE (case_hash, model_id, target_key)
    );
    CREATE INDEX corrections_case ON corrections(case_hash, model_id);
    """,
]
SCHEMA_VERSION = len(MIGRATIONS)


def default_path() -> Path:
    """``$LESIONSEG_FEEDBACK`` or ``~/.lesionseg/feedback.db`` (the CLI default; Slicer passes its own)."""
    env = os.environ.get("LESIONSEG_FEEDBACK")
    return Path(env).expanduser() if env else Path.home() / ".lesionseg" / "feedback.db"


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="microseconds")


def parse_time(text) -> _dt.datetime | None:
    """An ISO-8601 timestamp as an aware UTC datetime (a naive one is taken as UTC); None when
    ``text`` is not one."""
    if not isinstance(text, str) or not 10 <= len(text) <= 40:
        return None
    try:
        t = _dt.datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        return None
    return (t if t.tzinfo else t.replace(tzinfo=_dt.timezone.utc)).astimezone(_dt.timezone.utc)


def is_newer(candidate: str, current: str) -> bool:
    """Whether timestamp ``candidate`` is later than ``current`` (compared as times, not text;
    an unreadable ``candidate`` is never newer, an unreadable ``current`` always older)."""
    new, old = parse_time(candidate), parse_time(current)
    if new is None:
        return False
    return old is None or new > old


def rollback(con: sqlite3.Connection) -> None:
    """Roll back if a transaction is still open; never raises (SQLite may already have rolled
    back after an I/O or disk-full error, and that original error is the one to report)."""
    if con.in_transaction:
        with contextlib.suppress(sqlite3.Error):
            con.execute("ROLLBACK")


# ----------------------------------------------------------------------------- file checks
def inspect_file(path: str | os.PathLike, check: bool = False, _locked: bool = False) -> dict:
    """Read-only look at ``path``: ``{"exists", "schema_version", "empty"}``; raises on a bad file.

    Never writes to the file: a non-SQLite file, a foreign SQLite database, a newer schema or
    an unreadable/corrupt database raise :class:`FeedbackStoreError` naming the file.  With
    ``check``, ``PRAGMA quick_check`` runs too (before anything could write to the file); it reads
    the whole file, so only an explicit check asks for it (``lesionseg feedback check``), not every open.
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
        head = fh.read(100)
    header = head[: len(SQLITE_HEADER)]
    if header != SQLITE_HEADER:
        raise FeedbackStoreError(
            f"{p} is not a LesionSeg feedback database (not an SQLite file, or its header is corrupt); "
            "it was left untouched. Choose another file."
        )
    quiet = not _locked and not has_wal(p) and not os.path.exists(f"{p}-journal")
    before = _stamp(p)
    if quiet:  # the header is the whole truth: refuse what it shows before SQLite touches the folder
        _check_header(p, head, size)
    try:
        con = sqlite3.connect(read_uri(p, immutable=quiet), uri=True, timeout=BUSY_TIMEOUT_MS / 1000,
                              isolation_level=None)
    except sqlite3.Error as exc:
        raise FeedbackStoreError(f"cannot open {p} read-only: {exc}") from None
    try:
        # one read transaction, so the three reads see one snapshot: read one by one, they could
        # straddle another process's creation of the file (its tables without its application id)
        # and call a brand-new LesionSeg database foreign
        con.execute("BEGIN")
        tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        app_id = con.execute("PRAGMA application_id").fetchone()[0]
        version = con.execute("PRAGMA user_version").fetchone()[0]
        problems = ["ok"]
        if app_id == APPLICATION_ID:
            if check:
                problems = [r[0] for r in con.execute("PRAGMA quick_check(5)")]
            else:  # cheap: walks the tables' b-trees, not the patch pages
                problems = _light_check(con, head, size, tables)
    except sqlite3.DatabaseError as exc:
        rollback(con)
        con.close()
        if quiet and _stamp(p) != before:  # a writer opened it while it was read without locks: again, locked
            return inspect_file(p, check, _locked=True)
        if not folder_writable(p) and "unable to open" in str(exc):
            raise FeedbackStoreError(f"cannot read {p}: its folder is read-only and the database has unsaved "
                                     f"changes (a -wal file) that SQLite cannot open there ({exc})") from None
        raise FeedbackStoreError(f"{p} is a corrupt SQLite database ({exc}); it was left untouched") from None
    rollback(con)  # ends the read transaction
    con.close()
    if quiet and _stamp(p) != before and (app_id != APPLICATION_ID or problems != ["ok"]):
        return inspect_file(p, check, _locked=True)  # read while a writer started: look again, locked
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


def _stamp(p: Path) -> tuple:
    """What changes when another program writes ``p``: its size and time, its -wal / -journal."""
    st = p.stat()
    return st.st_size, st.st_mtime_ns, st.st_ino, has_wal(p), os.path.exists(f"{p}-journal")


def has_wal(path) -> bool:
    """Whether ``path`` has a ``-wal`` file (a writer has it open, or left changes in it)."""
    return os.path.exists(f"{path}-wal")


def folder_writable(path) -> bool:
    """Whether files can be created in ``path``'s folder (SQLite needs that to write, and to
    read a database in WAL mode without locks on the file itself)."""
    return os.access(Path(path).resolve().parent, os.W_OK)


def read_uri(path, immutable: bool = False) -> str:
    """SQLite URI to read ``path`` only.  ``immutable``: without locks or ``-wal``/``-shm`` files
    (only when no ``-wal`` exists, so the main file holds every committed change)."""
    return f"{file_uri(Path(path).resolve())}?{'immutable=1' if immutable else 'mode=ro'}"


def file_uri(path: PurePath) -> str:
    """The ``file:`` URI of the absolute ``path`` as SQLite opens it.  A Windows UNC path
    (``\\\\server\\share\\x.db``) gets an empty authority, ``file:////server/share/x.db``:
    SQLite refuses the ``file://server/share/x.db`` that ``as_uri`` gives ("invalid uri
    authority") unless built with SQLITE_ALLOW_URI_AUTHORITY.  Other paths are as ``as_uri``."""
    uri = path.as_uri()
    if not uri.startswith("file:///"):
        uri = "file:////" + uri[len("file://"):]
    return uri


def _check_header(p: Path, head: bytes, size: int) -> None:
    """Refuse from the raw 100-byte header (no connection, nothing created beside the file): a
    truncated header or file, another application's id, a newer LesionSeg schema."""
    if len(head) < 100:
        raise FeedbackStoreError(f"{p} is a corrupt SQLite database (its header is truncated to {len(head)} bytes); "
                                 "it was left untouched")
    version, app_id = int.from_bytes(head[60:64], "big"), int.from_bytes(head[68:72], "big")
    page_size = int.from_bytes(head[16:18], "big")
    page_size = 65536 if page_size == 1 else page_size
    change, valid_for, n_pages = (int.from_bytes(head[i:i + 4], "big") for i in (24, 92, 28))
    if n_pages and change == valid_for and n_pages * page_size > size:
        raise FeedbackStoreError(f"{p} is a corrupt feedback database (the file is truncated: {size} bytes, its header "
                                 f"says {n_pages * page_size}); it was left untouched")
    if app_id not in (0, APPLICATION_ID):
        raise FeedbackStoreError(
            f"{p} is an SQLite database of another application (application id {app_id:#x}), not a LesionSeg "
            "feedback database; it was left untouched. Choose another file.")
    if app_id == APPLICATION_ID and version > SCHEMA_VERSION:
        raise FeedbackStoreError(
            f"{p} has feedback schema version {version}, newer than this LesionSeg supports "
            f"({SCHEMA_VERSION}); update LesionSeg. The file was left untouched.")


def _light_check(con: sqlite3.Connection, head: bytes, size: int, tables: set) -> list[str]:
    """What can be checked on every open without reading the whole file: the page count in the
    header against the file size (a truncated copy), and the row b-trees of the tables (damaged
    pages there raise "malformed").  ``["ok"]`` when nothing is wrong."""
    page_size = int.from_bytes(head[16:18], "big")
    page_size = 65536 if page_size == 1 else page_size
    change, valid_for, n_pages = (int.from_bytes(head[i:i + 4], "big") for i in (24, 92, 28))
    if n_pages and change == valid_for and n_pages * page_size > size:
        return [f"the file is truncated ({size} bytes, the header says {n_pages * page_size})"]
    for table in ("decisions", "history", "meta"):
        if table in tables:
            con.execute(f"SELECT COUNT(*) FROM {table}").fetchone()
    return ["ok"]


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


def begin_immediate(con: sqlite3.Connection, path, on_wait=None) -> None:
    """``BEGIN IMMEDIATE`` (the write lock).  When another program holds it, ``on_wait`` is told
    (one line) and the lock is waited for up to :data:`BUSY_TIMEOUT_MS`; then a one-line
    :class:`FeedbackStoreError` says the database is busy."""
    con.execute("PRAGMA busy_timeout = 200")
    try:
        con.execute("BEGIN IMMEDIATE")
        return
    except sqlite3.OperationalError as exc:
        if "locked" not in str(exc).lower() and "busy" not in str(exc).lower():
            raise _write_error(path, exc) from None
    finally:
        con.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    if on_wait is not None:
        on_wait(f"{path} is busy: another program is writing to it; waiting up to {BUSY_TIMEOUT_MS // 1000} s...")
    try:
        _retry_busy(lambda: con.execute("BEGIN IMMEDIATE"), BUSY_TIMEOUT_MS / 1000)
    except sqlite3.OperationalError as exc:
        if "locked" in str(exc).lower() or "busy" in str(exc).lower():
            raise FeedbackStoreError(
                f"{path} is busy: another program has been writing to it for {BUSY_TIMEOUT_MS // 1000} s; nothing was "
                "written. Try again when it has finished") from None
        raise _write_error(path, exc) from None


def _write_error(path, exc) -> FeedbackStoreError:
    if "readonly" in str(exc).lower() or "read-only" in str(exc).lower():
        return FeedbackStoreError(f"cannot write to {path}: it is read-only ({exc})")
    return FeedbackStoreError(f"cannot write to {path}: {exc}")


def _migrate(con: sqlite3.Connection, target: int = SCHEMA_VERSION, backup=None, path=None, on_wait=None) -> int:
    """Run the migrations from the file's version up to ``target`` in one transaction.  ``backup``
    (called with the old version) copies an older file first, under the write lock and after the
    version was read again, so two programs opening the file at once back up the old file once."""
    if path is None:
        con.execute("BEGIN IMMEDIATE")
    else:
        begin_immediate(con, path, on_wait)
    try:
        current = con.execute("PRAGMA user_version").fetchone()[0]
        if backup is not None and 0 < current < target:
            backup(current)
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
        rollback(con)
        raise
    return current

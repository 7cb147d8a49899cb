"""The cases of a batch, what "complete" means for one, and the batch report.

* :func:`read_cases`: a manifest (CSV or a list of paths) or a folder -> :class:`Case` list.
  Rows that cannot run (no path, a duplicate, invalid or over-long case name, a case folder
  without one scan) become cases with an ``error`` set: they are reported as failed, never raised.
* A case is **complete** when its done-marker ``<case>.done.json`` exists, names the same
  input (path, size, modification time), model and threshold as the request, and every output
  it lists exists with the size and sha256 it recorded.  The marker is written last, in the
  same :class:`~..atomic.AtomicWriter` commit as the outputs, so a case killed at any point is
  either complete or redone.
* :func:`write_report`: ``batch_report.csv`` (written atomically, rewritten as the batch goes).
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..atomic import TMP_PREFIX, write_text
from ..errors import InputError
from ..io.csv_cells import safe_cell
from ..io.images import folder_inputs, folder_problem, name_length_problem, output_stem, series_folder
from ..locking import Busy, lock_file
from ..models import sha256_file

MARKER_SUFFIX = ".done.json"
REPORT_NAME = "batch_report.csv"
LOCK_NAME = ".batch.lock"
BUSY = "another `lesionseg batch` is writing into this folder"
REPORT_COLUMNS = ("case", "status", "error", "seconds", "lesions", "worker", "attempts", "input")
#: manifest columns that may hold the image path, in order of preference
PATH_COLUMNS = ("image", "path", "input", "file")


@dataclass
class Case:
    name: str
    input: str
    row: int  # 1-based line of the manifest (0 for a folder listing)
    error: str = ""  # set when the row cannot run at all
    status: str = "pending"
    seconds: float | None = None
    lesions: int | None = None
    worker: str = ""
    attempts: int = 0
    notes: list[str] = field(default_factory=list)

    def report_row(self) -> dict:
        return {
            "case": self.name,
            "status": self.status,
            "error": "; ".join([*self.notes, self.error] if self.error else self.notes),
            "seconds": "" if self.seconds is None else f"{self.seconds:.2f}",
            "lesions": "" if self.lesions is None else self.lesions,
            "worker": self.worker,
            "attempts": self.attempts,
            "input": self.input,
        }


# ------------------------------------------------------------------------------ reading cases
def read_cases(source: str | os.PathLike) -> list[Case]:
    """Cases of a manifest file or a folder; raises :class:`InputError` when ``source`` itself
    is unusable (missing, empty, a CSV without a path column)."""
    src = Path(source)
    if not src.exists():
        raise InputError("manifest or folder not found", str(src))
    if src.is_dir():
        cases = [Case(_name(p), str(p), 0) for p in _folder_inputs(src)]
        if not cases:
            raise InputError("folder holds no images, no case folders and no DICOM series", str(src))
        for case in cases:  # a case folder without one scan: a failed row that says why, never a skip
            problem = folder_problem(Path(case.input)) if Path(case.input).is_dir() else None
            if problem:
                case.error = f"{case.input}: {problem}"
    else:
        cases = _manifest_cases(src)
        if not cases:
            raise InputError("manifest lists no cases", str(src))
    for case in cases:
        problem = "" if case.error else name_problem(case.name)
        if problem:
            where = f"manifest row {case.row}" if case.row else case.input
            case.error = f"{where}: {problem}"
    return _mark_duplicates(cases)


def name_problem(name: str) -> str:
    """Why ``name`` cannot name a case's output files ("" when it can)."""
    if name in ("", ".", "..") or any(c in name for c in "/\\\0") or name.startswith(TMP_PREFIX):
        return f"invalid case name {name!r}"
    return name_length_problem(name)


def _name(path: Path) -> str:
    return output_stem(path)


def _folder_inputs(root: Path) -> list[Path]:
    """The folder's inputs as ``segment`` reads them (:func:`..io.images.folder_inputs`), but
    never the folder itself: a batch folder holds cases."""
    return [p for p in folder_inputs(root) if p != root]


def _manifest_cases(path: Path) -> list[Case]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read manifest: {exc}", str(path)) from None
    lines = text.splitlines()
    if not any(ln.strip() for ln in lines):
        raise InputError("manifest is empty", str(path))
    base = path.parent
    if path.suffix.lower() != ".csv":  # a plain list: one path per line, '#' comments
        return [Case(_name(base / ln.strip()), str(base / ln.strip()), i) for i, ln in enumerate(lines, 1)
                if ln.strip() and not ln.lstrip().startswith("#")]
    reader = csv.DictReader(io.StringIO(text))
    rows = list(reader)
    header = [(h or "").strip().lower() for h in (reader.fieldnames or [])]
    col = next((c for c in PATH_COLUMNS if c in header), None)
    layout = col is None and {"case", "split_dir"} <= set(header)  # the shared data's manifest.csv
    if col is None and not layout:
        raise InputError(f"manifest has no image path column (one of {', '.join(PATH_COLUMNS)}; "
                         f"or case + split_dir); its columns are {', '.join(header) or 'none'}", str(path))
    cases = []
    for i, raw in enumerate(rows, start=2):
        row = {(k or "").strip().lower(): (v or "").strip() for k, v in raw.items()}
        if layout:
            rel = str(Path(row["split_dir"]) / row["case"] / "image.nii.gz") if row["case"] and row["split_dir"] else ""
        else:
            rel = row.get(col, "")
        img = str(base / rel) if rel else ""
        name = row.get("case") or (_name(Path(img)) if img else f"row{i}")
        case = Case(name, img, i)
        if not rel:
            case.error = f"manifest row {i} has no image path"
        cases.append(case)
    return cases


def _mark_duplicates(cases: list[Case]) -> list[Case]:
    first: dict[str, Case] = {}
    for c in cases:
        if c.error:
            continue
        if c.name in first:
            where = f"row {first[c.name].row}" if first[c.name].row else first[c.name].input
            c.error = f"duplicate case name {c.name!r} (also {where}); outputs would collide"
        else:
            first[c.name] = c
    return cases


# ------------------------------------------------------------------------------ completeness
def marker_name(case: str) -> str:
    return case + MARKER_SUFFIX


def input_signature(path: str | os.PathLike) -> dict:
    """What identifies an input's content cheaply: its absolute path, size and modification time
    (for a DICOM folder: the sum of its files' sizes and their latest modification time)."""
    p = Path(path).absolute()
    if p.is_dir():
        files = [f.stat() for f in series_folder(p).iterdir() if f.is_file()]
        return {"path": str(p), "size": sum(s.st_size for s in files), "mtime_ns": max((s.st_mtime_ns for s in files), default=0)}
    st = p.stat()
    return {"path": str(p), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def file_record(path: str | os.PathLike) -> dict:
    return {"size": os.path.getsize(path), "sha256": sha256_file(path)}


def check_complete(outdir: str | os.PathLike, case: Case, model: str, threshold: float | None) -> tuple[bool, str, dict]:
    """(complete?, why not, the marker) for ``case`` run with ``model`` and ``threshold``."""
    path = Path(outdir) / marker_name(case.name)
    try:
        if not path.is_file():
            return False, "not done yet", {}
    except OSError:  # e.g. a name too long for the file system
        return False, "its done-marker cannot be looked up", {}
    try:
        marker = json.loads(path.read_text(encoding="utf-8"))
        outputs = dict(marker["outputs"])
    except (OSError, ValueError, KeyError, TypeError):
        return False, "its done-marker is unreadable", {}
    try:
        sig = input_signature(case.input)
    except OSError:
        return False, "its input is unreadable", marker
    if marker.get("input") != sig:
        return False, "its input changed", marker
    if marker.get("model") != model:
        return False, f"it was segmented with {marker.get('model')}", marker
    if marker.get("threshold_arg") != threshold:
        return False, "it was segmented with another threshold", marker
    for name, rec in outputs.items():
        f = Path(outdir) / str(name)
        try:
            if f.parent != Path(outdir) or not f.is_file() or f.stat().st_size != rec.get("size") \
                    or sha256_file(f) != rec.get("sha256"):
                return False, f"its output {name} is missing or changed", marker
        except (OSError, AttributeError):
            return False, f"its output {name} is missing or unreadable", marker
    return True, "", marker


# ------------------------------------------------------------------------------ report and folder
def write_report(outdir: str | os.PathLike, cases: list[Case]) -> Path:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=REPORT_COLUMNS, lineterminator="\n")
    w.writeheader()
    for c in cases:  # a case named after a file "=cmd|..." must not run as a spreadsheet formula (CSV injection)
        w.writerow({k: safe_cell(v) for k, v in c.report_row().items()})
    return write_text(Path(outdir) / REPORT_NAME, buf.getvalue())


def remove_temporaries(outdir: str | os.PathLike) -> int:
    """Remove the ``.tmp-*`` files that killed writers left in ``outdir`` (call while holding
    :func:`lock_outdir`); returns how many."""
    n = 0
    for f in Path(outdir).glob(TMP_PREFIX + "*"):
        if f.is_file():
            with contextlib.suppress(FileNotFoundError):
                f.unlink()
                n += 1
    return n


@contextlib.contextmanager
def lock_outdir(outdir: str | os.PathLike):
    """Hold ``OUTDIR/.batch.lock`` so that two batches never write into one folder."""
    Path(outdir).mkdir(parents=True, exist_ok=True)
    path = Path(outdir) / LOCK_NAME
    try:  # never through a planted symlink: that would create or touch a file outside the folder
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
    except OSError as exc:
        why = "is a symbolic link; remove it" if path.is_symlink() else f"cannot be opened: {exc.strerror or exc}"
        raise InputError(f"lock file {path} {why}", str(outdir)) from None
    fh = os.fdopen(fd, "r+", encoding="utf-8")
    try:
        try:
            import fcntl
        except ImportError:  # Windows: the lock file is held through the locking module
            fcntl = None
        with contextlib.ExitStack() as held:
            if fcntl is not None:
                try:
                    fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    raise InputError(BUSY, str(outdir)) from None
            else:
                fh.close()  # locked through a descriptor of its own, which may remove the file on release
                try:
                    held.enter_context(lock_file(path, wait=False))
                except Busy:
                    raise InputError(BUSY, str(outdir)) from None
            yield
    finally:
        fh.close()

"""Atomic file output: the one helper every writer in LesionSeg uses.

Nothing appears under its final name until everything it belongs with is complete, so a
crash, a kill or an exception never leaves a half-written output behind:

* :class:`AtomicWriter` collects several files (e.g. a case's labelmap, CSV and ``.seg.nrrd``)
  under temporary names in the destination folder and renames them into place together on
  :meth:`AtomicWriter.commit`; :meth:`AtomicWriter.abort` removes the temporaries.
* :func:`atomic_file` is the one-file form (a context manager yielding the temporary path).
* :func:`write_text` writes a small text file (JSON state, cards) atomically.
* :func:`atomic_folder` builds a folder (a model version) under a temporary name and renames
  it into place when the block succeeds.

Temporary names start with ``.tmp-`` so listings and evaluators can skip them.  Files get the
permissions a plain ``open()`` would give (``0o666`` minus the process umask); the umask is read
once, at import, so nothing here changes process-wide state while other threads run.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

TMP_PREFIX = ".tmp-"


def _read_umask() -> int:
    try:  # Linux exposes it without changing it
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)  # elsewhere: read it once, at import time (single-threaded)
    os.umask(mask)
    return mask


UMASK = _read_umask()
FILE_MODE = 0o666 & ~UMASK
DIR_MODE = 0o777 & ~UMASK


class AtomicWriter:
    """Collect output files under temporary names and move them into place together."""

    def __init__(self, outdir: str | os.PathLike):
        self.outdir = Path(outdir)
        self.outdir.mkdir(parents=True, exist_ok=True)
        self._pending: list[tuple[Path, Path]] = []

    def path(self, name: str) -> str:
        """A temporary path whose file becomes ``outdir/name`` on :meth:`commit`."""
        final = self.outdir / name
        if final.parent != self.outdir:
            raise ValueError(f"output name {name!r} must be a plain file name inside {self.outdir}")
        suffix = "".join(Path(name).suffixes)
        fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, suffix=suffix, dir=self.outdir)
        os.close(fd)
        self._pending.append((Path(tmp), final))
        return tmp

    @property
    def pending(self) -> dict[str, str]:
        """Final name -> temporary path of each file collected and not yet committed."""
        return {final.name: str(tmp) for tmp, final in self._pending}

    def commit(self) -> list[Path]:
        done = []
        try:
            for _, final in self._pending:  # what would stop a rename half-way is found before the first one
                if final.is_dir():
                    raise IsADirectoryError(21, "a folder is in the way of an output file", str(final))
            for tmp, final in self._pending:
                os.chmod(tmp, FILE_MODE)  # mkstemp creates 0600 files
                os.replace(tmp, final)
                done.append(final)
        except BaseException:  # a rename failed (a folder in the way, a full disk): no temporary file is left
            for tmp, final in self._pending[len(done):]:
                with contextlib.suppress(OSError):
                    tmp.unlink()
            self._pending = []
            raise
        self._pending = []
        return done

    def abort(self) -> None:
        for tmp, _ in self._pending:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        self._pending = []

    def __enter__(self) -> "AtomicWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            self.commit()
        else:
            self.abort()
        return False


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[str]:
    """``with atomic_file(p) as tmp: write(tmp)`` -- ``p`` appears only if the block succeeds."""
    final = Path(path)
    with AtomicWriter(final.parent) as w:
        yield w.path(final.name)


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (and durably: fsync before the rename)."""
    with atomic_file(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
    return Path(path)


@contextlib.contextmanager
def atomic_folder(folder: str | os.PathLike) -> Iterator[Path]:
    """Build ``folder`` under a temporary sibling name; rename it into place if the block succeeds.

    ``folder`` must not exist yet (an empty folder is replaced).  On any exception the temporary
    folder is removed and nothing appears under ``folder``.
    """
    final = Path(folder)
    if final.exists() and (not final.is_dir() or any(final.iterdir())):
        raise FileExistsError(f"{final} exists and is not an empty folder")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{final.name}-", dir=final.parent))
    try:
        yield tmp
        os.chmod(tmp, DIR_MODE)  # mkdtemp creates 0700 folders
        if final.exists():
            final.rmdir()
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def output_problem(folder) -> str | None:
    """Why ``folder`` cannot take outputs (it is a file, or it or the folder it would be made in
    cannot be written), or None.  Nothing is created: a refused command leaves no folder behind.
    Commands check it before loading a model or training, so a wrong ``-o`` costs nothing and
    is not blamed on an input."""
    path = Path(folder)
    if path.exists() and not path.is_dir():
        return f"output folder {path} is a file, not a folder"
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return f"output folder {path} cannot be made: {existing} is a file, not a folder"
    try:
        fd, probe = tempfile.mkstemp(prefix=".lesionseg-probe-", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        where = "" if existing == path else f" (in {existing})"
        return f"output folder {path} cannot be written{where}: {exc.strerror or exc}"
    return None

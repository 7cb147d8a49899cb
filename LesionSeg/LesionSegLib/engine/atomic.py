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
import signal
import socket
import tempfile
import threading
import uuid
from pathlib import Path
from typing import Iterator

from .locking import lock_file

TMP_PREFIX = ".tmp-"
FOLDER_LOCK = ".lesionseg.lock"  # folder_lock's lock file where there is no fcntl (Windows)


def _read_umask() -> int:
    try:  # Linux exposes it without changing it
        with open("/proc/self/status", encoding="utf-8") as fh:
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


def _rename(src: Path, dst: Path, output: Path) -> None:
    """``os.replace(src, dst)``; a failure is an OSError naming ``output`` (not a temporary name)."""
    try:
        os.replace(src, dst)
    except OSError as exc:
        raise type(exc)(exc.errno, exc.strerror or str(exc), str(output)) from exc


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """SIGINT and SIGTERM wait while the block runs and arrive, as before, when it ends.

    Their handlers are swapped for one that only notes them (blocking them with ``pthread_sigmask``
    is not enough: the kernel then hands a process-directed signal to another thread, and Python
    runs the handler in the main thread all the same).  Only the main thread can do that; elsewhere,
    and for a handler not installed from Python, the block runs as it is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    held = {}
    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            handler = signal.getsignal(sig)
            if handler is not None:
                signal.signal(sig, lambda signum, frame: caught.append(signum))
                held[sig] = handler
        yield
    finally:
        for sig, handler in held.items():
            signal.signal(sig, handler)
        # now handled (or ignored, or fatal) as it would have been; SIGTERM first, since SIGINT's
        # handler raises KeyboardInterrupt and would leave a SIGTERM caught beside it undelivered
        for sig in sorted(dict.fromkeys(caught), key=lambda s: s != signal.SIGTERM):
            if callable(held[sig]):
                held[sig](sig, None)  # as Python runs a handler: called in the main thread
            elif held[sig] == signal.SIG_DFL:
                signal.raise_signal(sig)


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike) -> Iterator[None]:
    """An exclusive ``flock`` on ``folder`` itself (no lock file is left behind) while the block
    runs: two processes committing outputs into one folder take turns.  Without ``fcntl``
    (Windows) the lock is held on ``folder/.lesionseg.lock`` (:mod:`.locking`; removed again there
    on release).  Where the folder cannot be locked (a file system without ``flock``) the block
    runs unlocked."""
    try:
        import fcntl
    except ImportError:
        with lock_file(Path(folder) / FOLDER_LOCK):
            yield
        return
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:
            pass
        yield
    finally:
        os.close(fd)  # releases the lock


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
        with signals_held():  # a SIGTERM between creating and recording it would leave it behind
            fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, suffix=suffix, dir=self.outdir)
            self._pending.append((Path(tmp), final))
            os.close(fd)
        return tmp

    @property
    def pending(self) -> dict[str, str]:
        """Final name -> temporary path of each file collected and not yet committed."""
        return {final.name: str(tmp) for tmp, final in self._pending}

    def commit(self) -> list[Path]:
        """Move the collected files into place as one set: the earlier outputs of these names are
        moved aside first and removed only once every new file is in; when a rename fails they are
        put back (the error names the output, not a temporary file).  Another process committing
        into the same folder waits (:func:`folder_lock`), and SIGINT / SIGTERM wait until the set is
        complete, so neither interleaves or stops the renames half-way."""
        pending, self._pending = self._pending, []
        try:
            return self._commit(pending)
        except BaseException:  # also while waiting for the lock (a SIGTERM, Ctrl-C): no temporary is left
            for tmp, _ in pending:
                with contextlib.suppress(OSError):
                    tmp.unlink()
            raise

    def _commit(self, pending: list[tuple[Path, Path]]) -> list[Path]:
        done: list[Path] = []
        aside: list[tuple[Path, Path]] = []  # (earlier output moved aside, its name)
        with folder_lock(self.outdir), signals_held():
            try:
                for _, final in pending:  # what would stop a rename half-way is found before the first one
                    if final.is_dir() and not final.is_symlink():
                        raise IsADirectoryError(21, "a folder is in the way of an output file", str(final))
                for tmp, _ in pending:
                    os.chmod(tmp, FILE_MODE)  # mkstemp creates 0600 files
                for _, final in pending:
                    if os.path.lexists(final):
                        old = self.outdir / f"{TMP_PREFIX}old-{uuid.uuid4().hex[:12]}-{final.name}"
                        _rename(final, old, final)
                        aside.append((old, final))
                for tmp, final in pending:
                    _rename(tmp, final, final)
                    done.append(final)
            except BaseException:  # nothing new stays and the earlier outputs are back (commit removes the temporaries)
                for final in done:
                    with contextlib.suppress(OSError):
                        final.unlink()
                for old, final in aside:
                    with contextlib.suppress(OSError):
                        os.replace(old, final)
                raise
            for old, _ in aside:
                with contextlib.suppress(OSError):
                    old.unlink()
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
    """Write ``text`` to ``path`` atomically (and durably: fsync before the rename).  A failed
    write (a full disk) is an OSError naming ``path``, not its temporary file."""
    try:
        with atomic_file(path) as tmp:
            with open(tmp, "w", encoding="utf-8") as fh:
                fh.write(text)
                fh.flush()
                os.fsync(fh.fileno())
    except OSError as exc:
        if exc.filename is None or Path(str(exc.filename)).name.startswith(TMP_PREFIX):
            raise type(exc)(exc.errno, exc.strerror or str(exc), str(path)) from exc
        raise
    return Path(path)


def write_failure(exc: BaseException) -> str | None:
    """The OS's words when ``exc`` is a failed write (an OSError, or safetensors' error wrapping one:
    ``... I/O error: No space left on device (os error 28)``); None for anything else."""
    import re

    if isinstance(exc, OSError):
        return exc.strerror or str(exc)
    if type(exc).__name__ != "SafetensorError":
        return None
    found = re.search(r'message: "([^"]+)"|I/O error: (.+?) \(os error', str(exc))
    return (found.group(1) or found.group(2)) if found else str(exc).strip().splitlines()[0]


#: the file in a folder under construction that names the process building it
OWNER_NAME = ".owner.json"
#: a temporary folder whose owner record names another computer is abandoned after this long
ABANDONED_AFTER_S = 24 * 3600


def _command_digest(proc) -> str:
    """A digest of a process's command line (its owner record keeps no path or argument in clear)."""
    import hashlib

    return hashlib.sha256("\0".join(proc.cmdline()).encode("utf-8", "surrogateescape")).hexdigest()


def _owner_record() -> dict:
    import psutil

    proc = psutil.Process(os.getpid())
    rec = {"pid": proc.pid, "started": proc.create_time(), "host": socket.gethostname()}
    try:
        rec["command"] = _command_digest(proc)
    except psutil.Error:
        pass
    return rec


def _owner_alive(rec: dict) -> bool:
    """Whether the process that ``rec`` names still runs: the same pid with the same start time,
    or with the same command line (the start time a process reports moves when the system clock is
    stepped, by NTP or on resume; a reused pid runs another command, with rare exceptions that
    only keep a folder)."""
    import psutil

    try:
        proc = psutil.Process(int(rec["pid"]))
        if abs(proc.create_time() - float(rec["started"])) < 1.0:
            return True
        return isinstance(rec.get("command"), str) and rec["command"] == _command_digest(proc)
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return False
    except (psutil.Error, KeyError, TypeError, ValueError, OverflowError):
        return True  # cannot tell: keep it


def abandoned(tmp: Path, now: float | None = None) -> bool:
    """Whether the temporary folder ``tmp`` was left by a build that can no longer finish: its
    owner record (:data:`OWNER_NAME`) names a process of this computer that is gone, or another
    computer and is older than :data:`ABANDONED_AFTER_S`.  A folder without a readable owner
    record is never abandoned: LesionSeg did not write it (or wrote it before owner records), and
    it may be the user's."""
    import json
    import time

    try:
        age = (time.time() if now is None else now) - tmp.stat().st_mtime
    except OSError:
        return False  # gone already, or unreadable: nothing to remove
    try:
        rec = json.loads((tmp / OWNER_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):  # unreadable or not LesionSeg's: never removed
        return False
    if not isinstance(rec, dict):
        return False
    if rec.get("host") != socket.gethostname():
        return age > ABANDONED_AFTER_S
    return not _owner_alive(rec)


def remove_abandoned(parent: str | os.PathLike) -> list[Path]:
    """Remove the ``.tmp-*`` folders in ``parent`` that :func:`abandoned` says no build will
    finish (a killed or cancelled training: on Windows, Cancel ends the worker process without
    letting it clean up); returns them.  A folder being built by a live process is never touched."""
    out = []
    try:
        found = [d for d in Path(parent).glob(TMP_PREFIX + "*") if d.is_dir() and not d.is_symlink()]
    except OSError:
        return out
    for d in found:
        if abandoned(d):
            shutil.rmtree(d, ignore_errors=True)
            if not d.exists():
                out.append(d)
    return out


@contextlib.contextmanager
def atomic_folder(folder: str | os.PathLike) -> Iterator[Path]:
    """Build ``folder`` under a temporary sibling name; rename it into place if the block succeeds.

    ``folder`` must not exist yet (an empty folder is replaced).  On any exception the temporary
    folder is removed and nothing appears under ``folder``.  A kill leaves it behind, marked with
    its owner (:data:`OWNER_NAME`); the next build in the same parent removes it
    (:func:`remove_abandoned`).
    """
    import json

    final = Path(folder)
    if final.exists() and (not final.is_dir() or any(final.iterdir())):
        raise FileExistsError(f"{final} exists and is not an empty folder")
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_abandoned(final.parent)
    tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{final.name}-", dir=final.parent))
    try:
        (tmp / OWNER_NAME).write_text(json.dumps(_owner_record()), encoding="utf-8")
        yield tmp
        (tmp / OWNER_NAME).unlink(missing_ok=True)
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
        if existing.is_symlink():  # a dangling link: Path.exists follows it, mkdir would fail on it
            what = "is" if existing == path else f"cannot be made: {existing} is"
            return f"output folder {path} {what} a symbolic link to {os.readlink(existing)}, which does not exist"
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

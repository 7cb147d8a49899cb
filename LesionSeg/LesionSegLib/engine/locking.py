"""Exclusive inter-process locks where there is no ``fcntl`` (Windows).

On POSIX the callers lock with ``fcntl.flock`` themselves (:func:`atomic.folder_lock`,
``learn.versions._locked``, ``batch.cases.lock_outdir``).  Without ``fcntl`` they hold a lock file
through the ``filelock`` package instead (``msvcrt.locking`` on Windows; torch depends on it, and
requirements.txt names it): two processes still take turns, or the second is refused.
"""
from __future__ import annotations

import contextlib
import os
from typing import Iterator


class Busy(Exception):
    """A lock asked for without waiting is held by another process."""


@contextlib.contextmanager
def lock_file(path: str | os.PathLike, wait: bool = True) -> Iterator[bool]:
    """Hold an exclusive lock on the file ``path`` (created if missing) while the block runs.

    ``wait=False``: raise :class:`Busy` at once when another process holds it.  Yields True, or
    False where no lock can be had (``filelock`` is not installed, the file cannot be created):
    the block then runs unlocked, as it did before there was a lock at all.
    """
    try:
        import filelock
    except ImportError:
        yield False
        return
    lock = filelock.FileLock(os.fspath(path))
    try:
        lock.acquire(timeout=-1 if wait else 0)
    except filelock.Timeout:
        raise Busy(os.fspath(path)) from None
    except OSError:  # it cannot be created (a read-only folder): unlocked, as where flock fails
        yield False
        return
    try:
        yield True
    finally:
        lock.release()

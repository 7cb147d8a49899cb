"""Small helpers shared across the engine: timestamps, cancel checks and progress sub-ranges."""
from __future__ import annotations

import datetime as _dt
from typing import Callable, Optional

from .errors import CancelledError

#: ``progress(fraction in [0, 1], message)``
Progress = Callable[[float, str], None]
#: ``cancel() -> True`` when the caller wants the work to stop
Cancel = Optional[Callable[[], bool]]


def utc_now(timespec: str = "seconds") -> str:
    """The current UTC time in ISO 8601 (``2026-11-23T12:00:00+00:00``)."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec=timespec)


def check_cancel(cancel: Cancel, what: str = "work") -> None:
    """Raise :class:`CancelledError` when ``cancel()`` says so."""
    if cancel is not None and cancel():
        raise CancelledError(f"{what} cancelled")


def span(progress: Progress | None, lo: float, hi: float) -> Progress | None:
    """A progress callback mapping [0, 1] onto [lo, hi] of ``progress``."""
    if progress is None:
        return None
    return lambda f, msg: progress(lo + (hi - lo) * min(1.0, max(0.0, f)), msg)

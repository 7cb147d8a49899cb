"""LesionSeg's Slicer application settings: the feedback database both modules use, and the
pending-install marker that survives the restart the PyTorch extension needs.

The settings live in Slicer's user settings (``slicer.app.userSettings()``, a QSettings reached
through the application object, so no Qt import here).  Outside Slicer (plain Python, the CLI,
the headless tests without an application) a process-local dictionary stands in.

The feedback database (the ONE rule both LesionSeg and LesionSegTraining follow):

1. the path the user chose (Training panel, or :func:`set_feedback_database_path`), stored under
   :data:`FEEDBACK_DB_KEY`;
2. else ``$LESIONSEG_FEEDBACK``;
3. else ``<Slicer settings folder>/LesionSeg/feedback.db`` inside Slicer, ``~/.lesionseg/feedback.db``
   outside it (the engine CLI's default).

Nothing here creates the database file: the feedback store does that on the first write.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import slicer

#: settings key of the feedback database the user chose
FEEDBACK_DB_KEY = "LesionSeg/FeedbackDatabase"
#: settings key of an installation waiting for a Slicer restart (JSON: {"requirements": [...], "reason": ...})
PENDING_INSTALL_KEY = "LesionSeg/PendingInstall"


class _MemorySettings:
    """The part of QSettings used here, in memory (no Slicer application)."""

    def __init__(self):
        self._values: dict[str, object] = {}

    def value(self, key, default=None):
        return self._values.get(key, default)

    def setValue(self, key, value) -> None:
        self._values[key] = value

    def remove(self, key) -> None:
        self._values.pop(key, None)

    def contains(self, key) -> bool:
        return key in self._values

    def sync(self) -> None:
        pass


_FALLBACK = _MemorySettings()


def user_settings():
    """Slicer's user settings, or the process-local stand-in outside Slicer."""
    app = getattr(slicer, "app", None)
    get = getattr(app, "userSettings", None)
    if get is not None:
        settings = get()
        if settings is not None:
            return settings
    return _FALLBACK


def _text(value) -> str:
    if value is None:
        return ""
    return str(value).strip()


def slicer_settings_folder() -> Path | None:
    """The folder of Slicer's user settings file (``Slicer.ini``), or None outside Slicer."""
    path = getattr(getattr(slicer, "app", None), "slicerUserSettingsFilePath", None)
    if isinstance(path, str) and path:
        return Path(path).expanduser().parent
    return None


def default_feedback_database_path() -> Path:
    """Where decisions go when the user chose nothing (steps 2 and 3 of the module docstring)."""
    env = os.environ.get("LESIONSEG_FEEDBACK")
    if env:
        return Path(env).expanduser()
    folder = slicer_settings_folder()
    if folder is not None:
        return folder / "LesionSeg" / "feedback.db"
    return Path.home() / ".lesionseg" / "feedback.db"


def feedback_database_path(path=None) -> Path:
    """The feedback database to use: ``path`` when given, else the user's choice, else the default."""
    if path:
        return Path(str(path)).expanduser()
    chosen = _text(user_settings().value(FEEDBACK_DB_KEY))
    return Path(chosen).expanduser() if chosen else default_feedback_database_path()


def set_feedback_database_path(path) -> None:
    """Remember the user's database (None or "" forgets the choice: back to the default)."""
    settings = user_settings()
    if path:
        settings.setValue(FEEDBACK_DB_KEY, str(Path(str(path)).expanduser()))
    else:
        settings.remove(FEEDBACK_DB_KEY)
    settings.sync()


# ------------------------------------------------------------------ pending installation
def pending_install() -> dict | None:
    """The installation waiting for a restart (``{"requirements": [...], "reason": str}``) or None."""
    raw = _text(user_settings().value(PENDING_INSTALL_KEY))
    if not raw:
        return None
    try:
        value = json.loads(raw)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def set_pending_install(requirements: list[str], reason: str) -> None:
    settings = user_settings()
    settings.setValue(PENDING_INSTALL_KEY, json.dumps({"requirements": list(requirements), "reason": reason}))
    settings.sync()  # the restart may come at once


def clear_pending_install() -> None:
    settings = user_settings()
    settings.remove(PENDING_INSTALL_KEY)
    settings.sync()

"""Model versions: list them, activate one, roll back to the previously active one.

The active model is what ``segment`` uses when no model is named.  It is kept in
``<user models>/active.json``::

    {"active": "sts-clcs@2",
     "history": ["sts-clcs@1", "sts-clcs@2"],           # activation stack (rollback pops it)
     "log": [{"event": "activate", "id": "sts-clcs@2", "previous": "sts-clcs@1", "at": "..."}]}

With no ``active.json`` (or an empty stack) the shipped default model is active.  Activating
verifies the checksums of the model's weight files first, so a damaged version can never become
the default.  Writes are atomic (temporary file + rename) under a lock file.
"""
from __future__ import annotations

import contextlib
import json

from .. import models
from ..atomic import write_text
from ..common import utc_now
from ..errors import ModelError
from ..locking import lock_file

LOG_LIMIT = 200


@contextlib.contextmanager
def _locked():
    """An exclusive lock on ``active.json.lock`` (``flock``; without fcntl, :mod:`..locking`)."""
    d = models.require_user_models_dir()  # names LESIONSEG_MODELS when it is a file or cannot be made
    try:
        import fcntl
    except ImportError:  # Windows
        with lock_file(d / "active.json.lock"):
            yield
        return
    with open(d / "active.json.lock", "a", encoding="utf-8") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def read_state() -> dict:
    """``active.json`` (see :func:`models.read_active_state`, its one parser)."""
    return models.read_active_state()


def _write_state(state: dict) -> None:
    state["log"] = state.get("log", [])[-LOG_LIMIT:]
    models.active_file().parent.mkdir(parents=True, exist_ok=True)
    write_text(models.active_file(), json.dumps(state, indent=2) + "\n")


def active_id() -> str:
    """The full id (name@version) of the model used when none is named."""
    active = models.active_model_id()
    try:
        return models.get_card(active).id
    except ModelError:
        return active


def active_state_problem() -> str | None:
    """Why the activation record cannot be used (so the default model runs), or None: ``segment``
    and ``models list`` say it instead of running the default model without a word."""
    try:
        recorded = models.read_active_state()["active"]
    except ModelError as exc:
        return f"{exc}; the default model {models.default_model_id()} is used meanwhile"
    successor = models.upgraded(recorded) if recorded else recorded
    if successor != recorded:
        return (f"the activated model {recorded} was replaced by the shipped {successor} (an update of "
                "LesionSeg): that one is used; `lesionseg models activate` records it")
    return None


def verify(card: models.ModelCard) -> list[str]:
    """Check the card (:func:`models.checked_card`: the parts its architecture needs, with valid
    values) and the sha256 of every weight file it names; returns the file names checked."""
    models.checked_card(card)
    checked = []
    for key, part in card.data.items():
        if isinstance(part, dict) and "file" in part:
            card.verified_path(key)
            checked.append(part["file"])
    if not checked:
        raise ModelError(f"model {card.id} names no weight files")
    from ..segment.pipeline import kept_model_folder

    kept = kept_model_folder(card)  # the model kept for the scans of a domain, its card checksum-verified
    if kept is not None:
        try:
            checked += [f"{kept.name}/{name}" for name in verify(models.read_card(kept))]
        except ModelError as exc:
            raise ModelError(f"model {card.id}: the model it keeps for scans of {card.data['routing'].get('parent', 'its parent')}'s "
                             f"domain: {exc}") from None
    return checked


def _active_folder():
    """The folder of the card the active id leads to (None when it leads nowhere)."""
    try:
        return models.get_card(models.active_model_id()).folder.resolve()
    except ModelError:
        return None


def list_versions(name: str | None = None, problems: list[str] | None = None) -> list[dict]:
    """Every model version in the registry (builtin and user), oldest first per name; only the
    card the active id leads to is marked active (a user copy with a shipped id is not).  Cards
    that cannot be read, or whose id another card has, are left out of or noted in ``problems``."""
    active = _active_folder()
    out = []
    found = models.list_models(problems)
    if problems is not None:
        problems.extend(models.shadowed(found))
    cards = [c for c in found if name is None or c.name == name]
    cards.sort(key=lambda c: (c.name, models._version_key(c.version)))
    for c in cards:
        parent = c.data.get("parent") or {}
        built = models.built_from_id(c)
        if not parent and built:
            parent = {"id": built}  # a shipped release: the version it was built from
        out.append(
            {
                "id": c.id,
                "name": c.name,
                "version": c.version,
                "architecture": c.architecture,
                "has_classifier": isinstance(c.data.get("classifier"), dict),
                "active": c.folder.resolve() == active,
                "builtin": c.builtin,
                "parent": parent.get("id") if isinstance(parent, dict) else parent,
                "created": str(c.data.get("created") or ""),
                "description": str(c.data.get("description") or ""),
                "metrics": c.data["metrics"] if isinstance(c.data.get("metrics"), dict) else {},
                "folder": str(c.folder),
            }
        )
    return out


def _resolve(model: str) -> models.ModelCard:
    """``name@version``, a folder, or ``name`` = its newest version (not the active one)."""
    text = str(model)
    if "@" not in text and not models.is_explicit_path(text):
        found = [c for c in models.list_models() if c.name == text]
        if found:
            return max(found, key=lambda c: models._version_key(c.version))
    return models.get_card(text)


def activate(model: str, reason: str = "activate") -> str:
    """Make ``model`` (name, name@version or folder inside the registry) the active model."""
    card = _resolve(model)
    verify(card)
    # the id must resolve back to this card, or segment would load another one
    try:
        registered = models.get_card(card.id).folder.resolve()
    except ModelError:  # a folder outside the registry: no id leads back to it
        registered = None
    if registered != card.folder.resolve():
        raise ModelError(f"{card.folder} is not the registered {card.id}; copy it into {models.user_models_dir()} first")
    with _locked():
        state = read_state()
        previous = state["active"] or models.default_model_id()
        if state["history"] and state["history"][-1] == card.id:
            return card.id
        state["history"].append(card.id)
        state["active"] = card.id
        state["log"].append({"event": reason, "id": card.id, "previous": previous, "at": utc_now()})
        _write_state(state)
    return card.id


def rollback() -> str:
    """Re-activate the previously active model (the shipped default when there is none)."""
    with _locked():
        state = read_state()
        if not state["history"]:
            raise ModelError(f"nothing to roll back: the default model {models.default_model_id()} is active")
        current = state["history"].pop()
        # skip versions that have since been deleted or damaged
        while state["history"]:
            cand = state["history"][-1]
            try:
                verify(models.get_card(cand))
                break
            except ModelError:
                state["history"].pop()
        state["active"] = state["history"][-1] if state["history"] else None
        now_active = state["active"] or models.default_model_id()
        state["log"].append({"event": "rollback", "id": now_active, "previous": current, "at": utc_now()})
        _write_state(state)
    return now_active


def history() -> list[dict]:
    return read_state()["log"]


def next_version(name: str) -> str:
    """The next integer version for ``name`` (1 when there is none)."""
    majors = []
    for c in models.list_models():
        if c.name == name:
            head = str(c.version).split(".")[0]
            if head.isdigit():
                majors.append(int(head))
    return str(max(majors, default=0) + 1)

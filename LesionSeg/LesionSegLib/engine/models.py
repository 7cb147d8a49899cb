"""Model cards, the model registry and checksum-verified safetensors weights.

A model is a folder holding ``card.json`` and the safetensors files it names.  The card says
which architecture runs it (``clcs`` today; other designs register here), the network
configs, the preprocessing (spacing, HU windows), the training data and split, the
validation metrics and the sha256 of every weight file.  Weights are only ever read with
``safetensors`` after their checksum matched: no model file is ever unpickled.

Registry roots, searched in order:

1. the models shipped in ``LesionSegLib/models`` (read-only, the default model lives here);
2. the user's model folder, ``$LESIONSEG_MODELS`` or ``~/.lesionseg/models`` (retrained versions go here).

A model is addressed as ``name`` (its active or newest version) or ``name@version``, or by
the path of its folder or card.  A text is a path only when it looks like one
(:func:`is_explicit_path`: it starts with ``/``, ``~`` or ``.``, or holds a path separator and no
``@``), so a folder in the current directory can never shadow a registered model name.

Confinement: every file a card names must be a plain relative path inside the model's folder;
absolute paths, ``..`` and symlinks leading out of the folder are refused with
:class:`ModelError`.  Weights are read once into memory, their sha256 is checked on those bytes
and the same bytes are handed to safetensors (no window between checking and loading).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .atomic import TMP_PREFIX
from .errors import ModelError
from .weights import load_state_shared, save_weights, state_mismatch  # noqa: F401  (re-exported: weights live in .weights)

if TYPE_CHECKING:
    import torch

# torch / safetensors are imported where used: the Slicer module lists cards without torch.

BUILTIN_DIR = Path(__file__).resolve().parents[1] / "models"
DEFAULT_MODEL = "sts-clcs"
CARD_NAME = "card.json"
#: a model name or version: letters, digits, '-', '_' and '.', not starting with '.'
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
MAX_WEIGHTS_BYTES = 2 * 1024**3  # a weight file larger than this is refused before reading it
ARRAY_LAYOUT = {"ood": {"scans": 2, "lesions": 2}}  # part -> {array: its number of dimensions} (load_arrays)


def is_explicit_path(text: str | os.PathLike) -> bool:
    """Whether ``text`` names a folder/file rather than a registered model (``name[@version]``).

    A path is a :class:`os.PathLike`, or a text starting with ``/``, ``~`` or ``.`` (``./m``,
    ``../m``), or one holding a path separator and no ``@`` (``runs/m``).  Anything else
    (``sts-clcs``, ``sts-clcs@1.0.0``, ``name@../x``) is a model id, looked up only in the registry.
    """
    if isinstance(text, os.PathLike):
        return True
    t = str(text)
    seps = {"/", os.sep} | ({os.altsep} if os.altsep else set())
    if t.startswith(("/", "~", ".")) or t.startswith(tuple(seps)) or re.match(r"^[A-Za-z]:[\\/]", t):
        return True
    return "@" not in t and any(c in t for c in seps)


def check_model_id(name: str, version: str | None = None) -> None:
    """Raise :class:`ModelError` unless ``name`` (and ``version``) are valid registry names."""
    for what, v in (("name", name), ("version", version)):
        if v is None:
            continue
        if not NAME_RE.match(v) or ".." in v:
            raise ModelError(f"invalid model {what} {v!r} (letters, digits, '-', '_' and '.' only, not starting with '.')")


def confined(folder: Path, name: str, what: str = "file") -> Path:
    """``folder / name`` after checking that it stays inside ``folder`` (no absolute path, no '..',
    no symlink leading out)."""
    text = str(name)
    p = Path(text)
    if not text or p.is_absolute() or p.drive or ".." in p.parts or "\\" in text:
        raise ModelError(f"{what} {text!r} in {folder / CARD_NAME} is not a plain file name inside the model folder")
    full = folder / p
    root = folder.resolve()
    try:
        full.resolve().relative_to(root)
    except ValueError:
        raise ModelError(f"{what} {text!r} in {folder / CARD_NAME} leads outside the model folder {root}") from None
    return full


def user_models_dir() -> Path:
    """``$LESIONSEG_MODELS`` (an empty or blank value counts as unset), else ``~/.lesionseg/models``."""
    env = os.environ.get("LESIONSEG_MODELS", "")
    return Path(env).expanduser() if env.strip() else Path.home() / ".lesionseg" / "models"


def user_models_problem(create: bool = False) -> str | None:
    """Why the user model folder cannot hold models, naming ``LESIONSEG_MODELS`` when it is set;
    None when it is a folder (made now when ``create``) this process can write."""
    d = user_models_dir()
    what = f"LESIONSEG_MODELS={d}" if os.environ.get("LESIONSEG_MODELS", "").strip() else f"the user model folder {d}"
    try:
        if create and not d.exists():
            d.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        return f"{what} cannot be created ({exc.strerror or exc})"
    if d.exists() and not d.is_dir():
        return f"{what} is not a folder"
    return f"{what} is not writable" if d.is_dir() and not os.access(d, os.W_OK | os.X_OK) else None


def require_user_models_dir() -> Path:
    """The user model folder, created if needed; :class:`ModelError` naming the problem otherwise."""
    problem = user_models_problem(create=True)
    if problem:
        raise ModelError(f"{problem}; set LESIONSEG_MODELS to a folder you can write (or unset it for ~/.lesionseg/models)")
    return user_models_dir()


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class ModelCard:
    folder: Path
    data: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.data["name"]

    @property
    def version(self) -> str:
        return str(self.data.get("version", "1"))

    @property
    def id(self) -> str:
        return f"{self.name}@{self.version}"

    @property
    def architecture(self) -> str:
        return self.data.get("architecture", "clcs")

    @property
    def builtin(self) -> bool:
        try:
            self.folder.resolve().relative_to(BUILTIN_DIR.resolve())
            return True
        except ValueError:
            return False

    def part(self, key: str) -> dict:
        if key not in self.data:
            raise ModelError(f"model {self.id}: card has no '{key}' section")
        if not isinstance(self.data[key], dict):
            raise ModelError(f"model {self.id}: the card's '{key}' section is not an object")
        return self.data[key]

    def weights_path(self, key: str) -> Path:
        """The weight file of ``key``, confined to the model folder (not checked against its sha256)."""
        name = self.part(key).get("file", "")
        if not isinstance(name, str):
            raise ModelError(f"model {self.id}: {key}.file in {self.folder / CARD_NAME} must be a file name, not {str(name)[:60]!r}")
        return confined(self.folder, name, f"'{key}' file")

    def verified_bytes(self, key: str) -> bytes:
        """The content of ``key``'s weight file, read once, after its sha256 matched the card.
        Only a regular file is read (a FIFO or device would block or never end)."""
        import stat

        path = self.weights_path(key)
        expected = self.part(key).get("sha256")
        if not expected:
            raise ModelError(f"model {self.id}: card gives no sha256 for {path.name}; refusing to load it")
        if not isinstance(expected, str) or not re.fullmatch(r"[0-9a-f]{64}", expected):
            raise ModelError(f"model {self.id}: {key}.sha256 in {self.folder / CARD_NAME} is not 64 hex digits")
        try:
            # O_NONBLOCK: opening a FIFO does not wait for a writer; fstat then refuses it
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
            with os.fdopen(fd, "rb") as fh:
                st = os.fstat(fh.fileno())
                if not stat.S_ISREG(st.st_mode):
                    kind = "a folder" if stat.S_ISDIR(st.st_mode) else "a special file (FIFO, socket or device)"
                    raise ModelError(f"model {self.id}: {path} is {kind}, not a weight file")
                if st.st_size > MAX_WEIGHTS_BYTES:
                    raise ModelError(f"model {self.id}: {path.name} is {st.st_size / 1e9:.1f} GB, larger than any LesionSeg weight file")
                data = fh.read()
        except FileNotFoundError:
            raise ModelError(f"model {self.id}: weight file {path} is missing") from None
        except IsADirectoryError:
            raise ModelError(f"model {self.id}: {path} is a folder, not a weight file") from None
        except OSError as exc:
            raise ModelError(f"model {self.id}: cannot read {path}: {exc.strerror or exc}") from None
        actual = hashlib.sha256(data).hexdigest()
        if actual != expected:
            raise ModelError(
                f"model {self.id}: checksum mismatch for {path.name} (expected sha256 {expected[:12]}..., "
                f"file has {actual[:12]}...); the file is corrupt or was modified"
            )
        return data

    def verified_path(self, key: str) -> Path:
        """The weight file of ``key`` after its sha256 matched the card (loading uses :meth:`verified_bytes`)."""
        self.verified_bytes(key)
        return self.weights_path(key)

    def load_state(self, key: str) -> dict[str, torch.Tensor]:
        """The checksum-verified tensors of ``key`` as a dict (parsed from the verified bytes)."""
        from safetensors.torch import load

        data = self.verified_bytes(key)
        try:
            state = load(data)
        except Exception as exc:  # safetensors raises its own error types
            raise ModelError(f"model {self.id}: cannot read {self.part(key)['file']} as safetensors: {one_line_text(exc)}") from None
        for name, t in state.items():
            if t.is_floating_point() and not bool(t.isfinite().all()):
                raise ModelError(f"model {self.id}: {self.part(key)['file']} holds NaN or infinite values ({name}); refusing to load it")
        return state

    def load_arrays(self, key: str) -> dict:
        """The checksum-verified tensors of ``key`` as float numpy arrays, all finite (no torch
        import: the ONNX path uses it)."""
        import numpy as np
        from safetensors.numpy import load

        data = self.verified_bytes(key)
        try:
            arrays = load(data)
        except Exception as exc:  # safetensors raises its own error types
            raise ModelError(f"model {self.id}: cannot read {self.part(key)['file']} as safetensors: {one_line_text(exc)}") from None
        for name, ndim in ARRAY_LAYOUT.get(key, {}).items():
            if name not in arrays or arrays[name].ndim != ndim:
                raise ModelError(f"model {self.id}: {self.part(key)['file']} lacks the {ndim}-D array {name!r}; refusing to load it")
        for name, a in arrays.items():
            if a.dtype not in (np.float32, np.float64):
                raise ModelError(f"model {self.id}: {self.part(key)['file']} holds {name} as {a.dtype}, not float32/float64; refusing to load it")
            if not np.isfinite(a).all():
                raise ModelError(f"model {self.id}: {self.part(key)['file']} holds NaN or infinite values ({name}); refusing to load it")
        return arrays

    def load_into(self, key: str, module: torch.nn.Module) -> torch.nn.Module:
        """Load the checksum-verified weights of ``key`` into ``module`` (strict; tensors that the
        module shares between two names, stored once by ``save_model``, count as loaded)."""
        state = self.load_state(key)
        problem = state_mismatch(module, state)
        if problem:
            raise ModelError(f"model {self.id}: {self.part(key)['file']} does not fit the network the card describes: {problem}")
        try:
            missing, unexpected = load_state_shared(module, state)
        except Exception as exc:
            raise ModelError(f"model {self.id}: cannot load {self.part(key)['file']} into the network: {one_line_text(exc)}") from None
        if missing or unexpected:
            raise ModelError(f"model {self.id}: {self.part(key)['file']} does not fit the network "
                             f"(missing {missing[:3]}, unexpected {list(unexpected)[:3]})")
        return module

    def summary(self) -> str:
        m = self.data["metrics"] if isinstance(self.data.get("metrics"), dict) else {}
        figures = ", ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in m.items())
        return f"{self.id} [{self.architecture}] {self.data.get('description', '')} {figures}".strip()

    def save(self) -> Path:
        from .atomic import write_text

        self.folder.mkdir(parents=True, exist_ok=True)
        return write_text(self.folder / CARD_NAME, json.dumps(self.data, indent=2) + "\n")


def one_line_text(exc: BaseException) -> str:
    """The first line of an exception's text (a library's multi-line error as one line)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def read_card(path: str | os.PathLike) -> ModelCard:
    """The card at ``path`` (a folder or its card.json), with the structure every card has
    (:func:`.card_schema.check_structure`); :class:`ModelError` when it cannot be read."""
    from .card_schema import check_structure

    p = Path(path)
    if p.is_dir():
        p = p / CARD_NAME
    if not p.exists():
        raise ModelError(f"no model card at {p}")
    if not p.is_file():
        raise ModelError(f"model card {p} is not a regular file")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ModelError(f"model card {p} is not valid JSON: {one_line_text(exc)[:200]}") from None
    check_structure(data, str(p))
    return ModelCard(p.parent, data)


def checked_card(card: ModelCard) -> ModelCard:
    """``card`` after :func:`.card_schema.check_card` (every field the engine uses is valid)."""
    from .card_schema import check_card

    check_card(card.data, str(card.folder / CARD_NAME))
    return card


def registry_roots() -> list[Path]:
    return [BUILTIN_DIR, user_models_dir()]


def list_models(problems: list[str] | None = None) -> list[ModelCard]:
    """Every model card found in the registry roots (builtin first).  A card that cannot be
    read is skipped (one broken card must not hide the others); why goes into ``problems``."""
    cards: list[ModelCard] = []
    for root in registry_roots():
        try:
            if not root.is_dir():
                continue
            found = sorted(root.glob(f"**/{CARD_NAME}"))
        except OSError:
            continue
        folders = {c.parent for c in found}
        for card in found:  # a model folder inside another (a fine-tuned model's kept parent) is part of that one
            parts = card.relative_to(root).parts
            if len(parts) > 4 or any(a in folders for a in card.parent.parents):
                continue
            if any(p.startswith(TMP_PREFIX) for p in parts[:-1]):  # a version still being built (atomic_folder)
                continue
            try:
                cards.append(read_card(card))
            except ModelError as exc:
                if problems is not None:
                    problems.append(f"skipped: {exc}")
    return cards


def shadowed(cards: list[ModelCard]) -> list[str]:
    """A line per card that no id reaches because an earlier card (a shipped one) has its id."""
    first: dict[str, ModelCard] = {}
    out = []
    for c in cards:
        if c.id in first:
            out.append(f"{c.folder} is never used: {c.id} leads to {'the shipped model' if first[c.id].builtin else first[c.id].folder} "
                       f"of the same id; give it another version (or name) in its card.json to use it")
        else:
            first[c.id] = c
    return out


def _version_key(v: str):
    parts = []
    for p in str(v).split("."):
        parts.append((0, int(p), "") if p.isdigit() else (1, 0, p))
    return parts


def active_file() -> Path:
    return user_models_dir() / "active.json"


def read_active_state() -> dict:
    """``active.json`` as ``{"active", "history", "log"}`` (empty when there is none); the one parser
    of that file.  Raises :class:`ModelError` when it is not a JSON object."""
    f = active_file()
    state = {"active": None, "history": [], "log": []}
    try:
        data = json.loads(f.read_text(encoding="utf-8"))
    except (FileNotFoundError, NotADirectoryError):  # none yet (or LESIONSEG_MODELS is a file: a note says so)
        return state
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:  # unreadable: the default model runs, with a note
        why = (f"cannot be read ({exc.strerror}): the user model folder (LESIONSEG_MODELS) is not readable" if isinstance(exc, PermissionError)
               else f"is not valid JSON ({exc}); fix or delete it to reset to the default model")
        raise ModelError(f"{f} {why}") from None
    if not isinstance(data, dict):
        raise ModelError(f"{f} does not hold a JSON object; fix or delete it")
    state.update({k: data.get(k, state[k]) for k in state})
    if not isinstance(state["active"], (str, type(None))) or not isinstance(state["history"], list) \
            or not isinstance(state["log"], list) or not all(isinstance(h, str) for h in state["history"]) \
            or not all(isinstance(e, dict) for e in state["log"]):
        raise ModelError(f"{f} has entries of the wrong type; fix or delete it")
    if state["active"] and not state["history"]:
        state["history"] = [state["active"]]
    return state


def default_model_id() -> str:
    """The shipped default model's id (``sts-clcs@<its version>``): what runs until the user
    activates another model, however many versions of that name retraining has added."""
    shipped = [c for c in list_models() if c.name == DEFAULT_MODEL and c.builtin]
    return max(shipped, key=lambda c: _version_key(c.version)).id if shipped else DEFAULT_MODEL


def active_model_id() -> str:
    """The model id that ``segment`` uses when none is named (see :mod:`.learn.versions`): the
    activated one, else the shipped default (:func:`default_model_id`) -- never a version that
    was only written (retrain and fine-tune name theirs "base name, next version").  An
    unreadable ``active.json`` falls back to the default; ``models list`` and ``segment`` say so."""
    return _recorded_active() or default_model_id()


def _recorded_active() -> str | None:
    """The activated model id of ``active.json`` (a shipped version that an update replaced: the
    shipped newer one, :func:`upgraded`); None when there is none or it is unreadable."""
    try:
        recorded = read_active_state()["active"]
    except ModelError:
        return None
    return upgraded(recorded) if recorded else recorded


def built_from_id(card: ModelCard) -> str | None:
    """The id of the model a shipped release was built from (its ``built_from.model``), or None."""
    built = card.data.get("built_from")
    return built["model"] if isinstance(built, dict) and isinstance(built.get("model"), str) else None


def shipped_before(card: ModelCard) -> set[str]:
    """The ids a shipped card names as versions shipped before it: the one it was ``built_from``
    and the versions of its ``release_notes``."""
    ids = {built_from_id(card)} - {None}
    notes = card.data.get("release_notes")
    if isinstance(notes, dict):
        ids.update(f"{card.name}@{v}" for v in notes)
    return ids


def upgraded(model_id: str) -> str:
    """``model_id``, or the newest shipped version of its name when that id is gone and a newer
    shipped version names it as shipped before it (an update of LesionSeg replaced the version
    the user activated).  A version the user made and removed is not replaced: it fails, named."""
    base, _, version = str(model_id).partition("@")
    cards = list_models() if version else []
    newer = [c for c in cards if c.name == base and c.builtin and _version_key(c.version) > _version_key(version)
             and model_id in shipped_before(c)]
    if not newer or any(c.id == model_id for c in cards):
        return model_id
    return max(newer, key=lambda c: _version_key(c.version)).id


def _broken_card_text(base: str) -> str:
    """Why the user folder's cards of ``base`` cannot be read (for an error naming a lost model)."""
    out = []
    try:
        found = sorted((user_models_dir() / base).glob(f"*/{CARD_NAME}")) if base and NAME_RE.match(base) else []
    except OSError:
        found = []
    for card in found:
        try:
            read_card(card)
        except ModelError as exc:
            out.append(str(exc))
    return "; ".join(out)


def get_card(name: str | os.PathLike | None = None) -> ModelCard:
    """Resolve a model name, ``name@version`` (registry only) or an explicit folder / card path
    (see :func:`is_explicit_path`) to its card."""
    if name is None or name == "":
        name = active_model_id()
    if is_explicit_path(name):
        p = Path(name).expanduser()
        if (p.is_dir() and (p / CARD_NAME).exists()) or (p.is_file() and p.name.endswith(".json")):
            return checked_card(read_card(p))
        raise ModelError(f"no model card at {p}")
    return checked_card(_find_card(str(name)))


def _find_card(name: str) -> ModelCard:
    """The registered card ``name`` or ``name@version`` (see :func:`get_card`)."""
    base, _, version = name.partition("@")
    found = [c for c in list_models() if c.name == base and (not version or c.version == version)]
    if not found:
        known = sorted({c.id for c in list_models()})
        hint = ""
        broken = _broken_card_text(base)
        if Path(name).exists():
            hint = f" (to use the folder {name!r}, write ./{name})"
        elif name == _recorded_active():
            hint = (f"; it is the active model (its folder was removed, or its card.json cannot be read: "
                    f"{broken or 'no card found'}); `lesionseg models rollback` or `models activate` another")
        elif broken:
            hint = f"; a card in {user_models_dir() / base} cannot be read: {broken}"
        raise ModelError(f"unknown model {name!r}; known models: {', '.join(known) or 'none'}{hint}")
    if not version:  # a bare name: its active version, else its shipped one, else its newest
        active = active_model_id()
        for c in found:
            if c.id == active:
                return c
        shipped = [c for c in found if c.builtin]
        if shipped:
            return max(shipped, key=lambda c: _version_key(c.version))
    return max(found, key=lambda c: _version_key(c.version))

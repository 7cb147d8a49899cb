"""Model cards, the model registry and checksum-verified safetensors weights.

A model is a folder holding ``card.json`` and the safetensors files it names.  The card says
which architecture runs it (``clcs`` today; other designs register here), the network
configs, the preprocessing (spacing, HU windows), the training data and split, the
validation metrics and the sha256 of every weight file.  Weights are only ever read with
``safetensors`` after their checksum matched: no model file is ever unpickled.

Registry roots, searched in order:

1. the models shipped in ``LesionSegLib/models`` (read-only, the default model lives here);
2. the user's model folder, ``$LESIONSEG_MODELS`` or ``~/.lesionseg/models`` (retrained
   versions are written here).

A model is addressed as ``name`` (its active or newest version) or ``name@version``, or by
the path of its folder or card.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import ModelError

if TYPE_CHECKING:
    import torch

# torch / safetensors are imported where used, so the Slicer module can list model cards (and
# offer to install torch) in an environment that does not have torch yet.

BUILTIN_DIR = Path(__file__).resolve().parents[1] / "models"
DEFAULT_MODEL = "sts-clcs"
CARD_NAME = "card.json"


def user_models_dir() -> Path:
    return Path(os.environ.get("LESIONSEG_MODELS", Path.home() / ".lesionseg" / "models")).expanduser()


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_weights(obj: "torch.nn.Module | dict[str, torch.Tensor]", path: str | os.PathLike) -> str:
    """Save a module (shared tensors de-duplicated) or a state dict as safetensors; return its sha256."""
    import torch
    from safetensors.torch import save_file, save_model

    if isinstance(obj, torch.nn.Module):
        save_model(obj, str(path))
    else:
        save_file({k: v.detach().cpu().contiguous() for k, v in obj.items()}, str(path))
    return sha256_file(path)


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
        return self.data[key]

    def weights_path(self, key: str) -> Path:
        return self.folder / self.part(key)["file"]

    def verified_path(self, key: str) -> Path:
        """The weight file of ``key`` ('segmenter', 'classifier') after its sha256 matched the card."""
        part = self.part(key)
        path = self.folder / part["file"]
        if not path.exists():
            raise ModelError(f"model {self.id}: weight file {path} is missing")
        expected = part.get("sha256")
        if not expected:
            raise ModelError(f"model {self.id}: card gives no sha256 for {path.name}; refusing to load it")
        actual = sha256_file(path)
        if actual != expected:
            raise ModelError(
                f"model {self.id}: checksum mismatch for {path.name} (expected sha256 {expected[:12]}..., "
                f"file has {actual[:12]}...); the file is corrupt or was modified"
            )
        return path

    def load_state(self, key: str) -> dict[str, torch.Tensor]:
        """The checksum-verified tensors of ``key`` as a dict."""
        from safetensors.torch import load_file

        path = self.verified_path(key)
        try:
            return load_file(str(path))
        except Exception as exc:  # safetensors raises its own error types
            raise ModelError(f"model {self.id}: cannot read {path.name} as safetensors: {exc}") from None

    def load_into(self, key: str, module: torch.nn.Module) -> torch.nn.Module:
        """Load the checksum-verified weights of ``key`` into ``module`` (strict)."""
        from safetensors.torch import load_model

        path = self.verified_path(key)
        try:
            load_model(module, str(path), strict=True, device="cpu")
        except Exception as exc:
            raise ModelError(f"model {self.id}: cannot load {path.name} into the network: {exc}") from None
        return module

    def summary(self) -> str:
        m = self.data.get("metrics", {})
        figures = ", ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in m.items())
        return f"{self.id} [{self.architecture}] {self.data.get('description', '')} {figures}".strip()

    def save(self) -> Path:
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / CARD_NAME
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.data, indent=2) + "\n")
        os.replace(tmp, path)
        return path


def read_card(path: str | os.PathLike) -> ModelCard:
    p = Path(path)
    if p.is_dir():
        p = p / CARD_NAME
    if not p.exists():
        raise ModelError(f"no model card at {p}")
    try:
        data = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelError(f"model card {p} is not valid JSON: {exc}") from None
    if "name" not in data:
        raise ModelError(f"model card {p} has no 'name'")
    return ModelCard(p.parent, data)


def registry_roots() -> list[Path]:
    return [BUILTIN_DIR, user_models_dir()]


def list_models() -> list[ModelCard]:
    """Every model card found in the registry roots (builtin first)."""
    cards: list[ModelCard] = []
    for root in registry_roots():
        if not root.exists():
            continue
        for card in sorted(root.glob(f"**/{CARD_NAME}")):
            if len(card.relative_to(root).parts) > 4:
                continue
            try:
                cards.append(read_card(card))
            except ModelError:
                continue  # a broken card in the user folder must not hide the others
    return cards


def _version_key(v: str):
    parts = []
    for p in str(v).split("."):
        parts.append((0, int(p), "") if p.isdigit() else (1, 0, p))
    return parts


def active_file() -> Path:
    return user_models_dir() / "active.json"


def active_model_id() -> str:
    """The model id that ``segment`` uses when none is named (see :mod:`versions`)."""
    f = active_file()
    if f.exists():
        try:
            data = json.loads(f.read_text())
            if data.get("active"):
                return data["active"]
        except (OSError, json.JSONDecodeError):
            pass
    return DEFAULT_MODEL


def get_card(name: str | os.PathLike | None = None) -> ModelCard:
    """Resolve a model name, ``name@version``, folder or card path to its card."""
    if name is None or name == "":
        name = active_model_id()
    p = Path(name)
    if (p.is_dir() and (p / CARD_NAME).exists()) or (p.is_file() and p.name.endswith(".json")):
        return read_card(p)
    name = str(name)
    base, _, version = name.partition("@")
    found = [c for c in list_models() if c.name == base and (not version or c.version == version)]
    if not found:
        known = sorted({c.id for c in list_models()})
        raise ModelError(f"unknown model {name!r}; known models: {', '.join(known) or 'none'}")
    if not version:
        active = active_model_id()
        for c in found:
            if c.id == active:
                return c
    return max(found, key=lambda c: _version_key(c.version))

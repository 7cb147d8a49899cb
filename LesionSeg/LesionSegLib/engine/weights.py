"""Weight tensors to and from safetensors files and modules (the checksums and cards are in
:mod:`.models`, which re-exports these)."""
from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    import torch


def save_weights(obj: "torch.nn.Module | dict[str, torch.Tensor]", path: str | os.PathLike) -> str:
    """Save a module (shared tensors de-duplicated) or a state dict as safetensors; return its sha256."""
    import torch
    from safetensors.torch import save_file, save_model

    from .atomic import FILE_MODE
    from .models import sha256_file  # (models imports this module)

    if isinstance(obj, torch.nn.Module):
        save_model(obj, str(path))
    else:
        save_file({k: v.detach().cpu().contiguous() for k, v in obj.items()}, str(path))
    os.chmod(path, FILE_MODE)  # safetensors creates 0600 files: others sharing the model folder could not read them
    return sha256_file(path)


def load_state_shared(module: "torch.nn.Module", state: dict) -> tuple[list[str], list[str]]:
    """``module.load_state_dict(state, strict=False)``; returns (missing, unexpected) where a name
    that shares its tensor with a loaded one (stored once by :func:`save_weights`) is not missing."""
    own = module.state_dict()
    storage = {k: (v.data_ptr(), tuple(v.shape)) for k, v in own.items()}
    missing, unexpected = module.load_state_dict(state, strict=False)
    loaded = {storage[k] for k in state if k in storage}
    return [k for k in missing if storage.get(k) not in loaded], list(unexpected)


def state_mismatch(module: "torch.nn.Module", state: dict) -> str | None:
    """The first tensor of ``state`` whose shape or dtype differs from ``module``'s, and how many
    more differ (one line); None when every shared name fits."""
    own = module.state_dict()
    bad = []
    for k, v in state.items():
        if k in own and (tuple(v.shape) != tuple(own[k].shape) or v.dtype != own[k].dtype):
            bad.append((k, v, own[k]))
    if not bad:
        return None
    k, v, want = bad[0]
    text = (f"{k} has shape {tuple(v.shape)}, the network needs {tuple(want.shape)}" if tuple(v.shape) != tuple(want.shape)
            else f"{k} is {str(v.dtype).replace('torch.', '')}, the network needs {str(want.dtype).replace('torch.', '')}")
    return text + (f" (and {len(bad) - 1} more tensor(s) that do not fit)" if len(bad) > 1 else "")

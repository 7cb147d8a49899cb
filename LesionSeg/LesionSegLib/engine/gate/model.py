"""The cascade gate: which z-slabs of a scan go to the segmenter.

A *region* is a z-slab of ``slab`` voxels of the model-grid input (C, z, y, x) (8 voxels of
3 mm = 24 mm by default).  ``SlabGate`` - a small 3D CNN of MONAI ``Convolution`` blocks on the
slab, average-pooled 4x in-plane, with global max+mean pooling - scores each slab
``P(lesion in slab)``.  Slabs scoring >= the calibrated threshold are *open*.  The segmenter runs
once per contiguous run of open slabs, on that run plus ``margin`` voxels of context on each
side; closed slabs get probability 0.  When every slab is open there is one run covering the
whole input, so the gated output is exactly the ungated one.

The gate is an option of any segmenter: it lives in a ``gate`` section of a model card, or in a
gate folder (``gate.json`` + ``gate.safetensors``) given to ``lesionseg segment --gate DIR``.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ModelError

GATE_JSON = "gate.json"
DEFAULT_GATE_NETWORK = {"type": "SlabGate", "in_channels": 2, "channels": [8, 16, 32], "pool": 4}


class SlabGate(nn.Module):
    """Slab -> lesion logit.  Input (B, C, slab, y, x); any in-plane size."""

    def __init__(self, in_channels: int = 2, channels=(8, 16, 32), pool: int = 4):
        super().__init__()
        from monai.networks.blocks import Convolution

        self.pool = nn.AvgPool3d((1, pool, pool), ceil_mode=True)
        layers, c_in = [], in_channels
        for i, c in enumerate(channels):
            layers.append(Convolution(3, c_in, c, strides=(1, 2, 2) if i == 0 else 2, kernel_size=3, norm="instance", act="relu"))
            c_in = c
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(2 * c_in, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.features(self.pool(x))
        pooled = torch.cat([f.amax(dim=(2, 3, 4)), f.mean(dim=(2, 3, 4))], 1)
        return self.head(pooled)[:, 0]


def slab_starts(depth: int, slab: int) -> list[int]:
    return list(range(0, max(depth, 1), slab))


def slabs_of(x: torch.Tensor, slab: int) -> torch.Tensor:
    """(n_slabs, C, slab, y, x): the input cut into z-slabs, the last one zero-padded."""
    z = x.shape[1]
    n = len(slab_starts(z, slab))
    pad = n * slab - z
    xp = F.pad(x, (0, 0, 0, 0, 0, pad)) if pad else x
    return xp.reshape(x.shape[0], n, slab, *x.shape[2:]).transpose(0, 1).contiguous()


def slab_labels(y: torch.Tensor | np.ndarray, slab: int, min_voxels: int = 1) -> np.ndarray:
    """1 for slabs holding >= ``min_voxels`` lesion voxels of label (z, y, x)."""
    y = np.asarray(y)
    counts = [int(y[s : s + slab].sum()) for s in slab_starts(y.shape[0], slab)]
    return (np.array(counts) >= min_voxels).astype(np.int64)


def open_runs(open_mask, slab: int, depth: int) -> list[tuple[int, int]]:
    """Contiguous runs of open slabs as (z0, z1) voxel ranges."""
    runs: list[tuple[int, int]] = []
    for i, is_open in enumerate(open_mask):
        if not is_open:
            continue
        z0, z1 = i * slab, min(depth, (i + 1) * slab)
        if runs and runs[-1][1] == z0:
            runs[-1] = (runs[-1][0], z1)
        else:
            runs.append((z0, z1))
    return runs


def gated_probability(x, open_mask, slab: int, margin: int, infer: Callable) -> np.ndarray:
    """Run ``infer`` (C, z, y, x) -> (z, y, x) probability only on the open slabs (+ margin of context);
    ``x`` and ``infer``'s output may be numpy arrays or CPU tensors; closed slabs get probability 0."""
    depth = x.shape[1]
    prob = np.zeros(tuple(x.shape[1:]), dtype=np.float32)
    for z0, z1 in open_runs(open_mask, slab, depth):
        lo, hi = max(0, z0 - margin), min(depth, z1 + margin)
        p = infer(x[:, lo:hi])
        p = p.detach().cpu().numpy() if isinstance(p, torch.Tensor) else np.asarray(p)
        prob[z0:z1] = p[z0 - lo : z1 - lo]
    return prob


@dataclass
class Gate:
    """A loaded gate: network, slab size, context margin and the calibrated threshold."""

    net: SlabGate
    slab: int = 8
    margin: int = 8
    threshold: float = 0.5
    info: dict = field(default_factory=dict)

    @classmethod
    def from_part(cls, card, key: str = "gate") -> "Gate":
        part = card.part(key)
        cfg = part.get("network", DEFAULT_GATE_NETWORK)
        if cfg.get("type", "SlabGate") != "SlabGate":
            raise ModelError(f"model {card.id}: unknown gate network type {cfg.get('type')!r}")
        net = SlabGate(int(cfg.get("in_channels", 2)), tuple(cfg.get("channels", (8, 16, 32))), int(cfg.get("pool", 4)))
        card.load_into(key, net)
        net.eval()
        return cls(net, int(part.get("slab", 8)), int(part.get("margin", 8)), float(part["threshold"]), part)

    @torch.inference_mode()
    def scores(self, x: torch.Tensor) -> np.ndarray:
        """P(lesion) of each z-slab of the model-grid input x (C, z, y, x)."""
        s = slabs_of(torch.as_tensor(np.asarray(x, dtype=np.float32)) if not isinstance(x, torch.Tensor) else x.float(), self.slab)
        return torch.sigmoid(torch.cat([self.net(s[i : i + 8]) for i in range(0, s.shape[0], 8)])).numpy()

    def apply(self, x: torch.Tensor, infer: Callable[[torch.Tensor], torch.Tensor]) -> tuple[torch.Tensor, dict]:
        """Gated probability on the model grid, and what the gate did (slabs, open, skipped fraction)."""
        sc = self.scores(x)
        open_mask = sc >= self.threshold
        prob = gated_probability(x, open_mask, self.slab, self.margin, infer)
        n = len(open_mask)
        return prob, {"slabs": n, "open": int(open_mask.sum()), "skipped_fraction": float(1 - open_mask.sum() / max(n, 1))}


def load_gate(spec, card=None) -> Gate | None:
    """``spec``: None (the card's gate if it has one), 'off', or a gate folder / gate.json path."""
    from ..models import ModelCard

    if spec in ("off", "none"):
        return None
    if spec is None:
        return Gate.from_part(card) if card is not None and "gate" in card.data else None
    p = Path(spec) / GATE_JSON if Path(spec).is_dir() else Path(spec)
    try:
        part = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelError(f"no gate at {spec} (expected a folder with {GATE_JSON} or a gate.json file)") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelError(f"gate file {p} is not valid JSON: {exc}") from None
    return Gate.from_part(ModelCard(p.parent, {"name": f"gate:{p.parent.name}", "gate": part}))


def write_gate_json(folder: str | os.PathLike, part: dict) -> Path:
    from ..atomic import write_text

    path = Path(folder) / GATE_JSON
    write_text(path, json.dumps(part, indent=2) + "\n")
    return path

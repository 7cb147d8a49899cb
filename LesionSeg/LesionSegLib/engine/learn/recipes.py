"""Registered training recipes: a network config plus the training defaults that go with it.

    python -m LesionSegLib.engine.learn.train_seg --recipe attention-unet -o runs/attn --minutes 14

``clcs`` is the shipped default (DynUNet with deep supervision, DiceCE).  ``attention-unet`` is
the Attention U-Net recipe: MONAI ``AttentionUnet`` (attention gates on the skips) plus
deep-supervision heads at three decoder scales (``segment/attention_ds.py``), the balanced
focal-Tversky loss below, an EMA of the weights and gradient accumulation.
Command-line flags given explicitly override a recipe's defaults.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn

_COMMON = {
    "in_channels": 2,
    "out_channels": 2,
}

RECIPES: dict[str, dict] = {
    "clcs": {
        "description": "DynUNet (residual blocks, deep supervision 2 heads), DiceCE",
        "network": None,  # train_seg.DEFAULT_CONFIG["network"]
        "defaults": {"loss": "dicece", "accum": 1, "ema": 0.995, "lr": 3e-3, "batch": 2},
    },
    "attention-unet": {
        "description": "MONAI AttentionUnet + deep-supervision heads at 1/2, 1/4, 1/8; balanced focal-Tversky; EMA; grad accumulation",
        "network": {"type": "AttentionUnetDS", **_COMMON, "channels": [8, 16, 32, 64, 128], "strides": [2, 2, 2, 2], "ds_heads": 3, "dropout": 0.0},
        "defaults": {"loss": "balanced_focal_tversky", "accum": 2, "ema": 0.99, "lr": 2e-3, "batch": 2},
    },
}


def recipe_names() -> list[str]:
    return list(RECIPES)


def recipe_config(name: str, default_config: dict) -> tuple[dict, dict]:
    """(model config, training defaults) of recipe ``name``; ``default_config`` is train_seg's."""
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; known: {', '.join(RECIPES)}")
    r = RECIPES[name]
    cfg = copy.deepcopy(default_config)
    if r["network"] is not None:
        cfg["network"] = copy.deepcopy(r["network"])
    cfg["recipe"] = name
    return cfg, dict(r["defaults"])


class BalancedFocalTversky(nn.Module):
    """Class-balanced cross-entropy + focal-Tversky on softmax outputs (2+ classes, label (B,1,...)).

    The CE weight of each class is inversely proportional to its voxel count in the batch (so a
    lesion occupying 0.5 % of the crop weighs as much as the background); the focal-Tversky term
    is ``(1 - TI) ** gamma`` with ``alpha`` on false positives and ``beta`` on false negatives.
    """

    def __init__(self, alpha: float = 0.3, beta: float = 0.7, gamma: float = 0.75, ce_weight: float = 1.0):
        super().__init__()
        from monai.losses import TverskyLoss

        self.tversky = TverskyLoss(to_onehot_y=True, softmax=True, alpha=alpha, beta=beta, include_background=False)
        self.gamma = gamma
        self.ce_weight = ce_weight

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        y = target[:, 0].long()
        n_cls = logits.shape[1]
        counts = torch.bincount(y.flatten(), minlength=n_cls).float()
        present = counts > 0
        w = torch.zeros(n_cls, device=logits.device)
        w[present] = counts.sum() / (present.sum() * counts[present])
        ce = nn.functional.cross_entropy(logits, y, weight=w)
        ft = self.tversky(logits, target).clamp_min(1e-6) ** self.gamma
        return self.ce_weight * ce + ft


def extra_loss(name: str) -> nn.Module:
    """Losses that recipes add to ``train_seg.make_loss``."""
    if name == "balanced_focal_tversky":
        return BalancedFocalTversky()
    raise ValueError(f"unknown loss {name!r}")

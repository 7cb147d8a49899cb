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


def segmenter_card(seg_dir, out_dir, name: str, description: str, version: str = "1.0.0"):
    """A model card (no confidence classifier: the confidence is the mean probability) for a
    segmenter trained by ``train_seg`` in ``seg_dir``; weights copied, sha256 checked."""
    import json
    import shutil
    from pathlib import Path

    from .. import data as dataset
    from ..models import ModelCard, sha256_file

    seg_dir, out_dir = Path(seg_dir), Path(out_dir)
    seg = json.loads((seg_dir / "segmenter.json").read_text(encoding="utf-8"))
    training = seg.pop("training", {})
    if sha256_file(seg_dir / seg["file"]) != seg["sha256"]:
        raise ValueError(f"{seg_dir / seg['file']} does not match the sha256 in segmenter.json")
    out_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(seg_dir / seg["file"], out_dir / "segmenter.safetensors")
    seg["file"] = "segmenter.safetensors"
    card = ModelCard(out_dir, {
        "name": name,
        "version": version,
        "architecture": "clcs",
        "description": description,
        "segmenter": seg,
        "postprocess": {"prob_threshold": 0.5, "min_size_mm3": 100.0},
        "confidence_threshold": 0.5,
        "data": {"source": "IBSI validation soft-tissue sarcoma CT (TCIA Soft-tissue-Sarcoma), CC BY 3.0",
                 "train_cases": training.get("train_cases", []), "val_cases": dataset.STS_VAL,
                 **({"unlabeled_cases": training["unimatch"]["unlabeled_cases"]} if "unimatch" in training else {})},
        "training": {"segmenter": training},
        "metrics": {"see": "Resources/evaluation/compare.json (Testing/benchmarks/compare_models.py)"},
        "files": {"segmenter.safetensors": seg["sha256"]},
    })
    card.save()
    return card


if __name__ == "__main__":  # python -m LesionSegLib.engine.learn.recipes SEG_DIR OUT_DIR NAME DESCRIPTION
    import sys

    print(segmenter_card(*sys.argv[1:5]).folder)

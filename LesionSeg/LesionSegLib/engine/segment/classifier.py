"""The CLCS patch classifier: TP/FP confidence per cluster, with temperature calibration.

Network: a small 3D CNN over the adaptive patch (3 channels, 32^3) built from MONAI
``Convolution`` blocks, concatenated with an MLP over the standardised tabular features, then
a 2-layer head giving one logit.  ``confidence = sigmoid(logit / T)`` where the temperature T
is fitted on held-out clusters (validation split) by minimising the negative log-likelihood.
Retraining (:mod:`..learn.validation`) calibrates with :func:`fit_platt` instead: a temperature
and a logit shift, the shift folded into the head's last bias (:meth:`ConfidenceModel.shift_logits`).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn

from ..errors import CancelledError, ModelError
from .features import FEATURE_NAMES, PATCH_CHANNELS, PATCH_SIZE
from ..models import ModelCard, save_weights

__all__ = [
    "FEATURE_NAMES",
    "PATCH_SIZE",
    "PatchClassifier",
    "ConfidenceModel",
    "train_classifier",
    "fit_temperature",
    "fit_platt",
    "save_classifier",
]

DEFAULT_NET = {"type": "PatchClassifier", "channels": [16, 32, 64], "feature_hidden": 32, "head_hidden": 32, "dropout": 0.2}


class PatchClassifier(nn.Module):
    def __init__(self, n_features: int, in_channels: int = PATCH_CHANNELS, channels=(16, 32, 64), feature_hidden=32, head_hidden=32, dropout=0.2):
        super().__init__()
        from monai.networks.blocks import Convolution

        layers = []
        c_in = in_channels
        for c in channels:
            layers.append(Convolution(3, c_in, c, strides=2, kernel_size=3, act="PRELU", norm="BATCH"))
            layers.append(Convolution(3, c, c, strides=1, kernel_size=3, act="PRELU", norm="BATCH"))
            c_in = c
        self.encoder = nn.Sequential(*layers, nn.AdaptiveAvgPool3d(1), nn.Flatten())
        self.features = nn.Sequential(nn.Linear(n_features, feature_hidden), nn.ReLU())
        self.head = nn.Sequential(
            nn.Linear(c_in + feature_hidden, head_hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(head_hidden, 1)
        )

    def forward(self, patch: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
        return self.forward_with_embedding(patch, feats)[0]

    def forward_with_embedding(self, patch: torch.Tensor, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logit, patch-encoder embedding): one encoder pass gives both the confidence and the OOD embedding."""
        emb = self.encoder(patch)
        return self.head(torch.cat([emb, self.features(feats)], 1))[:, 0], emb


def _build(net_cfg: dict, n_features: int) -> PatchClassifier:
    if net_cfg.get("type", "PatchClassifier") != "PatchClassifier":
        raise ModelError(f"unknown classifier network {net_cfg.get('type')!r}")
    return PatchClassifier(
        n_features,
        channels=tuple(net_cfg.get("channels", DEFAULT_NET["channels"])),
        feature_hidden=int(net_cfg.get("feature_hidden", 32)),
        head_hidden=int(net_cfg.get("head_hidden", 32)),
        dropout=float(net_cfg.get("dropout", 0.2)),
    )


@dataclass
class ConfidenceModel:
    net: PatchClassifier
    feature_names: list[str]
    feature_mean: np.ndarray
    feature_std: np.ndarray
    temperature: float = 1.0
    net_config: dict = field(default_factory=lambda: dict(DEFAULT_NET))

    @classmethod
    def from_card(cls, card: ModelCard) -> "ConfidenceModel":
        part = card.part("classifier")
        names = list(part.get("feature_names", FEATURE_NAMES))
        if names != FEATURE_NAMES:
            raise ModelError(f"model {card.id}: classifier features {names} differ from this engine's {FEATURE_NAMES}")
        net = _build(part.get("network", DEFAULT_NET), len(names))
        card.load_into("classifier", net)
        net.eval()
        return cls(
            net,
            names,
            np.asarray(part["feature_mean"], dtype=np.float32),
            np.asarray(part["feature_std"], dtype=np.float32),
            float(part.get("temperature", 1.0)),
            dict(part.get("network", DEFAULT_NET)),
        )

    def _inputs(self, patches, feats):
        p = torch.as_tensor(np.asarray(patches, dtype=np.float32))
        f = (np.asarray(feats, dtype=np.float32) - self.feature_mean) / self.feature_std
        return p, torch.as_tensor(f, dtype=torch.float32)

    @torch.inference_mode()
    def logits(self, patches, feats, batch: int = 64) -> np.ndarray:
        self.net.eval()
        p, f = self._inputs(patches, feats)
        if len(p) == 0:
            return np.zeros(0, dtype=np.float32)
        out = [self.net(p[i : i + batch], f[i : i + batch]) for i in range(0, len(p), batch)]
        return torch.cat(out).numpy().astype(np.float64)

    @torch.inference_mode()
    def logits_and_embedding(self, patches, feats, batch: int = 64) -> tuple[np.ndarray, np.ndarray]:
        """Each cluster's logit and its embedding (patch encoder output + standardised features)."""
        self.net.eval()
        p, f = self._inputs(patches, feats)
        if len(p) == 0:
            return np.zeros(0, dtype=np.float64), np.zeros((0, 0))
        out = [self.net.forward_with_embedding(p[i : i + batch], f[i : i + batch]) for i in range(0, len(p), batch)]
        logit = torch.cat([o[0] for o in out]).numpy().astype(np.float64)
        emb = torch.cat([o[1] for o in out]).numpy()
        return logit, np.concatenate([emb, f.numpy()], 1).astype(np.float64)

    def shift_logits(self, shift: float) -> None:
        """Add ``shift`` to every logit (in place, through the head's last bias), so a Platt
        calibration ``sigmoid((logit + shift) / T)`` needs no field beyond the temperature."""
        last = self.net.head[-1]
        with torch.no_grad():
            last.bias.add_(float(shift))

    def predict(self, patches, feats) -> np.ndarray:
        """Calibrated confidence in [0, 1] that each cluster is a true lesion."""
        z = self.logits(patches, feats) / self.temperature
        return 1.0 / (1.0 + np.exp(-z))


def _platt_targets(y: np.ndarray) -> np.ndarray:
    """Platt's smoothed targets for 0/1 labels: ``(N+ + 1) / (N+ + 2)`` and ``1 / (N- + 2)``."""
    n_pos, n_neg = float(y.sum()), float(len(y) - y.sum())
    return np.where(y > 0.5, (n_pos + 1) / (n_pos + 2), 1.0 / (n_neg + 2))


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """Temperature minimising the NLL of ``sigmoid(logits / T)`` (grid search over 0.2-20).

    Targets are Platt's smoothed labels, ``(N+ + 1) / (N+ + 2)`` and ``1 / (N- + 2)``, so a small,
    perfectly separated calibration set does not drive T to zero (infinite confidence).
    """
    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(labels, dtype=np.float64)
    if len(z) == 0 or y.min() == y.max():
        return 1.0
    y = _platt_targets(y)
    best_t, best = 1.0, np.inf
    for t in np.exp(np.linspace(np.log(0.2), np.log(20.0), 200)):
        s = z / t
        nll = np.mean(np.logaddexp(0, s) - y * s)
        if nll < best:
            best, best_t = nll, float(t)
    return best_t


def fit_platt(logits: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """Platt scaling: ``(T, shift)`` minimising the NLL of ``sigmoid((logits + shift) / T)``,
    with Platt's smoothed targets as in :func:`fit_temperature` and T in the same 0.2-20 range.

    A temperature alone cannot move the logits' zero. A classifier trained with a class-weighted
    loss (``pos_weight = N- / N+``, as :func:`train_classifier` and the retraining head use) has
    every logit raised by about ``log(N- / N+)`` (its odds are multiplied by the weight), so with
    rare true lesions a temperature-only calibration leaves false ones above 0.5. The problem is
    convex in ``(1/T, shift/T)``; solved with L-BFGS-B.
    """
    from scipy.optimize import minimize

    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(labels, dtype=np.float64)
    if len(z) == 0 or y.min() == y.max():
        return 1.0, 0.0
    t = _platt_targets(y)

    def nll(v):
        s = v[0] * z + v[1]
        g = 1.0 / (1.0 + np.exp(-np.clip(s, -60, 60))) - t
        return float(np.mean(np.logaddexp(0, s) - t * s)), np.array([np.mean(g * z), np.mean(g)])

    t0 = fit_temperature(z, y)
    res = minimize(nll, np.array([1.0 / t0, 0.0]), jac=True, method="L-BFGS-B", bounds=[(1 / 20.0, 1 / 0.2), (-30.0, 30.0)])
    a, c = (float(v) for v in res.x)
    return 1.0 / a, c / a


def _augment(p: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    for axis in (2, 3, 4):
        if torch.rand(1, generator=gen).item() < 0.5:
            p = p.flip(axis)
    return p


def train_classifier(
    patches: np.ndarray,
    feats: np.ndarray,
    labels: np.ndarray,
    *,
    epochs: int = 30,
    lr: float = 2e-3,
    batch: int = 32,
    seed: int = 0,
    net_config: dict | None = None,
    progress: Callable[[float, str], None] | None = None,
    cancel: Callable[[], bool] | None = None,
    max_seconds: float | None = None,
) -> tuple[ConfidenceModel, dict]:
    """Train a classifier on (patch, features) -> label (1 = true lesion, 0 = false positive)."""
    labels = np.asarray(labels, dtype=np.float32)
    if len(labels) == 0 or labels.min() == labels.max():
        raise ValueError("need both true-positive and false-positive examples to train the classifier")
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    cfg = dict(net_config or DEFAULT_NET)
    feats = np.asarray(feats, dtype=np.float32)
    mean = feats.mean(0)
    std = feats.std(0) + 1e-3
    net = _build(cfg, feats.shape[1])
    model = ConfidenceModel(net, list(FEATURE_NAMES), mean, std, 1.0, cfg)
    p_all, f_all = model._inputs(patches, feats)
    y_all = torch.as_tensor(labels)
    n_pos = float(labels.sum())
    n_neg = float(len(labels) - n_pos)
    loss_fn = nn.BCEWithLogitsLoss(pos_weight=torch.tensor(n_neg / max(n_pos, 1.0)))
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * ((len(labels) + batch - 1) // batch))
    t0 = time.time()
    net.train()
    losses = []
    done_epochs = 0
    for epoch in range(epochs):
        perm = torch.randperm(len(labels), generator=gen)
        ep_loss = 0.0
        for i in range(0, len(labels), batch):
            if cancel is not None and cancel():
                raise CancelledError("classifier training cancelled")
            idx = perm[i : i + batch]
            if len(idx) < 2:  # batch norm needs 2 samples
                continue
            out = net(_augment(p_all[idx], gen), f_all[idx])
            loss = loss_fn(out, y_all[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            ep_loss += loss.item() * len(idx)
        losses.append(ep_loss / len(labels))
        done_epochs = epoch + 1
        if progress is not None:
            progress(done_epochs / epochs, f"classifier epoch {done_epochs}/{epochs}")
        if max_seconds is not None and time.time() - t0 > max_seconds:
            break
    net.eval()
    info = {"epochs": done_epochs, "seconds": round(time.time() - t0, 2), "n": int(len(labels)), "n_tp": int(n_pos),
            "n_fp": int(n_neg), "final_loss": losses[-1] if losses else None}
    return model, info


def save_classifier(model: ConfidenceModel, folder: str | Path, filename: str = "classifier.safetensors") -> dict:
    """Write the weights and return the card's ``classifier`` section."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sha = save_weights(model.net, folder / filename)
    return {
        "file": filename,
        "sha256": sha,
        "network": model.net_config,
        "patch_size": list(PATCH_SIZE),
        "feature_names": list(model.feature_names),
        "feature_mean": [float(v) for v in model.feature_mean],
        "feature_std": [float(v) for v in model.feature_std],
        "temperature": float(model.temperature),
    }

"""Classifier trainers used by retraining: head fine-tuning on frozen patch embeddings, or the
whole network."""
from __future__ import annotations

import copy

import numpy as np

from ..common import Progress, check_cancel
from .labels import RetrainError, TrainingData

HEAD_EPOCHS = 300


def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-np.clip(z, -60, 60)))


class _AdamW:
    """AdamW (decoupled weight decay) for a handful of small tensors.

    ``torch.optim`` is avoided on purpose: creating its first optimizer imports TorchDynamo,
    which costs seconds on a small CPU, more than the whole head fit.
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2):
        import torch

        self.params = [p for p in params if p.requires_grad]
        self.lr, self.b1, self.b2, self.eps, self.wd = lr, betas[0], betas[1], eps, weight_decay
        self.m = [torch.zeros_like(p) for p in self.params]
        self.v = [torch.zeros_like(p) for p in self.params]
        self.t = 0
        self.torch = torch

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def step(self) -> None:
        self.t += 1
        c1 = 1 - self.b1 ** self.t
        c2 = 1 - self.b2 ** self.t
        with self.torch.no_grad():
            for p, m, v in zip(self.params, self.m, self.v):
                if p.grad is None:
                    continue
                g = p.grad
                p.mul_(1 - self.lr * self.wd)
                m.mul_(self.b1).add_(g, alpha=1 - self.b1)
                v.mul_(self.b2).addcmul_(g, g, value=1 - self.b2)
                p.addcdiv_(m / c1, (v / c2).sqrt_().add_(self.eps), value=-self.lr)


class HeadTrainer:
    """Fine-tune the feature branch and head of a base :class:`ConfidenceModel` on frozen patch
    embeddings (computed once)."""

    name = "head"

    #: strengths of the pull towards the base weights tried by cross-validation, strongest first;
    #: ``None`` keeps the base weights (only the calibration is refitted)
    SETTINGS = (None, 1.0, 0.1, 0.01, 0.0)

    def __init__(self, base, epochs: int = HEAD_EPOCHS, lr: float = 3e-3, weight_decay: float = 1e-2,
                 settings=SETTINGS):
        import torch

        self.torch = torch
        self.settings = [{"l2sp": v} for v in settings]
        self.base = base
        self.epochs = epochs
        self.lr = lr
        self.weight_decay = weight_decay
        net = base.net
        for attr in ("encoder", "features", "head"):
            if not hasattr(net, attr):
                raise RetrainError(f"the base classifier network has no '{attr}' part; use mode='full'")
        mean = np.asarray(base.feature_mean, dtype=np.float32)
        std = np.asarray(base.feature_std, dtype=np.float32)
        # an untrained base (identity normalisation) gets its normalisation from the labels
        self.keep_normalisation = not (np.allclose(mean, 0.0) and np.allclose(std, 1.0))
        self.emb = None

    def prepare(self, data: TrainingData, progress: Progress | None = None, cancel=None, batch: int = 64) -> None:
        torch = self.torch
        enc = self.base.net.encoder
        self.base.net.eval()
        out = []
        n = len(data)
        with torch.inference_mode():
            for i in range(0, n, batch):
                check_cancel(cancel, "retraining")
                x = torch.as_tensor(np.asarray(data.patches[i:i + batch], dtype=np.float32))
                out.append(enc(x).float())
                if progress:
                    progress(min(1.0, (i + batch) / max(n, 1)), f"patch embeddings {min(n, i + batch)}/{n}")
        self.emb = torch.cat(out) if out else torch.zeros((0, 1))
        self.feats = np.asarray(data.features, dtype=np.float32)

    def _norm(self, idx):
        if self.keep_normalisation:
            return np.asarray(self.base.feature_mean, np.float32), np.asarray(self.base.feature_std, np.float32)
        f = self.feats[idx]
        return f.mean(0), f.std(0) + 1e-3

    def base_logits(self) -> np.ndarray:
        torch = self.torch
        f = (self.feats - np.asarray(self.base.feature_mean, np.float32)) / np.asarray(self.base.feature_std, np.float32)
        net = self.base.net
        with torch.inference_mode():
            z = net.head(torch.cat([self.emb, net.features(torch.as_tensor(f))], 1))[:, 0]
        return z.numpy().astype(np.float64)

    def fit(self, idx, labels, seed: int = 0, cancel=None, l2sp: float | None = 0.0):
        """Fine-tune on ``idx``.  ``l2sp``: weight of ``sum((w - w_base)^2)`` in the loss (a pull
        towards the base model, "L2-SP"); ``None`` returns the base weights unchanged."""
        torch = self.torch
        idx = np.asarray(idx)
        feat_mod = copy.deepcopy(self.base.net.features)
        head = copy.deepcopy(self.base.net.head)
        if l2sp is None:
            feat_mod.eval()
            head.eval()
            return {"features": feat_mod, "head": head, "mean": np.asarray(self.base.feature_mean, np.float32),
                    "std": np.asarray(self.base.feature_std, np.float32), "loss": None, "l2sp": None}
        mean, std = self._norm(idx)
        torch.manual_seed(seed)
        params = list(feat_mod.parameters()) + list(head.parameters())
        anchors = [p.detach().clone() for p in params]
        opt = _AdamW(params, lr=self.lr, weight_decay=0.0 if l2sp > 0 else self.weight_decay)
        emb = self.emb[torch.as_tensor(idx)]
        f = torch.as_tensor((self.feats[idx] - mean) / std, dtype=torch.float32)
        y = torch.as_tensor(np.asarray(labels)[idx], dtype=torch.float32)
        n_pos = float(y.sum())
        pos_weight = torch.tensor((len(y) - n_pos) / max(n_pos, 1.0))
        loss_fn = torch.nn.BCEWithLogitsLoss(pos_weight=pos_weight)
        feat_mod.train()
        head.train()
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # tiny full-batch steps: extra threads only add overhead
        try:
            with torch.enable_grad():
                for epoch in range(self.epochs):
                    if epoch % 50 == 0:
                        check_cancel(cancel, "retraining")
                    out = head(torch.cat([emb, feat_mod(f)], 1))[:, 0]
                    loss = loss_fn(out, y)
                    if l2sp > 0:
                        loss = loss + l2sp * sum(((p - a) ** 2).sum() for p, a in zip(params, anchors))
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
        finally:
            torch.set_num_threads(threads)
        feat_mod.eval()
        head.eval()
        return {"features": feat_mod, "head": head, "mean": mean, "std": std, "loss": float(loss.item()), "l2sp": l2sp}

    def logits(self, fitted, idx) -> np.ndarray:
        torch = self.torch
        idx = np.asarray(idx)
        f = torch.as_tensor((self.feats[idx] - fitted["mean"]) / fitted["std"], dtype=torch.float32)
        with torch.inference_mode():
            z = fitted["head"](torch.cat([self.emb[torch.as_tensor(idx)], fitted["features"](f)], 1))[:, 0]
        return z.numpy().astype(np.float64)

    def to_model(self, fitted, temperature: float, logit_shift: float = 0.0):
        from ..segment.classifier import ConfidenceModel

        net = copy.deepcopy(self.base.net)
        net.features = copy.deepcopy(fitted["features"])
        net.head = copy.deepcopy(fitted["head"])
        net.eval()
        cm = ConfidenceModel(net, list(self.base.feature_names), np.asarray(fitted["mean"], np.float32),
                             np.asarray(fitted["std"], np.float32), float(temperature), dict(self.base.net_config))
        cm.shift_logits(logit_shift)
        return cm

    def describe(self) -> dict:
        return {"mode": "head", "frozen": "patch encoder", "epochs": self.epochs, "lr": self.lr,
                "weight_decay": self.weight_decay, "optimiser": "AdamW, full batch",
                "normalisation": "base model's" if self.keep_normalisation else "from the labels",
                "l2sp_grid": [st["l2sp"] for st in self.settings]}


class FullTrainer:
    """Retrain the whole classifier network with :func:`classifier.train_classifier`."""

    name = "full"

    def __init__(self, base, epochs: int = 30, progress: Progress | None = None):
        self.base = base
        self.epochs = epochs
        self.progress = progress
        self.settings = [{}]

    def prepare(self, data: TrainingData, progress=None, cancel=None) -> None:
        self.data = data

    def base_logits(self) -> np.ndarray:
        return self.base.logits(self.data.patches, self.data.features)

    def fit(self, idx, labels, seed: int = 0, cancel=None):
        from ..segment.classifier import train_classifier

        idx = np.asarray(idx)
        cm, info = train_classifier(np.asarray(self.data.patches[idx], np.float32), self.data.features[idx],
                                    np.asarray(labels)[idx], epochs=self.epochs, seed=seed, cancel=cancel)
        return {"model": cm, "info": info}

    def logits(self, fitted, idx) -> np.ndarray:
        idx = np.asarray(idx)
        return fitted["model"].logits(np.asarray(self.data.patches[idx], np.float32), self.data.features[idx])

    def to_model(self, fitted, temperature: float, logit_shift: float = 0.0):
        cm = fitted["model"]
        cm.temperature = float(temperature)
        cm.shift_logits(logit_shift)
        return cm

    def describe(self) -> dict:
        return {"mode": "full", "epochs": self.epochs, "trainer": "classifier.train_classifier"}

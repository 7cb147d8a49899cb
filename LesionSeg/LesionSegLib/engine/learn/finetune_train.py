"""The segmenter fine-tuning loop and its training patches (used by :mod:`.finetune`).

Patches come from corrected cases (centred on a lesion voxel 1/2, a deleted false positive 1/4
when there is one, anywhere 1/4; optionally lung patches with a synthetic lesion, :mod:`.synthetic`,
or without one, "lung negatives") and
from replay cases of the base training data; random flips on every axis.  The loop is AdamW with
cosine decay (the decoder optionally at a multiple of the rate) with deep supervision, and
either DiceCE on every patch or :class:`LesionBalancedLoss`; stopped by a step count or a
wall-clock budget.
"""
from __future__ import annotations

import time

import numpy as np

from ..common import check_cancel

#: fine-tuning losses (:func:`train_segmenter`): ``dicece`` (the base training's DiceCE on every
#: patch) and ``lesion-balanced`` (:class:`LesionBalancedLoss`)
FINETUNE_LOSSES = ("dicece", "lesion-balanced")


def _crop_at(arrays, centre, roi, rng):
    """``(crops, lo)``: crops of each (C, z, y, x) array of ``arrays`` of size ``roi`` around
    ``centre`` (shifted by up to a quarter of ``roi``, padded at the far edges) and the index of
    the crops' first voxel in the arrays."""
    import torch

    shape = arrays[0].shape[1:]
    out = []
    lo = [int(np.clip(c - r // 2 + rng.integers(-r // 4, r // 4 + 1), 0, max(0, s - r))) for c, r, s in zip(centre, roi, shape)]
    for a in arrays:
        t = a[:, lo[0]:lo[0] + roi[0], lo[1]:lo[1] + roi[1], lo[2]:lo[2] + roi[2]]
        pad = [(0, r - s) for r, s in zip(roi, t.shape[1:])]
        if any(p[1] for p in pad):
            t = torch.nn.functional.pad(t, [v for p in reversed(pad) for v in p])
        out.append(t)
    return out, np.asarray(lo)


class PatchSampler:
    """Training patches from corrected cases (lesion / deleted-FP / random centres) and replay cases.

    With ``synthetic > 0``, that fraction of the corrected-case patches is centred in the lung of
    a corrected case that has lung (:mod:`.synthetic`) and gets one synthetic lesion inserted.
    With ``lung_negatives = q > 0``, a drawn lung patch is left as it is (no synthetic lesion,
    the real label only) with probability ``q``: lesion-free lung, which the loss pushes towards
    background, so the inserted lesions do not teach "lung parenchyma is lesion"."""

    def __init__(self, corrected, replay, roi, windows, seed=0, synthetic: float = 0.0, lung_negatives: float = 0.0):
        import torch

        from ..io.preprocess import normalize
        from . import synthetic as syn

        for what, value in (("synthetic-lesion fraction", synthetic), ("lung-negative fraction", lung_negatives)):
            if not (np.isfinite(value) and 0.0 <= value <= 1.0):
                raise ValueError(f"the {what} must lie in [0, 1], got {value}")
        self.rng = np.random.default_rng(seed)
        self.roi = tuple(roi)
        self.windows = windows
        self.synthetic = float(synthetic)
        self.lung_negatives = float(lung_negatives)
        self.corrected = []
        self.lungs = []  # (index into corrected, HU tensor, lung tensor, lung centres) of the cases with lung
        for c in corrected:
            x = normalize(c.hu.astype(np.float32), windows).half()
            y = torch.as_tensor(c.label[None].astype(np.uint8))
            self.corrected.append((x, y, np.argwhere(c.label > 0), np.argwhere(c.rejected)))
            if self.synthetic > 0:
                sp = c.geometry["spacing_zyx"]
                lung = syn.lung_mask(c.hu, sp)
                centres = syn.lung_centres(lung, sp, seed=seed)
                if len(centres):
                    self.lungs.append((len(self.corrected) - 1, torch.as_tensor(c.hu[None].astype(np.int16)),
                                       torch.as_tensor(lung[None]), centres, sp))
        self.replay = replay
        self.n_synthetic = 0
        self.n_lung_negatives = 0

    def _pick(self, x, y, pos, neg):
        u = self.rng.random()
        if len(pos) and u < 0.5:
            centre = pos[self.rng.integers(len(pos))]
        elif len(neg) and u < 0.75:
            centre = neg[self.rng.integers(len(neg))]
        else:
            centre = [self.rng.integers(s) for s in x.shape[1:]]
        (xc, yc), _ = _crop_at([x.float(), y], centre, self.roi, self.rng)
        return self._flip(xc, yc)

    def _flip(self, xc, yc):
        for axis in (1, 2, 3):
            if self.rng.random() < 0.5:
                xc, yc = xc.flip(axis), yc.flip(axis)
        return xc, yc

    def _synthetic(self) -> tuple:
        """``(x, y, kind)``: a lung patch of a corrected case, centred on a drawn lung centre (at
        least 5 mm inside the lung, as in :func:`.synthetic.synthetic_volume`; not on any lung
        voxel of the patch, which could be at the lung's edge or the patch's border and give a
        cut, flattened lesion).  With probability ``lung_negatives`` it is returned as it is
        (kind ``"lung-negative"``, label = the real one), else with one synthetic lesion inserted
        (kind ``"synthetic"``, label = real + synthetic)."""
        import torch

        from ..io.preprocess import normalize
        from .synthetic import insert_lesion

        negative = self.lung_negatives > 0 and self.rng.random() < self.lung_negatives  # no draw when 0: as before
        k, hu, lung, centres, sp = self.lungs[self.rng.integers(len(self.lungs))]
        y = self.corrected[k][1]
        centre = centres[self.rng.integers(len(centres))]
        (hc, yc, lc), lo = _crop_at([hu.float(), y, lung.to(torch.uint8)], centre, self.roi, self.rng)
        if negative:
            self.n_lung_negatives += 1
            return (*self._flip(normalize(hc[0].numpy(), self.windows), yc), "lung-negative")
        real = yc[0].numpy() > 0
        h, mask = insert_lesion(hc[0].numpy(), (lc[0].numpy() > 0) & ~real, sp, self.rng, centre=np.asarray(centre) - lo)
        self.n_synthetic += int(mask.any())
        label = torch.as_tensor((real | mask)[None].astype(np.uint8))
        return (*self._flip(normalize(h, self.windows), label), "synthetic")

    def batch(self, n: int, replay_fraction: float):
        """``(x, y, kinds)``: ``n`` patches stacked, and per patch its kind (``"replay"``,
        ``"synthetic"``, ``"lung-negative"`` or ``"corrected"``), which the loss needs."""
        import torch

        xs, ys, kinds = [], [], []
        for i in range(n):
            if self.replay and (i + 1) / n > 1 - replay_fraction:
                x, y = self.replay[self.rng.integers(len(self.replay))]
                pos = np.argwhere(y[0].numpy() > 0)
                xc, yc = self._pick(x, y, pos, [])
                kinds.append("replay")
            elif self.lungs and self.rng.random() < self.synthetic:
                xc, yc, kind = self._synthetic()
                kinds.append(kind)
            else:
                xc, yc = self._pick(*self.corrected[self.rng.integers(len(self.corrected))])
                kinds.append("corrected")
            xs.append(xc)
            ys.append(yc)
        return torch.stack(xs), torch.stack(ys), kinds


class LesionBalancedLoss:
    """Per patch: class-balanced CE + focal Tversky (``recipes.BalancedFocalTversky``) on a
    corrected or synthetic patch that holds a lesion, DiceCE on every other patch (replay and
    lesion-free); the mean over the batch, all with deep supervision.

    Why: on a new domain the base segmenter's lesion logits are strongly negative (p ~ 0.004 in
    lung), so the softmax derivative scales DiceCE's Dice gradient by ~p, and its CE gradient of
    a small lesion is averaged over the whole patch: DiceCE barely moves such a lesion in a few
    hundred steps.  A class-balanced CE does not saturate.  Replay keeps DiceCE, so the base
    domain is trained as it was; lesion-free corrected patches keep DiceCE, which removes false
    positives."""

    def __init__(self):
        from .train_seg import make_loss

        self.plain = make_loss("dicece")
        self.lesion = make_loss("balanced_focal_tversky")

    def __call__(self, preds, y, kinds):
        import torch

        out = []
        for i, kind in enumerate(kinds):
            fn = self.lesion if kind != "replay" and bool(y[i].any()) else self.plain
            out.append(fn([q[i:i + 1] for q in preds], y[i:i + 1]))
        return torch.stack(out).mean()


#: the decoder of a MONAI DynUNet: up-sampling blocks, output block and deep-supervision heads
DECODER_PREFIXES = ("upsamples", "output_block", "deep_supervision_heads")


def param_groups(net, lr: float, decoder_lr_mult: float = 1.0) -> list[dict]:
    """AdamW parameter groups: the encoder at ``lr``, the decoder (:data:`DECODER_PREFIXES`) at
    ``lr * decoder_lr_mult``; one group when the multiplier is 1 or the net has no such part."""
    decoder = [p for n, p in net.named_parameters() if n.startswith(DECODER_PREFIXES)]
    if decoder_lr_mult == 1.0 or not decoder:
        return [{"params": list(net.parameters()), "lr": lr, "mult": 1.0}]
    ids = {id(p) for p in decoder}
    return [{"params": [p for p in net.parameters() if id(p) not in ids], "lr": lr, "mult": 1.0},
            {"params": decoder, "lr": lr * decoder_lr_mult, "mult": float(decoder_lr_mult)}]


def train_segmenter(net, sampler, steps: int, minutes: float | None, lr: float, batch: int, replay: float,
                    progress=None, cancel=None, decoder_lr_mult: float = 1.0, loss: str = "dicece") -> dict:
    import torch

    from .train_seg import make_loss

    if loss not in FINETUNE_LOSSES:
        raise ValueError(f"unknown fine-tuning loss {loss!r}; known: {', '.join(FINETUNE_LOSSES)}")
    if loss == "dicece":
        dicece = make_loss("dicece")
        loss_fn = lambda preds, y, kinds: dicece(preds, y)  # noqa: E731  (one call form for both losses)
    else:
        loss_fn = LesionBalancedLoss()
    opt = torch.optim.AdamW(param_groups(net, lr, decoder_lr_mult), lr=lr, weight_decay=1e-5)
    budget = (minutes or 1e9) * 60.0
    t0 = time.perf_counter()
    losses = []
    net.train()
    step = 0
    while step < steps and time.perf_counter() - t0 < budget:
        check_cancel(cancel, "fine-tuning")
        frac = step / max(1, steps)
        for g in opt.param_groups:
            g["lr"] = lr * g["mult"] * 0.5 * (1 + np.cos(np.pi * frac))
        x, y, kinds = sampler.batch(batch, replay)
        opt.zero_grad(set_to_none=True)
        out = net(x)
        preds = list(torch.unbind(out, dim=1)) if out.ndim == 6 else [out]
        value = loss_fn(preds, y, kinds)
        value.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 12.0)
        opt.step()
        losses.append(float(value.item()))
        step += 1
        if progress:
            progress(step / steps, f"fine-tuning step {step}/{steps} loss {np.mean(losses[-10:]):.3f}")
    net.eval()
    return {"steps": step, "minutes": round((time.perf_counter() - t0) / 60, 2),
            "loss_first10": round(float(np.mean(losses[:10])), 4) if losses else None,
            "loss_last10": round(float(np.mean(losses[-10:])), 4) if losses else None}

"""UniMatch semi-supervised segmenter training: ``train_seg --unlabeled DIR`` (any architecture).

Each optimisation step adds to the supervised loss ``L_sup`` of the labelled batch two
consistency terms computed on unlabelled crops:

* weak view ``u_w`` (random crop + flips) -> teacher prediction (no gradient, eval mode) ->
  pseudo-label ``argmax`` and confidence ``max softmax``; only voxels with confidence >= tau
  count in the losses below;
* feature-perturbation stream: the same ``u_w`` through the network with channel dropout on
  the encoder features (forward hooks on the encoder stages, so it works with every network
  in ``segment/networks.py``) -> ``L_fp`` against the pseudo-label;
* two strong views ``u_s1``, ``u_s2`` (independent intensity perturbations of ``u_w``), each
  CutMixed with a second unlabelled crop inside a random box; their targets are the weak
  pseudo-labels mixed with the same box -> ``L_img`` (mean of both).

Image-level filter (the seed design's "keep only masks with >= lambda fraction of confident
pixels"): a crop (``u_w`` or the mix crop) whose share of confident voxels is below
``--min-confident`` (default 0.5) gives no pseudo-labels at all: its confident mask is zeroed,
so its voxels, including those CutMixed into the strong views, drop out of ``L_fp`` and
``L_img``. ``history`` records per step the share of the two crops kept; ``summary()`` the
count over the whole run.

``L = L_sup + lambda * L_fp + mu * L_img``; the unlabelled losses are masked cross-entropy +
masked soft Dice of the lesion class.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import LesionSegError


def add_arguments(ap) -> None:
    g = ap.add_argument_group("UniMatch (with --unlabeled)")
    g.add_argument("--tau", type=float, default=0.95, help="pseudo-label confidence threshold")
    g.add_argument("--lambda-fp", dest="lambda_fp", type=float, default=0.5, help="weight of the feature-perturbation loss")
    g.add_argument("--mu-img", dest="mu_img", type=float, default=0.5, help="weight of the strong-view (CutMix) loss")
    g.add_argument("--fp-dropout", dest="fp_dropout", type=float, default=0.5, help="channel dropout on encoder features")
    g.add_argument("--min-confident", dest="min_confident", type=float, default=0.5,
                   help="fraction (0-1) of an unlabelled crop's voxels that must be confident (>= tau) for the crop to count")
    g.add_argument("--unlabeled-cases", dest="unlabeled_cases", nargs="*", default=None,
                   help="case folder names inside --unlabeled (default: all but the validation cases)")


# ---------------------------------------------------------------------------------------------
# pieces that are tested on their own


def encoder_modules(net: nn.Module) -> list[nn.Module]:
    """The encoder stages of a segmenter, whose outputs the feature-perturbation stream drops."""
    while isinstance(getattr(net, "module", None), nn.Module):  # DistributedDataParallel (train_seg --nproc), AveragedModel
        net = net.module
    if hasattr(net, "downsamples") and hasattr(net, "input_block"):  # MONAI DynUNet
        return [net.input_block, *net.downsamples]
    from monai.networks.nets import AttentionUnet

    if isinstance(net, AttentionUnet):
        from ..segment.attention_ds import decoder_layers

        mods = [net.model[0]]
        for layer in decoder_layers(net):
            sub = layer.submodule
            mods.append(sub[0] if isinstance(sub, nn.Sequential) else sub)
        return mods
    first = next((m for m in net.modules() if isinstance(m, (nn.Conv3d, nn.Conv2d))), None)
    if first is None:
        raise LesionSegError(f"cannot find encoder features in {type(net).__name__} for the UniMatch feature perturbation")
    return [first]


@contextlib.contextmanager
def feature_dropout(net: nn.Module, p: float):
    """Within the block, every encoder stage output of ``net`` goes through channel dropout ``p``."""
    handles = [m.register_forward_hook(lambda _m, _i, out: F.dropout3d(out, p, training=True)) for m in encoder_modules(net)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def random_box(shape, rng: np.random.Generator, lo: float = 0.25, hi: float = 0.6) -> tuple[slice, ...]:
    """A random box covering ``lo``..``hi`` of each spatial axis of ``shape``."""
    box = []
    for n in shape:
        size = max(1, int(round(n * rng.uniform(lo, hi))))
        start = int(rng.integers(0, n - size + 1))
        box.append(slice(start, start + size))
    return tuple(box)


def cutmix(x: torch.Tensor, x_mix: torch.Tensor, box) -> torch.Tensor:
    """``x`` with the spatial ``box`` replaced by ``x_mix`` (both (B, C, z, y, x) or (B, z, y, x))."""
    out = x.clone()
    idx = (slice(None),) * (x.ndim - 3) + tuple(box)
    out[idx] = x_mix[idx]
    return out


def pseudo_labels(logits: torch.Tensor, tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(argmax label (B, z, y, x) long, confident mask (B, z, y, x) float) from teacher logits."""
    prob = torch.softmax(logits.float(), 1)
    conf, label = prob.max(1)
    return label, (conf >= tau).float()


def masked_loss(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over confident voxels (normalised by all voxels, as UniMatch does) + masked soft Dice of class 1."""
    ce = (F.cross_entropy(logits, target, reduction="none") * mask).sum() / mask.numel()
    fg = torch.softmax(logits, 1)[:, 1] * mask
    t = (target == 1).float() * mask
    dice = 1.0 - (2 * (fg * t).sum() + 1.0) / (fg.sum() + t.sum() + 1.0)
    return ce + dice


def check_min_confident(value) -> float:
    """``value`` as a float in [0, 1] (the image-level pseudo-label filter), else a LesionSegError."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        v = float("nan")
    if not 0.0 <= v <= 1.0:  # NaN fails too
        raise LesionSegError(f"--min-confident must lie in [0, 1] (the fraction of an unlabelled crop's voxels that must "
                             f"be confident for the crop to count); got {value!r}")
    return v


def strong_intensity(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Heavy intensity perturbation: random contrast, brightness, gamma-like curve and noise."""
    b = x.shape[0]
    shape = (b,) + (1,) * (x.ndim - 1)
    scale = 1 + 0.3 * (2 * torch.rand(shape, generator=gen) - 1)
    shift = 0.15 * (2 * torch.rand(shape, generator=gen) - 1)
    gamma = torch.exp(0.4 * (2 * torch.rand(shape, generator=gen) - 1))
    y = x.clamp(0, 1) ** gamma.to(x.device) * scale.to(x.device) + shift.to(x.device)
    return y + 0.05 * torch.randn(x.shape, generator=gen).to(x.device)


def main_output(out: torch.Tensor) -> torch.Tensor:
    """The full-resolution output of a network that may return stacked deep-supervision heads."""
    return out[:, 0] if out.ndim == 6 else out


# ---------------------------------------------------------------------------------------------


def find_unlabeled(root: str | Path, names=None, exclude=()) -> list[Path]:
    """Image files of the unlabeled folder: ``<case>/image.nii.gz`` folders, or image files directly."""
    root = Path(root)
    if not root.is_dir():
        raise LesionSegError(f"unlabeled folder {root} does not exist")
    found = {d.name: d / "image.nii.gz" for d in sorted(root.iterdir()) if (d / "image.nii.gz").exists()}
    if not found:
        found = {f.name.split(".")[0]: f for f in sorted(root.iterdir()) if f.name.endswith((".nii.gz", ".nii", ".nrrd", ".mha"))}
    if names:
        missing = [n for n in names if n not in found]
        if missing:
            raise LesionSegError(f"unlabeled cases {missing} are not in {root}")
        found = {n: found[n] for n in names}
    found = {k: v for k, v in found.items() if k not in set(exclude)}
    if not found:
        raise LesionSegError(f"{root} holds no unlabeled images (<case>/image.nii.gz or image files)")
    return list(found.values())


def validation_cases(args) -> set[str]:
    """The cases the unlabelled pool must not hold: the validation cases as ``train_seg`` resolves
    them (``--val``; without ``--images``, STS_VAL when ``--val`` is absent) and, on the shared STS
    data (no ``--images``), always STS_VAL, whatever ``--val`` says: Dice is reported on those."""
    from .. import data as dataset

    names = set(getattr(args, "val", None) or ())
    if not getattr(args, "images", None):
        names |= set(dataset.STS_VAL)
    return names


class UniMatch:
    """Adds UniMatch's unlabelled streams to a supervised step loss."""

    def __init__(self, volumes: list[torch.Tensor], sup_loss, roi, tau=0.95, lambda_fp=0.5, mu_img=0.5,
                 fp_dropout=0.5, seed=0, device: torch.device | str = "cpu", min_confident=0.5):
        self.min_confident = check_min_confident(min_confident)
        self.volumes = volumes
        self.sup_loss = sup_loss
        self.roi = tuple(int(r) for r in roi)
        self.tau, self.lambda_fp, self.mu_img, self.fp_dropout = float(tau), float(lambda_fp), float(mu_img), float(fp_dropout)
        self.rng = np.random.default_rng(seed + 1)
        self.gen = torch.Generator().manual_seed(seed + 1)
        self.device = torch.device(device)
        self.history: list[dict] = []
        self.crops_kept, self.crops_total = 0, 0  # unlabelled crops (u_w and u_mix) over the whole run

    @classmethod
    def from_args(cls, args, sup_loss, roi, cfg, device) -> "UniMatch":
        from ..io.images import read_image
        from .train_seg import image_channels

        min_confident = check_min_confident(getattr(args, "min_confident", 0.5))  # before any volume is read
        held = validation_cases(args)
        paths = find_unlabeled(args.unlabeled, args.unlabeled_cases, exclude=held)
        vols = [image_channels(read_image(p), cfg["spacing_zyx"], cfg["hu_windows"])[0].half() for p in paths]
        print(f"UniMatch: {len(vols)} unlabeled volumes from {args.unlabeled}"
              f"{f' (validation cases never used: {len(held)})' if held else ''}", flush=True)
        self = cls(vols, sup_loss, roi, args.tau, args.lambda_fp, args.mu_img, args.fp_dropout, args.seed, device,
                   min_confident=min_confident)
        self.source = str(args.unlabeled)
        self.names = [p.parent.name if p.name == "image.nii.gz" else p.name for p in paths]
        return self

    def crop(self) -> torch.Tensor:
        """A weak view: random roi crop (zero-padded when the volume is smaller) with random flips."""
        v = self.volumes[int(self.rng.integers(len(self.volumes)))].float()
        pad = [max(0, r - s) for r, s in zip(self.roi, v.shape[1:])]
        if any(pad):
            v = F.pad(v, [p for ax in reversed(pad) for p in (ax // 2, ax - ax // 2)])
        start = [int(self.rng.integers(0, s - r + 1)) for s, r in zip(v.shape[1:], self.roi)]
        c = v[:, start[0] : start[0] + self.roi[0], start[1] : start[1] + self.roi[1], start[2] : start[2] + self.roi[2]]
        flips = [ax + 1 for ax in range(3) if self.rng.random() < 0.5]
        return (c.flip(flips) if flips else c).contiguous()

    def loss(self, net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        l_sup = self.sup_loss(net, x, y)
        u_w = self.crop()[None].to(self.device)
        u_mix = self.crop()[None].to(self.device)
        with torch.no_grad():
            net.eval()
            pl, conf = pseudo_labels(net(torch.cat([u_w, u_mix])), self.tau)
            net.train()
            frac = conf.flatten(1).mean(1)  # confident share of u_w and of u_mix
            keep = (frac >= self.min_confident).float()
            conf_raw_w = frac[0].item()
            conf = conf * keep.view(-1, 1, 1, 1)  # a filtered crop gives no pseudo-labels
        kept = int(keep.sum().item())
        self.crops_kept += kept
        self.crops_total += 2
        pl_w, pl_mix, m_w, m_mix = pl[:1], pl[1:], conf[:1], conf[1:]
        views, targets, masks = [], [], []
        for _ in range(2):
            box = random_box(self.roi, self.rng)
            views.append(cutmix(strong_intensity(u_w, self.gen), strong_intensity(u_mix, self.gen), box))
            targets.append(cutmix(pl_w, pl_mix, box))
            masks.append(cutmix(m_w, m_mix, box))
        with feature_dropout(net, self.fp_dropout):
            out_fp = main_output(net(u_w))
        l_fp = masked_loss(out_fp, pl_w, m_w)
        out_s = main_output(net(torch.cat(views)))
        l_img = 0.5 * (masked_loss(out_s[:1], targets[0], masks[0]) + masked_loss(out_s[1:], targets[1], masks[1]))
        total = l_sup + self.lambda_fp * l_fp + self.mu_img * l_img
        self.history.append({"sup": l_sup.item(), "fp": l_fp.item(), "img": l_img.item(), "confident": conf_raw_w,
                             "kept": kept / 2})
        return total

    def summary(self) -> dict:
        last = self.history[-50:]
        mean = {k: round(float(np.mean([h[k] for h in last])), 4) for k in ("sup", "fp", "img", "confident", "kept")} if last else {}
        return {"unlabeled": getattr(self, "source", ""), "unlabeled_cases": getattr(self, "names", []),
                "tau": self.tau, "lambda_fp": self.lambda_fp, "mu_img": self.mu_img, "fp_dropout": self.fp_dropout,
                "min_confident": self.min_confident, "crops_kept": {"kept": self.crops_kept, "total": self.crops_total},
                "last_50_steps_mean": mean}

"""Train a click segmenter: a dense model's network given the click as a third input channel.

    python -m LesionSegLib.engine.learn.train_click --base sts-clcs -o runs/click --minutes 30 \
        --holdout STS_028,STS_029,STS_030,STS_031,STS_032,STS_033
    python -m LesionSegLib.engine.learn.train_click --attach runs/click --to MODEL_DIR --version 1.2.0

DeepGrow-style guidance (MONAI Label's DeepGrow / DeepEdit): the base card's DynUNet gets one more
input channel, a Gaussian of ``sigma_mm`` at the click (:func:`..click.guidance_channel`).  It
starts from the base weights with the new channel's weights at zero, so before training it is the
base model.  Each patch (the base's ROI size) holds a click drawn in one lesion of a training case
(half at its centre of mass, half at a random voxel of it); 2 of 3 patches are centred on a random
voxel of that lesion, 1 of 3 anywhere in the scan, so the network also sees windows of the sliding
window pass that the click does not reach.  The target is the case's label.  Flips and intensity
jitter; DiceCE with deep supervision; AdamW with cosine decay over a wall-clock budget.

``--holdout`` cases are left out of training, for choosing on clicks the network never saw;
STS_034-041 are never used.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

from .. import data as dataset
from ..atomic import write_text
from ..click import centre_click, guidance_channel
from ..models import get_card, load_state_shared, save_weights
from ..segment.networks import build_segmenter
from .train_seg import load_training_case, make_loss

SIGMA_MM = 10.0


def guided_network(base_card, sigma_mm: float = SIGMA_MM):
    """(network, segmenter config) of the base card's network with a guidance channel, initialised
    from the base weights (the guidance channel's input weights at zero)."""
    cfg = json.loads(json.dumps(base_card.part("segmenter")))
    net_cfg = dict(cfg["network"], in_channels=int(cfg["network"].get("in_channels", 1)) + 1)
    net = build_segmenter(net_cfg)
    own = net.state_dict()
    state = {}
    for k, v in base_card.load_state("segmenter").items():
        if k in own and own[k].shape != v.shape and v.ndim == own[k].ndim and v.shape[1] + 1 == own[k].shape[1]:
            v = torch.cat([v, torch.zeros_like(v[:, :1])], dim=1)  # the new input channel starts silent
        state[k] = v
    missing, unexpected = load_state_shared(net, state)
    if missing or unexpected:
        raise RuntimeError(f"base weights do not fit the guided network: missing {missing[:3]}, unexpected {unexpected[:3]}")
    cfg.update(network=net_cfg, guidance={"sigma_mm": float(sigma_mm), "channel": net_cfg["in_channels"] - 1})
    for key in ("file", "sha256", "training", "onnx"):
        cfg.pop(key, None)
    return net, cfg


def attach(card, weights: Path, cfg: dict, version: str | None = None, note: str | None = None):
    """Write the click segmenter (``weights`` with its ``cfg``) into ``card``'s folder as the card's
    ``click_segmenter`` part; ``version`` (a new card version) and ``note`` go into the card."""
    import shutil

    from ..models import sha256_file

    target = card.folder / "click_segmenter.safetensors"
    if Path(weights).resolve() != target.resolve():
        shutil.copyfile(weights, target)
    part = dict(cfg, file=target.name, sha256=sha256_file(target))
    card.data["click_segmenter"] = part
    if version:
        card.data["version"] = version
    if note:
        card.data.setdefault("release_notes", {})[card.data["version"]] = note
    card.save()
    return part


class ClickPatches:
    """Patches with a click channel from cases loaded by :func:`load_training_case`."""

    def __init__(self, cases: dict, spacing, roi, sigma_mm: float, seed: int = 0):
        from ..evaluate.matching import gt_components

        self.rng = np.random.default_rng(seed)
        self.spacing, self.roi, self.sigma = np.asarray(spacing, float), np.asarray(roi), sigma_mm
        self.items = []
        for name, (x, y) in cases.items():
            comps, n = gt_components(y[0].numpy())
            lesions = [np.argwhere(comps == k) for k in range(1, n + 1)]
            if lesions:
                self.items.append((name, x, y, lesions))

    def _click(self, pts):
        if self.rng.random() < 0.5:
            return centre_click(pts)
        return pts[self.rng.integers(len(pts))]

    def sample(self):
        _, x, y, lesions = self.items[self.rng.integers(len(self.items))]
        pts = lesions[self.rng.integers(len(lesions))]
        click = self._click(pts)
        shape = np.asarray(y.shape[1:])
        centre = pts[self.rng.integers(len(pts))] if self.rng.random() < 2 / 3 else (self.rng.random(3) * shape).astype(int)
        lo = np.clip(centre - self.roi // 2, 0, np.maximum(shape - self.roi, 0))
        sl = tuple(slice(int(a), int(a + r)) for a, r in zip(lo, self.roi))
        xc, yc = x[(slice(None),) + sl].float(), y[(slice(None),) + sl].long()
        g = torch.from_numpy(guidance_channel(tuple(xc.shape[1:]), click - lo, self.spacing, self.sigma))[None]
        xc = torch.cat([xc * float(self.rng.uniform(0.9, 1.1)) + float(self.rng.uniform(-0.05, 0.05)), g])
        pad = [(0, 0)] + [(0, int(r - s)) for r, s in zip(self.roi, xc.shape[1:])]
        xc = torch.from_numpy(np.pad(xc.numpy(), pad))
        yc = torch.from_numpy(np.pad(yc.numpy(), pad))
        for axis in range(3):
            if self.rng.random() < 0.5:
                xc, yc = xc.flip(axis + 1), yc.flip(axis + 1)
        return xc, yc

    def batch(self, n: int):
        xs, ys = zip(*(self.sample() for _ in range(n)))
        return torch.stack(xs), torch.stack(ys)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", default="sts-clcs", help="the dense model whose network gets the click channel")
    ap.add_argument("-o", "--output", help="run folder: click_segmenter.safetensors and click_segmenter.json")
    ap.add_argument("--attach", metavar="RUN", help="instead of training: write RUN's click segmenter into --to's card")
    ap.add_argument("--to", metavar="MODEL_DIR", help="the model folder that gets the click segmenter (with --attach)")
    ap.add_argument("--version", default=None, help="the card's new version (with --attach)")
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--sigma-mm", type=float, default=SIGMA_MM)
    ap.add_argument("--holdout", default="", help="comma-separated training cases left out (for the choice)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.attach:
        from ..models import read_card

        if not args.to:
            ap.error("--attach needs --to MODEL_DIR")
        run = Path(args.attach)
        cfg = json.loads((run / "click_segmenter.json").read_text(encoding="utf-8"))
        card = read_card(args.to)
        trained_from = cfg["training"].get("base_segmenter_sha256") or get_card(cfg["training"]["base"]).part("segmenter")["sha256"]
        if card.part("segmenter")["sha256"] != trained_from:
            raise SystemExit(f"error: {card.id}'s segmenter is not the one {run} was trained from ({cfg['training']['base']})")
        note = (f"adds click_segmenter ({cfg['training']['minutes']} min, {cfg['training']['steps']} steps from "
                f"{cfg['training']['base']}'s segmenter); segmenter, classifier and OOD unchanged")
        part = attach(card, run / "click_segmenter.safetensors", cfg, args.version, note)
        print(f"{card.id}: click_segmenter {part['sha256'][:16]} written into {card.folder}")
        return 0
    if not args.output:
        ap.error("-o RUN_DIR is needed to train")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    base = get_card(args.base)
    net, cfg = guided_network(base, args.sigma_mm)
    holdout = [c for c in args.holdout.split(",") if c]
    names = [c for c in base.data.get("data", {}).get("train_cases", dataset.STS_TRAIN) if c not in holdout]
    t0 = time.time()
    cases = {n: load_training_case(dataset.case(n), cfg["spacing_zyx"], cfg["hu_windows"]) for n in names}
    print(f"{len(cases)} cases loaded in {time.time() - t0:.0f}s", flush=True)
    patches = ClickPatches(cases, cfg["spacing_zyx"], cfg["roi_size"], args.sigma_mm, args.seed)
    loss_fn = make_loss("dicece")
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=1e-5)
    budget, start, step, losses = args.minutes * 60.0, time.time(), 0, []
    net.train()
    while (elapsed := time.time() - start) < budget:
        for g in opt.param_groups:
            g["lr"] = args.lr * min(1.0, (step + 1) / 20) * 0.5 * (1 + math.cos(math.pi * elapsed / budget))
        x, y = patches.batch(args.batch)
        out = net(x)
        loss = loss_fn(list(torch.unbind(out, dim=1)) if out.ndim == 6 else [out], y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 12.0)
        opt.step()
        losses.append(loss.item())
        step += 1
        if step % 25 == 0:
            print(f"step {step} t={elapsed / 60:.1f}min loss={np.mean(losses[-25:]):.4f}", flush=True)
    out_dir = Path(args.output)
    out_dir.mkdir(parents=True, exist_ok=True)
    net.eval()
    sha = save_weights(net, out_dir / "click_segmenter.safetensors")
    cfg.update(file="click_segmenter.safetensors", sha256=sha, training={
        "command": "python -m LesionSegLib.engine.learn.train_click " + " ".join(argv if argv is not None else sys.argv[1:]),
        "base": base.id, "base_segmenter_sha256": base.part("segmenter")["sha256"], "train_cases": names, "holdout_cases": holdout, "steps": step,
        "minutes": round((time.time() - start) / 60, 1), "lr": args.lr, "batch": args.batch,
        "threads": torch.get_num_threads(), "loss_last_100": round(float(np.mean(losses[-100:])), 4) if losses else None})
    write_text(out_dir / "click_segmenter.json", json.dumps(cfg, indent=2) + "\n")
    print(f"{step} steps in {cfg['training']['minutes']} min -> {out_dir}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

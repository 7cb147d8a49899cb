"""Train the two DetSeg3D stages on CT + label pairs (STS_001-033 by default).

    python -m LesionSegLib.engine.learn.train_detseg --stage detector -o DIR --minutes 15
    python -m LesionSegLib.engine.learn.train_detseg --stage roi -o DIR --minutes 25
    (or ``lesionseg train-detseg``, which runs both and writes the model card)

Stage 1 (detector) learns on random crops of the coarse grid (scale jitter 0.85-1.2, flips),
70 % of them placed on a lesion; targets from the label's 26-connected components.  Stage 2
(RoI segmenter) learns on one RoI per lesion drawn uniformly over lesions (not voxels), its
box jittered like a detector's (centre +-15 % of the size, size x0.75-1.35), plus 20 % RoIs
without a lesion; the loss is :func:`..detseg.losses.per_roi_loss`.  AdamW with cosine decay
over a wall-clock budget; the weights are saved (safetensors) every few minutes and at the end.
The stages are independent, so they may run as two processes side by side.

Starting points: ``--init FILE`` continues from a stage's own safetensors (same config);
``--init-from MODEL`` (RoI stage) starts the RoI segmenter from a CLCS model's segmenter: the same
MONAI network, deep supervision off and its two-class softmax head turned into the equivalent
one-logit head (``logit = z1 - z0``, so ``sigmoid(logit) = softmax(z)[1]``).  The CLCS segmenter
must have been trained on the same training cases, or the validation figures are not held out.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from .. import data as dataset
from ..detseg.boxes import gt_boxes, heatmap_targets
from ..detseg.inputs import AIR_HU, roi_input, windows
from ..detseg.losses import detector_loss, per_roi_loss
from ..detseg.networks import DEFAULT_DETECTOR, DEFAULT_ROI_SEGMENTER, build_detector, build_roi_segmenter
from ..detseg.roi import DEFAULT_CONTEXT, crop, roi_for_box
from ..io.images import read_image, read_label
from ..io.preprocess import spacing_zyx, to_canonical
from ..io.resample import sample_box
from ..models import get_card, load_state_shared, save_weights

HU_WINDOWS = [[-200.0, 300.0], [-1000.0, 1500.0]]
DETECTOR_CONFIG = {"network": DEFAULT_DETECTOR, "grid_spacing_zyx": [6.0, 4.0, 4.0], "hu_windows": HU_WINDOWS,
                   "crop_shape": [16, 32, 32], "threshold": 0.1, "max_detections": 32, "nms_iou": 0.25}
ROI_CONFIG = {"network": DEFAULT_ROI_SEGMENTER, "roi_shape": [32, 48, 48], "context": DEFAULT_CONTEXT, "hu_windows": HU_WINDOWS}
SAVE_EVERY_S = 180.0


class Case:
    """One training case on the canonical grid: HU, binary label, spacing and lesion boxes (mm)."""

    def __init__(self, case: dataset.Case):
        img = read_image(case.image)
        lab = read_label(case.label, img)
        can = to_canonical(img)
        self.name = case.name
        self.hu = sitk.GetArrayFromImage(can).astype(np.float32)
        self.label = (sitk.GetArrayFromImage(to_canonical(lab)) > 0).astype(np.float32)
        self.spacing = np.asarray(spacing_zyx(can), dtype=np.float64)
        self.boxes = gt_boxes(self.label, self.spacing)
        self.extent = np.asarray(self.hu.shape) * self.spacing  # mm


def load_cases(names) -> list[Case]:
    by_name = {c.name: c for c in dataset.cases()}
    missing = [n for n in names if n not in by_name]
    if missing:
        raise SystemExit(f"error: cases not in the data manifest: {', '.join(missing)}")
    return [Case(by_name[n]) for n in names]


def detector_sample(case: Case, cfg: dict, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    """One augmented detector crop and its targets."""
    shape = np.asarray(cfg["crop_shape"], dtype=int)
    g0 = np.asarray(cfg["grid_spacing_zyx"], dtype=np.float64)
    s = rng.uniform(0.85, 1.2)
    g = g0 * s  # physical mm per grid voxel of this sample
    half = (shape - 1) / 2 * g
    if len(case.boxes) and rng.random() < 0.7:
        b = case.boxes[rng.integers(len(case.boxes))]
        centre = b[:3] + rng.uniform(-0.8, 0.8, 3) * half
    else:
        centre = rng.uniform(0, 1, 3) * case.extent
    origin = centre - half
    x = sample_box(case.hu, origin / case.spacing, g / case.spacing, tuple(shape), fill=AIR_HU)
    boxes = case.boxes.copy()
    q = (boxes[:, :3] - origin) / g  # box centres in grid voxels
    sizes = boxes[:, 3:] / s  # as the network sees them on a grid of g0
    for axis in range(3):
        if rng.random() < 0.5:
            x = np.flip(x, axis)
            q[:, axis] = shape[axis] - 1 - q[:, axis]
    virtual = np.concatenate([q * g0, sizes], 1)
    t = heatmap_targets(virtual, tuple(shape), np.zeros(3), g0)
    return windows(np.ascontiguousarray(x), cfg["hu_windows"]), t


def roi_sample(case: Case, cfg: dict, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One augmented RoI (input, target): a jittered lesion box, or a box without a lesion."""
    if len(case.boxes) and rng.random() >= 0.2:
        b = case.boxes[rng.integers(len(case.boxes))]
        size = b[3:] * np.exp(rng.uniform(np.log(0.75), np.log(1.35), 3))
        centre = b[:3] + rng.normal(0, 0.15, 3) * b[3:]
    else:
        size = rng.uniform(15, 80, 3)
        centre = rng.uniform(0.1, 0.9, 3) * case.extent
    roi = roi_for_box(np.concatenate([centre, size]), case.spacing, cfg["roi_shape"], cfg["context"])
    x = roi_input(case.hu, roi, cfg["hu_windows"])
    y = (crop(case.label, roi) > 0.5).astype(np.float32)[None]
    for axis in (1, 2, 3):
        if rng.random() < 0.5:
            x, y = np.flip(x, axis), np.flip(y, axis)
    x = x * rng.uniform(0.9, 1.1) + rng.uniform(-0.05, 0.05)
    return np.ascontiguousarray(x, dtype=np.float32), np.ascontiguousarray(y)


def _batch(samples):
    xs = torch.as_tensor(np.stack([s[0] for s in samples]))
    if isinstance(samples[0][1], dict):
        ys = {k: torch.as_tensor(np.stack([s[1][k] for s in samples])) for k in samples[0][1]}
    else:
        ys = torch.as_tensor(np.stack([s[1] for s in samples]))
    return xs, ys


def roi_network_from_clcs(model: str) -> tuple[dict, torch.nn.Module, dict]:
    """(network config, network, init record): a CLCS model's segmenter as a one-logit RoI segmenter."""
    card = get_card(model)
    seg = card.part("segmenter")
    if [list(w) for w in seg.get("hu_windows", [])] != HU_WINDOWS:
        raise SystemExit(f"error: {card.id} uses HU windows {seg.get('hu_windows')}, the RoI stage {HU_WINDOWS}")
    cfg = {**seg["network"], "out_channels": 1, "deep_supervision": False}
    cfg.pop("deep_supr_num", None)
    net = build_roi_segmenter(cfg)
    state = dict(card.load_state("segmenter"))
    own = net.state_dict()
    head = [k for k in own if k.startswith("output_block.")]
    for k in head:
        w = state[k]
        if w.shape[0] != 2:
            raise SystemExit(f"error: {card.id}'s segmenter has {w.shape[0]} output channels; a two-class head is needed")
        state[k] = (w[1] - w[0])[None]
    state = {k: v for k, v in state.items() if k in own}
    missing, _ = load_state_shared(net, state)
    if missing:
        raise SystemExit(f"error: {card.id}'s segmenter does not fit (missing {missing[:3]})")
    train = card.data.get("training", {}).get("segmenter", {}).get("train_cases")
    return cfg, net, {"from_model": card.id, "part": "segmenter", "sha256": seg.get("sha256"), "train_cases": train}


def train_stage(stage: str, cases: list[Case], out: Path, minutes: float, batch: int, lr: float, seed: int,
                max_steps: int = 0, init: str | None = None, init_from: str | None = None) -> dict:
    """Train one stage for ``minutes`` (or ``max_steps``); write ``<stage>.safetensors`` and
    ``<stage>.json`` (config + training record) into ``out``."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    init_record = None
    if stage == "detector":
        cfg = json.loads(json.dumps(DETECTOR_CONFIG))
        net, sampler = build_detector(cfg["network"]), detector_sample
        loss_fn = lambda o, t: detector_loss(o, t)[0]  # noqa: E731
    else:
        cfg = json.loads(json.dumps(ROI_CONFIG))
        if init_from:
            cfg["network"], net, init_record = roi_network_from_clcs(init_from)
        else:
            net = build_roi_segmenter(cfg["network"])
        sampler, loss_fn = roi_sample, per_roi_loss
    if init:
        from safetensors.torch import load_file

        from ..models import sha256_file

        missing, unexpected = load_state_shared(net, load_file(init))
        if missing or unexpected:
            raise SystemExit(f"error: {init} does not fit the {stage} network (missing {missing[:3]}, unexpected {unexpected[:3]})")
        init_record = {"weights": Path(init).name, "sha256": sha256_file(init)}
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-5)
    out.mkdir(parents=True, exist_ok=True)
    budget, start, last_save = minutes * 60.0, time.time(), time.time()
    step, losses = 0, []
    net.train()
    while True:
        frac = (time.time() - start) / budget
        if frac >= 1.0 or (max_steps and step >= max_steps):
            break
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / 50) * 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))
        x, y = _batch([sampler(cases[rng.integers(len(cases))], cfg, rng) for _ in range(batch)])
        loss = loss_fn(net(x), y)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 5.0)
        opt.step()
        losses.append(float(loss.detach()))
        step += 1
        if step % 10 == 0:
            print(f"{stage} step {step} t={(time.time() - start) / 60:.1f}min loss={np.mean(losses[-20:]):.4f}", flush=True)
        if time.time() - last_save > SAVE_EVERY_S:
            save_weights(net, out / f"{stage}.safetensors")
            last_save = time.time()
    net.eval()
    sha = save_weights(net, out / f"{stage}.safetensors")
    record = {**cfg, "file": f"{stage}.safetensors", "sha256": sha,
              "n_parameters": int(sum(p.numel() for p in net.parameters())),
              "training": {"cases": [c.name for c in cases], "steps": step, "batch": batch, "lr": lr, "seed": seed,
                           "minutes": round((time.time() - start) / 60, 2), "budget_minutes": minutes, "init": init_record,
                           "final_loss": round(float(np.mean(losses[-50:])), 5) if losses else None,
                           "threads": torch.get_num_threads(), "machine": f"{platform.machine()} CPU, {platform.node()}"}}
    (out / f"{stage}.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    print(f"{stage}: {step} steps in {record['training']['minutes']} min, final loss {record['training']['final_loss']}", flush=True)
    return record


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--stage", choices=["detector", "roi"], required=True)
    ap.add_argument("-o", "--out", required=True)
    ap.add_argument("--minutes", type=float, default=20.0)
    ap.add_argument("--max-steps", type=int, default=0)
    ap.add_argument("--batch", type=int, default=None, help="default: 2 detector crops / 4 RoIs")
    ap.add_argument("--lr", type=float, default=None, help="default: 4e-3 detector / 2e-3 RoI segmenter")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--train", nargs="*", default=None, help="case names (default STS_001-033)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--init", default=None, metavar="FILE", help="continue from this stage's safetensors")
    ap.add_argument("--init-from", default=None, metavar="MODEL", help="RoI stage: start from a CLCS model's segmenter")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    cases = load_cases(args.train or dataset.STS_TRAIN)
    batch = args.batch or (2 if args.stage == "detector" else 4)
    lr = args.lr or (4e-3 if args.stage == "detector" else 2e-3)
    if args.init_from and args.stage != "roi":
        raise SystemExit("error: --init-from is for the RoI stage")
    train_stage(args.stage, cases, Path(args.out), args.minutes, batch, lr, args.seed, args.max_steps, args.init, args.init_from)
    return 0


if __name__ == "__main__":
    sys.exit(main())

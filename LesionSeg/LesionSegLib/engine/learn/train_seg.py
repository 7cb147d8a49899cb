"""Train the lesion segmenter from scratch on CT + label pairs.

    python -m LesionSegLib.engine.learn.train_seg -o runs/seg --minutes 45

Defaults reproduce the shipped model: MONAI DynUNet (residual blocks, deep supervision),
2 HU-window input channels, 2x2x3 mm (x, y, z) voxels, 48x96x96 (z, y, x) patches sampled
2:1 around lesions, DiceCE loss with deep supervision (or focal-Tversky), AdamW with cosine
decay over a wall-clock budget, gradient accumulation, and an EMA of the weights that is what
gets saved.  Training data: STS_001-033; STS_034-041 are only used to report Dice.

The training time is a wall-clock budget (``--minutes``), so a run finishes on time on any
machine; the number of steps it managed is written in the output config.
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
from ..atomic import write_text
from . import distributed
from ..io.images import read_image, read_label
from ..segment.networks import build_segmenter
from . import unimatch
from .recipes import recipe_config, recipe_names
from ..io.preprocess import normalize, resample, spacing_zyx, target_shape, to_canonical
from ..io.resample import resample as resample_antialiased

DEFAULT_CONFIG = {
    "network": {
        "type": "DynUNet",
        "in_channels": 2,
        "out_channels": 2,
        "kernel_size": [3, 3, 3, 3, 3],
        "strides": [1, 2, 2, 2, 2],
        "filters": [8, 16, 32, 64, 128],
        "res_block": True,
        "norm": "instance",
        "deep_supervision": True,
        "deep_supr_num": 2,
    },
    "spacing_zyx": [3.0, 2.0, 2.0],
    "hu_windows": [[-200.0, 300.0], [-1000.0, 1500.0]],
    "roi_size": [48, 96, 96],
}


def image_channels(img: sitk.Image, spacing, windows) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """HU-window channels of ``img`` at the model spacing in canonical (LPS) orientation, and that shape."""
    hu = sitk.GetArrayFromImage(to_canonical(img)).astype(np.float32)
    shape = target_shape(hu.shape, spacing_zyx(to_canonical(img)), spacing)
    return normalize(torch.from_numpy(resample_antialiased(hu, shape)), windows), shape


def load_training_case(case: dataset.Case, spacing, windows):
    """Image channels and label at the model spacing, in canonical (LPS) orientation."""
    img = read_image(case.image)
    lab = read_label(case.label, img)
    labc = to_canonical(lab)
    x, shape = image_channels(img, spacing, windows)
    y = (resample(sitk.GetArrayFromImage(labc).astype(np.float32), shape) > 0.5).to(torch.uint8)
    return x.half(), y[None]


def ema_avg_fn(decay: float):
    """EMA with warm-up: the decay is min(decay, (1 + n) / (10 + n)) after n updates.

    A fixed decay keeps most of the random initial weights in a short run (0.995 ** 100 = 0.61);
    the warm-up lets the average follow the weights early on.
    """

    def avg(averaged, current, n):
        d = min(decay, (1.0 + float(n)) / (10.0 + float(n)))
        return d * averaged + (1.0 - d) * current

    return avg


def make_transforms(roi):
    from monai.transforms import (
        Compose,
        RandAdjustContrastd,
        RandAffined,
        RandCropByPosNegLabeld,
        RandFlipd,
        RandGaussianNoised,
        RandScaleIntensityd,
        RandShiftIntensityd,
        SpatialPadd,
    )

    keys = ["image", "label"]
    return Compose(
        [
            SpatialPadd(keys=keys, spatial_size=roi, mode="constant"),
            RandCropByPosNegLabeld(keys=keys, label_key="label", spatial_size=roi, pos=2, neg=1, num_samples=1),
            RandAffined(
                keys=keys,
                prob=0.3,
                rotate_range=(0.1, 0.1, 0.3),
                scale_range=(0.15, 0.15, 0.15),
                mode=("bilinear", "nearest"),
                padding_mode="zeros",
            ),
            RandFlipd(keys=keys, prob=0.5, spatial_axis=0),
            RandFlipd(keys=keys, prob=0.5, spatial_axis=1),
            RandFlipd(keys=keys, prob=0.5, spatial_axis=2),
            RandScaleIntensityd(keys="image", factors=0.1, prob=0.3),
            RandShiftIntensityd(keys="image", offsets=0.05, prob=0.3),
            RandAdjustContrastd(keys="image", gamma=(0.8, 1.25), prob=0.2),
            RandGaussianNoised(keys="image", std=0.02, prob=0.2),
        ]
    )


def make_loss(name: str):
    from monai.losses import DeepSupervisionLoss, DiceCELoss, DiceFocalLoss, TverskyLoss

    if name == "dicece":
        base = DiceCELoss(to_onehot_y=True, softmax=True)
    elif name == "dicefocal":
        base = DiceFocalLoss(to_onehot_y=True, softmax=True, gamma=2.0)
    elif name == "focal_tversky":
        tversky = TverskyLoss(to_onehot_y=True, softmax=True, alpha=0.3, beta=0.7)

        class FocalTversky(torch.nn.Module):
            def forward(self, x, y):
                return tversky(x, y).clamp_min(1e-6) ** 0.75

        base = FocalTversky()
    else:
        from .recipes import extra_loss

        base = extra_loss(name)
    return DeepSupervisionLoss(base, weight_mode="exp")


@torch.inference_mode()
def validate(model, cases, roi, device) -> dict[str, float]:
    from monai.inferers import sliding_window_inference

    model.eval()
    dices = {}
    for name, (x, y) in cases.items():
        logits = sliding_window_inference(x[None].float().to(device), roi, 2, model, overlap=0.25, mode="gaussian")
        pred = logits.argmax(1)[0].cpu()
        gt = y[0].bool()
        inter = (pred.bool() & gt).sum().item()
        denom = pred.sum().item() + gt.sum().item()
        dices[name] = 2 * inter / denom if denom else 1.0
    model.train()
    return dices


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-o", "--out", required=True, help="output folder")
    ap.add_argument("--minutes", type=float, default=45.0, help="wall-clock training budget")
    ap.add_argument("--train", nargs="*", default=None, help="training case names (default STS_001-033)")
    ap.add_argument("--val", nargs="*", default=None, help="validation case names (default STS_034-041)")
    ap.add_argument("--images", default=None, help="train from a folder of <case>/image.nii.gz + label.nii.gz instead")
    ap.add_argument("--recipe", default="clcs", choices=recipe_names(), help="network + training defaults (learn/recipes.py)")
    ap.add_argument("--unlabeled", default=None, metavar="DIR", help="UniMatch semi-supervised training with the images of DIR as unlabeled data")
    ap.add_argument("--loss", default=None, choices=["dicece", "dicefocal", "focal_tversky", "balanced_focal_tversky"])
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--accum", type=int, default=None, help="gradient accumulation steps")
    ap.add_argument("--ema", type=float, default=None, help="EMA decay of the weights (0 disables)")
    ap.add_argument("--val-every", type=float, default=300.0, help="seconds between validation passes")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-steps", type=int, default=0, help="stop after this many steps (0: only the time budget)")
    ap.add_argument("--roi", type=int, nargs=3, default=None, metavar=("Z", "Y", "X"),
                    help="training patch size (multiples of 16; default the config's 48 96 96)")
    ap.add_argument("--nproc", type=int, default=1, help="data-parallel processes on this machine (torchrun; --batch is per process)")
    unimatch.add_arguments(ap)
    args = ap.parse_args(argv)
    if args.unlabeled:  # now, not after the training cases are loaded
        unimatch.check_min_confident(args.min_confident)
    code = distributed.relaunch(__spec__.name,
                                sys.argv[1:] if argv is None else list(argv), args.nproc)
    if code is not None:
        return code
    cfg, defaults = recipe_config(args.recipe, DEFAULT_CONFIG)
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)

    from monai.utils import set_determinism

    set_determinism(args.seed)
    dist = distributed.setup(args.device)
    torch.set_num_threads(dist.threads())
    device = dist.device
    if args.roi:
        cfg["roi_size"] = list(args.roi)
    roi = tuple(cfg["roi_size"])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    if args.images:
        root = Path(args.images)
        all_cases = [dataset.Case(d.name, root.name, d / "image.nii.gz", d / "label.nii.gz") for d in sorted(root.iterdir()) if (d / "label.nii.gz").exists()]
        names_train = args.train or [c.name for c in all_cases]
        names_val = args.val or []
    else:
        all_cases = dataset.cases()
        names_train = args.train or dataset.STS_TRAIN
        names_val = args.val if args.val is not None else dataset.STS_VAL
    by_name = {c.name: c for c in all_cases}
    t0 = time.time()
    train = {n: load_training_case(by_name[n], cfg["spacing_zyx"], cfg["hu_windows"]) for n in names_train}
    val = {n: load_training_case(by_name[n], cfg["spacing_zyx"], cfg["hu_windows"]) for n in names_val}
    print(f"loaded {len(train)} training and {len(val)} validation cases in {time.time() - t0:.1f}s", flush=True)

    model = build_segmenter(cfg["network"]).to(device)
    ema = None
    if args.ema > 0:
        from torch.optim.swa_utils import AveragedModel

        ema = AveragedModel(model, avg_fn=ema_avg_fn(args.ema), use_buffers=True)
    net = dist.wrap(model)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-5)
    loss_fn = make_loss(args.loss)
    tf = make_transforms(roi)
    dist.seed_transforms(tf, args.seed)
    names = list(train)
    order = dist.indices(len(names), args.seed)

    def step_loss(net, x, y):
        out_t = net(x)
        preds = list(torch.unbind(out_t, dim=1)) if out_t.ndim == 6 else [out_t]
        return loss_fn(preds, y)

    semi = None
    if args.unlabeled:
        semi = unimatch.UniMatch.from_args(args, step_loss, roi, cfg, device)
        step_loss = semi.loss
    budget = args.minutes * 60.0
    warmup = 30
    step = 0
    start = time.time()
    last_val = start
    history = []
    losses = []

    def lr_at(step, frac):
        w = min(1.0, (step + 1) / warmup)
        return args.lr * w * 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))

    def sample():
        xs, ys = [], []
        for _ in range(args.batch):
            x, y = train[names[next(order)]]
            d = tf({"image": x.float(), "label": y})
            d = d[0] if isinstance(d, list) else d
            xs.append(torch.as_tensor(d["image"]))
            ys.append(torch.as_tensor(d["label"]))
        return torch.stack(xs).to(device), torch.stack(ys).to(device)

    model.train()
    elapsed = 0.0
    while True:
        if elapsed >= budget or (args.max_steps and step >= args.max_steps):
            break
        for g in opt.param_groups:
            g["lr"] = lr_at(step, max(elapsed / budget, step / args.max_steps if args.max_steps else 0.0))
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for _ in range(args.accum):
            x, y = sample()
            loss = step_loss(net, x, y) / args.accum
            loss.backward()
            total += loss.item()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 12.0)
        opt.step()
        if ema is not None:
            ema.update_parameters(model)
        step += 1
        total, elapsed = dist.step_sync(total, time.time() - start)
        losses.append(total)
        if step % 25 == 0:
            print(f"step {step} t={elapsed / 60:.1f}min loss={np.mean(losses[-25:]):.4f} lr={opt.param_groups[0]['lr']:.2e}", flush=True)
        if val and dist.is_writer and time.time() - last_val > args.val_every:
            vnet = ema.module if ema is not None else model  # not `net`: that is the (DDP-wrapped) training network
            d = validate(vnet, val, roi, device)
            history.append({"step": step, "minutes": round((time.time() - start) / 60, 2), "val_dice_model_grid": float(np.mean(list(d.values())))})
            print(f"  val dice (model grid) {history[-1]['val_dice_model_grid']:.4f}", flush=True)
            last_val = time.time()
            dist.save(ema.module if ema is not None else model, out / "segmenter.safetensors")

    train_minutes = (time.time() - start) / 60
    final = ema.module if ema is not None else model
    sha = dist.save(final, out / "segmenter.safetensors")
    dist.close()
    if not dist.is_writer:
        return 0
    d = validate(final, val, roi, device) if val else {}
    cfg.update(
        {
            "file": "segmenter.safetensors",
            "sha256": sha,
            "overlap": 0.25,
            "training": {
                "command": "python -m LesionSegLib.engine.learn.train_seg " + " ".join(argv if argv is not None else sys.argv[1:]),
                "train_cases": names_train,
                "val_cases": names_val,
                "loss": args.loss,
                "lr": args.lr,
                "batch": args.batch,
                "accum": args.accum,
                "ema": args.ema,
                "steps": step,
                "minutes": round(train_minutes, 1),
                "device": str(device),
                "cpu": platform.processor() or platform.machine(),
                "threads": torch.get_num_threads(),
                "processes": dist.world,
                "backend": dist.backend,
                "loss_per_step": [round(v, 5) for v in losses],
                "seed": args.seed,
                "history": history,
                "final_val_dice_model_grid": {k: round(v, 4) for k, v in d.items()},
                "recipe": args.recipe,
                **({"unimatch": semi.summary()} if semi is not None else {}),
            },
        }
    )
    write_text(out / "segmenter.json", json.dumps(cfg, indent=2) + "\n")
    print(f"done: {step} steps in {train_minutes:.1f} min; val dice (model grid) {np.mean(list(d.values())) if d else float('nan'):.4f}")
    return 0


def _main_one_line_errors() -> int:
    """:func:`main`, with an engine error (a bad case file...) as one ``error: <file>: <problem>``
    line on stderr (what :meth:`ChildProcessJob.error_text` shows), never a traceback."""
    from ..errors import LesionSegError

    try:
        return main()
    except LesionSegError as exc:
        print("error: " + " ".join(str(exc).split()), file=sys.stderr, flush=True)
        return 1


if __name__ == "__main__":
    sys.exit(_main_one_line_errors())

"""DetSeg3D losses: focal loss on the centre heatmap + L1 on size/offset (stage 1), and the
per-RoI Dice + BCE of stage 2 (each RoI weighs the same, whatever its lesion's size)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .boxes import HEAT_CH, OFFSET_CH, POS_MIN, SIZE_CH

FOCAL_ALPHA, FOCAL_BETA = 2.0, 4.0  # focusing exponent; down-weighting of negatives near a centre


def heatmap_focal_loss(logit: torch.Tensor, target: torch.Tensor, pos_min: float = POS_MIN,
                       pos_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Penalty-reduced focal loss (CenterNet form), summed and divided by the number of objects.

    ``target`` is the Gaussian heatmap (1 exactly at each centre); voxels with ``target >=
    pos_min`` are positives, the other voxels negatives down-weighted near a centre by
    ``(1 - target) ** FOCAL_BETA``. ``pos_weight`` (same shape, from ``heatmap_targets``) weighs
    each object's positives by 1 / (its number of positives), so every object counts the same
    whatever its size, and its sum is the number of objects. Without it every positive weighs 1
    and the loss is divided by the number of positives (the former form).
    """
    p = torch.sigmoid(logit.float()).clamp(1e-4, 1 - 1e-4)
    pos = target >= pos_min - 1e-6
    log_p, log_1p = F.logsigmoid(logit.float()), F.logsigmoid(-logit.float())
    w = pos.float() if pos_weight is None else pos_weight.float() * pos
    pos_loss = -((1 - p) ** FOCAL_ALPHA * log_p * w)[pos].sum()
    neg_loss = -((1 - target) ** FOCAL_BETA * p**FOCAL_ALPHA * log_1p)[~pos].sum()
    return (pos_loss + neg_loss) / w.sum().clamp_min(1)


def detector_loss(out: torch.Tensor, targets: dict[str, torch.Tensor], size_weight: float = 1.0, offset_weight: float = 1.0) -> tuple[torch.Tensor, dict]:
    """``out`` (B, 7, z, y, x): focal(heatmap) + L1(log size) + L1(offset) where ``reg_mask``.

    With ``pos_weight``/``reg_weight`` in ``targets`` (as ``heatmap_targets`` makes them) each
    object weighs the same in every term: its voxels by 1 / (its count), the sums divided by the
    number of objects (CenterNet's normalisation); without them, per voxel (the former form).
    """
    pw = targets.get("pos_weight")
    heat = heatmap_focal_loss(out[:, HEAT_CH], targets["heat"][:, 0], pos_weight=None if pw is None else pw[:, 0])
    m = targets.get("reg_weight", targets["reg_mask"])
    n = m.sum().clamp_min(1) * 3
    l_size = (torch.abs(out[:, SIZE_CH] - targets["size"]) * m).sum() / n
    l_off = (torch.abs(out[:, OFFSET_CH] - targets["offset"]) * m).sum() / n
    total = heat + size_weight * l_size + offset_weight * l_off
    return total, {"heat": float(heat.detach()), "size": float(l_size.detach()), "offset": float(l_off.detach())}


def per_roi_loss(logit: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """Soft Dice + BCE of each RoI (B, 1, z, y, x), then the mean over RoIs: a 10-voxel lesion's
    RoI counts as much as a 10,000-voxel one (voxels are never pooled across RoIs)."""
    return per_roi_losses(logit, target, smooth).mean()


def per_roi_losses(logit: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """The (B,) per-RoI Dice + BCE losses (the Dice smoothing keeps empty RoIs defined)."""
    b = logit.shape[0]
    z = logit.float().reshape(b, -1)
    y = target.float().reshape(b, -1)
    p = torch.sigmoid(z)
    dice = 1 - (2 * (p * y).sum(1) + smooth) / (p.sum(1) + y.sum(1) + smooth)
    bce = F.binary_cross_entropy_with_logits(z, y, reduction="none").mean(1)
    return dice + bce

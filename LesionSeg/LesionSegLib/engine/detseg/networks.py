"""The two DetSeg3D networks, built from MONAI blocks and a JSON-able config.

Detector (stage 1): a light residual encoder (``monai.networks.blocks.ResidualUnit``, strides
1-2-2-2) whose four levels feed MONAI's ``FeaturePyramidNetwork``; the top-down, fused finest
level (stride 1 on the coarse detection grid) carries an anchor-free head with 7 output
channels: centre-heatmap logit, log box size (z, y, x) and centre offset (z, y, x).

RoI segmenter (stage 2): a MONAI ``UNet`` (about 2 M parameters) over one fixed-size crop per
proposed box; one output channel, the lesion logit.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn as nn

from .inputs import detector_divisor  # noqa: F401  (re-exported: the grid divisor of a detector config)

HEAT_PRIOR = 0.05  # initial heatmap probability (bias of the heatmap logit)

DEFAULT_DETECTOR = {"type": "CenterFPN", "in_channels": 2, "channels": [8, 16, 32, 64], "fpn_channels": 24}
DEFAULT_ROI_SEGMENTER = {
    "type": "UNet",
    "in_channels": 2,
    "out_channels": 1,
    "channels": [16, 32, 64, 128, 192],
    "strides": [2, 2, 2, 2],
    "num_res_units": 1,
    "norm": "instance",
}


class CenterFPN(nn.Module):
    """Residual encoder + feature pyramid + centre/size/offset head (one 7-channel map)."""

    def __init__(self, in_channels: int = 2, channels=(16, 32, 48, 64), fpn_channels: int = 32):
        super().__init__()
        from monai.networks.blocks import Convolution, ResidualUnit
        from monai.networks.blocks.feature_pyramid_network import FeaturePyramidNetwork

        levels = []
        c_in = in_channels
        for i, c in enumerate(channels):
            levels.append(ResidualUnit(3, c_in, c, strides=1 if i == 0 else 2, kernel_size=3, subunits=2, act="PRELU", norm="INSTANCE"))
            c_in = c
        self.levels = nn.ModuleList(levels)
        self.fpn = FeaturePyramidNetwork(3, list(channels), fpn_channels)
        self.head = nn.Sequential(
            Convolution(3, fpn_channels, fpn_channels, kernel_size=3, act="PRELU", norm="INSTANCE"),
            nn.Conv3d(fpn_channels, 7, kernel_size=1),
        )
        with torch.no_grad():
            bias = self.head[-1].bias
            bias.zero_()
            bias[0] = float(torch.log(torch.tensor(HEAT_PRIOR / (1 - HEAT_PRIOR))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = OrderedDict()
        for i, level in enumerate(self.levels):
            x = level(x)
            feats[str(i)] = x
        return self.head(self.fpn(feats)["0"])


def build_detector(cfg: dict) -> nn.Module:
    if cfg.get("type", "CenterFPN") != "CenterFPN":
        raise ValueError(f"unknown detector network type {cfg.get('type')!r}")
    return CenterFPN(int(cfg.get("in_channels", 2)), tuple(cfg.get("channels", DEFAULT_DETECTOR["channels"])), int(cfg.get("fpn_channels", 32)))


def build_roi_segmenter(cfg: dict) -> nn.Module:
    from ..segment.networks import build_segmenter

    return build_segmenter(cfg)

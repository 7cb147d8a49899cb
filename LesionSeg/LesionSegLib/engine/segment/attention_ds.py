"""MONAI ``AttentionUnet`` with deep-supervision heads at three decoder scales.

MONAI's ``AttentionUnet`` (attention gates on every skip connection) has no deep supervision.
What we add here, and only this: a 1x1x1 convolution head on the output of the decoder
``AttentionLayer`` at 1/2, 1/4 and 1/8 resolution, captured with forward hooks so the MONAI
network itself is used unchanged.  In training mode the forward pass returns the DynUNet
convention, a tensor ``(B, 1 + heads, C, z, y, x)``: the main output first, then each head
upsampled (trilinear) to the input size, so ``monai.losses.DeepSupervisionLoss`` weights them.
In eval mode it returns the main output only, so inference is identical to any segmenter.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.nets import AttentionUnet
from monai.networks.nets.attentionunet import AttentionLayer


def decoder_layers(net: AttentionUnet) -> list[AttentionLayer]:
    """The nested decoder ``AttentionLayer`` modules, top (full resolution) first."""
    layers, node = [], net.model[1]
    while isinstance(node, AttentionLayer):
        layers.append(node)
        sub = node.submodule
        node = sub[1] if isinstance(sub, nn.Sequential) and len(sub) > 1 else None
    return layers


class AttentionUnetDS(AttentionUnet):
    """``AttentionUnet`` + deep-supervision heads at decoder depths 1..``ds_heads`` (1/2, 1/4, 1/8)."""

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, channels: Sequence[int],
                 strides: Sequence[int], ds_heads: int = 3, **kw):
        super().__init__(spatial_dims, in_channels, out_channels, channels, strides, **kw)
        layers = decoder_layers(self)
        if ds_heads >= len(layers):
            raise ValueError(f"{ds_heads} deep-supervision heads need more than {len(layers) - 1} decoder levels below the top")
        conv = nn.Conv3d if spatial_dims == 3 else nn.Conv2d
        self.ds_heads = nn.ModuleList(conv(int(channels[d]), out_channels, kernel_size=1) for d in range(1, ds_heads + 1))
        self._features: list[torch.Tensor | None] = [None] * ds_heads
        for i, layer in enumerate(layers[1 : ds_heads + 1]):
            layer.register_forward_hook(self._keeper(i))

    def _keeper(self, i: int):
        def hook(_module, _inputs, output):
            self._features[i] = output if self.training else None

        return hook

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        main = self.model(x)
        if not self.training:
            return main
        outs = [main]
        for head, feat in zip(self.ds_heads, self._features):
            outs.append(F.interpolate(head(feat), size=main.shape[2:], mode="trilinear", align_corners=False))
        self._features = [None] * len(self.ds_heads)
        return torch.stack(outs, dim=1)

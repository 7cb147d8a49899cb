"""MONAI ``AttentionUnet`` with deep-supervision heads at three decoder scales.

MONAI's ``AttentionUnet`` (attention gates on every skip connection) has no deep supervision.
What we add here, and only this: a 1x1x1 convolution head on the output of the decoder
``AttentionLayer`` at 1/2, 1/4 and 1/8 resolution, captured with forward hooks so the MONAI
network itself is used unchanged (each hook keeps the output on its own layer, so a deep copy of
the network works on its own).  In training mode the forward pass returns the DynUNet
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
        for layer in layers[1 : ds_heads + 1]:
            layer.register_forward_hook(_keep_output)

    def _ds_layers(self) -> list[AttentionLayer]:
        """The hooked decoder layers of this very network (found afresh, so a deep copy reads its own)."""
        return decoder_layers(self)[1 : len(self.ds_heads) + 1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        main = self.model(x)
        if not self.training:
            return main
        outs = [main]
        for head, layer in zip(self.ds_heads, self._ds_layers()):
            feat = layer.__dict__.pop(_FEATURE, None)
            if feat is None:
                raise RuntimeError("deep-supervision head found no decoder feature: the decoder layer ran in eval mode")
            outs.append(F.interpolate(head(feat), size=main.shape[2:], mode="trilinear", align_corners=False))
        return torch.stack(outs, dim=1)


_FEATURE = "_ds_feature"


def _keep_output(module: nn.Module, _inputs, output) -> None:
    """Forward hook: keep the decoder layer's output on that layer itself, in training mode only.

    A plain function, not a closure over the network: ``copy.deepcopy`` (fine-tuning copy, EMA
    ``AveragedModel``) copies the hook with each layer, and the copy then stores on its own layers."""
    if module.training:
        module.__dict__[_FEATURE] = output
    else:
        module.__dict__.pop(_FEATURE, None)

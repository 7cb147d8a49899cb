"""Network factory: every network is a MONAI network built from a JSON-able config."""
from __future__ import annotations

import torch.nn as nn


def build_segmenter(cfg: dict) -> nn.Module:
    """Build the segmentation network described by a model card's ``segmenter.network``."""
    kind = cfg.get("type", "DynUNet")
    in_ch = int(cfg.get("in_channels", 1))
    out_ch = int(cfg.get("out_channels", 2))
    if kind == "DynUNet":
        from monai.networks.nets import DynUNet

        strides = [list(s) if isinstance(s, (list, tuple)) else s for s in cfg["strides"]]
        kernels = [list(k) if isinstance(k, (list, tuple)) else k for k in cfg["kernel_size"]]
        return DynUNet(
            spatial_dims=3,
            in_channels=in_ch,
            out_channels=out_ch,
            kernel_size=kernels,
            strides=strides,
            upsample_kernel_size=strides[1:],
            filters=list(cfg["filters"]),
            norm_name=cfg.get("norm", "instance"),
            res_block=bool(cfg.get("res_block", True)),
            deep_supervision=bool(cfg.get("deep_supervision", False)),
            deep_supr_num=int(cfg.get("deep_supr_num", 1)),
        )
    if kind == "AttentionUnet":
        from monai.networks.nets import AttentionUnet

        return AttentionUnet(
            spatial_dims=3,
            in_channels=in_ch,
            out_channels=out_ch,
            channels=list(cfg["channels"]),
            strides=list(cfg["strides"]),
            dropout=float(cfg.get("dropout", 0.0)),
        )
    if kind == "AttentionUnetDS":
        from .attention_ds import AttentionUnetDS

        return AttentionUnetDS(3, in_ch, out_ch, list(cfg["channels"]), list(cfg["strides"]),
                               ds_heads=int(cfg.get("ds_heads", 3)), dropout=float(cfg.get("dropout", 0.0)))
    if kind == "UNet":
        from monai.networks.nets import UNet

        return UNet(
            spatial_dims=3,
            in_channels=in_ch,
            out_channels=out_ch,
            channels=list(cfg["channels"]),
            strides=list(cfg["strides"]),
            num_res_units=int(cfg.get("num_res_units", 2)),
            norm=cfg.get("norm", "instance"),
        )
    raise ValueError(f"unknown segmenter network type {kind!r}")


def divisor(cfg: dict) -> tuple[int, int, int]:
    """Input sizes must be multiples of this (product of the strides per axis)."""
    import numpy as np

    strides = cfg.get("strides", [1])
    total = np.ones(3, dtype=int)
    for s in strides:
        total *= np.broadcast_to(np.asarray(s, dtype=int), (3,))
    return tuple(int(v) for v in total)

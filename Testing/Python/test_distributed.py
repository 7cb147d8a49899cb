"""Data-parallel segmenter training (``train-seg --nproc``): a 2-process gloo run on real CT writes
one checkpoint; the sampler gives the ranks disjoint cases; the torchrun command line."""
from __future__ import annotations

import json
import math
import os
import sys

import pytest

from LesionSegLib.engine import cli, data
from LesionSegLib.engine.learn.distributed import Dist, torchrun_command

DATA = data.data_root()


def test_sampler_splits_cases_between_ranks_each_epoch():
    n = 7
    streams = [Dist(rank=r, world=2).indices(n, seed=3) for r in range(2)]
    per_epoch = math.ceil(n / 2)
    for _epoch in range(3):
        parts = [[next(s) for _ in range(per_epoch)] for s in streams]
        assert set(parts[0]) | set(parts[1]) == set(range(n))  # every case, once per epoch (+1 pad)
        assert len(set(parts[0]) & set(parts[1])) <= 1
    single = Dist().indices(n, seed=3)
    assert sorted(next(single) for _ in range(n)) == list(range(n))


def test_torchrun_command_drops_nproc():
    cmd = torchrun_command("m.train", ["-o", "x", "--nproc", "2", "--seed", "1", "--nproc=2"], 2)
    assert cmd[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert "--nproc-per-node=2" in cmd and cmd[-5:] == ["m.train", "-o", "x", "--seed", "1"]


@pytest.mark.skipif(not (DATA / "sts" / "STS_019").is_dir(), reason=f"shared CT data folder {DATA} is absent (set LESIONSEG_DATA)")
def test_two_process_gloo_training_writes_one_checkpoint(tmp_path, monkeypatch, capsys):
    images = tmp_path / "images"
    images.mkdir()
    for case in ("STS_019", "STS_025"):
        (images / case).symlink_to(DATA / "sts" / case)
    out = tmp_path / "seg"
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    rc = cli.main(["train-seg", "--images", str(images), "-o", str(out), "--nproc", "2", "--max-steps", "2",
                   "--minutes", "20", "--", "--batch", "1", "--ema", "0", "--roi", "32", "64", "64"])
    assert rc == 0, capsys.readouterr().err
    assert sorted(f.name for f in out.iterdir()) == ["segmenter.json", "segmenter.safetensors"]
    training = json.loads((out / "segmenter.json").read_text(encoding="utf-8"))["training"]
    assert (training["processes"], training["backend"], training["steps"]) == (2, "gloo", 2)
    assert len(training["loss_per_step"]) == 2 and all(math.isfinite(v) and v > 0 for v in training["loss_per_step"])
    from safetensors import safe_open

    with safe_open(str(out / "segmenter.safetensors"), "pt") as fh:
        assert len(list(fh.keys())) > 10
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp-")]


def test_feature_perturbation_sees_through_ddp():
    """``train_seg --nproc N`` hands UniMatch the DDP-wrapped network: its feature perturbation must
    drop the same encoder stages as on the bare network, not only the first convolution."""
    import torch
    import torch.distributed as tdist

    from LesionSegLib.engine.learn import unimatch
    from LesionSegLib.engine.learn.train_seg import DEFAULT_CONFIG
    from LesionSegLib.engine.segment.networks import build_segmenter

    torch.manual_seed(0)
    nets = [build_segmenter(DEFAULT_CONFIG["network"]),
            build_segmenter({"type": "AttentionUnetDS", "in_channels": 2, "out_channels": 2,
                             "channels": [4, 8, 16, 32, 64], "strides": [2, 2, 2, 2]})]
    tdist.init_process_group("gloo", store=tdist.HashStore(), rank=0, world_size=1)
    try:
        for net in nets:
            ddp = torch.nn.parallel.DistributedDataParallel(net)
            bare = unimatch.encoder_modules(net)
            assert len(bare) > 1
            assert [id(m) for m in unimatch.encoder_modules(ddp)] == [id(m) for m in bare]
    finally:
        tdist.destroy_process_group()

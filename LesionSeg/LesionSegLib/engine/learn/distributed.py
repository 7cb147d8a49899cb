"""Data-parallel training with ``torch.distributed``: the one hook every segmenter trainer uses.

A trainer module (``python -m LesionSegLib.engine.learn.train_seg ...``) calls, in order:

* :func:`relaunch` at the top of ``main``: with ``--nproc N`` (N > 1) outside ``torchrun`` it
  re-runs the same module under ``torchrun --standalone --nproc-per-node N`` and returns its
  exit code; under ``torchrun`` (several nodes included) it returns ``None`` and training goes on.
* :func:`setup`: joins the process group (gloo on CPU, nccl on GPU, one GPU per local rank) and
  returns a :class:`Dist`; a single process gets a :class:`Dist` of world size 1.
* ``Dist.wrap(model)`` (DistributedDataParallel), ``Dist.indices(n, seed)`` (an endless stream
  of case indices from a :class:`~torch.utils.data.DistributedSampler`, reshuffled each epoch
  with the same seed on every rank, so the ranks see disjoint cases), ``Dist.seed_transforms``
  (augmentation seeded ``seed + rank``), ``Dist.step_sync`` (one small all-reduce per step: the
  mean loss over ranks and rank 0's clock, so that every rank stops at the same step) and
  ``Dist.save`` (rank 0 writes the checkpoint atomically; the other ranks write nothing).

Seeds: every rank seeds torch/numpy/MONAI with the same ``--seed`` (identical initial weights;
DDP also broadcasts rank 0's), the sampler shuffles with that seed, and only the augmentation
streams differ per rank.
"""
from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch


def under_torchrun() -> bool:
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def torchrun_command(module: str, argv: Sequence[str], nproc: int) -> list[str]:
    """``torchrun`` running ``module`` with ``argv`` less its ``--nproc`` (which torchrun's own
    parser would take for an abbreviation of ``--nproc-per-node``)."""
    rest, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            rest.append(a)
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", module, *rest]


def relaunch(module: str, argv: Sequence[str], nproc: int) -> int | None:
    """Run ``module`` under ``torchrun`` with ``nproc`` local processes unless this process is
    already one of them (or ``nproc`` <= 1); returns the exit code, or ``None`` to go on here."""
    if nproc <= 1 or under_torchrun():
        return None
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    try:
        return subprocess.call(torchrun_command(module, argv, nproc), env=env)
    except KeyboardInterrupt:  # torchrun got the same Ctrl-C and stops its workers
        return 130


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1
    device: torch.device = torch.device("cpu")
    backend: str | None = None

    @property
    def is_writer(self) -> bool:
        """The one process that writes checkpoints, configs and the progress log."""
        return self.rank == 0

    def threads(self) -> int:
        """Torch threads: ``OMP_NUM_THREADS`` when set, else this machine's cores over its ranks."""
        env = os.environ.get("OMP_NUM_THREADS", "")
        return int(env) if env.isdigit() and int(env) > 0 else max(1, (os.cpu_count() or 1) // self.local_world)

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        if self.world == 1:
            return model
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)

    def indices(self, n: int, seed: int) -> Iterator[int]:
        """Endless case indices for this rank: epoch after epoch of a DistributedSampler."""
        from torch.utils.data import DistributedSampler

        sampler = DistributedSampler(range(n), num_replicas=self.world, rank=self.rank, shuffle=True, seed=seed)
        epoch = 0
        while True:
            sampler.set_epoch(epoch)
            yield from iter(sampler)
            epoch += 1

    def seed_transforms(self, transforms, seed: int) -> None:
        """Per-rank augmentation streams (``seed + rank``); rank 0 keeps the single-process one."""
        if self.world > 1:
            transforms.set_random_state(seed=seed + self.rank)

    def step_sync(self, loss: float, elapsed: float) -> tuple[float, float]:
        """(mean loss over ranks, rank 0's elapsed seconds): every rank takes the same decisions."""
        if self.world == 1:
            return loss, elapsed
        import torch.distributed as dist

        t = torch.tensor([loss, elapsed if self.rank == 0 else 0.0], dtype=torch.float64,
                         device=self.device if self.backend == "nccl" else "cpu")
        dist.all_reduce(t)
        return float(t[0]) / self.world, float(t[1])

    def save(self, module: torch.nn.Module, path: str | os.PathLike) -> str | None:
        """Rank 0 writes ``module`` to ``path`` atomically and returns its sha256; others: None."""
        if not self.is_writer:
            return None
        from ..atomic import atomic_file
        from ..models import save_weights

        with atomic_file(path) as tmp:
            return save_weights(module, tmp)

    def close(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


def setup(device: str = "auto") -> Dist:
    """This process's place in the job (world size 1 outside ``torchrun``)."""
    use_cuda = device in ("auto", "cuda") and torch.cuda.is_available()
    if not under_torchrun():
        return Dist(device=torch.device("cuda" if use_cuda else "cpu"))
    import torch.distributed as dist

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ["LOCAL_RANK"])
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev, backend = torch.device("cuda", local_rank), "nccl"
    else:
        dev, backend = torch.device("cpu"), "gloo"
    dist.init_process_group(backend)
    if rank != 0:  # one progress log: the writer's (errors still reach stderr)
        sys.stdout = open(os.devnull, "w", encoding="utf-8")
    return Dist(rank, world, local_rank, local_world, dev, backend)


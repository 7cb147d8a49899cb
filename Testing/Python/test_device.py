"""The CUDA paths that can be tested without a GPU (issue 8, review R11).

* ``--device cuda`` where CUDA is unavailable is a one-line error, never a silent CPU run;
  ``auto`` falls back to the CPU and says so.
* A CUDA out-of-memory during sliding-window inference is retried on the CPU, with a note.
  The out-of-memory is simulated: the MONAI inferer raises ``torch.cuda.OutOfMemoryError``
  whenever it is asked to run on a CUDA device.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from LesionSegLib.engine.errors import LesionSegError
from LesionSegLib.engine.segment import inference
from LesionSegLib.engine.segment.inference import select_device, sliding_window_probability

ROOT = Path(__file__).resolve().parents[2]


def test_cuda_requested_without_cuda_is_an_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for name in ("cuda", "cuda:0", "CUDA"):
        with pytest.raises(LesionSegError, match="CUDA is not available"):
            select_device(name)
    dev, notes = select_device("auto")
    assert dev.type == "cpu" and len(notes) == 1 and "running on CPU" in notes[0]
    assert select_device("cpu") == (torch.device("cpu"), [])
    with pytest.raises(LesionSegError, match="unknown device 'tpu'"):
        select_device("tpu")


def test_cli_device_cuda_without_cuda_prints_one_line(tmp_path):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONPATH=os.pathsep.join([str(ROOT / "LesionSeg"), str(ROOT / "LesionSegTraining")]))
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "LesionSegLib.engine.cli", "segment", str(tmp_path / "x.nii.gz"), "-o", str(out), "--device", "cuda", "--progress", "none"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines() == [proc.stderr.strip()] and "CUDA is not available" in proc.stderr, proc.stderr
    assert not out.exists() or not any(out.iterdir())


class _TinyNet(torch.nn.Module):
    """A 1x1x1 convolution that records the devices it was moved to (moving to CUDA is a no-op
    here, so the test runs on a CPU-only torch)."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv3d(1, 2, 1)
        self.moved_to: list[str] = []

    def to(self, device, *args, **kwargs):
        self.moved_to.append(torch.device(device).type)
        return self if torch.device(device).type == "cuda" else super().to(device, *args, **kwargs)

    def forward(self, x):
        return self.conv(x)


@pytest.fixture
def oom_on_cuda(monkeypatch):
    import monai.inferers

    real = monai.inferers.sliding_window_inference
    calls: list[str] = []

    def fake(inputs, roi_size, sw_batch_size, predictor, *args, sw_device=None, device=None, **kwargs):
        calls.append(torch.device(device).type)
        if torch.device(device).type == "cuda":
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(inputs, roi_size, sw_batch_size, predictor, *args, sw_device=sw_device, device=device, **kwargs)

    monkeypatch.setattr(monai.inferers, "sliding_window_inference", fake)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    return calls


def test_cuda_out_of_memory_falls_back_to_cpu(oom_on_cuda):
    torch.manual_seed(0)
    net = _TinyNet()
    x = torch.randn(1, 8, 16, 16)
    fractions: list[float] = []
    prob, used, notes = sliding_window_probability(net, x, (8, 8, 8), 0.25, torch.device("cuda"), progress=fractions.append)
    assert oom_on_cuda == ["cuda", "cpu"] and net.moved_to == ["cuda", "cpu"]
    assert used == torch.device("cpu") and notes == ["CUDA ran out of memory: retried on the CPU"]
    with torch.inference_mode():
        expected = torch.softmax(net.conv(x[None]), 1)[0, 1]
    torch.testing.assert_close(prob, expected)  # the CPU retry computed the real result
    assert prob.device.type == "cpu" and fractions and fractions[-1] == 1.0


def test_out_of_memory_on_cpu_is_not_swallowed(monkeypatch):
    import monai.inferers

    def fake(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("simulated")

    monkeypatch.setattr(monai.inferers, "sliding_window_inference", fake)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        sliding_window_probability(_TinyNet(), torch.zeros(1, 8, 8, 8), (8, 8, 8), 0.25, torch.device("cpu"))
    assert inference.count_windows((8, 16, 16), (8, 8, 8), 0.25) == 9

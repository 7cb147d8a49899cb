"""Smoke run of the speed benchmark (``--quick``: one small real case, one repeat).

The benchmark is not a timed test: this only checks that it runs the whole ``lesionseg
segment`` command and the yardstick side by side and that its JSON holds what the README cites.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from LesionSegLib.engine.data import data_root

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_segment.py"


@pytest.mark.slow
@pytest.mark.timeout(240)
@pytest.mark.skipif(not (data_root() / "sts" / "STS_035").is_dir(), reason="shared CT data folder (LESIONSEG_DATA / ../shared/data) is absent")
def test_benchmark_quick_smoke(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(BENCH), "--quick", "--device", "cpu", "--json", str(out)]
    if os.environ.get("LESIONSEG_TEST_MODEL"):
        cmd += ["--model", os.environ["LESIONSEG_TEST_MODEL"]]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=230)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)  # stdout is exactly the JSON
    assert report == json.loads(out.read_text(encoding="utf-8"))
    assert "yardstick inference" in proc.stderr and "ratio" in proc.stderr  # the table
    assert report["command"].endswith("bench_segment.py " + " ".join(cmd[2:]))

    assert report["repeats"] == 1 and len(report["volumes"]) == 1
    vol = report["volumes"][0]
    assert vol["volume"] == "STS_035" and vol["shape_zyx"] == [63, 77, 70]
    (ours,) = vol["lesionseg"]["runs"]
    (yard,) = vol["yardstick"]["runs"]
    # the whole command ran and wrote its outputs; its own stage timings fit inside its wall time
    assert ours["outputs"] == ["STS_035.seg.nrrd", "STS_035_lesions.csv", "STS_035_lesions.nii.gz"]
    assert set(ours["stages_s"]) >= {"read", "preprocess", "inference", "write"}
    assert 0 < sum(ours["stages_s"].values()) < ours["total_s"]
    assert yard["output_shape"] == [1, 2, 63, 77, 70]  # the yardstick ran on the native grid
    assert 0 < yard["inference_s"] < yard["process_wall_s"]
    for r in (ours, yard):
        assert 100 < r["peak_rss_mb"] < 64 * 1024
    assert vol["ratio"] == pytest.approx(yard["inference_s"] / ours["total_s"])


def test_a_command_s_peak_memory_is_its_own_not_the_driver_s():
    """The benchmarks took ``os.wait4``'s ru_maxrss, which Linux carries over from the parent at
    fork and exec: compare_models, whose driver had grown to 1.1 GB, gave that figure to four
    models. They now sample the command's own process tree (bench_segment.run_sampled)."""
    import numpy as np

    sys.path.insert(0, str(BENCH.parent))
    try:
        from bench_segment import run_sampled
    finally:
        sys.path.remove(str(BENCH.parent))
    ballast = np.ones(400 * 2**20 // 8)  # the driver holds 400 MiB
    assert ballast.sum() > 0
    argv = [sys.executable, "-c", "import time; time.sleep(0.3)"]
    r = run_sampled(argv)
    assert r["rc"] == 0 and 0 < r["peak_rss_mb"] < 150, r["peak_rss_mb"]
    if hasattr(os, "wait4"):  # what the kernel's figure says for the same command
        proc = subprocess.Popen(argv)
        assert os.wait4(proc.pid, 0)[2].ru_maxrss / 1024 > 400

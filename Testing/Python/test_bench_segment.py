"""Smoke run of the performance benchmark (``--quick``: one small real case, one repeat).

The benchmark is not a timed test: this only checks that it runs end to end and that its JSON
holds the per-stage timings, peak RSS and the speed-up against the dense reference.
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
    assert report == json.loads(out.read_text())
    assert "speed-up" in proc.stderr and "peak RSS" in proc.stderr  # the table

    assert report["quick"] is True and report["repeats"] == 1 and len(report["cases"]) == 1
    case = report["cases"][0]
    assert case["case"] == "STS_035" and case["shape_zyx"] == [63, 77, 70]
    ours, ref = case["configs"]["lesionseg"], case["configs"]["dense"]
    assert ours["model"] == ref["model"] and ours["roi_size"] == ref["roi_size"] and ours["overlap"] == ref["overlap"]
    assert set(ours["median"]) == {"read", "preprocess", "inference", "clusters", "confidence", "write", "total"}
    assert set(ref["median"]) == {"read", "preprocess", "inference", "clusters", "write", "total"}
    for r in (ours, ref):
        assert len(r["runs"]) == 1
        stages = sum(v for k, v in r["median"].items() if k != "total")
        assert 0 < stages <= r["median"]["total"] * 1.001 + 1e-3
        assert r["median"]["inference"] > 0
        # peak RSS from wait4 in the parent, VmHWM from the child itself: the same process
        assert 100 < r["peak_rss_mb"] < 64 * 1024
        if r["vm_hwm_mb"] is not None:
            assert r["vm_hwm_mb"] == pytest.approx(r["peak_rss_mb"], rel=0.1)
        assert r["windows"] >= 1 and len(r["network_grid_zyx"]) == 3
    assert ref["network_grid_zyx"] == case["shape_zyx"]  # the reference runs at native resolution
    assert case["speedup_total"] == pytest.approx(ref["median"]["total"] / ours["median"]["total"])
    assert case["speedup_inference"] == pytest.approx(ref["median"]["inference"] / ours["median"]["inference"])
    assert isinstance(case["meets_rss_target"], bool) and isinstance(case["meets_speedup_target"], bool)

#!/usr/bin/env python
"""The whole ``lesionseg segment`` command per network runtime, against the fixed yardstick, same run.

    python Testing/benchmarks/bench_runtime.py [--runtimes openvino onnxruntime torch] [--repeats 2]
        [--model NAME] [--json Resources/evaluation/bench_runtime.json]

Input: the 134x512x512 chest volume rebuilt from ``$LESIONSEG_DATA/fullscan/lung1``
(``chest_volume.py``).  Each measurement is a fresh process, run in turn (yardstick, then each
runtime), ``--repeats`` rounds; medians are reported.

``segment[<runtime>]``
    ``python -m LesionSegLib.engine.cli segment chest134.nii.gz -o OUT --runtime R``: wall clock
    from process start to written outputs, its per-stage timings (from ``--progress json``) and
    its peak RSS (psutil, sampled over its process tree).  ``startup`` = wall - the stages (interpreter, imports, model
    load and runtime compile).  The ONNX exports are made once before timing (a first run, whose
    wall time is reported apart as ``first_run_s``).
``yardstick``
    MONAI ``UNet(3, 1, 2, (16, 32, 64, 128, 256), (2, 2, 2, 2), num_res_units=2)`` run by
    ``sliding_window_inference`` (roi 64x128x128, sw_batch_size 2, overlap 0.25) on the native
    grid, HU clipped to +-1000 and divided by 1000: its inference alone (in-process timer).

The speed-up is ``median yardstick inference / median segment wall``.  The machine is shared:
the load average before and after is recorded, and timings under load are upper bounds.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))

from bench_segment import run_sampled  # noqa: E402
from chest_volume import build_chest134  # noqa: E402

YARDSTICK = r"""
import sys, time, json
import numpy as np, SimpleITK as sitk, torch
from monai.networks.nets import UNet
from monai.inferers import sliding_window_inference
torch.manual_seed(0)
net = UNet(3, 1, 2, (16, 32, 64, 128, 256), (2, 2, 2, 2), num_res_units=2).eval()
hu = sitk.GetArrayFromImage(sitk.ReadImage(sys.argv[1])).astype(np.float32)
x = torch.from_numpy(np.clip(hu, -1000, 1000) / 1000.0)[None, None]
t = time.perf_counter()
with torch.inference_mode():
    out = sliding_window_inference(x, (64, 128, 128), 2, net, overlap=0.25)
print(json.dumps({"inference_s": time.perf_counter() - t, "threads": torch.get_num_threads()}))
"""


def segment_once(image: Path, outdir: Path, runtime: str, env: dict, model: str | None = None) -> dict:
    cmd = [sys.executable, "-m", "LesionSegLib.engine.cli", "segment", str(image), "-o", str(outdir), "--progress", "json", "--runtime", runtime]
    cmd += ["--model", model] if model else []
    wall, rc, out, err, rss = run_measured(cmd, env)
    if rc != 0:
        raise RuntimeError(f"segment --runtime {runtime} failed: {err.strip().splitlines()[-1:]}")
    done = [json.loads(line) for line in out.splitlines() if line.startswith("{") and '"done"' in line][-1]
    stages = {k: round(v, 3) for k, v in done["timings"].items()}
    return {"wall_s": round(wall, 3), "stages_s": stages, "startup_s": round(wall - sum(stages.values()), 3), "lesions": done["lesions"],
            "runtime": done.get("runtime"), "peak_rss_mb": rss}


def run_measured(cmd: list[str], env: dict):
    """(wall s, return code, stdout, stderr, peak RSS MiB) of one child process: its own process
    tree, sampled (:func:`bench_segment.run_sampled`; wait4's ru_maxrss carries this driver's peak
    over into the child)."""
    r = run_sampled(cmd, env=env)
    return r["wall_s"], r["rc"], "\n".join(r["stdout"]), "\n".join(r["stderr"]), round(r["peak_rss_mb"], 1)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runtimes", nargs="+", default=["openvino", "onnxruntime", "torch"])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--model", default=None, help="model for lesionseg segment (default: the active model)")
    ap.add_argument("--workdir", default=None, help="where the volume and outputs go (default: a temporary folder)")
    ap.add_argument("--json", default=str(REPO / "Resources" / "evaluation" / "bench_runtime.json"))
    args = ap.parse_args(argv)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "LesionSeg"), str(REPO / "LesionSegTraining"), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_runtime_"))
    image = build_chest134(work)
    load_before = os.getloadavg()
    first = {}
    for rt in args.runtimes:  # fills the ONNX cache; reported apart
        first[rt] = segment_once(image, work / f"first_{rt}", rt, env, args.model)["wall_s"]
    rounds: dict[str, list] = {"yardstick": [], **{rt: [] for rt in args.runtimes}}
    for i in range(args.repeats):
        wall, rc, out, err, rss = run_measured([sys.executable, "-c", YARDSTICK, str(image)], env)
        if rc != 0:
            raise RuntimeError(f"yardstick failed: {err.strip().splitlines()[-1:]}")
        rounds["yardstick"].append({**json.loads(out.strip().splitlines()[-1]), "wall_s": round(wall, 3), "peak_rss_mb": rss})
        for rt in args.runtimes:
            rounds[rt].append(segment_once(image, work / f"out_{rt}_{i}", rt, env, args.model))
            print(f"round {i + 1}: {rt} {rounds[rt][-1]['wall_s']:.2f} s", file=sys.stderr)
    yard = statistics.median(r["inference_s"] for r in rounds["yardstick"])
    summary = {}
    for rt in args.runtimes:
        med = statistics.median(r["wall_s"] for r in rounds[rt])
        stages = {k: round(statistics.median(r["stages_s"][k] for r in rounds[rt]), 3) for k in rounds[rt][0]["stages_s"]}
        summary[rt] = {
            "segment_wall_s": round(med, 3),
            "startup_s": round(statistics.median(r["startup_s"] for r in rounds[rt]), 3),
            "stages_s": stages,
            "speedup_vs_yardstick": round(yard / med, 3),
            "peak_rss_mb": max(r["peak_rss_mb"] for r in rounds[rt]),
            "first_run_s": first[rt],
        }
    report = {
        "command": "python Testing/benchmarks/bench_runtime.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(), "processor": platform.processor()},
        "model": args.model or "the active model",
        "input": {"volume": "chest134 (fullscan/lung1, z linearly resampled to 134 slices)", "shape_zyx": [134, 512, 512]},
        "load_average_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        "yardstick": {"definition": "MONAI UNet(3,1,2,(16,32,64,128,256),(2,2,2,2),num_res_units=2), sliding_window_inference "
                                    "roi (64,128,128), sw_batch_size 2, overlap 0.25, native grid, HU clip +-1000 /1000; inference alone",
                      "inference_s_median": round(yard, 3), "rounds": rounds["yardstick"]},
        "segment": summary,
        "rounds": {rt: rounds[rt] for rt in args.runtimes},
        "repeats": args.repeats,
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({"yardstick_s": round(yard, 3), **{rt: s["segment_wall_s"] for rt, s in summary.items()}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

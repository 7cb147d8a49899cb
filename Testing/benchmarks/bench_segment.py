#!/usr/bin/env python
"""The whole ``lesionseg segment`` command against the fixed yardstick, side by side in one run.

    python Testing/benchmarks/bench_segment.py --json Resources/evaluation/bench.json
    python Testing/benchmarks/bench_segment.py --model sts-clcs --repeats 3
    python Testing/benchmarks/bench_segment.py --quick            # CI smoke run: one small case, 1 repeat

For every volume, in alternation, ``--repeats`` times each, and each run in a fresh process:

``lesionseg``
    The command a user runs, ``python -m LesionSegLib.engine.cli segment IMAGE -o TMP
    --progress json`` (what the ``lesionseg`` script runs), timed from process start to exit,
    i.e. interpreter and import start-up, model load, reading the file, segmentation and the
    written outputs.  Whatever runtime ``segment`` uses is what is timed: the benchmark only
    runs the command.  The command's own per-stage timings (its ``done`` event) are kept.
``yardstick``
    The fixed external reference of TEAM.md / issue 8: MONAI ``UNet(3, 1, 2, (16, 32, 64, 128,
    256), (2, 2, 2, 2), num_res_units=2)`` (seeded random weights: only its speed matters) run
    by ``sliding_window_inference`` (roi 64x128x128, sw_batch_size 2, overlap 0.25) on the
    input's native grid, HU clipped to +-1000 and divided by 1000.  Only that inference is
    timed (``inference_s``); its process's start-up and file reading are reported apart.

Peak resident memory of each process (and its children) is sampled with psutil every 20 ms;
on Linux the kernel's exact ``ru_maxrss`` of the process is recorded beside it.

Volumes: ``fullscan/lung1``, ``lidc/LIDC-IDRI-0001`` and ``chest134``, a 134x512x512 chest CT
built here, deterministically, from ``$LESIONSEG_DATA/fullscan/lung1`` by linear resampling
along z (same first and last slice positions, 134 slices), in a temporary folder.

Ratio = median yardstick inference / median whole command: above 1 means the whole command is
faster than the yardstick's inference alone.  It is reported as it is, also when below 1.
The JSON (with the exact command line) goes to ``--json`` and stdout, the table to stderr.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT / "LesionSeg") not in sys.path:
    sys.path.insert(0, str(ROOT / "LesionSeg"))

from LesionSegLib.engine.process import ChildProcess, child_env  # noqa: E402

CASES = ("fullscan/lung1", "lidc/LIDC-IDRI-0001", "chest134")
QUICK_CASES = ("sts/STS_035",)
CHEST_SLICES = 134
YARDSTICK = {
    "network": "monai.networks.nets.UNet(spatial_dims=3, in_channels=1, out_channels=2, channels=(16, 32, 64, 128, 256), "
               "strides=(2, 2, 2, 2), num_res_units=2), seeded random weights",
    "inferer": "monai.inferers.sliding_window_inference(roi_size=(64, 128, 128), sw_batch_size=2, overlap=0.25)",
    "input": "native grid, HU clipped to [-1000, 1000] and divided by 1000",
}
SAMPLE_S = 0.02


# ------------------------------------------------------------------------------ yardstick worker
def yardstick_worker(image_path: str, device_name: str, threads: int | None) -> dict:
    t0 = time.perf_counter()
    import numpy as np
    import SimpleITK as sitk
    import torch
    from monai.inferers import sliding_window_inference
    from monai.networks.nets import UNet

    if threads:
        torch.set_num_threads(threads)
    device = torch.device("cuda" if device_name == "cuda" else "cpu")
    torch.manual_seed(0)
    net = UNet(spatial_dims=3, in_channels=1, out_channels=2, channels=(16, 32, 64, 128, 256), strides=(2, 2, 2, 2), num_res_units=2)
    net.eval().to(device)
    startup = time.perf_counter() - t0
    t = time.perf_counter()
    arr = sitk.GetArrayFromImage(sitk.ReadImage(image_path))  # (z, y, x): the native grid
    x = torch.from_numpy(np.clip(arr.astype(np.float32), -1000, 1000) / 1000.0)[None, None]
    read = time.perf_counter() - t
    t = time.perf_counter()
    with torch.inference_mode():
        out = sliding_window_inference(x.to(device), (64, 128, 128), 2, net, overlap=0.25)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    inference = time.perf_counter() - t
    return {"startup_s": startup, "read_s": read, "inference_s": inference, "output_shape": list(out.shape),
            "torch_threads": torch.get_num_threads(), "device": str(device)}


# ------------------------------------------------------------------------------ parent side
def build_chest134(data_root: Path, folder: Path) -> Path:
    """lung1 resampled linearly along z to 134 slices (same x/y grid, same first and last slice
    centre); int16 HU, written as ``<folder>/chest134/image.nii.gz``.  Deterministic."""
    import SimpleITK as sitk

    src = sitk.ReadImage(str(data_root / "fullscan" / "lung1" / "image.nii.gz"))
    nx, ny, nz = src.GetSize()
    sx, sy, sz = src.GetSpacing()
    spacing = (sx, sy, sz * (nz - 1) / (CHEST_SLICES - 1))
    out = sitk.Resample(sitk.Cast(src, sitk.sitkFloat32), (nx, ny, CHEST_SLICES), sitk.Transform(), sitk.sitkLinear,
                        src.GetOrigin(), spacing, src.GetDirection(), -1024.0, sitk.sitkFloat32)
    out = sitk.Cast(sitk.Round(out), sitk.sitkInt16)
    path = folder / "chest134" / "image.nii.gz"
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(out, str(path))
    return path


def volume_info(path: Path) -> dict:
    import SimpleITK as sitk

    img = sitk.ReadImage(str(path))
    arr = sitk.GetArrayViewFromImage(img)
    return {"shape_zyx": list(arr.shape), "spacing_xyz_mm": [round(s, 4) for s in img.GetSpacing()],
            "voxels_sha256": hashlib.sha256(arr.tobytes()).hexdigest()}


def run_sampled(argv: list[str], env: dict | None = None, cwd: Path | None = None) -> dict:
    """Run ``argv`` in a fresh process: exit code, wall time, peak RSS in MiB (psutil, sampled over
    the process tree every ``SAMPLE_S``), its stdout and stderr lines.

    Not ``os.wait4``'s ru_maxrss: Linux carries the parent's peak over into a child at fork and
    exec, so a benchmark driver that had grown (evaluation in-process, a volume built in memory)
    reported its own peak for every command it ran (compare_models gave 1.07 GiB to four models)."""
    lines: dict[str, list[str]] = {"stdout": [], "stderr": []}
    proc = ChildProcess(argv, env=env if env is not None else child_env(), cwd=cwd,
                        on_line=lambda stream, line: lines[stream].append(line), sample_rss=SAMPLE_S)
    t = time.perf_counter()
    proc.start()
    rc = proc.wait()
    return {"rc": rc, "wall_s": time.perf_counter() - t, "peak_rss_mb": proc.peak_rss_bytes / 2**20, **lines}


def timed(argv: list[str], cwd: Path, parse_json: bool) -> dict:
    """Run ``argv`` in a fresh process (:func:`run_sampled`); wall time, peak RSS, the JSON lines it
    printed, its stderr."""
    r = run_sampled(argv, cwd=cwd)
    if r["rc"] != 0:
        raise SystemExit(f"error: {shlex.join(argv)} failed (exit {r['rc']}):\n" + "\n".join(r["stderr"][-30:]))
    events = []
    for line in r["stdout"] if parse_json else ():
        if line.startswith("{"):
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return {"wall_s": r["wall_s"], "peak_rss_mb": r["peak_rss_mb"], "events": events, "stderr": r["stderr"]}


def run_lesionseg(image: Path, args, work: Path) -> dict:
    out = work / "out"
    argv = [sys.executable, "-m", "LesionSegLib.engine.cli", "segment", str(image), "-o", str(out),
            "--progress", "json", "--device", args.device]
    if args.model:
        argv += ["--model", args.model]
    if args.threads:
        argv += ["--threads", str(args.threads)]
    r = timed(argv, work, parse_json=True)
    done = [e for e in r["events"] if e.get("event") == "done"]
    if len(done) != 1:
        raise SystemExit(f"error: lesionseg segment {image} reported no result:\n" + "\n".join(r["stderr"][-30:]))
    outputs = sorted(p.name for p in out.iterdir())
    for p in out.iterdir():
        p.unlink()
    return {"total_s": r["wall_s"], "peak_rss_mb": r["peak_rss_mb"],
            "stages_s": done[0].get("timings", {}), "lesions": done[0].get("lesions"), "device": done[0].get("device"),
            "runtime": done[0].get("runtime"),  # the network runtime, when the command reports one
            "outputs": outputs, "notes": [ln for ln in r["stderr"] if ln.startswith("note:")]}


def run_yardstick(image: Path, args, work: Path) -> dict:
    argv = [sys.executable, str(Path(__file__).resolve()), "--worker", "--image", str(image), "--device", args.device]
    if args.threads:
        argv += ["--threads", str(args.threads)]
    r = timed(argv, work, parse_json=True)
    (res,) = [e for e in r["events"] if "inference_s" in e]
    return {**res, "process_wall_s": r["wall_s"], "peak_rss_mb": r["peak_rss_mb"]}


def median(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def table(report: dict) -> str:
    head = ["volume", "shape zyx", "lesionseg segment (whole)", "peak RSS", "yardstick inference", "peak RSS", "ratio"]
    rows = []
    for c in report["volumes"]:
        rows.append([c["volume"], "x".join(map(str, c["shape_zyx"])), f"{c['lesionseg']['median_total_s']:.2f} s",
                     f"{c['lesionseg']['max_peak_rss_mb'] / 1024:.2f} GiB", f"{c['yardstick']['median_inference_s']:.2f} s",
                     f"{c['yardstick']['max_peak_rss_mb'] / 1024:.2f} GiB", f"{c['ratio']:.2f}x"])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    fmt = lambda cells: "  ".join(str(x).ljust(w) for x, w in zip(cells, widths))  # noqa: E731
    lines = [fmt(head), fmt(["-" * w for w in widths]), *map(fmt, rows)]
    lines.append(f"(median of {report['repeats']} run(s), each in a fresh process; ratio = yardstick inference / whole "
                 f"lesionseg segment command, > 1 means the command is faster; machine: {report['machine']['cpu_count']} CPUs, "
                 f"load average {report['machine']['load_average_start']} at start)")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", nargs="+", default=None, help=f"group/case under the data root, chest134, or image paths (default: {' '.join(CASES)})")
    ap.add_argument("--repeats", type=int, default=None, help="runs of each side per volume (default 3; --quick: 1)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--model", default=None, metavar="NAME", help="model name or folder for lesionseg segment (default: the active model)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads on both sides (default: torch's own)")
    ap.add_argument("--quick", action="store_true", help=f"CI smoke run: {' '.join(QUICK_CASES)}, 1 repeat")
    ap.add_argument("--json", default=None, metavar="PATH", help="also write the JSON report here")
    ap.add_argument("--note", default="", help="free text stored in the JSON (e.g. what else ran on the machine)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--image", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(yardstick_worker(args.image, args.device, args.threads)), flush=True)
        return 0

    from LesionSegLib.engine.data import data_root

    cases = args.cases or list(QUICK_CASES if args.quick else CASES)
    repeats = args.repeats or (1 if args.quick else 3)
    root = data_root()
    report = {
        "benchmark": "whole `lesionseg segment` command vs the fixed yardstick's inference alone",
        "command": shlex.join([Path(sys.executable).name, os.path.relpath(Path(__file__).resolve(), ROOT), *(sys.argv[1:] if argv is None else argv)]),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "repeats": repeats,
        "device": args.device,
        "model": args.model or "(active model)",
        "yardstick": YARDSTICK,
        "note": args.note,
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpu_count": os.cpu_count(),
                    "load_average_start": [round(v, 1) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None},
        "volumes": [],
    }
    with tempfile.TemporaryDirectory(prefix="lesionseg-bench-") as tmp:
        tmp = Path(tmp)
        for spec in cases:
            if spec == "chest134":
                image = build_chest134(root, tmp)
            elif Path(spec).exists():
                image = Path(spec)
            else:
                image = root / spec / "image.nii.gz"
                if not image.exists():
                    raise SystemExit(f"error: volume {spec!r} not found (neither a path nor {image})")
            name = image.parent.name if image.name.startswith("image.") else image.name
            ours, yard = [], []
            for k in range(repeats):  # alternate, so that a change in machine load hits both sides alike
                print(f"[bench] {name}: run {k + 1}/{repeats}: lesionseg segment ...", file=sys.stderr, flush=True)
                ours.append(run_lesionseg(image, args, tmp))
                print(f"[bench] {name}: run {k + 1}/{repeats}: yardstick ...", file=sys.stderr, flush=True)
                yard.append(run_yardstick(image, args, tmp))
            row = {"volume": name, "source": spec, **volume_info(image),
                   "lesionseg": {"median_total_s": median(ours, "total_s"), "max_peak_rss_mb": max(r["peak_rss_mb"] for r in ours), "runs": ours},
                   "yardstick": {"median_inference_s": median(yard, "inference_s"), "max_peak_rss_mb": max(r["peak_rss_mb"] for r in yard), "runs": yard}}
            row["ratio"] = row["yardstick"]["median_inference_s"] / row["lesionseg"]["median_total_s"]
            report["volumes"].append(row)
    report["machine"]["load_average_end"] = [round(v, 1) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None
    print(table(report), file=sys.stderr)
    text = json.dumps(report, indent=2)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

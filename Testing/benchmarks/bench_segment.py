#!/usr/bin/env python
"""Speed and memory of ``lesionseg segment`` against a plain dense MONAI sliding-window pass.

    python Testing/benchmarks/bench_segment.py                      # fullscan + lidc, 3 repeats, CPU
    python Testing/benchmarks/bench_segment.py --device cuda        # on the GPU
    python Testing/benchmarks/bench_segment.py --quick              # CI smoke run: one small case, 1 repeat
    python Testing/benchmarks/bench_segment.py --json bench.json    # also save the JSON

For every case two configurations run, each in its own fresh Python process (so that its peak
resident memory is its own, read with ``os.wait4`` and cross-checked with ``VmHWM``):

``lesionseg``
    What ``lesionseg segment`` does per input: read the file, ``Engine.segment`` (canonical
    orientation, body crop, resampling to the model spacing, sliding windows, clusters,
    confidence classifier) and write ``<stem>_lesions.nii.gz``, ``.csv`` and ``.seg.nrrd``.
    Stages: read, preprocess, inference, clusters, confidence, write.
``dense``
    The reference: the same network and weights run by a plain dense MONAI
    ``sliding_window_inference`` over the whole volume at the input's native resolution (no
    crop, no resampling), normalised the same way (same HU windows), same ``roi_size``,
    ``overlap``, Gaussian blending and window batch size, then a 0.5 probability threshold, 26-connected
    components and writing the labelmap.  Stages: read, preprocess, inference, clusters, write.

Each configuration is timed ``--repeats`` times in its process after the model is loaded; the
median is reported (the first run, which pays one-off warm-up costs, is reported apart).
The speed-up is ``median total(dense) / median total(lesionseg)`` (and the same for the
inference stage alone).  The JSON goes to stdout (and ``--json``), the table to stderr.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STAGES = ("read", "preprocess", "inference", "clusters", "confidence", "write")
CONFIGS = ("lesionseg", "dense")
DEFAULT_CASES = ("fullscan/lung1", "lidc/LIDC-IDRI-0001")
QUICK_CASE = "sts/STS_035"
TARGET_SPEEDUP = 4.0
TARGET_PEAK_RSS_GB = 4.0


# ------------------------------------------------------------------------------ worker side
def _vm_status(key: str) -> float | None:
    """``VmHWM`` / ``VmRSS`` of this process in MB (Linux), else None."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def worker(config: str, image_path: str, repeats: int, device_name: str, model: str | None, threads: int | None) -> dict:
    t_start = time.perf_counter()
    import numpy as np
    import SimpleITK as sitk
    import torch

    from LesionSegLib.engine.atomic import AtomicWriter
    from LesionSegLib.engine.segment.inference import count_windows, select_device
    from LesionSegLib.engine.io.images import read_image
    from LesionSegLib.engine.io.writers import write_image
    from LesionSegLib.engine.models import get_card
    from LesionSegLib.engine.segment.networks import build_segmenter
    from LesionSegLib.engine.io.preprocess import body_box, from_canonical, normalize, spacing_zyx, target_shape, to_canonical

    if threads:
        torch.set_num_threads(threads)
    t_import = time.perf_counter() - t_start
    device, _ = select_device(device_name)
    t = time.perf_counter()
    if config == "lesionseg":
        from LesionSegLib.engine.segment.pipeline import Engine

        engine = Engine(model, device_name, threads=threads)
        card, cfg = engine.card, engine.seg_cfg
    else:
        import cc3d
        from monai.inferers import sliding_window_inference

        card = get_card(model)
        cfg = card.part("segmenter")
        net = build_segmenter(cfg["network"])
        card.load_into("segmenter", net)
        net.eval().to(device)
        prob_threshold = float(card.data.get("postprocess", {}).get("prob_threshold", 0.5))
    roi, overlap = tuple(cfg["roi_size"]), float(cfg.get("overlap", 0.25))
    load_s = time.perf_counter() - t
    rss_loaded = _vm_status("VmRSS")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    runs = []
    info: dict = {}
    with tempfile.TemporaryDirectory(prefix="lesionseg-bench-") as tmp:
        for _ in range(repeats):
            timings: dict[str, float] = {}
            t_run = time.perf_counter()
            t = time.perf_counter()
            image = read_image(image_path)
            timings["read"] = time.perf_counter() - t
            if config == "lesionseg":
                res = engine.segment(image, source=image_path)
                timings.update(res.timings)
                t = time.perf_counter()
                with AtomicWriter(tmp) as w:
                    res.write_outputs(w, "bench")
                timings["write"] = time.perf_counter() - t
                info["n_lesions"] = len(res.lesions)
                info["device_used"] = res.device
            else:
                t = time.perf_counter()
                canonical = to_canonical(image)
                hu = sitk.GetArrayFromImage(canonical).astype(np.float32, copy=False)
                x = normalize(hu, cfg["hu_windows"])
                timings["preprocess"] = time.perf_counter() - t
                t = time.perf_counter()
                with torch.inference_mode():
                    logits = sliding_window_inference(
                        x[None].to(device), roi, 1, net, overlap=overlap, mode="gaussian", sw_device=device, device=device
                    )
                    prob = torch.softmax(logits.float(), 1)[0, 1].cpu().numpy()
                _sync(device)
                timings["inference"] = time.perf_counter() - t
                del logits
                t = time.perf_counter()
                labels = cc3d.connected_components(prob >= prob_threshold, connectivity=26)
                timings["clusters"] = time.perf_counter() - t
                t = time.perf_counter()
                write_image(from_canonical(labels.astype(np.uint16), canonical, image), image, str(Path(tmp) / "bench_dense.nii.gz"))
                timings["write"] = time.perf_counter() - t
                info["n_lesions"] = int(labels.max())
                info["device_used"] = str(device)
                info["windows"] = count_windows(x.shape[1:], roi, overlap)
                info["network_grid_zyx"] = list(x.shape[1:])
            timings["total"] = time.perf_counter() - t_run
            runs.append(timings)
        if config == "lesionseg":  # the grid the network sees (same functions as the pipeline)
            can = to_canonical(image)
            hu = sitk.GetArrayViewFromImage(can)
            sp = spacing_zyx(can)
            box = body_box(hu, sp)
            grid = target_shape(box.shape, sp, cfg["spacing_zyx"])
            info["network_grid_zyx"] = list(grid)
            info["windows"] = count_windows(grid, roi, overlap)

    size = image.GetSize()
    out = {
        "config": config,
        "image": image_path,
        "shape_zyx": [size[2], size[1], size[0]],
        "spacing_xyz_mm": [round(s, 4) for s in image.GetSpacing()],
        "model": card.id,
        "roi_size": list(roi),
        "overlap": overlap,
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "repeats": repeats,
        "import_s": t_import,
        "model_load_s": load_s,
        "rss_after_load_mb": rss_loaded,
        "runs": runs,
        "vm_hwm_mb": _vm_status("VmHWM"),
        **info,
    }
    if device.type == "cuda":
        out["gpu_name"] = torch.cuda.get_device_name(device)
        out["gpu_peak_allocated_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out


# ------------------------------------------------------------------------------ parent side
def resolve_case(spec: str) -> Path:
    """``group/case`` under the data root, or a path to an image file / DICOM folder."""
    p = Path(spec)
    if p.exists():
        return p
    from LesionSegLib.engine.data import data_root

    cand = data_root() / spec / "image.nii.gz"
    if cand.exists():
        return cand
    raise SystemExit(f"error: case {spec!r} not found (neither a path nor {cand})")


def case_name(path: Path) -> str:
    return path.parent.name if path.name.startswith("image.") else path.name


def run_config(config: str, image: Path, args) -> dict:
    """Run one configuration in a fresh interpreter; its peak RSS comes from ``wait4``."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", config, "--image", str(image), "--repeats", str(args.repeats), "--device", args.device]
    if args.model:
        cmd += ["--model", args.model]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err)
        _, status, rusage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(errors="replace"), err.read().decode(errors="replace")
    if proc.returncode != 0:
        raise SystemExit(f"error: {config} on {image} failed (exit {proc.returncode}):\n{stderr[-3000:]}")
    lines = [ln for ln in stdout.splitlines() if ln.startswith("{")]
    res = json.loads(lines[-1])
    # ru_maxrss is in kilobytes on Linux (bytes on macOS)
    scale = 1 / 1024.0 if sys.platform != "darwin" else 1 / 2**20
    res["peak_rss_mb"] = rusage.ru_maxrss * scale
    res["process_wall_s"] = wall
    res["median"] = {k: statistics.median(r[k] for r in res["runs"]) for k in res["runs"][0]}
    res["first_run_total_s"] = res["runs"][0]["total"]
    return res


def summarise(case: str, results: dict) -> dict:
    ours, ref = results.get("lesionseg"), results.get("dense")
    row = {"case": case, "shape_zyx": ours["shape_zyx"], "configs": results}
    if ours and ref:
        row["speedup_total"] = ref["median"]["total"] / ours["median"]["total"]
        row["speedup_inference"] = ref["median"]["inference"] / ours["median"]["inference"]
    row["meets_speedup_target"] = None if "speedup_total" not in row else row["speedup_total"] >= TARGET_SPEEDUP
    row["meets_rss_target"] = ours["peak_rss_mb"] <= TARGET_PEAK_RSS_GB * 1024
    return row


def table(report: dict) -> str:
    cols = ["case", "config", "device", "read", "prep", "infer", "clust", "conf", "write", "total", "1st run", "peak RSS"]
    rows = []
    for c in report["cases"]:
        for name in CONFIGS:
            r = c["configs"].get(name)
            if not r:
                continue
            m = r["median"]
            cells = [f"{c['case']} {'x'.join(map(str, c['shape_zyx']))}", name, r["device_used"]]
            cells += [f"{m[s]:.2f}" if s in m else "-" for s in STAGES]
            mem = f"{r['peak_rss_mb'] / 1024:.2f} GB"
            if r.get("gpu_peak_allocated_mb") is not None:
                mem += f" (GPU {r['gpu_peak_allocated_mb'] / 1024:.2f} GB)"
            cells += [f"{m['total']:.2f} s", f"{r['first_run_total_s']:.2f} s", mem]
            rows.append(cells)
        if "speedup_total" in c:
            rows.append(["", "speed-up", "", "", "", f"{c['speedup_inference']:.1f}x", "", "", "", f"{c['speedup_total']:.1f}x", "", ""])
    widths = [max(len(str(x)) for x in col) for col in zip(cols, *rows)]
    fmt = lambda cells: "  ".join(str(x).ljust(w) for x, w in zip(cells, widths))  # noqa: E731
    lines = [fmt(cols), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows]
    rep = report["repeats"]
    lines.append(f"(seconds, median of {rep} run(s) per configuration, each configuration in a fresh process; "
                 f"targets: >= {TARGET_SPEEDUP:g}x faster than dense, <= {TARGET_PEAK_RSS_GB:g} GB peak RSS)")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", nargs="+", default=None, help=f"group/case under the data root or image paths (default: {' '.join(DEFAULT_CASES)})")
    ap.add_argument("--repeats", type=int, default=None, help="timed runs per configuration (default 3; --quick: 1)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    ap.add_argument("--model", default=os.environ.get("LESIONSEG_BENCH_MODEL"), help="model name or folder (default: the active model)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS)
    ap.add_argument("--quick", action="store_true", help=f"CI smoke run: {QUICK_CASE}, 1 repeat")
    ap.add_argument("--json", default=None, metavar="PATH", help="also write the JSON report here")
    ap.add_argument("--worker", choices=CONFIGS, help=argparse.SUPPRESS)
    ap.add_argument("--image", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker:
        print(json.dumps(worker(args.worker, args.image, args.repeats or 1, args.device, args.model, args.threads)))
        return 0

    cases = args.cases or ([QUICK_CASE] if args.quick else list(DEFAULT_CASES))
    args.repeats = args.repeats or (1 if args.quick else 3)
    images = [(case_name(resolve_case(c)), resolve_case(c)) for c in cases]
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"error: --device cuda but CUDA is not available (torch {torch.__version__}); use --device cpu")
    report = {
        "benchmark": "lesionseg segment vs dense MONAI sliding window at native resolution",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "repeats": args.repeats,
        "device": args.device,
        "quick": args.quick,
        "machine": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cpu_count": os.cpu_count(),
            "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
            "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        },
        "targets": {"speedup_min": TARGET_SPEEDUP, "peak_rss_max_gb": TARGET_PEAK_RSS_GB},
        "cases": [],
    }
    for name, image in images:
        results = {}
        for config in args.configs:
            print(f"[bench] {name}: {config} x{args.repeats} on {args.device} ...", file=sys.stderr, flush=True)
            results[config] = run_config(config, image, args)
        if "lesionseg" in results:
            report["cases"].append(summarise(name, results))
        else:
            report["cases"].append({"case": name, "shape_zyx": results["dense"]["shape_zyx"], "configs": results})
    report["machine"]["load_average_at_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    print(table(report), file=sys.stderr)
    text = json.dumps(report, indent=2)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

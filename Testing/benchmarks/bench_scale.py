#!/usr/bin/env python
"""Scale: ``lesionseg batch`` on a local Ray instance with 1 and 2 workers against ``lesionseg
segment`` looping over the same inputs, and ``train-seg --nproc 2`` against 1 process for the
same number of samples seen.

    python Testing/benchmarks/bench_scale.py --json Resources/evaluation/scale.json
    python Testing/benchmarks/bench_scale.py --part batch|train --json ...   # one half (merged)

Batch: 24 cases = copies (symbolic links under a temporary folder, nothing copied) of five small
STS crops and the 16-slice 512x512 LIDC-IDRI-0001 chest stack (two copies), so the cases differ
in size.  Every configuration is one end-to-end command in a fresh process, startup included:

``segment_loop``  ``lesionseg segment <24 files> --threads 1`` (one process, model loaded once,
                  the cases one after the other)
``ray_1``         ``lesionseg batch DIR --num-workers 1`` (local Ray started by the command;
                  1 thread per worker)
``ray_2``         the same with ``--num-workers 2``

Reported: wall seconds, scans per minute, the speed-up over ``segment_loop``, Ray's start-up
(command start to workers ready), and the per-task overhead: (ray_1 wall - start-up -
segment_loop wall) / 24.

Training: ``python -m LesionSegLib.engine.learn.train_seg`` on four small STS cases, 32x64x64
patches, no EMA, ``--max-steps S``: 1 process with ``--batch 2`` (2 torch threads) against
``--nproc 2`` with ``--batch 1`` per process (gloo, 1 thread each): the same global batch, the
same number of steps, so the same samples seen.  Reported: wall seconds of the whole command,
training-loop minutes, and both per-step loss curves (mean over ranks).

The machine and the load average at the start of each part are recorded: timings taken while
other jobs share the cores are upper bounds.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
STS = ("STS_019", "STS_025", "STS_008", "STS_024", "STS_002")
CHEST = "lidc/LIDC-IDRI-0001"
N_CASES = 24
TRAIN_CASES = ("STS_019", "STS_025", "STS_008", "STS_024")


def data_root() -> Path:
    return Path(os.environ.get("LESIONSEG_DATA", REPO.parent / "shared" / "data")).resolve()


def env() -> dict:
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join([str(REPO / "LesionSeg"), str(REPO / "LesionSegTraining"), e.get("PYTHONPATH", "")])
    e.pop("OMP_NUM_THREADS", None)
    return e


def make_cases(folder: Path) -> list[Path]:
    """24 links named copyNN_<case>.nii.gz: 22 cycle over the STS crops, 2 are the chest stack."""
    root = data_root()
    sources = [root / "sts" / STS[i % len(STS)] / "image.nii.gz" for i in range(N_CASES - 2)]
    sources += [root / CHEST / "image.nii.gz"] * 2
    folder.mkdir(parents=True)
    links = []
    for i, src in enumerate(sources):
        link = folder / f"copy{i:02d}_{src.parent.name}.nii.gz"
        link.symlink_to(src)
        links.append(link)
    return links


def run(cmd: list[str], log: Path) -> tuple[float, list[dict]]:
    """Wall seconds of ``cmd`` and the JSON events it printed, each stamped with its arrival time."""
    t0 = time.perf_counter()
    events = []
    with open(log, "w") as err:
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=env(), cwd=REPO)
        for line in p.stdout:
            if line.startswith("{"):
                ev = json.loads(line)
                ev["t"] = time.perf_counter() - t0
                events.append(ev)
        rc = p.wait()
    if rc not in (0,):
        raise SystemExit(f"{' '.join(cmd)} failed ({rc}); see {log}")
    return time.perf_counter() - t0, events


def bench_batch(work: Path) -> dict:
    cases = make_cases(work / "cases")
    cli = [sys.executable, "-m", "LesionSegLib.engine.cli"]
    out: dict = {"cases": N_CASES, "inputs": [c.name for c in cases]}
    wall, _ = run([*cli, "segment", *map(str, cases), "-o", str(work / "seg"), "--threads", "1", "--progress", "json"], work / "seg.log")
    out["segment_loop"] = {"command": "lesionseg segment <24 files> -o OUT --threads 1", "wall_s": round(wall, 1),
                           "scans_per_min": round(N_CASES / wall * 60, 2)}
    for n in (1, 2):
        wall, ev = run([*cli, "batch", str(work / "cases"), "-o", str(work / f"ray{n}"), "--num-workers", str(n),
                        "--progress", "json"], work / f"ray{n}.log")
        ready = next(e["t"] for e in ev if e["event"] == "connected")
        done = [e for e in ev if e["event"] == "case"]
        assert len(done) == N_CASES and all(e["status"] == "done" for e in done), done
        out[f"ray_{n}"] = {
            "command": f"lesionseg batch CASES_DIR -o OUT --num-workers {n}",
            "wall_s": round(wall, 1),
            "scans_per_min": round(N_CASES / wall * 60, 2),
            "startup_s": round(ready, 1),
            "steady_scans_per_min": round(N_CASES / (done[-1]["t"] - ready) * 60, 2),
            "case_seconds_sum": round(sum(float(e["seconds"]) for e in done), 1),
            "workers": sorted({e["worker"] for e in done}),
        }
    loop = out["segment_loop"]["wall_s"]
    for n in (1, 2):
        out[f"ray_{n}"]["speedup_vs_segment_loop"] = round(loop / out[f"ray_{n}"]["wall_s"], 2)
    out["ray_2"]["speedup_vs_ray_1"] = round(out["ray_1"]["wall_s"] / out["ray_2"]["wall_s"], 2)
    out["per_task_overhead_s"] = round((out["ray_1"]["wall_s"] - out["ray_1"]["startup_s"] - loop) / N_CASES, 2)
    out["note"] = ("per_task_overhead_s = (ray_1 wall - ray_1 start-up - segment_loop wall) / 24; the start-up "
                   "(local Ray + workers loading the model) is paid once per batch")
    return out


def bench_train(work: Path, steps: int) -> dict:
    mod = [sys.executable, "-m", "LesionSegLib.engine.learn.train_seg"]
    common = ["--train", *TRAIN_CASES, "--val", "--ema", "0", "--roi", "32", "64", "64", "--max-steps", str(steps),
              "--minutes", "60", "--seed", "0"]
    out: dict = {"cases": list(TRAIN_CASES), "steps": steps, "roi": [32, 64, 64], "global_batch": 2}
    for nproc, batch in ((1, 2), (2, 1)):
        dest = work / f"train{nproc}"
        wall, _ = run([*mod, "-o", str(dest), "--batch", str(batch), "--nproc", str(nproc), *common], work / f"train{nproc}.log")
        t = json.loads((dest / "segmenter.json").read_text(encoding="utf-8"))["training"]
        out[f"nproc_{nproc}"] = {
            "command": f"python -m LesionSegLib.engine.learn.train_seg --nproc {nproc} --batch {batch} " + " ".join(common),
            "wall_s": round(wall, 1), "train_minutes": t["minutes"], "threads_per_process": t["threads"],
            "backend": t["backend"], "loss_per_step": t["loss_per_step"],
        }
    a, b = out["nproc_1"]["loss_per_step"], out["nproc_2"]["loss_per_step"]
    k = max(1, steps // 4)
    out["speedup_wall"] = round(out["nproc_1"]["wall_s"] / out["nproc_2"]["wall_s"], 2)
    out["loss_last_quarter_mean"] = {"nproc_1": round(sum(a[-k:]) / k, 4), "nproc_2": round(sum(b[-k:]) / k, 4)}
    diffs = [abs(x - y) for x, y in zip(a, b)]
    noise = [abs(a[i + 1] - a[i]) for i in range(len(a) - 1)]
    out["loss_mean_abs_diff"] = round(sum(diffs) / len(diffs), 4)
    out["loss_step_to_step_noise_nproc_1"] = round(sum(noise) / max(1, len(noise)), 4)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=["batch", "train", "all"], default="all")
    ap.add_argument("--steps", type=int, default=12, help="training steps per run")
    ap.add_argument("--json", default=None, help="write (merge into) this JSON file")
    args = ap.parse_args(argv)
    result = json.loads(Path(args.json).read_text(encoding="utf-8")) if args.json and Path(args.json).exists() else {}
    result["machine"] = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                         "python": platform.python_version(), "gpu": None,
                         "note": "each part records the 1-minute load average at its start; on this 2-core "
                                 "machine a load well above 0.5 means other jobs shared the cores and the "
                                 "timings are upper bounds"}
    with tempfile.TemporaryDirectory(prefix="bench_scale_") as tmp:
        work = Path(tmp)
        if args.part in ("batch", "all"):
            load = os.getloadavg()[0]
            result["batch"] = bench_batch(work)
            result["batch"]["load_average_at_start"] = round(load, 2)
        if args.part in ("train", "all"):
            load = os.getloadavg()[0]
            result["train"] = bench_train(work, args.steps)
            result["train"]["load_average_at_start"] = round(load, 2)
    result["command"] = "python Testing/benchmarks/bench_scale.py --json Resources/evaluation/scale.json"
    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

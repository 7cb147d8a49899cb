#!/usr/bin/env python
"""One table comparing the segmenters and training recipes (issue 11).

    python Testing/benchmarks/compare_models.py                         # default models, all parts
    python Testing/benchmarks/compare_models.py --models sts-clcs runs/x/model --parts val chest
    python Testing/benchmarks/compare_models.py --parts timing --yardstick

For every model (a registry name, ``name@version`` or a model folder; a model named in the
defaults but not in the registry, e.g. ``sts-detseg`` before it exists, is listed as missing):

``val``    ``lesionseg segment --threshold 0`` on STS_034-041, scored by ``engine/evaluate``
           (Dice of lesions with confidence >= 0.5, sensitivity at 0.5 FP/case, CPM, cluster
           AUC, ECE) plus lesions detected and FP/case at the model's 0.5 confidence threshold;
``chest``  the same on the chest scans fullscan/lung1, lung2 and lidc/LIDC-IDRI-0001 (out of
           domain for every model here, which are all trained on the sarcoma crops);
``timing`` the whole ``lesionseg segment`` command (startup to written outputs, a fresh process;
           peak RSS from ``wait4``) on the 134-slice chest volume rebuilt from fullscan/lung1 by
           linear z resampling (48 -> 134 slices; the label resampled linearly and thresholded at
           0.5), beside the fixed yardstick's inference alone (``--yardstick``: MONAI UNet
           16..256, sliding window 64x128x128, sw_batch 2, overlap 0.25, native grid, HU clipped
           to +-1000 / 1000);
training time comes from the model card.  Results: ``compare.json`` and ``compare.md`` in ``--out``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO / "LesionSeg")]

from bench_segment import run_sampled  # noqa: E402  (this folder: run as a script)
from LesionSegLib.engine import data  # noqa: E402
from LesionSegLib.engine.errors import ModelError  # noqa: E402
from LesionSegLib.engine.evaluate.report import evaluate  # noqa: E402
from LesionSegLib.engine.models import get_card  # noqa: E402

GATE_DIR = REPO / "LesionSeg" / "LesionSegLib" / "models" / "gates" / "sts-slab-gate"
RECIPE_DIR = REPO / "Resources" / "evaluation" / "models"  # the few-label experiment's models (not in the registry)
DEFAULT_MODELS = ("sts-clcs", f"sts-clcs+gate={GATE_DIR.relative_to(REPO)}", "sts-detseg", "sts-attention-unet",
                  str((RECIPE_DIR / "sts-supervised-8").relative_to(REPO)), str((RECIPE_DIR / "sts-unimatch-8").relative_to(REPO)))
CHEST = ("fullscan/lung1", "fullscan/lung2", "lidc/LIDC-IDRI-0001")
PARTS = ("val", "chest", "timing", "gate")
CONF = 0.5


def build_chest134(out_dir: Path) -> Path:
    """The 134-slice chest benchmark volume, rebuilt deterministically from fullscan/lung1."""
    import numpy as np
    import SimpleITK as sitk

    out_dir.mkdir(parents=True, exist_ok=True)
    img_path, lab_path = out_dir / "image.nii.gz", out_dir / "label.nii.gz"
    if img_path.exists() and lab_path.exists():
        return img_path
    src = data.data_root() / "fullscan" / "lung1"
    for name, path, interp, _pix in (("image", img_path, sitk.sitkLinear, sitk.sitkInt16), ("label", lab_path, sitk.sitkLinear, sitk.sitkFloat32)):
        im = sitk.ReadImage(str(src / f"{name}.nii.gz"), sitk.sitkFloat32)
        size = list(im.GetSize())
        sp = list(im.GetSpacing())
        new_sp = [sp[0], sp[1], sp[2] * (size[2] - 1) / 133]
        res = sitk.Resample(im, [size[0], size[1], 134], sitk.Transform(), interp, im.GetOrigin(), new_sp, im.GetDirection(), 0.0, sitk.sitkFloat32)
        if name == "label":
            res = sitk.Cast(sitk.BinaryThreshold(res, 0.5, 1e9, 1, 0), sitk.sitkUInt8)
        else:
            arr = np.rint(sitk.GetArrayFromImage(res)).astype(np.int16)
            out = sitk.GetImageFromArray(arr)
            out.CopyInformation(res)
            res = out
        sitk.WriteImage(res, str(path), True)
    return img_path


def run_timed(cmd: list[str]) -> tuple[int, float, float, str]:
    """(exit code, wall seconds, peak RSS MiB of its own process tree, stderr tail) of a fresh
    process (:func:`bench_segment.run_sampled`: not wait4's ru_maxrss, which carries this
    driver's peak over into the child)."""
    r = run_sampled(cmd, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path[:1] + [os.environ.get("PYTHONPATH", "")])})
    return r["rc"], r["wall_s"], r["peak_rss_mb"], "\n".join(r["stderr"])[-2000:]


def split_spec(spec: str) -> tuple[str, str | None]:
    """``MODEL`` or ``MODEL+gate=GATE_DIR`` (any model run behind a cascade gate)."""
    model, _, gate = spec.partition("+gate=")
    return model, (gate or None)


def segment_cmd(spec: str, images: list[Path], out: Path, threads: int | None, threshold: float | None = 0.0) -> list[str]:
    model, gate = split_spec(spec)
    cmd = [sys.executable, "-m", "LesionSegLib.engine.cli", "segment", *map(str, images), "-o", str(out), "--model", model, "--progress", "none"]
    cmd += ["--gate", gate] if gate else []
    if threshold is not None:
        cmd += ["--threshold", str(threshold)]
    return cmd + (["--threads", str(threads)] if threads else [])


def at_threshold(report: dict, conf: float = CONF) -> dict:
    """Lesions detected and FP/case among the clusters with confidence >= conf."""
    det = fp = 0
    for case in report["cases"]:
        for c in case["clusters"]:
            if c["confidence"] >= conf:
                det += c["role"] == "detection"
                fp += c["role"] == "fp"
    n = max(report["summary"]["n_cases"], 1)
    return {"detected": det, "lost": report["summary"]["n_gt_lesions"] - det, "fp_per_case": fp / n}


def scored(model: str, images: list[Path], gt_dir: Path, cases: list[str], out: Path, threads, reuse: bool = False) -> dict:
    todo = [im for im, c in zip(images, cases) if not (reuse and (out / f"{c}_lesions.csv").exists())]
    rc, wall, rss, tail = run_timed(segment_cmd(model, todo, out, threads)) if todo else (0, None, None, "")
    if rc != 0:
        return {"error": tail.strip().splitlines()[-1] if tail.strip() else f"exit {rc}"}
    rep = evaluate(out, gt_dir, cases=cases, dice_threshold=CONF)
    keys = ("n_cases", "n_gt_lesions", "dice_mean", "dice_global", "sensitivity_at_0.5fp", "cpm", "cluster_auc", "ece", "fp_per_case")
    return {**{k: rep["summary"][k] for k in keys}, f"at_confidence_{CONF}": at_threshold(rep), "dice_per_case": rep["dice"]["per_case"],
            "segment_wall_s": None if wall is None else round(wall, 1)}


def gate_skipping(spec: str, images: dict[str, Path]) -> dict:
    """Fraction of z-slabs the model's gate closes on each image (the gate alone, no segmenter)."""
    from LesionSegLib.engine.gate.model import load_gate
    from LesionSegLib.engine.gate.train import load_gate_case

    model, gate_dir = split_spec(spec)
    card = get_card(model)
    gate = load_gate(gate_dir, card)
    seg = card.part("segmenter")
    out = {}
    for name, img in images.items():
        case = data.Case(name, "", img, img.parent / "label.nii.gz")
        x, y = load_gate_case(case, seg["spacing_zyx"], seg["hu_windows"])
        sc = gate.scores(x)
        out[name] = {"slabs": len(sc), "open": int((sc >= gate.threshold).sum()), "skipped_fraction": round(float((sc < gate.threshold).mean()), 4)}
    return out


def training_minutes(card) -> dict:
    """Training minutes of each trained part, as the card records them."""
    tr = card.data.get("training", {})
    seg = tr.get("segmenter")
    out = {"segmenter": seg.get("minutes")} if isinstance(seg, dict) else {}
    for part in ("detector", "roi_segmenter"):  # DetSeg3D's two networks
        if isinstance(tr.get(part), dict) and tr[part].get("minutes") is not None:
            from LesionSegLib.engine.learn.detseg_card import stage_minutes

            out[part] = round(stage_minutes(tr[part]), 2)  # with the weights it continued from
            source = (tr[part].get("init") or {}).get("from_model")
            if source:  # started from another model's segmenter: its training counts too
                out[f"{part}_init_{source}"] = get_card(source).data.get("training", {}).get("segmenter", {}).get("minutes")
    for key, part in (("classifier_minutes", "classifier"), ("card_minutes", "card")):  # DetSeg3D: assembling its card
        if key in tr:
            out[part] = tr[key]
    if isinstance(tr.get("classifier_retraining"), dict):  # sts-clcs 1.2.0: its head retrained (learn.tumour_free)
        out["classifier_retraining"] = tr["classifier_retraining"].get("minutes")
    return out


def yardstick_worker(image: str, threads: int | None) -> dict:
    import numpy as np
    import SimpleITK as sitk
    import torch
    from monai.inferers import sliding_window_inference
    from monai.networks.nets import UNet

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    net = UNet(3, 1, 2, (16, 32, 64, 128, 256), (2, 2, 2, 2), num_res_units=2).eval()
    hu = sitk.GetArrayFromImage(sitk.ReadImage(image)).astype(np.float32)
    x = torch.from_numpy(np.clip(hu, -1000, 1000) / 1000.0)[None, None]
    t = time.perf_counter()
    with torch.inference_mode():
        sliding_window_inference(x, (64, 128, 128), 2, net, overlap=0.25)
    return {"inference_s": time.perf_counter() - t, "threads": torch.get_num_threads()}


def table(rep: dict) -> str:
    def f(v, d=3):
        return "–" if v is None else (f"{v:.{d}f}" if isinstance(v, float) else str(v))

    lines = ["| model | split | Dice | sens@0.5FP | CPM | cluster AUC | ECE | lost / FP per case @0.5 | chest134 segment s | peak RSS GiB | training min |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for m in rep["models"]:
        if "missing" in m:
            lines.append(f"| {m['model']} | – | not in the registry: {m['missing']} | | | | | | | | |")
            continue
        tm = m.get("timing", {})
        train = sum(v for v in m.get("training_minutes", {}).values() if v)
        if not m.get("val") and not m.get("chest"):
            lines.append(f"| {m['model']} | – | | | | | | | {f(tm.get('segment_wall_s'), 1)} | "
                         f"{f(tm.get('peak_rss_mb') and tm['peak_rss_mb'] / 1024, 2)} | {f(float(train), 1) if train else '–'} |")
        for split in ("val", "chest"):
            s = m.get(split)
            if not s:
                continue
            if "error" in s:
                lines.append(f"| {m['model']} | {split} | error: {s['error']} | | | | | | | | |")
                continue
            a = s[f"at_confidence_{CONF}"]
            lines.append(
                f"| {m['model']} | {split} ({s['n_cases']} cases) | {f(s['dice_mean'])} | {f(s['sensitivity_at_0.5fp'])} | {f(s['cpm'])} | "
                f"{f(s['cluster_auc'])} | {f(s['ece'])} | {a['lost']} / {a['fp_per_case']:.2f} | "
                f"{f(tm.get('segment_wall_s'), 1)} | {f(tm.get('peak_rss_mb') and tm['peak_rss_mb'] / 1024, 2)} | {f(float(train), 1) if train else '–'} |")
    y = rep.get("yardstick")
    if y:
        lines.append(f"\nYardstick (MONAI UNet 16..256, native grid, sliding window 64x128x128) inference alone on chest134: "
                     f"{y['inference_s']:.1f} s, peak RSS {y['peak_rss_mb'] / 1024:.2f} GiB.")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS))
    ap.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS)
    ap.add_argument("--yardstick", action="store_true", help="also time the fixed yardstick on chest134")
    ap.add_argument("--work", default=str(REPO / "runs" / "compare"), help="scratch folder for predictions (git-ignored)")
    ap.add_argument("--out", default=str(REPO / "Resources" / "evaluation"))
    ap.add_argument("--threads", type=int, default=None, help="torch threads of each segment process")
    ap.add_argument("--reuse", action="store_true", help="score existing predictions in --work instead of segmenting again")
    ap.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                    help="only combine compare.json files of earlier runs (e.g. one per model, run side by side) into --out")
    ap.add_argument("--yardstick-worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.yardstick_worker:
        print(json.dumps(yardstick_worker(args.yardstick_worker, args.threads)))
        return 0
    if args.merge:
        return merge(args.merge, Path(args.out), argv)

    work, out = Path(args.work), Path(args.out)
    root = data.data_root()
    val_imgs = [root / "sts" / c / "image.nii.gz" for c in data.STS_VAL]
    chest_gt = work / "gt_chest"
    chest_gt.mkdir(parents=True, exist_ok=True)
    chest_cases = []
    for c in CHEST:
        name = c.split("/")[1]
        (chest_gt / name).mkdir(exist_ok=True)
        link = chest_gt / name / "label.nii.gz"
        if not link.exists():
            link.symlink_to(root / c / "label.nii.gz")
        chest_cases.append(name)
    chest134 = build_chest134(work / "chest134")
    rep = {"created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
           "command": "python Testing/benchmarks/compare_models.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "load_average_at_start": list(os.getloadavg()), "threads": args.threads},
           "splits": {"val": data.STS_VAL, "chest": list(CHEST), "timing": "chest134 = fullscan/lung1 z-resampled to 134 slices"},
           "confidence_threshold": CONF, "models": []}
    prev = out / "compare.json"
    if prev.exists():  # parts not rerun keep their earlier figures
        old = {m["model"]: m for m in json.loads(prev.read_text(encoding="utf-8")).get("models", [])}
        rep["yardstick"] = json.loads(prev.read_text(encoding="utf-8")).get("yardstick")
    else:
        old = {}
    for model in args.models:
        base, gate = split_spec(model)
        try:
            card = get_card(base)
            gate_part = json.loads((Path(gate) / "gate.json").read_text(encoding="utf-8")) if gate else card.data.get("gate")
        except (ModelError, OSError) as exc:
            rep["models"].append({"model": model, "missing": str(exc).split(";")[0]})
            continue
        name = card.name + ("+gate" if gate else "")
        m = {k: v for k, v in old.get(name, {}).items() if k in PARTS}
        m.update({"model": name, "id": card.id, "description": card.data.get("description", ""), "spec": model,
                  "network": card.data.get("segmenter", {}).get("network", {}).get("type"), "training_minutes": training_minutes(card)})
        if gate_part:
            m["gate"] = {k: gate_part.get(k) for k in ("slab", "margin", "threshold", "calibration")}
            m["training_minutes"]["gate"] = gate_part.get("training", {}).get("minutes")
        safe = name.replace("/", "_").replace("+", "_")
        print(f"[compare] {card.id}", file=sys.stderr, flush=True)
        rep["models"].append(m)
        if "val" in args.parts:
            m["val"] = scored(model, val_imgs, root / "sts", data.STS_VAL, work / safe / "val", args.threads, args.reuse)
            write(rep, out)  # each part is saved as soon as it is done
        if "chest" in args.parts:
            m["chest"] = scored(model, [root / c / "image.nii.gz" for c in CHEST], chest_gt, chest_cases, work / safe / "chest", args.threads, args.reuse)
            write(rep, out)
        if "timing" in args.parts:
            rc, wall, rss, tail = run_timed(segment_cmd(model, [chest134], work / safe / "chest134", args.threads, None))
            m["timing"] = {"segment_wall_s": round(wall, 1), "peak_rss_mb": round(rss), **({"error": tail[-300:]} if rc else {})}
            write(rep, out)
        if "gate" in args.parts and gate_part:
            imgs = {**{c: root / "sts" / c / "image.nii.gz" for c in data.STS_VAL},
                    **{c.split("/")[1]: root / c / "image.nii.gz" for c in CHEST}, "chest134": chest134}
            m["gate"]["skipping"] = gate_skipping(model, imgs)
            write(rep, out)
        print(table({"models": [m]}), file=sys.stderr, flush=True)
    if args.yardstick:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--yardstick-worker", str(chest134)] + (["--threads", str(args.threads)] if args.threads else [])
        r = run_sampled(cmd, env=dict(os.environ))
        rep["yardstick"] = {**json.loads(r["stdout"][-1]), "peak_rss_mb": round(r["peak_rss_mb"])}
    rep["machine"]["load_average_at_end"] = list(os.getloadavg())
    return write(rep, out)


def write(rep: dict, out: Path) -> int:
    from LesionSegLib.engine.atomic import write_text

    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "compare.json", json.dumps(rep, indent=2) + "\n")
    runs = rep.get("runs", [rep])
    head = "\n".join(f"* `{r['command']}` ({r['machine']['platform']}, {os.cpu_count()} CPUs, {r['machine'].get('threads') or 'default'} torch threads, "
                     f"load average {r['machine']['load_average_at_start'][0]:.1f} at start)" for r in runs)
    md = f"Produced by:\n{head}\n\n" + table(rep) + "\n"
    write_text(out / "compare.md", md)
    print(md)
    return 0


def merge(paths, out: Path, argv) -> int:
    """One report from several runs (models in the order given; the last run of a model wins)."""
    reps = [json.loads(Path(p).read_text(encoding="utf-8")) for p in paths]
    models: dict[str, dict] = {}
    for r in reps:
        for m in r["models"]:  # parts measured in different runs are combined; a part measured twice: the later run
            models[m["model"]] = {**models.get(m["model"], {}), **m}
    runs = [{k: r[k] for k in ("command", "machine", "created")} for r in reps]
    merged = {"created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "merged_by": "python Testing/benchmarks/compare_models.py " + " ".join(argv or sys.argv[1:]),
              "runs": runs, "splits": reps[0]["splits"], "confidence_threshold": CONF, "models": list(models.values()),
              "yardstick": next((r["yardstick"] for r in reps if r.get("yardstick")), None)}
    return write(merged, out)


if __name__ == "__main__":
    sys.exit(main())

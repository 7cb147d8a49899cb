"""Choose DetSeg3D's inference settings (box re-fits, paste mode; flip TTA) on the TRAINING cases.

    python Testing/benchmarks/detseg_refit_choice.py --model PATH/TO/sts-detseg-1.1.0 \
        -o Resources/evaluation/detseg/refit_choice.json
    python Testing/benchmarks/detseg_refit_choice.py --table tta --model LesionSeg/LesionSegLib/models/sts-detseg \
        -o Resources/evaluation/detseg/tta_choice.json

Each setting is the model's card with its ``roi_segmenter`` keys replaced (``refits``,
``refit_tolerance``, ``refit_growth``, ``paste``, ``dedupe``: see ``engine/detseg/engine.py`` and
``engine/detseg/refine.py``).  Every setting runs the committed ``lesionseg segment`` (threshold 0)
and ``lesionseg evaluate`` on STS_001-033, the cases the networks were trained on; the
validation cases STS_034-041 are not touched here.  Settings run two at a time, one thread each.

``--table tta`` varies the flip test-time augmentation of either stage instead (``tta_flips`` of
``detector`` and ``roi_segmenter``: the outputs averaged over inputs flipped along those axes,
0-2 = z, y, x; both networks were trained with random flips along all three axes).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO / "LesionSeg")]

SETTINGS = {
    "one pass, whole RoIs pasted (1.1.0)": {},
    "re-fit (tol 1.5), whole RoIs": {"refits": 3, "refit_tolerance": 1.5},
    "re-fit (tol 1.2, growth 1.1), whole RoIs": {"refits": 3, "refit_tolerance": 1.2, "refit_growth": 1.1, "paste": "roi"},
    "re-fit (tol 1.2), lesion only": {"refits": 3, "refit_tolerance": 1.2, "paste": "lesion", "dedupe": False},
    "re-fit (tol 1.2, growth 1.1), lesion only": {"refits": 3, "refit_tolerance": 1.2, "refit_growth": 1.1, "paste": "lesion", "dedupe": False},
    "re-fit (tol 1.2, growth 1.1), lesion only, NMS": {"refits": 3, "refit_tolerance": 1.2, "refit_growth": 1.1, "paste": "lesion", "dedupe": True},
    "re-fit (tol 1.1, growth 1.2), lesion only": {"refits": 3, "refit_tolerance": 1.1, "refit_growth": 1.2, "paste": "lesion", "dedupe": False},
}

ALL_FLIPS = [[], [0], [1], [2], [0, 1], [0, 2], [1, 2], [0, 1, 2]]
TTA_SETTINGS = {
    "no TTA (1.2.0)": {},
    "detector: left-right flip": {"detector": {"tta_flips": [[], [2]]}},
    "detector: 8 flips": {"detector": {"tta_flips": ALL_FLIPS}},
    "RoI segmenter: left-right flip": {"roi_segmenter": {"tta_flips": [[], [2]]}},
    "RoI segmenter: 8 flips": {"roi_segmenter": {"tta_flips": ALL_FLIPS}},
    "both: 8 flips": {"detector": {"tta_flips": ALL_FLIPS}, "roi_segmenter": {"tta_flips": ALL_FLIPS}},
}
TABLES = {"refit": (SETTINGS, {"roi_segmenter": ("refits", "refit_tolerance", "refit_growth", "paste", "dedupe")}),
          "tta": (TTA_SETTINGS, {"detector": ("tta_flips",), "roi_segmenter": ("tta_flips",)})}


def run_setting(name, keys, model, work, images, gt, cases, table="refit"):
    from LesionSegLib.engine.evaluate.report import evaluate

    folder = work / f"model-{abs(hash(name))}"
    shutil.copytree(model, folder)
    card = json.loads((folder / "card.json").read_text())
    reset = TABLES[table][1]
    sections = {"roi_segmenter": keys} if table == "refit" else keys  # refit: the roi_segmenter keys themselves
    for part, names in reset.items():
        for k in names:
            card[part].pop(k, None)
        card[part].update(sections.get(part, {}))
    (folder / "card.json").write_text(json.dumps(card, indent=1))
    out = work / f"pred-{abs(hash(name))}"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "LesionSeg")}
    subprocess.run([sys.executable, "-m", "LesionSegLib.engine.cli", "segment", *images, "-o", str(out), "--model", str(folder),
                    "--device", "cpu", "--progress", "none", "--threshold", "0", "--threads", "1"],
                   check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rep = evaluate(out, gt, cases=cases, dice_threshold=0.5)
    s = rep["summary"]
    return {"setting": name, ("roi_segmenter_keys" if table == "refit" else "card_keys"): keys,
            **{k: (round(float(s[k]), 4) if s.get(k) is not None else None)
               for k in ("dice_mean", "sensitivity_at_0.5fp", "cpm", "cluster_auc", "ece", "fp_per_case")}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="the detseg model folder whose settings are varied")
    ap.add_argument("-o", "--output", required=True)
    ap.add_argument("--only", nargs="*", default=None, help="setting names (default: all)")
    ap.add_argument("--table", default="refit", choices=sorted(TABLES), help="which settings: re-fits (default) or flip TTA")
    args = ap.parse_args(argv)
    from LesionSegLib.engine import data
    from LesionSegLib.engine.atomic import write_text

    cases = data.STS_TRAIN
    images = [str(data.case(c).image) for c in cases]
    gt = Path(data.case(cases[0]).label).parent.parent
    settings = TABLES[args.table][0]
    names = args.only or list(settings)
    work = Path(tempfile.mkdtemp(prefix="refit_choice-"))
    with ThreadPoolExecutor(2) as pool:
        rows = list(pool.map(lambda n: run_setting(n, settings[n], Path(args.model), work, images, gt, cases, args.table), names))
    for r in rows:
        print(json.dumps(r), flush=True)
    out = {"command": "python Testing/benchmarks/detseg_refit_choice.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "model": str(args.model), "split": "training STS_001-033 (the validation cases are not used)",
           "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores", "settings": rows}
    write_text(args.output, json.dumps(out, indent=1) + "\n")
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``lesionseg train-detseg -o MODEL_DIR``: train both DetSeg3D stages and write the model card.

Runs :mod:`..learn.train_detseg` for the detector and the RoI segmenter (one after the other,
or side by side as two processes with ``--parallel``), then :mod:`..learn.detseg_card`
(detector-score temperature and the confidence source chosen on the training cases; both
sources scored on STS_034-041, which choose nothing; metrics and sha256 in the card).  The
card step does not fit the OOD statistics or export the runtimes: run ``lesionseg fit-ood`` and
``lesionseg models export --write-card`` after it.  Long-running: run it with ``nohup``.

Its defaults are the recipe of the shipped sts-detseg's stages, made for 1.4.0 (:data:`SHIPPED_RECIPE`;
1.4.1 ships those stages with the classifier rebuilt, ``detseg_card --from-model``): both stages
from scratch, side by side for 52 min with one thread each, the classifier head retrained on the
model's own clusters, and the card's inference settings below.  ``--no-parallel``,
``--no-classifier-own``, ``--roi-inference '{}'`` and the like turn parts of it off.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from .common import output_problem


#: the settings that made sts-detseg 1.4.0, whose stages 1.4.1 ships (README, "DetSeg3D"); the command's defaults
SHIPPED_RECIPE = {
    "minutes": 52.0, "parallel": True, "threads": 1, "classifier_own": True,
    # stage 2: re-fit a box up to 3 times while its lesion touches the edge (1.2x tolerance,
    # 1.1x growth), paste the box's lesion only, keep overlapping boxes' lesions apart
    "roi_inference": {"refits": 3, "refit_tolerance": 1.2, "refit_growth": 1.1, "paste": "lesion", "dedupe": False},
    # stage 1: the detector's heatmap averaged over the 8 axis flips
    "detector_inference": {"tta_flips": [[], [0], [1], [2], [0, 1], [0, 2], [1, 2], [0, 1, 2]]},
}


def record_wall_clock(folder: Path, minutes: float, parallel: bool, threads: int) -> None:
    """Write the command's wall time into the card it made (``training.wall_clock``)."""
    from ..models import read_card

    card = read_card(folder)
    card.data.setdefault("training", {})["wall_clock"] = {
        "minutes": round(minutes, 2), "stages": "side by side" if parallel else "one after the other",
        "threads_per_stage": threads, "covers": "lesionseg train-detseg, from its start to the written card "
                                                "(not lesionseg fit-ood or models export, which follow it)"}
    card.save()


def weights_problem(path: str) -> str | None:
    """Why ``path`` is not a readable safetensors file (None when it is): checked before any stage starts."""
    p = Path(path)
    if not p.is_file():
        return "file not found" if not p.exists() else "not a file"
    try:
        from safetensors import safe_open

        with safe_open(str(p), framework="pt") as fh:
            if not list(fh.keys()):
                return "holds no tensors"
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types for any malformed header
        return f"not a readable safetensors file ({' '.join(str(exc).split())[:200]})"
    return None


def cmd_train_detseg(args) -> int:
    from ..learn.jobs import python_executable

    t0 = time.monotonic()
    for flag, text in (("--roi-inference", args.roi_inference), ("--detector-inference", args.detector_inference)):
        try:  # checked now, not after an hour of training
            if not isinstance(json.loads(text), dict):
                raise ValueError("not a JSON object")
        except ValueError as exc:
            print(f"error: {flag} must be a JSON object of inference keys, e.g. '{{}}': {exc}", file=sys.stderr)
            return 2
    if args.detector_init:
        problem = weights_problem(args.detector_init)
        if problem:
            print(f"error: --detector-init {args.detector_init}: {problem}", file=sys.stderr)
            return 2
    run = Path(args.run or (Path(args.output).parent / (Path(args.output).name + "-run")))
    for folder in (args.output, run):
        problem = output_problem(folder)  # now, not after an hour of training
        if problem:
            print(f"error: {problem}", file=sys.stderr)
            return 2
    base = [python_executable(), "-u", "-m"]
    stage = lambda s, m: base + ["LesionSegLib.engine.learn.train_detseg", "--stage", s, "-o", str(run),  # noqa: E731
                                 "--minutes", str(m), "--threads", str(args.threads)]
    jobs = [stage("detector", args.detector_minutes) + (["--init", args.detector_init] if args.detector_init else [])
            + (["--lr", str(args.detector_lr)] if args.detector_lr else []),
            stage("roi", args.roi_minutes) + (["--init-from", args.roi_init_from] if args.roi_init_from else [])
            + (["--lr", str(args.roi_lr)] if args.roi_lr else [])]
    if args.parallel:
        procs = [subprocess.Popen(j) for j in jobs]
        codes = [p.wait() for p in procs]
    else:
        codes = [subprocess.call(j) for j in jobs]
    if any(codes):
        print(f"error: stage training failed (exit codes {codes})", file=sys.stderr)
        return 1
    code = subprocess.call(base + ["LesionSegLib.engine.learn.detseg_card", "--run", str(run), "-o", args.output,
                                   "--name", args.name, "--version", args.version, "--threads", str(args.threads)]
                           + (["--classifier-own"] if args.classifier_own else [])
                           + ["--roi-inference", args.roi_inference, "--detector-inference", args.detector_inference])
    if code == 0:
        record_wall_clock(Path(args.output), (time.monotonic() - t0) / 60.0, args.parallel, args.threads)
    return code


def register(sub) -> None:
    sp = sub.add_parser("train-detseg", help="train a DetSeg3D model (detector + RoI segmenter) on STS_001-033 (long-running)")
    sp.add_argument("-o", "--output", required=True, help="model folder to write (card.json + weights)")
    sp.add_argument("--name", default="sts-detseg")
    sp.add_argument("--run", default=None, help="folder for the stage weights and logs (default: OUTPUT-run)")
    r = SHIPPED_RECIPE
    sp.add_argument("--detector-minutes", type=float, default=r["minutes"])
    sp.add_argument("--roi-minutes", type=float, default=r["minutes"])
    sp.add_argument("--parallel", action=argparse.BooleanOptionalAction, default=r["parallel"],
                    help="train the two stages side by side (two processes; default) or one after the other")
    sp.add_argument("--threads", type=int, default=r["threads"], help="threads per stage")
    sp.add_argument("--version", default="1.0.0")
    sp.add_argument("--detector-init", default=None, metavar="FILE", help="continue the detector from these weights")
    sp.add_argument("--roi-init-from", default=None, metavar="MODEL", help="start the RoI segmenter from a CLCS model's segmenter")
    sp.add_argument("--detector-lr", type=float, default=None, help="default: the stage's (4e-3)")
    sp.add_argument("--roi-lr", type=float, default=None, help="default: the stage's (2e-3)")
    sp.add_argument("--classifier-own", action=argparse.BooleanOptionalAction, default=r["classifier_own"],
                    help="retrain the classifier head on the model's own training clusters (default), or keep the base's")
    sp.add_argument("--roi-inference", default=json.dumps(r["roi_inference"]), metavar="JSON",
                    help="stage-2 inference keys for the card (box re-fits, paste, flip TTA); '{}' for the card's plain defaults")
    sp.add_argument("--detector-inference", default=json.dumps(r["detector_inference"]), metavar="JSON",
                    help="stage-1 inference keys for the card (flip TTA); '{}' for one plain pass")
    sp.set_defaults(func=cmd_train_detseg)

"""``lesionseg train-detseg -o MODEL_DIR``: train both DetSeg3D stages and write the model card.

Runs :mod:`..learn.train_detseg` for the detector and the RoI segmenter (one after the other,
or side by side as two processes with ``--parallel``), then :mod:`..learn.detseg_card`
(detector-score temperature and the confidence source chosen on the training cases; both
sources scored on STS_034-041, which choose nothing; metrics and sha256 in the card).  The
card step does not fit the OOD statistics or export the runtimes: run ``lesionseg fit-ood`` and
``lesionseg models export --write-card`` after it.  Long-running: run it with ``nohup``.
"""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path


def record_wall_clock(folder: Path, minutes: float, parallel: bool, threads: int) -> None:
    """Write the command's wall time into the card it made (``training.wall_clock``)."""
    from ..models import read_card

    card = read_card(folder)
    card.data.setdefault("training", {})["wall_clock"] = {
        "minutes": round(minutes, 2), "stages": "side by side" if parallel else "one after the other",
        "threads_per_stage": threads, "covers": "lesionseg train-detseg, from its start to the written card "
                                                "(not lesionseg fit-ood or models export, which follow it)"}
    card.save()


def cmd_train_detseg(args) -> int:
    from ..learn.jobs import python_executable

    t0 = time.monotonic()
    run = Path(args.run or (Path(args.output).parent / (Path(args.output).name + "-run")))
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
                           + (["--roi-inference", args.roi_inference] if args.roi_inference else [])
                           + (["--detector-inference", args.detector_inference] if args.detector_inference else []))
    if code == 0:
        record_wall_clock(Path(args.output), (time.monotonic() - t0) / 60.0, args.parallel, args.threads)
    return code


def register(sub) -> None:
    sp = sub.add_parser("train-detseg", help="train a DetSeg3D model (detector + RoI segmenter) on STS_001-033 (long-running)")
    sp.add_argument("-o", "--output", required=True, help="model folder to write (card.json + weights)")
    sp.add_argument("--name", default="sts-detseg")
    sp.add_argument("--run", default=None, help="folder for the stage weights and logs (default: OUTPUT-run)")
    sp.add_argument("--detector-minutes", type=float, default=30.0)
    sp.add_argument("--roi-minutes", type=float, default=34.0)
    sp.add_argument("--parallel", action="store_true", help="train the two stages side by side (two processes)")
    sp.add_argument("--threads", type=int, default=1)
    sp.add_argument("--version", default="1.0.0")
    sp.add_argument("--detector-init", default=None, metavar="FILE", help="continue the detector from these weights")
    sp.add_argument("--roi-init-from", default=None, metavar="MODEL", help="start the RoI segmenter from a CLCS model's segmenter")
    sp.add_argument("--detector-lr", type=float, default=None, help="default: the stage's (4e-3)")
    sp.add_argument("--roi-lr", type=float, default=None, help="default: the stage's (2e-3)")
    sp.add_argument("--classifier-own", action="store_true", help="retrain the classifier head on the model's own training clusters")
    sp.add_argument("--roi-inference", default=None, metavar="JSON", help="stage-2 inference keys for the card (box re-fits, paste, flip TTA)")
    sp.add_argument("--detector-inference", default=None, metavar="JSON", help="stage-1 inference keys for the card (flip TTA)")
    sp.set_defaults(func=cmd_train_detseg)

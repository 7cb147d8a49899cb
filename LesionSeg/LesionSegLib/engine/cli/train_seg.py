"""``lesionseg train-seg``: train a new segmenter from a folder of images + labels (long-running)."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from ..errors import LesionSegError
from ..learn.jobs import SegmenterTrainingJob, check_register_name, register_segmenter
from .common import output_problem


def _cmd_train_seg(args) -> int:
    extra = list(args.extra or [])
    if args.unlabeled:  # UniMatch semi-supervised training (learn/unimatch.py)
        extra += ["--unlabeled", args.unlabeled]
    if args.recipe:
        extra += ["--recipe", args.recipe]
    job = SegmenterTrainingJob(args.images, args.output, minutes=args.minutes, max_steps=args.max_steps,
                               val=args.val, extra=[*extra, *(["--nproc", str(args.nproc)] if args.nproc > 1 else [])])
    made_output = not Path(args.output).exists()
    try:
        problem = output_problem(args.output)  # now, not after the training budget
        if problem:
            raise LesionSegError(problem)
        if args.register is not None:  # name, version and collisions now, not after the training
            check_register_name(args.register, args.base_model)
        job.check_inputs()
    except LesionSegError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    job.start()
    bar = None
    if args.progress == "bar":
        from tqdm import tqdm

        bar = tqdm(total=100, desc="train-seg", unit="%", file=sys.stderr, bar_format="{desc}: {percentage:3.0f}%|{bar}| {postfix}")
    last = None
    try:
        while job.poll() is None:
            time.sleep(0.5)
            for line in job.new_lines():
                if args.progress == "json":
                    print(json.dumps({"event": "log", "line": line}), flush=True)
                elif bar is None:
                    print(line, flush=True)
            if (job.fraction, job.status) != last:
                last = (job.fraction, job.status)
                if args.progress == "json":
                    print(json.dumps({"event": "progress", "fraction": round(job.fraction, 4), "stage": job.status}), flush=True)
                elif bar is not None:
                    bar.n = int(round(job.fraction * 100))
                    bar.set_postfix_str(job.status[:60], refresh=False)
                    bar.refresh()
    except KeyboardInterrupt:
        job.cancel()
        print("cancelled", file=sys.stderr)
        return 130
    finally:
        if bar is not None:
            bar.close()
    for line in job.new_lines():
        print(line, flush=True)
    if job.returncode != 0:
        print(f"error: segmenter training failed (exit {job.returncode}): {job.error_text()}", file=sys.stderr)
        if made_output:  # a run refused at its start (e.g. a bad option after --) leaves no empty folder behind
            try:
                Path(args.output).rmdir()
            except OSError:  # not empty: what the run wrote stays
                pass
        return 1
    print(f"segmenter written to {args.output}")
    if args.register:
        card = register_segmenter(args.output, args.base_model, args.register)
        print(f"registered {card.id} ({card.folder}); its classifier is the parent's: retrain it with "
              f"`lesionseg retrain --base-model {card.id} --include-gt {args.images}`")
    return 0



def register(subparsers) -> None:
    q = subparsers.add_parser("train-seg", help="train a new segmenter from a folder of images + labels (long-running)")
    q.add_argument("--images", required=True, metavar="DIR", help="folder of <case>/image.nii.gz + <case>/label.nii.gz")
    q.add_argument("-o", "--output", required=True, help="output folder (segmenter.safetensors + segmenter.json)")
    q.add_argument("--minutes", type=float, default=45.0, help="wall-clock training budget")
    q.add_argument("--max-steps", type=int, default=0)
    q.add_argument("--val", nargs="*", default=None, help="case folders used for validation Dice only")
    q.add_argument("--register", metavar="NAME", default=None,
                   help="register the result as a new model version NAME[@VERSION] (classifier copied from --base-model)")
    q.add_argument("--base-model", default=None)
    q.add_argument("--unlabeled", metavar="DIR", default=None,
                   help="also train on the images of DIR without their labels (UniMatch semi-supervised; any architecture)")
    q.add_argument("--recipe", default=None, help="training recipe: clcs (default) or attention-unet")
    q.add_argument("--progress", choices=["bar", "json", "log"], default="log")
    q.add_argument("--nproc", type=int, default=1, help="data-parallel training processes on this machine (torchrun: gloo on CPU, "
                   "nccl on GPU); for several nodes run the trainer module under torchrun yourself (README)")
    q.add_argument("extra", nargs="*", help="further train_seg arguments after --, e.g. -- --loss dicefocal")
    q.set_defaults(func=_cmd_train_seg)

"""``lesionseg click IMAGE --point X,Y,Z [--point ...] -o OUTDIR``: segment the lesion under each point.

Points are LPS millimetres (the DICOM / ITK convention; Slicer's RAS is (-X, -Y, Z)).  Writes
``<stem>_click.nii.gz`` (label k = point k, on the input grid) and ``<stem>_click.csv`` (the
columns of ``segment``; ``lesion_id`` is the point's number).  Any model answers clicks
(:mod:`..click`); the default, ``sts-clcs``, gave the best click Dice on training-case clicks
(``Resources/evaluation/click_train_*.json``).  Where a dense model finds no lesion at a point,
``--fallback-model`` (default sts-detseg) answers it.  A bad point (outside the volume, on air) writes nothing.
"""
from __future__ import annotations

import sys
from pathlib import Path

from ..errors import InputError, LesionSegError
from .common import error_line, one_line, output_problem, positive_int

DEFAULT_CLICK_MODEL = "sts-clcs"  # best click Dice on training-case clicks (see the module)


def parse_point(text: str) -> tuple[float, float, float]:
    parts = text.replace(" ", "").split(",")
    try:
        values = tuple(float(v) for v in parts)
    except ValueError:
        values = ()
    if len(values) != 3:
        raise LesionSegError(f"--point {text!r} is not X,Y,Z (three numbers in mm LPS)")
    return values


def fallback_engine(engine, args):
    """A function that loads ``--fallback-model`` (default: :func:`..click.default_fallback`), or None."""
    from ..click import default_fallback
    from ..segment.pipeline import Engine

    name = args.fallback_model or default_fallback(engine) or "none"
    if name.lower() == "none":
        return None
    return lambda: Engine(name, args.device, threads=args.threads)


def cmd_click(args) -> int:
    from ..atomic import AtomicWriter
    from ..click import click
    from ..io.images import name_length_problem, output_stem, read_image
    from ..segment.pipeline import Engine

    writer = None
    problem = output_problem(args.output)  # before the model loads
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    try:
        points = [parse_point(p) for p in args.point]
        engine = Engine(args.model or DEFAULT_CLICK_MODEL, args.device, threads=args.threads)
    except LesionSegError as exc:  # a bad point or model: exit code 2, as segment's setup errors
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return 2
    try:
        stem = output_stem(args.image)
        if why := name_length_problem(stem):  # before the scan is read, not at the write
            raise InputError(f"{why}: its output names would pass the file system's limit; rename the input")
        image = read_image(args.image)
        res = click(engine, image, points, source=str(args.image), fallback=fallback_engine(engine, args))
        writer = AtomicWriter(args.output)
        names = [f"{stem}_click.nii.gz", f"{stem}_click.csv"]
        res.write_labelmap(writer.path(names[0]))
        res.write_csv(writer.path(names[1]))
        writer.commit()
    except (LesionSegError, ValueError, OSError, MemoryError) as exc:
        if writer is not None:
            writer.abort()
        print(f"error: {error_line(exc, args.image)}", file=sys.stderr)
        return 1  # the input or a point on it: exit code 1, as a failed input of segment
    for m in res.messages:  # the scan's OOD warning, which model answered, points on one lesion
        print(f"note: {m}", file=sys.stderr)
    for les in res.lesions:
        print(f"point {les.lesion_id}: {les.volume_ml:.2f} ml, diameter {les.diameter_mm:.1f} mm, confidence {les.confidence:.2f}", file=sys.stderr)
    print(f"{len(res.lesions)} lesion(s) -> {Path(args.output) / stem}_click.*  [{res.timings['click']:.2f}s on {res.device}]", file=sys.stderr)
    return 0


def register(sub) -> None:
    sp = sub.add_parser("click", help="segment the lesion under each point (LPS mm)")
    sp.add_argument("image", metavar="IMAGE")
    sp.add_argument("--point", action="append", required=True, metavar="X,Y,Z", help="a point in LPS mm (repeatable); write --point=X,Y,Z when X is negative")
    sp.add_argument("-o", "--output", required=True, metavar="OUTDIR")
    sp.add_argument("--model", default=None, help=f"the model (default: {DEFAULT_CLICK_MODEL}, the best on training-case clicks)")
    sp.add_argument("--fallback-model", default=None, metavar="NAME",
                    help="the model that answers a point where --model finds no lesion (default: sts-detseg for a "
                         "dense model, none for a detseg one; 'none' turns it off)")
    sp.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    sp.add_argument("--threads", type=positive_int, default=None, help="CPU threads for torch")
    sp.set_defaults(func=cmd_click)

"""``lesionseg segment INPUT... -o OUTDIR``: segment CT volumes and write their lesions."""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np

from ..errors import InputError, LesionSegError
from ..io.images import expand_inputs, name_length_problem, output_stem
from .common import Progress, emit, error_line, one_line, output_problem, positive_int, unit_interval


def save_features(result, path: str, case_hash: str) -> None:
    from ..segment.features import FEATURE_NAMES, feature_matrix

    lesions = result.lesions
    patches = np.stack([les.patch for les in lesions]) if lesions else np.zeros((0, 3, 32, 32, 32), np.float16)
    np.savez_compressed(
        path,
        lesion_ids=np.array([les.lesion_id for les in lesions], dtype=np.int32),
        features=feature_matrix([les.features for les in lesions]),
        feature_names=np.array(FEATURE_NAMES),
        patches=patches.astype(np.float16),
        confidence=np.array([les.confidence for les in lesions], dtype=np.float32),
        case_hash=np.array(case_hash),
        model_id=np.array(result.model_id),
    )


def unique_inputs(inputs: list[Path]) -> tuple[list[Path], str | None]:
    """Inputs with exact repeats dropped, and an error text when two different inputs would
    write the same output files (same case name, compared as a case-insensitive file system
    would): they are refused rather than one silently overwriting the other."""
    seen: dict[str, Path] = {}
    out: list[Path] = []
    by_stem: dict[str, Path] = {}
    for path in inputs:
        key = os.path.normcase(os.path.abspath(path))
        if key in seen:
            continue
        seen[key] = path
        stem = output_stem(path)
        other = by_stem.get(stem.casefold())
        if other is not None:
            return out, (f"inputs {other} and {path} would both write {stem}_lesions.* (same case name); "
                         "rename one or segment them into different output folders")
        by_stem[stem.casefold()] = path
        out.append(path)
    return out, None


def write_case(engine, path, outdir, stem=None, threshold=None, progress=None, save_feats=False, extra=None,
               dicom_seg=False):
    """Read, segment and write one input into ``outdir``: all its files appear together, or none
    (:class:`~..atomic.AtomicWriter`).  ``extra(writer, result, names, timings)`` may add files
    (their names are returned and they are committed last: ``batch`` writes its done-marker so).
    ``dicom_seg``: also ``<stem>_lesions.dcm``, a DICOM SEG on the source series of a DICOM input
    (:mod:`..io.dicom_seg`; a note instead when the input is not DICOM or has no lesion).
    Returns ``(result, output names, stage timings)``; raises on a bad input, writing nothing."""
    from ..atomic import AtomicWriter
    from ..io.images import read_image, read_note

    stem = stem or output_stem(path)
    if why := name_length_problem(stem):  # before the scan is read and segmented, not at the write
        raise InputError(f"{why}: its output names would pass the file system's limit; rename the input")
    writer = AtomicWriter(outdir)
    try:
        t = time.perf_counter()
        if progress is not None:
            progress(0.0, "read")
        image = read_image(path, validate=False)  # Engine.segment validates it, once
        read_s = time.perf_counter() - t
        kw = {"progress": progress} if progress is not None else {}
        if save_feats:
            kw["keep_patches"] = True
        res = engine.segment(image, threshold=threshold, source=str(path), **kw)
        if (note := read_note(image)) is not None:  # e.g. several DICOM series in the folder: which one ran
            res.messages.append(note)
        t = time.perf_counter()
        if progress is not None:
            progress(1.0, "write")
        names = res.write_outputs(writer, stem)
        if save_feats:
            from ..segment.pipeline import case_hash

            names.append(f"{stem}_features.npz")
            save_features(res, writer.path(names[3]), case_hash(image))
        if dicom_seg:
            names += _write_dicom_seg(writer, image, path, res, stem)
        timings = {"read": read_s, **res.timings, "write": time.perf_counter() - t}
        if extra is not None:
            names += extra(writer, res, names, timings)
        writer.commit()
    except BaseException:
        writer.abort()
        raise
    return res, names, timings


def _write_dicom_seg(writer, image, path, res, stem) -> list[str]:
    """``<stem>_lesions.dcm`` when the input is a DICOM series with lesions; else a note, no file."""
    from ..io import dicom_seg

    seg = dicom_seg.from_result(image, path, res)
    if seg is None:
        why = "no lesion to hold" if dicom_seg.source_files(image, path) else "the input is not a DICOM series"
        res.messages.append(f"{path}: no DICOM SEG written ({why})")
        return []
    name = f"{stem}_lesions.dcm"
    dicom_seg.save(seg, writer.path(name))
    return [name]


def _json_ood(ood: dict | None) -> dict | None:
    """A result's scan-level OOD record as JSON types (None without OOD statistics)."""
    if not ood:
        return None
    return {"scan_score": float(ood["scan_score"]), "warning": ood.get("warning") or "", "domain": ood.get("domain")}


def cmd_segment(args) -> int:
    names = list(args.inputs)
    if args.sample:
        from ..data import SAMPLE_IMAGE

        if not SAMPLE_IMAGE.exists():
            print(f"error: the bundled sample {SAMPLE_IMAGE} is missing from this installation", file=sys.stderr)
            return 2
        names.append(str(SAMPLE_IMAGE))
    inputs, clash = unique_inputs(expand_inputs(names))
    if not inputs:
        print("error: no input images (give INPUT paths or --sample)", file=sys.stderr)
        return 2
    if clash:
        emit(args, {"event": "error", "input": None, "message": clash})
        print(f"error: {clash}", file=sys.stderr)
        return 2
    if args.model is None:
        from ..learn.versions import active_state_problem

        if (note := active_state_problem()) is not None:
            print(f"note: {note}", file=sys.stderr)
    problem = output_problem(args.output)  # before the model loads: a bad -o is no input's fault
    if problem:
        emit(args, {"event": "error", "input": None, "message": problem})
        print(f"error: {problem}", file=sys.stderr)
        return 2
    from ..segment.pipeline import load_engine

    try:
        engine = load_engine(args.model, args.device, threads=args.threads, runtime=args.runtime, gate=args.gate)
    except LesionSegError as exc:
        emit(args, {"event": "error", "input": None, "message": one_line(exc)})
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return 2
    failed = 0
    totals: dict[str, float] = {}
    noted: set[str] = set()
    for path in inputs:
        prog = Progress(args.progress, str(path))
        t0 = time.perf_counter()
        try:
            res, names, timings = write_case(engine, path, args.output, threshold=args.threshold, progress=prog,
                                             save_feats=args.save_features, dicom_seg=args.dicom_seg)
        except (LesionSegError, ValueError, RuntimeError, OSError, MemoryError) as exc:
            prog.close()
            failed += 1
            msg = error_line(exc, path)
            print(f"error: {msg}", file=sys.stderr)
            emit(args, {"event": "error", "input": str(path), "message": msg})
            continue
        prog.close()
        for k, v in timings.items():
            totals[k] = totals.get(k, 0.0) + v
        outputs = [str(Path(args.output) / n) for n in names]
        emit(args, {"event": "done", "input": str(path), "outputs": outputs, "lesions": len(res.lesions), "timings": timings,
                    "device": res.device, "runtime": engine.runtime,
                    "ood": _json_ood(res.ood)})  # the scan's OOD score and warning (the Slicer panel shows it)
        stage_txt = "  ".join(f"{k} {v:.2f}s" for k, v in timings.items())
        print(f"{path}: {len(res.lesions)} lesion(s) -> {Path(args.output) / output_stem(path)}_lesions.*  "
              f"[{stage_txt}; total {time.perf_counter() - t0:.2f}s on {res.device}, {engine.runtime}]", file=sys.stderr)
        for m in res.messages:  # the engine's notes (CPU fallback, out-of-memory retry) once; the scan's own each time
            if m in noted:
                continue
            if m in engine.messages:
                noted.add(m)
            print(f"note: {m}", file=sys.stderr)
    if len(inputs) > 1 and totals:
        print("time per stage (all inputs): " + "  ".join(f"{k} {v:.2f}s" for k, v in totals.items()), file=sys.stderr)
    if failed and len(inputs) > 1:
        print(f"{failed} of {len(inputs)} input(s) failed", file=sys.stderr)
    return 1 if failed else 0


def register(sub) -> None:
    sp = sub.add_parser("segment", help="segment CT volumes (files, folders, DICOM series folders)")
    sp.add_argument("inputs", nargs="*", metavar="INPUT")
    sp.add_argument("--sample", action="store_true",
                    help="also segment the bundled sample CT (STS_041, a CC BY 3.0 sarcoma case; see LesionSegLib/sample)")
    sp.add_argument("-o", "--output", required=True, metavar="OUTDIR")
    sp.add_argument("--model", default=None, help="model name, name@version or folder (default: the active model)")
    sp.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    sp.add_argument("--threshold", type=unit_interval, default=None,
                    help="keep lesions with confidence >= T (default: the model's, 0.5; 0 keeps every candidate)")
    sp.add_argument("--progress", default="bar", choices=["bar", "json", "none"])
    sp.add_argument("--save-features", action="store_true", help="also write <stem>_features.npz (classifier inputs, for review/retraining)")
    sp.add_argument("--dicom-seg", action="store_true",
                    help="also write <stem>_lesions.dcm, a DICOM SEG referencing the source series, for a DICOM series input")
    sp.add_argument(
        "--runtime",
        default=None,
        choices=["auto", "openvino", "onnxruntime", "torch"],
        help="network runtime (default: $LESIONSEG_RUNTIME or auto = OpenVINO, else ONNX Runtime, else PyTorch; PyTorch on CUDA)",
    )
    sp.add_argument("--threads", type=positive_int, default=None, help="CPU threads for the whole command (network runtime and ITK filters)")
    sp.add_argument("--gate", default=None, metavar="DIR|off",
                    help="cascade gate: a gate folder from `lesionseg train-gate`, or 'off' (default: the model card's gate, if any)")
    sp.set_defaults(func=cmd_segment)

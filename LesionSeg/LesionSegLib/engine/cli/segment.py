"""``lesionseg segment INPUT... -o OUTDIR``: segment CT volumes and write their lesions."""
from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

from ..errors import LesionSegError
from ..io.images import expand_inputs, output_stem
from .common import Progress, emit


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


def cmd_segment(args) -> int:
    from ..atomic import AtomicWriter
    from ..io.images import read_image
    from ..segment.pipeline import Engine, case_hash

    inputs = expand_inputs(args.inputs)
    if not inputs:
        print("error: no input images", file=sys.stderr)
        return 2
    try:
        engine = Engine(args.model, args.device, threads=args.threads, gate=args.gate)
    except LesionSegError as exc:
        emit(args, {"event": "error", "input": None, "message": str(exc)})
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for msg in engine.messages:
        print(f"note: {msg}", file=sys.stderr)
    failed = 0
    totals: dict[str, float] = {}
    for path in inputs:
        stem = output_stem(path)
        prog = Progress(args.progress, str(path))
        t0 = time.perf_counter()
        writer = AtomicWriter(args.output)
        try:
            t = time.perf_counter()
            image = read_image(path)
            read_s = time.perf_counter() - t
            res = engine.segment(image, threshold=args.threshold, progress=prog, keep_patches=args.save_features, source=str(path))
            t = time.perf_counter()
            names = res.write_outputs(writer, stem)
            if args.save_features:
                names.append(f"{stem}_features.npz")
                save_features(res, writer.path(names[3]), case_hash(image))
            writer.commit()
            timings = {"read": read_s, **res.timings, "write": time.perf_counter() - t}
        except (LesionSegError, ValueError, RuntimeError, OSError, MemoryError) as exc:
            writer.abort()
            prog.close()
            failed += 1
            msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            if str(path) not in msg:
                msg = f"{path}: {msg}"
            print(f"error: {msg}", file=sys.stderr)
            emit(args, {"event": "error", "input": str(path), "message": msg})
            continue
        prog.close()
        for k, v in timings.items():
            totals[k] = totals.get(k, 0.0) + v
        outputs = [str(Path(args.output) / n) for n in names]
        emit(args, {"event": "done", "input": str(path), "outputs": outputs, "lesions": len(res.lesions), "timings": timings, "device": res.device})
        stage_txt = "  ".join(f"{k} {v:.2f}s" for k, v in timings.items())
        print(f"{path}: {len(res.lesions)} lesion(s) -> {Path(args.output) / stem}_lesions.*  [{stage_txt}; total {time.perf_counter() - t0:.2f}s on {res.device}]", file=sys.stderr)
        for m in res.messages:
            if m not in engine.messages:
                print(f"note: {m}", file=sys.stderr)
    if len(inputs) > 1 and totals:
        print("time per stage (all inputs): " + "  ".join(f"{k} {v:.2f}s" for k, v in totals.items()), file=sys.stderr)
    if failed:
        print(f"{failed} of {len(inputs)} input(s) failed", file=sys.stderr)
    return 1 if failed else 0



def register(sub) -> None:
    sp = sub.add_parser("segment", help="segment CT volumes (files, folders, DICOM series folders)")
    sp.add_argument("inputs", nargs="+", metavar="INPUT")
    sp.add_argument("-o", "--output", required=True, metavar="OUTDIR")
    sp.add_argument("--model", default=None, help="model name, name@version or folder (default: the active model)")
    sp.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    sp.add_argument("--threshold", type=float, default=None, help="keep lesions with confidence >= T (default: the model's, 0.5; 0 keeps every candidate)")
    sp.add_argument("--progress", default="bar", choices=["bar", "json", "none"])
    sp.add_argument("--save-features", action="store_true", help="also write <stem>_features.npz (classifier inputs, for review/retraining)")
    sp.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    sp.add_argument("--gate", default=None, metavar="DIR|off",
                    help="cascade gate: a gate folder from `lesionseg train-gate`, or 'off' (default: the model card's gate, if any)")
    sp.set_defaults(func=cmd_segment)

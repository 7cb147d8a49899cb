"""One batch task: segment one case with an already loaded engine and write it atomically.

Plain Python (no Ray): a Ray actor calls :func:`run_case` with the :class:`Engine` it loaded
once, and the tests can call it directly.  The outputs are those of ``lesionseg segment``
(written by the same function, :func:`..cli.segment.write_case`), plus the case's done-marker,
which is committed last in the same atomic step (see :mod:`.cases`).
"""
from __future__ import annotations

import json
import time

from .cases import file_record, input_signature, marker_name


def run_case(engine, case: str, input_path: str, outdir: str, model_key: str, threshold: float | None,
             worker: str) -> dict:
    """Segment ``input_path`` into ``outdir`` under the stem ``case``.  Never raises for a bad
    input: returns ``{"status": "done"|"failed", "error", "seconds", "lesions", "worker"}``."""
    from ..cli.common import error_line
    from ..cli.segment import write_case

    t0 = time.perf_counter()

    def marker(writer, res, names, timings):
        pending = writer.pending
        name = marker_name(case)
        record = {
            "case": case,
            "input": sig,
            "model": model_key,
            "threshold_arg": threshold,
            "outputs": {n: file_record(pending[n]) for n in names},
            "lesions": len(res.lesions),
            "seconds": round(time.perf_counter() - t0, 3),
            "worker": worker,
            "timings": {k: round(v, 3) for k, v in timings.items()},
        }
        with open(writer.path(name), "w", encoding="utf-8") as fh:
            json.dump(record, fh, indent=1)
        return [name]

    try:
        sig = input_signature(input_path)
        res, _names, timings = write_case(engine, input_path, outdir, stem=case, threshold=threshold, extra=marker)
    except Exception as exc:  # a bad case is a failed row, never a crashed batch
        return {"status": "failed", "error": error_line(exc, input_path), "seconds": time.perf_counter() - t0,
                "lesions": None, "worker": worker}
    return {"status": "done", "error": "", "seconds": time.perf_counter() - t0, "lesions": len(res.lesions),
            "worker": worker, "timings": timings}

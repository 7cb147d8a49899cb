"""``lesionseg batch MANIFEST_OR_DIR -o OUTDIR``: segment a cohort on a Ray cluster.

Without ``--address`` a local Ray instance is started on this machine.  Each worker loads the
model once; each case is written atomically as ``segment`` writes it; a rerun skips complete
cases (``--force`` redoes them); ``OUTDIR/batch_report.csv`` lists every case with its status.
Needs Ray: ``pip install 'lesionseg[batch]'``.
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
import time
from pathlib import Path

from ..errors import LesionSegError
from .common import unit_interval


def _model_key(model) -> tuple[str, str]:
    """(what the workers load, the key a done-marker records).  A model given as a folder or card
    path is passed on as that path, absolute (its id may be unregistered, or be a registered
    model's id); the key is the id and a checksum of the card file and of every part's sha256."""
    from ..models import CARD_NAME, get_card, is_explicit_path, sha256_file

    card = get_card(model)
    if model and is_explicit_path(model):
        given = Path(os.path.abspath(Path(model).expanduser()))
        load, card_file = str(given), (given / CARD_NAME if given.is_dir() else given)
    else:
        load, card_file = card.id, card.folder / CARD_NAME
    parts = sorted((k, str(v["sha256"])) for k, v in card.data.items() if isinstance(v, dict) and "sha256" in v)
    digest = hashlib.sha256(json.dumps([sha256_file(card_file), parts]).encode()).hexdigest()[:16]
    return load, f"{card.id}:{digest}"


class BatchProgress:
    """A tqdm bar over the cases, or JSON lines on stdout."""

    def __init__(self, mode: str, total: int):
        self.mode, self.bar = mode, None
        self.counts: dict[str, int] = {}
        if mode == "tqdm":
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc="batch", unit="case", file=sys.stderr)

    def connected(self, text: str, workers: int) -> None:
        if self.mode == "json":
            print(json.dumps({"event": "connected", "cluster": text, "workers": workers}), flush=True)
        else:
            print(f"{text}: {workers} worker(s), the model loaded once in each", file=sys.stderr)

    def case(self, case, info: dict) -> None:
        if info.get("retry"):
            if self.mode == "json":
                print(json.dumps({"event": "retry", "case": case.name, "message": info["error"]}), flush=True)
            else:
                print(f"\n{case.name}: {info['error']}; retrying", file=sys.stderr)
            return
        self.counts[case.status] = self.counts.get(case.status, 0) + 1
        if self.mode == "json":
            row = case.report_row()
            print(json.dumps({"event": "case", **{k: row[k] for k in ("case", "status", "error", "seconds", "lesions", "worker", "attempts")}}), flush=True)
        elif self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(self.counts, refresh=True)
            if case.status == "failed":
                self.bar.write(f"failed: {case.name}: {case.error}", file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


_INTERRUPTS: list[int] = []  # signals received; the batch loop polls it, so Ctrl-C is never lost


def _interrupt(signum, frame):
    _INTERRUPTS.append(signum)
    raise KeyboardInterrupt


def cmd_batch(args) -> int:
    from ..batch.cases import REPORT_NAME, read_cases

    try:
        from ..batch.runner import run_batch
    except ImportError as exc:
        print(f"error: `lesionseg batch` needs Ray ({exc}); install it with pip install 'lesionseg[batch]'", file=sys.stderr)
        return 2
    if (args.num_workers is not None and args.num_workers < 1) or args.cpus_per_task < 1 or args.gpus_per_task < 0:
        print("error: --num-workers and --cpus-per-task must be >= 1, --gpus-per-task >= 0", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    from ..atomic import output_problem

    problem = output_problem(args.output)  # a bad -o is refused before anything starts
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    try:
        cases = read_cases(args.source)
        model, key = _model_key(args.model)
    except (LesionSegError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    prog = BatchProgress(args.progress, len(cases))
    _INTERRUPTS.clear()  # a signal from an earlier batch in this process does not cancel this one
    signal.signal(signal.SIGTERM, _interrupt)  # a terminated batch cleans up as on Ctrl-C
    signal.signal(signal.SIGINT, _interrupt)  # recorded too: the loop cancels even if Ray swallows the exception
    try:
        batch = run_batch(cases, args.output, model=model, model_key=key, address=args.address,
                          num_workers=args.num_workers, cpus_per_task=args.cpus_per_task,
                          gpus_per_task=args.gpus_per_task, device=args.device, threshold=args.threshold,
                          force=args.force, on_event=prog.case, on_connected=prog.connected,
                          interrupted=lambda: bool(_INTERRUPTS))
    except LesionSegError as exc:
        prog.close()
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        prog.close()
        print(f"cancelled: running cases stopped, none left half-written; see {args.output}/{REPORT_NAME}", file=sys.stderr)
        return 130
    prog.close()
    counts = {s: sum(c.status == s for c in batch.cases) for s in ("done", "skipped", "failed")}
    summary = {"event": "summary", **counts, "cases": len(batch.cases), "workers_started": batch.workers_started,
               "seconds": round(time.perf_counter() - t0, 2), "report": f"{args.output}/{REPORT_NAME}"}
    if args.progress == "json":
        print(json.dumps(summary), flush=True)
    print(f"{counts['done']} done, {counts['skipped']} already complete, {counts['failed']} failed of {len(batch.cases)} "
          f"case(s) in {summary['seconds']:.1f}s; report: {summary['report']}", file=sys.stderr)
    return 1 if counts["failed"] else 0


def register(sub) -> None:
    sp = sub.add_parser("batch", help="segment a cohort (manifest or folder) on a Ray cluster, resumable")
    sp.add_argument("source", metavar="MANIFEST_OR_DIR",
                    help="a CSV manifest (column image/path/input/file, optional case; or case + split_dir), "
                         "a text file of paths, or a folder of images / case folders (read as segment reads it)")
    sp.add_argument("-o", "--output", required=True, metavar="OUTDIR")
    sp.add_argument("--address", default=None, help="ray://HOST:PORT (Ray client), HOST:PORT, auto, or local (default: start Ray here)")
    sp.add_argument("--num-workers", type=int, default=None, help="workers (default: CPUs, or GPUs / --gpus-per-task)")
    sp.add_argument("--cpus-per-task", type=int, default=1, help="CPU threads per worker (default 1)")
    sp.add_argument("--gpus-per-task", type=float, default=0.0, help="GPUs per worker (fractions share a GPU; default 0)")
    sp.add_argument("--model", default=None, help="model name, name@version or folder (default: the active model)")
    sp.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    sp.add_argument("--threshold", type=unit_interval, default=None, help="as for segment")
    sp.add_argument("--force", action="store_true", help="redo cases that are already complete")
    sp.add_argument("--progress", default="tqdm", choices=["tqdm", "json", "none"])
    sp.set_defaults(func=cmd_batch)

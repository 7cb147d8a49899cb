"""Segment a cohort on a Ray cluster (``lesionseg batch``).

* One Ray actor per worker loads the model once (:class:`SegmentWorker`) and runs cases with
  :func:`.task.run_case`, which writes each case atomically with the same code as
  ``lesionseg segment``, plus a done-marker committed last.
* The driver (:func:`run_batch`) skips complete cases (unless ``force``), hands one case at a
  time to each idle actor, records every result in ``batch_report.csv`` as it arrives, and
  replaces an actor that died: the case it was running is retried once, then marked failed.
* Ctrl-C kills the actors, removes their temporaries and the outputs of any case caught
  mid-commit, writes the report (``cancelled`` rows) and re-raises ``KeyboardInterrupt``.

The output folder and the inputs must be visible at the same paths from every node (a shared
file system), as with any Ray job writing files.

``ray`` is imported by the functions that use it, never by importing this module: its import
replaces ``sys.excepthook`` and sets ``RAY_CLIENT_MODE`` in the importing process.
"""
from __future__ import annotations

import collections
import contextlib
import functools
import os
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Callable
from urllib.parse import urlparse

from ..errors import LesionSegError
from ..segment.result import OUTPUT_SUFFIXES
from .cases import Case, check_complete, lock_outdir, marker_name, remove_temporaries, write_report
from .task import run_case

CONNECT_TIMEOUT_S = 25.0
READY_TIMEOUT_S = 600.0
REPORT_EVERY_S = 2.0  # the report is rewritten at most this often while cases finish (and at the end)
MAX_ATTEMPTS = 2  # a case whose worker dies is retried once


def _died() -> tuple[type[BaseException], ...]:
    """The errors of a Ray worker that died."""
    import ray

    return ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError


class BatchError(LesionSegError):
    """The batch as a whole cannot run (unreachable cluster, unusable model)."""


class SegmentWorker:
    """Loads the model once; segments the cases it is given one after the other (a Ray actor:
    :func:`_remote_worker`)."""

    def __init__(self, model: str | None, device: str, threads: int | None):
        from ..segment.pipeline import Engine

        self.engine = Engine(model, device, threads=threads)
        self.name = f"{socket.gethostname()}:{os.getpid()}"

    def info(self) -> dict:
        return {"worker": self.name, "pid": os.getpid(), "device": str(self.engine.device), "model": self.engine.card.id}

    def run(self, case: str, input_path: str, outdir: str, model_key: str, threshold: float | None) -> dict:
        return run_case(self.engine, case, input_path, outdir, model_key, threshold, self.name)


@functools.lru_cache(maxsize=None)
def _remote_worker():
    """:class:`SegmentWorker` as a Ray actor class (made once, on first use)."""
    import ray

    return ray.remote(max_restarts=0, max_task_retries=0)(SegmentWorker)


# ------------------------------------------------------------------------------ connecting
@contextlib.contextmanager
def _deadline(seconds: float, what: str):
    """Raise :class:`BatchError` if the block runs longer than ``seconds`` (main thread, POSIX)."""
    if not hasattr(signal, "SIGALRM") or threading.current_thread() is not threading.main_thread():
        yield
        return

    def _alarm(signum, frame):
        raise TimeoutError

    old = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    except TimeoutError:
        raise BatchError(f"{what}: no answer within {seconds:.0f} s") from None
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _init_within(seconds: float, what: str, **kw) -> None:
    """``ray.init(**kw)`` given up after ``seconds``: it runs in a daemon thread, because a
    listener that is no Ray (or a cluster that never answers) blocks it in C++, where neither
    SIGALRM nor Ctrl-C reaches it."""
    import ray

    box: dict = {}

    def target():
        try:
            ray.init(**kw)
        except BaseException as exc:  # handed to the caller
            box["exc"] = exc

    thread = threading.Thread(target=target, name="ray-connect", daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        raise BatchError(f"{what}: no answer within {seconds:.0f} s (is it a Ray GCS or Ray client port?)")
    if "exc" in box:
        raise box["exc"]


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    url = urlparse(address if "://" in address else f"gcs://{address}")
    if not url.hostname or not url.port:
        raise BatchError(f"--address {address!r} is not ray://HOST:PORT, HOST:PORT, auto or local")
    try:
        socket.create_connection((url.hostname, url.port), timeout=timeout).close()
    except OSError as exc:
        raise BatchError(f"cannot reach the Ray cluster at {address}: {exc.strerror or exc}") from None


@contextlib.contextmanager
def _signal_handlers_kept():
    """Put back the SIGTERM/SIGINT handlers after the block: ``ray.init`` installs its own (a
    SIGTERM then killed the driver with a stack dump instead of cancelling the batch)."""
    main = threading.current_thread() is threading.main_thread()
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)} if main else {}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            if handler is not None:  # None: set from C, cannot be put back from Python
                signal.signal(sig, handler)


def connect(address: str | None, num_cpus: int | None = None) -> str:
    """Start a local Ray instance (``None``/``"local"``) or join a cluster; returns what it did.
    The caller's SIGTERM and SIGINT handlers stay in place."""
    with _signal_handlers_kept():
        return _connect(address, num_cpus)


def _connect(address: str | None, num_cpus: int | None) -> str:
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    quiet = {"log_to_driver": False, "logging_level": "ERROR", "include_dashboard": False}
    if address in (None, "", "local"):
        with _deadline(120.0, "starting a local Ray instance"):
            # address="local": a new instance, even where `ray start` left a (maybe dead) cluster behind
            ray.init(address="local", num_cpus=num_cpus, object_store_memory=128 * 1024**2, **quiet)
        return "local Ray instance"
    if address != "auto":
        _check_reachable(address)
    quiet.pop("include_dashboard")
    try:
        _init_within(CONNECT_TIMEOUT_S, f"connecting to the Ray cluster at {address}", address=address, **quiet)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BatchError(f"cannot connect to the Ray cluster at {address}: {msg}") from None
    return f"Ray cluster at {address}"


def check_resources(cpus_per_task: int, gpus_per_task: float) -> None:
    """Raise :class:`BatchError` when no node of the cluster can ever hold one worker (``--gpus-per-task
    1`` without a GPU, ``--cpus-per-task 4`` on 2 cores): Ray would wait for it in silence."""
    import ray

    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")] or [ray.cluster_resources()]
    need = {"CPU": float(cpus_per_task), "GPU": float(gpus_per_task)}
    if any(all(res.get(k, 0.0) >= v for k, v in need.items() if v) for res in nodes):
        return
    total = ray.cluster_resources()
    have = ", ".join(f"{total.get(k, 0.0):g} {k}(s)" for k in need if need[k])
    best = {k: max(res.get(k, 0.0) for res in nodes) for k in need}
    short = [f"--{k.lower()}s-per-task {need[k]:g}" for k in need if need[k] and best[k] < need[k]]
    raise BatchError(f"{' and '.join(short) or 'the request'} cannot be met: the largest node has "
                     f"{', '.join(f'{best[k]:g} {k}(s)' for k in need if need[k])} (cluster total {have})")


def default_workers(local: bool, cpus_per_task: int, gpus_per_task: float) -> int:
    if local:
        return max(1, (os.cpu_count() or 1) // cpus_per_task)
    import ray

    res = ray.cluster_resources()
    if gpus_per_task:
        return max(1, int(res.get("GPU", 0) // gpus_per_task))
    return max(1, int(res.get("CPU", 1) // cpus_per_task))


# ------------------------------------------------------------------------------ the batch
class Batch:
    """State of one ``run_batch`` call (the cases, the actors, what runs where)."""

    def __init__(self, cases: list[Case], outdir: str, model_key: str, threshold, on_event: Callable):
        self.cases, self.outdir, self.model_key, self.threshold = cases, str(outdir), model_key, threshold
        self.on_event = on_event
        self.queue: collections.deque[Case] = collections.deque()
        self.inflight: dict = {}  # ObjectRef -> (case, actor, worker name)
        self.idle: list = []
        self.names: dict = {}  # actor -> worker name
        self.workers_started = 0
        self._reported = 0.0

    def report(self, now: bool = False) -> None:
        if now or time.monotonic() - self._reported >= REPORT_EVERY_S:
            write_report(self.outdir, self.cases)
            self._reported = time.monotonic()

    def finish(self, case: Case, status: str, **info) -> None:
        case.status = status
        for key in ("seconds", "lesions", "worker"):
            if key in info and info[key] is not None:
                setattr(case, key, info[key])
        if info.get("error"):
            case.error = info["error"]
        self.report(now=status != "done" or bool(case.notes))  # failures and retries at once
        self.on_event(case, info)

    def start_workers(self, n: int, options: dict, args: tuple) -> None:
        import ray

        actors = [_remote_worker().options(**options).remote(*args) for _ in range(n)]
        try:
            infos = ray.get([a.info.remote() for a in actors], timeout=READY_TIMEOUT_S)
        except (ray.exceptions.RayTaskError, *_died()) as exc:  # e.g. the model cannot be loaded there
            raise BatchError(f"a Ray worker failed to start: {_last_error_line(exc)}") from None
        except ray.exceptions.GetTimeoutError:
            raise BatchError(f"the Ray workers did not start within {READY_TIMEOUT_S:.0f} s "
                             "(not enough free CPUs/GPUs in the cluster for the request?)") from None
        for a, info in zip(actors, infos):
            self.names[a] = info["worker"]
            self.idle.append(a)
        self.workers_started += n

    def dispatch(self) -> None:
        while self.queue and self.idle:
            case, actor = self.queue.popleft(), self.idle.pop()
            case.attempts += 1
            case.status = "running"
            ref = actor.run.remote(case.name, case.input, self.outdir, self.model_key, self.threshold)
            self.inflight[ref] = (case, actor)

    def collect(self, options: dict, args: tuple, timeout: float = 1.0) -> None:
        import ray

        done, _ = ray.wait(list(self.inflight), num_returns=1, timeout=timeout)
        for ref in done:
            case, actor = self.inflight[ref]
            try:
                res = ray.get(ref)  # a worker's KeyboardInterrupt comes back as one: the case stays in flight
            except _died() as exc:
                del self.inflight[ref]
                self._worker_died(case, actor, exc, options, args)
                continue
            del self.inflight[ref]
            self.idle.append(actor)
            self.finish(case, res.pop("status"), **res)

    def _worker_died(self, case: Case, actor, exc, options: dict, args: tuple) -> None:
        import ray

        worker = self.names.pop(actor, "?")
        with contextlib.suppress(Exception):
            ray.kill(actor)
        note = f"worker {worker} died during attempt {case.attempts} ({type(exc).__name__})"
        case.notes.append(note)
        case.worker = worker
        if case.attempts < MAX_ATTEMPTS:
            self.queue.appendleft(case)
            self.on_event(case, {"retry": True, "error": note})
        else:
            self.finish(case, "failed", error=f"its worker died {case.attempts} times; not retried again")
        if self.queue:
            self.start_workers(1, options, args)

    def cancel(self) -> None:
        """Kill every actor; mark what was running or queued as cancelled; leave no partial case."""
        import ray

        for actor in list(self.names):
            with contextlib.suppress(Exception):
                ray.kill(actor)
        time.sleep(0.5)
        remove_temporaries(self.outdir)
        for case in self.cases:
            if case.status == "running":
                if check_complete(self.outdir, case, self.model_key, self.threshold)[0]:
                    case.status = "done"  # it committed before the kill
                    continue
                for name in [case.name + s for s in OUTPUT_SUFFIXES] + [marker_name(case.name)]:
                    with contextlib.suppress(FileNotFoundError):
                        (Path(self.outdir) / name).unlink()
            if case.status in ("running", "pending"):
                case.status, case.error = "cancelled", "cancelled (Ctrl-C or SIGTERM)"
        self.report(now=True)


def _last_error_line(exc: BaseException) -> str:
    """The innermost ``SomeError: message`` line of a Ray error (whose text holds a traceback)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    errs = [ln for ln in lines if ln.split(":", 1)[0].endswith(("Error", "Exception"))]
    return (errs or lines or [type(exc).__name__])[-1]


def plan(cases: list[Case], outdir: str, model_key: str, threshold, force: bool) -> tuple[list[Case], list[Case]]:
    """Split ``cases`` into (to run, already settled): bad rows fail, complete cases are skipped."""
    todo = []
    for case in cases:
        if case.error:
            case.status = "failed"
        elif not Path(case.input).exists():
            case.status, case.error = "failed", f"{case.input}: image not found"
        else:
            ok, _why, marker = (False, "", {}) if force else check_complete(outdir, case, model_key, threshold)
            if ok:
                case.status = "skipped"
                case.seconds, case.lesions, case.worker = marker.get("seconds"), marker.get("lesions"), marker.get("worker", "")
                case.notes.append("complete from an earlier run")
            else:
                todo.append(case)
    return todo, [c for c in cases if c not in todo]


def run_batch(cases: list[Case], outdir: str, *, model: str | None, model_key: str, address: str | None = None,
              num_workers: int | None = None, cpus_per_task: int = 1, gpus_per_task: float = 0.0,
              device: str = "auto", threshold: float | None = None, force: bool = False,
              on_event: Callable = lambda case, info: None, on_connected: Callable = lambda text, n: None,
              interrupted: Callable[[], bool] = lambda: False) -> Batch:
    """Run ``cases`` into ``outdir``; returns the :class:`Batch` (its cases carry their status).

    ``interrupted()`` is polled between waits (at least once a second): when it turns true the
    batch is cancelled as on a ``KeyboardInterrupt``, even if a library swallowed that exception."""
    with lock_outdir(outdir):
        remove_temporaries(outdir)  # left by a killed earlier run; no writer runs now (the lock)
        todo, settled = plan(cases, outdir, model_key, threshold, force)
        batch = Batch(cases, outdir, model_key, threshold, on_event)
        write_report(outdir, cases)
        for case in settled:
            on_event(case, {})
        if not todo:
            return batch
        import ray

        local = address in (None, "", "local")
        n = num_workers or None
        connected = connect(address, num_cpus=(n * cpus_per_task) if (local and n) else None)
        try:
            check_resources(cpus_per_task, gpus_per_task)
            n = min(n or default_workers(local, cpus_per_task, gpus_per_task), len(todo))
            on_connected(connected, n)
            options = {"num_cpus": cpus_per_task, "num_gpus": gpus_per_task}
            args = (model, "cuda" if gpus_per_task else device, cpus_per_task)
            batch.queue.extend(todo)
            try:
                batch.start_workers(n, options, args)
                while batch.queue or batch.inflight:
                    if interrupted():
                        raise KeyboardInterrupt
                    batch.dispatch()
                    batch.collect(options, args)
            except KeyboardInterrupt:
                batch.cancel()
                raise
            batch.report(now=True)
        finally:
            with contextlib.suppress(Exception):
                ray.shutdown()
            remove_temporaries(outdir)
        return batch

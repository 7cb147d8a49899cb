"""Run the engine's CLI in a background process, for the Slicer GUI.

The GUI never runs torch in its own process: :class:`BackgroundSegmentation` writes the input
volume to a private temporary folder, starts

    <python> -m LesionSegLib.engine.cli segment <input> -o <tmp>/out --progress json --save-features ...

in a new process group (a new session on POSIX), reads its JSON progress lines from a reader
thread and hands them to the caller through :meth:`poll` (the widget calls it from a QTimer).
:meth:`cancel` kills the whole process tree and removes the temporary folder, so a cancelled
run leaves neither a child process nor files behind; nothing is added to the scene until the
caller loads a finished result with :meth:`load_result`.

No Qt and no Slicer here: the same class is used in tests with ``sys.executable``.
"""
from __future__ import annotations

import collections
import csv
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

#: folder that holds the ``LesionSegLib`` package (put on the child's PYTHONPATH)
LIB_PARENT = str(Path(__file__).resolve().parents[1])


def python_executable() -> str:
    """The Python to run the engine with: ``PythonSlicer`` inside Slicer, else this interpreter."""
    try:
        import slicer  # noqa: F401

        if hasattr(slicer, "app"):
            exe = shutil.which("PythonSlicer")
            if exe:
                return exe
    except ImportError:
        pass
    return sys.executable


class BackgroundSegmentation:
    """One engine run in a child process.  States: idle, running, finished, failed, cancelled."""

    def __init__(self, image, stem: str = "input", model: str | None = None, device: str = "auto",
                 threshold: float | None = 0.0, python: str | None = None, save_features: bool = True,
                 threads: int | None = None, env: dict | None = None):
        self.image = image
        self.stem = _safe_stem(stem)
        self.model = model
        self.device = device
        self.threshold = threshold
        self.python = python or python_executable()
        self.save_features = save_features
        self.threads = threads
        self.extra_env = dict(env or {})
        self.state = "idle"
        self.fraction = 0.0
        self.stage = ""
        self.error = ""
        self.done_event: dict | None = None
        self.workdir: Path | None = None
        self.outdir: Path | None = None
        self.proc: subprocess.Popen | None = None
        self.stderr_tail: collections.deque[str] = collections.deque(maxlen=60)
        self._unread: queue.Queue = queue.Queue()  # stderr lines not yet fetched by new_lines() (the log box)
        self.notes: list[str] = []
        self._events: queue.Queue = queue.Queue()
        self._threads: list[threading.Thread] = []
        self.started_at = 0.0

    # ------------------------------------------------------------------------ lifecycle
    def command(self, input_path: str) -> list[str]:
        cmd = [self.python, "-m", "LesionSegLib.engine.cli", "segment", input_path, "-o", str(self.outdir),
               "--device", self.device, "--progress", "json"]
        if self.model:
            cmd += ["--model", str(self.model)]
        if self.threshold is not None:
            cmd += ["--threshold", repr(float(self.threshold))]
        if self.save_features:
            cmd.append("--save-features")
        if self.threads:
            cmd += ["--threads", str(int(self.threads))]
        return cmd

    def start(self) -> None:
        import SimpleITK as sitk

        if self.state == "running":
            raise RuntimeError("this segmentation is already running")
        self.workdir = Path(tempfile.mkdtemp(prefix="LesionSeg-"))
        self.outdir = self.workdir / "out"
        try:
            input_path = self.workdir / f"{self.stem}.nrrd"  # NRRD keeps the geometry in double precision
            sitk.WriteImage(self.image, str(input_path), useCompression=False)
            env = dict(os.environ)
            env["PYTHONPATH"] = LIB_PARENT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
            env["PYTHONUNBUFFERED"] = "1"
            env.update(self.extra_env)
            kwargs = {}
            if os.name == "nt":
                kwargs["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP | getattr(subprocess, "CREATE_NO_WINDOW", 0)
            else:
                kwargs["start_new_session"] = True  # own process group: cancel kills the whole tree
            self.proc = subprocess.Popen(
                self.command(str(input_path)), stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                env=env, cwd=str(self.workdir), text=True, encoding="utf-8", errors="replace", bufsize=1, **kwargs,
            )
        except Exception:
            self._remove_workdir()
            raise
        self.state = "running"
        self.started_at = time.monotonic()
        for target, stream in ((self._read_stdout, self.proc.stdout), (self._read_stderr, self.proc.stderr)):
            t = threading.Thread(target=target, args=(stream,), daemon=True)
            t.start()
            self._threads.append(t)

    def _read_stdout(self, stream) -> None:
        for line in stream:
            line = line.strip()
            if not line.startswith("{"):
                continue
            try:
                self._events.put(json.loads(line))
            except json.JSONDecodeError:
                continue

    def _read_stderr(self, stream) -> None:
        for line in stream:
            line = line.rstrip()
            if line:
                self.stderr_tail.append(line)
                self._unread.put(line)

    def new_lines(self) -> list[str]:
        """stderr lines since the last call (as ``engine.learn.jobs`` jobs offer them)."""
        out = []
        while not self._unread.empty():
            out.append(self._unread.get_nowait())
        return out

    def poll(self) -> list[dict]:
        """New events since the last call; updates :attr:`state`, :attr:`fraction`, :attr:`stage`."""
        events = []
        while True:
            try:
                events.append(self._events.get_nowait())
            except queue.Empty:
                break
        for ev in events:
            kind = ev.get("event")
            if kind == "progress":
                self.fraction = float(ev.get("fraction", self.fraction))
                self.stage = str(ev.get("stage", self.stage))
            elif kind == "done":
                self.done_event = ev
            elif kind == "error":
                self.error = str(ev.get("message") or "the engine failed")
        if self.state == "running" and self.proc is not None and self.proc.poll() is not None:
            for t in self._threads:
                t.join(timeout=5)
            events += self.poll_remaining()
            rc = self.proc.returncode
            self.notes = [ln[len("note: "):] for ln in self.stderr_tail if ln.startswith("note: ")]
            if rc == 0 and self.done_event is not None:
                self.state = "finished"
                self.fraction = 1.0
            else:
                self.state = "failed"
                if not self.error:
                    tail = [ln for ln in self.stderr_tail if ln.strip()]
                    self.error = (tail[-1] if tail else f"the engine exited with code {rc}")
                self._remove_workdir()
        return events

    def poll_remaining(self) -> list[dict]:
        out = []
        while True:
            try:
                ev = self._events.get_nowait()
            except queue.Empty:
                return out
            out.append(ev)
            if ev.get("event") == "done":
                self.done_event = ev
            elif ev.get("event") == "error":
                self.error = str(ev.get("message") or "the engine failed")

    @property
    def running(self) -> bool:
        return self.state == "running"

    def wait(self, timeout: float | None = None, interval: float = 0.1) -> str:
        """Block until the run ends (for headless use and tests); returns the final state."""
        end = None if timeout is None else time.monotonic() + timeout
        while self.state == "running":
            self.poll()
            if self.state != "running":
                break
            if end is not None and time.monotonic() > end:
                raise TimeoutError("segmentation did not finish in time")
            time.sleep(interval)
        return self.state

    def cancel(self) -> None:
        """Kill the child process tree, wait for it, and delete the temporary folder."""
        if self.proc is not None and self.proc.poll() is None:
            kill_process_tree(self.proc)
        for t in self._threads:
            t.join(timeout=5)
        if self.state in ("idle", "running"):
            self.state = "cancelled"
        self._remove_workdir()

    def cleanup(self) -> None:
        self._remove_workdir()

    def _remove_workdir(self) -> None:
        if self.workdir is not None and self.workdir.exists():
            shutil.rmtree(self.workdir, ignore_errors=True)

    # --------------------------------------------------------------------------- results
    def output(self, suffix: str) -> Path:
        return Path(self.outdir) / f"{self.stem}{suffix}"

    def load_result(self):
        """(SegmentationResult on the input grid, case hash) of a finished run."""
        if self.state != "finished":
            raise RuntimeError(f"no result: the segmentation is {self.state}")
        return load_cli_outputs(self.outdir, self.stem, self.image, threshold=self.threshold,
                                device=(self.done_event or {}).get("device", self.device), messages=self.notes)


def _safe_stem(stem: str) -> str:
    keep = "".join(c if (c.isalnum() or c in "-_.") else "_" for c in str(stem)).strip("._")
    return keep[:80] or "input"


def kill_process_tree(proc: subprocess.Popen, grace: float = 3.0) -> None:
    """Terminate ``proc`` and every process in its group (children included)."""
    if os.name == "nt":
        subprocess.run(["taskkill", "/F", "/T", "/PID", str(proc.pid)], capture_output=True, check=False)
    else:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
        try:  # anything left in the group (workers that ignored SIGTERM)
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:  # pragma: no cover - would need an unkillable process
        pass


def process_group_alive(pgid: int) -> bool:
    """Whether any process of group ``pgid`` still exists (POSIX)."""
    if os.name == "nt":  # pragma: no cover
        return False
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def load_cli_outputs(outdir, stem: str, reference, threshold: float | None = None, device: str = "cpu",
                     messages: list[str] | None = None):
    """Rebuild an engine ``SegmentationResult`` from ``lesionseg segment`` outputs.

    Reads ``<stem>_lesions.nii.gz`` (labelmap), ``<stem>_lesions.csv`` (measurements) and, when
    present, ``<stem>_features.npz`` (classifier features, patches, case hash, model id).
    ``reference`` is the SimpleITK input image; the labelmap must be on its grid.
    Returns ``(result, case_hash)``.
    """
    import SimpleITK as sitk

    from .engine.segment.result import Lesion, SegmentationResult

    outdir = Path(outdir)
    lab_img = sitk.ReadImage(str(outdir / f"{stem}_lesions.nii.gz"))
    labelmap = sitk.GetArrayFromImage(lab_img).astype(np.uint16)
    if labelmap.shape != tuple(reversed(reference.GetSize())):
        raise ValueError(f"engine labelmap {labelmap.shape} is not on the input grid {tuple(reversed(reference.GetSize()))}")
    feats: dict[int, dict] = {}
    patches: dict[int, np.ndarray] = {}
    case_hash = ""
    model_id = ""
    npz_path = outdir / f"{stem}_features.npz"
    if npz_path.exists():
        with np.load(npz_path, allow_pickle=False) as npz:
            names = [str(n) for n in npz["feature_names"]]
            for k, lid in enumerate(npz["lesion_ids"]):
                feats[int(lid)] = {n: float(v) for n, v in zip(names, npz["features"][k])}
                patches[int(lid)] = np.asarray(npz["patches"][k])
            case_hash = str(npz["case_hash"])
            model_id = str(npz["model_id"])
    with open(outdir / f"{stem}_lesions.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not model_id:
        model_id = _model_from_seg_nrrd(outdir / f"{stem}.seg.nrrd")
    bboxes = _bboxes(labelmap)
    lesions = []
    for row in rows:
        lid = int(row["lesion_id"])
        lesions.append(Lesion(
            lesion_id=lid,
            confidence=float(row["confidence"]),
            volume_ml=float(row["volume_ml"]),
            diameter_mm=float(row["diameter_mm"]),
            centroid_lps=(float(row["centroid_x"]), float(row["centroid_y"]), float(row["centroid_z"])),
            mean_probability=float(row["mean_probability"]),
            max_probability=float(row["max_probability"]),
            mean_hu=float(row["mean_hu"]),
            n_voxels=int(row["n_voxels"]),
            bbox_ijk=bboxes.get(lid, ((0, 0, 0), (0, 0, 0))),
            features=feats.get(lid, {}),
            patch=patches.get(lid),
        ))
    lesions.sort(key=lambda les: les.lesion_id)
    result = SegmentationResult(labelmap=labelmap, lesions=lesions, reference=reference, model_id=model_id,
                                threshold=float(threshold or 0.0), device=str(device), messages=list(messages or []))
    return result, case_hash


def _bboxes(labelmap: np.ndarray) -> dict[int, tuple]:
    from scipy import ndimage

    out = {}
    for lid, sl in enumerate(ndimage.find_objects(labelmap), start=1):
        if sl is None:
            continue
        z, y, x = sl
        out[lid] = ((x.start, y.start, z.start), (x.stop, y.stop, z.stop))
    return out


def _model_from_seg_nrrd(path: Path) -> str:
    try:
        import slicerio

        seg = slicerio.read_segmentation(str(path), skip_voxels=True)
        for s in seg.get("segments", []):
            model = s.get("tags", {}).get("LesionSeg.Model")
            if model:
                return model
    except Exception:  # the model id is informative only
        pass
    return ""

"""Run the engine's CLI in a background process, for the Slicer GUI.

The GUI never runs torch in its own process: :class:`BackgroundSegmentation` writes the input
volume to a private temporary folder, starts

    <python> -m LesionSegLib.engine.cli segment <input> -o <tmp>/out --progress json --save-features ...

through the engine's one child-process runner (:class:`engine.process.ChildProcess`: own
session/process group, reader threads, psutil tree kill), and hands its JSON progress lines to
the caller through :meth:`poll` (the widget calls it from a QTimer).  :meth:`cancel` kills the
whole process tree and removes the temporary folder, so a cancelled run leaves neither a child
process nor files behind; nothing is added to the scene until the caller loads a finished
result with :meth:`load_result`.

No Qt and no Slicer here: the same class is used in tests with ``sys.executable``.
"""
from __future__ import annotations

import collections
import csv
import json
import os
import queue
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from .engine.io.images import output_stem, safe_stem
from .engine.process import ChildProcess, child_env, python_executable, tree_alive

__all__ = ["BackgroundSegmentation", "load_cli_outputs", "process_group_alive", "python_executable"]


class BackgroundSegmentation:
    """One engine run in a child process.  States: idle, running, finished, failed, cancelled."""

    def __init__(self, image, stem: str = "input", model: str | None = None, device: str = "auto",
                 threshold: float | None = 0.0, python: str | None = None, save_features: bool = True,
                 threads: int | None = None, env: dict | None = None):
        self.image = image
        self.name = str(stem)  # the volume's name: errors say it, not the temporary file the engine read
        self.stem = _safe_stem(stem)
        self.out_stem = self.stem
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
        self.stages: list[str] = []  # every stage the engine reported, in order (a fast run can pass several between polls)
        self.error = ""
        self.done_event: dict | None = None
        self.workdir: Path | None = None
        self.outdir: Path | None = None
        self.proc: ChildProcess | None = None
        self.stderr_tail: collections.deque[str] = collections.deque(maxlen=60)
        self._unread: queue.Queue = queue.Queue()  # stderr lines not yet fetched by new_lines() (the log box)
        self.notes: list[str] = []
        self._events: queue.Queue = queue.Queue()
        self._pids: list[int] = []
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
            self.out_stem = output_stem(input_path)  # the CLI's name for the outputs: a volume named "image" is named after its folder
            sitk.WriteImage(self.image, str(input_path), useCompression=False)
            self.proc = ChildProcess(self.command(str(input_path)), env=child_env(extra=self.extra_env),
                                     cwd=self.workdir, on_line=self._on_line).start()
        except Exception:
            self._remove_workdir()
            raise
        self.state = "running"
        self.started_at = time.monotonic()

    def _on_line(self, stream: str, line: str) -> None:
        line = line.strip()
        if stream == "stderr":
            if line:
                self.stderr_tail.append(line)
                self._unread.put(line)
        elif line.startswith("{"):
            try:
                self._events.put(json.loads(line))
            except json.JSONDecodeError:
                pass

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
            self._apply(ev)
        if self.state == "running" and self.proc is not None and self.proc.poll() is not None:
            events += self.poll_remaining()  # the reader threads have ended: every line is in
            rc = self.proc.returncode
            self.notes = [ln[len("note: "):] for ln in self.stderr_tail if ln.startswith("note: ")]
            if rc == 0 and self.done_event is not None:
                self.state = "finished"
                self.fraction = 1.0
            else:
                self.state = "failed"
                if not self.error:
                    tail = [ln for ln in self.stderr_tail if ln.strip()]
                    self.error = self._named(tail[-1]) if tail else f"the engine exited with code {rc}"
                self._remove_workdir()
        return events

    def _apply(self, ev: dict) -> None:
        kind = ev.get("event")
        if kind == "progress":
            self.fraction = float(ev.get("fraction", self.fraction))
            stage = str(ev.get("stage", self.stage))
            if stage and stage != self.stage:
                self.stages.append(stage)
            self.stage = stage
        elif kind == "done":
            self.done_event = ev
        elif kind == "error":
            self.error = self._named(str(ev.get("message") or "the engine failed"))

    def _named(self, text: str) -> str:
        """``text`` with the temporary input file (gone by then) replaced by the volume's name."""
        if self.workdir is not None:
            text = text.replace(str(self.workdir / f"{self.stem}.nrrd"), f"volume '{self.name}'")
        return text.removeprefix("error: ")

    def poll_remaining(self) -> list[dict]:
        out = []
        while True:
            try:
                ev = self._events.get_nowait()
            except queue.Empty:
                return out
            out.append(ev)
            self._apply(ev)

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
        if self.proc is not None:
            self.proc.terminate()
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
        return Path(self.outdir) / f"{self.out_stem}{suffix}"

    def load_result(self):
        """(SegmentationResult on the input grid, case hash) of a finished run."""
        if self.state != "finished":
            raise RuntimeError(f"no result: the segmentation is {self.state}")
        return load_cli_outputs(self.outdir, self.out_stem, self.image, threshold=self.threshold,
                                device=(self.done_event or {}).get("device", self.device), messages=self.notes,
                                ood=(self.done_event or {}).get("ood"))


def _safe_stem(stem: str) -> str:
    return safe_stem(stem, "input", max_len=80)  # never "CON" or "nul", devices on Windows


def process_group_alive(pid: int) -> bool:
    """Whether the child ``pid`` (the leader of its own session/process group) or any process
    still in its group runs.  POSIX; on Windows only ``pid`` itself is looked at."""
    import psutil

    if not hasattr(os, "getpgid"):  # pragma: no cover - Windows
        return tree_alive([pid])
    group = []
    for p in psutil.process_iter(["pid"]):
        try:
            if os.getpgid(p.pid) == pid:
                group.append(p.pid)
        except (ProcessLookupError, PermissionError, OSError):
            continue
    return tree_alive(group)


def load_cli_outputs(outdir, stem: str, reference, threshold: float | None = None, device: str = "cpu",
                     messages: list[str] | None = None, ood: dict | None = None):
    """Rebuild an engine ``SegmentationResult`` from ``lesionseg segment`` outputs.

    Reads ``<stem>_lesions.nii.gz`` (labelmap), ``<stem>_lesions.csv`` (measurements) and, when
    present, ``<stem>_features.npz`` (classifier features, patches, case hash, model id).
    ``reference`` is the SimpleITK input image; the labelmap must be on its grid.  ``ood``: the
    scan's OOD record of the run's ``done`` event (score, warning, domain); without it the scan
    score comes from the CSV's ``scan_ood_score``.  Per-lesion ``ood_score`` comes from the CSV.
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
    with open(outdir / f"{stem}_lesions.csv", newline="", encoding="utf-8") as fh:
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
            ood_score=_optional_float(row.get("ood_score")),
        ))
    lesions.sort(key=lambda les: les.lesion_id)
    if not ood:
        scan = next((s for s in (_optional_float(r.get("scan_ood_score")) for r in rows) if s is not None), None)
        ood = None if scan is None else {"scan_score": scan, "warning": ""}
    result = SegmentationResult(labelmap=labelmap, lesions=lesions, reference=reference, model_id=model_id,
                                threshold=float(threshold or 0.0), device=str(device), messages=list(messages or []),
                                ood=ood)
    return result, case_hash


def _optional_float(text) -> float | None:
    """A CSV cell as a float; None when empty (no OOD statistics) or not a number."""
    try:
        return float(text) if text not in (None, "") else None
    except ValueError:
        return None


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

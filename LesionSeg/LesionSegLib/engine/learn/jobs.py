"""Long jobs in a child process, with parsed progress, a log and cancel.

* :class:`SegmenterTrainingJob`: ``python -m LesionSegLib.engine.learn.train_seg`` (used by
  ``lesionseg train-seg`` and the LesionSegTraining module).  ``train_seg`` trains for a
  wall-clock budget (``--minutes``), so the fraction is the time since its "loaded ... cases"
  line over the budget (or steps over ``--max-steps`` when that comes first), capped at 0.99
  until the final validation and save are done.
* :class:`RetrainJob`: ``lesionseg retrain --progress json`` (used by the LesionSegTraining
  module, so that retraining never blocks Slicer's GUI and can be cancelled at any moment;
  the new model folder appears atomically, so a cancelled job leaves no half-written model).

Callers poll (:meth:`ChildProcessJob.poll`) from a timer; nothing here uses Qt.  The process
itself is run by the engine's one runner (:class:`engine.process.ChildProcess`): cancel stops
the process this job started and all its descendants (psutil), terminate then kill.
"""
from __future__ import annotations

import collections
import json
import os
import re
import threading
import time
from pathlib import Path
from typing import Sequence

from .. import models
from ..errors import LesionSegError, ModelError
from ..process import LIB_PARENT, ChildProcess, child_env, python_executable  # noqa: F401 (re-exported)

STEP_RE = re.compile(r"^step (\d+) t=([\d.]+)min loss=([\d.eE+-]+|nan)")
LOADED_RE = re.compile(r"^loaded (\d+) training and (\d+) validation cases")
DICE_RE = re.compile(r"val dice \(model grid\) ([\d.]+)")


class TrainingJobError(LesionSegError):
    pass


def gt_case_dirs(images: str | os.PathLike) -> list[Path]:
    root = Path(images)
    if not root.is_dir():
        raise TrainingJobError(f"training folder {root} does not exist")
    return [d for d in sorted(root.iterdir()) if d.is_dir() and (d / "image.nii.gz").exists() and (d / "label.nii.gz").exists()]


def check_case_files(cases: Sequence[Path], train: Sequence[str] | None = None) -> None:
    """Read every case's image and label once and refuse, in one line naming the file, a corrupt
    or non-CT image, a label on another grid or with values other than 0/1, and a training set
    (the cases named in ``train``; all when None) without any lesion voxel."""
    import numpy as np
    import SimpleITK as sitk

    from ..errors import InputError
    from ..io.images import read_image, read_label

    lesion = 0
    for case in cases:
        image = read_image(case / "image.nii.gz")
        label = read_label(case / "label.nii.gz", image)
        if label.GetNumberOfComponentsPerPixel() != 1:
            raise InputError("label has several components per voxel; give one 0/1 value per voxel", str(case / "label.nii.gz"))
        a = sitk.GetArrayViewFromImage(label)
        bad = a[(a != 0) & (a != 1)]
        if bad.size:
            found = ", ".join(f"{v:g}" for v in np.unique(bad)[:5])
            raise InputError(f"label values must be 0 (background) or 1 (lesion); found {found}", str(case / "label.nii.gz"))
        if train is None or case.name in train:
            lesion += int(np.count_nonzero(a))
    if not lesion:
        raise TrainingJobError("the training labels hold no lesion voxel at all; nothing to learn from")


def check_register_name(output: str | None, base_model: str | None):
    """(parent card, name, version, folder) of ``--register NAME[@VERSION]``, checked: a model
    name (no path separator, no '..'), a valid version, and no existing or shipped model of that id."""
    from .model_writer import resolve_output

    text = "" if output is None else str(output)
    seps = {"/", "\\", os.sep} | ({os.altsep} if os.altsep else set())
    if any(c in text for c in seps) or ".." in text or text.startswith(("~", ".")):
        raise TrainingJobError(f"--register {text!r} is not a model name: give NAME[@VERSION] "
                               "(letters, digits, '-', '_' and '.'; no path separator or '..')")
    parent = models.get_card(base_model)
    return (parent, *resolve_output(parent, text or None))


class ChildProcessJob:
    """A child process whose output lines are read by a thread and parsed by :meth:`_parse`."""

    def __init__(self, python: str | None = None, nice: int | None = None, env: dict | None = None):
        self.python = python or python_executable()
        self.nice = nice
        self.env = env
        self.proc: ChildProcess | None = None
        self.lines: collections.deque[str] = collections.deque(maxlen=2000)
        self.stderr_lines: collections.deque[str] = collections.deque(maxlen=200)
        self._unread: collections.deque[str] = collections.deque()
        self._lock = threading.Lock()
        self.fraction = 0.0
        self.status = "not started"
        self.cancelled = False
        self.started_at: float | None = None
        self.error: str | None = None
        self._final = False

    def command(self) -> list[str]:  # pragma: no cover - abstract
        raise NotImplementedError

    def _parse(self, line: str) -> None:  # pragma: no cover - abstract
        pass

    def check_inputs(self) -> None:
        pass

    def start(self):
        if self.proc is not None:
            raise TrainingJobError("job already started")
        self.check_inputs()
        cmd = self.command()
        if self.nice:
            cmd = ["nice", "-n", str(int(self.nice)), *cmd]
        self.started_at = time.time()
        self.status = "starting"
        self.proc = ChildProcess(cmd, env=child_env(self.env), on_line=self._read).start()
        return self

    def _read(self, stream: str, line: str) -> None:
        parse = stream == "stdout"
        with self._lock:
            (self.lines if parse else self.stderr_lines).append(line)
            if parse:
                self._unread.append(line)
        if parse:
            self._parse(line)  # an exception here is caught by the runner: a malformed line does not stop the reader

    def _finished(self, rc: int) -> None:
        """Set the final status once the process ended (override to add results)."""
        if self.cancelled:
            self.status = "cancelled"
        elif rc == 0:
            self.fraction = 1.0
            if not self.status.startswith("done"):
                self.status = "done"
        else:
            self.error = self.error or self.error_text()
            self.status = f"failed (exit {rc})"

    def poll(self) -> int | None:
        """None while running, else the exit code."""
        if self.proc is None:
            return None
        rc = self.proc.poll()
        if rc is None:
            self._tick()
            return None
        if not self._final:  # the runner has joined its reader threads: every line is in
            self._final = True
            self._finished(rc)
        return rc

    def _tick(self) -> None:
        pass

    @property
    def state(self) -> str:
        """'idle', 'running', 'finished', 'failed' or 'cancelled'."""
        if self.proc is None:
            return "idle"
        rc = self.poll()
        if rc is None:
            return "running"
        if self.cancelled:
            return "cancelled"
        return "finished" if rc == 0 and self.error is None else "failed"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def new_lines(self) -> list[str]:
        with self._lock:
            out = list(self._unread)
            self._unread.clear()
        return out

    def error_text(self) -> str:
        errs = [ln for ln in self.stderr_lines if ln.strip() and not ln.startswith(("warning", "  warnings"))]
        for ln in reversed(errs):
            if ln.startswith("error:"):
                return ln[len("error:"):].strip()
        tail = (errs or [ln for ln in self.lines if ln.strip()])[-3:]
        return " | ".join(tail) or "no output"

    def wait(self, timeout: float | None = None) -> int:
        assert self.proc is not None
        self.proc.wait(timeout)
        return self.poll()

    def cancel(self, grace: float = 3.0) -> None:
        """Stop the process this job started and all its descendants: terminate, then kill
        after ``grace`` seconds (so a GUI thread waits a few seconds at most)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        if self.status.startswith("done"):  # the model is written and the process is only exiting:
            return  # a cancel now would report "cancelled" for a version that exists (it finishes instead)
        self.cancelled = True
        self.status = "cancelling"
        self.proc.terminate(grace)
        self.poll()


class SegmenterTrainingJob(ChildProcessJob):
    def __init__(self, images: str | os.PathLike, output: str | os.PathLike, minutes: float = 45.0,
                 max_steps: int = 0, val: Sequence[str] | None = None, extra: Sequence[str] = (), **kw):
        super().__init__(**kw)
        self.images = Path(images)
        self.output = Path(output)
        self.minutes = float(minutes)
        self.max_steps = int(max_steps or 0)
        self.val = list(val) if val else None
        self.extra = list(extra)
        self.step = 0
        self.loss: float | None = None
        self.val_dice: float | None = None
        self._t_loaded: float | None = None
        self._checked: list[Path] | None = None

    def check_inputs(self) -> list[Path]:
        if self._checked is not None:  # the CLI checks before start(), which checks again: read the files once
            return self._checked
        cases = gt_case_dirs(self.images)
        unlabeled = [d for d in sorted(self.images.iterdir()) if d.is_dir() and (d / "image.nii.gz").exists()
                     and not (d / "label.nii.gz").exists()]
        if unlabeled:
            raise TrainingJobError(f"{unlabeled[0]} holds image.nii.gz but no label.nii.gz"
                                   + (f" (and {len(unlabeled) - 1} more case folders)" if len(unlabeled) > 1 else "")
                                   + "; add the label or move the case out of the training folder")
        if len(cases) < 1:
            raise TrainingJobError(f"{self.images} holds no <case>/image.nii.gz + <case>/label.nii.gz folders")
        names = {c.name for c in cases}
        if self.val:
            missing = [v for v in self.val if v not in names]
            if missing:
                raise TrainingJobError(f"validation cases {missing} are not folders of {self.images}")
            if len(names - set(self.val)) < 1:
                raise TrainingJobError("every case is a validation case; nothing is left to train on")
        if self.minutes <= 0 and self.max_steps <= 0:
            raise TrainingJobError("give a positive --minutes budget or --max-steps")
        check_case_files(cases, [c.name for c in cases if not self.val or c.name not in self.val])
        self.output.mkdir(parents=True, exist_ok=True)
        self._checked = cases
        return cases

    def command(self) -> list[str]:
        cases = [c.name for c in gt_case_dirs(self.images)]
        train = [c for c in cases if not self.val or c not in self.val]
        cmd = [self.python, "-u", "-m", "LesionSegLib.engine.learn.train_seg", "-o", str(self.output),
               "--images", str(self.images), "--minutes", f"{self.minutes:g}", "--train", *train]
        cmd += ["--val", *(self.val or [])]
        if self.max_steps:
            cmd += ["--max-steps", str(self.max_steps)]
        return cmd + self.extra

    def _parse(self, line: str) -> None:
        s = line.strip()
        if s.startswith("done:"):
            self.status = s
            self.fraction = 1.0
        elif LOADED_RE.match(s):
            self._t_loaded = time.time()
            self.status = "training"
        elif (m := STEP_RE.match(s)) is not None:
            self.step = int(m.group(1))
            self.loss = float(m.group(3))
            self.status = f"step {self.step}, loss {self.loss:.4f}" + (f", val Dice {self.val_dice:.3f}" if self.val_dice is not None else "")
            self._update_fraction(float(m.group(2)) / max(self.minutes, 1e-9))
        elif (m := DICE_RE.search(s)) is not None:
            self.val_dice = float(m.group(1))

    def _update_fraction(self, by_log: float = 0.0) -> None:
        f = by_log
        if self._t_loaded is not None and self.minutes > 0:
            f = max(f, (time.time() - self._t_loaded) / (self.minutes * 60.0))
        if self.max_steps:
            f = max(f, self.step / self.max_steps)
        self.fraction = max(self.fraction, min(0.99, f))

    def _tick(self) -> None:
        if self._t_loaded is not None and not self.status.startswith("done"):
            self._update_fraction()
        elif self.status == "starting":
            self.status = "loading cases"

    def cancel(self, grace: float = 3.0) -> None:
        super().cancel(grace)
        if self.cancelled and not (self.output / "segmenter.json").exists():
            (self.output / "segmenter.safetensors").unlink(missing_ok=True)  # a checkpoint without its description is no model

    def _finished(self, rc: int) -> None:
        if rc == 0 and not self.cancelled and not (self.output / "segmenter.json").exists():
            self.error = f"training ended without writing {self.output / 'segmenter.json'}"
        super()._finished(rc if self.error is None else 1)


class RetrainJob(ChildProcessJob):
    """``lesionseg retrain ... --progress json`` in a child process; :attr:`result` is its
    final ``done`` event (model id, folder, metrics, label counts)."""

    def __init__(self, feedback: str | os.PathLike | None, base_model: str | None = None,
                 include_gt: str | os.PathLike | None = None, output: str | None = None, folds: int = 5,
                 mode: str = "head", min_labels: int | None = None, min_per_class: int | None = None,
                 gt_cases: Sequence[str] | None = None, gt_prob_thresholds: Sequence[float] | None = None,
                 activate: bool = False, extra: Sequence[str] = (), **kw):
        super().__init__(**kw)
        self.args = ["retrain", "--progress", "json", "--folds", str(int(folds)), "--mode", mode]
        if feedback:
            self.args += ["--feedback", str(feedback)]
        if base_model:
            self.args += ["--base-model", str(base_model)]
        if include_gt:
            self.args += ["--include-gt", str(include_gt)]
        if gt_cases:
            self.args += ["--gt-cases", *gt_cases]
        if gt_prob_thresholds:
            self.args += ["--gt-prob-threshold", *[f"{t:g}" for t in gt_prob_thresholds]]
        if output:
            self.args += ["-o", str(output)]
        if min_labels is not None:
            self.args += ["--min-labels", str(int(min_labels))]
        if min_per_class is not None:
            self.args += ["--min-per-class", str(int(min_per_class))]
        if activate:
            self.args.append("--activate")
        self.args += list(extra)
        self.result: dict | None = None

    def command(self) -> list[str]:
        return [self.python, "-u", "-m", "LesionSegLib.engine.cli", *self.args]

    def _parse(self, line: str) -> None:
        if not line.startswith("{"):
            return
        ev = json.loads(line)
        kind = ev.get("event")
        if kind == "progress":
            self.fraction = max(self.fraction, min(1.0, float(ev.get("fraction", 0.0))))
            self.status = str(ev.get("stage", ""))
        elif kind == "done":
            self.result = ev
            self.fraction = 1.0
            self.status = f"done: {ev.get('model')}"
        elif kind == "error":
            self.error = str(ev.get("message", "retraining failed"))

    def _tick(self) -> None:
        if self.status == "starting":
            self.status = "starting (loading the engine)"

    def _finished(self, rc: int) -> None:
        if rc == 0 and not self.cancelled and self.result is None:
            self.error = "retraining ended without a result"
        super()._finished(rc if self.error is None else (rc or 1))


def register_segmenter(seg_dir: str | os.PathLike, base_model: str | None, output: str | None) -> models.ModelCard:
    """A new model version: the segmenter trained in ``seg_dir`` plus ``base_model``'s classifier
    (copied; retrain it on the new segmenter's clusters with ``lesionseg retrain --include-gt``).

    The card holds the new segmenter's own training data and validation (Dice on the model grid
    from its training run); the classifier is marked as inherited, and the parent is a link only."""
    import hashlib

    from ..common import utc_now
    from .model_writer import inherited, parent_link, write_version

    seg_dir = Path(seg_dir)
    cfg_path = seg_dir / "segmenter.json"
    if not cfg_path.exists():
        raise TrainingJobError(f"{seg_dir} has no segmenter.json (did the training finish?)")
    try:
        seg_cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        weights = models.confined(seg_dir, seg_cfg["file"], "segmenter file")
        blob = weights.read_bytes()
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise TrainingJobError(f"{cfg_path} is not a usable segmenter description: {exc}") from None
    if hashlib.sha256(blob).hexdigest() != seg_cfg.get("sha256"):
        raise ModelError(f"{weights} does not match the sha256 in {cfg_path}")
    parent, name, version, folder = check_register_name(output, base_model)
    training = seg_cfg.pop("training", {})
    dice = training.get("final_val_dice_model_grid") or {}

    def build(tmp: Path) -> dict:
        sections, files = inherited(parent, tmp, keys=("classifier",))
        (tmp / "segmenter.safetensors").write_bytes(blob)
        files["segmenter.safetensors"] = seg_cfg["sha256"]
        return {
            **sections,
            "name": name,
            "version": version,
            "created": utc_now(),
            "description": f"segmenter retrained from {seg_dir}; classifier inherited from {parent.id} (retrain it)",
            "segmenter": {**seg_cfg, "file": "segmenter.safetensors"},
            "parent": parent_link(parent),
            "data": {k: training[k] for k in ("images", "train_cases", "val_cases") if k in training},
            "validation": {
                "segmenter_dice_model_grid": dice,
                "what": "Dice of the segmenter alone on its validation cases, on the model grid, from its training run; "
                        f"the confidence classifier was trained for {parent.id}'s segmenter and is not validated with this one",
            },
            "metrics": {"val_dice_model_grid": sum(dice.values()) / len(dice)} if dice else {},
            "training": {"segmenter": training},
            "files": files,
        }

    return write_version(folder, build)

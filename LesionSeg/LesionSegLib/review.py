"""Review decisions (accept / reject / unsure) and the sinks that record them.

The LesionSeg module calls :meth:`DecisionRecorder.record` for every decision.  Sinks plug in
with :meth:`DecisionRecorder.add_sink`; the feedback store (``LesionSegLib.engine.feedback``)
is one.  Decisions also persist in the scene (segment tags) and in exported files, so nothing
depends on a sink being present.  A failing sink never loses the decision for the others: the
error is kept in :attr:`DecisionRecorder.errors` and raised after all sinks ran.

Pure Python (no Slicer, no Qt).
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import getpass
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

DECISIONS = ("accepted", "rejected", "unsure")


@dataclass
class Decision:
    case_name: str
    #: content hash of the voxels and geometry (see ``engine.pipeline.case_hash``)
    case_hash: str
    lesion_id: int
    decision: str  # one of DECISIONS
    confidence: float  # confidence shown when the decision was made
    model_id: str  # "name@version"
    centroid_lps: tuple[float, float, float] = (0.0, 0.0, 0.0)
    volume_ml: float = 0.0
    diameter_mm: float = 0.0
    bbox_ijk: tuple = ((0, 0, 0), (0, 0, 0))
    #: classifier inputs: tabular features and the adaptive patch (channels, z, y, x)
    features: dict[str, float] = field(default_factory=dict)
    patch: np.ndarray | None = None
    reviewer: str = ""
    timestamp: str = ""

    def __post_init__(self):
        if self.decision not in DECISIONS:
            raise ValueError(f"decision must be one of {DECISIONS}, not {self.decision!r}")
        if not self.timestamp:
            self.timestamp = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


class DecisionSink(Protocol):
    def record(self, decision: Decision) -> None: ...


class DecisionRecorder:
    """Fan-out of decisions to sinks; keeps an in-memory log of this session's decisions.

    The log holds the last :attr:`LOG_LIMIT` decisions without their patches (a patch is ~192 KiB;
    the sinks get the full decision), so a long review session does not grow without bound.
    """

    LOG_LIMIT = 1000

    def __init__(self, reviewer: str | None = None):
        self.sinks: list[DecisionSink] = []
        self.log: list[Decision] = []
        self.errors: list[str] = []
        try:
            self.reviewer = reviewer if reviewer is not None else getpass.getuser()
        except Exception:  # no user name in some sandboxes
            self.reviewer = ""

    def add_sink(self, sink: DecisionSink) -> None:
        if sink not in self.sinks:
            self.sinks.append(sink)

    def remove_sink(self, sink: DecisionSink) -> None:
        if sink in self.sinks:
            self.sinks.remove(sink)

    def record(self, decision: Decision) -> None:
        if not decision.reviewer:
            decision.reviewer = self.reviewer
        self.log.append(dataclasses.replace(decision, patch=None))
        del self.log[:-self.LOG_LIMIT]
        failures = []
        for sink in self.sinks:
            try:
                sink.record(decision)
            except Exception as exc:  # one broken sink must not stop the others
                failures.append(f"{type(sink).__name__}: {exc}")
        if failures:
            self.errors.extend(failures)
            raise RuntimeError("decision kept in the scene, but a sink failed: " + "; ".join(failures))

"""Review decisions (accept / reject / unsure), the review queue, and the sinks that record them.

The LesionSeg module calls :meth:`DecisionRecorder.record` for every decision.  Sinks plug in
with :meth:`DecisionRecorder.add_sink`; the feedback store (``LesionSegLib.engine.feedback``)
is one.  Decisions also persist in the scene (segment tags) and in exported files, so nothing
depends on a sink being present.  A failing sink never loses the decision for the others: the
error is kept in :attr:`DecisionRecorder.errors` and raised after all sinks ran.

The review queue (:func:`review_queue`) orders the lesions the reviewer steps through:

* ``confidence``: highest confidence first (what the model is surest of);
* ``uncertainty``: most uncertain first, i.e. confidence nearest the threshold, or the highest
  out-of-distribution score when the lesions carry one (``ood_score``), as active learning
  suggests;
* ``size``: largest volume first.

Each decision records its 1-based position in the queue, the queue length, the order and the
seconds spent on the lesion (:class:`ReviewClock`: from the moment it was shown).

Pure Python (no Slicer, no Qt).
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import getpass
import time
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

DECISIONS = ("accepted", "rejected", "unsure")
#: review orders (see the module docstring), the first is the default
REVIEW_ORDERS = ("confidence", "uncertainty", "size")


def review_queue(lesions: list[dict], order: str = "confidence", threshold: float = 0.5) -> list[int]:
    """Lesion ids of ``lesions`` (records with ``lesion_id``, ``confidence``, ``volume_ml`` and
    optionally ``ood_score``) in review order; ties keep the lower id first."""
    if order == "confidence":
        key = lambda d: (-d["confidence"], d["lesion_id"])  # noqa: E731
    elif order == "uncertainty":
        if any(d.get("ood_score") is not None for d in lesions):
            key = lambda d: (-(d.get("ood_score") or 0.0), abs(d["confidence"] - threshold), d["lesion_id"])  # noqa: E731
        else:
            key = lambda d: (abs(d["confidence"] - threshold), -d["confidence"], d["lesion_id"])  # noqa: E731
    elif order == "size":
        key = lambda d: (-d["volume_ml"], d["lesion_id"])  # noqa: E731
    else:
        raise ValueError(f"review order must be one of {REVIEW_ORDERS}, not {order!r}")
    return [int(d["lesion_id"]) for d in sorted(lesions, key=key)]


def next_unreviewed(queue: list[int], reviewed: set[int], current: int | None) -> int | None:
    """The first lesion after ``current`` in ``queue`` (wrapping) without a decision, or None."""
    if not queue:
        return None
    start = queue.index(current) + 1 if current in queue else 0
    for k in range(len(queue)):
        lesion = queue[(start + k) % len(queue)]
        if lesion not in reviewed:
            return lesion
    return None


class ReviewClock:
    """Seconds each lesion was on screen before its decision (reset when it is shown again)."""

    def __init__(self, clock=time.monotonic):
        self._clock = clock
        self._shown: dict[tuple[str, int], float] = {}

    def shown(self, case: str, lesion_id: int) -> None:
        self._shown[(case, int(lesion_id))] = self._clock()

    def seconds(self, case: str, lesion_id: int) -> float:
        """Time since the lesion was shown (0 when it never was, e.g. a scripted decision)."""
        start = self._shown.get((case, int(lesion_id)))
        return max(0.0, self._clock() - start) if start is not None else 0.0


@dataclass
class Decision:
    case_name: str
    #: content hash of the voxels and geometry (see ``engine.segment.pipeline.case_hash``)
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
    #: review queue: 1-based position of the lesion when decided (0 = unknown), queue length, order
    queue_position: int = 0
    queue_length: int = 0
    review_order: str = ""
    #: seconds the lesion was shown before the decision
    seconds: float = 0.0

    @classmethod
    def from_lesion(cls, case_name: str, case_hash: str, model_id: str, lesion, decision: str, reviewer: str = "") -> "Decision":
        """The decision ``decision`` on ``lesion`` (an engine ``Lesion``) of a result of ``model_id`` on
        the scan ``case_hash`` (``engine.segment.pipeline.case_hash``): what review records about it."""
        return cls(case_name, case_hash, lesion.lesion_id, decision, lesion.confidence, model_id,
                   centroid_lps=lesion.centroid_lps, volume_ml=lesion.volume_ml, diameter_mm=lesion.diameter_mm,
                   bbox_ijk=lesion.bbox_ijk, features=dict(lesion.features), patch=lesion.patch, reviewer=reviewer)

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

"""The LesionSeg module logic (no Qt): segment, review, navigate, export, reopen saved reviews.

``LesionSeg.py``'s ``LesionSegLogic`` is this class plus Slicer's ScriptedLoadableModuleLogic;
it works headless on any ``vtkMRMLScene`` reachable as ``slicer.mrmlScene``::

    logic = LesionSegLogicCore()
    seg_node, table_node = logic.segment(volume_node)          # engine in this process
    logic.set_threshold(seg_node, 0.7)                          # hide lesions below 0.7
    logic.set_review_order(seg_node, "uncertainty")             # queue: most uncertain first
    logic.review(seg_node, 1, "accepted")                       # status, colour, tags, recorder
    logic.export(seg_node, "/tmp/out")                          # .seg.nrrd, NIfTI, CSV, DICOM SEG
    logic.reopen(seg_node)                                      # a result from a saved scene

The GUI runs the engine in a child process instead (:meth:`start_background`), then turns the
finished run into nodes with :meth:`add_result`; both paths create the nodes the same way.

Everything a review needs lives in the scene (segment tags, the table, the classifier patches
in a text node), so a scene saved with a LesionSeg result and opened again can be reviewed
further and feeds the same feedback store (:meth:`reopen`).
"""
from __future__ import annotations

import logging
import os

import slicer

from . import export as _export
from . import mrml, settings
from .review import Decision, DecisionRecorder, ReviewClock

log = logging.getLogger("LesionSeg")


class LesionSegLogicCore:
    def __init__(self, recorder: DecisionRecorder | None = None):
        self.recorder = recorder or DecisionRecorder()
        self.clock = ReviewClock()
        self._engines: dict = {}
        self.feedback_store = None
        self._dicom_files: dict = {}

    # ------------------------------------------------------------------------ models
    @staticmethod
    def available_models() -> list:
        """Model cards in the registry (reading them needs no torch)."""
        from .engine.models import list_models

        return list_models()

    @staticmethod
    def model_card(model=None):
        from .engine.models import get_card

        return get_card(model)

    @staticmethod
    def active_model_id() -> str:
        from .engine.models import active_model_id

        return active_model_id()

    def engine(self, model=None, device: str = "auto"):
        """A loaded engine, cached per (model, device)."""
        from .engine.segment.pipeline import load_engine

        key = (str(model or ""), device)
        if key not in self._engines:  # a model that cannot be loaded is a ModelError naming it (never blamed on the CT)
            self._engines[key] = load_engine(model, device)
        return self._engines[key]

    # ----------------------------------------------------------------------- segment
    def segment(self, volume_node, model=None, device: str = "auto", threshold: float | None = None,
                progress=None, cancel=None, keep_threshold: float = 0.0, name: str | None = None):
        """Segment ``volume_node`` in this process; returns ``(segmentation_node, table_node)``.

        Every candidate with confidence >= ``keep_threshold`` (default: all) becomes a segment;
        those below ``threshold`` (default: the model's) are hidden, so the threshold can be
        moved later without recomputing.
        """
        from .engine.segment.pipeline import case_hash

        image = mrml.volume_to_sitk(volume_node)
        engine = self.engine(model, device)
        result = engine.segment(image, threshold=keep_threshold, progress=progress, cancel=cancel,
                                keep_patches=True, source=volume_node.GetName())
        shown = engine.default_threshold if threshold is None else float(threshold)
        return self.add_result(volume_node, result, case_hash(image), threshold=shown, name=name,
                               region=mrml.anatomic_region(engine.card.data))

    def add_result(self, volume_node, result, case_hash: str = "", threshold: float | None = None, name: str | None = None,
                   region: tuple | None = None):
        """Turn an engine result into a segmentation node and its lesion table (beside the volume
        in the subject hierarchy).  Both appear together or not at all."""
        scene = volume_node.GetScene() or slicer.mrmlScene
        seg_node = mrml.create_segmentation_node(volume_node, result, case_hash, name=name, threshold=threshold,
                                                 scene=scene, region=region)
        try:
            table = mrml.create_table_node(seg_node, scene=scene)
            from . import corrections, ood

            ood.annotate(seg_node, result)  # the scan's OOD score and warning, shown above the lesion table

            corrections.remember_proposals(seg_node)  # what "Save corrections" diffs against
        except Exception:
            mrml.remove_result_nodes(seg_node, scene)
            raise
        self.show_only(seg_node)  # a new result is not drawn over an earlier one of the volume (kept, hidden)
        return seg_node, table

    @staticmethod
    def show_only(segmentation_node) -> None:
        """Show ``segmentation_node`` and hide the other LesionSeg results of its volume, so two
        passes on one scan are never drawn over each other; the result selector switches back."""
        volume = mrml.reference_volume(segmentation_node)
        for node in mrml.lesion_segmentation_nodes(segmentation_node.GetScene()):
            display = node.GetDisplayNode()
            if display is not None and (node is segmentation_node or mrml.reference_volume(node) is volume):
                display.SetVisibility(node is segmentation_node)

    def reopen(self, segmentation_node):
        """Make a result from a reopened scene (or from a module reload) reviewable: the lesion
        table is rebuilt from the segments' tags, decisions included; returns the table node."""
        if segmentation_node.GetAttribute(mrml.ATTR_ROLE) != "segmentation":
            raise ValueError(f"'{segmentation_node.GetName()}' is not a LesionSeg result")
        mrml.set_threshold(segmentation_node, mrml.get_threshold(segmentation_node), update_table=False)
        self.show_only(segmentation_node)
        return mrml.ensure_table_node(segmentation_node)

    # -------------------------------------------------------------------- background
    def start_background(self, volume_node, model=None, device: str = "auto", python: str | None = None, **kw):
        """Start the engine CLI on ``volume_node`` in a child process; returns the runner.

        Poll it (``runner.poll()``), then call :meth:`finish_background`.  Nothing is added to
        the scene before that.
        """
        from .runner import BackgroundSegmentation

        image = mrml.volume_to_sitk(volume_node)
        runner = BackgroundSegmentation(image, stem=volume_node.GetName(), model=model, device=device,
                                        threshold=kw.pop("keep_threshold", 0.0), python=python, **kw)
        runner.start()
        return runner

    def finish_background(self, runner, volume_node, threshold: float | None = None, name: str | None = None):
        """Nodes for a finished background run (temporary files are removed afterwards)."""
        try:
            result, case_hash = runner.load_result()
            card = self._card_data(runner.model)
            if threshold is None:
                threshold = float(card.get("confidence_threshold", 0.5))
            return self.add_result(volume_node, result, case_hash, threshold=threshold, name=name,
                                   region=mrml.anatomic_region(card))
        finally:
            runner.cleanup()

    @staticmethod
    def _card_data(model) -> dict:
        try:
            return dict(LesionSegLogicCore.model_card(model).data)
        except Exception:  # the card only adds the default threshold and the anatomic region
            return {}

    # ---------------------------------------------------------------------- display
    @staticmethod
    def set_threshold(segmentation_node, threshold: float) -> int:
        return mrml.set_threshold(segmentation_node, threshold)

    @staticmethod
    def set_review_order(segmentation_node, order: str) -> list[int]:
        """Order the review queue and the table rows; returns the queue (lesion ids)."""
        mrml.set_review_order(segmentation_node, order)
        return mrml.review_queue(segmentation_node)

    @staticmethod
    def table_node(segmentation_node):
        return mrml.get_table_node(segmentation_node)

    def jump_to_lesion(self, segmentation_node, lesion_id: int):
        """Centre the slice views on a lesion; its review time starts now."""
        ras = mrml.jump_to_lesion(segmentation_node, lesion_id)
        self.clock.shown(segmentation_node.GetID(), lesion_id)
        return ras

    # ----------------------------------------------------------------------- review
    def review(self, segmentation_node, lesion_id: int, decision: str) -> Decision:
        """Record a decision ('accepted', 'rejected', 'unsure') for one lesion.

        The scene is updated first (tags, segment status, colour, table; the lesion's queue
        position, the order and the seconds it was shown go to its tags too); then the decision
        goes to :attr:`recorder` and its sinks.  If a sink fails, the scene keeps the decision
        and the sink's error is raised.
        """
        if decision not in ("accepted", "rejected", "unsure"):
            raise ValueError(f"decision must be accepted, rejected or unsure, not {decision!r}")
        if mrml.lesion_info(mrml.find_segment(segmentation_node, lesion_id)[1])["erased"]:
            raise KeyError(f"lesion {lesion_id} has no voxel left (erased in the Segment Editor): nothing to decide on")
        queue = mrml.review_queue(segmentation_node)
        order = mrml.get_review_order(segmentation_node)
        position = queue.index(int(lesion_id)) + 1 if int(lesion_id) in queue else 0
        seconds = self.clock.seconds(segmentation_node.GetID(), lesion_id)
        info = mrml.set_review(segmentation_node, lesion_id, decision, queue_position=position, order=order, seconds=seconds)
        d = Decision(
            case_name=segmentation_node.GetAttribute(mrml.ATTR_CASE_NAME) or segmentation_node.GetName(),
            case_hash=info["case_hash"] or segmentation_node.GetAttribute(mrml.ATTR_CASE_HASH) or "",
            lesion_id=int(lesion_id),
            decision=decision,
            confidence=info["confidence"],
            model_id=info["model_id"] or segmentation_node.GetAttribute(mrml.ATTR_MODEL) or "",
            centroid_lps=tuple(info["key_centroid_lps"]),  # the proposal's: one lesion, one row, edited or not
            volume_ml=info["volume_ml"],
            diameter_mm=info["diameter_mm"],
            bbox_ijk=info["bbox_ijk"],
            features=dict(info["features"]),
            patch=mrml.lesion_patch(segmentation_node, lesion_id),
            queue_position=position,
            queue_length=len(queue),
            review_order=order,
            seconds=seconds,
        )
        self.recorder.record(d)
        return d

    @staticmethod
    def feedback_database_path(path=None):
        """``path``, else the database both LesionSeg modules use (see ``settings.feedback_database_path``)."""
        return settings.feedback_database_path(path)

    def enable_feedback_store(self, path=None):
        """Add the SQLite feedback store as a decision sink (``path``: see :meth:`feedback_database_path`)."""
        from .engine.feedback import FeedbackStore

        path = self.feedback_database_path(path)
        if self.feedback_store is not None:
            if getattr(self.feedback_store, "path", None) == path:
                return self.feedback_store
            self.disable_feedback_store()
        self.feedback_store = FeedbackStore(path)
        self.recorder.add_sink(self.feedback_store)
        return self.feedback_store

    def disable_feedback_store(self) -> None:
        if self.feedback_store is not None:
            self.recorder.remove_sink(self.feedback_store)
            if hasattr(self.feedback_store, "close"):
                self.feedback_store.close()
            self.feedback_store = None

    # ----------------------------------------------------------------------- export
    @staticmethod
    def dicom_source_files(volume_node) -> list[str]:
        return _export.dicom_source_files(volume_node)

    def result_dicom_files(self, segmentation_node) -> list[str]:
        """DICOM files of the result's input volume ([] when it did not come from DICOM); listed
        once per volume (and again when the volume changed), never raising."""
        volume = mrml.reference_volume(segmentation_node) if segmentation_node is not None else None
        if volume is None:
            return []
        key = (volume.GetID(), volume.GetMTime())
        if key not in self._dicom_files:
            try:
                files = self.dicom_source_files(volume)
            except Exception as exc:
                log.warning("cannot list DICOM source files: %s", exc)
                files = []
            self._dicom_files = {key: files}  # the last volume only
        return self._dicom_files[key]

    @staticmethod
    def export(segmentation_node, outdir, formats=_export.FORMATS, stem: str | None = None, include_hidden: bool = False,
               dicom_files=None, notes: list | None = None) -> dict:
        return _export.export_all(segmentation_node, os.fspath(outdir), stem=stem, formats=formats,
                                  include_hidden=include_hidden, dicom_files=dicom_files, notes=notes)

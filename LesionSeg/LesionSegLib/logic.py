"""The LesionSeg module logic (no Qt): segment, review, navigate, export.

``LesionSeg.py``'s ``LesionSegLogic`` is this class plus Slicer's ScriptedLoadableModuleLogic;
it works headless on any ``vtkMRMLScene`` reachable as ``slicer.mrmlScene``::

    logic = LesionSegLogicCore()
    seg_node, table_node = logic.segment(volume_node)          # engine in this process
    logic.set_threshold(seg_node, 0.7)                          # hide lesions below 0.7
    logic.review(seg_node, 1, "accepted")                       # status, colour, tags, recorder
    logic.export(seg_node, "/tmp/out")                          # .seg.nrrd, NIfTI, CSV, DICOM SEG

The GUI runs the engine in a child process instead (:meth:`start_background`), then turns the
finished run into nodes with :meth:`add_result`; both paths create the nodes the same way.
"""
from __future__ import annotations

import logging
import os

import slicer

from . import export as _export
from . import mrml
from .review import Decision, DecisionRecorder

log = logging.getLogger("LesionSeg")


class LesionSegLogicCore:
    def __init__(self, recorder: DecisionRecorder | None = None):
        self.recorder = recorder or DecisionRecorder()
        self._engines: dict = {}
        #: segmentation node id -> {lesion id: engine Lesion} (keeps the classifier patches)
        self._lesion_data: dict[str, dict] = {}
        self.feedback_store = None

    # ------------------------------------------------------------------------ models
    @staticmethod
    def available_models() -> list:
        """Model cards in the registry.

        Before torch is installed (the engine's ``models`` module imports it) the cards are read
        as plain JSON, so the widget can show them and offer the installation.
        """
        try:
            from .engine.models import list_models
        except ImportError as exc:
            log.info("engine not importable (%s): reading model cards as JSON", exc)
            return _lite_cards()
        return list_models()

    @staticmethod
    def model_card(model=None):
        try:
            from .engine.models import get_card
        except ImportError:
            return _lite_card(model)
        return get_card(model)

    @staticmethod
    def active_model_id() -> str:
        try:
            from .engine.models import active_model_id
        except ImportError:
            return "sts-clcs"
        return active_model_id()

    def engine(self, model=None, device: str = "auto"):
        """A loaded engine, cached per (model, device)."""
        from .engine.segment.pipeline import Engine

        key = (str(model or ""), device)
        if key not in self._engines:
            self._engines[key] = Engine(model, device)
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
        return self.add_result(volume_node, result, case_hash(image), threshold=shown, name=name)

    def add_result(self, volume_node, result, case_hash: str = "", threshold: float | None = None, name: str | None = None):
        """Turn an engine result into a segmentation node and its lesion table.

        Both nodes appear together or not at all: on any error the partial nodes are removed.
        """
        scene = volume_node.GetScene() or slicer.mrmlScene
        seg_node = mrml.create_segmentation_node(volume_node, result, case_hash, name=name, threshold=threshold, scene=scene)
        try:
            table = mrml.create_table_node(seg_node, scene=scene)
        except Exception:
            scene.RemoveNode(seg_node)
            raise
        self._lesion_data[seg_node.GetID()] = {les.lesion_id: les for les in result.lesions}
        return seg_node, table

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
            if threshold is None:
                threshold = self._default_threshold(runner.model)
            return self.add_result(volume_node, result, case_hash, threshold=threshold, name=name)
        finally:
            runner.cleanup()

    @staticmethod
    def _default_threshold(model) -> float:
        try:
            card = LesionSegLogicCore.model_card(model)
            return float(card.data.get("confidence_threshold", 0.5))
        except Exception:
            return 0.5

    # ---------------------------------------------------------------------- display
    @staticmethod
    def set_threshold(segmentation_node, threshold: float) -> int:
        return mrml.set_threshold(segmentation_node, threshold)

    @staticmethod
    def table_node(segmentation_node):
        return mrml.get_table_node(segmentation_node)

    @staticmethod
    def jump_to_lesion(segmentation_node, lesion_id: int):
        return mrml.jump_to_lesion(segmentation_node, lesion_id)

    # ----------------------------------------------------------------------- review
    def review(self, segmentation_node, lesion_id: int, decision: str) -> Decision:
        """Record a decision ('accepted', 'rejected', 'unsure') for one lesion.

        The scene is updated first (tag, segment status, colour, table); then the decision goes
        to :attr:`recorder` and its sinks.  If a sink fails, the scene keeps the decision and the
        sink's error is raised.
        """
        if decision not in ("accepted", "rejected", "unsure"):
            raise ValueError(f"decision must be accepted, rejected or unsure, not {decision!r}")
        info = mrml.set_review(segmentation_node, lesion_id, decision)
        les = self._lesion_data.get(segmentation_node.GetID(), {}).get(int(lesion_id))
        d = Decision(
            case_name=segmentation_node.GetAttribute(mrml.ATTR_CASE_NAME) or segmentation_node.GetName(),
            case_hash=info["case_hash"] or segmentation_node.GetAttribute(mrml.ATTR_CASE_HASH) or "",
            lesion_id=int(lesion_id),
            decision=decision,
            confidence=info["confidence"],
            model_id=info["model_id"] or segmentation_node.GetAttribute(mrml.ATTR_MODEL) or "",
            centroid_lps=tuple(info["centroid_lps"]),
            volume_ml=info["volume_ml"],
            diameter_mm=info["diameter_mm"],
            bbox_ijk=info["bbox_ijk"],
            features=dict(les.features) if les is not None and les.features else dict(info["features"]),
            patch=les.patch if les is not None else None,
        )
        self.recorder.record(d)
        return d

    @staticmethod
    def feedback_database_path(path=None):
        """``path``, else the default feedback database: ``<Slicer settings folder>/LesionSeg/feedback.db``
        inside Slicer (the LesionSegTraining module's default too), else ``$LESIONSEG_FEEDBACK`` or
        ``~/.lesionseg/feedback.db``."""
        from pathlib import Path

        from .engine import feedback

        if path:
            return Path(path).expanduser()
        settings = getattr(getattr(slicer, "app", None), "slicerUserSettingsFilePath", None)
        if isinstance(settings, str) and settings and not os.environ.get("LESIONSEG_FEEDBACK"):
            return Path(settings).expanduser().parent / "LesionSeg" / "feedback.db"  # (was a removed engine helper)
        return feedback.default_path()

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

    @staticmethod
    def export(segmentation_node, outdir, formats=_export.FORMATS, stem: str | None = None, include_hidden: bool = False,
               dicom_files=None) -> dict:
        return _export.export_all(segmentation_node, os.fspath(outdir), stem=stem, formats=formats,
                                  include_hidden=include_hidden, dicom_files=dicom_files)

    # ------------------------------------------------------------------------ scene
    def forget(self, segmentation_node=None) -> None:
        """Drop the in-memory lesion data (patches) of one segmentation node, or of all."""
        if segmentation_node is None:
            self._lesion_data.clear()
        else:
            self._lesion_data.pop(segmentation_node.GetID(), None)


# ---------------------------------------------------------------------- torch-free cards
class _LiteCard:
    """The bits of ``engine.models.ModelCard`` the widget shows, without importing torch."""

    def __init__(self, folder, data):
        self.folder = folder
        self.data = data
        self.name = data.get("name", os.path.basename(str(folder)))
        self.version = str(data.get("version", "1"))
        self.id = f"{self.name}@{self.version}"

    def summary(self) -> str:
        return f"{self.id} {self.data.get('description', '')}".strip()


def _card_roots() -> list:
    from pathlib import Path

    builtin = Path(__file__).resolve().parent / "models"
    user = Path(os.environ.get("LESIONSEG_MODELS", Path.home() / ".lesionseg" / "models")).expanduser()
    return [builtin, user]


def _lite_cards() -> list:
    import json

    cards = []
    for root in _card_roots():
        if not root.exists():
            continue
        for path in sorted(root.glob("**/card.json")):
            try:
                data = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            if "name" in data:
                cards.append(_LiteCard(path.parent, data))
    return cards


def _lite_card(model=None):
    import json
    from pathlib import Path

    if model and Path(str(model), "card.json").exists():
        return _LiteCard(Path(str(model)), json.loads(Path(str(model), "card.json").read_text()))
    for card in _lite_cards():
        if model in (None, "", card.id, card.name) or card.name == "sts-clcs" and not model:
            return card
    raise LookupError(f"unknown model {model!r}")

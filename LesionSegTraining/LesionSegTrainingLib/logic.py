"""The LesionSegTraining module logic (MRML, no Qt).

``LesionSegTraining.py``'s ``LesionSegTrainingLogic`` is this class plus Slicer's
ScriptedLoadableModuleLogic; it works headless on any scene reachable as ``slicer.mrmlScene``::

    logic = TrainingLogicCore()
    logic.open_database("~/.lesionseg/feedback.db")      # FeedbackStoreError on a bad file
    stats_table = logic.update_statistics_table()         # decisions per model and class
    job = logic.start_retrain(base_model="sts-clcs")      # background process (RetrainJob)
    ...poll job.fraction / job.status, job.cancel()...
    summary, metrics_table, plot_png = logic.finish_retrain(job)
    logic.activate(summary["model"]); logic.rollback()
    seg_job = logic.start_segmenter_training("/data/cases", "/tmp/seg", minutes=30)

Results live in MRML table nodes (statistics, retraining metrics before/after, model versions)
and in the module's parameter node (database path, last retrained model, plot path).
"""
from __future__ import annotations

import logging
from pathlib import Path

import slicer
import vtk
from LesionSegLib.table import table_rows  # noqa: F401 (the one reader of a table node's rows, re-exported)
from LesionSegLib.engine.evaluate.report import format_cell

log = logging.getLogger("LesionSegTraining")

STATS_TABLE = "LesionSeg feedback statistics"
METRICS_TABLE = "LesionSeg retraining metrics"
VERSIONS_TABLE = "LesionSeg model versions"
ROLE_ATTR = "LesionSegTraining.Role"

PARAM_DATABASE = "FeedbackDatabase"
PARAM_LAST_MODEL = "LastRetrainedModel"
PARAM_PLOT = "LastValidationPlot"
PARAM_SEG_OUTPUT = "LastSegmenterOutput"


def default_database_path() -> Path:
    """The feedback database both LesionSeg modules use (``LesionSegLib.settings.feedback_database_path``:
    the user's choice, else ``$LESIONSEG_FEEDBACK``, else ``<Slicer settings folder>/LesionSeg/feedback.db``)."""
    from LesionSegLib import settings

    return settings.feedback_database_path()


def auc_text(metrics: dict | None) -> str:
    """A model's own cluster AUC, named by what it was measured on: "0.938 (CV, 40 reviewed)" for a
    retrained classifier, "1.000 (validation split)" for a model scored on held-out cases; "-"
    when its card has none of its own."""
    m = metrics or {}
    if m.get("retrain_cv_auc") is not None:
        n = m.get("n_labels")
        return f"{m['retrain_cv_auc']:.3f} (CV, {n} labels)" if n is not None else f"{m['retrain_cv_auc']:.3f} (CV)"
    if m.get("val_cluster_auc") is not None:
        return f"{m['val_cluster_auc']:.3f} (validation split)"
    return "-"


def fill_table(table_node, columns: list[str], rows: list[list]) -> None:
    """Replace the content of a table node with string columns ``columns`` and ``rows``."""
    was = table_node.StartModify()
    try:
        table_node.RemoveAllColumns()
        for name in columns:
            arr = vtk.vtkStringArray()
            arr.SetName(name)
            table_node.AddColumn(arr)
        vtable = table_node.GetTable()
        vtable.SetNumberOfRows(len(rows))
        for c, name in enumerate(columns):
            arr = vtable.GetColumnByName(name)
            arr.SetNumberOfValues(len(rows))
            for r, row in enumerate(rows):
                arr.SetValue(r, format_cell(row[c], missing="-"))
            arr.Modified()
        vtable.Modified()
        if hasattr(table_node, "SetUseColumnTitleAsColumnHeader"):
            table_node.SetUseColumnTitleAsColumnHeader(True)
        elif hasattr(table_node, "SetUseColumnNameAsColumnHeader"):
            table_node.SetUseColumnNameAsColumnHeader(True)
        table_node.Modified()
    finally:
        table_node.EndModify(was)


class TrainingLogicCore:
    def __init__(self):
        self.store = None
        self.database_path: Path | None = None

    # ------------------------------------------------------------------ MRML helpers
    @staticmethod
    def _table(role: str, name: str):
        """The module's table node of ``role`` (created once per scene, locked against edits)."""
        scene = slicer.mrmlScene
        nodes = scene.GetNodesByClass("vtkMRMLTableNode")
        nodes.UnRegister(None)
        for i in range(nodes.GetNumberOfItems()):
            node = nodes.GetItemAsObject(i)
            if node.GetAttribute(ROLE_ATTR) == role:
                return node
        node = scene.AddNewNodeByClass("vtkMRMLTableNode", name)
        node.SetAttribute(ROLE_ATTR, role)
        node.SetLocked(True)
        return node

    def parameter_node(self):
        """The module's parameter node (Slicer's, when the Slicer logic class provides it)."""
        get = getattr(self, "getParameterNode", None)
        if get is not None:
            node = get()
            return getattr(node, "parameterNode", node)  # the raw node behind a typed wrapper
        scene = slicer.mrmlScene
        node = scene.GetSingletonNode("LesionSegTraining", "vtkMRMLScriptedModuleNode")
        if node is None:
            node = scene.CreateNodeByClass("vtkMRMLScriptedModuleNode")
            node.UnRegister(None)
            node.SetSingletonTag("LesionSegTraining")
            node.SetName("LesionSegTraining")
            node.SetAttribute("ModuleName", "LesionSegTraining")
            node = scene.AddNode(node)
        return node

    def _set_param(self, key: str, value) -> None:
        self.parameter_node().SetParameter(key, "" if value is None else str(value))

    # ------------------------------------------------------------------ feedback database
    def open_database(self, path=None):
        """Open (or create) the feedback database at ``path`` (default: :func:`default_database_path`).

        Raises ``FeedbackStoreError`` for a corrupt, foreign or newer file, which stays untouched.
        """
        from LesionSegLib.engine.feedback import FeedbackStore

        p = Path(path).expanduser() if path else default_database_path()
        store = FeedbackStore(p)
        if self.store is not None:
            self.store.close()
        self.store = store
        self.database_path = p
        self._set_param(PARAM_DATABASE, p)
        return store

    def close_database(self) -> None:
        if self.store is not None:
            self.store.close()
        self.store = None

    def statistics(self) -> dict:
        if self.store is None:
            return {}
        return self.store.stats()

    def update_statistics_table(self):
        """Decisions per model and class in a table node (last row: all models)."""
        stats = self.statistics()
        rows = []
        for model, c in sorted(stats.get("by_model", {}).items()):
            rows.append([model, c["accepted"], c["rejected"], c["unsure"], sum(c.values())])
        if stats:
            t = stats["by_class"]
            rows.append(["all models", t["accepted"], t["rejected"], t["unsure"], stats["decisions"]])
        table = self._table("statistics", STATS_TABLE)
        fill_table(table, ["Model", "Accepted", "Rejected", "Unsure", "Total"], rows)
        return table

    @staticmethod
    def statistics_text(stats: dict) -> str:
        if not stats:
            return "No feedback database open."
        return (f"{stats['decisions']} decisions on {stats['cases']} case(s) by {stats['reviewers']} reviewer(s); "
                f"{stats['changes']} changed; last {stats['last_decision'] or '-'}")

    # ------------------------------------------------------------------ model versions
    @staticmethod
    def model_versions() -> list[dict]:
        from LesionSegLib.engine.learn import versions

        return versions.list_versions()

    @staticmethod
    def active_model_id() -> str:
        """Full id (name@version) of the active model."""
        from LesionSegLib.engine.learn import versions

        return versions.active_id()

    def update_versions_table(self):
        rows = []
        for v in self.model_versions():
            rows.append([v["id"], "yes" if v["active"] else "", v["parent"] or "", v["created"] or ("builtin" if v["builtin"] else ""),
                         auc_text(v["metrics"])])
        table = self._table("versions", VERSIONS_TABLE)
        fill_table(table, ["Model", "Active", "Parent", "Created", "AUC"], rows)
        return table

    def activate(self, model_id: str) -> str:
        from LesionSegLib.engine.learn import versions

        active = versions.activate(model_id)
        self.update_versions_table()
        return active

    def rollback(self) -> str:
        from LesionSegLib.engine.learn import versions

        active = versions.rollback()
        self.update_versions_table()
        return active

    # ------------------------------------------------------------------ retraining
    def start_retrain(self, base_model: str | None = None, include_gt=None, output: str | None = None,
                      folds: int = 5, use_feedback: bool = True, **kw):
        """Start ``lesionseg retrain`` in a background process on the open database."""
        from LesionSegLib.engine.learn.jobs import RetrainJob

        if use_feedback and self.store is None:
            raise RuntimeError("open a feedback database first")
        feedback = str(self.database_path) if use_feedback else None
        if not feedback and not include_gt:
            raise RuntimeError("nothing to learn from: use the feedback database and/or a ground-truth folder")
        if include_gt and not Path(include_gt).is_dir():
            raise RuntimeError(f"ground-truth folder {include_gt} does not exist")
        job = RetrainJob(feedback, base_model or None, include_gt or None, output or None, folds=folds, **kw)
        return job.start()

    def finish_retrain(self, job):
        """After a finished :class:`RetrainJob`: the metrics table (before/after), the plot, params.

        Returns ``(result dict, metrics table node, plot path or None)``.
        """
        state = job.state
        if state != "finished":
            raise RuntimeError(f"retraining {state}: {job.error or job.status}")
        res = job.result
        m = res["metrics"]
        old, new = m["old"], m["new"]
        rows = [
            ["AUC (TP vs FP)", old["auc"], new["auc"]],
            ["ECE (10 bins)", old["ece"], new["ece"]],
            ["Brier score", old["brier"], new["brier"]],
            ["Lesions scored", old["n"], new["n"]],
        ]
        table = self._table("metrics", METRICS_TABLE)
        fill_table(table, ["Metric", "Before", "After"], rows)
        table.SetAttribute("LesionSegTraining.Model", res["model"])
        table.SetAttribute("LesionSegTraining.Validation", m["validation"])
        plot = Path(res["folder"]) / "validation.png"
        self._set_param(PARAM_LAST_MODEL, res["model"])
        self._set_param(PARAM_PLOT, plot if plot.exists() else "")
        self.update_versions_table()
        return res, table, (plot if plot.exists() else None)

    # ------------------------------------------------------------------ segmenter training
    def start_segmenter_training(self, images, output, minutes: float = 45.0, max_steps: int = 0, val=None, **kw):
        from LesionSegLib.engine.learn.jobs import SegmenterTrainingJob

        job = SegmenterTrainingJob(images, output, minutes=minutes, max_steps=max_steps, val=val, **kw)
        job.start()
        self._set_param(PARAM_SEG_OUTPUT, output)
        return job

    def finish_segmenter_training(self, job, register: str | None = None, base_model: str | None = None):
        """After a finished job: optionally register the segmenter as a new model version (card)."""
        state = job.state
        if state != "finished":
            raise RuntimeError(f"segmenter training {state}: {job.error or job.status}")
        if not register:
            return None
        from LesionSegLib.engine.learn.jobs import register_segmenter

        card = register_segmenter(job.output, base_model or None, register)
        self.update_versions_table()
        return card

"""Qt helpers shared by the LesionSeg and LesionSegTraining widgets (the widget side: this file
uses ``qt``; the MRML logic never imports it).

* :class:`LogBox`: the collapsible log of a panel (engine stderr, progress, errors) and the error
  dialog that shows a one-line summary with the full log as its detailed text.
* :class:`Shortcuts`: application-wide single-letter shortcuts, installed only while the module
  is shown (``enter``/``exit``), so they never shadow Slicer's view keys in other modules.
* :func:`reload_package`: ``onReload`` support, re-imports ``LesionSegLib`` (engine subpackages
  included) in dependency order with ``importlib.reload``.
* :class:`AddLesionTool` (the "Add lesion" button: one click in a slice view, :mod:`.placement`,
  then :func:`.click.add_lesion`), :func:`save_corrections_from_panel` ("Save corrections") and
  :func:`save_corrections_on_close` (the scene-close question).
"""
from __future__ import annotations

import importlib
import logging
import sys
import time

import qt
import slicer
import vtk
from slicer.i18n import tr as _

log = logging.getLogger("LesionSeg")


class LogBox:
    """A read-only ``QPlainTextEdit`` holding a panel's log, bounded to ``max_lines`` lines."""

    def __init__(self, text_edit, collapsible=None, max_lines: int = 5000):
        self.edit, self.collapsible = text_edit, collapsible
        self.edit.setReadOnly(True)
        self.edit.setMaximumBlockCount(max_lines)

    def append(self, lines, stamp: bool = False) -> None:
        if isinstance(lines, str):
            lines = [lines]
        for line in lines:
            line = str(line).rstrip()
            if line:
                self.edit.appendPlainText((time.strftime("%H:%M:%S ") if stamp else "") + line)

    def text(self) -> str:
        return self.edit.toPlainText()

    def clear(self) -> None:
        self.edit.clear()

    def show_error(self, summary: str, details: str | None = None, title: str | None = None) -> None:
        """Error dialog: the one-line ``summary``, the full log (or ``details``) as detailed text."""
        self.append("error: " + summary, stamp=True)
        if self.collapsible is not None:
            self.collapsible.setProperty("collapsed", False)
        slicer.util.errorDisplay(summary, windowTitle=title or _("LesionSeg"), detailedText=details if details is not None else self.text())


class Shortcuts:
    """Single-letter shortcuts on Slicer's main window, present only between :meth:`install` and :meth:`remove`."""

    def __init__(self, bindings, fallback_parent=None):
        self.bindings = list(bindings)  # (key, callable)
        self.fallback_parent = fallback_parent
        self.active: list = []

    def _parent(self):
        try:
            main = slicer.util.mainWindow()
        except Exception:
            main = None
        return main if main is not None else self.fallback_parent

    def install(self) -> None:
        if self.active:
            return
        parent = self._parent()
        for key, callback in self.bindings:
            shortcut = qt.QShortcut(qt.QKeySequence(key), parent)
            shortcut.activated.connect(callback)
            self.active.append(shortcut)

    def remove(self) -> None:
        for shortcut in self.active:
            shortcut.setParent(None)
            shortcut.deleteLater()
        self.active = []


def _dependencies(module, names: set[str]) -> set[str]:
    """The modules among ``names`` whose objects ``module`` holds (its ``import``/``from`` imports)."""
    out = set()
    for value in vars(module).values():
        owner = value.__name__ if isinstance(value, type(sys)) else getattr(value, "__module__", None)
        if owner in names and owner != module.__name__:
            out.add(owner)
    return out


def reload_package(package: str = "LesionSegLib") -> list[str]:
    """``importlib.reload`` every loaded module of ``package``, each after the modules whose
    functions and classes it holds; returns the names in the order they were reloaded.

    Constants imported by name (``from .review import REVIEW_ORDERS``) do not tell where they
    came from, so the ordered pass runs twice: the second pass re-imports them from modules
    that are all fresh already.
    """
    names = {n for n in sys.modules if (n == package or n.startswith(package + ".")) and sys.modules[n] is not None}
    deps = {n: _dependencies(sys.modules[n], names) for n in names}
    order, done = [], set()

    def visit(name, stack=()):
        if name in done or name in stack:
            return
        for dep in sorted(deps[name]):
            visit(dep, stack + (name,))
        done.add(name)
        order.append(name)

    for name in sorted(names, key=lambda n: (-n.count("."), n)):
        visit(name)
    for _pass in range(2):
        for name in order:
            importlib.reload(sys.modules[name])
    return order


def table_lesion_ids(view) -> list[int]:
    """Lesion ids in the order a lesion table view shows them (first column: the lesion id)."""
    model = view.model()
    out = []
    for row in range(model.rowCount()):
        try:
            out.append(int(float(model.index(row, 0).data())))
        except (TypeError, ValueError):
            continue
    return out


def style_color_bar(bar_label, accepted_label, rejected_label) -> None:
    """Paint the confidence colormap legend and the accepted / rejected swatches."""
    from . import mrml
    from .engine.segment.colors import ACCEPTED_COLOR, CONFIDENCE_STOPS, REJECTED_COLOR

    def rgb(c):
        return "rgb({}, {}, {})".format(*[int(round(255 * v)) for v in c])

    stops = ", ".join(f"stop:{pos:.2f} {rgb(color)}" for pos, color in CONFIDENCE_STOPS)
    bar_label.setStyleSheet(f"background: qlineargradient(x1:0, y1:0, x2:1, y2:0, {stops}); border: 1px solid #555;")
    bar_label.setToolTip(mrml.colormap_description())
    for label, color in ((accepted_label, ACCEPTED_COLOR), (rejected_label, REJECTED_COLOR)):
        label.setStyleSheet(f"background: {rgb(color)}; color: black; padding: 1px 4px;")


class DependencyInstaller:
    """The panel's side of ``dependencies``: ask (the optional fast runtimes in a question of their
    own, once a session), install (torch through PyTorchUtils), report in the log box, offer the
    restart the PyTorch extension or an upgraded imported package needs, and finish an installation
    that waited for that restart (asking again about anything not confirmed before it)."""

    def __init__(self, log_box: LogBox, status_label, on_installed=None):
        self.log_box = log_box
        self.status_label = status_label
        self.on_installed = on_installed
        self.runtimes_offered = False

    def ensure(self) -> bool:
        """True when every requirement is met (after installing, if the user agrees)."""
        from . import dependencies

        problems = dependencies.check()
        runtimes = [] if self.runtimes_offered else dependencies.runtimes_to_offer()
        if not problems and not runtimes:
            return True
        if problems and not slicer.util.confirmOkCancelDisplay(dependencies.confirmation_text(problems), windowTitle=_("LesionSeg: install dependencies")):
            self.status_label.setText(_("Segmentation needs {packages}.").format(packages=dependencies.describe(problems)))
            return False
        self.runtimes_offered = self.runtimes_offered or bool(runtimes)
        if runtimes and not slicer.util.confirmOkCancelDisplay(dependencies.runtimes_text(runtimes), windowTitle=_("LesionSeg: optional packages")):
            runtimes = dependencies.decline_runtimes(runtimes)  # remembered; returns []
        return self.install(problems, runtimes) if problems or runtimes else True

    def install(self, problems, runtimes=()) -> bool:
        from . import dependencies

        wanted = dependencies.describe(list(problems) + list(runtimes))
        self.status_label.setText(_("Installing {packages}...").format(packages=wanted))
        self.log_box.append("installing: " + wanted, stamp=True)
        slicer.app.processEvents()
        try:
            result = dependencies.install(problems, runtimes=runtimes)
        except Exception as exc:
            self.status_label.setText(_("Dependencies are missing."))
            self.log_box.show_error(_("Installing the LesionSeg dependencies failed: {error}").format(error=exc))
            return False
        self.log_box.append(result.message, stamp=True)
        if result.restart_required:
            self.status_label.setText(_("Restart Slicer to finish: {reason}.").format(reason=result.message))
            if slicer.util.confirmOkCancelDisplay(_("Slicer must restart: {reason}. Restart now?").format(reason=result.message)):
                slicer.util.restart()
            return False
        if self.on_installed is not None:
            self.on_installed()
        return True

    def resume(self) -> bool:
        """Continue the installation started before the restart (the pending-install marker);
        asks first when ``check`` reports more than the user confirmed then."""
        from . import dependencies, settings

        pending = dependencies.resume_pending()
        if pending is None:
            return False
        self.log_box.append(f"continuing the installation started before the restart ({pending.get('reason', '')})", stamp=True)
        problems, runtimes = dependencies.check(), dependencies.pending_runtimes(pending)
        new = dependencies.unconfirmed(problems, pending)
        if new and not slicer.util.confirmOkCancelDisplay(dependencies.confirmation_text(problems, new), windowTitle=_("LesionSeg: install dependencies")):
            settings.clear_pending_install()
            self.status_label.setText(_("Segmentation needs {packages}.").format(packages=dependencies.describe(problems)))
            return False
        if not problems and not runtimes:
            settings.clear_pending_install()
            return True
        return self.install(problems, runtimes)


def save_corrections_from_panel(widget) -> dict | None:
    """"Save corrections": diff the shown result against the model's proposals (edited, added,
    deleted and kept lesions) and save them with the image on the model grid into the feedback
    store, for ``lesionseg finetune``; returns the counts (None when nothing was saved)."""
    from . import corrections

    seg = widget.segmentationNode
    if seg is None:
        return None
    try:
        counts = corrections.save_corrections(seg, widget.logic.enable_feedback_store(), reviewer=widget.logic.recorder.reviewer)
    except Exception as exc:  # a bad edit or a full disk must not crash the panel
        widget.logBox.show_error(_("Saving corrections failed: {error}").format(error=exc), None)
        return None
    text = _("corrections saved: {counts}").format(counts=_counts_text(counts))
    widget.logBox.append(text, stamp=True)
    widget.ui.statusLabel.setText(text)
    return counts


def _counts_text(counts: dict) -> str:
    return ", ".join(f"{v} {k}" for k, v in counts.items())


def _one_line(text) -> str:
    return " ".join(str(text).split())


def save_corrections_on_close(widget) -> dict:
    """Scene close: when a result has unsaved corrections, ask whether to save them into the
    feedback store (Yes saves, No discards).  Nothing is asked when nothing is unsaved; an error
    is logged and never stops the close.  Returns ``{result name: counts}``."""
    from . import corrections

    def confirm(names) -> bool:
        return slicer.util.confirmYesNoDisplay(_("The corrections of {results} are not saved. Save them to the LesionSeg feedback store "
                                                 "(for fine-tuning) before the scene closes?").format(results=", ".join(names)),
                                               windowTitle=_("LesionSeg: save corrections"))

    try:
        store = widget.logic.feedback_store or widget.logic.feedback_database_path()  # opened only after a yes
        saved = corrections.save_on_close(store, confirm, reviewer=widget.logic.recorder.reviewer, scene=slicer.mrmlScene)
    except Exception as exc:  # the scene closes anyway
        log.exception("saving corrections on scene close failed")
        widget.logBox.append(_one_line(f"error: saving corrections on scene close failed: {exc}"), stamp=True)
        return {}
    for name, counts in saved.items():
        if "not saved" in counts:
            error = "error: " if counts.get("error") else ""
            widget.logBox.append(_one_line(f"{error}corrections of {name} not saved on scene close: {counts['not saved']}"), stamp=True)
        else:
            widget.logBox.append(f"corrections of {name} saved on scene close: {_counts_text(counts)}", stamp=True)
    return saved


def panel_feedback_store(widget):
    """The feedback store the panel records review decisions into (None while "Record feedback"
    is off): Accept / Reject / Unsure and Add lesion use it."""
    if widget._parameterNode.recordFeedback:
        try:
            store = widget.logic.enable_feedback_store()
            widget.ui.feedbackCheckBox.setToolTip(_("Decisions are also recorded in {path}").format(path=store.path))
            return store
        except Exception as exc:
            widget._parameterNode.recordFeedback = False
            slicer.util.warningDisplay(_("The feedback store cannot be opened; decisions stay in the scene and exports: {error}").format(error=exc))
    elif widget.logic.feedback_store is not None:
        widget.logic.disable_feedback_store()
    return None


class AddLesionTool:
    """"Add lesion": the button enters single-point place mode (:mod:`.placement`); the click in a
    slice view runs the model that made the shown result in this process on a crop around the point
    (:func:`.click.add_lesion`), which adds a segment with status ``added`` and records a missed
    lesion in the panel's feedback store.  Pressing the button again, Escape (leaving place mode),
    another result, leaving the module or closing the scene cancels."""

    def __init__(self, widget):
        from .placement import SinglePointPlacement

        self.widget = widget
        self.placement = SinglePointPlacement(self._on_change)

    @property
    def active(self) -> bool:
        return self.placement.active

    def toggle(self, *args) -> None:
        w = self.widget
        if self.active:
            self.cancel()
            return
        if not w.segmentationValid():
            self._set_button(False)
            return
        try:
            self.placement.start()
        except Exception as exc:
            self.placement.stop()
            self._set_button(False)
            w.logBox.show_error(_one_line(_("Cannot start placing a point: {error}").format(error=exc)), None)
            return
        self._set_button(True)
        w.ui.statusLabel.setText(_("Add lesion: click the missed lesion in a slice view (press Add lesion again to cancel)."))

    def cancel(self, quiet: bool = False) -> None:
        if not self.active:
            return
        self.placement.stop()
        self._set_button(False)
        if not quiet:
            self.widget.ui.statusLabel.setText(_("Add lesion cancelled."))

    def _set_button(self, checked: bool) -> None:
        self.widget.ui.addLesionButton.setChecked(checked)
        self.widget.updateGUI()

    def _on_change(self) -> None:
        # not inside the markups/interaction event: the temporary node is removed afterwards
        node = self.placement.node
        qt.QTimer.singleShot(0, lambda: self._finish(node))

    def _finish(self, node) -> None:
        if node is None or node is not self.placement.node:
            return  # this placement already ended
        ras = self.placement.point()
        if ras is None:
            self.cancel()
            return
        self.placement.stop()
        self._set_button(False)
        self.add(ras)

    def add(self, ras):
        """Add the lesion under ``ras`` to the shown result; returns its record (None on error)."""
        from . import click, mrml

        w = self.widget
        if not w.segmentationValid():
            return None
        seg = w.segmentationNode
        try:
            volume = mrml.reference_volume(seg)
            if volume is None:
                raise ValueError(f"'{seg.GetName()}' has no reference volume")
            device = w.currentDevice()
            engine = w.logic.engine(click.click_model(seg), device)
            info = click.add_lesion(volume, seg, ras, engine, store=panel_feedback_store(w), reviewer=w.logic.recorder.reviewer,
                                    fallback=click.click_fallback(engine, lambda name: w.logic.engine(name, device)))
        except Exception as exc:  # a point outside the volume, on air, no lesion there, a missing model
            w.logBox.show_error(_one_line(_("Cannot add a lesion there: {error}").format(error=exc)), None)
            w.ui.statusLabel.setText(_("No lesion added."))
            return None
        text = (_("{name} added: {volume_ml:.2f} ml, {diameter_mm:.1f} mm (recorded as a missed lesion)")
                if info["click_model"] == engine.card.id else
                _("{name} added: {volume_ml:.2f} ml, {diameter_mm:.1f} mm (recorded as a missed lesion); {engine_model} found no lesion "
                  "there, so {click_model} outlined it")).format_map(dict(info, engine_model=engine.card.id))
        w.logBox.append(text, stamp=True)
        w.selectLesion(info["lesion_id"])
        w.ui.statusLabel.setText(text)
        return info


class SegmentWatch:
    """Keeps the panel's lesion table in step with the segments as the Segment Editor (or Python)
    changes them: the table is rebuilt when segments are added or removed, and a current lesion
    that is gone is deselected, so Accept / Reject never act on a lesion that is not there.  A
    segment whose mask was painted or erased is measured again, and a segment drawn by hand becomes
    an added lesion (:mod:`.measure`); edits made while another result was shown are caught by
    :func:`.measure.refresh` when this one is shown."""

    EVENTS = ("SegmentAdded", "SegmentRemoved")

    def __init__(self, widget):
        self.widget = widget
        self.segmentation = None
        self.stamps: dict[str, int | None] = {}  # segment id -> its mask's modified time when last measured
        self.pending: set[str] = set()  # segments modified since the last flush
        self._busy = False

    def _observe(self, add: bool) -> None:
        method = self.widget.addObserver if add else self.widget.removeObserver
        for name in self.EVENTS:
            method(self.segmentation, getattr(slicer.vtkSegmentation, name), self.changed)
        method(self.segmentation, slicer.vtkSegmentation.SegmentModified, self.modified)

    def watch(self, node) -> None:
        from . import measure, mrml

        if self.segmentation is not None:
            self._observe(False)
        self.segmentation = node.GetSegmentation() if node is not None else None
        self.stamps, self.pending = {}, set()
        if self.segmentation is None:
            return
        self._observe(True)
        if mrml.reference_volume(node) is not None:
            self._guarded(lambda: measure.refresh(node))
        self.stamps = {self.segmentation.GetNthSegmentID(i): measure.stamp(node, self.segmentation.GetNthSegmentID(i))
                       for i in range(self.segmentation.GetNumberOfSegments())}

    def _guarded(self, work):
        """Run ``work`` with this watch's own tag changes ignored; an error is logged, never raised
        out of a VTK observer."""
        self._busy = True
        try:
            return work()
        except Exception as exc:  # noqa: BLE001 (an observer must not raise into VTK)
            log.error("LesionSeg: could not measure the edited lesion: %s", exc)
            return None
        finally:
            self._busy = False

    @vtk.calldata_type(vtk.VTK_STRING)
    def modified(self, caller=None, event=None, segment_id=None) -> None:
        """A segment changed (mask, name, colour, tags): measure it again once the operation that
        changed it is over (events fire midway through Slicer's own labelmap operations, such as
        merging layers on save, when a segment's voxels are not yet where they end up)."""
        if self._busy or not segment_id:
            return
        if not self.pending:
            qt.QTimer.singleShot(0, self.flush)
        self.pending.add(segment_id)

    def flush(self) -> None:
        """Measure the segments modified since the last flush whose mask changed (:mod:`.measure`)."""
        from . import measure, mrml

        pending, self.pending = self.pending, set()
        node = self.widget.segmentationNode
        if node is None or not slicer.mrmlScene.IsNodePresent(node) or mrml.reference_volume(node) is None:
            return
        changed = False
        for segment_id in sorted(pending):
            now = measure.stamp(node, segment_id)
            if now is None or self.stamps.get(segment_id) == now:
                continue
            self.stamps[segment_id] = now
            changed |= bool(self._guarded(lambda: measure.update(node, segment_id)))
        if changed:
            self.changed()

    def changed(self, caller=None, event=None) -> None:
        from . import mrml

        w = self.widget
        node = w.segmentationNode
        if node is None or not slicer.mrmlScene.IsNodePresent(node):
            return
        table = mrml.get_table_node(node)
        if table is not None:
            w._selecting = True  # a rebuilt table may move the view's current row: that selects no lesion
            try:
                mrml.update_table_node(table, node)
            finally:
                w._selecting = False
        if w.currentLesion is not None and w.currentLesion not in {d["lesion_id"] for d in mrml.lesions(node) if not d["erased"]}:
            w.currentLesion = None
            w.ui.currentLesionLabel.setText(_("No lesion selected."))
            w.ui.statusLabel.setText(_("The selected lesion was removed from the segmentation."))
        w.updateGUI()

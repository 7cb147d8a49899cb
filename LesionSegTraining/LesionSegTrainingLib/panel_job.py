"""The widget side of one background job of the LesionSegTraining panel (retraining, fine-tuning,
segmenter training): its button (start / Cancel), progress bar, status label and the log box.

It drives the widgets it is given and imports no Qt itself; the jobs are the engine's
``ChildProcessJob`` s (``LesionSegLib.engine.learn.jobs``), polled by the panel's timer::

    runner = PanelJob(_("Retraining"), _("Retrain"), ui.retrainButton, ui.retrainProgressBar,
                      ui.retrainStatusLabel, log_box, on_change=widget.updateButtons)
    runner.start(lambda: logic.start_retrain(...), _("Retraining: starting..."))
    ...every tick: runner.poll(logic.finish_retrain, show_result)   # show_result(finish's value)
    runner.cancel()                                                 # stops the process

A job that fails shows a one-line error dialog (the engine's message) with the full log as its
detailed text; a cancelled one leaves nothing behind (the engine writes its outputs atomically).
"""
from __future__ import annotations

import time

from slicer.i18n import tr as _


class PanelJob:
    def __init__(self, name: str, start_text: str, button, bar, status_label, log_box, on_change=None, lines_to=None,
                 cancel_note: str = ""):
        self.name = name                # "Retraining": the start of its messages
        self.cancel_note = cancel_note  # said after "<name> cancelled."
        self.start_text = start_text    # the button's text while no job runs
        self.button, self.bar, self.status, self.log_box = button, bar, status_label, log_box
        self.on_change = on_change or (lambda: None)
        self.lines_to = lines_to        # an optional QPlainTextEdit showing the job's own output
        self.job = None
        self.started = 0.0
        self._stderr_seen = 0
        self.bar.setVisible(False)

    @property
    def running(self) -> bool:
        return self.job is not None

    def sync_button(self, can_start: bool) -> None:
        self.button.setText(_("Cancel") if self.running else self.start_text)
        self.button.setEnabled(self.running or can_start)

    def start(self, make, status_text: str, log_text: str | None = None) -> bool:
        """Start the job ``make()`` returns; a start refused by ``make`` shows its one-line reason."""
        try:
            self.job = make()
        except Exception as exc:
            self.job = None
            self.log_box.show_error(_("Cannot start {what}: {error}").format(what=self.name.lower(), error=exc))
            return False
        self._stderr_seen = 0
        self.started = time.monotonic()
        if log_text:
            self.log_box.append(log_text, stamp=True)
        if self.lines_to is not None:
            self.lines_to.clear()
        self.bar.setValue(0)
        self.bar.setVisible(True)
        self.status.setText(status_text)
        self.on_change()
        return True

    def cancel(self) -> None:
        """Stop the job's process (and its children); the bar goes back to 0 and hides.  Once the
        job has written its model ("done: ..."), it is too late: the job finishes on the next poll,
        and the panel says so instead of calling a written version cancelled."""
        if self.job is not None and str(self.job.status).startswith("done"):
            self.status.setText(_("{what}: too late to cancel, the new version is written.").format(what=self.name))
            return
        job, self.job = self.job, None
        if job is not None:
            job.cancel()
        self.bar.setValue(0)
        self.bar.setVisible(False)
        self.status.setText(" ".join([_("{what} cancelled.").format(what=self.name)] + ([self.cancel_note] if self.cancel_note else [])))
        self.log_box.append(f"{self.name.lower()} cancelled", stamp=True)
        self.on_change()

    def _log(self, job) -> None:
        """New output of the job: its non-JSON stdout lines and its stderr lines."""
        lines = [ln for ln in job.new_lines() if not ln.startswith("{")]
        if self.lines_to is not None:
            for line in lines:
                self.lines_to.appendPlainText(line)
        self.log_box.append(lines)
        stderr = list(job.stderr_lines)
        self.log_box.append(stderr[self._stderr_seen:] if len(stderr) >= self._stderr_seen else stderr)
        self._stderr_seen = len(stderr)

    def poll(self, finish, done) -> None:
        """Show the progress of the running job; once it ended, ``done(finish(job))``, or the error."""
        job = self.job
        state = job.state
        self._log(job)
        self.bar.setValue(int(round(100 * job.fraction)))
        if state == "running":
            seconds = time.monotonic() - self.started
            self.status.setText((_("{status}  ({seconds:.0f} s)") if seconds < 120 else _("{status}  ({minutes:.1f} min)")).format(
                status=job.status, seconds=seconds, minutes=seconds / 60))
            return
        self.job = None
        self.bar.setVisible(False)
        try:
            out = finish(job)
        except Exception as exc:
            error = (job.error if state == "failed" and job.error else str(exc)) or type(exc).__name__
            self.status.setText(_("{what} failed: {error}").format(what=self.name, error=error))
            self.log_box.show_error(_("{what} failed: {error}").format(what=self.name, error=error.splitlines()[0]))
            self.on_change()
            return
        done(out)
        self.on_change()

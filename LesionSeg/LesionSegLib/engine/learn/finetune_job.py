"""``lesionseg finetune ... --progress json`` in a background process (the Fine-tune segmenter button)."""
from __future__ import annotations

import os

from .jobs import ChildProcessJob, RetrainJob


class FinetuneJob(RetrainJob):
    """Fine-tuning in a child process: :attr:`fraction`, :attr:`status`, :meth:`cancel`; :attr:`result`
    is the final ``done`` event (model id, folder, metrics before/after on held-apart cases, seconds)."""

    def __init__(self, feedback: str | os.PathLike, base_model: str | None = None, output: str | None = None,
                 steps: int | None = None, minutes: float | None = None, activate: bool = False, extra=(), **kw):
        ChildProcessJob.__init__(self, **kw)
        self.args = ["finetune", "--progress", "json", "--feedback", str(feedback)]
        for flag, value in (("--base-model", base_model), ("-o", output), ("--steps", steps), ("--minutes", minutes)):
            if value not in (None, ""):
                self.args += [flag, str(value)]
        if activate:
            self.args.append("--activate")
        self.args += list(extra)
        self.result = None

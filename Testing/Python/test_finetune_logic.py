"""LesionSegTraining's "Fine-tune segmenter" entry point on real MRML (slicer-core): a background
``lesionseg finetune`` that refuses with the engine's message, and one that is cancelled."""
from __future__ import annotations

import sys
import time

import pytest

from slicer_app_shim import REPO, slicer_app  # noqa: F401 (fixture)
from test_finetune import store_with
from test_training_module_logic import env, logic, wait  # noqa: F401 (fixtures)

sys.path.insert(0, str(REPO / "LesionSegTraining"))


def test_finetune_refusal_and_cancel(env, logic):  # noqa: F811
    from LesionSegLib.engine import models
    from LesionSegTrainingLib import finetune as ft

    tmp, base = env
    with pytest.raises(RuntimeError, match="open a feedback database"):
        ft.start_finetune(logic)
    store_with(tmp / "one", [0]).close()
    logic.open_database(tmp / "one" / "fb.db")
    assert ft.correction_counts(logic)["cases"] == 1
    job = ft.start_finetune(logic, base_model=base.id, steps=1)
    assert wait(job, 600) == "failed"
    assert "too little to learn from" in job.error
    with pytest.raises(RuntimeError, match="too little to learn from"):
        ft.finish_finetune(logic, job)
    job = ft.start_finetune(logic, base_model=base.id, steps=1, synthetic=0.5, lung_negatives=3)  # passed through
    assert wait(job, 600) == "failed"
    assert "the lung-negative fraction must lie between 0 and 1, got 3.0" in job.error

    store_with(tmp / "three", [0, 1, 2]).close()
    logic.open_database(tmp / "three" / "fb.db")
    job = ft.start_finetune(logic, base_model=base.id, output="never", steps=500)
    time.sleep(1.5)
    assert job.state == "running"
    job.cancel()
    assert job.state == "cancelled" and job.proc.poll() is not None
    assert not any(c.name == "never" for c in models.list_models())

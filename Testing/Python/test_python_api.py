"""The engine as a plain-Python library: the import paths the docs give, threads sharing one engine,
argument errors, ``dice_score`` on labelmaps, decisions without an identity, and no side effects of
importing the batch runner (the Python API audit)."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from LesionSegLib.engine.data import SAMPLE_IMAGE
from LesionSegLib.engine.errors import InputError
from LesionSegLib.engine.io.images import read_image
from LesionSegLib.engine.segment import pipeline
from LesionSegLib.engine.segment.pipeline import Engine, load_engine


@pytest.fixture(scope="module")
def engine():
    return Engine(device="cpu")  # the default runtime (OpenVINO where installed)


@pytest.fixture(scope="module")
def image():
    return read_image(SAMPLE_IMAGE)


@pytest.fixture(scope="module")
def reference(engine, image):
    return engine.segment(image, threshold=0.0)


def _in_threads(n: int, fn) -> list:
    """``fn()`` in ``n`` threads started together; each thread's result or exception."""
    out: list = [None] * n
    start = threading.Barrier(n)

    def run(k):
        start.wait()
        try:
            out[k] = fn()
        except BaseException as exc:  # noqa: BLE001  (handed to the test)
            out[k] = exc

    threads = [threading.Thread(target=run, args=(k,)) for k in range(n)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    return out


# ------------------------------------------------------------------------------ threads (defects 2 and 4)
def test_threads_share_one_engine(engine, image, reference):
    """OpenVINO's single infer request failed with "Infer Request is busy" when two threads ran it."""
    if engine.runtime != "torch":  # the network call itself, many times at once
        channels = int(engine.runner.cfg["network"].get("in_channels", 1))
        window = np.random.default_rng(0).normal(size=(1, channels, *engine.runner.roi)).astype(np.float32)
        one = engine.runner._run(window)
        outs = _in_threads(3, lambda: [engine.runner._run(window) for _ in range(2)])
        assert all(not isinstance(o, BaseException) for o in outs), outs
        assert all(np.array_equal(r, one) for rs in outs for r in rs)
    results = _in_threads(2, lambda: engine.segment(image, threshold=0.0))
    for res in results:
        assert not isinstance(res, BaseException), res
        assert np.array_equal(res.labelmap, reference.labelmap) and res.rows() == reference.rows()


def test_engine_docstring_states_threads_and_sharing():
    """``threads`` changes process-wide thread counts and network calls take turns: the docstring says so."""
    doc = " ".join(Engine.__doc__.split())
    assert "process-wide" in doc and "SimpleITK" in doc and "torch" in doc
    assert "shared by threads" in doc and "one engine per thread" in doc


# ------------------------------------------------------------------------------ documented imports (defect 3)
def test_documented_import_paths_work():
    """The pipeline docstring imported ``LesionSegLib.engine.pipeline``, which does not exist, and
    ``review.Decision`` pointed at ``engine.pipeline.case_hash``."""
    import LesionSegLib.review as review
    from LesionSegLib.engine import click

    for module in (pipeline, click):
        for line in re.findall(r"^\s*(from LesionSegLib\S* import [\w, ]+)", module.__doc__, re.M):
            exec(line, {})
    refs = re.findall(r"``((?:LesionSegLib\.)?engine(?:\.\w+)+)``", Path(review.__file__).read_text(encoding="utf-8"))
    assert refs
    for ref in refs:
        mod, _, name = (ref if ref.startswith("LesionSegLib.") else f"LesionSegLib.{ref}").rpartition(".")
        assert hasattr(__import__(mod, fromlist=[name]), name), ref


def _fresh_python(code: str) -> list[str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_CLIENT_MODE"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


def test_engine_package_exports_lazily():
    """``from LesionSegLib.engine import Engine`` failed; importing the package must not load torch."""
    assert _fresh_python(
        "import sys; import LesionSegLib.engine as e\n"
        "from LesionSegLib.engine import Engine, load_engine, read_image, case_hash, FeedbackStore, SegmentationResult\n"
        "from LesionSegLib.engine import LesionSegError, InputError\n"
        "assert Engine is e.segment.pipeline.Engine and FeedbackStore.__name__ == 'FeedbackStore'\n"
        "print([m for m in ('torch', 'monai') if m in sys.modules])\n"
    ) == ["[]"]


def test_importing_the_batch_runner_leaves_the_process_alone():
    """Importing it imported ray, which replaced ``sys.excepthook`` and set ``RAY_CLIENT_MODE`` (defect 8)."""
    assert _fresh_python(
        "import os, sys; hook = sys.excepthook\n"
        "import LesionSegLib.engine.batch.runner\n"
        "print('ray' in sys.modules, sys.excepthook is hook, 'RAY_CLIENT_MODE' in os.environ)\n"
    ) == ["False", "True", "False"]


# ------------------------------------------------------------------------------ arguments (defect 5)
def test_segment_and_click_take_a_path(engine, image, reference):
    """A path raised AttributeError: 'str' object has no attribute 'GetNumberOfComponentsPerPixel'."""
    from LesionSegLib.engine.click import click

    for src in (str(SAMPLE_IMAGE), Path(SAMPLE_IMAGE)):
        res = engine.segment(src, threshold=0.0)
        assert np.array_equal(res.labelmap, reference.labelmap) and res.rows() == reference.rows()
    point = [reference.lesions[0].centroid_lps]
    by_path, by_image = click(engine, str(SAMPLE_IMAGE), point), click(engine, image, point)
    assert np.array_equal(by_path.labelmap, by_image.labelmap) and by_path.rows() == by_image.rows()
    with pytest.raises(InputError, match="file not found"):
        engine.segment(str(SAMPLE_IMAGE) + ".missing")


@pytest.mark.parametrize("bad", [None, "array", 3.0])
def test_segment_and_click_refuse_other_types(engine, image, bad):
    from LesionSegLib.engine.click import click

    bad = sitk.GetArrayFromImage(image) if bad == "array" else bad
    name = type(bad).__name__
    with pytest.raises(InputError, match=rf"is a \S*{name}, not a SimpleITK.Image or a path"):
        engine.segment(bad)
    with pytest.raises(InputError, match=rf"is a \S*{name}, not a SimpleITK.Image or a path"):
        click(engine, bad, [(0.0, 0.0, 0.0)])


@pytest.mark.parametrize("threshold", [1.5, -0.1, float("nan"), "x"])
def test_bad_threshold_is_an_input_error(engine, image, threshold):
    """A threshold outside [0, 1] was a plain ValueError, outside LesionSegError."""
    with pytest.raises(InputError, match="confidence threshold"):
        engine.segment(image, threshold=threshold)


@pytest.mark.parametrize("threads", [-1, 0, 2.5, "2", True])
def test_bad_threads_is_an_input_error_before_the_model_loads(threads):
    """``threads=-1`` was an OverflowError from ITK, and through ``load_engine`` a ModelError
    blaming the model; 2.5 and '2' were taken."""
    before = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    for make in (Engine, load_engine):  # load_engine turned any other error into a ModelError
        with pytest.raises(InputError, match="threads must be a positive integer"):
            make(None, threads=threads)
    assert sitk.ProcessObject.GetGlobalDefaultNumberOfThreads() == before


# ------------------------------------------------------------------------------ dice_score (defect 6)
def test_dice_score_binarises_and_checks_shapes():
    """A slice broadcast against a volume gave 1.33; uint16 id 256 became 0 in uint8; id 3 against 1 gave 0."""
    from LesionSegLib.engine.evaluate import dice_score

    with pytest.raises(ValueError, match="different shapes"):
        dice_score(np.ones((4, 4, 4)), np.ones((1, 4, 4)))
    with pytest.raises(ValueError, match="different shapes"):
        dice_score(np.zeros((2, 2, 2)), np.zeros((3, 3, 3)))
    assert dice_score(np.full((2, 2, 2), 256, np.uint16), np.ones((2, 2, 2), np.uint8)) == pytest.approx(1.0)
    assert dice_score(np.array([[[0, 3]]], np.uint16), np.array([[[1, 1]]])) == pytest.approx(2 / 3)
    assert dice_score(np.array([[[True, False]]]), np.array([[[True, True]]])) == pytest.approx(2 / 3)


# ------------------------------------------------------------------------------ feedback store (defect 7)
@pytest.mark.parametrize("missing", ["case_hash", "model_id"])
def test_a_decision_without_its_identity_is_refused(tmp_path, missing):
    """Without case_hash/model_id, caseB's decision replaced caseA's under model id ''."""
    from LesionSegLib.engine.feedback import FeedbackStore
    from LesionSegLib.engine.feedback.schema import FeedbackStoreError

    store = FeedbackStore(tmp_path / "fb.sqlite")
    base = {"case_name": "caseA", "case_hash": "a" * 64, "model_id": "sts-clcs@1.1.0", "lesion_id": 1,
            "decision": "accepted", "confidence": 0.9, "centroid_lps": (1.0, 2.0, 3.0)}
    for empty in (None, ""):
        with pytest.raises(FeedbackStoreError, match=missing):
            store.record({**base, missing: empty})
    assert store.count() == 0
    assert store.record(base) == "inserted" and store.count() == 1
    store.close()


def test_the_readme_python_example_runs_as_written(tmp_path, monkeypatch):
    """The README's "Python API" block, run as it stands (it writes its two files in the folder it runs in)."""
    import contextlib
    import io
    import re

    from slicer_app_shim import REPO

    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text[text.index("## Python API"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "README.md (Python API)", "exec"), {"__name__": "__readme__"})
    printed = out.getvalue()
    assert re.search(r"^Dice 0\.7[0-9]*$", printed, re.M) and printed.rstrip().endswith("inserted")
    assert (tmp_path / "STS_041_lesions.nii.gz").exists() and (tmp_path / "feedback.db").exists()

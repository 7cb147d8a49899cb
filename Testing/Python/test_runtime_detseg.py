"""DetSeg3D on the ONNX runtimes, and the exports the model cards name.

Both DetSeg3D networks run as ONNX exports on OpenVINO or ONNX Runtime like the CLCS segmenter:
the detector with dynamic grid axes (its grid is the body box's), the RoI segmenter with a
dynamic batch.  The tolerances are those of ``test_runtime.py``: Dice >= 0.99 against eager
PyTorch and confidences within 1e-3.  Every shipped card names its exports (``onnx``: file,
sha256, source weights, torch); the export is deterministic for the pinned torch.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from LesionSegLib.engine import data
from LesionSegLib.engine.cli import main as cli_main
from LesionSegLib.engine.click import click
from LesionSegLib.engine.io.images import read_image
from LesionSegLib.engine.models import get_card, list_models, read_card
from LesionSegLib.engine.runtime import export
from LesionSegLib.engine.runtime.models import onnx_detseg
from LesionSegLib.engine.segment.pipeline import Engine

DATA = data.data_root()
needs_data = pytest.mark.skipif(not (DATA / "manifest.csv").exists(), reason=f"shared CT data folder {DATA} is absent (set LESIONSEG_DATA)")
ONNX_RUNTIMES = ("openvino", "onnxruntime")
DETSEG = "sts-detseg"


def _dice(a, b) -> float:
    a, b = a > 0, b > 0
    return 2.0 * (a & b).sum() / max(1, a.sum() + b.sum())


@pytest.mark.parametrize("runtime", ONNX_RUNTIMES)
def test_detector_export_runs_on_any_grid_shape(runtime):
    """One export serves every scan: the detector's grid axes are dynamic."""
    eng = Engine(DETSEG, device="cpu", runtime="torch")
    run_det, run_roi, _ = onnx_detseg(eng.card, runtime)
    rng = np.random.default_rng(0)
    for shape in [(16, 32, 40), (40, 64, 88)]:
        x = rng.random((1, 2, *shape), dtype=np.float32)
        got, ref = run_det(x), eng.run_detector(x)
        assert got.shape == ref.shape == (1, 7, *shape)
        assert np.abs(got - ref).max() < 1e-3, (shape, float(np.abs(got - ref).max()))
    for n in (1, 5):  # the RoI batch is dynamic: one RoI per click trial, ROI_BATCH per scan
        x = rng.random((n, 2, *eng.roi_cfg["roi_shape"]), dtype=np.float32)
        got, ref = run_roi(x), eng.run_roi(x)
        assert got.shape == ref.shape and np.abs(got - ref).max() < 1e-2


@needs_data
def test_detseg_on_onnx_runtimes_matches_torch_on_real_cases():
    engines = {rt: Engine(DETSEG, device="cpu", runtime=rt) for rt in ("torch",) + ONNX_RUNTIMES}
    assert {rt: e.runtime for rt, e in engines.items()} == {rt: rt for rt in engines}
    for name in ("STS_038", "STS_041"):
        image = read_image(DATA / "sts" / name / "image.nii.gz")
        results = {rt: e.segment(image, threshold=0.0) for rt, e in engines.items()}
        ref = results["torch"]
        assert ref.labelmap.max() > 0, f"torch found nothing on {name}: the comparison would be empty"
        for rt, res in results.items():
            assert _dice(res.labelmap, ref.labelmap) >= 0.99, (name, rt)
            a, b = np.sort([x.confidence for x in res.lesions]), np.sort([x.confidence for x in ref.lesions])
            assert len(a) == len(b) and np.abs(a - b).max() < 1e-3, (name, rt, a, b)
    # the click tool runs the same RoI network, so it agrees too
    image = read_image(DATA / "sts" / "STS_041" / "image.nii.gz")
    point = results["torch"].lesions[0].centroid_lps
    clicks = {rt: click(e, image, [point]) for rt, e in engines.items()}
    assert clicks["torch"].labelmap.max() == 1
    for rt in ONNX_RUNTIMES:
        assert _dice(clicks[rt].labelmap, clicks["torch"].labelmap) >= 0.99, rt


@needs_data
def test_detseg_segment_command_runs_without_torch_or_monai(tmp_path):
    image = DATA / "sts" / "STS_041" / "image.nii.gz"
    Engine(DETSEG, device="cpu", runtime="openvino")  # fills the export cache (this process has torch)
    probe = (
        "import sys, json; from LesionSegLib.engine import cli; rc = cli.main(sys.argv[1:]); "
        "print(json.dumps({'rc': rc, 'mods': sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'monai'))}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe, "segment", str(image), "-o", str(tmp_path / "out"), "--model", DETSEG, "--progress", "none"],
        capture_output=True, text=True, check=True,
    )
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {"rc": 0, "mods": []}
    assert list((tmp_path / "out").glob("*_lesions.csv"))


def test_shipped_cards_name_exports_that_the_pinned_torch_reproduces(tmp_path, monkeypatch):
    """A fresh export (empty cache) of every network a shipped card names has the card's sha256."""
    monkeypatch.setenv("LESIONSEG_MODELS", str(tmp_path / "models"))
    shipped = [c for c in list_models() if c.builtin]
    assert {c.name for c in shipped} >= {"sts-clcs", DETSEG}
    for card in shipped:
        record = card.data.get("onnx")
        assert record, f"{card.id} names no ONNX export"
        engine = Engine(card, device="cpu", runtime="onnxruntime")
        getattr(engine, "click_runner", None)  # a click segmenter is exported on first use
        for part, ref in record.items():
            assert ref["source_sha256"] == card.part(part)["sha256"], (card.id, part)
            made = export.cache_folder(card) / ref["file"]
            assert made.exists(), (card.id, part)
            if ref["torch"] == torch.__version__:
                assert export.sha256_file(made) == ref["sha256"], f"{card.id} {part}: the export is not reproducible"
        assert not any("differs from the one its card names" in m for m in engine.messages)
        for part, ref in record.items():  # why that holds on any CPU: see the next test
            _assert_weights_stored_as_they_are(card, part, export.cache_folder(card) / ref["file"])


def _assert_weights_stored_as_they_are(card, part, onnx_file):
    import onnx
    from onnx import numpy_helper

    stored = {(t.shape, t.detach().numpy().tobytes()) for t in card.load_state(part).values()}
    for init in onnx.load(str(onnx_file)).graph.initializer:
        a = numpy_helper.to_array(init)
        assert a.size <= 1 or (tuple(a.shape), a.tobytes()) in stored, (
            f"{card.id} {part}: ONNX initializer {init.name} {a.shape} is not a stored tensor (computed at export time)")


def test_exports_hold_the_weights_as_stored_so_their_sha256_is_the_same_on_every_cpu(tmp_path, monkeypatch):
    """The TorchScript exporter's eval peephole folded each BatchNorm into its Conv, computing new
    weights whose last bits depend on the CPU's vector unit: the same weights and torch gave
    sts-clcs's classifier and sts-attention-unet's segmenter another sha256 on another machine, so
    every user there was told the export "differs from the one its card names", and this suite
    failed.  Exports now keep BatchNorm as a node (the runtimes fuse it when they load the graph),
    so every initializer is a stored tensor's bytes and the file depends only on the weights and
    torch."""
    monkeypatch.setenv("LESIONSEG_MODELS", str(tmp_path / "models"))
    card = get_card("sts-attention-unet")  # BatchNorm in its attention gates
    Engine(card, device="cpu", runtime="onnxruntime")
    _assert_weights_stored_as_they_are(card, "segmenter", export.cache_folder(card) / card.data["onnx"]["segmenter"]["file"])


def test_export_command_records_exports_and_a_differing_export_is_noted(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LESIONSEG_MODELS", str(tmp_path / "models"))
    folder = tmp_path / "models" / "copy"
    shutil.copytree(get_card(DETSEG).folder, folder, ignore=shutil.ignore_patterns(".onnx-cache"))
    card = read_card(folder)
    card.data.pop("onnx")
    card.save()
    assert cli_main(["models", "export", str(folder), "--write-card"]) == 0
    printed = capsys.readouterr().out
    record = read_card(folder).data["onnx"]
    assert set(record) == {"detector", "roi_segmenter", "classifier"}
    for ref in record.values():
        assert ref["sha256"] in printed and export.sha256_file(folder / export.CACHE_DIR / ref["file"]) == ref["sha256"]
    # a card naming another export of the same weights (another torch, say): used, with a note
    card = read_card(folder)
    card.data["onnx"]["detector"]["sha256"] = "0" * 64
    card.save()
    engine = Engine(read_card(folder), device="cpu", runtime="onnxruntime")
    assert any("detector" in m and "differs from the one its card names" in m for m in engine.messages)
    # a record of other weights (a retrained part) is not compared
    card.data["onnx"]["detector"]["source_sha256"] = "1" * 64
    card.save()
    assert not any("differs" in m for m in Engine(read_card(folder), device="cpu", runtime="onnxruntime").messages)
    assert cli_main(["models", "export", str(folder), "--runtime", "torch"]) == 2
    assert "torch runtime runs no ONNX export" in capsys.readouterr().err

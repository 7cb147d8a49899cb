"""The ONNX inference path (engine/runtime): parity with torch/MONAI, the export cache, fallbacks.

Tolerances stated here are the ones the README quotes: NumPy resampling and sliding windows
agree with torch/MONAI to float rounding (< 1e-5); OpenVINO / ONNX Runtime give the same
lesions as eager PyTorch with Dice >= 0.99 per labelmap and confidences within 1e-3; their
probability maps agree with torch's to 1e-3 on average (OpenVINO 2.3e-4 on the synthetic
volume; a few voxels where the network is steep differ by up to a few hundredths).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from LesionSegLib.engine import data
from LesionSegLib.engine.errors import LesionSegError, ModelError
from LesionSegLib.engine.io.images import read_image
from LesionSegLib.engine.io.preprocess import normalize
from LesionSegLib.engine.models import get_card, read_card, save_weights
from LesionSegLib.engine.runtime import backends, export
from LesionSegLib.engine.runtime.models import OnnxConfidenceModel, onnx_segmenter
from LesionSegLib.engine.runtime.ops import hu_windows, resize_linear
from LesionSegLib.engine.runtime.sliding import sliding_window
from LesionSegLib.engine.segment.inference import torch_has_cuda_build
from LesionSegLib.engine.segment.pipeline import Engine

DATA = data.data_root()
needs_data = pytest.mark.skipif(not (DATA / "manifest.csv").exists(), reason=f"shared CT data folder {DATA} is absent (set LESIONSEG_DATA)")
ONNX_RUNTIMES = ("openvino", "onnxruntime")
REPO = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------ NumPy twins of torch / MONAI
@pytest.mark.parametrize(
    "shape,new", [((13, 17, 19), (7, 30, 11)), ((3, 9, 8, 8), (20, 3, 8)), ((20, 31, 40), (60, 90, 120)), ((40, 60, 50), (13, 20, 17))]
)
def test_resize_linear_matches_torch_trilinear(shape, new):
    a = np.random.default_rng(0).random(shape).astype(np.float32)
    t = torch.from_numpy(a)
    t = t[None, None] if t.ndim == 3 else t[None]
    ref = F.interpolate(t, size=new, mode="trilinear", align_corners=False)[0]
    ref = ref[0] if a.ndim == 3 else ref
    got = resize_linear(a, new)
    assert got.shape == tuple(ref.shape)
    assert np.abs(got - ref.numpy()).max() < 1e-5
    # written into a view of a larger array (the scan's probability map): the same values, nothing else touched
    host = np.full((got.shape[0] + 3,) + got.shape[1:], -1.0, dtype=np.float32)
    assert resize_linear(a, new, out=host[1:-2]) is not None and np.array_equal(host[1:-2], got)
    assert (host[0] == -1).all() and (host[-2:] == -1).all()


def test_hu_windows_matches_normalize():
    hu = np.random.default_rng(1).uniform(-1500, 2500, (9, 10, 11)).astype(np.float32)
    windows = [(-200.0, 300.0), (-1000.0, 1500.0)]
    assert np.abs(hu_windows(hu, windows) - normalize(hu, windows).numpy()).max() < 1e-6


@pytest.mark.parametrize(
    "shape,roi,overlap,mode,batch",
    [
        ((2, 30, 50, 41), (16, 32, 32), 0.25, "gaussian", 1),
        ((2, 10, 20, 70), (16, 32, 32), 0.5, "constant", 2),  # smaller than the window on two axes: padded
        ((2, 16, 33, 32), (16, 32, 32), 0.25, "gaussian", 3),
    ],
)
def test_sliding_window_matches_monai(shape, roi, overlap, mode, batch):
    from monai.inferers import sliding_window_inference

    torch.manual_seed(0)
    net = torch.nn.Conv3d(2, 3, 3, padding=1).eval()
    x = np.random.default_rng(2).standard_normal(shape).astype(np.float32)

    def pred_torch(b):
        with torch.no_grad():
            return net(b)

    ref = sliding_window_inference(torch.from_numpy(x)[None], roi, batch, pred_torch, overlap=overlap, mode=mode)[0].numpy()
    got = sliding_window(x, roi, lambda b: pred_torch(torch.from_numpy(b)).numpy(), overlap, mode, batch)
    assert got.shape == ref.shape
    assert np.abs(got - ref).max() < 1e-5


# ------------------------------------------------------------------ runtimes vs eager PyTorch
def _compare(results: dict, min_dice: float = 0.99, max_conf: float = 1e-3) -> None:
    ref = results["torch"]
    ref_mask = ref.labelmap > 0
    assert ref_mask.any(), "the torch reference found nothing: the comparison would be empty"
    for name, res in results.items():
        mask = res.labelmap > 0
        dice = 2.0 * (mask & ref_mask).sum() / (mask.sum() + ref_mask.sum())
        assert dice >= min_dice, f"{name}: Dice {dice:.4f} against torch"
        assert len(res.lesions) == len(ref.lesions), name
        a = np.sort([les.confidence for les in res.lesions])
        b = np.sort([les.confidence for les in ref.lesions])
        assert np.abs(a - b).max() < max_conf, f"{name}: confidence differs by {np.abs(a - b).max():.2e}"


@needs_data
def test_onnx_runtimes_match_torch_on_a_real_case():
    image = read_image(DATA / "sts" / "STS_035" / "image.nii.gz")
    results = {rt: Engine("sts-clcs", device="cpu", runtime=rt).segment(image, threshold=0.0) for rt in ("torch",) + ONNX_RUNTIMES}
    assert {Engine("sts-clcs", device="cpu", runtime=rt).runtime for rt in ONNX_RUNTIMES} == set(ONNX_RUNTIMES)
    _compare(results)


def test_onnx_runtimes_match_torch_on_a_synthetic_volume():
    """A body-like cylinder with a soft-tissue sphere (the model marks about 13,600 voxels of it)."""
    zz, yy, xx = np.mgrid[:40, :96, :100]
    hu = np.full((40, 96, 100), -1000.0, np.float32)
    hu[((yy - 48) / 40.0) ** 2 + ((xx - 50) / 45.0) ** 2 < 1] = 20.0
    hu[(zz - 20) ** 2 + (yy - 40) ** 2 + (xx - 60) ** 2 < 8**2] = 60.0
    hu += np.random.default_rng(3).normal(0, 15, hu.shape).astype(np.float32)
    image = sitk.GetImageFromArray(hu.astype(np.int16))
    image.SetSpacing((1.5, 1.5, 2.5))
    engines = {rt: Engine("sts-clcs", device="cpu", runtime=rt) for rt in ("torch",) + ONNX_RUNTIMES}
    canonical, arr, sp = Engine.prepare(image)
    probs = {rt: e.probability(arr, sp)[0] for rt, e in engines.items()}
    for rt in ONNX_RUNTIMES:
        # voxel-wise the runtimes differ a little where the network is steep: on this padded input
        # OpenVINO by 2.3e-4 on average (max 0.028), ONNX Runtime less (max 0.004)
        diff = np.abs(probs[rt] - probs["torch"])
        assert diff.mean() < 1e-3 and diff.max() < 0.1, (rt, float(diff.mean()), float(diff.max()))
    for e in engines.values():
        e.min_size_mm3 = 0.0  # every cluster counts; _compare fails if torch finds none
    # the exported classifier, given the same probability map, scores as the torch one
    _compare({rt: e.lesions_from_probability(image, canonical, arr, sp, probs["torch"], {}, 0.0)
              for rt, e in engines.items()}, max_conf=1e-4)
    # end to end, each runtime's own probability: its voxel differences move the cluster's
    # probability features (mean 0.9001 against 0.9005 here), which sts-clcs 1.2.0's head turns
    # into a confidence 4.7e-3 apart at 0.46 on OpenVINO (1.1.0's: under 1e-3)
    _compare({rt: e.lesions_from_probability(image, canonical, arr, sp, probs[rt], {}, 0.0)
              for rt, e in engines.items()}, max_conf=1e-2)


# ------------------------------------------------------------------ the export cache
@pytest.fixture()
def user_model(tmp_path, monkeypatch):
    """A copy of the shipped model in a user model folder (so its cache sits next to it)."""
    monkeypatch.setenv("LESIONSEG_MODELS", str(tmp_path / "models"))
    folder = tmp_path / "models" / "copy"
    shutil.copytree(get_card("sts-clcs").folder, folder, ignore=shutil.ignore_patterns(".onnx-cache"))
    return read_card(folder)


def _classifier_logits(card, runtime="onnxruntime"):
    rng = np.random.default_rng(4)
    model = OnnxConfidenceModel(card, runtime)
    patches = rng.random((3, 3, 32, 32, 32)).astype(np.float32)
    feats = rng.standard_normal((3, len(model.feature_mean))).astype(np.float32)
    return model, model.logits(patches, feats), (patches, feats)


def test_cache_is_next_to_a_user_model_and_keyed_by_the_weights(user_model):
    _, notes = onnx_segmenter(user_model, "onnxruntime")
    sha = user_model.part("segmenter")["sha256"]
    onnx = user_model.folder / export.CACHE_DIR / f"segmenter-{sha[:16]}.onnx"
    manifest = json.loads(onnx.with_suffix(".json").read_text(encoding="utf-8"))
    assert notes == [] and manifest["source_sha256"] == sha
    assert manifest["onnx_sha256"] == export.sha256_file(onnx)
    # the shipped model is read-only in place: its cache goes to the user model folder
    assert export.cache_folder(get_card("sts-clcs")) == user_model.folder.parent / export.CACHE_DIR


def test_cache_invalidated_when_the_weights_change(user_model):
    model, before, inputs = _classifier_logits(user_model)
    # "retrain": new classifier weights, new sha256 in the card
    from LesionSegLib.engine.segment.classifier import ConfidenceModel

    net = ConfidenceModel.from_card(user_model).net
    with torch.no_grad():
        net.head[-1].bias += 1.0
    user_model.data["classifier"]["sha256"] = save_weights(net, user_model.weights_path("classifier"))
    user_model.save()
    card = read_card(user_model.folder)
    model2, after, _ = _classifier_logits(card)
    assert np.allclose(after, before + 1.0, atol=1e-4), "a stale export was used after the weights changed"
    with torch.no_grad():
        ref = ConfidenceModel.from_card(card).logits(*inputs)
    assert np.abs(after - ref).max() < 1e-4
    # a manifest that names other weights under the current key is refused too
    sha = card.part("classifier")["sha256"]
    manifest_path = card.folder / export.CACHE_DIR / f"classifier-{sha[:16]}.json"
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    manifest["source_sha256"] = "0" * 64
    manifest_path.write_text(json.dumps(manifest))
    model3 = OnnxConfidenceModel(card, "onnxruntime")
    assert any("made from other weights" in n for n in model3.notes)
    assert json.loads(manifest_path.read_text(encoding="utf-8"))["source_sha256"] == sha


def test_tampered_onnx_cache_is_refused(user_model):
    _, good, inputs = _classifier_logits(user_model)
    sha = user_model.part("classifier")["sha256"]
    onnx = user_model.folder / export.CACHE_DIR / f"classifier-{sha[:16]}.onnx"
    # a crafted edit: the same graph with a different bias is a valid ONNX file that would run
    import onnx as onnx_lib

    graph = onnx_lib.load(str(onnx))
    init = [i for i in graph.graph.initializer if i.data_type == onnx_lib.TensorProto.FLOAT][-1]
    values = onnx_lib.numpy_helper.to_array(init) + 5.0
    init.CopyFrom(onnx_lib.numpy_helper.from_array(values, init.name))
    onnx_lib.save(graph, str(onnx))
    tampered = export.sha256_file(onnx)
    model = OnnxConfidenceModel(user_model, "onnxruntime")
    assert any("checksum mismatch" in n for n in model.notes)
    assert export.sha256_file(onnx) != tampered
    assert np.abs(model.logits(*inputs) - good).max() < 1e-5
    # the engine reports the refusal to the user
    onnx.write_bytes(onnx.read_bytes()[:1000])
    engine = Engine(user_model, device="cpu", runtime="onnxruntime")
    assert any("refused" in m and "classifier" in m for m in engine.messages)


def test_damaged_weights_are_refused_even_with_a_valid_cache(user_model):
    """A verified export of the weights is cached, then the model's own safetensors is damaged:
    the ONNX path refuses the model as torch and ``models activate`` do, instead of running the
    cached export of weights that are no longer there."""
    _classifier_logits(user_model)  # the classifier's export is now cached and valid
    onnx_segmenter(user_model, "onnxruntime")
    for part in ("classifier", "segmenter"):
        path = user_model.weights_path(part)
        original = path.read_bytes()
        damaged = bytearray(original)
        damaged[len(damaged) // 2] ^= 0xFF
        path.write_bytes(bytes(damaged))
        try:
            with pytest.raises(ModelError, match=f"checksum mismatch for {path.name}"):
                Engine(read_card(user_model.folder), device="cpu", runtime="onnxruntime")
        finally:
            path.write_bytes(original)
    Engine(read_card(user_model.folder), device="cpu", runtime="onnxruntime")  # whole again: it loads


def test_openvino_runs_without_telemetry(tmp_path):
    """``import openvino`` used to send a usage event and write ``~/intel/openvino_ga_cid`` and
    ``~/intel/stats`` (outside any folder the user chose, a client id from a clinical tool): the
    runtime now blocks OpenVINO's telemetry package first.  Checked in a fresh process whose
    home is empty, through the engine's own runtime choice and backend."""
    code = (
        "import numpy as np\n"
        "from LesionSegLib.engine.runtime import backends\n"
        "assert backends.importable('openvino')\n"
        "import openvino\n"
        "openvino.Core()\n"
        "import sys\n"
        "assert sys.modules.get('openvino_telemetry') is None\n"
        "print('ok')\n"
    )
    env = dict(os.environ, HOME=str(tmp_path), PYTHONPATH=str(Path(__file__).resolve().parents[2] / "LesionSeg"))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr
    assert list(tmp_path.rglob("*")) == [], [str(p) for p in tmp_path.rglob("*")]


# ------------------------------------------------------------------ runtime choice and fallbacks
def test_auto_falls_back_when_runtimes_cannot_be_imported(monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino -> ImportError
    assert backends.resolve("auto") == ("onnxruntime", [])
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    name, notes = backends.resolve("auto")
    assert name == "torch" and "PyTorch" in notes[0]
    engine = Engine("sts-clcs", device="cpu", runtime="auto")
    assert engine.runtime == "torch" and any("PyTorch" in m for m in engine.messages)
    with pytest.raises(LesionSegError, match="openvino"):
        backends.resolve("openvino")
    with pytest.raises(LesionSegError, match="unknown runtime"):
        backends.resolve("tensorrt")


def test_runtime_choice_follows_device_and_environment(monkeypatch):
    assert backends.resolve("auto", cuda=True) == ("torch", [])
    with pytest.raises(LesionSegError, match="CPU only"):
        backends.resolve("openvino", cuda=True)
    monkeypatch.setenv("LESIONSEG_RUNTIME", "onnxruntime")
    assert backends.resolve(None)[0] == "onnxruntime"
    assert torch_has_cuda_build() == (torch.version.cuda is not None)


@needs_data
def test_segment_command_runs_without_torch_or_monai(tmp_path):
    """With the exports cached, ``lesionseg segment`` imports neither torch nor MONAI (nor pandas,
    matplotlib, scipy.stats): process start-up is what made the whole command slow."""
    image = DATA / "sts" / "STS_035" / "image.nii.gz"
    Engine("sts-clcs", device="cpu", runtime="openvino")  # fills the cache (this process has torch)
    probe = (
        "import sys, json; from LesionSegLib.engine import cli; rc = cli.main(sys.argv[1:]); "
        "print(json.dumps({'rc': rc, 'mods': sorted(m for m in sys.modules if m.split('.')[0] in "
        "('torch', 'monai', 'pandas', 'matplotlib') or m.startswith('scipy.stats'))}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe, "segment", str(image), "-o", str(tmp_path / "out"), "--progress", "none", "--runtime", "auto"],
        capture_output=True,
        text=True,
        check=True,
    )
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report == {"rc": 0, "mods": []}
    assert "openvino" in out.stderr
    assert (tmp_path / "out" / "image_lesions.csv").exists() or any((tmp_path / "out").glob("*_lesions.csv"))


def test_ctrl_c_during_the_runtime_detection_import_is_not_lost(monkeypatch):
    """A Ctrl-C while ``auto`` imported OpenVINO could be turned into an import failure inside the
    package: the runtime was skipped and the command ran on as if nothing had been pressed."""
    import signal

    def swallowing_import(name):
        try:
            signal.getsignal(signal.SIGINT)(signal.SIGINT, None)  # Ctrl-C during the import (delivered as Python does) ...
        except KeyboardInterrupt:  # ... which the package's own error handling turns into an import failure
            raise ImportError("failed to load a library") from None
        return object()

    monkeypatch.setattr(backends.importlib, "import_module", swallowing_import)
    # Python's own Ctrl-C handler, as in a terminal (a job started in the background by a
    # non-interactive shell, as CI may run the suite, has SIGINT ignored)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            backends.importable("openvino")
    finally:
        signal.signal(signal.SIGINT, previous)

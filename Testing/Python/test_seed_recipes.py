"""Issue 11: cascade gate, Attention U-Net recipe (deep supervision), UniMatch semi-supervised training."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from LesionSegLib.engine import cli, data
from LesionSegLib.engine.gate.model import Gate, SlabGate, gated_probability, load_gate, open_runs, slab_labels, slabs_of
from LesionSegLib.engine.gate.train import calibrate_threshold
from LesionSegLib.engine.learn import unimatch
from LesionSegLib.engine.learn.recipes import BalancedFocalTversky, recipe_config
from LesionSegLib.engine.learn.train_seg import DEFAULT_CONFIG, ema_avg_fn, make_loss
from LesionSegLib.engine.models import save_weights
from LesionSegLib.engine.segment.attention_ds import AttentionUnetDS, decoder_layers
from LesionSegLib.engine.segment.networks import build_segmenter

DATA = data.data_root()
HAVE_DATA = (DATA / "manifest.csv").exists()
needs_data = pytest.mark.skipif(not HAVE_DATA, reason=f"shared CT data folder {DATA} is absent (set LESIONSEG_DATA)")


# ----------------------------------------------------------------------------- cascade gate
def test_gate_calibration_reaches_recall_and_maximises_f2():
    rng = np.random.default_rng(3)
    labels = np.r_[np.ones(60), np.zeros(400)].astype(int)
    scores = np.r_[rng.beta(5, 2, 60), rng.beta(2, 5, 400)]
    cal = calibrate_threshold(scores, labels, min_recall=0.95)
    pred = scores >= cal["threshold"]
    recall = (pred & (labels == 1)).sum() / 60
    assert recall >= 0.95 and abs(recall - cal["recall"]) < 1e-12
    # brute force: no threshold meeting the recall target has a better F2
    best = 0.0
    for t in np.unique(scores):
        p = scores >= t
        tp, fp, fn = (p & (labels == 1)).sum(), (p & (labels == 0)).sum(), (~p & (labels == 1)).sum()
        if tp / (tp + fn) >= 0.95:
            prec, rec = tp / (tp + fp), tp / (tp + fn)
            best = max(best, 5 * prec * rec / (4 * prec + rec))
    assert cal["f2"] == pytest.approx(best)
    assert 0 < cal["skipped_fraction"] < 1  # it does skip something, and not everything
    with pytest.raises(ValueError):
        calibrate_threshold(scores, np.zeros_like(labels))


def test_slab_labels_runs_and_tiling():
    y = np.zeros((20, 4, 4), np.uint8)
    y[9, 1, 1] = 1
    assert slab_labels(y, 8).tolist() == [0, 1, 0]
    assert open_runs([True, True, False, True], 8, 30) == [(0, 16), (24, 30)]
    x = torch.arange(2 * 20 * 3 * 3, dtype=torch.float32).reshape(2, 20, 3, 3)
    s = slabs_of(x, 8)
    assert s.shape == (3, 2, 8, 3, 3)
    assert torch.equal(s[1], x[:, 8:16]) and torch.equal(s[2, :, :4], x[:, 16:]) and not s[2, :, 4:].any()


def _tiny_infer():
    from monai.inferers import sliding_window_inference

    torch.manual_seed(0)
    net = build_segmenter({"type": "UNet", "in_channels": 2, "out_channels": 2, "channels": [4, 8], "strides": [2], "num_res_units": 1}).eval()

    def infer(xx):
        with torch.inference_mode():
            return torch.softmax(sliding_window_inference(xx[None], (8, 16, 16), 1, net, overlap=0.25, mode="gaussian"), 1)[0, 1]

    return infer


def test_gate_open_everywhere_equals_ungated_and_closed_slabs_are_skipped():
    x = torch.rand(2, 30, 20, 20)
    infer = _tiny_infer()
    calls = []

    def counting(xx):
        calls.append(xx.shape[1])
        return infer(xx)

    full = infer(x)
    assert np.array_equal(gated_probability(x, [True] * 4, 8, 4, counting), full.numpy())
    assert calls == [30]  # one run over the whole input
    calls.clear()
    gated = gated_probability(x, [True, False, False, True], 8, 4, counting)
    assert calls == [12, 10]  # slab 0 + 4 context voxels; slab 3 (24..30) + 4 context voxels
    assert not gated[8:24].any()
    assert np.array_equal(gated[:8], infer(x[:, :12])[:8].numpy())
    assert np.array_equal(gated_probability(x, [False] * 4, 8, 4, counting), np.zeros((30, 20, 20), np.float32))


@needs_data
def test_engine_with_open_gate_equals_engine_without(tmp_path):
    """A gate whose threshold opens every slab gives exactly the ungated probability on a real CT."""
    from LesionSegLib.engine.io.images import read_image
    from LesionSegLib.engine.segment.pipeline import Engine
    from LesionSegLib.engine.gate.model import DEFAULT_GATE_NETWORK, write_gate_json

    net = SlabGate()
    sha = save_weights(net, tmp_path / "gate.safetensors")
    write_gate_json(tmp_path, {"file": "gate.safetensors", "sha256": sha, "network": DEFAULT_GATE_NETWORK, "slab": 8, "margin": 8, "threshold": 0.0})
    eng = Engine(None, "cpu", threads=1, gate=str(tmp_path))
    assert isinstance(eng.gate, Gate)
    _, hu, sp = eng.prepare(read_image(data.case("STS_035").image))
    gated, _ = eng.probability(hu, sp)
    assert eng.gate_info["skipped_fraction"] == 0.0 and eng.gate_info["slabs"] >= 2
    eng.gate = None
    ungated, _ = eng.probability(hu, sp)
    np.testing.assert_array_equal(gated, ungated)
    # a threshold above every score closes every slab: nothing is segmented
    eng.gate = Gate(net.eval(), 8, 8, 1.01)
    closed, _ = eng.probability(hu, sp)
    assert eng.gate_info["open"] == 0 and not closed.any()


def test_bad_gate_is_a_one_line_error(tmp_path, capsys):
    from LesionSegLib.engine.errors import ModelError

    with pytest.raises(ModelError, match="no gate at"):
        load_gate(str(tmp_path / "nothing"))
    (tmp_path / "gate.json").write_text("{not json")
    with pytest.raises(ModelError, match="not valid JSON"):
        load_gate(str(tmp_path))
    (tmp_path / "gate.json").write_text(json.dumps({"file": "gate.safetensors", "sha256": "0" * 64, "threshold": 0.5}))
    with pytest.raises(ModelError, match="missing"):
        load_gate(str(tmp_path))
    assert load_gate("off") is None
    rc = cli.main(["segment", str(tmp_path / "x.nii.gz"), "-o", str(tmp_path / "o"), "--gate", str(tmp_path / "nothing"), "--progress", "none"])
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert any("no gate at" in line for line in err)


# ------------------------------------------------------------------- Attention U-Net recipe
def test_attention_unet_deep_supervision_heads_and_loss_shapes():
    cfg, defaults = recipe_config("attention-unet", DEFAULT_CONFIG)
    assert defaults["loss"] == "balanced_focal_tversky" and defaults["accum"] > 1 and 0 < defaults["ema"] < 1
    net = build_segmenter(cfg["network"])
    assert isinstance(net, AttentionUnetDS) and len(net.ds_heads) == 3
    x = torch.rand(2, 2, 16, 32, 32)
    net.train()
    out = net(x)
    assert out.shape == (2, 4, 2, 16, 32, 32)
    # the heads read the decoder at 1/2, 1/4 and 1/8 resolution
    seen = []
    hooks = [layer.register_forward_hook(lambda m, i, o: seen.append(tuple(o.shape[2:]))) for layer in decoder_layers(net)[1:4]]
    net(x)
    for h in hooks:
        h.remove()
    assert sorted(seen) == [(2, 4, 4), (4, 8, 8), (8, 16, 16)]
    y = torch.zeros(2, 1, 16, 32, 32)
    y[:, :, 4:8, 8:16, 8:16] = 1
    loss = make_loss("balanced_focal_tversky")(list(torch.unbind(out, 1)), y)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    assert all(h.weight.grad is not None and h.weight.grad.abs().sum() > 0 for h in net.ds_heads)
    net.eval()
    with torch.no_grad():
        assert net(x).shape == (2, 2, 16, 32, 32)


def test_attention_unet_copies_train_on_their_own():
    """A deep copy (fine-tuning, EMA ``AveragedModel``) and a state-dict copy of an AttentionUnetDS run
    their deep-supervision heads on their own decoder features in training mode."""
    import copy

    from torch.optim.swa_utils import AveragedModel

    torch.manual_seed(0)
    cfg = {"type": "AttentionUnetDS", "in_channels": 2, "out_channels": 2, "channels": [4, 8, 16, 32, 64], "strides": [2, 2, 2, 2]}
    net = build_segmenter(cfg).eval()
    x = torch.rand(1, 2, 16, 32, 32)
    y = torch.zeros(1, 1, 16, 32, 32)
    y[:, :, 4:8, 8:16, 8:16] = 1
    twin = build_segmenter(cfg)
    twin.load_state_dict(net.state_dict(), strict=True)
    ema = AveragedModel(net, use_buffers=True)
    for cp in (copy.deepcopy(net), ema.module, twin):
        cp.train()
        opt = torch.optim.SGD(cp.parameters(), lr=0.01)
        out = cp(x)
        assert out.shape == (1, 4, 2, 16, 32, 32)
        make_loss("balanced_focal_tversky")(list(torch.unbind(out, 1)), y).backward()
        assert all(h.weight.grad is not None and h.weight.grad.abs().sum() > 0 for h in cp.ds_heads)
        opt.step()
        assert cp(x).shape == (1, 4, 2, 16, 32, 32)  # a second step reads fresh features
        cp.eval()
    net.train()
    fresh = copy.deepcopy(net)  # copied in training mode: the same heads, the same outputs
    assert torch.allclose(fresh(x), net(x), atol=1e-6)


def test_shipped_attention_unet_copy_fine_tunes_and_loads_strictly():
    """``lesionseg finetune --base-model sts-attention-unet`` trains a deep copy of the shipped
    segmenter (finetune.py): one step of that copy, and the weights still load strictly."""
    import copy

    from LesionSegLib.engine import models
    from LesionSegLib.engine.learn.finetune_train import train_segmenter
    from LesionSegLib.engine.segment.pipeline import Engine

    card = models.get_card("sts-attention-unet")
    strict = card.load_into("segmenter", build_segmenter(card.part("segmenter")["network"]))  # sha256-checked, strict
    base = Engine(card, device="cpu", runtime="torch")
    assert isinstance(base.segmenter, AttentionUnetDS)
    assert set(strict.state_dict()) == set(base.segmenter.state_dict())
    torch.manual_seed(0)
    x = torch.rand(1, 2, 16, 32, 32)
    net = copy.deepcopy(base.segmenter)
    with torch.no_grad():
        assert torch.equal(net.eval()(x), base.segmenter.eval()(x)) and torch.equal(strict.eval()(x), base.segmenter(x))

    class Sampler:  # one (x, y, kinds) batch, like PatchSampler
        def batch(self, n, replay):
            yb = torch.zeros(n, 1, 16, 32, 32, dtype=torch.uint8)
            yb[:, :, 6:10, 12:20, 12:20] = 1
            return torch.rand(n, 2, 16, 32, 32), yb, ["corrected"] * n

    log = train_segmenter(net, Sampler(), steps=1, minutes=None, lr=1e-4, batch=1, replay=0.0)
    assert log["steps"] == 1 and np.isfinite(log["loss_first10"])
    assert any(not torch.equal(a, b) for a, b in zip(net.state_dict().values(), base.segmenter.state_dict().values()))


def test_balanced_focal_tversky_prefers_the_right_answer():
    y = torch.zeros(1, 1, 4, 8, 8)
    y[..., 1:3, 2:5, 2:5] = 1
    good = torch.cat([(1 - y) * 6 - 3, y * 6 - 3], 1)
    bad = -good
    f = BalancedFocalTversky()
    assert f(good, y) < f(bad, y)


def test_ema_warmup_follows_the_weights_early():
    avg = ema_avg_fn(0.995)
    a = torch.zeros(3)
    for n in range(5):
        a = avg(a, torch.ones(3), torch.tensor(n))
    assert a.mean() > 0.4  # a fixed 0.995 decay would still be at 0.025


# -------------------------------------------------------------------------------- UniMatch
def test_cutmix_and_pseudo_label_masking():
    rng = np.random.default_rng(0)
    box = unimatch.random_box((8, 16, 16), rng)
    a, b = torch.zeros(1, 2, 8, 16, 16), torch.ones(1, 2, 8, 16, 16)
    m = unimatch.cutmix(a, b, box)
    inside = torch.zeros(8, 16, 16, dtype=torch.bool)
    inside[box] = True
    assert m[:, :, inside].eq(1).all() and m[:, :, ~inside].eq(0).all()
    lab = unimatch.cutmix(torch.zeros(1, 8, 16, 16, dtype=torch.long), torch.ones(1, 8, 16, 16, dtype=torch.long), box)
    assert torch.equal(lab[0].bool(), inside)
    logits = torch.zeros(1, 2, 8, 16, 16)
    logits[:, 1, :4] = 5.0  # confident lesion in the first half, 50/50 elsewhere
    pl, conf = unimatch.pseudo_labels(logits, tau=0.9)
    assert pl[0, :4].eq(1).all() and pl[0, 4:].eq(0).all()
    assert conf[0, :4].eq(1).all() and conf[0, 4:].eq(0).all()
    # unconfident voxels do not count: changing the student there leaves the loss unchanged
    student = torch.randn(1, 2, 8, 16, 16)
    other = student.clone()
    other[:, :, 4:] = torch.randn(1, 2, 4, 16, 16)
    assert unimatch.masked_loss(student, pl, conf) == pytest.approx(unimatch.masked_loss(other, pl, conf).item())
    other[:, :, :4] += 3.0 * torch.randn(1, 2, 4, 16, 16)
    assert unimatch.masked_loss(other, pl, conf) != pytest.approx(unimatch.masked_loss(student, pl, conf).item())


@pytest.mark.parametrize("network", [
    DEFAULT_CONFIG["network"],
    {"type": "AttentionUnetDS", "in_channels": 2, "out_channels": 2, "channels": [4, 8, 16, 32, 64], "strides": [2, 2, 2, 2]},
    {"type": "UNet", "in_channels": 2, "out_channels": 2, "channels": [4, 8, 16], "strides": [2, 2]},
])
def test_feature_perturbation_works_for_every_architecture(network):
    torch.manual_seed(0)
    net = build_segmenter(network).eval()
    x = torch.rand(1, 2, 16, 32, 32)
    with torch.no_grad():
        ref = unimatch.main_output(net(x))
        with unimatch.feature_dropout(net, 0.5):
            pert = unimatch.main_output(net(x))
        after = unimatch.main_output(net(x))
    assert not torch.allclose(ref, pert)
    assert torch.equal(ref, after)  # the hooks are gone


@pytest.mark.parametrize("extra, excluded", [
    ([], set(data.STS_VAL)),                                   # train_seg: no --val -> STS_VAL
    (["--val"], set(data.STS_VAL)),                            # an empty --val: STS_VAL still never trains
    (["--val", "STS_003"], set(data.STS_VAL) | {"STS_003"}),
    (["--images", "IMGS", "--val", "STS_003"], {"STS_003"}),  # own images: the given validation cases
])
def test_unimatch_pool_never_holds_the_validation_cases(tmp_path, monkeypatch, extra, excluded):
    import argparse

    from LesionSegLib.engine.io import images
    from LesionSegLib.engine.learn import train_seg

    names = [f"STS_{i:03d}" for i in range(1, 42)]
    for n in names:
        (tmp_path / n).mkdir()
        (tmp_path / n / "image.nii.gz").write_bytes(b"")
    monkeypatch.setattr(images, "read_image", lambda p: p)  # no image is read: only which cases are taken
    monkeypatch.setattr(train_seg, "image_channels", lambda p, *a: (torch.zeros(1, 1, 1, 1), p))
    ap = argparse.ArgumentParser()
    for opt in ("-o", "--images", "--unlabeled"):
        ap.add_argument(opt)
    ap.add_argument("--val", nargs="*", default=None)
    ap.add_argument("--seed", type=int, default=0)
    unimatch.add_arguments(ap)
    args = ap.parse_args(["-o", "x", "--unlabeled", str(tmp_path), *extra])
    um = unimatch.UniMatch.from_args(args, None, (8, 8, 8), DEFAULT_CONFIG, torch.device("cpu"))
    assert set(um.names) == set(names) - excluded and len(um.volumes) == len(um.names)


class _ConvNet(torch.nn.Module):
    """One 1x1x1 conv: logits (0, w * intensity), so constant volumes give known confidences."""

    def __init__(self, w=0.0):
        super().__init__()
        self.conv = torch.nn.Conv3d(2, 2, 1)
        torch.nn.init.zeros_(self.conv.weight)
        torch.nn.init.zeros_(self.conv.bias)
        with torch.no_grad():
            self.conv.weight[1, 0] = w

    def forward(self, x):
        return self.conv(x)


def _zero_sup(net, x, y):
    return torch.zeros((), requires_grad=True)


ROI = (8, 16, 16)
LOG2_PLUS_DICE = float(np.log(2.0)) + 1.0 - 1.0 / (0.5 * 8 * 16 * 16 + 1.0)  # zero logits vs an all-background target


@pytest.mark.parametrize("min_confident, kept", [(0.5, 0), (0.0, 2)])
def test_unimatch_drops_unconfident_crops(min_confident, kept):
    net = _ConvNet()  # zero logits everywhere: confidence 0.5 < tau 0.95
    um = unimatch.UniMatch([torch.rand(2, 8, 16, 16)], _zero_sup, ROI, tau=0.95, min_confident=min_confident)
    for _ in range(3):
        net.zero_grad()
        loss = um.loss(net, None, None)
        assert loss.requires_grad and loss.item() == 0.0
        loss.backward()
        assert not net.conv.weight.grad.any() and not net.conv.bias.grad.any()
    assert all(h["fp"] == 0.0 and h["img"] == 0.0 and h["confident"] == 0.0 for h in um.history)
    assert [h["kept"] for h in um.history] == [kept / 2] * 3
    summ = um.summary()
    assert summ["min_confident"] == min_confident and summ["crops_kept"] == {"kept": 3 * kept, "total": 6}
    assert summ["last_50_steps_mean"]["kept"] == kept / 2


def test_unimatch_keeps_a_confident_crop():
    net = _ConvNet()  # zero logits: confidence exactly 0.5 >= tau 0.5 everywhere, pseudo-label 0
    um = unimatch.UniMatch([torch.rand(2, 8, 16, 16)], _zero_sup, ROI, tau=0.5, min_confident=1.0)
    loss = um.loss(net, None, None)
    loss.backward()
    h = um.history[0]
    assert h["confident"] == 1.0 and h["kept"] == 1.0 and um.summary()["crops_kept"] == {"kept": 2, "total": 2}
    assert h["fp"] == pytest.approx(LOG2_PLUS_DICE) and h["img"] == pytest.approx(LOG2_PLUS_DICE)
    assert loss.item() == pytest.approx(0.5 * LOG2_PLUS_DICE + 0.5 * LOG2_PLUS_DICE)
    assert net.conv.bias.grad[0] < 0 < net.conv.bias.grad[1]  # pulled towards the pseudo-label (background)


@pytest.mark.parametrize("weak_confident", [False, True])
def test_unimatch_filters_the_weak_and_the_mix_crop_on_their_own(weak_confident):
    net = _ConvNet(w=3.0)  # intensity 1: lesion, confidence sigmoid(3) = 0.95; intensity 0: 50/50
    um = unimatch.UniMatch([torch.zeros(2, 8, 16, 16)], _zero_sup, ROI, tau=0.9, fp_dropout=0.0)
    sure, unsure = torch.ones(2, *ROI), torch.zeros(2, *ROI)
    crops = iter([sure, unsure] if weak_confident else [unsure, sure])
    um.crop = lambda: next(crops)
    um.loss(net, None, None)
    h = um.history[0]
    assert h["kept"] == 0.5 and um.summary()["crops_kept"] == {"kept": 1, "total": 2}
    assert h["confident"] == (1.0 if weak_confident else 0.0)
    p, n = float(torch.sigmoid(torch.tensor(3.0))), 8 * 16 * 16
    assert h["fp"] == (pytest.approx(-np.log(p) + 1 - (2 * p * n + 1) / (p * n + n + 1), rel=1e-5) if weak_confident else 0.0)
    assert h["img"] > 0.0  # the kept crop's part of the CutMix views still counts


@pytest.mark.parametrize("bad", [1.5, -0.1, float("nan"), "x"])
def test_unimatch_min_confident_must_lie_in_0_1(bad, tmp_path):
    import argparse

    with pytest.raises(unimatch.LesionSegError, match=r"--min-confident must lie in \[0, 1\].*got"):
        unimatch.UniMatch([], _zero_sup, ROI, min_confident=bad)
    ap = argparse.ArgumentParser()
    for opt in ("--unlabeled", "--images"):
        ap.add_argument(opt)
    ap.add_argument("--seed", type=int, default=0)
    unimatch.add_arguments(ap)
    assert ap.parse_args([]).min_confident == 0.5
    if isinstance(bad, float):  # the CLI path reaches the check before any volume is read
        args = ap.parse_args(["--unlabeled", str(tmp_path / "absent"), "--min-confident", str(bad)])
        with pytest.raises(unimatch.LesionSegError, match="min-confident"):
            unimatch.UniMatch.from_args(args, None, ROI, DEFAULT_CONFIG, torch.device("cpu"))
        from LesionSegLib.engine.learn import train_seg

        with pytest.raises(unimatch.LesionSegError, match="min-confident"):  # train_seg: before the cases load
            train_seg.main(["--unlabeled", str(tmp_path), "--min-confident", str(bad), "-o", str(tmp_path / "out")])
        assert not (tmp_path / "out").exists()
    assert unimatch.UniMatch([], _zero_sup, ROI).min_confident == 0.5
    assert unimatch.UniMatch([], _zero_sup, ROI, min_confident=1).min_confident == 1.0


@needs_data
def test_unimatch_few_steps_on_real_crops():
    from LesionSegLib.engine.io.images import read_image
    from LesionSegLib.engine.learn.train_seg import image_channels, load_training_case

    cfg = DEFAULT_CONFIG
    paths = unimatch.find_unlabeled(DATA / "sts", ["STS_002", "STS_003"])
    vols = [image_channels(read_image(p), cfg["spacing_zyx"], cfg["hu_windows"])[0] for p in paths]
    x, y = load_training_case(data.case("STS_001"), cfg["spacing_zyx"], cfg["hu_windows"])
    xl, yl = x[None, :, :16, :32, :32].float(), y[None, :, :16, :32, :32].long()
    torch.manual_seed(0)
    net = build_segmenter({"type": "UNet", "in_channels": 2, "out_channels": 2, "channels": [4, 8, 16], "strides": [2, 2]})
    sup = make_loss("dicece")

    def sup_loss(n, xb, yb):
        return sup([unimatch.main_output(n(xb))], yb)

    um = unimatch.UniMatch(vols, sup_loss, (16, 32, 32), tau=0.5)
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    before = [p.detach().clone() for p in net.parameters()]
    for _ in range(2):
        opt.zero_grad()
        loss = um.loss(net, xl, yl)
        assert torch.isfinite(loss)
        loss.backward()
        opt.step()
    assert len(um.history) == 2 and all(0 <= h["confident"] <= 1 for h in um.history)
    assert loss.item() > um.history[-1]["sup"]  # the unlabelled terms add to the supervised loss
    assert any(not torch.equal(a, b) for a, b in zip(before, net.parameters()))
    assert um.summary()["tau"] == 0.5
    with pytest.raises(Exception, match="not in"):
        unimatch.find_unlabeled(DATA / "sts", ["NOPE"])


# ------------------------------------------------------------------------- engine contract
@needs_data
def test_attention_unet_model_passes_the_engine_contract(tmp_path):
    """A model card with the Attention U-Net recipe's network runs through `lesionseg segment`
    like CLCS: the three output files, the input's grid, the CSV columns; a bad input is a one-line error."""
    import csv

    import SimpleITK as sitk

    from LesionSegLib.engine.segment.result import CSV_COLUMNS
    from LesionSegLib.engine.models import ModelCard

    cfg, _ = recipe_config("attention-unet", DEFAULT_CONFIG)
    torch.manual_seed(0)
    net = build_segmenter(cfg["network"]).eval()
    folder = tmp_path / "attn-model"
    folder.mkdir()
    sha = save_weights(net, folder / "segmenter.safetensors")
    ModelCard(folder, {"name": "attn-contract", "version": "1", "architecture": "clcs",
                       "segmenter": {**cfg, "file": "segmenter.safetensors", "sha256": sha},
                       "postprocess": {"prob_threshold": 0.3, "min_size_mm3": 0.0}}).save()
    src = data.case("STS_035").image
    out = tmp_path / "out"
    rc = cli.main(["segment", str(src), "-o", str(out), "--model", str(folder), "--threshold", "0", "--progress", "none", "--threads", "1"])
    assert rc == 0
    assert sorted(p.name for p in out.iterdir()) == ["STS_035.seg.nrrd", "STS_035_lesions.csv", "STS_035_lesions.nii.gz"]
    lab, img = sitk.ReadImage(str(out / "STS_035_lesions.nii.gz")), sitk.ReadImage(str(src))
    assert lab.GetSize() == img.GetSize() and lab.GetSpacing() == pytest.approx(img.GetSpacing())
    assert lab.GetOrigin() == pytest.approx(img.GetOrigin()) and lab.GetDirection() == pytest.approx(img.GetDirection())
    with open(out / "STS_035_lesions.csv", newline="") as fh:
        assert tuple(csv.DictReader(fh).fieldnames) == tuple(CSV_COLUMNS)
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(b"not an image")
    assert cli.main(["segment", str(bad), "-o", str(tmp_path / "o2"), "--model", str(folder), "--progress", "none"]) == 1
    assert not (tmp_path / "o2").exists() or not any((tmp_path / "o2").iterdir())


def test_train_seg_cli_passes_unlabeled_and_recipe_to_the_trainer(tmp_path, monkeypatch):
    from LesionSegLib.engine.learn import jobs

    (tmp_path / "imgs" / "c1").mkdir(parents=True)
    for f in ("image.nii.gz", "label.nii.gz"):
        (tmp_path / "imgs" / "c1" / f).write_bytes(b"")
    seen = {}
    monkeypatch.setattr(jobs, "check_case_files", lambda *a, **k: None)  # empty stand-in files: only the arguments are checked here
    monkeypatch.setattr(jobs.SegmenterTrainingJob, "start", lambda self: seen.setdefault("cmd", self.command()) and None)
    monkeypatch.setattr(jobs.SegmenterTrainingJob, "poll", lambda self: 1)
    monkeypatch.setattr(jobs.SegmenterTrainingJob, "returncode", 1, raising=False)
    cli.main(["train-seg", "--images", str(tmp_path / "imgs"), "-o", str(tmp_path / "out"), "--unlabeled", str(tmp_path / "u"),
              "--recipe", "attention-unet", "--progress", "log"])
    cmd = seen["cmd"]
    assert cmd[cmd.index("--unlabeled") + 1] == str(tmp_path / "u") and cmd[cmd.index("--recipe") + 1] == "attention-unet"

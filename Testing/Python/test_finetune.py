"""``lesionseg finetune``: refusals, a tiny run writing a valid model version (routing to the parent
for its own domain, activate / rollback), synthetic lung lesions, and the OOD scores of the shipped
model on real scans (sarcoma validation below chest)."""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from feedback_testdata import require_data, user_models_with_base
from test_corrections import case_hash, corrections_for, synthetic_ct
from LesionSegLib.engine.cli import main as cli_main
from LesionSegLib.engine.feedback import FeedbackStore
from LesionSegLib.engine.feedback import corrections as cr
from LesionSegLib.engine.learn.finetune import FinetuneError, finetune


def store_with(folder, seeds, kinds=None):
    folder.mkdir(exist_ok=True)
    store = FeedbackStore(folder / "fb.db")
    for s in seeds:
        img, lab = synthetic_ct(s)
        grid, corr = corrections_for(img, lab)
        if kinds:
            corr = [cr.Correction(k, c.mask, c.proposal_key or "c:1.0,1.0,1.0") for k, c in zip(kinds, corr)]
        cr.save_case(store, case_hash(img), f"case{s}", "m@1", grid, corr)
    return store


def test_refuses_when_there_is_too_little(tmp_path, monkeypatch, capsys):
    base = user_models_with_base(tmp_path, monkeypatch)
    empty = store_with(tmp_path, [])
    with pytest.raises(FinetuneError, match="0 corrected cases"):
        finetune(empty, base.id)
    assert cli_main(["finetune", "--feedback", str(empty.path), "--base-model", base.id, "--progress", "none"]) == 2
    assert "too little to learn from" in capsys.readouterr().err
    one = store_with(tmp_path / "a", [0])
    with pytest.raises(FinetuneError, match="1 with an edited, added or deleted segment; at least 2"):
        finetune(one, base.id)
    untouched = store_with(tmp_path / "b", [0, 1], kinds=["kept", "kept", "kept"])
    with pytest.raises(FinetuneError, match="2 corrected cases in the feedback database, 0 with"):
        finetune(untouched, base.id)
    only_rejections = store_with(tmp_path / "c", [0, 1], kinds=["deleted", "deleted", "deleted"])
    # corrections stored on another grid than the segmenter's (imported, or saved with another model)
    from test_corrections import SPACING

    other = tuple(2 * v for v in SPACING)
    import test_corrections

    monkeypatch.setattr(test_corrections, "SPACING", other)
    coarse = store_with(tmp_path / "g", [0, 1])
    monkeypatch.setattr(test_corrections, "SPACING", SPACING)
    with pytest.raises(FinetuneError, match=r"2 corrected case\(s\) \(case., case.\) are stored on a 4.09x4x6 mm grid, not the segmenter's 2x2x3 mm"):
        finetune(coarse, base.id, replay_cases=[])
    with pytest.raises(FinetuneError, match="hold no lesion voxel"):
        finetune(only_rejections, base.id, replay_cases=[])
    for bad in ({"lr": -1e-4}, {"decoder_lr_mult": 0.0}, {"decoder_lr_mult": float("nan")}):
        with pytest.raises(FinetuneError, match="must be a positive number"):
            finetune(only_rejections, base.id, **bad)
    assert cli_main(["finetune", "--feedback", str(only_rejections.path), "--base-model", base.id,
                     "--decoder-lr-mult", "-2", "--progress", "none"]) == 2
    assert "decoder learning-rate multiplier must be a positive number, got -2.0" in capsys.readouterr().err
    with pytest.raises(FinetuneError, match="unknown fine-tuning loss 'focal'; choose one of dicece, lesion-balanced"):
        finetune(only_rejections, base.id, loss="focal")
    # a base without a classifier trained first and then failed retraining one (a design audit): refused at once
    with pytest.raises(FinetuneError, match="model sts-attention-unet@1.0.0 has no confidence classifier"):
        finetune(only_rejections, "sts-attention-unet")
    # the multiplier only splits a DynUNet (its decoder prefixes): on an Attention U-Net it did nothing, silently
    from LesionSegLib.engine import models

    no_cls = models.get_card("sts-attention-unet")
    monkeypatch.setattr(no_cls, "data", {**no_cls.data, "classifier": {}})
    monkeypatch.setattr(models, "get_card", lambda name, *a, **k: no_cls)
    with pytest.raises(FinetuneError, match="applies to DynUNet segmenters; sts-attention-unet@1.0.0's is an AttentionUnetDS"):
        finetune(only_rejections, "sts-attention-unet", decoder_lr_mult=3.0)
    for bad in ({"lung_negatives": 1.5}, {"lung_negatives": float("nan")}, {"synthetic": -0.1}):
        with pytest.raises(FinetuneError, match="fraction must lie between 0 and 1"):
            finetune(only_rejections, base.id, **bad)
    assert cli_main(["finetune", "--feedback", str(only_rejections.path), "--base-model", base.id,
                     "--synthetic-lesions", "0.5", "--lung-negatives", "2", "--progress", "none"]) == 2
    assert "the lung-negative fraction must lie between 0 and 1, got 2.0" in capsys.readouterr().err
    with pytest.raises(FinetuneError, match=r"lung negatives \(0.5\) are a share of the synthetic-lesion lung patches"):
        finetune(only_rejections, base.id, lung_negatives=0.5)  # without --synthetic-lesions they would do nothing
    assert [c.parent.parent.name for c in (tmp_path / "models").glob("*/*/card.json")] in ([], [base.name])


def test_refuses_a_detseg_base_by_name(tmp_path, monkeypatch, capsys):
    store = store_with(tmp_path, [0, 1])
    with pytest.raises(FinetuneError, match=r"sts-detseg@[0-9.]+ is a detseg model: fine-tuning works on a dense segmenter"):
        finetune(store, "sts-detseg")
    assert cli_main(["finetune", "--feedback", str(store.path), "--base-model", "sts-detseg", "--progress", "none"]) == 2
    assert "lesionseg retrain" in capsys.readouterr().err


def test_tiny_finetune_writes_a_valid_version(tmp_path, monkeypatch):
    from LesionSegLib.engine import data as dataset
    from LesionSegLib.engine import models
    from LesionSegLib.engine.io.images import read_image
    from LesionSegLib.engine.learn import versions
    from LesionSegLib.engine.segment.pipeline import Engine

    require_data()
    base = user_models_with_base(tmp_path, monkeypatch)
    store = store_with(tmp_path, [0, 1, 2])
    seen = []
    res = finetune(store, base.id, "tiny-ft", steps=2, replay_cases=["STS_019"], cls_replay_cases=0,
                   decoder_lr_mult=3.0, progress=lambda f, m: seen.append(f))
    card = res.card
    assert card.id == "tiny-ft@1" and card.data["parent"]["id"] == base.id
    ft = card.data["finetuning"]
    assert ft["steps"] == 2 and len(ft["train_cases"]) == 2 and len(ft["held_apart_cases"]) == 1
    assert ft["replay_cases"] == ["STS_019"] and set(ft["corrections"]) == {"case0", "case1", "case2"}
    assert ft["replay_excluded_held_apart"] == []  # the held-apart phantom is no replay case
    assert "total_minutes" in ft and "classifier" in ft and ft["decoder_lr_mult"] == 3.0
    assert (ft["loss"], ft["lr"]) == ("lesion-balanced", 5e-4)  # the defaults
    held = ft["held_apart_cases"][0]
    for when in ("before", "after"):
        assert ft["evaluation"][held][when]["n_gt"] == 2
        assert card.data["metrics"][f"held_apart_dice_{when}"] is not None
    # the base-domain check: the parent's and the new segmenter's Dice on the replayed parent case
    from LesionSegLib.engine.evaluate.metrics import dice_score
    from LesionSegLib.engine.learn.train_seg import load_training_case

    check = ft["base_domain_check"]
    assert check["cases"] == ["STS_019"] and "forgetting, not accuracy" in check["what"]
    x, y = load_training_case(dataset.case("STS_019"), base.part("segmenter")["spacing_zyx"], base.part("segmenter")["hu_windows"])
    for engine, key in ((Engine(base, device="cpu", runtime="torch"), "dice_before"),
                        (Engine(card, device="cpu", runtime="torch"), "dice_after")):
        engine.in_domain = None  # the new network itself, not the routed parent
        expect = round(dice_score(engine.runner.probability(x.float().numpy()) > 0.5, y[0].numpy() > 0), 4)
        assert check[key]["STS_019"] == expect
    assert check["dice_before"]["STS_019"] > 0.5  # a sarcoma training case: the parent segments it
    assert card.data["metrics"]["base_domain_dice_before"] == check["mean_before"]
    assert card.data["metrics"]["base_domain_dice_after"] == check["mean_after"]
    assert "parent's own cases (STS_019): segmenter Dice" in res.summary()
    dom = card.data["domain"]
    assert dom["n_cases"] == base.data.get("domain", {}).get("n_cases", 33) + 2
    # the lesion type and the scanner grid name the corrected cases too, not only the parent's domain
    assert dom["lesion_type"].startswith(base.data.get("domain", {}).get("lesion_type", "soft-tissue sarcoma"))
    assert "reviewer-corrected lesions of 2 case(s)" in dom["lesion_type"]
    assert "2 corrected scan(s), body field of view" in dom["scanner_grid"] and "mm (x, y, z) on the model grid" in dom["scanner_grid"]
    # every weight file is there and matches its checksum; the segmenter changed
    assert set(versions.verify(card)) >= {"segmenter.safetensors", "classifier.safetensors", "ood.safetensors"}
    # its own files and checksums, not the parent's (which named the old segmenter); the parent's
    # figures, training and exports stay in the parent's card
    assert card.data["files"] == {card.data[k]["file"]: models.sha256_file(card.weights_path(k)) for k in ("segmenter", "classifier", "ood")}
    assert not {"validation", "training", "onnx"} & set(card.data)
    assert set(card.data["finetuning"]["parent_sections_not_kept"]) >= {"validation", "files"}
    assert card.data["segmenter"]["sha256"] != base.data["segmenter"]["sha256"]
    assert seen[-1] == 1.0 and seen == sorted(seen)
    # the corrected cases lie outside the parent's domain, so the new version keeps the parent for
    # scans of that domain: a sarcoma scan runs the parent's networks, a phantom like the corrected
    # cases runs the fine-tuned ones
    route = card.data["routing"]
    assert route["enabled"] and route["parent"] == base.id
    assert all(v > route["scan_threshold"] for v in route["train_case_scan_ood"].values())
    eng = Engine(card, device="cpu")
    assert eng.in_domain is not None and eng.in_domain.card.data["segmenter"]["sha256"] == base.data["segmenter"]["sha256"]
    sts = eng.segment(read_image(dataset.case("STS_041").image))
    assert sts.model_id == card.id and any(f"lies in the domain of {base.id}" in m for m in sts.messages)
    from LesionSegLib.engine.learn.finetune import _read_case, score_case

    img41, lab41 = _read_case(dataset.case("STS_041"))
    assert score_case(eng, img41, lab41) == score_case(eng.in_domain, img41, lab41)  # the figures are the parent's too
    # a click on that scan routes too (on the whole scan's descriptor): the parent's networks answer it
    from LesionSegLib.engine.click import click

    pts = np.argwhere(lab41 > 0)
    point = img41.TransformContinuousIndexToPhysicalPoint([float(v) for v in pts[len(pts) // 2][::-1]])
    routed, parent = click(eng, img41, [point]), click(eng.in_domain, img41, [point])
    assert routed.model_id == card.id and any(f"so {base.id}'s networks answered the click" in m for m in routed.messages)
    assert np.array_equal(routed.labelmap, parent.labelmap) and routed.labelmap.any()
    phantom = eng.segment(synthetic_ct(3)[0])
    assert phantom.model_id == card.id and not any("lies in the domain of" in m for m in phantom.messages)
    # a classifier retrained on top of it keeps the routing (and the OOD check): written without them,
    # sarcoma scans ran the fine-tuned networks
    from LesionSegLib.engine.learn.model_writer import write_model
    from LesionSegLib.engine.segment.classifier import ConfidenceModel

    figures = {"auc": 1.0, "ece": 0.0}
    again = write_model(card, ConfidenceModel.from_card(card), "ft-retrained", {"label_counts": {"total": 0}, "trainer": {"mode": "head"}},
                        {"new": figures, "old": figures})
    assert again.data["routing"] == {**card.data["routing"], "via": card.id}  # carried over through the fine-tuned version
    assert again.data["ood"]["sha256"] == card.data["ood"]["sha256"]
    eng2 = Engine(again, device="cpu")
    assert eng2.in_domain is not None and eng2.route(None, None, eng.in_domain.ood.scans[0]) is not None
    # activate and roll back like retrain
    assert versions.activate(card.id) == card.id and models.active_model_id() == card.id
    assert versions.rollback() == models.default_model_id()
    # OOD statistics of another scan descriptor (here: every card's, under a bumped version) switch
    # the cap and the routing off, and the messages say so and how to restore them
    from LesionSegLib.engine.segment import ood as ood_module

    monkeypatch.setattr(ood_module, "DESCRIPTOR_VERSION", ood_module.DESCRIPTOR_VERSION + 1)
    stale = Engine(card, device="cpu")
    assert stale.ood is None and stale.in_domain is not None and stale.in_domain.ood is None
    assert stale.route(None, None, np.zeros(6)) is None
    assert any(f"routing to {base.id} is off" in m for m in stale.messages)
    assert any("fine-tune it again" in m for m in stale.messages)
    # a tampered in-domain model is refused by name
    sub = card.folder / route["folder"] / "card.json"
    sub.write_text(sub.read_text() + " ")
    with pytest.raises(models.ModelError, match="in-domain model .* fails its checksum"):
        Engine(models.read_card(card.folder), device="cpu")


def test_a_held_apart_case_is_never_replayed():
    """A held-apart corrected case that is also a replay case (the same scan, by its hash, whatever
    its name) is dropped from the replay, so its before/after figures stay held apart."""
    from types import SimpleNamespace

    from LesionSegLib.engine import data as dataset
    from LesionSegLib.engine.io.images import read_image
    from LesionSegLib.engine.learn.finetune import replay_without_held
    from LesionSegLib.engine.segment.pipeline import case_hash

    require_data()
    by_name = {c.name: c for c in dataset.cases()}
    held = [SimpleNamespace(case_name="my-review-of-a-thigh", case_hash=case_hash(read_image(by_name["STS_019"].image)))]
    assert replay_without_held(["STS_018", "STS_019", "STS_020"], by_name, held) == (["STS_018", "STS_020"], ["STS_019"])
    assert replay_without_held(["STS_018"], by_name, held) == (["STS_018"], [])
    assert replay_without_held(["STS_019"], by_name, []) == (["STS_019"], [])  # nothing held apart: nothing read


def test_forgetting_is_called_out_beyond_the_warning_drop():
    import sys
    from pathlib import Path

    from LesionSegLib.engine.learn.finetune import FORGETTING_WARN, forgetting_text

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "LesionSegTraining"))
    from LesionSegTrainingLib.finetune import result_text  # the Slicer panel's line (no MRML needed)

    check = {"cases": ["STS_001", "STS_002"], "mean_before": 0.77, "mean_after": 0.77 - FORGETTING_WARN / 2}
    assert forgetting_text(None, True) == ""
    quiet = forgetting_text(check, False)
    assert quiet.startswith("parent's own cases (STS_001, STS_002): segmenter Dice 0.770 -> 0.74") and "forgets" not in quiet
    check["mean_after"] = 0.67
    assert "forgets part of the parent's domain; scans of that domain are routed to the model they came from" in forgetting_text(check, True)
    assert "routing is off, so scans of that domain get the fine-tuned network" in forgetting_text(check, False)
    res = {"model": "m@2", "seconds": 60, "metrics": {"base_domain_dice_before": 0.77, "base_domain_dice_after": 0.67}}
    assert "forgets part of the parent's own domain (Dice on the parent's training cases 0.770 -> 0.670)" in result_text(res)
    res["metrics"]["base_domain_dice_after"] = 0.76
    assert "forgets" not in result_text(res) and result_text({"model": "m@2", "metrics": {}}).startswith("New version m@2")


def test_decoder_learning_rate_groups_split_a_dynunet_at_its_decoder():
    from LesionSegLib.engine import models
    from LesionSegLib.engine.learn.finetune_train import param_groups
    from LesionSegLib.engine.segment.networks import build_segmenter

    net = build_segmenter(models.get_card("sts-clcs").data["segmenter"]["network"])
    [one] = param_groups(net, 1e-4)
    assert one["lr"] == 1e-4 and len(one["params"]) == len(list(net.parameters()))
    enc, dec = param_groups(net, 1e-4, 10.0)
    assert (enc["lr"], dec["lr"], dec["mult"]) == (1e-4, pytest.approx(1e-3), 10.0)
    ids = lambda group: {id(p) for p in group["params"]}  # noqa: E731
    assert not ids(enc) & ids(dec) and len(ids(enc) | ids(dec)) == len(list(net.parameters()))
    names = {id(p): n for n, p in net.named_parameters()}
    assert {names[i].split(".")[0] for i in ids(dec)} == {"upsamples", "output_block", "deep_supervision_heads"}
    assert {names[i].split(".")[0] for i in ids(enc)} == {"input_block", "downsamples", "bottleneck"}


def test_lesion_balanced_loss_routes_patches_and_moves_a_saturated_lesion():
    """Replay and lesion-free patches get DiceCE, corrected/synthetic patches with a lesion get the
    class-balanced loss; on a lesion the net scores at p ~ 0.004 (a new domain), the balanced
    loss's gradient on the lesion's logits is many times DiceCE's, which barely moves it."""
    import torch

    from LesionSegLib.engine.learn.finetune_train import LesionBalancedLoss
    from LesionSegLib.engine.learn.train_seg import make_loss

    torch.manual_seed(0)
    y = torch.zeros(3, 1, 16, 32, 32, dtype=torch.uint8)
    y[0, 0, 4:8, 10:14, 10:14] = 1  # a replay lesion
    y[1, 0, 6:9, 12:16, 20:23] = 1  # a corrected / synthetic lesion
    logits = torch.zeros(3, 2, 16, 32, 32)
    logits[:, 1] = -5.5  # p(lesion) ~ 0.004 everywhere
    preds = [logits.clone().requires_grad_(True), logits.clone().requires_grad_(True)]  # two deep-supervision heads
    loss = LesionBalancedLoss()
    value = loss(preds, y, ["replay", "synthetic", "corrected"])
    plain, lesion = make_loss("dicece"), make_loss("balanced_focal_tversky")
    one = lambda fn, i: fn([p[i:i + 1] for p in preds], y[i:i + 1])  # noqa: E731
    expected = (one(plain, 0) + one(lesion, 1) + one(plain, 2)) / 3
    assert torch.allclose(value, expected)
    assert not torch.allclose(one(lesion, 0), one(plain, 0))  # so the routing is what gave ``expected``
    value.backward()
    balanced = preds[0].grad[1, 1][y[1, 0] > 0].abs().mean()
    dice_pred = logits.clone().requires_grad_(True)
    plain([dice_pred, dice_pred], y).backward()
    dicece = dice_pred.grad[1, 1][y[1, 0] > 0].abs().mean()
    assert balanced > 20 * dicece, (float(balanced), float(dicece))


def test_train_segmenter_runs_either_loss_and_refuses_an_unknown_one():
    from types import SimpleNamespace

    import torch
    from monai.networks.nets import UNet

    from LesionSegLib.engine.learn.finetune import PatchSampler
    from LesionSegLib.engine.learn.finetune_train import train_segmenter

    hu = _chest_phantom()
    label = np.zeros(hu.shape, np.uint8)
    label[12:16, 35:40, 25:30] = 1
    chest = SimpleNamespace(hu=hu.astype(np.int16), label=label, rejected=np.zeros(hu.shape, bool),
                            geometry={"spacing_zyx": [3.0, 2.0, 2.0]})
    for loss in ("dicece", "lesion-balanced"):
        torch.manual_seed(0)
        net = UNet(3, 1, 2, (4, 8), (2,))
        before = [p.detach().clone() for p in net.parameters()]
        sampler = PatchSampler([chest], [], (16, 32, 32), [[-200.0, 300.0]], seed=0, synthetic=0.5)
        log = train_segmenter(net, sampler, 3, None, 1e-3, 2, 0.0, loss=loss)
        assert log["steps"] == 3 and np.isfinite(log["loss_last10"])
        assert any(not torch.equal(a, b) for a, b in zip(before, net.parameters()))
    with pytest.raises(ValueError, match="unknown fine-tuning loss 'dice'"):
        train_segmenter(net, sampler, 1, None, 1e-3, 2, 0.0, loss="dice")


def _chest_phantom(seed=0):
    """A chest-like volume (z, y, x) at 3x2x2 mm: outside air, a soft-tissue body, two lungs at -850 HU."""
    rng = np.random.default_rng(seed)
    z, y, x = np.mgrid[:30, :80, :100]
    hu = np.full((30, 80, 100), -1000.0, np.float32)
    hu[((y - 40) / 36.0) ** 2 + ((x - 50) / 46.0) ** 2 < 1] = 40.0
    for cx in (28, 72):
        hu[((y - 40) / 26.0) ** 2 + ((x - cx) / 17.0) ** 2 + ((z - 15) / 14.0) ** 2 < 1] = -850.0
    return hu + rng.normal(0, 15, hu.shape).astype(np.float32)


def test_synthetic_lung_lesions_are_solid_and_confined_to_the_lung():
    from scipy import ndimage

    from LesionSegLib.engine.learn import synthetic as syn

    sp = (3.0, 2.0, 2.0)
    hu = _chest_phantom()
    lung = syn.lung_mask(hu, sp)
    assert lung.any() and not lung[:, 0, :].any() and (hu[lung] < -400).mean() > 0.95  # outside air is not lung
    no_lung, _ = synthetic_ct(0)
    assert not syn.lung_mask(sitk.GetArrayFromImage(no_lung).astype(np.float32), (3.0, 1.5, 1.5)).any()
    centres = syn.lung_centres(lung, sp)
    assert len(centres) and lung[tuple(centres.T)].all()
    rng = np.random.default_rng(1)
    out, mask = syn.insert_lesion(hu, lung, sp, rng, centre=centres[0])
    assert mask.any() and not (mask & ~ndimage.binary_dilation(lung)).any()
    core = ndimage.binary_erosion(mask)
    assert core.any() and -100 < float(out[core].mean()) < 150  # solid soft tissue, not lung
    far = ndimage.distance_transform_edt(~mask) > 4
    assert np.array_equal(out[far], hu[far])  # nothing else touched
    real = np.zeros(hu.shape, np.uint8)
    real[12:16, 35:40, 25:30] = 1
    hu2, lab2, k = syn.synthetic_volume(hu, real, sp, np.random.default_rng(2), n_lesions=3)
    assert k >= 1 and (lab2[real > 0] == 1).all() and lab2.sum() > real.sum()


def test_patch_sampler_inserts_synthetic_lesions_only_where_there_is_lung():
    from types import SimpleNamespace

    from LesionSegLib.engine.learn.finetune import PatchSampler

    windows = [[-200.0, 300.0], [-1000.0, 1500.0]]
    hu = _chest_phantom()
    chest = SimpleNamespace(hu=hu.astype(np.int16), label=np.zeros(hu.shape, np.uint8), rejected=np.zeros(hu.shape, bool),
                            geometry={"spacing_zyx": [3.0, 2.0, 2.0]})
    sampler = PatchSampler([chest], [], (16, 32, 32), windows, seed=0, synthetic=1.0)
    x, y, kinds = sampler.batch(4, 0.0)
    assert x.shape == (4, 2, 16, 32, 32) and y.shape == (4, 1, 16, 32, 32)
    assert len(kinds) == 4 and set(kinds) <= {"synthetic", "corrected"}
    assert sampler.n_synthetic >= 3 and int(y.sum()) > 0  # lesions where the real label has none
    limb = SimpleNamespace(hu=np.full((20, 40, 40), 40, np.int16), label=np.zeros((20, 40, 40), np.uint8),
                           rejected=np.zeros((20, 40, 40), bool), geometry={"spacing_zyx": [3.0, 2.0, 2.0]})
    assert PatchSampler([limb], [], (16, 32, 32), windows, synthetic=1.0).lungs == []


def test_patch_sampler_centres_the_synthetic_lesion_on_the_drawn_lung_centre():
    """The lesion sits where the patch was centred (a point well inside the lung), give or take the
    crop's shift of a quarter patch, not on any lung voxel of the patch (the lung's edge, the
    patch's border)."""
    from types import SimpleNamespace

    from scipy import ndimage

    from LesionSegLib.engine.learn.finetune import PatchSampler

    hu = _chest_phantom()
    chest = SimpleNamespace(hu=hu.astype(np.int16), label=np.zeros(hu.shape, np.uint8), rejected=np.zeros(hu.shape, bool),
                            geometry={"spacing_zyx": [3.0, 2.0, 2.0]})
    roi = np.array([16, 32, 32])
    sampler = PatchSampler([chest], [], tuple(roi), [[-200.0, 300.0]], seed=3, synthetic=1.0)
    k, hu_t, lung_t, _, sp = sampler.lungs[0]
    sampler.lungs[0] = (k, hu_t, lung_t, np.array([[15, 40, 28]]), sp)  # the left lung's middle: no crop is clipped
    for _ in range(8):
        _, y, kind = sampler._synthetic()
        mask = y[0].numpy() > 0
        assert kind == "synthetic"
        assert mask.any()
        # the flips mirror the lesion about the patch centre, so the distance to it is unchanged
        offset = np.abs(np.array(ndimage.center_of_mass(mask)) - (roi - 1) / 2)
        assert (offset <= roi / 4 + 2).all(), offset


def test_lung_negatives_leave_that_share_of_the_lung_patches_lesion_free():
    """``lung_negatives = q``: a drawn lung patch keeps its real label only (here none) with
    probability q, else gets one synthetic lesion; q = 0 (the default) leaves none lesion-free, and a
    fraction outside [0, 1] is refused."""
    from types import SimpleNamespace

    from LesionSegLib.engine.learn.finetune import PatchSampler

    windows = [[-200.0, 300.0]]
    hu = _chest_phantom()
    chest = SimpleNamespace(hu=hu.astype(np.int16), label=np.zeros(hu.shape, np.uint8), rejected=np.zeros(hu.shape, bool),
                            geometry={"spacing_zyx": [3.0, 2.0, 2.0]})
    sampler = PatchSampler([chest], [], (16, 32, 32), windows, seed=0, synthetic=1.0, lung_negatives=0.5)
    kinds, empty = [], []
    for _ in range(12):
        _, y, got = sampler.batch(4, 0.0)
        kinds += got
        empty += [not bool(t.any()) for t in y]
    assert set(kinds) == {"synthetic", "lung-negative"}
    assert 12 <= kinds.count("lung-negative") <= 36 and sampler.n_lung_negatives == kinds.count("lung-negative")
    assert all(e for e, k in zip(empty, kinds) if k == "lung-negative")  # the real label only: none here
    assert sampler.n_synthetic == sum(not e for e, k in zip(empty, kinds) if k == "synthetic") >= 6
    all_neg = PatchSampler([chest], [], (16, 32, 32), windows, seed=0, synthetic=1.0, lung_negatives=1.0)
    _, y, got = all_neg.batch(4, 0.0)
    assert got == ["lung-negative"] * 4 and not y.any() and all_neg.n_synthetic == 0
    none = PatchSampler([chest], [], (16, 32, 32), windows, seed=4, synthetic=1.0)
    for _ in range(3):
        _, y, got = none.batch(4, 0.0)
        assert got == ["synthetic"] * 4 and all(t.any() for t in y)
    assert none.n_lung_negatives == 0
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="lung-negative fraction must lie in"):
            PatchSampler([chest], [], (16, 32, 32), windows, synthetic=1.0, lung_negatives=bad)


def test_ood_scan_scores_sarcoma_below_chest():
    from LesionSegLib.engine import data as dataset
    from LesionSegLib.engine.io.images import read_image
    from LesionSegLib.engine.learn.ood_fit import descriptor_of
    from LesionSegLib.engine.models import get_card
    from LesionSegLib.engine.segment.ood import OODModel

    require_data()
    from feedback_testdata import model_folder

    card = get_card(str(model_folder()))
    ood = OODModel.from_card(card)
    assert ood is not None, "the shipped model card has OOD statistics (lesionseg fit-ood)"
    assert card.data["domain"]["n_cases"] == 33 and "sarcoma" in card.data["domain"]["lesion_type"]
    val = {n: ood.scan_score(descriptor_of(read_image(dataset.case(n).image))) for n in dataset.STS_VAL}
    chest = {n: ood.scan_score(descriptor_of(read_image(dataset.case(n).image))) for n in ("lung1", "lung2", "LIDC-IDRI-0001")}
    assert max(val.values()) < min(chest.values()), (val, chest)
    assert all(ood.warning(s) for s in chest.values()) and not any(ood.warning(s) for s in val.values())
    assert ood.apply([0.9, 0.3], max(chest.values())).max() < 0.5


def test_a_thin_scan_saved_by_the_model_is_on_its_grid():
    """LIDC-IDRI-0001 (16 slices of 2.5 mm) is stored on 13 voxels of 3.08 mm by the 2x2x3 mm model
    that reviewed it: a whole number of voxels over its 40 mm.  Fine-tuning that same model refused
    it as "stored on a 2x2x3.08 mm grid" (the check allowed 1 %), so no thin scan could be learnt."""
    from types import SimpleNamespace

    import numpy as np
    import SimpleITK as sitk

    from LesionSegLib.engine.feedback.grid import model_grid
    from LesionSegLib.engine.learn.finetune import on_grid

    img = sitk.GetImageFromArray(np.full((16, 64, 64), 40, np.int16))
    img.SetSpacing((0.7, 0.7, 2.5))
    grid = model_grid(img, (3.0, 2.0, 2.0))
    case = SimpleNamespace(hu=grid.hu, geometry=grid.geometry)
    assert grid.geometry["spacing_zyx"][0] == pytest.approx(40 / 13, abs=1e-3)
    assert on_grid(case, (3.0, 2.0, 2.0))
    assert not on_grid(case, (6.0, 4.0, 4.0)) and not on_grid(case, (3.0, 1.0, 1.0))

"""DetSeg3D: detector targets/decoding, NMS, RoI crop/paste-back, per-RoI loss, the architecture
registry, the engine on an empty detection, and click-to-segment with the shipped sts-detseg."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from LesionSegLib.engine import data, models
from LesionSegLib.engine.detseg.boxes import decode, gt_boxes, heatmap_targets, nms
from LesionSegLib.engine.detseg.losses import per_roi_loss, per_roi_losses
from LesionSegLib.engine.detseg.roi import crop, paste_max, roi_for_box
from LesionSegLib.engine.errors import InputError

DETSEG = "sts-detseg"
CLICK_DICE_FLOOR = 0.6  # click at the labelled lesion's centroid, validation cases


def _needs_data():
    if not (data.data_root() / "manifest.csv").exists():
        pytest.skip(f"shared CT data not found at {data.data_root()} (set LESIONSEG_DATA)")


def _fake_output(t: dict) -> np.ndarray:
    """A perfect detector output for targets ``t``: heatmap logit, log size, offset."""
    h = np.clip(t["heat"][0], 1e-6, 1 - 1e-6)
    return np.concatenate([np.log(h / (1 - h))[None], t["size"], t["offset"]]).astype(np.float32)


# ------------------------------------------------------------------------------ stage 1
def test_targets_decode_round_trip_on_synthetic_boxes():
    origin, spacing, shape = np.array([-30.0, 12.0, 7.5]), np.array([6.0, 4.0, 4.0]), (24, 40, 40)
    boxes = np.array([[40.3, 70.9, 81.2, 18.0, 26.0, 22.0],   # off-grid centres
                      [100.0, 150.5, 60.1, 60.0, 44.0, 50.0],
                      [10.0, 40.0, 140.0, 8.0, 8.0, 8.0]])    # a small one
    t = heatmap_targets(boxes, shape, origin, spacing)
    assert t["heat"].shape == (1,) + shape and t["heat"].max() == 1.0
    dets = nms(decode(_fake_output(t), origin, spacing, threshold=0.5, max_detections=10))
    assert len(dets) == 3
    for b in boxes:
        d = dets[np.argmin(np.linalg.norm(dets[:, :3] - b[:3], axis=1))]
        np.testing.assert_allclose(d[:3], b[:3], atol=1e-3)
        np.testing.assert_allclose(d[3:6], b[3:6], rtol=1e-4)


def test_flip_tta_of_the_detector_undoes_the_offsets():
    """Averaging a flip-equivariant detector's maps over all 8 flips (each flipped back, with the
    flipped axes' centre offsets negated) decodes to the same off-grid box as one pass."""
    from LesionSegLib.engine.detseg.engine import _unflip_offsets
    from LesionSegLib.engine.detseg.inputs import flip_average

    origin, spacing, shape = np.zeros(3), np.array([6.0, 4.0, 4.0]), (16, 24, 24)
    box = np.array([[40.3, 41.9, 58.6, 30.0, 24.0, 20.0]])
    x = heatmap_targets(box, shape, origin, spacing)["heat"][None]  # (1, 1, z, y, x): the lesion's "image"

    def net(batch):  # finds the centre of mass of its input: equivariant under flips
        w = batch[0, 0]
        com = np.array([(w.sum(axis=tuple(j for j in range(3) if j != a)) * np.arange(n)).sum() / w.sum() for a, n in enumerate(shape)])
        return _fake_output(heatmap_targets(np.concatenate([com * spacing, box[0, 3:]])[None], shape, origin, spacing))[None]

    flips = [[], [0], [1], [2], [0, 1], [0, 2], [1, 2], [0, 1, 2]]
    one = decode(net(x)[0], origin, spacing, 0.5, 5)
    tta = decode(flip_average(net, x, flips, _unflip_offsets)[0], origin, spacing, 0.5, 5)
    assert len(one) == len(tta) == 1
    np.testing.assert_allclose(tta[0, :6], one[0, :6], atol=1e-4)
    np.testing.assert_allclose(one[0, :3], box[0, :3], atol=0.5)
    wrong = decode(flip_average(net, x, flips)[0], origin, spacing, 0.5, 5)  # offsets left as flipped
    assert np.abs(wrong[0, :3] - one[0, :3]).max() > 0.1


def test_gt_boxes_from_label():
    lab = np.zeros((20, 30, 30), np.uint8)
    lab[2:6, 3:13, 4:9] = 1
    lab[10:19, 20:28, 20:30] = 1
    b = gt_boxes(lab, (3.0, 2.0, 1.5))
    b = b[np.argsort(b[:, 0])]
    np.testing.assert_allclose(b[0], [3.5 * 3, 7.5 * 2, 6 * 1.5, 4 * 3, 10 * 2, 5 * 1.5])
    np.testing.assert_allclose(b[1, 3:], [9 * 3, 8 * 2, 10 * 1.5])


def test_nms_drops_duplicates_and_contained_boxes_keeps_distinct():
    dets = np.array([
        [50, 50, 50, 20, 20, 20, 0.9, 0],
        [52, 51, 49, 22, 20, 19, 0.8, 0],   # duplicate of the first
        [50, 50, 50, 8, 8, 8, 0.7, 0],      # inside the first
        [120, 50, 50, 20, 20, 20, 0.6, 0],  # elsewhere
        [50, 50, 66, 20, 20, 20, 0.95, 0],  # touching the first (IoU 0.11), kept
    ], dtype=float)
    kept = nms(dets, iou_threshold=0.25, contain_threshold=0.7)
    assert sorted(kept[:, 6].tolist()) == [0.6, 0.9, 0.95]
    assert kept[0, 6] == 0.95  # best first
    assert nms(np.zeros((0, 8))).shape == (0, 8)


# ------------------------------------------------------------------------------ stage 2
def test_roi_crop_and_paste_back_round_trip():
    spacing = np.array([3.0, 0.8, 0.8])
    shape = (40, 160, 160)
    zz, yy, xx = np.meshgrid(*[np.arange(n) * s for n, s in zip(shape, spacing)], indexing="ij")
    centre, radius = np.array([60.0, 60.0, 70.0]), 14.0
    sphere = (((zz - centre[0]) ** 2 + (yy - centre[1]) ** 2 + (xx - centre[2]) ** 2) <= radius**2).astype(np.float32)
    box = gt_boxes(sphere, spacing)[0]
    roi = roi_for_box(box, spacing, (32, 48, 48))
    small = crop(sphere, roi)
    assert small.shape == (32, 48, 48)
    # the crop holds the whole lesion with context on every side
    assert small[0].max() == 0 and small[-1].max() == 0 and small[:, 0].max() == 0 and small[:, :, -1].max() == 0
    # a smooth field is sampled where the RoI says (voxel u is at lo + u * step)
    field = zz + 2 * yy - 0.5 * xx
    got = crop(field.astype(np.float32), roi)
    u = np.array([5, 20, 30])
    idx = roi.lo + u * roi.step
    assert abs(got[tuple(u)] - (idx[0] * spacing[0] + 2 * idx[1] * spacing[1] - 0.5 * idx[2] * spacing[2])) < 0.05
    back = np.zeros(shape, np.float32)
    paste_max(back, small, roi)
    pred, gt = back >= 0.5, sphere > 0
    dice = 2 * (pred & gt).sum() / (pred.sum() + gt.sum())
    assert dice > 0.95
    assert back[sphere == 0].max() < 1.0  # nothing pasted as certain outside the lesion


def test_per_roi_loss_weighs_each_roi_the_same():
    small = torch.zeros(1, 1, 16, 16, 16)
    small[..., 7:9, 7:9, 7:9] = 1  # 8 voxels
    big = torch.zeros(1, 1, 16, 16, 16)
    big[..., 2:14, 2:14, 2:14] = 1  # 1728 voxels
    target = torch.cat([small, big])
    hit = lambda t: (t * 20 - 10)  # noqa: E731  (logits: confident and right)
    miss = torch.full_like(small, -10.0)
    miss_small = torch.cat([miss, hit(big)])
    miss_big = torch.cat([hit(small), miss])
    # the batch loss is the mean of the per-RoI losses
    per = per_roi_losses(miss_small, target)
    assert torch.isclose(per_roi_loss(miss_small, target), per.mean())
    assert torch.isclose(per[0], per_roi_losses(miss_small[:1], target[:1])[0])
    # missing the 8-voxel lesion costs a whole Dice point, as missing the 1728-voxel one does ...
    assert float(per[0]) > 0.85 and float(per_roi_losses(miss_big, target)[1]) > 0.95  # (Dice smoothing: 1 voxel)
    assert float(per[1]) < 0.01  # (the lesion that was hit costs nothing)
    # ... whereas a Dice pooled over all voxels of the batch makes the small miss almost free
    def pooled(z, y):
        p = torch.sigmoid(z)
        return 1 - 2 * (p * y).sum() / (p.sum() + y.sum())
    assert float(pooled(miss_small, target) / pooled(miss_big, target)) < 0.01


def test_roi_segmenter_from_clcs_model_keeps_its_probabilities():
    """--init-from: the CLCS segmenter as a one-logit RoI network gives sigmoid(logit) equal to the
    original two-class softmax[1] (deep supervision off), so RoI training starts from what it knows."""
    from LesionSegLib.engine.learn.train_detseg import roi_network_from_clcs
    from LesionSegLib.engine.segment.networks import build_segmenter

    cfg, net, record = roi_network_from_clcs("sts-clcs")
    assert cfg["out_channels"] == 1 and not cfg["deep_supervision"] and record["from_model"].startswith("sts-clcs@")
    assert record["train_cases"] and not set(record["train_cases"]) & set(data.STS_VAL)  # validation stays held out
    card = models.get_card("sts-clcs")
    orig = build_segmenter({**card.part("segmenter")["network"], "deep_supervision": False})
    orig.load_state_dict({k: v for k, v in card.load_state("segmenter").items() if k in orig.state_dict()}, strict=False)
    x = torch.rand(1, 2, 32, 48, 48)
    with torch.inference_mode():
        p_roi = torch.sigmoid(net.eval()(x))[0, 0]
        p_orig = torch.softmax(orig.eval()(x), 1)[0, 1]
    assert float((p_roi - p_orig).abs().max()) < 1e-4


# ------------------------------------------------------------------------------ box re-fits
SP = (3.0, 2.0, 2.0)


def _sphere(shape=(40, 64, 64), centre_mm=(60.0, 64.0, 64.0), radius_mm=12.0):
    zz, yy, xx = np.meshgrid(*[np.arange(n) * s for n, s in zip(shape, SP)], indexing="ij")
    return ((zz - centre_mm[0]) ** 2 + (yy - centre_mm[1]) ** 2 + (xx - centre_mm[2]) ** 2) <= radius_mm**2


class _OracleRoIs:
    """Stands in for the RoI segmenter: each RoI's 'probability' is the true mask sampled into it."""

    prob_threshold = 0.5

    def __init__(self, label):
        self.label = label.astype(np.float32)
        self.calls = 0

    def roi_outputs(self, hu, spacing, boxes, cancel=None, progress=None):
        self.calls += len(boxes)
        rois = [roi_for_box(b, spacing, (16, 24, 24)) for b in boxes]
        return [(r, crop(self.label, r)) for r in rois]


def _dice(a, b):
    return 2 * (a & b).sum() / (a.sum() + b.sum())


@pytest.mark.parametrize("size_mm,radius_mm", [(75.0, 12.0), (12.0, 20.0)])  # 3x too big; 0.3x (the lesion overflows the RoI)
def test_refit_converges_on_the_lesion_from_a_poor_box(size_mm, radius_mm):
    from LesionSegLib.engine.detseg.refine import fit_boxes, refit

    lesion = _sphere(radius_mm=radius_mm)
    oracle = _OracleRoIs(lesion)
    hu = np.zeros(lesion.shape, np.float32)
    box = np.array([64.0, 60.0, 68.0, size_mm, size_mm, size_mm])  # centre 4 mm off the lesion's
    first = fit_boxes(oracle, hu, SP, [box], [box[:3]])[0]
    final = refit(oracle, hu, SP, [first], refits=3, tolerance=1.2)[0]
    side = final.lesion_box(SP)[3:]
    assert np.all(np.abs(final.box[3:] / side - 1) <= 0.45), (final.box, side)  # the RoI now fits its lesion
    assert not final.edges_touched(hu.shape).any()
    comp, prob = final.full(hu.shape)
    assert _dice(comp, lesion) > 0.9 and prob.shape == hu.shape
    if size_mm < 20:  # the too-small box touched the lesion's edge: it grew
        assert first.edges_touched(hu.shape).any() and _dice(first.full(hu.shape)[0], lesion) < _dice(comp, lesion)


def test_refit_pastes_one_lesion_per_refitted_box_and_drops_duplicates(tmp_path):
    """Two detections on one lesion (one offset, one oversized) and one on empty tissue: with
    ``paste: lesion`` and ``dedupe`` the probability holds that one lesion, nothing else."""
    import cc3d

    from LesionSegLib.engine.segment.pipeline import Engine

    lesion = _sphere()
    eng = Engine(_tiny_detseg(tmp_path / "m"), device="cpu")
    eng.roi_cfg.update(refits=3, refit_tolerance=1.2, refit_growth=1.1, paste="lesion", dedupe=True)
    oracle = _OracleRoIs(lesion | _sphere(centre_mm=(60.0, 20.0, 20.0), radius_mm=6.0))  # a second structure near a corner
    eng.roi_outputs = oracle.roi_outputs
    dets = np.array([[60, 64, 64, 30, 30, 30, 0.9, 2.2], [62, 58, 70, 70, 70, 70, 0.5, 0.0], [60, 100, 100, 20, 20, 20, 0.3, -0.8]])
    eng.detect = lambda hu, sp: dets
    prob, timings = eng.probability(np.zeros(lesion.shape, np.float32), SP)
    lab, n = cc3d.connected_components(prob >= 0.5, return_N=True)
    assert n == 1 and _dice(prob >= 0.5, lesion) > 0.9  # the oversized box's other structure is not pasted
    assert len(eng.last_detections) == 1 and eng.last_detections[0, 6] == pytest.approx(0.9)
    assert "roi_segmentation" in timings


# ------------------------------------------------------------------------------ registry
def _tiny_detseg(folder, threshold=0.1):
    """A detseg model folder with untrained (tiny) networks and a valid card."""
    from LesionSegLib.engine.detseg.networks import build_detector, build_roi_segmenter
    from LesionSegLib.engine.learn.train_detseg import DETECTOR_CONFIG, ROI_CONFIG

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    det = {**DETECTOR_CONFIG, "network": {"type": "CenterFPN", "in_channels": 2, "channels": [4, 4, 8, 8], "fpn_channels": 4},
           "threshold": threshold, "file": "detector.safetensors"}
    roi = {**ROI_CONFIG, "network": {**ROI_CONFIG["network"], "channels": [4, 8, 8, 8, 8]}, "file": "roi_segmenter.safetensors"}
    det["sha256"] = models.save_weights(build_detector(det["network"]), folder / det["file"])
    roi["sha256"] = models.save_weights(build_roi_segmenter(roi["network"]), folder / roi["file"])
    card = {"name": "tiny-detseg", "version": "1", "architecture": "detseg", "detector": det, "roi_segmenter": roi}
    (folder / "card.json").write_text(json.dumps(card))
    return models.read_card(folder)


def _phantom():
    rng = np.random.default_rng(0)
    a = rng.normal(40, 10, (30, 64, 64)).astype(np.float32)
    a[:, :4] = -1000
    img = sitk.GetImageFromArray(a)
    img.SetSpacing((1.5, 1.5, 3.0))
    return img


def test_registry_dispatches_on_architecture(tmp_path):
    from LesionSegLib.engine.detseg.engine import DetSegEngine
    from LesionSegLib.engine.segment.pipeline import ClcsEngine, Engine, engine_class

    card = _tiny_detseg(tmp_path / "m")
    eng = Engine(card, device="cpu")
    assert type(eng) is DetSegEngine and isinstance(eng, Engine)
    assert type(Engine(str(card.folder), "cpu")) is DetSegEngine  # by folder, positional device
    assert engine_class("clcs") is ClcsEngine
    with pytest.raises(InputError, match="cannot run"):
        ClcsEngine(card, device="cpu")
    bad = models.ModelCard(card.folder, {**card.data, "architecture": "nnunet"})
    with pytest.raises(InputError, match="unknown model architecture 'nnunet'"):
        Engine(bad, device="cpu")


def test_detector_proposing_nothing_gives_an_empty_result(tmp_path):
    from LesionSegLib.engine.segment.pipeline import Engine

    eng = Engine(_tiny_detseg(tmp_path / "m", threshold=1.0), device="cpu")
    res = eng.segment(_phantom(), threshold=0.0)
    assert res.lesions == [] and res.labelmap.shape == (30, 64, 64) and res.labelmap.max() == 0
    assert set(res.timings) >= {"detect", "roi_segmentation", "clusters", "confidence"}


def test_click_refuses_bad_points_and_non_detseg_models(tmp_path):
    from LesionSegLib.engine.click import click
    from LesionSegLib.engine.segment.pipeline import Engine

    eng = Engine(_tiny_detseg(tmp_path / "m"), device="cpu")
    img = _phantom()
    with pytest.raises(InputError, match=r"point \(500.0, 10.0, 10.0\) mm LPS is outside the volume"):
        click(eng, img, [(20.0, 20.0, 20.0), (500.0, 10.0, 10.0)])
    with pytest.raises(InputError, match="on air"):
        click(eng, img, [(30.0, 2.0, 40.0)])  # rows 0-3 are air
    with pytest.raises(InputError, match="no point"):
        click(eng, img, [])


# ------------------------------------------------------------------------------ trained model
def _detseg_card():
    try:
        return models.get_card(DETSEG)
    except models.ModelError as exc:
        pytest.fail(f"{DETSEG} is not in the registry: {exc}")


def test_sts_detseg_is_registered_and_loads():
    from LesionSegLib.engine.detseg.engine import DetSegEngine
    from LesionSegLib.engine.segment.pipeline import Engine

    card = _detseg_card()
    assert card.builtin and card.architecture == "detseg"
    assert DETSEG in {c.name for c in models.list_models()}
    for key in ("detector", "roi_segmenter", "classifier"):
        card.verified_path(key)
    assert card.data["confidence_source"] in ("classifier", "detector")
    assert type(Engine(DETSEG, device="cpu")) is DetSegEngine


def test_click_cli_on_real_case_matches_the_label(tmp_path):
    from LesionSegLib.engine import cli
    from LesionSegLib.engine.segment.result import CSV_COLUMNS

    _needs_data()
    _detseg_card()
    case = data.case("STS_041")
    img = sitk.ReadImage(str(case.image))
    gt = sitk.GetArrayFromImage(sitk.ReadImage(str(case.label))) > 0
    centroid = img.TransformContinuousIndexToPhysicalPoint(np.argwhere(gt).mean(0)[::-1].tolist())
    out = tmp_path / "out"
    point = ",".join(f"{v:.3f}" for v in centroid)
    assert cli.main(["click", str(case.image), f"--point={point}", "-o", str(out), "--model", DETSEG, "--device", "cpu"]) == 0
    lab = sitk.ReadImage(str(out / "STS_041_click.nii.gz"))
    assert lab.GetSize() == img.GetSize() and lab.GetOrigin() == pytest.approx(img.GetOrigin())
    arr = sitk.GetArrayFromImage(lab)
    assert set(np.unique(arr)) == {0, 1}
    dice = 2 * ((arr == 1) & gt).sum() / ((arr == 1).sum() + gt.sum())
    assert dice >= CLICK_DICE_FLOOR, f"click Dice {dice:.3f} below {CLICK_DICE_FLOOR}"
    with open(out / "STS_041_click.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert tuple(rows[0]) == CSV_COLUMNS and rows[0]["lesion_id"] == "1" and len(rows) == 1
    # a bad point: one-line error, exit 1 (a bad input, as in segment), nothing written
    out2 = tmp_path / "out2"
    rc = cli.main(["click", str(case.image), f"--point={point}", "--point", "9999,0,0", "-o", str(out2), "--model", DETSEG])
    assert rc == 1 and (not out2.exists() or not any(out2.iterdir()))
    assert cli.main(["click", str(case.image), "--point", "1,2", "-o", str(out2)]) == 2


def test_segment_cli_runs_a_detseg_model_with_progress(tmp_path, capsys):
    """``lesionseg segment --model sts-detseg`` end to end, with the JSON progress on (a DetSeg3D
    stage once had no progress span: KeyError 'detect'); progress rises to 1 through its stages."""
    from LesionSegLib.engine import cli

    _needs_data()
    _detseg_card()
    case = data.case("STS_041")
    out = tmp_path / "out"
    assert cli.main(["segment", str(case.image), "-o", str(out), "--model", DETSEG, "--device", "cpu", "--progress", "json"]) == 0
    captured = capsys.readouterr()
    events = [json.loads(line) for line in (captured.out + captured.err).splitlines() if line.startswith("{\"event\": \"progress")]
    stages = [e.get("stage") for e in events]
    assert "detect" in stages and "roi_segmentation" in stages, stages
    fractions = [e["fraction"] for e in events if "fraction" in e]
    assert fractions == sorted(fractions) and fractions[-1] == pytest.approx(1.0)
    assert (out / "STS_041_lesions.nii.gz").exists() and (out / "STS_041_lesions.csv").exists()


def test_retrain_from_review_works_for_a_detseg_model(tmp_path, monkeypatch):
    """Accept/reject decisions on sts-detseg's own candidates retrain its classifier into a new
    detseg version that loads and runs (stage weights copied, classifier new)."""
    import feedback_testdata as td

    from LesionSegLib.engine.detseg.engine import DetSegEngine
    from LesionSegLib.engine.feedback import FeedbackStore
    from LesionSegLib.engine.learn.retrain import retrain
    from LesionSegLib.engine.segment.pipeline import Engine
    from LesionSegLib.review import Decision

    _needs_data()
    base = _detseg_card()
    monkeypatch.setenv("LESIONSEG_MODELS", str(tmp_path / "models"))
    from LesionSegLib.engine.learn.labels import candidates_with_labels
    from LesionSegLib.engine.segment.pipeline import case_hash

    engine = Engine(base, device="cpu")
    decisions = []
    for name in td.CASES:  # every candidate (confidence threshold 0) at the model's own probability threshold
        img = sitk.ReadImage(str(data.case(name).image))
        res, m, _, _ = candidates_with_labels(engine, img, sitk.ReadImage(str(data.case(name).label)))
        h = case_hash(img)
        for les, tp in zip(res.lesions, m.is_tp):
            decisions.append(Decision.from_lesion(name, h, res.model_id, les, "accepted" if tp else "rejected", "sim"))
    n_pos = sum(d.decision == "accepted" for d in decisions)
    assert n_pos >= 2 and len(decisions) - n_pos >= 2, f"{n_pos} TP / {len(decisions) - n_pos} FP candidates"
    store = FeedbackStore(tmp_path / "feedback.db")
    store.record_many(decisions)
    res = retrain(store, base.id, folds=3, min_labels=6, min_per_class=2)  # 1.2.0 pastes one lesion per box: 9 candidates on these cases
    card = res.card
    assert card.architecture == "detseg" and card.data["parent"]["id"] == base.id
    for key in ("detector", "roi_segmenter"):
        assert card.data[key]["sha256"] == base.data[key]["sha256"]
        card.verified_path(key)
    assert card.data["confidence_source"] == "classifier"  # the retrained classifier is what scores lesions
    eng = Engine(card, device="cpu")
    assert type(eng) is DetSegEngine
    out = eng.segment(sitk.ReadImage(str(data.case("STS_041").image)), threshold=0.0)
    assert out.model_id == card.id and all(0.0 <= les.confidence <= 1.0 for les in out.lesions)


def test_confidence_source_is_chosen_on_training_clusters():
    """detseg_card.choose_source: the higher training-cluster AUC wins (an own classifier counts
    with its out-of-fold AUC); ties go to the classifier; validation figures play no part."""
    from types import SimpleNamespace

    from LesionSegLib.engine.learn.detseg_card import choose_source

    def case(conf, tp):
        return {"conf": np.asarray(conf, float), "m": SimpleNamespace(is_tp=np.asarray(tp, bool))}

    good, bad = [case([0.9, 0.2], [1, 0])], [case([0.2, 0.9], [1, 0])]
    names = ["STS_001", "STS_033"]
    assert choose_source({}, {"classifier": bad, "detector": good}, names)["source"] == "detector"
    assert choose_source({}, {"classifier": good, "detector": good}, names)["source"] == "classifier"  # a tie
    own = {"classifier": {"training": {"validation": {"new": {"auc": 1.0}}}}}  # in-sample 0.0, out-of-fold 1.0
    choice = choose_source(own, {"classifier": bad, "detector": good}, names)
    assert choice["source"] == "classifier" and choice["training_auc"] == {"classifier": 1.0, "detector": 1.0}
    assert "STS_001-STS_033" in choice["rule"]

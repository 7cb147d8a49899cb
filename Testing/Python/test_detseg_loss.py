"""DetSeg3D detector loss: every object weighs the same in the heatmap (positive) term and in the
size/offset term, whatever its size; with one object the loss is the former one up to the
normalisation (number of objects instead of number of positive voxels)."""
from __future__ import annotations

import numpy as np
import torch

from LesionSegLib.engine.detseg.boxes import OFFSET_CH, SIZE_CH, heatmap_targets
from LesionSegLib.engine.detseg.losses import POS_MIN, detector_loss, heatmap_focal_loss

G0, SHAPE = np.array([6.0, 4.0, 4.0]), (32, 64, 64)
SMALL = np.array([30.0, 40.0, 32.0, 10.0, 10.0, 10.0])      # a 10 mm nodule
LARGE = np.array([120.0, 150.0, 160.0, 120.0, 120.0, 120.0])  # a 120 mm sarcoma


def _t(boxes):
    return {k: torch.as_tensor(v)[None] for k, v in heatmap_targets(np.stack(boxes), SHAPE, np.zeros(3), G0).items()}


def _window(b, r=10):
    q = np.round(b[:3] / G0).astype(int)
    return tuple(slice(max(a - r, 0), a + r + 1) for a in q)


def test_small_and_large_objects_weigh_the_same_in_the_detector_loss():
    t = _t([SMALL, LARGE])
    heat = t["heat"][0, 0].numpy()
    pos = heat >= POS_MIN - 1e-6
    counts = {n: (int(pos[_window(b)].sum()), int(t["reg_mask"][0, 0].numpy()[_window(b)].sum())) for n, b in (("s", SMALL), ("l", LARGE))}
    assert counts["s"][0] < counts["l"][0] and counts["s"][1] * 10 < counts["l"][1]  # the large one has many more voxels
    # an untrained detector: prior 0.05 everywhere, size and offset far off
    out = torch.full((1, 7) + SHAPE, 5.0)
    out[:, 0] = float(np.log(0.05 / 0.95))
    out.requires_grad_(True)
    detector_loss(out, t)[0].backward()
    grad = out.grad[0].abs().numpy()
    share = {}
    for n, b in (("s", SMALL), ("l", LARGE)):
        w = _window(b)
        share[n] = (grad[0][w][pos[w]].sum(),  # positive heatmap term (positives get no gradient from negatives)
                    grad[SIZE_CH][(slice(None),) + w].sum(), grad[OFFSET_CH][(slice(None),) + w].sum())
    for k in range(3):
        assert share["s"][k] > 0
        np.testing.assert_allclose(share["s"][k], share["l"][k], rtol=0.02)
    # the sums are divided by the number of objects: the two together weigh as two objects
    np.testing.assert_allclose(float(t["pos_weight"].sum()), 2.0, rtol=1e-5)
    np.testing.assert_allclose(float(t["reg_weight"].sum()), 2.0, rtol=1e-5)


def test_overlapping_objects_voxels_go_to_the_highest_gaussian():
    a, b = np.array([90.0, 120.0, 120.0, 60.0, 60.0, 60.0]), np.array([90.0, 120.0, 150.0, 40.0, 40.0, 40.0])
    t = heatmap_targets(np.stack([a, b]), SHAPE, np.zeros(3), G0)
    pw, rw = t["pos_weight"][0], t["reg_weight"][0]
    assert np.array_equal(pw > 0, t["heat"][0] >= POS_MIN - 1e-6) and np.array_equal(rw > 0, t["reg_mask"][0] > 0)
    np.testing.assert_allclose([pw.sum(), rw.sum()], [2.0, 2.0], rtol=1e-5)
    for w in (pw, rw):  # two objects: two weight levels, each summing to 1
        levels = np.unique(w[w > 0])
        assert len(levels) == 2 and all(abs((w == v).sum() * v - 1) < 1e-4 for v in levels)


def test_one_object_gives_the_former_loss_up_to_the_normalisation():
    torch.manual_seed(0)
    t = _t([LARGE])
    unweighted = {k: v for k, v in t.items() if k not in ("pos_weight", "reg_weight")}  # the former form
    heat = t["heat"][:, 0]
    pos = heat >= POS_MIN - 1e-6
    n_pos = int(pos.sum())
    assert n_pos > 10
    out = torch.randn((1, 7) + SHAPE)
    new, parts = detector_loss(out, t)
    old, old_parts = detector_loss(out, unweighted)
    # size/offset: one object, so 1 / (its count) summed over one object == the former per-voxel mean
    np.testing.assert_allclose([parts["size"], parts["offset"]], [old_parts["size"], old_parts["offset"]], rtol=1e-5)
    # heatmap, positive term alone (negatives ~0): the same value
    logit = torch.where(pos, torch.randn_like(heat), torch.full_like(heat, -30.0))
    np.testing.assert_allclose(float(heatmap_focal_loss(logit, heat, pos_weight=t["pos_weight"][:, 0])),
                               float(heatmap_focal_loss(logit, heat)), rtol=1e-5)
    # ... negative term alone (positives right): now divided by 1 object, formerly by n_pos positives
    logit = torch.where(pos, torch.full_like(heat, 30.0), torch.randn_like(heat))
    np.testing.assert_allclose(float(heatmap_focal_loss(logit, heat, pos_weight=t["pos_weight"][:, 0])),
                               float(heatmap_focal_loss(logit, heat)) * n_pos, rtol=1e-4)
    # a one-voxel object: exactly the former loss
    s = _t([SMALL])
    assert int((s["heat"] >= POS_MIN - 1e-6).sum()) == 1 and int(s["reg_mask"].sum()) == 1
    np.testing.assert_allclose(float(detector_loss(out, s)[0]),
                               float(detector_loss(out, {k: v for k, v in s.items() if "weight" not in k})[0]), rtol=1e-5)

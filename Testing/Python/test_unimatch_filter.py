"""UniMatch's image-level filter on a crop that is partly confident (``test_seed_recipes.py`` has
the all-or-nothing crops, on which dropping a crop and keeping it with an empty mask give the same
losses: removing the filter from the loss passed those tests, an audit's mutation)."""
from __future__ import annotations

import pytest
import torch

from LesionSegLib.engine.learn import unimatch
from test_seed_recipes import ROI, _ConvNet, _zero_sup


@pytest.mark.parametrize("min_confident", [0.5, 0.2])
def test_a_partly_confident_crop_trains_only_when_enough_of_it_is_confident(min_confident):
    net = _ConvNet(w=3.0)  # intensity 1: lesion at confidence sigmoid(3) = 0.95 >= tau; intensity 0: 50/50
    um = unimatch.UniMatch([torch.zeros(2, *ROI)], _zero_sup, ROI, tau=0.9, fp_dropout=0.0, min_confident=min_confident)
    crop = torch.zeros(2, *ROI)
    crop[:, :2] = 1.0  # 2 of 8 slices: a quarter of the crop is confident
    um.crop = lambda: crop.clone()
    um.loss(net, None, None)
    h = um.history[0]
    assert h["confident"] == pytest.approx(0.25)
    if min_confident > 0.25:  # dropped: nothing of it is trained on, its confident quarter neither
        assert h["kept"] == 0.0 and h["fp"] == 0.0 and h["img"] == 0.0
    else:
        assert h["kept"] == 1.0 and h["fp"] > 0.0 and h["img"] > 0.0

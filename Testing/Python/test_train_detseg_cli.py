"""``lesionseg train-detseg``: the stage and card commands it runs (the stage processes mocked),
its defaults (the shipped sts-detseg 1.4.0 recipe), the wall time it writes into the card, and a
malformed inference JSON refused before any training starts."""
from __future__ import annotations

import json
from pathlib import Path

from LesionSegLib.engine import models


def test_train_detseg_command_passes_the_starting_points(monkeypatch, tmp_path):
    """`lesionseg train-detseg` runs both stages and the card with the options that made sts-detseg
    1.1.0; with no options it is the shipped 1.4.0 recipe; a bad inference JSON is refused before
    any training starts."""
    import subprocess

    from LesionSegLib.engine import cli
    from LesionSegLib.engine.cli.train_detseg import SHIPPED_RECIPE

    calls, started = [], []

    def call(cmd, *a, **k):
        calls.append(list(cmd))
        if "LesionSegLib.engine.learn.detseg_card" in cmd:  # the card step writes the card
            out = Path(cmd[cmd.index("-o") + 1])
            out.mkdir(parents=True, exist_ok=True)
            (out / "card.json").write_text(json.dumps({"name": "m", "training": {"detector": {"minutes": 1.0}}}))
        return 0

    class Popen:  # the side-by-side stages
        def __init__(self, cmd, *a, **k):
            started.append(list(cmd))

        def wait(self):
            return 0

    monkeypatch.setattr(subprocess, "call", call)
    monkeypatch.setattr(subprocess, "Popen", Popen)
    import torch
    from safetensors.torch import save_file

    init = str(tmp_path / "d.safetensors")  # --detector-init is opened before any stage starts: a real file
    save_file({"w": torch.zeros(2)}, init)
    rc = cli.main(["train-detseg", "-o", str(tmp_path / "m"), "--version", "1.1.0", "--detector-init", init,
                   "--roi-init-from", "sts-clcs", "--detector-minutes", "1", "--roi-minutes", "1",
                   "--roi-lr", "1e-3", "--no-parallel", "--roi-inference", "{}", "--detector-inference", "{}"])
    assert rc == 0 and len(calls) == 3 and not started
    det, roi, card = calls
    assert det[det.index("--stage") + 1] == "detector" and det[det.index("--init") + 1] == init
    assert roi[roi.index("--stage") + 1] == "roi" and roi[roi.index("--init-from") + 1] == "sts-clcs" and "--init" not in roi
    assert float(roi[roi.index("--lr") + 1]) == 1e-3 and "--lr" not in det  # the detector keeps its stage default
    assert "LesionSegLib.engine.learn.detseg_card" in card and "--classifier-own" in card
    assert card[card.index("--version") + 1] == "1.1.0"
    assert card[card.index("--roi-inference") + 1] == "{}" and card[card.index("--detector-inference") + 1] == "{}"
    written = json.loads((tmp_path / "m" / "card.json").read_text())  # the command's wall time goes into the card
    assert written["training"]["detector"] == {"minutes": 1.0}
    wall = written["training"]["wall_clock"]
    assert 0.0 <= wall["minutes"] < 1.0 and wall["stages"] == "one after the other" and wall["threads_per_stage"] == 1
    # no options: the recipe of the shipped stages, 1.4.0's (side by side, 52 min each, own classifier, the card's inference settings)
    calls.clear()
    assert cli.main(["train-detseg", "-o", str(tmp_path / "m")]) == 0
    assert len(started) == 2 and len(calls) == 1
    for cmd in started:
        assert float(cmd[cmd.index("--minutes") + 1]) == 52.0 and cmd[cmd.index("--threads") + 1] == "1"
        assert "--init" not in cmd and "--init-from" not in cmd  # both from scratch
    card = calls[0]
    assert "--classifier-own" in card
    assert json.loads(card[card.index("--roi-inference") + 1]) == SHIPPED_RECIPE["roi_inference"]
    assert json.loads(card[card.index("--detector-inference") + 1]) == SHIPPED_RECIPE["detector_inference"]
    assert json.loads((tmp_path / "m" / "card.json").read_text())["training"]["wall_clock"]["stages"] == "side by side"
    shipped = models.get_card("sts-detseg").data  # the recipe is the shipped card's
    assert {k: shipped["roi_segmenter"][k] for k in SHIPPED_RECIPE["roi_inference"]} == SHIPPED_RECIPE["roi_inference"]
    assert shipped["detector"]["tta_flips"] == SHIPPED_RECIPE["detector_inference"]["tta_flips"]
    assert shipped["training"]["wall_clock"]["stage_minutes_each"] == SHIPPED_RECIPE["minutes"]
    assert shipped["version"] == "1.4.1" and shipped["built_from"]["model"] == "sts-detseg@1.4.0"  # 1.4.0's stages, calibration mended
    # a bad inference JSON is refused before any stage starts
    calls.clear(), started.clear()
    assert cli.main(["train-detseg", "-o", str(tmp_path / "n"), "--roi-inference", "{refits: 3}"]) == 2
    assert cli.main(["train-detseg", "-o", str(tmp_path / "n"), "--detector-inference", "[1]"]) == 2
    assert not calls and not started and not (tmp_path / "n").exists()

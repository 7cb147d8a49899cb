"""``lesionseg finetune``: refusals, a tiny run writing a valid model version (activate / rollback),
and the OOD scores of the shipped model on real scans (sarcoma validation below chest)."""
from __future__ import annotations

import pytest

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
    with pytest.raises(FinetuneError, match="hold no lesion voxel"):
        finetune(only_rejections, base.id, replay_cases=[])
    assert [c.parent.parent.name for c in (tmp_path / "models").glob("*/*/card.json")] in ([], [base.name])


def test_tiny_finetune_writes_a_valid_version(tmp_path, monkeypatch):
    from LesionSegLib.engine import models
    from LesionSegLib.engine.learn import versions

    require_data()
    base = user_models_with_base(tmp_path, monkeypatch)
    store = store_with(tmp_path, [0, 1, 2])
    seen = []
    res = finetune(store, base.id, "tiny-ft", steps=2, replay_cases=["STS_019"], cls_replay_cases=0,
                   progress=lambda f, m: seen.append(f))
    card = res.card
    assert card.id == "tiny-ft@1" and card.data["parent"]["id"] == base.id
    ft = card.data["finetuning"]
    assert ft["steps"] == 2 and len(ft["train_cases"]) == 2 and len(ft["held_apart_cases"]) == 1
    assert ft["replay_cases"] == ["STS_019"] and set(ft["corrections"]) == {"case0", "case1", "case2"}
    assert "total_minutes" in ft and "classifier" in ft
    held = ft["held_apart_cases"][0]
    for when in ("before", "after"):
        assert ft["evaluation"][held][when]["n_gt"] == 2
        assert card.data["metrics"][f"held_apart_dice_{when}"] is not None
    assert card.data["domain"]["n_cases"] == base.data.get("domain", {}).get("n_cases", 33) + 2
    # every weight file is there and matches its checksum; the segmenter changed
    assert set(versions.verify(card)) >= {"segmenter.safetensors", "classifier.safetensors", "ood.safetensors"}
    assert card.data["segmenter"]["sha256"] != base.data["segmenter"]["sha256"]
    assert seen[-1] == 1.0 and seen == sorted(seen)
    # activate and roll back like retrain
    assert versions.activate(card.id) == card.id and models.active_model_id() == card.id
    assert versions.rollback() == models.DEFAULT_MODEL


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

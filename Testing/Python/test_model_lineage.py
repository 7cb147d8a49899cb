"""Model versions made from other versions keep what their parent's card guarantees (an audit of
every derivation: retrain, fine-tune, train-gate --attach, fit-ood, and a fine-tuned model's kept
copy of its parent), or leave out, and say so, what no longer applies."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from LesionSegLib.engine import models
from LesionSegLib.engine.learn import versions
from test_model_cards import user_dir  # noqa: F401 (fixture: a fresh LESIONSEG_MODELS)


def _copy(src: str, dst: Path, **fields) -> Path:
    shutil.copytree(models.get_card(src).folder, dst, ignore=shutil.ignore_patterns(".onnx-cache"))
    if fields:
        data = json.loads((dst / "card.json").read_text())
        data.update(fields)
        (dst / "card.json").write_text(json.dumps(data))
    return dst


def test_a_fine_tuned_model_s_kept_parent_is_not_a_registered_model(user_dir):
    """``<model>/<version>/in_domain`` (the parent a fine-tuned model routes its domain's scans to)
    was listed as a model, offered in the Slicer selector, and could shadow the user's own model of
    that id, so ``models export ID --write-card`` rewrote the kept copy and broke the fine-tuned model."""
    ft = _copy("sts-clcs", user_dir / "ft" / "1", name="ft", version="1")
    _copy("sts-clcs", ft / "in_domain")
    ids = [c.id for c in models.list_models()]
    assert "ft@1" in ids and ids.count("sts-clcs@1.2.0") == 1  # the shipped one only
    assert models.get_card("sts-clcs@1.2.0").builtin
    assert not models.shadowed(models.list_models())


def test_attach_gate_writes_a_complete_model_folder(user_dir, tmp_path):
    """``train-gate --attach`` copied only the segmenter and the classifier: the gated card named an
    ood.safetensors it did not hold, so it could not be activated or run."""
    from LesionSegLib.engine.gate.train import attach_gate
    from LesionSegLib.engine.segment.pipeline import Engine

    gate = models.get_card("sts-clcs").folder.parent / "gates" / "sts-slab-gate"
    card = attach_gate("sts-clcs", gate, user_dir / "sts-clcs-gated" / "1.0.0", name="sts-clcs-gated")
    card = models.read_card(card.folder)
    assert set(versions.verify(card)) >= {"segmenter.safetensors", "classifier.safetensors", "gate.safetensors",
                                          card.data["ood"]["file"]}
    assert card.data["parent"]["id"] == "sts-clcs@1.2.0"
    assert card.data["files"] == {p["file"]: models.sha256_file(card.folder / p["file"])
                                  for p in card.data.values() if isinstance(p, dict) and "file" in p and "sha256" in p}
    assert Engine(card, device="cpu").ood is not None
    assert card.id == "sts-clcs-gated@1.0.0"  # the folder's version, not the base's 1.2.0


def test_attach_gate_names_the_card_as_its_folder_and_never_reuses_an_id(user_dir, tmp_path, capsys):
    """``train-gate --attach`` kept the base's version: a gated card written in ``ftg/1`` was listed
    as ``ftg@1.2.0``, a second gated card of the same base had the first one's id (never used), and
    the card showed the base's validation Dice as its own figures."""
    from LesionSegLib.engine import cli
    from LesionSegLib.engine.gate.train import attach_gate, gated_identity
    from LesionSegLib.engine.learn.labels import RetrainError

    gate = models.get_card("sts-clcs").folder.parent / "gates" / "sts-slab-gate"
    first = attach_gate("sts-clcs", gate, user_dir / "ftg" / "1", name="ftg")
    assert first.id == "ftg@1" and models.get_card("ftg@1").folder == first.folder
    assert set(first.data["metrics"]) == {"gate_recall", "gate_precision", "gate_skipped_fraction"}
    assert "val_dice" not in first.data["metrics"] and "release_notes" not in first.data
    second = attach_gate("sts-clcs", gate, tmp_path / "elsewhere", name="ftg")  # a folder outside the user models
    assert second.id == "ftg@2"
    for name, out, why in (("ftg@1", tmp_path / "again", "already exists"), ("ftg", tmp_path / "elsewhere", "not empty"),
                           ("ftg@../x", tmp_path / "bad", "invalid model version")):
        with pytest.raises(RetrainError, match=why):
            gated_identity("sts-clcs", gate, out, name)
    with pytest.raises(RetrainError, match="gate folder"):
        gated_identity("sts-clcs", gate, gate, "ftg")
    with pytest.raises(RetrainError, match="gate folder"):  # -o inside --card-out: that folder would not be empty
        gated_identity("sts-clcs", tmp_path / "x" / "gate", tmp_path / "x", "ftg")
    # in the user model folder a card lives in NAME/VERSION, as it says: a card in <root>/flat hid every
    # later flat/N, one inside ftg@1's folder was never listed, and other/3 or ftg/1 held ftg@5
    for out, name in ((user_dir / "flat", "flat"), (user_dir / "ftg" / "1" / "sub", None), (user_dir / "other" / "3", "ftg"),
                      (user_dir / "ftg" / "7", "ftg@5")):
        with pytest.raises(RetrainError, match="user model folder|not of"):
            gated_identity("sts-clcs", gate, out, name)
    assert gated_identity("sts-clcs", gate, user_dir / "ftg" / "7", None)[:2] == ("ftg", "7")  # the folder names it
    third = attach_gate("sts-clcs", gate, None, "ftg")  # no --card-out: where retrain puts a version
    assert third.id == "ftg@2" and third.folder == user_dir / "ftg" / "2"
    fake = tmp_path / "forged-gate"
    shutil.copytree(gate, fake)
    (fake / json.loads((fake / "gate.json").read_text())["file"]).write_bytes(b"not the gate")
    with pytest.raises(RetrainError, match="does not match the sha256"):
        attach_gate("sts-clcs", fake, None, "ftg")
    assert not (user_dir / "ftg" / "3").exists()
    assert not (tmp_path / "again").exists() and not models.shadowed(models.list_models())
    # the command refuses a clash before it trains anything
    rc = cli.main(["train-gate", "-o", str(tmp_path / "g"), "--max-steps", "1", "--attach", "sts-clcs", "--name", "ftg@1"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "ftg@1 already exists" in err and "\n" not in err
    assert not (tmp_path / "g").exists()


def test_retrain_keeps_a_click_segmenter(user_dir):
    """A click segmenter (``train_click --attach``) belongs to the segmenter, which retraining keeps:
    it was left out of the new version, and clicks silently fell back to the plain segmenter."""
    from LesionSegLib.engine.learn.model_writer import write_model
    from LesionSegLib.engine.segment.classifier import ConfidenceModel

    folder = _copy("sts-clcs", user_dir / "clk" / "1", name="clk", version="1")
    data = json.loads((folder / "card.json").read_text())
    shutil.copyfile(folder / data["segmenter"]["file"], folder / "click_segmenter.safetensors")
    net = {**data["segmenter"]["network"], "in_channels": data["segmenter"]["network"].get("in_channels", 1) + 1}
    data["click_segmenter"] = {**data["segmenter"], "file": "click_segmenter.safetensors", "network": net,
                               "guidance": {"sigma_mm": 10.0}}  # the card of one (these bytes are only copied here)
    (folder / "card.json").write_text(json.dumps(data))
    parent = models.read_card(folder)
    figures = {"auc": 1.0, "ece": 0.0}
    new = write_model(parent, ConfidenceModel.from_card(parent), "clk-rt", {"label_counts": {"total": 0}, "trainer": {"mode": "head"}},
                      {"new": figures, "old": figures})
    assert new.data["click_segmenter"]["sha256"] == parent.data["click_segmenter"]["sha256"]
    assert "click_segmenter.safetensors" in versions.verify(new)


def test_fit_ood_keeps_the_card_s_file_list_true(user_dir):
    """``fit-ood`` names its statistics after their content; the card's ``files`` kept naming the
    deleted ood.safetensors."""
    from LesionSegLib.engine.learn.ood_fit import replace_ood
    from LesionSegLib.engine.segment.ood import OODModel

    folder = _copy("sts-clcs", user_dir / "m" / "1", name="m", version="1")
    data = json.loads((folder / "card.json").read_text())
    data["files"] = {data[k]["file"]: data[k]["sha256"] for k in ("segmenter", "classifier", "ood")}
    (folder / "card.json").write_text(json.dumps(data))
    card = models.read_card(folder)
    old = OODModel.from_card(card)
    moved = OODModel(old.scans, old.lesions[:-1], old.lesion_method, old.scan_threshold, old.cap, old.domain)  # other statistics
    replace_ood(card, moved, {}, card.data["domain"])
    card = models.read_card(folder)
    assert card.data["ood"]["file"] != "ood.safetensors" and not (folder / "ood.safetensors").exists()
    assert card.data["files"] == {card.data[k]["file"]: models.sha256_file(folder / card.data[k]["file"])
                                  for k in ("segmenter", "classifier", "ood")}
    assert np.array_equal(models.read_card(folder).load_arrays("ood")["lesions"], moved.lesions)


def test_fine_tuning_a_routed_model_says_when_it_gives_its_routing_up():
    """Fine-tuning a fine-tuned model whose corrections lie inside its kept model's domain turns
    routing off, and the grandparent's domain then runs the twice-fine-tuned networks: said in the
    card and the summary.  Corrections outside that domain keep the routing to the kept model,
    even where they lie inside the parent's own (widened) domain."""
    from types import SimpleNamespace

    from LesionSegLib.engine.learn.finetune import FinetuneResult
    from LesionSegLib.engine.learn.finetune_checks import routing_decision

    def ood(score, domain):
        return SimpleNamespace(scan_score=lambda d: score, scan_threshold=1.5, domain=domain)

    grandparent = SimpleNamespace(card=SimpleNamespace(id="sts-clcs@1.1.0"), ood=ood(0.5, "soft-tissue sarcoma, extremities"))
    parent = SimpleNamespace(card=SimpleNamespace(id="sts-clcs@2"), ood=ood(0.5, "sarcoma + chest"), in_domain=grandparent)
    case = SimpleNamespace(case_name="c1", hu=np.full((8, 16, 16), 40, np.int16),
                           geometry={"spacing_zyx": [3.0, 2.0, 2.0], "origin_lps": [0.0, 0.0, 0.0], "direction": [1, 0, 0, 0, 1, 0, 0, 0, 1]})
    route = routing_decision(parent, [case], None)
    assert not route["enabled"] and "sts-clcs@2 sent the scans of sts-clcs@1.1.0's domain" in route["gives_up"]
    assert "inside the domain of sts-clcs@1.1.0, which sts-clcs@2 routes to" in route["why"]
    card = SimpleNamespace(id="sts-clcs@3", folder=Path("/m"), data={"parent": {"id": "sts-clcs@2"}, "routing": route, "finetuning": {
        "steps": 1, "train_cases": ["c1"]}})
    assert "warning: sts-clcs@2 sent the scans" in FinetuneResult(card, 60.0, {}).summary()
    assert "gives_up" not in routing_decision(SimpleNamespace(card=parent.card, ood=parent.ood, in_domain=None), [case], None)
    # the case lies inside the parent's widened domain but outside the kept model's: routed to the kept one
    grandparent.ood = ood(5.0, "soft-tissue sarcoma, extremities")
    route = routing_decision(parent, [case], None)
    assert route["enabled"] and route["parent"] == "sts-clcs@1.1.0" and route["via"] == "sts-clcs@2"
    assert route["train_case_scan_ood"] == {"c1": 5.0} and "gives_up" not in route
    # a kept model without usable OOD statistics cannot be judged against: the parent is
    grandparent.ood = None
    route = routing_decision(parent, [case], None)
    assert not route["enabled"] and route["parent"] == "sts-clcs@2" and "via" not in route
    # the advice names the corrected cases that lie inside the kept model's domain and the ways out
    grandparent.ood = ood(0.5, "soft-tissue sarcoma, extremities")
    text = routing_decision(parent, [case], None)["gives_up"]
    assert "the corrected cases c1 lie inside that domain" in text and "--routing on" in text
    assert "routing was turned off" in routing_decision(parent, [case], False)["gives_up"]
    # a chain written before routing was carried over (a kept copy that keeps one) routes to its end
    shipped = SimpleNamespace(card=SimpleNamespace(id="sts-clcs@1.0.0"), ood=ood(5.0, "sarcoma"))
    grandparent.in_domain = shipped
    route = routing_decision(parent, [case], None)
    assert route["enabled"] and route["parent"] == "sts-clcs@1.0.0" and route["via"] == "sts-clcs@2"
    # nothing to judge against: forcing routing on is refused, not ignored
    lone = SimpleNamespace(card=SimpleNamespace(id="x@1", folder=Path("/m/x/1")), ood=None, in_domain=None)
    with pytest.raises(ValueError, match="routing cannot be turned on: x@1 has no usable OOD statistics"):
        routing_decision(lone, [case], True)
    from LesionSegTrainingLib.finetune import result_text

    done = {"model": "sts-clcs@3", "seconds": 1, "metrics": {}, "routing": {"enabled": False, "gives_up": "it gives up"}}
    assert result_text(done).endswith("Warning: it gives up.")  # the Slicer panel says it too


def test_the_finetune_command_s_done_event_carries_the_routing_warning(tmp_path, monkeypatch, capsys):
    """The LesionSegTraining panel learns that routing was given up only from the ``--progress json``
    done event of ``lesionseg finetune``; dropping it there passed every test (audit mutation)."""
    from LesionSegLib.engine import cli
    from LesionSegLib.engine.cli import finetune as cli_finetune
    from types import SimpleNamespace

    from LesionSegLib.engine.learn.finetune import FinetuneResult
    from LesionSegTrainingLib.finetune import result_text

    routing = {"enabled": False, "parent": "sts-clcs@1.2.0", "via": "ft@1", "gives_up": "it gives up", "folder": "in_domain"}
    card = SimpleNamespace(id="ft@2", folder=tmp_path / "ft" / "2", data={"metrics": {"n": 1}, "routing": routing})
    monkeypatch.setattr(cli_finetune, "finetune", lambda *a, **k: FinetuneResult(card, 2.0, {}))
    assert cli.main(["finetune", "--feedback", str(tmp_path / "fb.db"), "-o", "ft@2", "--progress", "json"]) == 0
    done = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert done["event"] == "done" and done["routing"] == {k: routing[k] for k in ("enabled", "parent", "via", "gives_up")}
    assert result_text(done).endswith("Warning: it gives up.")


def test_a_stale_kept_copy_routes_through_its_installed_twin_and_a_damaged_one_is_refused_at_activation(tmp_path, monkeypatch):
    """A fine-tuned model whose kept copy has statistics of an older scan descriptor could never
    route again (fine-tuning it judged nothing and wrote no warning); a damaged kept copy passed
    activation and failed every scan."""
    from types import SimpleNamespace

    from LesionSegLib.engine.learn.finetune_checks import route_target
    from LesionSegLib.engine.learn.model_writer import copy_routing

    monkeypatch.setenv("LESIONSEG_MODELS", str(tmp_path / "models"))
    shipped = models.get_card("sts-clcs")
    stale = SimpleNamespace(card=shipped, ood=None)
    parent = SimpleNamespace(card=SimpleNamespace(id="ft@1"), ood=None, in_domain=stale)
    target = route_target(parent)
    assert target.card.id == shipped.id and target.ood is not None and target.card.folder == shipped.folder
    other = SimpleNamespace(card=models.get_card("sts-attention-unet"), ood=None)  # not the installed model's bytes
    other.card = SimpleNamespace(id=shipped.id, part=lambda k: {"sha256": "0" * 64})
    assert route_target(SimpleNamespace(card=SimpleNamespace(id="ft@1"), ood=None, in_domain=other)).card.id == "ft@1"
    # a routed version: its routing says which version it was carried through; a damaged kept copy fails verify
    ft = _copy("sts-clcs", tmp_path / "models" / "ft" / "2", name="ft", version="2")
    _copy("sts-clcs", ft / "in_domain")
    data = json.loads((ft / "card.json").read_text())
    data["routing"] = {"enabled": True, "parent": shipped.id, "via": "ft@1", "folder": "in_domain",
                       "card_sha256": models.sha256_file(ft / "in_domain" / "card.json")}
    (ft / "card.json").write_text(json.dumps(data))
    card = models.read_card(ft)
    assert "in_domain/segmenter.safetensors" in versions.verify(card)
    assert copy_routing(card, tmp_path / "out")["via"] == "ft@2"
    weights = ft / "in_domain" / "segmenter.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\0")
    with pytest.raises(models.ModelError, match="the model it keeps for scans of sts-clcs@1.2.0's domain: .*segmenter"):
        versions.verify(card)
    with pytest.raises(models.ModelError, match="keeps for scans"):
        versions.activate(card.id)


def test_fine_tuning_a_fine_tuned_model_keeps_routing_to_the_shipped_model(tmp_path, monkeypatch):
    """Two rounds of corrections from one new domain: the second fine-tune judged them against the
    first fine-tuned model's OOD reference, which already held the first round, called them inside
    its domain and gave up routing, so sarcoma scans ran the twice-fine-tuned networks.  They are
    judged against the shipped model the first one routes to, whose copy is carried over."""
    from feedback_testdata import require_data, user_models_with_base
    from test_finetune import store_with

    from LesionSegLib.engine import data as dataset
    from LesionSegLib.engine.io.images import read_image
    from LesionSegLib.engine.learn.finetune import finetune
    from LesionSegLib.engine.segment.pipeline import Engine

    require_data()
    base = user_models_with_base(tmp_path, monkeypatch)
    kw = dict(steps=1, replay_cases=["STS_019"], cls_replay_cases=0)
    first = finetune(store_with(tmp_path / "round1", [0, 1, 2]), base.id, "ft", **kw).card
    assert first.data["routing"]["enabled"] and first.data["routing"]["parent"] == base.id
    second = finetune(store_with(tmp_path / "round2", [3, 4, 5]), first.id, "ft", **kw).card
    route = second.data["routing"]
    assert second.id == "ft@2" and second.data["parent"]["id"] == first.id
    assert route["enabled"] and route["parent"] == base.id and route["via"] == first.id and "gives_up" not in route
    kept = second.folder / route["folder"]
    assert models.sha256_file(kept / "card.json") == route["card_sha256"] == first.data["routing"]["card_sha256"]
    assert not (kept / route["folder"]).exists()  # the shipped model's copy, not the first fine-tune with its own copy inside
    eng = Engine(second, device="cpu")
    assert eng.in_domain.card.data["segmenter"]["sha256"] == base.data["segmenter"]["sha256"]
    sts = eng.segment(read_image(dataset.case("STS_041").image))
    assert any(f"lies in the domain of {base.id}" in m for m in sts.messages)

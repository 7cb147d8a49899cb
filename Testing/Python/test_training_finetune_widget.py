"""The LesionSegTraining panel's "Fine-tune segmenter" button, offscreen (PySide6 harness, real MRML),
driven like a user would: refusals with the engine's one-line message (empty database, too few
corrected cases, replay cases missing from the data folder), a cancel in the middle of training
(process tree gone, no model folder), and a real tiny fine-tune (2 steps on the corrected
synthetic cases + one real STS replay case) whose new version is listed, activated and rolled back.
"""
from __future__ import annotations

import psutil

import feedback_testdata as td
from slicer_app_shim import slicer_app  # noqa: F401 (fixture)
from test_finetune import store_with
from test_training_module_widget import rows, wait_for, widget  # noqa: F401 (fixture)


def _model_folders(widget):
    return sorted(str(p.parent.relative_to(widget.tmp / "models")) for p in (widget.tmp / "models").glob("*/*/card.json"))


def _open(widget, seeds, folder):
    store_with(widget.tmp / folder, seeds).close()
    widget.ui.databasePathEdit.setText(str(widget.tmp / folder / "fb.db"))
    widget.ui.openDatabaseButton.click()
    assert widget.logic.store is not None


def _errors(monkeypatch):
    import slicer

    shown = []
    monkeypatch.setattr(slicer.util, "errorDisplay", lambda text, **kw: shown.append((text, kw)))
    return shown


def _select(combo, text):
    items = [combo.itemText(i) for i in range(combo.count())]
    combo.setCurrentIndex(items.index(text))


def test_finetune_refuses_when_there_is_too_little(widget, monkeypatch):  # noqa: F811
    from LesionSegLib.engine.learn.finetune import DEFAULT_STEPS

    ui = widget.ui
    shown = _errors(monkeypatch)
    assert not ui.finetuneButton.isEnabled()  # no database open yet
    assert ui.finetuneStepsSpinBox.value() == DEFAULT_STEPS == widget._parameterNode.finetuneSteps
    assert ui.finetuneSyntheticSpinBox.value() == 0.0 == widget._parameterNode.finetuneSynthetic  # real corrections only by default
    assert ui.finetuneBaseSelector.currentText() == widget.logic.active_model_id()  # the active model by default
    ft_items = [ui.finetuneBaseSelector.itemText(i) for i in range(ui.finetuneBaseSelector.count())]
    all_items = [ui.baseModelSelector.itemText(i) for i in range(ui.baseModelSelector.count())]
    assert any(i.startswith("sts-detseg@") for i in all_items)  # the classifier can be retrained for any model ...
    assert not any(i.startswith("sts-detseg@") for i in ft_items) and ft_items  # ... the segmenter fine-tuned only for a dense one
    assert any(i.startswith("sts-attention-unet@") for i in all_items)  # ... that has a classifier to retrain with it
    assert not any(i.startswith("sts-attention-unet@") for i in ft_items)
    before = _model_folders(widget)
    for seeds, folder, count in (([], "empty", "0 corrected case(s)"), ([0], "one", "1 corrected case(s)")):
        _open(widget, seeds, folder)
        assert ui.finetuneCountsLabel.text().startswith(count)
        ui.finetuneButton.click()
        job = widget.finetuneJob
        assert job is not None and ui.finetuneButton.text() == "Cancel"
        wait_for(lambda: widget.finetuneJob is None, timeout=120)
        assert job.state == "failed"
        text, kw = shown[-1]
        assert text.startswith("Fine-tuning failed: too little to learn from") and "\n" not in text, text
        assert f"{len(seeds)} corrected cases in the feedback database" in text
        assert kw["detailedText"] == ui.logTextEdit.toPlainText() and "too little to learn from" in kw["detailedText"]
        assert ui.finetuneStatusLabel.text().startswith("Fine-tuning failed: too little to learn from")
        assert ui.finetuneButton.text() == "Fine-tune segmenter" and ui.finetuneProgressBar.isHidden()
    assert len(shown) == 2
    assert _model_folders(widget) == before


def test_finetune_cancel_mid_training_leaves_nothing(widget, monkeypatch):  # noqa: F811
    td.require_data()
    ui = widget.ui
    shown = _errors(monkeypatch)
    _open(widget, [0, 1, 2], "three")
    assert ui.finetuneCountsLabel.text().startswith("3 corrected case(s)")
    before = _model_folders(widget)
    ui.finetuneOutputEdit.setText("never")
    ui.finetuneReplayEdit.setText("NOT_A_CASE")  # a replay case the data folder lacks: refused in one line
    ui.finetuneButton.click()
    wait_for(lambda: widget.finetuneJob is None, timeout=120)
    assert len(shown) == 1 and "1 replay case(s) not in the data folder" in shown[0][0] and "NOT_A_CASE" in shown[0][0]

    ui.finetuneReplayEdit.setText("STS_019")
    ui.finetuneStepsSpinBox.setValue(100000)
    ui.finetuneButton.click()
    job = widget.finetuneJob
    assert job is not None and not ui.finetuneProgressBar.isHidden()
    wait_for(lambda: job.fraction > 0.05 or job.state != "running", timeout=180)  # in the training loop
    assert job.state == "running", job.error
    assert ui.finetuneProgressBar.value() > 0 and not ui.databasePathEdit.isEnabled()
    tree = [psutil.Process(job.proc.pid), *psutil.Process(job.proc.pid).children(recursive=True)]
    ui.finetuneButton.click()  # Cancel
    assert widget.finetuneJob is None and job.state == "cancelled" and job.proc.poll() is not None
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in tree)
    assert ui.finetuneProgressBar.value() == 0 and ui.finetuneProgressBar.isHidden()
    assert ui.finetuneButton.text() == "Fine-tune segmenter" and ui.databasePathEdit.isEnabled()
    assert ui.finetuneStatusLabel.text() == "Fine-tuning cancelled. No model was written."
    assert _model_folders(widget) == before and not (widget.tmp / "models" / "never").exists()
    assert len(shown) == 1


def test_tiny_finetune_through_the_button_activate_rollback(widget, monkeypatch):  # noqa: F811
    from LesionSegLib.engine import models

    td.require_data()
    ui = widget.ui
    shown = _errors(monkeypatch)
    _open(widget, [0, 1, 2], "three")
    _select(ui.finetuneBaseSelector, widget.base.id)
    ui.finetuneStepsSpinBox.setValue(2)
    ui.finetuneOutputEdit.setText("panel-ft")
    ui.finetuneReplayEdit.setText("STS_019")
    ui.finetuneSyntheticSpinBox.setValue(0.5)  # the phantoms have no lung: accepted, nothing inserted
    ui.finetuneButton.click()
    assert widget.finetuneJob is not None
    seen = []
    wait_for(lambda: seen.append(ui.finetuneProgressBar.value()) or widget.finetuneJob is None, timeout=400)
    status = ui.finetuneStatusLabel.text()
    assert not shown and status.startswith("New version panel-ft@1 in "), status + "\n" + ui.logTextEdit.toPlainText()
    assert "held-apart Dice" in status and status in ui.logTextEdit.toPlainText()
    assert seen == sorted(seen) and ui.finetuneProgressBar.isHidden()
    table = {r[0]: r for r in rows(ui.finetuneTableView)}
    assert set(table) == {"Sensitivity", "FP per case", "Dice", "Parent's own cases: segmenter Dice"}
    assert all(r[1] != "-" and r[2] != "-" for r in table.values())  # one corrected case held apart: both measured
    card = models.get_card("panel-ft@1")
    assert card.data["parent"]["id"] == widget.base.id and card.data["finetuning"]["steps"] == 2
    assert card.data["finetuning"]["replay_cases"] == ["STS_019"]
    assert card.data["finetuning"]["synthetic_fraction"] == 0.5 and card.data["finetuning"]["synthetic_lesions"] == 0
    assert card.folder == widget.tmp / "models" / "panel-ft" / "1"
    assert table["Dice"][2] == f"{card.data['metrics']['held_apart_dice_after']:.3f}"
    assert card.data["finetuning"]["base_domain_check"]["cases"] == ["STS_019"]  # the replay case
    assert table["Parent's own cases: segmenter Dice"][1] == f"{card.data['metrics']['base_domain_dice_before']:.3f}"
    versions = {r[0]: r for r in rows(ui.versionsTableView)}
    assert versions["panel-ft@1"][2] == widget.base.id
    assert ui.versionSelector.currentText() == "panel-ft@1"

    ui.activateButton.click()
    assert models.active_model_id() == "panel-ft@1" and "panel-ft@1" in ui.activeModelLabel.text()
    assert [r[0] for r in rows(ui.versionsTableView) if r[1] == "yes"] == ["panel-ft@1"]
    ui.rollbackButton.click()
    assert models.active_model_id() == models.default_model_id() and "rolled back" in ui.activeModelLabel.text()
    assert not shown


def test_replay_cases_option():
    from LesionSegLib.engine.cli.finetune import replay_names

    assert replay_names(None) is None and replay_names("  ") is None  # the base training split
    assert replay_names("none") == [] and replay_names(" None ") == []
    assert replay_names("STS_019, STS_002,") == ["STS_019", "STS_002"]

"""Model cards and what is trusted from a model folder: the card schema, the weights' dtypes and
values, the ONNX cache (forgery, symlinks), routing confinement, broken cards in the user folder,
activation, ``LESIONSEG_MODELS`` and ids shadowed by a shipped model.

Every fixture is a copy of a shipped model in ``tmp_path``, tampered with in code.
"""
from __future__ import annotations

import json
import os
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from LesionSegLib.engine import cli, models
from LesionSegLib.engine.card_schema import check_card
from LesionSegLib.engine.errors import ModelError
from LesionSegLib.engine.learn import versions
from LesionSegLib.engine.models import BUILTIN_DIR, get_card, read_card, save_weights
from LesionSegLib.engine.runtime import export
from LesionSegLib.engine.runtime.models import OnnxConfidenceModel


@pytest.fixture()
def user_dir(tmp_path, monkeypatch):
    d = tmp_path / "models"
    d.mkdir()
    monkeypatch.setenv("LESIONSEG_MODELS", str(d))
    return d


def _copy(src: str, dst: Path, edit=None) -> Path:
    shutil.copytree(get_card(src).folder, dst, ignore=shutil.ignore_patterns(".onnx-cache"))
    if edit is not None:
        data = json.loads((dst / "card.json").read_text())
        edit(data)
        (dst / "card.json").write_text(json.dumps(data))
    return dst


@pytest.fixture()
def clcs(tmp_path, user_dir):
    return _copy("sts-clcs", tmp_path / "m")


# ------------------------------------------------------------------ P1-5 the card schema
def test_every_shipped_card_passes_the_schema():
    cards = [read_card(p) for p in sorted(BUILTIN_DIR.glob("*/card.json"))]
    assert {c.name for c in cards} >= {"sts-clcs", "sts-detseg", "sts-attention-unet"}
    for card in cards:
        check_card(card.data, str(card.folder))  # raises on any problem


def _set(path, value):
    def edit(c):
        d = c
        for k in path[:-1]:
            d = d[k]
        if value is KeyError:
            del d[path[-1]]
        else:
            d[path[-1]] = value
    return edit


CLCS_BAD = [
    (("segmenter", "file"), 5, "segmenter.file"),
    (("segmenter", "sha256"), 123, "segmenter.sha256"),
    (("segmenter",), "x", "segmenter must be an object"),
    (("segmenter",), KeyError, "segmenter is missing"),
    (("segmenter", "network"), KeyError, "segmenter.network is missing"),
    (("segmenter", "roi_size"), "48,96,96", "segmenter.roi_size"),
    (("segmenter", "roi_size"), [-48, 96, 96], "segmenter.roi_size[0]"),
    (("segmenter", "roi_size"), [10**12, 96, 96], "segmenter.roi_size[0]"),
    (("segmenter", "roi_size"), [48, 96], "must have 3 entries"),
    (("segmenter", "spacing_zyx"), [0, 2, 2], "segmenter.spacing_zyx[0] must be > 0"),
    (("segmenter", "hu_windows"), [[1]], "segmenter.hu_windows[0]"),
    (("segmenter", "overlap"), 1.0, "segmenter.overlap"),
    (("segmenter", "network", "filters"), [8, 16, 32, 64, 10**6], "segmenter.network.filters[4]"),
    (("segmenter", "network", "type"), "Evil", "segmenter.network.type"),
    (("segmenter", "network", "out_channels"), 3, "segmenter.network.out_channels"),
    (("postprocess", "prob_threshold"), "high", "postprocess.prob_threshold"),
    (("postprocess",), [1], "postprocess must be an object"),
    (("confidence_threshold",), -5, "confidence_threshold must be >= 0"),
    (("classifier", "temperature"), 0, "classifier.temperature must be > 0"),
    (("classifier", "patch_size"), [-32, 32, 32], "classifier.patch_size"),
    (("classifier", "feature_mean"), [0.0], "classifier.feature_mean must have 18 entries"),
    (("classifier", "feature_std"), [0.0] * 18, "classifier.feature_std[0] must be > 0"),
    (("ood",), "x", "ood must be an object"),
    (("gate",), "x", "gate must be an object"),
    (("onnx",), "x", "onnx must be an object"),
    (("metrics",), "x", "metrics must be an object"),
    (("architecture",), "evil", "architecture 'evil'"),
    (("routing",), {"enabled": True}, "routing.folder"),
]


@pytest.mark.parametrize("path,value,text", CLCS_BAD, ids=[t for _, _, t in CLCS_BAD])
def test_a_bad_clcs_card_value_is_refused_naming_the_field(tmp_path, user_dir, path, value, text):
    folder = _copy("sts-clcs", tmp_path / "bad", _set(path, value))
    with pytest.raises(ModelError) as exc:
        get_card(str(folder))
    assert text in str(exc.value) and str(folder / "card.json") in str(exc.value) and "\n" not in str(exc.value)


DETSEG_BAD = [
    (("detector", "grid_spacing_zyx"), [0, 4, 4], "detector.grid_spacing_zyx[0]"),
    (("detector", "max_detections"), -1, "detector.max_detections"),
    (("detector", "nms_iou"), "x", "detector.nms_iou"),
    (("detector", "tta_flips"), [["a"]], "detector.tta_flips[0][0]"),
    (("roi_segmenter", "roi_shape"), ["a", 48, 48], "roi_segmenter.roi_shape[0]"),
    (("roi_segmenter", "roi_shape"), [-32, 48, 48], "roi_segmenter.roi_shape[0]"),
    (("confidence_source",), "evil", "confidence_source"),
    (("roi_segmenter",), KeyError, "roi_segmenter is missing"),
]


@pytest.mark.parametrize("path,value,text", DETSEG_BAD, ids=[t for _, _, t in DETSEG_BAD])
def test_a_bad_detseg_card_value_is_refused_naming_the_field(tmp_path, user_dir, path, value, text):
    folder = _copy("sts-detseg", tmp_path / "bad", _set(path, value))
    with pytest.raises(ModelError, match=text.replace("[", r"\[").replace("]", r"\]")):
        get_card(str(folder))


@pytest.mark.parametrize("content,text", [
    ("5", "does not hold a JSON object"), ('{"name": ["x"]}', "'name' must be a non-empty text"),
    ('{"name": "x", "version": {"a": 1}}', "'version' must be a text"), ("[" * 100000, "is not valid JSON"),
    (b'{"name": "evil\xff"}', "is not valid JSON"),
])
def test_a_malformed_card_is_a_model_error(tmp_path, content, text):
    (tmp_path / "card.json").write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(ModelError, match=text):
        read_card(tmp_path)


def test_a_bad_card_fails_segment_in_one_line_before_any_ct_is_read(tmp_path, user_dir, capsys):
    folder = _copy("sts-clcs", tmp_path / "bad", _set(("segmenter", "spacing_zyx"), "3"))
    rc = cli.main(["segment", "--sample", "-o", str(tmp_path / "out"), "--model", str(folder), "--progress", "none"])
    err = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("note:")]
    assert rc == 2 and len(err) == 1 and "segmenter.spacing_zyx" in err[0] and "Traceback" not in err[0]
    assert "image.nii.gz" not in err[0]  # not blamed on the CT
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_any_other_failure_while_loading_is_a_model_error_naming_the_model(clcs, monkeypatch):
    from LesionSegLib.engine.segment.pipeline import load_engine
    from LesionSegLib.engine.segment import classifier

    def broken(*a, **k):
        raise RuntimeError("allocation failed\nsecond line")

    monkeypatch.setattr(classifier, "_build", broken)
    with pytest.raises(ModelError) as exc:
        load_engine(str(clcs), "cpu", runtime="torch")
    assert "model sts-clcs@1.2.0 (" in str(exc.value) and "cannot be loaded" in str(exc.value) and "allocation failed" in str(exc.value)
    assert "\n" not in str(exc.value)


# ------------------------------------------------------------------ P1-6 / P1-7 / P1-11 weights
def _rewrite_classifier(folder: Path, change) -> models.ModelCard:
    card = read_card(folder)
    from safetensors.torch import load_file

    state = load_file(str(card.weights_path("classifier")))
    change(state)
    card.data["classifier"]["sha256"] = save_weights(state, card.weights_path("classifier"))
    card.save()
    return read_card(folder)


def test_weights_with_nan_or_the_wrong_dtype_are_refused(clcs):
    from LesionSegLib.engine.segment.classifier import ConfidenceModel

    name = "head.0.weight"
    card = _rewrite_classifier(clcs, lambda s: s[name].view(-1).__setitem__(0, float("nan")))
    with pytest.raises(ModelError, match=f"NaN or infinite values \\({name}\\)"):
        ConfidenceModel.from_card(card)
    card = _rewrite_classifier(clcs, lambda s: s.__setitem__(name, torch.nan_to_num(s[name]).half()))
    with pytest.raises(ModelError, match=f"{name} is float16, the network needs float32"):
        ConfidenceModel.from_card(card)


def test_ood_statistics_with_nan_or_a_wrong_layout_are_refused(clcs):
    from LesionSegLib.engine.segment.ood import OODModel

    card = read_card(clcs)
    arrays = card.load_arrays("ood")
    for bad, text in (({**arrays, "scans": arrays["scans"] * np.nan}, "NaN"), ({**arrays, "scans": arrays["scans"][0]}, "2-D array 'scans'"),
                      ({**arrays, "lesions": arrays["lesions"].astype(np.int64)}, "int64")):
        card.data["ood"]["sha256"] = save_weights({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in bad.items()},
                                                  card.weights_path("ood"))
        with pytest.raises(ModelError, match=text):
            OODModel.from_card(card)


def test_a_tampered_ood_file_is_refused(clcs):
    """ood.safetensors decides the OOD warning and the cap: one changed byte fails its checksum."""
    from LesionSegLib.engine.segment.ood import OODModel

    card = read_card(clcs)
    f = card.weights_path("ood")
    b = bytearray(f.read_bytes())
    b[-3] ^= 0x01  # a value in the last array, the header intact
    f.write_bytes(bytes(b))
    with pytest.raises(ModelError, match=f"checksum mismatch for {f.name}"):
        OODModel.from_card(card)


def test_a_shape_mismatch_is_one_line_naming_the_first_and_counting_the_rest(tmp_path, user_dir, capsys):
    folder = _copy("sts-clcs", tmp_path / "m", _set(("classifier", "network", "channels"), [8, 8, 8]))
    from LesionSegLib.engine.segment.classifier import ConfidenceModel

    with pytest.raises(ModelError) as exc:
        ConfidenceModel.from_card(get_card(str(folder)))
    text = str(exc.value)
    assert "\n" not in text and "does not fit the network" in text and "more tensor(s) that do not fit" in text
    assert len(text) < 300
    rc = cli.main(["segment", "--sample", "-o", str(tmp_path / "out"), "--model", str(folder), "--progress", "none", "--runtime", "torch"])
    err = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("note:")]
    assert rc == 2 and len(err) == 1 and "does not fit the network" in err[0]


def test_a_fifo_as_weight_file_is_refused_without_blocking(clcs):
    path = clcs / "segmenter.safetensors"
    path.unlink()
    os.mkfifo(path)
    card = read_card(clcs)
    result = {}

    def read():
        try:
            card.verified_bytes("segmenter")
        except ModelError as exc:
            result["error"] = str(exc)

    t = threading.Thread(target=read, daemon=True)
    t.start()
    t.join(20)
    if t.is_alive():  # unblock the reader before failing
        with open(os.open(path, os.O_WRONLY | os.O_NONBLOCK), "wb"):
            pass
    assert not t.is_alive(), "reading a FIFO weight file blocked"
    assert "not a weight file" in result.get("error", "")


# ------------------------------------------------------------------ P1-1 / P1-2 the ONNX cache
def _forge(card: models.ModelCard, part: str, other_onnx: Path) -> Path:
    """Put another network's export in place of ``part``'s and fix its manifest's checksum."""
    onnx, manifest = export.export_paths(card, part)
    shutil.copyfile(other_onnx, onnx)
    m = json.loads(manifest.read_text())
    m["onnx_sha256"] = export.sha256_file(onnx)
    manifest.write_text(json.dumps(m))
    return onnx


def _logits(card):
    rng = np.random.default_rng(1)
    model = OnnxConfidenceModel(card, "onnxruntime")
    patches = rng.random((3, 3, 32, 32, 32)).astype(np.float32)
    feats = rng.standard_normal((3, 18)).astype(np.float32)
    return model, model.logits(patches, feats)


@pytest.mark.parametrize("with_record", [True, False], ids=["card-records-the-export", "no-record"])
def test_a_forged_onnx_cache_is_never_run(tmp_path, user_dir, with_record):
    def edit(c):
        if not with_record:
            c.pop("onnx")
    genuine = read_card(_copy("sts-clcs", tmp_path / "m", edit))
    _, good = _logits(genuine)
    other = _rewrite_classifier(_copy("sts-clcs", tmp_path / "other", edit), lambda s: s["head.3.bias"].add_(3.0))
    _, shifted = _logits(other)
    assert np.abs(shifted - good).max() > 1.0  # the other export computes something else
    forged = _forge(genuine, "classifier", export.export_paths(other, "classifier")[0])
    forged_sha = export.sha256_file(forged)
    model, logits = _logits(read_card(genuine.folder))
    assert np.abs(logits - good).max() < 1e-5, "the forged export was run"
    assert any("refused" in n for n in model.notes) and not any("same verified weights" in n for n in model.notes)
    assert export.sha256_file(forged) != forged_sha  # exported again from the verified weights


def test_an_onnx_file_swapped_after_its_check_is_not_run(tmp_path, user_dir, monkeypatch):
    """The runtime loads the bytes that were verified, not the file again: swapping the cached
    export between its check and its load (whoever can write the cache folder could) runs nothing forged."""
    genuine = read_card(_copy("sts-clcs", tmp_path / "m"))
    _, good = _logits(genuine)  # the cache now holds the genuine export
    other = _rewrite_classifier(_copy("sts-clcs", tmp_path / "other"), lambda s: s["head.3.bias"].add_(3.0))
    _, shifted = _logits(other)
    forged_bytes = export.export_paths(other, "classifier")[0].read_bytes()
    onnx_path = export.export_paths(genuine, "classifier")[0]
    checked = export.reference_notes  # called once the cached file passed its check, before it is used

    def swap_after_check(*args, **kwargs):
        onnx_path.write_bytes(forged_bytes)
        return checked(*args, **kwargs)

    monkeypatch.setattr(export, "reference_notes", swap_after_check)
    model, logits = _logits(read_card(genuine.folder))
    assert onnx_path.read_bytes() == forged_bytes  # the swap happened in the window
    assert np.abs(logits - good).max() < 1e-5 and np.abs(logits - shifted).max() > 1.0, "the swapped-in export was run"


def test_a_signed_cache_made_by_another_user_or_folder_is_not_trusted(tmp_path, user_dir, monkeypatch):
    card = read_card(_copy("sts-clcs", tmp_path / "m", lambda c: c.pop("onnx")))
    _logits(card)
    onnx, manifest = export.export_paths(card, "classifier")
    assert "signature" in json.loads(manifest.read_text())
    # another LESIONSEG_MODELS = another key: the cache (e.g. a model folder copied from elsewhere) is made again
    monkeypatch.setenv("LESIONSEG_MODELS", str(tmp_path / "other-user"))
    model, _ = _logits(read_card(card.folder))
    assert any("not signed by this user's LesionSeg" in n for n in model.notes)
    key = tmp_path / "other-user" / export.KEY_FILE
    assert key.stat().st_mode & 0o077 == 0
    # a key others could read is not used: nothing signed is trusted then
    key.chmod(0o644)
    model, _ = _logits(read_card(card.folder))
    assert any("refused" in n for n in model.notes)


def test_a_symlinked_onnx_cache_is_not_written_through(tmp_path, user_dir):
    outside = tmp_path / "outside"
    outside.mkdir()
    folder = _copy("sts-clcs", tmp_path / "m")
    (folder / export.CACHE_DIR).symlink_to(outside, target_is_directory=True)
    model, _ = _logits(read_card(folder))
    assert list(outside.iterdir()) == []
    assert any("is not used (it is a symbolic link)" in n for n in model.notes)
    assert export.cache_folder(read_card(folder)) == user_dir / export.CACHE_DIR
    assert any(p.suffix == ".onnx" for p in (user_dir / export.CACHE_DIR).iterdir())


def test_an_onnx_cache_that_is_a_file_falls_back_to_the_user_cache(clcs, user_dir):
    (clcs / export.CACHE_DIR).write_text("x")
    folder, notes = export.cache_location(read_card(clcs))
    assert folder == user_dir / export.CACHE_DIR and "not a folder" in notes[0]


@pytest.mark.parametrize("code", ["ENOSPC", "EDQUOT"])
def test_a_full_disk_under_the_onnx_cache_falls_back_to_a_temporary_folder(user_dir, monkeypatch, code):
    """A full disk (or quota) under the user model folder stopped ``segment`` ("cannot be loaded (No
    space left on device)") where a read-only one falls back to a temporary cache."""
    import errno

    real = export.export

    def full(build, folder, *a, **k):
        if folder not in export._TEMP:
            raise OSError(getattr(errno, code), os.strerror(getattr(errno, code)))
        return real(build, folder, *a, **k)

    monkeypatch.setattr(export, "export", full)
    model, logits = _logits(get_card("sts-clcs"))  # a shipped model: its exports would go to the user cache
    assert np.isfinite(logits).all()
    assert any("cannot be written" in n and "temporary folder" in n for n in model.notes)


# ------------------------------------------------------------------ P1-3 routing
@pytest.mark.parametrize("folder", ["../elsewhere", "/tmp", "sub/../../elsewhere"])
def test_a_routing_folder_outside_the_model_is_refused(tmp_path, user_dir, folder):
    from LesionSegLib.engine.segment.pipeline import Engine

    elsewhere = _copy("sts-clcs", tmp_path / "elsewhere")
    sha = export.sha256_file(elsewhere / "card.json")
    model = _copy("sts-clcs", tmp_path / "m", _set(("routing",), {"enabled": True, "folder": folder, "card_sha256": sha}))
    with pytest.raises(ModelError, match="routing folder"):
        Engine(read_card(model), device="cpu", runtime="torch")
    assert not (elsewhere / export.CACHE_DIR).exists()


def test_a_routing_section_without_folder_is_a_model_error(tmp_path, user_dir):
    from LesionSegLib.engine.segment.pipeline import Engine

    model = _copy("sts-clcs", tmp_path / "m", _set(("routing",), {"enabled": True}))
    with pytest.raises(ModelError, match="routing"):
        Engine(read_card(model), device="cpu", runtime="torch")  # a card given directly skips get_card's schema check


# ------------------------------------------------------------------ P1-4 broken cards in the user folder
@pytest.mark.parametrize("content", ["5", '"name"', '{"name": ["x"], "version": "1"}', "[" * 100000])
def test_a_broken_user_card_is_skipped_in_listings_and_named_when_asked_for(user_dir, capsys, content):
    (user_dir / "evil" / "1").mkdir(parents=True)
    (user_dir / "evil" / "1" / "card.json").write_text(content)
    problems = []
    assert {c.name for c in models.list_models(problems)} >= {"sts-clcs", "sts-detseg"}
    assert len(problems) == 1 and "evil/1/card.json" in problems[0]
    assert get_card(None).name == "sts-clcs"  # plain segment: the default model still loads
    assert cli.main(["models", "list"]) == 0
    out = capsys.readouterr()
    assert "sts-clcs@1.2.0" in out.out and "evil/1/card.json" in out.err
    with pytest.raises(ModelError, match="evil/1/card.json"):
        get_card("evil")


# ------------------------------------------------------------------ P1-8 activation
@pytest.mark.parametrize("edit,text", [(_set(("segmenter",), "x"), "segmenter must be an object"),
                                       (_set(("segmenter",), KeyError), "segmenter is missing"),
                                       (_set(("classifier", "sha256"), 5), "classifier.sha256")])
def test_activate_refuses_a_version_with_a_broken_card(user_dir, edit, text):
    def version5(c):
        c["version"] = "5"
        edit(c)

    _copy("sts-clcs", user_dir / "sts-clcs" / "5", version5)
    with pytest.raises(ModelError, match=text):
        versions.activate("sts-clcs@5")
    assert models.active_model_id() == models.default_model_id()
    assert not models.active_file().exists()


# ------------------------------------------------------------------ P1-9 / P1-10 LESIONSEG_MODELS
@pytest.mark.parametrize("value", ["", "   "])
def test_an_empty_lesionseg_models_counts_as_unset(tmp_path, monkeypatch, value):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("LESIONSEG_MODELS", value)
    monkeypatch.chdir(tmp_path)
    assert models.user_models_dir() == tmp_path / "home" / ".lesionseg" / "models"
    versions.activate("sts-detseg")
    assert (tmp_path / "home" / ".lesionseg" / "models" / "active.json").exists()
    assert not (tmp_path / "active.json").exists()


def test_a_lesionseg_models_that_is_a_file_is_named_and_the_shipped_model_still_runs(tmp_path, monkeypatch, capsys):
    afile = tmp_path / "afile"
    afile.write_text("hi")
    monkeypatch.setenv("LESIONSEG_MODELS", str(afile))
    with pytest.raises(ModelError, match=f"LESIONSEG_MODELS={afile} is not a folder"):
        versions.activate("sts-detseg")
    folder, notes = export.cache_location(get_card("sts-clcs"))
    assert afile not in folder.parents and folder.is_dir() and "LESIONSEG_MODELS" in notes[0] and "temporary" in notes[0]
    model, logits = _logits(get_card("sts-clcs"))  # the shipped classifier runs on ONNX, exported into the temporary folder
    assert np.isfinite(logits).all() and any("temporary folder" in n for n in model.notes)
    assert afile.read_text() == "hi"
    assert cli.main(["models", "list"]) == 0
    assert f"LESIONSEG_MODELS={afile} is not a folder" in capsys.readouterr().err


def test_an_unreadable_lesionseg_models_is_a_note_and_the_default_model_runs(user_dir, monkeypatch, capsys):
    """Permission denied on active.json (a folder the user may not read; root reads anything, so
    the refusal is simulated) stopped ``segment`` and ``models list`` with a bare error."""
    class Unreadable(type(Path())):
        def exists(self, *a, **k):
            raise PermissionError(13, "Permission denied", str(self))

        def read_text(self, *a, **k):
            raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(models, "active_file", lambda: Unreadable(user_dir / "active.json"))
    assert models.active_model_id() == models.default_model_id()
    assert cli.main(["models", "list"]) == 0
    err = capsys.readouterr().err
    assert "active.json cannot be read (Permission denied)" in err and "LESIONSEG_MODELS" in err and "default model" in err


# ------------------------------------------------------------------ P1-12 shadowed ids
def test_a_user_copy_with_a_shipped_id_is_not_marked_active_and_is_noted(user_dir, capsys):
    _copy("sts-clcs", user_dir / "sts-clcs" / "1.2.0", lambda c: c.update(description="IMPOSTOR"))
    problems = []
    rows = [r for r in versions.list_versions("sts-clcs", problems) if r["id"] == "sts-clcs@1.2.0"]
    assert len(rows) == 2 and [r["active"] for r in rows].count(True) == 1
    assert next(r for r in rows if r["active"])["builtin"]
    assert any("is never used" in p and "sts-clcs@1.2.0" in p for p in problems)
    assert get_card("sts-clcs@1.2.0").builtin
    assert cli.main(["models", "list"]) == 0
    out = capsys.readouterr()
    assert sum(line.startswith("* ") for line in out.out.splitlines()) == 1 and "is never used" in out.err


def test_an_activated_shipped_version_replaced_by_an_update_runs_its_successor(user_dir, tmp_path, capsys):
    """sts-detseg 1.4.0 was activated (``models activate sts-detseg`` records the version); an update
    of LesionSeg ships 1.4.1 in its place. Every command then failed: "unknown model
    'sts-detseg@1.4.0' ... its folder was removed" (an audit). The shipped successor runs, with a note."""
    shipped = models.get_card("sts-detseg")
    assert shipped.builtin and shipped.version == "1.4.1"
    (user_dir / "active.json").write_text(json.dumps({"active": "sts-detseg@1.4.0", "history": [], "log": []}))
    assert models.active_model_id() == "sts-detseg@1.4.1" and models.get_card(None).id == "sts-detseg@1.4.1"
    assert cli.main(["models", "list"]) == 0
    out, err = capsys.readouterr()
    assert "active: sts-detseg@1.4.1" in out
    assert "the activated model sts-detseg@1.4.0 was replaced by the shipped sts-detseg@1.4.1" in err
    assert cli.main(["segment", "--sample", "-o", str(tmp_path / "out"), "--progress", "none", "--runtime", "torch"]) == 0
    assert "replaced by the shipped sts-detseg@1.4.1" in capsys.readouterr().err
    # a version the user made and then removed is not replaced by a shipped one: that still fails, naming it
    (user_dir / "active.json").write_text(json.dumps({"active": "sts-clcs@1.1.0-ft.3", "history": [], "log": []}))
    assert models.active_model_id() == "sts-clcs@1.1.0-ft.3"
    with pytest.raises(ModelError, match="unknown model 'sts-clcs@1.1.0-ft.3'.*it is the active model"):
        models.get_card(None)

"""Writing a new model version (retraining, segmenter registration): one helper for both.

Rules
-----
* **Where**: ``None`` (the parent's name, next version), ``name`` or ``name@version`` go to
  ``<user models>/<name>/<version>``; name and version are checked
  (:func:`models.check_model_id`: no separator, no ``..``), so ``name@../../x`` is refused.  A
  folder is used only when the user gives an explicit path (:func:`models.is_explicit_path`).
* **How**: :func:`write_version` builds the folder under a temporary name
  (:func:`..atomic.atomic_folder`), checks the sha256 of every weight file the card names,
  writes the card last and renames the folder into place; a failed or cancelled job leaves
  nothing that looks like a model.  Files keep fixed plain names (``segmenter.safetensors``,
  ``classifier.safetensors``), never a name taken from another card, and inherited weights are
  copied from the bytes whose checksum was verified.
* **What**: a new card holds its *own* data, validation and metrics.  From the parent it keeps
  what runs the model (architecture, the network configs, post-processing) and a ``parent``
  link (id, sha256 of its weight files); never its ``validation``, ``metrics`` or ``data``.
"""
from __future__ import annotations

import copy
import json
import os
import sys
from pathlib import Path
from typing import Callable

from .. import models
from ..atomic import atomic_folder, write_failure, write_text
from ..common import utc_now
from ..errors import ModelError
from .labels import RetrainError

#: card sections that describe how to run the model (inherited); everything else is the model's own
RUN_SECTIONS = ("architecture", "segmenter", "detector", "roi_segmenter", "gate", "postprocess", "confidence_threshold",
                "confidence_source")
#: the networks a card may name, and their file names in a written version
WEIGHT_FILES = {"segmenter": "segmenter.safetensors", "classifier": "classifier.safetensors",
                "detector": "detector.safetensors", "roi_segmenter": "roi_segmenter.safetensors", "gate": "gate.safetensors",
                "ood": "ood.safetensors", "click_segmenter": "click_segmenter.safetensors"}
#: the networks a retrained classifier runs with (copied from the parent, checksum-verified)
SEGMENTER_PARTS = ("segmenter", "detector", "roi_segmenter", "gate", "click_segmenter")


def resolve_output(parent: models.ModelCard, output: str | os.PathLike | None) -> tuple[str, str, Path]:
    """(name, version, folder) of the new model (see the module rules)."""
    from .versions import next_version

    text = "" if output is None else str(output)
    if text and models.is_explicit_path(output):
        folder = Path(text).expanduser().resolve()
        try:
            models.check_model_id(folder.name)
        except ModelError:
            raise RetrainError(f"output folder name {folder.name!r} is not a valid model name "
                               "(letters, digits, '-', '_' and '.' only)") from None
        if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
            raise RetrainError(f"output folder {folder} exists and is not empty")
        return folder.name, "1", folder
    name, at, version = (text or parent.name).partition("@")
    try:
        models.check_model_id(name, version if at else None)
    except ModelError as exc:
        raise RetrainError(f"{exc}; give a model name, name@version, or an explicit folder such as ./{name or 'model'}") from None
    version = version or next_version(name)
    if any(c.name == name and c.version == version for c in models.list_models()):
        raise RetrainError(f"model {name}@{version} already exists; choose another name or version")
    root = models.user_models_dir()
    folder = root / name / version
    try:  # belt and braces: the checked name and version cannot leave the user folder
        folder.resolve().relative_to(root.resolve())
    except ValueError:
        raise RetrainError(f"model {name}@{version} would be written outside {root}") from None
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise RetrainError(f"output folder {folder} exists and is not empty")
    return name, version, folder


def write_version(folder: Path, build: Callable[[Path], dict]) -> models.ModelCard:
    """Build a model folder atomically: ``build(tmp)`` writes the weight files into ``tmp`` and
    returns the card; every weight file the card names is checked, the card is written last."""
    try:
        with atomic_folder(folder) as tmp:
            data = build(tmp)
            card = models.ModelCard(tmp, data)
            for key in WEIGHT_FILES:
                if key in data:
                    card.verified_bytes(key)
            write_text(tmp / models.CARD_NAME, json.dumps(data, indent=2) + "\n")
    except FileExistsError as exc:
        raise RetrainError(str(exc)) from None
    except Exception as exc:  # a full disk: one line naming the folder (nothing was left behind)
        why = write_failure(exc)
        if why is None:
            raise
        raise RetrainError(f"the new model version cannot be written to {folder} ({why})") from None
    return models.read_card(folder)


def inherited(parent: models.ModelCard, tmp: Path, keys=("segmenter",)) -> tuple[dict, dict]:
    """The parent's run sections, with the weight files of ``keys`` copied into ``tmp`` from their
    verified bytes; returns ``(sections, files)`` (``files``: name -> sha256)."""
    sections = {k: copy.deepcopy(parent.data[k]) for k in RUN_SECTIONS if k in parent.data}
    files = {}
    for key in keys:
        if key not in parent.data:
            continue
        part = copy.deepcopy(parent.data[key])
        name = WEIGHT_FILES[key]
        (tmp / name).write_bytes(parent.verified_bytes(key))
        part["file"] = name
        part["inherited_from"] = parent.id
        sections[key] = part
        files[name] = part["sha256"]
    return sections, files


def scan_only_ood(parent: models.ModelCard, tmp: Path) -> dict | None:
    """The parent's out-of-distribution check for a classifier whose patch encoder was retrained
    (``mode="full"``): the scan-level statistics and cap (they do not depend on the classifier),
    without the cluster reference, which lives in the old encoder's embedding space (so the CSV's
    per-lesion ``ood_score`` is left empty).  None when the parent's statistics cannot be used."""
    from ..segment.ood import OODModel

    old = OODModel.from_card(parent)
    if old is None:
        return None
    new = OODModel(old.scans, old.lesions[:0], old.lesion_method, old.scan_threshold, old.cap, old.domain)
    section = {**new.save(tmp, WEIGHT_FILES["ood"]), "inherited_from": parent.id,
               "lesion_reference": "none: the classifier's patch encoder was retrained (mode full), so the parent's "
                                   "cluster embeddings no longer apply; the scan-level check and cap are the parent's"}
    return section


def copy_routing(parent: models.ModelCard, dest: Path) -> dict | None:
    """A copy of ``parent``'s routing section, its kept copy of its own parent (where its in-domain
    scans go; checksum-verified on load) copied into ``dest``; None when ``parent`` does not route."""
    import shutil

    routing = parent.data.get("routing")
    if not (isinstance(routing, dict) and routing.get("enabled") and routing.get("folder")):
        return None
    shutil.copytree(models.confined(parent.folder, routing["folder"], "routing folder"), dest / routing["folder"],
                    symlinks=True, dirs_exist_ok=True, ignore=shutil.ignore_patterns(".onnx-cache", "*.tmp", "__pycache__"))
    return {**copy.deepcopy(routing), "via": parent.id}  # carried over through ``parent`` now


def release_history(name: str, version: str, notes: dict | None) -> dict:
    """Release notes for a new shipped ``name@version``: ``notes`` (its own and its base's), with
    those of the shipped card of ``name`` for earlier versions that they lack, newest first.  A
    release built from a base that names fewer versions (sts-clcs 1.1.0's card named no 1.0.0)
    thus keeps every version shipped before it, which :func:`models.upgraded` reads to move a user
    who had activated one of them to the new release."""
    out = dict(notes or {})
    for card in models.list_models():
        if card.builtin and card.name == name and isinstance(card.data.get("release_notes"), dict):
            for v, text in card.data["release_notes"].items():
                if models._version_key(v) < models._version_key(version):
                    out.setdefault(v, text)
    return dict(sorted(out.items(), key=lambda kv: models._version_key(kv[0]), reverse=True))


def parent_link(parent: models.ModelCard) -> dict:
    """Which model this one came from: id and the sha256 of its weights (never its results)."""
    link = {"id": parent.id, "folder": str(parent.folder)}
    for key in WEIGHT_FILES:
        if key in parent.data:
            link[f"{key}_sha256"] = parent.data[key].get("sha256")
    return link


def write_model(parent: models.ModelCard, cm, output, retraining: dict, metrics: dict, oof: dict | None = None,
                data: dict | None = None) -> models.ModelCard:
    """Write a retrained classifier as a new version and return its card.

    ``data``: what it was trained on (feedback database, ground-truth folder, cases, label
    counts); ``metrics``: its own cross-validated figures (``fit_and_validate``)."""
    from ..segment.classifier import save_classifier

    name, version, folder = resolve_output(parent, output)

    def build(tmp: Path) -> dict:
        mode = (retraining.get("trainer") or {}).get("mode", "head")
        sections, files = inherited(parent, tmp, keys=SEGMENTER_PARTS + (("ood",) if mode == "head" else ()))
        if mode != "head" and isinstance(parent.data.get("ood"), dict):
            sections["ood"] = scan_only_ood(parent, tmp)
            if sections["ood"] is None:
                sections.pop("ood")
            else:
                files[sections["ood"]["file"]] = sections["ood"]["sha256"]
        if "domain" in parent.data:
            sections["domain"] = copy.deepcopy(parent.data["domain"])
        routing = copy_routing(parent, tmp)
        if routing is not None:
            sections["routing"] = routing
        section = save_classifier(cm, tmp, WEIGHT_FILES["classifier"])
        section["training"] = {k: v for k, v in retraining.items() if k in ("trainer", "timings", "seed")}
        files[section["file"]] = section["sha256"]
        card = {
            **sections,
            "name": name,
            "version": version,
            "created": utc_now(),
            "description": f"{parent.data.get('description', parent.id)} | confidence classifier retrained "
            f"on {retraining['label_counts']['total']} labelled lesions",
            "classifier": section,
            "parent": parent_link(parent),
            "data": data if data is not None else {"label_counts": retraining["label_counts"]},
            "validation": {**metrics, "what": "cross-validation of the retraining labels (see 'data'); "
                                              "the parent's validation figures are in the parent's card"},
            "metrics": {
                "retrain_cv_auc": metrics["new"]["auc"],
                "retrain_cv_ece": metrics["new"]["ece"],
                "parent_auc_same_labels": metrics["old"]["auc"],
                "parent_ece_same_labels": metrics["old"]["ece"],
                "n_labels": retraining["label_counts"]["total"],
            },
            "retraining": retraining,
            "files": files,
        }
        if "confidence_source" in sections:  # detseg: the retrained classifier now scores the lesions
            card["confidence_source"] = "classifier"
        if oof is not None:
            try:
                from ..evaluate.plots import save_validation_plot

                save_validation_plot(oof, tmp / "validation.png", title=f"{name}@{version} vs {parent.id}")
            except Exception as exc:  # a plot must never fail the retraining
                print(f"warning: no validation plot: {exc}", file=sys.stderr)
        return card

    return write_version(folder, build)

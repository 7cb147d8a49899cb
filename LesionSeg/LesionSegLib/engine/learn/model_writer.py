"""Writing a new model version into the user model folder (retraining, segmenter registration)."""
from __future__ import annotations

import copy
import json
import os
import shutil
import sys
from pathlib import Path

from .. import models
from ..common import utc_now
from .labels import RetrainError


def resolve_output(parent: models.ModelCard, output: str | os.PathLike | None) -> tuple[str, str, Path]:
    """(name, version, folder) of the new model: ``None`` (parent's name, next version), ``name``,
    ``name@version``, or a folder path (outside the registry unless under the user models folder)."""
    from .versions import next_version

    text = "" if output is None else str(output)
    if text and (os.sep in text or "/" in text or text.startswith(".")):
        folder = Path(text).expanduser().resolve()
        return folder.name, "1", folder
    name, _, version = (text or parent.name).partition("@")
    if not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
        raise RetrainError(f"invalid model name {name!r} (letters, digits, '-', '_' and '.' only)")
    version = version or next_version(name)
    if any(c.name == name and c.version == version for c in models.list_models()):
        raise RetrainError(f"model {name}@{version} already exists; choose another name or version")
    return name, version, models.user_models_dir() / name / version


def write_model(parent: models.ModelCard, cm, output, retraining: dict, metrics: dict, oof: dict | None = None) -> models.ModelCard:
    """Write the new version atomically (temporary folder renamed into place) and return its card."""
    from ..segment.classifier import save_classifier

    name, version, folder = resolve_output(parent, output)
    if folder.exists() and any(folder.iterdir()):
        raise RetrainError(f"output folder {folder} exists and is not empty")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f".tmp-{folder.name}-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        data = copy.deepcopy(parent.data)
        files = {}
        for key, part in parent.data.items():
            if key == "classifier" or not (isinstance(part, dict) and "file" in part):
                continue
            src = parent.verified_path(key)  # checksum verified before copying
            shutil.copy2(src, tmp / part["file"])
            files[part["file"]] = part["sha256"]
        section = save_classifier(cm, tmp, "classifier.safetensors")
        section["training"] = {k: v for k, v in retraining.items() if k in ("trainer", "timings", "seed")}
        files[section["file"]] = section["sha256"]
        parent_cls = parent.data.get("classifier", {})
        data.update(
            {
                "name": name,
                "version": version,
                "created": utc_now(),
                "description": f"{parent.data.get('description', parent.id)} | confidence classifier retrained "
                f"on {retraining['label_counts']['total']} labelled lesions",
                "classifier": section,
                "parent": {
                    "id": parent.id,
                    "classifier_sha256": parent_cls.get("sha256"),
                    "folder": str(parent.folder),
                    "metrics": parent.data.get("metrics", {}),
                },
                "retraining": retraining,
                "metrics": {
                    "retrain_cv_auc": metrics["new"]["auc"],
                    "retrain_cv_ece": metrics["new"]["ece"],
                    "parent_auc_same_labels": metrics["old"]["auc"],
                    "parent_ece_same_labels": metrics["old"]["ece"],
                    "n_labels": retraining["label_counts"]["total"],
                },
                "files": files,
            }
        )
        if "confidence_source" in data:  # detseg: the retrained classifier now scores the lesions
            data["confidence_source"] = "classifier"
        if oof is not None:
            try:
                from ..evaluate.plots import save_validation_plot

                save_validation_plot(oof, tmp / "validation.png", title=f"{name}@{version} vs {parent.id}")
            except Exception as exc:  # a plot must never fail the retraining
                print(f"warning: no validation plot: {exc}", file=sys.stderr)
        for key in ("segmenter", "classifier"):  # everything the card names is there and matches
            if key in data:
                models.ModelCard(tmp, data).verified_path(key)
        # the card appears last, so a killed job never leaves a folder that looks like a model
        (tmp / "card.partial.json").write_text(json.dumps(data, indent=2) + "\n")
        os.replace(tmp / "card.partial.json", tmp / models.CARD_NAME)
        if folder.exists():
            folder.rmdir()
        os.rename(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return models.read_card(folder)

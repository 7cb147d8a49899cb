"""ONNX exports of a model's networks, cached next to the model and keyed by the weights' sha256.

The first time a model runs on an ONNX runtime its checksum-verified PyTorch network is
exported (``torch.onnx``) into ``<model folder>/.onnx-cache/`` (or, for the read-only shipped
models, ``<user model folder>/.onnx-cache/``) as ``<part>-<sha256[:16]>.onnx`` with a manifest
``<part>-<sha256[:16]>.json``: the full sha256 of the source safetensors, the sha256 of the ONNX
file, the input spec and the exporter versions.  Both files are written atomically.

A cached file is used only when the model's weights match the card's sha256 (checked every time,
so a damaged model folder is refused on this path too), its manifest names that checksum and the
same input spec, and the ONNX file's own sha256 matches the manifest.  Anything else -- stale
(retrained weights), edited, truncated -- is refused with a note and exported again from the
verified weights; nothing unverified is ever loaded.

The card names its exports (``onnx`` in card.json: per network, the file, its sha256, the source
weights' sha256, the opset and the torch that made it; written by ``lesionseg models export NAME
--write-card``).  The export is deterministic for one torch version, so a fresh export is checked
against that record: a different file made from the same weights is used (it is made from the
verified weights) with a note naming both checksums and torch versions.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

from ..atomic import AtomicWriter
from ..errors import ModelError
from ..models import ModelCard, sha256_file, user_models_dir

CACHE_DIR = ".onnx-cache"
MANIFEST_FORMAT = 1
OPSET = 17


def cache_folder(card: ModelCard) -> Path:
    """Where the exports of ``card`` live: next to the model, unless it is shipped or read-only."""
    if not card.builtin and os.access(card.folder, os.W_OK):
        return card.folder / CACHE_DIR
    return user_models_dir() / CACHE_DIR


def export_paths(card: ModelCard, part: str) -> tuple[Path, Path]:
    """(ONNX file, manifest) of the export of ``card``'s ``part``, keyed by its weights' sha256."""
    stem = f"{part}-{card.part(part)['sha256'][:16]}"
    folder = cache_folder(card)
    return folder / f"{stem}.onnx", folder / f"{stem}.json"


def cached_onnx(card: ModelCard, part: str, spec: dict, build: Callable[[], tuple]) -> tuple[Path, list[str]]:
    """Path of a verified ONNX export of ``card``'s ``part`` (segmenter, classifier, detector, roi_segmenter), and notes.

    ``spec``: JSON-able description of the inputs (names, shapes, dynamic axes) -- part of the key.
    ``build()`` -> (torch module in eval mode, example inputs tuple, input names, output names,
    dynamic axes); it is only called when an export is needed.
    """
    source_sha = card.part(part).get("sha256")
    if not source_sha:
        raise ModelError(f"model {card.id}: card gives no sha256 for {part}; refusing to export it")
    # The model's own weights must match the card even when a verified export of them is cached: a
    # damaged model folder is refused on every runtime, as `models activate` and torch refuse it.
    card.verified_path(part)
    onnx_path, manifest_path = export_paths(card, part)
    folder = onnx_path.parent
    notes: list[str] = []
    manifest, problem = inspect_cache(onnx_path, manifest_path, source_sha, spec)
    if problem is None:
        return onnx_path, notes + reference_notes(card, part, manifest)
    if problem != "missing":
        notes.append(f"ONNX cache {onnx_path.name} of model {card.id} refused ({problem}): exported again from the verified weights")
    export(build, folder, onnx_path.name, manifest_path.name, source_sha, spec)
    manifest, problem = inspect_cache(onnx_path, manifest_path, source_sha, spec)
    if problem is not None:
        raise ModelError(f"model {card.id}: ONNX export of {part} failed its own check ({problem})")
    return onnx_path, notes + reference_notes(card, part, manifest)


def reference_notes(card: ModelCard, part: str, made: dict) -> list[str]:
    """A note when the card names an export of these very weights that differs from this one
    (``made``: the verified manifest of the export in use)."""
    ref = (card.data.get("onnx") or {}).get(part)
    if not isinstance(ref, dict) or ref.get("source_sha256") != card.part(part).get("sha256"):
        return []  # no record, or a record of other weights (a retrained part)
    if made.get("onnx_sha256") == ref.get("sha256"):
        return []
    return [f"model {card.id}: the ONNX export of {part} (sha256 {made.get('onnx_sha256', '?')[:12]}, torch {made.get('torch')}) "
            f"differs from the one its card names ({str(ref.get('sha256'))[:12]}, torch {ref.get('torch')}); "
            "it was made from the same verified weights and is used"]


def card_record(card: ModelCard, parts) -> dict:
    """The card's ``onnx`` section for the cached, verified exports of ``parts``."""
    out = {}
    for part in parts:
        onnx_path, manifest_path = export_paths(card, part)
        sha = card.part(part)["sha256"]
        made, problem = inspect_cache(onnx_path, manifest_path, sha, ANY_SPEC)
        if problem is not None:
            raise ModelError(f"model {card.id}: the cached ONNX export of {part} cannot be recorded ({problem})")
        out[part] = {"file": onnx_path.name, "sha256": made["onnx_sha256"], "source_sha256": sha, "opset": made.get("opset"),
                     "torch": made.get("torch"), "spec": made.get("spec")}
    return out


ANY_SPEC = object()  # inspect_cache: accept the inputs the manifest names


def inspect_cache(onnx_path: Path, manifest_path: Path, source_sha: str, spec) -> tuple[dict | None, str | None]:
    """The cached export's manifest, read once, and None when the export may be used; else
    (None, the reason it may not).  ``spec=ANY_SPEC`` accepts whatever inputs it was made for."""
    if not onnx_path.exists() or not manifest_path.exists():
        return None, "missing"
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None, "unreadable manifest"
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        return None, "unknown manifest format"
    if manifest.get("source_sha256") != source_sha:
        return None, "made from other weights"
    if spec is not ANY_SPEC and manifest.get("spec") != spec:
        return None, "made for other inputs"
    if manifest.get("onnx_sha256") != sha256_file(onnx_path):
        return None, "checksum mismatch: the file was modified or is incomplete"
    return manifest, None


def export(build: Callable[[], tuple], folder: Path, onnx_name: str, manifest_name: str, source_sha: str, spec: dict) -> None:
    import warnings

    import torch

    module, example, input_names, output_names, dynamic_axes = build()
    folder.mkdir(parents=True, exist_ok=True)
    with AtomicWriter(folder) as writer:
        tmp = writer.path(onnx_name)
        with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module,
                example,
                tmp,
                dynamo=False,  # the TorchScript exporter: fast, and exact for these convolutional nets
                input_names=input_names,
                output_names=output_names,
                dynamic_axes=dynamic_axes or None,
                opset_version=OPSET,
            )
        manifest = {
            "format": MANIFEST_FORMAT,
            "source_sha256": source_sha,
            "onnx_sha256": sha256_file(tmp),
            "spec": spec,
            "opset": OPSET,
            "torch": torch.__version__,
        }
        with open(writer.path(manifest_name), "w") as fh:
            json.dump(manifest, fh, indent=2)

"""Fit a model's out-of-distribution statistics (``segment.ood``) on its training scans.

    lesionseg fit-ood --model LesionSeg/LesionSegLib/models/sts-clcs   # rewrites the card's ood + domain sections

The engine runs on every training scan at confidence threshold 0 (every candidate cluster): the
scan descriptors and the clusters' classifier embeddings are the reference the OOD scores are
measured against.  Used for the shipped model and by ``lesionseg finetune`` (training = replay
cases + corrected cases).
"""
from __future__ import annotations

import contextlib
import copy
import json
import os
import tempfile
from pathlib import Path

import numpy as np

from ..atomic import TMP_PREFIX, write_failure, write_text
from ..common import check_cancel
from ..errors import ModelError
from ..models import CARD_NAME, confined
from ..io.preprocess import to_canonical
from ..segment.features import feature_matrix
from ..segment.ood import OODModel, domain_text, lesion_embedding, scan_descriptor

STS_DOMAIN = {
    "body_region": "extremities and trunk wall (soft-tissue sarcoma)",
    "lesion_type": "soft-tissue sarcoma (one primary tumour per scan)",
    "scanner_grid": "CT crops 5 cm around the tumour, about 1.95 x 1.95 x 3.27 mm (x, y, z)",
    "n_cases": 33,
    "cases": "STS_001-033 (IBSI / TCIA Soft-tissue-Sarcoma)",
}


def references(engine, images, progress=None, cancel=None) -> tuple[np.ndarray, np.ndarray]:
    """(scan descriptors, cluster embeddings) of ``images`` (SimpleITK CTs) under ``engine``."""
    scans, embs = [], []
    for k, img in enumerate(images):
        check_cancel(cancel, "fitting OOD statistics")
        scans.append(descriptor_of(img))
        own = engine.ood
        engine.ood = None  # candidates of the plain model
        try:
            res = engine.segment(img, threshold=0.0, keep_patches=True)
        finally:
            engine.ood = own
        if res.lesions:
            embs.append(lesion_embedding(engine.classifier, np.stack([les.patch for les in res.lesions]),
                                         feature_matrix([les.features for les in res.lesions])))
        if progress:
            progress((k + 1) / len(images), f"OOD reference {k + 1}/{len(images)}")
    return np.stack(scans), (np.concatenate(embs) if embs else np.zeros((0, 1)))


def from_candidates(images, embeddings: np.ndarray, domain: dict, lesion_method: str = "knn") -> OODModel:
    """OOD statistics from scan images and already computed cluster embeddings."""
    scans = np.stack([descriptor_of(img) for img in images])
    return OODModel(scans, embeddings, lesion_method, domain=domain_text(domain))


def descriptor_of(image) -> np.ndarray:
    """The scan descriptor of a SimpleITK CT."""
    import SimpleITK as sitk

    can = to_canonical(image)
    return scan_descriptor(sitk.GetArrayFromImage(can).astype(np.float32))


def fit_card(model: str | None = None, cases=None, cluster_cases: int = 12) -> str:
    """Fit and write the OOD section of ``model`` (its folder must be writable); returns the card path.

    Scan descriptors come from every training case (cheap); cluster embeddings from the first
    ``cluster_cases`` of them (one engine run each)."""
    from .. import data as dataset
    from ..io.images import read_image
    from ..models import get_card
    from ..segment.pipeline import Engine

    card = get_card(model)
    refuse_corrected_domain(card)
    engine = Engine(card, device="cpu")
    names = cases or dataset.STS_TRAIN
    images = [read_image(dataset.case(n).image) for n in names]  # an unknown name: one error naming it
    _, embs = references(engine, images[:cluster_cases])
    ood = from_candidates(images, embs, STS_DOMAIN)
    return str(replace_ood(card, ood, {"cluster_cases": names[:cluster_cases]}, dict(STS_DOMAIN, n_cases=len(names))))


def refuse_corrected_domain(card) -> None:
    """Refuse a model whose domain holds reviewers' corrected cases (a fine-tuned model, or one made
    from it): ``lesionseg finetune`` fitted its statistics on those scans, read from the feedback
    database, beside the replay cases.  Refitted here on the sarcoma training scans alone, every scan
    of the corrected domain would be called unlike the model, warned and capped, while its
    ``domain`` still names them."""
    domain = card.data.get("domain")
    corrected = domain.get("corrected_cases") if isinstance(domain, dict) else None
    if corrected:
        names = ", ".join(map(str, corrected[:3])) + (", ..." if len(corrected) > 3 else "")
        raise ModelError(f"model {card.id} was fine-tuned on {len(corrected)} corrected case(s) ({names}), whose scans "
                         "are part of its out-of-distribution reference; fit-ood reads only the training scans of the "
                         "data folder, so it would flag that domain as unlike the model. Its statistics were fitted "
                         "by lesionseg finetune: fine-tune again from the parent to refit them; the model is unchanged")


def replace_ood(card, ood: OODModel, extra: dict, domain: dict) -> Path:
    """Give ``card`` the statistics ``ood`` all-or-nothing, in its folder; returns the card path.

    The weights go to a new, content-named file (``ood-<sha256[:12]>.safetensors``), then the card
    is replaced atomically -- the one switch -- and only then is the old file removed.  Killed at
    any point, the folder holds the old card with its old file or the new card with its new one
    (at worst beside an unused file).  A write that fails (a full disk) is one :class:`ModelError`
    naming the folder."""
    folder = card.folder
    old = card.data.get("ood", {}).get("file") if isinstance(card.data.get("ood"), dict) else None
    data = copy.deepcopy(card.data)
    new = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, suffix=".safetensors", dir=folder)
        try:
            os.close(fd)
            section = ood.save(folder, Path(tmp).name)
            section["file"] = f"ood-{section['sha256'][:12]}.safetensors"
            new = folder / section["file"]
            os.replace(tmp, new)
        finally:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        data["ood"] = {**section, **extra}
        data.setdefault("domain", domain)
        if isinstance(data.get("files"), dict):  # the card's list of its files and checksums follows
            data["files"] = {k: v for k, v in data["files"].items() if k != old} | {section["file"]: section["sha256"]}
        path = write_text(folder / CARD_NAME, json.dumps(data, indent=2) + "\n")
    except BaseException as exc:
        if new is not None and new.name != old:
            with contextlib.suppress(OSError):
                new.unlink()
        why = write_failure(exc)
        if why is not None:
            raise ModelError(f"model {card.id}: cannot write its out-of-distribution statistics in {folder} "
                             f"({why}); the model is unchanged") from None
        raise
    card.data = data
    if old and old != section["file"] and not any(isinstance(p, dict) and p.get("file") == old for p in data.values()):
        with contextlib.suppress(OSError, ModelError):
            confined(folder, old).unlink()
    return path



def register(subparsers) -> None:
    p = subparsers.add_parser("fit-ood", help="fit a model's out-of-distribution statistics on its training scans")
    p.add_argument("--model", default=None)
    p.add_argument("--cases", nargs="*", default=None, help="training cases (default STS_001-033)")
    p.add_argument("--cluster-cases", type=int, default=12, help="cases whose clusters form the lesion reference")
    p.set_defaults(func=lambda a: print(fit_card(a.model, a.cases, a.cluster_cases)) or 0)

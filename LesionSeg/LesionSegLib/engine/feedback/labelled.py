"""Reviewed lesions as classifier training data (:meth:`.store.FeedbackStore.labelled`)."""
from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from .codec import decode_patch
from .schema import FeedbackStoreError

#: :meth:`FeedbackStore.labelled` holds every patch it returns in one float16 array; it refuses
#: (with the count and a way out) to build one larger than this
LABELLED_PATCH_BYTES_LIMIT = 4 * 1024**3


# ----------------------------------------------------------------------------- records
@dataclass
class LabelledSet:
    """Reviewed lesions as classifier training data."""

    labels: np.ndarray  # (N,) 1 = accepted (true lesion), 0 = rejected
    features: list[dict]  # feature name -> value, per lesion
    patches: np.ndarray | None  # (N, C, z, y, x) float16 or None when not loaded / missing
    case_hashes: list[str]
    case_names: list[str]
    model_ids: list[str]
    confidences: np.ndarray  # confidence shown at decision time
    uids: list[str]
    centroids: np.ndarray = field(default_factory=lambda: np.zeros((0, 3)))
    skipped: dict = field(default_factory=dict)  # reason -> count
    lesion_keys: list[str] = field(default_factory=list)  # the stored identity within (case, model)
    decided_at: list[str] = field(default_factory=list)  # when each decision was made (ISO 8601)

    def __len__(self) -> int:
        return int(len(self.labels))


def labelled(store, model_ids: Sequence[str] | None = None, feature_names: Sequence[str] | None = None,
             with_patches: bool = True, patch_shape: Sequence[int] | None = None) -> LabelledSet:
    """Accepted (1) and rejected (0) lesions as training data; unsure ones are left out.

    With ``model_ids``, only decisions made with those models (and only their unsure ones are
    counted); with ``feature_names``, lesions lacking any of them are skipped; with
    ``with_patches``, lesions without a patch, or whose stored patch cannot be decoded (bad
    blob, shape or codec), are skipped.  Skipped lesions are counted by reason in ``skipped``;
    a bad row never stops the others.

    ``patch_shape`` (default: the confidence classifier's input, ``PATCH_CHANNELS x PATCH_SIZE``)
    is the patch shape training needs; a lesion whose patch has another shape (a file imported
    from another LesionSeg version) is skipped as ``"patch shape"``, and never decides the shape
    of the others.

    Memory: the patches are decoded one row at a time straight into one float16 array of
    ``N x patch size`` (N x 192 KiB for today's 3 x 32^3 patches: 500 lesions ~ 94 MiB); a
    set needing more than :data:`LABELLED_PATCH_BYTES_LIMIT` is refused with the count.
    """
    if patch_shape is None:
        from ..segment.features import PATCH_CHANNELS, PATCH_SIZE

        patch_shape = (PATCH_CHANNELS, *PATCH_SIZE)
    expected = tuple(int(v) for v in patch_shape)
    where = " WHERE decision != 'unsure'"
    params: list = []
    model_sql = ""
    if model_ids:
        model_sql = f" AND model_id IN ({','.join('?' * len(model_ids))})"
        params = list(model_ids)
    skipped: dict[str, int] = {}

    def skip(reason: str) -> None:
        skipped[reason] = skipped.get(reason, 0) + 1

    n_unsure = store._query("SELECT COUNT(*) FROM decisions WHERE decision = 'unsure'" + model_sql, params)[0][0]
    if n_unsure:
        skipped["unsure"] = int(n_unsure)
    n_rows = int(store._query("SELECT COUNT(*) FROM decisions" + where + model_sql, params)[0][0])
    sql = ("SELECT uid, case_hash, case_name, model_id, lesion_key, decision, confidence, features, decided_at, "
           "centroid_x, centroid_y, centroid_z" + (", patch, patch_shape, patch_codec" if with_patches else "")
           + " FROM decisions" + where + model_sql + " ORDER BY id")
    cols: dict[str, list] = {k: [] for k in ("labels", "feats", "hashes", "names", "models", "confs", "uids",
                                             "cents", "keys", "times")}
    patches = None
    n = 0
    con = store._conn()
    try:
        for r in con.execute(sql, params):
            try:
                f = json.loads(r["features"] or "{}")
                if not isinstance(f, dict):
                    raise ValueError
            except ValueError:
                skip("unreadable features")
                continue
            if feature_names is not None and any(k not in f for k in feature_names):
                skip("missing features")
                continue
            if with_patches:
                try:
                    p = decode_patch(r["patch"], r["patch_shape"], r["patch_codec"])
                except (FeedbackStoreError, ValueError):
                    skip("unreadable patch")
                    continue
                if p is None:
                    skip("no patch")
                    continue
                if p.shape != expected:
                    skip("patch shape")
                    continue
                if patches is None:
                    need = n_rows * p.nbytes
                    if need > LABELLED_PATCH_BYTES_LIMIT:
                        raise FeedbackStoreError(
                            f"{store.path}: {n_rows} labelled lesions need {need / 2**30:.1f} GiB of patches, more "
                            f"than {LABELLED_PATCH_BYTES_LIMIT / 2**30:.0f} GiB; choose fewer models (--only-model)")
                    patches = np.empty((n_rows, *p.shape), np.float16)
                patches[n] = p
            n += 1
            cols["labels"].append(1 if r["decision"] == "accepted" else 0)
            cols["feats"].append(f)
            cols["hashes"].append(r["case_hash"])
            cols["names"].append(r["case_name"])
            cols["models"].append(r["model_id"])
            cols["confs"].append(r["confidence"])
            cols["uids"].append(r["uid"])
            cols["cents"].append((r["centroid_x"] or 0.0, r["centroid_y"] or 0.0, r["centroid_z"] or 0.0))
            cols["keys"].append(r["lesion_key"])
            cols["times"].append(r["decided_at"])
    except sqlite3.DatabaseError as exc:
        raise FeedbackStoreError(f"cannot read {store.path}: {exc}") from None
    return LabelledSet(
        labels=np.asarray(cols["labels"], dtype=np.int64),
        features=cols["feats"],
        patches=patches[:n] if patches is not None and n else None,
        case_hashes=cols["hashes"],
        case_names=cols["names"],
        model_ids=cols["models"],
        confidences=np.asarray(cols["confs"], dtype=float),
        uids=cols["uids"],
        centroids=np.asarray(cols["cents"], dtype=float).reshape(-1, 3),
        skipped=skipped,
        lesion_keys=cols["keys"],
        decided_at=cols["times"],
    )


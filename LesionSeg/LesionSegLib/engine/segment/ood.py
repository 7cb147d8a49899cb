"""Out-of-distribution scores: how unlike the model's training data a scan, and a lesion, is.

* **Scan level**: a 6-number descriptor of the scan's content, the fractions of its body voxels
  in six HU bands (air/lung, low-density lung, fat, soft tissue, enhanced tissue, bone), scored by
  its Mahalanobis distance (covariance shrunk towards its diagonal, each band's spread floored at
  ``SD_FLOOR``) to the training scans' descriptors.  The body is the voxels above -500 HU with
  their holes filled slice by slice (so lungs and bowel gas count as body, the air around the
  patient does not), keeping the components of at least a tenth of the largest (not the table).
  The descriptor leaves out the voxel grid and the field of view on purpose: every scan is
  resampled to the model's grid before the networks see it, and the training scans are crops, so
  a grid or an extent unlike theirs says nothing about whether the content is (descriptor 1 held
  both, and a sarcoma scan merely resampled to 1 x 1 x 2.5 mm scored about 10^6).
* **Lesion level**: the classifier's embedding of a cluster (the patch encoder's output
  concatenated with the standardised tabular features), scored either by the mean Euclidean
  distance to its ``K`` nearest training clusters (``knn``) or by the shrunk Mahalanobis distance
  to them (``mahalanobis``).  Both are computed; the card says which one is used.

Every distance is divided by the 95th percentile of the training data's own leave-one-out
distances, so **a score above 1 means "further out than 95 % of the training data"**.  A scan
whose score is above ``scan_threshold`` gets a warning, and its lesions' confidences are capped
below the default threshold (``cap``), so that nothing on it is shown as a confident lesion.

The fitted statistics live in ``ood.safetensors`` beside the model card (checksum-verified like
every weight file); the card's ``ood`` section holds the thresholds and the ``domain`` section
says what the training data was.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..io.preprocess import body_mask

HU_BANDS = (-1100.0, -600.0, -200.0, -50.0, 100.0, 300.0, 5000.0)
K = 5
SHRINK = 0.2
#: the scan descriptor's lowest spread per band: a difference under 2 % of the body voxels is no
#: domain shift (set a priori; without it a band that is almost constant over the training scans,
#: such as air inside a limb, would make any scan "far")
SD_FLOOR = 0.02
#: the scan descriptor a card's ``ood`` section was fitted with (1: HU bands in the body box, its
#: extent and the voxel volume; 2: HU bands of the body voxels)
DESCRIPTOR_VERSION = 2
SUBSAMPLE_VOXELS = 2_000_000
REF_QUANTILE = 95.0
SCAN_THRESHOLD = 1.5
CAP = 0.49
WARNING = ("this scan looks unlike the model's training data ({domain}); confidences are not reliable here "
           "(OOD score {score:.2f})")


def scan_descriptor(hu: np.ndarray) -> np.ndarray:
    """The scan-level descriptor of a canonical HU array (z, y, x): the fractions of its body
    voxels in the ``HU_BANDS`` (a uniform subsample of big scans, about 2 M voxels)."""
    step = max(1, int(round((hu.size / SUBSAMPLE_VOXELS) ** (1 / 3))))
    sub = np.asarray(hu[::step, ::step, ::step])
    v = sub[body_mask(sub)]
    hist = np.histogram(np.clip(v, HU_BANDS[0], HU_BANDS[-1] - 1), bins=HU_BANDS)[0] / max(v.size, 1)
    return hist.astype(np.float64)


def lesion_embedding(classifier, patches, feats) -> np.ndarray:
    """(N, E) embedding of clusters in the classifier's space: encoder output + standardised features
    (any confidence model with ``logits_and_embedding``: PyTorch or ONNX)."""
    return classifier.logits_and_embedding(patches, feats)[1]


def _precision(x: np.ndarray, sd_floor: float | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    mu = x.mean(0)
    sd = np.maximum(x.std(0), sd_floor) if sd_floor else x.std(0) + 1e-6
    z = (x - mu) / sd
    cov = np.cov(z, rowvar=False) if len(z) > 1 else np.eye(z.shape[1])
    cov = (1 - SHRINK) * np.atleast_2d(cov) + SHRINK * np.eye(z.shape[1])
    return mu, sd, np.linalg.pinv(cov)


def _maha(x, mu, sd, prec) -> np.ndarray:
    z = (np.atleast_2d(x) - mu) / sd
    return np.sqrt(np.maximum(np.einsum("ij,jk,ik->i", z, prec, z), 0.0))


def _knn(x, ref, sd, k=K, exclude_self=False) -> np.ndarray:
    a = np.atleast_2d(x) / sd
    b = ref / sd
    d = np.sqrt(np.maximum(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1), 0.0))
    if exclude_self:
        d = d + np.where(np.eye(len(a), len(b)) > 0, np.inf, 0.0)
    k = max(1, min(k, b.shape[0] - int(exclude_self)))
    return np.sort(d, axis=1)[:, :k].mean(1)


@dataclass
class OODModel:
    scans: np.ndarray  # (N, D) training scan descriptors
    lesions: np.ndarray  # (M, E) training cluster embeddings
    lesion_method: str = "knn"
    scan_threshold: float = SCAN_THRESHOLD
    cap: float = CAP
    domain: str = ""

    def __post_init__(self):
        if self.scans.ndim != 2 or self.scans.shape[1] != len(HU_BANDS) - 1:
            raise ValueError(f"scan descriptors must be (N, {len(HU_BANDS) - 1}) (descriptor {DESCRIPTOR_VERSION}), "
                             f"not {self.scans.shape}")
        self._s = _precision(self.scans, SD_FLOOR)
        self._l = _precision(self.lesions) if len(self.lesions) > 1 else None
        loo = np.array([_maha(self.scans[i], *_precision(np.delete(self.scans, i, 0), SD_FLOOR))[0] for i in range(len(self.scans))]) \
            if len(self.scans) > 2 else np.ones(1)
        self.scan_ref = float(np.percentile(loo, REF_QUANTILE)) or 1.0
        self.lesion_ref = {"knn": 1.0, "mahalanobis": 1.0}
        if self._l is not None:
            self.lesion_ref["knn"] = float(np.percentile(_knn(self.lesions, self.lesions, self._l[1], exclude_self=True), REF_QUANTILE)) or 1.0
            self.lesion_ref["mahalanobis"] = float(np.percentile(_maha(self.lesions, *self._l), REF_QUANTILE)) or 1.0

    def scan_score(self, descriptor: np.ndarray) -> float:
        return float(_maha(descriptor, *self._s)[0] / self.scan_ref)

    def lesion_scores(self, emb: np.ndarray, method: str | None = None) -> np.ndarray:
        method = method or self.lesion_method
        if self._l is None or len(emb) == 0:
            return np.zeros(len(emb))
        if method == "knn":
            return _knn(emb, self.lesions, self._l[1]) / self.lesion_ref["knn"]
        return _maha(emb, *self._l) / self.lesion_ref["mahalanobis"]

    def warning(self, score: float) -> str | None:
        return WARNING.format(domain=self.domain or "its training data", score=score) if score > self.scan_threshold else None

    def apply(self, confidences: np.ndarray, scan_score: float) -> np.ndarray:
        """Confidences capped at ``cap`` on a scan outside the training domain."""
        conf = np.asarray(confidences, float)
        return np.minimum(conf, self.cap) if scan_score > self.scan_threshold else conf

    # ---------------------------------------------------------------- persistence
    def save(self, folder: str | Path, filename: str = "ood.safetensors") -> dict:
        from ..models import save_weights
        import torch

        sha = save_weights({"scans": torch.as_tensor(self.scans, dtype=torch.float64),
                            "lesions": torch.as_tensor(self.lesions, dtype=torch.float64)}, Path(folder) / filename)
        return {"file": filename, "sha256": sha, "scan_descriptor": DESCRIPTOR_VERSION, "lesion_method": self.lesion_method,
                "scan_threshold": self.scan_threshold,
                "cap": self.cap, "reference_quantile": REF_QUANTILE, "n_scans": int(len(self.scans)),
                "n_clusters": int(len(self.lesions)), "domain": self.domain}

    @classmethod
    def from_card(cls, card, notes: list | None = None) -> "OODModel | None":
        """The card's OOD statistics; None without them, or when they were fitted with another scan
        descriptor (then a line for the user goes into ``notes``: the model runs without the OOD
        warning and cap until ``lesionseg fit-ood`` refits them)."""
        part = card.data.get("ood")
        if not part:
            return None
        version = part.get("scan_descriptor", 1)
        if version != DESCRIPTOR_VERSION:
            if notes is not None:  # a fine-tuned model's reference holds its corrected cases, which fit-ood does not know
                fix = ("fine-tune it again (lesionseg finetune) to refit them" if "finetuning" in card.data
                       else f"refit them with `lesionseg fit-ood --model {card.folder}`")
                notes.append(f"model {card.id}: its out-of-distribution statistics were fitted with scan descriptor {version}, "
                             f"which this version replaced (descriptor {DESCRIPTOR_VERSION}); they are not used, so no scan is "
                             f"warned or capped: {fix}")
            return None
        t = card.load_arrays("ood")
        return cls(t["scans"], t["lesions"], part.get("lesion_method", "knn"),
                   float(part.get("scan_threshold", SCAN_THRESHOLD)), float(part.get("cap", CAP)), part.get("domain", ""))


def domain_text(domain: dict | None) -> str:
    if not domain:
        return ""
    return f"{domain.get('lesion_type', '?')}, {domain.get('body_region', '?')}"

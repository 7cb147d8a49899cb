"""What the engine returns: one record per lesion plus the instance labelmap, and writers.

Coordinates: ``centroid_x/y/z`` are physical LPS millimetres (the DICOM / ITK / Slicer-file
convention).  Lesion ids are 1..n in order of decreasing confidence; voxel value ``k`` of the
labelmap is lesion ``k`` and 0 is background.  The labelmap is on the input image's exact
grid (size, spacing, origin, direction).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .colors import confidence_color
from .io import AtomicWriter, write_csv, write_image

CSV_COLUMNS = (
    "lesion_id",
    "confidence",
    "volume_ml",
    "diameter_mm",
    "centroid_x",
    "centroid_y",
    "centroid_z",
    "mean_probability",
    "max_probability",
    "mean_hu",
    "n_voxels",
)


@dataclass
class Lesion:
    lesion_id: int
    confidence: float
    volume_ml: float
    diameter_mm: float
    centroid_lps: tuple[float, float, float]
    mean_probability: float
    max_probability: float
    mean_hu: float
    n_voxels: int
    #: bounding box on the input grid, (i, j, k) = (x, y, z) voxel indices, inclusive lo, exclusive hi
    bbox_ijk: tuple[tuple[int, int, int], tuple[int, int, int]] = ((0, 0, 0), (0, 0, 0))
    #: the classifier's tabular inputs (name -> value)
    features: dict[str, float] = field(default_factory=dict)
    #: the classifier's patch input, (channels, z, y, x) float16; None when not kept
    patch: np.ndarray | None = None

    def row(self) -> dict:
        x, y, z = self.centroid_lps
        return {
            "lesion_id": self.lesion_id,
            "confidence": round(self.confidence, 6),
            "volume_ml": round(self.volume_ml, 4),
            "diameter_mm": round(self.diameter_mm, 2),
            "centroid_x": round(x, 3),
            "centroid_y": round(y, 3),
            "centroid_z": round(z, 3),
            "mean_probability": round(self.mean_probability, 6),
            "max_probability": round(self.max_probability, 6),
            "mean_hu": round(self.mean_hu, 2),
            "n_voxels": self.n_voxels,
        }

    @property
    def color(self) -> tuple[float, float, float]:
        return confidence_color(self.confidence)

    @property
    def name(self) -> str:
        return f"Lesion {self.lesion_id} ({self.confidence:.2f})"


@dataclass
class SegmentationResult:
    labelmap: np.ndarray  # (z, y, x) uint16 on the input grid
    lesions: list[Lesion]
    reference: sitk.Image  # the input image (geometry source)
    model_id: str
    threshold: float
    probability: np.ndarray | None = None  # (z, y, x) float16 on the input grid
    timings: dict[str, float] = field(default_factory=dict)
    device: str = "cpu"
    messages: list[str] = field(default_factory=list)

    def rows(self) -> list[dict]:
        return [les.row() for les in self.lesions]

    def ijk_to_lps(self) -> np.ndarray:
        return ijk_to_lps(self.reference)

    def subset(self, threshold: float) -> "SegmentationResult":
        """Only the lesions with confidence >= ``threshold``, renumbered 1..n."""
        keep = [les for les in self.lesions if les.confidence >= threshold]
        lut = np.zeros(max([les.lesion_id for les in self.lesions], default=0) + 1, dtype=np.uint16)
        new = []
        for k, les in enumerate(keep, start=1):
            lut[les.lesion_id] = k
            d = {f: getattr(les, f) for f in les.__dataclass_fields__}
            d["lesion_id"] = k
            new.append(Lesion(**d))
        return SegmentationResult(
            lut[self.labelmap], new, self.reference, self.model_id, threshold, self.probability,
            dict(self.timings), self.device, list(self.messages),
        )

    # ------------------------------------------------------------------ writers
    def write_labelmap(self, path: str) -> None:
        write_image(self.labelmap.astype(np.uint16), self.reference, path)

    def write_csv(self, path: str) -> None:
        write_csv(self.rows(), CSV_COLUMNS, path)

    def write_seg_nrrd(self, path: str, statuses: dict[int, str] | None = None) -> None:
        write_seg_nrrd(path, self.labelmap, self.lesions, self.reference, self.model_id, statuses)

    def write_outputs(self, outdir: str | Path, stem: str) -> list[Path]:
        """Write ``<stem>_lesions.nii.gz``, ``<stem>_lesions.csv`` and ``<stem>.seg.nrrd`` atomically."""
        with AtomicWriter(outdir) as w:
            self.write_labelmap(w.path(f"{stem}_lesions.nii.gz"))
            self.write_csv(w.path(f"{stem}_lesions.csv"))
            self.write_seg_nrrd(w.path(f"{stem}.seg.nrrd"))
            return [Path(outdir) / n for n in (f"{stem}_lesions.nii.gz", f"{stem}_lesions.csv", f"{stem}.seg.nrrd")]


def ijk_to_lps(image: sitk.Image) -> np.ndarray:
    """4x4 matrix from voxel (i, j, k) to LPS millimetres."""
    m = np.eye(4)
    d = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)
    m[:3, :3] = d * np.asarray(image.GetSpacing(), dtype=float)[None, :]
    m[:3, 3] = image.GetOrigin()
    return m


#: Slicer segment status tag values used for review decisions.
SLICER_STATUS = {"accepted": "completed", "rejected": "flagged", "unsure": "inprogress", "unreviewed": "notstarted"}


def segment_tags(lesion: Lesion, model_id: str, status: str = "unreviewed") -> dict[str, str]:
    return {
        "LesionSeg.Confidence": f"{lesion.confidence:.6f}",
        "LesionSeg.LesionId": str(lesion.lesion_id),
        "LesionSeg.Model": model_id,
        "LesionSeg.Review": status,
        "LesionSeg.VolumeMl": f"{lesion.volume_ml:.4f}",
        "LesionSeg.DiameterMm": f"{lesion.diameter_mm:.2f}",
    }


def write_seg_nrrd(path, labelmap, lesions, reference, model_id, statuses=None) -> None:
    """A Slicer ``.seg.nrrd``: one layer, segment k has label value k, colour = confidence."""
    import slicerio

    from .colors import status_color

    statuses = statuses or {}
    seg = {
        "voxels": np.ascontiguousarray(np.transpose(labelmap.astype(np.uint8 if len(lesions) < 256 else np.uint16), (2, 1, 0))),
        "ijkToLPS": ijk_to_lps(reference),
        "containedRepresentationNames": ["Binary labelmap"],
        "masterRepresentation": "Binary labelmap",
        "referenceImageExtentOffset": [0, 0, 0],
        "segments": [],
    }
    for les in lesions:
        status = statuses.get(les.lesion_id, "unreviewed")
        seg["segments"].append(
            {
                "id": f"lesion_{les.lesion_id}",
                "name": les.name,
                "color": list(status_color(status, les.confidence)),
                "labelValue": int(les.lesion_id),
                "layer": 0,
                "status": SLICER_STATUS.get(status, "notstarted"),
                "tags": segment_tags(les, model_id, status),
            }
        )
    # zlib level 9 is pathologically slow on mostly-empty label volumes; level 1 is ~100x faster
    slicerio.write_segmentation(path, seg, compression_level=1)


def lesions_to_json(lesions: list[Lesion]) -> str:
    out = []
    for les in lesions:
        d = asdict(les)
        d.pop("patch", None)
        out.append(d)
    return json.dumps(out, indent=2)

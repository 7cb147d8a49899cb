"""What the engine returns: one record per lesion plus the instance labelmap, and writers.

Coordinates: ``centroid_x/y/z`` are physical LPS millimetres (the DICOM / ITK / Slicer-file
convention).  Lesion ids are 1..n in order of decreasing confidence; voxel value ``k`` of the
labelmap is lesion ``k`` and 0 is background.  The labelmap is on the input image's exact
grid (size, spacing, origin, direction).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import SimpleITK as sitk

from ..io.writers import SLICER_STATUS, ijk_to_lps, write_csv, write_image, write_seg_nrrd
from .colors import confidence_color

#: the files ``lesionseg segment`` writes per input: ``<stem>`` + each suffix
OUTPUT_SUFFIXES = ("_lesions.nii.gz", "_lesions.csv", ".seg.nrrd")

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
    "ood_score",
    "scan_ood_score",
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
    #: distance of the cluster to the model's training clusters (> 1: further than 95 % of them); None without OOD stats
    ood_score: float | None = None

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
            "ood_score": "" if self.ood_score is None else round(self.ood_score, 4),
        }

    @property
    def color(self) -> tuple[float, float, float]:
        return confidence_color(self.confidence)

    @property
    def name(self) -> str:
        return f"Lesion {self.lesion_id} ({self.confidence:.2f})"


def edge_note(labelmap: np.ndarray) -> str | None:
    """A note naming the lesions of ``labelmap`` (z, y, x, on the input grid) that reach a face of
    the scan: each may continue outside it, so its volume and diameter cover only the part inside
    (and a scan cropped close to a lesion changes its mask: README, "What the model expects")."""
    ids: set[int] = set()
    for axis in range(labelmap.ndim):
        for index in (0, -1):
            ids.update(int(v) for v in np.unique(np.take(labelmap, index, axis=axis)))
    ids.discard(0)
    if not ids:
        return None
    many = len(ids) > 1
    return (f"lesion{'s' if many else ''} {', '.join(map(str, sorted(ids)))} reach{'' if many else 'es'} the edge of the "
            f"scan: {'each' if many else 'it'} may continue outside it, and {'their' if many else 'its'} volume and "
            "diameter cover only the part inside")


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
    #: scan-level out-of-distribution score and warning (``segment.ood``); None without OOD stats
    ood: dict | None = None

    def rows(self) -> list[dict]:
        scan = "" if not self.ood else round(self.ood["scan_score"], 4)
        return [{**les.row(), "scan_ood_score": scan} for les in self.lesions]

    def ijk_to_lps(self) -> np.ndarray:
        return ijk_to_lps(self.reference)

    # ------------------------------------------------------------------ writers
    def write_outputs(self, writer, stem: str) -> list[str]:
        """Write ``<stem>_lesions.nii.gz``, ``<stem>_lesions.csv`` and ``<stem>.seg.nrrd`` into the
        temporary paths of ``writer`` (an :class:`~..atomic.AtomicWriter`); returns the final names."""
        from concurrent.futures import ThreadPoolExecutor

        names = [stem + suffix for suffix in OUTPUT_SUFFIXES]
        paths = [writer.path(n) for n in names]
        # the two compressed volumes are written side by side (zlib releases the GIL)
        with ThreadPoolExecutor(1) as pool:
            nifti = pool.submit(self.write_labelmap, paths[0])
            self.write_csv(paths[1])
            self.write_seg_nrrd(paths[2])
            nifti.result()
        return names

    def write_labelmap(self, path: str) -> None:
        """The labelmap as NIfTI: uint8 when there are fewer than 256 lesions (as the .seg.nrrd), else uint16."""
        dtype = np.uint8 if len(self.lesions) < 256 and int(self.labelmap.max(initial=0)) < 256 else np.uint16
        write_image(self.labelmap.astype(dtype, copy=False), self.reference, path)

    def write_csv(self, path: str) -> None:
        write_csv(self.rows(), CSV_COLUMNS, path)

    def write_seg_nrrd(self, path: str) -> None:
        """A Slicer ``.seg.nrrd``: segment k has label value k, is coloured by confidence and is
        unreviewed (review decisions live in the Slicer scene and the feedback store)."""
        segments = [
            {
                "id": f"lesion_{les.lesion_id}",
                "name": les.name,
                "color": list(les.color),
                "labelValue": int(les.lesion_id),
                "status": SLICER_STATUS["unreviewed"],
                "tags": segment_tags(les, self.model_id),
            }
            for les in self.lesions
        ]
        write_seg_nrrd(path, self.labelmap, segments, self.reference)


def segment_tags(lesion: Lesion, model_id: str, status: str = "unreviewed") -> dict[str, str]:
    return {
        "LesionSeg.Confidence": f"{lesion.confidence:.6f}",
        "LesionSeg.LesionId": str(lesion.lesion_id),
        "LesionSeg.Model": model_id,
        "LesionSeg.Review": status,
        "LesionSeg.VolumeMl": f"{lesion.volume_ml:.4f}",
        "LesionSeg.DiameterMm": f"{lesion.diameter_mm:.2f}",
    }

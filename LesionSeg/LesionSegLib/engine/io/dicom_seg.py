"""DICOM Segmentation objects of lesion labelmaps, referencing their source CT series (highdicom).

Shared by ``lesionseg segment --dicom-seg`` (the engine's labelmap on the SimpleITK grid it read)
and the Slicer module's DICOM SEG export (a segmentation node's labelmap on its volume's grid):

* :func:`frames`: the mask of every source slice, sampled from the labelmap through the slice's
  own ImagePositionPatient / ImageOrientationPatient / PixelSpacing (so any slice order or
  orientation is handled), and checked against the slice's pixels: a labelmap whose grid no longer
  matches the series (a volume moved, resampled or edited after loading) would mark other anatomy,
  and is refused (:data:`SOURCE_MISMATCH`).
* :func:`build`: a binary SEG with one segment per lesion (:class:`Segment`: label, algorithm type
  AUTOMATIC / SEMIAUTOMATIC / MANUAL, colour, SNOMED CT codes), the algorithm ``LesionSeg <model
  name>`` version ``<model version>``; every DICOM LO text is cut to 64 characters.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InputError

#: SNOMED CT codes of every lesion segment (coding scheme, code value, code meaning)
LESION_CATEGORY = ("SCT", "49755003", "Morphologically Altered Structure")
LESION_TYPE = ("SCT", "4147007", "Mass")
#: share of a series' pixels that may differ from the voxels they map onto (rounding of rescaled
#: values); beyond it the labelmap's grid is not the series' and the export is refused
SOURCE_MISMATCH = 0.01
LO = 64  # DICOM Long String


@dataclass
class Segment:
    """One lesion of a SEG: ``value`` is its label in the labelmap."""

    value: int
    label: str
    kind: str = "AUTOMATIC"  # AUTOMATIC, SEMIAUTOMATIC (reviewed, click-added), MANUAL (drawn: no algorithm)
    color_rgb: tuple | None = None  # 0..1
    category: tuple = LESION_CATEGORY
    type: tuple = LESION_TYPE
    region: tuple | None = None
    tracking_id: str = ""


def read_series(files) -> list:
    """The source datasets (pixels included), refused in one line when one cannot be read."""
    import pydicom

    out = []
    for f in files:
        try:
            out.append(pydicom.dcmread(str(f)))
        except Exception as exc:  # noqa: BLE001 (pydicom raises several kinds)
            raise InputError(f"cannot read DICOM file for the DICOM SEG: {exc}", str(f)) from None
    return out


def slice_voxels(ds, lps_to_ijk: np.ndarray, shape) -> tuple[tuple[np.ndarray, np.ndarray, np.ndarray], np.ndarray]:
    """The labelmap voxel (k, j, i) nearest to each pixel of one DICOM slice, and which pixels
    fall inside a grid of ``shape`` (k, j, i); outside pixels get index 0."""
    rows, cols = int(ds.Rows), int(ds.Columns)
    ipp = np.asarray([float(v) for v in ds.ImagePositionPatient])
    iop = np.asarray([float(v) for v in ds.ImageOrientationPatient])
    row_spacing, col_spacing = (float(v) for v in ds.PixelSpacing)
    r, c = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    # DICOM: x direction (iop[:3]) goes along a row (increasing column index), spacing PixelSpacing[1]
    lps = ipp[None, None, :] + c[..., None] * col_spacing * iop[None, None, :3] + r[..., None] * row_spacing * iop[None, None, 3:]
    idx = np.rint(lps @ lps_to_ijk[:3, :3].T + lps_to_ijk[:3, 3]).astype(np.int64)
    k_max, j_max, i_max = shape
    inside = (idx[..., 0] >= 0) & (idx[..., 0] < i_max) & (idx[..., 1] >= 0) & (idx[..., 1] < j_max) & (idx[..., 2] >= 0) & (idx[..., 2] < k_max)
    idx[~inside] = 0
    return (idx[..., 2], idx[..., 1], idx[..., 0]), inside


def _differing(ds, voxels: np.ndarray, inside: np.ndarray) -> int:
    """Pixels of a slice (rescaled to HU) inside the grid that differ from the voxels they map
    onto; 0 when its pixel data cannot be decoded (the geometry alone decides then)."""
    try:
        pixels = ds.pixel_array.astype(np.float64) * float(getattr(ds, "RescaleSlope", 1) or 1) + float(getattr(ds, "RescaleIntercept", 0) or 0)
    except Exception:  # noqa: BLE001 (compressed without a decoder)
        return 0
    if pixels.shape != inside.shape:
        return 0
    return int(np.count_nonzero(np.abs(pixels[inside] - voxels[inside].astype(np.float64)) > 0.5))


def frames(datasets, labelmap: np.ndarray, lps_to_ijk: np.ndarray, hu: np.ndarray, values: dict[int, int], what: str) -> np.ndarray:
    """(n slices, rows, columns) segment numbers: ``values`` maps a labelmap value to its segment
    number (others are 0).  ``hu``: the voxels the labelmap was made from, on its grid; ``what``
    names them in the refusal when they no longer match the series."""
    lut = np.zeros(int(labelmap.max()) + 1 if labelmap.size else 1, dtype=np.uint16)
    for value, number in values.items():
        if 0 <= value < lut.size:
            lut[value] = number
    out = np.zeros((len(datasets), int(datasets[0].Rows), int(datasets[0].Columns)), dtype=np.uint16)
    differ = inside_total = 0
    for f, ds in enumerate(datasets):
        (k, j, i), inside = slice_voxels(ds, lps_to_ijk, labelmap.shape)
        out[f] = np.where(inside, lut[labelmap[k, j, i]], 0)
        differ += _differing(ds, hu[k, j, i], inside)
        inside_total += int(inside.sum())
    if not inside_total or differ > SOURCE_MISMATCH * inside_total:
        raise InputError(
            f"{what} no longer matches the DICOM series it was loaded from ("
            + (f"{differ / inside_total:.0%} of the series' pixels differ from the voxels that were segmented"
               if inside_total else "no slice of the series lies inside it")
            + "): it was moved (a hardened transform), resampled or edited after loading, so a DICOM SEG would mark "
            "other anatomy on the series; reload the series and segment it again, or export .seg.nrrd / NIfTI")
    return out


def lps_to_ijk_of(image) -> np.ndarray:
    """4x4 matrix from LPS millimetres to (i, j, k) voxel indices of a SimpleITK image."""
    d = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3) * np.asarray(image.GetSpacing(), dtype=float)
    m = np.eye(4)
    m[:3, :3] = np.linalg.inv(d)
    m[:3, 3] = -m[:3, :3] @ np.asarray(image.GetOrigin(), dtype=float)
    return m


def build(datasets, pixel_frames: np.ndarray, segments: list[Segment], model_id: str,
          series_description: str = "LesionSeg lesions", manufacturer_model: str = "LesionSeg"):
    """The binary ``highdicom.seg.Segmentation`` (segment ``n`` = ``segments[n-1]``)."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    def coded(code):
        return hd.sr.CodedConcept(value=code[1], scheme_designator=code[0], meaning=code[2])

    name, _, version = model_id.partition("@")
    algorithm = hd.AlgorithmIdentificationSequence(name=f"LesionSeg {name}"[:LO], family=codes.cid7162.ArtificialIntelligence,
                                                   version=(version or name)[:LO])
    descriptions = []
    for number, s in enumerate(segments, start=1):
        kwargs = {} if s.kind == "MANUAL" else {"algorithm_identification": algorithm}  # a drawn lesion is no algorithm's
        if s.color_rgb is not None and hasattr(hd.color.CIELabColor, "from_rgb"):
            kwargs["display_color"] = hd.color.CIELabColor.from_rgb(*[int(round(255 * float(c))) for c in s.color_rgb])
        if s.region:
            kwargs["anatomic_regions"] = [coded(s.region)]
        descriptions.append(hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=s.label[:LO],
            segmented_property_category=coded(s.category or LESION_CATEGORY),
            segmented_property_type=coded(s.type or LESION_TYPE),
            algorithm_type=getattr(hd.seg.SegmentAlgorithmTypeValues, s.kind),
            tracking_uid=hd.UID(),
            tracking_id=(s.tracking_id or f"LesionSeg lesion {s.value}")[:LO],
            **kwargs,
        ))
    return hd.seg.Segmentation(
        source_images=datasets,
        pixel_array=pixel_frames,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=hd.UID(),
        series_number=int(getattr(datasets[0], "SeriesNumber", 0) or 0) + 1000,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="LesionSeg",
        manufacturer_model_name=manufacturer_model[:LO],
        software_versions=model_id if len(model_id) <= LO else (version or name)[:LO],
        device_serial_number="0",
        series_description=series_description[:LO],
        content_label="LESIONS",
        content_description=f"LesionSeg lesions, model {model_id}"[:LO],
        omit_empty_frames=True,
    )


def save(seg, path: str | Path) -> None:
    seg.save_as(str(path))


def source_files(image, source) -> list[str] | None:
    """The files of the DICOM series ``image`` was read from (``source``: the folder given to
    ``read_image``), or None when it was not read from a DICOM series."""
    import SimpleITK as sitk

    from .images import SERIES_KEY, series_folder

    if source is None or not Path(source).is_dir() or not image.HasMetaDataKey(SERIES_KEY):
        return None
    where = series_folder(Path(source))  # a case folder may hold its series below it, as read_image reads it
    return list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(where), image.GetMetaData(SERIES_KEY)))


def from_result(image, source, result):
    """The SEG of an engine result (``result.labelmap`` on ``image``'s grid, voxel = lesion id) on
    the DICOM series ``image`` was read from; None when it came from no DICOM series or holds no
    lesion (a SEG needs at least one segment)."""
    import SimpleITK as sitk

    from ..segment.colors import confidence_color

    files = source_files(image, source)
    if not files or not result.lesions:
        return None
    datasets = read_series(files)
    pixels = frames(datasets, result.labelmap, lps_to_ijk_of(image), sitk.GetArrayViewFromImage(image),
                    {les.lesion_id: n for n, les in enumerate(result.lesions, start=1)}, f"image {source}")
    segments = [Segment(value=les.lesion_id, label=f"Lesion {les.lesion_id} ({les.confidence:.2f})",
                        color_rgb=confidence_color(les.confidence)) for les in result.lesions]
    return build(datasets, pixels, segments, result.model_id)

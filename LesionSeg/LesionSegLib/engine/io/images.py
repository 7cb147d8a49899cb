"""Reading and validating CT volumes.

All images are read with SimpleITK, so NIfTI, NRRD, MHA/MHD and DICOM series folders are
supported and the geometry (spacing, origin, direction) is kept exactly.
"""
from __future__ import annotations

import contextlib
import os
import sys
import threading
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import SimpleITK as sitk

from ..errors import InputError, out_of_memory
from .integrity import check_series, verified

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
# Hounsfield-unit sanity limits.  Real CT holds air (-1000), padding down to -3024 and metal up
# to a few thousand HU; anything far outside is not a CT in HU.
HU_MIN_PLAUSIBLE = -4000.0
HU_MAX_PLAUSIBLE = 40000.0
SPACING_MIN_MM = 0.05
SPACING_MAX_MM = 50.0


#: file stems that name no case (``<case>/image.nii.gz``): the folder names the case instead
GENERIC_STEMS = frozenset({"image", "img", "ct", "volume", "scan"})
#: the longest case name in bytes: its outputs (``<case>_lesions.nii.gz``, a batch's ``<case>.done.json``)
#: and their temporaries must stay under the file systems' 255-byte limit on a name
MAX_NAME_BYTES = 200


def name_length_problem(name: str) -> str:
    """Why ``name`` is too long to name a case's output files ("" when it is not)."""
    n = len(name.encode("utf-8", "surrogateescape"))
    return f"case name too long ({n} bytes; at most {MAX_NAME_BYTES})" if n > MAX_NAME_BYTES else ""


#: parts of a file name that mark a label map, not a scan (skipped beside scans in a folder input)
LABEL_HINTS = ("label", "mask", "seg", "lesion", "annotation")


def output_stem(path: str | os.PathLike) -> str:
    """The case name of an input: ``<case>/image.nii.gz`` is named after its folder, other files
    after themselves.  ``segment`` names its outputs by it and ``evaluate`` pairs them by it."""
    p = Path(path)
    stem = image_stem(p)
    parent = Path(os.path.abspath(p)).parent.name  # ``../image.nii.gz``: the folder's name, never ".."
    if stem.lower() in GENERIC_STEMS and parent:
        return parent
    return stem


#: Windows device names: a file named so, in any case and before any extension, is the device
RESERVED_NAMES = frozenset({"CON", "PRN", "AUX", "NUL", "CONIN$", "CONOUT$"}
                           | {f"{d}{n}" for d in ("COM", "LPT") for n in "123456789\u00b9\u00b2\u00b3"})


def windows_safe(stem: str) -> str:
    """``stem`` with ``_`` after its first part when Windows reserves that as a device name
    (``CON`` -> ``CON_``, ``nul.nii`` -> ``nul_.nii``); every other name unchanged, on every OS."""
    head, dot, rest = stem.partition(".")
    return f"{head}_{dot}{rest}" if head.rstrip(" ").upper() in RESERVED_NAMES else stem


def safe_stem(name: str, fallback: str, max_len: int | None = None) -> str:
    """``name`` as a file-name stem: letters, digits, ``-``, ``_`` and ``.`` kept, any other
    character ``_``, no leading or trailing dot or underscore, at most ``max_len`` characters,
    ``fallback`` when nothing is left, and never a Windows device name (:func:`windows_safe`)."""
    keep = "".join(c if (c.isalnum() or c in "-_.") else "_" for c in str(name)).strip("._")
    return windows_safe(keep[:max_len] or fallback)


def image_stem(path: str | os.PathLike) -> str:
    """File name without its image suffix (``case.nii.gz`` -> ``case``); a folder keeps its name."""
    name = Path(path).name
    for suffix in IMAGE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def folder_inputs(root: Path) -> list[Path]:
    """The inputs a folder stands for, as ``segment`` and ``batch`` read it:

    * its image files, except those named as labels (:data:`LABEL_HINTS`: ``label.nii.gz``,
      ``case1_mask.nrrd``, ``case1.seg.nrrd``) beside a scan, so a case folder (``image.nii.gz``
      beside ``label.nii.gz``) gives its image only; and one input per sub-folder
      (:func:`case_input`), so case folders next to loose scans count too;
    * a folder of other files (a DICOM series): the folder itself;
    * a folder of case folders: one input per case folder, never none: a case folder without
      one scan is itself the input, which :func:`read_image` refuses with a reason;
    * anything else: the folder itself, which :func:`read_image` refuses with a reason.

    Sub-folders that hold no input are passed over (:func:`_no_input`): hidden ones, macOS's
    ``__MACOSX``, and folders holding only LesionSeg's own outputs and reports
    (:data:`OUTPUT_FILES`), so an output folder kept inside the cohort is not read as a case on
    the next run.  An empty case folder stays an input that fails, saying so.
    """
    try:
        entries = sorted(root.iterdir())
    except OSError:
        return [root]
    files = [f for f in entries if _visible_file(f)]
    images = [f for f in files if f.name.lower().endswith(IMAGE_SUFFIXES)]
    if files and not images:
        return [root]
    scans = [f for f in images if not _is_label(f)] or images  # only labels: read_image says why each is no CT
    subs = [case_input(d) for d in entries if d.is_dir() and not _no_input(d)]
    return (scans + subs) or [root]


#: the files LesionSeg writes (segment, click, batch, evaluate): a folder holding only these is an
#: output folder, not a case
OUTPUT_FILES = ("*_lesions.*", "*.seg.nrrd", "*_click.*", "*.done.json", "report.json", "report.md", "froc.png", "reliability.png",
                "batch_report.csv")


def _no_input(folder: Path) -> bool:
    """Whether a sub-folder of a folder input holds no input (see :func:`folder_inputs`)."""
    if folder.name.startswith(".") or folder.name == "__MACOSX":
        return True
    try:
        files = [f for f in folder.iterdir() if _visible_file(f)]
    except OSError:
        return False  # read_image says what is wrong with it
    return bool(files) and all(any(f.match(p) for p in OUTPUT_FILES) for f in files)  # a scan beside them: a case


def _visible_file(f: Path) -> bool:
    return f.is_file() and not f.name.startswith(".")


def _is_label(f: Path) -> bool:
    return any(h in image_stem(f).lower() for h in LABEL_HINTS)


def case_input(folder: Path) -> Path:
    """The input of a case folder: its one scan (a file that is no label map; of several, the one
    named ``image``/``ct``/... if there is exactly one), else the folder itself: a DICOM series
    (here or in the one folder below holding files), or a folder :func:`read_image` refuses."""
    try:
        inner = [f for f in sorted(folder.iterdir()) if _visible_file(f)]
    except OSError:
        return folder
    scans = [f for f in inner if f.name.lower().endswith(IMAGE_SUFFIXES) and not _is_label(f)]
    generic = [f for f in scans if image_stem(f).lower() in GENERIC_STEMS]
    if len(scans) == 1 or len(generic) == 1:
        return scans[0] if len(scans) == 1 else generic[0]
    return folder


def folder_problem(folder: Path, no_series: bool = False) -> str | None:
    """Why ``folder`` (no file input) holds no scan to read, or None when it may hold a DICOM
    series (non-image files in it, or in the one folder below it that holds files);
    ``no_series``: GDCM found none there, so other files beside label maps are no series either."""
    try:
        inner = [f for f in sorted(folder.iterdir()) if _visible_file(f)]
    except OSError as exc:
        return f"cannot list folder: {exc.strerror or exc}"
    images = [f for f in inner if f.name.lower().endswith(IMAGE_SUFFIXES)]
    scans = [f for f in images if not _is_label(f)]
    if len(scans) > 1:
        return (f"folder holds {len(scans)} scans ({', '.join(f.name for f in scans[:4])}), not one; "
                "give them as separate inputs")
    if scans or (len(inner) > len(images) and not (no_series and images)):
        return None
    if images:
        return f"folder holds only label maps ({', '.join(f.name for f in images[:4])}), no scan"
    below = _file_folders_below(folder)
    if len(below) == 1 and not any(f.name.lower().endswith(IMAGE_SUFFIXES) for f in below[0].iterdir()):
        return None
    if below:
        names = ", ".join(str(d.relative_to(folder)) for d in below[:3]) + (", ..." if len(below) > 3 else "")
        return f"folder holds no scan of its own but {len(below)} folder(s) with files below it ({names}); give them as inputs"
    return "folder holds no image files and no DICOM series"


def _file_folders_below(folder: Path, depth: int = 4) -> list[Path]:
    """The folders below ``folder`` (at most ``depth`` levels, hidden ones skipped) holding files."""
    found = []
    base = len(folder.parts)
    for root, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".")) if len(Path(root).parts) - base < depth else []
        if Path(root) != folder and any(not n.startswith(".") for n in names):
            found.append(Path(root))
    return sorted(found)


def series_folder(folder: Path) -> Path:
    """``folder``, or the one folder below it holding files when ``folder`` holds none itself
    (``PAT3/study/series/``): where a DICOM series given as ``folder`` lies."""
    try:
        if any(_visible_file(f) for f in folder.iterdir()):
            return folder
    except OSError:
        return folder
    below = _file_folders_below(folder)
    return below[0] if len(below) == 1 else folder


def expand_inputs(inputs: Sequence[str | os.PathLike]) -> list[Path]:
    """Expand folders into their inputs (:func:`folder_inputs`); files are kept as given."""
    out: list[Path] = []
    for item in inputs:
        p = Path(item)
        out.extend(folder_inputs(p) if p.is_dir() else [p])
    return out


def read_image(path: str | os.PathLike, validate: bool = True) -> sitk.Image:
    """Read an image file or a DICOM series folder; raise :class:`InputError` on any problem.

    A truncated or corrupt file is refused (see :mod:`.integrity`), and nothing ITK, GDCM or
    MetaIO would print reaches stderr: the one-line :class:`InputError` says what is wrong.
    ``validate=False`` skips :func:`validate_ct` for callers that validate later themselves
    (``Engine.segment`` does).
    """
    p = Path(path)
    src = str(p)
    if not p.exists():
        raise InputError("file not found", src)
    with quiet_itk():
        if p.is_dir():
            image = _read_series(p)
        else:
            if p.stat().st_size == 0:
                raise InputError("file is empty (0 bytes)", src)
            with verified(p) as readable:
                try:
                    image = sitk.ReadImage(str(readable))
                except RuntimeError as exc:
                    _not_memory(exc, src)
                    raise InputError(f"cannot read image (corrupt or unsupported format): {_first_line(exc)}", src) from None
    if validate:
        validate_ct(image, src)
    return image


def _read_series(folder: Path) -> sitk.Image:
    src = str(folder)
    where = series_folder(folder)  # a case folder may hold its series one level or more below
    reader = sitk.ImageSeriesReader()
    try:
        series = reader.GetGDCMSeriesIDs(str(where))
    except RuntimeError as exc:  # pragma: no cover - GDCM error text varies
        raise InputError(f"cannot scan folder for DICOM: {_first_line(exc)}", src) from None
    if not series:
        inner = _series_folders_below(folder) if (folder / "DICOMDIR").exists() else []
        if inner:  # a CD / DICOMDIR layout: the slices sit in sub-folders
            raise InputError(f"folder holds a DICOMDIR whose series are in sub-folders; give one of them: "
                             f"{', '.join(str(p) for p in inner[:3])}", src)
        raise InputError(folder_problem(folder, no_series=True) or "folder holds no image files and no DICOM series", src)
    # Several series in one folder: take the one with most slices, as a viewer would, and say so.
    files = {uid: reader.GetGDCMSeriesFileNames(str(where), uid) for uid in series}
    uid = max(files, key=lambda u: len(files[u]))
    reader.SetFileNames(files[uid])
    reader.MetaDataDictionaryArrayUpdateOn()
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        _not_memory(exc, src)
        raise InputError(f"cannot read DICOM series: {_first_line(exc)}", src) from None
    check_series(where, uid, {f for names in files.values() for f in names}, reader, image)
    image.SetMetaData(SERIES_KEY, uid)  # for a DICOM SEG that references this series (io.dicom_seg)
    if len(files) > 1:
        others = ", ".join(f"{len(files[u])} slice(s)" for u in files if u != uid)
        image.SetMetaData(NOTE_KEY, f"{src}: {len(files)} DICOM series in this folder; segmented the one with the most "
                                    f"slices ({len(files[uid])}), not the others ({others}); give a folder per series to choose")
    return image


def _not_memory(exc: RuntimeError, src: str) -> None:
    """ITK failing to allocate the image is the machine's memory, not a corrupt file: say so."""
    if out_of_memory(exc):
        raise MemoryError(f"{src}: not enough memory to read this scan (the file is not damaged; ITK: {_first_line(exc)})") from None


#: a note a reader leaves on the image (SimpleITK metadata) for the command to print
NOTE_KEY = "LesionSeg.ReadNote"
#: the SeriesInstanceUID of the DICOM series an image was read from (SimpleITK metadata)
SERIES_KEY = "LesionSeg.SeriesUID"


def read_note(image: sitk.Image) -> str | None:
    """The note :func:`read_image` left on ``image`` (several DICOM series in one folder), or None."""
    return image.GetMetaData(NOTE_KEY) if image.HasMetaDataKey(NOTE_KEY) else None


def _series_folders_below(folder: Path, limit: int = 3) -> list[Path]:
    """Up to ``limit`` sub-folders of ``folder`` holding a DICOM series (a DICOMDIR layout)."""
    found = []
    reader = sitk.ImageSeriesReader()
    for root, _dirs, names in sorted(os.walk(folder)):
        if Path(root) == folder or not names:
            continue
        try:
            if reader.GetGDCMSeriesIDs(root):
                found.append(Path(root))
        except RuntimeError:
            continue
        if len(found) >= limit:
            break
    return found


_QUIET_LOCK = threading.Lock()
_quiet = {"depth": 0, "saved": None, "warnings": True}


@contextlib.contextmanager
def quiet_itk() -> Iterator[None]:
    """Silence ITK/GDCM/MetaIO during a read: ITK's warning display is switched off, and what
    the C++ libraries print straight to stderr (file descriptor 2) goes to the null device.

    Both are process-wide, so reads in several threads share one silencing: the first to enter
    saves and redirects, the last to leave restores (each saving the other's null device had left
    stderr on it, and ITK's warnings off, for good)."""
    with _QUIET_LOCK:
        if _quiet["depth"] == 0:
            _quiet["warnings"] = sitk.ProcessObject.GetGlobalWarningDisplay()
            sitk.ProcessObject.SetGlobalWarningDisplay(False)
            _quiet["saved"] = None
            try:
                sys.stderr.flush()
                _quiet["saved"] = os.dup(2)
                null = os.open(os.devnull, os.O_WRONLY)
                os.dup2(null, 2)
                os.close(null)
            except (OSError, ValueError, AttributeError):  # no usable fd 2 (e.g. a GUI process): warnings are off anyway
                pass
        _quiet["depth"] += 1
    try:
        yield
    finally:
        with _QUIET_LOCK:
            _quiet["depth"] -= 1
            if _quiet["depth"] == 0:
                if _quiet["saved"] is not None:
                    os.dup2(_quiet["saved"], 2)
                    os.close(_quiet["saved"])
                    _quiet["saved"] = None
                sitk.ProcessObject.SetGlobalWarningDisplay(_quiet["warnings"])


def _first_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    # ITK messages start with a file/line banner; the useful part is the last line.
    return lines[-1][:200] if lines else type(exc).__name__


def _num(values) -> str:
    """Numbers as a user writes them: ``(0.001, 1, 1)``, never ``np.float64(0.001)``."""
    return "(" + ", ".join(f"{float(v):g}" for v in values) + ")"


def validate_ct(image: sitk.Image, source: str | None = None) -> None:
    """Check that ``image`` is a usable 3D CT in Hounsfield units."""
    ncomp = image.GetNumberOfComponentsPerPixel()
    if ncomp > 1:
        raise InputError(f"RGB/vector image with {ncomp} components per voxel; a single-channel CT is required", source)
    dim = image.GetDimension()
    if dim != 3:
        raise InputError(f"{dim}D image; a 3D CT volume is required", source)
    size = image.GetSize()
    if min(size) < 2:
        raise InputError(f"image of size {tuple(int(n) for n in size)} is 2D (a single slice); a 3D CT volume is required", source)
    spacing = np.asarray(image.GetSpacing(), dtype=float)
    if not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
        raise InputError(f"zero, negative or non-finite voxel spacing {_num(spacing)} mm", source)
    if np.any(spacing < SPACING_MIN_MM) or np.any(spacing > SPACING_MAX_MM):
        raise InputError(
            f"absurd voxel spacing {_num(spacing)} mm; expected {SPACING_MIN_MM:g}-{SPACING_MAX_MM:g} mm",
            source,
        )
    extent = np.asarray(size, dtype=float) * spacing
    thin = [k for k in range(3) if size[k] < MIN_AXIS_VOXELS or extent[k] < MIN_AXIS_MM]
    if thin:
        k = thin[0]
        raise InputError(f"image of size {tuple(int(n) for n in size)} is a thin slab: {size[k]} voxels spanning "
                         f"{extent[k]:.1f} mm along axis {'ijk'[k]}; a 3D CT volume at least {MIN_AXIS_VOXELS} voxels "
                         f"and {MIN_AXIS_MM:g} mm deep along each axis is required", source)
    direction = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)
    if not np.all(np.isfinite(direction)) or np.abs(direction.T @ direction - np.eye(3)).max() > SHEAR_TOLERANCE:
        raise InputError(f"sheared voxel grid: its axes are not at right angles ({_axis_angles(direction)}), as a "
                         "gantry-tilted acquisition gives; NIfTI outputs cannot hold such a grid and volumes would be "
                         "wrong: resample it onto a regular grid first (e.g. Slicer's DICOM acquisition-geometry "
                         "regularization, or Resample Scalar Volume)", source)
    arr = sitk.GetArrayViewFromImage(image)
    if arr.dtype.kind == "f":
        bad = int(np.count_nonzero(~np.isfinite(arr)))
        if bad:
            raise InputError(f"contains {bad} NaN/Inf voxels", source)
    lo, hi = float(arr.min()), float(arr.max())
    if lo == hi:
        raise InputError(f"empty volume: every voxel is {lo:g}", source)
    padding, lo = _padding(arr, lo, hi)
    pad = f" (outside the field of view: {padding:g})" if padding is not None else ""
    if lo < HU_MIN_PLAUSIBLE or hi > HU_MAX_PLAUSIBLE:
        raise InputError(
            f"intensity range [{lo:g}, {hi:g}]{pad} is not CT in Hounsfield units (expected within "
            f"[{HU_MIN_PLAUSIBLE:g}, {HU_MAX_PLAUSIBLE:g}])",
            source,
        )
    if hi < 0.0:
        raise InputError(f"intensity range [{lo:g}, {hi:g}]{pad} holds no tissue: every voxel is below 0 HU, as in a scan "
                         "of air; a CT of the patient is required", source)
    if lo > -100.0 and (padding is None or _raw_soft_tissue(arr, padding)):
        raise InputError(
            f"intensity range [{lo:g}, {hi:g}]{pad} is not CT in Hounsfield units (a CT has fat or air below "
            "-100 HU and soft tissue above 0 HU); is this an MR, or a CT stored without its rescale "
            "(raw values, air near 0 instead of -1000 HU)?",
            source,
        )


#: the thinnest axis a volume may have: two or three slices give no meaningful 3D result, and
#: under 6 mm not even the smallest lesion kept (100 mm^3, a 5.8 mm ball) fits
MIN_AXIS_VOXELS = 4
MIN_AXIS_MM = 6.0
#: a constant minimum value this far below every other voxel is the scanner's out-of-field padding
PADDING_GAP_HU = 100.0


def _padding(arr: np.ndarray, lo: float, hi: float) -> tuple[float | None, float]:
    """(the padding value, the lowest value that is not padding).  Scanners fill the voxels outside
    the reconstructed field of view with one constant well below everything else (-1024, -2048,
    -3024, -32768: DICOM's PixelPaddingValue); it is no tissue, so the HU checks leave it out,
    where it had made a -32768-padded CT "not CT" and let a CT stored without its rescale
    (+1024), whose padding is the only value below 0, pass as one."""
    if lo > -1000.0:
        return None, lo
    rest = hi
    for chunk in range(0, arr.shape[0], 32):  # the second-lowest value, without a full-size copy
        block = arr[chunk:chunk + 32]
        above = block[block > lo]
        if above.size:
            rest = min(rest, float(above.min()))
    return (lo, rest) if rest - lo >= PADDING_GAP_HU else (None, lo)


def _raw_soft_tissue(arr: np.ndarray, padding: float) -> bool:
    """Whether a padded scan with nothing below -100 besides its padding holds its soft tissue near
    +1000 (a fifth of the voxels above 900), as stored values without the rescale do (HU + 1024);
    a body-masked CT (constant background, lean tissue near 0 HU) does not, and is a CT."""
    inside = above = 0
    for chunk in range(0, arr.shape[0], 32):
        block = arr[chunk:chunk + 32]
        inside += int(np.count_nonzero(block > padding))
        above += int(np.count_nonzero(block > 900))
    return above >= 0.2 * max(inside, 1)


#: largest |D^T D - I| entry of a direction matrix taken as orthonormal (rounding in headers)
SHEAR_TOLERANCE = 1e-3


def _axis_angles(direction: np.ndarray) -> str:
    """The angles between a direction matrix's axes, e.g. "i-j 90.0, i-k 90.0, j-k 70.0 degrees"."""
    cols = direction / np.maximum(np.linalg.norm(direction, axis=0), 1e-12)
    out = []
    for a, b, name in ((0, 1, "i-j"), (0, 2, "i-k"), (1, 2, "j-k")):
        out.append(f"{name} {np.degrees(np.arccos(np.clip(cols[:, a] @ cols[:, b], -1, 1))):.1f}")
    return ", ".join(out) + " degrees"


def read_label(path: str | os.PathLike, reference: sitk.Image | None = None) -> sitk.Image:
    """Read a binary/instance label image; optionally check it shares ``reference``'s grid."""
    src = str(path)
    if not Path(path).exists():
        raise InputError("label file not found", src)
    try:
        with quiet_itk(), verified(Path(path)) as readable:
            label = sitk.ReadImage(str(readable))
    except RuntimeError as exc:
        _not_memory(exc, src)
        raise InputError(f"cannot read label (corrupt or unsupported format): {_first_line(exc)}", src) from None
    if reference is not None and not same_grid(label, reference):
        raise InputError("label grid (size, spacing, origin, direction) differs from its image", src)
    return label


def same_grid(a: sitk.Image, b: sitk.Image, tol: float = 1e-4) -> bool:
    return (
        a.GetSize() == b.GetSize()
        and np.allclose(a.GetSpacing(), b.GetSpacing(), atol=tol)
        and np.allclose(a.GetOrigin(), b.GetOrigin(), atol=tol * 10)
        and np.allclose(a.GetDirection(), b.GetDirection(), atol=tol)
    )

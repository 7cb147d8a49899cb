"""Refuse truncated and corrupt image files before SimpleITK reads them.

SimpleITK (ITK's NIfTI and MetaImage readers) accepts a file that ends early and fills the
missing voxels with 0, and it does not check the CRC of a ``.nii.gz`` or the Adler-32 of a
compressed ``.mha``.  A partly copied scan would then be segmented as if it were whole.  Here
every header is parsed just far enough to know how many voxel bytes it declares, and the file
(or its detached data file) must hold them:

* NIfTI-1/-2 ``.nii`` / ``.nii.gz``: ``vox_offset + prod(dim) * bitpix / 8`` bytes.  A
  ``.nii.gz`` is inflated once, completely (end-of-stream marker, CRC and length checked), into a
  temporary ``.nii`` that SimpleITK then reads, so the check costs no second decompression.
* NRRD ``.nrrd`` / ``.nhdr`` (attached or detached ``data file``): raw data must be long enough;
  gzip data must end with the declared length (its trailer; teem checks the CRC itself).
* MetaImage ``.mha`` / ``.mhd`` (``LOCAL`` or a data file): raw data must be long enough;
  compressed data must be ``CompressedDataSize`` bytes and inflate completely (Adler-32 checked).

ITK's NIfTI reader also turns NaN voxels into 0 (an image that holds them would pass
:func:`.images.validate_ct`), so a floating-point NIfTI's voxels are counted here for NaN/Inf.

Headers this module does not understand (other encodings, file lists) are left to SimpleITK.
"""
from __future__ import annotations

import contextlib
import os
import re
import struct
import tempfile
import time
import zlib
from pathlib import Path
from typing import Iterator

import numpy as np

from ..errors import InputError

CHUNK = 1 << 22


@contextlib.contextmanager
def verified(path: Path) -> Iterator[Path]:
    """Check that ``path`` holds every voxel byte its header declares; yield the file SimpleITK
    should read (a temporary inflated copy for ``.nii.gz``, removed afterwards)."""
    name = path.name.lower()
    if name.endswith(".nii.gz") and _is_gzip(path):
        with _inflated_nifti(path) as tmp:
            yield tmp
        return
    if name.endswith((".nii", ".nii.gz")):  # a .nii.gz that is not compressed is read as it is
        with open(path, "rb") as fh:
            head = fh.read(540)
        _check_nifti(path, head, path, path.stat().st_size, "the file")
    elif name.endswith((".nrrd", ".nhdr")):
        _check_nrrd(path)
    elif name.endswith((".mha", ".mhd")):
        _check_metaimage(path)
    yield path


def _is_gzip(path: Path) -> bool:
    with open(path, "rb") as fh:
        return fh.read(2) == b"\x1f\x8b"


def _need(available: int, expected: int, source: Path, where: str) -> None:
    if available < expected:
        raise InputError(
            f"file is truncated: the header declares {expected} bytes of image data, {where} holds {available}", str(source)
        )


# ------------------------------------------------------------------------------ NIfTI
def _check_nifti(data: Path, head: bytes, source: Path, available: int, where: str) -> None:
    """Refuse a single-file NIfTI (``data``: whole and uncompressed, ``available`` bytes) that holds
    fewer bytes than its header declares (header, extensions and voxels), or NaN/Inf voxels;
    nothing to check if ``head`` is not a NIfTI header."""
    layout = _nifti_layout(head, source)
    if layout is None:
        return
    _need(available, layout["offset"] + layout["count"] * layout["bitpix"] // 8, source, where)
    _nifti_finite(data, layout, source)


#: NIfTI datatype codes of floating-point voxels: numpy dtype by code
NIFTI_FLOATS = {16: "f4", 64: "f8"}


def _nifti_finite(data: Path, layout: dict, source: Path) -> None:
    """Refuse a floating-point NIfTI (``data``: a whole, uncompressed ``.nii``) holding NaN/Inf."""
    if layout["datatype"] not in NIFTI_FLOATS:
        return
    voxels = np.memmap(data, dtype=np.dtype(layout["end"] + NIFTI_FLOATS[layout["datatype"]]), mode="r",
                       offset=layout["offset"], shape=(layout["count"],))
    step = CHUNK
    bad = sum(int(np.count_nonzero(~np.isfinite(voxels[i:i + step]))) for i in range(0, layout["count"], step))
    del voxels
    if bad:
        raise InputError(f"contains {bad} NaN/Inf voxels", str(source))


def _nifti_layout(head: bytes, source: Path) -> dict | None:
    """``{end, datatype, bitpix, offset, count}`` of a single-file NIfTI-1/-2 header (``offset``:
    where the voxels start; ``count``: how many there are); None if not NIfTI or malformed."""
    for end in "<>" if len(head) >= 4 else "":
        size = struct.unpack(end + "i", head[:4])[0]
        if size not in (348, 540):
            continue
        if len(head) < size:
            raise InputError(f"file is truncated: {len(head)} bytes, shorter than its NIfTI header", str(source))
        if size == 348:
            ndim, *dims = struct.unpack(end + "8h", head[40:56])
            datatype, bitpix = struct.unpack(end + "2h", head[70:74])
            offset = int(struct.unpack(end + "f", head[108:112])[0])
        else:
            datatype, bitpix = struct.unpack(end + "2h", head[12:16])
            ndim, *dims = struct.unpack(end + "8q", head[16:80])
            offset = struct.unpack(end + "q", head[168:176])[0]
        if not 1 <= ndim <= 7 or bitpix <= 0 or any(d < 1 for d in dims[:ndim]):
            return None  # malformed: SimpleITK says what is wrong
        return {"end": end, "datatype": int(datatype), "bitpix": int(bitpix), "offset": max(int(offset), size),
                "count": int(np.prod(dims[:ndim], dtype=np.int64))}
    return None


#: an inflated copy older than this is left over from a killed process (a read takes seconds)
STALE_SECONDS = 3600.0
INFLATED_PREFIX = "lesionseg-"


_SWEPT: set[str] = set()  # temporary folders already swept by this process


def _sweep_stale(folder: Path) -> None:
    """Remove this user's inflated copies that a killed process (SIGKILL, a crashed batch
    worker) left in the temporary folder, once per process and folder; a terminated command
    removes its own (the CLI turns SIGTERM into an orderly exit)."""
    if str(folder) in _SWEPT:
        return
    _SWEPT.add(str(folder))
    now = time.time()
    with contextlib.suppress(OSError):
        for old in folder.glob(f"{INFLATED_PREFIX}*.nii"):
            with contextlib.suppress(OSError):
                st = old.stat()
                mine = not hasattr(os, "getuid") or st.st_uid == os.getuid()  # no uids on Windows
                if mine and now - st.st_mtime > STALE_SECONDS:
                    old.unlink()


@contextlib.contextmanager
def _inflated_nifti(path: Path) -> Iterator[Path]:
    _sweep_stale(Path(tempfile.gettempdir()))
    fd, tmp = tempfile.mkstemp(prefix=INFLATED_PREFIX, suffix=".nii")
    try:
        with os.fdopen(fd, "wb") as out, open(path, "rb") as fh:
            head = bytearray()
            total = 0
            for block in _gunzip(fh, path):
                if len(head) < 540:
                    head += block[: 540 - len(head)]
                out.write(block)
                total += len(block)
        _check_nifti(Path(tmp), bytes(head), path, total, "its gzip stream")
        yield Path(tmp)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def _gunzip(fh, source: Path) -> Iterator[bytes]:
    """Inflate a whole gzip stream (every member); one that ends early or fails its CRC or
    length check is refused.  Bytes after the last member that start no new member are ignored,
    as zlib's own reader does."""
    d = zlib.decompressobj(31)
    try:
        while chunk := fh.read(CHUNK):
            while chunk:
                if d.eof:  # the previous member ended: another one, or trailing bytes
                    if not chunk.startswith(b"\x1f\x8b"):
                        return
                    d = zlib.decompressobj(31)
                yield d.decompress(chunk)
                chunk = d.unused_data if d.eof else b""
    except zlib.error as exc:
        text = str(exc)
        problem = "CRC check failed" if "data check" in text else "length check failed" if "length check" in text else text[:120]
        raise InputError(f"file is corrupt: gzip {problem}", str(source)) from None
    if not d.eof:
        raise InputError("file is truncated: its gzip stream ends before the end-of-stream marker", str(source))


# ------------------------------------------------------------------------------ NRRD
NRRD_TYPE_BYTES = {
    1: ("signed char", "int8", "int8_t", "uchar", "unsigned char", "uint8", "uint8_t"),
    2: ("short", "short int", "signed short", "signed short int", "int16", "int16_t", "ushort", "unsigned short",
        "unsigned short int", "uint16", "uint16_t"),
    4: ("int", "signed int", "int32", "int32_t", "uint", "unsigned int", "uint32", "uint32_t", "float"),
    8: ("longlong", "long long", "long long int", "signed long long", "signed long long int", "int64", "int64_t",
        "ulonglong", "unsigned long long", "unsigned long long int", "uint64", "uint64_t", "double"),
}
_NRRD_SIZE = {name: n for n, names in NRRD_TYPE_BYTES.items() for name in names}


def _read_header(path: Path, limit: int = 1 << 20) -> tuple[list[str], int]:
    """Header lines up to the first empty line, and the byte offset just after it."""
    with open(path, "rb") as fh:
        raw = fh.read(limit)
    m = re.search(rb"\r?\n\r?\n", raw)
    end = m.end() if m else len(raw)
    return raw[:end].decode("latin-1").splitlines(), end


def _check_nrrd(path: Path) -> None:
    lines, end = _read_header(path)
    if not lines or not lines[0].startswith("NRRD"):
        return  # not NRRD: SimpleITK says what is wrong
    fields: dict[str, str] = {}
    for ln in lines[1:]:
        if ln.startswith("#") or ":=" in ln or ": " not in ln:
            continue
        key, value = ln.split(": ", 1)
        fields[key.strip().lower()] = value.strip()
    try:
        itemsize = _NRRD_SIZE[fields.get("type", "").lower()]
        expected = int(np.prod([int(s) for s in fields["sizes"].split()], dtype=np.int64)) * itemsize
        skip = int(fields.get("byte skip", fields.get("byteskip", "0")))
    except (KeyError, ValueError):
        return
    encoding = fields.get("encoding", "").lower()
    datafile = fields.get("data file", fields.get("datafile"))
    if int(fields.get("line skip", fields.get("lineskip", "0")) or 0) or (datafile and " " in datafile.strip()):
        return  # line skips and file lists/patterns: left to SimpleITK
    if datafile:
        if datafile.upper().startswith("LIST"):
            return
        data, start = (path.parent / datafile), 0
        if not data.is_file():
            raise InputError(f"data file {datafile} named by the header is missing", str(path))
    else:
        data, start = path, end
    size = data.stat().st_size - start
    if encoding == "raw":
        _need(size if skip == -1 else size - skip, expected, path, f"{'data file ' + datafile if datafile else 'the file'}")
    elif encoding in ("gzip", "gz") and skip >= 0:
        _check_gzip_length(data, start + skip, expected, path)


def _check_gzip_length(data: Path, start: int, expected: int, source: Path) -> None:
    """A gzip stream that runs to the end of ``data``: its trailer's length (mod 2**32) must
    match ``expected``; when it does not, the stream is inflated to say exactly what is wrong."""
    with open(data, "rb") as fh:
        fh.seek(0, os.SEEK_END)
        if fh.tell() - start < 18:
            raise InputError("file is truncated: its gzip stream is shorter than a gzip header", str(source))
        fh.seek(-4, os.SEEK_END)
        if struct.unpack("<I", fh.read(4))[0] == expected % 2**32:
            return
        fh.seek(start)
        total = sum(len(block) for block in _gunzip(fh, source))  # several gzip members: count them all
    _need(total, expected, source, "its gzip stream")


# ------------------------------------------------------------------------------ MetaImage
META_TYPE_BYTES = {"MET_CHAR": 1, "MET_UCHAR": 1, "MET_SHORT": 2, "MET_USHORT": 2, "MET_INT": 4, "MET_UINT": 4,
                   "MET_LONG": 4, "MET_ULONG": 4, "MET_LONG_LONG": 8, "MET_ULONG_LONG": 8, "MET_FLOAT": 4, "MET_DOUBLE": 8}


def _check_metaimage(path: Path) -> None:
    fields: dict[str, str] = {}
    end = 0
    with open(path, "rb") as fh:
        for raw in iter(lambda: fh.readline(65536), b""):
            end += len(raw)
            key, _, value = raw.decode("latin-1").partition("=")
            fields[key.strip().lower()] = value.strip()
            if key.strip().lower() == "elementdatafile":
                break
            if end > (1 << 20):
                return
    try:
        expected = int(np.prod([int(s) for s in fields["dimsize"].split()], dtype=np.int64))
        expected *= META_TYPE_BYTES[fields["elementtype"].upper()] * int(fields.get("elementnumberofchannels", "1"))
        datafile = fields["elementdatafile"]
        skip = int(fields.get("headersize", "0"))
    except (KeyError, ValueError):
        return
    if datafile.upper() == "LOCAL":
        data, start = path, end
    elif " " in datafile or "%" in datafile or datafile.upper().startswith("LIST"):
        return
    else:
        data, start = path.parent / datafile, 0
        if not data.is_file():
            raise InputError(f"data file {datafile} named by the header is missing", str(path))
    size = data.stat().st_size - start
    where = "the file" if data == path else f"data file {datafile}"
    if fields.get("compresseddata", "false").lower() != "true":
        _need(size if skip == -1 else size - max(skip, 0), expected, path, where)
        return
    declared = int(fields.get("compresseddatasize", "0") or 0)
    if declared and size < declared:
        raise InputError(f"file is truncated: the header declares {declared} bytes of compressed data, {where} holds {size}", str(path))
    with open(data, "rb") as fh:
        fh.seek(start)
        total = _inflate_zlib(fh, path)
    _need(total, expected, path, where)


def _inflate_zlib(fh, source: Path) -> int:
    """Inflate a whole zlib stream (Adler-32 checked); the number of bytes it holds."""
    d = zlib.decompressobj()
    total = 0
    try:
        while chunk := fh.read(CHUNK):
            total += len(d.decompress(chunk))
            if d.eof:
                break
        total += len(d.flush())
    except zlib.error as exc:
        raise InputError(f"file is corrupt: compressed data error ({str(exc)[:120]})", str(source)) from None
    if not d.eof:
        raise InputError("file is truncated: its compressed data ends before the end-of-stream marker", str(source))
    return total


# ------------------------------------------------------------------------------ DICOM
#: a gap this many times the usual slice step means slices are missing
MISSING_SLICE_GAP = 1.5
#: slice gaps that differ by more than this share of the median gap make an irregular series
#: (scanners jitter by far less than 1 %; a tilted or variable-thickness series by far more)
IRREGULAR_SLICES = 0.05


def check_series(folder: Path, uid: str, listed: set[str], reader, image) -> None:
    """Refuse a DICOM series with a slice file GDCM could not read (GDCM leaves such a file
    out of the series without a word) or with missing slices (a gap in the slice positions)."""
    needle = uid.encode("ascii", "ignore")
    listed_paths = {os.path.abspath(f) for f in listed}
    for f in sorted(folder.iterdir()):
        if not f.is_file() or os.path.abspath(f) in listed_paths:
            continue
        with open(f, "rb") as fh:
            head = fh.read(1 << 16)
        if needle and needle in head:
            raise InputError(f"slice file {f.name} of the DICOM series is truncated or unreadable", str(folder))
    modality = reader.GetMetaData(0, "0008|0060").strip().upper() if reader.HasMetaDataKey(0, "0008|0060") else ""
    if modality and modality != "CT":
        raise InputError(f"DICOM series modality is {modality}, not CT; LesionSeg segments CT", str(folder))
    n = image.GetSize()[2]
    try:
        positions = np.array([[float(v) for v in reader.GetMetaData(k, "0020|0032").split("\\")] for k in range(n)])
    except (RuntimeError, ValueError, IndexError):
        return  # no ImagePositionPatient: nothing to compare
    if n < 3 or positions.shape != (n, 3):
        return
    normal = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)[:, 2]
    _check_tilt(positions, normal, min(image.GetSpacing()[:2]), folder)
    steps = np.abs(np.diff(positions @ normal))
    usual = float(np.median(steps))
    k = int(np.argmax(steps))
    if usual > 0 and steps[k] > MISSING_SLICE_GAP * usual:
        raise InputError(
            f"DICOM series has missing slices: {float(steps[k]):g} mm between slices {k + 1} and {k + 2}, "
            f"where the others are {usual:g} mm apart",
            str(folder),
        )
    if usual > 0 and float(steps.max() - steps.min()) > IRREGULAR_SLICES * usual:
        # ITK would put every slice on one spacing: lesions placed and measured wrongly
        raise InputError(
            f"DICOM series slice spacing varies from {float(steps.min()):.3g} to {float(steps.max()):.3g} mm (median "
            f"{usual:.3g} mm): it is not on a regular grid; resample it to even slices first (e.g. Slicer's DICOM "
            "acquisition-geometry regularization)",
            str(folder),
        )


def _check_tilt(positions: np.ndarray, normal: np.ndarray, in_plane_mm: float, folder: Path) -> None:
    """Refuse a series whose slices step off their own normal (a gantry tilt, or a sheared stack):
    ITK stacks the slices along the normal, so every lesion would be placed up to the stack's
    sideways drift away from where it is, and measured on a wrong slice spacing."""
    stack = positions[-1] - positions[0]
    along = float(stack @ normal)
    drift = float(np.linalg.norm(stack - along * normal))
    if drift > 0.5 * in_plane_mm:
        degrees = float(np.degrees(np.arctan2(drift, abs(along))))
        raise InputError(
            f"DICOM series is gantry-tilted or sheared: its slices step {degrees:.1f} degrees off their normal "
            f"({drift:.1f} mm sideways over the stack), which a regular voxel grid cannot hold; resample it first "
            "(e.g. Slicer's DICOM acquisition-geometry regularization)",
            str(folder),
        )

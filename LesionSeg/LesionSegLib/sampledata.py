"""The bundled sample CT (``sample/STS_041``, CC BY 3.0, see ``sample/ATTRIBUTION.md``) and its
registration in Slicer's Sample Data module.

The same file serves ``lesionseg segment --sample`` (``engine.data.sample_image``) and Slicer:
:func:`register` adds it to the Sample Data module under "LesionSeg", as a ``file://`` URI with
its sha256, which Sample Data verifies when it copies the file into its cache.  No Qt here.
"""
from __future__ import annotations

import hashlib
import logging
from pathlib import Path

from .engine.data import SAMPLE_IMAGE, SAMPLE_NAME  # noqa: F401 (re-exported)

log = logging.getLogger("LesionSeg")

#: sha256 of ``SAMPLE_IMAGE`` (Sample Data refuses a file whose checksum differs)
SAMPLE_SHA256 = "a9ee19653594aeb029e30d90f2e752b5e2cfb5f117ac5bf0073876381529aa8c"
THUMBNAIL = Path(__file__).resolve().parents[1] / "Resources" / "Icons" / "LesionSegSample.png"
CATEGORY = "LesionSeg"
SAMPLE_TITLE = "LesionSeg sarcoma CT"


def sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def register(*args) -> bool:
    """Add the sample to Slicer's Sample Data module (called at ``startupCompleted``); False without it."""
    try:
        import SampleData
    except ImportError:
        return False
    SampleData.SampleDataLogic.registerCustomSampleDataSource(
        category=CATEGORY,
        sampleName=SAMPLE_TITLE,
        uris=SAMPLE_IMAGE.as_uri(),
        fileNames=f"LesionSeg_{SAMPLE_NAME}.nii.gz",
        nodeNames=f"LesionSeg_{SAMPLE_NAME}",
        thumbnailFileName=str(THUMBNAIL),
        loadFileType="VolumeFile",
        checksums=f"SHA256:{SAMPLE_SHA256}",
    )
    return True

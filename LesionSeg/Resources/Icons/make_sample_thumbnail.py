"""Draw the Sample Data thumbnail of the bundled sample CT: its middle axial slice at window
400 / level 40, 128x128 PNG.

    python LesionSeg/Resources/Icons/make_sample_thumbnail.py

writes ``LesionSeg/Resources/Icons/LesionSegSample.png``.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
from PySide6.QtCore import Qt  # noqa: E402
from PySide6.QtGui import QGuiApplication, QImage  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))
from LesionSegLib.engine.data import SAMPLE_IMAGE  # noqa: E402


def main() -> None:
    QGuiApplication.instance() or QGuiApplication([])
    arr = sitk.GetArrayFromImage(sitk.ReadImage(str(SAMPLE_IMAGE)))
    sl = arr[arr.shape[0] // 2].astype(np.float32)
    grey = np.clip((sl - (40 - 200)) / 400.0 * 255.0, 0, 255).astype(np.uint8)
    grey = np.ascontiguousarray(grey)  # row 0 is the anterior edge (LPS y grows posteriorly), as Slicer shows it
    img = QImage(grey.data, grey.shape[1], grey.shape[0], grey.strides[0], QImage.Format_Grayscale8)
    img.scaled(128, 128, Qt.KeepAspectRatio, Qt.SmoothTransformation).save(str(HERE / "LesionSegSample.png"))


if __name__ == "__main__":
    main()

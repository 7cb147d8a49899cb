"""Draw the LesionSeg icon (128x128 PNG) with Qt: a CT slice with three lesions coloured on the
confidence colormap, one of them ringed in the 'accepted' green.

    QT_QPA_PLATFORM=offscreen python LesionSeg/Resources/Icons/make_icon.py

writes ``LesionSeg/Resources/Icons/LesionSeg.png`` (module) and ``Resources/Icons/LesionSeg.png``
(extension).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
from PySide6.QtCore import QPointF, QRectF, Qt  # noqa: E402
from PySide6.QtGui import QColor, QGuiApplication, QImage, QPainter, QPen, QRadialGradient  # noqa: E402

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]
sys.path.insert(0, str(REPO / "LesionSeg"))
from LesionSegLib.engine.segment.colors import ACCEPTED_COLOR, confidence_color  # noqa: E402


def qcolor(rgb, alpha=255):
    return QColor(*[int(round(255 * c)) for c in rgb], alpha)


def draw(size: int = 128) -> QImage:
    img = QImage(size, size, QImage.Format_ARGB32)
    img.fill(Qt.transparent)
    p = QPainter(img)
    p.setRenderHint(QPainter.Antialiasing)
    s = size / 128.0
    # rounded dark tile
    p.setPen(Qt.NoPen)
    p.setBrush(QColor(28, 32, 44))
    p.drawRoundedRect(QRectF(2 * s, 2 * s, 124 * s, 124 * s), 22 * s, 22 * s)
    # body cross-section: soft grey ellipse with a darker "lung" pair
    grad = QRadialGradient(QPointF(64 * s, 66 * s), 54 * s)
    grad.setColorAt(0.0, QColor(196, 196, 196))
    grad.setColorAt(1.0, QColor(120, 120, 126))
    p.setBrush(grad)
    p.drawEllipse(QRectF(12 * s, 22 * s, 104 * s, 86 * s))
    p.setBrush(QColor(52, 56, 66))
    p.drawEllipse(QRectF(24 * s, 36 * s, 34 * s, 52 * s))
    p.drawEllipse(QRectF(70 * s, 36 * s, 34 * s, 52 * s))
    # lesions coloured by confidence
    for (x, y, r), conf in (((42, 52, 9), 0.95), ((86, 70, 7), 0.55), ((58, 92, 5), 0.15)):
        p.setBrush(qcolor(confidence_color(conf)))
        p.drawEllipse(QPointF(x * s, y * s), r * s, r * s)
    # the accepted one, ringed in green
    pen = QPen(qcolor(ACCEPTED_COLOR), 3.5 * s)
    p.setPen(pen)
    p.setBrush(Qt.NoBrush)
    p.drawEllipse(QPointF(42 * s, 52 * s), 14 * s, 14 * s)
    p.end()
    return img


def main() -> None:
    _app = QGuiApplication.instance() or QGuiApplication(sys.argv[:1])
    img = draw(128)
    for out in (HERE / "LesionSeg.png", REPO / "Resources" / "Icons" / "LesionSeg.png"):
        out.parent.mkdir(parents=True, exist_ok=True)
        if not img.save(str(out)):
            raise SystemExit(f"cannot write {out}")
        print(out)


if __name__ == "__main__":
    main()

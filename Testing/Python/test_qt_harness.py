"""The Qt binding under the widget tests keeps Python's reference counts right.

PySide6 6.12.0 releases a reference to ``None`` on every call that returns nothing
(``QLabel.setText``, ``QPushButton.setEnabled``, ...).  A few thousand such calls, which the panel
tests make, then crash the interpreter as it exits ("Fatal Python error: none_dealloc"), after
every test passed; ``Testing/requirements-test.txt`` keeps PySide6 below 6.12 for that.  This test
fails at once, with the reason, if a binding with that defect is installed.
"""
from __future__ import annotations

import gc
import os
import sys


def test_void_qt_calls_keep_none_alive():
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    import PySide6
    from PySide6.QtWidgets import QApplication, QLabel

    app = QApplication.instance() or QApplication([])
    label = QLabel()
    gc.collect()
    before = sys.getrefcount(None)
    for _ in range(2000):
        label.setText("x")
    gc.collect()
    lost = before - sys.getrefcount(None)
    assert lost < 100, (f"PySide6 {PySide6.__version__} dropped {lost} references to None in 2000 setText calls: the "
                        "test run would abort at exit; install PySide6-Essentials<6.12 (Testing/requirements-test.txt)")
    assert app is not None

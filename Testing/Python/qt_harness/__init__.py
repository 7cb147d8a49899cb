"""Offscreen compatibility harness: run a Slicer scripted module's widget under PySide6.

Slicer runs module widgets with PythonQt and its own ``qt``, ``ctk`` and ``slicer.qMRML*``
modules.  :func:`install` provides thin stand-ins so that the *unmodified* module file
(``LesionSeg/LesionSeg.py``) runs in CI:

* ``qt``: PySide6's QtCore/QtGui/QtWidgets namespace plus a ``QUiLoader`` that knows the custom
  widgets and gives named children PythonQt's ``.name`` (so the real
  ``slicer.util.loadUI`` and ``slicer.util.childWidgetVariables`` work unchanged);
* ``ctk``: ctkCollapsibleButton, ctkSliderWidget, ctkDirectoryButton;
* ``slicer.qMRMLWidget``, ``slicer.qMRMLNodeComboBox``, ``slicer.qMRMLTableView``;
* ``slicer.ScriptedLoadableModule``: the four base classes;
* ``slicer.parameterNodeWrapper`` (typed parameter nodes bound to the GUI) and ``slicer.i18n``
  (``tr``/``translate``), which the ``slicer-core`` wheel does not ship.

The MRML side is real (``slicer-core``); call it after the application shim
(``slicer_app_shim.get_app()``) set ``slicer.mrmlScene`` and ``slicer.app``.
"""
from __future__ import annotations

import os
import sys

_INSTALLED = False


def install():
    """Create the offscreen QApplication and register the stand-in modules; returns the app."""
    global _INSTALLED
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    from PySide6.QtWidgets import QApplication

    app = QApplication.instance() or QApplication(["LesionSegTest", "-platform", os.environ["QT_QPA_PLATFORM"]])
    if _INSTALLED:
        return app
    import slicer

    from . import ScriptedLoadableModule, ctk, custom_widgets, i18n, parameterNodeWrapper, qt

    sys.modules["qt"] = qt
    sys.modules["ctk"] = ctk
    for name, module in (("ScriptedLoadableModule", ScriptedLoadableModule), ("parameterNodeWrapper", parameterNodeWrapper),
                         ("i18n", i18n)):
        sys.modules[f"slicer.{name}"] = module
        setattr(slicer, name, module)
    for cls in custom_widgets.CUSTOM_WIDGETS:
        if cls.__name__.startswith("qMRML"):
            setattr(slicer, cls.__name__, cls)
    _INSTALLED = True
    return app


def wait_until(predicate, timeout: float = 120.0, interval_ms: int = 50) -> bool:
    """Process Qt events until ``predicate()`` is true or ``timeout`` seconds passed."""
    import time

    from PySide6.QtCore import QCoreApplication, QEventLoop, QThread

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        QCoreApplication.processEvents(QEventLoop.AllEvents, interval_ms)
        if predicate():
            return True
        QThread.msleep(interval_ms)
    QCoreApplication.processEvents()
    return bool(predicate())

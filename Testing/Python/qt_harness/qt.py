"""``qt`` as PythonQt exposes it in Slicer, over PySide6 (QtCore, QtGui, QtWidgets, QtUiTools).

Only :class:`QUiLoader` differs from PySide6: it knows the harness' Slicer/CTK widgets and, like
PythonQt, makes each named child reachable as ``widget.name`` (what
``slicer.util.childWidgetVariables`` reads).
"""
from PySide6.QtCore import *  # noqa: F401,F403
from PySide6.QtGui import *  # noqa: F401,F403
from PySide6.QtWidgets import *  # noqa: F401,F403
from PySide6.QtCore import QObject
from PySide6.QtUiTools import QUiLoader as _PySideUiLoader


class QUiLoader(_PySideUiLoader):
    def __init__(self, parent=None):
        super().__init__(parent)
        from . import custom_widgets

        for cls in custom_widgets.CUSTOM_WIDGETS:
            self.registerCustomWidget(cls)

    def load(self, device, parentWidget=None):
        widget = super().load(device, parentWidget)
        if widget is None:
            return None
        keep = [widget]
        for child in widget.findChildren(QObject):
            if child.objectName():
                child.name = child.objectName()  # PythonQt: objectName is the `name` attribute
                keep.append(child)
        widget.name = widget.objectName()
        widget._harness_children = keep  # keep the Python wrappers (and their `name`) alive
        return widget

"""Stand-ins for the Slicer (qMRML*) and CTK widgets a module's .ui uses, over PySide6.

Each implements the API LesionSeg uses, with the same names as the real widget: properties
settable from the .ui, the signals, and PythonQt's string connections
(``widget.connect("currentNodeChanged(vtkMRMLNode*)", slot)``).
"""
from __future__ import annotations

import vtk
from PySide6.QtCore import Property, QObject, QSortFilterProxyModel, Qt, Signal
from PySide6.QtGui import QStandardItem, QStandardItemModel
from PySide6.QtWidgets import (
    QComboBox, QDoubleSpinBox, QFileDialog, QGroupBox, QHBoxLayout, QPushButton, QSlider, QTableView, QWidget,
)


def _string_connect(self, signature, slot=None, *args):
    """PythonQt's ``obj.connect("signal(args)", slot)`` (assigned in each class body: Shiboken
    does not look ``connect`` up through a Python mixin)."""
    if isinstance(signature, str) and slot is not None:
        return getattr(self, signature.split("(")[0]).connect(slot)
    return QObject.connect(self, signature, slot, *args)


class qMRMLWidget(QWidget):
    connect = _string_connect
    mrmlSceneChanged = Signal(object)

    def __init__(self, parent=None):
        super().__init__(parent)
        self._scene = None

    def setMRMLScene(self, scene):
        self._scene = scene
        self.mrmlSceneChanged.emit(scene)

    def mrmlScene(self):
        return self._scene


class qMRMLNodeComboBox(QWidget):
    """Lists the scene's nodes of ``nodeTypes``; follows node additions and removals."""
    connect = _string_connect

    currentNodeChanged = Signal(object)
    currentNodeIDChanged = Signal(str)

    def __init__(self, parent=None):
        super().__init__(parent)
        self._combo = QComboBox(self)
        layout = QHBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self._combo)
        self._types: list[str] = []
        self._none = True
        self._children = False
        self._scene = None
        self._tags: list[int] = []
        self._current = None
        self._attributes: list[tuple[str, str, str]] = []
        self._combo.currentIndexChanged.connect(self._onIndexChanged)

    def addAttribute(self, nodeType, attributeName, attributeValue=""):
        """Only list nodes of ``nodeType`` whose attribute ``attributeName`` is ``attributeValue``."""
        self._attributes.append((str(nodeType), str(attributeName), str(attributeValue)))
        self._refresh()

    def _get_types(self):
        return list(self._types)

    def _set_types(self, types):
        self._types = [str(t) for t in types]
        self._refresh()

    nodeTypes = Property("QStringList", _get_types, _set_types)

    def _get_none(self):
        return self._none

    def _set_none(self, value):
        self._none = bool(value)
        self._refresh()

    noneEnabled = Property(bool, _get_none, _set_none)

    def _get_children(self):
        return self._children

    def _set_children(self, value):
        self._children = bool(value)
        self._refresh()

    showChildNodeTypes = Property(bool, _get_children, _set_children)
    # accepted from .ui files, no behaviour in the harness
    addEnabled = Property(bool, lambda self: False, lambda self, v: None)
    removeEnabled = Property(bool, lambda self: False, lambda self, v: None)

    def setMRMLScene(self, scene):
        if self._scene is not None:
            for tag in self._tags:
                self._scene.RemoveObserver(tag)
        self._tags = []
        self._scene = scene
        if scene is not None:
            for event in (scene.NodeAddedEvent, scene.NodeRemovedEvent, scene.EndCloseEvent, scene.EndImportEvent):
                self._tags.append(scene.AddObserver(event, lambda *a: self._on_scene_changed()))
        self._refresh()

    def _on_scene_changed(self):
        # the scene outlives widgets: once Qt deleted this widget, stop observing
        try:
            self._refresh()
        except RuntimeError:  # "Internal C++ object ... already deleted"
            scene, self._scene = self._scene, None
            for tag in self._tags:
                scene.RemoveObserver(tag)
            self._tags = []

    def mrmlScene(self):
        return self._scene

    def _nodes(self):
        if self._scene is None:
            return []
        out = []
        for cls in self._types:
            for i in range(self._scene.GetNumberOfNodesByClass(cls)):
                node = self._scene.GetNthNodeByClass(i, cls)
                if (self._children or node.GetClassName() == cls) and not node.GetHideFromEditors() and self._attributesMatch(node):
                    out.append(node)
        return out

    def _attributesMatch(self, node) -> bool:
        return all(node.GetAttribute(name) == value for cls, name, value in self._attributes if node.IsA(cls))

    def _refresh(self):
        current_id = self._current
        self._combo.blockSignals(True)
        self._combo.clear()
        if self._none:
            self._combo.addItem("None", None)
        for node in self._nodes():
            self._combo.addItem(node.GetName(), node.GetID())
        index = self._combo.findData(current_id) if current_id else -1
        if index < 0:
            index = 0 if self._combo.count() else -1
        self._combo.setCurrentIndex(index)
        self._combo.blockSignals(False)
        self._onIndexChanged(index)

    def _onIndexChanged(self, index):
        node_id = self._combo.itemData(index) if index is not None and index >= 0 else None
        if node_id != self._current:
            self._current = node_id
            self.currentNodeIDChanged.emit(node_id or "")
            self.currentNodeChanged.emit(self.currentNode())

    def currentNode(self):
        if self._scene is None or not self._current:
            return None
        return self._scene.GetNodeByID(self._current)

    def currentNodeID(self):
        return self._current or ""

    def setCurrentNode(self, node):
        self.setCurrentNodeID(node.GetID() if node is not None else "")

    def setCurrentNodeID(self, node_id):
        index = self._combo.findData(node_id) if node_id else (0 if self._none else -1)
        if index >= 0:
            self._combo.setCurrentIndex(index)

    def nodeCount(self):
        return len(self._nodes())


class qMRMLTableView(QTableView):
    """Shows a vtkMRMLTableNode (read-only), sortable through a QSortFilterProxyModel."""
    connect = _string_connect

    def __init__(self, parent=None):
        super().__init__(parent)
        self._source = QStandardItemModel(self)
        self._proxy = QSortFilterProxyModel(self)
        self._proxy.setSourceModel(self._source)
        self.setModel(self._proxy)
        self._node = None
        self._tag = None

    def tableModel(self):
        return self._source

    def sortFilterProxyModel(self):
        return self._proxy

    def mrmlTableNode(self):
        return self._node

    def setMRMLTableNode(self, node):
        if self._node is not None and self._tag is not None:
            self._node.RemoveObserver(self._tag)
        self._node, self._tag = node, None
        if node is not None:
            self._tag = node.AddObserver(vtk.vtkCommand.ModifiedEvent, lambda *a: self._updateFromMRML())
        self._updateFromMRML()

    def _updateFromMRML(self):
        self._source.clear()
        if self._node is None:
            return
        table = self._node.GetTable()
        names = [table.GetColumn(c).GetName() for c in range(table.GetNumberOfColumns())]
        self._source.setHorizontalHeaderLabels(names)
        for r in range(table.GetNumberOfRows()):
            items = []
            for c in range(table.GetNumberOfColumns()):
                value = table.GetColumn(c).GetValue(r)
                item = QStandardItem()
                item.setData(value if isinstance(value, (int, float)) else str(value), Qt.DisplayRole)
                item.setEditable(False)
                items.append(item)
            self._source.appendRow(items)
        self.resizeColumnsToContents()


class ctkCollapsibleButton(QGroupBox):
    """A titled container (the real one can collapse; ``collapsed`` hides the contents)."""
    connect = _string_connect

    def _get_text(self):
        return self.title()

    def _set_text(self, text):
        self.setTitle(text)

    text = Property(str, _get_text, _set_text)

    def _get_collapsed(self):
        return getattr(self, "_collapsed", False)

    def _set_collapsed(self, value):
        self._collapsed = bool(value)
        for child in self.findChildren(QWidget):
            if child.parent() is self:
                child.setVisible(not self._collapsed)

    collapsed = Property(bool, _get_collapsed, _set_collapsed)


class ctkSliderWidget(QWidget):
    """Slider + spin box over a double value."""
    connect = _string_connect

    valueChanged = Signal(float)
    _STEPS = 1000

    def __init__(self, parent=None):
        super().__init__(parent)
        self._slider = QSlider(Qt.Horizontal, self)
        self._slider.setRange(0, self._STEPS)
        self._spin = QDoubleSpinBox(self)
        self._page = 0.1
        layout = QHBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self._slider, 1)
        layout.addWidget(self._spin)
        self._spin.valueChanged.connect(self._onSpin)
        self._slider.valueChanged.connect(self._onSlider)

    def _syncSlider(self):
        lo, hi = self._spin.minimum(), self._spin.maximum()
        pos = int(round((self._spin.value() - lo) / (hi - lo) * self._STEPS)) if hi > lo else 0
        self._slider.blockSignals(True)
        self._slider.setValue(pos)
        self._slider.blockSignals(False)

    def _onSpin(self, v):
        self._syncSlider()
        self.valueChanged.emit(float(v))

    def _onSlider(self, pos):
        lo, hi = self._spin.minimum(), self._spin.maximum()
        self._spin.setValue(lo + (hi - lo) * pos / self._STEPS)

    def setValue(self, v):
        self._spin.setValue(float(v))

    def setMinimum(self, v):
        self._spin.setMinimum(float(v))
        self._syncSlider()

    def setMaximum(self, v):
        self._spin.setMaximum(float(v))
        self._syncSlider()

    def setSingleStep(self, v):
        self._spin.setSingleStep(float(v))

    def setPageStep(self, v):
        self._page = float(v)

    def setDecimals(self, v):
        self._spin.setDecimals(int(v))

    value = Property(float, lambda self: self._spin.value(), setValue, notify=valueChanged)
    minimum = Property(float, lambda self: self._spin.minimum(), setMinimum)
    maximum = Property(float, lambda self: self._spin.maximum(), setMaximum)
    singleStep = Property(float, lambda self: self._spin.singleStep(), setSingleStep)
    pageStep = Property(float, lambda self: self._page, setPageStep)
    decimals = Property(int, lambda self: self._spin.decimals(), setDecimals)


class ctkDirectoryButton(QPushButton):
    connect = _string_connect
    directoryChanged = Signal(str)

    def __init__(self, parent=None):
        super().__init__(parent)
        self._directory = ""
        self.clicked.connect(self._browse)

    def _get_directory(self):
        return self._directory

    def _set_directory(self, path):
        path = str(path)
        if path != self._directory:
            self._directory = path
            self.setText(path)
            self.directoryChanged.emit(path)

    directory = Property(str, _get_directory, _set_directory)

    def _browse(self):
        path = QFileDialog.getExistingDirectory(self, "Choose a folder", self._directory)
        if path:
            self._set_directory(path)


CUSTOM_WIDGETS = (qMRMLWidget, qMRMLNodeComboBox, qMRMLTableView, ctkCollapsibleButton, ctkSliderWidget, ctkDirectoryButton)

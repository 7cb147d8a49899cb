"""Stand-in for ``slicer.parameterNodeWrapper`` (Slicer >= 5.2), which ``slicer-core`` lacks.

It offers the part of the real API that LesionSeg uses, with the same names and behaviour:

* ``@parameterNodeWrapper`` on a class of annotated fields (``float``, ``int``, ``str``, ``bool``,
  ``pathlib.Path``, MRML node classes, ``Annotated[..., WithinRange(lo, hi)]``,
  ``Annotated[..., Choice([...])]``); the class is then built around a ``vtkMRMLScriptedModuleNode``
  (``Wrapper(node)``), its fields are properties stored in that node (nodes as node references,
  so they survive scene save/load), and a value outside its validator raises ``ValueError``;
* ``connectGui(ui)`` binds every widget with a ``SlicerParameterName`` property (set in the .ui) to
  its field in both directions and returns a tag for ``disconnectGui(tag)``;
* ``AddObserver``/``RemoveObserver``/``Modified``/``StartModify``/``EndModify`` pass through to the
  node, ``parameterNode`` is the node, ``getValue``/``setValue`` by name.

Written for this harness from the documented behaviour; the serialisation format is its own.
"""
from __future__ import annotations

import pathlib
import typing

import vtk

SlicerParameterNamePropertyName = "SlicerParameterName"


class WithinRange:
    def __init__(self, minimum, maximum):
        self.minimum, self.maximum = minimum, maximum

    def validate(self, value):
        if not (self.minimum <= value <= self.maximum):
            raise ValueError(f"value {value} is not within [{self.minimum}, {self.maximum}]")


class Choice:
    def __init__(self, choices):
        self.choices = list(choices)

    def validate(self, value):
        if value not in self.choices:
            raise ValueError(f"value {value!r} is not one of {self.choices}")


def _is_node_type(t) -> bool:
    return isinstance(t, type) and hasattr(t, "GetClassName") and t.__name__.startswith("vtkMRML")


class _Field:
    def __init__(self, name, hint, default):
        if typing.get_origin(hint) is typing.Annotated:
            self.type, *self.annotations = typing.get_args(hint)
        else:
            self.type, self.annotations = hint, []
        self.name = name
        self.is_node = _is_node_type(self.type)
        if default is _NO_DEFAULT:
            default = {float: 0.0, int: 0, str: "", bool: False}.get(self.type)
            if self.type is pathlib.Path:
                default = pathlib.Path()
        self.default = default

    def validate(self, value):
        if self.is_node:
            if value is not None and not isinstance(value, self.type):
                raise ValueError(f"{self.name}: {value.GetClassName()} is not a {self.type.__name__}")
            return
        for a in self.annotations:
            if hasattr(a, "validate"):
                a.validate(value)

    def write(self, node, value):
        self.validate(value)
        if self.is_node:
            node.SetNodeReferenceID(self.name, value.GetID() if value is not None else None)
        elif self.type is bool:
            node.SetParameter(self.name, "true" if value else "false")
        else:
            node.SetParameter(self.name, repr(float(value)) if self.type is float else str(value))

    def is_in(self, node) -> bool:
        return bool(node.GetNodeReferenceID(self.name)) if self.is_node else node.GetParameterNames().count(self.name) > 0

    def read(self, node):
        if self.is_node:
            return node.GetNodeReference(self.name)
        raw = node.GetParameter(self.name)
        if self.type is bool:
            return raw == "true"
        if self.type in (float, int):
            return self.type(float(raw)) if self.type is int else float(raw)
        if self.type is pathlib.Path:
            return pathlib.Path(raw)
        return raw


_NO_DEFAULT = object()


# --------------------------------------------------------------------------- GUI binding
def _binding(widget, field: _Field):
    """(read(), write(value), signal) for one widget of the harness."""
    kind = type(widget).__name__
    if field.is_node and kind == "qMRMLNodeComboBox":
        return widget.currentNode, widget.setCurrentNode, widget.currentNodeChanged
    if kind == "ctkSliderWidget" or kind == "QDoubleSpinBox":
        for a in field.annotations:
            if isinstance(a, WithinRange):
                widget.setMinimum(a.minimum)
                widget.setMaximum(a.maximum)
        return (lambda: float(widget.property("value"))), widget.setValue, widget.valueChanged
    if kind == "QSpinBox":
        return widget.value, widget.setValue, widget.valueChanged
    if kind == "QCheckBox":
        return widget.isChecked, widget.setChecked, widget.toggled
    if kind == "QLineEdit":
        return widget.text, widget.setText, widget.textChanged
    if kind == "QComboBox":
        choice = next((a for a in field.annotations if isinstance(a, Choice)), None)
        if choice is None:
            raise RuntimeError(f"{field.name}: a QComboBox needs the Choice annotation")
        widget.clear()
        for c in choice.choices:
            widget.addItem(str(c))
        return (lambda: choice.choices[widget.currentIndex()]), (lambda v: widget.setCurrentIndex(choice.choices.index(v))), widget.currentIndexChanged
    if kind == "ctkDirectoryButton":
        return (lambda: pathlib.Path(widget.property("directory"))), (lambda v: widget.setProperty("directory", str(v))), widget.directoryChanged
    raise RuntimeError(f"no GUI connector for {kind} and {field.type}")


def _connect_gui(self, gui):
    if hasattr(gui, "findChildren"):
        from PySide6.QtCore import QObject

        widgets = gui.findChildren(QObject)
    else:  # the namespace of slicer.util.childWidgetVariables
        widgets = list(vars(gui).values())
    pairs = []
    for widget in widgets:
        try:
            name = widget.property(SlicerParameterNamePropertyName)
        except (AttributeError, TypeError):
            continue
        if name:
            if name not in self.allParameters:
                raise ValueError(f"Cannot find a param with the given name: {name}")
            pairs.append((name, widget))
    bindings = []
    for name, widget in pairs:
        read, write, signal = _binding(widget, self.allParameters[name])
        write(self.getValue(name))

        def to_param(*args, name=name, read=read):
            if not self._updating_gui:
                self.setValue(name, read())

        signal.connect(to_param)
        bindings.append((name, write, signal, to_param))

    def to_gui(caller=None, event=None):
        if self._updating_gui:
            return
        self._updating_gui = True
        try:
            for name, write, _, _ in bindings:
                write(self.getValue(name))
        finally:
            self._updating_gui = False

    tag = self._next_tag
    self._next_tag += 1
    self._guis[tag] = (bindings, self.parameterNode.AddObserver(vtk.vtkCommand.ModifiedEvent, to_gui))
    return tag


def _disconnect_gui(self, tag):
    bindings, observer = self._guis.pop(tag, ([], None))
    for _, _, signal, slot in bindings:
        try:
            signal.disconnect(slot)
        except (RuntimeError, TypeError):
            pass
    if observer is not None:
        self.parameterNode.RemoveObserver(observer)


def parameterNodeWrapper(classtype=None):
    def wrap(cls):
        hints = typing.get_type_hints(cls, include_extras=True)
        fields = {name: _Field(name, hint, getattr(cls, name, _NO_DEFAULT)) for name, hint in hints.items()}

        def init(self, parameterNode):
            self.parameterNode = parameterNode
            self._guis = {}
            self._next_tag = 0
            self._updating_gui = False
            for f in fields.values():
                if not f.is_in(parameterNode) and not f.is_node:
                    f.write(parameterNode, f.default)

        for name in fields:
            setattr(cls, name, property(lambda self, n=name: self.getValue(n), lambda self, v, n=name: self.setValue(n, v)))
        cls.allParameters = fields
        cls.__init__ = init
        cls.getValue = lambda self, name: fields[name].read(self.parameterNode)
        cls.setValue = lambda self, name, value: fields[name].write(self.parameterNode, value)
        cls.default = lambda self, name: fields[name].default
        cls.dataType = staticmethod(lambda name: fields[name].type)
        cls.connectGui = _connect_gui
        cls.disconnectGui = _disconnect_gui
        cls.StartModify = lambda self: self.parameterNode.StartModify()
        cls.EndModify = lambda self, was: self.parameterNode.EndModify(was)
        cls.AddObserver = lambda self, event, callback, priority=0.0: self.parameterNode.AddObserver(event, callback, priority)
        cls.RemoveObserver = lambda self, tag: self.parameterNode.RemoveObserver(tag)
        cls.Modified = lambda self: self.parameterNode.Modified()
        cls._is_parameter_node_wrapper = True
        return cls

    return wrap if classtype is None else wrap(classtype)


def isParameterNodeWrapper(obj) -> bool:
    return getattr(obj, "_is_parameter_node_wrapper", False)

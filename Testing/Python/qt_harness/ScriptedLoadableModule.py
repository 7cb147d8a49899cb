"""Stand-in for ``slicer.ScriptedLoadableModule``: the four base classes, as Slicer defines them
(same constructor logic, ``resourcePath``, ``setup``/``enter``/``exit``/``cleanup`` hooks), minus
the developer-mode "Reload and Test" panel."""
from __future__ import annotations

import logging
import os
import sys
import unittest

import slicer


def _module_dir(obj) -> str:
    return os.path.dirname(os.path.abspath(sys.modules[type(obj).__module__].__file__))


class ScriptedLoadableModule:
    def __init__(self, parent):
        self.parent = parent
        self.moduleName = self.__class__.__name__
        parent.title = ""
        parent.categories = []
        parent.dependencies = []
        parent.contributors = []
        parent.helpText = ""
        parent.acknowledgementText = ""
        self.path = sys.modules[type(self).__module__].__file__

    def resourcePath(self, filename):
        return os.path.join(_module_dir(self), "Resources", filename)


class ScriptedLoadableModuleWidget:
    def __init__(self, parent=None):
        import qt

        self.moduleName = self.__class__.__name__
        if self.moduleName.endswith("Widget"):
            self.moduleName = self.moduleName[: -len("Widget")]
        self.developerMode = False
        if not parent:
            self.parent = slicer.qMRMLWidget()
            self.parent.setLayout(qt.QVBoxLayout())
            self.parent.setMRMLScene(slicer.mrmlScene)
        else:
            self.parent = parent
        self.layout = self.parent.layout()
        if not parent:
            self.setup()
            self.parent.show()

    def resourcePath(self, filename):
        return os.path.join(_module_dir(self), "Resources", filename)

    def setup(self):
        pass

    def enter(self):
        pass

    def exit(self):
        pass

    def cleanup(self):
        pass

    def onReload(self):
        """Slicer re-imports the module file and rebuilds the widget; the harness counts the calls."""
        self.reloadCount = getattr(self, "reloadCount", 0) + 1


class ScriptedLoadableModuleLogic:
    def __init__(self, parent=None):
        self.parent = parent
        self.moduleName = self.__class__.__name__
        if self.moduleName.endswith("Logic"):
            self.moduleName = self.moduleName[: -len("Logic")]

    def getParameterNode(self):
        node = slicer.mrmlScene.GetSingletonNode(self.moduleName, "vtkMRMLScriptedModuleNode")
        if node is None:
            node = slicer.mrmlScene.CreateNodeByClass("vtkMRMLScriptedModuleNode")
            node.UnRegister(None)
            node.SetSingletonTag(self.moduleName)
            node.SetName(slicer.mrmlScene.GenerateUniqueName(self.moduleName))
            node.SetAttribute("ModuleName", self.moduleName)
            node = slicer.mrmlScene.AddNode(node)
        return node


class ScriptedLoadableModuleTest(unittest.TestCase):
    def delayDisplay(self, message, requestedDelay=None, msec=None):
        logging.info(message)

    def takeScreenshot(self, name, description, type=-1):
        logging.info("screenshot %s: %s", name, description)

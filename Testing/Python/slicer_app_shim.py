"""A headless Slicer application on the PyPI ``slicer-core`` wheel, for tests.

``slicer-core`` ships the real MRML scene, nodes, storage nodes, module logics and the
unmodified ``slicer.util``, but no ``slicer.app``, no ``slicer.modules`` and nothing that wires
them together.  :class:`SlicerAppShim` does the wiring that Slicer's application does at start-up
(the same steps as trame-slicer's ``SlicerApp``): a scene with a crosshair and the default slice
views, the application logic, the colours, volumes and segmentations module logics, then sets
``slicer.mrmlScene``, ``slicer.app`` (a minimal stand-in: testing mode on, so message boxes
return at once; in-memory user settings; no extensions manager unless a test sets a fake) and
``slicer.modules.<name>.logic()`` (volumes, terminologies with Slicer's terminology files,
segmentations, subject hierarchy, tables).

Fixtures: ``slicer_app`` (one per test session; the scene is cleared for each test with
``mrml_scene``), ``data_dir`` (skips with a reason when the data folder is absent) and ``default_model``.
"""
from __future__ import annotations

import os
import sys
import types
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
MODULE_DIR = REPO / "LesionSeg"


def data_root() -> Path:
    return Path(os.environ.get("LESIONSEG_DATA", REPO.parent / "shared" / "data")).resolve()


class _ModuleStub:
    """``slicer.modules.<name>``: ``logic()`` returns the wired module logic."""

    def __init__(self, name: str, logic):
        self.name = name
        self._logic = logic

    def logic(self):
        return self._logic


class _AppStub:
    """The few ``slicer.app`` members that ``slicer.util`` and the module use headless."""

    applicationName = "Slicer (LesionSeg test shim)"
    #: Slicer.ini of a real application; None here (tests set it to exercise the in-Slicer paths)
    slicerUserSettingsFilePath = None

    def __init__(self):
        from LesionSegLib.settings import _MemorySettings

        self.settings = _MemorySettings()
        #: ``slicer.app.extensionsManagerModel()``: None (no extensions manager) unless a test sets a fake
        self.extensionsManager = None

    def userSettings(self):
        return self.settings

    def extensionsManagerModel(self):
        return self.extensionsManager

    def testingEnabled(self) -> bool:
        return True

    def commandOptions(self):
        return types.SimpleNamespace(testingEnabled=True, noMainWindow=True)

    def processEvents(self, *args) -> None:
        try:
            from PySide6.QtWidgets import QApplication
        except ImportError:
            return
        if QApplication.instance() is not None:
            QApplication.processEvents()

    def setOverrideCursor(self, *args) -> None:
        pass

    def restoreOverrideCursor(self) -> None:
        pass

    def layoutManager(self):
        return None

    def applicationLogic(self):
        """The application logic (its selection and interaction nodes: place mode)."""
        return _APP.app_logic if _APP is not None else None

    def topLevelWidgets(self):
        try:
            from PySide6.QtWidgets import QApplication
        except ImportError:
            return []
        return QApplication.topLevelWidgets() if QApplication.instance() is not None else []

    def pauseRender(self) -> None:
        pass

    def resumeRender(self) -> None:
        pass

    @property
    def temporaryPath(self) -> str:
        import tempfile

        return tempfile.gettempdir()


class SlicerAppShim:
    SLICE_VIEWS = (("Red", "Axial"), ("Yellow", "Sagittal"), ("Green", "Coronal"))

    def __init__(self):
        import slicer
        from vtkmodules.vtkCommonCore import vtkCollection, vtkOutputWindow

        out = vtkOutputWindow()
        out.SetDisplayModeToAlwaysStdErr()
        vtkOutputWindow.SetInstance(out)

        self.slicer = slicer
        self.scene = slicer.vtkMRMLScene()
        self.app_logic = slicer.vtkSlicerApplicationLogic()
        self.app_logic.SetMRMLScene(self.scene)
        color_logic = self.app_logic.GetColorLogic()
        color_logic.SetMRMLScene(self.scene)
        color_logic.AddDefaultColorNodes()
        self.app_logic.SetModuleLogic("Colors", color_logic)
        self.app_logic.SetSliceLogics(vtkCollection())
        self.app_logic.SetViewLogics(vtkCollection())

        self.logics = {"colors": color_logic}
        for name, cls, module_name in (
            ("volumes", slicer.vtkSlicerVolumesLogic, "Volumes"),
            ("terminologies", slicer.vtkSlicerTerminologiesModuleLogic, "Terminologies"),
            ("segmentations", slicer.vtkSlicerSegmentationsModuleLogic, "Segmentations"),
            ("subjecthierarchy", slicer.vtkSlicerSubjectHierarchyModuleLogic, "SubjectHierarchy"),
            ("tables", slicer.vtkSlicerTablesLogic, "Tables"),
        ):
            logic = cls()
            if name == "terminologies":  # Slicer's terminology files, as trame-slicer ships them
                from trame_slicer.resources import resources_path

                logic.SetModuleShareDirectory(str(resources_path() / "terminologies"))
            logic.SetMRMLScene(self.scene)
            logic.SetMRMLApplicationLogic(self.app_logic)
            self.app_logic.SetModuleLogic(module_name, logic)
            self.logics[name] = logic

        slicer.mrmlScene = self.scene
        slicer.app = _AppStub()
        slicer.modules = types.SimpleNamespace(**{n: _ModuleStub(n, lg) for n, lg in self.logics.items()})
        slicer.vtkMRMLSliceNode.AddDefaultSliceOrientationPresets(self.scene, True)
        self.reset()

    def reset(self) -> None:
        """Clear the scene and recreate the singletons an application has: crosshair, slice views.
        The application's settings start empty again (each test sets what it needs)."""
        app = getattr(self.slicer, "app", None)
        if isinstance(app, _AppStub):
            app.__init__()
            app.slicerUserSettingsFilePath = None
        self.scene.Clear(False)
        self.scene.SetUndoOff()
        crosshair = self.slicer.vtkMRMLCrosshairNode()
        crosshair.SetCrosshairName("default")
        self.scene.AddNode(crosshair)
        for layout_name, orientation in self.SLICE_VIEWS:
            node = self.scene.CreateNodeByClass("vtkMRMLSliceNode")
            node.SetName(layout_name)
            node.SetLayoutName(layout_name)
            node.SetSingletonTag(layout_name)
            node.SetOrientation(orientation)
            node.SetDimensions(256, 256, 1)
            node.SetFieldOfView(250.0, 250.0, 1.0)
            self.scene.AddNode(node)
            node.UnRegister(None)

    def slice_nodes(self) -> list:
        return [self.scene.GetSingletonNode(n, "vtkMRMLSliceNode") for n, _ in self.SLICE_VIEWS]

    def slice_center_ras(self, layout_name: str):
        import numpy as np

        node = self.scene.GetSingletonNode(layout_name, "vtkMRMLSliceNode")
        m = node.GetSliceToRAS()
        return np.array([m.GetElement(r, 3) for r in range(3)])


_APP: SlicerAppShim | None = None


def get_app() -> SlicerAppShim:
    global _APP
    if _APP is None:
        _APP = SlicerAppShim()
    return _APP


def ensure_module_path() -> None:
    """Put ``LesionSeg/`` on sys.path, as Slicer does for a scripted module's folder."""
    if str(MODULE_DIR) not in sys.path:
        sys.path.insert(0, str(MODULE_DIR))


# ---------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="session")
def slicer_app():
    return get_app()  # slicer-core is a test dependency (pip install -e '.[test]'): never skipped


@pytest.fixture
def mrml_scene(slicer_app):
    slicer_app.reset()
    yield slicer_app.scene
    slicer_app.reset()


@pytest.fixture(scope="session")
def data_dir() -> Path:
    root = data_root()
    if not (root / "sts").is_dir():
        pytest.skip(f"real CT data not found at {root} (set LESIONSEG_DATA to the shared data folder)")
    return root


@pytest.fixture(scope="session")
def default_model():
    """The registry's default (active) model card: the shipped model (``$LESIONSEG_TEST_MODEL`` overrides
    it).  A missing model or dependency fails the test: it ships with the repository, so it is never skipped."""
    from LesionSegLib.engine.models import get_card

    return get_card(os.environ.get("LESIONSEG_TEST_MODEL") or None)

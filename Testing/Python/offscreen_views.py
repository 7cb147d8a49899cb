"""Slicer's red slice view and a 3D view, rendered offscreen with the real slicer-core
displayable managers through trame-slicer (``SliceView`` / ``ThreeDView`` with ``DirectRendering``).

The views render the scene of ``slicer_app_shim`` (its application logic drives them).  A "bad X
server connection" warning is printed once by VTK; the offscreen render works regardless.

One fix-up, for faithful 2D compositing: trame-slicer 2.0.0 adds the slice image actor to the
renderer *after* the displayable managers' actors, so translucent segment fills are composited
over black instead of over the CT.  Slicer's own slice views draw the image first
(``vtkLightBoxRendererManager``); :meth:`RedSliceView.render` puts the image actor first again, after
which the fill is ``opacity * segment colour + (1 - opacity) * CT`` exactly, as in Slicer.
"""
from __future__ import annotations

import numpy as np
import vtk
from vtkmodules.util import numpy_support

SIZE = (512, 512)


def _grab(render_window) -> np.ndarray:
    """The window's pixels as an (h, w, 3) uint8 array, row 0 at the top."""
    f = vtk.vtkWindowToImageFilter()
    f.SetInput(render_window)
    f.SetInputBufferTypeToRGB()
    f.ReadFrontBufferOff()
    f.Update()
    image = f.GetOutput()
    w, h, _ = image.GetDimensions()
    arr = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(h, w, 3)
    return arr[::-1].copy()


def save_png(pixels: np.ndarray, path) -> None:
    image = vtk.vtkImageData()
    h, w, _ = pixels.shape
    image.SetDimensions(w, h, 1)
    arr = numpy_support.numpy_to_vtk(np.ascontiguousarray(pixels[::-1]).reshape(-1, 3), deep=True, array_type=vtk.VTK_UNSIGNED_CHAR)
    image.GetPointData().SetScalars(arr)
    writer = vtk.vtkPNGWriter()
    writer.SetFileName(str(path))
    writer.SetInputData(image)
    writer.Write()


class RedSliceView:
    """The red (axial) slice view of the shim's scene."""

    def __init__(self, app, background_volume):
        from trame_slicer.views.render_scheduler import DirectRendering
        from trame_slicer.views.slice_view import SliceView

        existing = app.scene.GetSingletonNode("Red", "vtkMRMLSliceNode")
        if existing is not None:  # the view makes its own Red slice node, as in an application
            app.scene.RemoveNode(existing)
        self.view = SliceView(app.scene, app.app_logic, "Red", scheduled_render_strategy=DirectRendering())
        self.window = self.view.render_window()
        self.window.SetOffScreenRendering(True)
        self.window.SetSize(*SIZE)
        self.view.set_background_volume_id(background_volume.GetID())
        self.view.fit_view_to_content()
        self.slice_node = self.view._logic.GetSliceNode()

    def _image_actor_first(self) -> None:
        renderer = self.view.first_renderer()
        image_actor = self.view._render_manager.image_actor
        props = renderer.GetViewProps()
        props.InitTraversal()
        items = [props.GetNextProp() for _ in range(props.GetNumberOfItems())]
        if items and items[0] is image_actor:
            return
        renderer.RemoveAllViewProps()
        renderer.AddViewProp(image_actor)
        for prop in items:
            if prop is not image_actor:
                renderer.AddViewProp(prop)

    def render(self) -> np.ndarray:
        self.view.render()
        self._image_actor_first()
        self.view.render()
        return _grab(self.window)

    def pixel_of(self, ras) -> tuple[int, int]:
        """(row, column) of the screenshot pixel showing RAS point ``ras`` (on the current slice)."""
        m = vtk.vtkMatrix4x4()
        m.DeepCopy(self.slice_node.GetXYToRAS())
        m.Invert()
        x, y, _, _ = m.MultiplyPoint([float(ras[0]), float(ras[1]), float(ras[2]), 1.0])
        return SIZE[1] - 1 - int(round(y)), int(round(x))


class ThreeD:
    """A 3D view of the shim's scene, camera fitted to the content, looking from anterior."""

    def __init__(self, app):
        from trame_slicer.views.render_scheduler import DirectRendering
        from trame_slicer.views.threed_view import ThreeDView

        self.view = ThreeDView(app.scene, app.app_logic, "1", scheduled_render_strategy=DirectRendering())
        self.window = self.view.render_window()
        self.window.SetOffScreenRendering(True)
        self.window.SetSize(*SIZE)

    def fit(self) -> None:
        self.view.fit_view_to_content()

    def render(self) -> np.ndarray:
        self.view.render()
        return _grab(self.window)

    def pixel_of(self, ras) -> tuple[int, int]:
        renderer = self.view.renderer()
        renderer.SetWorldPoint(float(ras[0]), float(ras[1]), float(ras[2]), 1.0)
        renderer.WorldToDisplay()
        x, y, _ = renderer.GetDisplayPoint()
        return SIZE[1] - 1 - int(round(y)), int(round(x))

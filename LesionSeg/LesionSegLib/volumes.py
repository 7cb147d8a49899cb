"""Scalar volume nodes and SimpleITK images: geometry (RAS <-> LPS), voxels, loading.

Slicer works in RAS, files and the engine in LPS: ``LPS = diag(-1, -1, 1) @ RAS``.  Voxel arrays
are (k, j, i) = (z, y, x) in both ``slicer.util.arrayFromVolume`` and SimpleITK.  No Qt here.
"""
from __future__ import annotations

import numpy as np
import slicer
import vtk

_RAS_LPS = np.diag([-1.0, -1.0, 1.0])


def _scene(scene=None):
    scene = scene or getattr(slicer, "mrmlScene", None)
    if scene is None:
        raise RuntimeError("no MRML scene: set slicer.mrmlScene or pass scene=")
    return scene


def _vtk_matrix(m: np.ndarray) -> vtk.vtkMatrix4x4:
    out = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            out.SetElement(r, c, float(m[r, c]))
    return out


def _np_matrix(m: vtk.vtkMatrix4x4) -> np.ndarray:
    return np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])


# ------------------------------------------------------------------------- volumes <-> ITK
def ijk_to_ras(volume_node) -> np.ndarray:
    m = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(m)
    return _np_matrix(m)


def volume_geometry_lps(volume_node) -> tuple[tuple, tuple, tuple]:
    """(spacing, origin, direction) of ``volume_node`` in LPS, as SimpleITK wants them."""
    m = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASDirectionMatrix(m)  # columns: unit RAS directions of i, j, k
    direction = _RAS_LPS @ _np_matrix(m)[:3, :3]
    origin = _RAS_LPS @ np.asarray(volume_node.GetOrigin(), dtype=float)
    spacing = tuple(float(s) for s in volume_node.GetSpacing())
    return spacing, tuple(float(v) for v in origin), tuple(float(v) for v in direction.ravel())


def volume_to_sitk(volume_node):
    """The voxels and geometry of a scalar volume node as a SimpleITK image (LPS).

    The node's own IJK-to-RAS geometry is used; a parent transform is not applied (the result
    nodes are placed under the same transform, so they line up with the volume).
    """
    import SimpleITK as sitk

    from .engine.errors import InputError

    if volume_node is None:
        raise ValueError("no input volume")
    where = f"volume '{volume_node.GetName()}'"
    if volume_node.GetImageData() is None:
        raise InputError("has no image data (no voxels loaded)", where)
    if volume_node.GetImageData().GetNumberOfScalarComponents() != 1:
        raise InputError("has several components per voxel; a single-channel CT is required", where)
    spacing, origin, direction = volume_geometry_lps(volume_node)
    if not all(np.isfinite(v) and v > 0 for v in spacing):  # ITK refuses to hold it: say it as the engine would
        raise InputError(f"zero, negative or non-finite voxel spacing {tuple(round(float(v), 6) for v in spacing)} mm", where)
    arr = slicer.util.arrayFromVolume(volume_node)
    image = sitk.GetImageFromArray(np.ascontiguousarray(arr))  # copies
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(direction)
    return image


def set_volume_geometry_from_sitk(volume_node, image) -> None:
    """Copy a SimpleITK image's geometry (LPS) onto a volume node (RAS)."""
    d = np.eye(4)
    d[:3, :3] = _RAS_LPS @ np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)
    volume_node.SetIJKToRASDirectionMatrix(_vtk_matrix(d))
    volume_node.SetOrigin(*(_RAS_LPS @ np.asarray(image.GetOrigin(), dtype=float)))
    volume_node.SetSpacing(*image.GetSpacing())


def volume_from_sitk(image, name: str, labelmap: bool = False, scene=None):
    """A new scalar (or labelmap) volume node holding ``image``'s voxels and geometry."""
    import SimpleITK as sitk

    scene = _scene(scene)
    cls = "vtkMRMLLabelMapVolumeNode" if labelmap else "vtkMRMLScalarVolumeNode"
    node = scene.AddNewNodeByClass(cls, name)
    slicer.util.updateVolumeFromArray(node, sitk.GetArrayFromImage(image))
    set_volume_geometry_from_sitk(node, image)
    node.CreateDefaultDisplayNodes()
    return node


def load_volume(path: str, name: str | None = None, scene=None):
    """Load an image file (or the series of a DICOM file) as a scalar volume node.

    Uses the Volumes module logic (``slicer.modules.volumes.logic()``), which exists in Slicer
    and in the headless test application.
    """
    import os

    logic = slicer.modules.volumes.logic()
    if name is None:
        base = os.path.basename(str(path))
        for suffix in (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd", ".dcm"):
            if base.lower().endswith(suffix):
                base = base[: -len(suffix)]
        name = base
    node = logic.AddArchetypeScalarVolume(str(path), name, 0, None)
    if node is None:
        raise RuntimeError(f"cannot load volume {path}")
    node.CreateDefaultDisplayNodes()
    return node

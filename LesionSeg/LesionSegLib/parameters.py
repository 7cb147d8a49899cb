"""The LesionSeg module's typed parameter node (``slicer.parameterNodeWrapper``).

Widget side (the wrapper binds widgets, so it needs Slicer's GUI): the panel's state lives in the
scene's ``LesionSeg`` parameter node and is saved with the scene.  A scene reopened with a
result shows that result again (``resultSegmentation``), ready to be reviewed further.  Widgets
of ``Resources/UI/LesionSeg.ui`` name their field in the ``SlicerParameterName`` property; the
model list comes from the registry at run time, so ``model`` is bound by the widget itself.

Reserved for features that come next (the .ui has their hidden widgets):

* ``oodWarning``: the out-of-distribution warning line above the lesion table (empty: hidden);
* "Add lesion" (``addLesionButton``: a click in a slice view adds a lesion with status *added*,
  recorded as a missed lesion) and "Save corrections" (``saveCorrectionsButton``).
"""
from __future__ import annotations

import pathlib
from typing import Annotated

import slicer
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper

from .review import REVIEW_ORDERS

DEVICES = ("auto", "cpu", "cuda")


@parameterNodeWrapper
class LesionSegParameterNode:
    inputVolume: slicer.vtkMRMLScalarVolumeNode
    #: folder of the selected model card ("" = the registry's active model)
    model: str = ""
    device: Annotated[str, Choice(list(DEVICES))] = "auto"
    threshold: Annotated[float, WithinRange(0.0, 1.0)] = 0.5
    #: the LesionSeg result under review (the result selector)
    resultSegmentation: slicer.vtkMRMLSegmentationNode
    reviewOrder: Annotated[str, Choice(list(REVIEW_ORDERS))] = REVIEW_ORDERS[0]
    autoAdvance: bool = True
    recordFeedback: bool = True
    outputDirectory: pathlib.Path = pathlib.Path.home() / "LesionSeg"
    #: reserved: out-of-distribution warning for the current result ("" hides the line)
    oodWarning: str = ""

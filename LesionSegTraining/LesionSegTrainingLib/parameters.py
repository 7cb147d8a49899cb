"""The LesionSegTraining module's typed parameter node (``slicer.parameterNodeWrapper``).

Widget side: the panel's inputs live in the scene's ``LesionSegTraining`` parameter node (widgets
of ``Resources/UI/LesionSegTraining.ui`` name their field in ``SlicerParameterName``).  The base
model list comes from the registry at run time, so ``baseModel`` and ``finetuneBaseModel`` are bound
by the widget.  The
feedback database is not a scene setting: both LesionSeg modules take it from the application
settings (``LesionSegLib.settings``).  Results written by the logic (last retrained model, plot,
segmenter output) are plain parameters of the same node (``LesionSegTrainingLib.logic.PARAM_*``).
"""
from __future__ import annotations

import pathlib
from typing import Annotated

from LesionSegLib.engine.learn.finetune import DEFAULT_STEPS
from slicer.parameterNodeWrapper import WithinRange, parameterNodeWrapper


@parameterNodeWrapper
class LesionSegTrainingParameterNode:
    baseModel: str = ""
    useFeedback: bool = True
    includeGroundTruth: bool = False
    groundTruthDirectory: pathlib.Path = pathlib.Path.home()
    outputName: str = ""
    folds: Annotated[int, WithinRange(2, 10)] = 5
    segmenterImages: pathlib.Path = pathlib.Path.home()
    segmenterOutput: str = str(pathlib.Path.home() / "LesionSeg" / "segmenter")
    segmenterMinutes: Annotated[float, WithinRange(0.1, 10000.0)] = 45.0
    registerName: str = ""
    finetuneBaseModel: str = ""
    finetuneSteps: Annotated[int, WithinRange(1, 100000)] = DEFAULT_STEPS
    finetuneOutput: str = ""
    finetuneReplayCases: str = ""
    finetuneSynthetic: Annotated[float, WithinRange(0.0, 1.0)] = 0.0

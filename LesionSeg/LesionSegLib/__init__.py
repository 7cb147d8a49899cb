"""LesionSeg library.

``LesionSegLib.engine`` is the pure-Python segmentation engine (numpy, torch, MONAI, cc3d,
SimpleITK; no Slicer, no Qt).  ``LesionSegLib.mrml`` is the MRML logic used by the Slicer
module; it imports ``slicer`` and is only imported on demand.
"""

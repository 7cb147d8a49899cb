"""The LesionSeg segmentation engine: pure Python on numpy, torch, MONAI, cc3d and SimpleITK."""

"""Fast CPU inference: the networks exported to ONNX and run by OpenVINO or ONNX Runtime.

- :mod:`.backends`: which runtime (``auto``: OpenVINO > ONNX Runtime > eager PyTorch) and one
  call signature for both ONNX runtimes;
- :mod:`.export`: ONNX exports cached next to the model, keyed and verified by sha256;
- :mod:`.models`: a card's segmenter and patch classifier on an ONNX runtime;
- :mod:`.sliding`: MONAI's sliding-window tiling and Gaussian blending in NumPy;
- :mod:`.ops`: NumPy twins of the torch resampling and HU windowing.

Nothing here imports torch or MONAI except to make an export.
"""

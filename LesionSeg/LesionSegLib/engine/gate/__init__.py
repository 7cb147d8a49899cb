"""Cascade gate: a light slab classifier that decides where the segmenter runs (see ``gate/model.py``)."""

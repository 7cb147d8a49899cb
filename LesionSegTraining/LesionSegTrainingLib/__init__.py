"""LesionSegTraining module library: the module logic (MRML, no Qt).

The training machinery itself (feedback store, retraining, versions, background jobs) is in
``LesionSegLib.engine`` (``feedback``, ``retrain``, ``versions``, ``jobs``).
"""

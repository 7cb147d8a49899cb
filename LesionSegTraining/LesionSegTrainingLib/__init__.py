"""LesionSegTraining module library: the module logic (MRML, no Qt) and ``panel_job`` (the widget
side of the panel's background jobs: it drives the widgets it is given).

The training machinery itself (feedback store, retraining, fine-tuning, versions, background jobs)
is in ``LesionSegLib.engine`` (``feedback``, ``learn``).
"""

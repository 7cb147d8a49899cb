"""Cohort segmentation on a Ray cluster: the case list and report (cases), one task (task), the driver and its actors (runner)."""

"""``ctk`` as Slicer exposes it, reduced to the widgets the harness provides."""
from .custom_widgets import ctkCollapsibleButton, ctkDirectoryButton, ctkSliderWidget  # noqa: F401

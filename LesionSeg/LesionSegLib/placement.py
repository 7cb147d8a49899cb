"""One click in a slice view, the Slicer way (MRML logic, no Qt): the "Add lesion" tool's point.

    placement = SinglePointPlacement(on_change)
    placement.start()          # a temporary fiducial node, single-point place mode
    ...                        # on_change() runs when a point is placed or place mode is left
    ras = placement.point()    # the placed point (RAS), or None when place mode was left without one
    placement.stop()           # remove the temporary node and its observers, leave place mode

The temporary node is a ``vtkMRMLMarkupsFiducialNode`` made the active place node of the
application's selection node; the interaction node is put in (non-persistent) place mode.  The
node is hidden from editors and never saved with the scene.  ``on_change`` is called on the
node's ``PointPositionDefinedEvent`` and on the interaction node's mode change away from
*Place* (Escape, or another mouse mode chosen): the caller decides, after the event, whether a
point was placed (:meth:`point`) and then calls :meth:`stop`.  Removing a node from inside its
own event is unsafe in Slicer, so callers should defer that work (the widget uses a zero-delay
timer).
"""
from __future__ import annotations

import slicer

FIDUCIAL_CLASS = "vtkMRMLMarkupsFiducialNode"
NODE_NAME = "LesionSeg add-lesion point"


def _application_logic():
    return slicer.app.applicationLogic()


class SinglePointPlacement:
    def __init__(self, on_change):
        self.on_change = on_change
        self.node = None
        self._interaction = None
        self._observers: list[tuple] = []

    @property
    def active(self) -> bool:
        return self.node is not None

    def start(self):
        """Create the temporary node and enter single-point place mode; returns the node."""
        self.stop()
        app_logic = _application_logic()
        selection, interaction = app_logic.GetSelectionNode(), app_logic.GetInteractionNode()
        scene = slicer.mrmlScene
        node = scene.AddNewNodeByClass(FIDUCIAL_CLASS, scene.GenerateUniqueName(NODE_NAME))
        node.SetHideFromEditors(True)
        node.SetSaveWithScene(False)
        node.SetMaximumNumberOfControlPoints(1)
        node.CreateDefaultDisplayNodes()
        self.node, self._interaction = node, interaction
        self._observe(node, slicer.vtkMRMLMarkupsNode.PointPositionDefinedEvent, lambda *a: self.on_change())
        selection.SetReferenceActivePlaceNodeClassName(FIDUCIAL_CLASS)
        selection.SetActivePlaceNodeID(node.GetID())
        interaction.SetPlaceModePersistence(0)
        interaction.SetCurrentInteractionMode(interaction.Place)
        # observed after entering place mode: only leaving it is news
        self._observe(interaction, interaction.InteractionModeChangedEvent, self._on_mode_changed)
        return node

    def _observe(self, obj, event, callback):
        self._observers.append((obj, obj.AddObserver(event, callback)))

    def _on_mode_changed(self, *args):
        if self._interaction is not None and self._interaction.GetCurrentInteractionMode() != self._interaction.Place:
            self.on_change()

    def point(self):
        """RAS of the placed point, or None when none was placed."""
        node = self.node
        if node is None or node.GetNumberOfControlPoints() < 1:
            return None
        if node.GetNthControlPointPositionStatus(0) != node.PositionDefined:
            return None
        ras = [0.0, 0.0, 0.0]
        node.GetNthControlPointPositionWorld(0, ras)
        return tuple(ras)

    def stop(self) -> None:
        """Remove the observers and the temporary node; leave place mode if this tool entered it."""
        for obj, tag in self._observers:
            obj.RemoveObserver(tag)
        self._observers = []
        node, self.node = self.node, None
        interaction, self._interaction = self._interaction, None
        if node is None:
            return
        if interaction is not None and interaction.GetCurrentInteractionMode() == interaction.Place:
            interaction.SetCurrentInteractionMode(interaction.ViewTransform)
        selection = _application_logic().GetSelectionNode()
        if selection is not None and selection.GetActivePlaceNodeID() == node.GetID():
            selection.SetActivePlaceNodeID(None)
        scene = node.GetScene()
        if scene is not None:
            scene.RemoveNode(node)

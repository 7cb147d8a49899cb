"""The LesionSeg module's self-test (``LesionSegTest``, what Slicer's "Reload and Test" and the
extension's ctest run): segment the bundled sample CT, review at least one lesion, threshold,
export.  It never installs packages: when one is missing or unsuitable it skips with the reason.

Widget side (``slicer.ScriptedLoadableModule``); ``LesionSeg.py`` imports the class.
"""
from __future__ import annotations

import os

import slicer
from slicer.ScriptedLoadableModule import ScriptedLoadableModuleTest

from . import dependencies, mrml, sampledata
from .logic import LesionSegLogicCore


#
# LesionSegTest
#
class LesionSegTest(ScriptedLoadableModuleTest):
    """Segment the bundled sample CT, review at least one lesion, threshold and export.

    Never installs anything: when a required package is missing or unsuitable the test is
    skipped with the reason.  Model: the default one, or ``$LESIONSEG_TEST_MODEL``.
    """

    def setUp(self):
        slicer.mrmlScene.Clear(0)

    def runTest(self):
        self.setUp()
        self.test_LesionSeg_segment_review_export()

    def test_LesionSeg_segment_review_export(self):
        import tempfile

        import slicerio

        problems = dependencies.check()
        if problems:
            self.skipTest("LesionSeg's Python packages are not installed (the self-test never installs): " + dependencies.describe(problems))
        with dependencies.self_test():
            self.delayDisplay("Loading the sample CT")
            volume = mrml.load_volume(str(sampledata.SAMPLE_IMAGE), sampledata.SAMPLE_NAME)
            logic = LesionSegLogicCore()
            self.delayDisplay("Segmenting")
            segNode, table = logic.segment(volume, model=os.environ.get("LESIONSEG_TEST_MODEL") or None, device="cpu")
            records = mrml.lesions(segNode)
            self.assertGreaterEqual(len(records), 1, "the sample must give at least one lesion to review")
            self.assertEqual(segNode.GetSegmentation().GetNumberOfSegments(), len(records))
            self.assertIs(mrml.reference_volume(segNode), volume)
            self.assertIs(mrml.get_table_node(segNode), table)
            mrml.set_threshold(segNode, 1.01)
            self.assertEqual(table.GetNumberOfRows(), 0)
            mrml.set_threshold(segNode, 0.0)
            self.assertEqual(table.GetNumberOfRows(), len(records))
            first = mrml.review_queue(segNode)[0]
            decision = logic.review(segNode, first, "accepted")
            self.assertEqual((decision.decision, decision.queue_position), ("accepted", 1))
            self.assertEqual(mrml.segment_status(segNode, first), "completed")
            self.assertEqual(mrml.review_progress(segNode), (1, len(records)))
            self.delayDisplay("Exporting")
            with tempfile.TemporaryDirectory() as outdir:
                paths = logic.export(segNode, outdir, formats=("seg.nrrd", "nifti", "csv"))
                segments = {s["id"]: s for s in slicerio.read_segmentation(str(paths["seg.nrrd"]))["segments"]}
                self.assertEqual(len(segments), len(records))
                self.assertEqual(segments[mrml.segment_id(first)]["tags"]["LesionSeg.Review"], "accepted")
                self.assertEqual(segments[mrml.segment_id(first)]["status"], "completed")
        self.delayDisplay("Test passed")

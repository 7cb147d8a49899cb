"""The lesion matching rule shared by classifier training, evaluation and simulated review.

Ground-truth lesions are the 26-connected components of the binary label (cc3d).  A predicted
lesion (cluster) *hits* a ground-truth lesion when

* their IoU is at least ``IOU_MIN`` (0.1), or
* at least ``INSIDE_MIN`` (50 %) of the predicted lesion's voxels lie inside it
  (so a fragment of a large tumour counts as being on that tumour).

A predicted lesion that hits any ground-truth lesion is a true positive (TP), otherwise a false
positive (FP).  For detection metrics each ground-truth lesion is detected at most once, by its
highest-confidence hit; further hits on an already detected lesion are duplicates, counted
neither as detections nor as false positives.
"""
from __future__ import annotations

from dataclasses import dataclass

import cc3d
import numpy as np

IOU_MIN = 0.1
INSIDE_MIN = 0.5


def gt_components(label: np.ndarray) -> tuple[np.ndarray, int]:
    """26-connected components of a binary (or instance) ground-truth label."""
    lab = cc3d.connected_components(np.asarray(label) > 0, connectivity=26)
    return lab.astype(np.uint32), int(lab.max())


@dataclass
class Match:
    #: for each predicted id 1..n (index id-1): the GT id it hits best, 0 when none
    pred_to_gt: np.ndarray
    #: IoU of that best hit
    pred_iou: np.ndarray
    n_gt: int
    #: voxel count of each GT lesion (index gt-1)
    gt_sizes: np.ndarray

    @property
    def is_tp(self) -> np.ndarray:
        return self.pred_to_gt > 0


def match(pred_instances: np.ndarray, gt_instances: np.ndarray, n_pred: int | None = None, n_gt: int | None = None) -> Match:
    """Match predicted instance labels against GT instance labels on the same grid."""
    pred = np.asarray(pred_instances).astype(np.int64, copy=False)
    gt = np.asarray(gt_instances).astype(np.int64, copy=False)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from ground truth {gt.shape}")
    n_pred = int(pred.max()) if n_pred is None else n_pred
    n_gt = int(gt.max()) if n_gt is None else n_gt
    pred_sizes = np.bincount(pred.ravel(), minlength=n_pred + 1)[1:]
    gt_sizes = np.bincount(gt.ravel(), minlength=n_gt + 1)[1:]
    both = (pred > 0) & (gt > 0)
    pairs = pred[both] * (n_gt + 1) + gt[both]
    inter = np.bincount(pairs, minlength=(n_pred + 1) * (n_gt + 1)).reshape(n_pred + 1, n_gt + 1)[1:, 1:]
    pred_to_gt = np.zeros(n_pred, dtype=np.int64)
    pred_iou = np.zeros(n_pred, dtype=float)
    if n_pred and n_gt:
        union = pred_sizes[:, None] + gt_sizes[None, :] - inter
        iou = np.where(union > 0, inter / np.maximum(union, 1), 0.0)
        inside = inter / np.maximum(pred_sizes[:, None], 1)
        hit = (iou >= IOU_MIN) | (inside >= INSIDE_MIN)
        score = np.where(hit, iou + inside * 1e-3, -1.0)
        best = score.argmax(axis=1)
        ok = score[np.arange(n_pred), best] >= 0
        pred_to_gt[ok] = best[ok] + 1
        pred_iou[ok] = iou[np.arange(n_pred), best][ok]
    return Match(pred_to_gt, pred_iou, n_gt, gt_sizes)


def detections(m: Match, confidences: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per predicted lesion: (is_detection, is_false_positive) under the at-most-once rule."""
    conf = np.asarray(confidences, dtype=float)
    order = np.argsort(-conf, kind="stable")
    det = np.zeros(len(conf), dtype=bool)
    fp = np.zeros(len(conf), dtype=bool)
    seen: set[int] = set()
    for i in order:
        g = int(m.pred_to_gt[i])
        if g == 0:
            fp[i] = True
        elif g not in seen:
            seen.add(g)
            det[i] = True
    return det, fp

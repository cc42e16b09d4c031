"""Evaluation: nucleus segmentation, detection and classification metrics, and their aggregation.

The metrics are pure functions over numpy arrays, in one module per kind:

* :mod:`~wsi_nuclei.eval.instance`: pairwise overlap of instance maps, binary PQ, AJI, Dice and
  multi-class PQ (HoVer-Net and PanNuke definitions);
* :mod:`~wsi_nuclei.eval.detection`: the centroid matcher and detection / per-class F1
  (HoVer-Net's ``compute_stats.py``);
* :mod:`~wsi_nuclei.eval.calibration`: expected calibration error;
* :mod:`~wsi_nuclei.eval.classes`: PanNuke class ids and the ``allowed`` bitmask sets.

:mod:`~wsi_nuclei.eval.aggregate` scores a whole dataset (:func:`evaluate_predictions`,
:func:`format_table`) and :mod:`~wsi_nuclei.eval.command` is the ``wsi-nuclei evaluate``
command (it runs a model, so it is not imported here).

Accumulation over a dataset: every per-image result carries its raw counts (``tp``, ``fp``,
``fn``, ``iou_sum``...), and the ``aggregate_*`` functions combine a sequence of per-image
results both ways: the *mean over images* of the per-image score (what HoVer-Net, MoNuSeg/Kumar
and PanNuke report) and the *pooled* score computed once from the summed counts (the CoNIC
convention; insensitive to images with few nuclei).
"""

from __future__ import annotations

from .aggregate import evaluate_predictions, format_table
from .calibration import expected_calibration_error
from .classes import (
    PANNUKE_CLASS_IDS,
    UNKNOWN_ALLOWED,
    allowed_name,
    classes_to_allowed,
    default_class_groups,
)
from .detection import (
    detection_scores,
    detection_scores_from_pairs,
    instance_centroids,
    match_centroids,
)
from .instance import (
    InstanceOverlap,
    aggregate_multiclass_pq,
    aggregate_pq,
    aji,
    aji_from_overlap,
    dice,
    dice_from_overlap,
    instance_overlap,
    multiclass_pq,
    multiclass_pq_from_overlap,
    pair_instances,
    panoptic_quality,
    pq_from_counts,
    pq_from_overlap,
)

__all__ = [
    "PANNUKE_CLASS_IDS",
    "UNKNOWN_ALLOWED",
    "InstanceOverlap",
    "instance_overlap",
    "pair_instances",
    "pq_from_counts",
    "pq_from_overlap",
    "panoptic_quality",
    "aggregate_pq",
    "aji_from_overlap",
    "aji",
    "dice_from_overlap",
    "dice",
    "multiclass_pq_from_overlap",
    "multiclass_pq",
    "aggregate_multiclass_pq",
    "classes_to_allowed",
    "allowed_name",
    "default_class_groups",
    "instance_centroids",
    "match_centroids",
    "detection_scores_from_pairs",
    "detection_scores",
    "expected_calibration_error",
    "evaluate_predictions",
    "format_table",
]

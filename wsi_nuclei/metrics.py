"""Nucleus instance-segmentation, detection and classification metrics.

Every metric is a pure function over numpy arrays (instance maps: integer arrays, 0 =
background, any positive id = one nucleus; ids need not be consecutive). The definitions follow
the reference implementations used in the literature so that numbers are comparable:

* binary Panoptic Quality (PQ = DQ x SQ), AJI and Dice as in HoVer-Net (Graham et al. 2019,
  ``metrics/stats_utils.py``: ``get_fast_pq``, ``get_fast_aji``, ``get_dice_1``);
* multi-class PQ (mPQ) as in the PanNuke evaluation (Gamper et al. 2020), with a pooled
  (CoNIC-style) variant;
* centroid detection and per-class F1 as in HoVer-Net's ``compute_stats.py``, generalised to
  ground truth whose class is only known up to a set of PanNuke classes (the ``allowed``
  bitmask of the datasets: bit ``c - 1`` set when the nucleus may be class ``c``).

Speed: all pairwise quantities come from one sparse contingency table of (true id, pred id)
pixel counts (a single pass over the image), never from per-pair full-image masks, so a
1000 x 1000 image with ~400 nuclei per side takes a few tens of milliseconds.

Accumulation over a dataset: every per-image result carries its raw counts (``tp``, ``fp``,
``fn``, ``iou_sum``...), and the ``aggregate_*`` functions combine a sequence of per-image
results both ways: the *mean over images* of the per-image score (what HoVer-Net, MoNuSeg/Kumar
and PanNuke report) and the *pooled* score computed once from the summed counts (the CoNIC
convention; insensitive to images with few nuclei).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy.optimize import linear_sum_assignment
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree

from wsi_nuclei.schema import CLASS_NAMES

__all__ = [
    "PANNUKE_CLASSES",
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
]

#: PanNuke class ids evaluated by default (1 Neoplastic .. 5 Epithelial).
PANNUKE_CLASSES: tuple[int, ...] = (1, 2, 3, 4, 5)
#: ``allowed`` value of a nucleus whose class is unknown (all five bits set).
UNKNOWN_ALLOWED: int = 31
#: Readable names of the composite allowed sets used by the datasets.
_SET_NAMES: dict[int, str] = {30: "Non-neoplastic"}

IntArray = npt.NDArray[np.integer[Any]]
FloatArray = npt.NDArray[np.floating[Any]]


# --------------------------------------------------------------------------------------------
# Pairwise overlap of two instance maps
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class InstanceOverlap:
    """Sparse contingency table of two instance maps (output of :func:`instance_overlap`).

    Instances are indexed ``0..n-1`` in the order of ``true_labels`` / ``pred_labels``
    (ascending ids). Only pairs with a non-empty intersection are stored.

    Attributes
    ----------
    true_labels, pred_labels : ndarray of int64
        Ids present in each map (background 0 excluded), ascending.
    true_area, pred_area : ndarray of int64
        Pixel count of each instance, aligned with the labels.
    rows, cols : ndarray of int64
        Index (into the label arrays) of the true and predicted instance of each overlapping pair.
    inter : ndarray of int64
        ``|T_rows ∩ P_cols|`` in pixels for each pair.
    """

    true_labels: IntArray
    pred_labels: IntArray
    true_area: IntArray
    pred_area: IntArray
    rows: IntArray
    cols: IntArray
    inter: IntArray

    @property
    def union(self) -> IntArray:
        """``|T ∪ P| = |T| + |P| - |T ∩ P|`` for each stored pair."""
        return self.true_area[self.rows] + self.pred_area[self.cols] - self.inter

    @property
    def iou(self) -> FloatArray:
        """``IoU = |T ∩ P| / |T ∪ P|`` for each stored pair."""
        return self.inter / self.union


def _compact(inst: npt.ArrayLike, name: str) -> tuple[IntArray, IntArray, IntArray]:
    """Map the ids of an instance map to ``1..n`` (0 stays background).

    Returns ``(labels, index, area)``: the present ids (ascending), the flat image of compact
    indices (0 = background, ``k`` = ``labels[k - 1]``) and the area of each instance.
    """
    arr = np.asarray(inst)
    if arr.dtype == bool:
        arr = arr.astype(np.uint8)
    if not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"{name} must be an integer instance map, got dtype {arr.dtype}")
    flat = arr.ravel()
    if flat.size == 0:
        empty = np.zeros(0, np.int64)
        return empty, empty, empty
    if flat.min() < 0:
        raise ValueError(f"{name} has negative ids")
    top = int(flat.max())
    if top <= 4 * flat.size + 65536:
        counts = np.bincount(flat, minlength=top + 1)
        labels = np.flatnonzero(counts[1:]) + 1
        lut = np.zeros(top + 1, np.int64)
        lut[labels] = np.arange(1, labels.size + 1)
        return labels.astype(np.int64), lut[flat], counts[labels].astype(np.int64)
    uniq, index, counts = np.unique(flat, return_inverse=True, return_counts=True)
    if uniq[0] == 0:
        return uniq[1:].astype(np.int64), index.astype(np.int64), counts[1:].astype(np.int64)
    return uniq.astype(np.int64), index.astype(np.int64) + 1, counts.astype(np.int64)


def instance_overlap(true: npt.ArrayLike, pred: npt.ArrayLike) -> InstanceOverlap:
    """Intersections of every true instance with every predicted instance, in one pass.

    Parameters
    ----------
    true, pred : array_like of int, shape (H, W)
        Instance maps of the same shape (0 = background).

    Returns
    -------
    InstanceOverlap
        Areas of all instances and the intersection ``|T_i ∩ P_j|`` of every pair with a
        non-empty intersection (a sparse contingency table).
    """
    t = np.asarray(true)
    p = np.asarray(pred)
    if t.shape != p.shape:
        raise ValueError(f"shape mismatch: true {t.shape} vs pred {p.shape}")
    t_labels, t_idx, t_area = _compact(t, "true")
    p_labels, p_idx, p_area = _compact(p, "pred")
    both = (t_idx > 0) & (p_idx > 0)
    n_cols = p_labels.size + 1
    key = t_idx[both] * n_cols + p_idx[both]
    n_bins = (t_labels.size + 1) * n_cols
    if n_bins <= 4 * key.size + 65536:
        counts = np.bincount(key, minlength=n_bins)
        keys = np.flatnonzero(counts)
        inter = counts[keys]
    else:
        keys, inter = np.unique(key, return_counts=True)
    return InstanceOverlap(
        true_labels=t_labels,
        pred_labels=p_labels,
        true_area=t_area,
        pred_area=p_area,
        rows=(keys // n_cols - 1).astype(np.int64),
        cols=(keys % n_cols - 1).astype(np.int64),
        inter=inter.astype(np.int64),
    )


def pair_instances(
    true: npt.ArrayLike, pred: npt.ArrayLike
) -> tuple[FloatArray, IntArray, IntArray]:
    """Dense pairwise IoU matrix between the instances present in two maps.

    .. math:: \\mathrm{IoU}_{ij} = |T_i \\cap P_j| \\,/\\, |T_i \\cup P_j|

    Parameters
    ----------
    true, pred : array_like of int, shape (H, W)
        Instance maps (0 = background).

    Returns
    -------
    iou : ndarray of float64, shape (n_true, n_pred)
        ``iou[i, j]`` between instance ``true_labels[i]`` and ``pred_labels[j]`` (0 where they
        do not touch).
    true_labels, pred_labels : ndarray of int64
        The ids present in each map, ascending (background excluded).
    """
    ov = instance_overlap(true, pred)
    iou = np.zeros((ov.true_labels.size, ov.pred_labels.size), np.float64)
    iou[ov.rows, ov.cols] = ov.iou
    return iou, ov.true_labels, ov.pred_labels


# --------------------------------------------------------------------------------------------
# Binary panoptic quality
# --------------------------------------------------------------------------------------------
def _match(ov: InstanceOverlap, iou_threshold: float) -> tuple[IntArray, IntArray, FloatArray]:
    """Unique (true, pred) matches with ``IoU > iou_threshold``: indices and their IoU.

    For a threshold >= 0.5 every pair above it is unique by construction (two instances with
    IoU > 0.5 with the same partner would have to share more than half of it). Below 0.5 the
    maximum-total-IoU one-to-one assignment is taken (Hungarian), then thresholded, as in
    HoVer-Net.
    """
    iou = ov.iou
    if iou_threshold >= 0.5:
        keep = iou > iou_threshold
        return ov.rows[keep], ov.cols[keep], iou[keep]
    dense = np.zeros((ov.true_labels.size, ov.pred_labels.size), np.float64)
    dense[ov.rows, ov.cols] = iou
    r, c = linear_sum_assignment(-dense)
    keep = dense[r, c] > iou_threshold
    return r[keep].astype(np.int64), c[keep].astype(np.int64), dense[r[keep], c[keep]]


def pq_from_counts(tp: int, fp: int, fn: int, iou_sum: float) -> dict[str, float | int]:
    """Panoptic quality from raw counts.

    .. math::

        DQ = \\frac{TP}{TP + \\tfrac12 FP + \\tfrac12 FN}, \\qquad
        SQ = \\frac{\\sum_{(t, p) \\in TP} \\mathrm{IoU}(t, p)}{TP}, \\qquad
        PQ = DQ \\cdot SQ

    Parameters
    ----------
    tp, fp, fn : int
        Matched pairs, unmatched predictions, unmatched ground-truth instances.
    iou_sum : float
        Sum of the IoU of the matched pairs.

    Returns
    -------
    dict
        ``pq, dq, sq, tp, fp, fn, iou_sum``. When there is nothing at all (``tp + fp + fn = 0``)
        the scores are NaN (undefined; skipped by the means). When ``tp = 0`` but there are
        errors, ``sq = 0`` (HoVer-Net's ``iou_sum / (tp + 1e-6)``) and so ``pq = dq = 0``.
    """
    tp, fp, fn = int(tp), int(fp), int(fn)
    iou_sum = float(iou_sum)
    if tp + fp + fn == 0:
        dq = sq = pq = math.nan
    else:
        dq = tp / (tp + 0.5 * fp + 0.5 * fn)
        sq = iou_sum / tp if tp > 0 else 0.0
        pq = dq * sq
    return {"pq": pq, "dq": dq, "sq": sq, "tp": tp, "fp": fp, "fn": fn, "iou_sum": iou_sum}


def pq_from_overlap(ov: InstanceOverlap, iou_threshold: float = 0.5) -> dict[str, float | int]:
    """Binary PQ of a precomputed :class:`InstanceOverlap` (see :func:`panoptic_quality`)."""
    if not 0.0 <= iou_threshold < 1.0:
        raise ValueError(f"iou_threshold must be in [0, 1), got {iou_threshold}")
    _, _, iou = _match(ov, iou_threshold)
    tp = int(iou.size)
    return pq_from_counts(
        tp, ov.pred_labels.size - tp, ov.true_labels.size - tp, float(iou.sum())
    )


def panoptic_quality(
    true: npt.ArrayLike, pred: npt.ArrayLike, iou_threshold: float = 0.5
) -> dict[str, float | int]:
    """Binary panoptic quality of one image (HoVer-Net's ``get_fast_pq``).

    A true instance ``t`` and a predicted instance ``p`` match when
    ``IoU(t, p) > iou_threshold`` (strictly: IoU exactly 0.5 is *not* a match); at 0.5 the
    matching is unique. Then (:func:`pq_from_counts`)

    .. math::

        DQ = \\frac{TP}{TP + \\tfrac12 FP + \\tfrac12 FN}, \\quad
        SQ = \\frac{\\sum_{TP} \\mathrm{IoU}}{TP}, \\quad PQ = DQ \\cdot SQ.

    Parameters
    ----------
    true, pred : array_like of int, shape (H, W)
        Instance maps (0 = background).
    iou_threshold : float, default 0.5
        Matching threshold; below 0.5 a maximum-IoU one-to-one assignment is used first.

    Returns
    -------
    dict
        ``pq, dq, sq`` for this image and the raw counts ``tp, fp, fn, iou_sum`` so results can
        be combined over a dataset with :func:`aggregate_pq`. Scores are NaN when both maps are
        empty.
    """
    return pq_from_overlap(instance_overlap(true, pred), iou_threshold)


def _nanmean(values: Iterable[float]) -> float:
    arr = np.asarray([float(v) for v in values], np.float64)
    arr = arr[~np.isnan(arr)]
    return float(arr.mean()) if arr.size else math.nan


def aggregate_pq(per_image: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Combine per-image PQ results (from :func:`panoptic_quality`) over a dataset.

    Two conventions are returned:

    * ``mean``: the mean over images of the per-image ``pq``, ``dq`` and ``sq`` — the binary PQ
      reported by HoVer-Net (Kumar/MoNuSeg, CoNSeP) and PanNuke. Images where PQ is undefined
      (no true and no predicted nucleus) are skipped. Note ``mean.pq`` is the mean of per-image
      products, not ``mean.dq * mean.sq``.
    * ``pooled``: :func:`pq_from_counts` of the summed ``tp, fp, fn, iou_sum`` (every nucleus
      weighs the same; CoNIC-style).

    Parameters
    ----------
    per_image : iterable of mapping
        Each with at least ``pq, dq, sq, tp, fp, fn, iou_sum``.

    Returns
    -------
    dict
        ``{"mean": {pq, dq, sq}, "pooled": {pq, dq, sq, tp, fp, fn, iou_sum},
        "n_images": int, "n_images_scored": int}``.
    """
    items = list(per_image)
    tp = sum(int(r["tp"]) for r in items)
    fp = sum(int(r["fp"]) for r in items)
    fn = sum(int(r["fn"]) for r in items)
    iou_sum = sum(float(r["iou_sum"]) for r in items)
    return {
        "mean": {k: _nanmean(r[k] for r in items) for k in ("pq", "dq", "sq")},
        "pooled": pq_from_counts(tp, fp, fn, iou_sum),
        "n_images": len(items),
        "n_images_scored": sum(not math.isnan(float(r["pq"])) for r in items),
    }


# --------------------------------------------------------------------------------------------
# AJI and Dice
# --------------------------------------------------------------------------------------------
def aji_from_overlap(ov: InstanceOverlap) -> float:
    """AJI of a precomputed :class:`InstanceOverlap` (see :func:`aji`)."""
    n_pred = ov.pred_labels.size
    if ov.true_labels.size == 0 and n_pred == 0:
        return math.nan
    inter_total = 0
    union_total = 0
    used = np.zeros(n_pred, bool)
    matched_true = np.zeros(ov.true_labels.size, bool)
    if ov.rows.size:
        iou = ov.iou
        # Per true instance, the prediction with the highest IoU; ties go to the larger
        # intersection (what HoVer-Net's inter / (union + 1e-6) prefers), then the lowest id.
        order = np.lexsort((ov.cols, -ov.inter, -iou, ov.rows))
        rows = ov.rows[order]
        first = np.ones(rows.size, bool)
        first[1:] = rows[1:] != rows[:-1]
        best = order[first]
        inter_total = int(ov.inter[best].sum())
        union_total = int(ov.union[best].sum())
        used[ov.cols[best]] = True
        matched_true[ov.rows[best]] = True
    union_total += int(ov.true_area[~matched_true].sum()) + int(ov.pred_area[~used].sum())
    return inter_total / union_total


def aji(true: npt.ArrayLike, pred: npt.ArrayLike) -> float:
    """Aggregated Jaccard Index (Kumar et al. 2017; HoVer-Net's ``get_fast_aji``).

    For every true instance :math:`G_i` take the prediction :math:`S_{j^*(i)}` with the highest
    IoU (a prediction may be chosen by several true instances), then

    .. math::

        AJI = \\frac{\\sum_i |G_i \\cap S_{j^*(i)}|}
                    {\\sum_i |G_i \\cup S_{j^*(i)}| + \\sum_{k \\in U} |S_k|}

    where :math:`U` are the predictions chosen by no true instance. A true instance that touches
    no prediction contributes its area to the denominator only. A prediction chosen by several
    true instances has its area counted once per choice (AJI's known over-penalisation of
    merges).

    Parameters
    ----------
    true, pred : array_like of int, shape (H, W)
        Instance maps (0 = background).

    Returns
    -------
    float
        AJI in [0, 1]; NaN when both maps are empty, 0 when only one is.
    """
    return aji_from_overlap(instance_overlap(true, pred))


def dice_from_overlap(ov: InstanceOverlap) -> float:
    """Binary Dice of a precomputed :class:`InstanceOverlap` (see :func:`dice`)."""
    denom = int(ov.true_area.sum()) + int(ov.pred_area.sum())
    if denom == 0:
        return math.nan
    return 2.0 * int(ov.inter.sum()) / denom


def dice(true: npt.ArrayLike, pred: npt.ArrayLike) -> float:
    """Binary foreground Dice (HoVer-Net's ``get_dice_1``).

    .. math:: \\mathrm{Dice} = \\frac{2 |T \\cap P|}{|T| + |P|},
        \\quad T = \\{true > 0\\},\\ P = \\{pred > 0\\}

    Parameters
    ----------
    true, pred : array_like, shape (H, W)
        Instance maps or binary masks (anything > 0 is foreground).

    Returns
    -------
    float
        Dice in [0, 1]; NaN when both are empty.
    """
    t = np.asarray(true) > 0
    p = np.asarray(pred) > 0
    if t.shape != p.shape:
        raise ValueError(f"shape mismatch: true {t.shape} vs pred {p.shape}")
    denom = int(t.sum()) + int(p.sum())
    if denom == 0:
        return math.nan
    return 2.0 * int(np.count_nonzero(t & p)) / denom


# --------------------------------------------------------------------------------------------
# Multi-class PQ
# --------------------------------------------------------------------------------------------
def _lookup(table: npt.ArrayLike, labels: IntArray, name: str) -> IntArray:
    """``table[labels]`` with a clear error when the table is too short."""
    arr = np.asarray(table)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D (indexed by instance id), got shape {arr.shape}")
    if labels.size and int(labels.max()) >= arr.size:
        raise ValueError(
            f"{name} has {arr.size} entries but the instance map has id {int(labels.max())}"
        )
    return arr[labels].astype(np.int64)


def multiclass_pq_from_overlap(
    ov: InstanceOverlap,
    true_class: npt.ArrayLike,
    pred_class: npt.ArrayLike,
    *,
    classes: Sequence[int] = PANNUKE_CLASSES,
    true_allowed: npt.ArrayLike | None = None,
    iou_threshold: float = 0.5,
) -> dict[str, Any]:
    """Per-class PQ of a precomputed :class:`InstanceOverlap` (see :func:`multiclass_pq`)."""
    t_cls = _lookup(true_class, ov.true_labels, "true_class")
    p_cls = _lookup(pred_class, ov.pred_labels, "pred_class")
    t_allowed = (
        None if true_allowed is None else _lookup(true_allowed, ov.true_labels, "true_allowed")
    )
    m_true, m_pred, m_iou = _match(ov, iou_threshold)
    mt_cls, mp_cls = t_cls[m_true], p_cls[m_pred]
    per_class: dict[int, dict[str, Any]] = {}
    for c in classes:
        c = int(c)
        if c not in CLASS_NAMES:
            raise ValueError(f"unknown PanNuke class id {c}")
        n_true = int(np.count_nonzero(t_cls == c))
        n_pred = int(np.count_nonzero(p_cls == c))
        hit = (mt_cls == c) & (mp_cls == c)
        tp = int(np.count_nonzero(hit))
        n_ignored = 0
        if t_allowed is not None:
            maybe_c = ((t_allowed[m_true] >> (c - 1)) & 1) == 1
            n_ignored = int(np.count_nonzero((mp_cls == c) & (mt_cls != c) & maybe_c))
        stats = pq_from_counts(tp, n_pred - tp - n_ignored, n_true - tp, float(m_iou[hit].sum()))
        stats.update(n_true=n_true, n_pred=n_pred, n_ignored=n_ignored)
        per_class[c] = stats
    scored = [s["pq"] for s in per_class.values() if s["n_true"] > 0]
    strict = [s["pq"] for s in per_class.values() if not math.isnan(s["pq"])]
    return {"per_class": per_class, "mpq": _nanmean(scored), "mpq_strict": _nanmean(strict)}


def multiclass_pq(
    true_inst: npt.ArrayLike,
    true_class: npt.ArrayLike,
    pred_inst: npt.ArrayLike,
    pred_class: npt.ArrayLike,
    classes: Sequence[int] = PANNUKE_CLASSES,
    *,
    true_allowed: npt.ArrayLike | None = None,
    iou_threshold: float = 0.5,
) -> dict[str, Any]:
    """Multi-class panoptic quality of one image (PanNuke mPQ).

    For each class :math:`c`, PQ (:func:`panoptic_quality`) between the true instances of class
    :math:`c` and the predicted instances of class :math:`c`:

    .. math::

        TP_c = \\#\\{(t, p): \\mathrm{IoU}(t, p) > 0.5,\\ cls(t) = cls(p) = c\\}, \\quad
        FP_c = \\#\\{p: cls(p) = c\\} - TP_c - I_c, \\quad
        FN_c = \\#\\{t: cls(t) = c\\} - TP_c,

        mPQ_{image} = \\operatorname{mean}_{c \\in C_{image}} PQ_c

    (:math:`I_c = 0` unless ``true_allowed`` is given, see below). Since a pair with IoU > 0.5
    is unique, matching on the whole map and then keeping pairs whose both classes are
    :math:`c` equals PanNuke's per-class-channel matching.

    Parameters
    ----------
    true_inst, pred_inst : array_like of int, shape (H, W)
        Instance maps (0 = background).
    true_class : array_like of int, shape (>= max true id + 1,)
        Exact PanNuke class per true id (0 = not known exactly: belongs to no class).
    pred_class : array_like of int, shape (>= max pred id + 1,)
        PanNuke class per predicted id (0 = none).
    classes : sequence of int, default (1, 2, 3, 4, 5)
        Classes to score.
    true_allowed : array_like of int, optional
        ``allowed`` bitmask per true id. When given, a class-:math:`c` prediction matched
        (IoU > 0.5) to a true nucleus that is not exactly class :math:`c` but *may* be
        (bit :math:`c-1` set, e.g. unknown = 31) is ignored (:math:`I_c`: neither TP nor FP)
        instead of being counted as a false positive. Without it, PanNuke's rule (such a
        prediction is an FP) applies.
    iou_threshold : float, default 0.5

    Returns
    -------
    dict
        ``per_class``: ``{c: {pq, dq, sq, tp, fp, fn, iou_sum, n_true, n_pred, n_ignored}}``
        (raw counts, for :func:`aggregate_multiclass_pq`);
        ``mpq``: mean PQ over classes with at least one true instance in this image — the
        official PanNuke rule (``PanNuke-metrics/run.py`` sets a class to NaN when its ground
        truth is empty, *even if it was predicted*); ``mpq_strict``: mean over classes with a
        true *or* a predicted instance (false positives of a class absent from the image give
        PQ 0). Both NaN when no class qualifies.
    """
    return multiclass_pq_from_overlap(
        instance_overlap(true_inst, pred_inst),
        true_class,
        pred_class,
        classes=classes,
        true_allowed=true_allowed,
        iou_threshold=iou_threshold,
    )


def aggregate_multiclass_pq(
    per_image: Iterable[Mapping[str, Any]], classes: Sequence[int] | None = None
) -> dict[str, Any]:
    """Dataset-level mPQ from per-image :func:`multiclass_pq` results.

    Classes that have no exactly-labelled true instance in any image are *excluded* (listed in
    ``excluded_classes``), so a dataset that cannot tell e.g. Neoplastic from Epithelial is not
    penalised on them. Over the remaining classes :math:`C`:

    * ``mpq.per_image`` (PanNuke): mean over images of the per-image mean of :math:`PQ_c` over
      the classes of :math:`C` with true instances in that image;
    * ``mpq.per_image_strict``: same, a class also counting in an image where it was only
      predicted (PQ 0 there);
    * ``mpq.pooled`` (CoNIC's mPQ+): :math:`\\frac{1}{|C|}\\sum_{c \\in C} PQ_c` with
      :math:`PQ_c` from the counts of class :math:`c` summed over all images.

    ``per_class[c]`` gives ``mean`` (PanNuke's per-class PQ: mean over images with class
    :math:`c` in the ground truth) and ``pooled`` (``pq, dq, sq`` and the summed counts).

    Parameters
    ----------
    per_image : iterable of mapping
        Outputs of :func:`multiclass_pq`.
    classes : sequence of int, optional
        Classes to consider; default: those present in the first result.

    Returns
    -------
    dict
        ``classes`` (scored), ``excluded_classes``, ``mpq`` and ``per_class`` as above,
        ``n_images``.
    """
    items = list(per_image)
    if classes is None:
        classes = list(items[0]["per_class"]) if items else list(PANNUKE_CLASSES)
    classes = [int(c) for c in classes]
    n_true = {c: sum(int(r["per_class"][c]["n_true"]) for r in items) for c in classes}
    scored = [c for c in classes if n_true[c] > 0]
    excluded = [c for c in classes if n_true[c] == 0]

    per_class: dict[int, dict[str, Any]] = {}
    for c in scored:
        rows = [r["per_class"][c] for r in items]
        pooled = pq_from_counts(
            sum(int(s["tp"]) for s in rows),
            sum(int(s["fp"]) for s in rows),
            sum(int(s["fn"]) for s in rows),
            sum(float(s["iou_sum"]) for s in rows),
        )
        pooled["n_true"] = n_true[c]
        pooled["n_pred"] = sum(int(s["n_pred"]) for s in rows)
        pooled["n_ignored"] = sum(int(s["n_ignored"]) for s in rows)
        per_class[c] = {
            "mean": _nanmean(s["pq"] for s in rows if s["n_true"] > 0),
            "mean_strict": _nanmean(s["pq"] for s in rows),
            "n_images": sum(int(s["n_true"]) > 0 for s in rows),
            "pooled": pooled,
        }

    image_mpq = []
    image_mpq_strict = []
    for r in items:
        pcs = [r["per_class"][c] for c in scored]
        image_mpq.append(_nanmean(s["pq"] for s in pcs if s["n_true"] > 0))
        image_mpq_strict.append(_nanmean(s["pq"] for s in pcs))
    return {
        "classes": scored,
        "excluded_classes": excluded,
        "mpq": {
            "per_image": _nanmean(image_mpq),
            "per_image_strict": _nanmean(image_mpq_strict),
            "pooled": _nanmean(per_class[c]["pooled"]["pq"] for c in scored),
        },
        "per_class": per_class,
        "n_images": len(items),
        "n_images_scored": sum(not math.isnan(v) for v in image_mpq),
    }


# --------------------------------------------------------------------------------------------
# Class sets (allowed bitmasks)
# --------------------------------------------------------------------------------------------
def classes_to_allowed(classes: npt.ArrayLike) -> IntArray:
    """Allowed bitmask of exact PanNuke classes: ``1 << (c - 1)``, and 31 (unknown) for 0.

    Parameters
    ----------
    classes : array_like of int
        PanNuke class ids 0..5.

    Returns
    -------
    ndarray of int64
        Same shape, values in {1, 2, 4, 8, 16, 31}.
    """
    c = np.asarray(classes).astype(np.int64)
    if c.size and (c.min() < 0 or c.max() > 5):
        raise ValueError("PanNuke class ids must be in 0..5")
    return np.where(c > 0, np.left_shift(1, np.maximum(c - 1, 0)), UNKNOWN_ALLOWED)


def allowed_name(mask: int) -> str:
    """Readable name of an allowed set: ``"Neoplastic|Epithelial"`` for 17,
    ``"Non-neoplastic"`` for 30, ``"Unknown"`` for 31."""
    mask = int(mask)
    if not 1 <= mask <= UNKNOWN_ALLOWED:
        raise ValueError(f"allowed mask must be in 1..31, got {mask}")
    if mask == UNKNOWN_ALLOWED:
        return "Unknown"
    if mask in _SET_NAMES:
        return _SET_NAMES[mask]
    return "|".join(CLASS_NAMES[c] for c in PANNUKE_CLASSES if mask >> (c - 1) & 1)


def default_class_groups(allowed_values_present: Iterable[int]) -> dict[str, int]:
    """Evaluation class groups: one per distinct allowed set found in the ground truth.

    Unknown (31) and 0 are dropped. Groups are ordered by mask value and named with
    :func:`allowed_name`, e.g. CoNSeP ``{2, 4, 17, 31}`` gives
    ``{"Inflammatory": 2, "Connective": 4, "Neoplastic|Epithelial": 17}`` and exactly-labelled
    PanNuke data one group per class.

    Parameters
    ----------
    allowed_values_present : iterable of int
        Allowed bitmasks of the true nuclei (duplicates fine; an array works).

    Returns
    -------
    dict of str to int
        ``{group name: allowed bitmask}``.
    """
    values = sorted({int(v) for v in np.asarray(list(allowed_values_present)).ravel()})
    return {allowed_name(v): v for v in values if 0 < v < UNKNOWN_ALLOWED}


# --------------------------------------------------------------------------------------------
# Centroid detection and classification
# --------------------------------------------------------------------------------------------
def instance_centroids(inst: npt.ArrayLike) -> tuple[FloatArray, IntArray]:
    """Centroid (mean pixel position) of every instance.

    Parameters
    ----------
    inst : array_like of int, shape (H, W)
        Instance map (0 = background).

    Returns
    -------
    centroids : ndarray of float64, shape (n, 2)
        ``(row, col)`` = (y, x) of each instance, in pixels.
    labels : ndarray of int64, shape (n,)
        The ids, ascending, aligned with ``centroids``.
    """
    arr = np.asarray(inst)
    if arr.ndim != 2:
        raise ValueError(f"instance map must be 2-D, got shape {arr.shape}")
    labels, index, area = _compact(arr, "inst")
    if labels.size == 0:
        return np.zeros((0, 2), np.float64), labels
    rr, cc = np.indices(arr.shape)
    n = labels.size + 1
    sum_r = np.bincount(index, weights=rr.ravel(), minlength=n)[1:]
    sum_c = np.bincount(index, weights=cc.ravel(), minlength=n)[1:]
    return np.stack([sum_r / area, sum_c / area], axis=1), labels


def match_centroids(
    true_centroids: npt.ArrayLike, pred_centroids: npt.ArrayLike, radius: float = 12.0
) -> tuple[IntArray, IntArray, IntArray]:
    """One-to-one pairing of true and predicted points within ``radius`` (Hungarian).

    Among all one-to-one pairings that only use pairs at Euclidean distance ``<= radius``, the
    one with the most pairs and, among those, the smallest total distance. The radius graph is
    split into connected components and :func:`scipy.optimize.linear_sum_assignment` is run on
    each (out-of-radius pairs get a prohibitive cost), so large images stay cheap.

    HoVer-Net's ``pair_coordinates`` instead assigns over the full distance matrix and drops
    pairs beyond the radius afterwards; that never gives more pairs than this and gives the same
    pairs whenever nuclei are well separated.

    Parameters
    ----------
    true_centroids, pred_centroids : array_like of float, shape (n, 2) and (m, 2)
        Point coordinates (any consistent order of axes), in pixels.
    radius : float, default 12.0
        Maximum pairing distance in pixels (HoVer-Net: 12 px at 0.25 µm/px, i.e. 3 µm).

    Returns
    -------
    pairs : ndarray of int64, shape (k, 2)
        ``(true index, pred index)`` of each pair, sorted by true index.
    unpaired_true, unpaired_pred : ndarray of int64
        Indices left without a partner.
    """
    t = np.asarray(true_centroids, np.float64).reshape(-1, 2)
    p = np.asarray(pred_centroids, np.float64).reshape(-1, 2)
    if radius < 0:
        raise ValueError("radius must be >= 0")
    n_t, n_p = len(t), len(p)
    pairs = np.zeros((0, 2), np.int64)
    if n_t and n_p:
        edges = cKDTree(t).sparse_distance_matrix(cKDTree(p), radius, output_type="ndarray")
        if edges.size:
            pairs = _assign_components(edges["i"], edges["j"], edges["v"], n_t, n_p, radius)
    unpaired_true = np.setdiff1d(np.arange(n_t), pairs[:, 0])
    unpaired_pred = np.setdiff1d(np.arange(n_p), pairs[:, 1])
    return pairs, unpaired_true.astype(np.int64), unpaired_pred.astype(np.int64)


def _assign_components(
    ti: IntArray, pj: IntArray, dist: FloatArray, n_t: int, n_p: int, radius: float
) -> IntArray:
    """Min-cost maximum matching of a sparse bipartite radius graph, component by component."""
    ti = ti.astype(np.int64)
    pj = pj.astype(np.int64)
    graph = coo_matrix((np.ones(ti.size), (ti, pj + n_t)), shape=(n_t + n_p, n_t + n_p))
    _, comp = connected_components(graph, directed=False)
    edge_comp = comp[ti]
    order = np.argsort(edge_comp, kind="stable")
    ti, pj, dist, edge_comp = ti[order], pj[order], dist[order], edge_comp[order]
    bounds = np.flatnonzero(np.diff(edge_comp)) + 1
    out: list[tuple[int, int]] = []
    for sl in np.split(np.arange(ti.size), bounds):
        if sl.size == 1:  # an isolated pair: the common case
            out.append((int(ti[sl[0]]), int(pj[sl[0]])))
            continue
        rows, r_idx = np.unique(ti[sl], return_inverse=True)
        cols, c_idx = np.unique(pj[sl], return_inverse=True)
        # Any single in-radius pair must beat the whole in-radius distance budget of a
        # matching, so the assignment first maximises the number of pairs.
        big = (radius + 1.0) * (min(rows.size, cols.size) + 1) + 1.0
        cost = np.full((rows.size, cols.size), big)
        cost[r_idx, c_idx] = dist[sl]
        r, c = linear_sum_assignment(cost)
        ok = cost[r, c] < big
        out.extend(zip(rows[r[ok]].tolist(), cols[c[ok]].tolist()))
    if not out:
        return np.zeros((0, 2), np.int64)
    res = np.asarray(sorted(out), np.int64)
    return res


def _in_group(allowed: IntArray, mask: int) -> tuple[IntArray, IntArray]:
    """(``definitely in``, ``definitely out``) of true nuclei w.r.t. a group mask.

    In: the allowed set is inside the group. Out: no allowed class is in the group. Anything
    else (unknown 31, or a set straddling the group) is ambiguous and ignored.
    """
    known = (allowed > 0) & (allowed != UNKNOWN_ALLOWED)
    inside = known & ((allowed & ~mask) == 0)
    outside = known & ((allowed & mask) == 0)
    return inside, outside


def _pred_in_group(pred_class: IntArray, mask: int) -> IntArray:
    bit = np.where(pred_class > 0, np.left_shift(1, np.maximum(pred_class - 1, 0)), 0)
    return (bit & mask) != 0


def _ratio(num: float, den: float) -> float:
    return num / den if den > 0 else math.nan


def detection_scores_from_pairs(
    paired_true_allowed: npt.ArrayLike,
    paired_pred_class: npt.ArrayLike,
    unpaired_true_allowed: npt.ArrayLike,
    unpaired_pred_class: npt.ArrayLike,
    groups: Mapping[str, int] | None = None,
) -> dict[str, Any]:
    """Detection and per-class scores from a (possibly dataset-pooled) pairing.

    Concatenate the arrays of several images (as HoVer-Net's ``compute_stats.py`` does) to get
    pooled dataset scores. With :math:`TP_d` pairs, :math:`FP_d` unpaired predictions and
    :math:`FN_d` unpaired true nuclei:

    .. math::

        P_d = \\frac{TP_d}{TP_d + FP_d}, \\quad R_d = \\frac{TP_d}{TP_d + FN_d}, \\quad
        F1_d = \\frac{2 TP_d}{2 TP_d + FP_d + FN_d}

    Classification accuracy over the pairs whose true class is known (allowed != 31): a pair is
    correct when the predicted class is in the true nucleus' allowed set.

    For a group :math:`g` with bitmask :math:`M` (``{name: mask}``), a prediction of class
    :math:`p` is *in* :math:`g` when bit :math:`p-1` of :math:`M` is set; a true nucleus is in
    :math:`g` when its allowed set :math:`A \\subseteq M`, *out* when :math:`A \\cap M =
    \\emptyset` and ignored otherwise (unknown 31, or a set straddling :math:`M`; like
    HoVer-Net's non-exhaustive ``-1`` labels). Then

    .. math::

        F1_g = \\frac{2 (TP_g + TN_g)}{2 (TP_g + TN_g) + 2 FP_g + 2 FN_g + FP_{d,g} + FN_{d,g}}

    with, among pairs, :math:`TP_g` (true in, pred in), :math:`FP_g` (true out, pred in),
    :math:`FN_g` (true in, pred out), and :math:`FP_{d,g}` unpaired predictions in :math:`g`,
    :math:`FN_{d,g}` unpaired true nuclei in :math:`g`. As in HoVer-Net's ``_f1_type`` (which
    first keeps only pairs where the true *or* the predicted type is :math:`c`),
    :math:`TN_g = 0`: pairs where neither side is in :math:`g` do not enter :math:`F1_g`.

    Parameters
    ----------
    paired_true_allowed, paired_pred_class : array_like of int, shape (k,)
        Allowed bitmask of the true nucleus and PanNuke class (0 = none) of the prediction, for
        each pair.
    unpaired_true_allowed : array_like of int, shape (n,)
        Allowed bitmask of each unpaired true nucleus.
    unpaired_pred_class : array_like of int, shape (m,)
        Class of each unpaired prediction.
    groups : mapping of str to int, optional
        Evaluation groups ``{name: allowed bitmask}``; default
        :func:`default_class_groups` of all true allowed values.

    Returns
    -------
    dict
        ``precision, recall, f1, tp, fp, fn``, ``accuracy, n_typed_pairs, n_correct`` and
        ``groups: {name: {mask, f1, tp, fp, fn, fp_d, fn_d, n_true, n_pred}}`` (``n_true``:
        true nuclei in the group, ``n_pred``: predictions in the group).
    """
    pt = np.asarray(paired_true_allowed, np.int64).ravel()
    pp = np.asarray(paired_pred_class, np.int64).ravel()
    ut = np.asarray(unpaired_true_allowed, np.int64).ravel()
    up = np.asarray(unpaired_pred_class, np.int64).ravel()
    if pt.size != pp.size:
        raise ValueError("paired arrays differ in length")
    if groups is None:
        groups = default_class_groups(np.concatenate([pt, ut]))
    tp_d, fp_d, fn_d = pt.size, up.size, ut.size

    typed = (pt > 0) & (pt != UNKNOWN_ALLOWED)
    bits = np.where(pp > 0, np.left_shift(1, np.maximum(pp - 1, 0)), 0)
    correct = typed & ((bits & pt) != 0)
    out: dict[str, Any] = {
        "precision": _ratio(tp_d, tp_d + fp_d),
        "recall": _ratio(tp_d, tp_d + fn_d),
        "f1": _ratio(2 * tp_d, 2 * tp_d + fp_d + fn_d),
        "tp": tp_d,
        "fp": fp_d,
        "fn": fn_d,
        "accuracy": _ratio(int(correct.sum()), int(typed.sum())),
        "n_typed_pairs": int(typed.sum()),
        "n_correct": int(correct.sum()),
        "groups": {},
    }
    for name, mask in groups.items():
        mask = int(mask)
        if not 1 <= mask <= UNKNOWN_ALLOWED:
            raise ValueError(f"group {name!r}: mask must be in 1..31, got {mask}")
        t_in, t_out = _in_group(pt, mask)
        p_in = _pred_in_group(pp, mask)
        u_t_in, _ = _in_group(ut, mask)
        u_p_in = _pred_in_group(up, mask)
        tp = int(np.count_nonzero(t_in & p_in))
        fp = int(np.count_nonzero(t_out & p_in))
        fn = int(np.count_nonzero(t_in & ~p_in))
        fpd = int(np.count_nonzero(u_p_in))
        fnd = int(np.count_nonzero(u_t_in))
        out["groups"][str(name)] = {
            "mask": mask,
            "f1": _ratio(2 * tp, 2 * tp + 2 * fp + 2 * fn + fpd + fnd),
            "tp": tp,
            "fp": fp,
            "fn": fn,
            "fp_d": fpd,
            "fn_d": fnd,
            "n_true": int(np.count_nonzero(t_in)) + fnd,
            "n_pred": int(np.count_nonzero(p_in)) + fpd,
        }
    return out


def detection_scores(
    true_centroids: npt.ArrayLike,
    true_allowed: npt.ArrayLike,
    pred_centroids: npt.ArrayLike,
    pred_classes: npt.ArrayLike,
    radius: float = 12.0,
    *,
    groups: Mapping[str, int] | None = None,
) -> dict[str, Any]:
    """Centroid detection P/R/F1 and per-group F1 of one image (HoVer-Net ``compute_stats``).

    Pairs true and predicted centroids with :func:`match_centroids` and scores them with
    :func:`detection_scores_from_pairs` (formulas there).

    Parameters
    ----------
    true_centroids : array_like of float, shape (n, 2)
    true_allowed : array_like of int, shape (n,)
        Allowed bitmask per true nucleus (use :func:`classes_to_allowed` for exact classes).
    pred_centroids : array_like of float, shape (m, 2)
    pred_classes : array_like of int, shape (m,)
        PanNuke class per prediction (0 = none).
    radius : float, default 12.0
        Pairing radius in pixels at the images' resolution (12 px = 3 µm at 0.25 µm/px).
    groups : mapping of str to int, optional
        ``{name: allowed bitmask}``; default one group per true allowed set.

    Returns
    -------
    dict
        See :func:`detection_scores_from_pairs`; also ``pairs`` (``(k, 2)`` index array).
    """
    t_allowed = np.asarray(true_allowed, np.int64).ravel()
    p_cls = np.asarray(pred_classes, np.int64).ravel()
    pairs, ut, up = match_centroids(true_centroids, pred_centroids, radius)
    if t_allowed.size != len(np.asarray(true_centroids).reshape(-1, 2)):
        raise ValueError("true_allowed and true_centroids differ in length")
    if p_cls.size != len(np.asarray(pred_centroids).reshape(-1, 2)):
        raise ValueError("pred_classes and pred_centroids differ in length")
    res = detection_scores_from_pairs(
        t_allowed[pairs[:, 0]], p_cls[pairs[:, 1]], t_allowed[ut], p_cls[up], groups
    )
    res["pairs"] = pairs
    return res


# --------------------------------------------------------------------------------------------
# Calibration
# --------------------------------------------------------------------------------------------
def expected_calibration_error(confidence: npt.ArrayLike, correct: npt.ArrayLike, n_bins: int = 15) -> float:
    """Expected calibration error of a classifier's confidences (Guo et al. 2017).

    The confidences are put in ``n_bins`` equal-width bins over [0, 1]; ECE is the mean over
    bins of ``|accuracy - mean confidence|`` weighted by the bin's share of the samples.

    Parameters
    ----------
    confidence : array_like of float, shape (n,)
        Probability the model gave to the class it predicted.
    correct : array_like of bool, shape (n,)
        Whether that class was right.
    n_bins : int

    Returns
    -------
    float
        ECE in [0, 1]; NaN for no samples.
    """
    conf = np.asarray(confidence, np.float64).ravel()
    ok = np.asarray(correct, bool).ravel()
    if conf.shape != ok.shape:
        raise ValueError("confidence and correct differ in length")
    if not len(conf):
        return math.nan
    idx = np.clip((conf * n_bins).astype(np.int64), 0, n_bins - 1)
    ece = 0.0
    for b in range(n_bins):
        sel = idx == b
        if sel.any():
            ece += sel.mean() * abs(ok[sel].mean() - conf[sel].mean())
    return float(ece)

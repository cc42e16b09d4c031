"""Instance-segmentation metrics: pairwise overlap, binary PQ, AJI, Dice and multi-class PQ.

Every metric is a pure function over instance maps (integer arrays, 0 = background, any
positive id = one nucleus; ids need not be consecutive), following the reference
implementations: binary Panoptic Quality (PQ = DQ x SQ), AJI and Dice as in HoVer-Net (Graham et
al. 2019, ``metrics/stats_utils.py``: ``get_fast_pq``, ``get_fast_aji``, ``get_dice_1``) and
multi-class PQ (mPQ) as in the PanNuke evaluation (Gamper et al. 2020), with a pooled
(CoNIC-style) variant. All pairwise quantities come from one sparse contingency table of
(true id, pred id) pixel counts (:func:`instance_overlap`, one pass over the image).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy.optimize import linear_sum_assignment

from ..schema import CLASS_NAMES
from ._common import FloatArray, IntArray, compact_ids, nanmean
from .classes import PANNUKE_CLASS_IDS

__all__ = [
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
]


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
    t_labels, t_idx, t_area = compact_ids(t, "true")
    p_labels, p_idx, p_area = compact_ids(p, "pred")
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
    return pq_from_counts(tp, ov.pred_labels.size - tp, ov.true_labels.size - tp, float(iou.sum()))


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
        "mean": {k: nanmean(r[k] for r in items) for k in ("pq", "dq", "sq")},
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
    classes: Sequence[int] = PANNUKE_CLASS_IDS,
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
    return {"per_class": per_class, "mpq": nanmean(scored), "mpq_strict": nanmean(strict)}


def multiclass_pq(
    true_inst: npt.ArrayLike,
    true_class: npt.ArrayLike,
    pred_inst: npt.ArrayLike,
    pred_class: npt.ArrayLike,
    classes: Sequence[int] = PANNUKE_CLASS_IDS,
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
        classes = list(items[0]["per_class"]) if items else list(PANNUKE_CLASS_IDS)
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
            "mean": nanmean(s["pq"] for s in rows if s["n_true"] > 0),
            "mean_strict": nanmean(s["pq"] for s in rows),
            "n_images": sum(int(s["n_true"]) > 0 for s in rows),
            "pooled": pooled,
        }

    image_mpq = []
    image_mpq_strict = []
    for r in items:
        pcs = [r["per_class"][c] for c in scored]
        image_mpq.append(nanmean(s["pq"] for s in pcs if s["n_true"] > 0))
        image_mpq_strict.append(nanmean(s["pq"] for s in pcs))
    return {
        "classes": scored,
        "excluded_classes": excluded,
        "mpq": {
            "per_image": nanmean(image_mpq),
            "per_image_strict": nanmean(image_mpq_strict),
            "pooled": nanmean(per_class[c]["pooled"]["pq"] for c in scored),
        },
        "per_class": per_class,
        "n_images": len(items),
        "n_images_scored": sum(not math.isnan(v) for v in image_mpq),
    }

"""Centroid detection and classification scores: one centroid matcher and HoVer-Net's F1s.

:func:`match_centroids` is the one-to-one pairing of true and predicted nucleus centres used
everywhere in the package (evaluation, the demo, the tests); :func:`detection_scores` scores a
pairing as HoVer-Net's ``compute_stats.py`` does, generalised to ground truth whose class is
only known up to a set of PanNuke classes (the ``allowed`` bitmask, see
:mod:`wsi_nuclei.eval.classes`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy.optimize import linear_sum_assignment
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree

from ._common import FloatArray, IntArray, compact_ids
from .classes import UNKNOWN_ALLOWED, default_class_groups

__all__ = [
    "instance_centroids",
    "match_centroids",
    "detection_scores_from_pairs",
    "detection_scores",
]


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
    labels, index, area = compact_ids(arr, "inst")
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
    pairs: IntArray = np.zeros((0, 2), np.int64)
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

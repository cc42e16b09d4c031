"""Tests of the wsi_nuclei.eval metrics on tiny hand-computed cases, edge cases and a brute-force check."""

from __future__ import annotations

import math

import numpy as np
import pytest

import wsi_nuclei.eval as M

# --------------------------------------------------------------------------------------------
# A small hand-computed scene (6 x 6)
#
#   true: T1 = rows 0-1, cols 0-1 (4 px)      pred: P5 = rows 0-1, cols 0-2 (6 px)
#         T2 = rows 3-5, cols 3-5 (9 px)            P9 = rows 3-5, cols 3-4 (6 px)
#         T3 = pixel (0, 5)       (1 px)            P7 = pixel (5, 0)       (1 px)
#
#   IoU(T1, P5) = 4 / 6 = 2/3, IoU(T2, P9) = 6 / 9 = 2/3, nothing else overlaps.
#   PQ:   TP = 2, FP = 1 (P7), FN = 1 (T3)
#         DQ = 2 / (2 + 0.5 + 0.5) = 2/3, SQ = (2/3 + 2/3) / 2 = 2/3, PQ = 4/9
#   AJI:  inter = 4 + 6 = 10; union = 6 + 9 (pairs) + 1 (T3 unmatched) + 1 (P7 unused) = 17
#   Dice: |T| = 14, |P| = 13, |T ∩ P| = 10 -> 20 / 27
# --------------------------------------------------------------------------------------------


def _scene() -> tuple[np.ndarray, np.ndarray]:
    t = np.zeros((6, 6), np.int32)
    t[0:2, 0:2] = 1
    t[3:6, 3:6] = 2
    t[0, 5] = 3
    p = np.zeros((6, 6), np.int32)
    p[0:2, 0:3] = 5
    p[3:6, 3:5] = 9
    p[5, 0] = 7
    return t, p


def test_pair_instances_hand() -> None:
    t, p = _scene()
    iou, tl, pl = M.pair_instances(t, p)
    assert tl.tolist() == [1, 2, 3]
    assert pl.tolist() == [5, 7, 9]
    expected = np.array([[2 / 3, 0, 0], [0, 0, 2 / 3], [0, 0, 0]])
    np.testing.assert_allclose(iou, expected)


def test_panoptic_quality_hand() -> None:
    t, p = _scene()
    r = M.panoptic_quality(t, p)
    assert (r["tp"], r["fp"], r["fn"]) == (2, 1, 1)
    assert r["dq"] == pytest.approx(2 / 3)
    assert r["sq"] == pytest.approx(2 / 3)
    assert r["pq"] == pytest.approx(4 / 9)
    assert r["iou_sum"] == pytest.approx(4 / 3)


def test_aji_and_dice_hand() -> None:
    t, p = _scene()
    assert M.aji(t, p) == pytest.approx(10 / 17)
    assert M.dice(t, p) == pytest.approx(20 / 27)
    # dice only looks at the foreground: binary masks give the same
    assert M.dice(t > 0, p > 0) == pytest.approx(20 / 27)


def test_perfect_prediction() -> None:
    t, _ = _scene()
    relabelled = np.where(t > 0, t * 10 + 3, 0)  # different, non-consecutive ids
    r = M.panoptic_quality(t, relabelled)
    assert (r["pq"], r["dq"], r["sq"]) == (1.0, 1.0, 1.0)
    assert M.aji(t, relabelled) == 1.0
    assert M.dice(t, relabelled) == 1.0


def test_iou_exactly_half_is_not_a_match() -> None:
    # true: 2 px; pred: those 2 px + 2 more -> IoU = 2 / 4 = 0.5, not > 0.5
    t = np.zeros((2, 4), np.int32)
    t[0, 0:2] = 1
    p = np.zeros((2, 4), np.int32)
    p[0, 0:4] = 1
    r = M.panoptic_quality(t, p)
    assert (r["tp"], r["fp"], r["fn"]) == (0, 1, 1)
    assert (r["pq"], r["dq"], r["sq"]) == (0.0, 0.0, 0.0)
    # a lower threshold (Hungarian path) matches it: DQ = 1, SQ = 0.5
    r = M.panoptic_quality(t, p, iou_threshold=0.4)
    assert (r["tp"], r["fp"], r["fn"]) == (1, 0, 0)
    assert r["pq"] == pytest.approx(0.5)
    # AJI has no threshold: 2 / 4
    assert M.aji(t, p) == pytest.approx(0.5)


def test_merge_of_two_true_nuclei() -> None:
    # true: G1 = row 0-1, cols 0-2 (6 px); G2 = rows 0-1, col 3 (2 px)
    # pred: one 2 x 4 blob (8 px) covering both.
    # IoU(G1, P) = 6/8 = 0.75 (match), IoU(G2, P) = 2/8 -> TP 1, FP 0, FN 1
    # DQ = 1 / 1.5 = 2/3, SQ = 0.75, PQ = 0.5
    # AJI: both G pick P: inter 6 + 2 = 8, union 8 + 8 = 16 (P counted twice) -> 0.5
    t = np.zeros((3, 4), np.int32)
    t[0:2, 0:3] = 1
    t[0:2, 3] = 2
    p = np.zeros((3, 4), np.int32)
    p[0:2, :] = 4
    r = M.panoptic_quality(t, p)
    assert (r["tp"], r["fp"], r["fn"]) == (1, 0, 1)
    assert r["dq"] == pytest.approx(2 / 3)
    assert r["sq"] == pytest.approx(0.75)
    assert r["pq"] == pytest.approx(0.5)
    assert M.aji(t, p) == pytest.approx(0.5)
    assert M.dice(t, p) == pytest.approx(1.0)


def test_split_of_one_true_nucleus() -> None:
    # true: one 2 x 4 blob (8 px); pred: P1 = cols 0-2 (6 px), P2 = col 3 (2 px)
    # IoU(T, P1) = 0.75 match, IoU(T, P2) = 0.25 -> TP 1, FP 1, FN 0 -> PQ = 2/3 * 0.75 = 0.5
    # AJI: T picks P1: inter 6, union 8; P2 unused: + 2 -> 6 / 10
    t = np.zeros((3, 4), np.int32)
    t[0:2, :] = 1
    p = np.zeros((3, 4), np.int32)
    p[0:2, 0:3] = 1
    p[0:2, 3] = 2
    r = M.panoptic_quality(t, p)
    assert (r["tp"], r["fp"], r["fn"]) == (1, 1, 0)
    assert r["pq"] == pytest.approx(0.5)
    assert M.aji(t, p) == pytest.approx(0.6)


def test_aji_tie_prefers_larger_intersection() -> None:
    # T (4 px, cols 0-3) overlaps A (2 px, cols 0-1: IoU 2/4) and B (cols 2-5: inter 2,
    # union 6 -> 1/3) -> A chosen; B unused adds 4: AJI = 2 / (4 + 4)
    t = np.zeros((1, 6), np.int32)
    t[0, 0:4] = 1
    p = np.zeros((1, 6), np.int32)
    p[0, 0:2] = 1
    p[0, 2:6] = 2
    assert M.aji(t, p) == pytest.approx(2 / 8)


@pytest.mark.parametrize("which", ["both", "true", "pred"])
def test_empty_maps(which: str) -> None:
    t, p = _scene()
    if which in ("both", "true"):
        t = np.zeros_like(t)
    if which in ("both", "pred"):
        p = np.zeros_like(p)
    r = M.panoptic_quality(t, p)
    if which == "both":
        assert math.isnan(r["pq"]) and math.isnan(r["dq"]) and math.isnan(r["sq"])
        assert math.isnan(M.aji(t, p)) and math.isnan(M.dice(t, p))
        assert (r["tp"], r["fp"], r["fn"]) == (0, 0, 0)
    else:
        assert (r["pq"], r["dq"], r["sq"]) == (0.0, 0.0, 0.0)
        assert M.aji(t, p) == 0.0 and M.dice(t, p) == 0.0
        assert r["fn"] == (3 if which == "pred" else 0)
        assert r["fp"] == (3 if which == "true" else 0)


def test_input_validation() -> None:
    with pytest.raises(ValueError):
        M.panoptic_quality(np.zeros((2, 2), int), np.zeros((2, 3), int))
    with pytest.raises(TypeError):
        M.panoptic_quality(np.zeros((2, 2), float), np.zeros((2, 2), int))
    with pytest.raises(ValueError):
        M.panoptic_quality(-np.ones((2, 2), int), np.zeros((2, 2), int))


def test_huge_sparse_ids() -> None:
    t, p = _scene()
    big_t = np.where(t > 0, t.astype(np.int64) * 1_000_000_007, 0)
    big_p = np.where(p > 0, p.astype(np.int64) * 999_999_937, 0)
    assert M.panoptic_quality(big_t, big_p) == M.panoptic_quality(t, p)
    assert M.aji(big_t, big_p) == pytest.approx(10 / 17)


def test_aggregate_pq_mean_and_pooled() -> None:
    t, p = _scene()
    a = M.panoptic_quality(t, p)  # TP 2 FP 1 FN 1, iou 4/3, PQ 4/9
    b = M.panoptic_quality(t == 1, t == 1)  # TP 1, iou 1, PQ 1
    c = M.panoptic_quality(np.zeros((3, 3), int), np.zeros((3, 3), int))  # undefined
    agg = M.aggregate_pq([a, b, c])
    # mean over the two scored images
    assert agg["mean"]["pq"] == pytest.approx((4 / 9 + 1) / 2)
    assert agg["mean"]["sq"] == pytest.approx((2 / 3 + 1) / 2)
    # pooled: TP 3, FP 1, FN 1, iou 7/3 -> DQ 3/4, SQ 7/9, PQ 7/12
    assert agg["pooled"]["dq"] == pytest.approx(0.75)
    assert agg["pooled"]["sq"] == pytest.approx(7 / 9)
    assert agg["pooled"]["pq"] == pytest.approx(7 / 12)
    assert (agg["n_images"], agg["n_images_scored"]) == (3, 2)


# --------------------------------------------------------------------------------------------
# Brute force cross-check (naive per-pair masks) on random overlapping rectangles
# --------------------------------------------------------------------------------------------
def _random_map(rng: np.random.Generator, n: int, shape: tuple[int, int] = (40, 40)) -> np.ndarray:
    out = np.zeros(shape, np.int32)
    ids = rng.choice(np.arange(1, 500), size=n, replace=False)
    for i in ids:
        r, c = rng.integers(0, shape[0] - 3), rng.integers(0, shape[1] - 3)
        h, w = rng.integers(2, 9, size=2)
        out[r : r + h, c : c + w] = i
    return out


def _naive(t: np.ndarray, p: np.ndarray) -> tuple[float, float]:
    tl = [i for i in np.unique(t) if i]
    pl = [j for j in np.unique(p) if j]
    iou = np.zeros((len(tl), len(pl)))
    inter = np.zeros_like(iou)
    union = np.zeros_like(iou)
    for a, i in enumerate(tl):
        for b, j in enumerate(pl):
            inter[a, b] = np.sum((t == i) & (p == j))
            union[a, b] = np.sum((t == i) | (p == j))
            iou[a, b] = inter[a, b] / union[a, b]
    tp = int((iou > 0.5).sum())
    fp, fn = len(pl) - tp, len(tl) - tp
    pq = (tp / (tp + 0.5 * fp + 0.5 * fn)) * (iou[iou > 0.5].sum() / tp if tp else 0.0)
    # AJI (Kumar): best IoU prediction per true nucleus, unused predictions added to the union
    num = den = 0.0
    used: set[int] = set()
    for a, i in enumerate(tl):
        if iou.shape[1] and iou[a].max() > 0:
            best = max(range(len(pl)), key=lambda b: (iou[a, b], inter[a, b], -b))
            num += inter[a, best]
            den += union[a, best]
            used.add(best)
        else:
            den += np.sum(t == i)
    den += sum(np.sum(p == j) for b, j in enumerate(pl) if b not in used)
    return pq, num / den


@pytest.mark.parametrize("seed", range(8))
def test_against_brute_force(seed: int) -> None:
    rng = np.random.default_rng(seed)
    t = _random_map(rng, 12)
    p = _random_map(rng, 12)
    if seed % 2:  # also near-copies of the truth
        p = np.where(rng.random(t.shape) < 0.9, t, p)
    pq, aji = _naive(t, p)
    assert M.panoptic_quality(t, p)["pq"] == pytest.approx(pq)
    assert M.aji(t, p) == pytest.approx(aji)
    ref_dice = 2 * np.sum((t > 0) & (p > 0)) / (np.sum(t > 0) + np.sum(p > 0))
    assert M.dice(t, p) == pytest.approx(ref_dice)


# --------------------------------------------------------------------------------------------
# Multi-class PQ
#
#   true: T1 class 1, T2 class 2, T3 class 0 (not exact), T4 class 2   (4 separate squares)
#   pred: P1 = copy of T1 class 1, P2 = copy of T2 class 3, P3 = copy of T3 class 1
#   (all matched pairs have IoU 1).
#   class 1: n_true 1, n_pred 2, TP 1 -> FP 1, FN 0: DQ = 1/1.5 = 2/3, SQ 1, PQ 2/3
#   class 2: n_true 2, TP 0 -> FN 2: PQ 0
#   class 3: n_true 0, n_pred 1: FP 1, PQ 0 (strict), skipped by PanNuke's rule
#   class 4, 5: nothing -> NaN
#   image mPQ (PanNuke) = mean(2/3, 0) = 1/3; strict = mean(2/3, 0, 0) = 2/9
#   With true_allowed[T3] = 31: P3 (class 1 on a nucleus that may be class 1) is ignored:
#   class 1 FP 0 -> PQ 1, mPQ = 1/2. With allowed 30 (not neoplastic) it stays an FP.
# --------------------------------------------------------------------------------------------
def _class_scene() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    t = np.zeros((12, 12), np.int32)
    t[0:3, 0:3] = 1
    t[0:3, 6:9] = 2
    t[6:9, 0:3] = 3
    t[6:9, 6:9] = 4
    true_class = np.array([0, 1, 2, 0, 2])
    p = np.zeros_like(t)
    p[t == 1] = 1
    p[t == 2] = 2
    p[t == 3] = 3
    pred_class = np.array([0, 1, 3, 1])
    return t, true_class, p, pred_class


def test_multiclass_pq_hand() -> None:
    t, tc, p, pc = _class_scene()
    r = M.multiclass_pq(t, tc, p, pc)
    c = r["per_class"]
    assert (c[1]["tp"], c[1]["fp"], c[1]["fn"]) == (1, 1, 0)
    assert c[1]["pq"] == pytest.approx(2 / 3)
    assert (c[2]["tp"], c[2]["fp"], c[2]["fn"]) == (0, 0, 2) and c[2]["pq"] == 0.0
    assert (c[3]["tp"], c[3]["fp"], c[3]["fn"]) == (0, 1, 0) and c[3]["pq"] == 0.0
    assert math.isnan(c[4]["pq"]) and math.isnan(c[5]["pq"])
    assert r["mpq"] == pytest.approx(1 / 3)
    assert r["mpq_strict"] == pytest.approx(2 / 9)


def test_multiclass_pq_ignores_predictions_on_ambiguous_truth() -> None:
    t, tc, p, pc = _class_scene()
    unknown = np.array([0, 1, 2, 31, 2])
    r = M.multiclass_pq(t, tc, p, pc, true_allowed=unknown)
    assert r["per_class"][1]["n_ignored"] == 1
    assert r["per_class"][1]["fp"] == 0 and r["per_class"][1]["pq"] == pytest.approx(1.0)
    assert r["mpq"] == pytest.approx(0.5)
    not_neo = np.array([0, 1, 2, 30, 2])
    r = M.multiclass_pq(t, tc, p, pc, true_allowed=not_neo)
    assert r["per_class"][1]["fp"] == 1 and r["per_class"][1]["pq"] == pytest.approx(2 / 3)


def test_multiclass_pq_validates_tables() -> None:
    t, tc, p, pc = _class_scene()
    with pytest.raises(ValueError):
        M.multiclass_pq(t, tc[:3], p, pc)
    with pytest.raises(ValueError):
        M.multiclass_pq(t, tc, p, pc[:2])


def test_aggregate_multiclass_pq() -> None:
    # image A: the scene above. image B: T1 class 1 matched by P1 class 1 (IoU 1), plus two
    # isolated false positives of classes 3 and 2.
    t, tc, p, pc = _class_scene()
    a = M.multiclass_pq(t, tc, p, pc)
    tb = np.zeros((12, 12), np.int32)
    tb[0:3, 0:3] = 1
    pb = tb.copy()
    pb[6:9, 6:9] = 2
    pb[9:12, 0:3] = 3
    b = M.multiclass_pq(tb, np.array([0, 1]), pb, np.array([0, 1, 3, 2]))
    agg = M.aggregate_multiclass_pq([a, b])
    # class 3 is predicted but never labelled: excluded like 4 and 5
    assert agg["classes"] == [1, 2]
    assert agg["excluded_classes"] == [3, 4, 5]
    # PanNuke: A = mean(2/3, 0) = 1/3; B = PQ_1 = 1 (no class-2 truth in B) -> 2/3
    assert agg["mpq"]["per_image"] == pytest.approx(2 / 3)
    # strict: A = 1/3, B = mean(1, 0) = 1/2 -> 5/12
    assert agg["mpq"]["per_image_strict"] == pytest.approx(5 / 12)
    # pooled: class 1 TP 2 FP 1 FN 0 -> DQ 0.8, SQ 1; class 2 TP 0 FP 1 FN 2 -> 0; mean 0.4
    assert agg["per_class"][1]["pooled"]["pq"] == pytest.approx(0.8)
    assert agg["per_class"][2]["pooled"]["pq"] == 0.0
    assert agg["mpq"]["pooled"] == pytest.approx(0.4)
    # per-class mean over images with that class in the truth
    assert agg["per_class"][1]["mean"] == pytest.approx(5 / 6)
    assert agg["per_class"][2]["mean"] == 0.0
    assert agg["per_class"][2]["n_images"] == 1


# --------------------------------------------------------------------------------------------
# Class sets
# --------------------------------------------------------------------------------------------
def test_class_sets() -> None:
    assert M.classes_to_allowed([0, 1, 2, 3, 4, 5]).tolist() == [31, 1, 2, 4, 8, 16]
    assert M.allowed_name(17) == "Neoplastic|Epithelial"
    assert M.allowed_name(30) == "Non-neoplastic"
    assert M.allowed_name(31) == "Unknown"
    assert M.default_class_groups(np.array([31, 17, 2, 4, 2, 0])) == {
        "Inflammatory": 2,
        "Connective": 4,
        "Neoplastic|Epithelial": 17,
    }
    assert list(M.default_class_groups([16, 8, 4, 2, 1])) == [
        "Neoplastic",
        "Inflammatory",
        "Connective",
        "Dead",
        "Epithelial",
    ]
    assert M.default_class_groups([1, 30]) == {"Neoplastic": 1, "Non-neoplastic": 30}
    with pytest.raises(ValueError):
        M.allowed_name(32)


# --------------------------------------------------------------------------------------------
# Centroid detection and per-class F1
# --------------------------------------------------------------------------------------------
def test_instance_centroids() -> None:
    t, _ = _scene()
    xy, labels = M.instance_centroids(t)
    assert labels.tolist() == [1, 2, 3]
    np.testing.assert_allclose(xy, [[0.5, 0.5], [4.0, 4.0], [0.0, 5.0]])
    xy, labels = M.instance_centroids(np.zeros((4, 4), int))
    assert xy.shape == (0, 2) and labels.size == 0


def test_match_centroids_radius_inclusive_and_maximal() -> None:
    t = [[0.0, 0.0], [0.0, 30.0]]
    p = [[0.0, 12.0], [0.0, 42.5]]  # 12 px: paired (<=); 12.5 px: not
    pairs, ut, up = M.match_centroids(t, p, 12.0)
    assert pairs.tolist() == [[0, 0]] and ut.tolist() == [1] and up.tolist() == [1]
    # nearest-first greedy would pair A-P (5) and leave B-Q at 18 > 8: the assignment finds 2
    t = [[0.0, 0.0], [0.0, 11.0]]  # A, B
    p = [[0.0, 5.0], [0.0, -7.0]]  # P, Q
    pairs, ut, up = M.match_centroids(t, p, 8.0)
    assert pairs.tolist() == [[0, 1], [1, 0]] and ut.size == 0 and up.size == 0
    # empty sides
    pairs, ut, up = M.match_centroids(np.zeros((0, 2)), p, 8.0)
    assert pairs.shape == (0, 2) and ut.size == 0 and up.tolist() == [0, 1]


def test_match_centroids_maximises_pairs_in_dense_cluster() -> None:
    # a 1-D chain: true at 0, 10, 20, 30; pred at 5, 15, 25, 35 (radius 6): 4 pairs
    t = np.array([[0.0, x] for x in (0, 10, 20, 30)])
    p = np.array([[0.0, x] for x in (5, 15, 25, 35)])
    pairs, ut, up = M.match_centroids(t, p, 6.0)
    assert len(pairs) == 4 and ut.size == 0 and up.size == 0


def test_detection_scores_hand() -> None:
    # true (allowed): t0 (0,0) 2, t1 (0,30) 4, t2 (0,60) 17, t3 (0,90) 31, t4 (100,0) 17
    # pred (class):   p0 (3,4) 2 -> t0 (5 px); p1 (0,42) 5 -> t1 (12 px);
    #                 p2 (0,72.5) 1 unpaired; p3 (50,50) 3 unpaired; p4 (100,1) 1 -> t4
    # detection: TP 3, FP 2 (p2, p3), FN 2 (t2, t3): P = R = F1 = 3/5
    # accuracy over typed pairs (t0/p0 ok, t1/p1 wrong, t4/p4 ok): 2/3
    # Inflammatory (2):  TP 1 (t0/p0)                                 -> F1 = 2/2 = 1
    # Connective (4):    FN 1 (t1/p1), FP_d 1 (p3)                    -> 0 / (0+2+1) = 0
    # Neo|Epi (17):      TP 1 (t4/p4), FP 1 (t1 is 4, p1 is 5), FP_d 1 (p2), FN_d 1 (t2)
    #                    -> 2 / (2 + 2 + 1 + 1) = 1/3   (t3 unknown: ignored)
    t = [[0, 0], [0, 30], [0, 60], [0, 90], [100, 0]]
    ta = [2, 4, 17, 31, 17]
    p = [[3, 4], [0, 42], [0, 72.5], [50, 50], [100, 1]]
    pc = [2, 5, 1, 3, 1]
    r = M.detection_scores(t, ta, p, pc, 12.0)
    assert (r["tp"], r["fp"], r["fn"]) == (3, 2, 2)
    assert r["precision"] == pytest.approx(0.6)
    assert r["recall"] == pytest.approx(0.6)
    assert r["f1"] == pytest.approx(0.6)
    assert r["accuracy"] == pytest.approx(2 / 3)
    g = r["groups"]
    assert list(g) == ["Inflammatory", "Connective", "Neoplastic|Epithelial"]
    assert g["Inflammatory"]["f1"] == pytest.approx(1.0)
    assert g["Connective"]["f1"] == 0.0
    assert (g["Connective"]["fn"], g["Connective"]["fp_d"]) == (1, 1)
    ne = g["Neoplastic|Epithelial"]
    assert (ne["tp"], ne["fp"], ne["fn"], ne["fp_d"], ne["fn_d"]) == (1, 1, 0, 1, 1)
    assert ne["f1"] == pytest.approx(1 / 3)
    assert ne["n_true"] == 2 and ne["n_pred"] == 3


def test_detection_scores_tn_not_counted_and_custom_groups() -> None:
    # Adding correctly classified inflammatory pairs does not change the connective F1
    # (TN_c = 0 as in HoVer-Net's _f1_type).
    base_t, base_a = [[0, 0]], [4]
    base_p, base_c = [[0, 1]], [3]
    r0 = M.detection_scores(base_t, base_a, base_p, base_c, groups={"Conn": 4})
    more_t = base_t + [[50, 50], [80, 80]]
    more_p = base_p + [[50, 51], [80, 81]]
    r1 = M.detection_scores(more_t, base_a + [2, 2], more_p, base_c + [2, 2], groups={"Conn": 4})
    assert r0["groups"]["Conn"]["f1"] == r1["groups"]["Conn"]["f1"] == 1.0
    # a group straddling an allowed set: truth 30 (not neoplastic) vs group Neo|Epi (17) is
    # ambiguous; an epithelial prediction on it is neither TP nor FP
    r = M.detection_scores([[0, 0]], [30], [[0, 0]], [5], groups={"NE": 17, "Neo": 1})
    assert (r["groups"]["NE"]["tp"], r["groups"]["NE"]["fp"]) == (0, 0)
    assert math.isnan(r["groups"]["NE"]["f1"])
    assert r["accuracy"] == 1.0  # 5 (Epithelial) is allowed by 30
    # a neoplastic prediction on it is an FP for Neoplastic
    r = M.detection_scores([[0, 0]], [30], [[0, 0]], [1], groups={"Neo": 1})
    assert r["groups"]["Neo"]["fp"] == 1 and r["groups"]["Neo"]["f1"] == 0.0
    assert r["accuracy"] == 0.0


def test_detection_scores_empty() -> None:
    r = M.detection_scores(np.zeros((0, 2)), [], np.zeros((0, 2)), [])
    assert math.isnan(r["f1"]) and math.isnan(r["precision"]) and r["groups"] == {}
    r = M.detection_scores([[0, 0]], [2], np.zeros((0, 2)), [])
    assert r["recall"] == 0.0 and r["fn"] == 1 and r["groups"]["Inflammatory"]["f1"] == 0.0


def test_pooled_detection_equals_concatenation() -> None:
    # scores_from_pairs on concatenated arrays = pooled over images
    r = M.detection_scores_from_pairs([2, 4], [2, 3], [17], [1], groups={"Inf": 2})
    assert (r["tp"], r["fp"], r["fn"]) == (2, 1, 1)
    assert r["groups"]["Inf"]["f1"] == 1.0


# --------------------------------------------------------------------------------------------
# A MoNuSeg-sized image (speed is measured by benchmarks, not asserted here)
# --------------------------------------------------------------------------------------------
def test_monuseg_sized_image() -> None:
    rng = np.random.default_rng(0)
    t = np.zeros((1000, 1000), np.int32)
    centres = rng.integers(10, 990, size=(420, 2))
    for i, (r, c) in enumerate(centres, start=1):
        t[r - 7 : r + 7, c - 6 : c + 6] = i
    p = np.roll(t, (1, 2), axis=(0, 1)) * 3
    ov = M.instance_overlap(t, p)
    pq = M.pq_from_overlap(ov)
    M.aji_from_overlap(ov)
    M.dice_from_overlap(ov)
    M.multiclass_pq_from_overlap(ov, np.ones(t.max() + 1, int), np.ones(p.max() + 1, int))
    tc, _ = M.instance_centroids(t)
    pc, _ = M.instance_centroids(p)
    M.detection_scores(tc, np.full(len(tc), 31), pc, np.ones(len(pc), int))
    assert pq["tp"] > 300

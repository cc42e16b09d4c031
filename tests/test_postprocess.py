"""Tests of wsi_nuclei.postprocess against known answers: HoVer-Net post-processing of perfect
maps (touching nuclei included), majority-vote classification, and morphometry/polygons of
shapes of known size."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi
from shapely.geometry import Point, Polygon
from skimage.draw import disk, ellipse

from wsi_nuclei.datasets import hv_targets
from wsi_nuclei.eval import panoptic_quality
from wsi_nuclei.postprocess import HVParams, classify_instances, hv_to_instances, measure_instances

# --------------------------------------------------------------------------------------------
# hv_to_instances on perfect maps
# --------------------------------------------------------------------------------------------

# (row, col, radius, PanNuke class); the first two pairs touch (centre distance < r1 + r2),
# the third group is a chain of three touching ellipses, the rest stand alone.
_DISCS = [
    (30, 30, 12, 1),
    (30, 52, 11, 2),
    (90, 40, 13, 3),
    (112, 52, 12, 5),
    (40, 110, 9, 2),
    (120, 120, 10, 4),
    (200, 200, 14, 1),
]
_ELLIPSES = [(170, 60, 16, 8, 0.3, 5), (174, 76, 14, 9, -0.2, 1), (188, 92, 12, 7, 0.9, 3)]


def _scene(size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    inst = np.zeros((size, size), np.int32)
    cls = [0]
    for r, c, rad, k in _DISCS:
        rr, cc = disk((r, c), rad, shape=inst.shape)
        inst[rr, cc] = len(cls)
        cls.append(k)
    for r, c, a, b, rot, k in _ELLIPSES:
        rr, cc = ellipse(r, c, a, b, shape=inst.shape, rotation=rot)
        inst[rr, cc] = len(cls)
        cls.append(k)
    return inst, np.asarray(cls)


def _perfect_maps(inst: np.ndarray, cls: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    np_prob = (inst > 0).astype(np.float32)
    hv = hv_targets(inst)
    tp = np.zeros((6,) + inst.shape, np.float32)
    rows, cols = np.indices(inst.shape)
    tp[cls[inst], rows, cols] = 1.0  # one-hot, background -> channel 0
    return np_prob, hv, tp


def _pairing(true: np.ndarray, pred: np.ndarray) -> dict[int, int]:
    """true label -> pred label with the largest overlap."""
    out = {}
    for t in range(1, int(true.max()) + 1):
        vals, counts = np.unique(pred[true == t], return_counts=True)
        keep = vals > 0
        if keep.any():
            out[t] = int(vals[keep][np.argmax(counts[keep])])
    return out


def test_scene_has_touching_nuclei() -> None:
    inst, _ = _scene()
    _, n_components = ndi.label(inst > 0)
    assert inst.max() == 10 and n_components == 6  # 10 nuclei in 6 connected blobs


def test_hv_to_instances_recovers_perfect_maps() -> None:
    inst, cls = _scene()
    np_prob, hv, tp = _perfect_maps(inst, cls)
    res = hv_to_instances(np_prob, hv, tp)
    n = int(res.inst.max())
    assert n == inst.max()
    np.testing.assert_array_equal(res.labels, np.arange(1, n + 1))
    np.testing.assert_array_equal(np.unique(res.inst), np.arange(n + 1))
    assert res.inst.dtype == np.int32 and res.inst.shape == inst.shape
    pq = panoptic_quality(inst, res.inst)
    assert pq["tp"] == 10 and pq["fp"] == 0 and pq["fn"] == 0
    assert pq["pq"] > 0.9
    # classes by majority vote; probability of the (one-hot) winner is 1 up to the few seam
    # pixels given to a touching neighbour
    pairs = _pairing(inst, res.inst)
    assert sorted(pairs.values()) == list(range(1, 11))
    for t, p in pairs.items():
        assert res.class_id[p - 1] == cls[t]
    assert res.class_id.dtype == np.int8
    assert res.class_prob.min() > 0.98
    assert res.class_probs.shape == (10, 5)
    np.testing.assert_allclose(res.class_probs.sum(1), 1.0, atol=1e-5)


def test_hv_to_instances_noisy_class_map_majority_vote() -> None:
    inst, cls = _scene()
    np_prob, hv, tp = _perfect_maps(inst, cls)
    # 30% of each nucleus' pixels vote for another class, soft probabilities everywhere
    rng = np.random.default_rng(0)
    flip = (rng.random(inst.shape) < 0.3) & (inst > 0)
    other = (cls[inst] % 5) + 1  # a different foreground class
    rows, cols = np.nonzero(flip)
    tp[:, rows, cols] = 0
    tp[other[rows, cols], rows, cols] = 1
    tp = 0.6 * tp + 0.4 / 6
    res = hv_to_instances(np_prob * 0.9 + 0.05, hv, tp)
    pairs = _pairing(inst, res.inst)
    assert len(pairs) == 10
    for t, p in pairs.items():
        assert res.class_id[p - 1] == cls[t]
        assert 0.4 < res.class_prob[p - 1] < 0.7


def test_hv_to_instances_without_classes_and_empty() -> None:
    inst, cls = _scene(160)
    np_prob, hv, _ = _perfect_maps(inst, cls)
    res = hv_to_instances(np_prob * 0.8, hv * 0.9)  # np 0.8 on nuclei, hv not quite +-1
    present = np.unique(inst[inst > 0])  # 1-6 whole, a piece of ellipse 8 at the border
    assert res.inst.max() == len(present) == 7
    pq = panoptic_quality(inst, res.inst)
    assert pq["tp"] == 7 and pq["pq"] > 0.9
    assert res.class_probs is None
    np.testing.assert_array_equal(res.class_id, 0)
    np.testing.assert_allclose(res.class_prob, 0.8, atol=1e-6)  # mean nucleus probability

    empty = hv_to_instances(
        np.zeros((64, 64), np.float32),
        np.zeros((2, 64, 64), np.float32),
        np.full((6, 64, 64), 1 / 6, np.float32),
    )
    assert empty.inst.max() == 0 and len(empty.labels) == 0 and len(empty.class_id) == 0
    assert empty.class_probs.shape == (0, 5)


def test_hv_to_instances_drops_small_objects() -> None:
    inst = np.zeros((64, 64), np.int32)
    rr, cc = disk((20, 20), 8)
    inst[rr, cc] = 1
    inst[50:52, 50:53] = 2  # 6 px < min_nucleus_px
    np_prob = (inst > 0).astype(np.float32)
    res = hv_to_instances(np_prob, hv_targets(inst), params=HVParams(min_nucleus_px=10))
    assert res.inst.max() == 1
    assert res.inst[50:52, 50:53].max() == 0


# --------------------------------------------------------------------------------------------
# classify_instances on a hand case
# --------------------------------------------------------------------------------------------


def test_classify_instances_hand_case() -> None:
    # Instance 1 = 4 pixels. Channel 0 (background) is removed and the rest renormalised:
    #   3 pixels [bg .5 | .2 .175 .125 0 0] -> [.4 .35 .25 0 0]  (arg-max class 1)
    #   1 pixel  [bg 0  | 0 1 0 0 0]        -> [0 1 0 0 0]       (arg-max class 2)
    # votes: class 1 x3, class 2 x1 -> class 1 (majority vote, although the mean probability
    # of class 2, (3*.35 + 1)/4 = .5125, beats class 1's (3*.4)/4 = .3).
    # Instance 2 = 2 pixels: [0 | 0 0 0 .2 .8] twice -> class 5, probability .8.
    inst = np.array([[1, 1, 1, 1, 0, 2, 2]])
    tp = np.zeros((6, 1, 7), np.float32)
    tp[:, 0, 0] = tp[:, 0, 1] = tp[:, 0, 2] = [0.5, 0.2, 0.175, 0.125, 0, 0]
    tp[:, 0, 3] = [0, 0, 1, 0, 0, 0]
    tp[:, 0, 4] = [1, 0, 0, 0, 0, 0]
    tp[:, 0, 5] = tp[:, 0, 6] = [0, 0, 0, 0, 0.2, 0.8]
    class_id, class_prob, class_probs = classify_instances(inst, tp)
    np.testing.assert_array_equal(class_id, [1, 5])
    assert class_id.dtype == np.int8
    np.testing.assert_allclose(class_prob, [0.3, 0.8], atol=1e-6)
    np.testing.assert_allclose(
        class_probs, [[0.3, 0.5125, 0.1875, 0, 0], [0, 0, 0, 0.2, 0.8]], atol=1e-6
    )
    # n larger than the labels present: absent labels get class 1 with probability 0
    class_id, class_prob, class_probs = classify_instances(inst, tp, 3)
    assert class_probs.shape == (3, 5) and class_prob[2] == 0
    # no instances
    class_id, class_prob, class_probs = classify_instances(np.zeros((1, 7), int), tp)
    assert class_id.shape == (0,) and class_probs.shape == (0, 5)


def test_classify_instances_class_prior_changes_the_vote() -> None:
    # Instance 1: 3 pixels renormalised to [.4 .35 .25 0 0] -> class 1 without a prior.
    # Prior (1, 2, 1, 1, 1): [.4 .7 .25 0 0] / 1.35 -> arg-max class 2 on all 3 pixels.
    inst = np.array([[1, 1, 1]])
    tp = np.zeros((6, 1, 3), np.float32)
    tp[:, 0, :] = np.array([0.5, 0.2, 0.175, 0.125, 0, 0])[:, None]
    assert classify_instances(inst, tp)[0].tolist() == [1]
    class_id, class_prob, probs = classify_instances(inst, tp, prior=(1.0, 2.0, 1.0, 1.0, 1.0))
    assert class_id.tolist() == [2]
    np.testing.assert_allclose(class_prob, [0.7 / 1.35], atol=1e-6)
    np.testing.assert_allclose(probs.sum(axis=1), [1.0], atol=1e-6)
    with pytest.raises(ValueError, match="5 classes"):
        classify_instances(inst, tp, prior=(1.0, 2.0))


# --------------------------------------------------------------------------------------------
# measure_instances on shapes of known size
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shapes() -> tuple[np.ndarray, dict]:
    inst = np.zeros((200, 220), np.int32)
    rr, cc = disk((60, 70), 40, shape=inst.shape)  # big disc, centre pixel (60, 70)
    inst[rr, cc] = 1
    inst[150:170, 20:40] = 2  # 20 x 20 square
    inst[10:12, 150:190] = 3  # 2 x 40 bar
    rr, cc = disk((150, 150), 10, shape=inst.shape)  # a nucleus-sized disc
    inst[rr, cc] = 4
    rr, cc = ellipse(100, 180, 12, 6, shape=inst.shape)  # rows +-12, cols +-6
    inst[rr, cc] = 5
    return inst, measure_instances(inst, np.array([1, 2, 3, 4, 5, 9]), 0.5)


def test_measure_area_centroid_axes(shapes) -> None:
    inst, m = shapes
    mpp = 0.5
    for i, label in enumerate([1, 2, 3, 4, 5]):
        assert m["area_um2"][i] == pytest.approx((inst == label).sum() * mpp**2)
    assert m["area_um2"][1] == pytest.approx(100.0)  # 400 px x 0.25 um2
    assert m["area_um2"][0] == pytest.approx(np.pi * 40**2 * mpp**2, rel=0.01)
    # pixel (r, c) covers [c, c+1) x [r, r+1): its centre is (c + .5, r + .5)
    assert (m["centroid_x"][0], m["centroid_y"][0]) == pytest.approx((70.5, 60.5))
    assert (m["centroid_x"][1], m["centroid_y"][1]) == pytest.approx((30.0, 160.0))
    assert (m["centroid_x"][2], m["centroid_y"][2]) == pytest.approx((170.0, 11.0))
    # ellipse with the same second moments: a disc of radius R -> axes 2R (diameter)
    assert m["major_axis_um"][0] == pytest.approx(80 * mpp, rel=0.01)
    assert m["minor_axis_um"][0] == pytest.approx(80 * mpp, rel=0.01)
    assert m["eccentricity"][0] < 0.05
    # a k x k square has variance k^2/12 per axis -> axes 4 sqrt(k^2/12) = 2k/sqrt(3)
    assert m["major_axis_um"][1] == pytest.approx(4 * np.sqrt(400 / 12) * mpp)
    assert m["minor_axis_um"][1] == pytest.approx(4 * np.sqrt(400 / 12) * mpp)
    # the ellipse: semi-axes 12 (rows) and 6 (cols) -> axes 24 and 12 px
    assert m["major_axis_um"][4] == pytest.approx(24 * mpp, rel=0.05)
    assert m["minor_axis_um"][4] == pytest.approx(12 * mpp, rel=0.05)
    assert m["eccentricity"][4] == pytest.approx(np.sqrt(1 - 0.25), abs=0.02)
    assert m["eccentricity"][2] > 0.99  # 2 x 40 bar
    # a label absent from the map: NaN row, no polygon
    assert np.isnan(m["area_um2"][5]) and m["polygon"][5] is None


def test_measure_perimeter_circularity_solidity(shapes) -> None:
    _, m = shapes
    mpp = 0.5
    # discs: perimeter 2 pi R, circularity ~1 at any size
    assert m["perimeter_um"][0] == pytest.approx(2 * np.pi * 40 * mpp, rel=0.02)
    assert m["perimeter_um"][3] == pytest.approx(2 * np.pi * 10 * mpp, rel=0.03)
    assert m["circularity"][0] > 0.97 and m["circularity"][3] > 0.95
    # square 20 x 20: perimeter 80 px (estimators measure through pixel centres: within 8%)
    assert m["perimeter_um"][1] == pytest.approx(80 * mpp, rel=0.08)
    assert 0.78 <= m["circularity"][1] < 0.93  # pi/4 for an ideal square
    assert m["circularity"][2] < 0.3  # 2 x 40 bar: 4 pi 80 / ~84^2 = 0.14
    # ellipse 24 x 12 px: Ramanujan perimeter 57.8 px
    a, b = 12, 6
    hh = ((a - b) / (a + b)) ** 2
    ram = np.pi * (a + b) * (1 + 3 * hh / (10 + np.sqrt(4 - 3 * hh)))
    assert m["perimeter_um"][4] == pytest.approx(ram * mpp, rel=0.05)
    # convex shapes: solidity 1 (square, bar) or nearly (digitised discs)
    assert m["solidity"][1] == 1.0 and m["solidity"][2] == 1.0
    assert m["solidity"][0] > 0.97 and m["solidity"][3] > 0.95 and m["solidity"][4] > 0.95
    assert np.all(m["circularity"][:5] <= 1.0)


def test_measure_solidity_of_a_non_convex_shape() -> None:
    # a 20 x 20 square with a 10 x 10 quarter cut away: area 300, hull ~350 (+ half-pixel rim)
    inst = np.zeros((30, 30), np.int32)
    inst[5:25, 5:25] = 1
    inst[5:15, 15:25] = 0
    m = measure_instances(inst, np.array([1]), 1.0)
    assert 0.8 < m["solidity"][0] < 0.88


def test_measure_polygons(shapes) -> None:
    inst, m = shapes
    for i, label in enumerate([1, 2, 3, 4, 5]):
        poly = m["polygon"][i]
        assert poly is not None and poly.ndim == 2 and poly.shape[1] == 2 and len(poly) >= 3
        P = Polygon(poly)
        assert P.is_valid
        area_px = (inst == label).sum()
        assert P.area == pytest.approx(area_px, rel=0.03)
        # the outline lies on the pixel edges of the mask: bounds = [c0, c1+1] x [r0, r1+1]
        rr, cc = np.nonzero(inst == label)
        x0, y0, x1, y1 = P.bounds
        assert (x0, y0, x1, y1) == pytest.approx(
            (cc.min(), rr.min(), cc.max() + 1, rr.max() + 1), abs=0.5
        )
        # pixel centres (c + .5, r + .5) of the mask are inside, those outside are outside
        inside = np.mean([P.contains(Point(c + 0.5, r + 0.5)) for r, c in zip(rr, cc)])
        assert inside > 0.98
        ring = ndi.binary_dilation(inst == label) & (inst != label)
        orr, occ = np.nonzero(ring)
        outside = np.mean([P.contains(Point(c + 0.5, r + 0.5)) for r, c in zip(orr, occ)])
        assert outside < 0.02
    # the square's polygon: exactly the pixel-edge rectangle with cut corners (area 400 - 4/8)
    sq = Polygon(m["polygon"][1])
    assert sq.bounds == pytest.approx((20, 150, 40, 170))
    assert sq.area == pytest.approx(399.5)


def test_classify_instances_never_assigns_an_excluded_class() -> None:
    # 3 pixels [bg .2 | .1 .1 .1 .5 .0] -> without exclusion class 4 ("Dead") wins everywhere.
    # Excluding class 4: [.1 .1 .1 0 0] / .3 -> ties broken by arg-max order -> class 1, each
    # remaining class 1/3, the excluded one 0.
    inst = np.array([[1, 1, 1]])
    tp = np.zeros((6, 1, 3), np.float32)
    tp[:, 0, :] = np.array([0.2, 0.1, 0.1, 0.1, 0.5, 0.0])[:, None]
    assert classify_instances(inst, tp)[0].tolist() == [4]
    class_id, class_prob, probs = classify_instances(inst, tp, exclude=(4,))
    assert class_id.tolist() == [1]
    np.testing.assert_allclose(probs, [[1 / 3, 1 / 3, 1 / 3, 0, 0]], atol=1e-6)
    np.testing.assert_allclose(class_prob, [1 / 3], atol=1e-6)
    with pytest.raises(ValueError, match="excluded class 6"):
        classify_instances(inst, tp, exclude=(6,))


def test_model_spec_excludes_classes_it_has_no_labels_for() -> None:
    from wsi_nuclei.models import get_spec

    spec = get_spec("wsi-nuclei-lite0")
    assert spec.class_support["Dead"] == "none"
    assert spec.unsupported_class_ids == (4,)
    assert spec.hv_params().class_exclude == (4,)
    note = spec.reliability_note()
    assert "Dead" in note and "not as 0" in note and "Epithelial" in note
    assert get_spec("classic").reliability_note() == ""
    assert get_spec("hovernet-pannuke").unsupported_class_ids == ()

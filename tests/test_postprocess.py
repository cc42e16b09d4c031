"""Tests of wsi_nuclei.postprocess against known answers: HoVer-Net post-processing of perfect
maps (touching nuclei included), majority-vote classification, morphometry/polygons of shapes
of known size, and the array measure_instances against the per-object implementation it
replaced (random label maps, edge cases, real nuclei)."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from scipy import ndimage as ndi
from shapely.geometry import Point, Polygon
from skimage.draw import disk, ellipse
from skimage.measure import find_contours, perimeter_crofton

from wsi_nuclei._morphology import _outer_rings, _window_entries
from wsi_nuclei.datasets import hv_targets
from wsi_nuclei.eval import panoptic_quality
from wsi_nuclei.postprocess import HVParams, classify_instances, hv_to_instances, measure_instances
from wsi_nuclei.schema import MORPHOLOGY_COLUMNS

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


def test_hv_to_instances_takes_float16_maps_as_float32_ones() -> None:
    """The engine hands over its float16 windows as they are: the same instances, classes and
    probabilities as from the same maps in float32."""
    inst, cls = _scene()
    np_prob, hv, tp = _perfect_maps(inst, cls)
    rng = np.random.default_rng(3)
    np_prob = np.clip(np_prob * 0.8 + rng.uniform(0, 0.3, np_prob.shape), 0, 1)
    hv = hv + rng.normal(0, 0.05, hv.shape)
    tp = tp + rng.uniform(0, 0.4, tp.shape)
    tp /= tp.sum(0, keepdims=True)
    half = [m.astype(np.float16) for m in (np_prob, hv, tp)]
    a = hv_to_instances(*half, HVParams(class_exclude=(4,)))
    b = hv_to_instances(*[m.astype(np.float32) for m in half], HVParams(class_exclude=(4,)))
    assert a.inst.max() >= 9
    for k in ("inst", "labels", "class_id", "class_prob", "class_probs"):
        x, y = getattr(a, k), getattr(b, k)
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(x, y)


def _classify_reference(inst, tp, n, prior=None, temperature=1.0, exclude=()):  # type: ignore[no-untyped-def]
    """classify_instances as first written: over the whole map, votes with np.add.at."""
    c = tp.shape[0] - 1
    fg = tp[1:]
    if temperature != 1.0:
        fg = np.power(np.maximum(fg, 1e-12), 1.0 / float(temperature))
    if prior is not None:
        fg = fg * np.asarray(prior, fg.dtype).reshape(c, 1, 1)
    if exclude:
        keep = np.ones(c, fg.dtype)
        keep[[k - 1 for k in exclude]] = 0
        fg = fg * keep.reshape(c, 1, 1)
    fg = fg / np.maximum(fg.sum(axis=0, keepdims=True), 1e-8)
    flat = inst.ravel()
    sel = flat > 0
    lab = flat[sel] - 1
    vote = np.argmax(fg.reshape(c, -1)[:, sel], axis=0)
    votes = np.zeros((n, c), np.int64)
    np.add.at(votes, (lab, vote), 1)
    counts = np.maximum(np.bincount(lab, minlength=n), 1)
    probs = np.stack(
        [np.bincount(lab, weights=fg[k].ravel()[sel], minlength=n) / counts for k in range(c)],
        axis=1,
    ).astype(np.float32)
    winner = np.argmax(votes, axis=1)
    return (winner + 1).astype(np.int8), probs[np.arange(n), winner].astype(np.float32), probs


@pytest.mark.parametrize("seed", range(4))
def test_classify_instances_matches_the_whole_map_reference(seed: int) -> None:
    """Working on the instances' pixels alone (and counting votes with bincount) gives the
    reference's numbers bit for bit, ties, temperature, prior and excluded classes included."""
    rng = np.random.default_rng(seed)
    for _ in range(40):
        h, w = (int(v) for v in rng.integers(1, 50, 2))
        c = int(rng.integers(2, 7))
        inst = rng.integers(0, int(rng.integers(1, 12)), (h, w)).astype(np.int32)
        n = int(inst.max())
        tp = rng.random((c, h, w)).astype(np.float32 if seed % 2 else np.float64)
        tp[:, :, : w // 2] = tp[:, :1, :1]  # equal probabilities: ties in the vote
        tp /= tp.sum(0, keepdims=True)
        kw: dict = {}
        if rng.random() < 0.5:
            kw["temperature"] = float(rng.uniform(0.5, 2))
        if rng.random() < 0.5:
            kw["prior"] = tuple(float(v) for v in rng.uniform(0.2, 3, c - 1))
        if c > 2 and rng.random() < 0.5:
            kw["exclude"] = (int(rng.integers(1, c)),)
        for got, ref in zip(
            classify_instances(inst, tp, n, **kw), _classify_reference(inst, tp, n, **kw)
        ):
            assert got.dtype == ref.dtype
            np.testing.assert_array_equal(got, ref)


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


# --------------------------------------------------------------------------------------------
# measure_instances against the per-object implementation it replaced
# --------------------------------------------------------------------------------------------
# The reference below is the former per-nucleus code of wsi_nuclei.postprocess.measure_instances
# (scikit-image find_contours / perimeter_crofton per object), kept here, not in the package, to
# show that the array implementation measures the same.


def _ref_ring(padded_mask: np.ndarray) -> np.ndarray | None:
    contours = find_contours(padded_mask, 0.5)
    if not contours:
        return None
    ring = max(contours, key=len)
    return np.stack([ring[:, 1] - 0.5, ring[:, 0] - 0.5], axis=1)


def _ref_ring_area(xy: np.ndarray) -> float:
    x, y = xy[:, 0], xy[:, 1]
    twice = np.dot(x[:-1], y[1:]) - np.dot(y[:-1], x[1:]) + x[-1] * y[0] - y[-1] * x[0]
    return float(abs(twice) / 2)


def _ref_measure_instances(inst: np.ndarray, labels: np.ndarray, mpp: float) -> dict:
    n = len(labels)
    polygons: list[np.ndarray | None] = []
    out: dict = {
        "polygon": polygons,
        **{
            k: np.full(n, np.nan, np.float64)
            for k in ("centroid_x", "centroid_y", *MORPHOLOGY_COLUMNS)
        },
    }
    if n == 0:
        return out
    objects = ndi.find_objects(inst)
    padded = np.pad(inst, 1)
    for i, label in enumerate(labels):
        sl = objects[label - 1] if label - 1 < len(objects) else None
        if sl is None:
            polygons.append(None)
            continue
        y0, y1, x0, x1 = sl[0].start, sl[0].stop, sl[1].start, sl[1].stop
        pm = padded[y0 : y1 + 2, x0 : x1 + 2] == label
        mask = pm[1:-1, 1:-1]
        yy, xx = np.nonzero(mask)
        area = float(len(yy))
        cy, cx = yy.mean(), xx.mean()
        out["centroid_x"][i] = x0 + cx + 0.5
        out["centroid_y"][i] = y0 + cy + 0.5
        out["area_um2"][i] = area * mpp * mpp
        dy, dx = yy - cy, xx - cx
        a = float(np.dot(dx, dx)) / area + 1 / 12
        b = float(np.dot(dx, dy)) / area
        c = float(np.dot(dy, dy)) / area + 1 / 12
        half_diff = np.hypot((a - c) / 2, b)
        ev0, ev1 = (a + c) / 2 + half_diff, (a + c) / 2 - half_diff
        major, minor = 4 * np.sqrt(max(ev0, 0)), 4 * np.sqrt(max(ev1, 0))
        out["major_axis_um"][i] = major * mpp
        out["minor_axis_um"][i] = minor * mpp
        out["eccentricity"][i] = np.sqrt(max(0.0, 1 - (minor / major) ** 2)) if major > 0 else 0.0
        ring = _ref_ring(pm.astype(np.float32))
        if ring is None or len(ring) < 4:
            polygons.append(None)
            continue
        perim = float(perimeter_crofton(mask, directions=4))
        out["perimeter_um"][i] = perim * mpp
        out["circularity"][i] = min(1.0, 4 * np.pi * area / perim**2) if perim > 0 else np.nan
        hull = cv2.convexHull(ring.astype(np.float32)).reshape(-1, 2)
        hull_area = _ref_ring_area(hull.astype(np.float64))
        out["solidity"][i] = min(1.0, _ref_ring_area(ring) / hull_area) if hull_area > 0 else np.nan
        approx = cv2.approxPolyDP(ring.astype(np.float32).reshape(-1, 1, 2), 0.35, True).reshape(
            -1, 2
        )
        if len(approx) < 3:
            polygons.append(None)
            continue
        poly = approx.astype(np.float64)
        poly[:, 0] += x0
        poly[:, 1] += y0
        polygons.append(poly)
    return out


def _ref_outer_ring(inst: np.ndarray, label: int) -> np.ndarray:
    """The per-object ring of ``label`` in the pixel frame (closed, skimage's vertex order)."""
    sl = ndi.find_objects((inst == label).astype(np.int32))[0]
    pm = np.pad(inst, 1)[sl[0].start : sl[0].stop + 2, sl[1].start : sl[1].stop + 2] == label
    ring = _ref_ring(pm.astype(np.float32))
    assert ring is not None
    return ring + (sl[1].start, sl[0].start)


def _array_outer_rings(inst: np.ndarray, labels: np.ndarray) -> list[np.ndarray]:
    """The rings of ``labels`` (present, distinct) from wsi_nuclei._morphology, pixel frame."""
    lut = np.full(int(inst.max()) + 1, -1, np.int32)
    lut[labels] = np.arange(len(labels))
    padded = np.pad(inst, 1)
    hdiff = padded[:, 1:] != padded[:, :-1]
    index, window, corner, case = _window_entries(padded, lut, hdiff)
    offsets, rr, cc = _outer_rings(index, window, corner, case, padded.shape[1], len(labels))
    # doubled padded coordinates -> pixel frame: (C / 2 - 1 / 2, R / 2 - 1 / 2)
    xy = np.stack([cc / 2 - 0.5, rr / 2 - 0.5], axis=1)
    return [xy[offsets[k] : offsets[k + 1]] for k in range(len(labels))]


def _assert_measured_as_the_reference(inst: np.ndarray, labels: np.ndarray, mpp: float) -> int:
    """measure_instances == the per-object reference on ``labels``; returns how many polygons."""
    got = measure_instances(inst, labels, mpp)
    ref = _ref_measure_instances(inst, labels, mpp)
    assert set(got) == set(ref)
    for key in ("centroid_x", "centroid_y", "area_um2", "major_axis_um", "minor_axis_um"):
        np.testing.assert_allclose(got[key], ref[key], rtol=1e-9, atol=0, err_msg=key)
    # eccentricity sqrt(1 - (minor / major)^2) amplifies a rounding difference of the moments
    # near 0 (a round nucleus): relative 1e-9 plus an absolute floor far below any use
    np.testing.assert_allclose(got["eccentricity"], ref["eccentricity"], rtol=1e-9, atol=1e-7)
    for key in ("perimeter_um", "circularity", "solidity"):  # bit-identical
        np.testing.assert_array_equal(got[key], ref[key], err_msg=key)
    assert len(got["polygon"]) == len(ref["polygon"]) == len(labels)
    for label, p, q in zip(labels, got["polygon"], ref["polygon"]):
        assert (p is None) == (q is None), label
        if p is not None:
            assert p.dtype == np.float64 and p.shape == q.shape, label
            np.testing.assert_array_equal(p, q, err_msg=f"polygon of {label}")
    present = np.intersect1d(labels, inst[inst > 0])
    for label, ring in zip(present, _array_outer_rings(inst, present)):
        np.testing.assert_array_equal(ring, _ref_outer_ring(inst, int(label)), err_msg=f"{label}")
    return sum(p is not None for p in got["polygon"])


def _random_label_map(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Blobby labels with non-consecutive ids: ragged ellipses (holes, diagonal-only pixels),
    some centred off the array (cut by its border), later ones over earlier ones (touching
    labels), then stray pixels (1-px objects and extra pieces of existing labels)."""
    inst = np.zeros((h, w), np.int32)
    yy, xx = np.mgrid[:h, :w]
    ids = np.cumsum(rng.integers(1, 4, 40))
    for label in ids[: rng.integers(1, 25)]:
        r, c = rng.uniform(-3, h + 3), rng.uniform(-3, w + 3)
        a, b = rng.uniform(0.5, 9, 2)
        th = rng.uniform(0, np.pi)
        u = (yy - r) * np.cos(th) + (xx - c) * np.sin(th)
        v = (xx - c) * np.cos(th) - (yy - r) * np.sin(th)
        m = (u / a) ** 2 + (v / b) ** 2 <= 1
        m &= rng.random((h, w)) < rng.uniform(0.55, 1.0)
        inst[m] = label
    salt = rng.random((h, w)) < rng.uniform(0, 0.03)
    inst[salt] = rng.choice(ids[:30], int(salt.sum()))
    return inst


@pytest.mark.parametrize("seed", range(8))
def test_measure_matches_the_per_object_reference_on_random_maps(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n_poly = 0
    for _ in range(50):
        h, w = rng.integers(2, 64, 2)
        inst = _random_label_map(rng, int(h), int(w))
        present = np.unique(inst[inst > 0])
        asked = present[rng.random(len(present)) < 0.8]  # neighbours not measured too
        absent = np.setdiff1d(rng.integers(1, int(inst.max()) + 6, 4), present)  # gaps and above
        labels = rng.permutation(np.concatenate([asked, absent])).astype(np.int32)
        n_poly += _assert_measured_as_the_reference(inst, labels, float(rng.uniform(0.2, 1)))
    assert n_poly > 300


def test_measure_matches_the_reference_on_edge_cases() -> None:
    # one label on a checkerboard: every pixel is its own contour (diagonals not joined), all of
    # the same length: the first one in scan order is the label's ring
    check = ((np.indices((9, 11)).sum(axis=0) % 2) * 7).astype(np.int32)
    _assert_measured_as_the_reference(check, np.array([7]), 0.5)
    # two labels interleaved on a checkerboard (saddles of two labels in every window)
    two = np.where(np.indices((8, 8)).sum(axis=0) % 2 == 0, 3, 5).astype(np.int32)
    _assert_measured_as_the_reference(two, np.array([5, 3]), 0.5)
    # a label of two equal squares (a tie between its two contours), a ring with a hole, a label
    # filling the array's border rows, 1-px and 1-row objects, diagonal neighbours
    inst = np.zeros((20, 24), np.int32)
    inst[2:5, 2:5] = inst[2:5, 10:13] = 4
    inst[8:15, 3:10] = 9
    inst[10:12, 5:7] = 0
    inst[0, :] = inst[-1, :] = 12
    inst[17, 20] = 2
    inst[16, 21] = inst[18, 21] = 2
    inst[6, 14:23] = 30
    inst[7:16, 22] = 31
    inst[8:15, 10:16] = 33  # touches label 9
    labels = np.array([4, 9, 12, 2, 30, 31, 33, 1, 5, 99, 9], np.int32)  # absent, repeated
    _assert_measured_as_the_reference(inst, labels, 0.25)
    m = measure_instances(inst, labels, 0.25)
    assert m["polygon"][1] is not m["polygon"][-1]  # a label asked twice: two arrays
    # one object filling the whole array, 1x1 and 1xN maps
    _assert_measured_as_the_reference(np.full((6, 5), 3, np.int32), np.array([3]), 1.0)
    _assert_measured_as_the_reference(np.ones((1, 1), np.int32), np.array([1, 2]), 1.0)
    _assert_measured_as_the_reference(np.array([[1, 1, 0, 2, 2, 2]], np.int32), np.array([2, 1]), 1)
    _assert_measured_as_the_reference(np.array([[1], [1], [2]], np.int32), np.array([1, 2]), 1.0)


def test_measure_without_anything_to_measure() -> None:
    inst = np.zeros((5, 5), np.int32)
    inst[1:3, 1:3] = 1
    for labels in (np.array([], np.int32), np.array([2, 3]), np.array([0, -1])):
        m = measure_instances(inst, labels, 0.5)
        assert m["polygon"] == [None] * len(labels)
        assert all(np.isnan(m[k]).all() and len(m[k]) == len(labels) for k in m if k != "polygon")
    m = measure_instances(np.zeros((4, 4), np.int32), np.array([1]), 0.5)
    assert m["polygon"] == [None] and np.isnan(m["area_um2"]).all()


@pytest.fixture(scope="module")
def cmu_instances() -> np.ndarray:
    """Instance map of the bundled model on a dense CMU-1-Small-Region crop (model px)."""
    import torch

    from conftest import WSI_DIR
    from wsi_nuclei.inference import segment_image
    from wsi_nuclei.models import find_weights, get_spec, load_model
    from wsi_nuclei.slide import open_slide

    path = WSI_DIR / "CMU-1-Small-Region.svs"
    if not path.is_file():
        pytest.skip(f"real slide not available: {path} is absent")
    if find_weights(get_spec("wsi-nuclei-lite0")) is None:
        pytest.skip("bundled weights absent")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # two cores are shared with other work
    try:
        with open_slide(path) as sl:
            s = sl.mpp / 0.25
            x0, y0 = 2200, 3000  # dense dermis and epidermis
            crop = sl.read_scaled(
                (x0 / s, y0 / s, (x0 + 640) / s, (y0 + 640) / s), (640, 640), target_mpp=0.25
            )
        return segment_image(load_model("wsi-nuclei-lite0", device="cpu"), crop).inst
    finally:
        torch.set_num_threads(threads)


def test_measure_matches_the_reference_on_real_nuclei(cmu_instances: np.ndarray) -> None:
    inst = cmu_instances
    labels = np.unique(inst[inst > 0])
    assert len(labels) > 100
    assert _assert_measured_as_the_reference(inst, labels, 0.25) == len(labels)
    # a block's view: a window cut through nuclei, only some of them measured
    window = inst[100:420, 150:500]
    present = np.unique(window[window > 0])
    _assert_measured_as_the_reference(window, present[::2], 0.25)

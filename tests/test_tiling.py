"""Tests of wsi_nuclei.tiling: grid geometry, the centroid-in-core ownership rule, overlap_check.

The property-based test simulates the engine on a virtual label image: every tile sees the
exact label crop of its output window (objects cut at the window border, zero padding past
the image), computes centroids the way :mod:`wsi_nuclei.pipeline` does, applies
:func:`owned_mask`, and the tiles are processed in a random order. Every object must be kept
exactly once, by one tile, with all of its pixels.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from scipy import ndimage as ndi
from shapely.geometry import Point, box

from wsi_nuclei.errors import OwnershipError
from wsi_nuclei.tiling import TileGrid, make_grid, overlap_check, owned_mask, owner_of


# --------------------------------------------------------------------------------------------
# grid geometry
# --------------------------------------------------------------------------------------------
def test_full_window_model_geometry() -> None:
    g = make_grid(1000, 700, input_size=256, output_size=256, halo=48)
    assert (g.core, g.halo, g.window, g.context) == (160, 48, 256, 0)
    assert (g.n_rows, g.n_cols, len(g)) == (5, 7, 35)  # ceil(700/160), ceil(1000/160)
    assert g.core_box(2, 3) == (480, 320, 640, 480)
    assert g.window_box(2, 3) == (432, 272, 688, 528)
    assert g.input_box(2, 3) == g.window_box(2, 3)  # input == output for this model
    assert g.window_box(0, 0) == (-48, -48, 208, 208)  # reaches past the slide: padding
    assert g.tiles()[:3] == [(0, 0), (0, 1), (0, 2)] and g.tiles()[-1] == (4, 6)


def test_hovernet_fast_256_in_164_out() -> None:
    g = make_grid(500, 300, input_size=256, output_size=164, halo=32)
    assert (g.core, g.window, g.context) == (100, 164, 46)
    assert (g.n_rows, g.n_cols) == (3, 5)
    for r, c in g.tiles():
        cx0, cy0, cx1, cy1 = g.core_box(r, c)
        wx0, wy0, wx1, wy1 = g.window_box(r, c)
        ix0, iy0, ix1, iy1 = g.input_box(r, c)
        assert (cx0 - wx0, cy0 - wy0, wx1 - cx1, wy1 - cy1) == (32, 32, 32, 32)
        assert (ix1 - ix0, iy1 - iy0) == (256, 256)
        # the input box is centred on the window (and on the core)
        assert (wx0 - ix0, wy0 - iy0, ix1 - wx1, iy1 - wy1) == (46, 46, 46, 46)
        assert (ix0 + ix1) / 2 == (cx0 + cx1) / 2 and (iy0 + iy1) / 2 == (cy0 + cy1) / 2


def test_odd_context_input_box_is_full_size() -> None:
    # (input - window) odd is refused by make_grid, but a TileGrid built by hand must still
    # give an input box of exactly input_size
    g = TileGrid(100, 100, core=20, halo=5, input_size=33)
    x0, y0, x1, y1 = g.input_box(1, 1)
    assert (x1 - x0, y1 - y0) == (33, 33)


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"input_size": 164, "output_size": 256, "halo": 10}, "larger than input"),
        ({"input_size": 256, "output_size": 163, "halo": 10}, "even number"),
        ({"input_size": 256, "output_size": 256, "halo": 121}, "too large"),
        ({"input_size": 256, "output_size": 164, "halo": 75}, "too large"),  # core 14 < 16
    ],
)
def test_make_grid_rejects_bad_sizes(kwargs: dict, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        make_grid(1000, 1000, **kwargs)


def test_tiny_image_has_one_tile() -> None:
    g = make_grid(10, 5, input_size=256, output_size=256, halo=48)
    assert len(g) == 1 and g.tiles() == [(0, 0)]


@settings(max_examples=50, deadline=None)
@given(
    width=st.integers(1, 900),
    height=st.integers(1, 900),
    halo=st.integers(0, 60),
    out_half=st.integers(40, 128),
    ctx=st.integers(0, 40),
    data=st.data(),
)
def test_cores_partition_the_plane(width: int, height: int, halo: int, out_half: int, ctx: int, data) -> None:
    output = 2 * out_half
    if output - 2 * halo < 16:
        halo = (output - 16) // 2
    g = make_grid(width, height, input_size=output + 2 * ctx, output_size=output, halo=halo)
    assert g.window == output and g.context == ctx
    # the cores cover the image, and neighbouring cores share their edges (no gap, no overlap)
    assert g.n_cols * g.core >= width > (g.n_cols - 1) * g.core
    assert g.n_rows * g.core >= height > (g.n_rows - 1) * g.core
    for r, c in g.tiles():
        x0, y0, x1, y1 = g.core_box(r, c)
        assert x1 - x0 == y1 - y0 == g.core
        if c + 1 < g.n_cols:
            assert g.core_box(r, c + 1)[0] == x1 and g.core_box(r, c + 1)[1] == y0
        if r + 1 < g.n_rows:
            assert g.core_box(r + 1, c)[1] == y1 and g.core_box(r + 1, c)[0] == x0
        wx0, wy0, wx1, wy1 = g.window_box(r, c)
        assert (x0 - wx0, y0 - wy0, wx1 - x1, wy1 - y1) == (halo,) * 4
        ix0, iy0, ix1, iy1 = g.input_box(r, c)
        assert (wx0 - ix0, wy0 - iy0, ix1 - wx1, iy1 - wy1) == (ctx,) * 4
    # random points: exactly one core contains each (half-open boxes): owner_of's answer
    xs = np.array(data.draw(st.lists(st.floats(0, width, exclude_max=True), min_size=1, max_size=20)))
    ys = np.array(data.draw(st.lists(st.floats(0, height, exclude_max=True), min_size=len(xs), max_size=len(xs))))
    cores = np.array([g.core_box(r, c) for r, c in g.tiles()])
    inside = ((cores[None, :, 0] <= xs[:, None]) & (xs[:, None] < cores[None, :, 2])
              & (cores[None, :, 1] <= ys[:, None]) & (ys[:, None] < cores[None, :, 3]))
    assert (inside.sum(axis=1) == 1).all()
    rows, cols = owner_of(g, xs, ys)
    assert (rows * g.n_cols + cols).tolist() == np.argmax(inside, axis=1).tolist()


def test_owner_of_on_core_edges_and_outside() -> None:
    g = make_grid(300, 300, input_size=140, output_size=140, halo=20)  # core 100
    x = np.array([0.0, 99.999, 100.0, 199.99, 200.0, 299.9, -3.0, 350.0])
    rows, cols = owner_of(g, x, np.full_like(x, 150.0))
    assert cols.tolist() == [0, 0, 1, 1, 2, 2, 0, 2]  # left edge inclusive; outside clipped
    assert rows.tolist() == [1] * len(x)


# --------------------------------------------------------------------------------------------
# owned_mask on hand-made cases
# --------------------------------------------------------------------------------------------
def _grid() -> TileGrid:
    return make_grid(300, 300, input_size=140, output_size=140, halo=20)  # core 100, window 140


def test_owned_mask_centroids_on_core_edges() -> None:
    g = _grid()
    # tile (1, 1): core [100, 200)^2, window [80, 220)^2 -> window px = slide px - 80
    cx = np.array([100.0, 99.99, 199.99, 200.0, 150.0, 150.0, 100.0])
    cy = np.array([150.0, 150.0, 150.0, 150.0, 100.0, 99.5, 200.0])
    bbox = np.tile([40, 40, 60, 60], (len(cx), 1))  # well inside the window
    keep, n_bad = owned_mask(g, 1, 1, cx, cy, bbox)
    assert keep.tolist() == [True, False, True, False, True, False, False]
    assert n_bad == 0
    # the left neighbour owns exactly the complementary point on its right edge
    keep0, _ = owned_mask(g, 1, 0, cx, cy, bbox)
    assert keep0.tolist() == [False, True, False, False, False, False, False]
    # corner point (100, 100) belongs to (1, 1) only, among its four tiles
    owners = [t for t in g.tiles() if owned_mask(g, *t, np.array([100.0]), np.array([100.0]), bbox[:1])[0][0]]
    assert owners == [(1, 1)]


def test_owned_mask_touching_the_window_border() -> None:
    g = _grid()
    w = g.window
    cx, cy = np.array([150.0, 150.0, 150.0, 150.0, 50.0]), np.array([150.0] * 5)
    bbox = np.array([
        [0, 50, 20, 70],        # owned, touches the top border (row 0)
        [50, 50, 70, w],        # owned, touches the right border (max exclusive == window)
        [1, 1, w - 1, w - 1],   # owned, one pixel from every border: fine
        [30, 30, 50, 50],       # owned, inside
        [0, 0, 30, 30],         # touches, but owned by the left neighbour: not this tile's problem
    ])
    keep, n_bad = owned_mask(g, 1, 1, cx, cy, bbox)
    assert keep.tolist() == [True, True, True, True, False]  # non-strict: kept, counted
    assert n_bad == 2
    with pytest.raises(OwnershipError, match=r"tile \(1, 1\): 2 nucleus"):
        owned_mask(g, 1, 1, cx, cy, bbox, strict=True)
    # strict mode does not fire for the rows that are fine
    keep_ok, n_ok = owned_mask(g, 1, 1, cx[2:], cy[2:], bbox[2:], strict=True)
    assert keep_ok.tolist() == [True, True, False] and n_ok == 0


def _disc_image(cx: float, cy: float, radius: float) -> np.ndarray:
    img = np.zeros((300, 300), np.int32)
    yy, xx = np.mgrid[0:300, 0:300] + 0.5
    img[(xx - cx) ** 2 + (yy - cy) ** 2 <= radius**2] = 1
    return img


def test_owned_mask_strict_raises_for_nucleus_larger_than_halo() -> None:
    """A disc of radius 30 > halo 20 centred in tile (1, 1)'s core, 8 px from its left edge."""
    g = _grid()
    img = _disc_image(108, 150, 30)
    results = {t: _tile_view(g, img, *t) for t in g.tiles()}
    owners = [t for t, (keep, _, _, _) in results.items() if keep.any()]
    assert owners == [(1, 1)]
    keep, n_bad, _, cnt = results[(1, 1)]
    assert n_bad == 1  # flagged as oversized: it touches the window border
    assert cnt[0] < int(img.sum())  # and the kept nucleus is indeed cut
    with pytest.raises(OwnershipError, match="smaller than the nucleus radius"):
        _tile_view(g, img, 1, 1, strict=True)


def test_too_large_nucleus_can_be_claimed_twice_but_is_always_flagged() -> None:
    """Radius 30 > halo 20, 5 px right of the core edge: the left neighbour's cut view has its
    centroid at x = 99.9, in its own core. Both claims are flagged (the overlap safety net of
    the pipeline removes the duplicate; strict mode refuses the run)."""
    g = _grid()
    img = _disc_image(105, 150, 30)
    results = {t: _tile_view(g, img, *t) for t in g.tiles()}
    owners = [t for t, (keep, _, _, _) in results.items() if keep.any()]
    assert owners == [(1, 0), (1, 1)]
    assert results[(1, 0)][1] == 1 and results[(1, 1)][1] == 1
    for t in owners:
        with pytest.raises(OwnershipError):
            _tile_view(g, img, *t, strict=True)


def test_owned_mask_empty_input() -> None:
    keep, n_bad = owned_mask(_grid(), 0, 0, np.zeros(0), np.zeros(0), np.zeros((0, 4), int), strict=True)
    assert keep.shape == (0,) and n_bad == 0


# --------------------------------------------------------------------------------------------
# the ownership property on a virtual image
# --------------------------------------------------------------------------------------------
def _crop(img: np.ndarray, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
    """img[y0:y1, x0:x1] with zeros outside the image."""
    out = np.zeros((y1 - y0, x1 - x0), img.dtype)
    h, w = img.shape
    sx0, sy0, sx1, sy1 = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
    if sx1 > sx0 and sy1 > sy0:
        out[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = img[sy0:sy1, sx0:sx1]
    return out


def _tile_view(g: TileGrid, img: np.ndarray, r: int, c: int, strict: bool = False):
    """What tile (r, c) keeps, computed as wsi_nuclei.pipeline._own_and_measure does.

    Returns (keep mask, n_oversized, labels, pixel counts of the labels in the window)."""
    wx0, wy0, wx1, wy1 = g.window_box(r, c)
    crop = _crop(img, wx0, wy0, wx1, wy1)
    labels = np.unique(crop)
    labels = labels[labels > 0]
    if not len(labels):
        return np.zeros(0, bool), 0, labels, np.zeros(0, int)
    objs = ndi.find_objects(crop)
    bbox = np.array([(objs[k - 1][0].start, objs[k - 1][1].start, objs[k - 1][0].stop, objs[k - 1][1].stop) for k in labels])
    ys, xs = np.nonzero(crop)
    lab = crop[ys, xs]
    n = int(labels.max()) + 1
    cnt = np.bincount(lab, minlength=n)[labels]
    cy = np.bincount(lab, weights=ys, minlength=n)[labels] / cnt + 0.5 + wy0
    cx = np.bincount(lab, weights=xs, minlength=n)[labels] / cnt + 0.5 + wx0
    keep, n_bad = owned_mask(g, r, c, cx, cy, bbox, strict=strict)
    keep &= (cx >= 0) & (cy >= 0) & (cx < g.width) & (cy < g.height)
    return keep, n_bad, labels, cnt


def _ellipse(shape: tuple[int, int], cx: float, cy: float, a: float, b: float, theta: float) -> np.ndarray:
    """Pixels whose centres (i + 0.5) lie in the ellipse."""
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]] + 0.5
    dx, dy = xx - cx, yy - cy
    c, s = math.cos(theta), math.sin(theta)
    return ((dx * c + dy * s) / a) ** 2 + ((-dx * s + dy * c) / b) ** 2 <= 1.0


_EDGE_OFFSETS = st.one_of(  # offset from a core edge, in px or as a fraction of the core
    st.sampled_from([0.0, 0.5, -0.5, 1.0, -1.0, 0.25, -0.25]).map(lambda v: ("px", v)),
    st.floats(-0.5, 0.5).map(lambda v: ("core", v)),
)
_OBJECT = st.tuples(
    st.integers(0, 2), st.integers(0, 2),  # which inner core edge (x, y)
    _EDGE_OFFSETS, _EDGE_OFFSETS,
    st.floats(0.15, 1.0),  # semi-major axis as a fraction of its maximum
    st.floats(0.1, 1.0),  # minor / major (down to needles)
    st.floats(0, math.pi),
)


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    core=st.integers(16, 48),
    halo=st.integers(3, 16),
    n_rows=st.integers(2, 4),
    n_cols=st.integers(2, 4),
    trim=st.tuples(st.integers(0, 15), st.integers(0, 15)),
    objects=st.lists(_OBJECT, min_size=4, max_size=40),
    data=st.data(),
)
def test_every_object_kept_exactly_once_and_whole(core, halo, n_rows, n_cols, trim, objects, data) -> None:
    width, height = max(1, n_cols * core - trim[0]), max(1, n_rows * core - trim[1])
    g = make_grid(width, height, input_size=core + 2 * halo + 2 * 7, output_size=core + 2 * halo, halo=halo)
    img = np.zeros((height, width), np.int32)
    masks: dict[int, np.ndarray] = {}
    max_a = halo - 1.0  # farthest pixel below halo - 0.5 (strict mode must not fire either)
    for kx, ky, dx, dy, fa, ratio, theta in objects:
        a = max(1.0, fa * max_a)
        b = max(0.6, ratio * a)
        cx = (1 + kx % (g.n_cols - 1)) * core + (dx[1] if dx[0] == "px" else dx[1] * core)
        cy = (1 + ky % (g.n_rows - 1)) * core + (dy[1] if dy[0] == "px" else dy[1] * core)
        m = _ellipse(img.shape, cx, cy, a, b, theta)
        if not m.any() or (img[m] > 0).any():
            continue  # empty or overlapping another object
        ys, xs = np.nonzero(m)
        if ys.min() == 0 or xs.min() == 0 or ys.max() == height - 1 or xs.max() == width - 1:
            continue  # keep objects inside the image (the pipeline pads past its border)
        mx, my = xs.mean() + 0.5, ys.mean() + 0.5
        if np.hypot(xs + 0.5 - mx, ys + 0.5 - my).max() > halo - 1.0:
            continue
        label = len(masks) + 1
        img[m] = label
        masks[label] = m
    order = data.draw(st.permutations(g.tiles()), label="processing order")
    kept: dict[int, list[tuple[tuple[int, int], int]]] = {}
    for r, c in order:
        for strict in (False, True):  # strict mode never fires when every object is below the halo
            keep, n_bad, labels, cnt = _tile_view(g, img, r, c, strict=strict)
            assert n_bad == 0
        for lab, n in zip(labels[keep], cnt[keep]):
            kept.setdefault(int(lab), []).append(((r, c), int(n)))
    assume(masks)
    assert sorted(kept) == sorted(masks), "an object was lost or invented"
    for lab, hits in kept.items():
        assert len(hits) == 1, f"object {lab} kept by {len(hits)} tiles: {hits}"
        (r, c), n = hits[0]
        assert n == int(masks[lab].sum()), f"object {lab} kept cut by tile {(r, c)}"
        # the owner is the tile whose core holds the true centroid, and the whole object is
        # inside its window
        ys, xs = np.nonzero(masks[lab])
        row, col = owner_of(g, np.array([xs.mean() + 0.5]), np.array([ys.mean() + 0.5]))
        assert (int(row[0]), int(col[0])) == (r, c)
        wx0, wy0, wx1, wy1 = g.window_box(r, c)
        assert wx0 < xs.min() and xs.max() < wx1 - 1 and wy0 < ys.min() and ys.max() < wy1 - 1


def test_ownership_on_a_dense_hand_made_layout() -> None:
    """Discs of radius 9 centred on every core corner, edge midpoint and core centre (halo 12)."""
    g = make_grid(120, 120, input_size=64, output_size=64, halo=12)  # core 40
    img = np.zeros((120, 120), np.int32)
    centres = [(x, y) for x in (20, 40, 60, 80, 100) for y in (20, 40, 60, 80, 100)]
    yy, xx = np.mgrid[0:120, 0:120] + 0.5
    for k, (x, y) in enumerate(centres, start=1):
        img[(xx - x) ** 2 + (yy - y) ** 2 <= 9**2] = k
    sizes = np.bincount(img.ravel())
    seen: dict[int, int] = {}
    for r, c in reversed(g.tiles()):
        keep, n_bad, labels, cnt = _tile_view(g, img, r, c, strict=True)
        assert n_bad == 0
        for lab, n in zip(labels[keep], cnt[keep]):
            assert lab not in seen
            seen[int(lab)] = int(n)
            assert n == sizes[lab]
    assert sorted(seen) == list(range(1, len(centres) + 1))


# --------------------------------------------------------------------------------------------
# overlap_check
# --------------------------------------------------------------------------------------------
def test_overlap_check_drops_the_lower_probability_duplicate() -> None:
    a = [box(0, 0, 10, 10), box(20, 0, 30, 10), box(40, 0, 50, 10)]
    b = [box(1, 0, 11, 10), box(60, 0, 70, 10), box(41, 0, 51, 10)]  # b[0] ~ a[0], b[2] ~ a[2]
    drop_a, drop_b = overlap_check(a, np.array([0.9, 0.5, 0.2]), b, np.array([0.8, 0.5, 0.7]))
    assert drop_a.tolist() == [False, False, True]  # a[2] has the lower probability
    assert drop_b.tolist() == [True, False, False]  # b[0] has the lower probability


def test_overlap_check_ties_drop_from_b() -> None:
    p = box(0, 0, 10, 10)
    drop_a, drop_b = overlap_check([p], np.array([0.5]), [p], np.array([0.5]))
    assert drop_a.tolist() == [False] and drop_b.tolist() == [True]


def test_overlap_check_threshold_is_relative_to_the_smaller_polygon() -> None:
    big = box(0, 0, 20, 20)  # area 400
    inside = box(2, 2, 6, 6)  # area 16, fully inside: a duplicate
    half = box(18, 0, 22, 4)  # area 16, overlap 8 = 50 %: a duplicate at the default 0.5
    sliver = box(19, 0, 23, 4)  # area 16, overlap 4 = 25 %: not a duplicate
    touching = box(20, 5, 30, 15)  # shares an edge only
    drop_a, drop_b = overlap_check([big], np.array([1.0]), [inside, half, sliver, touching], np.zeros(4))
    assert drop_b.tolist() == [True, True, False, False] and not drop_a.any()
    _, drop_b = overlap_check([big], np.array([1.0]), [inside, half, sliver, touching], np.zeros(4), min_overlap=0.6)
    assert drop_b.tolist() == [True, False, False, False]


def test_overlap_check_one_polygon_is_dropped_at_most_once() -> None:
    # a[0] overlaps two polygons of b; once a[0] is dropped it removes nothing else
    a = [box(0, 0, 10, 10)]
    b = [box(0, 0, 10, 10), box(0.5, 0, 10.5, 10)]
    drop_a, drop_b = overlap_check(a, np.array([0.1]), b, np.array([0.9, 0.8]))
    assert drop_a.tolist() == [True] and drop_b.tolist() == [False, False]


def test_overlap_check_empty_sets() -> None:
    drop_a, drop_b = overlap_check([], np.zeros(0), [Point(0, 0).buffer(3)], np.ones(1))
    assert drop_a.shape == (0,) and drop_b.tolist() == [False]
    drop_a, drop_b = overlap_check([Point(0, 0).buffer(3)], np.ones(1), [], np.zeros(0))
    assert drop_a.tolist() == [False] and drop_b.shape == (0,)

"""Tests of wsi_nuclei.tiling (patch and block grids, blending weights) and of the engine's
map blender and strip plan, against definitions and hand-computed cases."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wsi_nuclei.engine import MapBlender, plan_strips
from wsi_nuclei.tiling import BlockGrid, PatchGrid, blend_weights, passes_per_pixel


# --------------------------------------------------------------------------------------------
# patch grid
# --------------------------------------------------------------------------------------------
def test_patch_grid_full_window_model() -> None:
    g = PatchGrid(1000, 700, input_size=256, output_size=256, stride=192)
    assert (g.border, g.context, g.n_rows, g.n_cols, len(g)) == (
        32,
        0,
        4,
        6,
        24,
    )  # ceil(700/192), ceil(1000/192)
    assert g.output_box(0, 0) == (-32, -32, 224, 224)
    assert g.output_box(2, 3) == (544, 352, 800, 608)
    assert g.input_box(2, 3) == g.output_box(2, 3)
    # rows < final_before(r) get nothing from later patch rows: row r + 1 starts there
    assert g.final_before(1) == g.output_box(2, 0)[1] == 352


def test_patch_grid_hovernet_fast() -> None:
    g = PatchGrid(500, 300, input_size=256, output_size=164, stride=164)
    assert (g.border, g.context, g.n_rows, g.n_cols) == (0, 46, 2, 4)
    assert g.output_box(1, 2) == (328, 164, 492, 328)
    assert g.input_box(1, 2) == (282, 118, 538, 374)  # 46 px of context on each side


@pytest.mark.parametrize(
    "args",
    [
        (256, 256, 0),
        (256, 256, 300),
        (256, 164, 163),
        (256, 257, 256),
        (256, 256, 191),
        (256, 256, 126),
    ],
)
def test_patch_grid_rejects_bad_geometry(args: tuple) -> None:
    n_in, n_out, s = args
    with pytest.raises(ValueError):
        PatchGrid(100, 100, input_size=n_in, output_size=n_out, stride=s)


@settings(max_examples=60, deadline=None)
@given(
    st.integers(1, 900),
    st.integers(8, 64),
    st.integers(0, 32),
    st.integers(-300, 1200),
    st.integers(1, 400),
)
def test_covering_matches_the_definition(
    width: int, half_s: int, border: int, lo: int, length: int
) -> None:
    s = 2 * half_s
    border = min(border, half_s)
    g = PatchGrid(width, width, input_size=s + 2 * border, output_size=s + 2 * border, stride=s)
    hi = lo + length
    want = [
        k
        for k in range(g.n_cols)
        if g.output_start(k) < hi and g.output_start(k) + g.output_size > lo
    ]
    assert list(g.covering(lo, hi, g.n_cols)) == want


# --------------------------------------------------------------------------------------------
# blending weights
# --------------------------------------------------------------------------------------------
def test_blend_weights_hand_values() -> None:
    w = blend_weights(8, 4)  # overlap 4: t = (d + 0.5) / 4 for d = 0, 1 (then 1)
    s = lambda t: 3 * t * t - 2 * t**3  # noqa: E731
    np.testing.assert_allclose(
        w,
        [s(0.125), s(0.375), s(0.625), s(0.875), s(0.875), s(0.625), s(0.375), s(0.125)],
        rtol=1e-6,
    )
    assert (blend_weights(164, 164) == 1).all()


@settings(max_examples=40, deadline=None)
@given(st.integers(4, 64), st.data())
def test_blend_weights_are_a_partition_of_unity(half_s: int, data) -> None:
    s = 2 * half_s
    border = data.draw(st.integers(0, half_s))  # the grid keeps the overlap <= the stride
    n = s + 2 * border
    w = blend_weights(n, s)
    total = np.zeros(10 * s + n)
    for k in range(8):
        total[k * s : k * s + n] += w
    # everywhere covered by two neighbouring patches (or one, in a patch's interior), the
    # weights sum to one
    np.testing.assert_allclose(total[n - s : 8 * s], 1.0, rtol=1e-6)
    assert w.min() > 0 and (w <= 1).all()


def test_passes_per_pixel() -> None:
    assert passes_per_pixel(100, 256, 100 * 192 * 192) == pytest.approx((256 / 192) ** 2)


# --------------------------------------------------------------------------------------------
# blocks
# --------------------------------------------------------------------------------------------
@settings(max_examples=40, deadline=None)
@given(st.integers(1, 3000), st.integers(1, 3000), st.integers(16, 700), st.data())
def test_block_cores_partition_the_canvas(width: int, height: int, core: int, data) -> None:
    halo = data.draw(st.integers(0, core))
    g = BlockGrid(width, height, core, halo)
    assert g.n_cols * core >= width > (g.n_cols - 1) * core
    assert g.n_rows * core >= height > (g.n_rows - 1) * core
    r, c = data.draw(st.integers(0, g.n_rows - 1)), data.draw(st.integers(0, g.n_cols - 1))
    x0, y0, x1, y1 = g.core_box(r, c)
    wx0, wy0, wx1, wy1 = g.window_box(r, c)
    assert (x0 - wx0, y0 - wy0, wx1 - x1, wy1 - y1) == (halo,) * 4
    xs = np.array(
        data.draw(st.lists(st.floats(0, width, exclude_max=True), min_size=1, max_size=10))
    )
    ys = np.array(
        data.draw(
            st.lists(st.floats(0, height, exclude_max=True), min_size=len(xs), max_size=len(xs))
        )
    )
    rows, cols = g.owner_of(xs, ys)
    assert (
        (cols * core <= xs)
        & (xs < (cols + 1) * core)
        & (rows * core <= ys)
        & (ys < (rows + 1) * core)
    ).all()


def test_block_grid_rejects_bad_sizes() -> None:
    with pytest.raises(ValueError):
        BlockGrid(100, 100, 8, 2)
    with pytest.raises(ValueError):
        BlockGrid(100, 100, 64, 65)


# --------------------------------------------------------------------------------------------
# the map blender
# --------------------------------------------------------------------------------------------
def _field(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """A smooth 2-channel field on the canvas (what an ideal, position-free model predicts)."""
    return np.stack([np.sin(x / 37.0) * np.cos(y / 23.0), (x - 2 * y) / 1000.0]).astype(np.float32)


@pytest.mark.parametrize(
    "stride, border, strip", [(48, 8, (0, 300)), (64, 0, (-20, 260)), (40, 12, (100, 200))]
)
def test_blender_reproduces_a_field_every_patch_agrees_on(
    stride: int, border: int, strip: tuple[int, int]
) -> None:
    """If every patch outputs the global field at its pixels, the blend is that field exactly
    (the weights sum to one), also across strip edges and at the canvas corners."""
    n = stride + 2 * border
    pg = PatchGrid(300, 260, n, n, stride)
    x0, x1 = strip
    bl = MapBlender(pg, x0, x1, 2, np.zeros(2))
    cols = pg.covering(x0, x1, pg.n_cols)
    for r in range(pg.n_rows):
        for c in cols:
            ox0, oy0, ox1, oy1 = pg.output_box(r, c)
            yy, xx = np.mgrid[oy0:oy1, ox0:ox1]
            bl.add((r, c), _field(xx, yy).astype(np.float16))
    bl.finish()
    a = max(x0, 0)  # beyond the canvas: fill
    win = bl.window((a, 0, x1, 260)).astype(np.float32)
    yy, xx = np.mgrid[0:260, a:x1]
    want = _field(xx, yy)
    np.testing.assert_allclose(win, want, atol=2e-3)  # float16 storage
    if a > x0:
        assert (bl.window((x0, 0, a, 260)) == 0).all()


def test_blender_rows_become_final_in_order_and_release() -> None:
    pg = PatchGrid(200, 200, 64, 64, 48)  # border 8
    bl = MapBlender(pg, 0, 200, 1, np.full(1, -1.0))
    ones = np.ones((1, 64, 64), np.float16)
    for c in range(pg.n_cols):
        bl.add((0, c), ones)
    assert bl.final_y < 0  # nothing final while row 0 is open
    bl.add((1, 0), ones)
    assert bl.final_y == pg.final_before(0) == 40
    with pytest.raises(ValueError, match="final"):
        bl.window((0, 0, 10, 50))
    assert (bl.window((0, 0, 200, 40)) == 1).all()
    with pytest.raises(ValueError, match="row-major"):
        bl.add((0, 1), ones)
    bl.drop_before(100)
    assert bl.chunks == []
    bl.finish()
    # rows released or never covered read as the fill value
    assert (bl.window((0, 0, 10, 10)) == -1).all()


def test_blender_fill_where_no_patch_ran() -> None:
    pg = PatchGrid(400, 100, 64, 64, 64)
    bl = MapBlender(pg, 0, 400, 1, np.full(1, 7.0))
    bl.add((0, 0), np.zeros((1, 64, 64), np.float16))
    bl.add((0, 3), np.zeros((1, 64, 64), np.float16))
    bl.finish()
    w = bl.window((0, 0, 400, 64))
    assert (
        (w[0, :, :64] == 0).all() and (w[0, :, 64:192] == 7).all() and (w[0, :, 192:256] == 0).all()
    )


# --------------------------------------------------------------------------------------------
# strips
# --------------------------------------------------------------------------------------------
def test_plan_strips_batches_cover_every_window_once() -> None:
    pg = PatchGrid(3000, 1000, 256, 256, 192)
    bg = BlockGrid(3000, 1000, 512, 64)
    active = [b for b in bg.blocks() if b != (0, 2)]
    strips = plan_strips(pg, bg, active, strip_blocks=2, batch_size=5)
    assert [min(c for _, c in s.blocks) // 2 for s in strips] == [0, 1, 2]
    assert sorted(b for s in strips for b in s.blocks) == sorted(active)
    for k, s in enumerate(strips):
        flat = [p for b in s.batches for p in b]
        assert flat == sorted(flat) and len(set(flat)) == len(flat)  # row-major, each once
        assert all(len(b) == 5 for b in s.batches[:-1]) and 1 <= len(s.batches[-1]) <= 5
        for r, c in s.blocks:  # every patch meeting an active window is in the strip
            x0, y0, x1, y1 = bg.window_box(r, c)
            want = {
                (pr, pc)
                for pr in pg.covering(y0, y1, pg.n_rows)
                for pc in pg.covering(x0, x1, pg.n_cols)
            }
            assert want <= set(flat)
        assert (s.x0, s.x1) == (2 * k * 512 - 64, (2 * k + 2) * 512 + 64)
    # a filter of the slide (e.g. "near tissue") removes patches, never adds any
    only_left = plan_strips(
        pg, bg, active, patch_ok=lambda r, c: c < 3, strip_blocks=2, batch_size=5
    )
    assert all(p[1] < 3 for s in only_left for b in s.batches for p in b)

"""Tiling at model resolution and the exact ownership rule for nuclei across tile borders.

Geometry (all in *model pixels*: level-0 pixels times ``slide_mpp / model_mpp``)::

    core     [c*S, (c+1)*S)                  the cores partition the plane
    window   core grown by the halo M        = the model's output window, W = S + 2M
    input    window grown by the context     = the model's input, (input - W) / 2 per side

**Ownership invariant** (in the spirit of StarDist's block rule): a nucleus belongs to the
one tile whose *core* contains its centroid. If the halo M is larger than the distance from
any nucleus's centroid to its farthest pixel, that nucleus lies entirely inside its owner's
window, so the owner sees it whole; every other tile either sees it cut (touching its window
border: discarded) or whole but with the centroid outside its core (discarded). Hence each
nucleus is kept exactly once, whatever the order in which tiles are processed.
:func:`owned_mask` applies the rule and raises :class:`~wsi_nuclei.errors.OwnershipError`
(strict mode) when a nucleus owned by a tile touches that tile's window border, i.e. when the
halo is too small for it.

Because a network may segment the same nucleus slightly differently in two tiles, the
centroid can move across a core border; :func:`overlap_check` is the safety net that removes
(and reports) such rare duplicates.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .errors import OwnershipError

__all__ = ["TileGrid", "make_grid", "owner_of", "owned_mask", "overlap_check"]


@dataclass(frozen=True)
class TileGrid:
    """A grid of tiles covering a ``width`` x ``height`` model-pixel image.

    Attributes
    ----------
    width, height : int
        Size of the slide at model resolution (model px).
    core : int
        Core size S (the stride).
    halo : int
        Halo M around the core; the output window is ``core + 2 * halo``.
    input_size : int
        Model input size (>= window).
    """

    width: int
    height: int
    core: int
    halo: int
    input_size: int

    @property
    def window(self) -> int:
        return self.core + 2 * self.halo

    @property
    def context(self) -> int:
        """Extra input pixels on each side of the output window."""
        return (self.input_size - self.window) // 2

    @property
    def n_rows(self) -> int:
        return max(1, math.ceil(self.height / self.core))

    @property
    def n_cols(self) -> int:
        return max(1, math.ceil(self.width / self.core))

    def __len__(self) -> int:
        return self.n_rows * self.n_cols

    def core_box(self, row: int, col: int) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1) of the tile's core, model px (half-open)."""
        return col * self.core, row * self.core, (col + 1) * self.core, (row + 1) * self.core

    def window_box(self, row: int, col: int) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1) of the output window, model px."""
        x0, y0, x1, y1 = self.core_box(row, col)
        m = self.halo
        return x0 - m, y0 - m, x1 + m, y1 + m

    def input_box(self, row: int, col: int) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1) of the model input, model px (may extend past the slide)."""
        x0, y0, x1, y1 = self.window_box(row, col)
        c = self.context
        return x0 - c, y0 - c, x0 - c + self.input_size, y0 - c + self.input_size

    def tiles(self) -> list[tuple[int, int]]:
        """All (row, col) in row-major order."""
        return [(r, c) for r in range(self.n_rows) for c in range(self.n_cols)]


def make_grid(width: int, height: int, *, input_size: int, output_size: int, halo: int) -> TileGrid:
    """Grid for a model with the given input/output sizes and a halo of ``halo`` model px.

    Raises
    ------
    ValueError
        If the halo leaves no core, or the output is larger than the input.
    """
    if output_size > input_size:
        raise ValueError(f"output size {output_size} larger than input size {input_size}")
    if (input_size - output_size) % 2:
        raise ValueError("input and output sizes must differ by an even number of pixels")
    core = output_size - 2 * halo
    if core < 16:
        raise ValueError(f"halo {halo} too large for an output window of {output_size} px")
    return TileGrid(int(width), int(height), core, int(halo), int(input_size))


def owner_of(grid: TileGrid, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row and column of the tile whose core contains each point (model px)."""
    col = np.clip(np.floor(np.asarray(x) / grid.core), 0, grid.n_cols - 1).astype(np.int64)
    row = np.clip(np.floor(np.asarray(y) / grid.core), 0, grid.n_rows - 1).astype(np.int64)
    return row, col


def owned_mask(
    grid: TileGrid,
    row: int,
    col: int,
    cx: np.ndarray,
    cy: np.ndarray,
    bbox: np.ndarray,
    *,
    strict: bool = False,
) -> tuple[np.ndarray, int]:
    """Which nuclei found in tile (row, col) this tile owns.

    Parameters
    ----------
    grid : TileGrid
    row, col : int
        The tile.
    cx, cy : ndarray of float, shape (N,)
        Centroids in model px (slide frame).
    bbox : ndarray of int, shape (N, 4)
        (min_row, min_col, max_row, max_col) of each nucleus in *window* pixel coordinates
        (max exclusive), as returned by ``scipy.ndimage.find_objects``.
    strict : bool
        Raise :class:`OwnershipError` when an owned nucleus touches the window border
        (the halo is too small for it); otherwise keep it and count it.

    Returns
    -------
    keep : ndarray of bool, shape (N,)
    n_oversized : int
        Owned nuclei that touch the window border (kept, possibly cut).
    """
    r, c = owner_of(grid, cx, cy)
    owned = (r == row) & (c == col)
    w = grid.window
    bbox = np.asarray(bbox).reshape(-1, 4)
    touches = (bbox[:, 0] <= 0) | (bbox[:, 1] <= 0) | (bbox[:, 2] >= w) | (bbox[:, 3] >= w)
    bad = owned & touches
    n_bad = int(bad.sum())
    if n_bad and strict:
        raise OwnershipError(
            f"tile ({row}, {col}): {n_bad} nucleus/nuclei owned by this tile touch its window border; "
            f"the halo ({grid.halo} px) is smaller than the nucleus radius"
        )
    return owned, n_bad


def overlap_check(
    polys_a: list, probs_a: np.ndarray, polys_b: list, probs_b: np.ndarray, *, min_overlap: float = 0.5
) -> tuple[np.ndarray, np.ndarray]:
    """Find duplicates between two sets of polygons from neighbouring tiles.

    A pair is a duplicate when their intersection covers at least ``min_overlap`` of the
    smaller polygon; the one with the lower probability (ties: the one in ``b``) is dropped.

    Returns
    -------
    drop_a, drop_b : ndarray of bool
        Masks of the polygons to remove from each set.
    """
    import shapely

    drop_a = np.zeros(len(polys_a), bool)
    drop_b = np.zeros(len(polys_b), bool)
    if not len(polys_a) or not len(polys_b):
        return drop_a, drop_b
    tree = shapely.STRtree(polys_a)
    ib, ia = tree.query(polys_b, predicate="intersects")
    for j, i in zip(ib, ia):
        if drop_a[i] or drop_b[j]:
            continue
        pa, pb = polys_a[i], polys_b[j]
        inter = pa.intersection(pb).area
        if inter >= min_overlap * min(pa.area, pb.area):
            if probs_a[i] >= probs_b[j]:
                drop_b[j] = True
            else:
                drop_a[i] = True
    return drop_a, drop_b

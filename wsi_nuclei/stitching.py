"""Nuclei across block borders: each one reaches the output exactly once, whatever the tiling.

Post-processing runs on blocks of the blended maps (:class:`~wsi_nuclei.tiling.BlockGrid`),
each read with a halo. A block sees a nucleus *whole* when the nucleus does not touch the
block's window border. Every block sorts its nuclei (:func:`classify_block_nuclei`):

* **exclusive**: whole, and lying entirely in the part of the block's core that no other
  block's window reaches. No other block can produce anything overlapping it, so it is final.
* **candidate**: every other whole nucleus (near a seam, or in the halo, i.e. centred in a
  neighbour's core), plus nuclei cut by the window border whose centroid lies in the core (a
  nucleus larger than the halo; the last resort so that nothing is lost).
* **core pieces**: a nucleus cut by the window border whose centroid lies outside the core
  but which reaches into the core. It may be seen cut everywhere (e.g. merged with a
  neighbour into an object larger than the halo, centred in a block that sees it cut at its
  other side), so the block keeps the part in its own core (:func:`clip_to_core`) as the
  lowest-priority candidate: what no other view covers there is output, in pieces. Cores do
  not overlap, so core pieces of different blocks never compete with each other.
* everything else (cut, centred outside the core, away from it) is dropped.

Candidates are kept with their pixel masks until every block is done, then resolved by
:func:`resolve_seams`: in decreasing *priority* (whole before cut, then the distance from
the nucleus to its window border, capped: the view with the most context; then the block
whose core holds the centroid; then a fixed block order), each candidate is

* **kept** if it shares no pixel with a candidate kept before it,
* **trimmed** to what remains otherwise: each remaining connected piece that is a nucleus of
  its own (at least ``min_px`` pixels that survive an opening by a 3 x 3 square, i.e. not a
  rim or a sliver left by a slightly different outline) becomes a nucleus,
* **dropped** as a duplicate when nothing but such slivers remains (counted).

The order is a total order on candidates, so the result does not depend on the order in
which blocks finished. When all blocks agree (a nucleus segmented identically in two
overlapping windows) the rule reduces to StarDist's: the block that sees it whole and owns
its centroid keeps it. When they do not agree (a nucleus merged with a neighbour in one
window, split in the other), no pixel is output twice and no nucleus seen whole by any block
disappears: what no earlier output covers is output unless it is only slivers.
:func:`check_resolution` states that invariant and raises :class:`SeamError` when it is
broken.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage as ndi

from .errors import OwnershipError
from .tiling import BlockGrid

__all__ = [
    "BlockNuclei",
    "Candidates",
    "Resolution",
    "SeamError",
    "classify_block_nuclei",
    "clip_to_core",
    "resolve_seams",
    "check_resolution",
    "pack_mask",
    "unpack_mask",
]

#: Bits of the priority key (larger = preferred).
_WHOLE = 1 << 20


class SeamError(OwnershipError):
    """The seam-resolution invariant is broken (a pixel output twice or a nucleus lost)."""


@dataclass(frozen=True)
class BlockNuclei:
    """How one block's instances are used (arrays aligned with the instance labels).

    Attributes
    ----------
    exclusive, candidate : ndarray of bool, shape (N,)
        Final nuclei of this block; nuclei kept for seam resolution (core pieces included).
    core_piece : ndarray of bool, shape (N,)
        Candidates that enter the resolution clipped to the core (:func:`clip_to_core`).
    cut : ndarray of bool, shape (N,)
        Touching the window border (seen cut).
    owner : ndarray of bool, shape (N,)
        Centroid in the block's core.
    priority : ndarray of int64, shape (N,)
        Resolution priority (see the module notes); meaningful for candidates.
    """

    exclusive: np.ndarray
    candidate: np.ndarray
    core_piece: np.ndarray
    cut: np.ndarray
    owner: np.ndarray
    priority: np.ndarray


def classify_block_nuclei(
    grid: BlockGrid,
    row: int,
    col: int,
    cx: np.ndarray,
    cy: np.ndarray,
    bbox: np.ndarray,
    *,
    distance_cap: int | None = None,
) -> BlockNuclei:
    """Sort the instances found in block ``(row, col)`` into exclusive, candidate and dropped.

    Parameters
    ----------
    grid : BlockGrid
    row, col : int
    cx, cy : ndarray of float, shape (N,)
        Centroids, canvas model px.
    bbox : ndarray of int, shape (N, 4)
        ``(y0, x0, y1, x1)`` of each instance in *canvas* model px (end exclusive).
    distance_cap : int, optional
        Distances to the window border beyond this count the same (default ``halo // 2``):
        beyond it two views of a nucleus are taken to be equally good, and the owner wins.

    Returns
    -------
    BlockNuclei
    """
    bbox = np.asarray(bbox, np.int64).reshape(-1, 4)
    wx0, wy0, wx1, wy1 = grid.window_box(row, col)
    cx0, cy0, cx1, cy1 = grid.core_box(row, col)
    m = grid.halo
    cap = max(1, m // 2) if distance_cap is None else max(1, int(distance_cap))
    y0, x0, y1, x1 = bbox.T
    d = np.minimum.reduce([y0 - wy0, x0 - wx0, wy1 - y1, wx1 - x1])  # 0: touches the border
    cut = d <= 0
    owner = (cx >= cx0) & (cx < cx1) & (cy >= cy0) & (cy < cy1)
    # the part of the core no other block's window reaches (a side without a neighbour
    # block, at the canvas edge, is not shared)
    ex0 = cx0 + (m if col > 0 else -m)
    ey0 = cy0 + (m if row > 0 else -m)
    ex1 = cx1 - (m if col < grid.n_cols - 1 else -m)
    ey1 = cy1 - (m if row < grid.n_rows - 1 else -m)
    inside = (x0 >= ex0) & (y0 >= ey0) & (x1 <= ex1) & (y1 <= ey1)
    exclusive = ~cut & owner & inside
    reaches_core = (x0 < cx1) & (x1 > cx0) & (y0 < cy1) & (y1 > cy0)
    core_piece = cut & ~owner & reaches_core
    candidate = ~exclusive & (~cut | owner | core_piece)
    # whole > cut owner (1) > core piece (0)
    priority = np.where(cut, 0, _WHOLE) + 2 * np.clip(d, 0, cap) + owner.astype(np.int64)
    return BlockNuclei(exclusive, candidate, core_piece, cut, owner, priority.astype(np.int64))


def clip_to_core(
    grid: BlockGrid, row: int, col: int, mask: np.ndarray, bbox: np.ndarray
) -> tuple[np.ndarray, np.ndarray] | None:
    """The part of a nucleus mask inside block ``(row, col)``'s core.

    Parameters
    ----------
    grid : BlockGrid
    row, col : int
    mask : ndarray of bool, shape (h, w)
        The nucleus over its bounding box.
    bbox : ndarray of int, shape (4,)
        ``(y0, x0, y1, x1)`` of ``mask``, canvas model px.

    Returns
    -------
    (mask, bbox) or None
        The clipped mask over its own, tight bounding box; None when no pixel is in the core.
    """
    cx0, cy0, cx1, cy1 = grid.core_box(row, col)
    cx1, cy1 = min(cx1, grid.width), min(cy1, grid.height)  # the last cores end at the canvas
    y0, x0, y1, x1 = (int(v) for v in bbox)
    a0, b0, a1, b1 = max(y0, cy0), max(x0, cx0), min(y1, cy1), min(x1, cx1)
    if a0 >= a1 or b0 >= b1:
        return None
    sub = np.asarray(mask, bool)[a0 - y0 : a1 - y0, b0 - x0 : b1 - x0]
    rows, cols = np.nonzero(sub.any(1))[0], np.nonzero(sub.any(0))[0]
    if not len(rows):
        return None
    r0, r1, c0, c1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
    tight = np.array([a0 + r0, b0 + c0, a0 + r1, b0 + c1], np.int64)
    return sub[r0:r1, c0:c1].copy(), tight


# --------------------------------------------------------------------------------------------
# masks
# --------------------------------------------------------------------------------------------
def pack_mask(mask: np.ndarray) -> bytes:
    """A boolean mask as packed bits (its shape is stored with the bounding box)."""
    return np.packbits(np.asarray(mask, bool), axis=None).tobytes()


def unpack_mask(data: bytes, shape: tuple[int, int]) -> np.ndarray:
    """Inverse of :func:`pack_mask`."""
    n = int(shape[0]) * int(shape[1])
    return np.unpackbits(np.frombuffer(data, np.uint8), count=n).astype(bool).reshape(shape)


# --------------------------------------------------------------------------------------------
# resolution
# --------------------------------------------------------------------------------------------
@dataclass
class Candidates:
    """All seam candidates of a run (one entry each; any order).

    Attributes
    ----------
    key : ndarray of int64, shape (K, 3)
        ``(block_row, block_col, index in block)``: identifies the candidate and breaks
        priority ties (lower first).
    priority : ndarray of int64, shape (K,)
    bbox : ndarray of int64, shape (K, 4)
        ``(y0, x0, y1, x1)`` canvas model px.
    masks : list of ndarray of bool
        Pixel mask of each candidate over its bounding box.
    core_piece : ndarray of bool, shape (K,), optional
        Candidates that are a cut nucleus's part in one block's core (:func:`clip_to_core`):
        never output as they are, only as their pieces that are nuclei of their own (so the
        output is re-measured). Default: none.
    """

    key: np.ndarray
    priority: np.ndarray
    bbox: np.ndarray
    masks: list
    core_piece: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.masks)

    def order(self) -> np.ndarray:
        """Indices in resolution order: priority descending, then key ascending."""
        k = self.key.reshape(-1, 3)
        return np.lexsort((k[:, 2], k[:, 1], k[:, 0], -self.priority))


@dataclass
class Resolution:
    """Outcome of :func:`resolve_seams`, aligned with the candidates.

    Attributes
    ----------
    status : ndarray of int8
        1 kept, 2 trimmed, 0 dropped.
    masks : dict of int to list of ndarray
        The remaining pieces (each over the same bounding box) of each trimmed candidate.
    covered_by : dict of int to list of int
        For each dropped or trimmed candidate, the kept candidates it overlapped.
    """

    status: np.ndarray
    masks: dict = field(default_factory=dict)
    covered_by: dict = field(default_factory=dict)

    @property
    def n_kept(self) -> int:
        return int((self.status == 1).sum())

    @property
    def n_trimmed(self) -> int:
        return int((self.status == 2).sum())

    @property
    def n_dropped(self) -> int:
        return int((self.status == 0).sum())


class _Index:
    """Selected masks in a coarse spatial hash (cells of ``cell`` px)."""

    def __init__(self, cell: int = 64) -> None:
        self.cell = cell
        self.cells: dict[tuple[int, int], list[int]] = {}

    def _cells(self, b: Sequence[int]) -> list[tuple[int, int]]:
        c = self.cell
        return [
            (gy, gx)
            for gy in range(int(b[0]) // c, (int(b[2]) - 1) // c + 1)
            for gx in range(int(b[1]) // c, (int(b[3]) - 1) // c + 1)
        ]

    def add(self, i: int, b: Sequence[int]) -> None:
        for k in self._cells(b):
            self.cells.setdefault(k, []).append(i)

    def near(self, b: Sequence[int]) -> list[int]:
        seen: set[int] = set()
        for k in self._cells(b):
            seen.update(self.cells.get(k, ()))
        return sorted(seen)


def _boxes(cands: Candidates) -> list[list[int]]:
    """The candidates' ``(y0, x0, y1, x1)`` boxes as Python ints: :func:`_taken` and
    :class:`_Index` read them once per neighbour, where numpy scalars cost several times more."""
    return np.asarray(cands.bbox, np.int64).reshape(-1, 4).tolist()


def _taken(
    i: int,
    boxes: list[list[int]],
    mask: np.ndarray,
    others: list[int],
    final: dict[int, np.ndarray],
) -> tuple[np.ndarray | None, list[int]]:
    """Pixels of candidate ``i``'s ``mask`` (over its box ``boxes[i]``) that the final masks of
    ``others`` cover (None when they cover none), and which of ``others`` cover any."""
    by0, bx0, by1, bx1 = boxes[i]
    taken = None
    hit = []
    for j in others:
        jy0, jx0, jy1, jx1 = boxes[j]
        y0, x0, y1, x1 = max(by0, jy0), max(bx0, jx0), min(by1, jy1), min(bx1, jx1)
        if y0 >= y1 or x0 >= x1:
            continue
        ov = (
            final[j][y0 - jy0 : y1 - jy0, x0 - jx0 : x1 - jx0]
            & mask[y0 - by0 : y1 - by0, x0 - bx0 : x1 - bx0]
        )
        if ov.any():
            if taken is None:
                taken = np.zeros((by1 - by0, bx1 - bx0), bool)
            taken[y0 - by0 : y1 - by0, x0 - bx0 : x1 - bx0] |= ov
            hit.append(j)
    return taken, hit


_SQUARE = np.ones((3, 3), bool)


def _pieces(mask: np.ndarray, min_px: int) -> list[np.ndarray]:
    """The 8-connected pieces of ``mask`` that are nuclei of their own, largest first: at least
    ``min_px`` of their pixels survive an opening by a 3 x 3 square (rims and slivers do not)."""
    if int(np.count_nonzero(mask)) < min_px:  # no piece can keep min_px pixels (the common
        return []  # case: what a duplicate's twin leaves of it)
    lab, n = ndi.label(mask, structure=_SQUARE)
    if n == 0:
        return []
    core = ndi.binary_opening(np.pad(mask, 1), structure=_SQUARE)[1:-1, 1:-1]
    solid = np.bincount(lab[core].ravel(), minlength=n + 1)
    sizes = np.bincount(lab.ravel(), minlength=n + 1)
    order = [k for k in np.argsort(-sizes[1:], kind="stable") + 1 if solid[k] >= min_px]
    return [lab == k for k in order]


def resolve_seams(cands: Candidates, *, min_px: int = 10) -> Resolution:
    """Resolve all seam candidates (see the module notes); deterministic in any input order.

    Parameters
    ----------
    cands : Candidates
    min_px : int
        A remaining piece is a nucleus when at least this many of its pixels survive an
        opening by a 3 x 3 square.

    Returns
    -------
    Resolution
    """
    n = len(cands)
    status = np.zeros(n, np.int8)
    out = Resolution(status)
    final: dict[int, np.ndarray] = {}
    index = _Index()
    piece = np.zeros(n, bool) if cands.core_piece is None else np.asarray(cands.core_piece, bool)
    boxes = _boxes(cands)
    for i in cands.order().tolist():
        mask = cands.masks[i]
        taken, hit = _taken(i, boxes, mask, index.near(boxes[i]), final)
        if taken is None and not piece[i]:
            status[i] = 1
            final[i] = mask
        else:
            pieces = _pieces(mask if taken is None else mask & ~taken, min_px)
            if pieces:
                status[i] = 2
                final[i] = np.logical_or.reduce(pieces)
                out.masks[i] = pieces
            if hit:
                out.covered_by[i] = hit
        if status[i]:
            index.add(i, boxes[i])
    return out


def check_resolution(cands: Candidates, res: Resolution, *, min_px: int = 10) -> None:
    """The seam invariant; raises :class:`SeamError` when it does not hold.

    1. No pixel belongs to two output candidates (kept or trimmed).
    2. A trimmed candidate is made of non-empty, disjoint parts of the original.
    3. Nothing seen is lost: what output candidates before it in the resolution order leave
       of a dropped candidate is only slivers (no piece that :func:`resolve_seams` would keep).
    """
    order = cands.order()
    rank = np.empty(len(cands), np.int64)
    rank[order] = np.arange(len(cands))
    final = {}
    for i in np.nonzero(res.status)[0].tolist():
        if res.status[i] == 2:
            parts = list(res.masks.get(i, []))
            if (
                not parts
                or any(
                    m.shape != cands.masks[i].shape or not m.any() or (m & ~cands.masks[i]).any()
                    for m in parts
                )
                or sum(int(m.sum()) for m in parts) != int(np.logical_or.reduce(parts).sum())
            ):
                raise SeamError(
                    f"candidate {tuple(cands.key[i])}: trimmed mask is not a part of the original"
                )
            final[i] = np.logical_or.reduce(parts)
        else:
            final[i] = cands.masks[i]
    boxes = _boxes(cands)
    index = _Index()
    for i in sorted(final, key=lambda k: rank[k]):
        b = boxes[i]
        taken, hit = _taken(i, boxes, final[i], index.near(b), final)
        if taken is not None:
            j = hit[0]
            raise SeamError(
                f"candidates {tuple(cands.key[i])} and {tuple(cands.key[j])} share {int(taken.sum())} pixel(s)"
            )
        index.add(i, b)
    for i in np.nonzero(res.status == 0)[0].tolist():
        before = [j for j in index.near(boxes[i]) if rank[j] < rank[i]]
        taken, _ = _taken(i, boxes, cands.masks[i], before, final)
        size = int(cands.masks[i].sum())
        rest = _pieces(cands.masks[i] if taken is None else cands.masks[i] & ~taken, min_px)
        if rest:
            raise SeamError(
                f"candidate {tuple(cands.key[i])} dropped but {int(rest[0].sum())} of its {size} px are covered by "
                "no output: a nucleus would be lost"
            )


def polygon_overlaps(geoms) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # type: ignore[no-untyped-def]
    """Every pair of distinct polygons that intersect, with the area they share.

    The output-level form of the ownership invariant: a correct run gives no pair whose
    shared area exceeds rounding (0.01-px snapped outlines share at most slivers).

    Parameters
    ----------
    geoms : sequence of shapely geometries
        Output nucleus outlines (level-0 px).

    Returns
    -------
    i, j : ndarray of int64
        Indices of the two polygons of each pair, ``i < j``.
    area : ndarray of float64
        Area of their intersection (px²); 0 for polygons that only touch.
    """
    import shapely

    g = np.asarray(geoms, object)
    if len(g) < 2:
        empty = np.zeros(0, np.int64)
        return empty, empty, np.zeros(0)
    a, b = shapely.STRtree(g).query(g, predicate="intersects")
    sel = a < b
    a, b = a[sel].astype(np.int64), b[sel].astype(np.int64)
    area = shapely.area(shapely.intersection(g[a], g[b])) if len(a) else np.zeros(0)
    return a, b, np.asarray(area, np.float64)

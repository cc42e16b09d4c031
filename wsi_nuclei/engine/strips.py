"""Planning the engine's work: fixed patch batches per vertical strip of blocks
(:class:`Strip`, :func:`plan_strips`) and the patches that cover a window.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np

from ..tiling import BlockGrid, PatchGrid

__all__ = [
    "Strip",
    "patches_for_window",
    "plan_strips",
]


@dataclass(frozen=True)
class Strip:
    """A vertical strip of blocks processed top to bottom with one band of maps.

    Attributes
    ----------
    x0, x1 : int
        Canvas columns of the maps the strip keeps (its blocks' windows).
    blocks : tuple of (row, col)
        Active blocks of the strip, row-major.
    batches : tuple of tuple of (row, col)
        The strip's patches in row-major order, cut into batches of the batch size. The
        partition is fixed by the plan, so a resumed run infers exactly the same batches.
    """

    x0: int
    x1: int
    blocks: tuple[tuple[int, int], ...]
    batches: tuple[tuple[tuple[int, int], ...], ...]

    @property
    def n_patches(self) -> int:
        return sum(len(b) for b in self.batches)


def patches_for_window(pg: PatchGrid, box: tuple[int, int, int, int]) -> tuple[range, range]:
    """Patch rows and columns whose output meets the canvas box ``(x0, y0, x1, y1)``."""
    x0, y0, x1, y1 = box
    return pg.covering(y0, y1, pg.n_rows), pg.covering(x0, x1, pg.n_cols)


def plan_strips(
    pg: PatchGrid,
    bg: BlockGrid,
    blocks: Iterable[tuple[int, int]],
    *,
    patch_ok: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None,
    strip_blocks: int = 8,
    batch_size: int = 16,
) -> list[Strip]:
    """Strips of the active ``blocks`` with their patch batches.

    A patch runs when its output meets the window of an active block of the strip and
    ``patch_ok(rows, cols)`` (a function of the slide only, e.g. "near tissue") accepts it; a
    pixel's blended value therefore depends on the slide and the model, not on the blocks.
    """
    if strip_blocks < 1 or batch_size < 1:
        raise ValueError("strip_blocks and batch_size must be >= 1")
    active = sorted(set(blocks))
    strips = []
    for j0 in range(0, bg.n_cols, strip_blocks):
        j1 = min(bg.n_cols, j0 + strip_blocks)
        sb = tuple(b for b in active if j0 <= b[1] < j1)
        if not sb:
            continue
        need: set[tuple[int, int]] = set()
        for r, c in sb:
            rows, cols = patches_for_window(pg, bg.window_box(r, c))
            need.update((pr, pc) for pr in rows for pc in cols)
        pts = np.array(sorted(need), np.int64).reshape(-1, 2)
        if patch_ok is not None and len(pts):
            pts = pts[np.asarray(patch_ok(pts[:, 0], pts[:, 1]), bool)]
        plist = [(int(r), int(c)) for r, c in pts]
        batches = tuple(tuple(plist[i : i + batch_size]) for i in range(0, len(plist), batch_size))
        x0 = j0 * bg.core - bg.halo
        x1 = j1 * bg.core + bg.halo
        strips.append(Strip(x0, x1, sb, batches))
    return strips

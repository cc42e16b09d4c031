"""Blending patch maps: :class:`MapBlender` accumulates weighted patch maps in patch order
(deterministic) into a band of rows and hands out each block's window once it is final.
"""

from __future__ import annotations

import numpy as np

from ..tiling import PatchGrid, blend_weights

__all__ = [
    "MapBlender",
]


class MapBlender:
    """Blends patch outputs of one strip into final map rows, in patch order.

    Patches must be added in row-major patch order (the plan's order); each pixel's weighted
    sum then always adds the same terms in the same order, so the result does not depend on
    which task finished first. Rows become final when the next patch row starts; they are kept
    as float16 chunks until :meth:`drop_before` releases them.
    """

    def __init__(self, pg: PatchGrid, x0: int, x1: int, channels: int, fill: np.ndarray) -> None:
        self.pg, self.x0, self.x1 = pg, x0, x1
        self.width = x1 - x0
        self.c = channels
        self.fill = np.asarray(fill, np.float32).reshape(-1)
        n, s = pg.output_size, pg.stride
        self.acc = np.zeros((channels + 1, n, self.width), np.float32)
        w1 = blend_weights(n, s)
        self.w2 = np.outer(w1, w1).astype(np.float32)
        self._term = np.empty((channels, n, n), np.float32)  # one patch's weighted maps (reused)
        self.row: int | None = None
        self.chunks: list[tuple[int, np.ndarray]] = []  # (canvas y0, (C, h, width) float16)
        self.final_y = -(1 << 60)  # canvas rows < final_y are final
        self.done = False
        self.lowres: list[tuple[int, np.ndarray]] = []

    def _acc_y0(self) -> int:
        assert self.row is not None
        return int(self.pg.output_start(self.row))

    def add(self, patch: tuple[int, int], maps: np.ndarray) -> None:
        """Add one patch's output ``(C, N, N)`` (rows must not go backwards)."""
        r, c = patch
        if self.row is None:
            self.row = r
        elif r < self.row:
            raise ValueError(
                f"patch row {r} after row {self.row}: patches must come in row-major order"
            )
        while self.row < r:
            self._finalize_row()
        pg = self.pg
        px0 = int(pg.output_start(c)) - self.x0
        a0, a1 = max(0, px0), min(self.width, px0 + pg.output_size)
        if a1 <= a0:
            return
        w = self.w2[:, a0 - px0 : a1 - px0]
        acc = self.acc
        term = self._term[:, :, : a1 - a0]
        np.multiply(
            maps[:, :, a0 - px0 : a1 - px0], w, out=term
        )  # float16 -> float32 exactly, then * w
        acc[: self.c, :, a0:a1] += term
        acc[self.c, :, a0:a1] += w

    def _emit(self, y0: int, part: np.ndarray) -> None:
        # the weighted mean, computed in float32 one channel at a time (a temporary of one
        # channel's rows) and rounded to float16 into the kept chunk; the fill where no weight
        # fell. Plain loops: a masked division with a casting output runs through numpy's
        # buffered iterator, several times slower for the same numbers
        wsum = part[self.c]
        pos = wsum > 0
        if not pos.any():
            return
        maps = np.empty(part[: self.c].shape, np.float16)
        fill16 = self.fill.astype(np.float16)
        empty = ~pos
        any_empty = bool(empty.any())
        mean = np.empty(wsum.shape, np.float32)
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):  # fill where no weight
            for j in range(self.c):
                np.divide(part[j], wsum, out=mean)
                maps[j] = mean
                if any_empty:
                    np.copyto(maps[j], fill16[j], where=empty)
        self.chunks.append((y0, maps))

    def _finalize_row(self) -> None:
        s, b = self.pg.stride, self.pg.border
        y0 = self._acc_y0()
        self._emit(y0, self.acc[:, :s])
        # rows s .. s + 2b (the next row's overlap) move to the top, the rest starts at zero
        self.acc[:, : 2 * b] = self.acc[:, s : s + 2 * b]
        self.acc[:, 2 * b :] = 0
        self.row = (self.row or 0) + 1
        self.final_y = y0 + s

    def finish(self) -> None:
        """No more patches: everything accumulated is final."""
        if self.row is not None and not self.done:
            y0 = self._acc_y0()
            self._emit(y0, self.acc)
        self.done = True
        self.final_y = 1 << 60

    def window(self, box: tuple[int, int, int, int]) -> np.ndarray:
        """The final maps over a canvas box ``(x0, y0, x1, y1)``, float16.

        Fill where no patch ran and beyond the canvas: the slide ends at its edge (patches
        near it see mirrored context, but what they predict beyond the edge is not kept).
        """
        x0, y0, x1, y1 = box
        if y1 > self.final_y:
            raise ValueError(f"rows up to {y1} requested, only rows < {self.final_y} are final")
        out = np.empty((self.c, y1 - y0, x1 - x0), np.float16)
        out[:] = self.fill[:, None, None].astype(np.float16)
        W, H = self.pg.width, self.pg.height
        ca, cb = max(x0, self.x0, 0), min(x1, self.x1, W)
        for cy0, ch in self.chunks:
            cy1 = cy0 + ch.shape[1]
            a, b = max(y0, cy0, 0), min(y1, cy1, H)
            if a >= b or ca >= cb:
                continue
            out[:, a - y0 : b - y0, ca - x0 : cb - x0] = ch[
                :, a - cy0 : b - cy0, ca - self.x0 : cb - self.x0
            ]
        return out

    def drop_before(self, y: int) -> None:
        """Release chunks that end at or above canvas row ``y``."""
        self.chunks = [(cy0, ch) for cy0, ch in self.chunks if cy0 + ch.shape[1] > y]

    @property
    def nbytes(self) -> int:
        return int(self.acc.nbytes + sum(ch.nbytes for _, ch in self.chunks))

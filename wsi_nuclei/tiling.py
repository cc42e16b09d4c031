"""Geometry at model resolution: the network's patch grid and the post-processing block grid.

All coordinates are *model pixels* (level-0 pixels times ``slide_mpp / model_mpp``) on the
slide's canvas ``[0, width) x [0, height)``. Two grids, kept apart as StarDist's ``big.py``
keeps "context" apart from "object overlap":

**Patch grid** (:class:`PatchGrid`): where the network runs. Patch ``k`` along an axis has
its *output* window at ``[k * S - B, k * S - B + N)`` (``N`` = model output size, ``S`` = stride,
``B = (N - S) / 2`` = the border the model does not fully trust) and its *input* window
``(input - output) / 2`` pixels larger on each side. The grid is anchored at the canvas
origin and depends on nothing but the model, so every pixel's network output is a function of
the slide and the model alone. Overlapping outputs are blended with :func:`blend_weights`
(a smooth cross-fade over the ``N - S`` overlap that sums to one), so the blended map is
continuous across patch borders and each pixel is dominated by the patch that sees it with the
most context.

**Block grid** (:class:`BlockGrid`): where post-processing runs on the blended maps. Block
``(r, c)`` owns its *core* ``[c * C, (c + 1) * C) x [r * C, (r + 1) * C)`` and reads a *window*
grown by the halo ``M``. How nuclei near block borders are resolved (exactly once, whatever
the tiling) is :mod:`wsi_nuclei.stitching`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import overload

import numpy as np

__all__ = ["PatchGrid", "BlockGrid", "blend_weights", "passes_per_pixel"]


@dataclass(frozen=True)
class PatchGrid:
    """The network's fixed patch grid over a ``width`` x ``height`` canvas (model px).

    Attributes
    ----------
    width, height : int
        Canvas size at model resolution.
    input_size, output_size : int
        The model's input and output windows (square).
    stride : int
        Distance between neighbouring patches' outputs (``<= output_size``).
    """

    width: int
    height: int
    input_size: int
    output_size: int
    stride: int

    def __post_init__(self) -> None:
        if not 0 < self.stride <= self.output_size <= self.input_size:
            raise ValueError(
                f"need 0 < stride <= output <= input, got {self.stride}, {self.output_size}, {self.input_size}"
            )
        if (self.output_size - self.stride) % 2 or (self.input_size - self.output_size) % 2:
            raise ValueError("output - stride and input - output must be even")
        if self.output_size > 2 * self.stride:  # more than two patches would overlap a pixel
            raise ValueError(f"stride {self.stride} less than half the output {self.output_size}")

    @property
    def border(self) -> int:
        """Output pixels on each side shared with the neighbouring patch: ``(N - S) / 2``."""
        return (self.output_size - self.stride) // 2

    @property
    def context(self) -> int:
        """Input pixels on each side beyond the output window."""
        return (self.input_size - self.output_size) // 2

    @property
    def n_rows(self) -> int:
        return max(1, math.ceil(self.height / self.stride))

    @property
    def n_cols(self) -> int:
        return max(1, math.ceil(self.width / self.stride))

    def __len__(self) -> int:
        return self.n_rows * self.n_cols

    @overload
    def output_start(self, k: int) -> int: ...
    @overload
    def output_start(self, k: np.ndarray) -> np.ndarray: ...

    def output_start(self, k: int | np.ndarray) -> int | np.ndarray:
        """First output pixel of patch ``k`` along an axis."""
        return k * self.stride - self.border

    def output_box(self, row: int, col: int) -> tuple[int, int, int, int]:
        """``(x0, y0, x1, y1)`` of the patch's output window (half-open)."""
        x0, y0 = col * self.stride - self.border, row * self.stride - self.border
        return x0, y0, x0 + self.output_size, y0 + self.output_size

    def input_box(self, row: int, col: int) -> tuple[int, int, int, int]:
        """``(x0, y0, x1, y1)`` of the patch's input window (may extend past the canvas)."""
        x0, y0, x1, y1 = self.output_box(row, col)
        c = self.context
        return x0 - c, y0 - c, x1 + c, y1 + c

    def covering(self, lo: int, hi: int, n: int) -> range:
        """Patch indices (along an axis with ``n`` patches) whose output meets ``[lo, hi)``."""
        first = max(0, -(-(lo + self.border - self.output_size + 1) // self.stride))
        last = min(n - 1, (hi - 1 + self.border) // self.stride)
        return range(first, last + 1)

    def final_before(self, row: int) -> int:
        """Canvas rows ``< final_before(r)`` receive no output from patch rows after ``r``."""
        return (row + 1) * self.stride - self.border


def blend_weights(output_size: int, stride: int) -> np.ndarray:
    """Per-pixel blending weight along one axis of a patch output, shape ``(output_size,)``.

    A smoothstep cross-fade over the ``overlap = output_size - stride`` pixels at each end:
    ``w(d) = s((d + 0.5) / overlap)`` with ``d`` the distance to the output border and
    ``s(t) = 3t² - 2t³`` (clipped to [0, 1]); 1 where no neighbour overlaps. Because
    ``s(t) + s(1 - t) = 1``, the weights of two neighbouring patches sum to exactly one
    everywhere in their overlap, and the 2-D weight (the outer product) sums to one over the
    four patches at a corner. Pixels at a patch's very border weigh almost nothing.
    """
    o = output_size - stride
    if o <= 0:
        return np.ones(output_size, np.float32)
    d = np.minimum(np.arange(output_size), np.arange(output_size)[::-1]).astype(np.float64)
    t = np.clip((d + 0.5) / o, 0.0, 1.0)
    return (t * t * (3.0 - 2.0 * t)).astype(np.float32)


def passes_per_pixel(n_patches: int, input_size: int, area_px: float) -> float:
    """Network input pixels per canvas pixel processed: ``patches * input² / area``."""
    return float(n_patches * input_size * input_size / area_px) if area_px > 0 else float("nan")


@dataclass(frozen=True)
class BlockGrid:
    """Post-processing blocks of ``core`` x ``core`` model px, each read with a ``halo``.

    Attributes
    ----------
    width, height : int
        Canvas size (model px).
    core : int
        Block core size C (the cores partition the canvas).
    halo : int
        Halo M around the core; the window is ``core + 2 * halo``.
    """

    width: int
    height: int
    core: int
    halo: int

    def __post_init__(self) -> None:
        if self.core < 16:
            raise ValueError(f"block size {self.core} too small (at least 16 px)")
        if not 0 <= self.halo <= self.core:
            raise ValueError(f"halo {self.halo} must be between 0 and the block size {self.core}")

    @property
    def window(self) -> int:
        return self.core + 2 * self.halo

    @property
    def n_rows(self) -> int:
        return max(1, math.ceil(self.height / self.core))

    @property
    def n_cols(self) -> int:
        return max(1, math.ceil(self.width / self.core))

    def __len__(self) -> int:
        return self.n_rows * self.n_cols

    def core_box(self, row: int, col: int) -> tuple[int, int, int, int]:
        """``(x0, y0, x1, y1)`` of the block's core, model px (half-open)."""
        c = self.core
        return col * c, row * c, (col + 1) * c, (row + 1) * c

    def window_box(self, row: int, col: int) -> tuple[int, int, int, int]:
        """``(x0, y0, x1, y1)`` of the block's window (core grown by the halo)."""
        x0, y0, x1, y1 = self.core_box(row, col)
        m = self.halo
        return x0 - m, y0 - m, x1 + m, y1 + m

    def blocks(self) -> list[tuple[int, int]]:
        """All ``(row, col)`` in row-major order."""
        return [(r, c) for r in range(self.n_rows) for c in range(self.n_cols)]

    def owner_of(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Row and column of the block whose core contains each point (model px)."""
        col = np.clip(np.floor(np.asarray(x) / self.core), 0, self.n_cols - 1).astype(np.int64)
        row = np.clip(np.floor(np.asarray(y) / self.core), 0, self.n_rows - 1).astype(np.int64)
        return row, col

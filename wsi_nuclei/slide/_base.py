"""What every slide is: :class:`BaseSlide` (padding, resampling, level choice, thumbnails),
:func:`scale_info`, and the :class:`Reader` interface each backend implements.

Readers work in level-pixel coordinates and only read rectangles inside a level; the slide
classes add the white padding, the bounds offset and the resampling on top.
"""

from __future__ import annotations

import abc
import math
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from PIL import Image

from .._rgb import WHITE
from ..errors import MissingMppError
from ._mpp import MppCandidate

__all__ = ["BaseSlide", "Reader", "scale_info"]

#: Relative tolerance when comparing a level's downsample with a target downsample.
_LEVEL_TOLERANCE = 0.01


class _Window(NamedTuple):
    """A level window that :meth:`BaseSlide.read_scaled` reads, and how it resamples it."""

    level: int
    x: int
    y: int
    w: int
    h: int
    #: the fractional source box within the window; None: the window is the result (scale 1)
    resize_box: tuple[float, float, float, float] | None
    out_w: int
    out_h: int


class BaseSlide(abc.ABC):
    """Pixel access shared by :class:`Slide` and :class:`wsi_nuclei.demo.SyntheticSlide`.

    Subclasses set the geometry attributes in ``__init__`` and implement
    :meth:`_read_inbounds`; everything else (padding, resampling, thumbnails, level choice)
    lives here so that real and procedural slides behave identically.

    Attributes
    ----------
    path : pathlib.Path
        The slide file (a descriptive, non-existent path for procedural slides).
    backend : str
        Backend that actually opened the slide.
    vendor : str
        Format/vendor name (OpenSlide vendor where available).
    dimensions : tuple of int
        Level-0 ``(width, height)`` in the QuPath frame.
    level_count : int
        Number of pyramid levels.
    level_dimensions : tuple of tuple of int
        ``(width, height)`` of every level.
    level_downsamples : tuple of float
        Downsample of every level relative to level 0.
    mpp : float or None
        µm per level-0 pixel (mean of x and y); None only with ``require_mpp=False``.
    mpp_xy : tuple of float or None
        µm per level-0 pixel along x and y.
    mpp_source : str
        Where ``mpp`` came from, e.g. ``"aperio:MPP"`` or ``"user:--mpp"``.
    properties : dict of str to str
        Backend metadata, stringified.
    offset : tuple of int
        Bounds origin in level-0 pixels of the file, added to every read.
    fingerprint : str
        Stable, cheap identifier of the slide content.
    """

    path: Path
    backend: str
    vendor: str
    dimensions: tuple[int, int]
    level_count: int
    level_dimensions: tuple[tuple[int, int], ...]
    level_downsamples: tuple[float, ...]
    mpp: float | None
    mpp_xy: tuple[float, float] | None
    mpp_source: str
    properties: dict[str, str]
    offset: tuple[int, int]
    fingerprint: str

    # ---- to implement --------------------------------------------------------------------

    @abc.abstractmethod
    def _read_inbounds(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        """Read a rectangle lying fully inside ``level`` (level pixel coordinates).

        Returns
        -------
        numpy.ndarray
            ``(h, w, 3)`` uint8 RGB.
        """

    def close(self) -> None:  # noqa: B027 - optional for subclasses: nothing to release by default
        """Release backend resources (idempotent)."""

    # ---- context manager -----------------------------------------------------------------

    def __enter__(self) -> BaseSlide:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        w, h = self.dimensions
        return (
            f"{type(self).__name__}({str(self.path)!r}, backend={self.backend!r}, {w}x{h}, "
            f"levels={self.level_count}, mpp={self.mpp})"
        )

    # ---- reading -------------------------------------------------------------------------

    def _read_level(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        """Read any rectangle of ``level`` (level pixels), padding outside the image with white."""
        if w <= 0 or h <= 0:
            raise ValueError(f"region size must be positive, got {w}x{h}")
        lw, lh = self.level_dimensions[level]
        cx0, cy0 = max(x, 0), max(y, 0)
        cx1, cy1 = min(x + w, lw), min(y + h, lh)
        if cx0 == x and cy0 == y and cx1 == x + w and cy1 == y + h:
            return self._read_inbounds(level, x, y, w, h)
        out = np.full((h, w, 3), WHITE, dtype=np.uint8)
        if cx1 > cx0 and cy1 > cy0:
            out[cy0 - y : cy1 - y, cx0 - x : cx1 - x] = self._read_inbounds(
                level, cx0, cy0, cx1 - cx0, cy1 - cy0
            )
        return out

    def _check_level(self, level: int) -> None:
        if not 0 <= int(level) < self.level_count:
            raise ValueError(f"level {level} out of range (slide has {self.level_count} levels)")

    def read_region(
        self, location: tuple[int, int], level: int, size: tuple[int, int]
    ) -> np.ndarray:
        """Read a rectangle of one pyramid level, like ``OpenSlide.read_region``.

        Parameters
        ----------
        location : tuple of int
            Top-left ``(x, y)`` in level-0 pixels of the QuPath frame.
        level : int
            Pyramid level to read from.
        size : tuple of int
            ``(width, height)`` in pixels of ``level``.

        Returns
        -------
        numpy.ndarray
            ``(height, width, 3)`` uint8 RGB; white outside the image and where transparent.
        """
        self._check_level(level)
        ds = self.level_downsamples[level]
        x = int(math.floor(location[0] / ds + 1e-9))
        y = int(math.floor(location[1] / ds + 1e-9))
        return self._read_level(level, x, y, int(size[0]), int(size[1]))

    def _best_level_for_downsample(self, downsample: float) -> int:
        """Coarsest level whose downsample does not exceed ``downsample`` (1 % tolerance)."""
        best = 0
        for i, d in enumerate(self.level_downsamples):
            if d <= downsample * (1.0 + _LEVEL_TOLERANCE) and d > self.level_downsamples[best]:
                best = i
        return best

    def best_level_for_mpp(self, target_mpp: float) -> int:
        """Level closest to, but not coarser than, ``target_mpp``.

        A level within 1 % of the target counts as not coarser (pyramids built by halving odd
        sizes have downsamples like 2.0005). Level 0 when every level is coarser.

        Parameters
        ----------
        target_mpp : float
            Wanted resolution in µm/px.

        Returns
        -------
        int
            Level index.
        """
        if self.mpp is None:
            raise MissingMppError(f"{self.path.name}: resolution unknown, cannot choose a level")
        if not target_mpp > 0:
            raise ValueError(f"target_mpp must be positive, got {target_mpp}")
        return self._best_level_for_downsample(target_mpp / self.mpp)

    def read_scaled(
        self,
        box: tuple[float, float, float, float],
        out_size: tuple[int, int],
        target_mpp: float | None = None,
    ) -> np.ndarray:
        """Read a level-0 box resampled to ``out_size`` with sub-pixel accuracy.

        The source level is ``best_level_for_mpp`` of the resolution implied by the box and the
        output size (or of ``target_mpp`` when given, so that all tiles of a run use the same
        level). The covering pixels of that level (plus a margin for the filter) are read and
        resampled with bilinear interpolation (antialiased when shrinking) using a fractional
        source box: output pixel ``j`` is centred on level-0 ``x0 + (j + 0.5) * (x1 - x0) / w``.

        Parameters
        ----------
        box : tuple of float
            ``(x0, y0, x1, y1)`` in level-0 pixels (QuPath frame); may extend past the image,
            which is padded with white.
        out_size : tuple of int
            ``(width, height)`` of the result.
        target_mpp : float, optional
            Resolution used to choose the source level.

        Returns
        -------
        numpy.ndarray
            ``(height, width, 3)`` uint8 RGB.
        """
        win = self._scaled_window(box, out_size, target_mpp)
        return _resample(win, self._read_level(win.level, win.x, win.y, win.w, win.h))

    def read_scaled_batch(
        self,
        boxes: list[tuple[float, float, float, float]],
        out_sizes: list[tuple[int, int]],
        target_mpp: float | None = None,
    ) -> list[np.ndarray]:
        """:meth:`read_scaled` of many boxes, the same pixels with fewer reads.

        The level windows that share their rows (the patches of one patch row) and overlap or
        touch are read with one call; each box is then cut out of that read and resampled
        exactly as :meth:`read_scaled` resamples its own read, so the results are identical
        to it, bit for bit. Unscaled results may be views of a shared array.

        Parameters
        ----------
        boxes : list of tuple of float
            Level-0 boxes ``(x0, y0, x1, y1)`` as for :meth:`read_scaled`.
        out_sizes : list of tuple of int
            ``(width, height)`` of each result.
        target_mpp : float, optional
            Resolution used to choose the source level (one for all boxes).

        Returns
        -------
        list of numpy.ndarray
            ``(height, width, 3)`` uint8 RGB per box, in the order given.
        """
        if len(boxes) != len(out_sizes):
            raise ValueError(f"{len(boxes)} boxes but {len(out_sizes)} output sizes")
        wins = [self._scaled_window(b, o, target_mpp) for b, o in zip(boxes, out_sizes)]
        rows: dict[tuple[int, int, int], list[int]] = {}
        for i, win in enumerate(wins):
            rows.setdefault((win.level, win.y, win.h), []).append(i)
        out: list[np.ndarray | None] = [None] * len(wins)

        def read_run(level: int, y: int, h: int, run: list[int], x1: int) -> None:
            x0 = wins[run[0]].x
            arr = self._read_level(level, x0, y, x1 - x0, h)
            for j in run:
                out[j] = _resample(wins[j], arr[:, wins[j].x - x0 : wins[j].x - x0 + wins[j].w])

        for (level, y, h), idx in rows.items():
            idx.sort(key=lambda i: wins[i].x)
            run, end = [idx[0]], wins[idx[0]].x + wins[idx[0]].w
            for i in idx[1:]:
                if wins[i].x > end:  # a gap: read what came before
                    read_run(level, y, h, run, end)
                    run, end = [], wins[i].x
                run.append(i)
                end = max(end, wins[i].x + wins[i].w)
            read_run(level, y, h, run, end)
        return out  # type: ignore[return-value]

    def _scaled_window(
        self,
        box: tuple[float, float, float, float],
        out_size: tuple[int, int],
        target_mpp: float | None,
    ) -> _Window:
        """What :meth:`read_scaled` reads (the level window, in level pixels) and how it
        resamples it (the fractional source box within that window)."""
        x0, y0, x1, y1 = (float(v) for v in box)
        ow, oh = int(out_size[0]), int(out_size[1])
        if ow <= 0 or oh <= 0:
            raise ValueError(f"out_size must be positive, got {out_size}")
        if not (x1 > x0 and y1 > y0):
            raise ValueError(f"empty box {box}")
        sx, sy = (x1 - x0) / ow, (y1 - y0) / oh
        if target_mpp is not None and self.mpp is not None:
            level = self.best_level_for_mpp(target_mpp)
        else:
            level = self._best_level_for_downsample(min(sx, sy))
        ds = self.level_downsamples[level]
        bx0, by0, bx1, by1 = x0 / ds, y0 / ds, x1 / ds, y1 / ds
        # Fast path: the box is an integer window of the level at scale 1.
        if (
            abs(bx1 - bx0 - ow) < 1e-6
            and abs(by1 - by0 - oh) < 1e-6
            and abs(bx0 - round(bx0)) < 1e-6
            and abs(by0 - round(by0)) < 1e-6
        ):
            return _Window(level, int(round(bx0)), int(round(by0)), ow, oh, None, ow, oh)
        margin = int(math.ceil(max(sx, sy) / ds)) + 1
        ix0, iy0 = int(math.floor(bx0)) - margin, int(math.floor(by0)) - margin
        ix1, iy1 = int(math.ceil(bx1)) + margin, int(math.ceil(by1)) + margin
        rbox = (bx0 - ix0, by0 - iy0, bx1 - ix0, by1 - iy0)
        return _Window(level, ix0, iy0, ix1 - ix0, iy1 - iy0, rbox, ow, oh)

    @property
    def name(self) -> str:
        """File name of the slide (descriptive name for procedural slides)."""
        return self.path.name

    def thumbnail_size(self, max_size: int | tuple[int, int]) -> tuple[int, int]:
        """Size of :meth:`get_thumbnail` output.

        Parameters
        ----------
        max_size : int or tuple of int
            Longest side, or a ``(width, height)`` box to fit in (aspect ratio kept, like
            ``OpenSlide.get_thumbnail``). Never upsampled.

        Returns
        -------
        tuple of int
            ``(width, height)``.
        """
        w, h = self.dimensions
        if isinstance(max_size, (tuple, list)):
            bw, bh = (max(int(v), 1) for v in max_size)
            scale = max(w / bw, h / bh)
        else:
            scale = max(w, h) / max(int(max_size), 1)
        if scale <= 1.0:
            return w, h
        return max(1, int(round(w / scale))), max(1, int(round(h / scale)))

    def get_thumbnail(self, max_size: int | tuple[int, int]) -> np.ndarray:
        """Whole-slide overview fitting ``max_size`` (never upsampled).

        Read from the coarsest level that is not coarser than the thumbnail, in blocks of at
        most about 4096 x 4096 source pixels, so memory stays bounded even for single-level
        slides.

        Parameters
        ----------
        max_size : int or tuple of int
            Longest side of the thumbnail, or a ``(width, height)`` box to fit in.

        Returns
        -------
        numpy.ndarray
            ``(h, w, 3)`` uint8 RGB.
        """
        w, h = self.dimensions
        tw, th = self.thumbnail_size(max_size)
        sx, sy = w / tw, h / th
        out = np.empty((th, tw, 3), dtype=np.uint8)
        level = self._best_level_for_downsample(min(sx, sy))
        ratio = max(sx, sy) / self.level_downsamples[level]  # source pixels per output pixel
        step = max(8, min(1024, int(4096 / ratio)))
        for oy in range(0, th, step):
            for ox in range(0, tw, step):
                bw, bh = min(step, tw - ox), min(step, th - oy)
                out[oy : oy + bh, ox : ox + bw] = self.read_scaled(
                    (ox * sx, oy * sy, (ox + bw) * sx, (oy + bh) * sy), (bw, bh)
                )
        return out


def scale_info(slide: BaseSlide, target_mpp: float) -> dict[str, Any]:
    """Describe how ``slide`` is read at ``target_mpp`` (for the run manifest).

    Parameters
    ----------
    slide : BaseSlide
        An open slide with a known resolution.
    target_mpp : float
        Processing resolution in µm/px.

    Returns
    -------
    dict
        ``target_mpp``, ``slide_mpp``, ``mpp_source``, ``level``, ``level_downsample``,
        ``level_mpp`` and ``scale_factor`` (``level_mpp / target_mpp``: 2.0 means the level is
        upsampled 2x, 1.0 means read as is, < 1 means downsampled).
    """
    level = slide.best_level_for_mpp(target_mpp)
    assert slide.mpp is not None  # best_level_for_mpp raised otherwise
    ds = slide.level_downsamples[level]
    level_mpp = slide.mpp * ds
    return {
        "target_mpp": float(target_mpp),
        "slide_mpp": float(slide.mpp),
        "mpp_source": slide.mpp_source,
        "level": int(level),
        "level_downsample": float(ds),
        "level_mpp": float(level_mpp),
        "scale_factor": float(level_mpp / target_mpp),
    }


class Reader(abc.ABC):
    """One backend's view of a slide file (level-pixel coordinates, in-bounds reads)."""

    name: str = ""
    vendor: str = "unknown"
    level_dimensions: tuple[tuple[int, int], ...] = ()
    level_downsamples: tuple[float, ...] = ()
    properties: dict[str, str]
    offset: tuple[int, int] = (0, 0)

    @abc.abstractmethod
    def read(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        """``(h, w, 3)`` uint8 RGB of a rectangle fully inside ``level``."""

    def mpp_candidates(self) -> list[MppCandidate]:
        """Resolution candidates in precedence order."""
        return []

    def close(self) -> None:  # noqa: B027 - optional for subclasses: nothing to release by default
        """Release resources."""

    def smoke_test(self) -> None:
        """Decode a few pixels of the coarsest level (catches files that open but do not read)."""
        level = len(self.level_dimensions) - 1
        lw, lh = self.level_dimensions[level]
        w, h = min(lw, 16), min(lh, 16)
        self.read(level, (lw - w) // 2, (lh - h) // 2, w, h)


def _resample(win: _Window, src: np.ndarray) -> np.ndarray:
    """The result of a :meth:`BaseSlide._scaled_window` from the pixels of its level window."""
    if win.resize_box is None:
        return src
    img = Image.fromarray(np.ascontiguousarray(src))
    return np.asarray(
        img.resize((win.out_w, win.out_h), Image.Resampling.BILINEAR, box=win.resize_box)
    )

"""Overlay images: any level-0 rectangle of the slide with the run's nuclei outlined in the class
colours of the QuPath files (``wsi-nuclei overlay``; the crops of ``report.html``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Final

import numpy as np

from .._io import atomic_path
from ..errors import OutputError, WsiNucleiError
from ..schema import CLASS_COLORS
from ._run import _load_run, _nuclei_in, _open_slide, _Run

__all__ = [
    "MAX_OVERLAY_PIXELS",
    "render_overlay",
    "write_overlay",
]

#: Largest overlay :func:`render_overlay` draws (width x height, level-0 px).
MAX_OVERLAY_PIXELS: Final[int] = 100_000_000


def _segment_pixels(xy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows and columns of the pixels that the closed polyline ``xy`` (pixel-centre coordinates)
    passes through: every edge sampled at least once per pixel step, then rounded."""
    a, b = xy[:-1], xy[1:]
    steps = np.maximum(1, np.ceil(np.abs(b - a).max(axis=1)).astype(np.int64))
    seg = np.repeat(np.arange(len(a)), steps)
    t = (np.arange(int(steps.sum())) - np.repeat(np.cumsum(steps) - steps, steps)) / np.repeat(
        steps, steps
    )
    pts = a[seg] + (b[seg] - a[seg]) * t[:, None]
    return np.round(pts[:, 1]).astype(np.int64), np.round(pts[:, 0]).astype(np.int64)


def _draw_outlines(
    rgb: np.ndarray, geoms: np.ndarray, class_ids: np.ndarray, x0: float, y0: float, line_width: int
) -> None:
    """Draw polygon exteriors (level-0 px) into ``rgb`` whose top-left pixel is ``(x0, y0)``,
    in the class colours (:data:`wsi_nuclei.schema.CLASS_COLORS`)."""
    from scipy import ndimage as ndi

    h, w = rgb.shape[:2]
    canvas = np.zeros((h, w), np.int16)  # class id + 1 where an outline passes
    for g, cid in zip(geoms, class_ids):
        if g is None or g.is_empty:
            continue
        for poly in getattr(g, "geoms", [g]):
            # vertex (x, y) lies on pixel corners; pixel (r, c) has its centre at (c + .5, r + .5)
            xy = np.asarray(poly.exterior.coords, float)[:, :2] - (x0 + 0.5, y0 + 0.5)
            if len(xy) < 2:
                continue
            rr, cc = _segment_pixels(xy)
            ok = (rr >= 0) & (rr < h) & (cc >= 0) & (cc < w)
            canvas[rr[ok], cc[ok]] = int(cid) + 1
    if line_width > 1:
        canvas = ndi.grey_dilation(canvas, size=(line_width, line_width))
    lut = np.zeros((max(CLASS_COLORS) + 2, 3), np.uint8)
    for cid, col in CLASS_COLORS.items():
        lut[cid + 1] = col
    on = canvas > 0
    rgb[on] = lut[np.clip(canvas[on], 0, len(lut) - 1)]


def _overlay(
    run: _Run, slide: Any, x: int, y: int, w: int, h: int, line_width: int
) -> tuple[np.ndarray, int]:
    rgb = np.array(
        slide.read_region((int(x), int(y)), 0, (int(w), int(h))), dtype=np.uint8, copy=True
    )
    margin = 200.0 / run.mpp  # larger than any nucleus (µm -> px)
    geoms, cls, n_in = _nuclei_in(run.folder, (x, y, x + w, y + h), margin)
    _draw_outlines(rgb, geoms, cls, x, y, line_width)
    return rgb, n_in


def _check_box(run: _Run, x: int, y: int, w: int, h: int) -> None:
    sw, sh = run.dimensions
    if w <= 0 or h <= 0:
        raise WsiNucleiError(f"overlay size must be positive, got {w} x {h}")
    if w * h > MAX_OVERLAY_PIXELS:
        raise WsiNucleiError(
            f"overlay of {w} x {h} px is too large (at most {MAX_OVERLAY_PIXELS:,} pixels)"
        )
    if x < 0 or y < 0 or x + w > sw or y + h > sh:
        raise WsiNucleiError(
            f"region x={x}..{x + w}, y={y}..{y + h} is outside the slide (level 0 is {sw} x {sh} px)"
        )


def render_overlay(
    run_dir: str | Path,
    x: int,
    y: int,
    width: int,
    height: int | None = None,
    *,
    slide: Any = None,
    slide_path: str | Path | None = None,
    line_width: int = 2,
) -> np.ndarray:
    """A level-0 rectangle of the run's slide with the run's nuclei outlined in class colours.

    Parameters
    ----------
    run_dir : str or pathlib.Path
        A finished run folder (run.json, summary.json, nuclei.parquet).
    x, y : int
        Top-left corner, level-0 px of the QuPath frame (OpenSlide bounds subtracted).
    width, height : int
        Size in level-0 px (``height`` defaults to ``width``); the rectangle must lie inside
        the slide.
    slide : Slide, optional
        The open slide (otherwise opened from run.json or ``slide_path``).
    slide_path : str or pathlib.Path, optional
        The slide file when it is no longer where run.json says.
    line_width : int
        Outline width in px.

    Returns
    -------
    numpy.ndarray
        ``(height, width, 3)`` uint8 RGB.

    Raises
    ------
    InputNotFoundError
        The run folder is incomplete or the slide is missing.
    WsiNucleiError
        The rectangle is empty, too large or outside the slide; the slide is another one.
    """
    run = _load_run(run_dir)
    height = width if height is None else height
    _check_box(run, int(x), int(y), int(width), int(height))
    own = slide is None
    if own:
        slide = _open_slide(run, slide_path)
    try:
        rgb, _ = _overlay(
            run, slide, int(x), int(y), int(width), int(height), max(1, int(line_width))
        )
    finally:
        if own:
            slide.close()
    return rgb


def write_overlay(
    run_dir: str | Path,
    x: int,
    y: int,
    width: int,
    height: int | None = None,
    out: str | Path | None = None,
    **kwargs: Any,
) -> Path:
    """Write :func:`render_overlay` as a PNG (atomically); returns its path.

    ``out`` defaults to ``<run_dir>/overlay_x<X>_y<Y>_<W>x<H>.png``; other keyword arguments
    go to :func:`render_overlay`.
    """
    from PIL import Image

    height = width if height is None else height
    rgb = render_overlay(run_dir, x, y, width, height, **kwargs)
    path = (
        Path(out) if out is not None else Path(run_dir) / f"overlay_x{x}_y{y}_{width}x{height}.png"
    )
    if path.suffix.lower() != ".png":
        raise OutputError(f"{path}: the overlay is written as PNG; give a name ending in .png")
    try:
        with atomic_path(path) as tmp:
            Image.fromarray(rgb).save(tmp, format="PNG")
    except OSError as exc:
        raise OutputError(f"cannot write {path} ({exc.strerror or exc})") from None
    return path

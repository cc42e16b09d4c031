"""Synthetic H&E-like images with known nuclei, and a pyramidal TIFF writer.

Everything is generated in code and deterministic from a seed, so tests, the ``demo`` command
and benchmarks need no third-party data. The colour model is described in
:mod:`wsi_nuclei.demo._render`.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from .._io import atomic_path
from ._render import downsample_rgb, render_stains, smooth_noise

__all__ = [
    "NUCLEUS_DTYPE",
    "make_nuclei_image",
    "write_pyramidal_tiff",
]

#: Ground-truth record of one nucleus. Centroids use pixel-index coordinates (the centre of
#: pixel (row r, col c) is (x=c, y=r), as in ``skimage.measure.regionprops``); bounding boxes
#: are ``[x0, x1) x [y0, y1)``.
NUCLEUS_DTYPE = np.dtype(
    [
        ("label", np.int32),
        ("centroid_x", np.float64),
        ("centroid_y", np.float64),
        ("area", np.int64),
        ("bbox_x0", np.int32),
        ("bbox_y0", np.int32),
        ("bbox_x1", np.int32),
        ("bbox_y1", np.int32),
    ]
)


# --------------------------------------------------------------------------------------------
# Images with ground truth
# --------------------------------------------------------------------------------------------
def _ellipse_mask(
    cx: float, cy: float, a: float, b: float, theta: float
) -> tuple[int, int, np.ndarray]:
    """Pixels whose centres fall inside an ellipse: ``(x0, y0, mask)`` of its bounding box."""
    c, s = math.cos(theta), math.sin(theta)
    ex = math.sqrt((a * c) ** 2 + (b * s) ** 2)
    ey = math.sqrt((a * s) ** 2 + (b * c) ** 2)
    x0, x1 = int(math.floor(cx - ex)), int(math.ceil(cx + ex))
    y0, y1 = int(math.floor(cy - ey)), int(math.ceil(cy + ey))
    dx = np.arange(x0, x1 + 1, dtype=np.float64)[None, :] - cx
    dy = np.arange(y0, y1 + 1, dtype=np.float64)[:, None] - cy
    u = (dx * c + dy * s) / a
    v = (-dx * s + dy * c) / b
    return x0, y0, (u * u + v * v) <= 1.0


def make_nuclei_image(
    height: int,
    width: int,
    *,
    n_nuclei: int | None = None,
    density: float = 0.15,
    seed: int = 0,
    min_radius: float = 4,
    max_radius: float = 14,
    margin: int = 0,
    gap: int = 2,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Synthetic H&E-like image with known, non-overlapping elliptical nuclei.

    Nuclei are placed by rejection sampling: every nucleus lies fully inside the image (at least
    ``margin`` pixels from the border) and at least ``gap`` background pixels from any other
    (chessboard distance), so each is its own 8-connected component.

    Parameters
    ----------
    height, width : int
        Image size in pixels.
    n_nuclei : int, optional
        Number of nuclei to place; by default derived from ``density``. Fewer are placed when
        they do not fit (the returned table is the truth).
    density : float
        Target fraction of the image area covered by nuclei when ``n_nuclei`` is None.
    seed : int
        Seed of every random choice; the output is a pure function of the arguments.
    min_radius, max_radius : float
        Range of the semi-major axis in pixels; the minor axis is 0.55-1.0 times the major.
    margin : int
        Minimum distance in pixels between any nucleus pixel and the image border.
    gap : int
        Minimum number of background pixels between two nuclei.

    Returns
    -------
    rgb : numpy.ndarray
        ``(height, width, 3)`` uint8 RGB.
    inst : numpy.ndarray
        ``(height, width)`` int32 instance labels, 0 = background, nuclei 1..N.
    table : numpy.ndarray
        Structured array of :data:`NUCLEUS_DTYPE`, one record per label (label order).
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    if not 0 < min_radius <= max_radius:
        raise ValueError(f"need 0 < min_radius <= max_radius, got {min_radius}, {max_radius}")
    rng = np.random.default_rng(seed)
    inst = np.zeros((height, width), dtype=np.int32)
    if n_nuclei is None:
        lo, hi = float(min_radius), float(max_radius)
        mean_a2 = (hi**3 - lo**3) / (3 * (hi - lo)) if hi > lo else lo * lo
        mean_area = math.pi * mean_a2 * 0.775
        n_target = int(round(density * height * width / mean_area))
    else:
        n_target = int(n_nuclei)
    records: list[tuple[Any, ...]] = []
    h_levels: list[float] = []
    size = 2 * gap + 1
    attempts = 0
    max_attempts = 30 * n_target + 200
    while len(records) < n_target and attempts < max_attempts:
        attempts += 1
        a = rng.uniform(min_radius, max_radius)
        b = a * rng.uniform(0.55, 1.0)
        theta = rng.uniform(0.0, math.pi)
        c, s = math.cos(theta), math.sin(theta)
        ex = math.sqrt((a * c) ** 2 + (b * s) ** 2)
        ey = math.sqrt((a * s) ** 2 + (b * c) ** 2)
        lo_x, hi_x = margin + ex, width - 1 - margin - ex
        lo_y, hi_y = margin + ey, height - 1 - margin - ey
        if lo_x > hi_x or lo_y > hi_y:
            continue
        cx, cy = rng.uniform(lo_x, hi_x), rng.uniform(lo_y, hi_y)
        x0, y0, mask = _ellipse_mask(cx, cy, a, b, theta)
        # Keep only rows/cols that hold pixels, clipped to the image.
        mh, mw = mask.shape
        cx0, cy0 = max(x0, 0), max(y0, 0)
        cx1, cy1 = min(x0 + mw, width), min(y0 + mh, height)
        mask = mask[cy0 - y0 : cy1 - y0, cx0 - x0 : cx1 - x0]
        x0, y0 = cx0, cy0
        area = int(mask.sum())
        if area < 4:
            continue
        # Gap test: the candidate grown by `gap` (chessboard) must not touch another nucleus.
        px0, py0 = max(x0 - gap, 0), max(y0 - gap, 0)
        px1, py1 = min(x0 + mask.shape[1] + gap, width), min(y0 + mask.shape[0] + gap, height)
        grown = np.zeros((py1 - py0, px1 - px0), dtype=bool)
        grown[y0 - py0 : y0 - py0 + mask.shape[0], x0 - px0 : x0 - px0 + mask.shape[1]] = mask
        grown = ndimage.maximum_filter(grown, size=size, mode="constant")
        if inst[py0:py1, px0:px1][grown].any():
            continue
        label = len(records) + 1
        inst[y0 : y0 + mask.shape[0], x0 : x0 + mask.shape[1]][mask] = label
        ys, xs = np.nonzero(mask)
        records.append(
            (
                label,
                float(xs.mean() + x0),
                float(ys.mean() + y0),
                area,
                int(xs.min() + x0),
                int(ys.min() + y0),
                int(xs.max() + x0 + 1),
                int(ys.max() + y0 + 1),
            )
        )
        h_levels.append(rng.uniform(0.5, 0.8))
    table = np.array(records, dtype=NUCLEUS_DTYPE)

    # Stains: faint haematoxylin and textured eosin in the stroma, dark textured nuclei.
    h_od = 0.04 + 0.012 * smooth_noise(rng, height, width, 24)
    e_od = 0.20 + 0.05 * smooth_noise(rng, height, width, 48)
    e_od += 0.02 * smooth_noise(rng, height, width, 6)
    nuc = inst > 0
    if records:
        level = np.concatenate([[0.0], np.asarray(h_levels)]).astype(np.float32)
        chromatin = smooth_noise(rng, height, width, 2)
        h_nuc = level[inst] * (1.0 + 0.12 * chromatin)
        h_od = np.where(nuc, h_nuc, h_od)
        e_od = np.where(nuc, 0.5 * e_od, e_od)
        h_od = ndimage.gaussian_filter(h_od, 0.5)
    rgb = render_stains(np.maximum(h_od, 0), np.maximum(e_od, 0.02), rng, 2.0)
    return rgb, inst, table


# --------------------------------------------------------------------------------------------
# Pyramidal TIFF writer
# --------------------------------------------------------------------------------------------


def write_pyramidal_tiff(
    path: str | os.PathLike[str],
    rgb: np.ndarray,
    *,
    mpp: float = 0.25,
    tile: int = 256,
    levels: int = 3,
    downsample: int = 2,
    compression: str = "jpeg",
    quality: int = 90,
) -> Path:
    """Write ``rgb`` as a tiled, multi-resolution Aperio-style SVS/TIFF.

    The layout follows Aperio files so that OpenSlide (vendor ``aperio``) and tiffslide read
    it with the right resolution: IFD 0 is the full-resolution tiled level whose
    ImageDescription starts with ``Aperio Image Library`` and carries ``|AppMag = ..|MPP = ..``,
    IFD 1 is a small stripped thumbnail, then one tiled IFD per reduced level. Resolution tags
    (pixels per centimetre) are written too, for generic TIFF readers.

    Parameters
    ----------
    path : str or os.PathLike
        Output file (``.svs`` or ``.tif``), written atomically.
    rgb : numpy.ndarray
        ``(H, W, 3)`` uint8 level-0 image.
    mpp : float
        µm per level-0 pixel.
    tile : int
        Tile size (multiple of 16).
    levels : int
        Maximum number of pyramid levels (fewer when the image gets smaller than one tile).
    downsample : int
        Factor between successive levels.
    compression : {"jpeg", "deflate", "lzw", "none"}
        Tile compression.
    quality : int
        JPEG quality.

    Returns
    -------
    pathlib.Path
        The written file.
    """
    import tifffile

    rgb = np.ascontiguousarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"rgb must be (H, W, 3) uint8, got {rgb.shape} {rgb.dtype}")
    if tile % 16:
        raise ValueError(f"tile must be a multiple of 16, got {tile}")
    comp = {"jpeg": "jpeg", "deflate": "zlib", "zlib": "zlib", "lzw": "lzw", "none": None}
    if compression not in comp:
        raise ValueError(f"unknown compression {compression!r}")
    codec = comp[compression]
    comp_name = {"jpeg": "JPEG/RGB", "zlib": "Deflate", "lzw": "LZW", None: "None"}[codec]
    h0, w0 = rgb.shape[:2]
    app_mag = 10.0 / mpp
    mag_txt = f"{app_mag:g}"
    tail = f"|AppMag = {mag_txt}|MPP = {mpp:g}|Filename = wsi-nuclei synthetic"
    head = "Aperio Image Library v12.0.15 \r\n"
    pyramid = [rgb]
    while len(pyramid) < levels:
        nxt = downsample_rgb(pyramid[-1], downsample)
        if min(nxt.shape[:2]) < 1 or max(pyramid[-1].shape[:2]) <= tile:
            break
        pyramid.append(nxt)
    thumb_scale = max(1, int(math.ceil(max(h0, w0) / 768)))
    thumb = downsample_rgb(rgb, thumb_scale) if thumb_scale > 1 else rgb
    bigtiff = rgb.nbytes * 1.4 > 3.5e9
    kwargs: dict[str, Any] = {"compression": codec, "photometric": "rgb", "metadata": None}
    if codec == "jpeg":
        kwargs["compressionargs"] = {"level": int(quality)}
    out = Path(path)
    with atomic_path(out) as tmp, tifffile.TiffWriter(tmp, bigtiff=bigtiff) as tw:
        for i, level in enumerate(pyramid):
            lh, lw = level.shape[:2]
            ds = w0 / lw
            res = 1e4 / (mpp * ds)
            geom = f"{w0}x{h0} [0,0 {w0}x{h0}] ({tile}x{tile})"
            if i > 0:
                geom += f" -> {lw}x{lh}"
            tw.write(
                level,
                tile=(tile, tile),
                description=f"{head}{geom} {comp_name} Q={quality}{tail}",
                resolution=(res, res),
                resolutionunit="CENTIMETER",
                subfiletype=0,
                **kwargs,
            )
            if i == 0:
                th, twd = thumb.shape[:2]
                tw.write(
                    thumb,
                    description=f"{head}{w0}x{h0} -> {twd}x{th} - {tail}",
                    rowsperstrip=16,
                    subfiletype=0,
                    **kwargs,
                )
    return out

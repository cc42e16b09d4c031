"""Synthetic H&E-like data with known nuclei: images, pyramidal TIFFs and a procedural slide.

Everything is generated in code and deterministic from a seed, so tests, the ``demo`` command
and benchmarks need no third-party data.

Colour model
    Pixels follow Beer-Lambert absorption with the Ruifrok & Johnston haematoxylin and eosin
    optical-density vectors (the ones ``skimage.color.rgb2hed`` inverts): a pink eosin
    background with low-frequency texture and dark purple haematoxylin nuclei. Colour
    deconvolution therefore recovers a haematoxylin channel in which nuclei (optical density
    about 0.5-0.8) lie far above the background (about 0.04), so a threshold separates them.
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from scipy import ndimage

from ._io import atomic_path
from .slide import BaseSlide

__all__ = [
    "NUCLEUS_DTYPE",
    "SyntheticSlide",
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

# Ruifrok & Johnston stain optical-density vectors (unit length), as in skimage.color.
_H_OD = np.array([0.65, 0.70, 0.29], dtype=np.float32)
_E_OD = np.array([0.07, 0.99, 0.11], dtype=np.float32)
_H_OD /= np.linalg.norm(_H_OD)
_E_OD /= np.linalg.norm(_E_OD)


# --------------------------------------------------------------------------------------------
# Images with ground truth
# --------------------------------------------------------------------------------------------


def _smooth_noise(rng: np.random.Generator, height: int, width: int, cell: int) -> np.ndarray:
    """Low-frequency noise, about unit standard deviation, from a bilinear-upsampled grid."""
    gh, gw = height // cell + 2, width // cell + 2
    grid = rng.standard_normal((gh, gw)).astype(np.float32)
    box = (0.5, 0.5, 0.5 + width / cell, 0.5 + height / cell)
    img = Image.fromarray(grid).resize((width, height), Image.Resampling.BILINEAR, box=box)
    out = np.asarray(img, dtype=np.float32)
    return out / max(float(out.std()), 1e-6)


def _render_stains(
    h_od: np.ndarray, e_od: np.ndarray, rng: np.random.Generator, pixel_noise: float
) -> np.ndarray:
    """Beer-Lambert rendering of haematoxylin/eosin optical densities to RGB uint8."""
    h32 = np.asarray(h_od, dtype=np.float32)
    e32 = np.asarray(e_od, dtype=np.float32)
    noise = None
    if pixel_noise > 0:  # one luminance-like noise plane (cheap), shared by the channels
        noise = rng.standard_normal(h32.shape, dtype=np.float32)
        noise *= np.float32(pixel_noise)
    out = np.empty((*h32.shape, 3), dtype=np.uint8)
    minus_ln10 = np.float32(-math.log(10.0))
    for ch in range(3):  # planar maths: broadcasting over a length-3 axis is slow
        plane = h32 * (_H_OD[ch] * minus_ln10)
        plane += e32 * (_E_OD[ch] * minus_ln10)
        np.exp(plane, out=plane)
        plane *= np.float32(255.0)
        if noise is not None:
            plane += noise
        plane += np.float32(0.5)
        np.clip(plane, 0, 255, out=plane)
        out[..., ch] = plane
    return out


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
    h_od = 0.04 + 0.012 * _smooth_noise(rng, height, width, 24)
    e_od = 0.20 + 0.05 * _smooth_noise(rng, height, width, 48)
    e_od += 0.02 * _smooth_noise(rng, height, width, 6)
    nuc = inst > 0
    if records:
        level = np.concatenate([[0.0], np.asarray(h_levels)]).astype(np.float32)
        chromatin = _smooth_noise(rng, height, width, 2)
        h_nuc = level[inst] * (1.0 + 0.12 * chromatin)
        h_od = np.where(nuc, h_nuc, h_od)
        e_od = np.where(nuc, 0.5 * e_od, e_od)
        h_od = ndimage.gaussian_filter(h_od, 0.5)
    rgb = _render_stains(np.maximum(h_od, 0), np.maximum(e_od, 0.02), rng, 2.0)
    return rgb, inst, table


# --------------------------------------------------------------------------------------------
# Pyramidal TIFF writer
# --------------------------------------------------------------------------------------------


def _downsample(rgb: np.ndarray, factor: int) -> np.ndarray:
    """Area-average ``rgb`` by an integer ``factor`` (partial edge blocks averaged too)."""
    img = Image.fromarray(rgb)
    return np.asarray(img.reduce(factor))


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
        nxt = _downsample(pyramid[-1], downsample)
        if min(nxt.shape[:2]) < 1 or max(pyramid[-1].shape[:2]) <= tile:
            break
        pyramid.append(nxt)
    thumb_scale = max(1, int(math.ceil(max(h0, w0) / 768)))
    thumb = _downsample(rgb, thumb_scale) if thumb_scale > 1 else rgb
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


# --------------------------------------------------------------------------------------------
# Procedural slide
# --------------------------------------------------------------------------------------------

_BANK_LOCK = threading.Lock()
_BANKS: dict[tuple[Any, ...], dict[str, list[np.ndarray]]] = {}
_M1 = np.uint64(0x9E3779B97F4A7C15)
_M2 = np.uint64(0xBF58476D1CE4E5B9)
_M3 = np.uint64(0x94D049BB133111EB)
_K_X = np.uint64(0xD6E8FEB86659FD93)
_K_Y = np.uint64(0xA0761D6478BD642F)


def _hash2(seed: int, bx: np.ndarray, by: np.ndarray) -> np.ndarray:
    """splitmix64-style hash of (seed, bx, by), vectorised, uint64."""
    bxu = np.atleast_1d(np.asarray(bx, dtype=np.int64)).astype(np.uint64)
    byu = np.atleast_1d(np.asarray(by, dtype=np.int64)).astype(np.uint64)
    s = np.full(1, seed & 0xFFFFFFFFFFFFFFFF, dtype=np.uint64)
    z = bxu * _K_X + byu * _K_Y + s * _M1
    z = (z ^ (z >> np.uint64(30))) * _M2
    z = (z ^ (z >> np.uint64(27))) * _M3
    return z ^ (z >> np.uint64(31))


def _dihedral(a: np.ndarray, t: int) -> np.ndarray:
    """One of the 8 square symmetries of a block, as a view: transpose, flip rows, flip cols."""
    if t & 4:
        a = a.transpose(1, 0, 2) if a.ndim == 3 else a.T
    if t & 1:
        a = a[::-1]
    if t & 2:
        a = a[:, ::-1]
    return a


def _dihedral_xy(x: np.ndarray, y: np.ndarray, t: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Where pixel-index coordinates (x, y) of an n x n block go under :func:`_dihedral`."""
    if t & 4:
        x, y = y, x
    if t & 1:
        y = (n - 1) - y
    if t & 2:
        x = (n - 1) - x
    return x, y


def _mean_pool(a: np.ndarray, f: int) -> np.ndarray:
    if f == 1:
        return a
    n = a.shape[0] // f
    pooled = a.reshape(n, f, n, f, 3).mean(axis=(1, 3))
    return np.clip(pooled + 0.5, 0, 255).astype(np.uint8)


class SyntheticSlide(BaseSlide):
    """A procedural, never-materialised H&E-like slide with the API of :class:`.slide.Slide`.

    The slide is a grid of ``block`` x ``block`` blocks. Each block's content is picked by a
    hash of ``(seed, block column, block row)`` from a small bank of pre-rendered tissue blocks
    (synthetic nuclei on eosin, see :func:`make_nuclei_image`) or near-white glass blocks, in one
    of 8 orientations. Tissue lies in ``n_blobs`` wobbly elliptical blobs covering about
    ``tissue_fraction`` of the slide; blocks crossing a blob border mix tissue and glass with
    the analytic mask (evaluated on a 4-pixel grid). Any level-0 pixel therefore has one value
    whatever region it is read in, reads cost a few array copies (well under 1 ms for 256 x 256),
    and nuclei never cross block borders (each bank block keeps a 1 px margin).

    Reduced levels (downsample 4, 16, ...) are 4^k area means of the bank blocks (exact inside
    tissue and glass; border blocks use the mask sampled at the level's resolution), so
    low-resolution reads for tissue detection are cheap; :meth:`get_thumbnail` is computed
    from the analytic mask alone.

    Parameters
    ----------
    width, height : int
        Level-0 size in pixels.
    mpp : float
        µm per level-0 pixel.
    seed : int
        Seed of the tissue layout and of the per-block choices.
    tissue_fraction : float
        Approximate fraction of the slide covered by tissue, 0..1 (1 means tissue everywhere).
    n_blobs : int
        Number of tissue blobs.
    block : int
        Block size (power of two, >= 64).
    bank_size : int
        Number of distinct pre-rendered tissue blocks.
    bank_seed : int
        Seed of the block bank. It is separate from ``seed`` (layout and block choice) so that
        slides with different layouts share one bank, rendered once per process.
    density : float
        Nuclear area fraction inside tissue blocks.
    """

    def __init__(
        self,
        width: int = 100_000,
        height: int = 100_000,
        *,
        mpp: float = 0.25,
        seed: int = 0,
        tissue_fraction: float = 0.1,
        n_blobs: int = 6,
        block: int = 512,
        bank_size: int = 8,
        bank_seed: int = 0,
        density: float = 0.15,
    ) -> None:
        if width <= 0 or height <= 0:
            raise ValueError(f"slide size must be positive, got {width}x{height}")
        if block < 64 or block & (block - 1):
            raise ValueError(f"block must be a power of two >= 64, got {block}")
        if not 0.0 <= tissue_fraction <= 1.0:
            raise ValueError(f"tissue_fraction must be in [0, 1], got {tissue_fraction}")
        self._params = {
            "width": int(width),
            "height": int(height),
            "mpp": float(mpp),
            "seed": int(seed),
            "tissue_fraction": float(tissue_fraction),
            "n_blobs": int(n_blobs),
            "block": int(block),
            "bank_size": int(bank_size),
            "bank_seed": int(bank_seed),
            "density": float(density),
        }
        self._setup()

    # ---- construction / pickling ---------------------------------------------------------

    def _setup(self) -> None:
        p = self._params
        self._w, self._h = p["width"], p["height"]
        self._seed = p["seed"]
        self._block = p["block"]
        self.path = Path(f"synthetic-{self._w}x{self._h}-seed{self._seed}")
        self.backend = "synthetic"
        self.vendor = "synthetic"
        self.offset = (0, 0)
        self.mpp = p["mpp"]
        self.mpp_xy = (p["mpp"], p["mpp"])
        self.mpp_source = "synthetic"
        dims = [(self._w, self._h)]
        downs = [1.0]
        ds = 4
        while max(self._w, self._h) / ds >= 1024 and self._block // ds >= 8:
            dims.append((-(-self._w // ds), -(-self._h // ds)))
            downs.append(float(ds))
            ds *= 4
        self.level_dimensions = tuple(dims)
        self.level_downsamples = tuple(downs)
        self.level_count = len(dims)
        self.dimensions = dims[0]
        self.properties = {f"synthetic.{k}": str(v) for k, v in p.items()}
        key = "|".join(f"{k}={v}" for k, v in sorted(p.items()))
        self.fingerprint = hashlib.sha256(f"wsi-nuclei-synthetic-v1|{key}".encode()).hexdigest()
        self._blobs = self._make_blobs()
        self._mask_cached = functools.lru_cache(maxsize=1024)(self._block_mask)

    def __getstate__(self) -> dict[str, Any]:
        return {"_params": self._params}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._params = state["_params"]
        self._setup()

    # ---- tissue layout -------------------------------------------------------------------

    def _make_blobs(self) -> np.ndarray:
        """Blob parameters: rows of (cx, cy, a, b, angle, w1, p1, w2, p2)."""
        p = self._params
        frac, n = p["tissue_fraction"], max(p["n_blobs"], 1)
        if frac <= 0.0 or frac >= 1.0:
            return np.zeros((0, 9))
        rng = np.random.default_rng([self._seed, 7919])
        total = frac * self._w * self._h
        weights = rng.dirichlet(np.full(n, 3.0))
        blobs: list[list[float]] = []
        placed: list[tuple[float, float, float]] = []
        for wgt in weights:
            aspect = rng.uniform(0.55, 1.0)
            w1, w2 = rng.uniform(0.04, 0.10), rng.uniform(0.02, 0.06)
            area = total * wgt / (1.0 + (w1 * w1 + w2 * w2) / 2.0)
            a = math.sqrt(area / (math.pi * aspect))
            b = a * aspect
            reach = a * (1.0 + w1 + w2)
            reach = min(reach, 0.5 * min(self._w, self._h))
            best: tuple[float, float] | None = None
            for _ in range(200):
                cx = rng.uniform(reach, max(self._w - reach, reach))
                cy = rng.uniform(reach, max(self._h - reach, reach))
                if all(math.hypot(cx - qx, cy - qy) > reach + qr for qx, qy, qr in placed):
                    best = (cx, cy)
                    break
            if best is None:
                best = (cx, cy)
            placed.append((best[0], best[1], reach))
            angle = rng.uniform(0, math.pi)
            p1, p2 = rng.uniform(0, 2 * math.pi, size=2)
            blobs.append([best[0], best[1], a, b, angle, w1, p1, w2, p2])
        return np.asarray(blobs, dtype=np.float64)

    def _inside(self, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
        """Analytic tissue mask at level-0 coordinates (broadcast arrays)."""
        frac = self._params["tissue_fraction"]
        shape = np.broadcast(xs, ys).shape
        if frac >= 1.0:
            return np.ones(shape, dtype=bool)
        out = np.zeros(shape, dtype=bool)
        for cx, cy, a, b, ang, w1, p1, w2, p2 in self._blobs:
            c, s = math.cos(ang), math.sin(ang)
            dx, dy = xs - cx, ys - cy
            u = (dx * c + dy * s) / a
            v = (-dx * s + dy * c) / b
            rho = np.hypot(u, v)
            near = rho <= 1.0 + w1 + w2
            if not near.any():
                continue
            th = np.arctan2(v, u)
            out |= near & (rho <= 1.0 + w1 * np.cos(3 * th + p1) + w2 * np.cos(5 * th + p2))
        return out

    def _classify(self, bx: np.ndarray, by: np.ndarray) -> np.ndarray:
        """Per block: 0 glass, 1 tissue, 2 border (needs the pixel mask). Conservative bounds."""
        frac = self._params["tissue_fraction"]
        if frac >= 1.0:
            return np.ones(np.shape(bx), dtype=np.int8)
        B = float(self._block)
        px, py = (bx + 0.5) * B, (by + 0.5) * B
        half = B * math.sqrt(0.5)
        full = np.zeros(np.shape(bx), dtype=bool)
        maybe = np.zeros(np.shape(bx), dtype=bool)
        for cx, cy, a, b, ang, w1, _p1, w2, _p2 in self._blobs:
            c, s = math.cos(ang), math.sin(ang)
            dx, dy = px - cx, py - cy
            rho = np.hypot((dx * c + dy * s) / a, (-dx * s + dy * c) / b)
            r = half / min(a, b)
            full |= rho + r <= 1.0 - w1 - w2
            maybe |= rho - r <= 1.0 + w1 + w2
        return np.where(full, 1, np.where(maybe, 2, 0)).astype(np.int8)

    def _block_mask(self, bx: int, by: int, res: int) -> np.ndarray:
        """Tissue mask of a border block sampled on a ``res`` x ``res`` grid (cached)."""
        step = self._block / res
        centres = (np.arange(res) + 0.5) * step
        xs = bx * self._block + centres[None, :]
        ys = by * self._block + centres[:, None]
        return self._inside(xs, ys)

    def tissue_mask(self, size: tuple[int, int]) -> np.ndarray:
        """Analytic tissue mask of the whole slide at ``size = (width, height)`` (bool)."""
        tw, th = int(size[0]), int(size[1])
        xs = (np.arange(tw) + 0.5) * (self._w / tw)
        ys = (np.arange(th) + 0.5) * (self._h / th)
        return self._inside(xs[None, :], ys[:, None])

    # ---- block bank ----------------------------------------------------------------------

    def _bank(self) -> dict[str, list[np.ndarray]]:
        """Shared block bank: ``tissue[k]``/``glass[k]`` (n, bs, bs, 3) per level, ``tables``."""
        p = self._params
        key = (p["bank_seed"], p["block"], p["bank_size"], p["density"])
        bank = _BANKS.get(key)
        if bank is not None:
            return bank
        with _BANK_LOCK:
            bank = _BANKS.get(key)
            if bank is not None:
                return bank
            B = self._block
            seeds = _hash2(p["bank_seed"], np.arange(p["bank_size"]), np.full(p["bank_size"], -1))
            rendered = [
                make_nuclei_image(B, B, density=p["density"], margin=1, seed=int(sd) >> 1)
                for sd in seeds
            ]
            tissue = np.stack([r[0] for r in rendered])
            rng = np.random.default_rng([p["bank_seed"], 104729])
            glass = []
            for _ in range(4):
                h_od = 0.004 + 0.002 * _smooth_noise(rng, B, B, 64)
                e_od = 0.012 + 0.004 * _smooth_noise(rng, B, B, 32)
                glass.append(_render_stains(h_od, e_od, rng, 1.0))
            glass_arr = np.stack(glass)
            bank = {"tissue": [], "glass": [], "tables": [r[2] for r in rendered]}
            f = 1
            while B // f >= 8:  # every level a slide with this block size can have
                bank["tissue"].append(np.stack([_mean_pool(t, f) for t in tissue]))
                bank["glass"].append(np.stack([_mean_pool(g, f) for g in glass_arr]))
                f *= 4
            for arrs in (bank["tissue"], bank["glass"], bank["tables"]):
                for arr in arrs:
                    arr.setflags(write=False)
            _BANKS[key] = bank
            return bank

    # ---- pixels --------------------------------------------------------------------------

    def _read_inbounds(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        bank = self._bank()
        f = int(self.level_downsamples[level])
        bs = self._block // f
        tissue, glass = bank["tissue"][level], bank["glass"][level]
        n_t, n_g = tissue.shape[0], glass.shape[0]
        bx0, bx1 = x // bs, (x + w - 1) // bs
        by0, by1 = y // bs, (y + h - 1) // bs
        gy, gx = np.mgrid[by0 : by1 + 1, bx0 : bx1 + 1]
        cls = self._classify(gx, gy)
        hashes = _hash2(self._seed, gx, gy).reshape(gx.shape)
        res = min(bs, 128)
        rep = bs // res
        out = np.empty((h, w, 3), dtype=np.uint8)
        for j in range(gx.shape[0]):
            by = by0 + j
            sy0 = max(y, by * bs) - by * bs
            sy1 = min(y + h, (by + 1) * bs) - by * bs
            oy = by * bs + sy0 - y
            for i in range(gx.shape[1]):
                bx = bx0 + i
                sx0 = max(x, bx * bs) - bx * bs
                sx1 = min(x + w, (bx + 1) * bs) - bx * bs
                ox = bx * bs + sx0 - x
                hv = int(hashes[j, i])
                c = cls[j, i]
                dst = out[oy : oy + sy1 - sy0, ox : ox + sx1 - sx0]
                if c != 0:
                    t_blk = _dihedral(tissue[(hv >> 3) % n_t], hv & 7)[sy0:sy1, sx0:sx1]
                if c != 1:
                    g_blk = _dihedral(glass[(hv >> 40) % n_g], (hv >> 32) & 7)[sy0:sy1, sx0:sx1]
                if c == 1:
                    dst[...] = t_blk
                elif c == 0:
                    dst[...] = g_blk
                else:
                    m = self._mask_cached(bx, by, res)
                    if rep > 1:
                        m = m[sy0 // rep : (sy1 - 1) // rep + 1, sx0 // rep : (sx1 - 1) // rep + 1]
                        m = m.repeat(rep, 0).repeat(rep, 1)
                        m = m[sy0 % rep : sy0 % rep + sy1 - sy0, sx0 % rep : sx0 % rep + sx1 - sx0]
                    else:
                        m = m[sy0:sy1, sx0:sx1]
                    np.copyto(dst, np.where(m[..., None], t_blk, g_blk))
        return out

    def get_thumbnail(self, max_size: int | tuple[int, int]) -> np.ndarray:
        """Overview from the analytic tissue mask (cheap at any slide size).

        Tissue pixels take the mean colour of the tissue blocks, glass the mean glass colour,
        with a little deterministic texture.

        Parameters
        ----------
        max_size : int or tuple of int
            Longest side, or a ``(width, height)`` box to fit in.

        Returns
        -------
        numpy.ndarray
            ``(h, w, 3)`` uint8 RGB.
        """
        tw, th = self.thumbnail_size(max_size)
        bank = self._bank()
        t_col = bank["tissue"][-1].reshape(-1, 3).mean(axis=0)
        g_col = bank["glass"][-1].reshape(-1, 3).mean(axis=0)
        mask = self.tissue_mask((tw, th))
        rng = np.random.default_rng([self._seed, 31337, tw, th])
        noise = rng.normal(0.0, 2.0, size=(th, tw, 1))
        img = np.where(mask[..., None], t_col, g_col) + noise
        return np.clip(img + 0.5, 0, 255).astype(np.uint8)

    # ---- ground truth --------------------------------------------------------------------

    def nuclei_in_box(self, box: Sequence[float]) -> np.ndarray:
        """Ground-truth nuclei (level 0) whose centroid lies in ``box = (x0, y0, x1, y1)``.

        Only nuclei lying entirely in tissue are returned (in border blocks, a nucleus counts
        when the tissue mask holds at its centroid and its four bounding-box corners). Labels
        are not meaningful across blocks and are set to 0..N-1 in the output order.

        Returns
        -------
        numpy.ndarray
            Structured array of :data:`NUCLEUS_DTYPE` in level-0 coordinates.
        """
        x0, y0, x1, y1 = (float(v) for v in box)
        B = self._block
        step = B / min(B, 128)
        tables = self._bank()["tables"]
        n_t = len(tables)
        bx0, bx1 = max(int(x0 // B), 0), min(int(math.ceil(x1 / B)), -(-self._w // B))
        by0, by1 = max(int(y0 // B), 0), min(int(math.ceil(y1 / B)), -(-self._h // B))
        parts: list[np.ndarray] = []
        if bx1 <= bx0 or by1 <= by0:
            return np.zeros(0, dtype=NUCLEUS_DTYPE)
        gy, gx = np.mgrid[by0:by1, bx0:bx1]
        cls = self._classify(gx, gy)
        hashes = _hash2(self._seed, gx, gy).reshape(gx.shape)
        for (j, i), c in np.ndenumerate(cls):
            if c == 0:
                continue
            hv = int(hashes[j, i])
            t = hv & 7
            src = tables[(hv >> 3) % n_t]
            bx, by = bx0 + i, by0 + j
            cx, cy = _dihedral_xy(src["centroid_x"], src["centroid_y"], t, B)
            # Transform the first and last pixel of the box, then re-sort the corners.
            ax0, ay0 = _dihedral_xy(src["bbox_x0"] + 0.0, src["bbox_y0"] + 0.0, t, B)
            ax1, ay1 = _dihedral_xy(src["bbox_x1"] - 1.0, src["bbox_y1"] - 1.0, t, B)
            rec = np.zeros(len(src), dtype=NUCLEUS_DTYPE)
            rec["centroid_x"] = cx + bx * B
            rec["centroid_y"] = cy + by * B
            rec["area"] = src["area"]
            rec["bbox_x0"] = np.minimum(ax0, ax1) + bx * B
            rec["bbox_x1"] = np.maximum(ax0, ax1) + bx * B + 1
            rec["bbox_y0"] = np.minimum(ay0, ay1) + by * B
            rec["bbox_y1"] = np.maximum(ay0, ay1) + by * B + 1
            keep = (rec["centroid_x"] >= x0) & (rec["centroid_x"] < x1)
            keep &= (rec["centroid_y"] >= y0) & (rec["centroid_y"] < y1)
            keep &= (rec["bbox_x1"] <= self._w) & (rec["bbox_y1"] <= self._h)
            if c == 2:
                for px, py in (
                    (rec["centroid_x"], rec["centroid_y"]),
                    (rec["bbox_x0"], rec["bbox_y0"]),
                    (rec["bbox_x1"] - 1, rec["bbox_y0"]),
                    (rec["bbox_x0"], rec["bbox_y1"] - 1),
                    (rec["bbox_x1"] - 1, rec["bbox_y1"] - 1),
                ):
                    # Same 4-px sampling grid as the pixel mask.
                    qx = (np.floor(np.asarray(px, float) / step) + 0.5) * step
                    qy = (np.floor(np.asarray(py, float) / step) + 0.5) * step
                    keep &= self._inside(qx, qy)
            parts.append(rec[keep])
        out = np.concatenate(parts) if parts else np.zeros(0, dtype=NUCLEUS_DTYPE)
        out["label"] = np.arange(len(out), dtype=np.int32)
        return out

"""Backend-agnostic whole-slide reading: OpenSlide, tiffslide, DICOM WSI (pydicom) and plain images.

:func:`open_slide` picks a backend (or honours an explicit one, falling back when it cannot read
the file), resolves the physical pixel size (µm/px) with a documented precedence, and returns a
:class:`Slide` whose API mirrors OpenSlide's names but always hands back ``(H, W, 3)`` uint8 RGB
NumPy arrays with white where the slide has no pixels.

Coordinates
    Every level-0 coordinate is in the frame QuPath uses: relative to the OpenSlide bounds origin
    (``openslide.bounds-x/-y``) when the slide declares one, so ``Slide.dimensions`` is then the
    bounds width/height. :attr:`Slide.offset` holds the origin; it is added internally.
    Pixel ``i`` covers ``[i, i + 1)``; level ``k`` pixel ``j`` covers level-0
    ``[j * d, (j + 1) * d)`` with ``d = level_downsamples[k]``.

Resolution precedence (first plausible value wins; plausible means 0.05..20 µm/px)
    1. the ``mpp`` argument (``user:--mpp``),
    2. OpenSlide ``openslide.mpp-x/-y``,
    3. Aperio ``MPP`` in the image description,
    4. OME-XML ``PhysicalSizeX/Y``,
    5. TIFF ``XResolution/YResolution`` with ``ResolutionUnit`` centimetre or inch,
    6. DICOM ``PixelSpacing`` (shared/per-frame functional groups, or top level),
    7. DICOM ``ImagedVolumeWidth / TotalPixelMatrixColumns`` (nominal),
    8. PNG/JPEG density (dpi), mostly to reject the usual 72/96 dpi defaults.
"""

from __future__ import annotations

import abc
import functools
import hashlib
import io
import math
import os
import re
import struct
import warnings
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .errors import InputNotFoundError, MissingMppError, UnsupportedSlideError, WsiNucleiError

__all__ = [
    "BACKENDS",
    "MPP_RANGE",
    "BaseSlide",
    "Slide",
    "open_slide",
    "scale_info",
]

#: Backend names accepted by :func:`open_slide` (besides ``"auto"``).
BACKENDS: tuple[str, ...] = ("openslide", "tiffslide", "dicom", "image")
#: Plausible µm/px range; values outside it are treated as missing.
MPP_RANGE: tuple[float, float] = (0.05, 20.0)

_MIB = 1 << 20
_WHITE = 255
#: Relative tolerance when comparing a level's downsample with a target downsample.
_LEVEL_TOLERANCE = 0.01
_WSI_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.6"


# --------------------------------------------------------------------------------------------
# Shared slide behaviour
# --------------------------------------------------------------------------------------------


class BaseSlide(abc.ABC):
    """Pixel access shared by :class:`Slide` and :class:`wsi_nuclei.synthetic.SyntheticSlide`.

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

    def close(self) -> None:
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
        out = np.full((h, w, 3), _WHITE, dtype=np.uint8)
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
            return self._read_level(level, int(round(bx0)), int(round(by0)), ow, oh)
        margin = int(math.ceil(max(sx, sy) / ds)) + 1
        ix0, iy0 = int(math.floor(bx0)) - margin, int(math.floor(by0)) - margin
        ix1, iy1 = int(math.ceil(bx1)) + margin, int(math.ceil(by1)) + margin
        src = self._read_level(level, ix0, iy0, ix1 - ix0, iy1 - iy0)
        img = Image.fromarray(src)
        out = img.resize(
            (ow, oh),
            Image.Resampling.BILINEAR,
            box=(bx0 - ix0, by0 - iy0, bx1 - ix0, by1 - iy0),
        )
        return np.asarray(out)

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


# --------------------------------------------------------------------------------------------
# Resolution
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _MppCandidate:
    """A resolution found in the metadata: µm/px along x and y, and where it came from."""

    x: float
    y: float
    source: str

    @property
    def plausible(self) -> bool:
        lo, hi = MPP_RANGE
        return all(math.isfinite(v) and lo <= v <= hi for v in (self.x, self.y))


def _float_or_none(value: Any) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) and out > 0 else None


def _resolve_mpp(
    candidates: Sequence[_MppCandidate], user_mpp: float | None, name: str, require: bool
) -> tuple[tuple[float, float] | None, str]:
    """Apply the resolution precedence; raise :class:`MissingMppError` when nothing usable."""
    lo, hi = MPP_RANGE
    if user_mpp is not None:
        value = _float_or_none(user_mpp)
        if value is None or not lo <= value <= hi:
            raise MissingMppError(
                f"--mpp {user_mpp} is not a plausible resolution (expected {lo}..{hi} µm/px)"
            )
        return (value, value), "user:--mpp"
    for cand in candidates:
        if cand.plausible:
            return (cand.x, cand.y), cand.source
    if not require:
        return None, "unknown"
    if candidates:
        c = candidates[0]
        raise MissingMppError(
            f"{name}: implausible resolution {c.x:.4g} µm/px from {c.source} "
            f"(expected {lo}..{hi}); pass --mpp"
        )
    raise MissingMppError(f"{name}: no microns-per-pixel in the slide metadata; pass --mpp")


_APERIO_MPP = re.compile(r"\|\s*MPP\s*=\s*([0-9.eE+-]+)")
_OME_UNITS = {
    "µm": 1.0,
    "um": 1.0,
    "μm": 1.0,  # greek mu
    "micron": 1.0,
    "nm": 1e-3,
    "Å": 1e-4,
    "mm": 1e3,
    "cm": 1e4,
    "m": 1e6,
}


def _aperio_candidate(description: str | None) -> _MppCandidate | None:
    if not description or not description.startswith("Aperio"):
        return None
    m = _APERIO_MPP.search(description)
    value = _float_or_none(m.group(1)) if m else None
    return _MppCandidate(value, value, "aperio:MPP") if value else None


def _ome_candidate(ome_xml: str | None) -> _MppCandidate | None:
    if not ome_xml:
        return None
    try:
        root = ET.fromstring(ome_xml)
    except ET.ParseError:
        return None
    for el in root.iter():
        if el.tag.rsplit("}", 1)[-1] != "Pixels":
            continue
        x = _float_or_none(el.get("PhysicalSizeX"))
        y = _float_or_none(el.get("PhysicalSizeY"))
        if x is None:
            return None
        ux = _OME_UNITS.get(el.get("PhysicalSizeXUnit", "µm"))
        uy = _OME_UNITS.get(el.get("PhysicalSizeYUnit", "µm"))
        if ux is None:
            return None
        x *= ux
        y = y * uy if (y is not None and uy is not None) else x
        return _MppCandidate(x, y, "ome:PhysicalSizeX")
    return None


def _resolution_candidate(
    xres: float | None, yres: float | None, unit: str | int | None
) -> _MppCandidate | None:
    """TIFF XResolution/YResolution (pixels per unit) to µm/px; unit NONE is ignored."""
    if isinstance(unit, str):
        unit = {"inch": 2, "centimeter": 3}.get(unit.strip().lower(), 1)
    scale = {2: 25400.0, 3: 10000.0}.get(int(unit) if unit is not None else 2)
    if scale is None or xres is None:
        return None
    yres = yres or xres
    return _MppCandidate(scale / xres, scale / yres, "tiff:XResolution")


def _tifffile_candidates(tf: Any) -> list[_MppCandidate]:
    """Resolution candidates of a :class:`tifffile.TiffFile` (first page)."""
    out: list[_MppCandidate] = []
    try:
        page = tf.pages.first
    except Exception:  # noqa: BLE001 - a broken file simply has no candidates
        return out
    cand = _aperio_candidate(page.description)
    if cand:
        out.append(cand)
    if tf.is_ome:
        cand = _ome_candidate(tf.ome_metadata)
        if cand:
            out.append(cand)
    tags = page.tags
    if "XResolution" in tags:

        def _ratio(v: Any) -> float | None:
            try:
                return _float_or_none(v[0] / v[1]) if isinstance(v, tuple) else _float_or_none(v)
            except ZeroDivisionError:
                return None

        unit = tags["ResolutionUnit"].value if "ResolutionUnit" in tags else 2
        cand = _resolution_candidate(
            _ratio(tags["XResolution"].value),
            _ratio(tags["YResolution"].value) if "YResolution" in tags else None,
            int(unit),
        )
        if cand:
            out.append(cand)
    return out


# --------------------------------------------------------------------------------------------
# Readers (one per backend). Internal: level-pixel, in-bounds reads of RGB uint8.
# --------------------------------------------------------------------------------------------


def _to_rgb_uint8(arr: np.ndarray) -> np.ndarray:
    """Any (H, W[, C]) array to (H, W, 3) uint8 RGB; alpha composited over white."""
    a = np.asarray(arr)
    if a.ndim == 2:
        a = a[:, :, None]
    if a.dtype != np.uint8:
        if a.dtype == np.bool_:
            a = a.astype(np.uint8) * 255
        elif np.issubdtype(a.dtype, np.integer):
            a = (a.astype(np.float64) * (255.0 / np.iinfo(a.dtype).max)).round().astype(np.uint8)
        else:
            a = (np.clip(a, 0.0, 1.0) * 255.0).round().astype(np.uint8)
    c = a.shape[2]
    if c == 3:
        return a
    if c == 1:
        return np.repeat(a, 3, axis=2)
    if c == 2:  # grey + alpha
        a = np.concatenate([np.repeat(a[:, :, :1], 3, axis=2), a[:, :, 1:2]], axis=2)
        c = 4
    if c >= 4:
        if a[:, :, 3].min() == 255:  # opaque (the common case): no compositing
            return np.ascontiguousarray(a[:, :, :3])
        rgb = a[:, :, :3].astype(np.uint16)
        alpha = a[:, :, 3:4].astype(np.uint16)
        out = (rgb * alpha + _WHITE * (255 - alpha) + 127) // 255
        return out.astype(np.uint8)
    raise ValueError(f"unsupported channel count {c}")


class _Reader(abc.ABC):
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

    def mpp_candidates(self) -> list[_MppCandidate]:
        """Resolution candidates in precedence order."""
        return []

    def close(self) -> None:
        """Release resources."""

    def smoke_test(self) -> None:
        """Decode a few pixels of the coarsest level (catches files that open but do not read)."""
        level = len(self.level_dimensions) - 1
        lw, lh = self.level_dimensions[level]
        w, h = min(lw, 16), min(lh, 16)
        self.read(level, (lw - w) // 2, (lh - h) // 2, w, h)


class _OpenSlideReader(_Reader):
    name = "openslide"

    def __init__(self, path: Path) -> None:
        import openslide

        self._osr = openslide.OpenSlide(str(path))
        props = {str(k): str(v) for k, v in self._osr.properties.items()}
        self.properties = props
        self.vendor = props.get("openslide.vendor", "unknown")
        full = tuple((int(w), int(h)) for w, h in self._osr.level_dimensions)
        self.level_downsamples = tuple(float(d) for d in self._osr.level_downsamples)
        bx = _float_or_none(props.get("openslide.bounds-x")) or 0.0
        by = _float_or_none(props.get("openslide.bounds-y")) or 0.0
        bw = _float_or_none(props.get("openslide.bounds-width"))
        bh = _float_or_none(props.get("openslide.bounds-height"))
        self.offset = (int(bx), int(by))
        if bw and bh:
            self.level_dimensions = tuple(
                (int(math.ceil(bw / d)), int(math.ceil(bh / d))) for d in self.level_downsamples
            )
        else:
            self.level_dimensions = full

    def read(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        ds = self.level_downsamples[level]
        loc = (int(round(x * ds)) + self.offset[0], int(round(y * ds)) + self.offset[1])
        img = self._osr.read_region(loc, level, (w, h))
        return _to_rgb_uint8(np.asarray(img))

    def mpp_candidates(self) -> list[_MppCandidate]:
        p = self.properties
        out: list[_MppCandidate] = []
        x, y = _float_or_none(p.get("openslide.mpp-x")), _float_or_none(p.get("openslide.mpp-y"))
        if x:
            out.append(_MppCandidate(x, y or x, "openslide:openslide.mpp-x"))
        a = _float_or_none(p.get("aperio.MPP"))
        if a:
            out.append(_MppCandidate(a, a, "aperio:MPP"))
        cand = _resolution_candidate(
            _float_or_none(p.get("tiff.XResolution")),
            _float_or_none(p.get("tiff.YResolution")),
            p.get("tiff.ResolutionUnit"),
        )
        if cand:
            out.append(cand)
        return out

    def close(self) -> None:
        self._osr.close()


class _TiffSlideReader(_Reader):
    name = "tiffslide"

    def __init__(self, path: Path) -> None:
        import tiffslide

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self._ts = tiffslide.TiffSlide(str(path))
        props = {str(k): str(v) for k, v in self._ts.properties.items() if v is not None}
        self.properties = props
        tf = self._ts.ts_tifffile
        self.vendor = props.get("tiffslide.vendor") or ("ome-tiff" if tf.is_ome else "generic-tiff")
        self.level_dimensions = tuple((int(w), int(h)) for w, h in self._ts.level_dimensions)
        self.level_downsamples = tuple(float(d) for d in self._ts.level_downsamples)
        self._candidates = _tifffile_candidates(tf)
        x = _float_or_none(props.get("tiffslide.mpp-x"))
        if x:
            y = _float_or_none(props.get("tiffslide.mpp-y")) or x
            self._candidates.append(_MppCandidate(x, y, "tiffslide:tiffslide.mpp-x"))

    def _level0_location(self, level: int, v: int) -> int:
        """A level-0 coordinate that tiffslide maps back exactly to level coordinate ``v``."""
        ds = self.level_downsamples[level]
        loc = int(round(v * ds))
        while int(loc / ds) < v:
            loc += 1
        while loc > 0 and int(loc / ds) > v:
            loc -= 1
        return loc

    def read(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        loc = (self._level0_location(level, x), self._level0_location(level, y))
        arr = self._ts.read_region(loc, level, (w, h), as_array=True, padding=True)
        return _to_rgb_uint8(arr)

    def mpp_candidates(self) -> list[_MppCandidate]:
        return list(self._candidates)

    def close(self) -> None:
        self._ts.close()


class _ImageReader(_Reader):
    """Plain images (PNG/JPEG/BMP/flat TIFF) decoded fully into memory: for ROIs and TMA cores."""

    name = "image"

    def __init__(self, path: Path) -> None:
        self._candidates: list[_MppCandidate] = []
        self.properties = {}
        arr: np.ndarray | None = None
        if _sniff(path) == "tiff":
            import tifffile

            with tifffile.TiffFile(str(path)) as tf:
                series = tf.series[0]
                page = series.pages[0] if series.pages else tf.pages.first
                _check_image_size(int(page.imagewidth) * int(page.imagelength))
                data = series.asarray()
                axes = series.axes
                self._candidates = _tifffile_candidates(tf)
                self.properties["tiff.axes"] = axes
            arr = _tiff_array_to_yxs(data, axes)
            self.vendor = "tiff"
        else:
            with Image.open(path) as img:
                _check_image_size(img.width * img.height)
                img.load()
                self.vendor = (img.format or "image").lower()
                self.properties["image.format"] = str(img.format)
                self.properties["image.mode"] = img.mode
                dpi = img.info.get("dpi")
                if dpi:
                    dx, dy = _float_or_none(dpi[0]), _float_or_none(dpi[1])
                    if dx:
                        self._candidates.append(
                            _MppCandidate(25400.0 / dx, 25400.0 / (dy or dx), "image:dpi")
                        )
                arr = _pil_to_rgb(img)
        self._arr = _to_rgb_uint8(arr)
        h, w = self._arr.shape[:2]
        self.level_dimensions = ((w, h),)
        self.level_downsamples = (1.0,)

    def read(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        return self._arr[y : y + h, x : x + w].copy()

    def mpp_candidates(self) -> list[_MppCandidate]:
        return list(self._candidates)


#: Largest plain image (pixels) the "image" backend decodes into memory (about 1.5 GB RGB).
_IMAGE_MAX_PIXELS = 500_000_000


def _check_image_size(n_pixels: int) -> None:
    if n_pixels > _IMAGE_MAX_PIXELS:
        raise ValueError(
            f"{n_pixels} pixels is too large to decode into memory; use a pyramidal TIFF"
        )


def _pil_to_rgb(img: Image.Image) -> np.ndarray:
    """A decoded PIL image to RGB uint8 (transparency composited over white)."""
    if img.mode in ("RGB", "L", "RGBA", "LA"):
        return _to_rgb_uint8(np.asarray(img))
    if img.mode.startswith("I;16") or img.mode == "I":
        a = np.asarray(img).astype(np.float64)
        top = 65535.0 if img.mode.startswith("I;16") else max(float(a.max()), 1.0)
        return np.clip(a / top * 255.0, 0, 255).round().astype(np.uint8)
    if "transparency" in img.info or img.mode in ("P", "PA"):
        return _to_rgb_uint8(np.asarray(img.convert("RGBA")))
    return np.asarray(img.convert("RGB"))


def _tiff_array_to_yxs(data: np.ndarray, axes: str) -> np.ndarray:
    """Reduce a tifffile series array to (Y, X[, channels]); extra axes take their first plane."""
    chan = "S" if "S" in axes else ("C" if "C" in axes else "")
    keep = ("Y", "X", chan) if chan else ("Y", "X")
    data = data[tuple(slice(None) if ax in keep else 0 for ax in axes)]
    kept = [ax for ax in axes if ax in keep]
    if chan:
        data = np.moveaxis(data, kept.index(chan), -1)
        if data.shape[-1] > 4:
            data = data[..., :3]
    return data


# ---- DICOM ---------------------------------------------------------------------------------


#: DICOM attributes copied into ``Slide.properties``.
_DICOM_PROPERTIES = (
    "SOPClassUID",
    "Modality",
    "ImageType",
    "Manufacturer",
    "ManufacturerModelName",
    "SoftwareVersions",
    "DimensionOrganizationType",
    "Rows",
    "Columns",
    "NumberOfFrames",
    "TotalPixelMatrixColumns",
    "TotalPixelMatrixRows",
    "ImagedVolumeWidth",
    "ImagedVolumeHeight",
    "SamplesPerPixel",
    "PhotometricInterpretation",
    "BitsAllocated",
    "LossyImageCompression",
    "ObjectiveLensPower",
)


class _DicomReader(_Reader):
    """DICOM VL Whole Slide Microscopy (single instance = single level) read with pydicom.

    Frames are located in the file without loading the pixel data, decoded on demand (Pillow
    for JPEG/JPEG 2000, pydicom's decoders otherwise) and cached. Frame placement: explicit
    ``PlanePositionSlideSequence`` positions when present; otherwise the TILED_FULL grid, whose
    order (row-major per the standard, column-major in some converters) is checked by seam
    continuity.
    """

    name = "dicom"

    def __init__(self, path: Path) -> None:
        import pydicom

        self._path = path
        with warnings.catch_warnings(), open(path, "rb") as fh:
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(fh, stop_before_pixels=True)
            pixel_pos = fh.tell()
            fh.seek(pixel_pos)
            head = fh.read(12)
        self._ds = ds
        self._rows, self._cols = int(ds.Rows), int(ds.Columns)
        self._spp = int(getattr(ds, "SamplesPerPixel", 1))
        self._bits = int(getattr(ds, "BitsAllocated", 8))
        self._photometric = str(getattr(ds, "PhotometricInterpretation", "RGB"))
        self._planar = int(getattr(ds, "PlanarConfiguration", 0) or 0)
        self._n = int(getattr(ds, "NumberOfFrames", 1) or 1)
        tw = int(getattr(ds, "TotalPixelMatrixColumns", 0) or self._cols)
        th = int(getattr(ds, "TotalPixelMatrixRows", 0) or self._rows)
        self.level_dimensions = ((tw, th),)
        self.level_downsamples = (1.0,)
        self.vendor = str(getattr(ds, "Manufacturer", "") or "dicom")
        size = path.stat().st_size
        self._frames = self._locate_frames(head, pixel_pos, size)
        self.properties = self._collect_properties(ds)
        self._decode_cached = functools.lru_cache(maxsize=64)(self._decode)
        self._positions = self._frame_positions(ds)
        self._grid = self._grid_index()

    # -- metadata --

    @staticmethod
    def _collect_properties(ds: Any) -> dict[str, str]:
        """Technical attributes only (no patient, study or person identifiers)."""
        out: dict[str, str] = {"dicom.TransferSyntaxUID": str(ds.file_meta.TransferSyntaxUID)}
        for key in _DICOM_PROPERTIES:
            value = getattr(ds, key, None)
            if value is not None and value != "":
                out[f"dicom.{key}"] = str(value)
        return out

    def mpp_candidates(self) -> list[_MppCandidate]:
        ds = self._ds
        out: list[_MppCandidate] = []
        spacing = None
        for seq_name in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
            seq = getattr(ds, seq_name, None)
            if seq:
                pm = getattr(seq[0], "PixelMeasuresSequence", None)
                if pm and getattr(pm[0], "PixelSpacing", None):
                    spacing = pm[0].PixelSpacing
                    break
        if spacing is None and getattr(ds, "PixelSpacing", None):
            spacing = ds.PixelSpacing
        if spacing is not None and len(spacing) >= 2:
            row_mm, col_mm = _float_or_none(spacing[0]), _float_or_none(spacing[1])
            if row_mm and col_mm:
                out.append(_MppCandidate(col_mm * 1000.0, row_mm * 1000.0, "dicom:PixelSpacing"))
        width_mm = _float_or_none(getattr(ds, "ImagedVolumeWidth", None))
        cols = self.level_dimensions[0][0]
        if width_mm and cols:
            v = width_mm * 1000.0 / cols
            out.append(_MppCandidate(v, v, "dicom:ImagedVolumeWidth (nominal)"))
        return out

    # -- frame bytes --

    def _locate_frames(
        self, head: bytes, pos: int, size: int
    ) -> list[tuple[int, int]] | list[bytes]:
        """(file offset, length) of every frame, or the frame bytes when they must be joined.

        ``head`` holds the first 12 bytes of the file at ``pos``, where pydicom stopped before
        the pixel data.
        """
        if len(head) < 8 or struct.unpack("<HH", head[:4]) != (0x7FE0, 0x0010):
            raise ValueError("no PixelData element (or not little endian)")
        if head[4:6] in (b"OB", b"OW", b"UN"):  # explicit VR
            if len(head) < 12:
                raise ValueError("PixelData header is truncated")
            length = struct.unpack("<L", head[8:12])[0]
            start = pos + 12
        else:  # implicit VR
            length = struct.unpack("<L", head[4:8])[0]
            start = pos + 8
        if length != 0xFFFFFFFF:  # native (uncompressed) pixel data
            frame_len = self._rows * self._cols * self._spp * (self._bits // 8)
            if start + frame_len * self._n > size or length < frame_len * self._n:
                raise ValueError(
                    f"pixel data holds {min(length, size - start)} bytes, "
                    f"{frame_len * self._n} expected (truncated?)"
                )
            return [(start + k * frame_len, frame_len) for k in range(self._n)]
        items: list[tuple[int, int]] = []
        bot: list[int] = []
        with open(self._path, "rb") as fh:
            pos = start
            first = True
            while True:
                fh.seek(pos)
                head = fh.read(8)
                if len(head) < 8:
                    raise ValueError("encapsulated pixel data ends early (truncated?)")
                group, elem, length = struct.unpack("<HHL", head)
                tag = group << 16 | elem
                if tag == 0xFFFEE0DD:
                    break
                if tag != 0xFFFEE000:
                    raise ValueError(f"unexpected tag {tag:08X} in encapsulated pixel data")
                if pos + 8 + length > size:
                    raise ValueError(
                        f"pixel data item at byte {pos} runs past the end of the file (truncated?)"
                    )
                if first:
                    if length:
                        bot = list(struct.unpack(f"<{length // 4}L", fh.read(length)))
                    first = False
                else:
                    items.append((pos + 8, length))
                pos += 8 + length
        if len(items) == self._n:
            return items
        if len(bot) == self._n:  # several fragments per frame: join them
            starts = [start + 8 + len(bot) * 4 + b for b in bot]
            frames: list[bytes] = []
            with open(self._path, "rb") as fh:
                for k in range(self._n):
                    lo = starts[k]
                    hi = starts[k + 1] if k + 1 < self._n else None
                    chunk = b""
                    for off, ln in items:
                        if off - 8 >= lo and (hi is None or off - 8 < hi):
                            fh.seek(off)
                            chunk += fh.read(ln)
                    frames.append(chunk)
            return frames
        if self._n == 1 and items:
            with open(self._path, "rb") as fh:
                chunk = b""
                for off, ln in items:
                    fh.seek(off)
                    chunk += fh.read(ln)
            return [chunk]
        raise ValueError(f"{len(items)} pixel-data fragments for {self._n} frames, no offset table")

    def _frame_bytes(self, k: int) -> bytes:
        ref = self._frames[k]
        if isinstance(ref, bytes):
            return ref
        off, ln = ref
        with open(self._path, "rb") as fh:
            fh.seek(off)
            data = fh.read(ln)
        if len(data) != ln:
            raise ValueError(f"frame {k} is truncated")
        return data

    def _decode(self, k: int) -> np.ndarray:
        """Frame ``k`` as (rows, cols, 3) uint8 RGB."""
        data = self._frame_bytes(k)
        native = not self._ds.file_meta.TransferSyntaxUID.is_compressed
        if native:
            dtype = np.uint8 if self._bits == 8 else np.dtype("<u2")
            arr = np.frombuffer(data, dtype=dtype)
            if self._spp == 1:
                arr = arr.reshape(self._rows, self._cols)
            elif self._planar == 1:
                arr = np.moveaxis(arr.reshape(self._spp, self._rows, self._cols), 0, -1)
            else:
                arr = arr.reshape(self._rows, self._cols, self._spp)
            if self._photometric.startswith("YBR") and self._spp == 3:
                from pydicom.pixels import convert_color_space

                arr = convert_color_space(arr, self._photometric, "RGB")
            if self._photometric == "MONOCHROME1":
                arr = np.iinfo(arr.dtype).max - arr
            return _to_rgb_uint8(arr)
        try:
            with Image.open(io.BytesIO(data)) as img:
                img.load()
                return _pil_to_rgb(img)
        except Exception:  # noqa: BLE001 - Pillow lacks this codec: use pydicom's decoders
            from pydicom.pixels import pixel_array

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                arr = pixel_array(str(self._path), index=k)
            return _to_rgb_uint8(arr)

    def frame(self, k: int) -> np.ndarray:
        """Decoded frame ``k`` (cached; thread-safe, a frame may rarely be decoded twice)."""
        return self._decode_cached(k)

    # -- placement --

    def _frame_positions(self, ds: Any) -> list[tuple[int, int]]:
        """Top-left (x, y) in the total pixel matrix of every frame."""
        per_frame = getattr(ds, "PerFrameFunctionalGroupsSequence", None)
        if per_frame is not None and len(per_frame) == self._n:
            pos: list[tuple[int, int]] = []
            for item in per_frame:
                pps = getattr(item, "PlanePositionSlideSequence", None)
                if not pps:
                    break
                col = getattr(pps[0], "ColumnPositionInTotalImagePixelMatrix", None)
                row = getattr(pps[0], "RowPositionInTotalImagePixelMatrix", None)
                if col is None or row is None:
                    break
                pos.append((int(col) - 1, int(row) - 1))
            else:
                self.properties["dicom.frame-order"] = "explicit (PlanePositionSlideSequence)"
                return pos
        tw, th = self.level_dimensions[0]
        ncols = -(-tw // self._cols)
        nrows = -(-th // self._rows)
        grid = ncols * nrows
        if self._n != grid:
            if self._n % grid:
                raise ValueError(
                    f"{self._n} frames cannot tile a {tw}x{th} matrix in "
                    f"{self._cols}x{self._rows} frames and no frame positions are given"
                )
            # TILED_FULL with several focal planes / optical paths: the first plane comes first.
            self.properties["dicom.planes"] = str(self._n // grid)
        row_major = [((k % ncols) * self._cols, (k // ncols) * self._rows) for k in range(grid)]
        col_major = [((k // nrows) * self._cols, (k % nrows) * self._rows) for k in range(grid)]
        if ncols == 1 or nrows == 1:
            self.properties["dicom.frame-order"] = "row-major"
            return row_major
        s_row = self._seam_score(row_major, ncols, nrows)
        s_col = self._seam_score(col_major, ncols, nrows)
        self.properties["dicom.seam-score-row-major"] = f"{s_row:.2f}"
        self.properties["dicom.seam-score-column-major"] = f"{s_col:.2f}"
        if s_col < 0.5 * s_row and s_row - s_col > 2.0:
            self.properties["dicom.frame-order"] = "column-major (detected by seam continuity)"
            return col_major
        self.properties["dicom.frame-order"] = "row-major"
        return row_major

    def _seam_score(self, positions: list[tuple[int, int]], ncols: int, nrows: int) -> float:
        """Mean absolute grey-level jump across frame seams if frames sat at ``positions``."""
        at = {(x // self._cols, y // self._rows): k for k, (x, y) in enumerate(positions)}
        tw, th = self.level_dimensions[0]
        seams: list[tuple[int, int, bool]] = []
        for r in range(nrows):
            for c in range(ncols):
                if c + 1 < ncols:
                    seams.append((at[(c, r)], at[(c + 1, r)], True))
                if r + 1 < nrows:
                    seams.append((at[(c, r)], at[(c, r + 1)], False))
        # Deterministic subsample that favours the middle of the grid (tissue), at most 24 seams.
        if len(seams) > 24:
            idx = np.linspace(0, len(seams) - 1, 24).round().astype(int)
            seams = [seams[i] for i in idx]
        total, count = 0.0, 0
        for a, b, horizontal in seams:
            fa, fb = self.frame(a).astype(np.int16), self.frame(b).astype(np.int16)
            ya = positions[a][1]
            xa = positions[a][0]
            if horizontal:
                valid = min(self._rows, th - ya)
                diff = np.abs(fa[:valid, -1] - fb[:valid, 0])
            else:
                valid = min(self._cols, tw - xa)
                diff = np.abs(fa[-1, :valid] - fb[0, :valid])
            total += float(diff.sum())
            count += diff.size
        return total / max(count, 1)

    # -- pixels --

    def _grid_index(self) -> np.ndarray | None:
        """Frame index per grid cell (-1 = no frame) when frames sit on the frame grid."""
        fw, fh = self._cols, self._rows
        if any(px % fw or py % fh or px < 0 or py < 0 for px, py in self._positions):
            return None
        tw, th = self.level_dimensions[0]
        grid = np.full((-(-th // fh), -(-tw // fw)), -1, dtype=np.int64)
        for k, (px, py) in enumerate(self._positions):
            if py // fh < grid.shape[0] and px // fw < grid.shape[1]:
                grid[py // fh, px // fw] = k
        return grid

    def read(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        out = np.full((h, w, 3), _WHITE, dtype=np.uint8)
        fw, fh = self._cols, self._rows
        if self._grid is not None:
            cells = self._grid[y // fh : (y + h - 1) // fh + 1, x // fw : (x + w - 1) // fw + 1]
            frames = [int(k) for k in cells.ravel() if k >= 0]
        else:
            frames = range(len(self._positions))
        for k in frames:
            px, py = self._positions[k]
            ix0, iy0 = max(x, px), max(y, py)
            ix1, iy1 = min(x + w, px + fw), min(y + h, py + fh)
            if ix1 <= ix0 or iy1 <= iy0:
                continue
            f = self.frame(k)
            out[iy0 - y : iy1 - y, ix0 - x : ix1 - x] = f[iy0 - py : iy1 - py, ix0 - px : ix1 - px]
        return out

    def close(self) -> None:
        self._decode_cached.cache_clear()


_OPENERS: dict[str, Callable[[Path], _Reader]] = {
    "openslide": _OpenSlideReader,
    "tiffslide": _TiffSlideReader,
    "dicom": _DicomReader,
    "image": _ImageReader,
}


# --------------------------------------------------------------------------------------------
# File sniffing and integrity
# --------------------------------------------------------------------------------------------


def _sniff(path: Path) -> str:
    """Guess the container from magic bytes (and the extension for DICOM without preamble)."""
    with open(path, "rb") as fh:
        head = fh.read(132)
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "tiff"
    if len(head) >= 132 and head[128:132] == b"DICM":
        return "dicom"
    if head[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if head[:3] == b"\xff\xd8\xff":
        return "jpeg"
    if head[:2] == b"BM" or head[:6] in (b"GIF87a", b"GIF89a"):
        return "image"
    if path.suffix.lower() in (".dcm", ".dicom"):
        return "dicom"
    return "other"


def _auto_order(kind: str) -> list[str]:
    return {
        "tiff": ["openslide", "tiffslide", "image"],
        "dicom": ["openslide", "dicom"],
        "png": ["image"],
        "jpeg": ["image"],
        "image": ["image"],
    }.get(kind, ["openslide", "tiffslide", "dicom", "image"])


#: Byte size of the TIFF field types that can hold offsets/byte counts.
_TIFF_TYPE_SIZE = {3: 2, 4: 4, 13: 4, 16: 8, 18: 8}
_TIFF_INT_FMT = {3: "H", 4: "I", 13: "I", 16: "Q", 18: "Q"}


def _tiff_structure_problem(path: Path) -> str | None:
    """Walk the TIFF IFD chain; describe the first sign of truncation, or None if sound.

    Checks that every IFD and every strip/tile byte range lies inside the file. Only reads the
    directory entries and offset tables, so it is cheap even for large slides. Hamamatsu NDPI
    (which wraps 32-bit offsets) is skipped.
    """
    if path.suffix.lower() == ".ndpi":
        return None
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(16)
        bo = "<" if head[:2] == b"II" else ">"
        version = struct.unpack(bo + "H", head[2:4])[0]
        big = version == 43
        if big:
            if len(head) < 16:
                return "header is truncated"
            ifd = struct.unpack(bo + "Q", head[8:16])[0]
        else:
            if len(head) < 8:
                return "header is truncated"
            ifd = struct.unpack(bo + "I", head[4:8])[0]
        cnt_fmt, cnt_size = ("Q", 8) if big else ("H", 2)
        entry_size, off_fmt, off_size = (20, "Q", 8) if big else (12, "I", 4)
        seen: set[int] = set()
        n = 0
        while ifd and n < 100_000:
            if ifd in seen:
                return f"IFD chain loops at byte {ifd}"
            seen.add(ifd)
            if ifd + cnt_size > size:
                return f"IFD {n} at byte {ifd} lies beyond the end of the file ({size} bytes)"
            fh.seek(ifd)
            count = struct.unpack(bo + cnt_fmt, fh.read(cnt_size))[0]
            end = ifd + cnt_size + count * entry_size + off_size
            if end > size:
                return f"IFD {n} at byte {ifd} runs past the end of the file ({size} bytes)"
            block = fh.read(count * entry_size)
            nxt = struct.unpack(bo + off_fmt, fh.read(off_size))[0]
            arrays: dict[int, np.ndarray] = {}
            for i in range(count):
                e = block[i * entry_size : (i + 1) * entry_size]
                tag, typ = struct.unpack(bo + "HH", e[:4])
                if tag not in (273, 279, 324, 325) or typ not in _TIFF_INT_FMT:
                    continue
                num = struct.unpack(bo + ("Q" if big else "I"), e[4 : 4 + (8 if big else 4)])[0]
                raw_value = e[4 + (8 if big else 4) :]
                nbytes = num * _TIFF_TYPE_SIZE[typ]
                if nbytes <= len(raw_value):
                    data = raw_value[:nbytes]
                else:
                    where = struct.unpack(bo + off_fmt, raw_value)[0]
                    if where + nbytes > size:
                        return f"IFD {n} offset table runs past the end of the file ({size} bytes)"
                    here = fh.tell()
                    fh.seek(where)
                    data = fh.read(nbytes)
                    fh.seek(here)
                arrays[tag] = np.frombuffer(data, dtype=np.dtype(bo + _TIFF_INT_FMT[typ])).astype(
                    np.uint64
                )
            for off_tag, cnt_tag in ((273, 279), (324, 325)):
                offs, cnts = arrays.get(off_tag), arrays.get(cnt_tag)
                if offs is None or cnts is None or len(offs) != len(cnts) or not len(offs):
                    continue
                used = cnts > 0
                if used.any():
                    last = int((offs[used] + cnts[used]).max())
                    if last > size:
                        return (
                            f"image data of IFD {n} extends to byte {last}, past the end of the "
                            f"file ({size} bytes)"
                        )
            ifd = nxt
            n += 1
    return None


def pixel_files(path: Path) -> list[Path]:
    """The files that hold a slide's pixel data: the file itself, plus for multi-file formats
    the data files beside it (MIRAX: the folder named like the ``.mrxs``; a folder given as the
    slide: every file in it)."""
    path = Path(path)
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.is_file())
    files = [path]
    if path.suffix.lower() == ".mrxs":
        data = path.with_suffix("")
        if data.is_dir():
            files += sorted(p for p in data.rglob("*") if p.is_file())
    return files


def _fingerprint(path: Path, dimensions: tuple[int, int]) -> str:
    """sha256 of the dimensions and, for every file holding pixel data (:func:`pixel_files`),
    its name, size, first and last MiB and 8 evenly spaced 64 KiB blocks (hex).

    Content only (no modification times), so a copied slide keeps its nucleus ids; cheap on
    any size (at most ~2.5 MiB read per file).
    """
    h = hashlib.sha256()
    h.update(f"{dimensions[0]}x{dimensions[1]}:".encode())
    root = path if path.is_dir() else path.parent
    for f in pixel_files(path):
        size = f.stat().st_size
        h.update(f"{f.relative_to(root).as_posix() if f != path else ''}:{size}:".encode())
        with open(f, "rb") as fh:
            h.update(fh.read(_MIB))
            if size > 2 * _MIB:
                for k in range(1, 9):
                    fh.seek(size * k // 9)
                    h.update(fh.read(64 * 1024))
            if size > _MIB:
                fh.seek(max(size - _MIB, _MIB))
                h.update(fh.read(_MIB))
    return h.hexdigest()


def _one_line(exc: BaseException, limit: int = 160) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return f"{type(exc).__name__}: {text}"


# --------------------------------------------------------------------------------------------
# Slide and open_slide
# --------------------------------------------------------------------------------------------


class Slide(BaseSlide):
    """An open slide file; create it with :func:`open_slide`.

    Besides the :class:`BaseSlide` attributes it has ``backend_errors`` (why the backends tried
    before ``backend`` failed) and ``requested_backend``.
    """

    def __init__(
        self,
        path: Path,
        reader: _Reader,
        *,
        mpp: float | None = None,
        require_mpp: bool = True,
        requested_backend: str = "auto",
        backend_errors: dict[str, str] | None = None,
    ) -> None:
        self.path = path
        self._reader = reader
        self._closed = False
        self._user_mpp = mpp
        self._require_mpp = require_mpp
        self.requested_backend = requested_backend
        self.backend_errors = dict(backend_errors or {})
        self.backend = reader.name
        self.vendor = reader.vendor
        self.level_dimensions = tuple(reader.level_dimensions)
        self.level_downsamples = tuple(reader.level_downsamples)
        self.level_count = len(self.level_dimensions)
        self.dimensions = self.level_dimensions[0]
        self.offset = tuple(reader.offset)  # type: ignore[assignment]
        self.properties = dict(reader.properties)
        self.mpp_xy, self.mpp_source = _resolve_mpp(
            reader.mpp_candidates(), mpp, path.name, require_mpp
        )
        self.mpp = None if self.mpp_xy is None else (self.mpp_xy[0] + self.mpp_xy[1]) / 2.0
        self.fingerprint = _fingerprint(path, self.dimensions)

    def _read_inbounds(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        if self._closed:
            raise ValueError("slide is closed")
        try:
            return self._reader.read(level, x, y, w, h)
        except WsiNucleiError:
            raise
        except Exception as exc:  # noqa: BLE001 - never leak a backend traceback
            raise UnsupportedSlideError(
                f"{self.path.name}: cannot decode level {level} region ({x}, {y}, {w}x{h}) "
                f"with {self.backend}: {_one_line(exc)}"
            ) from exc

    def close(self) -> None:
        """Close the backend handle (idempotent)."""
        if not self._closed:
            self._closed = True
            try:
                self._reader.close()
            except Exception:  # noqa: BLE001 - closing must not fail
                pass

    def __reduce__(self) -> tuple[Any, ...]:
        # Re-open in the receiving process (dask workers) instead of pickling file handles.
        return (_reopen, (str(self.path), self.backend, self._user_mpp, self._require_mpp))


def _reopen(path: str, backend: str, mpp: float | None, require_mpp: bool) -> Slide:
    return open_slide(path, backend=backend, mpp=mpp, require_mpp=require_mpp)


def open_slide(
    path: str | os.PathLike[str],
    *,
    backend: str = "auto",
    mpp: float | None = None,
    require_mpp: bool = True,
) -> Slide:
    """Open a whole-slide image (or a plain image) with the best available backend.

    Parameters
    ----------
    path : str or os.PathLike
        Slide file.
    backend : {"auto", "openslide", "tiffslide", "dicom", "image"}
        Backend to try first. ``"auto"`` orders the backends by file type (TIFF: openslide,
        tiffslide, image; DICOM: openslide, dicom; PNG/JPEG: image; unknown: all). An explicit
        backend that cannot open the file falls back to the automatic order; ``Slide.backend``
        tells which one was used.
    mpp : float, optional
        µm per level-0 pixel; overrides the slide metadata.
    require_mpp : bool
        When False a slide without a usable resolution opens with ``mpp=None`` (for inspection
        commands) instead of raising.

    Returns
    -------
    Slide
        The open slide; use it as a context manager or call :meth:`Slide.close`.

    Raises
    ------
    InputNotFoundError
        ``path`` does not exist.
    UnsupportedSlideError
        No backend can read the file, or it is truncated/corrupt.
    MissingMppError
        No plausible resolution (0.05..20 µm/px) in the metadata and ``mpp`` not given, or an
        implausible ``mpp``.
    """
    p = Path(path)
    if backend != "auto" and backend not in BACKENDS:
        raise WsiNucleiError(
            f"unknown slide backend {backend!r} (choose from auto, {', '.join(BACKENDS)})"
        )
    if not p.exists():
        raise InputNotFoundError(f"input slide not found: {p}")
    if p.is_dir():
        raise UnsupportedSlideError(f"{p} is a directory, not a slide file")
    try:
        size = p.stat().st_size
        kind = _sniff(p)
    except OSError as exc:
        raise UnsupportedSlideError(f"cannot read {p}: {_one_line(exc)}") from exc
    if size == 0:
        raise UnsupportedSlideError(f"{p.name} is empty (0 bytes)")
    if kind == "tiff":
        try:
            problem = _tiff_structure_problem(p)
        except (OSError, struct.error) as exc:
            problem = _one_line(exc)
        if problem:
            raise UnsupportedSlideError(f"{p.name} is truncated or corrupt: {problem}")
    order = _auto_order(kind)
    if backend != "auto":
        order = [backend] + [b for b in order if b != backend]
    errors: dict[str, str] = {}
    for name in order:
        reader: _Reader | None = None
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                reader = _OPENERS[name](p)
                reader.smoke_test()
        except Exception as exc:  # noqa: BLE001 - a failing backend means "try the next one"
            errors[name] = _one_line(exc)
            if reader is not None:
                try:
                    reader.close()
                except Exception:  # noqa: BLE001
                    pass
            continue
        try:
            return Slide(
                p,
                reader,
                mpp=mpp,
                require_mpp=require_mpp,
                requested_backend=backend,
                backend_errors=errors,
            )
        except BaseException:
            reader.close()
            raise
    detail = "; ".join(f"{k}: {v}" for k, v in errors.items())
    raise UnsupportedSlideError(f"cannot open {p.name}: no backend can read it ({detail})")

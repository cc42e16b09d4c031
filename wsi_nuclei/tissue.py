"""Tissue detection on slide thumbnails: a tissue mask and the tissue pieces as regions.

Everything here works on a low-resolution RGB thumbnail plus its *downsample* (level-0 pixels
per thumbnail pixel); geometries are returned in level-0 pixel coordinates (x right, y down),
the frame QuPath uses. The only function that touches a slide object is
:func:`detect_tissue_on_slide`, and it needs nothing but ``dimensions``, ``get_thumbnail`` and
(optionally) ``mpp``. The pieces found are :class:`wsi_nuclei.regions.Region` objects; user
regions (QuPath GeoJSON) and assigning points to regions live in :mod:`wsi_nuclei.regions`.

Pixel convention: thumbnail pixel ``(row, col)`` covers the level-0 box
``[col * dx, (col + 1) * dx) x [row * dy, (row + 1) * dy)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from scipy import ndimage as ndi
from shapely.geometry import MultiPolygon, Polygon
from skimage import measure, morphology
from skimage.filters import threshold_otsu

from ._rgb import to_rgb_uint8
from .errors import NoTissueError
from .regions import Region, _as_xy, _polygonal_part

__all__ = [
    "TissueMap",
    "TISSUE_CLASS",
    "TISSUE_COLOR",
    "tissue_mask",
    "detect_tissue",
    "detect_tissue_on_slide",
    "regions_from_mask",
]

#: Classification given to automatically detected tissue regions.
TISSUE_CLASS = "Tissue"
#: Display colour (RGB) of automatically detected tissue regions.
TISSUE_COLOR: tuple[int, int, int] = (0, 150, 80)

# Default smallest tissue piece, in thumbnail pixels (4096 µm² at 8 µm/px).
_DEFAULT_MIN_AREA_PX = 64


# --------------------------------------------------------------------------------------------
# Colour helpers
# --------------------------------------------------------------------------------------------
def _as_rgb_uint8(image: np.ndarray) -> np.ndarray:
    """``image`` (HxWx3 RGB or HxWx4 RGBA) as HxWx3 uint8 (:func:`wsi_nuclei._rgb.to_rgb_uint8`)."""
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[2] not in (3, 4):
        raise ValueError(f"expected an HxWx3 RGB (or HxWx4 RGBA) array, got shape {arr.shape}")
    return to_rgb_uint8(arr)


def _hsv(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Hue (degrees, 0-360), saturation and value (0-1) of a uint8 RGB image, as float32."""
    scale = np.float32(1.0 / 255.0)
    r = rgb[..., 0].astype(np.float32) * scale
    g = rgb[..., 1].astype(np.float32) * scale
    b = rgb[..., 2].astype(np.float32) * scale
    mx = np.maximum(np.maximum(r, g), b)
    chroma = mx - np.minimum(np.minimum(r, g), b)
    has_hue = chroma > 0
    safe_c = np.where(has_hue, chroma, np.float32(1.0))
    hue = np.where(
        mx == r,
        np.mod((g - b) / safe_c, np.float32(6.0)),
        np.where(mx == g, (b - r) / safe_c + np.float32(2.0), (r - g) / safe_c + np.float32(4.0)),
    )
    hue = np.where(has_hue, hue * np.float32(60.0), np.float32(0.0))
    sat = np.where(mx > 0, chroma / np.where(mx > 0, mx, np.float32(1.0)), np.float32(0.0))
    return hue.astype(np.float32), sat.astype(np.float32), mx


def _optical_density(rgb: np.ndarray) -> np.ndarray:
    """Mean optical density over the three channels (0 for white, about 2.4 for black)."""
    lut = -np.log10(np.maximum(np.arange(256, dtype=np.float32), 1.0) / np.float32(255.0))
    return lut[rgb].mean(axis=-1, dtype=np.float32)


def _otsu_or_none(values: np.ndarray) -> float | None:
    """Otsu threshold of ``values``, or None when they are (almost) constant or too few."""
    if values.size < 16:
        return None
    lo, hi = float(values.min()), float(values.max())
    if hi - lo < 1e-3:
        return None
    return float(threshold_otsu(values))


def _ink_mask(hue: np.ndarray, sat: np.ndarray, green_sat: float, blue_sat: float) -> np.ndarray:
    """Pixels whose colour is pen ink rather than H&E stain.

    H&E is pink to purple (hue roughly 250-360 and 0-20 degrees). Green and cyan hues
    (70-190 degrees) never come from the stains. Pure blue (190-240 degrees: blue channel
    highest, green above red) comes from ink only when strongly saturated: hematoxylin-rich
    tissue is violet-blue with red above green (hue above 240 degrees), and faint bluish tissue
    is weakly saturated. Blue strokes blend into violet where they are thin or overlie the
    stain, so each sizeable pure-blue patch is grown into the adjoining saturated blue-violet
    pixels, at most a few pixels away from it.
    """
    green = (hue >= 70.0) & (hue < 190.0) & (sat >= green_sat)
    blue = (hue >= 190.0) & (hue < 240.0) & (sat >= blue_sat)
    core = _drop_small(blue, 6, diagonal=True)
    if core.any():
        near = ndi.binary_dilation(core, structure=_disk(3))
        violet = near & (hue >= 190.0) & (hue < 275.0) & (sat >= 0.3)
        blue |= ndi.binary_propagation(core, structure=np.ones((3, 3), bool), mask=violet | core)
    return green | blue


def _disk(radius: int) -> np.ndarray:
    return morphology.disk(radius).astype(bool)


def _drop_small(
    mask: np.ndarray, min_size: int, *, diagonal: bool, keep_border: bool = False
) -> np.ndarray:
    """``mask`` without its connected pieces of fewer than ``min_size`` pixels.

    With ``keep_border`` pieces touching the image border are always kept (used to fill holes:
    background connected to the border is not a hole).
    """
    structure = np.ones((3, 3), bool) if diagonal else None
    labels, n = ndi.label(mask, structure=structure)
    if n == 0:
        return mask.copy()
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    keep = sizes >= min_size
    if keep_border:
        border = np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])
        keep[border] = True
    keep[0] = False
    return keep[labels]


# --------------------------------------------------------------------------------------------
# Tissue mask
# --------------------------------------------------------------------------------------------
def tissue_mask(
    rgb_thumb: np.ndarray,
    *,
    min_area_px: int = _DEFAULT_MIN_AREA_PX,
    max_hole_px: int | None = None,
    closing_radius: int = 2,
    sat_floor: float = 0.05,
    sat_ceiling: float = 0.15,
    od_min: float = 0.02,
    dark_value: float = 0.16,
    exclude_ink: bool = True,
    ink_green_sat: float = 0.15,
    ink_blue_sat: float = 0.35,
) -> np.ndarray:
    """Boolean tissue mask of an RGB thumbnail.

    A pixel is a tissue candidate when it is stained (HSV saturation above a threshold), not
    glass (optical density at least ``od_min``), not a black artefact (HSV value at least
    ``dark_value``) and, with ``exclude_ink``, not pen ink (green/cyan, or saturated pure
    blue). The saturation threshold is Otsu's on the non-glass pixels, clamped to
    ``[sat_floor, sat_ceiling]`` so that a slide that is all tissue or all glass still gets a
    sensible cut (``sat_floor`` alone when the saturation is constant, as on a blank image).
    The candidates are then closed morphologically, artefact pixels are removed again, holes
    smaller than ``max_hole_px`` are filled and pieces smaller than ``min_area_px`` dropped.

    Parameters
    ----------
    rgb_thumb : numpy.ndarray
        HxWx3 RGB image (uint8, or float in [0, 1]); an HxWx4 RGBA image is accepted and
        fully transparent pixels count as background.
    min_area_px : int, optional
        Smallest tissue piece kept, in thumbnail pixels.
    max_hole_px : int or None, optional
        Holes up to this area (thumbnail pixels) are filled; None means ``min_area_px``.
    closing_radius : int, optional
        Radius (thumbnail pixels) of the disk used for the morphological closing; 0 disables.
    sat_floor, sat_ceiling : float, optional
        Bounds of the saturation threshold.
    od_min : float, optional
        Pixels with a mean optical density below this are glass/white background.
    dark_value : float, optional
        Pixels whose brightest channel is below this (0-1) are black artefacts.
    exclude_ink : bool, optional
        Remove pen marks (green, cyan and saturated blue ink).
    ink_green_sat, ink_blue_sat : float, optional
        Minimal saturation for a green/cyan (hue 70-190 degrees) or blue (190-240 degrees)
        pixel to count as ink.

    Returns
    -------
    numpy.ndarray
        HxW boolean mask, True on tissue.

    Raises
    ------
    ValueError
        If ``rgb_thumb`` is not an HxWx3/HxWx4 array.
    """
    rgb = _as_rgb_uint8(rgb_thumb)
    if rgb.shape[0] == 0 or rgb.shape[1] == 0:
        return np.zeros(rgb.shape[:2], dtype=bool)
    hue, sat, val = _hsv(rgb)
    od = _optical_density(rgb)

    glass = od < od_min
    artefact = val < dark_value
    if exclude_ink:
        artefact |= _ink_mask(hue, sat, ink_green_sat, ink_blue_sat)
        # ink edges blend with the stain around them: widen the exclusion by one pixel
        artefact = ndi.binary_dilation(artefact, structure=np.ones((3, 3), bool))

    usable = ~glass & ~artefact
    thr = _otsu_or_none(sat[usable])
    thr = sat_floor if thr is None else min(max(thr, sat_floor), sat_ceiling)
    mask = usable & (sat >= thr)
    if not mask.any():
        return mask

    if closing_radius > 0:
        pad = closing_radius + 1
        padded = np.pad(mask, pad)
        padded = ndi.binary_closing(padded, structure=_disk(closing_radius))
        mask = padded[pad:-pad, pad:-pad] & ~artefact
    hole = min_area_px if max_hole_px is None else max_hole_px
    if hole > 0:
        # background is 4-connected where tissue is 8-connected
        mask = ~_drop_small(~mask, hole, diagonal=False, keep_border=True)
    if min_area_px > 0:
        mask = _drop_small(mask, min_area_px, diagonal=True)
    return mask


# --------------------------------------------------------------------------------------------
# Mask -> polygons
# --------------------------------------------------------------------------------------------
def _component_polygon(
    component: np.ndarray, row0: int, col0: int, dx: float, dy: float, tolerance: float
) -> Polygon | MultiPolygon | None:
    """Polygon (holes kept) of one 8-connected component given as a cropped boolean array."""
    padded = np.pad(component.astype(np.float32), 1)
    contours = measure.find_contours(padded, 0.5, fully_connected="high")
    rings = []
    for c in contours:
        if len(c) < 4:
            continue
        # (row, col) in padded crop -> level-0 (x, y); contour at 0.5 lies on pixel edges
        x = (c[:, 1] - 1 + col0 + 0.5) * dx
        y = (c[:, 0] - 1 + row0 + 0.5) * dy
        ring = np.column_stack([x, y])
        area = 0.5 * abs(np.dot(x[:-1], y[1:]) - np.dot(x[1:], y[:-1]))
        rings.append((area, ring))
    if not rings:
        return None
    rings.sort(key=lambda t: -t[0])
    shell = rings[0][1]
    holes = [r for _, r in rings[1:]]
    geom = Polygon(shell, holes)
    if tolerance > 0:
        geom = geom.simplify(tolerance, preserve_topology=True)
    return _polygonal_part(geom)


def regions_from_mask(
    mask: np.ndarray,
    downsample: float | Sequence[float],
    *,
    min_area_px: int = 0,
    simplify_px: float = 0.5,
    name_prefix: str = "Tissue",
    source: str = "tissue",
    classification: str | None = TISSUE_CLASS,
    color: tuple[int, int, int] | None = TISSUE_COLOR,
) -> list[Region]:
    """One region per 8-connected piece of a boolean mask, in level-0 pixel coordinates.

    Holes are kept as polygon interiors. Regions are ordered by the (top, left) corner of
    their bounding box and numbered 1..N, named ``"<name_prefix> <id>"``.

    Parameters
    ----------
    mask : numpy.ndarray
        HxW boolean mask (thumbnail resolution).
    downsample : float or (float, float)
        Level-0 pixels per mask pixel, one number or ``(x, y)``.
    min_area_px : int, optional
        Pieces with fewer mask pixels are skipped.
    simplify_px : float, optional
        Douglas-Peucker tolerance in mask pixels (topology preserved); 0 disables.
    name_prefix, source, classification, color : optional
        Fields given to every region.

    Returns
    -------
    list of Region
        Possibly empty.
    """
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D, got shape {mask.shape}")
    dx, dy = _as_xy(downsample)
    labels, n = ndi.label(mask, structure=np.ones((3, 3), bool))
    if n == 0:
        return []
    slices = ndi.find_objects(labels)
    order = sorted(range(n), key=lambda i: (slices[i][0].start, slices[i][1].start))
    tolerance = simplify_px * min(dx, dy)
    regions: list[Region] = []
    for i in order:
        sl = slices[i]
        comp = labels[sl] == i + 1
        if comp.sum() < max(min_area_px, 1):
            continue
        geom = _component_polygon(comp, sl[0].start, sl[1].start, dx, dy, tolerance)
        if geom is None:
            continue
        rid = len(regions) + 1
        regions.append(
            Region(
                id=rid,
                name=f"{name_prefix} {rid}",
                geometry=geom,
                source=source,
                classification=classification,
                color=color,
            )
        )
    return regions


def detect_tissue(
    thumb: np.ndarray,
    downsample: float | Sequence[float],
    *,
    min_region_um2: float | None = None,
    mpp: float | None = None,
    **mask_options: Any,
) -> list[Region]:
    """Tissue regions of a thumbnail, in level-0 pixel coordinates.

    Parameters
    ----------
    thumb : numpy.ndarray
        HxWx3 RGB thumbnail.
    downsample : float or (float, float)
        Level-0 pixels per thumbnail pixel (one number, or ``(x, y)``).
    min_region_um2 : float or None, optional
        Smallest tissue piece kept, in µm²; needs ``mpp``. None keeps the
        :func:`tissue_mask` default (in thumbnail pixels).
    mpp : float or None, optional
        Level-0 microns per pixel.
    **mask_options
        Passed to :func:`tissue_mask`.

    Returns
    -------
    list of Region
        Regions with ids 1..N ordered by the (top, left) corner of their bounding box.

    Raises
    ------
    NoTissueError
        If no tissue is found.
    ValueError
        If ``min_region_um2`` is given without ``mpp``.
    """
    mask_options = dict(mask_options)
    mask_options.setdefault("min_area_px", _min_area_px(min_region_um2, mpp, downsample))
    mask = tissue_mask(thumb, **mask_options)
    regions = regions_from_mask(mask, downsample)
    if not regions:
        raise NoTissueError(_no_tissue_message(mask.shape))
    return regions


def _min_area_px(
    min_region_um2: float | None, mpp: float | None, downsample: float | Sequence[float]
) -> int:
    """Minimal piece area in thumbnail pixels (the tissue_mask default when not given)."""
    if min_region_um2 is None:
        return _DEFAULT_MIN_AREA_PX
    if mpp is None or not mpp > 0:
        raise ValueError("min_region_um2 needs the slide's mpp (microns per pixel)")
    dx, dy = _as_xy(downsample)
    px_um2 = (mpp * dx) * (mpp * dy)
    return max(1, int(math.ceil(min_region_um2 / px_um2)))


def _no_tissue_message(shape: tuple[int, ...]) -> str:
    return (
        f"no tissue found on the {shape[1]}x{shape[0]} px thumbnail "
        "(blank glass or unstained slide?); give --regions to process an area anyway"
    )


# --------------------------------------------------------------------------------------------
# Whole slide
# --------------------------------------------------------------------------------------------
class _ThumbnailSource(Protocol):
    @property
    def dimensions(self) -> tuple[int, int]: ...

    def get_thumbnail(self, max_size: Any) -> Any: ...


@dataclass(frozen=True, eq=False)
class TissueMap:
    """Tissue mask of a slide at thumbnail resolution, with the regions found on it.

    Attributes
    ----------
    mask : numpy.ndarray
        HxW boolean tissue mask.
    downsample : float
        Level-0 pixels per mask pixel (geometric mean of ``downsample_xy``).
    regions : tuple of Region
        Tissue pieces (ids 1..N).
    downsample_xy : tuple of float
        Level-0 pixels per mask pixel along x and y (they differ slightly when the thumbnail
        size was rounded).
    """

    mask: np.ndarray
    downsample: float
    regions: tuple[Region, ...]
    downsample_xy: tuple[float, float] = (0.0, 0.0)
    _integral: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        mask = np.asarray(self.mask, dtype=bool)
        if mask.ndim != 2:
            raise ValueError(f"mask must be 2-D, got shape {mask.shape}")
        dxy = self.downsample_xy
        if not (dxy[0] > 0 and dxy[1] > 0):
            dxy = _as_xy(self.downsample)
        object.__setattr__(self, "mask", mask)
        object.__setattr__(self, "downsample_xy", (float(dxy[0]), float(dxy[1])))
        object.__setattr__(self, "regions", tuple(self.regions))
        integral = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1), dtype=np.float64)
        integral[1:, 1:] = mask.cumsum(axis=0, dtype=np.int64).cumsum(axis=1)
        object.__setattr__(self, "_integral", integral)

    @property
    def tissue_fraction(self) -> float:
        """Fraction of the whole slide covered by tissue."""
        return float(self.mask.mean()) if self.mask.size else 0.0

    def _cumulative(self, u: np.ndarray, v: np.ndarray) -> np.ndarray:
        """Tissue area (mask px²) in ``[0, u) x [0, v)`` for real mask coordinates u, v.

        The integral of a piecewise-constant mask is bilinear within each pixel cell, so
        interpolating the summed-area table bilinearly is exact.
        """
        h, w = self.mask.shape
        u = np.clip(u, 0.0, w)
        v = np.clip(v, 0.0, h)
        i = np.minimum(np.floor(u).astype(np.intp), max(w - 1, 0))
        j = np.minimum(np.floor(v).astype(np.intp), max(h - 1, 0))
        a = u - i
        b = v - j
        s = self._integral
        return (
            s[j, i] * (1 - a) * (1 - b)
            + s[j, i + 1] * a * (1 - b)
            + s[j + 1, i] * (1 - a) * b
            + s[j + 1, i + 1] * a * b
        )

    def fraction_in_box(
        self,
        x0: float | np.ndarray,
        y0: float | np.ndarray,
        x1: float | np.ndarray,
        y1: float | np.ndarray,
    ) -> float | np.ndarray:
        """Fraction of a level-0 box ``[x0, x1) x [y0, y1)`` covered by tissue.

        Partial mask pixels count by their covered area; parts of the box outside the slide
        count as non-tissue. Accepts scalars or arrays of boxes (broadcast), O(1) per box.

        Parameters
        ----------
        x0, y0, x1, y1 : float or numpy.ndarray
            Box corners in level-0 pixels.

        Returns
        -------
        float or numpy.ndarray
            Values in [0, 1]; 0 for an empty box.
        """
        scalar = all(np.ndim(v) == 0 for v in (x0, y0, x1, y1))
        bx0, by0, bx1, by1 = np.broadcast_arrays(
            *(np.asarray(v, dtype=np.float64) for v in (x0, y0, x1, y1))
        )
        dx, dy = self.downsample_xy
        if self.mask.size == 0:
            out = np.zeros(bx0.shape)
        else:
            u0, u1 = bx0 / dx, bx1 / dx
            v0, v1 = by0 / dy, by1 / dy
            area = (
                self._cumulative(u1, v1)
                - self._cumulative(u0, v1)
                - self._cumulative(u1, v0)
                + self._cumulative(u0, v0)
            )
            box = (u1 - u0) * (v1 - v0)
            with np.errstate(invalid="ignore", divide="ignore"):
                out = np.where(box > 0, area / np.where(box > 0, box, 1.0), 0.0)
            out = np.clip(out, 0.0, 1.0)
        return float(out) if scalar else out


def _read_thumbnail(slide: _ThumbnailSource, size: tuple[int, int]) -> np.ndarray:
    """Call ``slide.get_thumbnail`` with a (w, h) box, or the longest side if it wants an int."""
    try:
        thumb = slide.get_thumbnail(size)
    except TypeError:
        thumb = slide.get_thumbnail(max(size))
    if hasattr(thumb, "convert"):  # a PIL image (e.g. an openslide object)
        thumb = thumb.convert("RGB")
    return _as_rgb_uint8(np.asarray(thumb))


def detect_tissue_on_slide(
    slide: _ThumbnailSource,
    *,
    target_mpp: float = 8.0,
    mpp: float | None = None,
    max_thumbnail_px: int = 4096,
    fallback_thumbnail_px: int = 2048,
    min_region_um2: float | None = None,
    allow_empty: bool = False,
    **mask_options: Any,
) -> TissueMap:
    """Detect tissue on a slide's thumbnail.

    Parameters
    ----------
    slide : object
        Anything with ``dimensions`` (level-0 width, height) and ``get_thumbnail(size)``
        returning an RGB array or PIL image; ``mpp`` is read from it when present.
    target_mpp : float, optional
        Wanted thumbnail resolution in µm per pixel (never finer than level 0).
    mpp : float or None, optional
        Level-0 µm per pixel; overrides ``slide.mpp``. Without any mpp the thumbnail's
        longest side is ``fallback_thumbnail_px``.
    max_thumbnail_px : int, optional
        Upper bound on the thumbnail's longest side (bounds memory on huge slides).
    fallback_thumbnail_px : int, optional
        Longest side of the thumbnail when the mpp is unknown.
    min_region_um2 : float or None, optional
        Smallest tissue piece kept (µm²); ignored when the mpp is unknown.
    allow_empty : bool, optional
        Return an empty map instead of raising when no tissue is found.
    **mask_options
        Passed to :func:`tissue_mask`.

    Returns
    -------
    TissueMap

    Raises
    ------
    NoTissueError
        If no tissue is found and ``allow_empty`` is False.
    """
    width, height = (int(v) for v in slide.dimensions)
    if mpp is None:
        mpp = getattr(slide, "mpp", None)
    longest = max(width, height, 1)
    if mpp is not None and mpp > 0:
        ds = max(1.0, target_mpp / float(mpp))
    else:
        mpp = None
        ds = max(1.0, longest / fallback_thumbnail_px)
    ds = max(ds, longest / max_thumbnail_px)
    size = (max(1, round(width / ds)), max(1, round(height / ds)))
    thumb = _read_thumbnail(slide, size)
    dxy = (width / thumb.shape[1], height / thumb.shape[0])

    mask_options = dict(mask_options)
    if min_region_um2 is not None and mpp is not None:
        mask_options.setdefault("min_area_px", _min_area_px(min_region_um2, mpp, dxy))
    mask = tissue_mask(thumb, **mask_options)
    regions = regions_from_mask(mask, dxy)
    if not regions and not allow_empty:
        raise NoTissueError(_no_tissue_message(mask.shape))
    return TissueMap(
        mask=mask,
        downsample=math.sqrt(dxy[0] * dxy[1]),
        regions=tuple(regions),
        downsample_xy=dxy,
    )

"""Regions of interest: the :class:`Region` type, QuPath GeoJSON reading, point assignment.

A region is an area in level-0 pixel coordinates (x right, y down, QuPath's frame): a tissue
piece found by :mod:`wsi_nuclei.tissue` or an annotation a user drew and exported from QuPath.
This module reads the annotations (:func:`load_regions`, :func:`regions_from_geojson`), tells
which region holds which point (:func:`assign_regions`, :func:`region_membership`), finds
overlapping regions and rasterizes regions onto a thumbnail grid. It knows nothing of tissue
detection; :mod:`wsi_nuclei.tissue` builds on it (the dependency is one-way).
"""

from __future__ import annotations

import gzip
import json
import logging
import math
import os
import warnings
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import shapely
import shapely.affinity
from shapely.geometry import MultiPolygon, Polygon
from skimage.draw import polygon as _draw_polygon

from .errors import RegionsFileError, first_line

__all__ = [
    "Region",
    "Membership",
    "load_regions",
    "regions_from_geojson",
    "assign_regions",
    "region_membership",
    "overlapping_regions",
    "rasterize_regions",
]

log = logging.getLogger(__name__)

# QuPath object types that are not regions a user drew.
_NON_REGION_TYPES = frozenset({"detection", "cell", "tile"})
_AREA_TYPES = frozenset({"Polygon", "MultiPolygon"})
_NON_AREA_TYPES = frozenset({"Point", "MultiPoint", "LineString", "MultiLineString"})


# --------------------------------------------------------------------------------------------
# Region
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Region:
    """One region of interest: a tissue piece found on the thumbnail or a user annotation.

    Attributes
    ----------
    id : int
        1-based identifier, unique within one list of regions.
    name : str
        Display name ("Tissue 1", the annotation's name, ...).
    geometry : shapely.Polygon or shapely.MultiPolygon
        Valid, non-empty area geometry in level-0 pixel coordinates.
    source : str
        ``"tissue"`` (automatic detection) or ``"user"`` (read from a regions file).
    classification : str or None
        Class name (QuPath ``classification.name``), if any.
    color : tuple of int or None
        RGB colour of the class, if any.
    annotation_id : str or None
        The annotation's own id (QuPath's UUID, the Feature's ``id``) for user regions.
    properties : str or None
        For user regions: the input Feature's ``properties`` as JSON text (``name``,
        ``classification``, ``isLocked``, ``color``, ``metadata``, ``measurements`` and any
        other member, without ``childObjects``/``children``), so that the region annotations
        written back (:func:`wsi_nuclei.export.write_regions_geojson`) carry them unchanged.
        Text rather than a dict keeps the region immutable and hashable.
    """

    id: int
    name: str
    geometry: Polygon | MultiPolygon
    source: str
    classification: str | None = None
    color: tuple[int, int, int] | None = None
    annotation_id: str | None = None
    properties: str | None = None

    @property
    def area_px(self) -> float:
        """Area in level-0 pixels squared."""
        return float(self.geometry.area)

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        """Bounding box ``(xmin, ymin, xmax, ymax)`` in level-0 pixels."""
        return tuple(float(v) for v in self.geometry.bounds)  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------
# Geometry helpers (also used by wsi_nuclei.tissue)
# --------------------------------------------------------------------------------------------
def _as_xy(downsample: float | Sequence[float]) -> tuple[float, float]:
    """Normalise a downsample given as one number or an ``(x, y)`` pair."""
    if np.ndim(downsample) == 0:
        dx = dy = float(downsample)  # type: ignore[arg-type]
    else:
        dx, dy = (float(v) for v in downsample)  # type: ignore[union-attr]
    if not (dx > 0 and dy > 0 and math.isfinite(dx) and math.isfinite(dy)):
        raise ValueError(f"downsample must be positive and finite, got {downsample!r}")
    return dx, dy


def _polygonal_part(geom: shapely.Geometry) -> Polygon | MultiPolygon | None:
    """The area part of ``geom`` (made valid) as a Polygon/MultiPolygon, or None if empty."""
    if geom is None or geom.is_empty:
        return None
    if not geom.is_valid:
        geom = shapely.make_valid(geom)
    if isinstance(geom, (Polygon, MultiPolygon)):
        return None if geom.is_empty or geom.area <= 0 else geom
    polys: list[Polygon] = []
    for part in getattr(geom, "geoms", []):
        if isinstance(part, Polygon):
            polys.append(part)
        elif isinstance(part, MultiPolygon):
            polys.extend(part.geoms)
    polys = [p for p in polys if not p.is_empty and p.area > 0]
    if not polys:
        return None
    out = polys[0] if len(polys) == 1 else MultiPolygon(polys)
    return out if out.is_valid else _polygonal_part(shapely.make_valid(out))


# --------------------------------------------------------------------------------------------
# Regions -> mask
# --------------------------------------------------------------------------------------------
def rasterize_regions(
    regions: Iterable[Region], shape: tuple[int, int], downsample: float | Sequence[float]
) -> np.ndarray:
    """Boolean mask (``shape`` = H, W) of the pixels whose centre lies inside any region.

    Useful to build a :class:`wsi_nuclei.tissue.TissueMap` restricted to user regions, e.g.
    ``TissueMap(tmap.mask & rasterize_regions(user, tmap.mask.shape, tmap.downsample_xy), ...)``.

    Parameters
    ----------
    regions : iterable of Region
        Regions in level-0 pixel coordinates.
    shape : (int, int)
        Mask height and width.
    downsample : float or (float, float)
        Level-0 pixels per mask pixel.

    Returns
    -------
    numpy.ndarray
        HxW boolean mask.
    """
    dx, dy = _as_xy(downsample)
    out = np.zeros(shape, dtype=bool)
    for region in regions:
        geom = region.geometry
        polys = geom.geoms if isinstance(geom, MultiPolygon) else [geom]
        for poly in polys:
            part = np.zeros(shape, dtype=bool)
            rings = [poly.exterior, *poly.interiors]
            for k, ring in enumerate(rings):
                xy = np.asarray(ring.coords)
                # pixel centre (c + 0.5) * dx is inside <=> c inside at (x / dx - 0.5)
                rr, cc = _draw_polygon(xy[:, 1] / dy - 0.5, xy[:, 0] / dx - 0.5, shape=shape)
                part[rr, cc] = k == 0
            out |= part
    return out


# --------------------------------------------------------------------------------------------
# User regions (QuPath GeoJSON)
# --------------------------------------------------------------------------------------------
def _read_json_file(path: Path) -> Any:
    """Parse a (possibly gzip-compressed) JSON file, raising RegionsFileError on failure."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise RegionsFileError(f"regions file {path}: file not found") from None
    except OSError as exc:
        raise RegionsFileError(
            f"regions file {path}: cannot read ({exc.strerror or first_line(exc)})"
        ) from None
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:
            raise RegionsFileError(
                f"regions file {path}: corrupt gzip data ({first_line(exc)})"
            ) from None
    elif path.suffix.lower() == ".gz":
        raise RegionsFileError(f"regions file {path}: named .gz but not gzip-compressed")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise RegionsFileError(
            f"regions file {path}: not UTF-8 text (not a GeoJSON file)"
        ) from None
    if not text.strip():
        raise RegionsFileError(f"regions file {path}: file is empty")
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise RegionsFileError(
            f"regions file {path}: not valid JSON ({exc.msg} at line {exc.lineno}, "
            f"column {exc.colno})"
        ) from None


def _parse_color(value: Any) -> tuple[int, int, int] | None:
    """RGB from ``[r, g, b(, a)]`` or a packed (possibly negative, ARGB) integer; else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        v = value & 0xFFFFFF
        return ((v >> 16) & 255, (v >> 8) & 255, v & 255)
    if isinstance(value, (list, tuple)) and len(value) in (3, 4):
        try:
            rgb = [int(round(float(c))) for c in value[:3]]
        except (TypeError, ValueError):
            return None
        return tuple(min(max(c, 0), 255) for c in rgb)  # type: ignore[return-value]
    return None


def _parse_classification(value: Any) -> tuple[str | None, tuple[int, int, int] | None]:
    """Class name and colour from a QuPath ``classification`` (object or string)."""
    if isinstance(value, str):
        return (value.strip() or None), None
    if isinstance(value, dict):
        name = value.get("name")
        if not isinstance(name, str) or not name.strip():
            names = value.get("names")
            name = ": ".join(str(n) for n in names) if isinstance(names, list) and names else None
        color = _parse_color(value.get("color", value.get("colorRGB")))
        return (name.strip() if isinstance(name, str) and name.strip() else None), color
    return None, None


def _features_of(doc: Any, label: str) -> list[Any]:
    """The list of features in a GeoJSON document (collection, feature, array or geometry)."""
    if isinstance(doc, list):
        return doc
    if isinstance(doc, dict):
        kind = doc.get("type")
        if kind == "FeatureCollection":
            feats = doc.get("features")
            if not isinstance(feats, list):
                raise RegionsFileError(f"{label}: FeatureCollection without a 'features' array")
            return feats
        if kind == "Feature":
            return [doc]
        if kind in _AREA_TYPES or kind in _NON_AREA_TYPES or kind == "GeometryCollection":
            return [{"type": "Feature", "geometry": doc, "properties": {}}]
        if "features" in doc and isinstance(doc["features"], list):
            return doc["features"]
    raise RegionsFileError(
        f"{label}: not GeoJSON (expected a FeatureCollection, a Feature or an array of Features)"
    )


def _finite_coords(obj: Any) -> bool:
    """True when every number in a nested coordinate array is finite."""
    arr = np.asarray(shapely.get_coordinates(obj))
    return bool(np.isfinite(arr).all())


def _feature_geometry(geom_dict: Any, where: str) -> Polygon | MultiPolygon | None | str:
    """Valid area geometry of a feature, the string "non-area", or raise RegionsFileError."""
    if geom_dict is None:
        return "non-area"
    if not isinstance(geom_dict, dict) or not isinstance(geom_dict.get("type"), str):
        raise RegionsFileError(f"{where}: 'geometry' is not a GeoJSON geometry object")
    kind = geom_dict["type"]
    if kind in _NON_AREA_TYPES:
        return "non-area"
    if kind not in _AREA_TYPES and kind != "GeometryCollection":
        raise RegionsFileError(f"{where}: unknown geometry type {kind!r}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # NaN coordinates: reported below
            geom = shapely.geometry.shape(geom_dict)
    except Exception as exc:  # shapely raises several types on malformed coordinates
        raise RegionsFileError(
            f"{where}: malformed {kind} coordinates ({first_line(exc)})"
        ) from None
    if geom.is_empty:
        raise RegionsFileError(f"{where}: empty {kind}")
    if not _finite_coords(geom):
        raise RegionsFileError(f"{where}: {kind} has non-finite coordinates")
    if kind == "GeometryCollection":
        if not any(isinstance(g, (Polygon, MultiPolygon)) for g in geom.geoms):
            return "non-area"
    repaired = _polygonal_part(geom)
    if repaired is None:
        reason = shapely.is_valid_reason(geom) if not geom.is_valid else "zero area"
        raise RegionsFileError(f"{where}: invalid {kind} that cannot be repaired ({reason})")
    return repaired


#: Input properties not kept with a user region: nested objects (a QuPath export "with
#: children" holds the detections of an earlier analysis there; they are not regions).
_DROPPED_PROPERTIES = frozenset({"childObjects", "children"})


def _kept_properties(props: dict[str, Any]) -> str | None:
    """JSON text of a feature's properties without nested objects (None when nothing is left).

    Values that are not JSON (NaN, which Python's reader accepts) are kept as they are here;
    the writer decides what it can write back (see :func:`wsi_nuclei.export.write_regions_geojson`).
    """
    kept = {k: v for k, v in props.items() if k not in _DROPPED_PROPERTIES}
    return json.dumps(kept, ensure_ascii=True) if kept else None


def regions_from_geojson(
    doc: Any, *, label: str = "regions", offset: tuple[float, float] = (0.0, 0.0)
) -> list[Region]:
    """User regions from a parsed QuPath GeoJSON document.

    See :func:`load_regions` for the rules; ``label`` names the source in error messages.
    """
    features = _features_of(doc, label)
    regions: list[Region] = []
    skipped_objects = 0
    skipped_non_area = 0
    dx, dy = (float(v) for v in offset)
    for index, feat in enumerate(features):
        where = f"{label}: feature {index + 1}"
        if not isinstance(feat, dict) or ("geometry" not in feat and feat.get("type") != "Feature"):
            raise RegionsFileError(f"{where} is not a GeoJSON Feature")
        props = feat.get("properties") or {}
        if not isinstance(props, dict):
            raise RegionsFileError(f"{where}: 'properties' is not an object")
        object_type = props.get("objectType", props.get("object_type", "annotation"))
        if isinstance(object_type, str) and object_type.lower() in _NON_REGION_TYPES:
            skipped_objects += 1
            continue
        geom = _feature_geometry(feat.get("geometry"), where)
        if isinstance(geom, str):
            skipped_non_area += 1
            continue
        if dx or dy:
            geom = shapely.affinity.translate(geom, xoff=dx, yoff=dy)
        cls_name, color = _parse_classification(props.get("classification"))
        if color is None:
            color = _parse_color(props.get("color"))
        rid = len(regions) + 1
        name = props.get("name")
        if not isinstance(name, str) or not name.strip():
            name = cls_name or f"Region {rid}"
        regions.append(
            Region(
                id=rid,
                name=name.strip(),
                geometry=geom,
                source="user",
                classification=cls_name,
                color=color,
                annotation_id=str(feat["id"])
                if isinstance(feat.get("id"), (str, int)) and not isinstance(feat.get("id"), bool)
                else None,
                properties=_kept_properties(props),
            )
        )
    if not regions:
        if not features:
            raise RegionsFileError(f"{label}: no features (nothing to process)")
        raise RegionsFileError(
            f"{label}: no polygon annotations among {len(features)} feature(s) "
            f"({skipped_objects} detection/cell/tile, {skipped_non_area} without an area)"
        )
    if skipped_objects or skipped_non_area:
        log.warning(
            "%s: ignored %d detection/cell/tile object(s) and %d feature(s) without an area "
            "(points, lines)",
            label,
            skipped_objects,
            skipped_non_area,
        )
    return regions


def load_regions(
    path: str | os.PathLike[str], *, offset: tuple[float, float] = (0.0, 0.0)
) -> list[Region]:
    """Read user regions from a QuPath GeoJSON export.

    Accepts a FeatureCollection, a bare JSON array of Features, a single Feature or a bare
    geometry, as ``.geojson``/``.json`` or gzip-compressed (``.geojson.gz``). Polygon and
    MultiPolygon annotations (``properties.objectType`` "annotation" or absent) are kept;
    detections, cells, tiles and point/line features are ignored (their count is logged as
    a warning). Invalid polygons are repaired with :func:`shapely.make_valid` when possible.

    Parameters
    ----------
    path : str or os.PathLike
        The regions file.
    offset : (float, float), optional
        ``(dx, dy)`` added to every coordinate, e.g. to move regions drawn in QuPath's frame
        into another one.

    Returns
    -------
    list of Region
        ``source="user"``, ids 1..N in file order; name from ``properties.name``, else the
        class name, else ``"Region <id>"``; classification and colour from
        ``properties.classification`` (object or string); the feature's ``id`` as
        ``annotation_id`` and its other properties (``isLocked``, ``color``, ``metadata``, ...)
        as ``properties``, so that they are written back unchanged.

    Raises
    ------
    RegionsFileError
        If the file is missing, not JSON, not GeoJSON, holds a polygon that cannot be
        repaired, or has no polygon annotation.
    """
    p = Path(path)
    doc = _read_json_file(p)
    return regions_from_geojson(doc, label=f"regions file {p}", offset=offset)


# --------------------------------------------------------------------------------------------
# Assigning points to regions
# --------------------------------------------------------------------------------------------
def assign_regions(
    x: np.ndarray | Sequence[float], y: np.ndarray | Sequence[float], regions: Sequence[Region]
) -> np.ndarray:
    """Id of the region containing each point, -1 for points outside every region.

    A point on a region's boundary counts as inside. Where regions overlap, the first one in
    ``regions`` wins.

    Parameters
    ----------
    x, y : array_like
        Level-0 pixel coordinates (same shape).
    regions : sequence of Region

    Returns
    -------
    numpy.ndarray
        int32 array of ``x``'s shape.
    """
    xs = np.asarray(x, dtype=np.float64)
    ys = np.asarray(y, dtype=np.float64)
    if xs.shape != ys.shape:
        raise ValueError(f"x and y differ in shape: {xs.shape} vs {ys.shape}")
    out = np.full(xs.shape, -1, dtype=np.int32)
    if xs.size == 0 or not regions:
        return out
    fx, fy, fout = xs.ravel(), ys.ravel(), out.ravel()
    for region in regions:
        free = np.flatnonzero(fout == -1)
        if free.size == 0:
            break
        xmin, ymin, xmax, ymax = region.geometry.bounds
        px, py = fx[free], fy[free]
        near = (px >= xmin) & (px <= xmax) & (py >= ymin) & (py <= ymax)
        cand = free[near]
        if cand.size == 0:
            continue
        geom = region.geometry
        shapely.prepare(geom)
        inside = shapely.intersects_xy(geom, fx[cand], fy[cand])
        fout[cand[inside]] = region.id
    return fout.reshape(xs.shape)


@dataclass(frozen=True)
class Membership:
    """Which regions contain which points (see :func:`region_membership`).

    Attributes
    ----------
    rows, region_ids : numpy.ndarray
        One entry per (point, region) pair: the point's index and the region's id. A point in
        nested or overlapping regions appears once per region.
    primary : numpy.ndarray
        Per point: the id of the smallest region containing it (or of the nearest within the
        tolerance), -1 when none.
    n_tolerated : int
        Points outside every region but within the tolerance of one (given to the nearest).
    """

    rows: np.ndarray
    region_ids: np.ndarray
    primary: np.ndarray
    n_tolerated: int


def region_membership(
    x: np.ndarray | Sequence[float],
    y: np.ndarray | Sequence[float],
    regions: Sequence[Region],
    *,
    tolerance: float = 0.0,
) -> Membership:
    """Every region that contains each point (QuPath's rule: a nucleus belongs to every
    annotation that contains its centroid, so nested annotations all count it).

    Parameters
    ----------
    x, y : array_like
        Level-0 pixel coordinates.
    regions : sequence of Region
    tolerance : float
        A point outside every region but within this distance (level-0 px) of one belongs to
        the nearest: tissue outlines come from a coarse thumbnail, and a nucleus at the edge of
        the tissue must not be lost to that resolution.
    """
    xs = np.asarray(x, np.float64).ravel()
    ys = np.asarray(y, np.float64).ravel()
    n = len(xs)
    primary = np.full(n, -1, np.int32)
    if n == 0 or not regions:
        z = np.zeros(0, np.int64)
        return Membership(z, z.astype(np.int32), primary, 0)
    geoms = [r.geometry for r in regions]
    ids = np.array([r.id for r in regions], np.int32)
    areas = np.array([g.area for g in geoms])
    tree = shapely.STRtree(geoms)
    pts = shapely.points(xs, ys)
    pi, gi = tree.query(pts, predicate="intersects")
    order = np.lexsort((gi, pi))
    pi, gi = pi[order], gi[order]
    # the smallest containing region per point
    best = np.full(n, -1, np.int64)
    if len(pi):
        o2 = np.lexsort((areas[gi], pi))
        first = np.r_[True, pi[o2][1:] != pi[o2][:-1]]
        best[pi[o2][first]] = gi[o2][first]
    n_tol = 0
    if tolerance > 0:
        free = np.nonzero(best < 0)[0]
        if len(free):
            qi, qg = tree.query_nearest(pts[free], max_distance=float(tolerance), all_matches=False)
            best[free[qi]] = qg
            pi = np.r_[pi, free[qi]]
            gi = np.r_[gi, qg]
            n_tol = len(qi)
            order = np.lexsort((gi, pi))
            pi, gi = pi[order], gi[order]
    primary[best >= 0] = ids[best[best >= 0]]
    return Membership(pi.astype(np.int64), ids[gi], primary, int(n_tol))


def overlapping_regions(regions: Sequence[Region]) -> list[tuple[int, int]]:
    """Pairs of region ids whose areas overlap (more than a boundary)."""
    if len(regions) < 2:
        return []
    geoms = [r.geometry for r in regions]
    a, b = shapely.STRtree(geoms).query(geoms, predicate="intersects")
    out = []
    for i, j in zip(a.tolist(), b.tolist()):
        if i < j and shapely.area(shapely.intersection(geoms[i], geoms[j])) > 0:
            out.append((regions[i].id, regions[j].id))
    return out

"""Regions as QuPath annotations: their ids, classes, properties and measurements, how they
nest, and the region GeoJSON (``tissue.geojson``).

A region is anything with ``id``, ``name``, ``geometry`` and ``source`` (detected tissue, user
annotations, the whole slide; see ``wsi_nuclei.regions``).
"""

from __future__ import annotations

import hashlib
import json
import math
import uuid
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Final, Protocol

import numpy as np
import shapely
from shapely.geometry import MultiPolygon, Polygon
from shapely.geometry.base import BaseGeometry

from wsi_nuclei.export._format import _dumps, _polygon_coordinates
from wsi_nuclei.export._geometry import (
    _GRID,
    _UUID_RE,
    _is_good,
    _largest_polygon,
    _round_coords,
    clean_polygon,
)
from wsi_nuclei.export._sink import _atomic_sink, _geojson_path
from wsi_nuclei.export.validate import _NAN_STRINGS, _check_classification, _is_number
from wsi_nuclei.summary import region_measurements

__all__ = ["region_annotation_ids", "region_parents", "write_regions_geojson"]

#: Namespace of the region annotation UUIDs written by :func:`write_regions_geojson`.
_REGION_NAMESPACE: Final[uuid.UUID] = uuid.uuid5(uuid.NAMESPACE_URL, "wsi-nuclei/region")

#: Class of a region that carries none (the whole-slide region, a user region without a
#: class), and its colour (QuPath-like light grey). Detected tissue regions carry their own
#: class and colour (``wsi_nuclei.tissue.TISSUE_CLASS``/``TISSUE_COLOR``), which are written.
_TISSUE_CLASS: Final[str] = "Tissue"
_TISSUE_COLOR: Final[tuple[int, int, int]] = (200, 200, 200)


class _RegionLike(Protocol):
    """What the region writers and summaries need from a region (see ``wsi_nuclei.regions``)."""

    id: Any
    name: str
    geometry: BaseGeometry
    source: str


def _region_classification(region: Any) -> dict[str, Any]:
    """QuPath classification of a region: its own class (user regions) or ``Tissue``."""
    cls = getattr(region, "classification", None)
    if cls is None:
        cls = getattr(region, "class_name", None)
    name: str | None = None
    color: Sequence[int] | None = None
    if isinstance(cls, Mapping):
        name = cls.get("name")
        color = cls.get("color")
    elif isinstance(cls, str) and cls:
        name = cls
    if color is None:
        color = getattr(region, "color", None)
    if not name:
        name = _TISSUE_CLASS
    name = str(name).replace(":", "-")  # ':' would split it into derived classes in QuPath
    if color is None or len(color) not in (3, 4):
        if name == _TISSUE_CLASS:
            color = _TISSUE_COLOR
        else:  # a stable colour derived from the name
            digest = uuid.uuid5(_REGION_NAMESPACE, name).bytes
            color = (digest[0], digest[1], digest[2])
    return {"name": name, "color": [min(255, max(0, int(c))) for c in color]}


def _geometry_json(geom: BaseGeometry) -> dict[str, Any] | None:
    """GeoJSON geometry of a region, rounded and valid on the 0.01 grid; None when degenerate."""
    parts = list(geom.geoms) if isinstance(geom, MultiPolygon) else [geom]
    polys = []
    for part in parts:
        if isinstance(part, Polygon):
            cleaned = clean_polygon(part)
        else:
            cleaned = _largest_polygon(part)
            cleaned = clean_polygon(cleaned) if cleaned is not None else None
        if cleaned is not None:
            polys.append(cleaned)
    if not polys:
        return None
    if len(polys) > 1:
        multi = MultiPolygon(polys)
        if not multi.is_valid:  # parts touching after rounding: merge them on the grid
            merged = shapely.set_precision(shapely.union_all(polys), _GRID)
            merged = shapely.transform(merged, _round_coords)
            pieces = [p for p in getattr(merged, "geoms", [merged]) if _is_good(p)]
            if not pieces:
                return None
            polys = pieces
    coords = _polygon_coordinates(np.array(polys, dtype=object))
    if len(coords) == 1:
        return {"type": "Polygon", "coordinates": coords[0]}
    return {"type": "MultiPolygon", "coordinates": coords}


def _summaries_by_region(summaries: Any) -> dict[str, Mapping[str, Any]]:
    """Map ``str(region id)`` -> region summary, from a :meth:`RegionSummarizer.finalize`
    result, a list of region summaries, or a mapping id -> summary."""
    if summaries is None:
        return {}
    if isinstance(summaries, Mapping) and "regions" in summaries:
        summaries = summaries["regions"]
    if isinstance(summaries, Mapping):
        return {str(k): v for k, v in summaries.items()}
    return {str(s["region_id"]): s for s in summaries}


def _finite_number(value: Any) -> float | int | None:
    """``value`` as a JSON number, or None when it is missing, NaN or infinite."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, (int, np.integer)):
        return int(value)
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _region_measurements(summary: Mapping[str, Any] | None) -> dict[str, float | int]:
    """Flat QuPath measurements of one region summary (see :mod:`wsi_nuclei.summary`)."""
    if summary is None:
        return {}
    out: dict[str, float | int] = {}
    for name, value in region_measurements(summary).items():
        v = _finite_number(value)
        if v is not None:
            out[name] = round(v, 6) if isinstance(v, float) else v
    return out


def _is_uuid(value: Any) -> bool:
    """True for a UUID string as QuPath reads one (``UUID.fromString`` of the ``id``)."""
    return isinstance(value, str) and _UUID_RE.fullmatch(value) is not None


def region_annotation_ids(regions: Sequence[_RegionLike], slide_fingerprint: str) -> list[str]:
    """The UUID of each region's annotation, as written in ``tissue.geojson`` and
    ``qupath.geojson``.

    A user region keeps its annotation's own id (``annotation_id``, the input Feature's ``id``)
    when it is a UUID, so that the written annotation *is* the user's annotation for QuPath
    (same object: importing it next to the original is recognised, not duplicated); a region
    whose ``id`` itself is a UUID keeps that. Every other region gets a uuid5 of the slide
    fingerprint, the region's source (``tissue``, ``user``, ``slide``), its id and its rounded
    outline: detected tissue pieces of two slides, of two runs that found different outlines,
    and a tissue piece and a user region with the same number can never share an id, while a
    rerun of the same run gives the same ids. An id already taken by an earlier region of the
    list (e.g. an input file whose features share one id) is replaced by the derived one, so
    ids are unique within a run.

    Parameters
    ----------
    regions : sequence of region objects
        With ``id``, ``source`` and ``geometry``; ``annotation_id`` optional.
    slide_fingerprint : str
        The slide's content fingerprint.

    Returns
    -------
    list of str
        One UUID string per region, in order, all distinct (compared case-insensitively).
    """
    out: list[str] = []
    taken: set[str] = set()
    for region in regions:
        candidates = [getattr(region, "annotation_id", None), region.id]
        chosen = next((c for c in candidates if _is_uuid(c) and c.lower() not in taken), None)
        if chosen is None:
            geometry = _geometry_json(region.geometry)
            outline = hashlib.sha256(_dumps(geometry).encode("ascii")).hexdigest()[:32]
            source = str(getattr(region, "source", "") or "region")
            key = f"{slide_fingerprint}|{source}|{region.id}|{outline}"
            chosen = str(uuid.uuid5(_REGION_NAMESPACE, key))
            n = 1
            while chosen in taken:  # identical outlines and ids twice in one list
                chosen = str(uuid.uuid5(_REGION_NAMESPACE, f"{key}|{n}"))
                n += 1
        taken.add(chosen.lower())
        out.append(chosen)
    return out


#: Properties of an input annotation that the region writer sets itself (``objectType``, and
#: its aliases), merges (``measurements``, ``metadata``) or drops (nested objects).
_OWN_PROPERTIES: Final[frozenset[str]] = frozenset(
    {"objectType", "object_type", "type", "measurements", "metadata", "childObjects", "children"}
)


def _input_properties(region: Any) -> dict[str, Any] | None:
    """The input Feature's properties of a user region (``Region.properties``), or None."""
    text = getattr(region, "properties", None)
    if not isinstance(text, str) or not text:
        return None
    try:
        props = json.loads(text)
    except ValueError:
        return None
    return props if isinstance(props, dict) else None


def _strict(value: Any) -> bool:
    """True when ``value`` can be written as strict JSON."""
    try:
        _dumps(value)
    except (TypeError, ValueError):
        return False
    return True


def _readable_classification(cls: Any) -> bool:
    """True when QuPath reads ``cls`` as a classification and our validator accepts it.

    A string, or an object with ``name`` (a string) or ``names`` (a non-empty list of strings,
    QuPath's form for derived classes) and a ``color`` of 3 or 4 integers."""
    if not _strict(cls):
        return False
    problems: list[str] = []
    _check_classification(cls, "", problems)
    return not problems


def _qupath_color(value: Any) -> bool:
    """True for an object ``color`` QuPath reads: a packed integer or 3 integers."""
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return -(2**31) <= value < 2**32
    return (
        isinstance(value, list)
        and len(value) == 3
        and all(isinstance(c, int) and not isinstance(c, bool) for c in value)
    )


def _measurement_items(meas: Any) -> dict[str, Any]:
    """An input annotation's measurements as ``{name: value}`` (values QuPath reads only)."""
    if isinstance(meas, Mapping):
        items = list(meas.items())
    elif isinstance(meas, list):
        items = [(m.get("name"), m.get("value")) for m in meas if isinstance(m, Mapping)]
    else:
        return {}
    out: dict[str, Any] = {}
    for name, value in items:
        if not isinstance(name, str):
            continue
        if _is_number(value) and math.isfinite(float(value)):
            out[name] = value
        elif isinstance(value, str) and value in _NAN_STRINGS:
            out[name] = value
    return out


def _region_feature(
    region: Any, summary: Mapping[str, Any] | None, annotation_id: str
) -> dict[str, Any] | None:
    """The annotation Feature of one region (None when its geometry is degenerate).

    Regions without input properties (detected tissue, the whole slide) get a name, the
    ``Tissue`` class (or their own), our measurements and metadata. A user region gets the
    properties of its input annotation back unchanged (``name``, ``classification``,
    ``isLocked``, ``color`` and any other member QuPath or another tool reads; nested
    ``childObjects`` are not copied), with our measurements added to its own and our
    ``region_id``/``source`` added to its ``metadata``. Values QuPath could not read (a
    ``color`` that is not integers, a ``name`` that is not text, a classification without a
    colour, ...) or that are not strict JSON are replaced (``name``, ``classification``) or
    left out.
    """
    geometry = _geometry_json(region.geometry)
    if geometry is None:
        return None
    rid = region.id
    ours = {"region_id": str(rid), "source": str(region.source)}
    measurements = _region_measurements(summary)
    given = _input_properties(region)
    if given is None:
        props: dict[str, Any] = {
            "objectType": "annotation",
            "name": str(region.name),
            "classification": _region_classification(region),
            "measurements": measurements,
            "metadata": ours,
        }
    else:
        props = {"objectType": "annotation"}
        for key, value in given.items():
            if key in _OWN_PROPERTIES:
                continue
            if key == "name":
                value = value if isinstance(value, str) else str(region.name)
            elif key == "classification":
                if value is None:
                    continue
                if not _readable_classification(value):
                    value = _region_classification(region)
            elif key == "color":
                if not _qupath_color(value):
                    continue
            elif key in ("isLocked", "isMissing"):
                if not isinstance(value, bool):
                    continue
            elif not _strict(value):
                continue
            props[key] = value
        merged = _measurement_items(given.get("measurements"))
        merged.update(measurements)
        props["measurements"] = merged
        meta_in = given.get("metadata")
        meta = {}
        if isinstance(meta_in, Mapping):
            meta = {
                str(k): v
                for k, v in meta_in.items()
                if isinstance(v, (str, bool, int, float)) and _strict(v)
            }
        meta.update(ours)
        props["metadata"] = meta
    return {"type": "Feature", "id": annotation_id, "geometry": geometry, "properties": props}


def write_regions_geojson(
    regions: Iterable[_RegionLike],
    summaries: Any,
    path: str | Path,
    *,
    slide_fingerprint: str = "",
) -> dict[str, Any]:
    """Write regions as QuPath ``annotation`` Features carrying their summary as measurements.

    A detected tissue region becomes ``{"type": "Feature", "id": <uuid>, "geometry": ...,
    "properties": {"objectType": "annotation", "name": <region name>, "classification":
    {"name": "Tissue", "color": [r, g, b]}, "measurements": {...}, "metadata": {"region_id":
    ..., "source": ...}}}``. A user region (read with :func:`wsi_nuclei.regions.load_regions`)
    comes back as the user's annotation: same ``id`` (when it is a UUID), same ``name``,
    ``classification``, ``isLocked``, ``color`` and other properties, with our measurements
    and metadata added (see :func:`region_annotation_ids` for the ids). QuPath does *not* nest
    detections under these annotations on import; ``qupath.geojson``
    (:func:`write_qupath_geojson`) does.

    Parameters
    ----------
    regions : iterable of region objects
        Objects with ``id``, ``name``, ``geometry`` (shapely Polygon/MultiPolygon, level-0 px)
        and ``source``; an optional ``classification`` (str or ``{"name", "color"}``),
        ``class_name`` or ``color`` attribute gives a region's class, ``annotation_id`` and
        ``properties`` (JSON text) the input annotation's id and properties.
    summaries : dict, list or None
        The :meth:`wsi_nuclei.summary.RegionSummarizer.finalize` result (its ``"regions"`` are
        used), a list of region summaries, or a mapping region id -> region summary. Regions
        without a summary get no measurements.
    path : str or pathlib.Path
        Output ``.geojson`` (or ``.geojson.gz``, gzipped) file.
    slide_fingerprint : str, optional
        Mixed into the annotation UUIDs of regions that have none of their own.

    Returns
    -------
    dict
        ``{"path", "n_features", "n_dropped"}`` (dropped: degenerate region geometries).
    """
    final = Path(path)
    gzip = final.name.lower().endswith(".gz")
    final = _geojson_path(final, gzip)
    regions = list(regions)
    by_id = _summaries_by_region(summaries)
    ids = region_annotation_ids(regions, slide_fingerprint)
    lines = []
    n_dropped = 0
    for region, annotation_id in zip(regions, ids):
        feature = _region_feature(region, by_id.get(str(region.id)), annotation_id)
        if feature is None:
            n_dropped += 1
            continue
        lines.append(_dumps(feature))
    text = '{"type": "FeatureCollection", "features": [\n' + ",\n".join(lines) + "\n]}\n"
    with _atomic_sink(final, gzip, 6) as sink:
        sink.write(text.encode("ascii"))
    return {"path": str(final), "n_features": len(lines), "n_dropped": n_dropped}


#: Relative area of a region that may lie outside another one that still contains it (the
#: outlines are snapped to the 0.01-px grid, so an edge shared by both may differ by that).
_NEST_SLACK: Final[float] = 1e-6


def region_parents(regions: Sequence[_RegionLike]) -> list[int]:
    """The parent of each region in the annotation hierarchy: the smallest other region that
    contains it, as an index into ``regions`` (-1: none, a top-level annotation).

    Region B contains region A when A's outline (snapped to the 0.01-px grid as written) lies
    inside B's, up to :data:`_NEST_SLACK` of A's area. Regions that merely overlap are not
    nested. Of two identical outlines the first one in ``regions`` is the parent. The result
    is a forest (no cycles): a parent is always larger, or as large and earlier.

    Parameters
    ----------
    regions : sequence of region objects
        With a ``geometry`` (shapely Polygon/MultiPolygon).

    Returns
    -------
    list of int
    """
    n = len(regions)
    parents = [-1] * n
    if n < 2:
        return parents
    geoms = []
    for r in regions:
        g = _geometry_json(r.geometry)
        geoms.append(shapely.geometry.shape(g) if g is not None else shapely.Polygon())
    geoms_arr = np.array(geoms, dtype=object)
    areas = shapely.area(geoms_arr)
    # rank: larger first, then earlier first; a parent has a smaller rank than its child
    order = sorted(range(n), key=lambda i: (-areas[i], i))
    rank = np.empty(n, np.int64)
    rank[order] = np.arange(n)
    tree = shapely.STRtree(geoms_arr)
    inner, outer = tree.query(geoms_arr, predicate="intersects")
    best = np.full(n, -1, np.int64)
    for a, b in zip(inner.tolist(), outer.tolist()):
        if a == b or rank[b] > rank[a] or areas[a] <= 0:
            continue
        if not (
            geoms[b].covers(geoms[a])
            or geoms[a].difference(geoms[b]).area <= _NEST_SLACK * areas[a]
        ):
            continue
        if best[a] < 0 or rank[b] > rank[best[a]]:
            best[a] = b
    return [int(v) for v in best]

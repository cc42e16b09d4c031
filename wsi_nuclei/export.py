"""Writers for nucleus tables: QuPath GeoJSON, GeoParquet, region annotations, the QuPath
hierarchy (regions holding their nuclei as ``childObjects``), and a validator.

Every writer streams: ``frames`` is an iterable of nucleus tables (:data:`wsi_nuclei.schema.
NUCLEUS_COLUMNS`, one :class:`pandas.DataFrame` per batch) and only one batch is held in
memory at a time, so a slide with millions of nuclei is written in constant memory.

Geometries are cleaned before they are written (:func:`clean_polygon`): coordinates are rounded
to the 0.01-pixel grid QuPath snaps to on import, and the polygon is checked *after* rounding.
Invalid polygons are repaired (largest polygon piece kept), degenerate ones are dropped and
counted in the writer's statistics. The cleaning is deterministic, so the GeoJSON and GeoParquet
files of one run hold exactly the same nuclei; :func:`clean_frame` applies it to a table up front
so that summaries can count exactly the nuclei that will be written.

The rules QuPath applies on GeoJSON import are documented in ``docs/qupath-geojson.md`` (shared);
:func:`check_qupath_geojson` implements each of them.
"""

from __future__ import annotations

import contextlib
import gzip as _gzip
import hashlib
import io
import json
import math
import os
import re
import tempfile
import time
import uuid
import zipfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO, Final, Protocol

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import shapely
from shapely.errors import GEOSException
from shapely.geometry import MultiPolygon, Polygon
from shapely.geometry.base import BaseGeometry

from wsi_nuclei import schema
from wsi_nuclei._io import atomic_path
from wsi_nuclei.summary import region_measurements

__all__ = [
    "NUCLEUS_NAMESPACE",
    "MEASUREMENTS",
    "nucleus_uuid",
    "clean_polygon",
    "clean_frame",
    "write_nuclei_geojson",
    "write_nuclei_parquet",
    "write_regions_geojson",
    "write_qupath_geojson",
    "region_annotation_ids",
    "region_parents",
    "check_qupath_geojson",
]

#: Namespace of the deterministic nucleus UUIDs (uuid5). Never change it: re-imports of a slide's
#: nuclei into QuPath are recognisable only while the ids stay the same.
NUCLEUS_NAMESPACE: Final[uuid.UUID] = uuid.uuid5(uuid.NAMESPACE_URL, "wsi-nuclei/nucleus")
#: Namespace of the region annotation UUIDs written by :func:`write_regions_geojson`.
_REGION_NAMESPACE: Final[uuid.UUID] = uuid.uuid5(uuid.NAMESPACE_URL, "wsi-nuclei/region")

#: Grid QuPath (>= 0.6) snaps every imported coordinate to, in pixels, and its decimals.
_GRID: Final[float] = 0.01
_DECIMALS: Final[int] = 2

#: Nucleus table column -> (QuPath measurement name, decimals). NaN values are omitted.
MEASUREMENTS: Final[dict[str, tuple[str, int]]] = {
    "area_um2": ("Nucleus: Area µm^2", 2),
    "perimeter_um": ("Nucleus: Perimeter µm", 2),
    "circularity": ("Nucleus: Circularity", 4),
    "solidity": ("Nucleus: Solidity", 4),
    "eccentricity": ("Nucleus: Eccentricity", 4),
    "major_axis_um": ("Nucleus: Major axis µm", 2),
    "minor_axis_um": ("Nucleus: Minor axis µm", 2),
    "class_prob": ("Class probability", 4),
    **{f"prob_{name}": (f"Prob: {name}", 4) for name in schema.CLASS_NAMES.values()},
}
#: Measurement carrying the nucleus's region id (-1: outside every region).
_REGION_MEASUREMENT: Final[str] = "Region ID"

#: Colour of the default region class when a region carries none (QuPath-like light grey).
_TISSUE_CLASS: Final[str] = "Tissue"
_TISSUE_COLOR: Final[tuple[int, int, int]] = (200, 200, 200)

#: Arrow types of the GeoParquet columns (geometry is WKB).
_ARROW_TYPES: Final[dict[str, pa.DataType]] = {
    "str": pa.string(),
    "int8": pa.int8(),
    "int32": pa.int32(),
    "float32": pa.float32(),
    "float64": pa.float64(),
}
_GEOPARQUET_VERSION: Final[str] = "1.1.0"

#: Object types QuPath reads from ``properties.objectType``.
_OBJECT_TYPES: Final[frozenset[str]] = frozenset(
    {"annotation", "detection", "cell", "tile", "tmaCore"}
)
#: A UUID as Java's ``UUID.fromString`` and QuPath read it (use with ``fullmatch``).
_UUID_RE: Final[re.Pattern[str]] = re.compile(
    r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
)
_NAN_STRINGS: Final[frozenset[str]] = frozenset({"NaN", "inf", "-inf"})


class _RegionLike(Protocol):
    """What the region writers and summaries need from a region (see ``wsi_nuclei.regions``)."""

    id: Any
    name: str
    geometry: BaseGeometry
    source: str


# --------------------------------------------------------------------------------------------
# Identifiers and geometry cleaning
# --------------------------------------------------------------------------------------------


def nucleus_uuid(slide_fingerprint: str, centroid_x: float, centroid_y: float) -> str:
    """Deterministic UUID of a nucleus: uuid5 of the slide fingerprint and its centroid.

    Parameters
    ----------
    slide_fingerprint : str
        Stable identifier of the slide's content (e.g. a hash of its header and a few tiles).
    centroid_x, centroid_y : float
        Centroid in level-0 pixels. It is rounded to 0.01 px (the grid QuPath snaps to), so
        the id does not depend on float noise below that.

    Returns
    -------
    str
        Canonical lowercase UUID string (``8-4-4-4-12`` hex digits).

    Raises
    ------
    ValueError
        If a centroid coordinate is not finite.
    """
    if not (math.isfinite(centroid_x) and math.isfinite(centroid_y)):
        raise ValueError(f"nucleus centroid must be finite, got ({centroid_x}, {centroid_y})")
    # `+ 0.0` turns -0.0 into 0.0 so that both spell "0.00".
    x = round(float(centroid_x), _DECIMALS) + 0.0
    y = round(float(centroid_y), _DECIMALS) + 0.0
    return str(uuid.uuid5(NUCLEUS_NAMESPACE, f"{slide_fingerprint}|{x:.2f}|{y:.2f}"))


def _round_coords(coords: np.ndarray) -> np.ndarray:
    """Round an (n, 2) coordinate array to the 0.01 grid (nearest double to each 2-decimal)."""
    out = np.round(coords, _DECIMALS)
    out += 0.0  # no -0.0 in the output
    return out


def _is_good(poly: BaseGeometry | None) -> bool:
    """True for a non-empty, valid Polygon of positive area."""
    return (
        isinstance(poly, Polygon)
        and not poly.is_empty
        and poly.is_valid
        and poly.area > 0.0
    )


def _largest_polygon(geom: BaseGeometry | None) -> Polygon | None:
    """The polygon piece of largest area in ``geom`` (first one on ties); None when none."""
    if geom is None or geom.is_empty:
        return None
    if isinstance(geom, Polygon):
        return geom
    best: Polygon | None = None
    for part in getattr(geom, "geoms", ()):
        cand = _largest_polygon(part)
        if cand is not None and (best is None or cand.area > best.area):
            best = cand
    return best


def _snap(geom: BaseGeometry | None) -> Polygon | None:
    """Largest polygon piece of ``geom`` with coordinates rounded; None when not good after."""
    poly = _largest_polygon(geom)
    if poly is None:
        return None
    snapped = shapely.transform(poly, _round_coords)
    return snapped if _is_good(snapped) else None


def clean_polygon(poly: BaseGeometry | None) -> Polygon | None:
    """Round a nucleus outline to the 0.01-px grid and make sure it is valid *after* rounding.

    QuPath snaps every imported coordinate to a 0.01-pixel grid and refuses the whole file when
    a polygon is invalid, so validity is checked on the rounded coordinates. An invalid polygon
    is repaired with :func:`shapely.make_valid` (then, if rounding breaks it again, with
    :func:`shapely.set_precision` on the grid, then ``buffer(0)``), keeping the largest polygon
    piece. (Consecutive repeated vertices are kept: QuPath/JTS and GEOS accept them as long as
    every ring has enough distinct points.)

    Parameters
    ----------
    poly : shapely geometry or None
        Nucleus outline in level-0 pixels, normally a Polygon (a MultiPolygon or collection is
        reduced to its largest polygon).

    Returns
    -------
    shapely.Polygon or None
        A valid polygon of positive area whose coordinates have at most 2 decimals and whose
        rings are closed with >= 4 points; None when nothing usable is left (empty, zero area,
        collapsed by rounding, non-finite coordinates). Callers count the None results as
        dropped.
    """
    if poly is None or not isinstance(poly, BaseGeometry) or poly.is_empty:
        return None
    if not np.isfinite(shapely.get_coordinates(poly)).all():
        return None
    if isinstance(poly, Polygon):
        snapped = shapely.transform(poly, _round_coords)
        if _is_good(snapped):
            return snapped
    repairs = (
        lambda g: shapely.make_valid(g),
        lambda g: shapely.set_precision(shapely.make_valid(g), _GRID),
        lambda g: shapely.make_valid(g).buffer(0),
    )
    for repair in repairs:
        try:
            fixed = _snap(repair(poly))
        except GEOSException:
            fixed = None
        if fixed is not None:
            return fixed
    return None


def _clean_geometries(geoms: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Vectorised :func:`clean_polygon` over an object array of geometries.

    Returns
    -------
    cleaned : numpy.ndarray
        Object array of the cleaned polygons (None where dropped).
    keep : numpy.ndarray
        Boolean mask of the geometries that survived.
    n_repaired : int
        How many needed the (slow) repair path and survived it.
    """
    geoms = np.asarray(geoms, dtype=object)
    cleaned = np.empty(len(geoms), dtype=object)
    if len(geoms) == 0:
        return cleaned, np.zeros(0, dtype=bool), 0
    is_geom = np.fromiter((isinstance(g, BaseGeometry) for g in geoms), bool, len(geoms))
    fast = np.zeros(len(geoms), dtype=bool)
    polys = is_geom.copy()
    polys[is_geom] = shapely.get_type_id(geoms[is_geom]) == 3  # Polygon
    if polys.any():
        snapped = shapely.transform(geoms[polys], _round_coords)
        good = shapely.is_valid(snapped) & (shapely.area(snapped) > 0.0)
        idx = np.flatnonzero(polys)
        ok_idx = idx[good]
        cleaned[ok_idx] = snapped[good]
        fast[ok_idx] = True
    n_repaired = 0
    for i in np.flatnonzero(~fast):
        fixed = clean_polygon(geoms[i])
        cleaned[i] = fixed
        n_repaired += fixed is not None
    keep = np.fromiter((g is not None for g in cleaned), bool, len(cleaned))
    return cleaned, keep, n_repaired


def clean_frame(frame: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, int]]:
    """Clean the ``geometry`` column of a nucleus table, dropping rows left without a polygon.

    Apply it once before summarising and writing so that the summary counts exactly the nuclei
    the writers write (the writers apply the same deterministic cleaning; on a cleaned table
    it changes nothing).

    Parameters
    ----------
    frame : pandas.DataFrame
        Nucleus table with a ``geometry`` column.

    Returns
    -------
    frame : pandas.DataFrame
        A new table with cleaned geometries and the dropped rows removed (index reset).
    stats : dict
        ``{"n_in", "n_repaired", "n_dropped"}``.
    """
    cleaned, keep, n_repaired = _clean_geometries(frame["geometry"].to_numpy(dtype=object))
    out = frame.copy()
    out["geometry"] = cleaned
    out = out.loc[keep].reset_index(drop=True)
    return out, {
        "n_in": int(len(frame)),
        "n_repaired": int(n_repaired),
        "n_dropped": int((~keep).sum()),
    }


# --------------------------------------------------------------------------------------------
# GeoJSON (nuclei)
# --------------------------------------------------------------------------------------------


def _dumps(obj: Any) -> str:
    """Strict, compact, ASCII JSON (``µ`` is escaped, so any reader's charset works)."""
    return json.dumps(obj, ensure_ascii=True, allow_nan=False, separators=(",", ":"))


def _geojson_path(path: str | Path, gzip: bool) -> Path:
    """Check or complete the file name: ``.geojson.gz``/``.json.gz`` or ``.geojson``/``.json``."""
    path = Path(path)
    name = path.name.lower()
    if gzip:
        if name.endswith((".geojson.gz", ".json.gz")):
            return path
        if name.endswith((".geojson", ".json")):
            return path.with_name(path.name + ".gz")
        raise ValueError(f"a gzipped GeoJSON path must end with .geojson.gz, got {path.name!r}")
    if name.endswith((".geojson", ".json")):
        return path
    raise ValueError(f"a GeoJSON path must end with .geojson, got {path.name!r}")


def _open_sink(raw: BinaryIO, gzip: bool, compresslevel: int) -> BinaryIO:
    """Binary stream to write into: the raw file or a deterministic gzip stream on it."""
    if not gzip:
        return raw
    # filename="" and mtime=0: the gzip header holds neither the (temporary) name nor a time,
    # so the same input always gives the same bytes.
    return _gzip.GzipFile(
        filename="", mode="wb", fileobj=raw, compresslevel=compresslevel, mtime=0
    )


@contextlib.contextmanager
def _atomic_sink(final: Path, gzip: bool, compresslevel: int) -> Iterator[BinaryIO]:
    """A binary stream (gzipped or not) into a temporary file renamed to ``final`` on success."""
    with atomic_path(final) as tmp:
        with open(tmp, "wb") as raw:
            sink = _open_sink(raw, gzip, compresslevel)
            try:
                yield sink
            finally:
                if sink is not raw:
                    sink.close()


def _collection_head(metadata: Mapping[str, Any] | None) -> bytes:
    """The opening of a FeatureCollection, up to and including ``"features":[`` and a newline,
    with ``metadata`` (strict JSON) as a foreign member."""
    header: dict[str, Any] = {"type": "FeatureCollection"}
    if metadata is not None:
        header["metadata"] = json.loads(
            json.dumps(dict(metadata), allow_nan=False, sort_keys=True, default=str)
        )
    return (_dumps(header)[:-1] + ',"features":[\n').encode("ascii")


def _detection_batches(frames: Iterable[pd.DataFrame] | pd.DataFrame, what: str,
                       counts: dict[str, int]) -> Iterator[tuple[pd.DataFrame, list[bytes]]]:
    """Nucleus tables as (frame, feature texts) batches with cleaned geometries: dropped
    geometries leave their rows out; ``counts["repaired"]``/``counts["dropped"]`` accumulate."""
    classes = _classification_texts()
    for frame in _iter_batches(frames):
        _require(frame, ("geometry", "class_id"), what)
        cleaned, keep, rep = _clean_geometries(frame["geometry"].to_numpy(object))
        counts["repaired"] += rep
        counts["dropped"] += int((~keep).sum())
        if not keep.all():
            frame = frame.loc[keep]
            cleaned = cleaned[keep]
        if len(frame):
            yield frame, _feature_chunk(frame.assign(geometry=cleaned), classes)


def _classification_objects() -> dict[int, dict[str, Any]]:
    """QuPath classification objects per class id."""
    out: dict[int, dict[str, Any]] = {}
    for cid in schema.CLASS_COLORS:
        out[cid] = {"name": schema.class_name(cid), "color": list(schema.CLASS_COLORS[cid])}
    return out


def _classification_texts() -> dict[int, bytes]:
    """JSON text of the classification object per class id."""
    return {cid: _dumps(obj).encode("ascii") for cid, obj in _classification_objects().items()}


def _polygon_coordinates(polys: np.ndarray) -> list[list[list[list[float]]]]:
    """GeoJSON Polygon ``coordinates`` (lists of rings of [x, y]) for an array of Polygons."""
    if len(polys) == 0:
        return []
    _, coords, (ring_off, poly_off) = shapely.to_ragged_array(polys)
    pts = _round_coords(coords).tolist()
    ring_off = ring_off.tolist()
    poly_off = poly_off.tolist()
    out = []
    for p in range(len(poly_off) - 1):
        r0, r1 = poly_off[p], poly_off[p + 1]
        out.append([pts[ring_off[r] : ring_off[r + 1]] for r in range(r0, r1)])
    return out


#: Largest scaled magnitude formatted with integer arithmetic; beyond it, Python's repr is used.
_MAX_EXACT: Final[float] = float(2**53)
#: Nuclei formatted per vectorised batch (bounds the temporary arrays' memory).
_FORMAT_BATCH: Final[int] = 16_384


def _strings_to_chars(texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Fixed-width (chars, mask) matrices of ASCII strings (mask: real characters)."""
    width = max((len(t) for t in texts), default=1) or 1
    arr = np.array([t.encode("ascii") for t in texts], dtype=f"S{width}")
    chars = arr.view(np.uint8).reshape(len(texts), width)
    return chars, chars != 0


def _digits(a: np.ndarray, n_digits: int) -> np.ndarray:
    """Decimal digits (most significant first) of non-negative integers, as (n, n_digits) uint8."""
    x = a.astype(np.uint32 if a.size == 0 or a.max() < 2**32 else np.uint64)
    out = np.empty((len(x), n_digits), dtype=np.uint8)
    for j in range(n_digits - 1, -1, -1):
        q = x // 10
        out[:, j] = x - q * 10
        x = q
    return out


def _number_chars(values: np.ndarray, decimals: int) -> tuple[np.ndarray, np.ndarray]:
    """Decimal text of numbers rounded to ``decimals``, as fixed-width (chars, mask) matrices.

    The text of each finite value equals ``json.dumps(float(numpy.round(v, decimals)))``
    (``"12.0"``, ``"0.25"``, ``"-3.5"``; never ``"-0.0"``) or, for ``decimals == 0``,
    ``json.dumps(int(numpy.rint(v)))``: the integer ``rint(v * 10**decimals)`` is written digit
    by digit with the decimal point inserted, leading zeros of the integer part and trailing
    zeros of the fraction (all but one) removed. This is what ``json.dumps`` prints for these
    values, at a fraction of the cost. Rows of non-finite values are left fully masked; the
    caller omits them.
    """
    v = np.asarray(values, dtype=np.float64)
    n = len(v)
    finite = np.isfinite(v)
    scaled = np.where(finite, np.rint(np.where(finite, v, 0.0) * 10.0**decimals), 0.0)
    if n and np.abs(scaled).max() >= _MAX_EXACT:  # absurd magnitudes: exact but slow path
        texts = [
            (repr(int(x)) if decimals == 0 else repr(round(float(x), decimals))) if ok else ""
            for x, ok in zip(v.tolist(), finite.tolist())
        ]
        return _strings_to_chars(texts)
    s = scaled.astype(np.int64)
    a = np.abs(s)
    n_int = max(1, len(str(int(a.max(initial=0)) // 10**decimals)))
    n_dig = n_int + decimals
    digits = _digits(a, n_dig)
    width = 1 + n_int + (1 + decimals if decimals else 0)
    chars = np.zeros((n, width), dtype=np.uint8)
    mask = np.zeros((n, width), dtype=bool)
    chars[:, 0] = ord("-")
    mask[:, 0] = s < 0
    int_digits = digits[:, :n_int]
    chars[:, 1 : 1 + n_int] = int_digits + ord("0")
    keep = np.logical_or.accumulate(int_digits != 0, axis=1)
    keep[:, -1] = True
    mask[:, 1 : 1 + n_int] = keep
    if decimals:
        frac = digits[:, n_int:]
        chars[:, 1 + n_int] = ord(".")
        mask[:, 1 + n_int] = True
        chars[:, 2 + n_int :] = frac + ord("0")
        fkeep = np.logical_or.accumulate((frac != 0)[:, ::-1], axis=1)[:, ::-1]
        fkeep[:, 0] = True
        mask[:, 2 + n_int :] = fkeep
    mask &= finite[:, None]
    return chars, mask


def _const(text: str, n: int, present: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(chars, mask) matrices repeating the ASCII ``text`` on ``n`` rows (masked by
    ``present``)."""
    row = np.frombuffer(text.encode("ascii"), dtype=np.uint8)
    chars = np.broadcast_to(row, (n, len(row)))
    mask = np.ones((n, len(row)), dtype=bool)
    if present is not None:
        mask &= present[:, None]
    return chars, mask


def _rows_text(parts: Sequence[tuple[np.ndarray, np.ndarray]]) -> tuple[bytes, np.ndarray]:
    """Concatenate (chars, mask) blocks column-wise and pack the masked characters.

    Returns the bytes of all rows back to back and the row offsets (``n + 1``)."""
    chars = np.concatenate([c for c, _ in parts], axis=1)
    mask = np.concatenate([m for _, m in parts], axis=1)
    offsets = np.zeros(len(chars) + 1, dtype=np.int64)
    np.cumsum(mask.sum(axis=1), out=offsets[1:])
    return chars[mask].tobytes(), offsets


def _coordinates_text(polys: np.ndarray) -> tuple[bytes, np.ndarray]:
    """GeoJSON Polygon ``coordinates`` text of each polygon, back to back, and the offsets.

    The text of a polygon is exactly ``json.dumps(coordinates, separators=(",", ":"))`` of its
    rounded coordinates (``[[[x,y],...],[hole...]]``)."""
    _, coords, (ring_off, poly_off) = shapely.to_ragged_array(polys)
    n_pts = len(coords)
    n_rings = len(ring_off) - 1
    ring_of_pt = np.repeat(np.arange(n_rings), np.diff(ring_off))
    first_ring = np.zeros(n_rings, dtype=bool)
    first_ring[poly_off[:-1]] = True
    last_ring = np.zeros(n_rings, dtype=bool)
    last_ring[poly_off[1:] - 1] = True
    first_pt = np.zeros(n_pts, dtype=bool)
    first_pt[ring_off[:-1]] = True
    last_pt = np.zeros(n_pts, dtype=bool)
    last_pt[ring_off[1:] - 1] = True
    # head: "[[" before a polygon's first point, "[" before a hole's first point
    head = np.full((n_pts, 2), ord("["), dtype=np.uint8)
    head_mask = np.zeros((n_pts, 2), dtype=bool)
    head_mask[:, 1] = first_pt
    head_mask[:, 0] = first_pt & first_ring[ring_of_pt]
    # tail: "," between points, "]," after a ring followed by a hole, "]]" after the last ring
    tail = np.full((n_pts, 2), ord(","), dtype=np.uint8)
    tail[last_pt, 0] = ord("]")
    tail[last_pt & last_ring[ring_of_pt], 1] = ord("]")
    tail_mask = np.ones((n_pts, 2), dtype=bool)
    tail_mask[~last_pt, 1] = False
    xy = _round_coords(coords)
    buf, pt_off = _rows_text([
        (head, head_mask),
        _const("[", n_pts),
        _number_chars(xy[:, 0], _DECIMALS),
        _const(",", n_pts),
        _number_chars(xy[:, 1], _DECIMALS),
        _const("]", n_pts),
        (tail, tail_mask),
    ])
    return buf, pt_off[ring_off[poly_off]]


def _measurements_text(frame: pd.DataFrame) -> tuple[bytes, np.ndarray]:
    """``measurements`` object text of each nucleus (NaN values omitted), and the offsets.

    The text of a row is exactly ``json.dumps(measurements, separators=(",", ":"))`` of the
    rounded values, keys in :data:`MEASUREMENTS` order then ``"Region ID"``."""
    n = len(frame)
    entries: list[tuple[str, tuple[np.ndarray, np.ndarray]]] = []
    for col, (name, decimals) in MEASUREMENTS.items():
        if col in frame.columns:
            entries.append((name, _number_chars(frame[col].to_numpy(np.float64), decimals)))
    if "region_id" in frame.columns:
        entries.append((_REGION_MEASUREMENT,
                        _number_chars(frame["region_id"].to_numpy(np.float64), 0)))
    if not entries:
        return b"{}" * n, np.arange(n + 1, dtype=np.int64) * 2
    present = np.stack([m.any(axis=1) for _, (_, m) in entries], axis=1)
    first = np.argmax(present, axis=1)  # the first present entry gets no leading comma
    parts = [_const("{", n)]
    for k, (name, (chars, mask)) in enumerate(entries):
        comma = _const(",", n, present[:, k] & (first != k))
        key = _const(_dumps(name) + ":", n, present[:, k])
        parts += [comma, key, (chars, mask)]
    parts.append(_const("}", n))
    return _rows_text(parts)


def _feature_chunk(frame: pd.DataFrame, classes: Mapping[int, bytes]) -> list[bytes]:
    """The JSON text of each nucleus of an already cleaned ``frame`` (one Feature each)."""
    n = len(frame)
    geo_buf, geo_off = _coordinates_text(frame["geometry"].to_numpy(dtype=object))
    mea_buf, mea_off = _measurements_text(frame)
    geo_off = geo_off.tolist()
    mea_off = mea_off.tolist()
    class_ids = frame["class_id"].to_numpy(dtype=np.int64).tolist()
    if "id" in frame.columns:
        match = _UUID_RE.fullmatch
        ids = [
            b'"id":"' + v.encode("ascii") + b'",' if isinstance(v, str) and match(v) else b""
            for v in frame["id"].tolist()
        ]
    else:
        ids = [b""] * n
    unknown = classes[0]
    start = b'{"type":"Feature",'
    geom = b'"geometry":{"type":"Polygon","coordinates":'
    props = b'},"properties":{"objectType":"detection","classification":'
    meas = b',"measurements":'
    return [
        b"".join((start, ids[i], geom, geo_buf[geo_off[i] : geo_off[i + 1]], props,
                  classes.get(class_ids[i], unknown), meas,
                  mea_buf[mea_off[i] : mea_off[i + 1]], b"}}"))
        for i in range(n)
    ]


def _require(frame: pd.DataFrame, columns: Iterable[str], what: str) -> None:
    """Raise ValueError naming the columns of ``columns`` that ``frame`` lacks."""
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(f"{what}: nucleus table lacks column(s) {', '.join(missing)}")


def write_nuclei_geojson(
    frames: Iterable[pd.DataFrame] | pd.DataFrame,
    path: str | Path,
    *,
    gzip: bool = True,
    metadata: Mapping[str, Any] | None = None,
    compresslevel: int = 4,
) -> dict[str, Any]:
    """Stream nucleus tables into a QuPath-ready GeoJSON FeatureCollection of detections.

    One Feature per nucleus, one per line (compact separators)::

        {"type": "Feature", "id": "<uuid>", "geometry": {"type": "Polygon", ...},
         "properties": {"objectType": "detection",
                        "classification": {"name": "Neoplastic", "color": [255, 0, 0]},
                        "measurements": {"Nucleus: Area µm^2": 31.2, ..., "Region ID": 0}}}

    Geometries are cleaned with :func:`clean_polygon` (dropped ones are counted); coordinates
    have at most 2 decimals; measurements follow :data:`MEASUREMENTS` and NaN values are
    omitted; nuclei of class 0 are named ``"Nucleus"``. The output is strict ASCII JSON and is
    byte-for-byte deterministic for the same input (fixed key order, gzip ``mtime=0``). It is
    written under a temporary name and renamed when complete.

    Parameters
    ----------
    frames : iterable of pandas.DataFrame, or one DataFrame
        Nucleus tables (:data:`wsi_nuclei.schema.NUCLEUS_COLUMNS`); ``geometry`` and
        ``class_id`` are required, the measurement columns, ``id`` and ``region_id`` are
        written when present (an ``id`` that is not a UUID string is left out: QuPath would
        ignore it). Consumed lazily, one at a time; large frames are formatted in slices.
    path : str or pathlib.Path
        Output file, ending in ``.geojson.gz`` (``gzip=True``; a ``.geojson`` name gets ``.gz``
        appended) or ``.geojson``.
    gzip : bool, default True
        Compress with gzip (about 4x smaller; QuPath reads ``.geojson.gz``).
    metadata : mapping, optional
        JSON-serialisable run metadata written as a ``"metadata"`` member of the
        FeatureCollection (a GeoJSON foreign member, ignored by QuPath). Record the coordinate
        frame there (e.g. the OpenSlide bounds offset subtracted).
    compresslevel : int, default 4
        gzip level. 4 is the fastest level of zlib's "slow" (lazy matching) family: about a
        third faster than 6 for files about 8 % larger.

    Returns
    -------
    dict
        ``{"path", "n_features", "n_repaired", "n_dropped", "bytes", "seconds"}``.

    Raises
    ------
    ValueError
        A frame lacks ``geometry``/``class_id``, the file name has the wrong extension, or
        ``metadata`` is not strict-JSON serialisable (e.g. holds NaN).
    """
    t0 = time.perf_counter()
    final = _geojson_path(path, gzip)
    head = _collection_head(metadata)
    counts = {"repaired": 0, "dropped": 0}
    n_features = 0
    with _atomic_sink(final, gzip, compresslevel) as sink:
        sink.write(head)
        for _, features in _detection_batches(frames, "write_nuclei_geojson", counts):
            if n_features:
                sink.write(b",\n")
            sink.write(b",\n".join(features))
            n_features += len(features)
        sink.write(b"\n]}\n")
    return {
        "path": str(final),
        "n_features": n_features,
        "n_repaired": counts["repaired"],
        "n_dropped": counts["dropped"],
        "bytes": final.stat().st_size,
        "seconds": time.perf_counter() - t0,
    }


# --------------------------------------------------------------------------------------------
# GeoParquet
# --------------------------------------------------------------------------------------------


def _arrow_schema() -> pa.Schema:
    """Arrow schema of the GeoParquet nucleus table: typed columns plus WKB ``geometry``."""
    fields = [
        pa.field(col, _ARROW_TYPES[dtype])
        for col, dtype in schema.NUCLEUS_COLUMNS.items()
        if col != "geometry"
    ]
    fields.append(pa.field("geometry", pa.binary()))
    return pa.schema(fields)


def _frame_to_table(frame: pd.DataFrame, arrow_schema: pa.Schema) -> pa.Table:
    """Arrow table of an already cleaned nucleus table (geometry as WKB)."""
    arrays = []
    for field in arrow_schema:
        col = frame[field.name]
        if field.name == "geometry":
            arrays.append(pa.array(shapely.to_wkb(col.to_numpy(dtype=object)), pa.binary()))
        elif pa.types.is_string(field.type):
            values = [v if isinstance(v, str) else None for v in col.tolist()]
            arrays.append(pa.array(values, pa.string()))
        else:
            arrays.append(pa.array(col.to_numpy(dtype=field.type.to_pandas_dtype()), field.type))
    return pa.Table.from_arrays(arrays, schema=arrow_schema)


def write_nuclei_parquet(
    frames: Iterable[pd.DataFrame] | pd.DataFrame,
    path: str | Path,
    *,
    row_group_size: int = 65_536,
    metadata: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Stream nucleus tables into a GeoParquet (1.1.0) file that ``geopandas.read_parquet`` reads.

    Every :data:`wsi_nuclei.schema.NUCLEUS_COLUMNS` column except ``geometry`` is a typed
    column (``int8``/``int32``/``float32``/``float64``/``string``); ``geometry`` holds the
    cleaned polygons (:func:`clean_polygon`, same nuclei as the GeoJSON) as WKB. The ``geo``
    file metadata names ``geometry`` as primary column with ``encoding: WKB``,
    ``geometry_types: ["Polygon"]``, the ``bbox`` of all nuclei (omitted when there are none)
    and ``crs: null`` (level-0 pixel coordinates, no CRS). Rows are buffered into row groups of
    about ``row_group_size`` rows; the file is written under a temporary name and renamed.

    Parameters
    ----------
    frames : iterable of pandas.DataFrame, or one DataFrame
        Nucleus tables with all schema columns. Consumed lazily.
    path : str or pathlib.Path
        Output file (``.parquet``).
    row_group_size : int, default 65536
        Target rows per row group.
    metadata : mapping, optional
        JSON-serialisable run metadata stored under the ``wsi_nuclei`` file metadata key.

    Returns
    -------
    dict
        ``{"path", "n_features", "n_repaired", "n_dropped", "row_groups", "bbox", "bytes",
        "seconds"}``.

    Raises
    ------
    ValueError
        A frame lacks schema columns.
    """
    t0 = time.perf_counter()
    final = Path(path)
    arrow_schema = _arrow_schema()
    n_features = n_repaired = n_dropped = row_groups = 0
    bbox = [math.inf, math.inf, -math.inf, -math.inf]
    pending: list[pa.Table] = []
    n_pending = 0
    with atomic_path(final) as tmp:
        # store_schema=False: no ARROW:schema blob, so readers take the schema metadata (and
        # with it the `geo` key added at the end) from the Parquet key-value metadata.
        writer = pq.ParquetWriter(tmp, arrow_schema, store_schema=False, compression="zstd")
        try:

            def flush() -> None:
                nonlocal pending, n_pending, row_groups
                if n_pending:
                    table = pa.concat_tables(pending)
                    writer.write_table(table, row_group_size=max(n_pending, 1))
                    row_groups += 1
                pending, n_pending = [], 0

            for frame in _iter_frames(frames):
                if len(frame) == 0:
                    continue
                _require(frame, schema.NUCLEUS_COLUMNS, "write_nuclei_parquet")
                cleaned, keep, rep = _clean_geometries(frame["geometry"].to_numpy(object))
                n_repaired += rep
                n_dropped += int((~keep).sum())
                if not keep.any():
                    continue
                frame = frame.loc[keep].assign(geometry=cleaned[keep])
                b = shapely.total_bounds(cleaned[keep])
                bbox = [min(bbox[0], b[0]), min(bbox[1], b[1]), max(bbox[2], b[2]),
                        max(bbox[3], b[3])]
                pending.append(_frame_to_table(frame, arrow_schema))
                n_pending += len(frame)
                n_features += len(frame)
                if n_pending >= row_group_size:
                    flush()
            flush()
            column_meta: dict[str, Any] = {
                "encoding": "WKB",
                "geometry_types": ["Polygon"],
                "crs": None,
                "edges": "planar",
            }
            if n_features:
                column_meta["bbox"] = [float(v) for v in bbox]
            geo = {
                "version": _GEOPARQUET_VERSION,
                "primary_column": "geometry",
                "columns": {"geometry": column_meta},
            }
            kv = {"geo": json.dumps(geo, allow_nan=False)}
            if metadata is not None:
                kv["wsi_nuclei"] = json.dumps(
                    dict(metadata), allow_nan=False, sort_keys=True, default=str
                )
            writer.add_key_value_metadata(kv)
        finally:
            writer.close()
    return {
        "path": str(final),
        "n_features": n_features,
        "n_repaired": n_repaired,
        "n_dropped": n_dropped,
        "row_groups": row_groups,
        "bbox": [float(v) for v in bbox] if n_features else None,
        "bytes": final.stat().st_size,
        "seconds": time.perf_counter() - t0,
    }


# --------------------------------------------------------------------------------------------
# GeoJSON (regions as annotations)
# --------------------------------------------------------------------------------------------


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
    return (isinstance(value, list) and len(value) == 3
            and all(isinstance(c, int) and not isinstance(c, bool) for c in value))


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


def _region_feature(region: Any, summary: Mapping[str, Any] | None, annotation_id: str
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
            meta = {str(k): v for k, v in meta_in.items()
                    if isinstance(v, (str, bool, int, float)) and _strict(v)}
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


# --------------------------------------------------------------------------------------------
# GeoJSON (regions with their nuclei nested: the QuPath hierarchy in one file)
# --------------------------------------------------------------------------------------------

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
        if not (geoms[b].covers(geoms[a])
                or geoms[a].difference(geoms[b]).area <= _NEST_SLACK * areas[a]):
            continue
        if best[a] < 0 or rank[b] > rank[best[a]]:
            best[a] = b
    return [int(v) for v in best]


def _raise_disk_error(exc: OSError, folder: Path, name: str) -> None:
    """Raise the one-line OutputError of a full or read-only disk (as ``atomic_path`` does)."""
    from wsi_nuclei._io import _DISK_ERRNOS
    from wsi_nuclei.errors import OutputError

    if exc.errno in _DISK_ERRNOS:
        raise OutputError(f"{folder}: cannot write the temporary file of {name} "
                          f"({exc.strerror or exc}); free space and rerun to resume") from None


class _Spill:
    """Feature texts grouped by region without holding them: appended to one temporary file
    in arrival order, with an index of (offset, length) pieces per group."""

    def __init__(self, folder: Path) -> None:
        fd, name = tempfile.mkstemp(prefix=".qupath-spill.tmp-", dir=folder)
        self.path = Path(name)
        self.fh = os.fdopen(fd, "w+b")
        self.pieces: dict[int, list[tuple[int, int]]] = {}
        self.counts: dict[int, int] = {}
        self.offset = 0

    def add(self, group: int, features: list[bytes]) -> None:
        """Append the texts of ``features`` (comma-separated) to ``group``."""
        data = b",\n".join(features)
        self.fh.write(data)
        self.pieces.setdefault(group, []).append((self.offset, len(data)))
        self.counts[group] = self.counts.get(group, 0) + len(features)
        self.offset += len(data)

    def copy(self, group: int, sink: BinaryIO) -> int:
        """Write the group's texts (comma-separated) into ``sink``; returns how many."""
        first = True
        for off, length in self.pieces.get(group, ()):
            if not first:
                sink.write(b",\n")
            first = False
            self.fh.seek(off)
            left = length
            while left:
                chunk = self.fh.read(min(left, 1 << 22))
                if not chunk:
                    raise OSError("temporary spill file ended early")
                sink.write(chunk)
                left -= len(chunk)
        return self.counts.get(group, 0)

    def close(self) -> None:
        """Close and remove the temporary file."""
        self.fh.close()
        with contextlib.suppress(OSError):
            self.path.unlink()


def write_qupath_geojson(
    frames: Iterable[pd.DataFrame] | pd.DataFrame,
    regions: Sequence[_RegionLike],
    summaries: Any,
    path: str | Path,
    *,
    slide_fingerprint: str = "",
    gzip: bool = True,
    metadata: Mapping[str, Any] | None = None,
    compresslevel: int = 4,
    spill_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Write the QuPath hierarchy in one file: region annotations holding their nuclei.

    A FeatureCollection whose top-level Features are the region annotations of
    :func:`write_regions_geojson` (same ids, names, classes, lock state, measurements), each
    carrying ``properties.childObjects``: first the regions nested in it (the smallest region
    that contains each one, :func:`region_parents`), then its nuclei as ``detection``
    Features identical to those of :func:`write_nuclei_geojson`. A nucleus is the child of
    exactly one region: the one given by its ``region_id`` (the pipeline's smallest region
    containing its centroid, so in nested or overlapping regions the innermost one). Nuclei
    whose ``region_id`` is no region's id (-1: outside every region) are top-level Features
    after the regions. QuPath (>= 0.4) reads ``childObjects`` and keeps the hierarchy on
    import, so one drag-and-drop gives annotations with their detections (and nested
    annotations) as children.

    Memory is bounded: the frames are read once and each batch's Feature texts are appended
    to a temporary file in ``spill_dir`` with an index per region, then copied into place
    region by region. The output is byte-for-byte deterministic and written under a
    temporary name, then renamed.

    Parameters
    ----------
    frames : iterable of pandas.DataFrame, or one DataFrame
        Nucleus tables as for :func:`write_nuclei_geojson`, with ``region_id``. Consumed once.
    regions : sequence of region objects
        As for :func:`write_regions_geojson`; ``region.id`` is what ``region_id`` refers to.
    summaries : dict, list or None
        Region summaries, as for :func:`write_regions_geojson`.
    path : str or pathlib.Path
        Output ``.geojson.gz`` (``gzip=True``) or ``.geojson``.
    slide_fingerprint : str, optional
        As for :func:`write_regions_geojson`.
    gzip : bool, default True
        Compress with gzip.
    metadata : mapping, optional
        Run metadata written as the collection's ``"metadata"`` member.
    compresslevel : int, default 4
        gzip level.
    spill_dir : str or pathlib.Path, optional
        Folder of the temporary file (default: the output's folder). It needs about the
        uncompressed size of the nuclei's text.

    Returns
    -------
    dict
        ``{"path", "n_annotations", "n_nested_annotations", "n_detections",
        "n_nested_detections", "n_top_level_detections", "n_repaired", "n_dropped",
        "n_regions_dropped", "bytes", "seconds"}``.

    Raises
    ------
    ValueError
        A frame lacks ``geometry``/``class_id``, the file name has the wrong extension, or
        ``metadata`` is not strict-JSON serialisable.
    """
    t0 = time.perf_counter()
    final = _geojson_path(path, gzip)
    regions = list(regions)
    by_id = _summaries_by_region(summaries)
    ids = region_annotation_ids(regions, slide_fingerprint)
    features: list[dict[str, Any] | None] = [
        _region_feature(r, by_id.get(str(r.id)), uid) for r, uid in zip(regions, ids)
    ]
    parents = region_parents(regions)
    # a region dropped as degenerate passes its children to its nearest written ancestor
    for i in range(len(regions)):
        p = parents[i]
        while p >= 0 and features[p] is None:
            p = parents[p]
        parents[i] = p
    children: dict[int, list[int]] = {}
    for i, p in enumerate(parents):
        if features[i] is not None:
            children.setdefault(p, []).append(i)
    index_of: dict[int, int] = {}
    for i, r in enumerate(regions):
        with contextlib.suppress(TypeError, ValueError):
            if features[i] is not None and not isinstance(r.id, bool) and int(r.id) == r.id:
                index_of.setdefault(int(r.id), i)
    head = _collection_head(metadata)
    counts = {"repaired": 0, "dropped": 0}
    folder = Path(spill_dir) if spill_dir is not None else final.parent
    try:
        spill = _Spill(folder)
    except OSError as exc:
        _raise_disk_error(exc, folder, final.name)
        raise
    try:
        for frame, texts in _detection_batches(frames, "write_qupath_geojson", counts):
            if "region_id" in frame.columns:
                rid = frame["region_id"].to_numpy(np.int64)
                uniq, inverse = np.unique(rid, return_inverse=True)
                group = np.array([index_of.get(int(u), -1) for u in uniq.tolist()], np.int64)[inverse]
            else:
                group = np.full(len(frame), -1, np.int64)
            for g in np.unique(group).tolist():  # ascending: deterministic piece order
                rows = np.flatnonzero(group == g).tolist()
                try:
                    spill.add(int(g), [texts[i] for i in rows])
                except OSError as exc:
                    _raise_disk_error(exc, folder, final.name)
                    raise
        spill.fh.flush()
        n_nested_det = 0
        n_nested_ann = 0
        with _atomic_sink(final, gzip, compresslevel) as sink:
            sink.write(head)
            # depth-first, without recursion: (region index, next step) on a stack;
            # step 0 opens the annotation, 1 closes it after its children
            first_top = True
            stack: list[tuple[int, int]] = [(i, 0) for i in reversed(children.get(-1, []))]
            first_child: list[bool] = []
            while stack:
                i, step = stack.pop()
                feat = features[i]
                assert feat is not None
                if step == 1:
                    n = spill.counts.get(i, 0)
                    if n:
                        if not first_child[-1]:
                            sink.write(b",\n")
                        spill.copy(i, sink)
                        n_nested_det += n
                    first_child.pop()
                    sink.write(b"\n]}}")
                    continue
                if first_child:  # a nested annotation inside its parent's children
                    if not first_child[-1]:
                        sink.write(b",\n")
                    first_child[-1] = False
                    n_nested_ann += 1
                else:
                    if not first_top:
                        sink.write(b",\n")
                    first_top = False
                text = _dumps(feat)
                # properties is the last member: reopen it to append childObjects
                sink.write(text[:-2].encode("ascii") + b',"childObjects":[\n')
                first_child.append(True)
                stack.append((i, 1))
                for c in reversed(children.get(i, [])):
                    stack.append((c, 0))
            n_top = spill.counts.get(-1, 0)
            if n_top:
                if not first_top:
                    sink.write(b",\n")
                spill.copy(-1, sink)
            sink.write(b"\n]}\n")
    finally:
        spill.close()
    n_written = sum(1 for f in features if f is not None)
    return {
        "path": str(final),
        "n_annotations": n_written,
        "n_nested_annotations": n_nested_ann,
        "n_detections": n_nested_det + n_top,
        "n_nested_detections": n_nested_det,
        "n_top_level_detections": n_top,
        "n_repaired": counts["repaired"],
        "n_dropped": counts["dropped"],
        "n_regions_dropped": len(regions) - n_written,
        "bytes": final.stat().st_size,
        "seconds": time.perf_counter() - t0,
    }


# --------------------------------------------------------------------------------------------
# Validator
# --------------------------------------------------------------------------------------------


class _StrictJSONError(ValueError):
    """A JSON text that Python's strict readers refuse (NaN/Infinity literals)."""


def _reject_constant(name: str) -> Any:
    """``parse_constant`` hook: NaN, Infinity and -Infinity are not JSON."""
    raise _StrictJSONError(f"non-standard JSON literal {name} (write strict JSON)")


class _JsonStream:
    """Incremental reader of one JSON text: walks the top-level object/array itself and decodes
    each member with :meth:`json.JSONDecoder.raw_decode`, so a FeatureCollection with millions
    of features is validated feature by feature, without building them all in memory."""

    _CHUNK: int = 1 << 20  # characters read at a time
    _WS: str = " \t\n\r"

    def __init__(self, text: io.TextIOBase) -> None:
        self._text = text
        self._buf = ""
        self._pos = 0
        self._eof = False
        self._decoder = json.JSONDecoder(parse_constant=_reject_constant)

    def _fill(self) -> bool:
        """Append a chunk to the buffer (dropping the consumed part); False at end of file."""
        if self._eof:
            return False
        chunk = self._text.read(self._CHUNK)
        if not chunk:
            self._eof = True
            return False
        self._buf = self._buf[self._pos :] + chunk
        self._pos = 0
        return True

    def peek(self) -> str:
        """Next non-whitespace character ('' at end of input), not consumed."""
        while True:
            while self._pos < len(self._buf) and self._buf[self._pos] in self._WS:
                self._pos += 1
            if self._pos < len(self._buf):
                return self._buf[self._pos]
            if not self._fill():
                return ""

    def expect(self, chars: str) -> str:
        """Consume the next non-whitespace character, which must be one of ``chars``."""
        c = self.peek()
        if not c or c not in chars:
            found = repr(c) if c else "end of file"
            raise json.JSONDecodeError(f"expected one of {chars!r}, found {found}", "", 0)
        self._pos += 1
        return c

    def value(self) -> Any:
        """Decode the next JSON value, reading more input until it is complete."""
        self.peek()
        while True:
            try:
                obj, end = self._decoder.raw_decode(self._buf, self._pos)
            except json.JSONDecodeError:
                if self._fill():
                    continue
                raise
            if end == len(self._buf) and not self._eof:
                # a number may continue in the next chunk: decode again with more input
                if self._buf[end - 1] not in "}]\"el" and self._fill():
                    continue
            self._pos = end
            return obj

    def at_end(self) -> bool:
        """True when only whitespace is left."""
        return self.peek() == ""


def _is_number(v: Any) -> bool:
    """JSON number (not a bool)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check_classification(cls: Any, where: str, out: list[str]) -> None:
    """Rules for ``properties.classification``."""
    if isinstance(cls, str):
        if ":" in cls:
            out.append(f"{where}: classification {cls!r} contains ':' (QuPath splits it into "
                       "derived classes)")
        return
    if not isinstance(cls, Mapping):
        out.append(f"{where}: classification must be a string or an object with name and color")
        return
    name = cls.get("name")
    names = cls.get("names")
    if name is None and isinstance(names, list) and names:
        # QuPath's own form for a derived class ("Tumor: Positive" -> ["Tumor", "Positive"])
        if not all(isinstance(n, str) and n and ":" not in n for n in names):
            out.append(f"{where}: classification 'names' must be non-empty strings without ':', "
                       f"got {names!r}")
    elif not isinstance(name, str) or not name:
        out.append(f"{where}: classification object has no string 'name'")
    elif ":" in name:
        out.append(f"{where}: class name {name!r} contains ':' (QuPath splits it into derived "
                   "classes)")
    if "color" not in cls:
        out.append(f"{where}: classification object has no 'color' (QuPath's import fails)")
        return
    color = cls["color"]
    if (
        not isinstance(color, list)
        or len(color) not in (3, 4)
        or not all(isinstance(c, int) and not isinstance(c, bool) for c in color)
    ):
        out.append(f"{where}: classification color must be 3 or 4 integers, got {color!r}")
    elif not all(0 <= c <= 255 for c in color):
        out.append(f"{where}: classification color values must be 0-255, got {color!r}")


def _check_measurement_value(name: Any, value: Any, where: str, out: list[str]) -> None:
    """A measurement must be a number or one of the strings "NaN", "inf", "-inf"."""
    if not isinstance(name, str):
        out.append(f"{where}: measurement name {name!r} is not a string")
    if _is_number(value) or (isinstance(value, str) and value in _NAN_STRINGS):
        return
    out.append(f"{where}: measurement {name!r} = {value!r} is not a number (or 'NaN', 'inf', "
               "'-inf')")


def _check_measurements(meas: Any, where: str, out: list[str]) -> None:
    """Rules for ``properties.measurements`` (object, or the older list of name/value)."""
    if isinstance(meas, Mapping):
        for name, value in meas.items():
            _check_measurement_value(name, value, where, out)
    elif isinstance(meas, list):
        for item in meas:
            if not isinstance(item, Mapping) or "name" not in item or "value" not in item:
                out.append(f"{where}: measurements list items must be {{'name', 'value'}} "
                           "objects")
                return
            _check_measurement_value(item["name"], item["value"], where, out)
    else:
        out.append(f"{where}: measurements must be an object {{name: number}}")


_NUMBER_TYPES: Final[frozenset[type]] = frozenset({int, float})


def _ring_xy(ring: Any) -> tuple[np.ndarray | None, str | None]:
    """The (n, 2) x/y array of a GeoJSON linear ring, or why QuPath cannot use the ring.

    Checks: an array of positions, each an array of >= 2 finite numbers (not booleans);
    >= 4 points; closed; at most 2 decimals.
    """
    if type(ring) is not list:
        return None, "ring is not an array of positions"
    if ring and (set(map(type, ring)) != {list} or min(map(len, ring)) < 2):
        bad = next(p for p in ring if type(p) is not list or len(p) < 2)
        return None, f"position {bad!r} is not an array of >= 2 numbers"
    xs = [p[0] for p in ring]
    ys = [p[1] for p in ring]
    if not set(map(type, xs)) | set(map(type, ys)) <= _NUMBER_TYPES:
        bad = next(p for p in ring if not {type(p[0]), type(p[1])} <= _NUMBER_TYPES)
        return None, f"position {bad!r} is not an array of numbers"
    xy = np.array([xs, ys], dtype=np.float64).T.reshape(-1, 2)
    if not np.isfinite(xy).all():
        return None, "ring has non-finite coordinates"
    if len(ring) < 4:
        return None, f"ring has {len(ring)} points (needs >= 4)"
    if xs[0] != xs[-1] or ys[0] != ys[-1]:
        return None, "ring is not closed (first point != last point)"
    off = np.round(xy, _DECIMALS) != xy
    if off.any():
        c = float(xy[off][0])
        return None, f"coordinate {c!r} has more than {_DECIMALS} decimals"
    return xy, None


def _check_geometry(geom: Any, where: str, out: list[str]) -> None:
    """Rules for a feature geometry: Polygon/MultiPolygon, closed rings, 2 decimals, valid on
    the 0.01 grid."""
    if not isinstance(geom, Mapping):
        out.append(f"{where}: geometry missing or not an object")
        return
    gtype = geom.get("type")
    coords = geom.get("coordinates")
    if gtype == "Polygon":
        polys = [coords]
    elif gtype == "MultiPolygon":
        polys = coords if isinstance(coords, list) else [None]
    else:
        out.append(f"{where}: geometry type {gtype!r} (expected Polygon or MultiPolygon)")
        return
    if not polys:
        out.append(f"{where}: empty {gtype}")
        return
    shells = []
    for poly in polys:
        if not isinstance(poly, list) or not poly:
            out.append(f"{where}: {gtype} coordinates must be a non-empty array of rings")
            return
        rings = []
        for ring in poly:
            xy, problem = _ring_xy(ring)
            if problem:
                out.append(f"{where}: {problem}")
                return
            rings.append(np.round(xy, _DECIMALS))  # the 0.01 grid QuPath snaps to
        shells.append((rings[0], rings[1:]))
    try:
        parts = [Polygon(shell, holes) for shell, holes in shells]
        shape = parts[0] if gtype == "Polygon" else MultiPolygon(parts)
        valid = shape.is_valid
        reason = "" if valid else shapely.is_valid_reason(shape)
    except (ValueError, GEOSException) as exc:
        valid, reason = False, str(exc)
    if not valid:
        out.append(f"{where}: polygon invalid after snapping to the 0.01 grid ({reason})")


def _check_feature(feat: Any, where: str, out: list[str]) -> None:
    """Every per-Feature rule of qupath-geojson.md."""
    if not isinstance(feat, Mapping) or feat.get("type") != "Feature":
        out.append(f"{where}: not a GeoJSON Feature object")
        return
    if "id" in feat:
        fid = feat["id"]
        if not isinstance(fid, str) or not _UUID_RE.fullmatch(fid):
            out.append(f"{where}: id {fid!r} is not a UUID string (QuPath ignores it)")
    if "objectType" in feat:
        out.append(f"{where}: objectType outside properties is ignored by QuPath")
    props = feat.get("properties")
    if props is None:
        props = {}
    if not isinstance(props, Mapping):
        out.append(f"{where}: properties must be an object")
        return
    otype = props.get("objectType")
    if otype is None:
        if "object_type" in props:
            out.append(f"{where}: properties.object_type (snake_case) makes QuPath log a "
                       "warning; write objectType")
            otype = props["object_type"]
        else:
            out.append(f"{where}: properties.objectType missing (QuPath imports it as an "
                       "annotation)")
    if otype is not None and otype not in _OBJECT_TYPES:
        out.append(f"{where}: objectType {otype!r} is not one of {sorted(_OBJECT_TYPES)}")
    if "classification" in props and props["classification"] is not None:
        _check_classification(props["classification"], where, out)
    if "measurements" in props and props["measurements"] is not None:
        _check_measurements(props["measurements"], where, out)
    if "name" in props and not isinstance(props["name"], (str, int, float)):
        out.append(f"{where}: name {props['name']!r} is not text (QuPath's import fails on it)")
    if "isLocked" in props and not isinstance(props["isLocked"], bool):
        out.append(f"{where}: isLocked {props['isLocked']!r} is not true/false")
    if "color" in props:
        color = props["color"]
        if isinstance(color, str) or isinstance(color, (bool, float)) or color is None:
            out.append(f"{where}: object color {color!r} is not an integer or [r, g, b] "
                       "(QuPath's import fails or ignores it)")
        elif isinstance(color, list) and (
            len(color) != 3 or not all(isinstance(c, int) and not isinstance(c, bool)
                                       for c in color)):
            out.append(f"{where}: object color {color!r} must be 3 integers (QuPath ignores "
                       "other arrays)")
    kids = props.get("childObjects", props.get("children"))
    if kids is not None and not isinstance(kids, list):
        out.append(f"{where}: childObjects must be an array of Features")
    elif kids:
        for k, child in enumerate(kids):
            _check_feature(child, f"{where}.childObjects[{k}]", out)
    _check_geometry(feat.get("geometry"), where, out)
    if otype == "cell" and "nucleusGeometry" in feat:
        _check_geometry(feat["nucleusGeometry"], f"{where}.nucleusGeometry", out)


def _walk_feature(stream: _JsonStream, where: str, out: _Problems) -> None:
    """Check the next feature of ``stream``, descending into ``properties.childObjects``
    child by child, so that a region annotation holding a million nuclei is checked without
    decoding them all at once."""
    if stream.peek() != "{":
        _check_feature(stream.value(), where, out)
        return
    stream.expect("{")
    feat: dict[str, Any] = {}
    n_children: int | None = None
    if stream.peek() == "}":
        stream.expect("}")
    else:
        while True:
            key = stream.value()
            if not isinstance(key, str):
                raise json.JSONDecodeError("object key is not a string", "", 0)
            stream.expect(":")
            if key == "properties" and stream.peek() == "{":
                stream.expect("{")
                props: dict[str, Any] = {}
                if stream.peek() == "}":
                    stream.expect("}")
                else:
                    while True:
                        pkey = stream.value()
                        if not isinstance(pkey, str):
                            raise json.JSONDecodeError("object key is not a string", "", 0)
                        stream.expect(":")
                        if pkey in ("childObjects", "children") and stream.peek() == "[":
                            stream.expect("[")
                            n_children = 0
                            if stream.peek() == "]":
                                stream.expect("]")
                            else:
                                while True:
                                    _walk_feature(stream, f"{where}.childObjects[{n_children}]",
                                                  out)
                                    n_children += 1
                                    if stream.expect(",]") == "]":
                                        break
                        else:
                            props[pkey] = stream.value()
                        if stream.expect(",}") == "}":
                            break
                feat[key] = props
            else:
                feat[key] = stream.value()
            if stream.expect(",}") == "}":
                break
    _check_feature(feat, where, out)


def _check_extension(path: Path) -> tuple[str | None, str | None]:
    """(problem or None, container kind: 'plain', 'gzip', 'zip' or None when unusable)."""
    name = path.name.lower()
    if name.endswith(".gz"):
        inner = name[: -len(".gz")]
        if inner.endswith((".geojson", ".json")):
            return None, "gzip"
        return (f"{path.name}: a .gz file must be named .geojson.gz or .json.gz (QuPath strips "
                ".gz and requires the inner extension)"), "gzip"
    if name.endswith((".geojson", ".json")):
        return None, "plain"
    if name.endswith(".zip"):
        return None, "zip"
    return (f"{path.name}: extension not read by QuPath (use .geojson, .json, .geojson.gz or "
            ".zip)"), None


class _Problems(list):
    """Problem list that stops growing past a limit (it still counts what it drops)."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit
        self.dropped = 0

    def append(self, item: str) -> None:  # type: ignore[override]
        if len(self) < self.limit:
            super().append(item)
        else:
            self.dropped += 1


def _walk_container(
    stream: _JsonStream, require_feature_collection: bool, out: _Problems
) -> int:
    """Validate the top level and every feature; returns the number of features seen."""
    first = stream.peek()
    if first == "[":
        if require_feature_collection:
            out.append("top level is a JSON array of features; write a FeatureCollection")
        stream.expect("[")
        n = 0
        if stream.peek() == "]":
            stream.expect("]")
            return 0
        while True:
            _walk_feature(stream, f"[{n}]", out)
            n += 1
            if stream.expect(",]") == "]":
                return n
    if first != "{":
        stream.value()  # raises the parse error, or decodes a scalar
        out.append("top level is not a GeoJSON object")
        return 0
    stream.expect("{")
    members: dict[str, Any] = {}
    n = 0
    saw_features = False
    if stream.peek() == "}":
        stream.expect("}")
    else:
        while True:
            key = stream.value()
            if not isinstance(key, str):
                raise json.JSONDecodeError("object key is not a string", "", 0)
            stream.expect(":")
            if key == "features" and stream.peek() == "[":
                saw_features = True
                stream.expect("[")
                if stream.peek() == "]":
                    stream.expect("]")
                else:
                    while True:
                        _walk_feature(stream, f"features[{n}]", out)
                        n += 1
                        if stream.expect(",]") == "]":
                            break
            else:
                members[key] = stream.value()
            if stream.expect(",}") == "}":
                break
    ftype = members.get("type")
    if ftype == "FeatureCollection":
        if not saw_features:
            out.append("FeatureCollection has no 'features' array")
    elif ftype == "Feature":
        if require_feature_collection:
            out.append("top level is a single Feature; write a FeatureCollection")
        _check_feature(members, "feature", out)
        n = 1
    elif ftype in ("Polygon", "MultiPolygon") and not require_feature_collection:
        _check_geometry(members, "geometry", out)
    else:
        out.append(f"top-level type {ftype!r}: expected FeatureCollection")
    return n


def _check_stream(
    binary: BinaryIO, label: str, require_feature_collection: bool, out: _Problems
) -> None:
    """Parse one (decompressed) JSON stream strictly and apply every rule."""
    text = io.TextIOWrapper(binary, encoding="utf-8", errors="strict")
    stream = _JsonStream(text)
    prefix = f"{label}: " if label else ""
    try:
        _walk_container(stream, require_feature_collection, out)
        if not stream.at_end():
            out.append(f"{prefix}extra data after the JSON value")
    except _StrictJSONError as exc:
        out.append(f"{prefix}not strict JSON: {exc}")
    except json.JSONDecodeError as exc:
        out.append(f"{prefix}not valid JSON: {exc.msg}")
    except UnicodeDecodeError as exc:
        out.append(f"{prefix}not UTF-8 text: {exc.reason}")
    except (OSError, EOFError, _gzip.BadGzipFile) as exc:
        out.append(f"{prefix}cannot read the file: {exc}")


def check_qupath_geojson(
    path: str | Path,
    *,
    require_feature_collection: bool = True,
    max_problems: int = 100,
) -> list[str]:
    """Check a GeoJSON file against every import rule of QuPath (``docs/qupath-geojson.md``).

    Checked: the file name (``.geojson``, ``.json``, ``.geojson.gz``/``.json.gz`` with the inner
    extension, ``.zip`` with ``.geojson``/``.json`` members); strict JSON (no NaN/Infinity
    literals, no trailing commas, UTF-8); the container (a FeatureCollection with a
    ``features`` array); per Feature: ``objectType`` inside ``properties`` with a known value
    (missing, snake_case or outside ``properties`` are reported), ``classification`` as a
    string or an object with ``name`` and a 3-4 integer ``color``, class names without ``:``,
    ``measurements`` as an object (or name/value list) of numbers or ``"NaN"``/``"inf"``/
    ``"-inf"``, a top-level ``id`` that is a UUID string, a Polygon/MultiPolygon geometry
    whose rings are closed with >= 4 finite points with at most 2 decimals, and validity after
    snapping to the 0.01-px grid (also for a cell's ``nucleusGeometry``); ``name`` as text,
    ``isLocked`` as true/false, an object ``color`` as an integer or 3 integers; and every
    nested Feature of ``properties.childObjects`` by the same rules (read child by child).

    The file is read incrementally (one feature at a time), so large slides can be checked.

    Parameters
    ----------
    path : str or pathlib.Path
        File to check.
    require_feature_collection : bool, default True
        Report other top levels (a bare array, a single Feature) as problems. Set False to
        check files QuPath itself exported (bare arrays of annotations), e.g. user regions.
    max_problems : int, default 100
        Report at most this many problems (a final line says how many more were found).

    Returns
    -------
    list of str
        One line per problem, naming the feature (``features[i]``); empty when the file is OK.
    """
    path = Path(path)
    out = _Problems(max_problems)
    if not path.is_file():
        return [f"{path}: no such file"]
    ext_problem, kind = _check_extension(path)
    if ext_problem:
        out.append(ext_problem)
    if kind == "zip":
        try:
            with zipfile.ZipFile(path) as zf:
                members = [m for m in zf.namelist()
                           if m.lower().endswith((".geojson", ".json"))]
                if not members:
                    out.append(f"{path.name}: zip holds no .geojson/.json file")
                for member in members:
                    with zf.open(member) as fh:
                        _check_stream(fh, member, require_feature_collection, out)
        except zipfile.BadZipFile as exc:
            out.append(f"{path.name}: not a zip file ({exc})")
    else:
        with open(path, "rb") as raw:
            magic = raw.read(2)
            raw.seek(0)
            is_gz = magic == b"\x1f\x8b"
            if kind == "gzip" and not is_gz:
                out.append(f"{path.name}: named .gz but not gzip-compressed")
            elif kind != "gzip" and is_gz:
                out.append(f"{path.name}: gzip-compressed but not named .gz")
            if is_gz:
                with _gzip.GzipFile(fileobj=raw, mode="rb") as fh:
                    _check_stream(fh, "", require_feature_collection, out)  # type: ignore[arg-type]
            else:
                _check_stream(raw, "", require_feature_collection, out)
    problems = list(out)
    if out.dropped:
        problems.append(f"... and {out.dropped} more problem(s)")
    return problems


def _iter_frames(frames: Iterable[pd.DataFrame] | pd.DataFrame) -> Iterator[pd.DataFrame]:
    """Accept a single DataFrame where an iterable of frames is expected."""
    if isinstance(frames, pd.DataFrame):
        yield frames
    else:
        yield from frames


def _iter_batches(
    frames: Iterable[pd.DataFrame] | pd.DataFrame, size: int = _FORMAT_BATCH
) -> Iterator[pd.DataFrame]:
    """Non-empty slices of at most ``size`` rows of each frame (bounds temporary memory)."""
    for frame in _iter_frames(frames):
        for start in range(0, len(frame), size):
            yield frame.iloc[start : start + size]

"""Nucleus identifiers and geometry cleaning: deterministic UUIDs and outlines made valid on the
0.01-pixel grid QuPath snaps every imported coordinate to.

:func:`clean_polygon` rounds an outline and checks it *after* rounding (invalid ones repaired,
largest polygon piece kept; degenerate ones dropped); :func:`clean_frame` applies the same
deterministic cleaning to a nucleus table up front, so that summaries count exactly the nuclei
the writers write.
"""

from __future__ import annotations

import hashlib
import math
import re
import uuid
from typing import Final

import numpy as np
import pandas as pd
import shapely
from shapely.errors import GEOSException
from shapely.geometry import Polygon
from shapely.geometry.base import BaseGeometry

__all__ = ["NUCLEUS_NAMESPACE", "nucleus_uuid", "nucleus_uuids", "clean_polygon", "clean_frame"]

#: Namespace of the deterministic nucleus UUIDs (uuid5). Never change it: re-imports of a slide's
#: nuclei into QuPath are recognisable only while the ids stay the same.
NUCLEUS_NAMESPACE: Final[uuid.UUID] = uuid.uuid5(uuid.NAMESPACE_URL, "wsi-nuclei/nucleus")

#: Grid QuPath (>= 0.6) snaps every imported coordinate to, in pixels, and its decimals.
_GRID: Final[float] = 0.01
_DECIMALS: Final[int] = 2

#: A UUID as Java's ``UUID.fromString`` and QuPath read it (use with ``fullmatch``).
_UUID_RE: Final[re.Pattern[str]] = re.compile(
    r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
)


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


def nucleus_uuids(
    slide_fingerprint: str, centroid_x: np.ndarray, centroid_y: np.ndarray
) -> list[str]:
    """:func:`nucleus_uuid` of many nuclei: the same strings, without a ``uuid.UUID`` each.

    The uuid5 is spelled out (SHA-1 of the namespace and the name, version 5 and RFC 4122
    variant bits, canonical hex), which is about 3x faster per nucleus than ``uuid.uuid5``.

    Raises
    ------
    ValueError
        If a centroid coordinate is not finite.
    """
    xs = np.asarray(centroid_x, np.float64)
    ys = np.asarray(centroid_y, np.float64)
    if not (np.isfinite(xs).all() and np.isfinite(ys).all()):
        bad = int(np.flatnonzero(~(np.isfinite(xs) & np.isfinite(ys)))[0])
        raise ValueError(f"nucleus centroid must be finite, got ({xs[bad]}, {ys[bad]})")
    ns, prefix, sha1 = NUCLEUS_NAMESPACE.bytes, f"{slide_fingerprint}|", hashlib.sha1
    out = []
    for x, y in zip(xs.tolist(), ys.tolist()):
        x = round(x, _DECIMALS) + 0.0  # as nucleus_uuid: Python's correctly rounded round()
        y = round(y, _DECIMALS) + 0.0
        h = bytearray(sha1(ns + f"{prefix}{x:.2f}|{y:.2f}".encode()).digest()[:16])
        h[6] = (h[6] & 0x0F) | 0x50  # version 5
        h[8] = (h[8] & 0x3F) | 0x80  # RFC 4122 variant
        t = h.hex()
        out.append(f"{t[:8]}-{t[8:12]}-{t[12:16]}-{t[16:20]}-{t[20:]}")
    return out


def _round_coords(coords: np.ndarray) -> np.ndarray:
    """Round an (n, 2) coordinate array to the 0.01 grid (nearest double to each 2-decimal)."""
    out = np.round(coords, _DECIMALS)
    out += 0.0  # no -0.0 in the output
    return out


def _is_good(poly: BaseGeometry | None) -> bool:
    """True for a non-empty, valid Polygon of positive area."""
    return isinstance(poly, Polygon) and not poly.is_empty and poly.is_valid and poly.area > 0.0


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

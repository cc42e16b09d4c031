"""The QuPath GeoJSON validator: :func:`check_qupath_geojson` applies every import rule of
QuPath documented in ``docs/qupath-geojson.md``, reading the file incrementally."""

from __future__ import annotations

import gzip as _gzip
import io
import json
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any, Final

import numpy as np
import shapely
from shapely.errors import GEOSException
from shapely.geometry import MultiPolygon, Polygon

from wsi_nuclei.export._geometry import _DECIMALS, _UUID_RE
from wsi_nuclei.export._jsonstream import _JsonStream, _StrictJSONError

__all__ = ["check_qupath_geojson"]

#: Object types QuPath reads from ``properties.objectType``.
_OBJECT_TYPES: Final[frozenset[str]] = frozenset(
    {"annotation", "detection", "cell", "tile", "tmaCore"}
)
_NAN_STRINGS: Final[frozenset[str]] = frozenset({"NaN", "inf", "-inf"})


def _is_number(v: Any) -> bool:
    """JSON number (not a bool)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check_classification(cls: Any, where: str, out: list[str]) -> None:
    """Rules for ``properties.classification``."""
    if isinstance(cls, str):
        if ":" in cls:
            out.append(
                f"{where}: classification {cls!r} contains ':' (QuPath splits it into "
                "derived classes)"
            )
        return
    if not isinstance(cls, Mapping):
        out.append(f"{where}: classification must be a string or an object with name and color")
        return
    name = cls.get("name")
    names = cls.get("names")
    if name is None and isinstance(names, list) and names:
        # QuPath's own form for a derived class ("Tumor: Positive" -> ["Tumor", "Positive"])
        if not all(isinstance(n, str) and n and ":" not in n for n in names):
            out.append(
                f"{where}: classification 'names' must be non-empty strings without ':', "
                f"got {names!r}"
            )
    elif not isinstance(name, str) or not name:
        out.append(f"{where}: classification object has no string 'name'")
    elif ":" in name:
        out.append(
            f"{where}: class name {name!r} contains ':' (QuPath splits it into derived classes)"
        )
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
    out.append(
        f"{where}: measurement {name!r} = {value!r} is not a number (or 'NaN', 'inf', '-inf')"
    )


def _check_measurements(meas: Any, where: str, out: list[str]) -> None:
    """Rules for ``properties.measurements`` (object, or the older list of name/value)."""
    if isinstance(meas, Mapping):
        for name, value in meas.items():
            _check_measurement_value(name, value, where, out)
    elif isinstance(meas, list):
        for item in meas:
            if not isinstance(item, Mapping) or "name" not in item or "value" not in item:
                out.append(f"{where}: measurements list items must be {{'name', 'value'}} objects")
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
            if problem or xy is None:
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
            out.append(
                f"{where}: properties.object_type (snake_case) makes QuPath log a "
                "warning; write objectType"
            )
            otype = props["object_type"]
        else:
            out.append(
                f"{where}: properties.objectType missing (QuPath imports it as an annotation)"
            )
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
            out.append(
                f"{where}: object color {color!r} is not an integer or [r, g, b] "
                "(QuPath's import fails or ignores it)"
            )
        elif isinstance(color, list) and (
            len(color) != 3
            or not all(isinstance(c, int) and not isinstance(c, bool) for c in color)
        ):
            out.append(
                f"{where}: object color {color!r} must be 3 integers (QuPath ignores other arrays)"
            )
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
    feat: dict[str, Any] = {}
    for key in stream.members():
        if key == "properties" and stream.peek() == "{":
            props: dict[str, Any] = {}
            for pkey in stream.members():
                if pkey in ("childObjects", "children") and stream.peek() == "[":
                    for k in stream.elements():
                        _walk_feature(stream, f"{where}.childObjects[{k}]", out)
                else:
                    props[pkey] = stream.value()
            feat[key] = props
        else:
            feat[key] = stream.value()
    _check_feature(feat, where, out)


def _check_extension(path: Path) -> tuple[str | None, str | None]:
    """(problem or None, container kind: 'plain', 'gzip', 'zip' or None when unusable)."""
    name = path.name.lower()
    if name.endswith(".gz"):
        inner = name[: -len(".gz")]
        if inner.endswith((".geojson", ".json")):
            return None, "gzip"
        return (
            f"{path.name}: a .gz file must be named .geojson.gz or .json.gz (QuPath strips "
            ".gz and requires the inner extension)"
        ), "gzip"
    if name.endswith((".geojson", ".json")):
        return None, "plain"
    if name.endswith(".zip"):
        return None, "zip"
    return (
        f"{path.name}: extension not read by QuPath (use .geojson, .json, .geojson.gz or .zip)"
    ), None


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


def _walk_container(stream: _JsonStream, require_feature_collection: bool, out: _Problems) -> int:
    """Validate the top level and every feature; returns the number of features seen."""
    first = stream.peek()
    if first == "[":
        if require_feature_collection:
            out.append("top level is a JSON array of features; write a FeatureCollection")
        n = 0
        for _ in stream.elements():
            _walk_feature(stream, f"[{n}]", out)
            n += 1
        return n
    if first != "{":
        stream.value()  # raises the parse error, or decodes a scalar
        out.append("top level is not a GeoJSON object")
        return 0
    members: dict[str, Any] = {}
    n = 0
    saw_features = False
    for key in stream.members():
        if key == "features" and stream.peek() == "[":
            saw_features = True
            for _ in stream.elements():
                _walk_feature(stream, f"features[{n}]", out)
                n += 1
        else:
            members[key] = stream.value()
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
    binary: IO[bytes] | _gzip.GzipFile, label: str, require_feature_collection: bool, out: _Problems
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
                members = [m for m in zf.namelist() if m.lower().endswith((".geojson", ".json"))]
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
                    _check_stream(fh, "", require_feature_collection, out)
            else:
                _check_stream(raw, "", require_feature_collection, out)
    problems = list(out)
    if out.dropped:
        problems.append(f"... and {out.dropped} more problem(s)")
    return problems

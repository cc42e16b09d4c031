"""The nucleus Feature text of the GeoJSON writers, formatted with vectorised numpy code.

:func:`_feature_chunk` writes one detection Feature per nucleus exactly as ``json.dumps`` with
compact separators would (coordinates on the 0.01 grid, measurements of
:data:`wsi_nuclei.schema.MEASUREMENTS`, NaN omitted), at a fraction of the cost: numbers are
turned into digit matrices (:func:`_number_chars`) and packed row by row (:func:`_rows_text`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, Final

import numpy as np
import pandas as pd
import shapely

from wsi_nuclei import schema
from wsi_nuclei.export._geometry import _DECIMALS, _UUID_RE, _clean_geometries, _round_coords


def _dumps(obj: Any) -> str:
    """Strict, compact, ASCII JSON (``µ`` is escaped, so any reader's charset works)."""
    return json.dumps(obj, ensure_ascii=True, allow_nan=False, separators=(",", ":"))


def _classification_objects() -> dict[int, dict[str, Any]]:
    """QuPath classification objects per class id."""
    out: dict[int, dict[str, Any]] = {}
    for cid in schema.CLASS_COLORS:
        out[cid] = {"name": schema.class_name(cid), "color": list(schema.CLASS_COLORS[cid])}
    return out


def _classification_texts() -> dict[int, bytes]:
    """JSON text of the classification object per class id."""
    return {cid: _dumps(obj).encode("ascii") for cid, obj in _classification_objects().items()}


def _ragged(polys: np.ndarray) -> tuple[object, np.ndarray, tuple[np.ndarray, ...]]:
    """``shapely.to_ragged_array`` of a copy: shapely < 2.2 needs a writable array, and pandas 3
    (copy-on-write) hands out read-only ones."""
    return shapely.to_ragged_array(np.array(polys, dtype=object))


def _polygon_coordinates(polys: np.ndarray) -> list[list[list[list[float]]]]:
    """GeoJSON Polygon ``coordinates`` (lists of rings of [x, y]) for an array of Polygons."""
    if len(polys) == 0:
        return []
    _, coords, (ring_off, poly_off) = _ragged(polys)
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
    _, coords, (ring_off, poly_off) = _ragged(polys)
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
    buf, pt_off = _rows_text(
        [
            (head, head_mask),
            _const("[", n_pts),
            _number_chars(xy[:, 0], _DECIMALS),
            _const(",", n_pts),
            _number_chars(xy[:, 1], _DECIMALS),
            _const("]", n_pts),
            (tail, tail_mask),
        ]
    )
    return buf, pt_off[ring_off[poly_off]]


def _measurements_text(frame: pd.DataFrame) -> tuple[bytes, np.ndarray]:
    """``measurements`` object text of each nucleus (NaN values omitted), and the offsets.

    The text of a row is exactly ``json.dumps(measurements, separators=(",", ":"))`` of the
    rounded values, keys in :data:`wsi_nuclei.schema.MEASUREMENTS` order."""
    n = len(frame)
    entries: list[tuple[str, tuple[np.ndarray, np.ndarray]]] = []
    for col, (name, decimals) in schema.MEASUREMENTS.items():
        if col in frame.columns:
            entries.append((name, _number_chars(frame[col].to_numpy(np.float64), decimals)))
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
        b"".join(
            (
                start,
                ids[i],
                geom,
                geo_buf[geo_off[i] : geo_off[i + 1]],
                props,
                classes.get(class_ids[i], unknown),
                meas,
                mea_buf[mea_off[i] : mea_off[i + 1]],
                b"}}",
            )
        )
        for i in range(n)
    ]


def _require(frame: pd.DataFrame, columns: Iterable[str], what: str) -> None:
    """Raise ValueError naming the columns of ``columns`` that ``frame`` lacks."""
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(f"{what}: nucleus table lacks column(s) {', '.join(missing)}")


def _detection_batches(
    frames: Iterable[pd.DataFrame] | pd.DataFrame, what: str, counts: dict[str, int]
) -> Iterator[tuple[pd.DataFrame, list[bytes]]]:
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


def _iter_frames(frames: Iterable[pd.DataFrame] | pd.DataFrame) -> Iterator[pd.DataFrame]:
    """Accept a single DataFrame where an iterable of frames is expected."""
    if isinstance(frames, pd.DataFrame):
        yield frames
    else:
        yield from frames


def _iter_batches(
    frames: Iterable[pd.DataFrame] | pd.DataFrame, size: int | None = None
) -> Iterator[pd.DataFrame]:
    """Non-empty slices of at most ``size`` rows (default :data:`_FORMAT_BATCH`, read at call
    time) of each frame (bounds temporary memory)."""
    size = _FORMAT_BATCH if size is None else size
    for frame in _iter_frames(frames):
        for start in range(0, len(frame), size):
            yield frame.iloc[start : start + size]

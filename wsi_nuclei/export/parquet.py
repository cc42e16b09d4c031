"""The nuclei GeoParquet (1.1.0): every :data:`wsi_nuclei.schema.COLUMNS` column typed, the
cleaned outlines as WKB, streamed into row groups (``nuclei.parquet``)."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Final

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import shapely

from wsi_nuclei import schema
from wsi_nuclei._io import atomic_path
from wsi_nuclei.export._format import _iter_frames, _require
from wsi_nuclei.export._geometry import _clean_geometries

__all__ = ["write_nuclei_parquet"]

#: Arrow types of the GeoParquet columns (geometry is WKB).
_ARROW_TYPES: Final[dict[str, pa.DataType]] = {
    "str": pa.string(),
    "int8": pa.int8(),
    "int32": pa.int32(),
    "float32": pa.float32(),
    "float64": pa.float64(),
}
_GEOPARQUET_VERSION: Final[str] = "1.1.0"


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
                bbox = [
                    min(bbox[0], b[0]),
                    min(bbox[1], b[1]),
                    max(bbox[2], b[2]),
                    max(bbox[3], b[3]),
                ]
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

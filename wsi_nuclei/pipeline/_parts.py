"""Part files: one GeoParquet file per finished block under ``<out>/.work/`` (written to a
temporary name, then renamed, so a part exists exactly when it is complete), read back on
resume and for stitching.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd

from .._io import atomic_path
from .plan import RunPlan

_STATS_KEY = b"wsi_nuclei_block_stats"


def _part_path(parts: Path, block: tuple[int, int]) -> Path:
    """Part file of ``block`` (row, column) under the parts folder."""
    return parts / f"r{block[0]:05d}_c{block[1]:05d}.parquet"


def save_part(frame: pd.DataFrame, stats: dict[str, Any], path: Path) -> None:
    """Write a block's table with its stats in the file's key-value metadata, atomically.

    The table is built column by column from the frame's arrays (geometries as WKB), without
    pandas metadata: :func:`load_part` gives back the same columns, dtypes and a default index.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq
    import shapely

    cols = {}
    for name in frame.columns:
        v = frame[name].to_numpy()
        cols[str(name)] = pa.array(shapely.to_wkb(v) if name == "geometry" and len(v) else v)
    table = pa.table(cols, metadata={_STATS_KEY: json.dumps(stats).encode()})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def load_part(path: Path) -> tuple[pd.DataFrame, dict[str, Any]]:
    """A block's table and stats (see :func:`save_part`)."""
    import pyarrow.parquet as pq
    import shapely

    table = pq.read_table(path)
    stats = json.loads((table.schema.metadata or {}).get(_STATS_KEY, b"{}"))
    f = table.to_pandas()
    f["geometry"] = (
        shapely.from_wkb(f["geometry"].to_numpy()) if len(f) else pd.Series(dtype=object)
    )
    return f, stats


def load_part_stats(path: Path) -> dict[str, Any]:
    """A block's stats alone (see :func:`save_part`), from the file's footer: no rows are read."""
    import pyarrow.parquet as pq

    return json.loads((pq.read_schema(path).metadata or {}).get(_STATS_KEY, b"{}"))


def _finished_parts(parts: Path, plan: RunPlan) -> set[tuple[int, int]]:
    """Blocks whose part file is complete and readable (anything else is redone)."""
    import pyarrow.parquet as pq

    done = set()
    for b in plan.active:
        p = _part_path(parts, b)
        if not p.is_file():
            continue
        try:
            if _STATS_KEY in (pq.read_schema(p).metadata or {}):
                done.add(b)
                continue
        except Exception:  # a damaged part: redo the block
            pass
        p.unlink(missing_ok=True)
    return done

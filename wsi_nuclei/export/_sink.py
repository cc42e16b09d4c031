"""Where the GeoJSON writers write: a checked file name and a (gzipped, deterministic) stream
into a temporary file renamed into place on success, and the FeatureCollection opening."""

from __future__ import annotations

import contextlib
import gzip as _gzip
import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, BinaryIO, cast

from wsi_nuclei._io import atomic_path
from wsi_nuclei.export._format import _dumps


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
    return cast(
        BinaryIO,
        _gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=compresslevel, mtime=0),
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

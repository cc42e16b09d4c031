"""The QuPath hierarchy in one file (``qupath.geojson.gz``): region annotations holding their
nested regions and their nuclei as ``childObjects``, written in bounded memory through a
temporary spill file."""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import pandas as pd

from wsi_nuclei.export._format import _detection_batches, _dumps
from wsi_nuclei.export._sink import _atomic_sink, _collection_head, _geojson_path
from wsi_nuclei.export.annotations import (
    _region_feature,
    _RegionLike,
    _summaries_by_region,
    region_annotation_ids,
    region_parents,
)

__all__ = ["write_qupath_geojson"]


def _raise_disk_error(exc: OSError, folder: Path, name: str) -> None:
    """Raise the one-line OutputError of a full or read-only disk (as ``atomic_path`` does)."""
    from wsi_nuclei._io import _DISK_ERRNOS
    from wsi_nuclei.errors import OutputError

    if exc.errno in _DISK_ERRNOS:
        raise OutputError(
            f"{folder}: cannot write the temporary file of {name} "
            f"({exc.strerror or exc}); free space and rerun to resume"
        ) from None


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
                group = np.array([index_of.get(int(u), -1) for u in uniq.tolist()], np.int64)[
                    inverse
                ]
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

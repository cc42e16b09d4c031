"""Pieces the metric modules share: array aliases, compact instance ids and a NaN-skipping mean."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import numpy as np
import numpy.typing as npt

IntArray = npt.NDArray[np.integer[Any]]
FloatArray = npt.NDArray[np.floating[Any]]


def compact_ids(inst: npt.ArrayLike, name: str) -> tuple[IntArray, IntArray, IntArray]:
    """Map the ids of an instance map to ``1..n`` (0 stays background).

    Returns ``(labels, index, area)``: the present ids (ascending), the flat image of compact
    indices (0 = background, ``k`` = ``labels[k - 1]``) and the area of each instance.
    """
    arr = np.asarray(inst)
    if arr.dtype == bool:
        arr = arr.astype(np.uint8)
    if not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"{name} must be an integer instance map, got dtype {arr.dtype}")
    flat = arr.ravel()
    if flat.size == 0:
        empty = np.zeros(0, np.int64)
        return empty, empty, empty
    if flat.min() < 0:
        raise ValueError(f"{name} has negative ids")
    top = int(flat.max())
    if top <= 4 * flat.size + 65536:
        counts = np.bincount(flat, minlength=top + 1)
        labels = np.flatnonzero(counts[1:]) + 1
        lut = np.zeros(top + 1, np.int64)
        lut[labels] = np.arange(1, labels.size + 1)
        return labels.astype(np.int64), lut[flat], counts[labels].astype(np.int64)
    uniq, index, counts = np.unique(flat, return_inverse=True, return_counts=True)
    if uniq[0] == 0:
        return uniq[1:].astype(np.int64), index.astype(np.int64), counts[1:].astype(np.int64)
    return uniq.astype(np.int64), index.astype(np.int64) + 1, counts.astype(np.int64)


def nanmean(values: Iterable[float]) -> float:
    """Mean of the values that are not NaN; NaN when there are none."""
    arr = np.asarray([float(v) for v in values], np.float64)
    arr = arr[~np.isnan(arr)]
    return float(arr.mean()) if arr.size else math.nan

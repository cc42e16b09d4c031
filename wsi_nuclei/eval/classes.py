"""PanNuke class ids and the ``allowed`` bitmask sets of the ground truth (evaluation groups).

A true nucleus whose class is only known up to a set of PanNuke classes carries an ``allowed``
bitmask: bit ``c - 1`` set when the nucleus may be class ``c``; 31 (all five bits) is unknown.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import numpy.typing as npt

from ..schema import CLASS_NAMES
from ._common import IntArray

__all__ = [
    "PANNUKE_CLASS_IDS",
    "UNKNOWN_ALLOWED",
    "classes_to_allowed",
    "allowed_name",
    "default_class_groups",
]

#: PanNuke class ids evaluated by default (1 Neoplastic .. 5 Epithelial), from the schema.
PANNUKE_CLASS_IDS: tuple[int, ...] = tuple(CLASS_NAMES)
#: ``allowed`` value of a nucleus whose class is unknown (all five bits set).
UNKNOWN_ALLOWED: int = 31
#: Readable names of the composite allowed sets used by the datasets.
_SET_NAMES: dict[int, str] = {30: "Non-neoplastic"}


def classes_to_allowed(classes: npt.ArrayLike) -> IntArray:
    """Allowed bitmask of exact PanNuke classes: ``1 << (c - 1)``, and 31 (unknown) for 0.

    Parameters
    ----------
    classes : array_like of int
        PanNuke class ids 0..5.

    Returns
    -------
    ndarray of int64
        Same shape, values in {1, 2, 4, 8, 16, 31}.
    """
    c = np.asarray(classes).astype(np.int64)
    if c.size and (c.min() < 0 or c.max() > 5):
        raise ValueError("PanNuke class ids must be in 0..5")
    return np.where(c > 0, np.left_shift(1, np.maximum(c - 1, 0)), UNKNOWN_ALLOWED)


def allowed_name(mask: int) -> str:
    """Readable name of an allowed set: ``"Neoplastic|Epithelial"`` for 17,
    ``"Non-neoplastic"`` for 30, ``"Unknown"`` for 31."""
    mask = int(mask)
    if not 1 <= mask <= UNKNOWN_ALLOWED:
        raise ValueError(f"allowed mask must be in 1..31, got {mask}")
    if mask == UNKNOWN_ALLOWED:
        return "Unknown"
    if mask in _SET_NAMES:
        return _SET_NAMES[mask]
    return "|".join(CLASS_NAMES[c] for c in PANNUKE_CLASS_IDS if mask >> (c - 1) & 1)


def default_class_groups(allowed_values_present: Iterable[int]) -> dict[str, int]:
    """Evaluation class groups: one per distinct allowed set found in the ground truth.

    Unknown (31) and 0 are dropped. Groups are ordered by mask value and named with
    :func:`allowed_name`, e.g. CoNSeP ``{2, 4, 17, 31}`` gives
    ``{"Inflammatory": 2, "Connective": 4, "Neoplastic|Epithelial": 17}`` and exactly-labelled
    PanNuke data one group per class.

    Parameters
    ----------
    allowed_values_present : iterable of int
        Allowed bitmasks of the true nuclei (duplicates fine; an array works).

    Returns
    -------
    dict of str to int
        ``{group name: allowed bitmask}``.
    """
    values = sorted({int(v) for v in np.asarray(list(allowed_values_present)).ravel()})
    return {allowed_name(v): v for v in values if 0 < v < UNKNOWN_ALLOWED}

"""The resolution (µm/px) policy: candidates found in the metadata and their precedence.

Each reader lists the :class:`MppCandidate` values its metadata holds, in precedence order (see
:mod:`wsi_nuclei.slide`); :func:`resolve_mpp` puts a user value first and takes the first
plausible one.
"""

from __future__ import annotations

import math
import re
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import MissingMppError

__all__ = [
    "MPP_RANGE",
    "MppCandidate",
    "float_or_none",
    "resolution_candidate",
    "resolve_mpp",
    "tifffile_candidates",
]

#: Plausible µm/px range; values outside it are treated as missing.
MPP_RANGE: tuple[float, float] = (0.05, 20.0)


@dataclass(frozen=True)
class MppCandidate:
    """A resolution found in the metadata: µm/px along x and y, and where it came from."""

    x: float
    y: float
    source: str

    @property
    def plausible(self) -> bool:
        lo, hi = MPP_RANGE
        return all(math.isfinite(v) and lo <= v <= hi for v in (self.x, self.y))


def float_or_none(value: Any) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) and out > 0 else None


def resolve_mpp(
    candidates: Sequence[MppCandidate], user_mpp: float | None, name: str, require: bool
) -> tuple[tuple[float, float] | None, str]:
    """Apply the resolution precedence; raise :class:`MissingMppError` when nothing usable."""
    lo, hi = MPP_RANGE
    if user_mpp is not None:
        value = float_or_none(user_mpp)
        if value is None or not lo <= value <= hi:
            raise MissingMppError(
                f"--mpp {user_mpp} is not a plausible resolution (expected {lo}..{hi} µm/px)"
            )
        return (value, value), "user:--mpp"
    for cand in candidates:
        if cand.plausible:
            return (cand.x, cand.y), cand.source
    if not require:
        return None, "unknown"
    if candidates:
        c = candidates[0]
        raise MissingMppError(
            f"{name}: implausible resolution {c.x:.4g} µm/px from {c.source} "
            f"(expected {lo}..{hi}); pass --mpp"
        )
    raise MissingMppError(f"{name}: no microns-per-pixel in the slide metadata; pass --mpp")


_APERIO_MPP = re.compile(r"\|\s*MPP\s*=\s*([0-9.eE+-]+)")
_OME_UNITS = {
    "µm": 1.0,
    "um": 1.0,
    "μm": 1.0,  # greek mu
    "micron": 1.0,
    "nm": 1e-3,
    "Å": 1e-4,
    "mm": 1e3,
    "cm": 1e4,
    "m": 1e6,
}


def _aperio_candidate(description: str | None) -> MppCandidate | None:
    if not description or not description.startswith("Aperio"):
        return None
    m = _APERIO_MPP.search(description)
    value = float_or_none(m.group(1)) if m else None
    return MppCandidate(value, value, "aperio:MPP") if value else None


def _ome_candidate(ome_xml: str | None) -> MppCandidate | None:
    if not ome_xml:
        return None
    try:
        root = ET.fromstring(ome_xml)
    except ET.ParseError:
        return None
    for el in root.iter():
        if el.tag.rsplit("}", 1)[-1] != "Pixels":
            continue
        x = float_or_none(el.get("PhysicalSizeX"))
        y = float_or_none(el.get("PhysicalSizeY"))
        if x is None:
            return None
        ux = _OME_UNITS.get(el.get("PhysicalSizeXUnit", "µm"))
        uy = _OME_UNITS.get(el.get("PhysicalSizeYUnit", "µm"))
        if ux is None:
            return None
        x *= ux
        y = y * uy if (y is not None and uy is not None) else x
        return MppCandidate(x, y, "ome:PhysicalSizeX")
    return None


def resolution_candidate(
    xres: float | None, yres: float | None, unit: str | int | None
) -> MppCandidate | None:
    """TIFF XResolution/YResolution (pixels per unit) to µm/px; unit NONE is ignored."""
    if isinstance(unit, str):
        unit = {"inch": 2, "centimeter": 3}.get(unit.strip().lower(), 1)
    scale = {2: 25400.0, 3: 10000.0}.get(int(unit) if unit is not None else 2)
    if scale is None or xres is None:
        return None
    yres = yres or xres
    return MppCandidate(scale / xres, scale / yres, "tiff:XResolution")


def tifffile_candidates(tf: Any) -> list[MppCandidate]:
    """Resolution candidates of a :class:`tifffile.TiffFile` (first page)."""
    out: list[MppCandidate] = []
    try:
        page = tf.pages.first
    except Exception:  # noqa: BLE001 - a broken file simply has no candidates
        return out
    cand = _aperio_candidate(page.description)
    if cand:
        out.append(cand)
    if tf.is_ome:
        cand = _ome_candidate(tf.ome_metadata)
        if cand:
            out.append(cand)
    tags = page.tags
    if "XResolution" in tags:

        def _ratio(v: Any) -> float | None:
            try:
                return float_or_none(v[0] / v[1]) if isinstance(v, tuple) else float_or_none(v)
            except ZeroDivisionError:
                return None

        unit = tags["ResolutionUnit"].value if "ResolutionUnit" in tags else 2
        cand = resolution_candidate(
            _ratio(tags["XResolution"].value),
            _ratio(tags["YResolution"].value) if "YResolution" in tags else None,
            int(unit),
        )
        if cand:
            out.append(cand)
    return out

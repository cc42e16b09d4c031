"""The ``tiffslide`` backend: TIFF-based slides (Aperio SVS, OME-TIFF, generic pyramidal TIFF)."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from .._rgb import to_rgb_uint8
from ._base import Reader
from ._mpp import MppCandidate, float_or_none, tifffile_candidates
from ._registry import register_backend


class _TiffSlideReader(Reader):
    name = "tiffslide"

    def __init__(self, path: Path) -> None:
        import tiffslide

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self._ts = tiffslide.TiffSlide(str(path))
        props = {str(k): str(v) for k, v in self._ts.properties.items() if v is not None}
        self.properties = props
        tf = self._ts.ts_tifffile
        self.vendor = props.get("tiffslide.vendor") or ("ome-tiff" if tf.is_ome else "generic-tiff")
        self.level_dimensions = tuple((int(w), int(h)) for w, h in self._ts.level_dimensions)
        self.level_downsamples = tuple(float(d) for d in self._ts.level_downsamples)
        self._candidates = tifffile_candidates(tf)
        x = float_or_none(props.get("tiffslide.mpp-x"))
        if x:
            y = float_or_none(props.get("tiffslide.mpp-y")) or x
            self._candidates.append(MppCandidate(x, y, "tiffslide:tiffslide.mpp-x"))

    def _level0_location(self, level: int, v: int) -> int:
        """A level-0 coordinate that tiffslide maps back exactly to level coordinate ``v``."""
        ds = self.level_downsamples[level]
        loc = int(round(v * ds))
        while int(loc / ds) < v:
            loc += 1
        while loc > 0 and int(loc / ds) > v:
            loc -= 1
        return loc

    def read(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        loc = (self._level0_location(level, x), self._level0_location(level, y))
        arr = self._ts.read_region(loc, level, (w, h), as_array=True, padding=True)
        return to_rgb_uint8(arr)

    def mpp_candidates(self) -> list[MppCandidate]:
        return list(self._candidates)

    def close(self) -> None:
        self._ts.close()


register_backend(
    "tiffslide",
    _TiffSlideReader,
    containers=("tiff",),
    extensions=(".svs", ".tif", ".tiff", ".qptiff"),
    priority=20,
)

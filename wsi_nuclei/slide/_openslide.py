"""The ``openslide`` backend: every format OpenSlide reads, in the QuPath (bounds) frame."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from .._rgb import to_rgb_uint8
from ._base import Reader
from ._mpp import MppCandidate, float_or_none, resolution_candidate
from ._registry import register_backend


class _OpenSlideReader(Reader):
    name = "openslide"

    def __init__(self, path: Path) -> None:
        import openslide

        self._osr = openslide.OpenSlide(str(path))
        props = {str(k): str(v) for k, v in self._osr.properties.items()}
        self.properties = props
        self.vendor = props.get("openslide.vendor", "unknown")
        full = tuple((int(w), int(h)) for w, h in self._osr.level_dimensions)
        self.level_downsamples = tuple(float(d) for d in self._osr.level_downsamples)
        bx = float_or_none(props.get("openslide.bounds-x")) or 0.0
        by = float_or_none(props.get("openslide.bounds-y")) or 0.0
        bw = float_or_none(props.get("openslide.bounds-width"))
        bh = float_or_none(props.get("openslide.bounds-height"))
        self.offset = (int(bx), int(by))
        if bw and bh:
            self.level_dimensions = tuple(
                (int(math.ceil(bw / d)), int(math.ceil(bh / d))) for d in self.level_downsamples
            )
        else:
            self.level_dimensions = full

    def read(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        ds = self.level_downsamples[level]
        loc = (int(round(x * ds)) + self.offset[0], int(round(y * ds)) + self.offset[1])
        img = self._osr.read_region(loc, level, (w, h))
        return to_rgb_uint8(np.asarray(img))

    def mpp_candidates(self) -> list[MppCandidate]:
        p = self.properties
        out: list[MppCandidate] = []
        x, y = float_or_none(p.get("openslide.mpp-x")), float_or_none(p.get("openslide.mpp-y"))
        if x:
            out.append(MppCandidate(x, y or x, "openslide:openslide.mpp-x"))
        a = float_or_none(p.get("aperio.MPP"))
        if a:
            out.append(MppCandidate(a, a, "aperio:MPP"))
        cand = resolution_candidate(
            float_or_none(p.get("tiff.XResolution")),
            float_or_none(p.get("tiff.YResolution")),
            p.get("tiff.ResolutionUnit"),
        )
        if cand:
            out.append(cand)
        return out

    def close(self) -> None:
        self._osr.close()


# the formats OpenSlide reads (a .ome.tif(f) ends in .tif(f))
register_backend(
    "openslide",
    _OpenSlideReader,
    containers=("tiff", "dicom"),
    extensions=(
        ".svs",
        ".tif",
        ".tiff",
        ".ndpi",
        ".vms",
        ".vmu",
        ".scn",
        ".mrxs",
        ".svslide",
        ".bif",
    ),
    priority=10,
)

"""The ``image`` backend: plain images (PNG, JPEG, BMP, GIF, flat TIFF) decoded into memory."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from .._rgb import pil_to_rgb, to_rgb_uint8
from ._base import Reader
from ._mpp import MppCandidate, float_or_none, tifffile_candidates
from ._registry import register_backend, sniff


class _ImageReader(Reader):
    """Plain images (PNG/JPEG/BMP/flat TIFF) decoded fully into memory: for ROIs and TMA cores."""

    name = "image"

    def __init__(self, path: Path) -> None:
        self._candidates: list[MppCandidate] = []
        self.properties = {}
        arr: np.ndarray | None = None
        if sniff(path) == "tiff":
            import tifffile

            with tifffile.TiffFile(str(path)) as tf:
                series = tf.series[0]
                page = series.pages[0] if series.pages else tf.pages.first
                _check_image_size(int(page.imagewidth) * int(page.imagelength))
                data = series.asarray()
                axes = series.axes
                self._candidates = tifffile_candidates(tf)
                self.properties["tiff.axes"] = axes
            arr = _tiff_array_to_yxs(data, axes)
            self.vendor = "tiff"
        else:
            with Image.open(path) as img:
                _check_image_size(img.width * img.height)
                img.load()
                self.vendor = (img.format or "image").lower()
                self.properties["image.format"] = str(img.format)
                self.properties["image.mode"] = img.mode
                dpi = img.info.get("dpi")
                if dpi:
                    dx, dy = float_or_none(dpi[0]), float_or_none(dpi[1])
                    if dx:
                        self._candidates.append(
                            MppCandidate(25400.0 / dx, 25400.0 / (dy or dx), "image:dpi")
                        )
                arr = pil_to_rgb(img)
        self._arr = to_rgb_uint8(arr)
        h, w = self._arr.shape[:2]
        self.level_dimensions = ((w, h),)
        self.level_downsamples = (1.0,)

    def read(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        return self._arr[y : y + h, x : x + w].copy()

    def mpp_candidates(self) -> list[MppCandidate]:
        return list(self._candidates)


#: Largest plain image (pixels) the "image" backend decodes into memory (about 1.5 GB RGB).
_IMAGE_MAX_PIXELS = 500_000_000


def _check_image_size(n_pixels: int) -> None:
    if n_pixels > _IMAGE_MAX_PIXELS:
        raise ValueError(
            f"{n_pixels} pixels is too large to decode into memory; use a pyramidal TIFF"
        )


def _tiff_array_to_yxs(data: np.ndarray, axes: str) -> np.ndarray:
    """Reduce a tifffile series array to (Y, X[, channels]); extra axes take their first plane."""
    chan = "S" if "S" in axes else ("C" if "C" in axes else "")
    keep = ("Y", "X", chan) if chan else ("Y", "X")
    data = data[tuple(slice(None) if ax in keep else 0 for ax in axes)]
    kept = [ax for ax in axes if ax in keep]
    if chan:
        data = np.moveaxis(data, kept.index(chan), -1)
        if data.shape[-1] > 4:
            data = data[..., :3]
    return data


register_backend(
    "image",
    _ImageReader,
    containers=("tiff", "png", "jpeg", "image"),
    extensions=(".png", ".jpg", ".jpeg"),
    priority=40,
)

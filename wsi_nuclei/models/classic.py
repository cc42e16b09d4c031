"""Classical no-weights baseline and a null model for engine benchmarks.

``classic``: colour deconvolution to haematoxylin (Ruifrok & Johnston, scikit-image's
``rgb2hed``), a *fixed* optical-density threshold (no per-tile Otsu, so a nucleus seen in two
overlapping tiles is segmented identically — exact stitching), hole filling and opening, then a
distance-transform watershed to split touching nuclei. Classes are unknown (class 0).

``null``: no network at all: emits the same small pattern of disc-shaped "nuclei" in every
tile's output window (no image analysis), so that a benchmark measures the engine alone —
reading, tiling, ownership, measurements and writers — without model cost.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage as ndi
from skimage.color import rgb2hed
from skimage.feature import peak_local_max
from skimage.segmentation import watershed

from .base import InstanceResult


@dataclass(frozen=True)
class ClassicParams:
    """Parameters of the classical segmentation (pixel sizes at 0.25 µm/px)."""

    h_threshold: float = 0.04  # haematoxylin optical density (tuned on the MoNuSeg/CoNSeP validation split)
    min_area_px: int = 40
    max_area_px: int = 6000
    min_distance_px: int = 8
    smooth_sigma: float = 1.0


def classic_instances(rgb: np.ndarray, params: ClassicParams = ClassicParams()) -> InstanceResult:
    """Segment nuclei in one RGB tile with the classical pipeline.

    Parameters
    ----------
    rgb : ndarray of uint8, shape (H, W, 3)
    params : ClassicParams

    Returns
    -------
    InstanceResult
        Instances 1..N (class 0, probability = mean normalised haematoxylin density).
    """
    h = rgb2hed(rgb)[..., 0]
    h = ndi.gaussian_filter(h, params.smooth_sigma)
    fg = h > params.h_threshold
    fg = ndi.binary_opening(fg, iterations=1)
    fg = ndi.binary_fill_holes(fg)
    dist = ndi.distance_transform_edt(fg)
    lab, n = ndi.label(fg)
    if n == 0:
        z = np.zeros(0)
        return InstanceResult(np.zeros(rgb.shape[:2], np.int32), z.astype(np.int32), z.astype(np.int8), z.astype(np.float32))
    peaks = peak_local_max(ndi.gaussian_filter(dist, 1.0), min_distance=params.min_distance_px, labels=lab, exclude_border=False)
    markers = np.zeros(lab.shape, np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    # components without a peak keep one marker at their maximum
    missing = np.setdiff1d(np.arange(1, n + 1), np.unique(lab[markers > 0]))
    if len(missing):
        pos = ndi.maximum_position(dist, lab, missing)
        for k, (y, x) in enumerate(pos, start=len(peaks) + 1):
            markers[y, x] = k
    inst = watershed(-dist, markers, mask=fg).astype(np.int32)
    sizes = np.bincount(inst.ravel())
    bad = (sizes < params.min_area_px) | (sizes > params.max_area_px)
    bad[0] = False
    inst[bad[inst]] = 0
    present = np.unique(inst)
    present = present[present > 0]
    lut = np.zeros(int(inst.max()) + 1, np.int32)
    lut[present] = np.arange(1, len(present) + 1)
    inst = lut[inst]
    n = len(present)
    labels = np.arange(1, n + 1, dtype=np.int32)
    mean_h = ndi.mean(h, inst, labels) if n else np.zeros(0)
    prob = np.clip(np.asarray(mean_h) / (4 * params.h_threshold), 0, 1).astype(np.float32)
    return InstanceResult(inst, labels, np.zeros(n, np.int8), prob, None)


class ClassicModel:
    """The ``classic`` registry entry: all work happens in :meth:`postprocess` (CPU)."""

    def __init__(self, spec: Any, params: ClassicParams = ClassicParams()) -> None:
        self.spec = spec
        self.params = params
        self.device = "cpu"

    def infer(self, batch: np.ndarray) -> list[np.ndarray]:
        return [tile for tile in batch]

    def postprocess(self, raw: np.ndarray) -> InstanceResult:
        return classic_instances(raw, self.params)


class NullModel:
    """The ``null`` registry entry: a fixed pattern of discs per tile, for engine benchmarks."""

    def __init__(self, spec: Any, spacing: int = 40, radius: int = 7) -> None:
        self.spec = spec
        self.device = "cpu"
        n = spec.output_size
        yy, xx = np.mgrid[0:n, 0:n]
        inst = np.zeros((n, n), np.int32)
        k = 0
        for cy in range(spacing // 2, n - radius, spacing):
            for cx in range(spacing // 2, n - radius, spacing):
                k += 1
                inst[(yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2] = k
        self._result = InstanceResult(inst, np.arange(1, k + 1, dtype=np.int32), np.zeros(k, np.int8), np.ones(k, np.float32))

    def infer(self, batch: np.ndarray) -> list[None]:
        return [None] * len(batch)

    def postprocess(self, raw: None) -> InstanceResult:
        return self._result

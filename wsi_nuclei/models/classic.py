"""Classical no-weights baseline and a null model for engine benchmarks.

``classic``: colour deconvolution to haematoxylin (Ruifrok & Johnston, scikit-image's
``rgb2hed``), a *fixed* optical-density threshold (no per-tile Otsu, so a nucleus seen in two
overlapping tiles is segmented identically — exact stitching), hole filling and opening, then a
distance-transform watershed to split touching nuclei. Classes are unknown (class 0).

``null``: no network at all: emits a fixed lattice of disc-shaped "nuclei" over the slide (no
image analysis), so that a benchmark measures the engine alone — reading, blending, blocks,
seams, measurements and writers — without model cost.

Importing this module registers both (``classic`` and ``null``); the image-analysis libraries
are imported when a tile is segmented, so that listing the models stays cheap.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ._registry import ModelSpec, register_model
from .base import InstanceResult


@dataclass(frozen=True)
class ClassicParams:
    """Parameters of the classical segmentation (pixel sizes at 0.25 µm/px)."""

    #: haematoxylin optical density (tuned on the MoNuSeg/CoNSeP validation split)
    h_threshold: float = 0.04
    min_area_px: int = 40
    max_area_px: int = 6000
    min_distance_px: int = 8
    smooth_sigma: float = 1.0
    max_hole_px: int = 400


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
    from scipy import ndimage as ndi
    from skimage.color import rgb2hed
    from skimage.feature import peak_local_max
    from skimage.segmentation import watershed

    from ..postprocess import _fill_small_holes

    h = rgb2hed(rgb)[..., 0]
    h = ndi.gaussian_filter(h, params.smooth_sigma)
    fg = h > params.h_threshold
    fg = ndi.binary_opening(fg, iterations=1)
    # holes up to a nucleus's size only: "everything enclosed" would depend on the window
    # (a lumen ringed by tissue is enclosed in a large block, not in a small one)
    fg = _fill_small_holes(fg, params.max_hole_px)
    dist = ndi.distance_transform_edt(fg)
    lab, n = ndi.label(fg)
    if n == 0:
        z = np.zeros(0)
        return InstanceResult(
            np.zeros(rgb.shape[:2], np.int32),
            z.astype(np.int32),
            z.astype(np.int8),
            z.astype(np.float32),
        )
    peaks = peak_local_max(
        ndi.gaussian_filter(dist, 1.0),
        min_distance=params.min_distance_px,
        labels=lab,
        exclude_border=False,
    )
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
    """The ``classic`` registry entry: the "maps" are the RGB image itself; all work happens
    in :meth:`postprocess` (CPU) on the block's window."""

    #: where no patch ran the image is white (glass)
    map_fill = {"rgb": 255.0}

    def __init__(self, spec: Any, params: ClassicParams = ClassicParams()) -> None:
        self.spec = spec
        self.params = params
        self.device = "cpu"

    def infer(self, batch: np.ndarray) -> list[dict[str, np.ndarray]]:
        return [{"rgb": tile.transpose(2, 0, 1).astype(np.float32)} for tile in batch]

    def postprocess(
        self, raw: Any, origin: tuple[int, int] | None = None, shape: tuple[int, int] | None = None
    ) -> InstanceResult:
        """Segment an RGB window: ``{"rgb": (3, H, W)}`` (blended) or an (H, W, 3) uint8 image
        (``origin`` and ``shape`` unused: the window is the image)."""
        if isinstance(raw, dict):
            rgb = np.clip(np.rint(np.moveaxis(raw["rgb"], 0, -1)), 0, 255).astype(np.uint8)
        else:
            rgb = np.asarray(raw)
        return classic_instances(rgb, self.params)


class NullModel:
    """The ``null`` registry entry: a fixed lattice of disc "nuclei" in canvas coordinates
    (every ``spacing`` px), whatever the image, for engine benchmarks."""

    needs_maps = False

    def __init__(self, spec: Any, spacing: int = 40, radius: int = 7) -> None:
        self.spec = spec
        self.device = "cpu"
        if spacing <= 2 * radius:
            raise ValueError(f"discs of radius {radius} every {spacing} px would overlap")
        self.spacing, self.radius = spacing, radius

    def infer(self, batch: np.ndarray) -> list[dict[str, np.ndarray]]:
        return [{} for _ in batch]

    def postprocess(
        self, raw: Any, origin: tuple[int, int] | None = None, shape: tuple[int, int] | None = None
    ) -> InstanceResult:
        """Discs centred at canvas positions ``(k + 0.5) * spacing`` that fall in the window."""
        ox, oy = origin if origin is not None else (0, 0)
        if shape is None:
            n = self.spec.output_size
            shape = (n, n) if not raw else np.asarray(next(iter(raw.values()))).shape[-2:]
        h, w = shape
        s, rad = self.spacing, self.radius
        ks_y = np.arange(int(np.floor(oy / s)) - 1, int(np.ceil((oy + h) / s)) + 1)
        ks_x = np.arange(int(np.floor(ox / s)) - 1, int(np.ceil((ox + w) / s)) + 1)
        yy, xx = np.mgrid[-rad : rad + 1, -rad : rad + 1]
        disc = yy**2 + xx**2 <= rad**2
        # disc centres in window px, row-major over the lattice; the discs do not overlap
        cy = ((ks_y + 0.5) * s).astype(np.int64) - oy
        cx = ((ks_x + 0.5) * s).astype(np.int64) - ox
        cy, cx = np.repeat(cy, len(cx)), np.tile(cx, len(cy))
        near = (cy >= -rad) & (cx >= -rad) & (cy <= h + rad) & (cx <= w + rad)
        cy, cx = cy[near], cx[near]
        rr = cy[:, None] + yy[disc][None, :]
        cc = cx[:, None] + xx[disc][None, :]
        ok = (rr >= 0) & (rr < h) & (cc >= 0) & (cc < w)
        present = ok.any(axis=1)  # discs with a pixel in the window, labelled 1..m in order
        ids = np.cumsum(present).astype(np.int32)
        inst = np.zeros((h, w), np.int32)
        inst[rr[ok], cc[ok]] = np.broadcast_to(ids[:, None], rr.shape)[ok]
        m = int(present.sum())
        return InstanceResult(
            inst, np.arange(1, m + 1, dtype=np.int32), np.zeros(m, np.int8), np.ones(m, np.float32)
        )


def _build_classic(spec: ModelSpec, weights: Path | None, device: str) -> ClassicModel:
    return ClassicModel(spec)


def _build_null(spec: ModelSpec, weights: Path | None, device: str) -> NullModel:
    return NullModel(spec)


register_model(
    ModelSpec(
        name="classic",
        description="Classical baseline, no weights: haematoxylin deconvolution, fixed threshold, distance-transform watershed; no classes",
        licence="Apache-2.0 (code only)",
        mpp=0.25,
        input_size=256,
        output_size=256,
        class_names={},
        builder=_build_classic,
    )
)

register_model(
    ModelSpec(
        name="null",
        description="No network: a fixed pattern of disc nuclei per tile; measures the engine (read, tile, own, measure, write) without model cost",
        licence="Apache-2.0 (code only)",
        mpp=0.25,
        input_size=256,
        output_size=256,
        class_names={},
        builder=_build_null,
    )
)

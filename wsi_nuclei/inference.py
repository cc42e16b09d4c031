"""Whole-image inference for any registered model (used by ``evaluate`` and validation).

The slide engine (:mod:`wsi_nuclei.pipeline`) tiles slides itself; this module handles images
that fit in memory (dataset tiles of 256 px to a few thousand px): it stitches the model's
*maps* over a sliding window, then post-processes the whole image once, so instances are never
cut by window borders.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .models.base import InstanceResult


def predict_maps(model: Any, image: np.ndarray, *, trim: int | None = None, batch: int = 8) -> dict[str, np.ndarray]:
    """Sliding-window maps of a map-producing model (``infer`` returns dicts of maps).

    Parameters
    ----------
    model : NucleusModel
        A model whose ``infer`` returns, per tile, a dict of (C, h, w) / (h, w) maps over its
        central ``spec.output_size`` window.
    image : ndarray of uint8, shape (H, W, 3)
        At the model's resolution.
    trim : int, optional
        Pixels dropped on the inner sides of each output window (default: 32 for models whose
        output equals their input, whose borders see less context; 0 otherwise).
    batch : int
        Tiles per ``infer`` call.

    Returns
    -------
    dict
        The same keys as the model's maps, each covering the whole image.
    """
    spec = model.spec
    n_in, n_out = spec.input_size, spec.output_size
    ctx = (n_in - n_out) // 2
    t = (32 if n_out == n_in else 0) if trim is None else trim
    step = n_out - 2 * t
    h, w = image.shape[:2]
    ny, nx = max(1, math.ceil((h - 2 * t) / step)), max(1, math.ceil((w - 2 * t) / step))
    ph, pw = ny * step + 2 * t, nx * step + 2 * t
    pad = ((ctx, ctx + ph - h), (ctx, ctx + pw - w), (0, 0))
    img = np.pad(image, pad, mode="reflect") if min(h, w) > max(pad[0][1], pad[1][1], ctx) else np.pad(image, pad, constant_values=255)
    coords = [(y * step, x * step) for y in range(ny) for x in range(nx)]
    out: dict[str, np.ndarray] = {}
    for i in range(0, len(coords), batch):
        cs = coords[i : i + batch]
        tiles = np.stack([img[y : y + n_in, x : x + n_in] for y, x in cs])
        for (y, x), maps in zip(cs, model.infer(tiles)):
            for k, m in maps.items():
                if k not in out:
                    out[k] = np.zeros(m.shape[:-2] + (ph, pw), np.float32)
                y0 = 0 if y == 0 else t
                x0 = 0 if x == 0 else t
                y1 = n_out if y + n_out >= ph else n_out - t
                x1 = n_out if x + n_out >= pw else n_out - t
                out[k][..., y + y0 : y + y1, x + x0 : x + x1] = m[..., y0:y1, x0:x1]
    return {k: v[..., :h, :w] for k, v in out.items()}


def predict_instances(model: Any, image: np.ndarray) -> InstanceResult:
    """Instances of a whole image (at the model's resolution) for any registered model."""
    from .models.classic import ClassicModel, NullModel

    if isinstance(model, (ClassicModel, NullModel)):
        if isinstance(model, NullModel):
            z = np.zeros(0)
            return InstanceResult(np.zeros(image.shape[:2], np.int32), z.astype(np.int32), z.astype(np.int8), z.astype(np.float32))
        return model.postprocess(image)
    return model.postprocess(predict_maps(model, image))

"""Stain rendering shared by the synthetic images and the procedural slide.

Colour model
    Pixels follow Beer-Lambert absorption with the Ruifrok & Johnston haematoxylin and eosin
    optical-density vectors (the ones ``skimage.color.rgb2hed`` inverts): a pink eosin
    background with low-frequency texture and dark purple haematoxylin nuclei. Colour
    deconvolution therefore recovers a haematoxylin channel in which nuclei (optical density
    about 0.5-0.8) lie far above the background (about 0.04), so a threshold separates them.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

# Ruifrok & Johnston stain optical-density vectors (unit length), as in skimage.color.
_H_OD = np.array([0.65, 0.70, 0.29], dtype=np.float32)
_E_OD = np.array([0.07, 0.99, 0.11], dtype=np.float32)
_H_OD /= np.linalg.norm(_H_OD)
_E_OD /= np.linalg.norm(_E_OD)


def smooth_noise(rng: np.random.Generator, height: int, width: int, cell: int) -> np.ndarray:
    """Low-frequency noise, about unit standard deviation, from a bilinear-upsampled grid."""
    gh, gw = height // cell + 2, width // cell + 2
    grid = rng.standard_normal((gh, gw)).astype(np.float32)
    box = (0.5, 0.5, 0.5 + width / cell, 0.5 + height / cell)
    img = Image.fromarray(grid).resize((width, height), Image.Resampling.BILINEAR, box=box)
    out = np.asarray(img, dtype=np.float32)
    return out / max(float(out.std()), 1e-6)


def render_stains(
    h_od: np.ndarray, e_od: np.ndarray, rng: np.random.Generator, pixel_noise: float
) -> np.ndarray:
    """Beer-Lambert rendering of haematoxylin/eosin optical densities to RGB uint8."""
    h32 = np.asarray(h_od, dtype=np.float32)
    e32 = np.asarray(e_od, dtype=np.float32)
    noise = None
    if pixel_noise > 0:  # one luminance-like noise plane (cheap), shared by the channels
        noise = rng.standard_normal(h32.shape, dtype=np.float32)
        noise *= np.float32(pixel_noise)
    out = np.empty((*h32.shape, 3), dtype=np.uint8)
    minus_ln10 = np.float32(-math.log(10.0))
    for ch in range(3):  # planar maths: broadcasting over a length-3 axis is slow
        plane = h32 * (_H_OD[ch] * minus_ln10)
        plane += e32 * (_E_OD[ch] * minus_ln10)
        np.exp(plane, out=plane)
        plane *= np.float32(255.0)
        if noise is not None:
            plane += noise
        plane += np.float32(0.5)
        np.clip(plane, 0, 255, out=plane)
        out[..., ch] = plane
    return out


def downsample_rgb(rgb: np.ndarray, factor: int) -> np.ndarray:
    """Area-average ``rgb`` by an integer ``factor`` (partial edge blocks averaged too)."""
    img = Image.fromarray(rgb)
    return np.asarray(img.reduce(factor))

"""Pixels to display RGB: any array or decoded PIL image to ``(H, W, 3)`` uint8, alpha over white.

The one converter the slide readers use for every backend's pixels (and the one other modules
should use when they need the same normalisation).
"""

from __future__ import annotations

import numpy as np
from PIL import Image

__all__ = ["WHITE", "pil_to_rgb", "to_rgb_uint8"]

#: Grey level of "no pixels here" (outside the image, transparent): white.
WHITE = 255


def to_rgb_uint8(arr: np.ndarray) -> np.ndarray:
    """Any ``(H, W[, C])`` array to ``(H, W, 3)`` uint8 RGB; alpha composited over white.

    Parameters
    ----------
    arr : numpy.ndarray
        ``(H, W)`` grey, ``(H, W, 2)`` grey + alpha, ``(H, W, 3)`` RGB or ``(H, W, 4+)`` RGBA.
        bool is 0/255, other integers are scaled from their full range, floats from 0..1 when
        their maximum is at most 1 and from 0..255 otherwise (clipped; NaN is 0).

    Returns
    -------
    numpy.ndarray
        ``(H, W, 3)`` uint8 (the input itself when it already is).
    """
    a = np.asarray(arr)
    if a.ndim == 2:
        a = a[:, :, None]
    if a.dtype != np.uint8:
        if a.dtype == np.bool_:
            a = a.astype(np.uint8) * 255
        elif np.issubdtype(a.dtype, np.integer):
            a = (a.astype(np.float64) * (255.0 / np.iinfo(a.dtype).max)).round().astype(np.uint8)
        else:
            a = np.nan_to_num(a.astype(np.float64))
            top = 1.0 if not a.size or float(a.max()) <= 1.0 else 255.0
            a = (np.clip(a, 0.0, top) * (255.0 / top)).round().astype(np.uint8)
    c = a.shape[2]
    if c == 3:
        return a
    if c == 1:
        return np.repeat(a, 3, axis=2)
    if c == 2:  # grey + alpha
        a = np.concatenate([np.repeat(a[:, :, :1], 3, axis=2), a[:, :, 1:2]], axis=2)
        c = 4
    if c >= 4:
        if a[:, :, 3].min() == 255:  # opaque (the common case): no compositing
            return np.ascontiguousarray(a[:, :, :3])
        rgb = a[:, :, :3].astype(np.uint16)
        alpha = a[:, :, 3:4].astype(np.uint16)
        out = (rgb * alpha + WHITE * (255 - alpha) + 127) // 255
        return out.astype(np.uint8)
    raise ValueError(f"unsupported channel count {c}")


def pil_to_rgb(img: Image.Image) -> np.ndarray:
    """A decoded PIL image to uint8 RGB (transparency composited over white).

    Parameters
    ----------
    img : PIL.Image.Image
        A loaded image of any mode.

    Returns
    -------
    numpy.ndarray
        ``(H, W, 3)`` uint8; the 16- and 32-bit integer modes (``I;16*``, ``I``) are grey scaled
        to 8 bits.
    """
    if img.mode in ("RGB", "L", "RGBA", "LA"):
        return to_rgb_uint8(np.asarray(img))
    if img.mode.startswith("I;16") or img.mode == "I":
        a = np.asarray(img).astype(np.float64)
        top = 65535.0 if img.mode.startswith("I;16") else max(float(a.max()), 1.0)
        return to_rgb_uint8(np.clip(a / top * 255.0, 0, 255).round().astype(np.uint8))
    if "transparency" in img.info or img.mode in ("P", "PA"):
        return to_rgb_uint8(np.asarray(img.convert("RGBA")))
    return np.asarray(img.convert("RGB"))

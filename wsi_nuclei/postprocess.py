"""From network maps to nucleus instances, classes and measurements (numpy / OpenCV / scikit-image).

:func:`hv_to_instances` is the HoVer-Net post-processing (Graham et al. 2019): markers from the
nucleus probability minus the strong gradients of the horizontal/vertical distance maps, then
a marker-controlled watershed; each instance's class is the majority vote of its pixels'
class (as in the PanNuke literature) and its probability the mean class probability. Unlike
the original, every step is independent of the window it runs on (fixed scaling of the
gradients instead of per-image min/max normalisation, hole filling by hole size instead of
"not touching the border"), so post-processing the same maps in overlapping blocks gives the
same nuclei away from the block borders.

:func:`measure_instances` turns an instance map into polygons and morphometry. Both are pure
functions over arrays so that a GPU (torch) implementation can replace them behind the same
signature.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import cv2
import numpy as np
from scipy import ndimage as ndi
from skimage.measure import find_contours
from skimage.segmentation import watershed

from .models.base import InstanceResult
from .schema import MORPHOLOGY_COLUMNS

__all__ = ["HVParams", "hv_to_instances", "classify_instances", "measure_instances"]


@dataclass(frozen=True)
class HVParams:
    """Parameters of :func:`hv_to_instances` (defaults as in HoVer-Net, sizes at 0.25 µm/px)."""

    np_threshold: float = 0.5
    edge_threshold: float = 0.4
    sobel_ksize: int = 21
    min_marker_px: int = 10
    min_nucleus_px: int = 10
    marker_open_px: int = 5
    #: holes in the markers smaller than this (px) are filled
    hole_px: int = 256
    #: fixed scaling of the distance-map gradients (in units of a unit step): the largest
    #: rise inside nuclei and the largest fall between them, as HoVer-Net's per-image
    #: min/max normalisation finds them on typical maps
    grad_offset: float = 0.3
    grad_range: float = 0.6
    #: multipliers of the class probabilities (classes 1..C-1) before the vote: a prior
    #: correction for a class head trained on skewed class frequencies; None = 1 for all
    class_prior: tuple[float, ...] | None = None
    #: temperature of the class head (fitted on the validation split): the per-pixel class
    #: probabilities become softmax(log p / T); 1 leaves them as they are
    class_temperature: float = 1.0
    #: class ids (1..C-1) the model cannot produce (no training labels): their probabilities
    #: are set to 0 before the vote, so the noise of an untrained output never names a class
    class_exclude: tuple[int, ...] = ()


@lru_cache(maxsize=8)
def _step_response(ksize: int) -> float:
    """Largest response of OpenCV's ``Sobel(dx=1, ksize)`` to a field in [0, 1] (a unit step)."""
    kx, ky = cv2.getDerivKernels(1, 0, ksize)
    return float(np.sum(kx[kx > 0]) * np.sum(ky))


def _fill_small_holes(mask: np.ndarray, max_px: int) -> np.ndarray:
    """Fill background components of ``mask`` smaller than ``max_px`` pixels.

    Unlike ``binary_fill_holes`` (which fills whatever does not touch the image border) the
    decision only depends on the hole itself, so a mask cropped into two windows is filled the
    same way away from the window borders.
    """
    if max_px <= 0:
        return mask
    lab, n = ndi.label(~mask)
    if n == 0:
        return mask
    sizes = np.bincount(lab.ravel())
    small = sizes < max_px
    small[0] = False
    return mask | small[lab]


def _remove_small(labels: np.ndarray, min_px: int) -> np.ndarray:
    if min_px <= 0 or labels.max() == 0:
        return labels
    sizes = np.bincount(labels.ravel())
    small = sizes < min_px
    small[0] = False
    if small.any():
        labels = labels.copy()
        labels[small[labels]] = 0
    return labels


def hv_to_instances(
    np_prob: np.ndarray,
    hv: np.ndarray,
    tp_prob: np.ndarray | None = None,
    params: HVParams = HVParams(),
) -> InstanceResult:
    """Instance segmentation from HoVer-Net maps.

    Parameters
    ----------
    np_prob : ndarray of float, shape (H, W)
        Probability that a pixel belongs to a nucleus.
    hv : ndarray of float, shape (2, H, W)
        Horizontal and vertical distance maps (values in about [-1, 1]).
    tp_prob : ndarray of float, shape (C, H, W), optional
        Per-pixel class probabilities, channel 0 = background, 1..5 = PanNuke classes.
    params : HVParams
        Thresholds and kernel sizes.

    Returns
    -------
    InstanceResult
        Instances with consecutive labels 1..N, their class (majority vote, 0 without
        ``tp_prob``) and class probability.
    """
    blb = np_prob >= params.np_threshold
    blb_lab, _ = ndi.label(blb)
    blb_lab = _remove_small(blb_lab, params.min_nucleus_px)
    blb = blb_lab > 0

    # fixed scaling (no per-window min/max): the distance maps are bounded to [-1, 1] and the
    # Sobel responses divided by the kernel's response to a unit step, so that the same maps
    # cropped into two overlapping windows give the same instances away from the borders
    k = params.sobel_ksize
    unit = _step_response(k)
    h_dir = (np.clip(hv[0], -1.0, 1.0).astype(np.float32) + 1.0) * 0.5
    v_dir = (np.clip(hv[1], -1.0, 1.0).astype(np.float32) + 1.0) * 0.5
    # a boundary between two nuclei is a fall of the distance map (+1 -> -1), a nucleus's
    # interior a gentle rise: the gradient g (1 = a unit step within the kernel) is mapped to
    # an edge strength (a - g) / (a + G) in [0, 1], with fixed constants where HoVer-Net uses
    # the window's own min and max (a = G = typical values of those on real maps)
    a, big = params.grad_offset, params.grad_range
    sob_h = cv2.Sobel(h_dir, cv2.CV_32F, 1, 0, ksize=k) / unit
    sob_v = cv2.Sobel(v_dir, cv2.CV_32F, 0, 1, ksize=k) / unit
    edges = np.clip((a - np.minimum(sob_h, sob_v)) / (a + big), 0.0, 1.0)
    edges = np.clip(edges - (~blb).astype(np.float32), 0, None)

    dist = (1.0 - edges) * blb
    dist = -cv2.GaussianBlur(dist.astype(np.float32), (3, 3), 0)

    strong = edges >= params.edge_threshold
    marker = blb & ~strong
    marker = _fill_small_holes(marker, params.hole_px)
    r = params.marker_open_px
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (r, r))
    marker = cv2.morphologyEx(marker.astype(np.uint8), cv2.MORPH_OPEN, kernel).astype(bool)
    markers, _ = ndi.label(marker)
    markers = _remove_small(markers, params.min_marker_px)

    inst = watershed(dist, markers=markers, mask=blb).astype(np.int32)
    inst = _remove_small(inst, params.min_nucleus_px)
    inst = _relabel(inst)
    labels = np.arange(1, int(inst.max()) + 1, dtype=np.int32)
    if tp_prob is None:
        prob = _mean_per_label(np_prob, inst, len(labels))
        return InstanceResult(
            inst, labels, np.zeros(len(labels), np.int8), prob.astype(np.float32), None
        )
    class_id, class_prob, class_probs = classify_instances(
        inst,
        tp_prob,
        len(labels),
        prior=params.class_prior,
        temperature=params.class_temperature,
        exclude=params.class_exclude,
    )
    return InstanceResult(inst, labels, class_id, class_prob, class_probs)


def _relabel(inst: np.ndarray) -> np.ndarray:
    present = np.unique(inst)
    present = present[present > 0]
    if len(present) == 0 or present[-1] == len(present):
        return inst
    lut = np.zeros(int(inst.max()) + 1, np.int32)
    lut[present] = np.arange(1, len(present) + 1, dtype=np.int32)
    return lut[inst]


def _mean_per_label(values: np.ndarray, inst: np.ndarray, n: int) -> np.ndarray:
    if n == 0:
        return np.zeros(0, np.float64)
    sums = np.bincount(inst.ravel(), weights=values.ravel(), minlength=n + 1)[1:]
    counts = np.bincount(inst.ravel(), minlength=n + 1)[1:]
    return sums / np.maximum(counts, 1)


def classify_instances(
    inst: np.ndarray,
    tp_prob: np.ndarray,
    n: int | None = None,
    prior: tuple[float, ...] | None = None,
    temperature: float = 1.0,
    exclude: tuple[int, ...] = (),
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Class of each instance: majority vote of its pixels' arg-max class (background excluded).

    Parameters
    ----------
    inst : ndarray of int, shape (H, W)
        Instance labels 1..n.
    tp_prob : ndarray of float, shape (C, H, W)
        Class probabilities, channel 0 background.
    n : int, optional
        Number of labels (``inst.max()`` by default).
    prior : tuple of float, optional
        One multiplier per class 1..C-1 applied to the probabilities before renormalising and
        voting (prior correction); ``None`` leaves them as they are.
    temperature : float
        Class probabilities are first raised to ``1 / temperature`` and renormalised, i.e.
        ``softmax(logits / T)`` (temperature scaling); the vote does not change, the
        probabilities become calibrated when ``T`` is fitted on held-out data.
    exclude : tuple of int
        Class ids (1..C-1) that are never assigned: their probabilities are set to 0 before
        renormalising and voting (classes the model was never trained to produce).

    Returns
    -------
    class_id : ndarray of int8, shape (n,)
        Winning class (1..C-1).
    class_prob : ndarray of float32, shape (n,)
        Mean probability of the winning class over the instance, renormalised without
        background.
    class_probs : ndarray of float32, shape (n, C-1)
        Mean renormalised probability of every class.
    """
    n = int(inst.max()) if n is None else n
    c = tp_prob.shape[0] - 1
    if n == 0:
        return np.zeros(0, np.int8), np.zeros(0, np.float32), np.zeros((0, c), np.float32)
    fg = tp_prob[1:]
    if temperature != 1.0:
        fg = np.power(np.maximum(fg, 1e-12), 1.0 / float(temperature))
    if prior is not None:
        if len(prior) != c:
            raise ValueError(f"class prior has {len(prior)} values for {c} classes")
        fg = fg * np.asarray(prior, fg.dtype).reshape(c, 1, 1)
    if exclude:
        keep = np.ones(c, fg.dtype)
        for k in exclude:
            if not 1 <= int(k) <= c:
                raise ValueError(f"excluded class {k} is not among the classes 1..{c}")
            keep[int(k) - 1] = 0
        fg = fg * keep.reshape(c, 1, 1)
    fg = fg / np.maximum(fg.sum(axis=0, keepdims=True), 1e-8)
    flat = inst.ravel()
    sel = flat > 0
    lab = flat[sel] - 1
    vote = np.argmax(fg.reshape(c, -1)[:, sel], axis=0)
    votes = np.zeros((n, c), np.int64)
    np.add.at(votes, (lab, vote), 1)
    counts = np.maximum(np.bincount(lab, minlength=n), 1)
    probs = np.stack(
        [np.bincount(lab, weights=fg[k].ravel()[sel], minlength=n) / counts for k in range(c)],
        axis=1,
    ).astype(np.float32)
    winner = np.argmax(votes, axis=1)
    class_prob = probs[np.arange(n), winner]
    return (winner + 1).astype(np.int8), class_prob.astype(np.float32), probs


def _ring(padded_mask: np.ndarray) -> np.ndarray | None:
    """Outer boundary of a mask that has a 1-px empty border, as (K, 2) (x, y) in the mask's
    unpadded pixel frame, through the pixel-edge midpoints (sub-pixel, area-accurate)."""
    contours = find_contours(padded_mask, 0.5)
    if not contours:
        return None
    ring = max(contours, key=len)
    # (row, col) of pixel centres in the padded frame; pixel (r, c) covers [c, c+1) x [r, r+1),
    # so its centre is (c + 0.5, r + 0.5) once the 1-px pad is removed.
    return np.stack([ring[:, 1] - 0.5, ring[:, 0] - 0.5], axis=1)


def _perimeter(mask: np.ndarray) -> float:
    """Perimeter of a binary mask in pixels: Crofton estimate over 4 directions.

    Within 1% of the true perimeter for discs and ellipses of any size and orientation, so a
    round nucleus has circularity ~1. The length of the sub-pixel ring (:func:`_ring`) is ~5%
    too long on round shapes (its 45-degree corner cuts), which put a perfect disc at
    circularity 0.90.
    """
    from skimage.measure import perimeter_crofton

    return float(perimeter_crofton(mask, directions=4))


def _ring_area(xy: np.ndarray) -> float:
    """Shoelace area of a ring (closing edge included)."""
    x, y = xy[:, 0], xy[:, 1]
    twice = np.dot(x[:-1], y[1:]) - np.dot(y[:-1], x[1:]) + x[-1] * y[0] - y[-1] * x[0]
    return float(abs(twice) / 2)


def measure_instances(
    inst: np.ndarray, labels: np.ndarray, mpp: float
) -> dict[str, np.ndarray | list]:
    """Polygons and morphometry of instances.

    Parameters
    ----------
    inst : ndarray of int, shape (H, W)
        Instance map.
    labels : ndarray of int
        Labels to measure (others are ignored).
    mpp : float
        µm per pixel of ``inst``.

    Returns
    -------
    dict
        ``polygon`` (list of (K, 2) float arrays in ``inst`` pixel coordinates, x right, y down,
        pixel (r, c) covering [c, c+1) x [r, r+1); None when degenerate), ``centroid_x`` /
        ``centroid_y`` (px, same frame), ``area_um2`` (pixel count), ``perimeter_um`` (Crofton
        estimate, see :func:`_perimeter`), ``circularity`` (4πA/P², clipped to 1), ``solidity``
        (boundary area / convex hull area), ``eccentricity``, ``major_axis_um`` and
        ``minor_axis_um`` (of the ellipse with the same second moments, as scikit-image).
    """
    n = len(labels)
    polygons: list[np.ndarray | None] = []
    out: dict[str, np.ndarray | list] = {
        "polygon": polygons,
        **{
            k: np.full(n, np.nan, np.float64)
            for k in ("centroid_x", "centroid_y", *MORPHOLOGY_COLUMNS)
        },
    }
    if n == 0:
        return out
    objects = ndi.find_objects(inst)
    padded = np.pad(inst, 1)
    for i, label in enumerate(labels):
        sl = objects[label - 1] if label - 1 < len(objects) else None
        if sl is None:
            polygons.append(None)
            continue
        y0, y1, x0, x1 = sl[0].start, sl[0].stop, sl[1].start, sl[1].stop
        pm = padded[y0 : y1 + 2, x0 : x1 + 2] == label  # 1-px empty border around the object
        mask = pm[1:-1, 1:-1]
        yy, xx = np.nonzero(mask)
        area = float(len(yy))
        cy, cx = yy.mean(), xx.mean()
        out["centroid_x"][i] = x0 + cx + 0.5
        out["centroid_y"][i] = y0 + cy + 0.5
        out["area_um2"][i] = area * mpp * mpp
        dy, dx = yy - cy, xx - cx
        # second central moments (+1/12: a pixel is a unit square, not a point) and the
        # eigenvalues of their 2x2 covariance in closed form
        a = float(np.dot(dx, dx)) / area + 1 / 12
        b = float(np.dot(dx, dy)) / area
        c = float(np.dot(dy, dy)) / area + 1 / 12
        half_diff = np.hypot((a - c) / 2, b)
        ev0, ev1 = (a + c) / 2 + half_diff, (a + c) / 2 - half_diff
        major, minor = 4 * np.sqrt(max(ev0, 0)), 4 * np.sqrt(max(ev1, 0))
        out["major_axis_um"][i] = major * mpp
        out["minor_axis_um"][i] = minor * mpp
        out["eccentricity"][i] = np.sqrt(max(0.0, 1 - (minor / major) ** 2)) if major > 0 else 0.0
        ring = _ring(pm.astype(np.float32))
        if ring is None or len(ring) < 4:
            polygons.append(None)
            continue
        perim = _perimeter(mask)
        out["perimeter_um"][i] = perim * mpp
        out["circularity"][i] = min(1.0, 4 * np.pi * area / perim**2) if perim > 0 else np.nan
        hull = cv2.convexHull(ring.astype(np.float32)).reshape(-1, 2)
        hull_area = _ring_area(hull.astype(np.float64))
        out["solidity"][i] = min(1.0, _ring_area(ring) / hull_area) if hull_area > 0 else np.nan
        approx = cv2.approxPolyDP(ring.astype(np.float32).reshape(-1, 1, 2), 0.35, True).reshape(
            -1, 2
        )
        if len(approx) < 3:
            polygons.append(None)
            continue
        poly = approx.astype(np.float64)
        poly[:, 0] += x0
        poly[:, 1] += y0
        polygons.append(poly)
    return out

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
from skimage.segmentation import watershed

from ._morphology import (
    _CROFTON4,
    _crofton_histograms,
    _outer_rings,
    _pixel_runs,
    _run_moments,
    _shoelace,
    _window_entries,
)
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
        float16 maps (all three) are computed in float32.
    params : HVParams
        Thresholds and kernel sizes.

    Returns
    -------
    InstanceResult
        Instances with consecutive labels 1..N, their class (majority vote, 0 without
        ``tp_prob``) and class probability.
    """
    # float16 maps (the engine's blended windows) are computed in float32; the conversion is
    # exact, and the class maps are converted only where there are instances
    np_prob, hv = _float32_if_half(np_prob), _float32_if_half(hv)
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


def _float32_if_half(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a)
    return a.astype(np.float32) if a.dtype == np.float16 else a


def _relabel(inst: np.ndarray) -> np.ndarray:
    # the labels present, ascending, from a histogram (np.unique would sort every pixel)
    present = np.flatnonzero(np.bincount(inst.ravel()))
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
        Class probabilities, channel 0 background (float16 is computed in float32).
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
    # only the instances' pixels take part: every step below is per pixel (or a sum over the
    # classes of one pixel), so working on them alone gives the same numbers
    flat = inst.ravel()
    sel = np.flatnonzero(flat > 0)
    lab = flat[sel].astype(np.int64) - 1
    fg = _float32_if_half(np.asarray(tp_prob).reshape(c + 1, -1)[1:, sel])
    if temperature != 1.0:
        fg = np.power(np.maximum(fg, 1e-12), 1.0 / float(temperature))
    if prior is not None:
        if len(prior) != c:
            raise ValueError(f"class prior has {len(prior)} values for {c} classes")
        fg = fg * np.asarray(prior, fg.dtype).reshape(c, 1)
    if exclude:
        keep = np.ones(c, fg.dtype)
        for k in exclude:
            if not 1 <= int(k) <= c:
                raise ValueError(f"excluded class {k} is not among the classes 1..{c}")
            keep[int(k) - 1] = 0
        fg = fg * keep.reshape(c, 1)
    fg = fg / np.maximum(fg.sum(axis=0, keepdims=True), 1e-8)
    vote = np.argmax(fg, axis=0)
    votes = np.bincount(lab * c + vote, minlength=n * c).reshape(n, c)
    counts = np.maximum(np.bincount(lab, minlength=n), 1)
    probs = np.stack(
        [np.bincount(lab, weights=fg[k], minlength=n) / counts for k in range(c)],
        axis=1,
    ).astype(np.float32)
    winner = np.argmax(votes, axis=1)
    class_prob = probs[np.arange(n), winner]
    return (winner + 1).astype(np.int8), class_prob.astype(np.float32), probs


def measure_instances(
    inst: np.ndarray, labels: np.ndarray, mpp: float
) -> dict[str, np.ndarray | list]:
    """Polygons and morphometry of instances.

    All labels are measured together in a few array passes over the map and over the pixel
    edges of the instances (:mod:`wsi_nuclei._morphology`); per nucleus only OpenCV's convex hull
    and polygon simplification run.

    Parameters
    ----------
    inst : ndarray of int, shape (H, W)
        Instance map (values <= 0 are background).
    labels : ndarray of int
        Labels to measure (others are ignored). A label without pixels gets NaN and no polygon.
    mpp : float
        µm per pixel of ``inst``.

    Returns
    -------
    dict
        ``polygon`` (list of (K, 2) float arrays in ``inst`` pixel coordinates, x right, y down,
        pixel (r, c) covering [c, c+1) x [r, r+1); None when degenerate): the label's outer
        boundary through the midpoints of its pixel edges (``skimage.measure.find_contours`` at
        0.5 on its mask, foreground 4-connected, the longest contour: holes and smaller pieces are
        left out), simplified by ``cv2.approxPolyDP`` at 0.35 px. ``centroid_x`` /
        ``centroid_y`` (px, same frame), ``area_um2`` (pixel count), ``perimeter_um`` (Crofton
        estimate over 4 directions, as ``skimage.measure.perimeter_crofton``: within 1 % of the
        true perimeter of discs and ellipses of any size, so a round nucleus has circularity ~1,
        where the length of the boundary ring, ~5 % too long on round shapes, put a perfect disc
        at 0.90), ``circularity`` (4πA/P², clipped to 1), ``solidity`` (area inside the
        boundary / its convex hull's area), ``eccentricity``, ``major_axis_um`` and
        ``minor_axis_um`` (of the ellipse with the same second moments, pixels as unit squares).
    """
    labels = np.asarray(labels)
    n = len(labels)
    polygons: list[np.ndarray | None] = [None] * n
    out: dict[str, np.ndarray | list] = {
        "polygon": polygons,
        **{
            k: np.full(n, np.nan, np.float64)
            for k in ("centroid_x", "centroid_y", *MORPHOLOGY_COLUMNS)
        },
    }
    inst = np.asarray(inst)
    top = int(inst.max(initial=0))
    req = labels.astype(np.int64)
    valid = (req >= 1) & (req <= top)
    uniq, where = np.unique(req[valid], return_inverse=True)
    nu = len(uniq)
    if nu == 0:
        return out
    if inst.min() < 0:
        inst = np.where(inst > 0, inst, 0)
    lut = np.full(top + 1, -1, np.int32)  # label -> index of the measured label
    lut[uniq] = np.arange(nu)
    padded = np.zeros((inst.shape[0] + 2, inst.shape[1] + 2), inst.dtype)
    padded[1:-1, 1:-1] = inst
    wp = padded.shape[1]
    hdiff = padded[:, 1:] != padded[:, :-1]
    x0, y0, count, sx, sy, sxx, sxy, syy = _run_moments(*_pixel_runs(padded, lut, hdiff), nu)
    with np.errstate(invalid="ignore", divide="ignore"):
        # centroid in the label's box frame: exact sums / count, as the mean of its pixels
        cx, cy = sx / count, sy / count
        # central second moments from the exact raw sums
        sxx, sxy, syy = sxx - sx * cx, sxy - sx * cy, syy - sy * cy
        # second central moments (+1/12: a pixel is a unit square, not a point) and the
        # eigenvalues of their 2x2 covariance in closed form
        a = sxx / count + 1 / 12
        b = sxy / count
        c = syy / count + 1 / 12
        half_diff = np.hypot((a - c) / 2, b)
        major = 4 * np.sqrt(np.maximum((a + c) / 2 + half_diff, 0))
        minor = 4 * np.sqrt(np.maximum((a + c) / 2 - half_diff, 0))
        ecc = np.sqrt(np.maximum(0.0, 1 - (minor / major) ** 2))
    ecc[~(major > 0)] = 0.0
    res = {
        "centroid_x": x0 + cx + 0.5,
        "centroid_y": y0 + cy + 0.5,
        "area_um2": count * mpp * mpp,
        "major_axis_um": major * mpp,
        "minor_axis_um": minor * mpp,
        "eccentricity": ecc,
    }
    present = count > 0
    for v in res.values():
        v[~present] = np.nan

    index, window, corner, case = _window_entries(padded, lut, hdiff)
    offsets, rr, cc = _outer_rings(index, window, corner, case, wp, nu)
    hist = _crofton_histograms(index, case, nu)
    ring_len = np.diff(offsets)
    # ring vertices in each label's box frame, exactly as the per-object contour gave them
    vlab = np.repeat(np.arange(nu), ring_len)
    rx = (cc - 2 * x0[vlab] - 1) / 2
    ry = (rr - 2 * y0[vlab] - 1) / 2
    ring32 = np.stack([rx, ry], axis=1).astype(np.float32)
    origin = np.stack([x0, y0], axis=1).astype(np.float64)
    ringed = np.flatnonzero(present & (ring_len >= 4))
    perim = np.full(nu, np.nan)
    circ = np.full(nu, np.nan)
    local: list[np.ndarray | None] = [None] * nu
    hulls = []
    simple, simple_k = [], []
    for k, area in zip(ringed.tolist(), count[ringed].tolist()):
        # in Python floats per label: the same dot product as scikit-image's (BLAS summation
        # order) and the same power as before (libm pow, not x * x)
        p = float(_CROFTON4 @ hist[k])
        perim[k] = p
        circ[k] = min(1.0, 4 * np.pi * area / p**2) if p > 0 else np.nan
        ring = ring32[offsets[k] : offsets[k + 1]]
        hulls.append(cv2.convexHull(ring).reshape(-1, 2))
        approx = cv2.approxPolyDP(ring.reshape(-1, 1, 2), 0.35, True).reshape(-1, 2)
        if len(approx) >= 3:
            simple.append(approx)
            simple_k.append(k)
    if simple:
        # to the map's frame in one pass: float64, exact (half-integers)
        lens = [len(a) for a in simple]
        moved = np.concatenate(simple) + np.repeat(origin[simple_k], lens, axis=0)
        end = np.cumsum(lens).tolist()
        for k, e, n_v in zip(simple_k, end, lens):
            local[k] = moved[e - n_v : e]
    ring_area = np.full(nu, np.nan)
    hull_area = np.full(nu, np.nan)
    if len(ringed):
        has = ring_len > 0  # labels without pixels take no room in rx, ry
        ring_area[has] = _shoelace(rx, ry, np.append(offsets[:-1][has], offsets[-1]))
        hx = np.concatenate(hulls).astype(np.float64)
        hull_starts = np.concatenate([[0], np.cumsum([len(h) for h in hulls])])
        hull_area[ringed] = _shoelace(hx[:, 0], hx[:, 1], hull_starts)
    with np.errstate(invalid="ignore", divide="ignore"):
        sol = np.where(hull_area > 0, np.minimum(1.0, ring_area / hull_area), np.nan)
    res |= {"perimeter_um": perim * mpp, "circularity": circ, "solidity": sol}
    for key, v in res.items():
        col = out[key]
        assert isinstance(col, np.ndarray)
        col[valid] = v[where]
    taken = np.zeros(nu, bool)
    for i, k in zip(np.flatnonzero(valid).tolist(), where.tolist()):
        poly = local[k]
        if poly is not None:
            polygons[i] = poly.copy() if taken[k] else poly  # a label asked twice: two arrays
            taken[k] = True
    return out

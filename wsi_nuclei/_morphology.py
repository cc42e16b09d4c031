"""Per-label measurements of an instance map in a few array passes.

Helpers of :func:`wsi_nuclei.postprocess.measure_instances`, all on the instance map padded with
one row/column of background (an object touching the array border is measured as if the map
went on empty), each giving what the former per-object code gave:

* :func:`_pixel_runs` and :func:`_run_moments`: pixel count, bounding-box origin and raw
  moments of every label from its horizontal pixel runs (exact integer sums).
* :func:`_window_entries`: for every 2x2 window and every measured label in it, the
  configuration of that label's pixels (windows holding 2 to 4 labels give one entry per label).
* :func:`_crofton_histograms`: per label, the histogram of those configurations; its dot product
  with :data:`_CROFTON4` is exactly what ``skimage.measure.perimeter_crofton(mask,
  directions=4)`` computes for the object alone (scikit-image convolves the padded binary mask
  with a 2x2 code kernel and histograms it).
* :func:`_outer_rings`: ``skimage.measure.find_contours(mask, 0.5)`` (default 'low'
  connectivity) for every label at once: the marching-squares segments of each label through
  the midpoints of its "cracks" (pixel edges between the label and anything else), linked into
  cycles and ordered by pointer jumping. Per label it keeps the contour that
  ``max(find_contours(...), key=len)`` picks, with the vertex order and start vertex
  scikit-image gives it.
* :func:`_shoelace`: areas of many polygons in one pass.
"""

from __future__ import annotations

import numpy as np

__all__: list[str] = []

_SQ2 = np.sqrt(2)
#: the coefficients of ``skimage.measure.perimeter_crofton(directions=4)`` per configuration
#: code ``8 * upper-left + 2 * upper-right + 4 * lower-left + 1 * lower-right``, as it writes them
_CROFTON4 = np.array(
    [
        0,
        np.pi / 4 * (1 + 1 / _SQ2),
        np.pi / (4 * _SQ2),
        np.pi / (2 * _SQ2),
        0,
        np.pi / 4 * (1 + 1 / _SQ2),
        0,
        np.pi / (4 * _SQ2),
        np.pi / 4,
        np.pi / 2,
        np.pi / (4 * _SQ2),
        np.pi / (4 * _SQ2),
        np.pi / 4,
        np.pi / 2,
        0,
        0,
    ],
    np.float64,
)

# window corners in the order upper-left, upper-right, lower-left, lower-right
_CASE_WEIGHT = (1, 2, 4, 8)  # marching-squares case of skimage's _get_contour_segments
_CROFTON_WEIGHT = (8, 2, 4, 1)  # perimeter_crofton's configuration code
_CASE_TO_CROFTON = np.array(
    [sum(w for b, w in zip(_CASE_WEIGHT, _CROFTON_WEIGHT) if case & b) for case in range(16)],
    np.int64,
)

# Marching-squares segments (skimage's table, 'low' connectivity: at a saddle the two diagonal
# pixels are not joined). Crack midpoints of a window: 0 top, 1 left, 2 right, 3 bottom; per case
# 0..15 the (from, to) of the first segment and, for the saddles 6 and 9, of the second one.
_FROM0 = np.array([-1, 0, 2, 2, 1, 0, 2, 2, 3, 0, 3, 3, 1, 0, 1, -1], np.int64)
_TO0 = np.array([-1, 1, 0, 1, 3, 3, 0, 3, 2, 1, 0, 1, 2, 2, 0, -1], np.int64)
_FROM1 = np.array([-1, -1, -1, -1, -1, -1, 1, -1, -1, 3, -1, -1, -1, -1, -1, -1], np.int64)
_TO1 = np.array([-1, -1, -1, -1, -1, -1, 3, -1, -1, 2, -1, -1, -1, -1, -1, -1], np.int64)
# the midpoints in doubled padded coordinates relative to (2 i, 2 j) of window (i, j)
_MID_ROW = np.array([0, 1, 1, 2], np.int64)
_MID_COL = np.array([1, 0, 2, 1], np.int64)


def _pixel_runs(
    padded: np.ndarray, lut: np.ndarray, hdiff: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Horizontal runs of the measured labels' pixels, in row-major order.

    Parameters
    ----------
    padded : ndarray of int, shape (H + 2, W + 2)
        Instance map with a 1-px background border (values >= 0).
    lut : ndarray of intp
        Label -> index of the measured label, -1 for the others (0 included).
    hdiff : ndarray of bool, shape (H + 2, W + 1)
        ``padded[:, 1:] != padded[:, :-1]``.

    Returns
    -------
    tuple of ndarray of int64
        ``index`` (measured-label index), ``row``, ``first`` and ``last`` column of each run,
        in the unpadded frame. Every change along a row ends the run on its left and starts the
        one on its right; runs do not nest, so the k-th start and the k-th end (row-major)
        belong to the same run.
    """
    r, j = np.divmod(np.flatnonzero(hdiff), hdiff.shape[1])
    left, right = lut[padded[r, j]], lut[padded[r, j + 1]]
    start = np.flatnonzero(right >= 0)
    end = np.flatnonzero(left >= 0)
    return (
        right[start].astype(np.int64),
        r[start].astype(np.int64) - 1,
        j[start].astype(np.int64),
        j[end].astype(np.int64) - 1,
    )


def _run_moments(
    index: np.ndarray, row: np.ndarray, first: np.ndarray, last: np.ndarray, n: int
) -> tuple[np.ndarray, ...]:
    """Bounding-box origin, pixel count and raw moments of each of ``n`` labels from its runs.

    Returns ``x0``, ``y0`` (int64; 0 for a label without pixels) and, as float64 holding exact
    integers, the count and the sums of x, y, x², xy and y² over the label's pixels (pixel
    (r, c) at (c, r)) measured from ``(x0, y0)``.
    """
    big = np.iinfo(np.int64).max
    x0 = np.full(n, big, np.int64)
    y0 = np.full(n, big, np.int64)
    np.minimum.at(x0, index, first)
    np.minimum.at(y0, index, row)
    x0[x0 == big] = 0
    y0[y0 == big] = 0
    xs, xe, y = first - x0[index], last - x0[index], row - y0[index]
    length = xe - xs + 1
    sx = (xs + xe) * length // 2
    # sum of c^2 for c in xs..xe: F(xe) - F(xs - 1), F(m) = m (m + 1) (2 m + 1) / 6
    sxx = (xe * (xe + 1) * (2 * xe + 1) - (xs - 1) * xs * (2 * xs - 1)) // 6
    sums = [
        np.bincount(index, weights=w, minlength=n)
        for w in (length, sx, y * length, sxx, y * sx, y * y * length)
    ]
    return (x0, y0, *sums)


def _window_entries(
    padded: np.ndarray, lut: np.ndarray, hdiff: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One entry per (2x2 window of ``padded``, measured label in it) where the label has a crack.

    Parameters
    ----------
    padded : ndarray of int, shape (H + 2, W + 2)
        Instance map with a 1-px background border (values >= 0).
    lut : ndarray of intp
        Label -> index of the measured label, -1 for the others (0 included).
    hdiff : ndarray of bool, shape (H + 2, W + 1)
        ``padded[:, 1:] != padded[:, :-1]``.

    Returns
    -------
    tuple of ndarray of int64
        ``index`` (measured-label index), ``window`` (flat index of the window's upper-left
        pixel in ``padded``; windows in row-major order within each corner), ``corner`` (0..3:
        the label's first corner in the window) and ``case`` (marching-squares case of the
        label's pixels, see :data:`_CASE_WEIGHT`). Windows whose four pixels are one label
        (cases 0 and 15: no segment, Crofton coefficient 0) are left out.
    """
    wp = padded.shape[1]
    vdiff = padded[1:, :] != padded[:-1, :]
    mixed = hdiff[:-1] | hdiff[1:]
    mixed |= vdiff[:, :-1]
    mixed |= vdiff[:, 1:]
    q = np.flatnonzero(mixed)
    q += q // (wp - 1)  # window grid (W + 1 wide) -> flat index in padded (W + 2 wide)
    flat = padded.ravel()
    vals = (flat[q], flat[q + 1], flat[q + wp], flat[q + wp + 1])
    idx, win, corner, case = [], [], [], []
    for k, vk in enumerate(vals):
        keep = lut[vk] >= 0
        for m in range(k):  # the label's first corner in the window carries its entry
            keep &= vals[m] != vk
        sel = np.flatnonzero(keep)
        v = vk[sel]
        cs = np.zeros(len(sel), np.int64)
        for m in range(4):
            cs[vals[m][sel] == v] += _CASE_WEIGHT[m]
        idx.append(lut[v])
        win.append(q[sel])
        corner.append(np.full(len(sel), k, np.int64))
        case.append(cs)
    return (
        np.concatenate(idx).astype(np.int64),
        np.concatenate(win).astype(np.int64),
        np.concatenate(corner),
        np.concatenate(case),
    )


def _crofton_histograms(index: np.ndarray, case: np.ndarray, n: int) -> np.ndarray:
    """(n, 16) int64: per measured label, how many windows hold each perimeter_crofton
    configuration of its pixels (``case`` from :func:`_window_entries`).

    Configurations 0 and 15 are not counted (coefficient 0: they add exact zeros to the dot
    product, so ``_CROFTON4 @ row`` is bit-identical to scikit-image's ``coefs @ h``).
    """
    return np.bincount(index * 16 + _CASE_TO_CROFTON[case], minlength=16 * n).reshape(n, 16)


def _outer_rings(
    index: np.ndarray, window: np.ndarray, corner: np.ndarray, case: np.ndarray, wp: int, n: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each measured label's longest marching-squares contour, as scikit-image orders it.

    Parameters
    ----------
    index, window, corner, case : ndarray
        From :func:`_window_entries`.
    wp : int
        Width of the padded map (W + 2).
    n : int
        Number of measured labels.

    Returns
    -------
    offsets : ndarray of int64, shape (n + 1,)
        Label ``l``'s ring is ``rows[offsets[l]:offsets[l + 1]]`` (closed: its last vertex
        repeats its first, as find_contours returns it); empty for a label without pixels.
    rows, cols : ndarray of int64
        The vertices in doubled padded coordinates: vertex ``(R, C)`` is the point
        ``(R / 2, C / 2)`` (row, column) of the padded map, a crack midpoint.
    """
    if len(case) == 0:
        return np.zeros(n + 1, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64)
    saddle = np.flatnonzero(_FROM1[case] >= 0)
    ent = np.concatenate([np.arange(len(case)), saddle])  # entry of each segment
    sub = np.concatenate([np.zeros(len(case), np.int64), np.ones(len(saddle), np.int64)])
    src = np.where(sub == 0, _FROM0[case[ent]], _FROM1[case[ent]])
    dst = np.where(sub == 0, _TO0[case[ent]], _TO1[case[ent]])
    lab = index[ent]
    wi, wj = np.divmod(window[ent], wp)
    r0, c0 = 2 * wi, 2 * wj
    ncol = 2 * wp
    npt = (2 * (window.max(initial=0) // wp) + 3) * ncol
    from_pt = (r0 + _MID_ROW[src]) * ncol + (c0 + _MID_COL[src])
    to_pt = (r0 + _MID_ROW[dst]) * ncol + (c0 + _MID_COL[dst])
    # successor: the segment of the same label that starts where this one ends. Each crack
    # midpoint a label borders starts one of its segments and ends one, so the keys (label,
    # start) and (label, end) are the same set: matched by rank, two sorts instead of a search
    nseg = len(ent)
    succ = np.empty(nseg, np.int64)
    succ[np.argsort(lab * npt + to_pt)] = np.argsort(lab * npt + from_pt)
    # scan order of skimage (row-major windows, then the saddle's second segment); the corner
    # makes it unique across the labels of a window
    scan = (window[ent] * 2 + sub) * 4 + corner[ent]
    # pointer jumping: first and last segment (scan order) of every cycle
    per_label = np.bincount(lab, minlength=n)
    steps = int(np.ceil(np.log2(max(int(per_label.max(initial=1)), 2))))
    packed = scan * nseg + np.arange(nseg)
    lo, hi, nxt = packed.copy(), packed.copy(), succ.copy()
    for _ in range(steps):
        np.minimum(lo, lo[nxt], out=lo)
        np.maximum(hi, hi[nxt], out=hi)
        nxt = nxt[nxt]
    first, last = lo % nseg, hi % nseg
    length = np.bincount(first, minlength=nseg)[first]
    # the chosen cycle of each label: the longest, ties to the one whose first segment comes
    # first (the contour created first: max() over find_contours' list keeps it)
    reps = np.flatnonzero(first == np.arange(nseg))
    pick = reps[np.lexsort((scan[reps], -length[reps], lab[reps]))]
    pick = pick[np.r_[True, lab[pick][1:] != lab[pick][:-1]]]
    chosen = np.zeros(nseg, bool)
    chosen[pick] = True
    seg = np.flatnonzero(chosen[first])
    # rank along the cycle: skimage closes a contour with its last segment in scan order, so the
    # contour starts at that segment's end; distance to the last segment by pointer jumping
    is_last = seg == last[seg]
    pos_in = np.full(nseg, -1, np.int64)
    pos_in[seg] = np.arange(len(seg))
    nxt = pos_in[succ[seg]]
    nxt[is_last] = np.flatnonzero(is_last)
    dist = (~is_last).astype(np.int64)
    for _ in range(steps):
        dist += dist[nxt]
        nxt = nxt[nxt]
    ring_len = np.zeros(n, np.int64)
    ring_len[lab[pick]] = length[pick] + 1
    offsets = np.concatenate([[0], np.cumsum(ring_len)])
    seg_lab = lab[seg]
    at = offsets[seg_lab] + (length[seg] - 1 - dist)
    pts = np.empty(offsets[-1], np.int64)
    pts[at] = from_pt[seg]
    pts[offsets[1:][ring_len > 0] - 1] = pts[offsets[:-1][ring_len > 0]]  # closing vertex
    rows, cols = np.divmod(pts, ncol)
    return offsets, rows, cols


def _shoelace(x: np.ndarray, y: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """Absolute shoelace areas of the polygons ``[starts[k], starts[k + 1])`` of ``x``, ``y``
    (each closed by the edge from its last vertex back to its first).

    On the half-integer vertices of pixel boundaries every product and partial sum is exact in
    float64, so the areas do not depend on the summation order.
    """
    nxt = np.arange(1, len(x) + 1)
    nxt[starts[1:] - 1] = starts[:-1]
    twice = np.add.reduceat(x * y[nxt] - y * x[nxt], starts[:-1])
    return np.abs(twice) / 2

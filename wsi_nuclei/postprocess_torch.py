"""HoVer-Net post-processing on torch tensors (for a GPU), equivalent to :mod:`.postprocess`.

:func:`hv_to_instances_torch` follows :func:`wsi_nuclei.postprocess.hv_to_instances` step by
step with the same inputs, parameters and :class:`~wsi_nuclei.models.base.InstanceResult`:

- the fixed-scaling Sobel gradients of the distance maps and the 3 x 3 Gaussian are OpenCV's
  separable kernels, applied as float32 sums of shifted slices with OpenCV's default border
  (reflect-101);
- connected components (4-connectivity, as ``scipy.ndimage.label``): the horizontal runs of the
  mask are the nodes, vertically touching runs hook the larger of their roots onto the smaller
  (``scatter_reduce`` with ``amin``) and pointer jumping compresses the trees, until every pair
  agrees; a component's root is then its first pixel in raster order, so numbering the roots in
  index order gives scipy's numbering;
- the opening with OpenCV's elliptic structuring element is an AND (erosion) and an OR
  (dilation) of the mask shifted by the element's offsets, with OpenCV's borders;
- the marker-controlled watershed is replaced by a parallel relaxation of the same flooding
  order. A priority-flood (scikit-image) gives a pixel the label of the neighbour that left the
  queue first; a pixel leaves the queue in the order of the lowest "water level" at which a path
  from a marker reaches it (the smallest, over paths, of the highest energy on the path), ties in
  the order they entered (about their number of steps on that level). Each pixel keeps that key
  as one int64, ``level * 2**30 + steps``, with the level an order-preserving integer image of
  the float32 energy, and every round takes, for every unlabelled pixel whose neighbours changed,
  the smallest key among its four neighbours: ``key = max(level(p) * 2**30, min neighbour key +
  1)`` and that neighbour's label. The keys only decrease, so the rounds converge (in about the
  width of the unlabelled bands between markers: 40 rounds on a 1024 x 1024 MoNuSeg block) to
  the assignment of the queue up to the order of exact ties; on the validation maps the result
  is the numpy path's, pixel for pixel.

Everything runs on the device of the maps; the host only reads a few scalars (convergence
checks, counts) and receives the final arrays. On a CPU the numpy path is faster and stays the
default there (see :func:`postprocess_backend`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

from .models.base import InstanceResult
from .postprocess import HVParams

__all__ = ["hv_to_instances_torch", "postprocess_backend", "BACKEND_ENV"]

#: environment variable that forces the post-processing backend (``numpy``, ``torch`` or ``auto``)
BACKEND_ENV = "WSI_NUCLEI_POSTPROCESS"

_INT64_MAX = torch.iinfo(torch.int64).max
_STEP_BITS = 30  # the number of steps on one level is kept in the low 30 bits of a flood key


def postprocess_backend(device: str, requested: str | None = None) -> str:
    """Which implementation of the instance step runs for a model on ``device``.

    Parameters
    ----------
    device : str
        The device inference runs on (``cpu``, ``cuda``, ``cuda:1``, ...).
    requested : str, optional
        ``numpy``, ``torch`` or ``auto``; ``None`` reads the environment variable
        ``WSI_NUCLEI_POSTPROCESS`` (unset = ``auto``).

    Returns
    -------
    str
        ``torch`` when requested, or for ``auto`` when ``device`` is a CUDA device; else
        ``numpy``.
    """
    choice = (
        requested if requested is not None else os.environ.get(BACKEND_ENV, "auto")
    ).strip().lower() or "auto"
    if choice not in ("auto", "numpy", "torch"):
        raise ValueError(f"post-processing backend must be auto, numpy or torch, not {choice!r}")
    if choice == "auto":
        return "torch" if str(device).startswith("cuda") else "numpy"
    return choice


# --------------------------------------------------------------------------------------------
# filters (OpenCV semantics)
# --------------------------------------------------------------------------------------------
@lru_cache(maxsize=8)
def _sobel_kernels(ksize: int) -> tuple[np.ndarray, np.ndarray]:
    """OpenCV's ``Sobel`` derivative and smoothing kernels, scaled by the unit-step response."""
    import cv2

    kd, ks = cv2.getDerivKernels(1, 0, ksize)
    kd, ks = kd.ravel().astype(np.float64), ks.ravel().astype(np.float64)
    unit = float(np.sum(kd[kd > 0]) * np.sum(ks))
    return (kd / unit).astype(np.float32), ks.astype(np.float32)


def _reflect101(n: int, pad: int, device: torch.device) -> torch.Tensor:
    """Source indices of OpenCV's ``BORDER_REFLECT_101`` padding of a length-``n`` axis."""
    i = torch.arange(-pad, n + pad, device=device)
    if n == 1:
        return torch.zeros_like(i)
    period = 2 * (n - 1)
    i = torch.remainder(i, period)
    return torch.where(i >= n, period - i, i)


def _sep_filter(
    x: torch.Tensor, kx: Sequence[float] | np.ndarray, ky: Sequence[float] | np.ndarray
) -> torch.Tensor:
    """Correlate (H, W) ``x`` with ``kx`` along columns and ``ky`` along rows (reflect-101).

    A sum of shifted slices in float32 rather than ``conv2d``: on recent GPUs cuDNN may run a
    float32 convolution in TF32 (10-bit mantissa), which would move the gradients near the edge
    threshold; here every device gets the same float32 arithmetic.
    """
    h, w = x.shape
    px, py = (len(kx) - 1) // 2, (len(ky) - 1) // 2
    if py < h and px < w:  # torch's "reflect" is OpenCV's reflect-101
        xp = F.pad(x[None, None], (px, px, py, py), mode="reflect")[0, 0]
    else:  # a kernel wider than the image: reflect repeatedly, as OpenCV
        xp = x[_reflect101(h, py, x.device)][:, _reflect101(w, px, x.device)]
    wx, wy = [float(c) for c in kx], [float(c) for c in ky]
    rows = None
    for i, c in enumerate(wx):
        if c != 0.0:
            term = xp[:, i : i + w] * c
            rows = term if rows is None else rows.add_(term)
    assert rows is not None
    out = None
    for j, c in enumerate(wy):
        if c != 0.0:
            term = rows[j : j + h] * c
            out = term if out is None else out.add_(term)
    assert out is not None
    return out


@lru_cache(maxsize=8)
def _ellipse(r: int) -> np.ndarray:
    import cv2

    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (r, r)).astype(np.float32)


def _open(mask: torch.Tensor, r: int) -> torch.Tensor:
    """``cv2.morphologyEx(MORPH_OPEN)`` with an ``r`` x ``r`` elliptic element (bool in/out).

    Erosion and dilation as an AND / OR of the mask shifted by every offset of the element, with
    OpenCV's borders (the outside neither erodes nor dilates) and its anchor (the centre).
    """
    k = _ellipse(r)
    kh, kw = k.shape
    if kh == 0 or kw == 0 or not k.any():
        return mask
    h, w = mask.shape
    ay, ax = kh // 2, kw // 2
    offsets = [(dy, dx) for dy, dx in zip(*np.nonzero(k))]

    def combine(x: torch.Tensor, fill: bool, erode: bool) -> torch.Tensor:
        xp = x.new_full((h + kh - 1, w + kw - 1), fill)
        if erode:  # out(p) = AND of x(p + o - anchor)
            xp[ay : ay + h, ax : ax + w] = x
        else:  # out(p) = OR of x(p - o + anchor): the reflected element
            xp[kh - 1 - ay : kh - 1 - ay + h, kw - 1 - ax : kw - 1 - ax + w] = x
        out = None
        for dy, dx in offsets:
            if not erode:
                dy, dx = kh - 1 - dy, kw - 1 - dx
            part = xp[dy : dy + h, dx : dx + w]
            out = (
                part.clone()
                if out is None
                else (out.logical_and_(part) if erode else out.logical_or_(part))
            )
        assert out is not None
        return out

    return combine(combine(mask, True, True), False, False)


# --------------------------------------------------------------------------------------------
# connected components and labels
# --------------------------------------------------------------------------------------------
def _components(mask: torch.Tensor) -> torch.Tensor:
    """Connected components of ``mask`` (4-connectivity).

    Every horizontal run of ``mask`` is one node, named by its first pixel (a running maximum of
    the run starts along the row). Until every pair of vertically touching runs has the same
    root, each pair hooks the larger of its two roots onto the smaller one (``scatter_reduce``
    with ``amin``) and the trees are compressed by pointer jumping. A root only ever points at
    a smaller index of its own component, so the final root is the component's first pixel in
    raster order.

    Returns
    -------
    Tensor of int64, shape (H, W)
        The flat index of each pixel's component's first pixel in raster order; ``H * W``
        outside ``mask``.
    """
    h, w = mask.shape
    n = h * w
    idx = torch.arange(n, device=mask.device).view(h, w)
    starts = mask.clone()
    starts[:, 1:] &= ~mask[:, :-1]
    run = torch.cummax(torch.where(starts, idx, torch.full_like(idx, -1)), dim=1).values
    # one pair per overlap of two runs on consecutive rows: its first column
    pair = mask[:-1] & mask[1:]
    first = pair.clone()
    first[:, 1:] &= ~pair[:, :-1]
    top, bottom = run[:-1][first], run[1:][first]
    nodes = idx[starts]
    parent = torch.arange(n, device=mask.device)
    while len(top):
        a, b = parent[top], parent[bottom]
        differ = a != b
        if not bool(differ.any()):
            break
        top, bottom, a, b = top[differ], bottom[differ], a[differ], b[differ]
        m = torch.minimum(a, b)
        parent.scatter_reduce_(0, a, m, reduce="amin")
        parent.scatter_reduce_(0, b, m, reduce="amin")
        up = parent[nodes]
        while True:  # pointer jumping (every parent of a run is a run)
            nxt = parent[up]
            if torch.equal(nxt, up):
                break
            parent[nodes] = nxt
            up = nxt
    return torch.where(mask, parent[run.clamp_min(0)], torch.full_like(idx, n))


def _number(root: torch.Tensor, min_px: int) -> torch.Tensor:
    """Consecutive labels 1..N in raster order of ``root`` components of at least ``min_px``."""
    n = root.numel()
    sizes = torch.bincount(root.view(-1), minlength=n + 1)[:n]
    keep = sizes >= max(int(min_px), 1)
    lut = torch.cumsum(keep, 0) * keep
    lut = torch.cat([lut, lut.new_zeros(1)])
    return lut[root]


def _remove_small_consecutive(inst: torch.Tensor, n: int, min_px: int) -> tuple[torch.Tensor, int]:
    """Drop labels of fewer than ``min_px`` pixels and renumber 1..N keeping their order."""
    sizes = torch.bincount(inst.view(-1), minlength=n + 1)
    keep = sizes >= max(int(min_px), 1)
    keep[0] = False
    lut = torch.cumsum(keep, 0) * keep
    return lut[inst], int(keep.sum())


# --------------------------------------------------------------------------------------------
# marker-based flooding (replaces the watershed)
# --------------------------------------------------------------------------------------------
def _ordered_levels(e: torch.Tensor) -> torch.Tensor:
    """Non-negative int64 image with the order of float32 ``e`` (exact, no sort)."""
    bits = (e.float() + 0.0).contiguous().view(torch.int32)  # + 0.0: -0.0 becomes +0.0
    bits = torch.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
    return bits.to(torch.int64) + 2**31


def _flood(
    energy: torch.Tensor, markers: torch.Tensor, mask: torch.Tensor, max_rounds: int = 100000
) -> torch.Tensor:
    """Labels of ``markers`` flooded over ``mask`` in order of increasing ``energy``.

    The fixed point of a parallel relaxation of a priority-flood (see the module docstring),
    computed over the unlabelled pixels of ``mask`` only; those that no marker reaches stay 0.
    """
    h, w = markers.shape
    n = h * w
    if n >= 2**_STEP_BITS:
        raise ValueError(
            f"a {h} x {w} window is too large for the flood keys (at most 2**{_STEP_BITS} pixels)"
        )
    seeded = markers > 0
    free = (mask & ~seeded).view(-1)
    if not bool(free.any()) or not bool(seeded.any()):
        return markers.clone()
    inf = _INT64_MAX
    level = _ordered_levels(energy).view(-1) << _STEP_BITS
    key = torch.cat(
        [
            torch.where(seeded.view(-1), level, torch.full_like(level, inf)),
            level.new_full((1,), inf),
        ]
    )
    lab = torch.cat([markers.reshape(-1).to(torch.int64), markers.new_zeros(1, dtype=torch.int64)])
    pix = torch.nonzero(free).view(-1)
    n_free = len(pix)
    lvl = level[pix]
    row, col = pix // w, pix % w
    sentinel = torch.full_like(pix, n)
    # neighbours in the order up, down, left, right (the first of equal keys wins); n = outside
    nbr = torch.stack(
        [
            torch.where(row > 0, pix - w, sentinel),
            torch.where(row < h - 1, pix + w, sentinel),
            torch.where(col > 0, pix - 1, sentinel),
            torch.where(col < w - 1, pix + 1, sentinel),
        ]
    )
    # position of a pixel among the free ones (n_free: not free), to find whom a change concerns
    slot = torch.full((n + 1,), n_free, dtype=torch.int64, device=pix.device)
    slot[pix] = torch.arange(n_free, device=pix.device)
    active = torch.arange(n_free, device=pix.device)  # free pixels whose neighbours changed
    for _ in range(max_rounds):
        nb = nbr[:, active]
        best, which = key[nb].min(0)
        reach = best < inf
        at = pix[active]
        new_key = torch.where(reach, torch.maximum(lvl[active], best + 1), best)
        new_lab = torch.where(reach, lab[nb.gather(0, which[None])[0]], lab[at])
        changed = (new_key != key[at]) | (new_lab != lab[at])
        if not bool(changed.any()):
            break
        moved = at[changed]
        key[moved], lab[moved] = new_key[changed], new_lab[changed]  # all from the previous round
        mark = torch.zeros(n_free + 1, dtype=torch.bool, device=pix.device)
        mark[slot[nbr[:, active[changed]]].view(-1)] = True
        active = torch.nonzero(mark[:n_free]).view(-1)
    return lab[:n].view(h, w)


# --------------------------------------------------------------------------------------------
# the instance step
# --------------------------------------------------------------------------------------------
def _as_tensor(a: np.ndarray | torch.Tensor, device: torch.device) -> torch.Tensor:
    t = a if isinstance(a, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(a))
    return t.to(device=device, dtype=torch.float32)


def hv_to_instances_torch(
    np_prob: np.ndarray | torch.Tensor,
    hv: np.ndarray | torch.Tensor,
    tp_prob: np.ndarray | torch.Tensor | None = None,
    params: HVParams = HVParams(),  # noqa: B008 - frozen dataclass: one shared default is safe
    device: str | torch.device | None = None,
) -> InstanceResult:
    """Instance segmentation from HoVer-Net maps on torch tensors.

    The same contract as :func:`wsi_nuclei.postprocess.hv_to_instances` (same parameters, same
    steps, labels 1..N numbered in the same raster order); the watershed is the parallel
    flooding described in the module docstring.

    Parameters
    ----------
    np_prob : ndarray or Tensor of float, shape (H, W)
        Probability that a pixel belongs to a nucleus.
    hv : ndarray or Tensor of float, shape (2, H, W)
        Horizontal and vertical distance maps (values in about [-1, 1]).
    tp_prob : ndarray or Tensor of float, shape (C, H, W), optional
        Per-pixel class probabilities, channel 0 = background.
    params : HVParams
        Thresholds and kernel sizes.
    device : str or torch.device, optional
        Where to compute; default: the device of ``np_prob`` when it is a tensor, else ``cpu``.

    Returns
    -------
    InstanceResult
        Numpy arrays, as the numpy path: ``inst`` int32 with labels 1..N, ``labels``,
        ``class_id`` (0 without ``tp_prob``), ``class_prob`` and ``class_probs``.
    """
    if device is None:
        device = np_prob.device if isinstance(np_prob, torch.Tensor) else "cpu"
    dev = torch.device(device)
    with torch.inference_mode(), torch.autocast(device_type=dev.type, enabled=False):
        npp = _as_tensor(np_prob, dev)
        hvt = _as_tensor(hv, dev)
        inst, n = _instances(npp, hvt, params)
        if tp_prob is None:
            if n == 0:
                prob = torch.zeros(0, dtype=torch.float64)
            else:
                sums = torch.zeros(n + 1, dtype=torch.float64, device=dev).index_add_(
                    0, inst.view(-1), npp.view(-1).double()
                )
                counts = torch.bincount(inst.view(-1), minlength=n + 1).clamp_min(1)
                prob = (sums / counts)[1:]
            inst_np = inst.to(torch.int32).cpu().numpy()
            labels = np.arange(1, n + 1, dtype=np.int32)
            return InstanceResult(
                inst_np, labels, np.zeros(n, np.int8), prob.cpu().numpy().astype(np.float32), None
            )
        tpt = _as_tensor(tp_prob, dev)
        class_id, class_prob, class_probs = _classify(inst, tpt, n, params)
        inst_np = inst.to(torch.int32).cpu().numpy()
        labels = np.arange(1, n + 1, dtype=np.int32)
        return InstanceResult(inst_np, labels, class_id, class_prob, class_probs)


def _instances(npp: torch.Tensor, hv: torch.Tensor, params: HVParams) -> tuple[torch.Tensor, int]:
    """Instance map (int64, labels 1..N) and N; the steps of ``hv_to_instances``."""
    blb = npp >= params.np_threshold
    if params.min_nucleus_px > 0:
        blb = _number(_components(blb), params.min_nucleus_px) > 0

    kd, ks = _sobel_kernels(params.sobel_ksize)
    h_dir = (hv[0].clamp(-1.0, 1.0) + 1.0) * 0.5
    v_dir = (hv[1].clamp(-1.0, 1.0) + 1.0) * 0.5
    sob_h = _sep_filter(h_dir, kd, ks)  # d/dx: derivative along columns, smoothing along rows
    sob_v = _sep_filter(v_dir, ks, kd)  # d/dy
    a, big = params.grad_offset, params.grad_range
    edges = ((a - torch.minimum(sob_h, sob_v)) / (a + big)).clamp(0.0, 1.0)
    edges = (edges - (~blb).float()).clamp_min(0.0)

    g = (0.25, 0.5, 0.25)  # cv2.GaussianBlur((3, 3), 0)
    dist = -_sep_filter((1.0 - edges) * blb, g, g)

    marker = blb & ~(edges >= params.edge_threshold)
    if params.hole_px > 0:
        holes = ~marker
        root = _components(holes)
        n = root.numel()
        sizes = torch.bincount(root.view(-1), minlength=n + 1)
        sizes[n] = n + 1  # outside the holes
        marker = marker | (sizes[root] < params.hole_px)
    marker = _open(marker, params.marker_open_px)
    markers = _number(_components(marker), params.min_marker_px) * blb

    inst = _flood(dist, markers, blb)
    n_markers = int(markers.max()) if markers.numel() else 0
    return _remove_small_consecutive(inst, n_markers, params.min_nucleus_px)


def _classify(
    inst: torch.Tensor, tp: torch.Tensor, n: int, params: HVParams
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`wsi_nuclei.postprocess.classify_instances` on tensors (numpy results)."""
    c = tp.shape[0] - 1
    if n == 0:
        return np.zeros(0, np.int8), np.zeros(0, np.float32), np.zeros((0, c), np.float32)
    fg = tp[1:]
    if params.class_temperature != 1.0:
        fg = torch.pow(fg.clamp_min(1e-12), 1.0 / float(params.class_temperature))
    if params.class_prior is not None:
        if len(params.class_prior) != c:
            raise ValueError(f"class prior has {len(params.class_prior)} values for {c} classes")
        fg = fg * torch.tensor(params.class_prior, dtype=fg.dtype, device=fg.device).view(c, 1, 1)
    if params.class_exclude:
        keep = torch.ones(c, dtype=fg.dtype, device=fg.device)
        for k in params.class_exclude:
            if not 1 <= int(k) <= c:
                raise ValueError(f"excluded class {k} is not among the classes 1..{c}")
            keep[int(k) - 1] = 0
        fg = fg * keep.view(c, 1, 1)
    fg = fg / fg.sum(0, keepdim=True).clamp_min(1e-8)
    flat = inst.view(-1)
    sel = flat > 0
    lab = flat[sel] - 1
    fgs = fg.reshape(c, -1)[:, sel]
    vote = torch.argmax(fgs, 0)
    votes = torch.bincount(lab * c + vote, minlength=n * c).view(n, c)
    counts = torch.bincount(lab, minlength=n).clamp_min(1).double()
    sums = torch.zeros((n, c), dtype=torch.float64, device=fg.device).index_add_(
        0, lab, fgs.t().double()
    )
    probs = (sums / counts[:, None]).float()
    winner = torch.argmax(votes, 1)
    class_prob = probs[torch.arange(n, device=fg.device), winner]
    return (
        (winner + 1).to(torch.int8).cpu().numpy(),
        class_prob.cpu().numpy().astype(np.float32),
        probs.cpu().numpy(),
    )

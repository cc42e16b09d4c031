"""The tiling engine: patches on a fixed grid -> blended maps -> post-processing per block.

One code path for slides (:mod:`wsi_nuclei.pipeline`, Dask tasks, part files) and for images
held in memory (:func:`wsi_nuclei.inference.segment_image`, used by ``evaluate`` and
training validation), so that the figures measured on annotated images describe what
``run`` produces::

    plan_strips             fixed patch batches per vertical strip of blocks
      read_patches          level-0 boxes -> RGB patches at model resolution (reflect-padded
                            at the canvas edge)                                  [task]
      infer_patches         the network -> float16 maps (B, C, N, N)              [task]
      MapBlender            weighted blend in patch order (deterministic) into a band of
                            final rows; a block is ready once its window is final [coordinator]
      process_block         post-processing of the block's window, measurements, and the
                            exclusive / seam-candidate split (wsi_nuclei.stitching) [task]

Memory is bounded by configuration, not by the slide: the band holds about
``block + 2 * halo + stride`` rows of one strip (at most ``strip_blocks`` blocks wide), and
the number of batches and blocks in flight is capped. Slides wider than a strip are done
strip after strip; the few patch columns that two strips share are run by both (the same
global patches, so the same maps).

Inference memory is bounded too: a process runs one network call at a time (a lock shared by
its worker threads), on at most ``infer_chunk`` patches of a batch (the batch partition, and so
the plan, is unchanged). On a CPU many intermediate tensors of a 16-patch call are about
100 MB, above glibc's largest ``mmap`` threshold (32 MB), so every call mapped and
unmapped gigabytes (page faults, kernel time); chunks of 2 mostly stay in the allocator's heap.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from .tiling import BlockGrid, PatchGrid, blend_weights

__all__ = ["EngineContext", "Strip", "plan_strips", "read_patches", "infer_patches", "process_block",
           "MapBlender", "run_strip", "InlineExecutor"]


@dataclass(frozen=True)
class EngineContext:
    """Everything a task needs, picklable (sent with each task).

    ``source`` is ``("path", path, backend, mpp)`` (each worker opens the slide once) or a
    picklable slide-like object; ``model`` is ``(name, weights, device, tta)``.
    """

    source: Any
    model: tuple[str, str | None, str, bool]
    patches: PatchGrid
    blocks: BlockGrid
    scale: float  # level-0 px -> model px
    read_mpp: float
    slide_mpp: float
    model_mpp: float
    fingerprint: str
    strict: bool = False
    torch_threads: int = 0  # > 0: set in each worker process (local --workers N)
    all_masks: bool = False  # keep the pixel mask of every nucleus (evaluation), not only candidates
    infer_chunk: int = 0  # > 0: at most this many patches per network call (bounds activation memory); 0: the whole batch


# --------------------------------------------------------------------------------------------
# worker-side caches
# --------------------------------------------------------------------------------------------
_LOCAL = threading.local()
_MODELS: dict[tuple, Any] = {}
_MODELS_LOCK = threading.Lock()
#: One network call at a time per process: two concurrent calls double the activation memory
#: and, on a CPU, oversubscribe the cores (each call already uses all torch threads).
_INFER_LOCK = threading.Lock()
#: Models handed over in memory (tests, evaluation of an already built model), by id.
_INSTANCES: dict[str, Any] = {}


def register_instance(model: Any) -> tuple[str, None, str, bool]:
    """Make an already built model usable by in-process tasks; returns its model key."""
    key = f"instance:{id(model)}"
    _INSTANCES[key] = model
    return (key, None, getattr(model, "device", "cpu") if isinstance(getattr(model, "device", "cpu"), str) else "cpu",
            bool(getattr(model, "tta", False)))


def _slide_of(ctx: EngineContext) -> Any:
    cache = getattr(_LOCAL, "slides", None)
    if cache is None:
        cache = _LOCAL.slides = {}
    src = ctx.source
    if not (isinstance(src, tuple) and src and src[0] == "path"):
        return src
    if src not in cache:
        from .slide import open_slide

        cache[src] = open_slide(src[1], backend=src[2], mpp=src[3])
    return cache[src]


def model_of(ctx: EngineContext) -> Any:
    """The model of ``ctx`` (loaded once per process)."""
    name = ctx.model[0]
    if name in _INSTANCES:
        return _INSTANCES[name]
    with _MODELS_LOCK:
        if ctx.model not in _MODELS:
            from .models import load_model

            name, weights, device, tta = ctx.model
            if ctx.torch_threads:  # one process per worker: share the cores, no oversubscription
                import torch

                torch.set_num_threads(ctx.torch_threads)
            _MODELS[ctx.model] = load_model(name, weights=weights, device=device, tta=tta)
        return _MODELS[ctx.model]


# --------------------------------------------------------------------------------------------
# plan
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Strip:
    """A vertical strip of blocks processed top to bottom with one band of maps.

    Attributes
    ----------
    x0, x1 : int
        Canvas columns of the maps the strip keeps (its blocks' windows).
    blocks : tuple of (row, col)
        Active blocks of the strip, row-major.
    batches : tuple of tuple of (row, col)
        The strip's patches in row-major order, cut into batches of the batch size. The
        partition is fixed by the plan, so a resumed run infers exactly the same batches.
    """

    x0: int
    x1: int
    blocks: tuple[tuple[int, int], ...]
    batches: tuple[tuple[tuple[int, int], ...], ...]

    @property
    def n_patches(self) -> int:
        return sum(len(b) for b in self.batches)


def patches_for_window(pg: PatchGrid, box: tuple[int, int, int, int]) -> tuple[range, range]:
    """Patch rows and columns whose output meets the canvas box ``(x0, y0, x1, y1)``."""
    x0, y0, x1, y1 = box
    return pg.covering(y0, y1, pg.n_rows), pg.covering(x0, x1, pg.n_cols)


def plan_strips(
    pg: PatchGrid,
    bg: BlockGrid,
    blocks: Iterable[tuple[int, int]],
    *,
    patch_ok: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None,
    strip_blocks: int = 8,
    batch_size: int = 16,
) -> list[Strip]:
    """Strips of the active ``blocks`` with their patch batches.

    A patch runs when its output meets the window of an active block of the strip and
    ``patch_ok(rows, cols)`` (a function of the slide only, e.g. "near tissue") accepts it; a
    pixel's blended value therefore depends on the slide and the model, not on the blocks.
    """
    if strip_blocks < 1 or batch_size < 1:
        raise ValueError("strip_blocks and batch_size must be >= 1")
    active = sorted(set(blocks))
    strips = []
    for j0 in range(0, bg.n_cols, strip_blocks):
        j1 = min(bg.n_cols, j0 + strip_blocks)
        sb = tuple(b for b in active if j0 <= b[1] < j1)
        if not sb:
            continue
        need: set[tuple[int, int]] = set()
        for r, c in sb:
            rows, cols = patches_for_window(pg, bg.window_box(r, c))
            need.update((pr, pc) for pr in rows for pc in cols)
        pts = np.array(sorted(need), np.int64).reshape(-1, 2)
        if patch_ok is not None and len(pts):
            pts = pts[np.asarray(patch_ok(pts[:, 0], pts[:, 1]), bool)]
        plist = [(int(r), int(c)) for r, c in pts]
        batches = tuple(tuple(plist[i : i + batch_size]) for i in range(0, len(plist), batch_size))
        x0 = j0 * bg.core - bg.halo
        x1 = j1 * bg.core + bg.halo
        strips.append(Strip(x0, x1, sb, batches))
    return strips


# --------------------------------------------------------------------------------------------
# tasks
# --------------------------------------------------------------------------------------------
def read_patches(ctx: EngineContext, patches: tuple[tuple[int, int], ...]) -> tuple[np.ndarray, float]:
    """RGB input patches at model resolution, ``(B, input, input, 3)`` uint8.

    Each patch's input box is read from the slide where it lies on the canvas; beyond the
    canvas edge the image is mirrored (``reflect``), so nuclei at the slide border see
    plausible context rather than a white wall.
    """
    t = time.perf_counter()
    slide = _slide_of(ctx)
    pg = ctx.patches
    n = pg.input_size
    out = np.empty((len(patches), n, n, 3), np.uint8)
    W, H = pg.width, pg.height
    for i, (r, c) in enumerate(patches):
        x0, y0, x1, y1 = pg.input_box(r, c)
        cx0, cy0, cx1, cy1 = max(0, x0), max(0, y0), min(W, x1), min(H, y1)
        if cx1 <= cx0 or cy1 <= cy0:  # entirely off the canvas (cannot happen for planned patches)
            out[i] = 255
            continue
        s = ctx.scale
        img = slide.read_scaled((cx0 / s, cy0 / s, cx1 / s, cy1 / s), (cx1 - cx0, cy1 - cy0), target_mpp=ctx.read_mpp)
        pad = ((cy0 - y0, y1 - cy1), (cx0 - x0, x1 - cx1), (0, 0))
        if any(p for p in pad[0] + pad[1]):
            img = np.pad(img, pad, mode="reflect" if min(img.shape[:2]) > 1 else "edge")
        out[i] = img
    return out, time.perf_counter() - t


def infer_patches(ctx: EngineContext, read: tuple[np.ndarray, float]) -> tuple[np.ndarray, tuple, float, float, int]:
    """Run the model on a batch: ``(maps (B, C, N, N) float16, layout, t_read, t_infer, splits)``.

    ``layout`` lists ``(name, channels, shape_kind)`` so that a window of the blended array can
    be split back into the model's map dict; ``splits`` counts the halvings of the batch after
    out-of-memory errors on the accelerator.

    The network runs on chunks of at most ``ctx.infer_chunk`` patches (0: the whole batch), one
    call at a time per process; each chunk's maps go straight into the batch's float16 array.
    """
    images, t_read = read
    t = time.perf_counter()
    model = model_of(ctx)
    n = ctx.patches.output_size
    step = ctx.infer_chunk if ctx.infer_chunk > 0 else max(1, len(images))
    maps: np.ndarray | None = None
    layout: tuple = ()
    n_split = 0
    t_wait = 0.0  # time spent waiting for another thread's network call: not this task's
    for i0 in range(0, len(images), step):
        tw = time.perf_counter()
        with _INFER_LOCK:
            t_wait += time.perf_counter() - tw
            raws, k_split = _infer_halving(model, images[i0 : i0 + step])
        n_split += k_split
        if maps is None:
            layout = _layout(raws[0]) if raws else ()
            maps = np.empty((len(images), sum(k for _, k, _ in layout), n, n), np.float16)
        for i, raw in enumerate(raws, start=i0):
            j = 0
            for name, k, kind in layout:
                a = raw[name]
                maps[i, j : j + k] = a if kind == 3 else a[None]
                j += k
    if maps is None:
        maps = np.empty((0, 0, n, n), np.float16)
    return maps, layout, t_read, time.perf_counter() - t - t_wait, n_split


def _is_oom(exc: BaseException) -> bool:
    try:
        import torch

        if isinstance(exc, torch.cuda.OutOfMemoryError):
            return True
    except ImportError:  # pragma: no cover
        pass
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def _infer_halving(model: Any, images: np.ndarray) -> tuple[list, int]:
    """``model.infer(images)``; on an accelerator out-of-memory error the batch is halved and
    retried (recursively, down to one patch). Returns the outputs and the number of splits."""
    try:
        return list(model.infer(images)), 0
    except Exception as exc:
        if not _is_oom(exc) or len(images) <= 1:
            raise
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except ImportError:  # pragma: no cover
            pass
        h = len(images) // 2
        a, na = _infer_halving(model, images[:h])
        b, nb = _infer_halving(model, images[h:])
        return a + b, 1 + na + nb


def _layout(raw: dict) -> tuple[tuple[str, int, int], ...]:
    return tuple((k, (v.shape[0] if v.ndim == 3 else 1), v.ndim) for k, v in raw.items())


def _split(window: np.ndarray, layout: tuple) -> dict[str, np.ndarray]:
    out, j = {}, 0
    for name, k, kind in layout:
        a = window[j : j + k].astype(np.float32)
        out[name] = a if kind == 3 else a[0]
        j += k
    return out


def fill_values(model: Any, layout: tuple) -> np.ndarray:
    """Per-channel value of the maps where no patch ran (the model's ``map_fill``, else 0)."""
    fill = getattr(model, "map_fill", {}) or {}
    return np.concatenate([np.full(k, float(fill.get(name, 0.0)), np.float32) for name, k, _ in layout]) if layout else np.zeros(0, np.float32)


def process_block(ctx: EngineContext, block: tuple[int, int], window: np.ndarray | None, layout: tuple) -> tuple[Any, dict]:
    """Post-process one block's window and return its nuclei table and stats.

    The table holds the block's exclusive nuclei and its seam candidates (column ``_seam``,
    with pixel masks in ``_mask`` over the box ``_by0, _bx0, _by1, _bx1``, canvas model px).
    """
    from .stitching import classify_block_nuclei

    t = time.perf_counter()
    bg = ctx.blocks
    r, c = block
    wx0, wy0, _, _ = bg.window_box(r, c)
    model = model_of(ctx)
    stats: dict[str, float] = {"n_found": 0, "n_exclusive": 0, "n_candidates": 0, "n_cut_owned": 0}
    if window is not None:
        res = model.postprocess(_split(window, layout), origin=(wx0, wy0))
    elif not getattr(model, "needs_maps", True):  # e.g. the null model: no maps at all
        res = model.postprocess({}, origin=(wx0, wy0), shape=(bg.window, bg.window))
    else:  # no patch ran near this block: nothing to find
        stats["t_post"] = time.perf_counter() - t
        return _frame({}), stats
    inst = res.inst
    labels = np.asarray(res.labels, np.int64)
    stats["n_found"] = int(len(labels))
    if len(labels) == 0:
        stats["t_post"] = time.perf_counter() - t
        return _frame({}), stats
    geo = _instance_geometry(inst, labels, wx0, wy0)
    cls = classify_block_nuclei(bg, r, c, geo["cx"], geo["cy"], geo["bbox"])
    # nothing centred beyond the slide's edge (e.g. the null model's lattice) is on the slide
    on_canvas = (geo["cx"] >= 0) & (geo["cy"] >= 0) & (geo["cx"] < bg.width) & (geo["cy"] < bg.height)
    keep = (cls.exclusive | cls.candidate) & on_canvas
    if ctx.strict and (cls.cut & cls.owner).any():
        from .errors import OwnershipError

        raise OwnershipError(f"block ({r}, {c}): {int((cls.cut & cls.owner).sum())} nucleus/nuclei owned by this block touch its "
                             f"window border; the halo ({bg.halo} px) is smaller than the nucleus radius")
    idx = np.nonzero(keep)[0]
    stats.update(n_exclusive=int(cls.exclusive.sum()), n_candidates=int(cls.candidate.sum()),
                 n_cut_owned=int((cls.cut & cls.owner).sum()))
    data = nucleus_columns(ctx, inst, labels[idx], (wx0, wy0), geo, idx, res, block)
    with_mask = cls.candidate[idx] | ctx.all_masks
    masks: list[bytes | None] = []
    for k, i in enumerate(idx.tolist()):
        if with_mask[k]:
            y0, x0, y1, x1 = geo["bbox"][i]
            m = inst[y0 - wy0 : y1 - wy0, x0 - wx0 : x1 - wx0] == labels[i]
            masks.append(np.packbits(m, axis=None).tobytes())
        else:
            masks.append(None)
    data["_seam"] = cls.candidate[idx]
    data["_prio"] = cls.priority[idx]
    data["_cut"] = cls.cut[idx]
    data["_idx"] = idx.astype(np.int32)
    for j, name in enumerate(("_by0", "_bx0", "_by1", "_bx1")):
        data[name] = geo["bbox"][idx, j].astype(np.int32)
    data["_mask"] = masks
    frame = _frame(data)
    stats["t_post"] = time.perf_counter() - t
    return frame, stats


def _instance_geometry(inst: np.ndarray, labels: np.ndarray, ox: int, oy: int) -> dict[str, np.ndarray]:
    """Pixel count, exact centroid (canvas px, from integer sums) and canvas bbox per label."""
    ys, xs = np.nonzero(inst)
    lab = inst[ys, xs].astype(np.int64)
    nlab = int(labels.max()) + 1
    cnt = np.bincount(lab, minlength=nlab)[labels]
    n = np.maximum(cnt, 1)
    # centroids from exact integer sums of absolute canvas coordinates: the same nucleus gets
    # bit-identical centroids (and ids) whatever block it comes from
    sy = np.bincount(lab, weights=ys, minlength=nlab)[labels] + n * oy
    sx = np.bincount(lab, weights=xs, minlength=nlab)[labels] + n * ox
    big = np.iinfo(np.int64).max
    y_min, x_min = np.full(nlab, big), np.full(nlab, big)
    y_max, x_max = np.full(nlab, -1), np.full(nlab, -1)
    np.minimum.at(y_min, lab, ys)
    np.minimum.at(x_min, lab, xs)
    np.maximum.at(y_max, lab, ys)
    np.maximum.at(x_max, lab, xs)
    bbox = np.column_stack([y_min[labels] + oy, x_min[labels] + ox, y_max[labels] + 1 + oy, x_max[labels] + 1 + ox])
    return {"n": cnt, "cx": sx / n + 0.5, "cy": sy / n + 0.5, "bbox": bbox}


def nucleus_columns(ctx: EngineContext, inst: np.ndarray, labels: np.ndarray, origin: tuple[int, int],
                    geo: dict[str, np.ndarray], idx: np.ndarray, res: Any, block: tuple[int, int]) -> dict[str, Any]:
    """The nucleus-table columns (level-0 coordinates, µm measurements) of ``labels`` of ``inst``.

    ``geo`` comes from :func:`_instance_geometry` over all of ``res``'s labels and ``idx``
    selects the measured ones (aligned with ``labels``).
    """
    import shapely

    from .export import nucleus_uuid
    from .postprocess import measure_instances
    from .schema import MORPHOLOGY_COLUMNS, PROB_COLUMNS, class_name

    ox, oy = origin
    m = measure_instances(inst, labels, ctx.model_mpp)
    s = 1.0 / ctx.scale
    geoms = [None if poly is None else shapely.Polygon((poly + (ox, oy)) * s) for poly in m["polygon"]]
    cx0 = geo["cx"][idx] * s
    cy0 = geo["cy"][idx] * s
    n = len(idx)
    class_id = np.asarray(res.class_id)[idx].astype(np.int8)
    data: dict[str, Any] = {
        "id": [nucleus_uuid(ctx.fingerprint, x, y) for x, y in zip(cx0, cy0)],
        "block_row": np.full(n, block[0], np.int32),
        "block_col": np.full(n, block[1], np.int32),
        "centroid_x": cx0,
        "centroid_y": cy0,
        "centroid_x_um": cx0 * ctx.slide_mpp,
        "centroid_y_um": cy0 * ctx.slide_mpp,
        "class_id": class_id,
        "class_name": [class_name(k) for k in class_id],
        "class_prob": np.asarray(res.class_prob)[idx].astype(np.float32),
    }
    probs = res.class_probs[idx] if res.class_probs is not None else np.full((n, 5), np.nan, np.float32)
    for j, col in enumerate(PROB_COLUMNS):
        data[col] = probs[:, j].astype(np.float32)
    for col in MORPHOLOGY_COLUMNS:
        data[col] = np.asarray(m[col], np.float32)
    data["region_id"] = np.full(n, -1, np.int32)
    data["geometry"] = geoms
    return data


#: Internal columns of block results (seam bookkeeping), dropped before writing.
INTERNAL_COLUMNS = ("_seam", "_prio", "_cut", "_idx", "_by0", "_bx0", "_by1", "_bx1", "_mask")


def _frame(data: dict[str, Any]) -> Any:
    import pandas as pd

    from .schema import NUCLEUS_COLUMNS

    if not data:
        cols = {k: pd.Series(dtype=object if v in ("str", "object") else v) for k, v in NUCLEUS_COLUMNS.items()}
        cols.update({"_seam": pd.Series(dtype=bool), "_prio": pd.Series(dtype=np.int64), "_cut": pd.Series(dtype=bool),
                     "_idx": pd.Series(dtype=np.int32), **{k: pd.Series(dtype=np.int32) for k in ("_by0", "_bx0", "_by1", "_bx1")},
                     "_mask": pd.Series(dtype=object)})
        return pd.DataFrame(cols)
    return pd.DataFrame(data)


# --------------------------------------------------------------------------------------------
# blending (coordinator side)
# --------------------------------------------------------------------------------------------
class MapBlender:
    """Blends patch outputs of one strip into final map rows, in patch order.

    Patches must be added in row-major patch order (the plan's order); each pixel's weighted
    sum then always adds the same terms in the same order, so the result does not depend on
    which task finished first. Rows become final when the next patch row starts; they are kept
    as float16 chunks until :meth:`drop_before` releases them.
    """

    def __init__(self, pg: PatchGrid, x0: int, x1: int, channels: int, fill: np.ndarray) -> None:
        self.pg, self.x0, self.x1 = pg, x0, x1
        self.width = x1 - x0
        self.c = channels
        self.fill = np.asarray(fill, np.float32).reshape(-1)
        n, s = pg.output_size, pg.stride
        self.acc = np.zeros((channels + 1, n, self.width), np.float32)
        w1 = blend_weights(n, s)
        self.w2 = np.outer(w1, w1).astype(np.float32)
        self._term = np.empty((channels, n, n), np.float32)  # one patch's weighted maps (reused)
        self.row: int | None = None
        self.chunks: list[tuple[int, np.ndarray]] = []  # (canvas y0, (C, h, width) float16)
        self.final_y = -(1 << 60)  # canvas rows < final_y are final
        self.done = False
        self.lowres: list[tuple[int, np.ndarray]] = []

    def _acc_y0(self) -> int:
        assert self.row is not None
        return int(self.pg.output_start(self.row))

    def add(self, patch: tuple[int, int], maps: np.ndarray) -> None:
        """Add one patch's output ``(C, N, N)`` (rows must not go backwards)."""
        r, c = patch
        if self.row is None:
            self.row = r
        elif r < self.row:
            raise ValueError(f"patch row {r} after row {self.row}: patches must come in row-major order")
        while self.row < r:
            self._finalize_row()
        pg = self.pg
        px0 = int(pg.output_start(c)) - self.x0
        a0, a1 = max(0, px0), min(self.width, px0 + pg.output_size)
        if a1 <= a0:
            return
        w = self.w2[:, a0 - px0 : a1 - px0]
        acc = self.acc
        term = self._term[:, :, : a1 - a0]
        np.multiply(maps[:, :, a0 - px0 : a1 - px0], w, out=term)  # float16 -> float32 exactly, then * w
        acc[: self.c, :, a0:a1] += term
        acc[self.c, :, a0:a1] += w

    def _emit(self, y0: int, part: np.ndarray) -> None:
        # the weighted mean, computed in float32 and rounded to float16 straight into the kept
        # chunk (no float32 temporaries the size of the band); the fill where no weight fell
        wsum = part[self.c]
        pos = wsum > 0
        if not pos.any():
            return
        maps = np.empty(part[: self.c].shape, np.float16)
        fill16 = self.fill.astype(np.float16)
        empty = ~pos
        for j in range(self.c):
            np.divide(part[j], wsum, out=maps[j], where=pos, casting="unsafe")
            np.copyto(maps[j], fill16[j], where=empty)
        self.chunks.append((y0, maps))

    def _finalize_row(self) -> None:
        s, b = self.pg.stride, self.pg.border
        y0 = self._acc_y0()
        self._emit(y0, self.acc[:, :s])
        # rows s .. s + 2b (the next row's overlap) move to the top, the rest starts at zero
        self.acc[:, : 2 * b] = self.acc[:, s : s + 2 * b]
        self.acc[:, 2 * b :] = 0
        self.row = (self.row or 0) + 1
        self.final_y = y0 + s

    def finish(self) -> None:
        """No more patches: everything accumulated is final."""
        if self.row is not None and not self.done:
            y0 = self._acc_y0()
            self._emit(y0, self.acc)
        self.done = True
        self.final_y = 1 << 60

    def window(self, box: tuple[int, int, int, int]) -> np.ndarray:
        """The final maps over a canvas box ``(x0, y0, x1, y1)``, float16.

        Fill where no patch ran and beyond the canvas: the slide ends at its edge (patches
        near it see mirrored context, but what they predict beyond the edge is not kept).
        """
        x0, y0, x1, y1 = box
        if y1 > self.final_y:
            raise ValueError(f"rows up to {y1} requested, only rows < {self.final_y} are final")
        out = np.empty((self.c, y1 - y0, x1 - x0), np.float16)
        out[:] = self.fill[:, None, None].astype(np.float16)
        W, H = self.pg.width, self.pg.height
        ca, cb = max(x0, self.x0, 0), min(x1, self.x1, W)
        for cy0, ch in self.chunks:
            cy1 = cy0 + ch.shape[1]
            a, b = max(y0, cy0, 0), min(y1, cy1, H)
            if a >= b or ca >= cb:
                continue
            out[:, a - y0 : b - y0, ca - x0 : cb - x0] = ch[:, a - cy0 : b - cy0, ca - self.x0 : cb - self.x0]
        return out

    def drop_before(self, y: int) -> None:
        """Release chunks that end at or above canvas row ``y``."""
        self.chunks = [(cy0, ch) for cy0, ch in self.chunks if cy0 + ch.shape[1] > y]

    @property
    def nbytes(self) -> int:
        return int(self.acc.nbytes + sum(ch.nbytes for _, ch in self.chunks))


# --------------------------------------------------------------------------------------------
# executors
# --------------------------------------------------------------------------------------------
class _Done:
    """A finished future (inline execution)."""

    def __init__(self, fn: Callable, args: tuple) -> None:
        args = tuple(a.result() if isinstance(a, _Done) else a for a in args)
        try:
            self._value, self._exc = fn(*args), None
        except BaseException as exc:  # re-raised by result()
            self._value, self._exc = None, exc

    def done(self) -> bool:
        return True

    def result(self) -> Any:
        if self._exc is not None:
            raise self._exc
        return self._value

    def release(self) -> None:
        pass


class InlineExecutor:
    """Runs every task at once in the calling thread (images in memory, tests)."""

    def submit(self, fn: Callable, *args: Any) -> _Done:
        return _Done(fn, args)

    def put(self, obj: Any) -> Any:
        return obj

    def wait_any(self, futures: list) -> None:
        return None


class DaskExecutor:
    """Submits tasks to a ``dask.distributed`` client."""

    def __init__(self, client: Any) -> None:
        self.client = client

    def submit(self, fn: Callable, *args: Any) -> Any:
        return self.client.submit(fn, *args, pure=False)

    def put(self, obj: Any) -> Any:
        # a worker that just died may still be chosen: try again (the scheduler drops it)
        for attempt in range(6):
            try:
                return self.client.scatter(obj, direct=True)
            except Exception as exc:
                if attempt == 5 or not (_lost_work(exc) or isinstance(exc, OSError)):
                    raise
                time.sleep(0.5 * (attempt + 1))
        raise AssertionError("unreachable")

    def wait_any(self, futures: list) -> None:
        from distributed import wait

        if futures:
            try:
                wait(futures, return_when="FIRST_COMPLETED")
            except Exception:  # e.g. futures cancelled with a lost worker: the caller sees them as done
                pass


# --------------------------------------------------------------------------------------------
# coordinator
# --------------------------------------------------------------------------------------------
def _lost_work(exc: BaseException) -> bool:
    """An error that means "the worker (or its data) went away", not "the task failed"."""
    names = {t.__name__ for t in type(exc).__mro__}
    return bool(names & {"KilledWorker", "CancelledError", "FutureCancelledError", "CommClosedError", "FutureLostError"})


def run_strip(
    ctx: EngineContext,
    strip: Strip,
    ex: Any,
    *,
    todo: set[tuple[int, int]] | None = None,
    on_block: Callable[[tuple[int, int], Any, dict], None],
    on_batch: Callable[[int, dict], None] | None = None,
    max_in_flight: int = 4,
    max_post: int = 2,
) -> dict[str, float]:
    """Run one strip: infer its batches in order, blend, post-process blocks as they become ready.

    Parameters
    ----------
    todo : set of (row, col), optional
        Blocks still to do (resume); only batches with a patch they need are inferred.
    on_block : callable(block, frame, stats)
        Called in the coordinator for every finished block (e.g. to save its part file).
    on_batch : callable(n_patches, stats), optional
        Called for every inferred batch (progress).

    Returns
    -------
    dict
        ``t_read``, ``t_infer`` and ``t_post`` summed over tasks, ``n_patches`` inferred,
        ``peak_band_bytes``.
    """
    bg, pg = ctx.blocks, ctx.patches
    blocks = [b for b in strip.blocks if todo is None or b in todo]
    if todo is None:
        run_batches = list(range(len(strip.batches)))
    else:
        need: set[tuple[int, int]] = set()
        for r, c in blocks:
            rows, cols = patches_for_window(pg, bg.window_box(r, c))
            need.update((pr, pc) for pr in rows for pc in cols)
        run_batches = [i for i, b in enumerate(strip.batches) if any(p in need for p in b)]
    stats = {"t_read": 0.0, "t_infer": 0.0, "t_post": 0.0, "n_patches": 0, "peak_band_bytes": 0, "oom_batch_splits": 0,
             "post_retries": 0}
    if not blocks:
        return stats
    blender: MapBlender | None = None
    layout: tuple = ()
    infer_q: deque = deque()
    nxt = 0
    pending = deque(blocks)  # not yet submitted, row-major (window bottoms non-decreasing)
    posts: dict[Any, tuple[tuple[int, int], Any, int]] = {}
    model = model_of(ctx)

    def ensure_blender(n_channels: int) -> MapBlender:
        nonlocal blender
        if blender is None:
            blender = MapBlender(pg, strip.x0, strip.x1, n_channels, fill_values(model, layout))
        return blender

    if not run_batches:  # nothing to infer: every window is fill
        layout = getattr(model, "map_layout", ())
        ensure_blender(sum(k for _, k, _ in layout)).finish()
    try:
        while pending or posts:
            while len(infer_q) < max_in_flight and nxt < len(run_batches):
                bi = run_batches[nxt]
                rd = ex.submit(read_patches, ctx, strip.batches[bi])
                infer_q.append((bi, ex.submit(infer_patches, ctx, rd)))
                nxt += 1
            progressed = False
            if infer_q and infer_q[0][1].done():
                bi, fut = infer_q.popleft()
                maps, lay, t_read, t_inf, n_split = fut.result()
                stats["oom_batch_splits"] += n_split
                fut.release()
                if blender is None:
                    layout = lay
                bl = ensure_blender(maps.shape[1])
                for p, m in zip(strip.batches[bi], maps):
                    bl.add(p, m)
                stats["t_read"] += t_read
                stats["t_infer"] += t_inf
                stats["n_patches"] += len(maps)
                if on_batch is not None:
                    on_batch(len(maps), {"t_read": t_read, "t_infer": t_inf})
                if nxt == len(run_batches) and not infer_q:
                    bl.finish()
                progressed = True
            if blender is not None:
                stats["peak_band_bytes"] = max(stats["peak_band_bytes"], blender.nbytes)
                while pending and len(posts) < max_post and bg.window_box(*pending[0])[3] <= blender.final_y:
                    b = pending.popleft()
                    win = blender.window(bg.window_box(*b)) if blender.c else None
                    fut = ex.submit(process_block, ctx, b, ex.put(win) if win is not None else None, layout)
                    posts[fut] = (b, win, 0)
                    progressed = True
                blender.drop_before(min((bg.window_box(*b)[1] for b in pending), default=1 << 60))
            for fut in [f for f in posts if f.done()]:
                b, win, tries = posts.pop(fut)
                try:
                    frame, st = fut.result()
                except Exception as exc:
                    # a worker died with the block's window (scattered data is not recomputed):
                    # the coordinator still holds the window, so the block is simply resubmitted
                    if not _lost_work(exc) or tries >= 3:
                        raise
                    fut2 = ex.submit(process_block, ctx, b, ex.put(win) if win is not None else None, layout)
                    posts[fut2] = (b, win, tries + 1)
                    stats["post_retries"] += 1
                    progressed = True
                    continue
                fut.release()
                stats["t_post"] += st.get("t_post", 0.0)
                on_block(b, frame, st)
                progressed = True
            if not progressed:
                ex.wait_any(([infer_q[0][1]] if infer_q else []) + list(posts))
    finally:
        for _, fut in infer_q:
            getattr(fut, "cancel", lambda: None)()
        for fut in posts:
            getattr(fut, "cancel", lambda: None)()
    return stats


# --------------------------------------------------------------------------------------------
# stitch stage: seam candidates of all blocks -> resolution -> final rows per block
# --------------------------------------------------------------------------------------------
def collect_candidates(frames: Iterable[tuple[tuple[int, int], Any]]) -> Any:
    """The :class:`~wsi_nuclei.stitching.Candidates` of block tables ``(block, frame)``."""
    from .stitching import Candidates

    keys, prio, bbox, masks = [], [], [], []
    for (r, c), f in frames:
        sel = f["_seam"].to_numpy(bool) if len(f) else np.zeros(0, bool)
        if not sel.any():
            continue
        g = f.loc[sel]
        b = g[["_by0", "_bx0", "_by1", "_bx1"]].to_numpy(np.int64)
        for i, (mb, bb) in zip(g["_idx"].to_numpy(), zip(g["_mask"].to_numpy(), b)):
            shape = (int(bb[2] - bb[0]), int(bb[3] - bb[1]))
            masks.append(np.unpackbits(np.frombuffer(mb, np.uint8), count=shape[0] * shape[1]).astype(bool).reshape(shape))
            keys.append((r, c, int(i)))
        prio.extend(g["_prio"].to_numpy(np.int64).tolist())
        bbox.append(b)
    return Candidates(np.asarray(keys, np.int64).reshape(-1, 3), np.asarray(prio, np.int64),
                      np.concatenate(bbox) if bbox else np.zeros((0, 4), np.int64), masks)


def remeasure(ctx: EngineContext, row: Any, mask: np.ndarray, bbox: np.ndarray, block: tuple[int, int]) -> dict[str, Any]:
    """New position, id, outline and measurements of a trimmed nucleus (class fields kept)."""
    from .models.base import InstanceResult

    y0, x0 = int(bbox[0]) - 1, int(bbox[1]) - 1
    inst = np.pad(mask.astype(np.int32), 1)
    labels = np.array([1], np.int64)
    geo = _instance_geometry(inst, labels, x0, y0)
    probs = row[[c for c in row.index if c.startswith("prob_")]].to_numpy(np.float32).reshape(1, -1)
    res = InstanceResult(inst, labels.astype(np.int32), np.array([row["class_id"]], np.int8),
                         np.array([row["class_prob"]], np.float32), probs)
    cols = nucleus_columns(ctx, inst, labels, (x0, y0), geo, np.array([0]), res, block)
    cols.update({"_by0": [y0 + 1], "_bx0": [x0 + 1], "_by1": [y0 + 1 + mask.shape[0]], "_bx1": [x0 + 1 + mask.shape[1]]})
    return {k: (v[0] if len(v) else None) for k, v in cols.items()}


def apply_resolution(ctx: EngineContext, block: tuple[int, int], frame: Any, decisions: dict[int, tuple[int, Any]]) -> tuple[Any, int]:
    """The final nuclei of one block: its exclusive ones and the candidates kept or trimmed.

    ``decisions`` maps a candidate's ``_idx`` to ``(status, pieces or None)``; each remaining
    piece of a trimmed candidate becomes a nucleus of its own (re-measured). Returns the table
    (internal columns dropped unless ``ctx.all_masks``) and the number of trimmed candidates.
    """
    import pandas as pd

    if not len(frame):
        return frame, 0
    seam = frame["_seam"].to_numpy(bool)
    idx = frame["_idx"].to_numpy()
    keep = ~seam.copy()
    trimmed = []
    for pos in np.nonzero(seam)[0].tolist():
        status, pieces = decisions.get(int(idx[pos]), (0, None))
        if status == 1:
            keep[pos] = True
        elif status == 2:
            trimmed.append((pos, pieces))
    rows = [frame.loc[keep]]
    for pos, pieces in trimmed:
        row = frame.iloc[pos]
        bbox = row[["_by0", "_bx0"]].to_numpy(np.int64)
        extra = []
        for mask in pieces:
            new = remeasure(ctx, row, mask, bbox, block)
            new["_mask"] = np.packbits(mask, axis=None).tobytes()
            r = row.copy()
            for k, v in new.items():
                r[k] = v
            extra.append(r)
        rows.append(pd.DataFrame(extra, columns=frame.columns).astype(frame.dtypes.to_dict()))
    out = pd.concat(rows, ignore_index=True) if len(rows) > 1 else rows[0]
    # the block's nuclei in a fixed order (centroid y, then x): deterministic output
    out = out.iloc[np.lexsort((out["centroid_x"].to_numpy(), out["centroid_y"].to_numpy()))].reset_index(drop=True)
    if not ctx.all_masks:
        out = out.drop(columns=list(INTERNAL_COLUMNS))
    return pd.DataFrame(out), len(trimmed)

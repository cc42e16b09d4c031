"""The patch tasks: read level-0 boxes as RGB patches at model resolution (reflect-padded at
the canvas edge) and run the network on them (float16 maps; a batch that runs out of memory
is halved and retried).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import numpy as np

from ._context import EngineContext, _slide_of, infer_slot, model_of, use_torch_threads

if TYPE_CHECKING:
    from ..models.base import NucleusModel


def read_patches(
    ctx: EngineContext, patches: tuple[tuple[int, int], ...]
) -> tuple[np.ndarray, float]:
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
    s = ctx.scale
    todo, boxes, sizes, pads = [], [], [], []
    for i, (r, c) in enumerate(patches):
        x0, y0, x1, y1 = pg.input_box(r, c)
        cx0, cy0, cx1, cy1 = max(0, x0), max(0, y0), min(W, x1), min(H, y1)
        if cx1 <= cx0 or cy1 <= cy0:  # entirely off the canvas (cannot happen for planned patches)
            out[i] = 255
            continue
        todo.append(i)
        boxes.append((cx0 / s, cy0 / s, cx1 / s, cy1 / s))
        sizes.append((cx1 - cx0, cy1 - cy0))
        pads.append(((cy0 - y0, y1 - cy1), (cx0 - x0, x1 - cx1), (0, 0)))
    batch = getattr(slide, "read_scaled_batch", None)
    if batch is not None:  # a patch row's overlapping boxes in one read, the same pixels
        imgs = batch(boxes, sizes, target_mpp=ctx.read_mpp)
    else:  # a slide-like object with read_scaled alone
        imgs = [slide.read_scaled(b, z, target_mpp=ctx.read_mpp) for b, z in zip(boxes, sizes)]
    for i, img, pad in zip(todo, imgs, pads):
        if any(p for p in pad[0] + pad[1]):
            img = np.pad(img, pad, mode="reflect" if min(img.shape[:2]) > 1 else "edge")
        out[i] = img
    return out, time.perf_counter() - t


def infer_patches(
    ctx: EngineContext, read: tuple[np.ndarray, float]
) -> tuple[np.ndarray, tuple, float, float, int]:
    """Run the model on a batch: ``(maps (B, C, N, N) float16, layout, t_read, t_infer, splits)``.

    ``layout`` lists ``(name, channels, shape_kind)`` so that a window of the blended array can
    be split back into the model's map dict; ``splits`` counts the halvings of the batch after
    out-of-memory errors on the accelerator.

    The network runs on chunks of at most ``ctx.infer_chunk`` patches (0: the whole batch), at
    most ``ctx.infer_slots`` calls at a time per process (a batch's own chunks side by side when
    it is more than one), each with ``ctx.torch_threads`` torch threads; the chunks' maps are then
    copied into the batch's float16 array in patch order.
    """
    images, t_read = read
    t = time.perf_counter()
    model = model_of(ctx)
    n = ctx.patches.output_size
    step = ctx.infer_chunk if ctx.infer_chunk > 0 else max(1, len(images))
    slot = infer_slot(ctx.infer_slots)
    starts = list(range(0, len(images), step))
    t_setup = time.perf_counter() - t  # the model's first load included, as before

    def call(i0: int) -> tuple[list, int, float]:
        use_torch_threads(ctx.torch_threads)  # per thread (OpenMP): in the thread that calls
        with slot:
            t_call = time.perf_counter()
            raws, k_split = _infer_halving(model, images[i0 : i0 + step])
            return raws, k_split, time.perf_counter() - t_call

    if ctx.infer_slots > 1 and len(starts) > 1:
        # the chunks of this batch side by side (each single-threaded: the same bytes as one
        # after the other), so that a run with a single batch in flight still uses every core
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(min(ctx.infer_slots, len(starts))) as pool:
            results = list(pool.map(call, starts))
    else:
        results = [call(i0) for i0 in starts]
    t_fill = time.perf_counter()
    maps: np.ndarray | None = None
    layout: tuple = ()
    n_split = 0
    t_calls = 0.0  # summed over the calls (they may overlap)
    for i0, (raws, k_split, dt) in zip(starts, results):
        n_split += k_split
        t_calls += dt
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
    # not the time spent waiting for a slot (another task's call)
    t_model = t_setup + t_calls + (time.perf_counter() - t_fill)
    return maps, layout, t_read, t_model, n_split


def _is_oom(exc: BaseException) -> bool:
    try:
        import torch

        if isinstance(exc, torch.cuda.OutOfMemoryError):
            return True
    except ImportError:  # pragma: no cover
        pass
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def _infer_halving(model: NucleusModel, images: np.ndarray) -> tuple[list, int]:
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


def _split(window: np.ndarray, layout: tuple, keep_float16: bool = False) -> dict[str, np.ndarray]:
    """The model's map dict of a blended window: float32 copies, or (``keep_float16``, for models
    whose post-processing converts what it reads) views of the float16 window."""
    out, j = {}, 0
    for name, k, kind in layout:
        a = window[j : j + k]
        if not keep_float16:
            a = a.astype(np.float32)
        out[name] = a if kind == 3 else a[0]
        j += k
    return out


def fill_values(model: NucleusModel, layout: tuple) -> np.ndarray:
    """Per-channel value of the maps where no patch ran (the model's ``map_fill``, else 0)."""
    fill = getattr(model, "map_fill", {}) or {}
    return (
        np.concatenate(
            [np.full(k, float(fill.get(name, 0.0)), np.float32) for name, k, _ in layout]
        )
        if layout
        else np.zeros(0, np.float32)
    )

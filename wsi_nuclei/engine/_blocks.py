"""The block task: post-process a block's window of blended maps, measure the nuclei and split
them into the block's own (exclusive) nuclei and seam candidates (:mod:`wsi_nuclei.stitching`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from ._context import EngineContext, model_of
from ._patches import _split


def process_block(
    ctx: EngineContext, block: tuple[int, int], window: np.ndarray | None, layout: tuple
) -> tuple[Any, dict]:
    """Post-process one block's window and return its nuclei table and stats.

    The table holds the block's exclusive nuclei and its seam candidates (column ``_seam``,
    with pixel masks in ``_mask`` over the box ``_by0, _bx0, _by1, _bx1``, canvas model px).
    """
    from ..stitching import classify_block_nuclei, clip_to_core

    t = time.perf_counter()
    bg = ctx.blocks
    r, c = block
    wx0, wy0, _, _ = bg.window_box(r, c)
    model = model_of(ctx)
    stats: dict[str, float] = {
        "n_found": 0,
        "n_exclusive": 0,
        "n_candidates": 0,
        "n_cut_owned": 0,
        "n_core_pieces": 0,
    }
    if window is not None:
        raw = _split(window, layout, keep_float16=getattr(model, "accepts_float16_maps", False))
        res = model.postprocess(raw, origin=(wx0, wy0))
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
    on_canvas = (
        (geo["cx"] >= 0) & (geo["cy"] >= 0) & (geo["cx"] < bg.width) & (geo["cy"] < bg.height)
    )
    # a core piece lies in the core (on the canvas) whatever its centroid
    keep = ((cls.exclusive | cls.candidate) & on_canvas) | cls.core_piece
    bbox = geo["bbox"].copy()
    clipped: dict[int, np.ndarray] = {}
    for i in np.nonzero(cls.core_piece)[0].tolist():
        y0, x0, y1, x1 = bbox[i]
        m = inst[y0 - wy0 : y1 - wy0, x0 - wx0 : x1 - wx0] == labels[i]
        got = clip_to_core(bg, r, c, m, bbox[i])
        if got is None:
            keep[i] = False
        else:
            clipped[i], bbox[i] = got
    if ctx.strict and (cls.cut & cls.owner).any():
        from ..errors import OwnershipError

        raise OwnershipError(
            f"block ({r}, {c}): {int((cls.cut & cls.owner).sum())} nucleus/nuclei owned by this block touch its "
            f"window border; the halo ({bg.halo} px) is smaller than the nucleus radius"
        )
    idx = np.nonzero(keep)[0]
    stats.update(
        n_exclusive=int(cls.exclusive.sum()),
        n_candidates=int((cls.candidate & ~cls.core_piece).sum()) + len(clipped),
        n_cut_owned=int((cls.cut & cls.owner).sum()),
        n_core_pieces=len(clipped),
    )
    data = nucleus_columns(ctx, inst, labels[idx], (wx0, wy0), geo, idx, res, block)
    with_mask = cls.candidate[idx] | ctx.all_masks
    masks: list[bytes | None] = []
    for k, i in enumerate(idx.tolist()):
        if i in clipped:
            masks.append(np.packbits(clipped[i], axis=None).tobytes())
        elif with_mask[k]:
            y0, x0, y1, x1 = bbox[i]
            m = inst[y0 - wy0 : y1 - wy0, x0 - wx0 : x1 - wx0] == labels[i]
            masks.append(np.packbits(m, axis=None).tobytes())
        else:
            masks.append(None)
    data["_seam"] = cls.candidate[idx]
    data["_prio"] = cls.priority[idx]
    data["_cut"] = cls.cut[idx]
    data["_piece"] = cls.core_piece[idx]
    data["_idx"] = idx.astype(np.int32)
    for j, name in enumerate(("_by0", "_bx0", "_by1", "_bx1")):
        data[name] = bbox[idx, j].astype(np.int32)
    data["_mask"] = masks
    frame = _frame(data)
    stats["t_post"] = time.perf_counter() - t
    return frame, stats


def _instance_geometry(
    inst: np.ndarray, labels: np.ndarray, ox: int, oy: int
) -> dict[str, np.ndarray]:
    """Pixel count, exact centroid (canvas px, from integer sums) and canvas bbox per label."""
    flat = inst.ravel()
    at = np.flatnonzero(flat)  # row-major, as np.nonzero (several times faster in 1-D)
    lab = flat[at].astype(np.int64)
    ys, xs = np.divmod(at, inst.shape[1])
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
    bbox = np.column_stack(
        [y_min[labels] + oy, x_min[labels] + ox, y_max[labels] + 1 + oy, x_max[labels] + 1 + ox]
    )
    return {"n": cnt, "cx": sx / n + 0.5, "cy": sy / n + 0.5, "bbox": bbox}


def nucleus_columns(
    ctx: EngineContext,
    inst: np.ndarray,
    labels: np.ndarray,
    origin: tuple[int, int],
    geo: dict[str, np.ndarray],
    idx: np.ndarray,
    res: Any,
    block: tuple[int, int],
) -> dict[str, Any]:
    """The nucleus-table columns (level-0 coordinates, µm measurements) of ``labels`` of ``inst``.

    ``geo`` comes from :func:`_instance_geometry` over all of ``res``'s labels and ``idx``
    selects the measured ones (aligned with ``labels``).
    """
    from ..export import nucleus_uuids
    from ..postprocess import measure_instances
    from ..schema import MORPHOLOGY_COLUMNS, PROB_COLUMNS, class_name

    ox, oy = origin
    m = measure_instances(inst, labels, ctx.model_mpp)
    s = 1.0 / ctx.scale
    geoms = _polygons(list(m["polygon"]), (ox, oy), s)
    cx0 = geo["cx"][idx] * s
    cy0 = geo["cy"][idx] * s
    n = len(idx)
    class_id = np.asarray(res.class_id)[idx].astype(np.int8)
    data: dict[str, Any] = {
        "id": nucleus_uuids(ctx.fingerprint, cx0, cy0),
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
    probs = (
        res.class_probs[idx] if res.class_probs is not None else np.full((n, 5), np.nan, np.float32)
    )
    for j, col in enumerate(PROB_COLUMNS):
        data[col] = probs[:, j].astype(np.float32)
    for col in MORPHOLOGY_COLUMNS:
        data[col] = np.asarray(m[col], np.float32)
    data["region_id"] = np.full(n, -1, np.int32)
    data["geometry"] = geoms
    return data


def _polygons(rings: Sequence[np.ndarray | None], offset: tuple[int, int], scale: float) -> list:
    """Shapely polygons of the ``(K, 2)`` window-px rings, moved by ``offset`` and scaled to level
    0 in one vectorised call (None stays None)."""
    import shapely

    out: list = [None] * len(rings)
    keep = [i for i, r in enumerate(rings) if r is not None]
    parts = [r for r in rings if r is not None]
    if parts:
        coords = (np.concatenate(parts) + offset) * scale
        index = np.repeat(np.arange(len(parts)), [len(p) for p in parts])
        for i, g in zip(keep, shapely.polygons(shapely.linearrings(coords, indices=index))):
            out[i] = g
    return out


#: Internal columns of block results (seam bookkeeping), dropped before writing.
INTERNAL_COLUMNS = (
    "_seam",
    "_prio",
    "_cut",
    "_piece",
    "_idx",
    "_by0",
    "_bx0",
    "_by1",
    "_bx1",
    "_mask",
)


def _frame(data: dict[str, Any]) -> Any:
    import pandas as pd

    from ..schema import NUCLEUS_COLUMNS

    if not data:
        cols = {
            k: pd.Series(dtype=object if v in ("str", "object") else v)
            for k, v in NUCLEUS_COLUMNS.items()
        }
        cols.update(
            {
                "_seam": pd.Series(dtype=bool),
                "_prio": pd.Series(dtype=np.int64),
                "_cut": pd.Series(dtype=bool),
                "_piece": pd.Series(dtype=bool),
                "_idx": pd.Series(dtype=np.int32),
                **{k: pd.Series(dtype=np.int32) for k in ("_by0", "_bx0", "_by1", "_bx1")},
                "_mask": pd.Series(dtype=object),
            }
        )
        return pd.DataFrame(cols)
    return pd.DataFrame(data)

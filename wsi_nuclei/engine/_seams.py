"""After all blocks: collect the seam candidates of every block and apply the seam decisions to
each block's part (a nucleus trimmed at a seam is re-measured).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

from ._blocks import INTERNAL_COLUMNS, _instance_geometry, nucleus_columns
from ._context import EngineContext


def collect_candidates(frames: Iterable[tuple[tuple[int, int], Any]]) -> Any:
    """The :class:`~wsi_nuclei.stitching.Candidates` of block tables ``(block, frame)``."""
    from ..stitching import Candidates

    keys, prio, bbox, masks, piece = [], [], [], [], []
    for (r, c), f in frames:
        sel = f["_seam"].to_numpy(bool) if len(f) else np.zeros(0, bool)
        if not sel.any():
            continue
        g = f.loc[sel]
        b = g[["_by0", "_bx0", "_by1", "_bx1"]].to_numpy(np.int64)
        for i, (mb, bb) in zip(g["_idx"].to_numpy(), zip(g["_mask"].to_numpy(), b)):
            shape = (int(bb[2] - bb[0]), int(bb[3] - bb[1]))
            masks.append(
                np.unpackbits(np.frombuffer(mb, np.uint8), count=shape[0] * shape[1])
                .astype(bool)
                .reshape(shape)
            )
            keys.append((r, c, int(i)))
        prio.extend(g["_prio"].to_numpy(np.int64).tolist())
        piece.extend(g["_piece"].to_numpy(bool).tolist())
        bbox.append(b)
    return Candidates(
        np.asarray(keys, np.int64).reshape(-1, 3),
        np.asarray(prio, np.int64),
        np.concatenate(bbox) if bbox else np.zeros((0, 4), np.int64),
        masks,
        np.asarray(piece, bool),
    )


def remeasure(
    ctx: EngineContext, row: Any, mask: np.ndarray, bbox: np.ndarray, block: tuple[int, int]
) -> dict[str, Any]:
    """New position, id, outline and measurements of a trimmed nucleus (class fields kept)."""
    from ..models.base import InstanceResult

    y0, x0 = int(bbox[0]) - 1, int(bbox[1]) - 1
    inst = np.pad(mask.astype(np.int32), 1)
    labels = np.array([1], np.int64)
    geo = _instance_geometry(inst, labels, x0, y0)
    probs = row[[c for c in row.index if c.startswith("prob_")]].to_numpy(np.float32).reshape(1, -1)
    res = InstanceResult(
        inst,
        labels.astype(np.int32),
        np.array([row["class_id"]], np.int8),
        np.array([row["class_prob"]], np.float32),
        probs,
    )
    cols = nucleus_columns(ctx, inst, labels, (x0, y0), geo, np.array([0]), res, block)
    cols.update(
        {
            "_by0": [y0 + 1],
            "_bx0": [x0 + 1],
            "_by1": [y0 + 1 + mask.shape[0]],
            "_bx1": [x0 + 1 + mask.shape[1]],
        }
    )
    return {k: (v[0] if len(v) else None) for k, v in cols.items()}


def apply_resolution(
    ctx: EngineContext, block: tuple[int, int], frame: Any, decisions: dict[int, tuple[int, Any]]
) -> tuple[Any, int]:
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
    out = out.iloc[
        np.lexsort((out["centroid_x"].to_numpy(), out["centroid_y"].to_numpy()))
    ].reset_index(drop=True)
    if not ctx.all_masks:
        out = out.drop(columns=list(INTERNAL_COLUMNS))
    return pd.DataFrame(out), len(trimmed)

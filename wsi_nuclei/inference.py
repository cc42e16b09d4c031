"""Images held in memory through the slide engine (``evaluate``, training validation, tuning).

An image is a small slide: :func:`segment_image` runs it through exactly the tiling,
blending, block post-processing and seam resolution that ``wsi-nuclei run`` uses
(:mod:`wsi_nuclei.engine`), only in the calling thread and without writing anything, and
returns one instance map. The accuracy measured on annotated images is therefore the
accuracy of what ``run`` produces. :func:`predict_maps` returns the blended maps themselves
(for threshold tuning and whole-region references).
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any

import numpy as np

from .models.base import InstanceResult

if TYPE_CHECKING:
    from .models.base import NucleusModel

__all__ = ["ArraySlide", "engine_context", "predict_maps", "segment_image", "predict_instances"]


class ArraySlide:
    """An RGB array as a slide at the model's resolution (what the engine reads from)."""

    backend = "array"
    mpp_source = "array"

    def __init__(self, image: np.ndarray, mpp: float = 0.25, name: str = "image") -> None:
        img = np.asarray(image)
        if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
            raise ValueError(f"expected an (H, W, 3) uint8 image, got {img.shape} {img.dtype}")
        self.image = img
        self.mpp = float(mpp)
        self.name = name
        self.dimensions = (img.shape[1], img.shape[0])
        self.fingerprint = hashlib.sha256(img.tobytes()).hexdigest()[:32]

    def read_scaled(
        self,
        box: tuple[float, float, float, float],
        out_size: tuple[int, int],
        target_mpp: float | None = None,
    ) -> np.ndarray:
        x0, y0, x1, y1 = (int(round(v)) for v in box)
        if (x1 - x0, y1 - y0) != tuple(out_size):
            raise ValueError("ArraySlide reads at its own resolution only")
        h, w = self.image.shape[:2]
        out = np.full((y1 - y0, x1 - x0, 3), 255, np.uint8)
        a0, b0, a1, b1 = max(0, x0), max(0, y0), min(w, x1), min(h, y1)
        if a1 > a0 and b1 > b0:
            out[b0 - y0 : b1 - y0, a0 - x0 : a1 - x0] = self.image[b0:b1, a0:a1]
        return out

    def get_thumbnail(self, max_size: Any) -> np.ndarray:
        return self.image


def engine_context(
    model: NucleusModel,
    slide: Any,
    *,
    block_size: int = 1024,
    halo: int | None = None,
    all_masks: bool = True,
) -> Any:
    """An :class:`~wsi_nuclei.engine.EngineContext` for ``slide`` (already at model resolution)."""
    from .engine import EngineContext, register_instance
    from .tiling import BlockGrid, PatchGrid

    spec = model.spec
    w, h = slide.dimensions
    pg = PatchGrid(w, h, spec.input_size, spec.output_size, spec.stride)
    bg = BlockGrid(w, h, block_size, spec.halo if halo is None else halo)
    return EngineContext(
        slide,
        register_instance(model),
        pg,
        bg,
        1.0,
        spec.mpp,
        spec.mpp,
        spec.mpp,
        slide.fingerprint,
        all_masks=all_masks,
    )


def predict_maps(
    model: NucleusModel, image: np.ndarray, *, batch: int = 8
) -> dict[str, np.ndarray]:
    """The engine's blended maps over a whole image (at the model's resolution).

    Returns
    -------
    dict
        The model's map names (e.g. ``np`` (H, W), ``hv`` (2, H, W), ``tp`` (C, H, W)), float32.
    """
    from .engine import MapBlender, fill_values, infer_patches, read_patches

    slide = ArraySlide(image, model.spec.mpp)
    ctx = engine_context(model, slide)
    pg = ctx.patches
    w, h = slide.dimensions
    patches = [(r, c) for r in range(pg.n_rows) for c in range(pg.n_cols)]
    blender = None
    layout: tuple = ()
    for i in range(0, len(patches), batch):
        b = tuple(patches[i : i + batch])
        maps, layout, _, _, _ = infer_patches(ctx, read_patches(ctx, b))
        if blender is None:
            blender = MapBlender(pg, 0, w, maps.shape[1], fill_values(model, layout))
        for p, m in zip(b, maps):
            blender.add(p, m)
    assert blender is not None
    blender.finish()
    arr = blender.window((0, 0, w, h)).astype(np.float32)
    out, j = {}, 0
    for name, k, kind in layout:
        out[name] = arr[j : j + k] if kind == 3 else arr[j]
        j += k
    return out


def segment_image(
    model: NucleusModel,
    image: np.ndarray,
    *,
    block_size: int = 1024,
    halo: int | None = None,
    batch: int = 8,
) -> InstanceResult:
    """Instances of a whole image (at the model's resolution) through the slide engine.

    Parameters
    ----------
    model : NucleusModel
        A loaded model (``load_model``).
    image : ndarray of uint8, shape (H, W, 3)
    block_size, halo : int
        Post-processing blocks (as ``run --block-size --halo``; defaults as ``run``).
    batch : int
        Patches per network call.

    Returns
    -------
    InstanceResult
        Labels 1..N in the engine's output order, with classes and probabilities.
    """
    from .engine import InlineExecutor, apply_resolution, collect_candidates, plan_strips, run_strip
    from .stitching import resolve_seams

    slide = ArraySlide(image, model.spec.mpp)
    ctx = engine_context(model, slide, block_size=block_size, halo=halo)
    frames: dict[tuple[int, int], Any] = {}
    strips = plan_strips(ctx.patches, ctx.blocks, ctx.blocks.blocks(), batch_size=batch)
    for st in strips:
        run_strip(ctx, st, InlineExecutor(), on_block=lambda b, f, s: frames.__setitem__(b, f))
    cands = collect_candidates(sorted(frames.items()))
    res = resolve_seams(cands)
    decisions: dict[tuple[int, int], dict[int, tuple[int, Any]]] = {}
    for i, (r, c, k) in enumerate(cands.key.tolist()):
        decisions.setdefault((r, c), {})[k] = (int(res.status[i]), res.masks.get(i))
    h, w = image.shape[:2]
    inst = np.zeros((h, w), np.int32)
    cls, prob, probs = [], [], []
    n = 0
    for b in sorted(frames):
        f, _ = apply_resolution(ctx, b, frames[b], decisions.get(b, {}))
        if not len(f):
            continue
        bb = f[["_by0", "_bx0", "_by1", "_bx1"]].to_numpy(np.int64)
        pcols = f[
            [
                f"prob_{c}"
                for c in ("Neoplastic", "Inflammatory", "Connective", "Dead", "Epithelial")
            ]
        ].to_numpy(np.float32)
        for j, (mb, (y0, x0, y1, x1)) in enumerate(zip(f["_mask"].to_numpy(), bb)):
            m = (
                np.unpackbits(np.frombuffer(mb, np.uint8), count=(y1 - y0) * (x1 - x0))
                .astype(bool)
                .reshape(y1 - y0, x1 - x0)
            )
            a0, b0, a1, b1 = max(0, x0), max(0, y0), min(w, x1), min(h, y1)
            if a1 <= a0 or b1 <= b0:
                continue
            sub = m[b0 - y0 : b1 - y0, a0 - x0 : a1 - x0]
            if not sub.any():
                continue
            n += 1
            inst[b0:b1, a0:a1][sub] = n
            cls.append(int(f["class_id"].iat[j]))
            prob.append(float(f["class_prob"].iat[j]))
            probs.append(pcols[j])
    labels = np.arange(1, n + 1, dtype=np.int32)
    has_probs = bool(model.spec.class_names)
    return InstanceResult(
        inst,
        labels,
        np.asarray(cls, np.int8),
        np.asarray(prob, np.float32),
        np.asarray(probs, np.float32).reshape(-1, 5) if has_probs else None,
    )


def predict_instances(model: NucleusModel, image: np.ndarray) -> InstanceResult:
    """Instances of a whole image through the engine (:func:`segment_image` with defaults)."""
    return segment_image(model, image)

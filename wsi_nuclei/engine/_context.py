"""What every engine task needs (:class:`EngineContext`, picklable) and the per-process caches
behind it: the slide opened once per worker, the model loaded once per process, the lock that
lets one network call run at a time, and models handed over in memory.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .._allocator import keep_large_blocks_in_heap
from ..tiling import BlockGrid, PatchGrid

if TYPE_CHECKING:
    from ..models.base import NucleusModel


@dataclass(frozen=True)
class EngineContext:
    """Everything a task needs, picklable (sent with each task).

    ``source`` is ``("path", path, backend, mpp)`` (each worker opens the slide once) or a
    picklable slide-like object; ``model`` is ``(name, weights, device, tta, precision)``.
    """

    source: Any
    model: tuple[str, str | None, str, bool, str]
    patches: PatchGrid
    blocks: BlockGrid
    scale: float  # level-0 px -> model px
    read_mpp: float
    slide_mpp: float
    model_mpp: float
    fingerprint: str
    strict: bool = False
    torch_threads: int = 0  # > 0: set in each worker process (local --workers N)
    #: keep the pixel mask of every nucleus (evaluation), not only the seam candidates
    all_masks: bool = False
    #: > 0: at most this many patches per network call (bounds activation memory); 0: the batch
    infer_chunk: int = 0


_LOCAL = threading.local()

_MODELS: dict[tuple, Any] = {}

_MODELS_LOCK = threading.Lock()

#: One network call at a time per process: two concurrent calls double the activation memory
#: and, on a CPU, oversubscribe the cores (each call already uses all torch threads).
_INFER_LOCK = threading.Lock()

#: Models handed over in memory (tests, evaluation of an already built model), by id.
_INSTANCES: dict[str, Any] = {}


def register_instance(model: NucleusModel) -> tuple[str, None, str, bool, str]:
    """Make an already built model usable by in-process tasks; returns its model key."""
    key = f"instance:{id(model)}"
    _INSTANCES[key] = model
    return (
        key,
        None,
        getattr(model, "device", "cpu")
        if isinstance(getattr(model, "device", "cpu"), str)
        else "cpu",
        bool(getattr(model, "tta", False)),
        str(getattr(model, "precision", "fp32")),
    )


def _slide_of(ctx: EngineContext) -> Any:
    cache = getattr(_LOCAL, "slides", None)
    if cache is None:
        cache = _LOCAL.slides = {}
    src = ctx.source
    if not (isinstance(src, tuple) and src and src[0] == "path"):
        return src
    if src not in cache:
        from ..slide import open_slide

        cache[src] = open_slide(src[1], backend=src[2], mpp=src[3])
    return cache[src]


def model_of(ctx: EngineContext) -> NucleusModel:
    """The model of ``ctx`` (loaded once per process)."""
    name = ctx.model[0]
    if name in _INSTANCES:
        return _INSTANCES[name]
    with _MODELS_LOCK:
        if ctx.model not in _MODELS:
            from ..models import load_model

            name, weights, device, tta, precision = ctx.model
            keep_large_blocks_in_heap()  # network activations reused, not re-mapped per call
            if ctx.torch_threads:  # one process per worker: share the cores, no oversubscription
                import torch

                torch.set_num_threads(ctx.torch_threads)
            _MODELS[ctx.model] = load_model(
                name, weights=weights, device=device, tta=tta, precision=precision
            )
        return _MODELS[ctx.model]


def clear_model_cache() -> None:
    """Forget the models loaded by :func:`model_of` in this process (the next task loads again)."""
    with _MODELS_LOCK:
        _MODELS.clear()

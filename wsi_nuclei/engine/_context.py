"""What every engine task needs (:class:`EngineContext`, picklable) and the per-process caches
behind it: the slide opened once per worker, the model loaded once per process, the semaphores
that bound the network calls running at once, and models handed over in memory.
"""

from __future__ import annotations

import sys
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
    #: > 0: torch's intra-op threads in every thread that calls the network (1 on a CPU run: the
    #: cores are shared out between concurrent calls instead, see ``infer_slots``)
    torch_threads: int = 0
    #: network calls that may run at once in one process: 1 on an accelerator; on a CPU the
    #: threads per worker, each call single-threaded (no OpenMP barriers across calls, and
    #: post-processing does not stall a call that holds every core)
    infer_slots: int = 1
    #: keep the pixel mask of every nucleus (evaluation), not only the seam candidates
    all_masks: bool = False
    #: > 0: at most this many patches per network call (bounds activation memory); 0: the batch
    infer_chunk: int = 0


_LOCAL = threading.local()

_MODELS: dict[tuple, Any] = {}

_MODELS_LOCK = threading.Lock()

#: Network calls in flight per process, by the number allowed (``EngineContext.infer_slots``): one
#: at a time on an accelerator (concurrent calls only add activation memory there); on a CPU as
#: many as the worker has threads, each single-threaded.
_INFER_SLOTS: dict[int, threading.BoundedSemaphore] = {}
_SLOTS_LOCK = threading.Lock()
#: torch's thread count before a run set it (restored by :func:`restore_torch_threads`)
_SAVED_THREADS: list[int] = []


def infer_slot(n: int) -> threading.BoundedSemaphore:
    """The process-wide semaphore that lets at most ``n`` network calls run at once."""
    with _SLOTS_LOCK:
        if n not in _INFER_SLOTS:
            _INFER_SLOTS[n] = threading.BoundedSemaphore(max(1, n))
        return _INFER_SLOTS[n]


def use_torch_threads(n: int) -> None:
    """Give the calling thread ``n`` torch intra-op threads (the first change in a process keeps
    the previous count for :func:`restore_torch_threads`). A no-op for ``n <= 0`` and before
    torch is imported (models without a network)."""
    if n <= 0 or "torch" not in sys.modules:
        return
    import torch

    if torch.get_num_threads() != n:  # per thread (OpenMP): cheap to ask before every call
        with _SLOTS_LOCK:
            if not _SAVED_THREADS:
                _SAVED_THREADS.append(torch.get_num_threads())
        torch.set_num_threads(n)


def restore_torch_threads() -> None:
    """Set torch's thread count back to what it was before :func:`use_torch_threads` changed it
    (the end of an in-process run: a library user's own torch work gets its threads back)."""
    with _SLOTS_LOCK:
        if not _SAVED_THREADS or "torch" not in sys.modules:
            return
        n = _SAVED_THREADS.pop()
        _SAVED_THREADS.clear()
    import torch

    torch.set_num_threads(n)


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
            _MODELS[ctx.model] = load_model(
                name, weights=weights, device=device, tta=tta, precision=precision
            )
        return _MODELS[ctx.model]


def clear_model_cache() -> None:
    """Forget the models loaded by :func:`model_of` in this process (the next task loads again)."""
    with _MODELS_LOCK:
        _MODELS.clear()

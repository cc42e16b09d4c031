"""The tiling engine: patches on a fixed grid -> blended maps -> post-processing per block.

One code path for slides (:mod:`wsi_nuclei.pipeline`: tasks on threads or Dask workers, part files) and for images
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

Inference memory is bounded too: a process runs at most ``infer_slots`` network calls at once
(a semaphore shared by its worker threads: one on an accelerator; on a CPU one per worker
thread, each single-threaded), on at most ``infer_chunk`` patches of a batch each (the batch
partition, and so the plan, is unchanged). On a CPU many intermediate tensors of a 16-patch
call are about 100 MB, above glibc's largest ``mmap`` threshold (32 MB), so every call mapped and
unmapped gigabytes (page faults, kernel time); chunks of 2 mostly stay in the allocator's heap.

Modules: ``_context`` (:class:`EngineContext`, per-process caches), :mod:`.strips` (planning),
``_patches`` (read and infer tasks), :mod:`.blend` (:class:`MapBlender`), ``_blocks`` (the
block task), ``_executor`` (:func:`run_strip`, executors), ``_seams`` (applying the seam
decisions).
"""

from __future__ import annotations

from ._blocks import INTERNAL_COLUMNS, nucleus_columns, process_block
from ._context import EngineContext, clear_model_cache, model_of, register_instance
from ._executor import DaskExecutor, InlineExecutor, ThreadExecutor, run_strip
from ._patches import fill_values, infer_patches, read_patches
from ._seams import apply_resolution, collect_candidates, remeasure
from .blend import MapBlender
from .strips import Strip, patches_for_window, plan_strips

__all__ = [
    "INTERNAL_COLUMNS",
    "DaskExecutor",
    "EngineContext",
    "InlineExecutor",
    "MapBlender",
    "Strip",
    "ThreadExecutor",
    "apply_resolution",
    "clear_model_cache",
    "collect_candidates",
    "fill_values",
    "infer_patches",
    "model_of",
    "nucleus_columns",
    "patches_for_window",
    "plan_strips",
    "process_block",
    "read_patches",
    "register_instance",
    "remeasure",
    "run_strip",
]

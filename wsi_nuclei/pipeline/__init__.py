"""The run: plan -> execute -> stitch -> write.

::

    plan      open the slide, resolution, tissue / regions, the patch and block grids, the
              active blocks and their strips: a frozen RunPlan, from which the resume key is
              derived (slide fingerprint, model and weights sha256, device, precision, TTA,
              grids, halo, batch partition, regions, ownership mode, version)
    execute   the engine (wsi_nuclei.engine) on a dask.distributed client: patches are
              inferred on a fixed grid and blended, blocks post-processed as their windows
              become final; each finished block is one part file in <out>/.work/blocks/
              (written to a temporary name, then renamed: a part exists exactly when it is
              complete), so a crashed or interrupted run resumes where it stopped
    stitch    seam candidates of all blocks resolved (wsi_nuclei.stitching; deterministic,
              independent of completion order, invariant checked), region membership
    write     streaming writers (GeoJSON, GeoParquet, summaries, run.json), each atomic; then
              report.html (wsi_nuclei.report; a failure there is one warning, not a failed run)

Memory is bounded by configuration (block size, strip width, batches in flight), never by the
slide size: no slide-sized array is built.

Modules, in the order a run goes through them: ``_config`` (:class:`RunConfig`,
:class:`RunResult`), :mod:`.plan` (:class:`RunPlan`), ``_outdir`` (output folder checks and
lock), ``_stages`` (execute, stitch), ``_parts`` (part files), ``_write`` (outputs), ``_run``
(:func:`run`).
"""

from __future__ import annotations

from ._config import (
    MAX_UPSAMPLING,
    OUTPUT_NAMES,
    TISSUE_MARGIN_PX,
    TISSUE_TOLERANCE_THUMB_PX,
    RunConfig,
    RunResult,
    default_out_dir,
    qupath_name,
    resolve_threads,
)
from ._parts import load_part, save_part
from ._run import run
from ._write import effective_min_class_prob, reliability_note, unclassify_below
from .plan import CPU_INFER_CHUNK, RunPlan, make_plan, resolve_infer_chunk

__all__ = [
    "CPU_INFER_CHUNK",
    "MAX_UPSAMPLING",
    "OUTPUT_NAMES",
    "TISSUE_MARGIN_PX",
    "TISSUE_TOLERANCE_THUMB_PX",
    "RunConfig",
    "RunPlan",
    "RunResult",
    "default_out_dir",
    "effective_min_class_prob",
    "load_part",
    "make_plan",
    "qupath_name",
    "reliability_note",
    "resolve_infer_chunk",
    "resolve_threads",
    "run",
    "save_part",
    "unclassify_below",
]

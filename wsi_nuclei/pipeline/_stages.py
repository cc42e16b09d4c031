"""The execute and stitch stages: the engine's strips on a dask.distributed client, one part
per finished block; then seam resolution over all blocks and region membership.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .._progress import Progress
from ..engine import EngineContext
from ..errors import WsiNucleiError
from ._config import RunConfig, _uses_dask
from ._parts import _part_path, load_part, load_part_stats, save_part
from .plan import RunPlan, _Setup


def _client(scheduler: str | None, workers: int = 1, threads: int = 2) -> Any:
    """A dask.distributed client: an existing cluster, or a local one (in-process if 1 worker)."""
    import logging

    from distributed import Client

    # CRITICAL, not ERROR: a task that raises (e.g. a corrupt tile -> UnsupportedSlideError) is
    # re-raised here and reported in one line; the worker's "Compute Failed" log would add a
    # multi-line traceback to stderr
    logging.getLogger("distributed").setLevel(logging.CRITICAL)
    # a run that stops on an error cancels its tasks; on a loaded machine the client's close
    # can then time out inside asyncio, which would print "Future exception was never
    # retrieved" at exit under the one-line error
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)
    if scheduler:
        try:
            return Client(scheduler, timeout=20)
        except (OSError, TimeoutError) as exc:
            raise WsiNucleiError(
                f"cannot connect to the Dask scheduler {scheduler} ({exc})"
            ) from None
    # dashboard_address=None still binds the HTTP server to :8787 and warns when it is taken
    # (another run, a notebook cluster): a random port and no dashboard instead
    if workers > 1:  # worker processes log on their own (inherited stderr): quiet there too
        import dask

        dask.config.set(
            {
                "logging": {
                    "distributed": "critical",
                    "distributed.worker": "critical",
                    "distributed.nanny": "critical",
                    "distributed.worker.state_machine": "critical",
                }
            }
        )
    return Client(
        processes=workers > 1,
        n_workers=max(1, workers),
        threads_per_worker=max(1, threads),
        dashboard_address=":0",
        scheduler_kwargs={"dashboard": False},
    )


def _execute(
    ctx: EngineContext,
    plan: RunPlan,
    parts: Path,
    todo: set[tuple[int, int]],
    cfg: RunConfig,
    progress: Progress | None = None,
) -> dict[str, float]:
    """Run the engine over the strips that hold unfinished blocks (``todo``), one part file per
    finished block; the engine's totals (seconds per task kind, patches, peak band memory, OOM
    splits, retries)."""
    from ..engine import DaskExecutor, ThreadExecutor, patches_for_window, run_strip

    progress = progress if progress is not None else Progress(enabled=False)
    totals = {
        "t_read": 0.0,
        "t_infer": 0.0,
        "t_post": 0.0,
        "n_patches": 0,
        "peak_band_bytes": 0,
        "blocks": 0,
        "oom_batch_splits": 0,
        "post_retries": 0,
    }
    if not todo:
        with progress.stage("patches") as stage:
            stage.done(
                f"nothing to run: all {len(plan.active)} blocks resumed from the work folder"
            )
        return totals
    # patches this session will infer (for the progress bar)
    n_todo = 0
    for st in plan.strips:
        need: set[tuple[int, int]] = set()
        for r, c in st.blocks:
            if (r, c) in todo:
                rows, cols = patches_for_window(plan.patches, plan.blocks.window_box(r, c))
                need.update((pr, pc) for pr in rows for pc in cols)
        n_todo += sum(len(b) for b in st.batches if any(p in need for p in b))
    resumed = len(plan.active) - len(todo)
    # the bar's ETA comes from completed batches after the first one, which carries the model's
    # warm-up (see wsi_nuclei._progress.EtaEstimator), not from tqdm's rate
    client = None
    ex: Any = None

    def on_block(block: tuple[int, int], frame: pd.DataFrame, stats: dict) -> None:
        save_part(frame, stats, _part_path(parts, block))
        totals["blocks"] += 1

    try:
        with progress.stage("patches", total=n_todo, unit="patch", eta=True) as stage:
            use_dask = _uses_dask(cfg)
            if use_dask:
                client = (
                    cfg.client
                    if cfg.client is not None
                    else _client(cfg.scheduler, cfg.workers, cfg.threads)
                )
                ex = DaskExecutor(client)
            else:  # one local worker: threads of this process, no scheduler in between
                ex = ThreadExecutor(cfg.threads)
            for st in plan.strips:
                s = run_strip(
                    ctx,
                    st,
                    ex,
                    todo=todo,
                    on_block=on_block,
                    on_batch=lambda n, _: stage.update(n),
                    max_in_flight=cfg.max_in_flight,
                    # blocks post-processed at once: one per thread in process (at least 2)
                    max_post=max(2, cfg.workers * 2 if use_dask else cfg.threads),
                )
                for k in (
                    "t_read",
                    "t_infer",
                    "t_post",
                    "n_patches",
                    "oom_batch_splits",
                    "post_retries",
                ):
                    totals[k] += s[k]
                totals["peak_band_bytes"] = max(totals["peak_band_bytes"], s["peak_band_bytes"])
            rate = stage.estimator.overall_rate() if stage.estimator is not None else None
            stage.done(
                f"{int(totals['n_patches'])} patches"
                + (f", {rate:.1f} patch/s" if rate else "")
                + (f"; {resumed} of {len(plan.active)} blocks resumed" if resumed else "")
            )
    finally:
        from ..engine._context import restore_torch_threads

        if ex is not None and hasattr(ex, "close"):
            ex.close()  # the thread pool: unstarted tasks dropped, running ones finish
        restore_torch_threads()  # the in-process tasks set one torch thread per network call
        try:
            if (
                cfg.client is None and client is not None
            ):  # a client handed in (a cohort run) serves the next slide too
                client.close(timeout=30)
        except Exception:  # closing after an error: the error is what the user must see
            pass
    return totals


def _stitch(
    ctx: EngineContext,
    plan: RunPlan,
    setup: _Setup,
    parts: Path,
    final_dir: Path,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Resolve seams, assign regions, and write one final part per block (in block order)."""
    progress = progress if progress is not None else Progress(enabled=False)
    n_blocks = len(plan.active)
    # three passes over the block parts (stats, seam candidates, resolution and regions): one
    # bar step per part read
    with progress.stage("stitching", total=3 * n_blocks, unit="part") as stage:
        stats = _stitch_blocks(ctx, plan, setup, parts, final_dir, stage)
        stage.done(
            f"{n_blocks} block{'' if n_blocks == 1 else 's'}, {stats['seam_candidates']} seam candidates: "
            f"{stats['seam_duplicates_removed']} duplicates removed, {stats['seam_trimmed']} trimmed"
        )
    return stats


def _stitch_blocks(
    ctx: EngineContext, plan: RunPlan, setup: _Setup, parts: Path, final_dir: Path, stage: Any
) -> dict[str, Any]:
    """Resolve the seam candidates of all blocks, apply the decisions to each part, clean the
    geometries, assign regions and write the final parts to ``final_dir``; the stitch statistics."""
    from ..engine import apply_resolution, collect_candidates
    from ..export import clean_frame
    from ..regions import region_membership
    from ..stitching import check_resolution, resolve_seams

    def frames() -> Iterator[tuple[tuple[int, int], pd.DataFrame]]:
        for b in plan.active:
            f, _ = load_part(_part_path(parts, b))
            stage.update(1)
            yield b, f

    stats = {
        "n_found": 0,
        "n_exclusive": 0,
        "n_candidates": 0,
        "n_cut_owned": 0,
        "n_core_pieces": 0,
    }
    stage.label("block statistics")
    for b in plan.active:
        s = load_part_stats(_part_path(parts, b))
        stage.update(1)
        for k in stats:
            stats[k] += int(s.get(k, 0))
    stage.label("seam candidates")
    cands = collect_candidates(frames())
    stage.label("resolving seams")
    res = resolve_seams(cands)
    check_resolution(cands, res)
    decisions: dict[tuple[int, int], dict[int, tuple[int, Any]]] = {}
    for i, (r, c, k) in enumerate(cands.key.tolist()):
        decisions.setdefault((r, c), {})[k] = (int(res.status[i]), res.masks.get(i))
    n_outside = n_tolerated = 0
    stage.label("regions")
    for i, (b, f) in enumerate(frames()):
        f, _ = apply_resolution(ctx, b, f, decisions.get(b, {}))
        if len(f):
            f, _ = clean_frame(f)
        member: tuple[list[int], list[int]] = ([], [])
        if len(f):
            m = region_membership(
                f["centroid_x"].to_numpy(),
                f["centroid_y"].to_numpy(),
                setup.regions,
                tolerance=setup.tolerance_px,
            )
            f["region_id"] = m.primary
            inside = m.primary >= 0
            n_outside += int((~inside).sum())
            n_tolerated += m.n_tolerated
            keep_rows = np.nonzero(inside)[0]
            remap = np.full(len(f), -1, np.int64)
            remap[keep_rows] = np.arange(len(keep_rows))
            sel = inside[m.rows]
            member = (remap[m.rows[sel]].tolist(), m.region_ids[sel].tolist())
            f = f.loc[inside].reset_index(drop=True)
        save_part(
            f, {"member_rows": member[0], "member_ids": member[1]}, final_dir / f"b{i:06d}.parquet"
        )
    stats.update(
        {
            "seam_candidates": len(cands),
            "seam_kept": res.n_kept,
            "seam_trimmed": res.n_trimmed,
            "seam_duplicates_removed": res.n_dropped,
            "nuclei_outside_regions_removed": n_outside,
            "nuclei_near_region_edge_assigned": n_tolerated,
            "n_final_parts": len(plan.active),
        }
    )
    return stats

""":func:`run`: plan -> execute -> stitch -> write, with resume, the progress display and the
run's one-line plan.
"""

from __future__ import annotations

import contextlib
import shutil
import sys
import time
from pathlib import Path

from .._io import atomic_path
from .._progress import Progress
from ._config import (
    _WORK,
    OUTPUT_NAMES,
    RunConfig,
    RunResult,
    default_out_dir,
    qupath_name,
    resolve_threads,
)
from ._outdir import _LOCK, _lock, _prepare_out, _remove_stale_temporaries
from ._parts import _finished_parts
from ._stages import _execute, _stitch
from ._write import _write
from .plan import RunPlan, _context, _open, _Setup, make_plan

__all__ = [
    "run",
]


def run(cfg: RunConfig) -> RunResult:
    """Run the whole pipeline on one slide; see the module docstring."""
    from .._allocator import keep_large_blocks_in_heap

    keep_large_blocks_in_heap()  # before the engine's threads take malloc arenas of their own
    from ..models import (
        default_model_name,
        find_weights,
        get_spec,
        require_tta,
        resolve_device,
        resolve_precision,
    )
    from ..regions import load_regions

    t0 = time.perf_counter()
    model_name = cfg.model or default_model_name()
    cfg.model = model_name
    cfg.threads = resolve_threads(cfg.threads, cfg.workers)
    spec = get_spec(model_name)
    if cfg.tta:
        require_tta(spec)  # before the slide is opened or the output folder made
    if cfg.anndata:
        from ..anndata_export import require_anndata

        require_anndata()
    weights_path = find_weights(spec, cfg.weights)
    device = resolve_device(cfg.device)
    resolve_precision(cfg.precision, device, spec)  # a bad --precision fails before any output
    user_regions = load_regions(cfg.regions) if cfg.regions else None

    slide, source = _open(cfg)
    slide_name = (
        Path(str(cfg.slide)).name
        if isinstance(cfg.slide, (str, Path))
        else getattr(slide, "name", "synthetic")
    )
    out = Path(cfg.out) if cfg.out else default_out_dir(slide_name)
    geojson_name = "nuclei.geojson" if cfg.geojson_plain else "nuclei.geojson.gz"
    names = [geojson_name, *OUTPUT_NAMES, qupath_name(cfg)] + (
        ["nuclei.h5ad"] if cfg.anndata else []
    )
    created = not out.exists()
    _prepare_out(out, names, cfg.overwrite)
    lock = _lock(out)
    _remove_stale_temporaries(out)
    progress = Progress(enabled=not cfg.quiet)
    try:
        doing = "detecting tissue on a thumbnail" if cfg.tissue == "auto" else "planning the tiles"
        with progress.stage("tissue", doing) as stage:
            plan, setup = make_plan(
                cfg, spec, slide, source, slide_name, weights_path, device, user_regions
            )
            stage.done(_plan_line(cfg, plan, setup))
        return _execute_and_write(cfg, plan, setup, out, names, t0, progress=progress)
    except BaseException:
        # a folder this run created and that holds no finished block (nothing to resume from)
        # is removed: bad input leaves no trace
        parts = out / _WORK / "blocks"
        finished = list(parts.glob("*.parquet")) if parts.is_dir() else []
        lock.close()
        if (
            created
            and out.is_dir()
            and not finished
            and not any(p for p in out.iterdir() if p.name not in (_WORK, _LOCK))
        ):
            shutil.rmtree(out, ignore_errors=True)
        raise
    finally:
        if not lock.closed:
            lock.close()
        if lock.owned:
            with contextlib.suppress(OSError):
                (out / _LOCK).unlink()


def _plan_line(cfg: RunConfig, plan: RunPlan, setup: _Setup) -> str:
    """The tissue stage's progress line: regions, area and the work planned."""
    source = (
        "--regions"
        if setup.user_regions
        else ("tissue detection" if cfg.tissue == "auto" else "whole slide")
    )
    n = len(setup.regions)
    area = setup.area_model_px * plan.model_mpp**2 / 1e6
    return (
        f"{n} region{'' if n == 1 else 's'} ({source}), {area:.3f} mm2; "
        f"{plan.n_patches} patches, {len(plan.active)} blocks planned"
    )


def _execute_and_write(
    cfg: RunConfig,
    plan: RunPlan,
    setup: _Setup,
    out: Path,
    names: list[str],
    t0: float,
    progress: Progress | None = None,
) -> RunResult:
    """Execute (resuming from finished parts when the run key matches), stitch and write a planned
    run; the work folder is removed after the outputs are written (unless ``keep_work``)."""
    progress = progress if progress is not None else Progress(enabled=False)
    seconds: dict[str, float] = {"plan": setup.seconds}
    work = out / _WORK
    parts = work / "blocks"
    key_file = work / "run_key"
    key = plan.key()
    stale = None
    if work.exists() and (not key_file.is_file() or key_file.read_text() != key):
        stale = "its run key differs (another model, device, tiling, regions or slide)"
        shutil.rmtree(work)
    parts.mkdir(parents=True, exist_ok=True)
    with atomic_path(key_file) as tmp:
        tmp.write_text(key)
    if stale and not cfg.quiet:
        print(
            f"wsi-nuclei: discarded the unfinished work folder in {out}: {stale}", file=sys.stderr
        )
    done = _finished_parts(parts, plan)
    todo = set(plan.active) - done
    ctx = _context(plan, setup, cfg)

    # execute
    t = time.perf_counter()
    engine_stats = _execute(ctx, plan, parts, todo, cfg, progress=progress)
    seconds["execute"] = time.perf_counter() - t

    # stitch
    t = time.perf_counter()
    final_dir = work / "final"
    if final_dir.exists():
        shutil.rmtree(final_dir)
    final_dir.mkdir()
    st = _stitch(ctx, plan, setup, parts, final_dir, progress=progress)
    seconds["stitch"] = time.perf_counter() - t

    # write
    written = _write(
        cfg,
        plan,
        setup,
        final_dir,
        out,
        names,
        st,
        engine_stats,
        seconds,
        t0,
        done,
        progress=progress,
    )
    if not cfg.keep_work:
        shutil.rmtree(work, ignore_errors=True)
    return written

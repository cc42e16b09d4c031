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
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from . import __version__
from ._io import atomic_path
from ._progress import Progress
from .engine import EngineContext, Strip, plan_strips
from .errors import MissingMppError, NoTissueError, OutputError, WsiNucleiError
from .schema import CLASS_NAMES, UNCLASSIFIED
from .tiling import BlockGrid, PatchGrid, passes_per_pixel

__all__ = ["RunConfig", "RunPlan", "RunResult", "run", "make_plan", "OUTPUT_NAMES"]

#: Largest level-0 -> model upsampling accepted (0.25 -> 1.0 µm/px, i.e. 10x scans).
MAX_UPSAMPLING = 4.0
#: Final output files (GeoJSON name depends on --geojson-plain).
OUTPUT_NAMES = ("nuclei.parquet", "tissue.geojson", "summary.csv", "summary.json", "run.json")
_WORK = ".work"
#: Patches run where their output lies within this margin (model px) of tissue: a function
#: of the slide only, so that the blended maps do not depend on the blocks.
TISSUE_MARGIN_PX = 64
#: Nuclei this close (in thumbnail pixels) to a detected tissue outline belong to it: the
#: outline comes from a coarse thumbnail (about 8 µm/px).
TISSUE_TOLERANCE_THUMB_PX = 4.0
_STATS_KEY = b"wsi_nuclei_block_stats"


@dataclass
class RunConfig:
    """Options of one run (mirrors ``wsi-nuclei run``)."""

    slide: Any  # path, or an object with the Slide interface (e.g. SyntheticSlide)
    out: str | Path | None = None
    model: str | None = None  # None: the default model
    weights: str | Path | None = None
    device: str = "auto"
    tta: bool = False  # flip test-time augmentation (4x network time)
    backend: str = "auto"
    mpp: float | None = None
    regions: str | Path | None = None
    tissue: str = "auto"  # "auto" (detect) or "none" (process everything)
    halo: int | None = None  # block halo, model px; None: the model's (96)
    block_size: int = 1024  # post-processing block core, model px
    strip_blocks: int = 8  # blocks per strip (bounds the band of maps held in memory)
    batch_size: int = 16
    max_in_flight: int = 4
    #: patches per network call (a batch is run in chunks of this size, one call at a time per
    #: process; bounds the network's activation memory). None: 2 on the CPU, the whole batch on CUDA
    infer_chunk: int | None = None
    scheduler: str | None = None
    workers: int = 1  # local worker processes (1: in-process threads)
    threads: int = 2  # threads per local worker
    overwrite: bool = False
    geojson_plain: bool = False
    qupath_hierarchy: bool = True  # write qupath.geojson(.gz): regions holding their nuclei
    strict_ownership: bool = False
    quiet: bool = False
    keep_work: bool = False
    min_class_prob: float | None = None  # None: the model's calibrated threshold (ModelSpec.min_class_prob)
    report: bool = True  # write report.html (visual QC) after the other outputs
    anndata: bool = False  # also write nuclei.h5ad (needs the optional 'anndata' package)
    client: Any = None  # a dask.distributed client to use (and leave open); None: one per run


@dataclass
class RunResult:
    out_dir: Path
    files: dict[str, Path]
    n_nuclei: int
    counts: dict[str, int]
    patches_total: int
    patches_run: int
    seconds: dict[str, float]
    manifest: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RunPlan:
    """Everything decided before any pixel is processed (frozen; the resume key is its hash)."""

    slide_name: str
    fingerprint: str
    model: str
    model_sha: str | None
    weights: str | None
    device: str
    precision: str
    tta: bool
    patches: PatchGrid
    blocks: BlockGrid
    scale: float
    slide_mpp: float
    read_mpp: float
    model_mpp: float
    active: tuple[tuple[int, int], ...]
    strips: tuple[Strip, ...]
    batch_size: int
    strip_blocks: int
    tissue: str
    regions_hash: str
    strict: bool
    source_stat: str = ""  # sizes and modification times of the slide's pixel files (resume only)
    #: the model's post-processing parameters (JSON; parts depend on them), with " backend=torch"
    #: appended when the torch implementation runs (on CUDA, or forced by WSI_NUCLEI_POSTPROCESS)
    postprocess: str = ""
    infer_chunk: int = 0  # patches per network call (0: the whole batch)

    def key(self) -> str:
        """The resume key: a run resumes only parts made under the very same plan."""
        ident = {k: v for k, v in asdict(self).items() if k not in ("slide_name", "strips", "active")}
        ident["active"] = hashlib.sha256(json.dumps(self.active).encode()).hexdigest()
        ident["version"] = __version__
        return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()

    @property
    def n_patches(self) -> int:
        return sum(s.n_patches for s in self.strips)


def default_out_dir(slide_path: str | Path) -> Path:
    """``./wsi-nuclei-out/<slide stem>/``."""
    name = Path(str(slide_path)).name
    for ext in (".ome.tiff", ".ome.tif"):
        if name.lower().endswith(ext):
            return Path("wsi-nuclei-out") / name[: -len(ext)]
    return Path("wsi-nuclei-out") / Path(name).stem


def qupath_name(cfg: RunConfig) -> str:
    """File name of the QuPath hierarchy file (``--geojson-plain`` decides the ``.gz``)."""
    return "qupath.geojson" if cfg.geojson_plain else "qupath.geojson.gz"


def _prepare_out(out: Path, names: list[str], overwrite: bool) -> None:
    existing = [n for n in names if (out / n).exists()]
    # outputs of a run that was interrupted while writing them (its work folder is there and
    # run.json, written last, is not) are not results: rerunning the same command replaces them
    interrupted = (out / _WORK).is_dir() and not (out / "run.json").exists()
    if existing and not overwrite and not interrupted:
        raise OutputError(f"{out}: results already exist ({', '.join(existing)}); use --overwrite to replace them")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise OutputError(f"{out}: output folder not writable ({exc.strerror or exc})") from None


_LOCK = ".wsi-nuclei.lock"


class _Lock:
    """An exclusive lock on ``<out>/.wsi-nuclei.lock`` held for the whole run (flock: released
    by the kernel if the process dies, so a crash never leaves the folder locked)."""

    def __init__(self, fh: Any) -> None:
        self.fh, self.owned, self.closed = fh, True, False

    def close(self) -> None:
        if not self.closed:
            self.fh.close()
            self.closed = True


def _lock(out: Path) -> _Lock:
    import fcntl

    path = out / _LOCK
    fh = open(path, "a+")
    try:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        fh.seek(0)
        who = fh.read().strip() or "another process"
        fh.close()
        raise OutputError(f"{out}: another wsi-nuclei run ({who}) is writing into this folder; wait for it or use another --out") from None
    fh.seek(0)
    fh.truncate()
    fh.write(f"pid {os.getpid()}")
    fh.flush()
    return _Lock(fh)


def _remove_stale_temporaries(out: Path) -> None:
    """Temporary files of a run that was killed mid-write (we hold the folder's lock: no other
    run is writing them)."""
    for folder in (out, out / _WORK, out / _WORK / "blocks", out / _WORK / "final"):
        if folder.is_dir():
            for p in folder.glob(".*.tmp-*"):
                with contextlib.suppress(OSError):
                    p.unlink()


def _open(cfg: RunConfig) -> tuple[Any, Any]:
    if isinstance(cfg.slide, (str, Path)):
        from .slide import open_slide

        slide = open_slide(cfg.slide, backend=cfg.backend, mpp=cfg.mpp)
        return slide, ("path", str(Path(cfg.slide).resolve()), slide.backend, cfg.mpp)
    return cfg.slide, cfg.slide


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
            raise WsiNucleiError(f"cannot connect to the Dask scheduler {scheduler} ({exc})") from None
    # dashboard_address=None still binds the HTTP server to :8787 and warns when it is taken
    # (another run, a notebook cluster): a random port and no dashboard instead
    if workers > 1:  # worker processes log on their own (inherited stderr): quiet there too
        import dask

        dask.config.set({"logging": {"distributed": "critical", "distributed.worker": "critical",
                                     "distributed.nanny": "critical", "distributed.worker.state_machine": "critical"}})
    return Client(processes=workers > 1, n_workers=max(1, workers), threads_per_worker=max(1, threads),
                  dashboard_address=":0", scheduler_kwargs={"dashboard": False})


# --------------------------------------------------------------------------------------------
# plan
# --------------------------------------------------------------------------------------------
@dataclass
class _Setup:
    """What the plan stage found besides the frozen plan (not part of the resume key)."""

    slide: Any
    source: Any
    spec: Any
    weights_path: Path | None
    regions: list
    user_regions: bool
    tmap: Any
    sinfo: dict
    tolerance_px: float
    overlaps: list
    seconds: float
    area_model_px: float  # tissue (or region, or canvas) area in model px²


def make_plan(cfg: RunConfig, spec: Any, slide: Any, source: Any, slide_name: str, weights_path: Path | None,
              device: str, user_regions: list | None) -> tuple[RunPlan, _Setup]:
    """The plan stage (see the module docstring)."""
    import shapely

    from .models import sha256_file
    from .postprocess_torch import postprocess_backend
    from .slide import scale_info
    from .regions import Region, overlapping_regions, rasterize_regions
    from .tissue import TissueMap, detect_tissue_on_slide

    t = time.perf_counter()
    sinfo = scale_info(slide, spec.mpp) if hasattr(slide, "best_level_for_mpp") else {}
    slide_mpp = float(slide.mpp)
    scale = slide_mpp / spec.mpp
    if scale > MAX_UPSAMPLING:
        raise MissingMppError(
            f"{slide_name}: {slide_mpp:.3g} um/px ({getattr(slide, 'mpp_source', '?')}) is too coarse for nucleus "
            f"segmentation at {spec.mpp} um/px (at most {spec.mpp * MAX_UPSAMPLING:.3g} um/px, i.e. 10x); pass --mpp if the file's value is wrong"
        )
    w0, h0 = slide.dimensions
    width, height = math.ceil(w0 * scale), math.ceil(h0 * scale)
    halo = spec.halo if cfg.halo is None else int(cfg.halo)
    pg = PatchGrid(width, height, spec.input_size, spec.output_size, spec.stride)
    bg = BlockGrid(width, height, int(cfg.block_size), halo)

    # tissue and regions
    tmap = None
    regions: list[Any] = []
    tolerance = 0.0
    if cfg.tissue == "auto":
        tmap = detect_tissue_on_slide(slide, mpp=slide_mpp, allow_empty=user_regions is not None)
        regions = list(tmap.regions)
        tolerance = TISSUE_TOLERANCE_THUMB_PX * max(tmap.downsample_xy)
    if user_regions is not None:
        if tmap is not None:
            restricted = tmap.mask & rasterize_regions(user_regions, tmap.mask.shape, tmap.downsample_xy)
            tmap = TissueMap(restricted, tmap.downsample, tuple(user_regions), tmap.downsample_xy)
            if not restricted.any():
                raise NoTissueError("no tissue inside the regions given with --regions")
        regions = list(user_regions)
        tolerance = 0.0  # user outlines are exact: a nucleus outside them is not in them
    if not regions:  # --tissue none: one region, the whole slide
        regions = [Region(1, "Slide", shapely.box(0, 0, w0, h0), "slide", None, None)]

    margin = TISSUE_MARGIN_PX
    s = scale

    def boxes(x0: np.ndarray, y0: np.ndarray, x1: np.ndarray, y1: np.ndarray) -> tuple[np.ndarray, ...]:
        return (x0 - margin) / s, (y0 - margin) / s, (x1 + margin) / s, (y1 + margin) / s

    patch_ok = None
    block_ok = None
    if tmap is not None:
        def patch_ok(rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
            x0 = pg.output_start(cols)
            y0 = pg.output_start(rows)
            return np.asarray(tmap.fraction_in_box(*boxes(x0, y0, x0 + pg.output_size, y0 + pg.output_size))) > 1e-9

        def block_ok(rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
            x0, y0 = cols * bg.core, rows * bg.core
            return np.asarray(tmap.fraction_in_box(*boxes(x0, y0, x0 + bg.core, y0 + bg.core))) > 1e-9  # (summed-area noise)
    elif user_regions is not None:  # --tissue none --regions: exact polygon tests
        tree = shapely.STRtree([r.geometry for r in user_regions])

        def _meets(x0: np.ndarray, y0: np.ndarray, x1: np.ndarray, y1: np.ndarray) -> np.ndarray:
            bx = shapely.box(*boxes(x0, y0, x1, y1))
            hit = np.zeros(len(bx), bool)
            hit[np.unique(tree.query(bx, predicate="intersects")[0])] = True
            return hit

        def patch_ok(rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
            x0, y0 = pg.output_start(cols), pg.output_start(rows)
            return _meets(x0, y0, x0 + pg.output_size, y0 + pg.output_size)

        def block_ok(rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
            x0, y0 = cols * bg.core, rows * bg.core
            return _meets(x0, y0, x0 + bg.core, y0 + bg.core)

    all_blocks = np.array(bg.blocks(), np.int64).reshape(-1, 2)
    if block_ok is not None:
        all_blocks = all_blocks[block_ok(all_blocks[:, 0], all_blocks[:, 1])]
    active = tuple((int(r), int(c)) for r, c in all_blocks)
    strips = tuple(plan_strips(pg, bg, active, patch_ok=patch_ok, strip_blocks=cfg.strip_blocks, batch_size=cfg.batch_size))
    if not active or not any(st.batches for st in strips):
        raise NoTissueError("no tissue to process")

    model_sha = spec.sha256 if (spec.sha256 and cfg.weights is None) else (sha256_file(weights_path) if weights_path else None)
    regions_hash = hashlib.sha256(b"".join(r.geometry.wkb for r in regions)).hexdigest()[:16]
    plan = RunPlan(
        slide_name=slide_name, fingerprint=slide.fingerprint, model=spec.name, model_sha=model_sha,
        weights=str(weights_path) if weights_path else None, device=device,
        precision="fp16-autocast" if device == "cuda" and spec.fp16 else "fp32", tta=bool(cfg.tta), patches=pg, blocks=bg,
        scale=scale, slide_mpp=slide_mpp, read_mpp=spec.mpp, model_mpp=spec.mpp, active=active, strips=strips,
        batch_size=int(cfg.batch_size), strip_blocks=int(cfg.strip_blocks), tissue=cfg.tissue,
        regions_hash=regions_hash, strict=bool(cfg.strict_ownership), source_stat=_source_stat(source),
        postprocess=(json.dumps(asdict(spec.hv_params()), sort_keys=True, default=str) if spec.postprocess or spec.class_support else "")
        + ("" if postprocess_backend(device) == "numpy" else " backend=torch"),
        infer_chunk=resolve_infer_chunk(cfg.infer_chunk, device, cfg.batch_size),
    )
    if tmap is not None:
        area0 = float(tmap.mask.sum()) * tmap.downsample_xy[0] * tmap.downsample_xy[1]
    elif user_regions is not None:
        area0 = float(shapely.union_all([r.geometry for r in user_regions]).area)
    else:
        area0 = float(w0 * h0)
    setup = _Setup(slide, source, spec, weights_path, regions, user_regions is not None, tmap, sinfo, tolerance,
                   overlapping_regions(regions) if user_regions is not None else [], time.perf_counter() - t,
                   area0 * scale * scale)
    return plan, setup


def _source_stat(source: Any) -> str:
    """Hash of (name, size, mtime) of every pixel file of a slide given by path: a slide
    rewritten in place never resumes from parts made before."""
    if not (isinstance(source, tuple) and source and source[0] == "path"):
        return ""
    from .slide import pixel_files

    h = hashlib.sha256()
    for f in pixel_files(Path(source[1])):
        st = f.stat()
        h.update(f"{f}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()[:32]


#: Default patches per network call on the CPU: a 16-patch call of the default model peaks
#: near 0.9 GB of intermediate tensors, many above glibc's largest ``mmap`` threshold (so
#: mapped and unmapped on every call). On the CMU run chunks of 4 cut the page faults 4x, chunks
#: of 2 7-13x, at the same network speed (docs/benchmarks.md).
CPU_INFER_CHUNK = 2


def resolve_infer_chunk(infer_chunk: int | None, device: str, batch_size: int) -> int:
    """Patches per network call: ``infer_chunk``, or the default (:data:`CPU_INFER_CHUNK` on the
    CPU, the whole batch on an accelerator).

    Parameters
    ----------
    infer_chunk : int or None
        The ``--infer-chunk`` option (None: the default).
    device : str
        The resolved inference device.
    batch_size : int
        Patches per batch.

    Returns
    -------
    int
        The chunk size, 0 when it is the whole batch.
    """
    if infer_chunk is not None and infer_chunk < 1:
        raise ValueError("infer_chunk must be >= 1")
    chunk = infer_chunk if infer_chunk is not None else (CPU_INFER_CHUNK if device == "cpu" else 0)
    return 0 if chunk == 0 or chunk >= batch_size else int(chunk)


def _context(plan: RunPlan, setup: _Setup, cfg: RunConfig) -> EngineContext:
    return EngineContext(
        setup.source, (plan.model, plan.weights, plan.device, plan.tta), plan.patches, plan.blocks, plan.scale,
        plan.read_mpp, plan.slide_mpp, plan.model_mpp, plan.fingerprint, plan.strict,
        torch_threads=cfg.threads if (cfg.workers > 1 and not cfg.scheduler) else 0,
        infer_chunk=plan.infer_chunk,
    )


# --------------------------------------------------------------------------------------------
# part files: one per finished block; complete exactly when it exists under its final name
# --------------------------------------------------------------------------------------------
def _part_path(parts: Path, block: tuple[int, int]) -> Path:
    return parts / f"r{block[0]:05d}_c{block[1]:05d}.parquet"


def save_part(frame: pd.DataFrame, stats: dict[str, Any], path: Path) -> None:
    """Write a block's table with its stats in the file's key-value metadata, atomically."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import shapely

    f = frame.copy()
    f["geometry"] = shapely.to_wkb(f["geometry"].to_numpy()) if len(f) else pd.Series(dtype=object)
    table = pa.Table.from_pandas(f, preserve_index=False)
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), _STATS_KEY: json.dumps(stats).encode()})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def load_part(path: Path) -> tuple[pd.DataFrame, dict[str, Any]]:
    """A block's table and stats (see :func:`save_part`)."""
    import pyarrow.parquet as pq
    import shapely

    table = pq.read_table(path)
    stats = json.loads((table.schema.metadata or {}).get(_STATS_KEY, b"{}"))
    f = table.to_pandas()
    f["geometry"] = shapely.from_wkb(f["geometry"].to_numpy()) if len(f) else pd.Series(dtype=object)
    return f, stats


def _finished_parts(parts: Path, plan: RunPlan) -> set[tuple[int, int]]:
    """Blocks whose part file is complete and readable (anything else is redone)."""
    import pyarrow.parquet as pq

    done = set()
    for b in plan.active:
        p = _part_path(parts, b)
        if not p.is_file():
            continue
        try:
            if _STATS_KEY in (pq.read_schema(p).metadata or {}):
                done.add(b)
                continue
        except Exception:  # a damaged part: redo the block
            pass
        p.unlink(missing_ok=True)
    return done


# --------------------------------------------------------------------------------------------
# run
# --------------------------------------------------------------------------------------------
def run(cfg: RunConfig) -> RunResult:
    """Run the whole pipeline on one slide; see the module docstring."""
    from .models import default_model_name, find_weights, get_spec, require_tta, resolve_device
    from .regions import load_regions

    t0 = time.perf_counter()
    model_name = cfg.model or default_model_name()
    cfg.model = model_name
    spec = get_spec(model_name)
    if cfg.tta:
        require_tta(spec)  # before the slide is opened or the output folder made
    if cfg.anndata:
        from .anndata_export import require_anndata

        require_anndata()
    weights_path = find_weights(spec, cfg.weights)
    device = resolve_device(cfg.device)
    user_regions = load_regions(cfg.regions) if cfg.regions else None

    slide, source = _open(cfg)
    slide_name = Path(str(cfg.slide)).name if isinstance(cfg.slide, (str, Path)) else getattr(slide, "name", "synthetic")
    out = Path(cfg.out) if cfg.out else default_out_dir(slide_name)
    geojson_name = "nuclei.geojson" if cfg.geojson_plain else "nuclei.geojson.gz"
    names = [geojson_name, *OUTPUT_NAMES, qupath_name(cfg)] + (["nuclei.h5ad"] if cfg.anndata else [])
    created = not out.exists()
    _prepare_out(out, names, cfg.overwrite)
    lock = _lock(out)
    _remove_stale_temporaries(out)
    progress = Progress(enabled=not cfg.quiet)
    try:
        doing = "detecting tissue on a thumbnail" if cfg.tissue == "auto" else "planning the tiles"
        with progress.stage("tissue", doing) as stage:
            plan, setup = make_plan(cfg, spec, slide, source, slide_name, weights_path, device, user_regions)
            stage.done(_plan_line(cfg, plan, setup))
        return _execute_and_write(cfg, plan, setup, out, names, t0, progress=progress)
    except BaseException:
        # a folder this run created and that holds no finished block (nothing to resume from)
        # is removed: bad input leaves no trace
        parts = out / _WORK / "blocks"
        finished = list(parts.glob("*.parquet")) if parts.is_dir() else []
        lock.close()
        if created and out.is_dir() and not finished and not any(p for p in out.iterdir() if p.name not in (_WORK, _LOCK)):
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
    source = "--regions" if setup.user_regions else ("tissue detection" if cfg.tissue == "auto" else "whole slide")
    n = len(setup.regions)
    area = setup.area_model_px * plan.model_mpp ** 2 / 1e6
    return (f"{n} region{'' if n == 1 else 's'} ({source}), {area:.3f} mm2; "
            f"{plan.n_patches} patches, {len(plan.active)} blocks planned")


def _execute_and_write(cfg: RunConfig, plan: RunPlan, setup: _Setup, out: Path, names: list[str], t0: float,
                       progress: Progress | None = None) -> RunResult:
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
        print(f"wsi-nuclei: discarded the unfinished work folder in {out}: {stale}", file=sys.stderr)
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
    written = _write(cfg, plan, setup, final_dir, out, names, st, engine_stats, seconds, t0, done, progress=progress)
    if not cfg.keep_work:
        shutil.rmtree(work, ignore_errors=True)
    return written


def _execute(ctx: EngineContext, plan: RunPlan, parts: Path, todo: set[tuple[int, int]], cfg: RunConfig,
             progress: Progress | None = None) -> dict[str, float]:
    from .engine import DaskExecutor, patches_for_window, run_strip

    progress = progress if progress is not None else Progress(enabled=False)
    totals = {"t_read": 0.0, "t_infer": 0.0, "t_post": 0.0, "n_patches": 0, "peak_band_bytes": 0, "blocks": 0,
              "oom_batch_splits": 0, "post_retries": 0}
    if not todo:
        with progress.stage("patches") as stage:
            stage.done(f"nothing to run: all {len(plan.active)} blocks resumed from the work folder")
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

    def on_block(block: tuple[int, int], frame: pd.DataFrame, stats: dict) -> None:
        save_part(frame, stats, _part_path(parts, block))
        totals["blocks"] += 1

    try:
        with progress.stage("patches", total=n_todo, unit="patch", eta=True) as stage:
            client = cfg.client if cfg.client is not None else _client(cfg.scheduler, cfg.workers, cfg.threads)
            ex = DaskExecutor(client)
            for st in plan.strips:
                s = run_strip(ctx, st, ex, todo=todo, on_block=on_block, on_batch=lambda n, _: stage.update(n),
                              max_in_flight=cfg.max_in_flight, max_post=max(2, cfg.workers * 2))
                for k in ("t_read", "t_infer", "t_post", "n_patches", "oom_batch_splits", "post_retries"):
                    totals[k] += s[k]
                totals["peak_band_bytes"] = max(totals["peak_band_bytes"], s["peak_band_bytes"])
            rate = stage.estimator.overall_rate() if stage.estimator is not None else None
            stage.done(f"{int(totals['n_patches'])} patches" + (f", {rate:.1f} patch/s" if rate else "")
                       + (f"; {resumed} of {len(plan.active)} blocks resumed" if resumed else ""))
    finally:
        try:
            if cfg.client is None and client is not None:  # a client handed in (a cohort run) serves the next slide too
                client.close(timeout=30)
        except Exception:  # closing after an error: the error is what the user must see
            pass
    return totals


def _stitch(ctx: EngineContext, plan: RunPlan, setup: _Setup, parts: Path, final_dir: Path,
            progress: Progress | None = None) -> dict[str, Any]:
    """Resolve seams, assign regions, and write one final part per block (in block order)."""
    progress = progress if progress is not None else Progress(enabled=False)
    n_blocks = len(plan.active)
    # three passes over the block parts (stats, seam candidates, resolution and regions): one
    # bar step per part read
    with progress.stage("stitching", total=3 * n_blocks, unit="part") as stage:
        stats = _stitch_blocks(ctx, plan, setup, parts, final_dir, stage)
        stage.done(f"{n_blocks} block{'' if n_blocks == 1 else 's'}, {stats['seam_candidates']} seam candidates: "
                   f"{stats['seam_duplicates_removed']} duplicates removed, {stats['seam_trimmed']} trimmed")
    return stats


def _stitch_blocks(ctx: EngineContext, plan: RunPlan, setup: _Setup, parts: Path, final_dir: Path, stage: Any) -> dict[str, Any]:
    from .engine import apply_resolution, collect_candidates
    from .export import clean_frame
    from .stitching import check_resolution, resolve_seams
    from .regions import region_membership

    def frames() -> Iterator[tuple[tuple[int, int], pd.DataFrame]]:
        for b in plan.active:
            f, _ = load_part(_part_path(parts, b))
            stage.update(1)
            yield b, f

    stats = {"n_found": 0, "n_exclusive": 0, "n_candidates": 0, "n_cut_owned": 0}
    stage.label("block statistics")
    for b in plan.active:
        _, s = load_part(_part_path(parts, b))
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
            m = region_membership(f["centroid_x"].to_numpy(), f["centroid_y"].to_numpy(), setup.regions,
                                  tolerance=setup.tolerance_px)
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
        save_part(f, {"member_rows": member[0], "member_ids": member[1]}, final_dir / f"b{i:06d}.parquet")
    stats.update({"seam_candidates": len(cands), "seam_kept": res.n_kept, "seam_trimmed": res.n_trimmed,
                  "seam_duplicates_removed": res.n_dropped, "nuclei_outside_regions_removed": n_outside,
                  "nuclei_near_region_edge_assigned": n_tolerated, "n_final_parts": len(plan.active)})
    return stats


def effective_min_class_prob(cfg: RunConfig, spec: Any) -> float:
    """The class-probability threshold of a run: ``--min-class-prob`` or the model's calibrated one."""
    if not spec.class_names:
        return 0.0
    return float(spec.min_class_prob if cfg.min_class_prob is None else cfg.min_class_prob)


def unclassify_below(frame: pd.DataFrame, min_prob: float) -> pd.DataFrame:
    """Nuclei whose class probability is below ``min_prob`` lose their class (class 0,
    ``"Nucleus"``); their per-class probabilities stay, so a user can re-threshold."""
    if min_prob <= 0 or not len(frame) or "class_prob" not in frame:
        return frame
    low = (frame["class_prob"].to_numpy() < min_prob) & (frame["class_id"].to_numpy() > 0)
    if not low.any():
        return frame
    frame = frame.copy()
    frame.loc[low, "class_id"] = np.int8(0)
    frame.loc[low, "class_name"] = UNCLASSIFIED
    return frame


def reliability_note(spec: Any, min_prob: float) -> str:
    """The plain-words note on the model's classes for this run (empty when unknown)."""
    from dataclasses import replace

    return replace(spec, min_class_prob=min_prob).reliability_note() if spec.class_names else ""


def _write_report(out: Path, slide: Any, warn: Any = None) -> Path | None:
    """report.html, written after run.json: a failure costs the page, never the run (one warning
    line, through ``warn`` (default: stderr); ``wsi-nuclei report`` renders it again)."""
    from .report import write_report

    if warn is None:
        def warn(line: str) -> None:
            print(line, file=sys.stderr)

    try:
        return write_report(out, slide=slide)
    except Exception as exc:  # noqa: BLE001 - the results are complete; the page is an extra
        text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        warn(f"wsi-nuclei: warning: report.html not written ({type(exc).__name__}: {text}); "
             f"the results are complete; retry with 'wsi-nuclei report {out}'")
        return None


def _write(cfg: RunConfig, plan: RunPlan, setup: _Setup, final_dir: Path, out: Path, names: list[str], st: dict,
           engine_stats: dict, seconds: dict[str, float], t0: float, done: set, progress: Progress | None = None) -> RunResult:
    """The write stage: every output file, one progress step each (summary.csv and .json are one)."""
    progress = progress if progress is not None else Progress(enabled=False)
    n_steps = 5 + int(cfg.anndata) + int(cfg.qupath_hierarchy) + int(cfg.report)
    with progress.stage("writing", total=n_steps, unit="file") as stage:
        result = _write_outputs(cfg, plan, setup, final_dir, out, names, st, engine_stats, seconds, t0, done, stage)
        stage.done(f"{len(result.files)} files in {out}/")
    return result


def _write_outputs(cfg: RunConfig, plan: RunPlan, setup: _Setup, final_dir: Path, out: Path, names: list[str], st: dict,
                   engine_stats: dict, seconds: dict[str, float], t0: float, done: set, stage: Any) -> RunResult:
    from dataclasses import replace

    from .export import (region_annotation_ids, write_nuclei_geojson, write_nuclei_parquet, write_qupath_geojson,
                         write_regions_geojson)
    from .summary import RegionSummarizer, write_summary

    geojson_name = names[0]
    # every region carries the id its annotation gets in tissue.geojson and qupath.geojson (a
    # user annotation's own UUID; derived, collision-free ones for the others), so that
    # summary.csv's annotation_id names the very QuPath object
    ids = region_annotation_ids(setup.regions, plan.fingerprint)
    regions = [replace(r, annotation_id=uid) for r, uid in zip(setup.regions, ids)]
    n_parts = st["n_final_parts"]
    min_prob = effective_min_class_prob(cfg, setup.spec)

    def final_parts() -> Iterator[tuple[pd.DataFrame, dict[str, Any]]]:
        """The final parts in block order, non-empty ones, with the class threshold applied."""
        for i in range(n_parts):
            f, meta_i = load_part(final_dir / f"b{i:06d}.parquet")
            if len(f):
                yield unclassify_below(f, min_prob), meta_i

    def frames() -> Iterator[pd.DataFrame]:
        return (f for f, _ in final_parts())

    slide = setup.slide
    t = time.perf_counter()
    meta = {"slide": plan.slide_name, "fingerprint": plan.fingerprint, "model": plan.model,
            "frame": "level-0 px, OpenSlide bounds subtracted (QuPath frame)"}
    stage.begin_step(geojson_name)
    gstats = write_nuclei_geojson(frames(), out / geojson_name, gzip=not cfg.geojson_plain, metadata=meta)
    seconds["write_geojson"] = time.perf_counter() - t
    stage.begin_step("nuclei.parquet")
    t = time.perf_counter()
    write_nuclei_parquet(frames(), out / "nuclei.parquet", metadata=meta)
    seconds["write_parquet"] = time.perf_counter() - t
    if cfg.anndata:
        from .anndata_export import write_anndata

        stage.begin_step("nuclei.h5ad")
        t = time.perf_counter()
        # the categories are the classes the model can output (not those it has no labels for);
        # "Nucleus" (unclassified, e.g. below --min-class-prob) is added when present
        spec = setup.spec
        classes = [n for c, n in spec.class_names.items() if c not in spec.unsupported_class_ids] if spec.class_names else [UNCLASSIFIED]
        write_anndata(out / "nuclei.parquet", out / "nuclei.h5ad", regions=regions, classes=classes,
                      uns={"slide_name": plan.slide_name, "fingerprint": plan.fingerprint, "mpp": plan.slide_mpp,
                           "model": plan.model, "model_sha256": plan.model_sha, "min_class_prob": min_prob,
                           "reliability_note": reliability_note(spec, min_prob), "wsi_nuclei_version": __version__})
        seconds["write_anndata"] = time.perf_counter() - t
    stage.begin_step("summary.csv, summary.json")
    t = time.perf_counter()
    class_names = dict(CLASS_NAMES) if setup.spec.class_names else {0: "Nucleus"}
    not_measured = [CLASS_NAMES[c] for c in setup.spec.unsupported_class_ids if c in CLASS_NAMES]
    summ = RegionSummarizer(regions, class_names=class_names, mpp=plan.slide_mpp, slide_name=plan.slide_name,
                            not_measured=not_measured)
    counts: dict[str, int] = {}
    n_total = 0
    for f, meta_i in final_parts():
        summ.add(f, (np.asarray(meta_i["member_rows"], np.int64), np.asarray(meta_i["member_ids"], np.int64)))
        n_total += len(f)
        for k, v in f["class_name"].value_counts().items():
            counts[k] = counts.get(k, 0) + int(v)
    seconds["summaries"] = time.perf_counter() - t
    seconds["total"] = time.perf_counter() - t0
    pg, bg = plan.patches, plan.blocks
    passes = passes_per_pixel(plan.n_patches, pg.input_size, setup.area_model_px)
    qc = {
        "patches_total": len(pg), "patches_planned": plan.n_patches, "patches_run": int(engine_stats["n_patches"]),
        "passes_per_pixel": round(passes, 4), "tissue_area_mm2": round(setup.area_model_px * plan.model_mpp**2 / 1e6, 4),
        "blocks_total": len(bg), "blocks_processed": len(plan.active), "blocks_resumed": len(done),
        "mpp": plan.slide_mpp, "mpp_source": getattr(slide, "mpp_source", "synthetic"), "level": setup.sinfo.get("level", 0),
        "scale_factor": setup.sinfo.get("scale_factor", plan.scale), "model": plan.model, "model_sha256": plan.model_sha,
        "device": plan.device, "wsi_nuclei_version": __version__, "nuclei_found_in_blocks": st["n_found"],
        "nuclei_cut_at_window_border": st["n_cut_owned"], "seam_candidates": st["seam_candidates"],
        "seam_kept": st["seam_kept"], "seam_trimmed": st["seam_trimmed"],
        "seam_duplicates_removed": st["seam_duplicates_removed"],
        "nuclei_outside_regions_removed": st["nuclei_outside_regions_removed"],
        "nuclei_near_region_edge_assigned": st["nuclei_near_region_edge_assigned"],
        "regions_overlapping": [list(p) for p in setup.overlaps],
        "peak_band_mb": round(engine_stats["peak_band_bytes"] / 2**20, 1),
        "oom_batch_splits": int(engine_stats.get("oom_batch_splits", 0)),
        "blocks_resubmitted_after_worker_loss": int(engine_stats.get("post_retries", 0)),
        **{f"seconds_{k}": round(v, 3) for k, v in seconds.items()},
        **{f"seconds_{k}_task_sum": round(engine_stats[f"t_{k}"], 3) for k in ("read", "infer", "post")},
    }
    qc["min_class_prob"] = min_prob
    # nuclei of a model with classes have class 0 ("Nucleus") only by the threshold
    qc["nuclei_unclassified_low_prob"] = counts.get(UNCLASSIFIED, 0) if setup.spec.class_names else 0
    warnings = []
    if setup.overlaps:
        warnings.append(f"{len(setup.overlaps)} pair(s) of regions overlap; nuclei in the overlap count in each region, once for the slide")
    summary = summ.finalize(qc)
    write_summary(summary, out)
    stage.begin_step("tissue.geojson")
    write_regions_geojson(regions, summary, out / "tissue.geojson", slide_fingerprint=plan.fingerprint)
    qstats = None
    qname = qupath_name(cfg)
    stage.end_step()
    if cfg.qupath_hierarchy:
        stage.begin_step(qname)
        t = time.perf_counter()
        qstats = write_qupath_geojson(frames(), regions, summary, out / qname, slide_fingerprint=plan.fingerprint,
                                      gzip=not cfg.geojson_plain, metadata=meta, spill_dir=final_dir)
        seconds["write_qupath"] = time.perf_counter() - t
    else:  # a hierarchy file of an earlier run (replaced with --overwrite) would no longer match
        (out / qname).unlink(missing_ok=True)

    spec = setup.spec
    manifest = {
        "wsi_nuclei_version": __version__, "slide": str(cfg.slide), "slide_name": plan.slide_name,
        "slide_path": setup.source[1] if isinstance(setup.source, tuple) and setup.source[0] == "path" else None,
        "backend": getattr(slide, "backend", "object"), "fingerprint": plan.fingerprint,
        "dimensions": list(slide.dimensions), "offset_bounds": list(getattr(slide, "offset", (0, 0))),
        "coordinate_frame": "level-0 pixels; OpenSlide bounds-x/y subtracted (the frame QuPath uses)",
        "resolution": {**setup.sinfo, "mpp": plan.slide_mpp, "mpp_source": getattr(slide, "mpp_source", None),
                       "scale_level0_to_model": plan.scale},
        "model": {"name": plan.model, "sha256": plan.model_sha, "weights": plan.weights, "tta": plan.tta,
                  "licence": spec.licence, "mpp": spec.mpp, "input_size": spec.input_size, "output_size": spec.output_size,
                  "precision": plan.precision,
                  "postprocess_backend": "torch" if plan.postprocess.endswith(" backend=torch") else "numpy"},
        "tiling": {"patch_stride": pg.stride, "patch_border": pg.border, "patch_context": pg.context,
                   "patches_x": pg.n_cols, "patches_y": pg.n_rows, "patches_planned": plan.n_patches,
                   "passes_per_pixel": round(passes, 4),
                   "block_size": bg.core, "halo": bg.halo, "blocks_x": bg.n_cols, "blocks_y": bg.n_rows,
                   "strips": len(plan.strips), "batch_size": plan.batch_size, "infer_chunk": plan.infer_chunk or plan.batch_size,
                   "blending": "smoothstep cross-fade over the patch overlap, patches in fixed order",
                   "ownership": "exclusive core nuclei final; seam candidates resolved by priority "
                                "(whole > cut, context, centroid owner, block order); no pixel twice"},
        "regions": {"source": "user (--regions)" if setup.user_regions else ("tissue detection" if cfg.tissue == "auto" else "whole slide"),
                    "count": len(setup.regions), "tolerance_level0_px": setup.tolerance_px},
        "device": plan.device, "scheduler": cfg.scheduler or "local in-process (dask.distributed, threads)",
        "qc": qc, "warnings": warnings, "n_nuclei": n_total, "counts": counts, "geojson": gstats,
        "classes": {"support": dict(spec.class_support), "not_measured": not_measured, "min_class_prob": min_prob,
                    "evidence": spec.class_evidence},
        "reliability_note": reliability_note(spec, min_prob),
        "qupath_hierarchy": qstats,
    }
    stage.begin_step("run.json")
    with atomic_path(out / "run.json") as tmp:
        tmp.write_text(json.dumps(manifest, indent=1, default=str))
    stage.end_step()
    files = {n: out / n for n in names if n != qname or cfg.qupath_hierarchy}
    if cfg.report:
        stage.begin_step("report.html")
        report = _write_report(out, slide, warn=stage.warn)
        stage.end_step("" if report is not None else "not written")
        if report is not None:
            files[report.name] = report
    return RunResult(out, files, n_total, counts, len(pg), int(engine_stats["n_patches"]), seconds, manifest)

"""The engine: slide -> tiles -> batched inference -> post-processing -> ownership -> writers.

Data flows one way::

    open slide, detect tissue / load regions, build the tile grid (main process)
      -> per batch of tiles, three Dask tasks: read  ->  infer  ->  post-process + own
      -> each finished batch is written as a part file (<out>/.work/parts/), so a crashed or
         interrupted run resumes where it stopped
      -> assembly, in tile order (deterministic whatever the completion order): overlap
         safety net, region ids, then streaming writers (GeoJSON, GeoParquet, summaries)

Memory is bounded by the number of batches in flight (``max_in_flight``), never by the slide
size: no slide-sized array is built. The default scheduler is an in-process
``dask.distributed`` client (threads, nothing to start); ``scheduler="tcp://host:port"`` runs
the same tasks on an existing cluster, each worker loading the model once.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from . import __version__
from ._io import atomic_path
from .errors import MissingMppError, NoTissueError, OutputError, WsiNucleiError
from .schema import CLASS_NAMES, NUCLEUS_COLUMNS, PROB_COLUMNS, class_name
from .tiling import TileGrid, make_grid, overlap_check, owned_mask

__all__ = ["RunConfig", "RunResult", "run", "OUTPUT_NAMES"]

#: Final output files (GeoJSON name depends on --geojson-plain).
#: Largest level-0 -> model upsampling accepted (0.25 -> 1.0 µm/px, i.e. 10x scans).
MAX_UPSAMPLING = 4.0
OUTPUT_NAMES = ("nuclei.parquet", "tissue.geojson", "summary.csv", "summary.json", "run.json")
_WORK = ".work"


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
    halo: int | None = None  # model px; None: 48 for full-window models, (in-out)/2-aware otherwise
    batch_size: int = 16
    max_in_flight: int = 4
    scheduler: str | None = None
    workers: int = 1  # local worker processes (1: in-process threads)
    threads: int = 2  # threads per local worker
    overwrite: bool = False
    geojson_plain: bool = False
    strict_ownership: bool = False
    quiet: bool = False
    keep_work: bool = False


@dataclass
class RunResult:
    out_dir: Path
    files: dict[str, Path]
    n_nuclei: int
    counts: dict[str, int]
    tiles_total: int
    tiles_processed: int
    seconds: dict[str, float]
    manifest: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- worker side
_LOCAL = threading.local()
_MODELS: dict[tuple, Any] = {}
_MODELS_LOCK = threading.Lock()


@dataclass(frozen=True)
class _Context:
    """Everything a worker needs, picklable (sent with each task)."""

    slide_source: Any  # ("path", path, backend, mpp) or a picklable slide object
    model: tuple[str, str | None, str, bool]  # name, weights, device, tta
    grid: TileGrid
    scale: float  # level-0 px -> model px
    slide_mpp: float
    model_mpp: float
    read_mpp: float
    fingerprint: str
    strict: bool
    torch_threads: int = 0  # > 0: set in each worker process (local --workers N), 0: leave as is


def _slide_of(ctx: _Context) -> Any:
    cache = getattr(_LOCAL, "slides", None)
    if cache is None:
        cache = _LOCAL.slides = {}
    src = ctx.slide_source
    if not (isinstance(src, tuple) and src and src[0] == "path"):
        return src
    if src not in cache:
        from .slide import open_slide

        cache[src] = open_slide(src[1], backend=src[2], mpp=src[3])
    return cache[src]


def _model_of(ctx: _Context) -> Any:
    with _MODELS_LOCK:
        if ctx.model not in _MODELS:
            from .models.registry import load_model

            name, weights, device, tta = ctx.model
            if ctx.torch_threads:  # one process per worker: share the cores, no oversubscription
                import torch

                torch.set_num_threads(ctx.torch_threads)
            _MODELS[ctx.model] = load_model(name, weights=weights, device=device, tta=tta)
        return _MODELS[ctx.model]


def _read_task(ctx: _Context, tiles: list[tuple[int, int]]) -> tuple[np.ndarray, float]:
    t = time.perf_counter()
    slide = _slide_of(ctx)
    n = ctx.grid.input_size
    out = np.empty((len(tiles), n, n, 3), np.uint8)
    for i, (r, c) in enumerate(tiles):
        x0, y0, x1, y1 = ctx.grid.input_box(r, c)
        box = (x0 / ctx.scale, y0 / ctx.scale, x1 / ctx.scale, y1 / ctx.scale)
        out[i] = slide.read_scaled(box, (n, n), target_mpp=ctx.read_mpp)
    return out, time.perf_counter() - t


def _infer_task(ctx: _Context, read: tuple[np.ndarray, float]) -> tuple[list[Any], float, float]:
    images, t_read = read
    t = time.perf_counter()
    raws = _model_of(ctx).infer(images)
    return raws, t_read, time.perf_counter() - t


def _post_task(ctx: _Context, tiles: list[tuple[int, int]], inferred: tuple[list[Any], float, float]) -> tuple[pd.DataFrame, dict[str, Any]]:
    raws, t_read, t_infer = inferred
    t = time.perf_counter()
    model = _model_of(ctx)
    cols: list[dict[str, Any]] = []
    n_found = n_oversized = 0
    for (r, c), raw in zip(tiles, raws):
        res = model.postprocess(raw)
        if len(res.labels) == 0:
            continue
        n_found += len(res.labels)
        data, n_bad = _own_and_measure(ctx, r, c, res)
        n_oversized += n_bad
        if data is not None:
            cols.append(data)
    if cols:
        merged = {k: (sum((d[k] for d in cols), []) if isinstance(cols[0][k], list) else np.concatenate([d[k] for d in cols]))
                  for k in cols[0]}
        frame = pd.DataFrame(merged)
        frame = frame[frame["geometry"].notna()].reset_index(drop=True)
    else:
        frame = _empty_frame()
    stats = {"t_read": t_read, "t_infer": t_infer, "t_post": time.perf_counter() - t,
             "n_found": n_found, "n_owned": int(len(frame)), "n_oversized": n_oversized, "n_tiles": len(tiles)}
    return frame, stats


def _own_and_measure(ctx: _Context, r: int, c: int, res: Any) -> tuple[dict[str, Any] | None, int]:
    """Apply the ownership rule to one tile's instances and measure the owned ones.

    Returns the table columns of the owned nuclei (sorted by centroid y, then x) or None,
    and the number of owned nuclei touching the window border (larger than the halo).
    """
    import shapely

    from .export import nucleus_uuid
    from .postprocess import measure_instances

    grid = ctx.grid
    wx0, wy0, _, _ = grid.window_box(r, c)
    inst = res.inst
    labels = np.asarray(res.labels)
    # centroids and bounding boxes of every instance, vectorised
    ys, xs = np.nonzero(inst)
    lab_px = inst[ys, xs]
    nlab = int(labels.max()) + 1
    cnt = np.maximum(np.bincount(lab_px, minlength=nlab), 1)
    # centroids in slide model px from exact integer sums of absolute pixel coordinates, so the
    # same nucleus gets bit-identical centroids (and UUIDs) whatever tile or grid it comes from
    n_px = cnt[labels]
    cy_m = (np.bincount(lab_px, weights=ys, minlength=nlab)[labels] + n_px * wy0) / n_px + 0.5
    cx_m = (np.bincount(lab_px, weights=xs, minlength=nlab)[labels] + n_px * wx0) / n_px + 0.5
    big = np.iinfo(np.int64).max
    y_min = np.full(nlab, big); np.minimum.at(y_min, lab_px, ys)
    x_min = np.full(nlab, big); np.minimum.at(x_min, lab_px, xs)
    y_max = np.full(nlab, -1); np.maximum.at(y_max, lab_px, ys)
    x_max = np.full(nlab, -1); np.maximum.at(x_max, lab_px, xs)
    bbox = np.column_stack([y_min[labels], x_min[labels], y_max[labels] + 1, x_max[labels] + 1])
    keep, n_bad = owned_mask(grid, r, c, cx_m, cy_m, bbox, strict=ctx.strict)
    # nuclei centred in the padding beyond the slide edge are not on the slide
    keep &= (cx_m >= 0) & (cy_m >= 0) & (cx_m < grid.width) & (cy_m < grid.height)
    if not keep.any():
        return None, n_bad
    idx = np.nonzero(keep)[0]
    idx = idx[np.lexsort((cx_m[idx], cy_m[idx]))]
    m = measure_instances(inst, labels[idx], ctx.model_mpp)
    s = 1.0 / ctx.scale
    geoms = [None if poly is None else shapely.Polygon((poly + (wx0, wy0)) * s) for poly in m["polygon"]]
    cx0 = cx_m[idx] * s
    cy0 = cy_m[idx] * s
    n = len(idx)
    class_id = np.asarray(res.class_id)[idx].astype(np.int8)
    data: dict[str, Any] = {
        "id": [nucleus_uuid(ctx.fingerprint, x, y) for x, y in zip(cx0, cy0)],
        "tile_row": np.full(n, r, np.int32),
        "tile_col": np.full(n, c, np.int32),
        "centroid_x": cx0,
        "centroid_y": cy0,
        "centroid_x_um": cx0 * ctx.slide_mpp,
        "centroid_y_um": cy0 * ctx.slide_mpp,
        "class_id": class_id,
        "class_name": [class_name(k) for k in class_id],
        "class_prob": np.asarray(res.class_prob)[idx].astype(np.float32),
    }
    probs = res.class_probs[idx] if res.class_probs is not None else np.full((n, 5), np.nan, np.float32)
    for j, col in enumerate(PROB_COLUMNS):
        data[col] = probs[:, j].astype(np.float32)
    for col in ("area_um2", "perimeter_um", "circularity", "solidity", "eccentricity", "major_axis_um", "minor_axis_um"):
        data[col] = np.asarray(m[col], np.float32)
    data["region_id"] = np.full(n, -1, np.int32)
    data["geometry"] = geoms
    return data, n_bad


def _empty_frame() -> pd.DataFrame:
    return pd.DataFrame({k: pd.Series(dtype=object if v in ("str", "object") else v) for k, v in NUCLEUS_COLUMNS.items()})


# --------------------------------------------------------------------------- part files
def _save_part(frame: pd.DataFrame, stats: dict[str, Any], path: Path) -> None:
    import shapely

    f = frame.copy()
    f["geometry"] = shapely.to_wkb(f["geometry"].to_numpy()) if len(f) else pd.Series(dtype=object)
    with atomic_path(path) as tmp:
        f.to_parquet(tmp, index=False)
    (path.with_suffix(".json")).write_text(json.dumps(stats))


def _load_part(path: Path) -> pd.DataFrame:
    import shapely

    f = pd.read_parquet(path)
    f["geometry"] = shapely.from_wkb(f["geometry"].to_numpy()) if len(f) else pd.Series(dtype=object)
    return f


# --------------------------------------------------------------------------- main
def _run_key(cfg: RunConfig, fingerprint: str, model_sha: str | None, grid: TileGrid, read_mpp: float, regions_hash: str) -> str:
    key = {"fingerprint": fingerprint, "model": cfg.model, "weights": str(cfg.weights), "sha": model_sha, "tta": cfg.tta,
           "grid": asdict(grid), "read_mpp": read_mpp, "mpp": cfg.mpp, "regions": regions_hash,
           "tissue": cfg.tissue, "batch": cfg.batch_size, "version": __version__}
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()


def default_out_dir(slide_path: str | Path) -> Path:
    """``./wsi-nuclei-out/<slide stem>/``."""
    name = Path(str(slide_path)).name
    for ext in (".ome.tiff", ".ome.tif"):
        if name.lower().endswith(ext):
            return Path("wsi-nuclei-out") / name[: -len(ext)]
    return Path("wsi-nuclei-out") / Path(name).stem


def _prepare_out(out: Path, names: list[str], overwrite: bool) -> None:
    existing = [n for n in names if (out / n).exists()]
    if existing and not overwrite:
        raise OutputError(f"{out}: results already exist ({', '.join(existing)}); use --overwrite to replace them")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise OutputError(f"{out}: output folder not writable ({exc.strerror or exc})") from None


def _tiles_to_process(grid: TileGrid, tmap: Any, scale: float) -> list[tuple[int, int]]:
    """Tiles (row-major) whose output window contains any tissue; all tiles without a map."""
    if tmap is None:
        return grid.tiles()
    rows, cols = np.divmod(np.arange(len(grid)), grid.n_cols)
    x0 = (cols * grid.core - grid.halo) / scale
    y0 = (rows * grid.core - grid.halo) / scale
    w = grid.window / scale
    frac = np.asarray(tmap.fraction_in_box(x0, y0, x0 + w, y0 + w))
    keep = np.nonzero(frac > 0)[0]
    return [(int(rows[i]), int(cols[i])) for i in keep]


def _tiles_meeting_regions(grid: TileGrid, tiles: list[tuple[int, int]], regions: list, scale: float) -> list[tuple[int, int]]:
    """The tiles whose output window intersects a region (exact polygon test, level-0 px)."""
    import shapely

    tree = shapely.STRtree([r.geometry for r in regions])
    boxes = [shapely.box(*(v / scale for v in grid.window_box(r, c))) for r, c in tiles]
    hit = set(tree.query(boxes, predicate="intersects")[0].tolist()) if boxes else set()
    return [t for i, t in enumerate(tiles) if i in hit]


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
    if scheduler:
        try:
            return Client(scheduler, timeout=20)
        except (OSError, TimeoutError) as exc:
            raise WsiNucleiError(f"cannot connect to the Dask scheduler {scheduler} ({exc})") from None
    # dashboard_address=None still binds the HTTP server to :8787 and warns when it is taken
    # (another run, a notebook cluster): a random port and no dashboard instead
    return Client(processes=workers > 1, n_workers=max(1, workers), threads_per_worker=max(1, threads),
                  dashboard_address=":0", scheduler_kwargs={"dashboard": False})


def run(cfg: RunConfig) -> RunResult:
    """Run the whole pipeline on one slide; see the module docstring."""
    from .models.registry import default_model_name, find_weights, get_spec, require_tta, resolve_device
    from .tissue import load_regions

    t0 = time.perf_counter()
    seconds: dict[str, float] = {}
    model_name = cfg.model or default_model_name()
    cfg.model = model_name
    spec = get_spec(model_name)
    if cfg.tta:
        require_tta(spec)  # before the slide is opened or the output folder made
    weights_path = find_weights(spec, cfg.weights)
    device = resolve_device(cfg.device)
    user_regions = load_regions(cfg.regions) if cfg.regions else None

    slide, source = _open(cfg)
    slide_name = Path(str(cfg.slide)).name if isinstance(cfg.slide, (str, Path)) else getattr(slide, "name", "synthetic")
    out = Path(cfg.out) if cfg.out else default_out_dir(slide_name)
    geojson_name = "nuclei.geojson" if cfg.geojson_plain else "nuclei.geojson.gz"
    names = [geojson_name, *OUTPUT_NAMES]
    created = not out.exists()
    _prepare_out(out, names, cfg.overwrite)
    try:
        return _run_in(cfg, spec, slide, source, slide_name, out, names, user_regions, weights_path, device, seconds, t0)
    except BaseException:
        # a folder this run created and that holds no finished batch (nothing to resume from)
        # is removed: bad input leaves no trace
        finished = list((out / _WORK / "parts").glob("b*.parquet")) if (out / _WORK).is_dir() else []
        if created and out.is_dir() and not finished and not any(p for p in out.iterdir() if p.name != _WORK):
            shutil.rmtree(out, ignore_errors=True)
        raise


def _run_in(cfg: RunConfig, spec: Any, slide: Any, source: Any, slide_name: str, out: Path, names: list[str],
            user_regions: Any, weights_path: Path | None, device: str, seconds: dict[str, float], t0: float) -> RunResult:
    from .models.registry import sha256_of
    from .tissue import TissueMap, detect_tissue_on_slide, rasterize_regions

    model_name = spec.name
    geojson_name = names[0]

    # resolution
    from .slide import scale_info

    sinfo = scale_info(slide, spec.mpp) if hasattr(slide, "best_level_for_mpp") else {}
    slide_mpp = float(slide.mpp)
    scale = slide_mpp / spec.mpp
    if scale > MAX_UPSAMPLING:
        raise MissingMppError(
            f"{slide_name}: {slide_mpp:.3g} um/px ({getattr(slide, 'mpp_source', '?')}) is too coarse for nucleus "
            f"segmentation at {spec.mpp} um/px (at most {spec.mpp * MAX_UPSAMPLING:.3g} um/px, i.e. 10x); pass --mpp if the file's value is wrong"
        )
    w0, h0 = slide.dimensions
    halo = cfg.halo if cfg.halo is not None else (48 if spec.output_size >= 256 else 32)
    grid = make_grid(math.ceil(w0 * scale), math.ceil(h0 * scale), input_size=spec.input_size,
                     output_size=spec.output_size, halo=halo)

    # tissue and regions
    t = time.perf_counter()
    tmap = None
    regions: list[Any] = []
    if cfg.tissue == "auto":
        tmap = detect_tissue_on_slide(slide, mpp=slide_mpp, allow_empty=user_regions is not None)
        regions = list(tmap.regions)
    if user_regions is not None:
        if tmap is not None:
            restricted = tmap.mask & rasterize_regions(user_regions, tmap.mask.shape, tmap.downsample_xy)
            tmap = TissueMap(restricted, tmap.downsample, tuple(user_regions), tmap.downsample_xy)
            if not restricted.any():
                raise NoTissueError("no tissue inside the regions given with --regions")
        regions = list(user_regions)
    if not regions:  # --tissue none: one region, the whole slide
        import shapely

        from .tissue import Region

        regions = [Region(1, "Slide", shapely.box(0, 0, w0, h0), "slide", None, None)]
    tiles = _tiles_to_process(grid, tmap, scale)
    if user_regions is not None and tmap is None:  # --tissue none --regions: only tiles meeting a region
        tiles = _tiles_meeting_regions(grid, tiles, user_regions, scale)
    if not tiles:
        raise NoTissueError("no tile contains tissue")
    seconds["tissue"] = time.perf_counter() - t

    model_sha = spec.sha256 if (spec.sha256 and cfg.weights is None) else (sha256_of(weights_path) if weights_path else None)
    read_mpp = spec.mpp
    regions_hash = hashlib.sha256(b"".join(r.geometry.wkb for r in regions)).hexdigest()[:16]
    key = _run_key(cfg, slide.fingerprint, model_sha, grid, read_mpp, regions_hash)
    work = out / _WORK
    parts = work / "parts"
    key_file = work / "run_key"
    if work.exists() and (not key_file.is_file() or key_file.read_text() != key):
        shutil.rmtree(work)
    parts.mkdir(parents=True, exist_ok=True)
    key_file.write_text(key)

    batches = [tiles[i : i + cfg.batch_size] for i in range(0, len(tiles), cfg.batch_size)]
    done = {int(p.stem[1:]) for p in parts.glob("b*.parquet") if p.with_suffix(".json").is_file()}
    todo = [i for i in range(len(batches)) if i not in done]
    ctx = _Context(source, (model_name, str(weights_path) if weights_path else None, device, cfg.tta), grid, scale,
                   slide_mpp, spec.mpp, read_mpp, slide.fingerprint, cfg.strict_ownership,
                   torch_threads=cfg.threads if (cfg.workers > 1 and not cfg.scheduler) else 0)

    # inference
    t = time.perf_counter()
    if todo:
        _run_batches(ctx, batches, todo, parts, cfg, resumed=len(done))
    seconds["inference_wall"] = time.perf_counter() - t
    stage = {"read": 0.0, "infer": 0.0, "postprocess": 0.0}
    n_found = n_oversized = 0
    for i in range(len(batches)):
        st = json.loads((parts / f"b{i:06d}.json").read_text())
        stage["read"] += st["t_read"]
        stage["infer"] += st["t_infer"]
        stage["postprocess"] += st["t_post"]
        n_found += st["n_found"]
        n_oversized += st["n_oversized"]
    seconds.update({f"{k}_task_sum": v for k, v in stage.items()})

    # assembly and writing
    t = time.perf_counter()
    final_dir = work / "final"
    if final_dir.exists():
        shutil.rmtree(final_dir)
    final_dir.mkdir()
    n_dup, n_outside = _assemble(batches, parts, final_dir, grid, scale, regions)
    seconds["assemble"] = time.perf_counter() - t

    def frames() -> Iterator[pd.DataFrame]:
        for i in range(len(batches)):
            f = _load_part(final_dir / f"b{i:06d}.parquet")
            if len(f):
                yield f

    from .export import write_nuclei_geojson, write_nuclei_parquet, write_regions_geojson
    from .summary import RegionSummarizer, write_summary

    t = time.perf_counter()
    meta = {"slide": slide_name, "fingerprint": slide.fingerprint, "model": model_name, "frame": "level-0 px, OpenSlide bounds subtracted (QuPath frame)"}
    gstats = write_nuclei_geojson(frames(), out / geojson_name, gzip=not cfg.geojson_plain, metadata=meta)
    seconds["write_geojson"] = time.perf_counter() - t
    t = time.perf_counter()
    write_nuclei_parquet(frames(), out / "nuclei.parquet", metadata=meta)
    seconds["write_parquet"] = time.perf_counter() - t
    t = time.perf_counter()
    class_names = dict(CLASS_NAMES) if spec.class_names else {0: "Nucleus"}
    summ = RegionSummarizer(regions, class_names=class_names, mpp=slide_mpp, slide_name=slide_name)
    counts: dict[str, int] = {}
    n_total = 0
    for f in frames():
        summ.add(f)
        n_total += len(f)
        for k, v in f["class_name"].value_counts().items():
            counts[k] = counts.get(k, 0) + int(v)
    seconds["summaries"] = time.perf_counter() - t
    seconds["total"] = time.perf_counter() - t0
    qc = {
        "tiles_total": len(grid), "tiles_processed": len(tiles), "tiles_skipped": len(grid) - len(tiles),
        "tiles_resumed": len(done) and sum(len(batches[i]) for i in done),
        "mpp": slide_mpp, "mpp_source": getattr(slide, "mpp_source", "synthetic"), "level": sinfo.get("level", 0),
        "scale_factor": sinfo.get("scale_factor", scale), "model": model_name, "model_sha256": model_sha,
        "device": device, "wsi_nuclei_version": __version__, "nuclei_found_in_tiles": n_found,
        "nuclei_oversized": n_oversized, "duplicates_removed": n_dup, "nuclei_outside_regions_removed": n_outside,
        **{f"seconds_{k}": round(v, 3) for k, v in seconds.items()},
    }
    summary = summ.finalize(qc)
    write_summary(summary, out)
    write_regions_geojson(regions, summary, out / "tissue.geojson", slide_fingerprint=slide.fingerprint)

    manifest = {
        "wsi_nuclei_version": __version__, "slide": str(cfg.slide), "slide_name": slide_name,
        "backend": getattr(slide, "backend", "object"), "fingerprint": slide.fingerprint,
        "dimensions": list(slide.dimensions), "offset_bounds": list(getattr(slide, "offset", (0, 0))),
        "coordinate_frame": "level-0 pixels; OpenSlide bounds-x/y subtracted (the frame QuPath uses)",
        "resolution": {**sinfo, "mpp": slide_mpp, "mpp_source": getattr(slide, "mpp_source", None), "scale_level0_to_model": scale},
        "model": {"name": model_name, "sha256": model_sha, "weights": str(weights_path) if weights_path else None, "tta": cfg.tta,
                  "licence": spec.licence, "mpp": spec.mpp, "input_size": spec.input_size, "output_size": spec.output_size},
        "tiling": {**asdict(grid), "window": grid.window, "n_rows": grid.n_rows, "n_cols": grid.n_cols,
                   "ownership": "centroid in tile core; halo >= nucleus radius"},
        "regions": {"source": "user (--regions)" if user_regions is not None else ("tissue detection" if cfg.tissue == "auto" else "whole slide"),
                    "count": len(regions)},
        "device": device, "scheduler": cfg.scheduler or "local in-process (dask.distributed, threads)",
        "qc": qc, "n_nuclei": n_total, "counts": counts, "geojson": gstats,
    }
    with atomic_path(out / "run.json") as tmp:
        tmp.write_text(json.dumps(manifest, indent=1, default=str))
    if not cfg.keep_work:
        shutil.rmtree(work, ignore_errors=True)
    files = {n: out / n for n in names}
    return RunResult(out, files, n_total, counts, len(grid), len(tiles), seconds, manifest)


def _run_batches(ctx: _Context, batches: list, todo: list[int], parts: Path, cfg: RunConfig, resumed: int) -> None:
    from distributed import as_completed
    from tqdm import tqdm

    total_tiles = sum(len(b) for b in batches)
    done_tiles = total_tiles - sum(len(batches[i]) for i in todo)
    bar = tqdm(total=total_tiles, initial=done_tiles, unit="tile", disable=cfg.quiet, file=sys.stderr,
               desc="tiles" + (f" (resumed {resumed} batches)" if resumed else ""), smoothing=0.1, dynamic_ncols=True)
    client = _client(cfg.scheduler, cfg.workers, cfg.threads)
    try:
        pending = list(todo)
        ac = as_completed()
        index: dict[str, int] = {}

        def submit(i: int) -> None:
            b = batches[i]
            r = client.submit(_read_task, ctx, b, pure=False)
            inf = client.submit(_infer_task, ctx, r, pure=False)
            post = client.submit(_post_task, ctx, b, inf, pure=False)
            index[post.key] = i
            ac.add(post)

        for _ in range(min(cfg.max_in_flight, len(pending))):
            submit(pending.pop(0))
        for fut in ac:
            i = index.pop(fut.key)
            try:
                frame, stats = fut.result()
            except WsiNucleiError:
                raise
            _save_part(frame, stats, parts / f"b{i:06d}.parquet")
            bar.update(len(batches[i]))
            fut.release()
            if pending:
                submit(pending.pop(0))
    finally:
        bar.close()
        client.close()


def _assemble(batches: list, parts: Path, final_dir: Path, grid: TileGrid, scale: float, regions: list) -> tuple[int, int]:
    """Overlap safety net and region ids, in tile order; writes final part files.

    Nuclei whose centroid lies within ``border`` px of their core's edge are kept in a small
    index per tile; each tile's border nuclei are checked against those of its already-seen
    neighbours (left, upper-left, up, upper-right). A duplicate from the later tile is dropped.
    Memory: one tile row of border nuclei. Nuclei whose centroid lies outside every region
    (tissue piece or user region) are dropped, so the summaries count exactly the features
    written. Returns (duplicates removed, nuclei outside the regions removed).
    """
    from .export import clean_frame
    from .tissue import assign_regions

    # a nucleus segmented differently by two tiles has its two centroids up to about a
    # nucleus radius (<= halo) apart, on either side of the core edge: a 24-px band let
    # such duplicates through on real slides (HE_example.tif)
    border = max(24, grid.halo) / scale  # level-0 px
    recent: dict[tuple[int, int], list] = {}
    n_dup = n_outside = 0
    for i, batch in enumerate(batches):
        f = _load_part(parts / f"b{i:06d}.parquet")
        if len(f):
            f, _ = clean_frame(f)
        drop = np.zeros(len(f), bool)
        if len(f):
            for (r, c) in batch:
                sel = np.nonzero(((f["tile_row"] == r) & (f["tile_col"] == c)).to_numpy())[0]
                if not len(sel):
                    continue
                x0, y0, x1, y1 = (v / scale for v in grid.core_box(r, c))
                cx, cy = f["centroid_x"].to_numpy()[sel], f["centroid_y"].to_numpy()[sel]
                near = (cx - x0 < border) | (x1 - cx < border) | (cy - y0 < border) | (y1 - cy < border)
                bsel = sel[near]
                polys = list(f["geometry"].to_numpy()[bsel])
                probs = f["class_prob"].to_numpy()[bsel]
                for nb in ((r, c - 1), (r - 1, c - 1), (r - 1, c), (r - 1, c + 1)):
                    if nb in recent and len(polys):
                        # the earlier tile's copy is already written: it always wins
                        earlier = recent[nb]
                        _, drop_b = overlap_check(earlier, np.full(len(earlier), np.inf), polys, probs)
                        drop[bsel[drop_b]] = True
                recent[(r, c)] = [p for p, d in zip(polys, drop[bsel]) if not d]
            # forget tiles more than one row back
            rmin = min(r for r, _ in batch) - 1
            for k in [k for k in recent if k[0] < rmin]:
                del recent[k]
        n_dup += int(drop.sum())
        f = f.loc[~drop].reset_index(drop=True)
        if len(f):
            f["region_id"] = assign_regions(f["centroid_x"].to_numpy(), f["centroid_y"].to_numpy(), regions).astype(np.int32)
            inside = f["region_id"].to_numpy() >= 0
            n_outside += int((~inside).sum())
            f = f.loc[inside].reset_index(drop=True)
        _save_part(f, {}, final_dir / f"b{i:06d}.parquet")
    return n_dup, n_outside

"""Planning a run: open the slide, choose the resolution, find tissue / regions, lay out the patch
and block grids, the active blocks and their strips: a frozen :class:`RunPlan` from which the
resume key is derived.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .. import __version__
from ..engine import EngineContext, Strip, plan_strips
from ..errors import MissingMppError, NoTissueError
from ..tiling import BlockGrid, PatchGrid
from ._config import MAX_UPSAMPLING, TISSUE_MARGIN_PX, TISSUE_TOLERANCE_THUMB_PX, RunConfig

if TYPE_CHECKING:
    from ..models import ModelSpec
    from ..slide import BaseSlide

__all__ = [
    "RunPlan",
    "make_plan",
    "resolve_infer_chunk",
]


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
    #: ``--precision int8``: sha256 of the model's int8 calibration file (its activation ranges)
    int8_calibration_sha: str = ""

    def key(self) -> str:
        """The resume key: a run resumes only parts made under the very same plan."""
        ident = {
            k: v for k, v in asdict(self).items() if k not in ("slide_name", "strips", "active")
        }
        ident["active"] = hashlib.sha256(json.dumps(self.active).encode()).hexdigest()
        ident["version"] = __version__
        return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()

    @property
    def n_patches(self) -> int:
        """Network patches the plan runs (all strips)."""
        return sum(s.n_patches for s in self.strips)


def _open(cfg: RunConfig) -> tuple[Any, Any]:
    """The slide of a run and the identity of its source (path, backend, --mpp) for the run key;
    an in-memory slide object is its own source."""
    if isinstance(cfg.slide, (str, Path)):
        from ..slide import open_slide

        slide = open_slide(cfg.slide, backend=cfg.backend, mpp=cfg.mpp)
        return slide, ("path", str(Path(cfg.slide).resolve()), slide.backend, cfg.mpp)
    return cfg.slide, cfg.slide


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


def make_plan(
    cfg: RunConfig,
    spec: ModelSpec,
    slide: BaseSlide,
    source: Any,
    slide_name: str,
    weights_path: Path | None,
    device: str,
    user_regions: list | None,
) -> tuple[RunPlan, _Setup]:
    """The plan stage (see the module docstring)."""
    import shapely

    from ..models import resolve_precision, sha256_file
    from ..postprocess_torch import postprocess_backend
    from ..regions import Region, overlapping_regions, rasterize_regions
    from ..slide import scale_info
    from ..tissue import TissueMap, detect_tissue_on_slide

    t = time.perf_counter()
    sinfo = scale_info(slide, spec.mpp) if hasattr(slide, "best_level_for_mpp") else {}
    if slide.mpp is None:  # open_slide(require_mpp=True) raised already; a slide object may not
        raise MissingMppError(f"{slide_name}: the slide has no microns-per-pixel; pass --mpp")
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
            restricted = tmap.mask & rasterize_regions(
                user_regions, tmap.mask.shape, tmap.downsample_xy
            )
            tmap = TissueMap(restricted, tmap.downsample, tuple(user_regions), tmap.downsample_xy)
            if not restricted.any():
                raise NoTissueError("no tissue inside the regions given with --regions")
        regions = list(user_regions)
        tolerance = 0.0  # user outlines are exact: a nucleus outside them is not in them
    if not regions:  # --tissue none: one region, the whole slide
        regions = [Region(1, "Slide", shapely.box(0, 0, w0, h0), "slide", None, None)]

    margin = TISSUE_MARGIN_PX
    s = scale

    def boxes(
        x0: np.ndarray, y0: np.ndarray, x1: np.ndarray, y1: np.ndarray
    ) -> tuple[np.ndarray, ...]:
        return (x0 - margin) / s, (y0 - margin) / s, (x1 + margin) / s, (y1 + margin) / s

    patch_ok = None
    block_ok = None
    if tmap is not None:

        def patch_ok(rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
            x0 = pg.output_start(cols)
            y0 = pg.output_start(rows)
            return (
                np.asarray(
                    tmap.fraction_in_box(*boxes(x0, y0, x0 + pg.output_size, y0 + pg.output_size))
                )
                > 1e-9
            )

        def block_ok(rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
            x0, y0 = cols * bg.core, rows * bg.core
            return (
                np.asarray(tmap.fraction_in_box(*boxes(x0, y0, x0 + bg.core, y0 + bg.core))) > 1e-9
            )  # (summed-area noise)
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
    strips = tuple(
        plan_strips(
            pg,
            bg,
            active,
            patch_ok=patch_ok,
            strip_blocks=cfg.strip_blocks,
            batch_size=cfg.batch_size,
        )
    )
    if not active or not any(st.batches for st in strips):
        raise NoTissueError("no tissue to process")

    model_sha = (
        spec.sha256
        if (spec.sha256 and cfg.weights is None)
        else (sha256_file(weights_path) if weights_path else None)
    )
    regions_hash = hashlib.sha256(b"".join(r.geometry.wkb for r in regions)).hexdigest()[:16]
    precision = resolve_precision(cfg.precision, device, spec)
    calib = None
    if precision == "int8":
        from ..models._int8 import calibration_path

        calib = calibration_path(spec, weights_path)
    plan = RunPlan(
        slide_name=slide_name,
        fingerprint=slide.fingerprint,
        model=spec.name,
        model_sha=model_sha,
        weights=str(weights_path) if weights_path else None,
        device=device,
        precision=precision,
        int8_calibration_sha=sha256_file(calib) if calib is not None and calib.is_file() else "",
        tta=bool(cfg.tta),
        patches=pg,
        blocks=bg,
        scale=scale,
        slide_mpp=slide_mpp,
        read_mpp=spec.mpp,
        model_mpp=spec.mpp,
        active=active,
        strips=strips,
        batch_size=int(cfg.batch_size),
        strip_blocks=int(cfg.strip_blocks),
        tissue=cfg.tissue,
        regions_hash=regions_hash,
        strict=bool(cfg.strict_ownership),
        source_stat=_source_stat(source),
        postprocess=(
            json.dumps(asdict(spec.hv_params()), sort_keys=True, default=str)
            if spec.postprocess or spec.class_support
            else ""
        )
        + ("" if postprocess_backend(device) == "numpy" else " backend=torch"),
        infer_chunk=resolve_infer_chunk(
            cfg.infer_chunk, device, cfg.batch_size, spec.cpu_infer_chunk
        ),
    )
    if tmap is not None:
        area0 = float(tmap.mask.sum()) * tmap.downsample_xy[0] * tmap.downsample_xy[1]
    elif user_regions is not None:
        area0 = float(shapely.union_all([r.geometry for r in user_regions]).area)
    else:
        area0 = float(w0 * h0)
    setup = _Setup(
        slide,
        source,
        spec,
        weights_path,
        regions,
        user_regions is not None,
        tmap,
        sinfo,
        tolerance,
        overlapping_regions(regions) if user_regions is not None else [],
        time.perf_counter() - t,
        area0 * scale * scale,
    )
    return plan, setup


def _source_stat(source: Any) -> str:
    """Hash of (name, size, mtime) of every pixel file of a slide given by path: a slide
    rewritten in place never resumes from parts made before."""
    if not (isinstance(source, tuple) and source and source[0] == "path"):
        return ""
    from ..slide import pixel_files

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


def resolve_infer_chunk(
    infer_chunk: int | None, device: str, batch_size: int, cpu_default: int | None = None
) -> int:
    """Patches per network call: ``infer_chunk``, or the default (``cpu_default``, else
    :data:`CPU_INFER_CHUNK`, on the CPU; the whole batch on an accelerator).

    Parameters
    ----------
    infer_chunk : int or None
        The ``--infer-chunk`` option (None: the default).
    device : str
        The resolved inference device.
    batch_size : int
        Patches per batch.
    cpu_default : int, optional
        The model's own CPU default (``ModelSpec.cpu_infer_chunk``).

    Returns
    -------
    int
        The chunk size, 0 when it is the whole batch.
    """
    if infer_chunk is not None and infer_chunk < 1:
        raise ValueError("infer_chunk must be >= 1")
    cpu = cpu_default or CPU_INFER_CHUNK
    chunk = infer_chunk if infer_chunk is not None else (cpu if device == "cpu" else 0)
    return 0 if chunk == 0 or chunk >= batch_size else int(chunk)


def _context(plan: RunPlan, setup: _Setup, cfg: RunConfig) -> EngineContext:
    """The engine's context of a planned run (what every task needs, picklable)."""
    torch_threads, infer_slots = _threading(cfg, plan.device)
    return EngineContext(
        setup.source,
        (plan.model, plan.weights, plan.device, plan.tta, plan.precision),
        plan.patches,
        plan.blocks,
        plan.scale,
        plan.read_mpp,
        plan.slide_mpp,
        plan.model_mpp,
        plan.fingerprint,
        plan.strict,
        infer_chunk=plan.infer_chunk,
        torch_threads=torch_threads,
        infer_slots=infer_slots,
    )


def _threading(cfg: RunConfig, device: str) -> tuple[int, int]:
    """How the network calls of a run share the cores: ``(torch_threads, infer_slots)`` of its
    ``EngineContext``.

    On the CPU with this machine's own workers (no ``--scheduler``), each worker thread may run a
    network call at once, each call with one torch thread: on 2 cores the default model's
    CMU-1-Small-Region run took 28.0-28.3 s in float32 and 18.5-19.0 s in bfloat16 this way,
    against 31.2-32.8 s and 20.7-21.2 s with one call at a time on two torch threads, because the
    post-processing and reading threads no longer stall a call that holds both cores
    (docs/benchmarks.md). On an accelerator, one call at a time; its torch threads are left as
    they are in-process and set to the threads per worker in ``--workers N`` processes.
    """
    if device == "cpu" and not cfg.scheduler:
        return 1, max(1, cfg.threads)
    return (cfg.threads if (cfg.workers > 1 and not cfg.scheduler) else 0), 1

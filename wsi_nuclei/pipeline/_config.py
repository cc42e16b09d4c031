"""What a run is asked to do and what it returns: :class:`RunConfig`, :class:`RunResult`, the
names of the output files and the default output folder.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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


@dataclass
class RunConfig:
    """Options of one run (mirrors ``wsi-nuclei run``)."""

    slide: Any  # path, or an object with the Slide interface (e.g. SyntheticSlide)
    out: str | Path | None = None
    model: str | None = None  # None: the default model
    weights: str | Path | None = None
    device: str = "auto"
    tta: bool = False  # flip test-time augmentation (4x network time)
    #: network arithmetic: "auto" (float16 on CUDA, bfloat16 on CPUs with native bfloat16 where
    #: the model was validated in it, float32 otherwise), "fp32", "bf16" or "fp16"
    precision: str = "auto"
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
    #: threads per local worker; 0: from the usable cores (:func:`resolve_threads`)
    threads: int = 0
    overwrite: bool = False
    geojson_plain: bool = False
    qupath_hierarchy: bool = True  # write qupath.geojson(.gz): regions holding their nuclei
    strict_ownership: bool = False
    quiet: bool = False
    keep_work: bool = False
    #: None: the model's calibrated threshold (ModelSpec.min_class_prob)
    min_class_prob: float | None = None
    report: bool = True  # write report.html (visual QC) after the other outputs
    anndata: bool = False  # also write nuclei.h5ad (needs the optional 'anndata' package)
    #: a dask.distributed client to use (and leave open); None: this process's threads, or a
    #: client per run for --scheduler / --workers > 1
    client: Any = None


@dataclass
class RunResult:
    """What :func:`~wsi_nuclei.pipeline.run` returns: the output folder and files, the nucleus count and
    counts per class, the patches planned and run, the seconds per stage and the run manifest
    (``run.json``)."""

    out_dir: Path
    files: dict[str, Path]
    n_nuclei: int
    counts: dict[str, int]
    patches_total: int
    patches_run: int
    seconds: dict[str, float]
    manifest: dict[str, Any] = field(default_factory=dict)


def default_out_dir(slide_path: str | Path) -> Path:
    """``./wsi-nuclei-out/<slide stem>/``."""
    name = Path(str(slide_path)).name
    for ext in (".ome.tiff", ".ome.tif"):
        if name.lower().endswith(ext):
            return Path("wsi-nuclei-out") / name[: -len(ext)]
    return Path("wsi-nuclei-out") / Path(name).stem


def _uses_dask(cfg: RunConfig) -> bool:
    """Whether a run's tasks go to ``dask.distributed`` (a client handed in, an external
    scheduler, local worker processes) rather than to threads of this process."""
    return cfg.client is not None or bool(cfg.scheduler) or cfg.workers > 1


def _executor_description(cfg: RunConfig) -> str:
    """Where a run's tasks ran, for ``run.json`` (the decision of :func:`_uses_dask`)."""
    if cfg.scheduler:
        return cfg.scheduler
    if cfg.workers > 1:
        return f"local dask.distributed, {cfg.workers} worker processes"
    if cfg.client is not None:
        return "dask.distributed client given by the caller"
    return f"local in-process, {cfg.threads} threads"


def qupath_name(cfg: RunConfig) -> str:
    """File name of the QuPath hierarchy file (``--geojson-plain`` decides the ``.gz``)."""
    return "qupath.geojson" if cfg.geojson_plain else "qupath.geojson.gz"


#: the most threads a run takes by default (each may run a network call with its activations,
#: and post-processing shares one interpreter lock); --threads sets more
MAX_DEFAULT_THREADS = 8


def resolve_threads(threads: int, workers: int = 1, cores: int | None = None) -> int:
    """Threads per local worker: ``threads`` when given (> 0), else the usable cores shared
    out between the ``workers`` (at least 1, at most :data:`MAX_DEFAULT_THREADS`)."""
    if threads > 0:
        return int(threads)
    if cores is None:
        from .._cores import usable_cores

        cores = usable_cores()
    return max(1, min(MAX_DEFAULT_THREADS, cores // max(1, workers)))

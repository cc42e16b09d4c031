"""Argument types and the options of ``wsi-nuclei run`` (shared by the single-slide and the
cohort run), with the texts of the exit codes and the resolution policy shown by ``--help``.
"""

from __future__ import annotations

import argparse

#: Exit code of an unexpected exception (EX_SOFTWARE of sysexits.h).
INTERNAL_ERROR = 70

EXIT_CODES = """\
exit codes:
  0  success
  1  other input/environment problem (e.g. Dask scheduler unreachable, --device cuda without a GPU)
  2  input file not found
  3  unreadable, unsupported, truncated or corrupt slide
  4  slide has no usable microns-per-pixel and --mpp was not given
  5  no tissue found (or none inside --regions)
  6  malformed --regions file
  7  output not writable or disk full, results exist without --overwrite, or another run holds --out
  8  unknown model, missing or mismatching weights, failed fetch
  9  malformed training/evaluation dataset
  70 internal error (a bug: one line; WSI_NUCLEI_TRACEBACK=1 shows the traceback)
  130 interrupted (Ctrl-C); a rerun resumes from the finished batches
"""

RESOLUTION_POLICY = """\
resolution policy:
  The slide's microns-per-pixel (MPP) is read from the file: OpenSlide properties
  (openslide.mpp-x/y), the Aperio 'MPP' tag, TIFF resolution tags, OME-XML PhysicalSizeX or
  DICOM PixelSpacing. If it is missing or implausible (outside 0.05-20 um/px) the run stops
  with exit code 4 unless --mpp is given. Work happens at the model's resolution (0.25 um/px
  for the PanNuke models): tiles are read from the pyramid level closest to, but not coarser
  than, that resolution and resampled tile by tile (a 20x slide is upsampled 2x per tile,
  never as a whole). The level, the MPP source and the scale are recorded in run.json.
  Coordinates are level-0 pixels in the frame QuPath uses (OpenSlide bounds-x/y subtracted).
"""


def int_range(lo: int, hi: int):
    """An argparse type: an integer in ``[lo, hi]`` (otherwise argparse's one-line error, exit 2)."""

    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if not lo <= v <= hi:
            raise argparse.ArgumentTypeError(f"{v} is out of range ({lo} to {hi})")
        return v

    parse.__name__ = "integer"
    return parse


def float_range(lo: float, hi: float, *, lo_open: bool = False):
    """An argparse type: a finite float in ``[lo, hi]`` (``(lo, hi]`` with ``lo_open``)."""

    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not (v == v and (v > lo if lo_open else v >= lo) and v <= hi):
            raise argparse.ArgumentTypeError(
                f"{text} is out of range ({'above ' if lo_open else ''}{lo:g} to {hi:g})"
            )
        return v

    parse.__name__ = "number"
    return parse


def _add_run_args(p: argparse.ArgumentParser) -> None:
    from ..models import PRECISIONS
    from ..slide import BACKENDS, MPP_RANGE

    p.add_argument(
        "slides",
        nargs="+",
        metavar="SLIDE",
        help="whole-slide image (any format OpenSlide/tiffslide read, DICOM WSI) or a plain PNG/JPEG/TIFF with --mpp; "
        "several slides, a folder (the slides directly inside it, by extension; a MIRAX .mrxs with its data folder "
        "counts once) or a quoted glob pattern ('slides/*.svs', '**' recurses) make a cohort run: one output folder per "
        "slide under --out, named by the slide stem (equal stems get -1, -2, ... in path order), the model loaded once, "
        "a failing slide reported in one line and the others continued, a finished slide skipped when the command is "
        "rerun, and <out>/cohort.csv at the end",
    )
    p.add_argument(
        "--out",
        "-o",
        help="output folder (default: ./wsi-nuclei-out/<slide stem>/); for a cohort run the folder "
        "that receives one folder per slide and cohort.csv (default: ./wsi-nuclei-out/)",
    )
    p.add_argument(
        "--model",
        "-m",
        default=None,
        help="model name from 'wsi-nuclei models' (default: the bundled trained model; 'classic' without weights)",
    )
    p.add_argument(
        "--weights",
        help="weights file for the model (e.g. the official HoVer-Net PanNuke checkpoint)",
    )
    p.add_argument(
        "--device",
        default="auto",
        choices=["auto", "cpu", "cuda"],
        help="inference device (default: auto = cuda when available)",
    )
    p.add_argument(
        "--tta",
        action="store_true",
        help="flip test-time augmentation: average the network maps over 4 "
        "flips of each tile (about 4x slower, slightly more accurate; "
        "network models only)",
    )
    p.add_argument(
        "--precision",
        default="auto",
        choices=PRECISIONS,
        help="network arithmetic: fp32, or bf16/fp16 autocast (about 2x faster where the "
        "hardware has it, maps within rounding of fp32), or int8 (CPU only, models that ship "
        "an int8 calibration: the heaviest decoder layers in 8-bit integers, 1.7-1.8x the fp32 "
        "network speed and validation figures within 0.007 of fp32 where measured, "
        "docs/benchmarks.md; for CPUs without native bfloat16). auto "
        "(default): fp16 on CUDA, bf16 on CPUs with native bfloat16 (AVX512-BF16 or AMX) for "
        "models validated in it, fp32 otherwise; run.json records the choice",
    )
    p.add_argument(
        "--backend",
        default="auto",
        choices=["auto", *BACKENDS],
        help="slide reader; when the chosen one cannot open the file the others are tried (default: auto)",
    )
    p.add_argument(
        "--mpp",
        type=float_range(*MPP_RANGE),
        help=f"microns per pixel at level 0, {MPP_RANGE[0]:g} to {MPP_RANGE[1]:g}; overrides the "
        "file's value (required when the file has none)",
    )
    p.add_argument(
        "--regions",
        help="QuPath GeoJSON annotations (export): process only inside them and summarise per annotation",
    )
    p.add_argument(
        "--tissue",
        default="auto",
        choices=["auto", "none"],
        help="auto: detect tissue on a thumbnail and skip tiles without tissue; none: process the whole image as one region (default: auto)",
    )
    p.add_argument(
        "--block-size",
        type=int_range(64, 16384),
        default=1024,
        help="post-processing block size in model px: the blended network maps are "
        "post-processed in blocks of this size, each read with --halo around it (default: %(default)s)",
    )
    p.add_argument(
        "--halo",
        type=int_range(0, 1024),
        help="block halo in model px: must exceed the largest nucleus radius plus the post-processing's "
        "reach (default: the model's, 96)",
    )
    p.add_argument(
        "--batch-size",
        type=int_range(1, 1024),
        default=16,
        help="network patches per inference batch, 1 to 1024 (default: 16)",
    )
    p.add_argument(
        "--max-in-flight",
        type=int_range(1, 64),
        default=4,
        help="batches in flight at once, 1 to 64; bounds memory (default: 4)",
    )
    p.add_argument(
        "--infer-chunk",
        type=int_range(1, 1024),
        default=None,
        help="patches per network call, 1 to 1024: each batch runs in chunks of this size, one call at a time, "
        "which bounds the network's working memory (the batches themselves are unchanged) "
        "(default: 2 on the CPU, the whole batch on CUDA)",
    )
    p.add_argument(
        "--scheduler",
        help="address of an existing dask.distributed scheduler (tcp://host:port); default: local, in-process",
    )
    p.add_argument(
        "--workers",
        type=int_range(1, 256),
        default=1,
        help="local Dask worker processes, 1 to 256; 1 = in-process threads (default: 1)",
    )
    p.add_argument(
        "--threads",
        type=int_range(1, 256),
        default=0,
        help="threads per local worker, 1 to 256 (default: the cores this process may use, from its "
        "CPU affinity and any container CPU quota, shared out between the --workers, at most 8; "
        "on the CPU each thread may run one single-threaded network call)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace existing results in the output folder (a cohort "
        "run redoes every slide instead of skipping finished ones)",
    )
    p.add_argument(
        "--geojson-plain",
        action="store_true",
        help="write nuclei.geojson and qupath.geojson (uncompressed) instead of the .geojson.gz files",
    )
    p.add_argument(
        "--no-qupath-hierarchy",
        dest="qupath_hierarchy",
        action="store_false",
        help="do not write qupath.geojson.gz, the QuPath (>= 0.4) file whose region annotations hold their nuclei as "
        "child objects (one drag-and-drop gives the hierarchy); it costs about as much time and space as "
        "nuclei.geojson.gz",
    )
    p.add_argument(
        "--strict-ownership",
        action="store_true",
        help="fail if a nucleus is larger than the halo instead of keeping it cut",
    )
    p.add_argument(
        "--min-class-prob",
        type=float_range(0.0, 1.0),
        default=None,
        help='nuclei whose class probability is below this are written without a class ("Nucleus"), 0 to 1; '
        "0 keeps every class (default: the model's threshold, calibrated on the validation split: below it "
        "classes were more often wrong than right; 'wsi-nuclei models' shows it)",
    )
    p.add_argument(
        "--keep-work",
        action="store_true",
        help="keep the per-batch part files (<out>/.work) after success",
    )
    p.add_argument(
        "--no-report",
        action="store_true",
        help="do not write report.html (the visual QC page: thumbnail with regions, density map, overlay crops, "
        "per-region charts, QC figures; it takes a few seconds). 'wsi-nuclei report OUT' writes it later",
    )
    p.add_argument(
        "--anndata",
        action="store_true",
        help="also write nuclei.h5ad for scanpy/squidpy: obs = one row per nucleus "
        "(class, class probability, morphology, region), obsm['spatial'] = centroids in um; needs the optional "
        "anndata package (pip install 'wsi-nuclei[anndata]')",
    )
    p.add_argument(
        "--quiet",
        "-q",
        action="store_true",
        help="no progress lines on stderr and no final report (errors and warnings are still shown)",
    )


def _run_config(args: argparse.Namespace, slide: str | None, out: str | None):  # type: ignore[no-untyped-def]
    from ..pipeline import RunConfig

    return RunConfig(
        slide=slide,
        out=out,
        model=args.model,
        weights=args.weights,
        device=args.device,
        tta=args.tta,
        precision=args.precision,
        backend=args.backend,
        mpp=args.mpp,
        regions=args.regions,
        tissue=args.tissue,
        halo=args.halo,
        block_size=args.block_size,
        batch_size=args.batch_size,
        max_in_flight=args.max_in_flight,
        infer_chunk=args.infer_chunk,
        scheduler=args.scheduler,
        workers=args.workers,
        threads=args.threads,
        overwrite=args.overwrite,
        geojson_plain=args.geojson_plain,
        qupath_hierarchy=args.qupath_hierarchy,
        strict_ownership=args.strict_ownership,
        quiet=args.quiet,
        keep_work=args.keep_work,
        min_class_prob=args.min_class_prob,
        report=not args.no_report,
        anndata=args.anndata,
    )

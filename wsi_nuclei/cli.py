"""Command-line interface: ``wsi-nuclei run | report | overlay | demo | summarize | models | train | evaluate``.

Every user error ends with one line ``wsi-nuclei: error: ...`` on stderr and the exit code of
its :class:`~wsi_nuclei.errors.WsiNucleiError` class (see ``wsi-nuclei --help``).
"""

from __future__ import annotations

import argparse
import os
import sys
import textwrap
from pathlib import Path

from . import __version__
from .errors import OwnershipError, WsiNucleiError

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
            raise argparse.ArgumentTypeError(f"{text} is out of range ({'above ' if lo_open else ''}{lo:g} to {hi:g})")
        return v

    parse.__name__ = "number"
    return parse


def _add_run_args(p: argparse.ArgumentParser) -> None:
    from .slide import BACKENDS, MPP_RANGE

    p.add_argument("slides", nargs="+", metavar="SLIDE",
                   help="whole-slide image (any format OpenSlide/tiffslide read, DICOM WSI) or a plain PNG/JPEG/TIFF with --mpp; "
                   "several slides, a folder (the slides directly inside it, by extension; a MIRAX .mrxs with its data folder "
                   "counts once) or a quoted glob pattern ('slides/*.svs', '**' recurses) make a cohort run: one output folder per "
                   "slide under --out, named by the slide stem (equal stems get -1, -2, ... in path order), the model loaded once, "
                   "a failing slide reported in one line and the others continued, a finished slide skipped when the command is "
                   "rerun, and <out>/cohort.csv at the end")
    p.add_argument("--out", "-o", help="output folder (default: ./wsi-nuclei-out/<slide stem>/); for a cohort run the folder "
                   "that receives one folder per slide and cohort.csv (default: ./wsi-nuclei-out/)")
    p.add_argument("--model", "-m", default=None, help="model name from 'wsi-nuclei models' (default: the bundled trained model; 'classic' without weights)")
    p.add_argument("--weights", help="weights file for the model (e.g. the official HoVer-Net PanNuke checkpoint)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="inference device (default: auto = cuda when available)")
    p.add_argument("--tta", action="store_true", help="flip test-time augmentation: average the network maps over 4 "
                                                      "flips of each tile (about 4x slower, slightly more accurate; "
                                                      "network models only)")
    p.add_argument("--backend", default="auto", choices=["auto", *BACKENDS],
                   help="slide reader; when the chosen one cannot open the file the others are tried (default: auto)")
    p.add_argument("--mpp", type=float_range(*MPP_RANGE), help=f"microns per pixel at level 0, {MPP_RANGE[0]:g} to {MPP_RANGE[1]:g}; overrides the "
                                                               "file's value (required when the file has none)")
    p.add_argument("--regions", help="QuPath GeoJSON annotations (export): process only inside them and summarise per annotation")
    p.add_argument("--tissue", default="auto", choices=["auto", "none"],
                   help="auto: detect tissue on a thumbnail and skip tiles without tissue; none: process the whole image as one region (default: auto)")
    p.add_argument("--block-size", type=int_range(64, 16384), default=1024, help="post-processing block size in model px: the blended network maps are "
                   "post-processed in blocks of this size, each read with --halo around it (default: %(default)s)")
    p.add_argument("--halo", type=int_range(0, 1024), help="block halo in model px: must exceed the largest nucleus radius plus the post-processing's "
                   "reach (default: the model's, 96)")
    p.add_argument("--batch-size", type=int_range(1, 1024), default=16, help="network patches per inference batch, 1 to 1024 (default: 16)")
    p.add_argument("--max-in-flight", type=int_range(1, 64), default=4, help="batches in flight at once, 1 to 64; bounds memory (default: 4)")
    p.add_argument("--infer-chunk", type=int_range(1, 1024), default=None,
                   help="patches per network call, 1 to 1024: each batch runs in chunks of this size, one call at a time, "
                        "which bounds the network's working memory (the batches themselves are unchanged) "
                        "(default: 2 on the CPU, the whole batch on CUDA)")
    p.add_argument("--scheduler", help="address of an existing dask.distributed scheduler (tcp://host:port); default: local, in-process")
    p.add_argument("--workers", type=int_range(1, 256), default=1, help="local Dask worker processes, 1 to 256; 1 = in-process threads (default: 1)")
    p.add_argument("--threads", type=int_range(1, 256), default=2, help="threads per local worker, 1 to 256 (default: 2)")
    p.add_argument("--overwrite", action="store_true", help="replace existing results in the output folder (a cohort "
                                                            "run redoes every slide instead of skipping finished ones)")
    p.add_argument("--geojson-plain", action="store_true", help="write nuclei.geojson and qupath.geojson (uncompressed) instead of the .geojson.gz files")
    p.add_argument("--no-qupath-hierarchy", dest="qupath_hierarchy", action="store_false",
                   help="do not write qupath.geojson.gz, the QuPath (>= 0.4) file whose region annotations hold their nuclei as "
                        "child objects (one drag-and-drop gives the hierarchy); it costs about as much time and space as "
                        "nuclei.geojson.gz")
    p.add_argument("--strict-ownership", action="store_true", help="fail if a nucleus is larger than the halo instead of keeping it cut")
    p.add_argument("--min-class-prob", type=float_range(0.0, 1.0), default=None,
                   help="nuclei whose class probability is below this are written without a class (\"Nucleus\"), 0 to 1; "
                        "0 keeps every class (default: the model's threshold, calibrated on the validation split: below it "
                        "classes were more often wrong than right; 'wsi-nuclei models' shows it)")
    p.add_argument("--keep-work", action="store_true", help="keep the per-batch part files (<out>/.work) after success")
    p.add_argument("--no-report", action="store_true",
                   help="do not write report.html (the visual QC page: thumbnail with regions, density map, overlay crops, "
                   "per-region charts, QC figures; it takes a few seconds). 'wsi-nuclei report OUT' writes it later")
    p.add_argument("--anndata", action="store_true", help="also write nuclei.h5ad for scanpy/squidpy: obs = one row per nucleus "
                   "(class, class probability, morphology, region), obsm['spatial'] = centroids in um; needs the optional "
                   "anndata package (pip install 'wsi-nuclei[anndata]')")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress lines on stderr and no final report (errors and warnings are still shown)")


def _run_config(args: argparse.Namespace, slide: str | None, out: str | None):  # type: ignore[no-untyped-def]
    from .pipeline import RunConfig

    return RunConfig(
        slide=slide, out=out, model=args.model, weights=args.weights, device=args.device, tta=args.tta,
        backend=args.backend, mpp=args.mpp, regions=args.regions, tissue=args.tissue, halo=args.halo, block_size=args.block_size,
        batch_size=args.batch_size, max_in_flight=args.max_in_flight, infer_chunk=args.infer_chunk, scheduler=args.scheduler,
        workers=args.workers, threads=args.threads,
        overwrite=args.overwrite, geojson_plain=args.geojson_plain, qupath_hierarchy=args.qupath_hierarchy,
        strict_ownership=args.strict_ownership,
        quiet=args.quiet, keep_work=args.keep_work, min_class_prob=args.min_class_prob, report=not args.no_report,
        anndata=args.anndata,
    )


def _plural(n: int, word: str) -> str:
    """``"1 slide"``, ``"2 slides"``."""
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _cmd_run(args: argparse.Namespace) -> int:
    from .cohort import expand_inputs

    slides, cohort = expand_inputs(args.slides)  # a missing path: one line, exit 2, before anything runs
    if args.anndata:
        from .anndata_export import require_anndata

        require_anndata()
    if not cohort:
        from .pipeline import run

        res = run(_run_config(args, args.slides[0], args.out))
        if not args.quiet:
            _report(res)
        return 0
    return _run_cohort(args, slides)


def _run_cohort(args: argparse.Namespace, slides: list[Path]) -> int:
    from .cohort import run_cohort
    from .errors import WsiNucleiError as _Error

    if args.regions:
        raise _Error(f"--regions describes one slide; it cannot be used with {len(slides)} slides (run them one by one)")
    root = Path(args.out) if args.out else Path("wsi-nuclei-out")

    def report(res) -> None:  # type: ignore[no-untyped-def]
        if not args.quiet:
            print(f"  {res.manifest['slide_name']}: {res.n_nuclei} {'nucleus' if res.n_nuclei == 1 else 'nuclei'} "
                  f"in {res.seconds['total']:.1f} s -> {res.out_dir}/", flush=True)

    res = run_cohort(slides, root, _run_config(args, None, None), report=report)
    n = len(slides)
    if not args.quiet:
        parts = [f"{len(res.done)} done"] + ([f"{len(res.skipped)} finished earlier"] if res.skipped else []) \
            + ([f"{len(res.failed)} failed"] if res.failed else [])
        print(f"cohort: {_plural(n, 'slide')}: {', '.join(parts)} in {res.seconds:.1f} s"
              + (f"; table -> {res.table}" if res.table else ""))
    if res.failed:
        print(f"wsi-nuclei: error: {len(res.failed)} of {_plural(n, 'slide')} failed (see the lines above); "
              "rerun the same command to retry them, the finished ones are skipped", file=sys.stderr)
    return res.exit_code


def _density(n: int, area_mm2: float | None) -> str:
    return f"  {n / area_mm2:9.0f} per mm2" if area_mm2 else ""


def _report(res) -> None:  # type: ignore[no-untyped-def]
    m = res.manifest
    lines = [
        "",
        f"wsi-nuclei {__version__}: {m['slide_name']}",
        f"  model       {m['model']['name']} on {m['device']}",
        f"  resolution  {m['resolution']['mpp']:.4f} um/px ({m['resolution']['mpp_source']}), level {m['resolution'].get('level', 0)}, "
        f"scale x{m['resolution']['scale_level0_to_model']:.3f} to {m['model']['mpp']} um/px",
        f"  patches     {m['qc']['patches_planned']} of {res.patches_total} ({m['qc']['passes_per_pixel']:.2f} network passes per pixel), "
        f"{m['qc']['blocks_processed']} blocks",
        f"  seams       {m['qc']['seam_candidates']} candidates: {m['qc']['seam_duplicates_removed']} duplicates removed, "
        f"{m['qc']['seam_trimmed']} trimmed",
        f"  tissue      {m['qc'].get('tissue_area_mm2', 0):.3f} mm2 analysed",
        f"  nuclei      {res.n_nuclei}" + _density(res.n_nuclei, m["qc"].get("tissue_area_mm2")),
    ]
    for name, n in sorted(res.counts.items(), key=lambda kv: (-kv[1], kv[0])):
        pct = 100 * n / max(1, res.n_nuclei)
        label = "no class" if name == "Nucleus" and m.get("classes", {}).get("support") else name
        lines.append(f"    {label:<14}{n:>9}  {pct:5.1f}%" + _density(n, m["qc"].get("tissue_area_mm2")))
    for name in m.get("classes", {}).get("not_measured", []):
        lines.append(f"    {name:<14}{'-':>9}  not measured (the model was never trained to produce it)")
    if m.get("reliability_note"):
        lines.extend(textwrap.wrap(m["reliability_note"], 96, initial_indent="  classes     ", subsequent_indent="              "))
    lines.append(f"  time        {res.seconds['total']:.1f} s (inference and post-processing {res.seconds['execute']:.1f} s)")
    for w in m.get("warnings", []):
        lines.append(f"  warning     {w}")
    lines.append(f"  files in    {res.out_dir}/")
    for n, p in res.files.items():
        lines.append(f"    {p.name}")
    print("\n".join(lines))


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(out=args.out, size=args.size, model=args.model, overwrite=args.overwrite, quiet=args.quiet)


def _cmd_summarize(args: argparse.Namespace) -> int:
    from .errors import OutputError as _OutputError
    from .summary import duplicate_slides, find_run_dirs, summarize_runs

    output = Path(args.output)
    if output.exists() and not args.overwrite:
        raise _OutputError(f"{output} already exists; use --overwrite to replace it")
    dirs = find_run_dirs(args.dirs)
    table = summarize_runs(dirs, output)
    for warning in duplicate_slides(dirs):
        print(f"wsi-nuclei: warning: {warning}", file=sys.stderr)
    print(f"{_plural(len(table), 'row')} ({_plural(table['slide_name'].nunique(), 'slide')}, {_plural(len(dirs), 'run')}) -> {output}")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from .report import write_report

    path = write_report(args.run_dir, slide_path=args.slide, n_random=args.crops, seed=args.seed)
    print(path)
    return 0


def _cmd_overlay(args: argparse.Namespace) -> int:
    from .report import write_overlay

    w, h = (args.size[0], args.size[-1])
    path = write_overlay(args.run_dir, args.x, args.y, w, h, args.output, slide_path=args.slide, line_width=args.line_width)
    print(path)
    return 0


def _cmd_models(args: argparse.Namespace) -> int:
    from .models import get_spec, list_models, weights_status

    if args.action == "fetch":
        from .models.fetch import default_cache_dir, fetch_weights
        from .errors import ModelError

        spec = get_spec(args.name)
        if not spec.needs_weights:
            print(f"{spec.name}: needs no weights")
            return 0
        if spec.bundled and weights_status(spec).startswith("bundled"):
            print(f"{spec.name}: weights are bundled with the package; nothing to fetch")
            return 0
        if not spec.url:
            raise ModelError(f"{spec.name}: no public download location is recorded; place {spec.weights_file} in {default_cache_dir()} or pass --weights PATH")
        dest = default_cache_dir() / spec.weights_file  # type: ignore[operator]
        fetch_weights(spec.url, dest, spec.sha256)  # type: ignore[arg-type]
        print(f"{spec.name}: weights saved to {dest}")
        return 0
    for spec in list_models():
        classes = ", ".join(spec.class_names.values()) if spec.class_names else "none (nuclei only)"
        print(f"{spec.name}")
        print(textwrap.fill(spec.description, 96, initial_indent="    ", subsequent_indent="    "))
        print(f"    licence:    {spec.licence}")
        print(f"    resolution: {spec.mpp} um/px, input {spec.input_size} px, output {spec.output_size} px")
        print(f"    classes:    {classes}")
        if spec.class_support:
            print("    trained:    " + ", ".join(f"{c} {v}" for c, v in spec.class_support.items()))
        if spec.min_class_prob:
            print(f"    min class probability: {spec.min_class_prob:g} (calibrated; below it nuclei get no class)")
        print(f"    weights:    {weights_status(spec)}" + (f" (sha256 {spec.sha256[:16]}...)" if spec.sha256 else ""))
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from .train import train

    best = train(args)
    print(f"best weights: {best}")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from .eval.command import run_evaluate

    return run_evaluate(args)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``wsi-nuclei`` (all sub-commands)."""
    fmt = argparse.RawDescriptionHelpFormatter
    p = argparse.ArgumentParser(
        prog="wsi-nuclei", formatter_class=fmt,
        description="Segment and classify every nucleus in H&E whole-slide images (PanNuke classes: "
        "Neoplastic, Inflammatory, Connective, Dead, Epithelial) and write QuPath GeoJSON, GeoParquet and per-tissue summaries.",
        epilog=RESOLUTION_POLICY + "\n" + EXIT_CODES,
    )
    p.add_argument("--version", action="version", version=f"wsi-nuclei {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    pr = sub.add_parser("run", formatter_class=fmt, help="process one slide, or many (files, a folder, a glob)",
                        description="Process a slide: tissue detection, tiling at the model's resolution, inference, "
                        "exact stitching, and the outputs nuclei.geojson.gz, nuclei.parquet, tissue.geojson, summary.csv/json, run.json "
                        "and report.html (visual QC; --no-report skips it), and nuclei.h5ad with --anndata. Several slides, a folder "
                        "or a glob pattern make a cohort run: <out>/<slide stem>/ per slide and <out>/cohort.csv; its exit code is 0 "
                        "when every slide has results, else the failures' code when they share one, else 1.",
                        epilog=RESOLUTION_POLICY + "\n" + EXIT_CODES)
    _add_run_args(pr)
    pr.set_defaults(func=_cmd_run)

    pd_ = sub.add_parser("demo", formatter_class=fmt, help="make a synthetic slide with known nuclei and run the pipeline on it",
                         description="Generate a small synthetic H&E-like pyramidal TIFF with known nuclei (in code, no downloads), "
                         "run the full pipeline on it and compare the result with the known nuclei.")
    pd_.add_argument("--out", "-o", default="wsi-nuclei-demo", help="folder for the synthetic slide and the results (default: %(default)s)")
    pd_.add_argument("--size", type=int, default=2048, help="slide width and height in px at 0.25 um/px (default: %(default)s)")
    pd_.add_argument("--model", default="classic", help="model to run (default: %(default)s, which segments a drawn nucleus the same "
                     "way in every tile, so any miss or duplicate would be the engine's; --model wsi-nuclei-lite0 runs the bundled "
                     "network: recall and precision against the drawn nuclei, which are not real H&E, and the no-overlap check)")
    pd_.add_argument("--overwrite", action="store_true", help="replace an existing demo")
    pd_.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    pd_.set_defaults(func=_cmd_demo)

    ps = sub.add_parser("summarize", help="combine many runs into one cohort table (one row per slide x region)",
                        description="Combine the summary.json of many run folders into one CSV, one row per slide x region "
                        "plus one whole-slide row per run. A slide that appears in several runs with the same regions (same "
                        "fingerprint in run.json, e.g. a copy under another name) is flagged with a warning line.")
    ps.add_argument("dirs", nargs="+", metavar="DIR", help="run folders, or folders searched recursively for run folders "
                    "(a run folder holds run.json and summary.csv), e.g. the --out of a cohort run")
    ps.add_argument("--output", "-o", default="cohort.csv", help="cohort CSV to write (default: %(default)s); an existing file "
                    "is not replaced without --overwrite")
    ps.add_argument("--overwrite", action="store_true", help="replace an existing --output file")
    ps.set_defaults(func=_cmd_summarize)

    prp = sub.add_parser("report", help="(re)write report.html, the visual QC page of a finished run",
                         description="Render report.html into a finished run folder: slide thumbnail with the regions, "
                         "nucleus-density heat map, overlay crops at full resolution (the densest place and random places), "
                         "per-region charts of counts, fractions and densities per class, nucleus-size distributions, the QC "
                         "figures and every warning. One self-contained file (no network needed to view it); 'run' writes it "
                         "unless --no-report is given. Without the slide the page has no pictures.")
    prp.add_argument("run_dir", metavar="RUN_DIR", help="a finished run folder (run.json, summary.json, nuclei.parquet)")
    prp.add_argument("--slide", help="the slide file, when it is no longer where run.json says")
    prp.add_argument("--crops", type=int_range(0, 12), default=3, help="random overlay crops besides the densest, 0 to 12 (default: %(default)s)")
    prp.add_argument("--seed", type=int_range(0, 2**31 - 1), default=0, help="seed of the random crop places (default: %(default)s)")
    prp.set_defaults(func=_cmd_report)

    po = sub.add_parser("overlay", usage="wsi-nuclei overlay RUN_DIR --x X --y Y --size W [H] [-o PNG] [--slide SLIDE] [--line-width PX]",
                        help="draw the nuclei of a run over any region of its slide (PNG)",
                        description="Render a level-0 region of the slide with the run's nuclei outlined in their class colours "
                        "(the colours of the QuPath files: Neoplastic red, Inflammatory green, Connective blue, Dead yellow, "
                        "Epithelial orange, unclassified grey). Coordinates are level-0 pixels in the QuPath frame "
                        "(OpenSlide bounds subtracted), as in nuclei.parquet and the GeoJSON. The slide is the one recorded "
                        "in RUN_DIR/run.json (or --slide).")
    po.add_argument("run_dir", metavar="RUN_DIR", help="a finished run folder (run.json, summary.json, nuclei.parquet)")
    po.add_argument("--x", type=int_range(0, 10**9), required=True, help="left edge of the region, level-0 px")
    po.add_argument("--y", type=int_range(0, 10**9), required=True, help="top edge of the region, level-0 px")
    po.add_argument("--size", type=int_range(1, 100_000), nargs="+", required=True, metavar=("W", "H"),
                    help="width and height of the region in level-0 px (one number: a square); the region must lie inside the slide")
    po.add_argument("--output", "-o", metavar="PNG", help="PNG to write (default: RUN_DIR/overlay_x<X>_y<Y>_<W>x<H>.png)")
    po.add_argument("--slide", help="the slide file, when it is no longer where run.json says")
    po.add_argument("--line-width", type=int_range(1, 16), default=2, metavar="PX", help="outline width in px, 1 to 16 (default: %(default)s)")
    po.set_defaults(func=_cmd_overlay)

    pm = sub.add_parser("models", help="list models (licence, resolution, classes, weights) or fetch weights",
                        description="'wsi-nuclei models' lists every model; 'wsi-nuclei models fetch NAME' downloads its weights "
                        "(only when asked; fails with a clear message offline).")
    pm.add_argument("action", nargs="?", default="list", choices=["list", "fetch"], help="list (default) or fetch")
    pm.add_argument("name", nargs="?", help="model name for fetch")
    pm.set_defaults(func=_cmd_models)

    from .train.options import add_arguments as train_args

    pt = sub.add_parser("train", formatter_class=fmt, help="train the HoVer-Net-style model on annotated datasets",
                        description="Train the default network on datasets in the shared format or official PanNuke folds; "
                        "resumable (--resume), one validation line per epoch.")
    train_args(pt)
    pt.set_defaults(func=_cmd_train)

    from .eval.command import add_arguments as eval_args

    pe = sub.add_parser("evaluate", formatter_class=fmt, help="evaluate a model on an annotated dataset (PQ, mPQ, AJI, Dice, F1)",
                        description="Evaluate a model on a dataset (shared format or PanNuke fold): binary PQ/DQ/SQ, mPQ, AJI, Dice, "
                        "detection P/R/F1 (centroids within 12 px at 0.25 um/px) and per-class F1 as HoVer-Net defines it.")
    eval_args(pe)
    pe.set_defaults(func=_cmd_evaluate)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``wsi-nuclei`` console script."""
    import logging

    # the slide readers' own warnings about damaged files (e.g. tifffile's "incorrect
    # StripOffsets count") would add lines to the one-line error the user gets
    for name in ("tifffile", "tiffslide"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 0
    if args.command == "models" and args.action == "fetch" and not args.name:
        parser.error("models fetch needs a model name")
    if args.command == "overlay" and len(args.size) > 2:
        parser.error(f"argument --size: give W or W H, not {len(args.size)} numbers")
    if args.command == "run" and args.halo is not None and args.halo > args.block_size:
        parser.error(f"argument --halo: {args.halo} is larger than --block-size {args.block_size}")
    try:
        return int(args.func(args) or 0)
    except WsiNucleiError as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"wsi-nuclei: error: {msg}", file=sys.stderr)
        return exc.exit_code
    except OwnershipError as exc:  # --strict-ownership with a halo smaller than a nucleus
        print(f"wsi-nuclei: error: {str(exc).strip().splitlines()[0]}; raise --halo or drop --strict-ownership", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("wsi-nuclei: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into e.g. `head`, which closed early
        sys.stderr.close()
        return 0
    except Exception as exc:  # a bug: one line, the traceback on request
        if os.environ.get("WSI_NUCLEI_TRACEBACK"):
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        print(f"wsi-nuclei: internal error: {type(exc).__name__}: {first} (a bug; rerun with WSI_NUCLEI_TRACEBACK=1 "
              "for the traceback and report it)", file=sys.stderr)
        return INTERNAL_ERROR


if __name__ == "__main__":
    sys.exit(main())

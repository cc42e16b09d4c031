"""The parser (:func:`build_parser`) and the entry point (:func:`main`): errors of the package
become one line on stderr and their exit code; anything else is an internal error (exit 70).
"""

from __future__ import annotations

import argparse
import os
import sys

from .. import __version__
from ..errors import OwnershipError, WsiNucleiError, first_line
from ._args import EXIT_CODES, INTERNAL_ERROR, RESOLUTION_POLICY, _add_run_args, int_range
from ._commands import (
    _cmd_demo,
    _cmd_evaluate,
    _cmd_models,
    _cmd_overlay,
    _cmd_report,
    _cmd_run,
    _cmd_summarize,
    _cmd_train,
)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``wsi-nuclei`` (all sub-commands)."""
    fmt = argparse.RawDescriptionHelpFormatter
    p = argparse.ArgumentParser(
        prog="wsi-nuclei",
        formatter_class=fmt,
        description="Segment and classify every nucleus in H&E whole-slide images (PanNuke classes: "
        "Neoplastic, Inflammatory, Connective, Dead, Epithelial) and write QuPath GeoJSON, GeoParquet and per-tissue summaries.",
        epilog=RESOLUTION_POLICY + "\n" + EXIT_CODES,
    )
    p.add_argument("--version", action="version", version=f"wsi-nuclei {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    pr = sub.add_parser(
        "run",
        formatter_class=fmt,
        help="process one slide, or many (files, a folder, a glob)",
        description="Process a slide: tissue detection, tiling at the model's resolution, inference, "
        "exact stitching, and the outputs nuclei.geojson.gz, nuclei.parquet, tissue.geojson, summary.csv/json, run.json "
        "and report.html (visual QC; --no-report skips it), and nuclei.h5ad with --anndata. Several slides, a folder "
        "or a glob pattern make a cohort run: <out>/<slide stem>/ per slide and <out>/cohort.csv; its exit code is 0 "
        "when every slide has results, else the failures' code when they share one, else 1.",
        epilog=RESOLUTION_POLICY + "\n" + EXIT_CODES,
    )
    _add_run_args(pr)
    pr.set_defaults(func=_cmd_run)

    pd_ = sub.add_parser(
        "demo",
        formatter_class=fmt,
        help="make a synthetic slide with known nuclei and run the pipeline on it",
        description="Generate a small synthetic H&E-like pyramidal TIFF with known nuclei (in code, no downloads), "
        "run the full pipeline on it and compare the result with the known nuclei.",
    )
    pd_.add_argument(
        "--out",
        "-o",
        default="wsi-nuclei-demo",
        help="folder for the synthetic slide and the results (default: %(default)s)",
    )
    pd_.add_argument(
        "--size",
        type=int,
        default=2048,
        help="slide width and height in px at 0.25 um/px (default: %(default)s)",
    )
    pd_.add_argument(
        "--model",
        default="classic",
        help="model to run (default: %(default)s, which segments a drawn nucleus the same "
        "way in every tile, so any miss or duplicate would be the engine's; --model wsi-nuclei-lite0 runs the bundled "
        "network: recall and precision against the drawn nuclei, which are not real H&E, and the no-overlap check)",
    )
    pd_.add_argument("--overwrite", action="store_true", help="replace an existing demo")
    pd_.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    pd_.set_defaults(func=_cmd_demo)

    ps = sub.add_parser(
        "summarize",
        help="combine many runs into one cohort table (one row per slide x region)",
        description="Combine the summary.json of many run folders into one CSV, one row per slide x region "
        "plus one whole-slide row per run. A slide that appears in several runs with the same regions (same "
        "fingerprint in run.json, e.g. a copy under another name) is flagged with a warning line.",
    )
    ps.add_argument(
        "dirs",
        nargs="+",
        metavar="DIR",
        help="run folders, or folders searched recursively for run folders "
        "(a run folder holds run.json and summary.csv), e.g. the --out of a cohort run",
    )
    ps.add_argument(
        "--output",
        "-o",
        default="cohort.csv",
        help="cohort CSV to write (default: %(default)s); an existing file "
        "is not replaced without --overwrite",
    )
    ps.add_argument("--overwrite", action="store_true", help="replace an existing --output file")
    ps.set_defaults(func=_cmd_summarize)

    prp = sub.add_parser(
        "report",
        help="(re)write report.html, the visual QC page of a finished run",
        description="Render report.html into a finished run folder: slide thumbnail with the regions, "
        "nucleus-density heat map, overlay crops at full resolution (the densest place and random places), "
        "per-region charts of counts, fractions and densities per class, nucleus-size distributions, the QC "
        "figures and every warning. One self-contained file (no network needed to view it); 'run' writes it "
        "unless --no-report is given. Without the slide the page has no pictures.",
    )
    prp.add_argument(
        "run_dir",
        metavar="RUN_DIR",
        help="a finished run folder (run.json, summary.json, nuclei.parquet)",
    )
    prp.add_argument("--slide", help="the slide file, when it is no longer where run.json says")
    prp.add_argument(
        "--crops",
        type=int_range(0, 12),
        default=3,
        help="random overlay crops besides the densest, 0 to 12 (default: %(default)s)",
    )
    prp.add_argument(
        "--seed",
        type=int_range(0, 2**31 - 1),
        default=0,
        help="seed of the random crop places (default: %(default)s)",
    )
    prp.set_defaults(func=_cmd_report)

    po = sub.add_parser(
        "overlay",
        usage="wsi-nuclei overlay RUN_DIR --x X --y Y --size W [H] [-o PNG] [--slide SLIDE] [--line-width PX]",
        help="draw the nuclei of a run over any region of its slide (PNG)",
        description="Render a level-0 region of the slide with the run's nuclei outlined in their class colours "
        "(the colours of the QuPath files: Neoplastic red, Inflammatory green, Connective blue, Dead yellow, "
        "Epithelial orange, unclassified grey). Coordinates are level-0 pixels in the QuPath frame "
        "(OpenSlide bounds subtracted), as in nuclei.parquet and the GeoJSON. The slide is the one recorded "
        "in RUN_DIR/run.json (or --slide).",
    )
    po.add_argument(
        "run_dir",
        metavar="RUN_DIR",
        help="a finished run folder (run.json, summary.json, nuclei.parquet)",
    )
    po.add_argument(
        "--x", type=int_range(0, 10**9), required=True, help="left edge of the region, level-0 px"
    )
    po.add_argument(
        "--y", type=int_range(0, 10**9), required=True, help="top edge of the region, level-0 px"
    )
    po.add_argument(
        "--size",
        type=int_range(1, 100_000),
        nargs="+",
        required=True,
        metavar=("W", "H"),
        help="width and height of the region in level-0 px (one number: a square); the region must lie inside the slide",
    )
    po.add_argument(
        "--output",
        "-o",
        metavar="PNG",
        help="PNG to write (default: RUN_DIR/overlay_x<X>_y<Y>_<W>x<H>.png)",
    )
    po.add_argument("--slide", help="the slide file, when it is no longer where run.json says")
    po.add_argument(
        "--line-width",
        type=int_range(1, 16),
        default=2,
        metavar="PX",
        help="outline width in px, 1 to 16 (default: %(default)s)",
    )
    po.set_defaults(func=_cmd_overlay)

    pm = sub.add_parser(
        "models",
        help="list models (licence, resolution, classes, weights) or fetch weights",
        description="'wsi-nuclei models' lists every model; 'wsi-nuclei models fetch NAME' downloads its weights "
        "(only when asked; fails with a clear message offline).",
    )
    pm.add_argument(
        "action",
        nargs="?",
        default="list",
        choices=["list", "fetch"],
        help="list (default) or fetch",
    )
    pm.add_argument("name", nargs="?", help="model name for fetch")
    pm.set_defaults(func=_cmd_models)

    from ..train.options import add_arguments as train_args

    pt = sub.add_parser(
        "train",
        formatter_class=fmt,
        help="train the HoVer-Net-style model on annotated datasets",
        description="Train the default network on datasets in the shared format or official PanNuke folds; "
        "resumable (--resume), one validation line per epoch.",
    )
    train_args(pt)
    pt.set_defaults(func=_cmd_train)

    from ..eval.command import add_arguments as eval_args

    pe = sub.add_parser(
        "evaluate",
        formatter_class=fmt,
        help="evaluate a model on an annotated dataset (PQ, mPQ, AJI, Dice, F1)",
        description="Evaluate a model on a dataset (shared format or PanNuke fold): binary PQ/DQ/SQ, mPQ, AJI, Dice, "
        "detection P/R/F1 (centroids within 12 px at 0.25 um/px) and per-class F1 as HoVer-Net defines it.",
    )
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
        msg = first_line(exc)
        print(f"wsi-nuclei: error: {msg}", file=sys.stderr)
        return exc.exit_code
    except OwnershipError as exc:  # --strict-ownership with a halo smaller than a nucleus
        print(
            f"wsi-nuclei: error: {first_line(exc)}; raise --halo or drop --strict-ownership",
            file=sys.stderr,
        )
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
        print(
            f"wsi-nuclei: internal error: {type(exc).__name__}: {first_line(exc)} (a bug; rerun with WSI_NUCLEI_TRACEBACK=1 "
            "for the traceback and report it)",
            file=sys.stderr,
        )
        return INTERNAL_ERROR

"""The subcommands: each ``_cmd_*`` function takes the parsed arguments and returns the exit
code; heavy modules are imported inside them so that ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from pathlib import Path

from .. import __version__
from ._args import _run_config


def _plural(n: int, word: str) -> str:
    """``"1 slide"``, ``"2 slides"``."""
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _cmd_run(args: argparse.Namespace) -> int:
    from ..cohort import expand_inputs

    slides, cohort = expand_inputs(
        args.slides
    )  # a missing path: one line, exit 2, before anything runs
    if args.anndata:
        from ..anndata_export import require_anndata

        require_anndata()
    if not cohort:
        from ..pipeline import run

        res = run(_run_config(args, args.slides[0], args.out))
        if not args.quiet:
            _report(res)
        return 0
    return _run_cohort(args, slides)


def _run_cohort(args: argparse.Namespace, slides: list[Path]) -> int:
    from ..cohort import run_cohort
    from ..errors import WsiNucleiError as _Error

    if args.regions:
        raise _Error(
            f"--regions describes one slide; it cannot be used with {len(slides)} slides (run them one by one)"
        )
    root = Path(args.out) if args.out else Path("wsi-nuclei-out")

    def report(res) -> None:  # type: ignore[no-untyped-def]
        if not args.quiet:
            print(
                f"  {res.manifest['slide_name']}: {res.n_nuclei} {'nucleus' if res.n_nuclei == 1 else 'nuclei'} "
                f"in {res.seconds['total']:.1f} s -> {res.out_dir}/",
                flush=True,
            )

    res = run_cohort(slides, root, _run_config(args, None, None), report=report)
    n = len(slides)
    if not args.quiet:
        parts = (
            [f"{len(res.done)} done"]
            + ([f"{len(res.skipped)} finished earlier"] if res.skipped else [])
            + ([f"{len(res.failed)} failed"] if res.failed else [])
        )
        print(
            f"cohort: {_plural(n, 'slide')}: {', '.join(parts)} in {res.seconds:.1f} s"
            + (f"; table -> {res.table}" if res.table else "")
        )
    if res.failed:
        print(
            f"wsi-nuclei: error: {len(res.failed)} of {_plural(n, 'slide')} failed (see the lines above); "
            "rerun the same command to retry them, the finished ones are skipped",
            file=sys.stderr,
        )
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
        lines.append(
            f"    {label:<14}{n:>9}  {pct:5.1f}%" + _density(n, m["qc"].get("tissue_area_mm2"))
        )
    for name in m.get("classes", {}).get("not_measured", []):
        lines.append(
            f"    {name:<14}{'-':>9}  not measured (the model was never trained to produce it)"
        )
    if m.get("reliability_note"):
        lines.extend(
            textwrap.wrap(
                m["reliability_note"],
                96,
                initial_indent="  classes     ",
                subsequent_indent="              ",
            )
        )
    lines.append(
        f"  time        {res.seconds['total']:.1f} s (inference and post-processing {res.seconds['execute']:.1f} s)"
    )
    for w in m.get("warnings", []):
        lines.append(f"  warning     {w}")
    lines.append(f"  files in    {res.out_dir}/")
    for p in res.files.values():
        lines.append(f"    {p.name}")
    print("\n".join(lines))


def _cmd_demo(args: argparse.Namespace) -> int:
    from ..demo import run_demo

    return run_demo(
        out=args.out, size=args.size, model=args.model, overwrite=args.overwrite, quiet=args.quiet
    )


def _cmd_summarize(args: argparse.Namespace) -> int:
    from ..errors import OutputError as _OutputError
    from ..summary import duplicate_slides, find_run_dirs, summarize_runs

    output = Path(args.output)
    if output.exists() and not args.overwrite:
        raise _OutputError(f"{output} already exists; use --overwrite to replace it")
    dirs = find_run_dirs(args.dirs)
    table = summarize_runs(dirs, output)
    for warning in duplicate_slides(dirs):
        print(f"wsi-nuclei: warning: {warning}", file=sys.stderr)
    print(
        f"{_plural(len(table), 'row')} ({_plural(table['slide_name'].nunique(), 'slide')}, {_plural(len(dirs), 'run')}) -> {output}"
    )
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from ..report import write_report

    path = write_report(args.run_dir, slide_path=args.slide, n_random=args.crops, seed=args.seed)
    print(path)
    return 0


def _cmd_overlay(args: argparse.Namespace) -> int:
    from ..report import write_overlay

    w, h = (args.size[0], args.size[-1])
    path = write_overlay(
        args.run_dir,
        args.x,
        args.y,
        w,
        h,
        args.output,
        slide_path=args.slide,
        line_width=args.line_width,
    )
    print(path)
    return 0


def _cmd_models(args: argparse.Namespace) -> int:
    from ..models import get_spec, list_models, weights_status

    if args.action == "fetch":
        from ..errors import ModelError
        from ..models.fetch import default_cache_dir, fetch_weights

        spec = get_spec(args.name)
        if not spec.needs_weights:
            print(f"{spec.name}: needs no weights")
            return 0
        if spec.bundled and weights_status(spec).startswith("bundled"):
            print(f"{spec.name}: weights are bundled with the package; nothing to fetch")
            return 0
        if not spec.url:
            raise ModelError(
                f"{spec.name}: no public download location is recorded; place {spec.weights_file} in {default_cache_dir()} or pass --weights PATH"
            )
        dest = default_cache_dir() / spec.weights_file  # type: ignore[operator]
        fetch_weights(spec.url, dest, spec.sha256)  # type: ignore[arg-type]
        print(f"{spec.name}: weights saved to {dest}")
        return 0
    for spec in list_models():
        classes = ", ".join(spec.class_names.values()) if spec.class_names else "none (nuclei only)"
        print(f"{spec.name}")
        print(textwrap.fill(spec.description, 96, initial_indent="    ", subsequent_indent="    "))
        print(f"    licence:    {spec.licence}")
        print(
            f"    resolution: {spec.mpp} um/px, input {spec.input_size} px, output {spec.output_size} px"
        )
        if len(spec.precisions) > 1:
            auto = [
                *(["bf16 on CPUs with native bfloat16"] if spec.bf16_cpu else []),
                *(["fp16 on CUDA"] if spec.fp16 else []),
            ]
            print(
                f"    precision:  {', '.join(spec.precisions)} (auto: "
                + (", ".join(auto) + ", else fp32)" if auto else "fp32)")
                + ("; int8 on request (CPU)" if "int8" in spec.precisions else "")
            )
        print(f"    classes:    {classes}")
        if spec.class_support:
            print("    trained:    " + ", ".join(f"{c} {v}" for c, v in spec.class_support.items()))
        if spec.min_class_prob:
            print(
                f"    min class probability: {spec.min_class_prob:g} (calibrated; below it nuclei get no class)"
            )
        print(
            f"    weights:    {weights_status(spec)}"
            + (f" (sha256 {spec.sha256[:16]}...)" if spec.sha256 else "")
        )
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from ..train import train

    best = train(args)
    print(f"best weights: {best}")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from ..eval.command import run_evaluate

    return run_evaluate(args)

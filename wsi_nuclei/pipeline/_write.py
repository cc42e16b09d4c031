"""The write stage: the final parts streamed to GeoJSON, the QuPath hierarchy, GeoParquet,
AnnData, summaries and run.json, each atomic; the class-probability threshold applied once;
then report.html (a failure there is one warning).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from .. import __version__
from .._io import atomic_path
from .._progress import Progress
from ..schema import CLASS_NAMES, UNCLASSIFIED
from ..tiling import passes_per_pixel
from ._config import RunConfig, RunResult, _executor_description, qupath_name
from ._parts import load_part
from .plan import RunPlan, _Setup

if TYPE_CHECKING:
    from ..models import ModelSpec


def effective_min_class_prob(cfg: RunConfig, spec: ModelSpec) -> float:
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


def reliability_note(spec: ModelSpec, min_prob: float) -> str:
    """The plain-words note on the model's classes for this run (empty when unknown)."""
    from dataclasses import replace

    return replace(spec, min_class_prob=min_prob).reliability_note() if spec.class_names else ""


def _write_report(out: Path, slide: Any, warn: Any = None) -> Path | None:
    """report.html, written after run.json: a failure costs the page, never the run (one warning
    line, through ``warn`` (default: stderr); ``wsi-nuclei report`` renders it again)."""
    from ..report import write_report

    if warn is None:

        def warn(line: str) -> None:
            print(line, file=sys.stderr)

    try:
        return write_report(out, slide=slide)
    except Exception as exc:  # noqa: BLE001 - the results are complete; the page is an extra
        text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        warn(
            f"wsi-nuclei: warning: report.html not written ({type(exc).__name__}: {text}); "
            f"the results are complete; retry with 'wsi-nuclei report {out}'"
        )
        return None


def _write(
    cfg: RunConfig,
    plan: RunPlan,
    setup: _Setup,
    final_dir: Path,
    out: Path,
    names: list[str],
    st: dict,
    engine_stats: dict,
    seconds: dict[str, float],
    t0: float,
    done: set,
    progress: Progress | None = None,
) -> RunResult:
    """The write stage: every output file, one progress step each (summary.csv and .json are one)."""
    progress = progress if progress is not None else Progress(enabled=False)
    n_steps = 5 + int(cfg.anndata) + int(cfg.qupath_hierarchy) + int(cfg.report)
    with progress.stage("writing", total=n_steps, unit="file") as stage:
        result = _write_outputs(
            cfg, plan, setup, final_dir, out, names, st, engine_stats, seconds, t0, done, stage
        )
        stage.done(f"{len(result.files)} files in {out}/")
    return result


def _write_outputs(
    cfg: RunConfig,
    plan: RunPlan,
    setup: _Setup,
    final_dir: Path,
    out: Path,
    names: list[str],
    st: dict,
    engine_stats: dict,
    seconds: dict[str, float],
    t0: float,
    done: set,
    stage: Any,
) -> RunResult:
    """Stream the final parts into every output (GeoJSON, QuPath hierarchy, GeoParquet, AnnData,
    region annotations, summaries, run.json last), each atomic; the :class:`RunResult`."""
    from dataclasses import replace

    from ..export import (
        region_annotation_ids,
        write_nuclei_geojson,
        write_nuclei_parquet,
        write_qupath_geojson,
        write_regions_geojson,
    )
    from ..summary import RegionSummarizer, write_summary

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
    meta = {
        "slide": plan.slide_name,
        "fingerprint": plan.fingerprint,
        "model": plan.model,
        "frame": "level-0 px, OpenSlide bounds subtracted (QuPath frame)",
    }
    stage.begin_step(geojson_name)
    gstats = write_nuclei_geojson(
        frames(), out / geojson_name, gzip=not cfg.geojson_plain, metadata=meta
    )
    seconds["write_geojson"] = time.perf_counter() - t
    stage.begin_step("nuclei.parquet")
    t = time.perf_counter()
    write_nuclei_parquet(frames(), out / "nuclei.parquet", metadata=meta)
    seconds["write_parquet"] = time.perf_counter() - t
    if cfg.anndata:
        from ..anndata_export import write_anndata

        stage.begin_step("nuclei.h5ad")
        t = time.perf_counter()
        # the categories are the classes the model can output (not those it has no labels for);
        # "Nucleus" (unclassified, e.g. below --min-class-prob) is added when present
        spec = setup.spec
        classes = (
            [n for c, n in spec.class_names.items() if c not in spec.unsupported_class_ids]
            if spec.class_names
            else [UNCLASSIFIED]
        )
        write_anndata(
            out / "nuclei.parquet",
            out / "nuclei.h5ad",
            regions=regions,
            classes=classes,
            uns={
                "slide_name": plan.slide_name,
                "fingerprint": plan.fingerprint,
                "mpp": plan.slide_mpp,
                "model": plan.model,
                "model_sha256": plan.model_sha,
                "min_class_prob": min_prob,
                "reliability_note": reliability_note(spec, min_prob),
                "wsi_nuclei_version": __version__,
            },
        )
        seconds["write_anndata"] = time.perf_counter() - t
    stage.begin_step("summary.csv, summary.json")
    t = time.perf_counter()
    class_names = dict(CLASS_NAMES) if setup.spec.class_names else {0: "Nucleus"}
    not_measured = [CLASS_NAMES[c] for c in setup.spec.unsupported_class_ids if c in CLASS_NAMES]
    summ = RegionSummarizer(
        regions,
        class_names=class_names,
        mpp=plan.slide_mpp,
        slide_name=plan.slide_name,
        not_measured=not_measured,
    )
    counts: dict[str, int] = {}
    n_total = 0
    for f, meta_i in final_parts():
        summ.add(
            f,
            (
                np.asarray(meta_i["member_rows"], np.int64),
                np.asarray(meta_i["member_ids"], np.int64),
            ),
        )
        n_total += len(f)
        for k, v in f["class_name"].value_counts().items():
            counts[k] = counts.get(k, 0) + int(v)
    seconds["summaries"] = time.perf_counter() - t
    seconds["total"] = time.perf_counter() - t0
    pg, bg = plan.patches, plan.blocks
    passes = passes_per_pixel(plan.n_patches, pg.input_size, setup.area_model_px)
    qc = {
        "patches_total": len(pg),
        "patches_planned": plan.n_patches,
        "patches_run": int(engine_stats["n_patches"]),
        "passes_per_pixel": round(passes, 4),
        "tissue_area_mm2": round(setup.area_model_px * plan.model_mpp**2 / 1e6, 4),
        "blocks_total": len(bg),
        "blocks_processed": len(plan.active),
        "blocks_resumed": len(done),
        "mpp": plan.slide_mpp,
        "mpp_source": getattr(slide, "mpp_source", "synthetic"),
        "level": setup.sinfo.get("level", 0),
        "scale_factor": setup.sinfo.get("scale_factor", plan.scale),
        "model": plan.model,
        "model_sha256": plan.model_sha,
        "device": plan.device,
        "wsi_nuclei_version": __version__,
        "nuclei_found_in_blocks": st["n_found"],
        "nuclei_cut_at_window_border": st["n_cut_owned"],
        "seam_core_pieces": st["n_core_pieces"],
        "seam_candidates": st["seam_candidates"],
        "seam_kept": st["seam_kept"],
        "seam_trimmed": st["seam_trimmed"],
        "seam_duplicates_removed": st["seam_duplicates_removed"],
        "nuclei_outside_regions_removed": st["nuclei_outside_regions_removed"],
        "nuclei_near_region_edge_assigned": st["nuclei_near_region_edge_assigned"],
        "regions_overlapping": [list(p) for p in setup.overlaps],
        "peak_band_mb": round(engine_stats["peak_band_bytes"] / 2**20, 1),
        "oom_batch_splits": int(engine_stats.get("oom_batch_splits", 0)),
        "blocks_resubmitted_after_worker_loss": int(engine_stats.get("post_retries", 0)),
        **{f"seconds_{k}": round(v, 3) for k, v in seconds.items()},
        **{
            f"seconds_{k}_task_sum": round(engine_stats[f"t_{k}"], 3)
            for k in ("read", "infer", "post")
        },
    }
    qc["min_class_prob"] = min_prob
    # nuclei of a model with classes have class 0 ("Nucleus") only by the threshold
    qc["nuclei_unclassified_low_prob"] = (
        counts.get(UNCLASSIFIED, 0) if setup.spec.class_names else 0
    )
    warnings = []
    if setup.overlaps:
        warnings.append(
            f"{len(setup.overlaps)} pair(s) of regions overlap; nuclei in the overlap count in each region, once for the slide"
        )
    summary = summ.finalize(qc)
    write_summary(summary, out)
    stage.begin_step("tissue.geojson")
    write_regions_geojson(
        regions, summary, out / "tissue.geojson", slide_fingerprint=plan.fingerprint
    )
    qstats = None
    qname = qupath_name(cfg)
    stage.end_step()
    if cfg.qupath_hierarchy:
        stage.begin_step(qname)
        t = time.perf_counter()
        qstats = write_qupath_geojson(
            frames(),
            regions,
            summary,
            out / qname,
            slide_fingerprint=plan.fingerprint,
            gzip=not cfg.geojson_plain,
            metadata=meta,
            spill_dir=final_dir,
        )
        seconds["write_qupath"] = time.perf_counter() - t
    else:  # a hierarchy file of an earlier run (replaced with --overwrite) would no longer match
        (out / qname).unlink(missing_ok=True)

    spec = setup.spec
    manifest = {
        "wsi_nuclei_version": __version__,
        "slide": str(cfg.slide),
        "slide_name": plan.slide_name,
        "slide_path": setup.source[1]
        if isinstance(setup.source, tuple) and setup.source[0] == "path"
        else None,
        "backend": getattr(slide, "backend", "object"),
        "fingerprint": plan.fingerprint,
        "dimensions": list(slide.dimensions),
        "offset_bounds": list(getattr(slide, "offset", (0, 0))),
        "coordinate_frame": "level-0 pixels; OpenSlide bounds-x/y subtracted (the frame QuPath uses)",
        "resolution": {
            **setup.sinfo,
            "mpp": plan.slide_mpp,
            "mpp_source": getattr(slide, "mpp_source", None),
            "scale_level0_to_model": plan.scale,
        },
        "model": {
            "name": plan.model,
            "sha256": plan.model_sha,
            "weights": plan.weights,
            "tta": plan.tta,
            "licence": spec.licence,
            "mpp": spec.mpp,
            "input_size": spec.input_size,
            "output_size": spec.output_size,
            "precision": plan.precision,
            **(
                {"int8_calibration_sha256": plan.int8_calibration_sha}
                if plan.int8_calibration_sha
                else {}
            ),
            "postprocess_backend": "torch"
            if plan.postprocess.endswith(" backend=torch")
            else "numpy",
        },
        "tiling": {
            "patch_stride": pg.stride,
            "patch_border": pg.border,
            "patch_context": pg.context,
            "patches_x": pg.n_cols,
            "patches_y": pg.n_rows,
            "patches_planned": plan.n_patches,
            "passes_per_pixel": round(passes, 4),
            "block_size": bg.core,
            "halo": bg.halo,
            "blocks_x": bg.n_cols,
            "blocks_y": bg.n_rows,
            "strips": len(plan.strips),
            "batch_size": plan.batch_size,
            "infer_chunk": plan.infer_chunk or plan.batch_size,
            "blending": "smoothstep cross-fade over the patch overlap, patches in fixed order",
            "ownership": "exclusive core nuclei final; seam candidates resolved by priority "
            "(whole > cut, context, centroid owner, block order); no pixel twice",
        },
        "regions": {
            "source": "user (--regions)"
            if setup.user_regions
            else ("tissue detection" if cfg.tissue == "auto" else "whole slide"),
            "count": len(setup.regions),
            "tolerance_level0_px": setup.tolerance_px,
        },
        "device": plan.device,
        "scheduler": _executor_description(cfg),
        "qc": qc,
        "warnings": warnings,
        "n_nuclei": n_total,
        "counts": counts,
        "geojson": gstats,
        "classes": {
            "support": dict(spec.class_support),
            "not_measured": not_measured,
            "min_class_prob": min_prob,
            "evidence": spec.class_evidence,
        },
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
    return RunResult(
        out, files, n_total, counts, len(pg), int(engine_stats["n_patches"]), seconds, manifest
    )

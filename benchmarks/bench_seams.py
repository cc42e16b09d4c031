"""Seam figures on a real slide with the bundled model: overlaps, loss against a whole-region
reference, tiling invariance, ROI vs slide, network passes, tissue-edge losses.

Runs ``wsi-nuclei run`` (through :func:`wsi_nuclei.pipeline.run`) a few times on
CMU-1-Small-Region.svs and prints one JSON document with every figure:

* ``overlaps``: pairs of output nucleus polygons intersecting by more than 1 px² (level 0);
* ``reference``: the same blended maps (the run's own patches and batches) over a
  2048 x 2048 model-px region that crosses block seams, post-processed as one image; its
  interior nuclei are matched (IoU) to the run's output: lost = reference nuclei covered less
  than half by output nuclei;
* ``invariance``: the default run against one with another block size, halo and batch size;
* ``roi``: a 1024 x 1024 level-0 crop at (1000, 1500) saved as PNG and run with
  ``--mpp <slide mpp> --tissue none``, against the slide run, in the crop's interior (60 px);
  ``roi_grid_aligned``: a model-resolution crop whose origin lies on the patch grid, in the
  crop's interior (120 model px, and one patch: beyond it the crop's patches are the slide's);
  ``network_shift_variance``: how much the network's foreground changes when the same image
  is shifted by 1 or 32 px (what makes an unaligned crop differ);
  ``network_input_sensitivity_1_grey_level``: how far one grey level on one pixel moves the
  maps of a patch, in float32 and bfloat16;
* ``passes_per_pixel`` and wall time of the default run; tissue-edge assignment counts.

Usage::

    python benchmarks/bench_seams.py [--slide PATH] [--work DIR] [--model NAME] [--precision P] [--classic]

``--work`` keeps the runs (reused when present); ``--classic`` adds the tissue-edge figures
of the ``classic`` model.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SLIDE = REPO.parent / "shared" / "data" / "wsi" / "CMU-1-Small-Region.svs"


def match_iou(a: list, b: list) -> np.ndarray:
    """For each polygon of ``a``, its IoU with the best partner in ``b`` (one-to-one, greedy by IoU)."""
    import shapely

    a_arr, b_arr = np.asarray(a, object), np.asarray(b, object)
    best = np.zeros(len(a))
    if not len(a) or not len(b):
        return best
    ia, ib = shapely.STRtree(b_arr).query(a_arr, predicate="intersects")
    if not len(ia):
        return best
    inter = shapely.area(shapely.intersection(a_arr[ia], b_arr[ib]))
    union = shapely.area(a_arr[ia]) + shapely.area(b_arr[ib]) - inter
    iou = inter / np.maximum(union, 1e-12)
    used_a, used_b = set(), set()
    for k in np.argsort(-iou, kind="stable"):
        i, j = int(ia[k]), int(ib[k])
        if i in used_a or j in used_b:
            continue
        used_a.add(i)
        used_b.add(j)
        best[i] = iou[k]
    return best


def coverage(a: list, b: list) -> np.ndarray:
    """Fraction of each polygon of ``a`` covered by the union of the polygons of ``b``."""
    import shapely

    a_arr, b_arr = np.asarray(a, object), np.asarray(b, object)
    out = np.zeros(len(a))
    if not len(a) or not len(b):
        return out
    ia, ib = shapely.STRtree(b_arr).query(a_arr, predicate="intersects")
    inter = shapely.area(shapely.intersection(a_arr[ia], b_arr[ib]))
    np.add.at(out, ia, inter)
    return np.minimum(1.0, out / np.maximum(shapely.area(a_arr), 1e-12))


def overlaps(geoms: list, min_area: float = 1.0) -> dict:
    """Pairs of distinct polygons intersecting by more than ``min_area`` (px²)."""
    import shapely

    from wsi_nuclei.stitching import polygon_overlaps

    g = np.asarray(geoms, object)
    a, b, inter = polygon_overlaps(g)
    big = inter > min_area
    ratio = inter / np.minimum(shapely.area(g[a]), shapely.area(g[b])) if len(a) else np.zeros(0)
    return {
        "pairs_over_1px2": int(big.sum()),
        "pairs_touching": int(len(a)),
        "largest_px2": float(inter.max()) if len(inter) else 0.0,
        "largest_fraction_of_smaller": float(ratio.max()) if len(ratio) else 0.0,
    }


def _run(slide: str | Path, out: Path, **kw) -> dict:
    from wsi_nuclei.pipeline import RunConfig, run

    if (out / "run.json").is_file():
        return json.loads((out / "run.json").read_text())
    t = time.perf_counter()
    res = run(RunConfig(slide=str(slide), out=out, quiet=True, overwrite=True, **kw))
    m = res.manifest
    m["wall_s"] = time.perf_counter() - t
    (out / "run.json").write_text(json.dumps(m, indent=1, default=str))
    return m


def _nuclei(out: Path):
    import geopandas as gpd

    return gpd.read_parquet(out / "nuclei.parquet")


def reference(
    slide: Path, model: str | None, box_model: tuple[int, int, int, int], precision: str = "auto"
) -> list:
    """Polygons (level 0) of the run's blended maps over ``box_model`` post-processed as one image."""
    import shapely

    from wsi_nuclei.engine import MapBlender, fill_values, infer_patches, model_of, read_patches
    from wsi_nuclei.models import default_model_name, find_weights, get_spec
    from wsi_nuclei.pipeline import RunConfig, make_plan
    from wsi_nuclei.pipeline.plan import _context, _open
    from wsi_nuclei.postprocess import measure_instances

    cfg = RunConfig(slide=str(slide), model=model or default_model_name(), precision=precision)
    spec = get_spec(cfg.model)
    sl, source = _open(cfg)
    plan, setup = make_plan(cfg, spec, sl, source, slide.name, find_weights(spec), "cpu", None)
    ctx = _context(plan, setup, cfg)
    pg = plan.patches
    x0, y0, x1, y1 = box_model
    rows, cols = pg.covering(y0, y1, pg.n_rows), pg.covering(x0, x1, pg.n_cols)
    want = {(r, c) for r in rows for c in cols}
    # the run's own batches (identical numerics), each patch once, then row-major
    batches = [b for st in plan.strips for b in st.batches if want & set(b)]
    seen: set = set()
    blender = None
    outs = {}
    for b in batches:
        maps, layout, _, _, _ = infer_patches(ctx, read_patches(ctx, b))
        for p, m in zip(b, maps):
            if p in want and p not in seen:
                outs[p] = m
                seen.add(p)
    model = model_of(ctx)
    for p in sorted(outs):
        if blender is None:
            blender = MapBlender(pg, x0, x1, outs[p].shape[0], fill_values(model, layout))
        blender.add(p, outs[p])
    blender.finish()
    win = blender.window(box_model)
    raw, j = {}, 0
    for name, k, kind in layout:
        a = win[j : j + k].astype(np.float32)
        raw[name] = a if kind == 3 else a[0]
        j += k
    res = model.postprocess(raw, origin=(x0, y0))
    m = measure_instances(res.inst, res.labels, spec.mpp)
    s = 1.0 / plan.scale
    return [shapely.Polygon((p + (x0, y0)) * s) for p in m["polygon"] if p is not None]


def _input_sensitivity(slide: Path, model_name: str | None) -> dict:
    """How far one grey level on one input pixel moves the maps of one real 256-px patch, in
    float32 and (where the model and CPU have it) bfloat16: the size of the differences that
    resampling the same pixels from two different boxes can make."""
    from wsi_nuclei.models import cpu_has_native_bf16, default_model_name, get_spec, load_model
    from wsi_nuclei.slide import open_slide

    name = model_name or default_model_name()
    spec = get_spec(name)
    sl = open_slide(slide)
    s = sl.mpp / spec.mpp
    x, y, n = 2304, 3264, spec.input_size
    p = sl.read_scaled((x / s, y / s, (x + n) / s, (y + n) / s), (n, n), target_mpp=spec.mpp)
    q = p.copy()
    q[n // 2, n // 2, 0] = min(255, int(q[n // 2, n // 2, 0]) + 1)
    out = {}
    precs = ["fp32"] + (["bf16"] if "bf16" in spec.precisions and cpu_has_native_bf16() else [])
    for prec in precs:
        model = load_model(name, device="cpu", precision=prec)
        thr = model.spec.hv_params().np_threshold
        a, b = model.infer(np.stack([p, q]))
        out[prec] = {
            "max_abs_diff_np": float(np.abs(a["np"] - b["np"]).max()),
            "max_abs_diff_hv": float(np.abs(a["hv"] - b["hv"]).max()),
            "foreground_px_flipped": int(((a["np"] >= thr) != (b["np"] >= thr)).sum()),
        }
    return out


def _shift_variance(slide: Path, model_name: str | None, precision: str = "auto") -> dict:
    """Foreground IoU (np >= threshold) of the blended maps of one 1024 px model-resolution
    region and of the same region shifted by 1 and by 32 px (overlap only)."""
    from wsi_nuclei.inference import predict_maps
    from wsi_nuclei.models import default_model_name, load_model
    from wsi_nuclei.slide import open_slide

    model = load_model(model_name or default_model_name(), device="cpu", precision=precision)
    thr = model.spec.hv_params().np_threshold
    sl = open_slide(slide)
    s = sl.mpp / model.spec.mpp
    x0, y0, n = 2252, 3250, 1024
    out = {}
    ref = None
    for d in (0, 1, 32):
        img = sl.read_scaled(
            ((x0 + d) / s, (y0 + d) / s, (x0 + d + n) / s, (y0 + d + n) / s),
            (n, n),
            target_mpp=model.spec.mpp,
        )
        fg = predict_maps(model, img)["np"] >= thr
        if ref is None:
            ref = fg
            continue
        a, b = ref[d + 64 : n - 64, d + 64 : n - 64], fg[64 : n - 64 - d, 64 : n - 64 - d]
        out[f"fg_iou_shift_{d}px"] = float((a & b).sum() / max(1, (a | b).sum()))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--slide", default=str(DEFAULT_SLIDE))
    p.add_argument("--work", default=None, help="folder for the runs (default: a temporary one)")
    p.add_argument("--model", default=None)
    p.add_argument(
        "--precision",
        default="auto",
        help="network arithmetic of every run, as 'wsi-nuclei run --precision' (default auto)",
    )
    p.add_argument(
        "--classic", action="store_true", help="also the tissue-edge figures of the classic model"
    )
    args = p.parse_args(argv)
    import shapely

    slide = Path(args.slide)
    if not slide.is_file():
        print(f"bench_seams: {slide} not found", file=sys.stderr)
        return 2
    import tempfile

    work = Path(args.work or tempfile.mkdtemp(prefix="bench-seams-"))
    work.mkdir(parents=True, exist_ok=True)
    out: dict = {
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "slide": slide.name,
    }

    prec = {"precision": args.precision}
    base = _run(slide, work / "base", model=args.model, **prec)
    out["model"] = base["model"]["name"]
    out["default_run"] = {
        "wall_s": round(base.get("wall_s", float("nan")), 1),
        "n_nuclei": base["n_nuclei"],
        "passes_per_pixel": base["qc"]["passes_per_pixel"],
        "patches": base["qc"]["patches_planned"],
        "blocks": base["qc"]["blocks_processed"],
        "seam_candidates": base["qc"]["seam_candidates"],
        "seam_duplicates_removed": base["qc"]["seam_duplicates_removed"],
        "seam_trimmed": base["qc"]["seam_trimmed"],
        "nuclei_cut_at_window_border": base["qc"]["nuclei_cut_at_window_border"],
    }
    df = _nuclei(work / "base")
    geoms = list(df.geometry)
    out["overlaps"] = overlaps(geoms)

    # whole-region reference over a region crossing block seams
    scale = base["resolution"]["scale_level0_to_model"]
    box = (1536, 1536, 3584, 3584)
    ref = reference(slide, args.model, box)
    margin = 64
    ix0, iy0, ix1, iy1 = ((v + d) / scale for v, d in zip(box, (margin, margin, -margin, -margin)))
    inner = shapely.box(ix0, iy0, ix1, iy1)
    ref_in = [g for g in ref if inner.contains(g.centroid)]
    # nuclei the run leaves out because they lie outside every tissue region are a separate
    # figure (tissue_edge below): the reference is filtered by the same rule
    from wsi_nuclei.pipeline import TISSUE_TOLERANCE_THUMB_PX
    from wsi_nuclei.regions import region_membership
    from wsi_nuclei.slide import open_slide
    from wsi_nuclei.tissue import detect_tissue_on_slide

    with open_slide(slide) as s0:
        tm = detect_tissue_on_slide(s0, mpp=s0.mpp)
    cxy = np.array([[g.centroid.x, g.centroid.y] for g in ref_in]).reshape(-1, 2)
    mem = region_membership(
        cxy[:, 0],
        cxy[:, 1],
        tm.regions,
        tolerance=TISSUE_TOLERANCE_THUMB_PX * max(tm.downsample_xy),
    )
    n_outside_ref = int((mem.primary < 0).sum())
    ref_in = [g for g, p in zip(ref_in, mem.primary) if p >= 0]
    near = [g for g in geoms if shapely.box(*(v / scale for v in box)).intersects(g)]
    best = match_iou(ref_in, near)
    cov = coverage(ref_in, near)
    out["reference"] = {
        "box_model_px": list(box),
        "interior_margin_model_px": margin,
        "n_reference": len(ref_in),
        "matched_iou_0.5": float((best >= 0.5).mean()),
        "matched_iou_0.9": float((best >= 0.9).mean()),
        "lost": int((cov < 0.5).sum()),
        "reference_outside_tissue_regions": n_outside_ref,
    }

    # tiling invariance: another block size, halo and batch size
    var = _run(
        slide, work / "variant", model=args.model, block_size=768, halo=128, batch_size=8, **prec
    )
    dv = _nuclei(work / "variant")
    b1 = match_iou(geoms, list(dv.geometry))
    b2 = match_iou(list(dv.geometry), geoms)
    out["invariance"] = {
        "variant": "block 768, halo 128, batch 8",
        "n_default": len(df),
        "n_variant": len(dv),
        "default_matched_iou_0.9": float((b1 >= 0.9).mean()),
        "variant_matched_iou_0.9": float((b2 >= 0.9).mean()),
        "default_matched_iou_0.5": float((b1 >= 0.5).mean()),
        "same_ids": float(np.isin(df["id"].to_numpy(), dv["id"].to_numpy()).mean()),
        "wall_s": round(var.get("wall_s", float("nan")), 1),
    }

    # ROI vs slide
    from PIL import Image

    from wsi_nuclei.slide import open_slide

    sl = open_slide(slide)
    cx, cy, cs = 1000, 1500, 1024
    png = work / "crop.png"
    if not png.is_file():
        Image.fromarray(sl.read_region((cx, cy), 0, (cs, cs))).save(png)
    _run(png, work / "crop", model=args.model, mpp=float(sl.mpp), tissue="none", **prec)
    dc = _nuclei(work / "crop")
    crop_geoms = [shapely.affinity.translate(g, cx, cy) for g in dc.geometry]
    m = 60
    inner = shapely.box(cx + m, cy + m, cx + cs - m, cy + cs - m)
    slide_in = [g for g in geoms if inner.contains(g.centroid)]
    best = match_iou(slide_in, crop_geoms)
    out["roi"] = {
        "crop_level0": [cx, cy, cs, cs],
        "margin_px": m,
        "n_slide_interior": len(slide_in),
        "matched_iou_0.5": float((best >= 0.5).mean()),
        "matched_iou_0.9": float((best >= 0.9).mean()),
    }

    # the same with a crop on the network's patch grid: a model-resolution (0.25 um/px) crop
    # whose origin is a multiple of the patch stride sees the very patches the slide run saw
    stride = base["tiling"]["patch_stride"]
    X, Y, N = 10 * stride, 15 * stride, 2048
    png2 = work / "crop_aligned.png"
    if not png2.is_file():
        Image.fromarray(
            sl.read_scaled(
                (X / scale, Y / scale, (X + N) / scale, (Y + N) / scale), (N, N), target_mpp=0.25
            )
        ).save(png2)
    _run(png2, work / "crop_aligned", model=args.model, mpp=0.25, tissue="none", **prec)
    da = _nuclei(work / "crop_aligned")
    al_geoms = [
        shapely.affinity.affine_transform(g, [1 / scale, 0, 0, 1 / scale, X / scale, Y / scale])
        for g in da.geometry
    ]
    # interior margins: 120 model px (the figure of earlier sessions) and one patch (stride +
    # border): the crop's first row and column of patches start a border before the crop and see
    # white padding there where the slide run saw tissue, which changes the network's output over
    # the whole patch (its receptive field); beyond one patch the crop's patches are the slide's
    out["roi_grid_aligned"] = {"crop_model_px": [X, Y, N, N]}
    for m2 in (120, stride + base["tiling"]["patch_border"]):
        inner2 = shapely.box(
            (X + m2) / scale, (Y + m2) / scale, (X + N - m2) / scale, (Y + N - m2) / scale
        )
        slide_in2 = [g for g in geoms if inner2.contains(g.centroid)]
        best2 = match_iou(slide_in2, al_geoms)
        out["roi_grid_aligned"][f"margin_{m2}_model_px"] = {
            "n_slide_interior": len(slide_in2),
            "matched_iou_0.5": float((best2 >= 0.5).mean()),
            "matched_iou_0.9": float((best2 >= 0.9).mean()),
            "identical_iou_0.999": float((best2 >= 0.999).mean()),
        }

    # why an unaligned crop differs: the network is not shift-invariant (strided convolutions
    # alias): nucleus pixels of the same image shifted by 1 px and by 32 px
    out["network_shift_variance"] = _shift_variance(slide, args.model, args.precision)
    # and why a crop on the grid is not pixel-exact in bfloat16: one grey level on one pixel
    out["network_input_sensitivity_1_grey_level"] = _input_sensitivity(slide, args.model)

    out["tissue_edge"] = {
        args.model or "default": {
            "removed_outside_regions": base["qc"]["nuclei_outside_regions_removed"],
            "kept_by_edge_tolerance": base["qc"]["nuclei_near_region_edge_assigned"],
        }
    }
    if args.classic:
        cl = _run(slide, work / "classic", model="classic")
        out["tissue_edge"]["classic"] = {
            "n_nuclei": cl["n_nuclei"],
            "removed_outside_regions": cl["qc"]["nuclei_outside_regions_removed"],
            "kept_by_edge_tolerance": cl["qc"]["nuclei_near_region_edge_assigned"],
        }
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``report.html``: one self-contained page per run (see :mod:`wsi_nuclei.report`)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Final

import numpy as np

from .._io import atomic_path
from ..errors import InputNotFoundError, OutputError, UnsupportedSlideError
from ._charts import (
    _bar_chart,
    _class_table,
    _colorbar_svg,
    _density_map,
    _heat_image,
    _image_with_overlay,
    _legend,
    _size_chart,
    _thumbnail,
)
from ._format import _esc, _hex, _num, _png_uri, format_value
from ._run import _load_run, _open_slide, _read_nuclei, _regions, _Run
from .overlay import _overlay

__all__ = [
    "REPORT_NAME",
    "write_report",
]

#: File name of the report in the run folder.
REPORT_NAME: Final[str] = "report.html"

#: Nominal side of an overlay crop (µm) and its bounds in level-0 px.
_CROP_UM: Final[float] = 100.0

_CROP_PX_RANGE: Final[tuple[int, int]] = (160, 512)

#: Regions drawn as charts and tables (those with most nuclei); the rest are in summary.csv.
_MAX_REGIONS: Final[int] = 12


def _crop_px(run: _Run) -> int:
    lo, hi = _CROP_PX_RANGE
    w, h = run.dimensions
    return int(min(max(lo, round(_CROP_UM / run.mpp)), hi, w, h))


def _choose_crops(
    run: _Run, cx: np.ndarray, cy: np.ndarray, regions: list, n_random: int, seed: int
) -> list[dict]:
    """The densest crop (most centroids in a crop-sized window, on a quarter-crop grid) and up to
    ``n_random`` seeded random places inside the regions, not overlapping each other."""
    import shapely

    w, h = run.dimensions
    size = _crop_px(run)
    crops: list[dict] = []

    def clamp(x: float, y: float) -> tuple[int, int]:
        return int(min(max(0, round(x)), w - size)), int(min(max(0, round(y)), h - size))

    if len(cx):
        step = max(1, size // 4)
        nx, ny = math.ceil(w / step), math.ceil(h / step)
        grid = np.zeros((ny + 4, nx + 4), np.int64)
        np.add.at(
            grid,
            (
                np.minimum(cy // step, ny - 1).astype(int),
                np.minimum(cx // step, nx - 1).astype(int),
            ),
            1,
        )
        s = np.pad(grid.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
        win = s[4:, 4:] - s[:-4, 4:] - s[4:, :-4] + s[:-4, :-4]  # 4 x 4 bins from each bin
        r, c = np.unravel_index(int(np.argmax(win)), win.shape)
        x, y = clamp(c * step, r * step)
        crops.append({"label": "A", "kind": "densest", "x": x, "y": y, "w": size, "h": size})
    geoms = [g for _, g, _ in regions if g is not None and not g.is_empty]
    area = shapely.union_all(geoms) if geoms else shapely.box(0, 0, w, h)
    rng = np.random.default_rng(seed)
    bx0, by0, bx1, by1 = area.bounds
    pts = rng.uniform((bx0, by0), (max(bx1, bx0 + 1), max(by1, by0 + 1)), size=(2000, 2))
    pts = pts[shapely.contains_xy(area, pts[:, 0], pts[:, 1])]
    for px, py in pts:
        if len(crops) >= n_random + (1 if len(cx) else 0):
            break
        x, y = clamp(px - size / 2, py - size / 2)
        if all(abs(x - c["x"]) >= size or abs(y - c["y"]) >= size for c in crops):
            crops.append(
                {
                    "label": chr(ord("A") + len(crops)),
                    "kind": "random",
                    "x": x,
                    "y": y,
                    "w": size,
                    "h": size,
                }
            )
    return crops


def _region_block(path: str, region: dict[str, Any], classes: list) -> str:
    """Charts and the table of one region summary (``path`` = its place in summary.json)."""
    counts, fracs = region.get("counts") or {}, region.get("fractions") or {}
    dens, areas = region.get("density_per_mm2") or {}, region.get("area_um2") or {}
    name = region.get("region_name")
    title = (
        "Whole slide (union of the regions)"
        if path == "slide"
        else f"Region {region.get('region_id')}: {name}"
    )
    charts = "".join(
        [
            _bar_chart(
                "Count",
                [
                    (n, counts.get(n), _hex(c), format_value(counts.get(n), "count"))
                    for _, n, c in classes
                ],
                "",
            ),
            _bar_chart(
                "Fraction",
                [
                    (n, fracs.get(n), _hex(c), format_value(fracs.get(n), "fraction"))
                    for _, n, c in classes
                ],
                "",
            ),
            _bar_chart(
                "Density",
                [
                    (n, dens.get(n), _hex(c), format_value(dens.get(n), "density"))
                    for _, n, c in classes
                ],
                "per mm²",
            ),
        ]
    )
    head = (
        f"<p>Nuclei {_num(f'{path}.n_nuclei', region.get('n_nuclei'), 'count', 'span')} in "
        f"{_num(f'{path}.area_mm2', region.get('area_mm2'), 'area_mm2', 'span')} mm²: "
        f"{_num(f'{path}.density_per_mm2.total', dens.get('total'), 'density', 'span')} per mm²; "
        f"median nucleus area {_num(f'{path}.area_um2.all.median', (areas.get('all') or {}).get('median'), 'area_um2', 'span')} µm²"
    )
    if "n_nuclei_outside_regions" in region:
        head += (
            f"; nuclei outside every region (not counted): "
            f"{_num(f'{path}.n_nuclei_outside_regions', region.get('n_nuclei_outside_regions'), 'count', 'span')}"
        )
    head += "</p>"
    rows = []
    for _, n, c in classes:
        a = areas.get(n) or {}
        rows.append(
            f'<tr><th><span class="sw" style="background:{_hex(c)}"></span>{_esc(n)}</th>'
            f"{_num(f'{path}.counts.{n}', counts.get(n), 'count')}"
            f"{_num(f'{path}.fractions.{n}', fracs.get(n), 'fraction')}"
            f"{_num(f'{path}.density_per_mm2.{n}', dens.get(n), 'density')}"
            f"{_num(f'{path}.area_um2.{n}.median', a.get('median'), 'area_um2')}"
            f"{_num(f'{path}.area_um2.{n}.q25', a.get('q25'), 'area_um2')}"
            f"{_num(f'{path}.area_um2.{n}.q75', a.get('q75'), 'area_um2')}</tr>"
        )
    table = (
        '<table class="cls"><tr><th>class</th><th>count</th><th>fraction</th><th>per mm²</th>'
        "<th>area µm² median</th><th>q25</th><th>q75</th></tr>" + "".join(rows) + "</table>"
    )
    return f'<div class="region"><h3>{_esc(title)}</h3>{head}<div class="charts">{charts}</div>{table}</div>'


_CSS = """
body{font:14px/1.4 system-ui,-apple-system,'Segoe UI',Helvetica,Arial,sans-serif;margin:18px auto;max-width:1500px;color:#222;padding:0 14px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:18px;border-bottom:1px solid #ccc;padding-bottom:3px;margin-top:26px}
h3{font-size:15px;margin:14px 0 4px}.sub{color:#555;margin:0 0 10px}
.note{background:#fff4d6;border:1px solid #e0b040;border-left:6px solid #e0a000;padding:8px 12px;margin:10px 0;font-size:15px}
.warn{background:#fde8e8;border:1px solid #d08080;border-left:6px solid #c03030;padding:6px 12px;margin:6px 0}
.ok{color:#2a7a2a}.row{display:flex;flex-wrap:wrap;gap:18px;align-items:flex-start}
figure{margin:0}figcaption{font-size:12px;color:#444;max-width:520px}
.thumb{border:1px solid #999;max-width:100%;height:auto}.crop{border:1px solid #999;width:320px;height:auto;image-rendering:auto}
.lbl{font:bold 12px sans-serif;fill:#000;paint-order:stroke;stroke:#fff;stroke-width:3px}
svg text{font-size:11px;fill:#222}.ct{font-weight:600;font-size:12px}
.sw{display:inline-block;width:12px;height:12px;border:1px solid #555;margin-right:4px;vertical-align:-1px}
table{border-collapse:collapse;margin:6px 0;font-size:13px}td,th{border:1px solid #ccc;padding:2px 7px;text-align:left}
td.n{text-align:right;font-variant-numeric:tabular-nums}th{background:#f2f2f2;font-weight:600}
.charts{display:flex;flex-wrap:wrap;gap:10px}.region{border-top:1px dashed #ddd;margin-top:8px}
.qc td:first-child{font-family:ui-monospace,monospace;font-size:12px}.mono{font-family:ui-monospace,monospace;font-size:12px;word-break:break-all}
"""

#: QC keys by panel group (keys not listed go to "other").
_QC_GROUPS: Final[tuple[tuple[str, tuple[str, ...]], ...]] = (
    ("Resolution", ("mpp", "mpp_source", "level", "scale_factor")),
    (
        "Tiles and patches",
        (
            "patches_total",
            "patches_planned",
            "patches_run",
            "passes_per_pixel",
            "tissue_area_mm2",
            "blocks_total",
            "blocks_processed",
            "blocks_resumed",
        ),
    ),
    (
        "Seams and regions",
        (
            "nuclei_found_in_blocks",
            "nuclei_cut_at_window_border",
            "seam_core_pieces",
            "seam_candidates",
            "seam_kept",
            "seam_trimmed",
            "seam_duplicates_removed",
            "nuclei_outside_regions_removed",
            "nuclei_near_region_edge_assigned",
            "regions_overlapping",
        ),
    ),
    ("Model", ("model", "model_sha256", "device", "wsi_nuclei_version")),
    (
        "Memory and retries",
        ("peak_band_mb", "oom_batch_splits", "blocks_resubmitted_after_worker_loss"),
    ),
)


def _qc_panel(qc: dict[str, Any]) -> str:
    groups: dict[str, list[str]] = {g: [k for k in keys if k in qc] for g, keys in _QC_GROUPS}
    listed = {k for keys in groups.values() for k in keys}
    groups["Timings (s)"] = [k for k in qc if k.startswith("seconds_")]
    listed |= set(groups["Timings (s)"])
    groups["Other"] = [k for k in qc if k not in listed]
    parts = []
    for g, keys in groups.items():
        if not keys:
            continue
        rows = "".join(f"<tr><td>{_esc(k)}</td>{_num('qc.' + k, qc[k], 'raw')}</tr>" for k in keys)
        parts.append(f'<div><h3>{_esc(g)}</h3><table class="qc">{rows}</table></div>')
    return '<div class="row">' + "".join(parts) + "</div>"


def _page(run: _Run, pictures: str, crops_html: str, sizes: str, note: str | None) -> str:
    m, s = run.manifest, run.summary
    qc = s.get("qc") or {}
    model = m.get("model") or {}
    classes = _class_table(s)
    warnings = [str(w) for w in (m.get("warnings") or [])] + [
        str(w) for w in (s.get("warnings") or [])
    ]
    reliability = m.get("reliability_note")
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>wsi-nuclei report: {_esc(m.get('slide_name', s.get('slide_name', '')))}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>{_esc(m.get('slide_name', s.get('slide_name', '')))}</h1>",
        f'<p class="sub">wsi-nuclei {_esc(m.get("wsi_nuclei_version", ""))} &middot; model '
        f"<b>{_esc(model.get('name', qc.get('model', '')))}</b> on {_esc(m.get('device', ''))} &middot; "
        f"{_num('slide.n_nuclei', s['slide'].get('n_nuclei'), 'count', 'span')} nuclei &middot; level 0 "
        f"{run.dimensions[0]:,d} x {run.dimensions[1]:,d} px at {run.mpp:.4g} µm/px &middot; "
        f"coordinates: {_esc(m.get('coordinate_frame', 'level-0 px (QuPath frame)'))}</p>",
    ]
    if isinstance(reliability, str) and reliability.strip():
        out.append(
            f'<div class="note" id="reliability"><b>Reliability of the classes:</b> {_esc(reliability)}</div>'
        )
    if warnings:
        out.append("".join(f'<div class="warn"><b>Warning:</b> {_esc(w)}</div>' for w in warnings))
    else:
        out.append('<p class="ok">No warnings.</p>')
    if note:
        out.append(f'<div class="warn">{_esc(note)}</div>')
    out.append(f"<h2>Slide</h2>{pictures}")
    out.append(f"<h2>Overlays at full resolution</h2>{_legend(classes)}{crops_html}")
    regions = list(enumerate(s.get("regions") or []))
    shown = sorted(regions, key=lambda ir: (-(ir[1].get("n_nuclei") or 0), ir[0]))[:_MAX_REGIONS]
    shown.sort(key=lambda ir: ir[0])
    out.append("<h2>Regions</h2>")
    if len(regions) > len(shown):
        out.append(
            f"<p>{len(regions)} regions; the {len(shown)} with most nuclei are shown, every region is in summary.csv.</p>"
        )
    out.append(_region_block("slide", s["slide"], classes))
    out.extend(_region_block(f"regions.{i}", r, classes) for i, r in shown)
    out.append(f"<h2>Nucleus sizes</h2>{sizes}")
    out.append("<h2>Quality control</h2>" + _qc_panel(qc))
    res = m.get("resolution") or {}
    tiling = m.get("tiling") or {}
    facts = [
        ("slide", m.get("slide")),
        ("fingerprint", m.get("fingerprint")),
        ("reader", m.get("backend")),
        ("µm/px source", res.get("mpp_source")),
        ("level read", res.get("level")),
        ("scale level 0 -> model", res.get("scale_level0_to_model")),
        ("model sha256", model.get("sha256")),
        ("model licence", model.get("licence")),
        ("precision", model.get("precision")),
        ("test-time augmentation", model.get("tta")),
        ("blending", tiling.get("blending")),
        ("ownership", tiling.get("ownership")),
        ("regions", json.dumps(m.get("regions")) if m.get("regions") else None),
    ]
    rows = "".join(
        f'<tr><th>{_esc(k)}</th><td class="mono">{_esc(v)}</td></tr>'
        for k, v in facts
        if v is not None
    )
    out.append(f"<h3>Run</h3><table>{rows}</table>")
    out.append("</body></html>\n")
    return "\n".join(out)


def _pictures(run: _Run, slide: Any, n_random: int, seed: int) -> tuple[str, str, str]:
    """The slide section, the crops section and the size chart (HTML)."""
    t = _read_nuclei(run.folder, ["centroid_x", "centroid_y", "class_name", "area_um2"])
    cx = t.column("centroid_x").to_numpy().astype(float)
    cy = t.column("centroid_y").to_numpy().astype(float)
    areas = t.column("area_um2").to_numpy().astype(float)
    cls_names = np.asarray(t.column("class_name").to_pylist(), dtype=object)
    classes = _class_table(run.summary)
    sizes = _size_chart(areas, cls_names, classes)
    regions = _regions(run.folder)
    dm = _density_map(run, cx, cy)
    crops = _choose_crops(run, cx, cy, regions, n_random, seed)
    if slide is None:
        return (
            "<p>Slide pixels not available: thumbnail, density map and overlays are omitted.</p>",
            "<p>Slide pixels not available.</p>",
            sizes,
        )
    thumb = _thumbnail(slide)
    th, tw = thumb.shape[:2]
    left = _image_with_overlay(
        _png_uri(thumb), tw, th, run, regions, crops, "slide thumbnail with regions"
    )
    right = _image_with_overlay(
        _png_uri(_heat_image(thumb, dm, run)), tw, th, run, regions, [], "nucleus density map"
    )
    n_regions = len(regions)
    pictures = (
        f'<div class="row"><figure>{left}<figcaption>Thumbnail ({tw} x {th} px) with the {n_regions} analysed '
        f"region(s) outlined and the overlay crops (A = densest).</figcaption></figure>"
        f"<figure>{right}<figcaption>Nucleus density from the centroids in nuclei.parquet, binned on a "
        f"{dm.cell_um:g} µm grid (maximum {dm.density.max():,.0f} per mm²); uncoloured cells hold no "
        f"nuclei.</figcaption>{_colorbar_svg(dm.vmax, dm.cell_um)}</figure></div>"
    )
    figs = []
    for c in crops:
        rgb, n_in = _overlay(run, slide, c["x"], c["y"], c["w"], c["h"], line_width=2)
        what = "densest place" if c["kind"] == "densest" else "random place in the regions"
        figs.append(
            f'<figure><img class="crop" src="{_png_uri(rgb)}" width="{c["w"]}" height="{c["h"]}" '
            f'alt="crop {c["label"]}"><figcaption><b>{c["label"]}</b>: {what}; x={c["x"]}, y={c["y"]}, '
            f"{c['w']} x {c['h']} px ({c['w'] * run.mpp:.0f} µm), {n_in:,d} nuclei (centroids inside).<br>"
            f'<span class="mono">wsi-nuclei overlay RUN_DIR --x {c["x"]} --y {c["y"]} --size {c["w"]}</span>'
            f"</figcaption></figure>"
        )
    crops_html = f'<div class="row">{"".join(figs)}</div>' if figs else "<p>No place to show.</p>"
    return pictures, crops_html, sizes


def write_report(
    out_dir: str | Path,
    *,
    slide: Any = None,
    slide_path: str | Path | None = None,
    n_random: int = 3,
    seed: int = 0,
) -> Path:
    """Render ``report.html`` into a finished run folder (atomically).

    Parameters
    ----------
    out_dir : str or pathlib.Path
        The run folder (run.json, summary.json, nuclei.parquet, tissue.geojson).
    slide : Slide, optional
        The open slide of the run; otherwise it is opened from run.json's path (or
        ``slide_path``). When the slide cannot be found the page is written without the
        pictures, with a note saying so.
    slide_path : str or pathlib.Path, optional
        The slide file when it is no longer where run.json says (it must then exist).
    n_random : int
        Random overlay crops besides the densest.
    seed : int
        Seed of the random crop places.

    Returns
    -------
    pathlib.Path
        The path of ``report.html``.

    Raises
    ------
    InputNotFoundError
        The folder is not a finished run, or ``slide_path`` does not exist.
    WsiNucleiError
        A file of the run is malformed, or ``slide_path`` is another slide.
    OutputError
        The report cannot be written.
    """
    run = _load_run(out_dir)
    own = slide is None
    note = None
    if own:
        try:
            slide = _open_slide(run, slide_path)
        except (InputNotFoundError, UnsupportedSlideError) as exc:
            if slide_path is not None:
                raise
            slide, note = (
                None,
                f"{exc}: the pictures are omitted (rerun 'wsi-nuclei report' with --slide).",
            )
    try:
        pictures, crops_html, sizes = _pictures(run, slide, max(0, int(n_random)), int(seed))
    finally:
        if own and slide is not None:
            slide.close()
    page = _page(run, pictures, crops_html, sizes, note)
    path = run.folder / REPORT_NAME
    try:
        with atomic_path(path) as tmp:
            tmp.write_text(page, encoding="utf-8")
    except OSError as exc:
        raise OutputError(f"cannot write {path} ({exc.strerror or exc})") from None
    return path

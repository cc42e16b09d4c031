"""Visual quality control of a run: ``report.html`` and overlay images.

:func:`write_report` renders one self-contained HTML page into a run folder (images embedded as
base64 PNG, charts as inline SVG, inline CSS, no script and no network access):

* the slide thumbnail with the analysed regions (``tissue.geojson``) and the places of the
  overlay crops, and a nucleus-density heat map (nuclei per mm² of grid cell) with a colour bar;
* overlay crops at full resolution (level 0): the densest place and a few random places inside
  the regions (seeded: the same run gives the same crops), nuclei outlined in the class colours
  used in the QuPath files (:data:`wsi_nuclei.schema.CLASS_COLORS`);
* per region, bar charts and tables of counts, fractions and densities per class;
* nucleus-size (area µm²) distributions per class;
* the QC panel (resolution and its source, tiling, seam resolution, nuclei outside the regions,
  model and its sha256, timings) and every warning of the run.

Every number taken from ``summary.json`` sits in an element with ``data-key`` (its path in
``summary.json``, e.g. ``slide.counts.Neoplastic`` or ``regions.0.density_per_mm2.total``),
``data-value`` (the exact JSON value) and ``data-kind`` (the formatting rule of
:func:`format_value`), so that the page can be checked against the file.

:func:`render_overlay` / :func:`write_overlay` draw any level-0 rectangle of the slide with the
run's nuclei (``wsi-nuclei overlay``). Coordinates are level-0 pixels in the frame QuPath uses
(OpenSlide bounds subtracted), as in every output of the run.

The page holds nothing that is not in the run folder (no time stamp, no host name): rendering
the same run folder twice gives the same bytes.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np

from ._io import atomic_path
from .errors import InputNotFoundError, OutputError, UnsupportedSlideError, WsiNucleiError
from .schema import CLASS_COLORS, CLASS_NAMES, UNCLASSIFIED

__all__ = [
    "REPORT_NAME",
    "MAX_OVERLAY_PIXELS",
    "format_value",
    "open_run_slide",
    "render_overlay",
    "write_overlay",
    "write_report",
]

#: File name of the report in the run folder.
REPORT_NAME: Final[str] = "report.html"
#: Largest overlay :func:`render_overlay` draws (width x height, level-0 px).
MAX_OVERLAY_PIXELS: Final[int] = 100_000_000
#: Longest side of the thumbnail in the report (px).
_THUMB_PX: Final[int] = 720
#: Nominal side of an overlay crop (µm) and its bounds in level-0 px.
_CROP_UM: Final[float] = 100.0
_CROP_PX_RANGE: Final[tuple[int, int]] = (160, 512)
#: Grid cell sides (µm) the density map may use: the smallest giving at most _MAP_CELLS cells
#: along the slide's longest side.
_MAP_CELL_UM: Final[tuple[float, ...]] = (25, 50, 100, 200, 250, 500, 1000, 2000, 5000)
_MAP_CELLS: Final[int] = 64
#: Regions drawn as charts and tables (those with most nuclei); the rest are in summary.csv.
_MAX_REGIONS: Final[int] = 12
#: Colour stops of the density map (low -> high), RGB.
_MAP_STOPS: Final[tuple[tuple[int, int, int], ...]] = (
    (252, 251, 196), (250, 204, 92), (243, 130, 45), (205, 40, 40), (110, 8, 50),
)
_REGION_COLOR: Final[str] = "#00b7ff"


# --------------------------------------------------------------------------------------------
# formatting
# --------------------------------------------------------------------------------------------
def format_value(value: Any, kind: str) -> str:
    """The text shown on the page for a number of ``summary.json``.

    Parameters
    ----------
    value : int, float, str or None
        The value as it is in ``summary.json``.
    kind : {"count", "fraction", "density", "area_mm2", "area_um2", "raw"}
        ``count``: integer with thousands separators (``12,345``); ``fraction``: percent with
        one decimal (``0.1234`` -> ``12.3 %``); ``density``: nuclei per mm², one decimal with
        separators; ``area_mm2``: four decimals; ``area_um2``: one decimal; ``raw``: the JSON
        text of the value (QC figures, already rounded by the run).

    Returns
    -------
    str
        The text; ``n/a`` for None (an undefined figure).
    """
    if value is None:
        return "n/a"
    if kind == "raw" or isinstance(value, bool) or not isinstance(value, (int, float)):
        return value if isinstance(value, str) else json.dumps(value)
    if kind == "count":
        return f"{int(value):,d}"
    if kind == "fraction":
        return f"{100.0 * value:.1f} %"
    if kind == "density":
        return f"{value:,.1f}"
    if kind == "area_mm2":
        return f"{value:.4f}"
    if kind == "area_um2":
        return f"{value:.1f}"
    raise ValueError(f"unknown kind {kind!r}")


def _esc(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _num(summary_path: str, value: Any, kind: str, tag: str = "td") -> str:
    """An element showing one summary.json number, marked with its path and exact value."""
    return (f'<{tag} class="n" data-key="{_esc(summary_path)}" data-kind="{kind}" '
            f'data-value="{_esc(json.dumps(value))}">{_esc(format_value(value, kind))}</{tag}>')


def _hex(rgb: tuple[int, int, int] | list[int]) -> str:
    return "#{:02x}{:02x}{:02x}".format(*(int(c) for c in rgb[:3]))


def _png_uri(rgb: np.ndarray) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8)).save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


# --------------------------------------------------------------------------------------------
# the run folder
# --------------------------------------------------------------------------------------------
@dataclass
class _Run:
    """The files of a finished run that the report reads."""

    folder: Path
    manifest: dict[str, Any]
    summary: dict[str, Any]

    @property
    def mpp(self) -> float:
        return float(self.summary.get("mpp") or self.manifest["resolution"]["mpp"])

    @property
    def dimensions(self) -> tuple[int, int]:
        w, h = self.manifest["dimensions"]
        return int(w), int(h)


def _read_json(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        where = "no such folder" if not path.parent.exists() else f"no {path.name}"
        raise InputNotFoundError(f"{path.parent}: {where} ({what}; is it a finished wsi-nuclei run folder?)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise WsiNucleiError(f"{path}: not readable as JSON ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise WsiNucleiError(f"{path}: not a wsi-nuclei {path.name} (a JSON object was expected)")
    return data


def _load_run(run_dir: str | Path) -> _Run:
    folder = Path(run_dir)
    if not folder.is_dir():
        raise InputNotFoundError(f"{folder}: no such run folder")
    manifest = _read_json(folder / "run.json", "written last by 'wsi-nuclei run'")
    summary = _read_json(folder / "summary.json", "the run's summary")
    for key in ("dimensions", "resolution"):
        if key not in manifest:
            raise WsiNucleiError(f"{folder / 'run.json'}: no {key!r}; not a run.json of wsi-nuclei")
    if not isinstance(summary.get("slide"), dict):
        raise WsiNucleiError(f"{folder / 'summary.json'}: no 'slide' summary; not a summary.json of wsi-nuclei")
    if not (folder / "nuclei.parquet").is_file():
        raise InputNotFoundError(f"{folder}: no nuclei.parquet (is it a finished wsi-nuclei run folder?)")
    return _Run(folder, manifest, summary)


def _slide_location(run: _Run) -> Path | None:
    """The slide file a run processed: ``slide_path`` (absolute) or ``slide`` of run.json,
    the latter also relative to the run folder."""
    for key in ("slide_path", "slide"):
        text = run.manifest.get(key)
        if not text:
            continue
        p = Path(str(text))
        for cand in ([p] if p.is_absolute() else [p, run.folder / p]):
            if cand.is_file():
                return cand
    return None


def open_run_slide(run_dir: str | Path, slide_path: str | Path | None = None) -> Any:
    """Open the slide of a run (the one recorded in its run.json, or ``slide_path``).

    Parameters
    ----------
    run_dir : str or pathlib.Path
        A finished run folder.
    slide_path : str or pathlib.Path, optional
        The slide file, when it has moved since the run.

    Returns
    -------
    wsi_nuclei.slide.Slide
        The open slide (close it when done).

    Raises
    ------
    InputNotFoundError
        The run folder is incomplete, or the slide is not where run.json (or ``slide_path``)
        says.
    WsiNucleiError
        The file is another slide than the run's (its fingerprint differs).
    """
    return _open_slide(_load_run(run_dir), slide_path)


def _open_slide(run: _Run, slide_path: str | Path | None) -> Any:
    from .slide import BACKENDS, open_slide

    if slide_path is not None:
        path: Path | None = Path(slide_path)
        if not path.is_file():
            raise InputNotFoundError(f"{path}: no such slide file")
    else:
        path = _slide_location(run)
        if path is None:
            recorded = run.manifest.get("slide_path") or run.manifest.get("slide") or "nothing"
            raise InputNotFoundError(f"the slide of this run is not found (run.json records {recorded}); pass --slide PATH")
    backend = str(run.manifest.get("backend") or "auto")
    slide = open_slide(path, backend=backend if backend in BACKENDS else "auto",
                       require_mpp=False)
    want = run.manifest.get("fingerprint")
    if want and slide.fingerprint != want:
        slide.close()
        raise WsiNucleiError(f"{path}: not the slide of this run (fingerprint {slide.fingerprint[:12]}, run.json has {str(want)[:12]})")
    return slide


def _read_nuclei(folder: Path, columns: list[str], box: tuple[float, float, float, float] | None = None) -> Any:
    """Columns of nuclei.parquet (pyarrow Table), optionally only centroids within ``box``."""
    import pyarrow.parquet as pq

    filters = None
    if box is not None:
        x0, y0, x1, y1 = box
        filters = [("centroid_x", ">=", x0), ("centroid_x", "<", x1), ("centroid_y", ">=", y0), ("centroid_y", "<", y1)]
    try:
        return pq.read_table(folder / "nuclei.parquet", columns=columns, filters=filters)
    except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError
        raise WsiNucleiError(f"{folder / 'nuclei.parquet'}: not readable ({str(exc).splitlines()[0]})") from None


def _regions(folder: Path) -> list[tuple[str, Any, str]]:
    """``(name, geometry, colour)`` of the regions in tissue.geojson (empty when absent)."""
    import shapely.geometry

    path = folder / "tissue.geojson"
    if not path.is_file():
        return []
    try:
        feats = json.loads(path.read_text(encoding="utf-8")).get("features", [])
        out = []
        for f in feats:
            props = f.get("properties") or {}
            color = (props.get("classification") or {}).get("color")
            out.append((str(props.get("name", "")), shapely.geometry.shape(f["geometry"]),
                        _hex(color) if color else _REGION_COLOR))
        return out
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return []


# --------------------------------------------------------------------------------------------
# overlays
# --------------------------------------------------------------------------------------------
def _segment_pixels(xy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows and columns of the pixels that the closed polyline ``xy`` (pixel-centre coordinates)
    passes through: every edge sampled at least once per pixel step, then rounded."""
    a, b = xy[:-1], xy[1:]
    steps = np.maximum(1, np.ceil(np.abs(b - a).max(axis=1)).astype(np.int64))
    seg = np.repeat(np.arange(len(a)), steps)
    t = (np.arange(int(steps.sum())) - np.repeat(np.cumsum(steps) - steps, steps)) / np.repeat(steps, steps)
    pts = a[seg] + (b[seg] - a[seg]) * t[:, None]
    return np.round(pts[:, 1]).astype(np.int64), np.round(pts[:, 0]).astype(np.int64)


def _draw_outlines(rgb: np.ndarray, geoms: np.ndarray, class_ids: np.ndarray, x0: float, y0: float,
                   line_width: int) -> None:
    """Draw polygon exteriors (level-0 px) into ``rgb`` whose top-left pixel is ``(x0, y0)``,
    in the class colours (:data:`wsi_nuclei.schema.CLASS_COLORS`)."""
    from scipy import ndimage as ndi

    h, w = rgb.shape[:2]
    canvas = np.zeros((h, w), np.int16)  # class id + 1 where an outline passes
    for g, cid in zip(geoms, class_ids):
        if g is None or g.is_empty:
            continue
        for poly in getattr(g, "geoms", [g]):
            # vertex (x, y) lies on pixel corners; pixel (r, c) has its centre at (c + .5, r + .5)
            xy = np.asarray(poly.exterior.coords, float)[:, :2] - (x0 + 0.5, y0 + 0.5)
            if len(xy) < 2:
                continue
            rr, cc = _segment_pixels(xy)
            ok = (rr >= 0) & (rr < h) & (cc >= 0) & (cc < w)
            canvas[rr[ok], cc[ok]] = int(cid) + 1
    if line_width > 1:
        canvas = ndi.grey_dilation(canvas, size=(line_width, line_width))
    lut = np.zeros((max(CLASS_COLORS) + 2, 3), np.uint8)
    for cid, col in CLASS_COLORS.items():
        lut[cid + 1] = col
    on = canvas > 0
    rgb[on] = lut[np.clip(canvas[on], 0, len(lut) - 1)]


def _nuclei_in(folder: Path, box: tuple[float, float, float, float], margin: float) -> tuple[np.ndarray, np.ndarray, int]:
    """Geometries and class ids of the nuclei that may cross ``box``, and how many have their
    centroid inside it."""
    import shapely

    x0, y0, x1, y1 = box
    t = _read_nuclei(folder, ["centroid_x", "centroid_y", "class_id", "geometry"],
                     (x0 - margin, y0 - margin, x1 + margin, y1 + margin))
    if t.num_rows == 0:
        return np.zeros(0, object), np.zeros(0, np.int64), 0
    geoms = shapely.from_wkb(t.column("geometry").to_numpy(zero_copy_only=False))
    cls = t.column("class_id").to_numpy().astype(np.int64)
    keep = shapely.intersects(geoms, shapely.box(x0, y0, x1, y1))
    cx, cy = t.column("centroid_x").to_numpy(), t.column("centroid_y").to_numpy()
    n_in = int(((cx >= x0) & (cx < x1) & (cy >= y0) & (cy < y1)).sum())
    return geoms[keep], cls[keep], n_in


def _overlay(run: _Run, slide: Any, x: int, y: int, w: int, h: int, line_width: int) -> tuple[np.ndarray, int]:
    rgb = np.array(slide.read_region((int(x), int(y)), 0, (int(w), int(h))), dtype=np.uint8, copy=True)
    margin = 200.0 / run.mpp  # larger than any nucleus (µm -> px)
    geoms, cls, n_in = _nuclei_in(run.folder, (x, y, x + w, y + h), margin)
    _draw_outlines(rgb, geoms, cls, x, y, line_width)
    return rgb, n_in


def _check_box(run: _Run, x: int, y: int, w: int, h: int) -> None:
    sw, sh = run.dimensions
    if w <= 0 or h <= 0:
        raise WsiNucleiError(f"overlay size must be positive, got {w} x {h}")
    if w * h > MAX_OVERLAY_PIXELS:
        raise WsiNucleiError(f"overlay of {w} x {h} px is too large (at most {MAX_OVERLAY_PIXELS:,} pixels)")
    if x < 0 or y < 0 or x + w > sw or y + h > sh:
        raise WsiNucleiError(f"region x={x}..{x + w}, y={y}..{y + h} is outside the slide (level 0 is {sw} x {sh} px)")


def render_overlay(run_dir: str | Path, x: int, y: int, width: int, height: int | None = None, *,
                   slide: Any = None, slide_path: str | Path | None = None, line_width: int = 2) -> np.ndarray:
    """A level-0 rectangle of the run's slide with the run's nuclei outlined in class colours.

    Parameters
    ----------
    run_dir : str or pathlib.Path
        A finished run folder (run.json, summary.json, nuclei.parquet).
    x, y : int
        Top-left corner, level-0 px of the QuPath frame (OpenSlide bounds subtracted).
    width, height : int
        Size in level-0 px (``height`` defaults to ``width``); the rectangle must lie inside
        the slide.
    slide : Slide, optional
        The open slide (otherwise opened from run.json or ``slide_path``).
    slide_path : str or pathlib.Path, optional
        The slide file when it is no longer where run.json says.
    line_width : int
        Outline width in px.

    Returns
    -------
    numpy.ndarray
        ``(height, width, 3)`` uint8 RGB.

    Raises
    ------
    InputNotFoundError
        The run folder is incomplete or the slide is missing.
    WsiNucleiError
        The rectangle is empty, too large or outside the slide; the slide is another one.
    """
    run = _load_run(run_dir)
    height = width if height is None else height
    _check_box(run, int(x), int(y), int(width), int(height))
    own = slide is None
    if own:
        slide = _open_slide(run, slide_path)
    try:
        rgb, _ = _overlay(run, slide, int(x), int(y), int(width), int(height), max(1, int(line_width)))
    finally:
        if own:
            slide.close()
    return rgb


def write_overlay(run_dir: str | Path, x: int, y: int, width: int, height: int | None = None,
                  out: str | Path | None = None, **kwargs: Any) -> Path:
    """Write :func:`render_overlay` as a PNG (atomically); returns its path.

    ``out`` defaults to ``<run_dir>/overlay_x<X>_y<Y>_<W>x<H>.png``; other keyword arguments
    go to :func:`render_overlay`.
    """
    from PIL import Image

    height = width if height is None else height
    rgb = render_overlay(run_dir, x, y, width, height, **kwargs)
    path = Path(out) if out is not None else Path(run_dir) / f"overlay_x{x}_y{y}_{width}x{height}.png"
    if path.suffix.lower() != ".png":
        raise OutputError(f"{path}: the overlay is written as PNG; give a name ending in .png")
    try:
        with atomic_path(path) as tmp:
            Image.fromarray(rgb).save(tmp, format="PNG")
    except OSError as exc:
        raise OutputError(f"cannot write {path} ({exc.strerror or exc})") from None
    return path


# --------------------------------------------------------------------------------------------
# the page's pictures
# --------------------------------------------------------------------------------------------
def _colormap(t: np.ndarray) -> np.ndarray:
    """RGB of values in [0, 1] along :data:`_MAP_STOPS` (linear between stops)."""
    stops = np.asarray(_MAP_STOPS, float)
    pos = np.clip(t, 0, 1) * (len(stops) - 1)
    i = np.minimum(pos.astype(int), len(stops) - 2)
    f = (pos - i)[..., None]
    return np.round(stops[i] * (1 - f) + stops[i + 1] * f).astype(np.uint8)


def _nice_ceiling(v: float) -> float:
    """Smallest of 1, 2, 2.5, 5 x 10^k not below ``v``."""
    if v <= 0:
        return 1.0
    k = 10 ** math.floor(math.log10(v))
    for m in (1, 2, 2.5, 5, 10):
        if m * k >= v * (1 - 1e-12):
            return m * k
    return 10 * k


@dataclass
class _DensityMap:
    cell_um: float
    counts: np.ndarray  # (rows, cols) nuclei per cell
    density: np.ndarray  # nuclei per mm² of cell
    vmax: float


def _density_map(run: _Run, cx: np.ndarray, cy: np.ndarray) -> _DensityMap:
    w, h = run.dimensions
    longest_um = max(w, h) * run.mpp
    cell_um = next((c for c in _MAP_CELL_UM if longest_um / c <= _MAP_CELLS), _MAP_CELL_UM[-1])
    cell_px = cell_um / run.mpp
    nx, ny = max(1, math.ceil(w / cell_px)), max(1, math.ceil(h / cell_px))
    counts = np.zeros((ny, nx), np.int64)
    if len(cx):
        ix = np.clip((cx / cell_px).astype(np.int64), 0, nx - 1)
        iy = np.clip((cy / cell_px).astype(np.int64), 0, ny - 1)
        np.add.at(counts, (iy, ix), 1)
    density = counts / (cell_um**2 / 1e6)
    return _DensityMap(cell_um, counts, density, _nice_ceiling(float(density.max())))


def _thumbnail(slide: Any) -> np.ndarray:
    return np.asarray(slide.get_thumbnail(_THUMB_PX), dtype=np.uint8)


def _heat_image(thumb: np.ndarray, dm: _DensityMap, run: _Run) -> np.ndarray:
    """The density map over a pale grey version of the thumbnail (empty cells show the slide)."""
    th, tw = thumb.shape[:2]
    w, h = run.dimensions
    cell_px = dm.cell_um / run.mpp
    cols = np.minimum(((np.arange(tw) + 0.5) * (w / tw) / cell_px).astype(int), dm.counts.shape[1] - 1)
    rows = np.minimum(((np.arange(th) + 0.5) * (h / th) / cell_px).astype(int), dm.counts.shape[0] - 1)
    dens = dm.density[rows[:, None], cols[None, :]]
    grey = thumb.astype(float).mean(axis=2, keepdims=True)
    base = np.repeat(255 - (255 - grey) * 0.35, 3, axis=2)
    col = _colormap(dens / dm.vmax).astype(float)
    out = np.where((dens > 0)[..., None], 0.15 * base + 0.85 * col, base)
    return np.round(out).astype(np.uint8)


def _colorbar_svg(vmax: float, cell_um: float) -> str:
    stops = "".join(f'<stop offset="{i / (len(_MAP_STOPS) - 1):.3f}" stop-color="{_hex(c)}"/>'
                    for i, c in enumerate(_MAP_STOPS))
    ticks = []
    for i in range(5):
        v = vmax * i / 4
        x = 24 + 300 * i / 4
        ticks.append(f'<line x1="{x:.1f}" y1="32" x2="{x:.1f}" y2="37" stroke="#333"/>'
                     f'<text x="{x:.1f}" y="50" text-anchor="middle">{v:,.0f}</text>')
    return (f'<svg class="colorbar" width="350" height="76" viewBox="0 0 350 76" role="img" '
            f'aria-label="colour bar: nuclei per mm²">'
            f'<defs><linearGradient id="cbar">{stops}</linearGradient></defs>'
            f'<rect x="24" y="12" width="300" height="20" fill="url(#cbar)" stroke="#333" stroke-width="0.5"/>'
            f'{"".join(ticks)}<text x="174" y="70" text-anchor="middle">nuclei per mm² '
            f'(grid cells of {cell_um:g} x {cell_um:g} µm)</text></svg>')


def _svg_path(geom: Any, scale_x: float, scale_y: float) -> str:
    """SVG path data of a (multi)polygon's rings, scaled to thumbnail px."""
    parts = []
    for poly in getattr(geom, "geoms", [geom]):
        if poly.is_empty or not hasattr(poly, "exterior"):
            continue
        for ring in [poly.exterior, *poly.interiors]:
            xy = np.asarray(ring.coords)
            pts = " ".join(f"{x * scale_x:.1f},{y * scale_y:.1f}" for x, y in xy)
            parts.append(f"M{pts}Z")
    return " ".join(parts)


def _image_with_overlay(uri: str, tw: int, th: int, run: _Run, regions: list, crops: list, label: str) -> str:
    """An inline SVG: the image, region outlines and crop boxes (vector, in thumbnail px)."""
    w, h = run.dimensions
    sx, sy = tw / w, th / h
    shapes = []
    for name, geom, color in regions:
        simple = geom.simplify(0.75 / max(sx, sy), preserve_topology=True)
        shapes.append(f'<path d="{_svg_path(simple, sx, sy)}" fill="none" stroke="{color}" stroke-width="1.6" '
                      f'fill-rule="evenodd"><title>{_esc(name)}</title></path>')
    for c in crops:
        x0, y0 = c["x"] * sx, c["y"] * sy
        cw, ch = max(3.0, c["w"] * sx), max(3.0, c["h"] * sy)
        shapes.append(f'<rect x="{x0:.1f}" y="{y0:.1f}" width="{cw:.1f}" height="{ch:.1f}" fill="none" '
                      f'stroke="#000" stroke-width="1.5"/><text x="{x0 + cw + 2:.1f}" y="{y0 + 10:.1f}" '
                      f'class="lbl">{_esc(c["label"])}</text>')
    return (f'<svg class="thumb" width="{tw}" height="{th}" viewBox="0 0 {tw} {th}" role="img" aria-label="{_esc(label)}">'
            f'<image href="{uri}" x="0" y="0" width="{tw}" height="{th}"/>{"".join(shapes)}</svg>')


def _crop_px(run: _Run) -> int:
    lo, hi = _CROP_PX_RANGE
    w, h = run.dimensions
    return int(min(max(lo, round(_CROP_UM / run.mpp)), hi, w, h))


def _choose_crops(run: _Run, cx: np.ndarray, cy: np.ndarray, regions: list, n_random: int, seed: int) -> list[dict]:
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
        np.add.at(grid, (np.minimum(cy // step, ny - 1).astype(int), np.minimum(cx // step, nx - 1).astype(int)), 1)
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
            crops.append({"label": chr(ord("A") + len(crops)), "kind": "random", "x": x, "y": y, "w": size, "h": size})
    return crops


def _class_table(summary: dict[str, Any]) -> list[tuple[int, str, tuple[int, int, int]]]:
    """(class id, name, colour) of the summary's classes (``Nucleus`` = class 0)."""
    by_name = {v: k for k, v in CLASS_NAMES.items()}
    by_name[UNCLASSIFIED] = 0
    out = []
    for name in summary.get("class_names", []):
        cid = by_name.get(name, 0)
        out.append((cid, name, tuple(CLASS_COLORS.get(cid, CLASS_COLORS[0]))))
    return out


def _legend(classes: list) -> str:
    items = "".join(f'<span class="sw" style="background:{_hex(col)}"></span>{_esc(name)}&emsp;'
                    for _, name, col in classes)
    return f'<p class="legend">{items}</p>'


# --------------------------------------------------------------------------------------------
# charts (inline SVG)
# --------------------------------------------------------------------------------------------
def _bar_chart(title: str, rows: list[tuple[str, float | None, str, str]], unit: str) -> str:
    """Horizontal bars: ``rows`` = (label, value, colour, shown text)."""
    vals = [v for _, v, _, _ in rows if v is not None]
    vmax = max(vals) if vals and max(vals) > 0 else 1.0
    bar_w, lab_w, row_h = 150, 92, 18
    height = 24 + row_h * len(rows)
    out = [f'<svg class="chart" width="{lab_w + bar_w + 80}" height="{height}" role="img" aria-label="{_esc(title)}">'
           f'<text x="0" y="13" class="ct">{_esc(title)}{(" (" + _esc(unit) + ")") if unit else ""}</text>']
    for i, (label, v, color, text) in enumerate(rows):
        y = 20 + i * row_h
        bw = 0.0 if v is None else bar_w * v / vmax
        out.append(f'<text x="{lab_w - 4}" y="{y + 12}" text-anchor="end">{_esc(label)}</text>'
                   f'<rect x="{lab_w}" y="{y + 2}" width="{bw:.1f}" height="{row_h - 5}" fill="{color}" stroke="#555" '
                   f'stroke-width="0.4"/><text x="{lab_w + bw + 4:.1f}" y="{y + 12}">{_esc(text)}</text>')
    out.append("</svg>")
    return "".join(out)


def _region_block(path: str, region: dict[str, Any], classes: list) -> str:
    """Charts and the table of one region summary (``path`` = its place in summary.json)."""
    counts, fracs = region.get("counts") or {}, region.get("fractions") or {}
    dens, areas = region.get("density_per_mm2") or {}, region.get("area_um2") or {}
    name = region.get("region_name")
    title = "Whole slide (union of the regions)" if path == "slide" else f"Region {region.get('region_id')}: {name}"
    charts = "".join([
        _bar_chart("Count", [(n, counts.get(n), _hex(c), format_value(counts.get(n), "count")) for _, n, c in classes], ""),
        _bar_chart("Fraction", [(n, fracs.get(n), _hex(c), format_value(fracs.get(n), "fraction")) for _, n, c in classes], ""),
        _bar_chart("Density", [(n, dens.get(n), _hex(c), format_value(dens.get(n), "density")) for _, n, c in classes],
                   "per mm²"),
    ])
    head = (f'<p>Nuclei {_num(f"{path}.n_nuclei", region.get("n_nuclei"), "count", "span")} in '
            f'{_num(f"{path}.area_mm2", region.get("area_mm2"), "area_mm2", "span")} mm²: '
            f'{_num(f"{path}.density_per_mm2.total", dens.get("total"), "density", "span")} per mm²; '
            f'median nucleus area {_num(f"{path}.area_um2.all.median", (areas.get("all") or {}).get("median"), "area_um2", "span")} µm²')
    if "n_nuclei_outside_regions" in region:
        head += (f'; nuclei outside every region (not counted): '
                 f'{_num(f"{path}.n_nuclei_outside_regions", region.get("n_nuclei_outside_regions"), "count", "span")}')
    head += "</p>"
    rows = []
    for _, n, c in classes:
        a = areas.get(n) or {}
        rows.append(f'<tr><th><span class="sw" style="background:{_hex(c)}"></span>{_esc(n)}</th>'
                    f'{_num(f"{path}.counts.{n}", counts.get(n), "count")}'
                    f'{_num(f"{path}.fractions.{n}", fracs.get(n), "fraction")}'
                    f'{_num(f"{path}.density_per_mm2.{n}", dens.get(n), "density")}'
                    f'{_num(f"{path}.area_um2.{n}.median", a.get("median"), "area_um2")}'
                    f'{_num(f"{path}.area_um2.{n}.q25", a.get("q25"), "area_um2")}'
                    f'{_num(f"{path}.area_um2.{n}.q75", a.get("q75"), "area_um2")}</tr>')
    table = ('<table class="cls"><tr><th>class</th><th>count</th><th>fraction</th><th>per mm²</th>'
             '<th>area µm² median</th><th>q25</th><th>q75</th></tr>' + "".join(rows) + "</table>")
    return f'<div class="region"><h3>{_esc(title)}</h3>{head}<div class="charts">{charts}</div>{table}</div>'


def _size_chart(areas: np.ndarray, cls_names: np.ndarray, classes: list) -> str:
    """Step curves of the area distribution of each class (% of the class's nuclei per bin)."""
    finite = areas[np.isfinite(areas)]
    if finite.size == 0:
        return "<p>No nuclei.</p>"
    hi = _nice_ceiling(float(np.quantile(finite, 0.995)))
    n_bins = 40
    edges = np.linspace(0.0, hi, n_bins + 1)
    W, H, L, B = 620, 260, 50, 40
    curves, peak = [], 0.0
    for _, name, col in classes:
        a = areas[(cls_names == name) & np.isfinite(areas)]
        if a.size == 0:
            continue
        hist = np.histogram(np.minimum(a, hi), bins=edges)[0] / a.size * 100
        peak = max(peak, float(hist.max()))
        curves.append((name, col, hist, a.size))
    ymax = _nice_ceiling(peak)
    px = lambda v: L + (W - L - 10) * v / hi  # noqa: E731
    py = lambda v: H - B - (H - B - 10) * v / ymax  # noqa: E731
    out = [f'<svg class="chart" width="{W}" height="{H + 22 * len(curves)}" role="img" aria-label="nucleus area distributions">',
           f'<line x1="{L}" y1="{H - B}" x2="{W - 10}" y2="{H - B}" stroke="#333"/>'
           f'<line x1="{L}" y1="10" x2="{L}" y2="{H - B}" stroke="#333"/>']
    for i in range(5):
        xv, yv = hi * i / 4, ymax * i / 4
        out.append(f'<text x="{px(xv):.1f}" y="{H - B + 15}" text-anchor="middle">{xv:g}</text>'
                   f'<text x="{L - 4}" y="{py(yv) + 4:.1f}" text-anchor="end">{yv:g}</text>')
    out.append(f'<text x="{(L + W) / 2:.0f}" y="{H - 8}" text-anchor="middle">nucleus area (µm²; last bin holds larger)</text>'
               f'<text x="12" y="{(H - B) / 2:.0f}" transform="rotate(-90 12 {(H - B) / 2:.0f})" '
               f'text-anchor="middle">% of the class</text>')
    for k, (name, col, hist, n) in enumerate(curves):
        pts = [f"{px(edges[0]):.1f},{py(0):.1f}"]
        for i, v in enumerate(hist):
            pts.append(f"{px(edges[i]):.1f},{py(v):.1f} {px(edges[i + 1]):.1f},{py(v):.1f}")
        pts.append(f"{px(edges[-1]):.1f},{py(0):.1f}")
        out.append(f'<polyline points="{" ".join(pts)}" fill="none" stroke="{_hex(col)}" stroke-width="1.8"/>')
        y = H + 22 * k + 8
        out.append(f'<rect x="{L}" y="{y}" width="14" height="10" fill="{_hex(col)}"/>'
                   f'<text x="{L + 20}" y="{y + 9}">{_esc(name)} ({n:,d} nuclei)</text>')
    out.append("</svg>")
    return "".join(out)


# --------------------------------------------------------------------------------------------
# the page
# --------------------------------------------------------------------------------------------
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
    ("Tiles and patches", ("patches_total", "patches_planned", "patches_run", "passes_per_pixel", "tissue_area_mm2",
                           "blocks_total", "blocks_processed", "blocks_resumed")),
    ("Seams and regions", ("nuclei_found_in_blocks", "nuclei_cut_at_window_border", "seam_candidates", "seam_kept",
                           "seam_trimmed", "seam_duplicates_removed", "nuclei_outside_regions_removed",
                           "nuclei_near_region_edge_assigned", "regions_overlapping")),
    ("Model", ("model", "model_sha256", "device", "wsi_nuclei_version")),
    ("Memory and retries", ("peak_band_mb", "oom_batch_splits", "blocks_resubmitted_after_worker_loss")),
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
    warnings = [str(w) for w in (m.get("warnings") or [])] + [str(w) for w in (s.get("warnings") or [])]
    reliability = m.get("reliability_note")
    out = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>wsi-nuclei report: {_esc(m.get('slide_name', s.get('slide_name', '')))}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>{_esc(m.get('slide_name', s.get('slide_name', '')))}</h1>",
        f'<p class="sub">wsi-nuclei {_esc(m.get("wsi_nuclei_version", ""))} &middot; model '
        f'<b>{_esc(model.get("name", qc.get("model", "")))}</b> on {_esc(m.get("device", ""))} &middot; '
        f'{_num("slide.n_nuclei", s["slide"].get("n_nuclei"), "count", "span")} nuclei &middot; level 0 '
        f'{run.dimensions[0]:,d} x {run.dimensions[1]:,d} px at {run.mpp:.4g} µm/px &middot; '
        f'coordinates: {_esc(m.get("coordinate_frame", "level-0 px (QuPath frame)"))}</p>',
    ]
    if isinstance(reliability, str) and reliability.strip():
        out.append(f'<div class="note" id="reliability"><b>Reliability of the classes:</b> {_esc(reliability)}</div>')
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
        out.append(f"<p>{len(regions)} regions; the {len(shown)} with most nuclei are shown, every region is in summary.csv.</p>")
    out.append(_region_block("slide", s["slide"], classes))
    out.extend(_region_block(f"regions.{i}", r, classes) for i, r in shown)
    out.append(f"<h2>Nucleus sizes</h2>{sizes}")
    out.append("<h2>Quality control</h2>" + _qc_panel(qc))
    res = m.get("resolution") or {}
    tiling = m.get("tiling") or {}
    facts = [("slide", m.get("slide")), ("fingerprint", m.get("fingerprint")), ("reader", m.get("backend")),
             ("µm/px source", res.get("mpp_source")), ("level read", res.get("level")),
             ("scale level 0 -> model", res.get("scale_level0_to_model")),
             ("model sha256", model.get("sha256")), ("model licence", model.get("licence")),
             ("precision", model.get("precision")), ("test-time augmentation", model.get("tta")),
             ("blending", tiling.get("blending")), ("ownership", tiling.get("ownership")),
             ("regions", json.dumps(m.get("regions")) if m.get("regions") else None)]
    rows = "".join(f'<tr><th>{_esc(k)}</th><td class="mono">{_esc(v)}</td></tr>' for k, v in facts if v is not None)
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
        return ("<p>Slide pixels not available: thumbnail, density map and overlays are omitted.</p>",
                "<p>Slide pixels not available.</p>", sizes)
    thumb = _thumbnail(slide)
    th, tw = thumb.shape[:2]
    left = _image_with_overlay(_png_uri(thumb), tw, th, run, regions, crops, "slide thumbnail with regions")
    right = _image_with_overlay(_png_uri(_heat_image(thumb, dm, run)), tw, th, run, regions, [], "nucleus density map")
    n_regions = len(regions)
    pictures = (f'<div class="row"><figure>{left}<figcaption>Thumbnail ({tw} x {th} px) with the {n_regions} analysed '
                f'region(s) outlined and the overlay crops (A = densest).</figcaption></figure>'
                f'<figure>{right}<figcaption>Nucleus density from the centroids in nuclei.parquet, binned on a '
                f'{dm.cell_um:g} µm grid (maximum {dm.density.max():,.0f} per mm²); uncoloured cells hold no '
                f'nuclei.</figcaption>{_colorbar_svg(dm.vmax, dm.cell_um)}</figure></div>')
    figs = []
    for c in crops:
        rgb, n_in = _overlay(run, slide, c["x"], c["y"], c["w"], c["h"], line_width=2)
        what = "densest place" if c["kind"] == "densest" else "random place in the regions"
        figs.append(f'<figure><img class="crop" src="{_png_uri(rgb)}" width="{c["w"]}" height="{c["h"]}" '
                    f'alt="crop {c["label"]}"><figcaption><b>{c["label"]}</b>: {what}; x={c["x"]}, y={c["y"]}, '
                    f'{c["w"]} x {c["h"]} px ({c["w"] * run.mpp:.0f} µm), {n_in:,d} nuclei (centroids inside).<br>'
                    f'<span class="mono">wsi-nuclei overlay RUN_DIR --x {c["x"]} --y {c["y"]} --size {c["w"]}</span>'
                    f'</figcaption></figure>')
    crops_html = f'<div class="row">{"".join(figs)}</div>' if figs else "<p>No place to show.</p>"
    return pictures, crops_html, sizes


def write_report(out_dir: str | Path, *, slide: Any = None, slide_path: str | Path | None = None,
                 n_random: int = 3, seed: int = 0) -> Path:
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
            slide, note = None, f"{exc}: the pictures are omitted (rerun 'wsi-nuclei report' with --slide)."
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

"""The report's pictures and charts: the nucleus-density heat map and its colour bar, the
thumbnail with region outlines, per-class bar charts and nucleus-size distributions (inline SVG).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Final

import numpy as np

from ..schema import CLASS_COLORS, CLASS_NAMES, UNCLASSIFIED
from ._format import _esc, _hex
from ._run import _Run

#: Longest side of the thumbnail in the report (px).
_THUMB_PX: Final[int] = 720

#: Grid cell sides (µm) the density map may use: the smallest giving at most _MAP_CELLS cells
#: along the slide's longest side.
_MAP_CELL_UM: Final[tuple[float, ...]] = (25, 50, 100, 200, 250, 500, 1000, 2000, 5000)

_MAP_CELLS: Final[int] = 64

#: Colour stops of the density map (low -> high), RGB.
_MAP_STOPS: Final[tuple[tuple[int, int, int], ...]] = (
    (252, 251, 196),
    (250, 204, 92),
    (243, 130, 45),
    (205, 40, 40),
    (110, 8, 50),
)


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
    cols = np.minimum(
        ((np.arange(tw) + 0.5) * (w / tw) / cell_px).astype(int), dm.counts.shape[1] - 1
    )
    rows = np.minimum(
        ((np.arange(th) + 0.5) * (h / th) / cell_px).astype(int), dm.counts.shape[0] - 1
    )
    dens = dm.density[rows[:, None], cols[None, :]]
    grey = thumb.astype(float).mean(axis=2, keepdims=True)
    base = np.repeat(255 - (255 - grey) * 0.35, 3, axis=2)
    col = _colormap(dens / dm.vmax).astype(float)
    out = np.where((dens > 0)[..., None], 0.15 * base + 0.85 * col, base)
    return np.round(out).astype(np.uint8)


def _colorbar_svg(vmax: float, cell_um: float) -> str:
    stops = "".join(
        f'<stop offset="{i / (len(_MAP_STOPS) - 1):.3f}" stop-color="{_hex(c)}"/>'
        for i, c in enumerate(_MAP_STOPS)
    )
    ticks = []
    for i in range(5):
        v = vmax * i / 4
        x = 24 + 300 * i / 4
        ticks.append(
            f'<line x1="{x:.1f}" y1="32" x2="{x:.1f}" y2="37" stroke="#333"/>'
            f'<text x="{x:.1f}" y="50" text-anchor="middle">{v:,.0f}</text>'
        )
    return (
        f'<svg class="colorbar" width="350" height="76" viewBox="0 0 350 76" role="img" '
        f'aria-label="colour bar: nuclei per mm²">'
        f'<defs><linearGradient id="cbar">{stops}</linearGradient></defs>'
        f'<rect x="24" y="12" width="300" height="20" fill="url(#cbar)" stroke="#333" stroke-width="0.5"/>'
        f'{"".join(ticks)}<text x="174" y="70" text-anchor="middle">nuclei per mm² '
        f"(grid cells of {cell_um:g} x {cell_um:g} µm)</text></svg>"
    )


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


def _image_with_overlay(
    uri: str, tw: int, th: int, run: _Run, regions: list, crops: list, label: str
) -> str:
    """An inline SVG: the image, region outlines and crop boxes (vector, in thumbnail px)."""
    w, h = run.dimensions
    sx, sy = tw / w, th / h
    shapes = []
    for name, geom, color in regions:
        simple = geom.simplify(0.75 / max(sx, sy), preserve_topology=True)
        shapes.append(
            f'<path d="{_svg_path(simple, sx, sy)}" fill="none" stroke="{color}" stroke-width="1.6" '
            f'fill-rule="evenodd"><title>{_esc(name)}</title></path>'
        )
    for c in crops:
        x0, y0 = c["x"] * sx, c["y"] * sy
        cw, ch = max(3.0, c["w"] * sx), max(3.0, c["h"] * sy)
        shapes.append(
            f'<rect x="{x0:.1f}" y="{y0:.1f}" width="{cw:.1f}" height="{ch:.1f}" fill="none" '
            f'stroke="#000" stroke-width="1.5"/><text x="{x0 + cw + 2:.1f}" y="{y0 + 10:.1f}" '
            f'class="lbl">{_esc(c["label"])}</text>'
        )
    return (
        f'<svg class="thumb" width="{tw}" height="{th}" viewBox="0 0 {tw} {th}" role="img" aria-label="{_esc(label)}">'
        f'<image href="{uri}" x="0" y="0" width="{tw}" height="{th}"/>{"".join(shapes)}</svg>'
    )


def _class_table(summary: dict[str, Any]) -> list[tuple[int, str, tuple[int, int, int]]]:
    """(class id, name, colour) of the summary's classes (``Nucleus`` = class 0)."""
    by_name = {v: k for k, v in CLASS_NAMES.items()}
    by_name[UNCLASSIFIED] = 0
    out: list[tuple[int, str, tuple[int, int, int]]] = []
    for name in summary.get("class_names", []):
        cid = by_name.get(name, 0)
        r, g, b = CLASS_COLORS.get(cid, CLASS_COLORS[0])
        out.append((cid, str(name), (int(r), int(g), int(b))))
    return out


def _legend(classes: list) -> str:
    items = "".join(
        f'<span class="sw" style="background:{_hex(col)}"></span>{_esc(name)}&emsp;'
        for _, name, col in classes
    )
    return f'<p class="legend">{items}</p>'


def _bar_chart(title: str, rows: list[tuple[str, float | None, str, str]], unit: str) -> str:
    """Horizontal bars: ``rows`` = (label, value, colour, shown text)."""
    vals = [v for _, v, _, _ in rows if v is not None]
    vmax = max(vals) if vals and max(vals) > 0 else 1.0
    bar_w, lab_w, row_h = 150, 92, 18
    height = 24 + row_h * len(rows)
    out = [
        f'<svg class="chart" width="{lab_w + bar_w + 80}" height="{height}" role="img" aria-label="{_esc(title)}">'
        f'<text x="0" y="13" class="ct">{_esc(title)}{(" (" + _esc(unit) + ")") if unit else ""}</text>'
    ]
    for i, (label, v, color, text) in enumerate(rows):
        y = 20 + i * row_h
        bw = 0.0 if v is None else bar_w * v / vmax
        out.append(
            f'<text x="{lab_w - 4}" y="{y + 12}" text-anchor="end">{_esc(label)}</text>'
            f'<rect x="{lab_w}" y="{y + 2}" width="{bw:.1f}" height="{row_h - 5}" fill="{color}" stroke="#555" '
            f'stroke-width="0.4"/><text x="{lab_w + bw + 4:.1f}" y="{y + 12}">{_esc(text)}</text>'
        )
    out.append("</svg>")
    return "".join(out)


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
    out = [
        f'<svg class="chart" width="{W}" height="{H + 22 * len(curves)}" role="img" aria-label="nucleus area distributions">',
        f'<line x1="{L}" y1="{H - B}" x2="{W - 10}" y2="{H - B}" stroke="#333"/>'
        f'<line x1="{L}" y1="10" x2="{L}" y2="{H - B}" stroke="#333"/>',
    ]
    for i in range(5):
        xv, yv = hi * i / 4, ymax * i / 4
        out.append(
            f'<text x="{px(xv):.1f}" y="{H - B + 15}" text-anchor="middle">{xv:g}</text>'
            f'<text x="{L - 4}" y="{py(yv) + 4:.1f}" text-anchor="end">{yv:g}</text>'
        )
    out.append(
        f'<text x="{(L + W) / 2:.0f}" y="{H - 8}" text-anchor="middle">nucleus area (µm²; last bin holds larger)</text>'
        f'<text x="12" y="{(H - B) / 2:.0f}" transform="rotate(-90 12 {(H - B) / 2:.0f})" '
        f'text-anchor="middle">% of the class</text>'
    )
    for k, (name, col, hist, n) in enumerate(curves):
        pts = [f"{px(edges[0]):.1f},{py(0):.1f}"]
        for i, v in enumerate(hist):
            pts.append(f"{px(edges[i]):.1f},{py(v):.1f} {px(edges[i + 1]):.1f},{py(v):.1f}")
        pts.append(f"{px(edges[-1]):.1f},{py(0):.1f}")
        out.append(
            f'<polyline points="{" ".join(pts)}" fill="none" stroke="{_hex(col)}" stroke-width="1.8"/>'
        )
        y = H + 22 * k + 8
        out.append(
            f'<rect x="{L}" y="{y}" width="14" height="10" fill="{_hex(col)}"/>'
            f'<text x="{L + 20}" y="{y + 9}">{_esc(name)} ({n:,d} nuclei)</text>'
        )
    out.append("</svg>")
    return "".join(out)

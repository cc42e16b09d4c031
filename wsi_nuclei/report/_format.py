"""Formatting rules and small HTML/PNG helpers of the report: numbers as the page shows them
(:func:`format_value`), escaping, colours, embedded PNG images.
"""

from __future__ import annotations

import base64
import html
import io
import json
from typing import Any, Final

import numpy as np

_REGION_COLOR: Final[str] = "#00b7ff"


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
    return (
        f'<{tag} class="n" data-key="{_esc(summary_path)}" data-kind="{kind}" '
        f'data-value="{_esc(json.dumps(value))}">{_esc(format_value(value, kind))}</{tag}>'
    )


def _hex(rgb: tuple[int, int, int] | list[int]) -> str:
    return "#{:02x}{:02x}{:02x}".format(*(int(c) for c in rgb[:3]))


def _png_uri(rgb: np.ndarray) -> str:
    from PIL import Image

    buf = io.BytesIO()
    # zlib's default level: ``optimize=True`` (every filter at level 9) took 3x as long for the
    # same size on slide crops, and up to 1.6 s per report on synthetic slides
    Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")

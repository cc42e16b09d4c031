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

Modules: :mod:`.page` (the page), :mod:`.overlay` (overlay images), ``_charts`` (heat map, bar and
size charts), ``_run`` (reading a run folder), ``_format`` (number formatting and HTML helpers).
"""

from __future__ import annotations

from ._format import format_value
from ._run import open_run_slide
from .overlay import MAX_OVERLAY_PIXELS, render_overlay, write_overlay
from .page import REPORT_NAME, write_report

__all__ = [
    "REPORT_NAME",
    "MAX_OVERLAY_PIXELS",
    "format_value",
    "open_run_slide",
    "render_overlay",
    "write_overlay",
    "write_report",
]

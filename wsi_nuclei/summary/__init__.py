"""Per-region and whole-slide summaries of a nucleus table, and the cohort table of many runs.

:class:`RegionSummarizer` accumulates nucleus batches (constant memory apart from one float32
area per nucleus, kept for exact medians) and produces a JSON-ready nested summary:

.. code-block:: text

    {"summary_version": 1, "wsi_nuclei_version": ..., "slide_name": ..., "mpp": ...,
     "class_names": ["Neoplastic", ...],
     "regions": [<region summary>, ...],
     "slide": <region summary of the union of the regions, region_id "slide">,
     "qc": {... copied from the caller ...}}

    <region summary> = {"region_id", "region_name", "source", "area_mm2", "n_nuclei",
                        "counts": {class: n}, "fractions": {class: n / n_nuclei},
                        "density_per_mm2": {"total": ..., class: ...},
                        "area_um2": {"all": {"median", "q25", "q75"}, class: {...}}}

Undefined figures (a median of no nuclei, a density over zero area) are ``None`` (``null`` in
JSON, an empty cell in CSV). :func:`write_summary` writes ``summary.json`` and ``summary.csv``;
:func:`summarize_runs` joins the ``summary.json`` of many runs into one cohort table.

Modules: :mod:`.region` (:class:`RegionSummarizer`), :mod:`.tables` (rows, ``summary.csv`` /
``summary.json``), :mod:`.runs` (the cohort table of many runs).
"""

from __future__ import annotations

from .region import SLIDE_KEY, SUMMARY_VERSION, RegionSummarizer
from .runs import duplicate_slides, find_run_dirs, summarize_runs
from .tables import flatten_region, region_measurements, write_summary

__all__ = [
    "SLIDE_KEY",
    "SUMMARY_VERSION",
    "RegionSummarizer",
    "flatten_region",
    "region_measurements",
    "write_summary",
    "summarize_runs",
    "find_run_dirs",
    "duplicate_slides",
]

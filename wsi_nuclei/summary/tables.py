"""A summary as table rows: :func:`flatten_region` (one CSV row per region),
:func:`region_measurements` (the QuPath annotation measurements) and :func:`write_summary`
(``summary.json`` and ``summary.csv``, atomic).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Final

import pandas as pd

from wsi_nuclei._io import atomic_path, json_ready
from wsi_nuclei.errors import OutputError

from .region import _QUANTILES

__all__ = [
    "flatten_region",
    "region_measurements",
    "write_summary",
]

_SUMMARY_JSON: Final[str] = "summary.json"

_SUMMARY_CSV: Final[str] = "summary.csv"


def _flatten(prefix: str, value: Any, out: dict[str, Any]) -> None:
    """Flatten nested mappings into ``prefix_key`` columns (lists become JSON text)."""
    if isinstance(value, Mapping):
        for k, v in value.items():
            _flatten(f"{prefix}_{k}" if prefix else str(k), v, out)
    elif isinstance(value, (list, tuple)):
        out[prefix] = json.dumps(json_ready(value))
    else:
        out[prefix] = value


def flatten_region(
    region: Mapping[str, Any], class_names: Sequence[str], qc: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """One flat CSV row of a region summary (see :func:`write_summary` for the columns).

    Parameters
    ----------
    region : mapping
        A region summary (an item of ``summary["regions"]`` or ``summary["slide"]``).
    class_names : sequence of str
        The summary's ``class_names``.
    qc : mapping, optional
        QC figures, added as ``qc_*`` columns (nested keys joined with ``_``).

    Returns
    -------
    dict
        Column -> value (None for undefined figures).
    """
    row: dict[str, Any] = {
        "region_id": region.get("region_id"),
        "region_name": region.get("region_name"),
        "region_source": region.get("source"),
        "region_class": region.get("region_class"),
        "annotation_id": region.get("annotation_id"),
        "area_mm2": region.get("area_mm2"),
        "n_nuclei": region.get("n_nuclei"),
        "n_nuclei_outside_regions": region.get("n_nuclei_outside_regions"),
        "n_nuclei_unclassified": region.get("n_nuclei_unclassified"),
    }
    counts = region.get("counts", {})
    fractions = region.get("fractions", {})
    density = region.get("density_per_mm2", {})
    area = region.get("area_um2", {})
    for name in class_names:
        row[f"count_{name}"] = counts.get(name)
    for name in class_names:
        row[f"fraction_{name}"] = fractions.get(name)
    row["density_total_per_mm2"] = density.get("total")
    for name in class_names:
        row[f"density_{name}_per_mm2"] = density.get(name)
    for key, _ in _QUANTILES:
        row[f"area_um2_{key}"] = area.get("all", {}).get(key)
    for name in class_names:
        for key, _ in _QUANTILES:
            row[f"area_um2_{key}_{name}"] = area.get(name, {}).get(key)
    if qc:
        _flatten("qc", qc, row)
    return row


def region_measurements(region: Mapping[str, Any]) -> dict[str, Any]:
    """QuPath-style measurement names of a region summary (for region annotations).

    Parameters
    ----------
    region : mapping
        A region summary (an item of ``summary["regions"]`` or ``summary["slide"]``).

    Returns
    -------
    dict
        Measurement name -> value (None for undefined figures; writers omit those), e.g.
        ``"Area mm^2"``, ``"Num nuclei"``, ``"Num Neoplastic"``, ``"Fraction Neoplastic"``,
        ``"Density Neoplastic per mm^2"``, ``"Nucleus area µm^2 median (Neoplastic)"``.
    """
    out: dict[str, Any] = {
        "Area mm^2": region.get("area_mm2"),
        "Num nuclei": region.get("n_nuclei"),
    }
    counts = region.get("counts", {})
    for name, n in counts.items():
        out[f"Num {name}"] = n
    for name, f in region.get("fractions", {}).items():
        out[f"Fraction {name}"] = f
    density = region.get("density_per_mm2", {})
    out["Density nuclei per mm^2"] = density.get("total")
    for name, d in density.items():
        if name != "total":
            out[f"Density {name} per mm^2"] = d
    for name, stats in region.get("area_um2", {}).items():
        suffix = "" if name == "all" else f" ({name})"
        for key, _ in _QUANTILES:
            out[f"Nucleus area µm^2 {key}{suffix}"] = stats.get(key)
    return out


def _summary_rows(summary: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Flat rows of a summary: one per region, then the whole slide."""
    names = list(summary.get("class_names", []))
    qc = summary.get("qc") or {}
    rows = [flatten_region(r, names, qc) for r in summary.get("regions", [])]
    rows.append(flatten_region(summary["slide"], names, qc))
    for row in rows:
        row["mpp"] = summary.get("mpp")
    return rows


def _write_csv(frame: pd.DataFrame, path: Path) -> None:
    """Atomically write a CSV (empty cells for missing values)."""
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False, na_rep="", lineterminator="\n")


def write_summary(summary: Mapping[str, Any], out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``summary.json`` (nested, strict JSON) and ``summary.csv`` (flat) into ``out_dir``.

    ``summary.csv`` has one row per region and a last row ``region_id == "slide"``, with the
    columns ``region_id, region_name, region_source, area_mm2, n_nuclei,
    n_nuclei_outside_regions, count_<class>..., fraction_<class>..., density_total_per_mm2,
    density_<class>_per_mm2..., area_um2_median, area_um2_q25, area_um2_q75,
    area_um2_<median|q25|q75>_<class>..., qc_<key>..., mpp``. Both files are written under a
    temporary name and renamed.

    Parameters
    ----------
    summary : mapping
        A :meth:`RegionSummarizer.finalize` result.
    out_dir : str or pathlib.Path
        Output directory (created when missing).

    Returns
    -------
    tuple of pathlib.Path
        The paths of ``summary.json`` and ``summary.csv``.

    Raises
    ------
    OutputError
        The directory cannot be created or written.
    """
    out_dir = Path(out_dir)
    json_path = out_dir / _SUMMARY_JSON
    csv_path = out_dir / _SUMMARY_CSV
    text = json.dumps(json_ready(summary), indent=2, allow_nan=False, ensure_ascii=False)
    rows = pd.DataFrame(_summary_rows(summary))
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        with atomic_path(json_path) as tmp:
            tmp.write_text(text + "\n", encoding="utf-8")
        _write_csv(rows, csv_path)
    except OSError as exc:
        raise OutputError(
            f"cannot write the summary into {out_dir}: {exc.strerror or exc}"
        ) from None
    return json_path, csv_path

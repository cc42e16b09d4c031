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
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Final

import numpy as np
import pandas as pd

from wsi_nuclei import __version__, schema
from wsi_nuclei._io import atomic_path, json_ready
from wsi_nuclei.errors import InputNotFoundError, OutputError, WsiNucleiError

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

#: Version of the summary.json layout.
SUMMARY_VERSION: Final[int] = 1
#: Region id and name of the whole-slide row.
SLIDE_KEY: Final[str] = "slide"
_SUMMARY_JSON: Final[str] = "summary.json"
_SUMMARY_CSV: Final[str] = "summary.csv"
#: Quantiles reported for nucleus areas, with their keys.
_QUANTILES: Final[tuple[tuple[str, float], ...]] = (("median", 0.5), ("q25", 0.25), ("q75", 0.75))


def _area_stats(areas: np.ndarray) -> dict[str, float | None]:
    """Median and quartiles (linear interpolation) of nucleus areas; None when empty."""
    areas = areas[np.isfinite(areas)]
    if areas.size == 0:
        return {key: None for key, _ in _QUANTILES}
    values = np.quantile(areas.astype(np.float64), [q for _, q in _QUANTILES])
    return {key: float(v) for (key, _), v in zip(_QUANTILES, values)}


class RegionSummarizer:
    """Accumulate nucleus tables per region and for the whole slide.

    Parameters
    ----------
    regions : iterable of region objects
        Objects with ``id`` (an integer, matching the nucleus table's ``region_id``), ``name``,
        ``geometry`` (shapely Polygon/MultiPolygon in level-0 px) and ``source``.
    class_names : mapping of int to str, default :data:`wsi_nuclei.schema.CLASS_NAMES`
        Classes to report. Nuclei of other class ids (e.g. 0, unclassified) count in the totals
        and overall area statistics only; pass ``{0: "Nucleus"}`` for a model without classes.
    mpp : float
        Microns per level-0 pixel (positive).
    slide_name : str, optional
        Name of the slide, recorded in the summary (used by :func:`summarize_runs`).
    not_measured : iterable of str, optional
        Class names the model cannot produce (no training labels): their counts, fractions,
        densities and sizes are reported as None ("not measured"), never as 0.

    Raises
    ------
    ValueError
        ``mpp`` is not a positive number, or two regions share an id.

    Notes
    -----
    Nuclei with ``region_id == -1`` (outside every region) are not part of any region nor of the
    whole slide (the union of the regions); they are counted as ``n_nuclei_outside_regions``.
    """

    def __init__(
        self,
        regions: Iterable[Any],
        *,
        class_names: Mapping[int, str] = schema.CLASS_NAMES,
        mpp: float,
        slide_name: str = "",
        not_measured: Iterable[str] = (),
    ) -> None:
        try:
            mpp_value = float(mpp)
        except (TypeError, ValueError):
            mpp_value = math.nan
        if not (math.isfinite(mpp_value) and mpp_value > 0):
            raise ValueError(f"mpp must be a positive number, got {mpp!r}")
        self._regions = list(regions)
        self._mpp = mpp_value
        self._slide_name = str(slide_name)
        self._class_ids = [int(c) for c in class_names]
        self._class_names = [str(class_names[c]) for c in class_names]
        self._not_measured = [n for n in self._class_names if n in set(not_measured)]
        ids = [int(r.id) for r in self._regions]
        if len(set(ids)) != len(ids):
            raise ValueError(f"region ids must be unique, got {ids}")
        self._ids = np.array(ids, dtype=np.int64)
        self._id_order = np.argsort(self._ids, kind="stable")
        self._sorted_ids = self._ids[self._id_order]
        n_cls = len(self._class_ids) + 1  # last column: classes not reported
        self._counts = np.zeros((len(self._regions), n_cls), dtype=np.int64)
        self._areas: dict[tuple[int, int], list[np.ndarray]] = {}
        # the whole slide counts each nucleus once, even where regions nest or overlap
        self._slide_counts = np.zeros(n_cls, dtype=np.int64)
        self._slide_areas: dict[int, list[np.ndarray]] = {}
        self._n_outside = 0

    def _region_index(self, region_ids: np.ndarray) -> np.ndarray:
        """Row index of each nucleus's region; -1 for ``region_id == -1``."""
        out = np.full(region_ids.shape, -1, dtype=np.int64)
        inside = region_ids != -1
        if inside.any():
            rid = region_ids[inside]
            pos = np.searchsorted(self._sorted_ids, rid)
            pos = np.clip(pos, 0, max(len(self._sorted_ids) - 1, 0))
            if len(self._sorted_ids) == 0 or np.any(self._sorted_ids[pos] != rid):
                unknown = sorted(set(rid.tolist()) - set(self._ids.tolist()))
                raise ValueError(f"nucleus table has region ids {unknown[:10]} that are not "
                                 "among the summarizer's regions")
            out[inside] = self._id_order[pos]
        return out

    def _class_index(self, class_ids: np.ndarray) -> np.ndarray:
        """Column index of each nucleus's class (the last column for unreported classes)."""
        lookup = {cid: k for k, cid in enumerate(self._class_ids)}
        other = len(self._class_ids)
        uniq, inverse = np.unique(class_ids, return_inverse=True)
        mapped = np.array([lookup.get(int(u), other) for u in uniq], dtype=np.int64)
        return mapped[inverse.reshape(-1)]

    def add(self, frame: pd.DataFrame, membership: tuple[np.ndarray, np.ndarray] | None = None) -> None:
        """Accumulate one nucleus table (needs ``region_id``, ``class_id`` and ``area_um2``).

        Parameters
        ----------
        frame : pandas.DataFrame
            One batch of nuclei (:data:`wsi_nuclei.schema.NUCLEUS_COLUMNS`).
        membership : (rows, region_ids), optional
            Every (nucleus row, region id) pair when a nucleus may belong to several regions
            (nested or overlapping annotations; :func:`wsi_nuclei.regions.region_membership`):
            each region counts all nuclei it contains. By default each nucleus belongs to its
            ``region_id`` only. The whole slide counts every nucleus with ``region_id != -1``
            once either way.

        Raises
        ------
        ValueError
            A column is missing, or a ``region_id`` is neither -1 nor one of the regions.
        """
        missing = [c for c in ("region_id", "class_id", "area_um2") if c not in frame.columns]
        if missing:
            raise ValueError(f"RegionSummarizer.add: nucleus table lacks {', '.join(missing)}")
        if len(frame) == 0:
            return
        primary = self._region_index(frame["region_id"].to_numpy(dtype=np.int64))
        inside = primary >= 0
        self._n_outside += int((~inside).sum())
        if not inside.any():
            return
        all_cidx = self._class_index(frame["class_id"].to_numpy(dtype=np.int64))
        all_areas = frame["area_um2"].to_numpy(dtype=np.float32)
        n_cls = self._counts.shape[1]
        self._slide_counts += np.bincount(all_cidx[inside], minlength=n_cls)
        for k in np.unique(all_cidx[inside]).tolist():
            self._slide_areas.setdefault(int(k), []).append(all_areas[inside & (all_cidx == k)])
        if membership is None:
            rows = np.nonzero(inside)[0]
            ridx = primary[inside]
        else:
            rows = np.asarray(membership[0], np.int64)
            ridx = self._region_index(np.asarray(membership[1], np.int64))
            ok = ridx >= 0
            rows, ridx = rows[ok], ridx[ok]
        cidx = all_cidx[rows]
        areas = all_areas[rows]
        key = ridx * n_cls + cidx
        self._counts += np.bincount(key, minlength=self._counts.size).reshape(
            self._counts.shape
        )
        order = np.argsort(key, kind="stable")
        skey = key[order]
        starts = np.flatnonzero(np.r_[True, skey[1:] != skey[:-1]])
        for start, stop in zip(starts, np.r_[starts[1:], len(skey)]):
            k = int(skey[start])
            chunk = areas[order[start:stop]]
            self._areas.setdefault((k // n_cls, k % n_cls), []).append(chunk)

    def _areas_of(self, regions: Sequence[int] | None, column: int | None) -> np.ndarray:
        """All accumulated areas of ``regions`` (None: the whole slide) for one class column
        (None: every class)."""
        cols = range(self._counts.shape[1]) if column is None else [column]
        if regions is None:
            chunks = [c for k in cols for c in self._slide_areas.get(k, [])]
        else:
            chunks = [c for r in regions for k in cols for c in self._areas.get((r, k), [])]
        if not chunks:
            return np.zeros(0, dtype=np.float32)
        return np.concatenate(chunks)

    def _summarize(
        self, rows: Sequence[int] | None, area_mm2: float, head: dict[str, Any]
    ) -> dict[str, Any]:
        """Summary of the nuclei of region rows ``rows`` (None: the whole slide) over
        ``area_mm2``."""
        if rows is None:
            counts = self._slide_counts
        else:
            counts = self._counts[list(rows)].sum(axis=0) if rows else np.zeros(
                self._counts.shape[1], dtype=np.int64
            )
        total = int(counts.sum())

        def density(n: int) -> float | None:
            return n / area_mm2 if area_mm2 > 0 else None

        out = dict(head)
        out["area_mm2"] = float(area_mm2)
        out["n_nuclei"] = total
        out["counts"] = {name: int(counts[k]) for k, name in enumerate(self._class_names)}
        out["fractions"] = {
            name: (int(counts[k]) / total if total else 0.0)
            for k, name in enumerate(self._class_names)
        }
        out["density_per_mm2"] = {"total": density(total)} | {
            name: density(int(counts[k])) for k, name in enumerate(self._class_names)
        }
        out["area_um2"] = {"all": _area_stats(self._areas_of(rows, None))} | {
            name: _area_stats(self._areas_of(rows, k))
            for k, name in enumerate(self._class_names)
        }
        # nuclei without a class (class 0, or below the class-probability threshold)
        out["n_nuclei_unclassified"] = int(counts[-1])
        for name in self._not_measured:
            out["counts"][name] = None
            out["fractions"][name] = None
            out["density_per_mm2"][name] = None
            out["area_um2"][name] = {key: None for key, _ in _QUANTILES}
        return out

    def finalize(
        self, qc: Mapping[str, Any] | None = None, *, slide_area_mm2: float | None = None
    ) -> dict[str, Any]:
        """Compute the summary of every region and of the whole slide.

        Parameters
        ----------
        qc : mapping, optional
            Run quality-control figures given by the caller (tiles total/processed/skipped,
            mpp and its source, level, model name and sha256, package version, seconds per
            stage, ...); copied into ``summary["qc"]`` (NaN -> None, numpy -> Python).
        slide_area_mm2 : float, optional
            Area of the whole slide's analysed tissue; by default the area of the union of the
            regions (nested or overlapping regions count once).

        Returns
        -------
        dict
            The nested, strict-JSON-ready summary described in the module docstring.
        """
        mm2_per_px2 = self._mpp**2 / 1e6
        regions = []
        areas = []
        for i, region in enumerate(self._regions):
            area = float(region.geometry.area) * mm2_per_px2
            areas.append(area)
            head = {"region_id": int(region.id), "region_name": str(region.name),
                    "source": str(region.source),
                    "region_class": getattr(region, "classification", None),
                    "annotation_id": getattr(region, "annotation_id", None)}
            regions.append(self._summarize([i], area, head))
        if slide_area_mm2 is None:
            import shapely

            geoms = [r.geometry for r in self._regions]
            slide_area = float(shapely.union_all(geoms).area) * mm2_per_px2 if geoms else 0.0
        else:
            slide_area = float(slide_area_mm2)
        slide_head = {"region_id": SLIDE_KEY, "region_name": SLIDE_KEY,
                      "source": "union of regions", "region_class": None, "annotation_id": None}
        slide = self._summarize(None, slide_area, slide_head)
        slide["n_nuclei_outside_regions"] = self._n_outside
        return json_ready({
            "summary_version": SUMMARY_VERSION,
            "wsi_nuclei_version": __version__,
            "slide_name": self._slide_name,
            "mpp": self._mpp,
            "class_names": list(self._class_names),
            "classes_not_measured": list(self._not_measured),
            "regions": regions,
            "slide": slide,
            "qc": dict(qc or {}),
        })


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
        raise OutputError(f"cannot write the summary into {out_dir}: {exc.strerror or exc}")
    return json_path, csv_path


def _read_summary(run_dir: Path) -> dict[str, Any]:
    """Load a run's summary.json, with one-line user errors."""
    path = run_dir / _SUMMARY_JSON
    if not path.is_file():
        where = "run directory does not exist" if not run_dir.exists() else "no summary.json"
        raise InputNotFoundError(f"{where}: {path} (is {run_dir} a finished wsi-nuclei run?)")
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise WsiNucleiError(f"cannot read {path}: {exc}") from None
    if not isinstance(summary, dict) or "slide" not in summary:
        raise WsiNucleiError(f"{path} is not a wsi-nuclei summary (no 'slide' entry)")
    return summary


def _slide_name(summary: Mapping[str, Any], run_dir: Path) -> str:
    """Slide name of a run: the summary's, else the QC's ``slide``/``slide_name``, else the dir."""
    qc = summary.get("qc") or {}
    for value in (summary.get("slide_name"), qc.get("slide_name"), qc.get("slide")):
        if isinstance(value, str) and value:
            return Path(value).name if "/" in value or "\\" in value else value
    return run_dir.name


def summarize_runs(run_dirs: Sequence[str | Path], out_csv: str | Path) -> pd.DataFrame:
    """Cohort table: one row per slide x region (and per slide) from each run's summary.json.

    Parameters
    ----------
    run_dirs : sequence of str or pathlib.Path
        Output directories of finished runs (each holding ``summary.json``).
    out_csv : str or pathlib.Path
        CSV to write (atomically; parent directories are created).

    Returns
    -------
    pandas.DataFrame
        Columns ``slide_name, run_dir`` then the columns of ``summary.csv`` (``region_id``,
        ``region_name``, ...); the whole-slide rows have ``region_id == "slide"``. Class
        columns are the union over runs (empty where a run lacks a class).

    Raises
    ------
    InputNotFoundError
        A run directory, or its summary.json, does not exist.
    WsiNucleiError
        A summary.json cannot be parsed.
    OutputError
        ``out_csv`` cannot be written.
    """
    rows: list[dict[str, Any]] = []
    for run_dir in map(Path, run_dirs):
        summary = _read_summary(run_dir)
        name = _slide_name(summary, run_dir)
        for row in _summary_rows(summary):
            rows.append({"slide_name": name, "run_dir": str(run_dir)} | row)
    columns: dict[str, None] = {"slide_name": None, "run_dir": None, "region_id": None,
                                "region_name": None}
    for row in rows:
        columns.update(dict.fromkeys(row))
    table = pd.DataFrame(rows, columns=list(columns))
    out_csv = Path(out_csv)
    try:
        out_csv.parent.mkdir(parents=True, exist_ok=True)
        _write_csv(table, out_csv)
    except OSError as exc:
        raise OutputError(f"cannot write {out_csv}: {exc.strerror or exc}")
    return table


def _is_run_dir(path: Path) -> bool:
    """A finished run's folder: it holds ``run.json`` and ``summary.csv``."""
    return (path / "run.json").is_file() and (path / _SUMMARY_CSV).is_file()


def find_run_dirs(paths: Sequence[str | Path]) -> list[Path]:
    """The run folders named by ``paths``: each path that is a run folder itself, else every
    run folder below it (walked recursively, hidden folders and a run's own folders skipped).

    Parameters
    ----------
    paths : sequence of str or pathlib.Path
        Run folders, or folders that contain run folders at any depth (e.g. the ``--out`` of a
        cohort run). A folder with a ``summary.json`` counts as a run folder too.

    Returns
    -------
    list of pathlib.Path
        Each run folder once (by resolved path), in the order of ``paths``; the run folders
        found below one path sorted by path.

    Raises
    ------
    InputNotFoundError
        A path does not exist, or holds no run folder (exit code 2).
    """
    found: list[Path] = []
    for path in map(Path, paths):
        if _is_run_dir(path) or (path / _SUMMARY_JSON).is_file():
            found.append(path)
            continue
        if not path.is_dir():
            what = "run directory does not exist" if not path.exists() else "not a folder"
            raise InputNotFoundError(f"{what}: {path} (is it a finished wsi-nuclei run?)")
        below: list[Path] = []
        stack = [path]
        while stack:
            folder = stack.pop()
            try:
                entries = sorted((e for e in folder.iterdir() if e.is_dir() and not e.name.startswith(".")),
                                 key=lambda e: e.name)
            except OSError:
                continue
            for e in entries:
                if _is_run_dir(e):
                    below.append(e)  # a run's folder holds no other runs
                else:
                    stack.append(e)
        if not below:
            raise InputNotFoundError(f"no wsi-nuclei run in {path} (looked for folders with "
                                     "run.json and summary.csv at any depth)")
        found += sorted(below, key=lambda p: p.parts)
    unique: list[Path] = []
    seen: set[Path] = set()
    for p in found:
        if p.resolve() not in seen:
            seen.add(p.resolve())
            unique.append(p)
    return unique


def duplicate_slides(run_dirs: Sequence[str | Path]) -> list[str]:
    """One warning per slide that appears in more than one run with the same regions.

    Two runs are of the same slide when their ``run.json`` has the same ``fingerprint`` (the
    slide's content: a copy under another name is the same slide), and over the same regions
    when their summaries list the same regions (ids and names). Runs of one slide over other
    regions (e.g. the whole slide and a few annotations) are not flagged. Runs without a
    readable ``run.json`` are not compared.

    Parameters
    ----------
    run_dirs : sequence of str or pathlib.Path
        Run folders.

    Returns
    -------
    list of str
        Warnings (without the ``wsi-nuclei: warning:`` prefix), in the order of first appearance.
    """
    groups: dict[tuple[str, str], list[tuple[Path, str]]] = {}
    for run_dir in map(Path, run_dirs):
        try:
            fingerprint = json.loads((run_dir / "run.json").read_text(encoding="utf-8")).get("fingerprint")
            summary = json.loads((run_dir / _SUMMARY_JSON).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
            continue
        if not isinstance(fingerprint, str) or not fingerprint:
            continue
        regions = json.dumps([[r.get("region_id"), r.get("region_name")] for r in summary.get("regions", [])
                              if isinstance(r, dict)], default=str)
        groups.setdefault((fingerprint, regions), []).append((run_dir, _slide_name(summary, run_dir)))
    out = []
    for (fingerprint, _), runs in groups.items():
        if len(runs) > 1:
            names = sorted({n for _, n in runs})
            out.append(f"slide {' = '.join(names)} appears in {len(runs)} runs (same fingerprint {fingerprint[:12]}, "
                       f"same regions): {', '.join(str(d) for d, _ in runs)}; its rows are in the table {len(runs)} times")
    return out

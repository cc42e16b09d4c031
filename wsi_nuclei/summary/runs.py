"""Many runs in one table: :func:`find_run_dirs` (run folders under the given paths),
:func:`summarize_runs` (their ``summary.json`` joined into one cohort table) and
:func:`duplicate_slides` (the same slide found twice).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from wsi_nuclei.errors import InputNotFoundError, OutputError, WsiNucleiError

from .tables import _SUMMARY_CSV, _SUMMARY_JSON, _summary_rows, _write_csv

__all__ = [
    "duplicate_slides",
    "find_run_dirs",
    "summarize_runs",
]


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
    columns: dict[str, None] = {
        "slide_name": None,
        "run_dir": None,
        "region_id": None,
        "region_name": None,
    }
    for row in rows:
        columns.update(dict.fromkeys(row))
    table = pd.DataFrame(rows, columns=list(columns))
    out_csv = Path(out_csv)
    try:
        out_csv.parent.mkdir(parents=True, exist_ok=True)
        _write_csv(table, out_csv)
    except OSError as exc:
        raise OutputError(f"cannot write {out_csv}: {exc.strerror or exc}") from None
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
                entries = sorted(
                    (e for e in folder.iterdir() if e.is_dir() and not e.name.startswith(".")),
                    key=lambda e: e.name,
                )
            except OSError:
                continue
            for e in entries:
                if _is_run_dir(e):
                    below.append(e)  # a run's folder holds no other runs
                else:
                    stack.append(e)
        if not below:
            raise InputNotFoundError(
                f"no wsi-nuclei run in {path} (looked for folders with "
                "run.json and summary.csv at any depth)"
            )
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
            fingerprint = json.loads((run_dir / "run.json").read_text(encoding="utf-8")).get(
                "fingerprint"
            )
            summary = json.loads((run_dir / _SUMMARY_JSON).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
            continue
        if not isinstance(fingerprint, str) or not fingerprint:
            continue
        regions = json.dumps(
            [
                [r.get("region_id"), r.get("region_name")]
                for r in summary.get("regions", [])
                if isinstance(r, dict)
            ],
            default=str,
        )
        groups.setdefault((fingerprint, regions), []).append(
            (run_dir, _slide_name(summary, run_dir))
        )
    out = []
    for (fingerprint, _), runs in groups.items():
        if len(runs) > 1:
            names = sorted({n for _, n in runs})
            out.append(
                f"slide {' = '.join(names)} appears in {len(runs)} runs (same fingerprint {fingerprint[:12]}, "
                f"same regions): {', '.join(str(d) for d, _ in runs)}; its rows are in the table {len(runs)} times"
            )
    return out

"""Reading a run folder for the report and overlays: ``run.json``, ``summary.json``, the slide
the run was made from, its nuclei (GeoParquet, optionally within a box) and its regions.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import InputNotFoundError, WsiNucleiError, first_line
from ._format import _REGION_COLOR, _hex

if TYPE_CHECKING:
    from ..slide import Slide


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
        raise InputNotFoundError(
            f"{path.parent}: {where} ({what}; is it a finished wsi-nuclei run folder?)"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise WsiNucleiError(f"{path}: not readable as JSON ({first_line(exc)})") from None
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
        raise WsiNucleiError(
            f"{folder / 'summary.json'}: no 'slide' summary; not a summary.json of wsi-nuclei"
        )
    if not (folder / "nuclei.parquet").is_file():
        raise InputNotFoundError(
            f"{folder}: no nuclei.parquet (is it a finished wsi-nuclei run folder?)"
        )
    return _Run(folder, manifest, summary)


def _slide_location(run: _Run) -> Path | None:
    """The slide file a run processed: ``slide_path`` (absolute) or ``slide`` of run.json,
    the latter also relative to the run folder."""
    for key in ("slide_path", "slide"):
        text = run.manifest.get(key)
        if not text:
            continue
        p = Path(str(text))
        for cand in [p] if p.is_absolute() else [p, run.folder / p]:
            if cand.is_file():
                return cand
    return None


def open_run_slide(run_dir: str | Path, slide_path: str | Path | None = None) -> Slide:
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


def _open_slide(run: _Run, slide_path: str | Path | None) -> Slide:
    from ..slide import BACKENDS, open_slide

    if slide_path is not None:
        path = Path(slide_path)
        if not path.is_file():
            raise InputNotFoundError(f"{path}: no such slide file")
    else:
        located = _slide_location(run)
        if located is None:
            recorded = run.manifest.get("slide_path") or run.manifest.get("slide") or "nothing"
            raise InputNotFoundError(
                f"the slide of this run is not found (run.json records {recorded}); pass --slide PATH"
            )
        path = located
    backend = str(run.manifest.get("backend") or "auto")
    slide = open_slide(path, backend=backend if backend in BACKENDS else "auto", require_mpp=False)
    want = run.manifest.get("fingerprint")
    if want and slide.fingerprint != want:
        slide.close()
        raise WsiNucleiError(
            f"{path}: not the slide of this run (fingerprint {slide.fingerprint[:12]}, run.json has {str(want)[:12]})"
        )
    return slide


def _read_nuclei(
    folder: Path, columns: list[str], box: tuple[float, float, float, float] | None = None
) -> Any:
    """Columns of nuclei.parquet (pyarrow Table), optionally only centroids within ``box``."""
    import pyarrow.parquet as pq

    filters = None
    if box is not None:
        x0, y0, x1, y1 = box
        filters = [
            ("centroid_x", ">=", x0),
            ("centroid_x", "<", x1),
            ("centroid_y", ">=", y0),
            ("centroid_y", "<", y1),
        ]
    try:
        return pq.read_table(folder / "nuclei.parquet", columns=columns, filters=filters)
    except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError
        raise WsiNucleiError(
            f"{folder / 'nuclei.parquet'}: not readable ({first_line(exc)})"
        ) from None


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
            out.append(
                (
                    str(props.get("name", "")),
                    shapely.geometry.shape(f["geometry"]),
                    _hex(color) if color else _REGION_COLOR,
                )
            )
        return out
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return []


def _nuclei_in(
    folder: Path, box: tuple[float, float, float, float], margin: float
) -> tuple[np.ndarray, np.ndarray, int]:
    """Geometries and class ids of the nuclei that may cross ``box``, and how many have their
    centroid inside it."""
    import shapely

    x0, y0, x1, y1 = box
    t = _read_nuclei(
        folder,
        ["centroid_x", "centroid_y", "class_id", "geometry"],
        (x0 - margin, y0 - margin, x1 + margin, y1 + margin),
    )
    if t.num_rows == 0:
        return np.zeros(0, object), np.zeros(0, np.int64), 0
    geoms = shapely.from_wkb(t.column("geometry").to_numpy(zero_copy_only=False))
    cls = t.column("class_id").to_numpy().astype(np.int64)
    keep = shapely.intersects(geoms, shapely.box(x0, y0, x1, y1))
    cx, cy = t.column("centroid_x").to_numpy(), t.column("centroid_y").to_numpy()
    n_in = int(((cx >= x0) & (cx < x1) & (cy >= y0) & (cy < y1)).sum())
    return geoms[keep], cls[keep], n_in

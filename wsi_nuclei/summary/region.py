""":class:`RegionSummarizer`: per-region and whole-slide counts, fractions, densities and area
quantiles, accumulated batch by batch (see :mod:`wsi_nuclei.summary` for the layout).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Final

import numpy as np
import pandas as pd

from wsi_nuclei import __version__, schema
from wsi_nuclei._io import json_ready

__all__ = [
    "SLIDE_KEY",
    "SUMMARY_VERSION",
    "RegionSummarizer",
]

#: Version of the summary.json layout.
SUMMARY_VERSION: Final[int] = 1

#: Region id and name of the whole-slide row.
SLIDE_KEY: Final[str] = "slide"

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
                raise ValueError(
                    f"nucleus table has region ids {unknown[:10]} that are not "
                    "among the summarizer's regions"
                )
            out[inside] = self._id_order[pos]
        return out

    def _class_index(self, class_ids: np.ndarray) -> np.ndarray:
        """Column index of each nucleus's class (the last column for unreported classes)."""
        lookup = {cid: k for k, cid in enumerate(self._class_ids)}
        other = len(self._class_ids)
        uniq, inverse = np.unique(class_ids, return_inverse=True)
        mapped = np.array([lookup.get(int(u), other) for u in uniq], dtype=np.int64)
        return mapped[inverse.reshape(-1)]

    def add(
        self, frame: pd.DataFrame, membership: tuple[np.ndarray, np.ndarray] | None = None
    ) -> None:
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
        self._counts += np.bincount(key, minlength=self._counts.size).reshape(self._counts.shape)
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
            counts = (
                self._counts[list(rows)].sum(axis=0)
                if rows
                else np.zeros(self._counts.shape[1], dtype=np.int64)
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
            name: _area_stats(self._areas_of(rows, k)) for k, name in enumerate(self._class_names)
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
            head = {
                "region_id": int(region.id),
                "region_name": str(region.name),
                "source": str(region.source),
                "region_class": getattr(region, "classification", None),
                "annotation_id": getattr(region, "annotation_id", None),
            }
            regions.append(self._summarize([i], area, head))
        if slide_area_mm2 is None:
            import shapely

            geoms = [r.geometry for r in self._regions]
            slide_area = float(shapely.union_all(geoms).area) * mm2_per_px2 if geoms else 0.0
        else:
            slide_area = float(slide_area_mm2)
        slide_head = {
            "region_id": SLIDE_KEY,
            "region_name": SLIDE_KEY,
            "source": "union of regions",
            "region_class": None,
            "annotation_id": None,
        }
        slide = self._summarize(None, slide_area, slide_head)
        slide["n_nuclei_outside_regions"] = self._n_outside
        return json_ready(
            {
                "summary_version": SUMMARY_VERSION,
                "wsi_nuclei_version": __version__,
                "slide_name": self._slide_name,
                "mpp": self._mpp,
                "class_names": list(self._class_names),
                "classes_not_measured": list(self._not_measured),
                "regions": regions,
                "slide": slide,
                "qc": dict(qc or {}),
            }
        )

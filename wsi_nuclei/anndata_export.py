"""``nuclei.h5ad``: the nuclei of a run as an :class:`anndata.AnnData` for scanpy / squidpy.

Layout (one observation per nucleus, in the row order of ``nuclei.parquet``):

- ``obs`` (index: the nucleus ``id``): ``class`` (categorical: the classes the model outputs
  in class-id order, ``Nucleus`` alone for a model without classes, then any other name present), ``class_id``,
  ``class_prob``, ``prob_<class>`` (only for models with a class head), the morphology columns
  ``area_um2``, ``perimeter_um``, ``circularity``, ``solidity``, ``eccentricity``,
  ``major_axis_um``, ``minor_axis_um``, ``region_id`` and ``region`` (categorical region name),
  and ``centroid_x``, ``centroid_y`` (level-0 px);
- ``X``: the morphology columns (:data:`wsi_nuclei.schema.MORPHOLOGY_COLUMNS`) as a float32
  matrix (``var`` names them), so that scanpy's functions have features to work on;
- ``obsm['spatial']``: centroids in µm, columns (x, y), as squidpy expects;
- ``uns['wsi_nuclei']``: slide name and fingerprint, µm/px, model name and weights sha256
  (``""`` for a model without weights), class-probability threshold, reliability note, package
  version, coordinate units.

``anndata`` is an optional dependency: ``pip install 'wsi-nuclei[anndata]'``.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ._io import atomic_path, json_ready
from .errors import WsiNucleiError
from .schema import CLASS_NAMES, MORPHOLOGY_COLUMNS, PROB_COLUMNS

__all__ = ["require_anndata", "write_anndata", "nuclei_anndata"]

INSTALL_HINT = "pip install 'wsi-nuclei[anndata]'"


def require_anndata() -> Any:
    """Import and return :mod:`anndata`, or raise one clear :class:`WsiNucleiError` saying how to install it."""
    try:
        import anndata
    except ImportError:
        raise WsiNucleiError(
            f"--anndata needs the 'anndata' package, which is not installed: {INSTALL_HINT}"
        ) from None
    return anndata


def nuclei_anndata(
    nuclei: pd.DataFrame,
    *,
    regions: Sequence[Any] = (),
    classes: Sequence[str] | None = None,
    uns: Mapping[str, Any] | None = None,
) -> Any:
    """Build the :class:`anndata.AnnData` of a nucleus table (see the module docstring).

    Parameters
    ----------
    nuclei : pandas.DataFrame
        The columns of ``nuclei.parquet`` (``geometry`` is not needed and not used).
    regions : sequence of wsi_nuclei.regions.Region
        The run's regions, for the ``region`` names (a ``region_id`` without a region is named
        ``"region <id>"``; ``-1``, outside every region, is missing).
    classes : sequence of str, optional
        The class names the model can output, in class-id order: the categories of
        ``obs['class']`` (names found in the table but not listed are appended, sorted).
        Default: the PanNuke classes.
    uns : mapping, optional
        Run metadata stored under ``uns['wsi_nuclei']``.

    Returns
    -------
    anndata.AnnData
    """
    anndata = require_anndata()
    n = len(nuclei)
    index = pd.Index(nuclei["id"].astype(str).to_numpy(dtype=object), dtype=object, name="id")
    known = (
        list(dict.fromkeys(classes))
        if classes is not None
        else [CLASS_NAMES[k] for k in sorted(CLASS_NAMES)]
    )
    names = nuclei["class_name"].astype(str).to_numpy(dtype=object)
    categories = known + sorted(set(names) - set(known))
    obs: dict[str, Any] = {
        "class": pd.Categorical(names, categories=categories),
        "class_id": nuclei["class_id"].to_numpy(np.int8),
        "class_prob": nuclei["class_prob"].to_numpy(np.float32),
    }
    for c in PROB_COLUMNS:
        if c in nuclei and n and not nuclei[c].isna().all():
            obs[c] = nuclei[c].to_numpy(np.float32)
    for c in MORPHOLOGY_COLUMNS:
        obs[c] = nuclei[c].to_numpy(np.float32)
    region_id = nuclei["region_id"].to_numpy(np.int32)
    region_names = {int(r.id): str(r.name) for r in regions}
    labels = {
        rid: region_names.get(rid, f"region {rid}") for rid in set(region_id.tolist()) if rid >= 0
    }
    # every region of the run in id order (also those without nuclei), names used twice once
    order = list(
        dict.fromkeys(
            region_names.get(k, labels.get(k)) for k in sorted(set(region_names) | set(labels))
        )
    )
    obs["region_id"] = region_id
    obs["region"] = pd.Categorical([labels.get(int(r)) for r in region_id], categories=order)
    obs["centroid_x"] = nuclei["centroid_x"].to_numpy(np.float64)
    obs["centroid_y"] = nuclei["centroid_y"].to_numpy(np.float64)
    obs_frame = pd.DataFrame(obs, index=index)
    var = pd.DataFrame(index=pd.Index(list(MORPHOLOGY_COLUMNS), dtype=object, name="feature"))
    x = (
        np.column_stack([obs_frame[c].to_numpy(np.float32) for c in MORPHOLOGY_COLUMNS])
        if n
        else np.zeros((0, len(MORPHOLOGY_COLUMNS)), np.float32)
    )
    adata = anndata.AnnData(X=x.astype(np.float32), obs=obs_frame, var=var)
    adata.obsm["spatial"] = (
        np.column_stack(
            [
                nuclei["centroid_x_um"].to_numpy(np.float64),
                nuclei["centroid_y_um"].to_numpy(np.float64),
            ]
        )
        if n
        else np.zeros((0, 2))
    )
    meta = {
        k: ("" if v is None else v) for k, v in json_ready(dict(uns or {})).items()
    }  # HDF5 has no None
    meta.update(
        {
            "spatial_unit": "um",
            "obsm_spatial": "centroid (x, y) in um",
            "centroid_unit": "level-0 px, OpenSlide bounds subtracted (QuPath frame)",
        }
    )
    adata.uns["wsi_nuclei"] = meta
    return adata


def write_anndata(
    parquet: str | Path,
    path: str | Path,
    *,
    regions: Sequence[Any] = (),
    classes: Sequence[str] | None = None,
    uns: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``nuclei.h5ad`` from a run's ``nuclei.parquet``, atomically (temporary name, then rename).

    Parameters
    ----------
    parquet : str or pathlib.Path
        The run's ``nuclei.parquet``.
    path : str or pathlib.Path
        The ``.h5ad`` to write.
    regions : sequence of wsi_nuclei.regions.Region
        The run's regions (names for ``obs['region']``).
    classes : sequence of str, optional
        The model's class names in class-id order (see :func:`nuclei_anndata`).
    uns : mapping, optional
        Run metadata for ``uns['wsi_nuclei']`` (slide name, mpp, model, sha256, ...); a
        ``None`` value is stored as ``""`` (e.g. the sha256 of a model without weights).

    Returns
    -------
    pathlib.Path
        ``path``.

    Raises
    ------
    WsiNucleiError
        ``anndata`` is not installed.
    OutputError
        The disk is full or read-only.
    """
    import pyarrow.parquet as pq

    anndata = require_anndata()
    schema = pq.read_schema(parquet)
    columns = [c for c in schema.names if c != "geometry"]
    nuclei = pq.read_table(parquet, columns=columns).to_pandas()
    path = Path(path)
    # anndata's notes about pandas' deprecations would add lines to the run's output
    with warnings.catch_warnings(), atomic_path(path) as tmp:
        warnings.simplefilter("ignore")
        adata = nuclei_anndata(nuclei, regions=regions, classes=classes, uns=uns)
        # pandas >= 3 keeps strings as its own string arrays, which anndata writes only on request
        with anndata.settings.override(allow_write_nullable_strings=True):
            adata.write_h5ad(tmp)
    return path

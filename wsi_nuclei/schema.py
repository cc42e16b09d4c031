"""Shared vocabulary: PanNuke classes, colours and the one table of nucleus columns.

Every stage exchanges nuclei as a :class:`pandas.DataFrame` with the columns of
:data:`COLUMNS` (one row per nucleus, in that order). Coordinates are level-0 pixels of the
slide in the frame QuPath uses (OpenSlide bounds already subtracted); lengths and areas are
in µm.

:data:`COLUMNS` is the single source of truth about a column: its name, dtype, unit, the
QuPath measurement it is written as (with its decimals) and what it means. Everything else is
derived from it: :data:`NUCLEUS_COLUMNS` (name -> dtype: the table layout, the GeoParquet
schema of :mod:`wsi_nuclei.export.parquet`), :data:`MEASUREMENTS` (the GeoJSON measurements),
:data:`MORPHOLOGY_COLUMNS` (what :func:`wsi_nuclei.postprocess.measure_instances` measures
and ``nuclei.h5ad`` puts in ``X``) and :data:`PROB_COLUMNS`. A new column is one
:class:`Column` line here plus its computation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal

#: PanNuke class ids -> names. 0 means "no class" (a model without a class head, or unknown).
CLASS_NAMES: Final[dict[int, str]] = {
    1: "Neoplastic",
    2: "Inflammatory",
    3: "Connective",
    4: "Dead",
    5: "Epithelial",
}
#: Name used for nuclei of a model without classes.
UNCLASSIFIED: Final[str] = "Nucleus"

#: RGB colours (PanNuke/HoVer-Net convention).
CLASS_COLORS: Final[dict[int, tuple[int, int, int]]] = {
    0: (128, 128, 128),
    1: (255, 0, 0),
    2: (0, 255, 0),
    3: (0, 0, 255),
    4: (255, 255, 0),
    5: (255, 165, 0),
}

#: What a column is about; it decides where a column goes (see :data:`MEASUREMENTS`,
#: :data:`MORPHOLOGY_COLUMNS`).
Group = Literal["id", "position", "class", "morphology", "region", "geometry"]


@dataclass(frozen=True)
class Column:
    """One column of the nucleus table.

    Attributes
    ----------
    name : str
        Column name.
    dtype : str
        ``"str"``, ``"int8"``, ``"int32"``, ``"float32"``, ``"float64"`` or ``"object"``
        (``geometry``: shapely Polygons).
    unit : str or None
        Unit of the values (``"px"``: level-0 pixels), None when unitless.
    group : str
        What the column is about (:data:`Group`).
    qupath : str or None
        Name of the QuPath measurement the column is written as in the GeoJSON files, None when
        it is not written as a measurement.
    decimals : int or None
        Decimals the QuPath measurement is rounded to (None when not a measurement).
    description : str
        What the values mean.
    """

    name: str
    dtype: str
    unit: str | None
    group: Group
    qupath: str | None
    decimals: int | None
    description: str


def _prob_column(name: str) -> Column:
    return Column(
        f"prob_{name}",
        "float32",
        None,
        "class",
        f"Prob: {name}",
        4,
        f"probability of class {name} (NaN when the model has no class head)",
    )


#: The nucleus table, in column order.
COLUMNS: Final[tuple[Column, ...]] = (
    Column(
        "id",
        "str",
        None,
        "id",
        None,
        None,
        "deterministic UUID (uuid5), see wsi_nuclei.export.nucleus_uuid",
    ),
    Column(
        "block_row",
        "int32",
        None,
        "id",
        None,
        None,
        "post-processing block that output the nucleus",
    ),
    Column(
        "block_col",
        "int32",
        None,
        "id",
        None,
        None,
        "post-processing block that output the nucleus",
    ),
    Column("centroid_x", "float64", "px", "position", None, None, "centroid, level-0 px"),
    Column("centroid_y", "float64", "px", "position", None, None, "centroid, level-0 px"),
    Column("centroid_x_um", "float64", "µm", "position", None, None, "centroid in µm"),
    Column("centroid_y_um", "float64", "µm", "position", None, None, "centroid in µm"),
    Column("class_id", "int8", None, "class", None, None, "PanNuke class id, 0..5"),
    Column("class_name", "str", None, "class", None, None, "class name (see class_name)"),
    Column(
        "class_prob",
        "float32",
        None,
        "class",
        "Class probability",
        4,
        "probability of the assigned class (nucleus prob. when no classes)",
    ),
    *(_prob_column(CLASS_NAMES[c]) for c in range(1, 6)),
    Column("area_um2", "float32", "µm²", "morphology", "Nucleus: Area µm^2", 2, "area"),
    Column(
        "perimeter_um",
        "float32",
        "µm",
        "morphology",
        "Nucleus: Perimeter µm",
        2,
        "perimeter (Crofton estimate)",
    ),
    Column(
        "circularity",
        "float32",
        None,
        "morphology",
        "Nucleus: Circularity",
        4,
        "4*pi*area/perimeter^2, clipped to [0, 1]",
    ),
    Column(
        "solidity", "float32", None, "morphology", "Nucleus: Solidity", 4, "area / convex hull area"
    ),
    Column(
        "eccentricity",
        "float32",
        None,
        "morphology",
        "Nucleus: Eccentricity",
        4,
        "of the ellipse with the same second moments",
    ),
    Column(
        "major_axis_um",
        "float32",
        "µm",
        "morphology",
        "Nucleus: Major axis µm",
        2,
        "major axis of the ellipse with the same second moments",
    ),
    Column(
        "minor_axis_um",
        "float32",
        "µm",
        "morphology",
        "Nucleus: Minor axis µm",
        2,
        "minor axis of the ellipse with the same second moments",
    ),
    Column(
        "region_id",
        "int32",
        None,
        "region",
        "Region ID",
        0,
        "region holding the centroid, -1 when outside every region",
    ),
    Column(
        "geometry", "object", "px", "geometry", None, None, "outline, shapely.Polygon in level-0 px"
    ),
)

#: Columns of a nucleus table -> dtypes, in order. ``geometry`` holds shapely Polygons.
NUCLEUS_COLUMNS: Final[dict[str, str]] = {c.name: c.dtype for c in COLUMNS}

#: Class probability columns, in class-id order.
PROB_COLUMNS: Final[list[str]] = [c.name for c in COLUMNS if c.name.startswith("prob_")]

#: Morphology columns (measured by :func:`wsi_nuclei.postprocess.measure_instances`), in order.
MORPHOLOGY_COLUMNS: Final[tuple[str, ...]] = tuple(
    c.name for c in COLUMNS if c.group == "morphology"
)

#: Order of the groups in a nucleus's QuPath measurements: shape first, then the class
#: probabilities, then the region id (columns of one group in table order).
_MEASUREMENT_ORDER: Final[tuple[Group, ...]] = ("morphology", "class", "region")

#: Nucleus table column -> (QuPath measurement name, decimals), in the order they are written.
#: NaN values are omitted.
MEASUREMENTS: Final[dict[str, tuple[str, int]]] = {
    c.name: (c.qupath, c.decimals)
    for g in _MEASUREMENT_ORDER
    for c in COLUMNS
    if c.group == g and c.qupath is not None and c.decimals is not None
}


def class_name(class_id: int) -> str:
    """Name of a PanNuke class id; :data:`UNCLASSIFIED` for 0."""
    return CLASS_NAMES.get(int(class_id), UNCLASSIFIED)

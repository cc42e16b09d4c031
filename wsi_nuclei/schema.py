"""Shared vocabulary: PanNuke classes, colours and the nucleus-table columns.

Every stage exchanges nuclei as a :class:`pandas.DataFrame` with the columns in
:data:`NUCLEUS_COLUMNS` (one row per nucleus). Coordinates are level-0 pixels of the slide in
the frame QuPath uses (OpenSlide bounds already subtracted); lengths and areas are in µm.
"""

from __future__ import annotations

from typing import Final

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

#: Columns of a nucleus table, with dtypes. ``geometry`` holds shapely Polygons.
NUCLEUS_COLUMNS: Final[dict[str, str]] = {
    "id": "str",  # deterministic UUID (uuid5), see wsi_nuclei.export.nucleus_uuid
    "block_row": "int32",  # post-processing block that output the nucleus
    "block_col": "int32",
    "centroid_x": "float64",  # level-0 px
    "centroid_y": "float64",
    "centroid_x_um": "float64",
    "centroid_y_um": "float64",
    "class_id": "int8",  # 0..5
    "class_name": "str",
    "class_prob": "float32",  # probability of the assigned class (nucleus prob. when no classes)
    "prob_Neoplastic": "float32",  # NaN when the model has no class head
    "prob_Inflammatory": "float32",
    "prob_Connective": "float32",
    "prob_Dead": "float32",
    "prob_Epithelial": "float32",
    "area_um2": "float32",
    "perimeter_um": "float32",
    "circularity": "float32",  # 4*pi*area/perimeter^2, clipped to [0, 1]
    "solidity": "float32",
    "eccentricity": "float32",
    "major_axis_um": "float32",
    "minor_axis_um": "float32",
    "region_id": "int32",  # -1 when outside every region
    "geometry": "object",  # shapely.Polygon in level-0 px
}

PROB_COLUMNS: Final[list[str]] = [f"prob_{CLASS_NAMES[c]}" for c in range(1, 6)]


def class_name(class_id: int) -> str:
    """Name of a PanNuke class id; :data:`UNCLASSIFIED` for 0."""
    return CLASS_NAMES.get(int(class_id), UNCLASSIFIED)

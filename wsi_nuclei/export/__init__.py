"""Writers of a run's nuclei and regions, and the QuPath GeoJSON validator.

Every writer streams: ``frames`` is an iterable of nucleus tables (:data:`wsi_nuclei.schema.
NUCLEUS_COLUMNS`, one :class:`pandas.DataFrame` per batch) and only one batch is held in
memory at a time, so a slide with millions of nuclei is written in constant memory.

Geometries are cleaned before they are written (:func:`clean_polygon`): coordinates are rounded
to the 0.01-pixel grid QuPath snaps to on import, and the polygon is checked *after* rounding.
Invalid polygons are repaired (largest polygon piece kept), degenerate ones are dropped and
counted in the writer's statistics. The cleaning is deterministic, so the GeoJSON and GeoParquet
files of one run hold exactly the same nuclei; :func:`clean_frame` applies it to a table up front
so that summaries can count exactly the nuclei that will be written.

Modules, one job each:

- :mod:`~wsi_nuclei.export._geometry`: nucleus UUIDs and geometry cleaning;
- :mod:`~wsi_nuclei.export._format`: the vectorised text of nucleus Features;
- :mod:`~wsi_nuclei.export._sink`: file names, atomic (gzipped) output streams;
- :mod:`~wsi_nuclei.export.geojson`: the nuclei GeoJSON (:func:`write_nuclei_geojson`);
- :mod:`~wsi_nuclei.export.parquet`: the nuclei GeoParquet (:func:`write_nuclei_parquet`);
- :mod:`~wsi_nuclei.export.annotations`: regions as annotations, their ids and nesting
  (:func:`write_regions_geojson`, :func:`region_annotation_ids`, :func:`region_parents`);
- :mod:`~wsi_nuclei.export.qupath`: the hierarchy file (:func:`write_qupath_geojson`);
- :mod:`~wsi_nuclei.export.validate` (+ :mod:`~wsi_nuclei.export._jsonstream`): the validator
  (:func:`check_qupath_geojson`).

The rules QuPath applies on GeoJSON import are documented in ``docs/qupath-geojson.md``
(shared); :func:`check_qupath_geojson` implements each of them. The QuPath measurement of each
column is part of the column table, :data:`wsi_nuclei.schema.MEASUREMENTS`.
"""

from wsi_nuclei.export._geometry import (
    NUCLEUS_NAMESPACE,
    clean_frame,
    clean_polygon,
    nucleus_uuid,
    nucleus_uuids,
)
from wsi_nuclei.export.annotations import (
    region_annotation_ids,
    region_parents,
    write_regions_geojson,
)
from wsi_nuclei.export.geojson import write_nuclei_geojson
from wsi_nuclei.export.parquet import write_nuclei_parquet
from wsi_nuclei.export.qupath import write_qupath_geojson
from wsi_nuclei.export.validate import check_qupath_geojson

__all__ = [
    "NUCLEUS_NAMESPACE",
    "nucleus_uuid",
    "nucleus_uuids",
    "clean_polygon",
    "clean_frame",
    "write_nuclei_geojson",
    "write_nuclei_parquet",
    "write_regions_geojson",
    "write_qupath_geojson",
    "region_annotation_ids",
    "region_parents",
    "check_qupath_geojson",
]

"""Tests of wsi_nuclei.export: QuPath GeoJSON, GeoParquet, region annotations, the validator."""

from __future__ import annotations

import gzip
import json
import math
import uuid
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import geopandas as gpd
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import shapely
from hypothesis import given, settings
from hypothesis import strategies as st
from shapely.geometry import MultiPolygon, Polygon, box

from wsi_nuclei import schema
from wsi_nuclei.export import (
    _format,
    _jsonstream,
    check_qupath_geojson,
    clean_frame,
    clean_polygon,
    nucleus_uuid,
    write_nuclei_geojson,
    write_nuclei_parquet,
    write_regions_geojson,
)

MORPH = [
    "area_um2",
    "perimeter_um",
    "circularity",
    "solidity",
    "eccentricity",
    "major_axis_um",
    "minor_axis_um",
]


@dataclass
class Region:
    id: int
    name: str
    geometry: Any
    source: str = "tissue"


def _ellipse(cx: float, cy: float, a: float, b: float, n: int = 24) -> Polygon:
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return Polygon(np.c_[cx + a * np.cos(t), cy + b * np.sin(t)])


def nucleus_frame(
    geoms: list[Any],
    class_ids: list[int] | None = None,
    region_ids: list[int] | None = None,
    areas: list[float] | None = None,
    seed: int = 0,
    fingerprint: str = "fp",
) -> pd.DataFrame:
    """A nucleus table with every schema column (random but reproducible measurements)."""
    rng = np.random.default_rng(seed)
    n = len(geoms)
    cx = np.array([g.centroid.x if g is not None and not g.is_empty else 0.0 for g in geoms])
    cy = np.array([g.centroid.y if g is not None and not g.is_empty else 0.0 for g in geoms])
    cls = np.array(class_ids if class_ids is not None else rng.integers(0, 6, n), np.int8)
    data: dict[str, Any] = {
        "id": [nucleus_uuid(fingerprint, x, y) for x, y in zip(cx, cy)],
        "block_row": np.zeros(n, np.int32),
        "block_col": np.arange(n, dtype=np.int32),
        "centroid_x": cx,
        "centroid_y": cy,
        "centroid_x_um": cx * 0.25,
        "centroid_y_um": cy * 0.25,
        "class_id": cls,
        "class_name": [schema.class_name(c) for c in cls],
        "class_prob": rng.uniform(0.3, 1, n).astype(np.float32),
    }
    for col in schema.PROB_COLUMNS:
        data[col] = rng.uniform(0, 1, n).astype(np.float32)
    for col in MORPH:
        data[col] = rng.uniform(0.1, 80, n).astype(np.float32)
    if areas is not None:
        data["area_um2"] = np.asarray(areas, np.float32)
    data["region_id"] = np.array(region_ids if region_ids is not None else np.zeros(n), np.int32)
    data["geometry"] = list(geoms)
    frame = pd.DataFrame(data)
    assert list(frame.columns) == list(schema.NUCLEUS_COLUMNS)
    return frame


def random_frames(n_frames: int, per_frame: int, seed: int = 0) -> list[pd.DataFrame]:
    out = []
    for k in range(n_frames):
        rng = np.random.default_rng(seed + k)
        geoms = [
            _ellipse(x, y, a, b)
            for x, y, a, b in zip(
                rng.uniform(0, 20000, per_frame),
                rng.uniform(0, 20000, per_frame),
                rng.uniform(2, 9, per_frame),
                rng.uniform(2, 9, per_frame),
            )
        ]
        out.append(
            nucleus_frame(geoms, region_ids=rng.integers(-1, 3, per_frame).tolist(), seed=seed + k)
        )
    return out


def read_geojson(path: Path) -> dict[str, Any]:
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as fh:
        return json.loads(fh.read().decode("ascii"), parse_constant=_no_constant)


def _no_constant(name: str) -> Any:
    raise AssertionError(f"non-strict JSON literal {name}")


def _r(value: float, decimals: int) -> float:
    """numpy's rounding (rint of the scaled value), without -0.0."""
    return float(np.round(value, decimals)) + 0.0


def reference_feature(row: pd.Series, poly: Polygon) -> dict[str, Any]:
    """What a nucleus Feature must hold, built independently with plain Python."""

    def rings(p: Polygon) -> list[list[list[float]]]:
        out = []
        for ring in [p.exterior, *p.interiors]:
            out.append([[_r(x, 2), _r(y, 2)] for x, y in ring.coords])
        return out

    measurements: dict[str, Any] = {}
    for col, (name, dec) in schema.MEASUREMENTS.items():
        v = float(row[col])
        if not math.isnan(v):
            measurements[name] = _r(v, dec) if dec else int(v)
    cid = int(row["class_id"])
    return {
        "type": "Feature",
        "id": row["id"],
        "geometry": {"type": "Polygon", "coordinates": rings(poly)},
        "properties": {
            "objectType": "detection",
            "classification": {
                "name": schema.class_name(cid),
                "color": list(schema.CLASS_COLORS[cid]),
            },
            "measurements": measurements,
        },
    }


# ------------------------------------------------------------------------------------------
# nucleus_uuid, clean_polygon
# ------------------------------------------------------------------------------------------


def test_nucleus_uuid_is_deterministic_uuid5() -> None:
    a = nucleus_uuid("slideA", 100.123, 200.5)
    assert a == nucleus_uuid("slideA", 100.123, 200.5)
    assert uuid.UUID(a).version == 5 and str(uuid.UUID(a)) == a
    assert a == nucleus_uuid("slideA", 100.1234, 200.4999)  # same 0.01 px cell
    assert a != nucleus_uuid("slideB", 100.123, 200.5)
    assert a != nucleus_uuid("slideA", 100.14, 200.5)
    assert nucleus_uuid("s", -0.001, 0.0) == nucleus_uuid("s", 0.0, 0.0)
    with pytest.raises(ValueError):
        nucleus_uuid("s", float("nan"), 1.0)


def test_nucleus_uuids_are_nucleus_uuid_of_each() -> None:
    from wsi_nuclei.export import nucleus_uuids

    rng = np.random.default_rng(7)
    xs = np.concatenate([rng.uniform(-5, 1e5, 2000), [0.0, -0.0, -0.004, 2.675, 1.005, 0.125]])
    ys = np.concatenate([rng.uniform(-5, 1e5, 2000), [-0.0, 0.0, 0.004, 1.115, 2.345, 0.375]])
    xs[:200] = np.round(xs[:200], 3)  # many values on the 0.005 half-way points
    want = [nucleus_uuid("fp-1", x, y) for x, y in zip(xs, ys)]
    assert nucleus_uuids("fp-1", xs, ys) == want
    assert nucleus_uuids("fp-1", xs[:0], ys[:0]) == []
    with pytest.raises(ValueError, match="finite"):
        nucleus_uuids("s", np.array([1.0, np.inf]), np.array([1.0, 2.0]))


def _two_decimals(geom: Polygon) -> bool:
    coords = shapely.get_coordinates(geom)
    return bool(np.all(np.round(coords, 2) == coords))


def test_clean_polygon_rounds_valid_polygon() -> None:
    p = _ellipse(1000.123456, 2000.987654, 5.5, 3.3)
    out = clean_polygon(p)
    assert isinstance(out, Polygon) and out.is_valid and _two_decimals(out)
    assert len(out.exterior.coords) == 25 and out.exterior.is_closed
    assert out.area == pytest.approx(p.area, rel=1e-3)


def test_clean_polygon_repairs_bowtie_keeping_largest_piece() -> None:
    bowtie = Polygon([(0, 0), (4, 4), (4, 0), (0, 3)])
    assert not bowtie.is_valid
    out = clean_polygon(bowtie)
    assert out is not None and out.is_valid and _two_decimals(out)
    pieces = shapely.make_valid(bowtie).geoms
    assert out.area == pytest.approx(max(g.area for g in pieces), abs=0.02)


def test_clean_polygon_checks_validity_after_rounding() -> None:
    # A notch 0.004 px above the bottom edge: valid as given, self-touching once rounded.
    notch = Polygon([(0, 0), (10, 0), (10, 10), (5, 0.004), (0, 10)])
    assert notch.is_valid
    rounded = shapely.transform(notch, lambda c: np.round(c, 2))
    assert not rounded.is_valid
    out = clean_polygon(notch)
    assert out is not None and out.is_valid and _two_decimals(out)
    assert out.area == pytest.approx(25.0)


@pytest.mark.parametrize(
    "geom",
    [
        None,
        Polygon(),
        box(10, 10, 10.003, 10.003),  # collapses on the 0.01 grid
        Polygon([(0, 0), (1, 1), (2, 2), (0, 0)]),  # zero area
        shapely.Point(1, 1),
    ],
)
def test_clean_polygon_drops_degenerate(geom: Any) -> None:
    assert clean_polygon(geom) is None


def test_clean_polygon_multipolygon_keeps_largest() -> None:
    mp = MultiPolygon([box(0, 0, 1, 1), box(5, 5, 8, 8)])
    out = clean_polygon(mp)
    assert out is not None and out.area == pytest.approx(9.0)


def test_clean_polygon_keeps_holes() -> None:
    p = Polygon(box(0, 0, 10, 10).exterior.coords, [box(2, 2, 4, 4).exterior.coords])
    out = clean_polygon(p)
    assert out is not None and len(out.interiors) == 1 and out.area == pytest.approx(96.0)


def test_clean_frame_counts_and_drops() -> None:
    geoms = [
        _ellipse(50, 50, 5, 4),
        box(0, 0, 0.001, 0.001),
        Polygon([(0, 0), (4, 4), (4, 0), (0, 3)]),
        None,
    ]
    frame = nucleus_frame([g if g is not None else box(0, 0, 1, 1) for g in geoms])
    frame["geometry"] = geoms
    cleaned, stats = clean_frame(frame)
    assert stats == {"n_in": 4, "n_repaired": 1, "n_dropped": 2}
    assert len(cleaned) == 2 and all(g.is_valid for g in cleaned["geometry"])
    assert list(cleaned["block_col"]) == [0, 2]


# ------------------------------------------------------------------------------------------
# The vectorised number formatter must print exactly what json.dumps prints
# ------------------------------------------------------------------------------------------


def _texts(values: np.ndarray, decimals: int) -> list[str]:
    chars, mask = _format._number_chars(values, decimals)
    return [bytes(c[m]).decode() for c, m in zip(chars, mask)]


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.floats(min_value=-2e6, max_value=2e6, allow_nan=False), min_size=1, max_size=50),
    st.sampled_from([0, 2, 4]),
)
def test_number_chars_match_json(values: list[float], decimals: int) -> None:
    arr = np.array(values)
    if decimals == 0:
        expected = [json.dumps(int(np.rint(v))) for v in arr]
    else:
        expected = [json.dumps(_r(v, decimals)) for v in arr]
    assert _texts(arr, decimals) == expected


def test_number_chars_edge_cases() -> None:
    values = np.array(
        [0.0, -0.0, -0.004, 0.005, 12.0, 0.5, -3.25, 1e13, 123456.789, np.nan, np.inf]
    )
    texts = _texts(values, 2)
    assert texts[:9] == [json.dumps(_r(v, 2)) for v in values[:9]]
    assert texts[:5] == ["0.0", "0.0", "0.0", "0.0", "12.0"]
    assert texts[9:] == ["", ""]  # non-finite: masked out entirely
    assert _texts(np.array([1e300]), 2) == [repr(round(1e300, 2))]  # slow exact path


# ------------------------------------------------------------------------------------------
# write_nuclei_geojson
# ------------------------------------------------------------------------------------------


def test_geojson_features_match_reference(tmp_path: Path) -> None:
    geoms = [
        _ellipse(100.123, 200.456, 6, 4),
        Polygon(box(0, 0, 10, 10).exterior.coords, [box(2, 2, 4, 4).exterior.coords]),
        _ellipse(123456.78, 98765.4321, 3, 3, n=7),
        box(-5.5, -5.25, -1, -1),
        _ellipse(50, 50, 5, 5),
        _ellipse(70, 70, 5, 5),
    ]
    frame = nucleus_frame(geoms, class_ids=[1, 2, 3, 4, 5, 0], region_ids=[0, 1, -1, 0, 1, 0])
    for col in schema.PROB_COLUMNS:  # a model without class head: NaN probabilities
        frame.loc[5, col] = np.nan
    frame.loc[4, "solidity"] = np.nan
    frame.loc[4, "area_um2"] = 12.0
    stats = write_nuclei_geojson([frame], tmp_path / "n.geojson", gzip=False)
    assert stats["n_features"] == 6 and stats["n_dropped"] == 0
    text = (tmp_path / "n.geojson").read_text("ascii")
    lines = text.splitlines()
    assert lines[0] == '{"type":"FeatureCollection","features":['
    assert lines[-1] == "]}"
    body = [ln.rstrip(",") for ln in lines[1:-1]]
    assert len(body) == 6
    for i, line in enumerate(body):
        expected = reference_feature(frame.iloc[i], clean_polygon(geoms[i]))
        assert json.loads(line) == expected
        # byte-identical to json.dumps of the reference: same key order, same number text
        assert line == json.dumps(expected, separators=(",", ":"))
    doc = json.loads(text)
    props = [f["properties"] for f in doc["features"]]
    assert props[5]["classification"] == {"name": "Nucleus", "color": [128, 128, 128]}
    assert not any(k.startswith("Prob:") for k in props[5]["measurements"])
    assert "Nucleus: Solidity" not in props[4]["measurements"]
    assert props[4]["measurements"]["Nucleus: Area µm^2"] == 12.0
    assert props[2]["measurements"]["Region ID"] == -1
    assert set(props[0]["measurements"]) == {name for name, _ in schema.MEASUREMENTS.values()}
    assert "\\u00b5" in text and "µ" not in text  # ASCII output, µ escaped


def test_geojson_gz_passes_validator_and_is_deterministic(tmp_path: Path) -> None:
    frames = random_frames(3, 400)
    a = write_nuclei_geojson(
        iter(frames),
        tmp_path / "a.geojson.gz",
        metadata={"slide": "x.svs", "frame": "level-0, bounds subtracted"},
    )
    b = write_nuclei_geojson(
        (f for f in frames),
        tmp_path / "b.geojson.gz",
        metadata={"frame": "level-0, bounds subtracted", "slide": "x.svs"},
    )
    assert a["n_features"] == b["n_features"] == 1200
    assert (tmp_path / "a.geojson.gz").read_bytes() == (tmp_path / "b.geojson.gz").read_bytes()
    raw = (tmp_path / "a.geojson.gz").read_bytes()
    assert raw[:2] == b"\x1f\x8b" and raw[4:8] == b"\0\0\0\0"  # mtime 0
    assert check_qupath_geojson(tmp_path / "a.geojson.gz") == []
    doc = read_geojson(tmp_path / "a.geojson.gz")
    assert doc["metadata"] == {"frame": "level-0, bounds subtracted", "slide": "x.svs"}
    assert len(doc["features"]) == 1200
    ids = [f["id"] for f in doc["features"]]
    assert ids == [i for f in frames for i in f["id"]]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.geojson.gz", "b.geojson.gz"]


def test_geojson_one_big_frame_is_sliced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_format, "_FORMAT_BATCH", 37)
    frame = random_frames(1, 300, seed=3)[0]
    write_nuclei_geojson(frame, tmp_path / "one.geojson", gzip=False)
    monkeypatch.setattr(_format, "_FORMAT_BATCH", 10_000)
    write_nuclei_geojson([frame], tmp_path / "two.geojson", gzip=False)
    assert (tmp_path / "one.geojson").read_bytes() == (tmp_path / "two.geojson").read_bytes()


def test_geojson_drops_and_repairs(tmp_path: Path) -> None:
    geoms = [
        _ellipse(10, 10, 3, 3),
        box(0, 0, 0.002, 0.002),
        Polygon([(0, 0), (4, 4), (4, 0), (0, 3)]),
        _ellipse(30, 30, 3, 3),
    ]
    frame = nucleus_frame(geoms)
    stats = write_nuclei_geojson([frame], tmp_path / "d.geojson.gz")
    assert (stats["n_features"], stats["n_repaired"], stats["n_dropped"]) == (3, 1, 1)
    doc = read_geojson(tmp_path / "d.geojson.gz")
    assert [f["id"] for f in doc["features"]] == [frame["id"][i] for i in (0, 2, 3)]
    assert check_qupath_geojson(tmp_path / "d.geojson.gz") == []


def test_geojson_empty_and_names(tmp_path: Path) -> None:
    stats = write_nuclei_geojson([], tmp_path / "e.geojson")
    assert stats["path"].endswith("e.geojson.gz") and stats["n_features"] == 0
    assert read_geojson(tmp_path / "e.geojson.gz") == {"type": "FeatureCollection", "features": []}
    assert check_qupath_geojson(tmp_path / "e.geojson.gz") == []
    with pytest.raises(ValueError, match="geojson"):
        write_nuclei_geojson([], tmp_path / "e.txt")
    with pytest.raises(ValueError):
        write_nuclei_geojson([], tmp_path / "e.geojson", metadata={"x": float("nan")})


def test_geojson_failure_leaves_no_file(tmp_path: Path) -> None:
    good = random_frames(1, 5)[0]
    bad = good.drop(columns=["class_id"])
    with pytest.raises(ValueError, match="class_id"):
        write_nuclei_geojson([good, bad], tmp_path / "f.geojson.gz")
    assert list(tmp_path.iterdir()) == []


def test_geojson_omits_non_uuid_ids(tmp_path: Path) -> None:
    frame = random_frames(1, 3)[0]
    frame["id"] = ["not-a-uuid", None, frame["id"][2]]
    write_nuclei_geojson([frame], tmp_path / "i.geojson", gzip=False)
    feats = read_geojson(tmp_path / "i.geojson")["features"]
    assert ["id" in f for f in feats] == [False, False, True]
    assert check_qupath_geojson(tmp_path / "i.geojson") == []


# ------------------------------------------------------------------------------------------
# write_nuclei_parquet
# ------------------------------------------------------------------------------------------


def test_parquet_geoparquet_roundtrip(tmp_path: Path) -> None:
    frames = random_frames(3, 50, seed=7)
    frames[1].loc[3, "geometry"] = box(0, 0, 0.001, 0.001)  # dropped, as in the GeoJSON
    stats = write_nuclei_parquet(iter(frames), tmp_path / "n.parquet", row_group_size=60)
    assert stats["n_features"] == 149 and stats["n_dropped"] == 1
    pf = pq.ParquetFile(tmp_path / "n.parquet")
    assert pf.metadata.num_row_groups == stats["row_groups"] >= 2
    geo = json.loads(pq.read_schema(tmp_path / "n.parquet").metadata[b"geo"])
    assert geo["version"] in ("1.0.0", "1.1.0") and geo["primary_column"] == "geometry"
    col = geo["columns"]["geometry"]
    assert col["encoding"] == "WKB" and col["geometry_types"] == ["Polygon"]
    assert "crs" in col and col["crs"] is None
    gdf = gpd.read_parquet(tmp_path / "n.parquet")
    assert gdf.crs is None and len(gdf) == 149
    assert list(gdf.columns) == list(schema.NUCLEUS_COLUMNS)
    for name, dtype in schema.NUCLEUS_COLUMNS.items():
        if dtype in ("int8", "int32", "float32", "float64"):
            assert gdf[name].dtype == np.dtype(dtype), name
    assert pf.schema_arrow.field("id").type == "string"
    assert col["bbox"] == pytest.approx(list(gdf.total_bounds))
    expected = pd.concat(frames, ignore_index=True).drop(index=50 + 3).reset_index(drop=True)
    assert list(gdf["id"]) == list(expected["id"])
    np.testing.assert_array_equal(gdf["class_prob"], expected["class_prob"])
    cleaned = [clean_polygon(g) for g in expected["geometry"]]
    assert all(a.equals_exact(b, 0) for a, b in zip(gdf.geometry, cleaned))
    # the same nuclei as the GeoJSON
    write_nuclei_geojson(frames, tmp_path / "n.geojson.gz")
    assert [f["id"] for f in read_geojson(tmp_path / "n.geojson.gz")["features"]] == list(gdf["id"])


def test_parquet_empty_and_missing_columns(tmp_path: Path) -> None:
    stats = write_nuclei_parquet([], tmp_path / "e.parquet")
    assert stats["n_features"] == 0 and stats["bbox"] is None
    gdf = gpd.read_parquet(tmp_path / "e.parquet")
    assert len(gdf) == 0 and list(gdf.columns) == list(schema.NUCLEUS_COLUMNS)
    bad = random_frames(1, 3)[0].drop(columns=["solidity"])
    with pytest.raises(ValueError, match="solidity"):
        write_nuclei_parquet([bad], tmp_path / "b.parquet")
    assert not (tmp_path / "b.parquet").exists()


# ------------------------------------------------------------------------------------------
# write_regions_geojson
# ------------------------------------------------------------------------------------------


def test_regions_geojson(tmp_path: Path) -> None:
    @dataclass
    class UserRegion(Region):
        classification: Any = None

    regions = [
        Region(0, "tissue 1", box(0, 0, 4000.004, 4000)),
        Region(1, "tissue 2", MultiPolygon([box(5000, 0, 6000, 1000), box(7000, 0, 8000, 1000)])),
        UserRegion(
            2,
            "tumour",
            box(100, 100, 200, 200),
            source="user",
            classification={"name": "Tumor", "color": [200, 0, 0]},
        ),
        UserRegion(3, "other", box(300, 300, 400, 400), source="user", classification="Stroma"),
    ]
    summaries = {
        "regions": [
            {
                "region_id": 0,
                "area_mm2": 1.0,
                "n_nuclei": 4,
                "counts": {"Neoplastic": 2},
                "fractions": {"Neoplastic": 0.5},
                "density_per_mm2": {"total": 4.0, "Neoplastic": 2.0},
                "area_um2": {"all": {"median": 25.0, "q25": 17.5, "q75": None}},
            },
        ]
    }
    stats = write_regions_geojson(regions, summaries, tmp_path / "regions.geojson")
    assert stats["n_features"] == 4
    assert check_qupath_geojson(tmp_path / "regions.geojson") == []
    feats = read_geojson(tmp_path / "regions.geojson")["features"]
    p0 = feats[0]["properties"]
    assert p0["objectType"] == "annotation" and p0["name"] == "tissue 1"
    assert p0["classification"]["name"] == "Tissue"
    assert p0["measurements"] == {
        "Area mm^2": 1.0,
        "Num nuclei": 4,
        "Num Neoplastic": 2,
        "Fraction Neoplastic": 0.5,
        "Density nuclei per mm^2": 4.0,
        "Density Neoplastic per mm^2": 2.0,
        "Nucleus area µm^2 median": 25.0,
        "Nucleus area µm^2 q25": 17.5,
    }
    assert p0["metadata"] == {"region_id": "0", "source": "tissue"}
    assert feats[0]["geometry"]["coordinates"][0][1][0] == 4000.0
    assert feats[1]["geometry"]["type"] == "MultiPolygon"
    assert feats[1]["properties"]["measurements"] == {}
    assert feats[2]["properties"]["classification"] == {"name": "Tumor", "color": [200, 0, 0]}
    assert feats[3]["properties"]["classification"]["name"] == "Stroma"
    assert len(set(f["id"] for f in feats)) == 4
    # parts that touch once snapped to the grid are merged; UUID region ids are kept
    rid = "0f8fad5b-d9cb-469f-a165-70867728950e"
    touching = Region(rid, "t", MultiPolygon([box(0, 0, 1, 1), box(1.001, 0, 2, 1)]))
    write_regions_geojson([touching], None, tmp_path / "t.geojson.gz")
    assert check_qupath_geojson(tmp_path / "t.geojson.gz") == []
    feat = read_geojson(tmp_path / "t.geojson.gz")["features"][0]
    assert feat["id"] == rid and shapely.geometry.shape(feat["geometry"]).area == pytest.approx(2.0)
    write_regions_geojson(regions, summaries, tmp_path / "again.geojson")
    assert (tmp_path / "again.geojson").read_bytes() == (tmp_path / "regions.geojson").read_bytes()


# ------------------------------------------------------------------------------------------
# check_qupath_geojson: our files pass, each broken rule is caught
# ------------------------------------------------------------------------------------------


def good_feature() -> dict[str, Any]:
    return {
        "type": "Feature",
        "id": "0f8fad5b-d9cb-469f-a165-70867728950e",
        "geometry": {
            "type": "Polygon",
            "coordinates": [[[0, 0], [10.5, 0], [10.5, 10.25], [0, 10.25], [0, 0]]],
        },
        "properties": {
            "objectType": "detection",
            "classification": {"name": "Neoplastic", "color": [255, 0, 0]},
            "measurements": {"Nucleus: Area µm^2": 31.2, "Other": "NaN", "Inf": "-inf"},
        },
    }


def _collection(*features: dict[str, Any]) -> dict[str, Any]:
    return {"type": "FeatureCollection", "features": list(features)}


def _write(path: Path, obj: Any) -> Path:
    text = obj if isinstance(obj, str) else json.dumps(obj)
    if path.name.endswith(".gz"):
        path.write_bytes(gzip.compress(text.encode()))
    else:
        path.write_text(text)
    return path


def _mutated(fn) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    feat = good_feature()
    fn(feat)
    return _collection(feat)


BAD_FEATURES = {
    "objectType outside": (
        lambda f: f.update(objectType=f["properties"].pop("objectType")),
        "outside properties",
    ),
    "objectType missing": (lambda f: f["properties"].pop("objectType"), "objectType missing"),
    "snake_case": (
        lambda f: f["properties"].update(object_type=f["properties"].pop("objectType")),
        "snake_case",
    ),
    "objectType value": (lambda f: f["properties"].update(objectType="nucleus"), "objectType"),
    "no color": (lambda f: f["properties"]["classification"].pop("color"), "no 'color'"),
    "color 2 ints": (
        lambda f: f["properties"]["classification"].update(color=[1, 2]),
        "3 or 4 integers",
    ),
    "color floats": (
        lambda f: f["properties"]["classification"].update(color=[1.0, 2, 3]),
        "3 or 4 integers",
    ),
    "no class name": (lambda f: f["properties"]["classification"].pop("name"), "'name'"),
    "class colon": (lambda f: f["properties"]["classification"].update(name="Tumor: A"), "':'"),
    "class string colon": (lambda f: f["properties"].update(classification="Tumor: A"), "':'"),
    "measurement string": (
        lambda f: f["properties"]["measurements"].update(x="abc"),
        "not a number",
    ),
    "measurement null": (lambda f: f["properties"]["measurements"].update(x=None), "not a number"),
    "measurements not object": (
        lambda f: f["properties"].update(measurements=3),
        "measurements must be",
    ),
    "id not uuid": (lambda f: f.update(id="nucleus-7"), "not a UUID"),
    "id int": (lambda f: f.update(id=7), "not a UUID"),
    "point": (
        lambda f: f.update(geometry={"type": "Point", "coordinates": [1, 2]}),
        "geometry type",
    ),
    "no geometry": (lambda f: f.update(geometry=None), "geometry missing"),
    "unclosed ring": (lambda f: f["geometry"]["coordinates"][0].pop(), "not closed"),
    "3 points": (lambda f: f["geometry"].update(coordinates=[[[0, 0], [1, 0], [0, 0]]]), ">= 4"),
    "3 decimals": (
        lambda f: f["geometry"]["coordinates"][0].__setitem__(1, [10.125, 0]),
        "decimals",
    ),
    "bowtie": (
        lambda f: f["geometry"].update(coordinates=[[[0, 0], [4, 4], [4, 0], [0, 4], [0, 0]]]),
        "invalid after snapping",
    ),
    "multipolygon overlap": (
        lambda f: f.update(
            geometry={
                "type": "MultiPolygon",
                "coordinates": [
                    [[[0, 0], [2, 0], [2, 2], [0, 2], [0, 0]]],
                    [[[1, 1], [3, 1], [3, 3], [1, 3], [1, 1]]],
                ],
            }
        ),
        "invalid after snapping",
    ),
    "not a feature": (lambda f: f.update(type="Thing"), "not a GeoJSON Feature"),
    "bool coordinate": (
        lambda f: f["geometry"]["coordinates"][0].__setitem__(1, [True, 0]),
        "not an array of numbers",
    ),
    "string coordinate": (
        lambda f: f["geometry"]["coordinates"][0].__setitem__(1, ["1", 0]),
        "not an array of numbers",
    ),
    "short position": (
        lambda f: f["geometry"]["coordinates"][0].__setitem__(1, [1]),
        ">= 2 numbers",
    ),
    "empty multipolygon": (
        lambda f: f.update(geometry={"type": "MultiPolygon", "coordinates": []}),
        "empty",
    ),
}


def test_validator_accepts_good_files(tmp_path: Path) -> None:
    assert check_qupath_geojson(_write(tmp_path / "ok.geojson", _collection(good_feature()))) == []
    assert check_qupath_geojson(_write(tmp_path / "ok.json.gz", _collection(good_feature()))) == []
    feat = good_feature()
    feat["properties"]["measurements"] = [{"name": "a", "value": 1.5}]
    feat["geometry"] = {
        "type": "MultiPolygon",
        "coordinates": [
            [[[0, 0], [2, 0], [2, 2], [0, 2], [0, 0]]],
            [[[5, 5], [6, 5], [6, 6], [5, 5]]],
        ],
    }
    assert check_qupath_geojson(_write(tmp_path / "mp.geojson", _collection(feat))) == []
    feat = good_feature()  # 3D positions are fine
    feat["geometry"]["coordinates"][0][1] = [10.5, 0, 3.25]
    assert check_qupath_geojson(_write(tmp_path / "z.geojson", _collection(feat))) == []
    with zipfile.ZipFile(tmp_path / "ok.zip", "w") as zf:
        zf.writestr("inner/ok.geojson", json.dumps(_collection(good_feature())))
    assert check_qupath_geojson(tmp_path / "ok.zip") == []
    # QuPath's own annotation exports: a bare array, accepted when not requiring a collection
    arr = _write(tmp_path / "arr.geojson", [good_feature()])
    assert check_qupath_geojson(arr, require_feature_collection=False) == []


@pytest.mark.parametrize("name", sorted(BAD_FEATURES))
def test_validator_catches_each_feature_rule(tmp_path: Path, name: str) -> None:
    mutate, keyword = BAD_FEATURES[name]
    problems = check_qupath_geojson(_write(tmp_path / "bad.geojson", _mutated(mutate)))
    assert problems, name
    assert any(keyword in p for p in problems), problems
    assert all(p.startswith("features[0]") for p in problems)


def test_validator_snapping_catches_near_touching_ring(tmp_path: Path) -> None:
    # valid as written with 3 decimals... but both rules apply: decimals and snapped validity
    feat = good_feature()
    feat["geometry"]["coordinates"] = [[[0, 0], [10, 0], [10, 10], [5, 0.004], [0, 10], [0, 0]]]
    problems = check_qupath_geojson(_write(tmp_path / "n.geojson", _collection(feat)))
    assert any("decimals" in p for p in problems)
    # and with 2 decimals a ring touching itself is reported
    feat["geometry"]["coordinates"] = [[[0, 0], [10, 0], [10, 10], [5, 0], [0, 10], [0, 0]]]
    problems = check_qupath_geojson(_write(tmp_path / "t.geojson", _collection(feat)))
    assert any("invalid after snapping" in p for p in problems)


@pytest.mark.parametrize(
    "filename, content, keyword",
    [
        ("x.txt", None, "extension"),
        ("x.txt.gz", None, "inner extension"),
        ("x.geojson.snappy", None, "extension"),
        ("x.geojson.gz", "plain", "not gzip-compressed"),
        ("x.geojson", "gzipped", "not named .gz"),
        (
            "x.geojson",
            '{"type": "FeatureCollection", "features": [{"type": "Feature", '
            '"geometry": null, "properties": {"measurements": {"a": NaN}}}]}',
            "strict JSON",
        ),
        ("x.geojson", '{"type": "FeatureCollection", "features": [],}', "not valid JSON"),
        (
            "x.geojson",
            '{"type": "FeatureCollection", "features": [{"type": "Feature", '
            '"geometry": {"type": "Polygon", "coordinates": [[[0, 0], [1e400, 0], '
            '[1, 1], [0, 0]]]}, "properties": {"objectType": "detection"}}]}',
            "non-finite",
        ),
        ("x.geojson", '{"type": "FeatureCollection", "features": [', "not valid JSON"),
        ("x.geojson", '{"type": "FeatureCollection", "features": []} []', "extra data"),
        ("x.geojson", "ARRAY", "JSON array"),
        ("x.geojson", '{"type": "Feature", "geometry": null, "properties": {}}', "single Feature"),
        ("x.geojson", '{"type": "Polygon", "coordinates": []}', "expected FeatureCollection"),
        ("x.geojson", '{"type": "FeatureCollection"}', "no 'features'"),
        ("x.geojson", '"just a string"', "not a GeoJSON object"),
        ("x.geojson", b"\xff\xfe{}", "UTF-8"),
        ("x.zip", "notzip", "not a zip"),
    ],
)
def test_validator_catches_file_rules(
    tmp_path: Path, filename: str, content: Any, keyword: str
) -> None:
    path = tmp_path / filename
    good = json.dumps(_collection(good_feature()))
    if content is None:
        _write(path, good) if not filename.endswith(".gz") else path.write_bytes(
            gzip.compress(good.encode())
        )
    elif content == "plain":
        path.write_text(good)
    elif content == "gzipped":
        path.write_bytes(gzip.compress(good.encode()))
    elif content == "ARRAY":
        path.write_text(json.dumps([good_feature()]))
    elif content == "notzip":
        path.write_text(good)
    elif isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    problems = check_qupath_geojson(path)
    assert any(keyword in p for p in problems), problems


def test_validator_zip_without_geojson_and_missing_file(tmp_path: Path) -> None:
    with zipfile.ZipFile(tmp_path / "e.zip", "w") as zf:
        zf.writestr("readme.txt", "hi")
    assert any("no .geojson" in p for p in check_qupath_geojson(tmp_path / "e.zip"))
    assert check_qupath_geojson(tmp_path / "missing.geojson")[0].endswith("no such file")


def test_validator_caps_problems(tmp_path: Path) -> None:
    feats = []
    for _ in range(30):
        f = good_feature()
        f["id"] = "x"
        feats.append(f)
    problems = check_qupath_geojson(
        _write(tmp_path / "m.geojson", _collection(*feats)), max_problems=5
    )
    assert len(problems) == 6 and problems[-1] == "... and 25 more problem(s)"


def test_validator_streams_across_chunk_boundaries(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    frames = random_frames(1, 60, seed=11)
    write_nuclei_geojson(frames, tmp_path / "s.geojson", gzip=False)
    bad = _write(tmp_path / "bad.geojson", _mutated(BAD_FEATURES["3 decimals"][0]))
    expected_bad = check_qupath_geojson(bad)
    for chunk in (1, 7, 4096):
        monkeypatch.setattr(_jsonstream._JsonStream, "_CHUNK", chunk)
        assert check_qupath_geojson(tmp_path / "s.geojson") == []
        assert check_qupath_geojson(bad) == expected_bad


def test_coordinates_of_a_read_only_geometry_array() -> None:
    """pandas 3 (copy-on-write) returns read-only arrays; shapely < 2.2's to_ragged_array
    rejected them ("buffer source array is read-only") and the GeoJSON writers failed."""
    from wsi_nuclei.export._format import _coordinates_text

    polys = np.array([box(0, 0, 2, 1), box(5, 5, 6, 7)], dtype=object)
    polys.flags.writeable = False
    text, offsets = _coordinates_text(polys)
    first = json.loads(text[offsets[0] : offsets[1]].decode())
    assert first[0][0] == first[0][-1] and len(first[0]) == 5
    assert sorted(map(tuple, first[0][:4])) == [(0, 0), (0, 1), (2, 0), (2, 1)]

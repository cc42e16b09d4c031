"""Tests for wsi_nuclei.regions: QuPath regions files, assigning points to regions."""

from __future__ import annotations

import gzip
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import shapely
from shapely.geometry import MultiPolygon, Polygon, box

from wsi_nuclei.errors import RegionsFileError
from wsi_nuclei.regions import Region, assign_regions, load_regions, regions_from_geojson


# --------------------------------------------------------------------------------------------
# load_regions
# --------------------------------------------------------------------------------------------
def _feature(geometry: dict, **props) -> dict:
    return {
        "type": "Feature",
        "id": "5c2b7a5e-0000-4000-8000-000000000000",
        "geometry": geometry,
        "properties": {"objectType": "annotation", **props},
    }


def _qupath_features() -> list[dict]:
    square_with_hole = {
        "type": "Polygon",
        "coordinates": [
            [[0, 0], [100, 0], [100, 100], [0, 100], [0, 0]],
            [[25, 25], [75, 25], [75, 75], [25, 75], [25, 25]],
        ],
    }
    two_squares = {
        "type": "MultiPolygon",
        "coordinates": [
            [[[200, 0], [250, 0], [250, 50], [200, 50], [200, 0]]],
            [[[300, 0], [340, 0], [340, 40], [300, 40], [300, 0]]],
        ],
    }
    return [
        _feature(
            square_with_hole,
            name="Tumour core",
            classification={"name": "Tumor", "color": [200, 0, 0]},
            isLocked=False,
        ),
        {  # a detection from a previous run: ignored
            "type": "Feature",
            "geometry": {"type": "Polygon", "coordinates": [[[1, 1], [2, 1], [2, 2], [1, 1]]]},
            "properties": {"objectType": "detection"},
        },
        _feature(two_squares, classification={"name": "Stroma", "color": [150, 200, 150]}),
        _feature({"type": "Point", "coordinates": [5, 5]}, name="a point"),
        _feature({"type": "LineString", "coordinates": [[0, 0], [9, 9]]}),
        _feature(
            {"type": "Polygon", "coordinates": [[[0, 200], [60, 200], [60, 260], [0, 260]]]},
            classification="Immune cells",
        ),  # unclosed ring: QuPath-lenient, repaired
    ]


def _check_qupath_regions(regions: list[Region]) -> None:
    assert [r.id for r in regions] == [1, 2, 3]
    assert [r.name for r in regions] == ["Tumour core", "Stroma", "Immune cells"]
    assert [r.classification for r in regions] == ["Tumor", "Stroma", "Immune cells"]
    assert [r.color for r in regions] == [(200, 0, 0), (150, 200, 150), None]
    assert all(r.source == "user" and r.geometry.is_valid for r in regions)
    core, stroma, immune = regions
    assert isinstance(core.geometry, Polygon) and len(core.geometry.interiors) == 1
    assert core.area_px == pytest.approx(100 * 100 - 50 * 50)
    assert isinstance(stroma.geometry, MultiPolygon) and len(stroma.geometry.geoms) == 2
    assert stroma.area_px == pytest.approx(50 * 50 + 40 * 40)
    assert immune.area_px == pytest.approx(3600)


def test_load_regions_array_form(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "regions.json"
    path.write_text(json.dumps(_qupath_features(), indent=2))
    with caplog.at_level(logging.WARNING, logger="wsi_nuclei.regions"):
        regions = load_regions(path)
    _check_qupath_regions(regions)
    assert "ignored 1 detection" in caplog.text and "2 feature(s) without an area" in caplog.text


def test_load_regions_feature_collection_gz(tmp_path: Path) -> None:
    path = tmp_path / "regions.geojson.gz"
    doc = {"type": "FeatureCollection", "features": _qupath_features()}
    path.write_bytes(gzip.compress(json.dumps(doc).encode()))
    _check_qupath_regions(load_regions(path))
    plain = tmp_path / "regions.geojson"
    plain.write_text(json.dumps(doc))
    _check_qupath_regions(load_regions(str(plain)))


def test_load_regions_single_feature_offset_and_names(tmp_path: Path) -> None:
    path = tmp_path / "one.geojson"
    feat = _feature({"type": "Polygon", "coordinates": [[[0, 0], [10, 0], [10, 10], [0, 0]]]})
    del feat["properties"]["objectType"]  # annotation by default
    path.write_text(json.dumps(feat))
    (region,) = load_regions(path, offset=(100.0, -5.0))
    assert region.name == "Region 1" and region.classification is None and region.color is None
    assert region.bounds == pytest.approx((100.0, -5.0, 110.0, 5.0))
    # derived classes (QuPath "names") and packed integer colours
    doc = [
        _feature(
            {"type": "Polygon", "coordinates": [[[0, 0], [10, 0], [10, 10], [0, 0]]]},
            classification={"names": ["Tumor", "Positive"], "color": -65536},
        )
    ]
    (region,) = regions_from_geojson(doc)
    assert region.classification == "Tumor: Positive" and region.color == (255, 0, 0)


def test_load_regions_repairs_a_bow_tie(tmp_path: Path) -> None:
    path = tmp_path / "bowtie.geojson"
    bow = {"type": "Polygon", "coordinates": [[[0, 0], [10, 10], [10, 0], [0, 10], [0, 0]]]}
    path.write_text(json.dumps([_feature(bow)]))
    (region,) = load_regions(path)
    assert region.geometry.is_valid and region.area_px == pytest.approx(50.0)


@pytest.mark.parametrize(
    ("name", "content", "fragment"),
    [
        ("empty.geojson", b"", "empty"),
        ("garbage.geojson", b"{not json,,", "not valid JSON"),
        ("binary.geojson", b"\xff\xfe\x00\x81\x92", "not UTF-8"),
        ("notgeo.json", json.dumps({"foo": 1}).encode(), "not GeoJSON"),
        ("number.json", b"42", "not GeoJSON"),
        ("nofeatures.geojson", json.dumps({"type": "FeatureCollection"}).encode(), "features"),
        (
            "emptyfc.geojson",
            json.dumps({"type": "FeatureCollection", "features": []}).encode(),
            "no features",
        ),
        (
            "onlydetections.geojson",
            json.dumps(
                [
                    {
                        "type": "Feature",
                        "geometry": {
                            "type": "Polygon",
                            "coordinates": [[[0, 0], [5, 0], [5, 5], [0, 0]]],
                        },
                        "properties": {"objectType": "detection"},
                    }
                ]
            ).encode(),
            "no polygon annotations",
        ),
        (
            "short_ring.geojson",
            json.dumps(
                [_feature({"type": "Polygon", "coordinates": [[[0, 0], [5, 0], [0, 0]]]})]
            ).encode(),
            "feature 1",
        ),
        (
            "flat.geojson",
            json.dumps(
                [_feature({"type": "Polygon", "coordinates": [[[0, 0], [5, 0], [9, 0], [0, 0]]]})]
            ).encode(),
            "cannot be repaired",
        ),
        (
            "nan.geojson",
            b'[{"type": "Feature", "geometry": {"type": "Polygon", "coordinates": '
            b'[[[0, 0], [NaN, 0], [5, 5], [0, 0]]]}, "properties": {}}]',
            "non-finite",
        ),
        (
            "badtype.geojson",
            json.dumps([_feature({"type": "Circle", "coordinates": [0, 0]})]).encode(),
            "unknown geometry type",
        ),
        ("notfeature.geojson", json.dumps([1, 2]).encode(), "not a GeoJSON Feature"),
        ("bad.geojson.gz", b"\x1f\x8b\x08\x00garbage", "gzip"),
        ("plain.geojson.gz", json.dumps([]).encode(), "not gzip"),
    ],
)
def test_malformed_regions_files(tmp_path: Path, name: str, content: bytes, fragment: str) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(RegionsFileError) as info:
        load_regions(path)
    message = str(info.value)
    assert "\n" not in message
    assert str(path) in message
    assert fragment in message


def test_missing_regions_file(tmp_path: Path) -> None:
    with pytest.raises(RegionsFileError, match="not found"):
        load_regions(tmp_path / "nope.geojson")


# --------------------------------------------------------------------------------------------
# assign_regions
# --------------------------------------------------------------------------------------------
def _region(rid: int, geom) -> Region:
    return Region(
        id=rid, name=f"R{rid}", geometry=geom, source="user", classification=None, color=None
    )


def test_assign_regions_hand_placed_points() -> None:
    donut = Polygon(
        [(0, 0), (100, 0), (100, 100), (0, 100)], [[(40, 40), (60, 40), (60, 60), (40, 60)]]
    )
    regions = [
        _region(1, donut),
        _region(2, box(80, 80, 150, 150)),  # overlaps the donut's corner
        _region(3, MultiPolygon([box(200, 0, 210, 10), box(220, 0, 230, 10)])),
    ]
    pts = {
        (10, 10): 1,
        (50, 50): -1,  # in the donut's hole
        (90, 90): 1,  # overlap: first region wins
        (120, 120): 2,
        (205, 5): 3,
        (225, 5): 3,
        (215, 5): -1,  # between the two parts of the MultiPolygon
        (-5, 50): -1,
        (100, 50): 1,  # on the boundary
    }
    x = np.array([p[0] for p in pts], float)
    y = np.array([p[1] for p in pts], float)
    out = assign_regions(x, y, regions)
    assert out.dtype == np.int32
    assert out.tolist() == list(pts.values())
    # order matters where regions overlap
    assert assign_regions([90.0], [90.0], [regions[1], regions[0]]).tolist() == [2]
    # shape is kept; empty inputs
    grid = assign_regions(x.reshape(3, 3), y.reshape(3, 3), regions)
    assert grid.shape == (3, 3) and grid.ravel().tolist() == list(pts.values())
    assert assign_regions(x, y, []).tolist() == [-1] * len(pts)
    assert assign_regions(np.array([]), np.array([]), regions).shape == (0,)


def test_assign_regions_many_points_matches_scalar_test() -> None:
    rng = np.random.default_rng(3)
    regions = [
        _region(1, Polygon([(0, 0), (400, 50), (300, 400), (50, 300)])),
        _region(2, box(250, 250, 500, 500)),
    ]
    x = rng.uniform(-50, 550, 5000)
    y = rng.uniform(-50, 550, 5000)
    out = assign_regions(x, y, regions)
    p0 = shapely.intersects_xy(regions[0].geometry, x, y)
    p1 = shapely.intersects_xy(regions[1].geometry, x, y)
    expected = np.where(p0, 1, np.where(p1, 2, -1))
    assert np.array_equal(out, expected)


def test_region_is_frozen() -> None:
    r = _region(1, box(0, 0, 2, 3))
    assert r.area_px == 6.0
    with pytest.raises(AttributeError):
        r.id = 2  # type: ignore[misc]


# --------------------------------------------------------------------------------------------
# fuzzing the regions parser: any JSON is either regions or one RegionsFileError
# --------------------------------------------------------------------------------------------
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_fz_num = st.one_of(
    st.integers(-(10**6), 10**6),
    st.floats(allow_nan=True, allow_infinity=True),
    st.none(),
    st.text(max_size=3),
)
_fz_coord = st.lists(_fz_num, min_size=0, max_size=3)
_fz_ring = st.lists(_fz_coord, min_size=0, max_size=8)
_fz_geom = st.one_of(
    st.fixed_dictionaries(
        {
            "type": st.sampled_from(
                ["Polygon", "MultiPolygon", "Point", "LineString", "GeometryCollection", "Bogus", 7]
            ),
            "coordinates": st.one_of(
                st.lists(_fz_ring, max_size=3),
                st.lists(st.lists(_fz_ring, max_size=2), max_size=2),
                _fz_num,
            ),
        }
    ),
    _fz_num,
    st.lists(_fz_num, max_size=3),
)
_fz_props = st.one_of(
    st.none(),
    _fz_num,
    st.fixed_dictionaries(
        {},
        optional={
            "objectType": st.one_of(
                st.sampled_from(["annotation", "detection", "cell", "tile"]), _fz_num
            ),
            "name": st.one_of(st.text(max_size=10), _fz_num),
            "classification": st.one_of(
                st.fixed_dictionaries(
                    {},
                    optional={
                        "name": st.one_of(st.text(max_size=5), _fz_num),
                        "color": st.one_of(st.lists(_fz_num, max_size=4), _fz_num),
                    },
                ),
                _fz_num,
            ),
            "isLocked": st.booleans(),
        },
    ),
)
_fz_feature = st.one_of(
    st.fixed_dictionaries(
        {"type": st.just("Feature")},
        optional={
            "geometry": _fz_geom,
            "properties": _fz_props,
            "id": st.one_of(st.text(max_size=8), _fz_num),
        },
    ),
    _fz_num,
    _fz_geom,
)
_fz_doc = st.one_of(
    _fz_feature,
    st.lists(_fz_feature, max_size=4),
    st.fixed_dictionaries(
        {"type": st.sampled_from(["FeatureCollection", "Feature", "Nope"])},
        optional={"features": st.one_of(st.lists(_fz_feature, max_size=4), _fz_num)},
    ),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_fz_doc)
def test_regions_parser_never_raises_anything_else(doc) -> None:
    from wsi_nuclei.errors import RegionsFileError
    from wsi_nuclei.regions import Region, regions_from_geojson

    try:
        out = regions_from_geojson(doc)
    except RegionsFileError as exc:
        assert str(exc) and "\n" not in str(exc)
        return
    assert out and all(
        isinstance(r, Region) and r.geometry.is_valid and not r.geometry.is_empty for r in out
    )


@settings(max_examples=60, deadline=None)
@given(st.binary(max_size=300))
def test_regions_file_of_random_bytes(tmp_path_factory, data: bytes) -> None:
    from wsi_nuclei.errors import RegionsFileError
    from wsi_nuclei.regions import load_regions

    p = tmp_path_factory.mktemp("fz") / "r.geojson"
    p.write_bytes(data)
    try:
        load_regions(p)
    except RegionsFileError:
        pass

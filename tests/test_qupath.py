"""The QuPath hierarchy file (qupath.geojson.gz) and user annotations written back unchanged.

Known answers on synthetic inputs: which region each nucleus is a child of, which regions nest,
which ids are kept or derived; the files are re-read as JSON and checked with the project's
validator (:func:`wsi_nuclei.export.check_qupath_geojson`).
"""

from __future__ import annotations

import gzip
import json
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import shapely
from shapely.geometry import Polygon, box

from wsi_nuclei import RunConfig, run, schema
from wsi_nuclei.cli import main as cli_main
from wsi_nuclei.demo import make_nuclei_image, write_pyramidal_tiff
from wsi_nuclei.export import (
    _format,
    annotations,
    check_qupath_geojson,
    nucleus_uuid,
    qupath,
    region_annotation_ids,
    region_parents,
    write_nuclei_geojson,
    write_qupath_geojson,
    write_regions_geojson,
)
from wsi_nuclei.regions import Region, load_regions

# ------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------


def _read(path: Path) -> dict[str, Any]:
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as fh:
        return json.loads(fh.read().decode("ascii"))


def _disc(x: float, y: float, r: float = 3.0) -> Polygon:
    t = np.linspace(0, 2 * np.pi, 16, endpoint=False)
    return Polygon(np.c_[x + r * np.cos(t), y + r * np.sin(t)])


def _nuclei(points: list[tuple[float, float, int]]) -> pd.DataFrame:
    """A nucleus table: (x, y, region_id) per nucleus, every schema column filled."""
    n = len(points)
    xs = np.array([p[0] for p in points], float)
    ys = np.array([p[1] for p in points], float)
    data: dict[str, Any] = {
        "id": [nucleus_uuid("fp", x, y) for x, y in zip(xs, ys)],
        "block_row": np.zeros(n, np.int32),
        "block_col": np.zeros(n, np.int32),
        "centroid_x": xs,
        "centroid_y": ys,
        "centroid_x_um": xs / 4,
        "centroid_y_um": ys / 4,
        "class_id": np.ones(n, np.int8),
        "class_name": [schema.class_name(1)] * n,
        "class_prob": np.full(n, 0.9, np.float32),
    }
    for col in schema.PROB_COLUMNS:
        data[col] = np.full(n, 0.2, np.float32)
    for col in (
        "area_um2",
        "perimeter_um",
        "circularity",
        "solidity",
        "eccentricity",
        "major_axis_um",
        "minor_axis_um",
    ):
        data[col] = np.full(n, 1.5, np.float32)
    data["region_id"] = np.array([p[2] for p in points], np.int32)
    data["geometry"] = [_disc(x, y) for x, y in zip(xs, ys)]
    return pd.DataFrame(data)[list(schema.NUCLEUS_COLUMNS)]


def _annotations(
    features: list[dict], parent: str | None = None, out: dict | None = None
) -> dict[str, dict]:
    """Every annotation of a parsed hierarchy: id -> {parent, detections (ids), feature}."""
    out = {} if out is None else out
    for f in features:
        p = f["properties"]
        if p["objectType"] != "annotation":
            continue
        kids = p.get("childObjects", [])
        out[f["id"]] = {
            "parent": parent,
            "feature": f,
            "detections": [k["id"] for k in kids if k["properties"]["objectType"] == "detection"],
        }
        _annotations(kids, f["id"], out)
    return out


# ------------------------------------------------------------------------------------------
# region_parents: which regions nest
# ------------------------------------------------------------------------------------------


def test_region_parents_known_answers() -> None:
    donut = Polygon(
        [(0, 0), (100, 0), (100, 100), (0, 100)], [[(30, 30), (70, 30), (70, 70), (30, 70)]]
    )
    regions = [
        Region(1, "outer", box(0, 0, 1000, 1000), "user"),
        Region(2, "inner", box(100, 100, 400, 400), "user"),
        Region(3, "innermost", box(200, 200, 300, 300), "user"),  # in inner (and outer)
        Region(4, "overlaps inner", box(350, 350, 600, 600), "user"),  # in outer only
        Region(5, "apart", box(2000, 0, 2100, 100), "user"),
        Region(6, "donut", shapely.affinity.translate(donut, 3000, 0), "user"),
        Region(7, "in the hole", box(3040, 40, 3060, 60), "user"),  # not inside the donut
        Region(8, "same as apart", box(2000, 0, 2100, 100), "user"),
        Region(9, "shares an edge", box(0, 0, 100, 50), "user"),  # covered by outer
    ]
    assert region_parents(regions) == [-1, 0, 1, 0, -1, -1, -1, 4, 0]
    assert region_parents(regions[:1]) == [-1]


# ------------------------------------------------------------------------------------------
# region_annotation_ids
# ------------------------------------------------------------------------------------------


def test_region_ids_kept_derived_and_distinct() -> None:
    u1 = "0F8FAD5B-D9CB-469F-A165-70867728950E"
    geom = box(0, 0, 10, 10)
    user = [
        Region(1, "a", geom, "user", annotation_id=u1),
        Region(2, "b", geom, "user", annotation_id=u1),  # duplicate input id
        Region(3, "c", geom, "user", annotation_id="not-a-uuid"),
    ]
    ids = region_annotation_ids(user, "slideA")
    assert ids[0] == u1  # the user's id, exactly as given
    assert len({i.lower() for i in ids}) == 3 and all(uuid.UUID(i) for i in ids)
    assert ids == region_annotation_ids(user, "slideA")  # deterministic
    tissue = [Region(1, "Tissue 1", geom, "tissue")]
    t_a, t_b = (
        region_annotation_ids(tissue, "slideA")[0],
        region_annotation_ids(tissue, "slideB")[0],
    )
    assert t_a != t_b  # two slides
    assert t_a != region_annotation_ids([Region(1, "Tissue 1", geom, "user")], "slideA")[0]
    moved = [Region(1, "Tissue 1", box(0, 0, 10, 11), "tissue")]
    assert region_annotation_ids(moved, "slideA")[0] != t_a  # another outline, another id
    # the derived id is uuid5 of fingerprint, source, region id and outline
    outline = _format._dumps(annotations._geometry_json(geom))
    import hashlib

    key = f"slideA|tissue|1|{hashlib.sha256(outline.encode()).hexdigest()[:32]}"
    assert t_a == str(uuid.uuid5(annotations._REGION_NAMESPACE, key))


# ------------------------------------------------------------------------------------------
# write_qupath_geojson on known nuclei
# ------------------------------------------------------------------------------------------

REGIONS = [
    Region(1, "outer", box(0, 0, 1000, 1000), "user"),
    Region(2, "inner", box(100, 100, 400, 400), "user"),
    Region(3, "innermost", box(200, 200, 300, 300), "user"),
    Region(4, "apart", box(2000, 0, 2100, 100), "user"),
    Region(5, "empty", box(5000, 5000, 5100, 5100), "user"),
]
# (x, y, region_id): region_id is the smallest region holding the centroid, -1 outside all
POINTS = [
    (50, 50, 1),
    (150, 150, 2),
    (250, 250, 3),
    (260, 260, 3),
    (900, 900, 1),
    (2050, 50, 4),
    (3000, 3000, -1),
    (350, 350, 2),
    (3100, 3000, -1),
    (120, 380, 2),
]


@pytest.mark.parametrize("gzip_it", [True, False])
def test_hierarchy_file_known_nesting(tmp_path: Path, gzip_it: bool) -> None:
    frames = [_nuclei(POINTS[:4]), _nuclei(POINTS[4:7]), _nuclei(POINTS[7:])]
    path = tmp_path / ("h.geojson.gz" if gzip_it else "h.geojson")
    stats = write_qupath_geojson(
        frames,
        REGIONS,
        None,
        path,
        slide_fingerprint="fp",
        gzip=gzip_it,
        metadata={"slide": "x"},
        spill_dir=tmp_path,
    )
    assert check_qupath_geojson(path) == []
    doc = _read(path)
    assert doc["metadata"] == {"slide": "x"}
    tops = doc["features"]
    # top level: outer, apart, empty (the regions in no other), then the 2 outside nuclei
    assert [f["properties"].get("name") for f in tops[:3]] == ["outer", "apart", "empty"]
    assert [f["properties"]["objectType"] for f in tops[3:]] == ["detection", "detection"]
    ann = _annotations(tops)
    ids = dict(zip([r.name for r in REGIONS], region_annotation_ids(REGIONS, "fp")))
    by_name = {a["feature"]["properties"]["name"]: a for a in ann.values()}
    assert {n: (a["parent"], len(a["detections"])) for n, a in by_name.items()} == {
        "outer": (None, 2),
        "inner": (ids["outer"], 3),
        "innermost": (ids["inner"], 2),
        "apart": (None, 1),
        "empty": (None, 0),
    }
    # each nucleus once, under the region its region_id names (its innermost region)
    want = {nucleus_uuid("fp", x, y): rid for x, y, rid in POINTS}
    seen = []
    for a in ann.values():
        rid = int(a["feature"]["properties"]["metadata"]["region_id"])
        for d in a["detections"]:
            assert want[d] == rid
            seen.append(d)
    seen += [f["id"] for f in tops[3:]]
    assert sorted(seen) == sorted(want) and len(seen) == len(POINTS)
    # nuclei keep the order they came in (frame order) under each region
    assert by_name["inner"]["detections"] == [
        nucleus_uuid("fp", x, y) for x, y, r in POINTS if r == 2
    ]
    # a nested child annotation comes before the region's detections
    kids = by_name["outer"]["feature"]["properties"]["childObjects"]
    assert [k["properties"]["objectType"] for k in kids] == ["annotation", "detection", "detection"]
    # the nucleus features are those of nuclei.geojson
    write_nuclei_geojson(frames, tmp_path / "n.geojson", gzip=False)
    flat = {f["id"]: f for f in _read(tmp_path / "n.geojson")["features"]}
    nested = {k["id"]: k for k in by_name["innermost"]["feature"]["properties"]["childObjects"]}
    assert all(nested[i] == flat[i] for i in nested)
    assert stats["n_annotations"] == 5 and stats["n_nested_annotations"] == 2
    assert (
        stats["n_detections"],
        stats["n_nested_detections"],
        stats["n_top_level_detections"],
    ) == (10, 8, 2)
    assert not list(tmp_path.glob(".qupath-spill*"))  # the spill file is removed


def test_hierarchy_file_deterministic_whatever_the_batches(tmp_path: Path) -> None:
    one = _nuclei(POINTS)
    a = write_qupath_geojson(one, REGIONS, None, tmp_path / "a.geojson.gz")
    b = write_qupath_geojson(
        [_nuclei([p]) for p in POINTS], REGIONS, None, tmp_path / "b.geojson.gz"
    )
    write_qupath_geojson(one, REGIONS, None, tmp_path / "c.geojson.gz")
    assert (
        (tmp_path / "a.geojson.gz").read_bytes()
        == (tmp_path / "b.geojson.gz").read_bytes()
        == (tmp_path / "c.geojson.gz").read_bytes()
    )
    assert a["n_detections"] == b["n_detections"] == len(POINTS)


def test_validator_looks_inside_child_objects(tmp_path: Path) -> None:
    write_qupath_geojson(_nuclei(POINTS), REGIONS, None, tmp_path / "h.geojson", gzip=False)
    doc = _read(tmp_path / "h.geojson")
    inner = doc["features"][0]["properties"]["childObjects"][0]
    inner["properties"]["childObjects"][0]["properties"]["classification"] = {"name": "X"}
    inner["properties"]["isLocked"] = "yes"
    (tmp_path / "bad.geojson").write_text(json.dumps(doc))
    problems = check_qupath_geojson(tmp_path / "bad.geojson")
    assert len(problems) == 2
    assert (
        problems[0].startswith("features[0].childObjects[0].childObjects[0]: ")
        and "no 'color'" in problems[0]
    )
    assert problems[1].startswith("features[0].childObjects[0]: isLocked")


# ------------------------------------------------------------------------------------------
# user annotations come back unchanged
# ------------------------------------------------------------------------------------------

U1, U2 = "4c1b5f0e-2a3d-4e5f-8a9b-0c1d2e3f4a5b", "9e8d7c6b-5a49-4838-a726-150f4e3d2c1b"


def _user_file(path: Path) -> Path:
    def ring(b: tuple[int, int, int, int]) -> list:
        x0, y0, x1, y1 = b
        return [[[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]]

    feats = [
        {
            "type": "Feature",
            "id": U1,
            "geometry": {"type": "Polygon", "coordinates": ring((40, 40, 700, 700))},
            "properties": {
                "objectType": "annotation",
                "name": "Tumour bed",
                "isLocked": True,
                "color": [10, 20, 30],
                "classification": {"name": "Tumor", "color": [200, 0, 0]},
                "metadata": {"reader": "dr x", "nested": {"no": 1}},
                "measurements": {"Drawn score": 3, "Num nuclei": -1},
                "otherTool": {"keep": [1, 2]},
                "childObjects": [
                    {"type": "Feature", "geometry": None, "properties": {"objectType": "detection"}}
                ],
            },
        },
        {
            "type": "Feature",
            "id": U2,
            "geometry": {"type": "Polygon", "coordinates": ring((200, 200, 400, 400))},
            "properties": {
                "objectType": "annotation",
                "name": "Hotspot",
                "isLocked": False,
                "classification": {"names": ["Tumor", "Positive"], "color": [250, 0, 0]},
            },
        },
        {
            "type": "Feature",
            "geometry": {"type": "Polygon", "coordinates": ring((750, 40, 1000, 300))},
            "properties": {"classification": "Stroma", "bad": float("nan")},
        },
    ]
    path.write_text(json.dumps({"type": "FeatureCollection", "features": feats}))
    return path


def test_user_properties_round_trip(tmp_path: Path) -> None:
    regions = load_regions(_user_file(tmp_path / "in.geojson"))
    write_regions_geojson(regions, None, tmp_path / "tissue.geojson", slide_fingerprint="fp")
    assert check_qupath_geojson(tmp_path / "tissue.geojson") == []
    f1, f2, f3 = _read(tmp_path / "tissue.geojson")["features"]
    assert (f1["id"], f2["id"]) == (U1, U2)
    assert f1["properties"] == {
        "objectType": "annotation",
        "name": "Tumour bed",
        "isLocked": True,
        "color": [10, 20, 30],
        "classification": {"name": "Tumor", "color": [200, 0, 0]},
        "otherTool": {"keep": [1, 2]},
        "measurements": {"Drawn score": 3, "Num nuclei": -1},
        "metadata": {"reader": "dr x", "region_id": "1", "source": "user"},
    }
    assert f2["properties"]["classification"] == {
        "names": ["Tumor", "Positive"],
        "color": [250, 0, 0],
    }
    assert f2["properties"]["isLocked"] is False and f2["properties"]["name"] == "Hotspot"
    # no name in, no name out (QuPath shows the class); the NaN property is not JSON: left out
    assert set(f3["properties"]) == {"objectType", "classification", "measurements", "metadata"}
    assert f3["properties"]["classification"] == "Stroma"
    assert uuid.UUID(f3["id"]) and f3["id"] not in (U1, U2)
    # our measurements win over same-named input ones, the others stay
    summary = {"regions": [{"region_id": 1, "area_mm2": 0.5, "n_nuclei": 7}]}
    write_regions_geojson(regions, summary, tmp_path / "t2.geojson", slide_fingerprint="fp")
    assert _read(tmp_path / "t2.geojson")["features"][0]["properties"]["measurements"] == {
        "Drawn score": 3,
        "Num nuclei": 7,
        "Area mm^2": 0.5,
    }


# ------------------------------------------------------------------------------------------
# end to end: run() on a synthetic slide
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def slide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("qpslide")
    rgb, _, _ = make_nuclei_image(1024, 1024, seed=0, min_radius=6, max_radius=14, gap=4)
    write_pyramidal_tiff(d / "s.svs", rgb, mpp=0.25, compression="deflate")
    return d / "s.svs"


@pytest.fixture(scope="module")
def nested_run(slide: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("qprun")
    regions = _user_file(d / "regions.geojson")
    out = d / "out"
    run(
        RunConfig(
            slide=slide,
            out=out,
            model="classic",
            tissue="none",
            regions=regions,
            block_size=256,
            quiet=True,
        )
    )
    return out


def test_run_writes_the_hierarchy(nested_run: Path) -> None:
    out = nested_run
    path = out / "qupath.geojson.gz"
    assert check_qupath_geojson(path) == []
    doc = _read(path)
    ann = _annotations(doc["features"])
    assert set(ann) >= {U1, U2}
    assert ann[U2]["parent"] == U1 and ann[U1]["parent"] is None
    third = next(i for i in ann if i not in (U1, U2))
    assert ann[third]["parent"] is None
    nuclei = pd.read_parquet(out / "nuclei.parquet")
    summary = json.loads((out / "summary.json").read_text())
    rows = {r["annotation_id"]: r for r in summary["regions"]}
    assert set(rows) == set(ann)  # summary.csv's annotation_id is the QuPath object's id
    # every nucleus once, as a child of the region its region_id names
    where = {d: rows[a]["region_id"] for a, v in ann.items() for d in v["detections"]}
    top = [f for f in doc["features"] if f["properties"]["objectType"] == "detection"]
    assert not top  # --regions: nuclei outside every region are not kept
    assert (
        len(where)
        == len(nuclei)
        == summary["slide"]["n_nuclei"]
        == sum(len(v["detections"]) for v in ann.values())
    )
    assert dict(zip(nuclei["id"], nuclei["region_id"])) == where
    # nested only (the third region is apart from the first): counts add up like the summary
    assert rows[U1]["n_nuclei"] == len(ann[U1]["detections"]) + len(ann[U2]["detections"])
    assert rows[U2]["n_nuclei"] == len(ann[U2]["detections"]) > 5
    assert rows[third]["n_nuclei"] == len(ann[third]["detections"]) > 5
    # the annotations are the user's, with our measurements
    p1 = ann[U1]["feature"]["properties"]
    assert (p1["name"], p1["isLocked"], p1["classification"]["name"]) == (
        "Tumour bed",
        True,
        "Tumor",
    )
    assert p1["measurements"]["Num nuclei"] == rows[U1]["n_nuclei"]
    tissue = {f["id"]: f for f in _read(out / "tissue.geojson")["features"]}
    assert set(tissue) == set(ann)
    for i, f in tissue.items():
        nested = dict(ann[i]["feature"]["properties"])
        nested.pop("childObjects")
        assert f["properties"] == nested and f["geometry"] == ann[i]["feature"]["geometry"]
    manifest = json.loads((out / "run.json").read_text())
    q = manifest["qupath_hierarchy"]
    assert (
        q["n_annotations"],
        q["n_nested_annotations"],
        q["n_nested_detections"],
        q["n_top_level_detections"],
    ) == (3, 1, len(nuclei), 0)
    assert not list(out.rglob(".qupath-spill*"))


def test_rerun_byte_identical_and_opt_out(slide: Path, nested_run: Path, tmp_path: Path) -> None:
    regions = nested_run.parent / "regions.geojson"
    out = tmp_path / "again"
    run(
        RunConfig(
            slide=slide,
            out=out,
            model="classic",
            tissue="none",
            regions=regions,
            block_size=256,
            quiet=True,
        )
    )
    for name in ("qupath.geojson.gz", "tissue.geojson"):
        assert (out / name).read_bytes() == (nested_run / name).read_bytes()
    res = run(
        RunConfig(
            slide=slide,
            out=out,
            model="classic",
            tissue="none",
            regions=regions,
            block_size=256,
            quiet=True,
            overwrite=True,
            qupath_hierarchy=False,
        )
    )
    assert not (out / "qupath.geojson.gz").exists() and "qupath.geojson.gz" not in res.files
    assert res.manifest["qupath_hierarchy"] is None and (out / "nuclei.geojson.gz").exists()


def _glass_slide(path: Path, seed: int) -> Path:
    canvas = np.full((1536, 1536, 3), 242, np.uint8)
    rgb, _, _ = make_nuclei_image(768, 768, seed=seed, min_radius=6, max_radius=14, gap=4)
    canvas[256:1024, 256:1024] = rgb
    write_pyramidal_tiff(path, canvas, mpp=0.25, compression="deflate")
    return path


def test_auto_tissue_ids_differ_between_slides(tmp_path: Path) -> None:
    ids = []
    for seed in (1, 2):
        s = _glass_slide(tmp_path / f"s{seed}.svs", seed)
        out = tmp_path / f"o{seed}"
        res = run(
            RunConfig(
                slide=s,
                out=out,
                model="classic",
                tissue="auto",
                block_size=256,
                quiet=True,
                geojson_plain=True,
            )
        )
        (feat,) = _read(out / "tissue.geojson")["features"]
        assert feat["properties"]["name"] == "Tissue 1"
        assert feat["properties"]["metadata"]["source"] == "tissue"
        doc = _read(out / "qupath.geojson")  # --geojson-plain: uncompressed
        assert check_qupath_geojson(out / "qupath.geojson") == []
        (top,) = doc["features"]
        assert top["id"] == feat["id"]
        assert len(top["properties"]["childObjects"]) == res.n_nuclei > 100
        ids.append(feat["id"])
    assert ids[0] != ids[1] and all(uuid.UUID(i).version == 5 for i in ids)


def test_cli_help_names_the_option(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli_main(["run", "--help"])
    assert exc.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--no-qupath-hierarchy" in text and "child objects" in text


def test_full_disk_while_spilling_is_one_output_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    from wsi_nuclei.errors import OutputError

    def full(self: Any, group: int, features: list[bytes]) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(qupath._Spill, "add", full)
    with pytest.raises(OutputError, match="No space left on device"):
        write_qupath_geojson(_nuclei(POINTS), REGIONS, None, tmp_path / "h.geojson.gz")
    assert list(tmp_path.iterdir()) == []  # neither the file nor the spill is left behind

"""Tests of wsi_nuclei.summary: per-region figures, summary.json/csv, the cohort table."""

from __future__ import annotations

import gzip
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from shapely.geometry import Polygon, box

from wsi_nuclei import schema
from wsi_nuclei.errors import InputNotFoundError, WsiNucleiError
from wsi_nuclei.export import clean_frame, write_nuclei_geojson, write_regions_geojson
from wsi_nuclei.summary import RegionSummarizer, summarize_runs, write_summary

MPP = 0.25
NAMES = list(schema.CLASS_NAMES.values())


@dataclass
class Region:
    id: int
    name: str
    geometry: Any
    source: str = "tissue"


def regions() -> list[Region]:
    # 4000 x 4000 px at 0.25 µm/px = 1000 x 1000 µm = 1 mm^2; 2000 x 4000 px = 0.5 mm^2
    return [
        Region(0, "tissue 1", box(0, 0, 4000, 4000)),
        Region(7, "tissue 2", box(10000, 0, 12000, 4000)),
    ]


def frame(
    class_ids: list[int], region_ids: list[int], areas: list[float], geoms: list[Any] | None = None
) -> pd.DataFrame:
    """A nucleus table with the columns the summary and the writers use."""
    n = len(class_ids)
    if geoms is None:
        geoms = [box(10 * i, 10, 10 * i + 5, 15) for i in range(n)]
    return pd.DataFrame(
        {
            "class_id": np.array(class_ids, np.int8),
            "region_id": np.array(region_ids, np.int32),
            "area_um2": np.array(areas, np.float32),
            "class_prob": np.full(n, 0.9, np.float32),
            "geometry": geoms,
        }
    )


QC = {
    "tiles_total": 10,
    "tiles_processed": 8,
    "tiles_skipped": 2,
    "mpp": MPP,
    "mpp_source": "openslide.mpp-x",
    "level": 0,
    "model": "hovernet-lite",
    "model_sha256": "ab" * 32,
    "package_version": "0.1.0",
    "seconds": {"tissue": 1.5, "inference": 30.25, "export": float("nan")},
}


def hand_summary(**kwargs: Any) -> dict[str, Any]:
    s = RegionSummarizer(regions(), mpp=MPP, slide_name="slide-A.svs")
    # region 0: Neoplastic 10, 20; Inflammatory 30; Connective 40
    s.add(frame([1, 1, 2], [0, 0, 0], [10, 20, 30]))
    s.add(frame([3, 1, 5, 2], [0, 7, 7, -1], [40, 5, 15, 99]))
    # region 7: Neoplastic 5; Epithelial 15; one nucleus outside every region
    return s.finalize(QC, **kwargs)


def test_hand_computed_regions() -> None:
    summary = hand_summary()
    r0, r7 = summary["regions"]
    assert (r0["region_id"], r0["region_name"], r0["source"]) == (0, "tissue 1", "tissue")
    assert r0["area_mm2"] == pytest.approx(1.0)
    assert r0["n_nuclei"] == 4
    assert r0["counts"] == {
        "Neoplastic": 2,
        "Inflammatory": 1,
        "Connective": 1,
        "Dead": 0,
        "Epithelial": 0,
    }
    assert r0["fractions"] == {
        "Neoplastic": 0.5,
        "Inflammatory": 0.25,
        "Connective": 0.25,
        "Dead": 0.0,
        "Epithelial": 0.0,
    }
    assert r0["density_per_mm2"] == pytest.approx(
        {
            "total": 4.0,
            "Neoplastic": 2.0,
            "Inflammatory": 1.0,
            "Connective": 1.0,
            "Dead": 0.0,
            "Epithelial": 0.0,
        }
    )
    # areas 10, 20, 30, 40: median 25, q25 17.5, q75 32.5 (linear interpolation)
    assert r0["area_um2"]["all"] == {"median": 25.0, "q25": 17.5, "q75": 32.5}
    assert r0["area_um2"]["Neoplastic"] == {"median": 15.0, "q25": 12.5, "q75": 17.5}
    assert r0["area_um2"]["Connective"] == {"median": 40.0, "q25": 40.0, "q75": 40.0}
    assert r0["area_um2"]["Dead"] == {"median": None, "q25": None, "q75": None}

    assert r7["region_id"] == 7 and r7["area_mm2"] == pytest.approx(0.5)
    assert r7["n_nuclei"] == 2
    assert r7["counts"]["Neoplastic"] == 1 and r7["counts"]["Epithelial"] == 1
    assert r7["fractions"]["Neoplastic"] == 0.5
    assert r7["density_per_mm2"]["total"] == pytest.approx(4.0)
    assert r7["density_per_mm2"]["Epithelial"] == pytest.approx(2.0)
    assert r7["area_um2"]["all"] == {"median": 10.0, "q25": 7.5, "q75": 12.5}


def test_hand_computed_slide_and_qc() -> None:
    summary = hand_summary()
    slide = summary["slide"]
    assert slide["region_id"] == "slide"
    assert slide["area_mm2"] == pytest.approx(1.5)
    assert slide["n_nuclei"] == 6 and slide["n_nuclei_outside_regions"] == 1
    assert slide["counts"]["Neoplastic"] == 3 and slide["counts"]["Inflammatory"] == 1
    assert slide["fractions"]["Neoplastic"] == 0.5
    assert slide["density_per_mm2"]["total"] == pytest.approx(4.0)
    assert slide["density_per_mm2"]["Neoplastic"] == pytest.approx(2.0)
    # areas 5, 10, 15, 20, 30, 40
    assert slide["area_um2"]["all"] == {"median": 17.5, "q25": 11.25, "q75": 27.5}
    assert summary["qc"]["seconds"] == {"tissue": 1.5, "inference": 30.25, "export": None}
    assert summary["qc"]["model_sha256"] == "ab" * 32
    assert summary["slide_name"] == "slide-A.svs" and summary["mpp"] == MPP
    assert summary["class_names"] == NAMES
    # the caller may give the slide area (e.g. the tissue mask's)
    given = hand_summary(slide_area_mm2=3.0)["slide"]
    assert given["area_mm2"] == 3.0 and given["density_per_mm2"]["total"] == pytest.approx(2.0)


def test_unclassified_empty_and_errors() -> None:
    s = RegionSummarizer(regions(), mpp=0.5)
    s.add(frame([0, 0, 1], [0, 0, 0], [4, 6, 8]))
    s.add(frame([], [], []))
    out = s.finalize({})
    r0, r7 = out["regions"]
    assert r0["area_mm2"] == pytest.approx(4.0)  # 16e6 px * 0.25 µm^2
    assert r0["n_nuclei"] == 3 and sum(r0["counts"].values()) == 1
    assert r0["fractions"]["Neoplastic"] == pytest.approx(1 / 3)
    assert r0["area_um2"]["all"]["median"] == 6.0
    assert r7["n_nuclei"] == 0 and r7["fractions"]["Neoplastic"] == 0.0
    assert r7["density_per_mm2"]["total"] == 0.0
    assert r7["area_um2"]["all"] == {"median": None, "q25": None, "q75": None}
    one = RegionSummarizer(regions(), mpp=0.5, class_names={0: "Nucleus"})
    one.add(frame([0, 0], [7, 7], [1, 3]))
    assert one.finalize()["regions"][1]["counts"] == {"Nucleus": 2}
    with pytest.raises(ValueError, match="region ids"):
        s.add(frame([1], [3], [1.0]))
    none = RegionSummarizer([], mpp=np.float32(0.5))
    none.add(frame([1, 2], [-1, -1], [1.0, 2.0]))
    empty = none.finalize()
    assert empty["regions"] == [] and empty["slide"]["n_nuclei"] == 0
    assert empty["slide"]["n_nuclei_outside_regions"] == 2
    assert empty["slide"]["density_per_mm2"]["total"] is None  # zero area
    with pytest.raises(ValueError, match="mpp"):
        RegionSummarizer(regions(), mpp=0)
    with pytest.raises(ValueError, match="unique"):
        RegionSummarizer([Region(1, "a", box(0, 0, 1, 1)), Region(1, "b", box(0, 0, 1, 1))], mpp=1)
    with pytest.raises(ValueError, match="area_um2"):
        s.add(frame([1], [0], [1.0]).drop(columns=["area_um2"]))


def test_classes_not_measured_are_none_not_zero(tmp_path: Path) -> None:
    # region 0 (1 mm^2): Neoplastic, Inflammatory, one unclassified (class 0); "Dead" is a class
    # the model cannot produce: None in every figure, empty cells in summary.csv
    s = RegionSummarizer(regions(), mpp=MPP, not_measured=["Dead"])
    s.add(frame([1, 2, 0], [0, 0, 0], [10, 20, 30]))
    out = s.finalize({})
    r0 = out["regions"][0]
    assert out["classes_not_measured"] == ["Dead"]
    assert r0["counts"] == {
        "Neoplastic": 1,
        "Inflammatory": 1,
        "Connective": 0,
        "Dead": None,
        "Epithelial": 0,
    }
    assert r0["fractions"]["Dead"] is None and r0["fractions"]["Neoplastic"] == pytest.approx(1 / 3)
    assert r0["density_per_mm2"]["Dead"] is None and r0["density_per_mm2"]["Connective"] == 0.0
    assert r0["area_um2"]["Dead"] == {"median": None, "q25": None, "q75": None}
    assert r0["n_nuclei"] == 3 and r0["n_nuclei_unclassified"] == 1
    assert out["slide"]["n_nuclei_unclassified"] == 1
    write_summary(out, tmp_path)
    csv = pd.read_csv(tmp_path / "summary.csv")
    assert csv["count_Dead"].isna().all() and csv["density_Dead_per_mm2"].isna().all()
    assert csv["count_Connective"].tolist() == [0, 0, 0]
    assert csv["n_nuclei_unclassified"].tolist() == [1, 0, 1]


def test_nested_regions_count_their_nuclei_and_the_slide_counts_each_once() -> None:
    """A "hotspot" inside a "tissue" annotation (QuPath's rule: a nucleus belongs to every
    annotation containing its centroid); the slide row's area is the union, not the sum."""
    from wsi_nuclei.regions import Region as TissueRegion
    from wsi_nuclei.regions import region_membership

    tissue = TissueRegion(1, "tissue", box(0, 0, 4000, 4000), "user", "Tumor", None, "a1")
    hot = TissueRegion(2, "hotspot", box(1000, 1000, 2000, 2000), "user", "Hotspot", None, "b2")
    other = TissueRegion(3, "overlap", box(3000, 0, 5000, 4000), "user", None, None, None)
    x = np.array([1500.0, 500.0, 3500.0, 4500.0, 9000.0])
    y = np.array([1500.0, 500.0, 100.0, 100.0, 100.0])
    m = region_membership(x, y, [tissue, hot, other])
    # nucleus 0 in tissue and hotspot (primary: the smaller), 2 in tissue and overlap
    assert sorted(zip(m.rows.tolist(), m.region_ids.tolist())) == [
        (0, 1),
        (0, 2),
        (1, 1),
        (2, 1),
        (2, 3),
        (3, 3),
    ]
    assert m.primary.tolist() == [2, 1, 3, 3, -1]  # the smallest containing region
    f = frame([1, 2, 3, 1, 2], m.primary.tolist(), [10, 20, 30, 40, 50])
    s = RegionSummarizer([tissue, hot, other], mpp=MPP)
    s.add(f, (m.rows, m.region_ids))
    out = s.finalize()
    r = {x["region_name"]: x for x in out["regions"]}
    assert (r["tissue"]["n_nuclei"], r["hotspot"]["n_nuclei"], r["overlap"]["n_nuclei"]) == (
        3,
        1,
        2,
    )
    assert r["hotspot"]["counts"]["Neoplastic"] == 1 and r["tissue"]["counts"]["Connective"] == 1
    assert (r["tissue"]["region_class"], r["tissue"]["annotation_id"]) == ("Tumor", "a1")
    assert out["slide"]["n_nuclei"] == 4 and out["slide"]["n_nuclei_outside_regions"] == 1
    assert r["hotspot"]["area_mm2"] == pytest.approx(0.0625)  # its own polygon
    # union of 4000 x 4000 and 2000 x 4000 overlapping by 1000 x 4000: 5000 x 4000 px
    assert out["slide"]["area_mm2"] == pytest.approx(5000 * 4000 * MPP**2 / 1e6)
    assert out["slide"]["area_um2"]["all"]["median"] == 25.0  # each nucleus once
    # with a tolerance, a point just outside belongs to the nearest region
    m2 = region_membership(
        np.array([4001.0, 6000.0]), np.array([4010.0, 100.0]), [tissue], tolerance=20
    )
    assert m2.primary.tolist() == [1, -1] and m2.n_tolerated == 1


def _strict(text: str) -> Any:
    def bad(name: str) -> Any:
        raise AssertionError(f"non-strict literal {name}")

    return json.loads(text, parse_constant=bad)


def test_write_summary_json_and_csv_roundtrip(tmp_path: Path) -> None:
    summary = hand_summary()
    json_path, csv_path = write_summary(summary, tmp_path / "run")
    assert json_path.name == "summary.json" and csv_path.name == "summary.csv"
    assert _strict(json_path.read_text("utf-8")) == summary
    table = pd.read_csv(csv_path)
    assert list(table["region_id"]) == ["0", "7", "slide"]
    assert list(table["region_name"]) == ["tissue 1", "tissue 2", "slide"]
    first_cols = [
        "region_id",
        "region_name",
        "region_source",
        "region_class",
        "annotation_id",
        "area_mm2",
        "n_nuclei",
    ]
    assert list(table.columns[:7]) == first_cols
    for name in NAMES:
        for col in (
            f"count_{name}",
            f"fraction_{name}",
            f"density_{name}_per_mm2",
            f"area_um2_median_{name}",
            f"area_um2_q25_{name}",
            f"area_um2_q75_{name}",
        ):
            assert col in table.columns
    row0 = table.iloc[0]
    assert row0["count_Neoplastic"] == 2 and row0["fraction_Neoplastic"] == 0.5
    assert row0["density_Neoplastic_per_mm2"] == pytest.approx(2.0)
    assert row0["area_um2_q25"] == 17.5 and row0["area_um2_median_Neoplastic"] == 15.0
    assert math.isnan(row0["area_um2_median_Dead"])
    assert table.iloc[2]["n_nuclei_outside_regions"] == 1
    assert table.iloc[2]["area_mm2"] == pytest.approx(1.5)
    assert row0["qc_tiles_skipped"] == 2 and row0["qc_model"] == "hovernet-lite"
    assert row0["qc_seconds_inference"] == 30.25 and row0["mpp"] == MPP
    # undefined figures are empty cells, never "nan"
    text = csv_path.read_text("utf-8")
    assert "nan" not in text.lower()
    assert ",," in text
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["summary.csv", "summary.json"]


def test_summarize_runs_cohort_table(tmp_path: Path) -> None:
    write_summary(hand_summary(), tmp_path / "runA")
    other = RegionSummarizer(
        [Region(0, "only", box(0, 0, 2000, 2000))], mpp=0.5, slide_name="/data/slide-B.ndpi"
    )
    other.add(frame([2, 2, 4], [0, 0, 0], [3, 5, 7]))
    write_summary(other.finalize({"model": "m"}), tmp_path / "runB")
    table = summarize_runs([tmp_path / "runA", tmp_path / "runB"], tmp_path / "out" / "c.csv")
    assert list(table.columns[:4]) == ["slide_name", "run_dir", "region_id", "region_name"]
    assert list(table["slide_name"]) == ["slide-A.svs"] * 3 + ["slide-B.ndpi"] * 2
    assert list(table["region_id"]) == [0, 7, "slide", 0, "slide"]
    assert list(table["run_dir"]) == [str(tmp_path / "runA")] * 3 + [str(tmp_path / "runB")] * 2
    assert list(table["n_nuclei"]) == [4, 2, 6, 3, 3]
    assert list(table["count_Inflammatory"]) == [1, 0, 1, 2, 2]
    assert table.iloc[3]["area_mm2"] == pytest.approx(1.0)
    assert table.iloc[3]["density_Dead_per_mm2"] == pytest.approx(1.0)
    back = pd.read_csv(tmp_path / "out" / "c.csv")
    assert back.shape == table.shape and list(back.columns) == list(table.columns)
    assert list(back["n_nuclei"]) == [4, 2, 6, 3, 3]
    # a run from a model with other classes: union of columns
    third = RegionSummarizer([Region(0, "x", box(0, 0, 10, 10))], mpp=1, class_names={0: "Nucleus"})
    write_summary(third.finalize({}), tmp_path / "runC")
    table3 = summarize_runs([tmp_path / "runA", tmp_path / "runC"], tmp_path / "c3.csv")
    assert "count_Nucleus" in table3.columns and "count_Neoplastic" in table3.columns
    assert table3["slide_name"].iloc[-1] == "runC"


def test_summarize_runs_errors(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputNotFoundError, match="no summary.json") as info:
        summarize_runs([tmp_path / "empty"], tmp_path / "c.csv")
    assert "\n" not in str(info.value) and isinstance(info.value, WsiNucleiError)
    assert info.value.exit_code == 2
    with pytest.raises(InputNotFoundError, match="does not exist"):
        summarize_runs([tmp_path / "nope"], tmp_path / "c.csv")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "summary.json").write_text("{not json")
    with pytest.raises(WsiNucleiError, match="cannot read"):
        summarize_runs([tmp_path / "broken"], tmp_path / "c.csv")
    assert not (tmp_path / "c.csv").exists()


def test_summary_counts_equal_features_written(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    regs = regions()
    summarizer = RegionSummarizer(regs, mpp=MPP)
    batches = []
    for k in range(4):
        n = 50
        geoms: list[Any] = [
            box(x, y, x + rng.uniform(2, 9), y + rng.uniform(2, 9))
            for x, y in rng.uniform(0, 3000, (n, 2))
        ]
        geoms[k] = box(5, 5, 5.001, 5.001)  # collapses on the grid: dropped everywhere
        geoms[k + 1] = Polygon([(0, 0), (4, 4), (4, 0), (0, 3)])  # repaired
        batch = frame(
            rng.integers(0, 6, n).tolist(),
            rng.choice([0, 7, -1], n).tolist(),
            rng.uniform(10, 60, n).tolist(),
            geoms,
        )
        cleaned, stats = clean_frame(batch)
        assert stats["n_dropped"] == 1 and stats["n_repaired"] == 1
        summarizer.add(cleaned)
        batches.append(cleaned)
    summary = summarizer.finalize({})
    stats = write_nuclei_geojson(iter(batches), tmp_path / "n.geojson.gz")
    assert stats["n_dropped"] == 0  # already cleaned
    slide = summary["slide"]
    assert slide["n_nuclei"] + slide["n_nuclei_outside_regions"] == stats["n_features"] == 196
    with gzip.open(tmp_path / "n.geojson.gz", "rt") as fh:
        feats = json.load(fh)["features"]
    for region in summary["regions"]:
        mine = [
            f for f in feats if f["properties"]["measurements"]["Region ID"] == region["region_id"]
        ]
        assert len(mine) == region["n_nuclei"]
        for name in NAMES:
            n_cls = sum(f["properties"]["classification"]["name"] == name for f in mine)
            assert n_cls == region["counts"][name]
    # the regions file carries the same figures as measurements
    write_regions_geojson(regs, summary, tmp_path / "regions.geojson")
    with open(tmp_path / "regions.geojson") as fh:
        annotations = json.load(fh)["features"]
    for ann, region in zip(annotations, summary["regions"]):
        m = ann["properties"]["measurements"]
        assert m["Num nuclei"] == region["n_nuclei"]
        assert m["Num Neoplastic"] == region["counts"]["Neoplastic"]
        assert m["Area mm^2"] == pytest.approx(region["area_mm2"])

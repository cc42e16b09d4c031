"""End-to-end tests of wsi_nuclei.pipeline on synthetic slides with known nuclei and real slides.

The synthetic slide (1024 x 1024 px at 0.25 µm/px, JPEG tiles) holds non-overlapping
elliptical nuclei that the ``classic`` model (fixed threshold) segments identically in every
tile, so the engine's stitching can be checked exactly: every known nucleus is found once,
none twice, and the output does not depend on the halo, the batch size, the scheduler or
an interruption.
"""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import pytest
import shapely
from PIL import Image
from scipy.spatial import cKDTree

from wsi_nuclei import pipeline
from wsi_nuclei.demo import compare_with_truth, make_nuclei_image, write_pyramidal_tiff
from wsi_nuclei.errors import MissingMppError, OutputError, OwnershipError
from wsi_nuclei.export import check_qupath_geojson
from wsi_nuclei.pipeline import OUTPUT_NAMES, RunConfig, run
from wsi_nuclei.pipeline import _stages as pipeline_stages
from wsi_nuclei.schema import NUCLEUS_COLUMNS

SIZE = 1024
FINAL = ("nuclei.geojson.gz", *OUTPUT_NAMES)


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def _match(found: np.ndarray, truth: np.ndarray, radius: float) -> dict[str, int]:
    """One-to-one matching of centroids within ``radius`` (the package's one matcher,
    :func:`wsi_nuclei.eval.match_centroids`): counts of matched/missed/extra nuclei."""
    return compare_with_truth(found, truth, radius)


def _max_overlap(geoms: list) -> float:
    """Largest intersection area between two different polygons (level-0 px²)."""
    tree = shapely.STRtree(geoms)
    a, b = tree.query(geoms, predicate="intersects")
    sel = a < b
    if not sel.any():
        return 0.0
    inter = shapely.area(
        shapely.intersection(np.asarray(geoms, object)[a[sel]], np.asarray(geoms, object)[b[sel]])
    )
    return float(inter.max())


def _max_overlap_ratio(geoms: list) -> float:
    """Largest intersection between two different polygons, as a fraction of the smaller."""
    g = np.asarray(geoms, object)
    a, b = shapely.STRtree(geoms).query(geoms, predicate="intersects")
    a, b = a[a < b], b[a < b]
    if not len(a):
        return 0.0
    inter = shapely.area(shapely.intersection(g[a], g[b]))
    return float((inter / np.minimum(shapely.area(g[a]), shapely.area(g[b]))).max())


def _features(path: Path) -> list[dict]:
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as fh:
        return json.load(fh)["features"]


def _regions_file(path: Path, polygons: dict[str, list[tuple[float, float]]]) -> Path:
    """A QuPath-style annotation export (FeatureCollection of named annotations)."""
    feats = []
    for name, pts in polygons.items():
        ring = [list(map(float, p)) for p in pts] + [list(map(float, pts[0]))]
        feats.append(
            {
                "type": "Feature",
                "id": "8d9e1a56-3c4b-4f7e-9a1b-2c3d4e5f6a7b",
                "geometry": {"type": "Polygon", "coordinates": [ring]},
                "properties": {
                    "objectType": "annotation",
                    "name": name,
                    "isLocked": False,
                    "classification": {"name": "Tumor", "color": [200, 0, 0]},
                },
            }
        )
    path.write_text(json.dumps({"type": "FeatureCollection", "features": feats}))
    return path


def _run(slide, out: Path, **kw) -> pipeline.RunResult:
    kw.setdefault("model", "classic")
    kw.setdefault("tissue", "none")
    return run(RunConfig(slide=slide, out=out, quiet=True, **kw))


def _same_outputs(a: Path, b: Path) -> None:
    """nuclei.parquet tables equal, nuclei.geojson.gz byte-identical, same summary counts."""
    fa, fb = pd.read_parquet(a / "nuclei.parquet"), pd.read_parquet(b / "nuclei.parquet")
    pd.testing.assert_frame_equal(fa, fb)
    assert (a / "nuclei.geojson.gz").read_bytes() == (b / "nuclei.geojson.gz").read_bytes()
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (a, b))
    assert [r["n_nuclei"] for r in sa["regions"]] == [r["n_nuclei"] for r in sb["regions"]]
    assert sa["slide"]["n_nuclei"] == sb["slide"]["n_nuclei"]


# --------------------------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> dict:
    d = tmp_path_factory.mktemp("synth")
    rgb, inst, table = make_nuclei_image(SIZE, SIZE, seed=0, min_radius=6, max_radius=14, gap=4)
    # lossless tiles: the model sees exactly the generated nuclei (with JPEG, a few of the
    # smallest fall below the classic model's size limit in every tile alike)
    write_pyramidal_tiff(d / "s25.svs", rgb, mpp=0.25, compression="deflate")
    # the same image as a "20x" slide: 2x downsampled, 0.5 µm/px
    write_pyramidal_tiff(d / "s50.svs", np.asarray(Image.fromarray(rgb).reduce(2)), mpp=0.5)
    truth = np.column_stack([table["centroid_x"] + 0.5, table["centroid_y"] + 0.5])  # pixel centres
    return {
        "dir": d,
        "s25": d / "s25.svs",
        "s50": d / "s50.svs",
        "truth": truth,
        "table": table,
        "rgb": rgb,
    }


@pytest.fixture(scope="module")
def base(synth: dict) -> Path:
    """The reference run: blocks of 256 px (4 x 4, so nuclei straddle seams), default halo."""
    out = synth["dir"] / "base"
    res = _run(synth["s25"], out, block_size=256)
    # classic: its "maps" are the image, fully trusted: 256-px patches at stride 256
    assert res.patches_total == res.patches_run == 16
    assert res.manifest["qc"]["blocks_processed"] == 16
    return out


# --------------------------------------------------------------------------------------------
# exact stitching on the synthetic slide
# --------------------------------------------------------------------------------------------
def test_every_known_nucleus_found_exactly_once(synth: dict, base: Path) -> None:
    table, truth = synth["table"], synth["truth"]
    # the test is meaningful: many nuclei straddle block seams (x or y = k * 256)
    edges = 256 * np.arange(1, 4)
    across_x = ((table["bbox_x0"][:, None] < edges) & (edges < table["bbox_x1"][:, None])).any(
        axis=1
    )
    across_y = ((table["bbox_y0"][:, None] < edges) & (edges < table["bbox_y1"][:, None])).any(
        axis=1
    )
    assert (
        len(truth) > 500 and (across_x | across_y).sum() > 50 and (across_x & across_y).sum() >= 1
    )
    df = gpd.read_parquet(base / "nuclei.parquet")
    m = _match(df[["centroid_x", "centroid_y"]].to_numpy(), truth, 3.0)
    assert m == {
        "true": len(truth),
        "found": len(truth),
        "matched": len(truth),
        "missed": 0,
        "extra": 0,
    }
    assert df["id"].is_unique
    # no two output polygons overlap by more than a sliver
    assert _max_overlap(list(df.geometry)) < 1.0
    qc = json.loads((base / "run.json").read_text())["qc"]
    # measured areas (µm², 0.0625 µm² per px) and polygons agree with the true pixel areas
    _, j = cKDTree(truth).query(df[["centroid_x", "centroid_y"]].to_numpy())
    true_px = table["area"][j]
    # (the classic model's haematoxylin threshold is tuned on real H&E, where it segments a
    # rim slightly wider than these synthetic nuclei; the exact area check is the
    # whole-image comparison below)
    assert np.median(df["area_um2"] / (true_px * 0.0625)) == pytest.approx(1.0, abs=0.12)
    assert (
        (df["area_um2"] / (true_px * 0.0625)).between(0.6, 1.4).all()
    )  # +1 px rim on the smallest
    assert (df.geometry.area / true_px).between(0.6, 1.4).all()
    # every block segments alike: seam candidates are exact duplicates, nothing trimmed or cut
    assert (
        qc["seam_candidates"] > 0
        and qc["seam_duplicates_removed"] == qc["seam_candidates"] - qc["seam_kept"] > 0
    )
    assert qc["seam_trimmed"] == 0 and qc["nuclei_cut_at_window_border"] == 0
    assert qc["nuclei_outside_regions_removed"] == 0
    # tiling is invisible: the classic model run on the whole image at once finds the same
    # nuclei, with the same centroids (up to float rounding)
    from scipy import ndimage as ndi

    from wsi_nuclei.models.classic import classic_instances

    # beyond the slide edge the engine's canvas is glass (white): give the whole image the same
    pad = 64
    whole = classic_instances(
        np.pad(synth["rgb"], ((pad, pad), (pad, pad), (0, 0)), constant_values=255)
    )
    c = (
        np.asarray(ndi.center_of_mass(np.ones(whole.inst.shape), whole.inst, whole.labels))
        + 0.5
        - pad
    )
    d, k = cKDTree(c[:, ::-1]).query(df[["centroid_x", "centroid_y"]].to_numpy())
    assert len(c) == len(df) and d.max() < 1e-9
    whole_px = np.bincount(whole.inst.ravel())[whole.labels]
    np.testing.assert_allclose(df["area_um2"].to_numpy(), whole_px[k] * 0.0625, rtol=1e-6)
    # each nucleus came from the block whose core holds its centroid (the views agree, and
    # the owner's has the most context)
    assert (df["block_col"] == np.floor(df["centroid_x"] / 256)).all()
    assert (df["block_row"] == np.floor(df["centroid_y"] / 256)).all()


def test_outputs_valid_and_consistent(base: Path) -> None:
    for name in FINAL:
        assert (base / name).is_file(), name
    assert not (base / ".work").exists()  # part files removed after success
    gj = base / "nuclei.geojson.gz"
    assert check_qupath_geojson(gj) == []
    feats = _features(gj)
    df = gpd.read_parquet(base / "nuclei.parquet")
    assert list(df.columns) == list(NUCLEUS_COLUMNS)
    assert len(df) == len(feats)
    assert [f["id"] for f in feats] == df["id"].tolist()
    assert {f["properties"]["objectType"] for f in feats} == {"detection"}
    # the GeoJSON polygons are the parquet ones rounded to 0.01 px
    for f, g in zip(feats[::50], df.geometry.to_numpy()[::50]):
        p = shapely.geometry.shape(f["geometry"])
        assert p.symmetric_difference(g).area < 0.05 * g.area
    assert df.geometry.is_valid.all() and (df.geometry.geom_type == "Polygon").all()

    summary = json.loads((base / "summary.json").read_text())
    assert (
        summary["slide"]["n_nuclei"] == len(feats) == sum(r["n_nuclei"] for r in summary["regions"])
    )
    assert [r["region_name"] for r in summary["regions"]] == ["Slide"]
    assert summary["regions"][0]["area_mm2"] == pytest.approx(SIZE * SIZE * 0.25**2 / 1e6)
    csv = pd.read_csv(base / "summary.csv")
    assert csv["n_nuclei"].tolist() == [len(feats), len(feats)]  # the region, then the slide row
    assert check_qupath_geojson(base / "tissue.geojson") == []
    regions = _features(base / "tissue.geojson")
    assert len(regions) == 1 and regions[0]["properties"]["objectType"] == "annotation"
    manifest = json.loads((base / "run.json").read_text())
    assert manifest["n_nuclei"] == len(feats)
    assert manifest["resolution"]["level"] == 0 and manifest["resolution"]["scale_factor"] == 1.0
    assert manifest["qc"]["blocks_resumed"] == 0
    t = manifest["tiling"]
    assert (t["patch_stride"], t["patch_border"], t["block_size"], t["halo"]) == (256, 0, 256, 96)
    assert t["passes_per_pixel"] == pytest.approx(1.0)  # 16 patches of 256² over 1024²


def test_deterministic_across_batch_size_and_in_flight(synth: dict, base: Path) -> None:
    out = synth["dir"] / "batch5"
    _run(synth["s25"], out, batch_size=5, max_in_flight=1, block_size=256)
    _same_outputs(base, out)
    assert (base / "nuclei.parquet").read_bytes() == (out / "nuclei.parquet").read_bytes()


def test_blocks_change_the_tiling_not_the_nuclei(synth: dict, base: Path) -> None:
    out = synth["dir"] / "blocks"
    res = _run(synth["s25"], out, block_size=400, halo=40)
    assert res.manifest["qc"]["blocks_processed"] == 9  # ceil(1024 / 400)²
    a = gpd.read_parquet(base / "nuclei.parquet").set_index("id").sort_index()
    b = gpd.read_parquet(out / "nuclei.parquet").set_index("id").sort_index()
    assert a.index.equals(b.index)  # the same nuclei (ids from the centroids)
    assert all(ga.equals_exact(gb, 0) for ga, gb in zip(a.geometry, b.geometry))
    np.testing.assert_allclose(a["centroid_x"], b["centroid_x"], rtol=0, atol=1e-9)
    np.testing.assert_allclose(a["centroid_y"], b["centroid_y"], rtol=0, atol=1e-9)
    np.testing.assert_array_equal(a["area_um2"], b["area_um2"])
    assert not (a["block_col"].to_numpy() == b["block_col"].to_numpy()).all()  # other owners


def test_20x_slide_is_upsampled_tile_by_tile(synth: dict) -> None:
    out = synth["dir"] / "x20"
    res = _run(synth["s50"], out, block_size=256)
    manifest = res.manifest
    assert manifest["resolution"]["level"] == 0
    assert manifest["resolution"]["scale_factor"] == pytest.approx(2.0)
    assert manifest["resolution"]["scale_level0_to_model"] == pytest.approx(2.0)
    assert res.patches_total == 16  # the 512 px slide is 1024 model px
    df = gpd.read_parquet(out / "nuclei.parquet")
    truth = synth["truth"] / 2  # level-0 px of the 20x slide
    m = _match(df[["centroid_x", "centroid_y"]].to_numpy(), truth, 3.0)  # 1.5 µm
    assert m["matched"] >= 0.95 * len(truth), m
    assert m["extra"] <= 0.01 * len(truth), m
    assert abs(len(df) - len(truth)) <= 0.05 * len(truth)
    # none duplicated: no two nuclei closer than half the smallest true spacing, no overlaps
    d, _ = cKDTree(df[["centroid_x", "centroid_y"]].to_numpy()).query(
        df[["centroid_x", "centroid_y"]].to_numpy(), k=2
    )
    assert d[:, 1].min() > 3.0
    assert _max_overlap(list(df.geometry)) < 0.5
    # coordinates and areas are in the 20x slide's frame: same nuclei, same µm² as at 40x
    assert df["centroid_x"].max() < SIZE / 2 and df["centroid_y"].max() < SIZE / 2
    assert check_qupath_geojson(out / "nuclei.geojson.gz") == []


# --------------------------------------------------------------------------------------------
# resume
# --------------------------------------------------------------------------------------------
def test_crashed_run_resumes_from_finished_blocks(
    synth: dict, base: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = synth["dir"] / "crash"
    real_save = pipeline.save_part
    calls = []

    def crashing_save(frame, stats, path):
        calls.append(path.name)
        if len(calls) == 3:
            raise RuntimeError("simulated crash after two finished blocks")
        real_save(frame, stats, path)

    monkeypatch.setattr(pipeline_stages, "save_part", crashing_save)
    with pytest.raises(RuntimeError, match="simulated crash"):
        _run(synth["s25"], out, batch_size=4, block_size=256)
    monkeypatch.setattr(pipeline_stages, "save_part", real_save)
    for name in FINAL:
        assert not (out / name).exists(), f"{name} written by a crashed run"
    parts = sorted((out / ".work" / "blocks").glob("*.parquet"))
    assert len(parts) == 2
    res = _run(synth["s25"], out, batch_size=4, block_size=256)
    assert res.manifest["qc"]["blocks_resumed"] == 2
    _same_outputs(base, out)


def test_rerun_after_losing_outputs_reuses_kept_parts(
    synth: dict, base: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = synth["dir"] / "keep"
    _run(synth["s25"], out, keep_work=True, block_size=256)
    assert len(list((out / ".work" / "blocks").glob("*.parquet"))) == 16
    for name in ("nuclei.parquet", "summary.json", "nuclei.geojson.gz"):  # half of the outputs
        (out / name).unlink()
    with pytest.raises(OutputError, match="--overwrite"):  # the other half still exists
        _run(synth["s25"], out, block_size=256)
    # no patch is read again: every block comes from the part files
    from wsi_nuclei.engine import _executor  # run_strip reads patches through this name

    def no_read(*args, **kwargs):
        raise RuntimeError("a patch was read again")

    monkeypatch.setattr(_executor, "read_patches", no_read)
    res = _run(synth["s25"], out, overwrite=True, block_size=256)
    assert res.manifest["qc"]["blocks_resumed"] == 16 and res.patches_run == 0
    _same_outputs(base, out)
    assert not (out / ".work").exists()  # this rerun did not ask to keep them


def test_changed_settings_do_not_reuse_stale_parts(
    synth: dict, base: Path, capsys: pytest.CaptureFixture
) -> None:
    out = synth["dir"] / "stale"
    _run(synth["s25"], out, keep_work=True, batch_size=8, block_size=256)
    # another batch partition: the old part files must not be reused
    res = run(
        RunConfig(
            slide=synth["s25"],
            out=out,
            overwrite=True,
            batch_size=16,
            block_size=256,
            model="classic",
            tissue="none",
        )
    )
    assert res.manifest["qc"]["blocks_resumed"] == 0
    assert "discarded the unfinished work folder" in capsys.readouterr().err
    _same_outputs(base, out)


def test_damaged_part_is_redone(synth: dict, base: Path) -> None:
    out = synth["dir"] / "damaged"
    _run(synth["s25"], out, keep_work=True, block_size=256)
    part = sorted((out / ".work" / "blocks").glob("*.parquet"))[5]
    part.write_bytes(
        part.read_bytes()[:100]
    )  # cut short (a crash mid-write cannot do this: atomic rename)
    for name in FINAL:
        (out / name).unlink()
    res = _run(synth["s25"], out, block_size=256)
    assert res.manifest["qc"]["blocks_resumed"] == 15
    _same_outputs(base, out)


# --------------------------------------------------------------------------------------------
# a model whose predictions depend on where a pixel lies in its patch
# --------------------------------------------------------------------------------------------
class _PositionDependent:
    """A deliberately awkward stand-in network: its nucleus probability is the image's
    darkness damped towards the patch border, and its distance maps are computed from the
    nuclei *visible in the patch* (so a nucleus cut by the patch border gets other maps in
    each patch). Outputs disagree between overlapping patches; the engine must still give one
    consistent answer, equal to post-processing the blended maps of the whole slide at once."""

    def __init__(self, spec) -> None:
        self.spec = spec
        self.device = "cpu"
        n = spec.output_size
        r = np.arange(n)
        d = np.minimum(r, n - 1 - r) / (n / 2)
        self.damp = (0.6 + 0.4 * np.sqrt(np.outer(d, d))).astype(np.float32)

    def infer(self, batch: np.ndarray) -> list[dict[str, np.ndarray]]:
        from scipy import ndimage as ndi

        from wsi_nuclei.datasets import hv_targets

        out = []
        for t in batch:
            dark = 1.0 - t.mean(axis=2) / 255.0
            fg = dark > 0.45
            inst, _ = ndi.label(fg)
            p = np.clip((dark - 0.25) * 3.0, 0, 1) * self.damp
            out.append({"np": p.astype(np.float32), "hv": hv_targets(inst)})
        return out

    def postprocess(self, raw: dict, origin=None):
        from wsi_nuclei.postprocess import HVParams, hv_to_instances

        return hv_to_instances(
            raw["np"],
            raw["hv"],
            None,
            HVParams(
                np_threshold=0.4,
                edge_threshold=0.5,
                sobel_ksize=5,
                min_marker_px=8,
                min_nucleus_px=8,
            ),
        )


@pytest.fixture
def posdep():
    from wsi_nuclei import engine
    from wsi_nuclei.models import ModelSpec, _registry, register_model

    spec = ModelSpec(
        name="test-position-dependent",
        description="test",
        licence="test",
        mpp=0.25,
        input_size=128,
        output_size=128,
        class_names={},
        builder=lambda spec, weights, device: _PositionDependent(spec),
        output_border=16,
        halo=48,
    )
    register_model(spec)
    engine.clear_model_cache()
    yield spec
    del _registry._REGISTRY[spec.name]
    engine.clear_model_cache()


def test_position_dependent_model_one_consistent_answer(
    synth: dict, tmp_path: Path, posdep
) -> None:
    from wsi_nuclei.inference import predict_maps

    a = _run(synth["s25"], tmp_path / "a", model=posdep.name, block_size=200, halo=48)
    b = _run(synth["s25"], tmp_path / "b", model=posdep.name, block_size=333, halo=60, batch_size=7)
    da, db = (
        gpd.read_parquet(tmp_path / "a" / "nuclei.parquet"),
        gpd.read_parquet(tmp_path / "b" / "nuclei.parquet"),
    )
    assert a.manifest["qc"]["seam_candidates"] > 100
    # tiling invariance: the same nuclei, the same outlines, whatever the blocks
    assert sorted(da["id"]) == sorted(db["id"]) and a.n_nuclei == b.n_nuclei == len(db)
    assert _max_overlap(list(da.geometry)) < 1.0
    # the whole-slide reference: the same blended maps post-processed as one image
    model = _PositionDependent(posdep)
    model.spec = posdep
    maps = predict_maps(model, synth["rgb"])
    ref = model.postprocess(maps)
    ref_c = np.asarray([np.argwhere(ref.inst == k).mean(0) for k in ref.labels])[:, ::-1] + 0.5
    got = da[["centroid_x", "centroid_y"]].to_numpy()
    d, _ = cKDTree(got).query(ref_c)
    assert len(da) == len(ref.labels) and d.max() < 1e-6  # none lost, none extra, same outlines
    # the model really is awkward: its maps differ from one patch to the next
    two = model.infer(np.stack([synth["rgb"][:128, :128], synth["rgb"][:128, 112:240]]))
    assert np.abs(two[0]["np"][:, 112:] - two[1]["np"][:, :16]).max() > 0.1


class _Components:
    """A stand-in network that sees every pixel alike: nucleus probability = darkness, each
    connected dark component one nucleus, however large (no size limit, no splitting)."""

    def __init__(self, spec) -> None:
        self.spec = spec
        self.device = "cpu"

    def infer(self, batch: np.ndarray) -> list[dict[str, np.ndarray]]:
        return [{"np": (1.0 - t.mean(axis=2) / 255.0).astype(np.float32)} for t in batch]

    def postprocess(self, raw: dict, origin=None):
        from scipy import ndimage as ndi

        from wsi_nuclei.models.base import InstanceResult

        inst, n = ndi.label(raw["np"] > 0.5)
        return InstanceResult(
            inst.astype(np.int32),
            np.arange(1, n + 1, dtype=np.int32),
            np.zeros(n, np.int8),
            np.ones(n, np.float32),
        )


def test_an_object_cut_in_every_view_is_not_lost(tmp_path: Path) -> None:
    """A clump larger than every window (blob x 260-500, y 150-620) with a tail reaching into
    the neighbouring column of blocks (x 60-260, y 380-392). Blocks of 256 px, halo 48: the
    blocks of the blob's column see it cut and own their views (x >= 208). Block (1, 0) sees
    the tail plus the blob's strip in its halo, cut, with the centroid in its halo (x ~266): it
    owns nothing, and before core pieces the tail's far part (x 60-208) reached the output
    nowhere. Now block (1, 0) keeps the part in its core as a core piece."""
    from wsi_nuclei import engine
    from wsi_nuclei.models import ModelSpec, _registry, register_model

    spec = ModelSpec(
        name="test-components",
        description="test",
        licence="test",
        mpp=0.25,
        input_size=128,
        output_size=128,
        class_names={},
        builder=lambda spec, weights, device: _Components(spec),
        output_border=16,
        halo=48,
    )
    register_model(spec)
    engine.clear_model_cache()
    try:
        rgb = np.full((768, 768, 3), 235, np.uint8)
        rgb[150:620, 260:500] = 40
        rgb[380:392, 60:260] = 40
        yy, xx = np.mgrid[0:768, 0:768]
        discs = [(100, 100), (700, 700), (250, 600), (640, 130)]  # ordinary nuclei, each once
        for cy, cx in discs:
            rgb[(yy - cy) ** 2 + (xx - cx) ** 2 <= 81] = 40
        write_pyramidal_tiff(tmp_path / "clump.svs", rgb, mpp=0.25, compression="deflate")
        res = _run(tmp_path / "clump.svs", tmp_path / "out", model=spec.name, block_size=256)
    finally:
        del _registry._REGISTRY[spec.name]
        engine.clear_model_cache()
    assert res.manifest["qc"]["seam_core_pieces"] >= 1
    df = gpd.read_parquet(tmp_path / "out" / "nuclei.parquet")
    geoms = list(df.geometry)
    assert _max_overlap(geoms) < 1.0
    clump = shapely.union_all([shapely.box(260, 150, 500, 620), shapely.box(60, 380, 260, 392)])
    out = shapely.union_all([g for g in geoms if g.intersects(clump)])
    assert out.intersection(clump).area / clump.area > 0.99
    far_tail = shapely.box(60, 380, 208, 392)
    assert out.intersection(far_tail).area / far_tail.area > 0.95
    for cy, cx in discs:
        assert sum(g.contains(shapely.Point(cx + 0.5, cy + 0.5)) for g in geoms) == 1


# --------------------------------------------------------------------------------------------
# scheduler, strict ownership, regions with --tissue none
# --------------------------------------------------------------------------------------------
def test_external_scheduler_gives_the_same_result(synth: dict, base: Path) -> None:
    from distributed import LocalCluster

    out = synth["dir"] / "cluster"
    with LocalCluster(
        n_workers=1, threads_per_worker=1, processes=False, dashboard_address=":0"
    ) as cluster:
        res = _run(synth["s25"], out, scheduler=cluster.scheduler_address, block_size=256)
        assert cluster.scheduler_address.startswith(("tcp://", "inproc://"))
    assert res.manifest["scheduler"] == cluster.scheduler_address
    _same_outputs(base, out)


def test_strict_ownership_refuses_a_halo_smaller_than_the_nuclei(synth: dict) -> None:
    with pytest.raises(OwnershipError, match="halo"):
        _run(synth["s25"], synth["dir"] / "strict", halo=6, block_size=256, strict_ownership=True)


def test_regions_with_tissue_none_process_only_their_blocks(synth: dict, tmp_path: Path) -> None:
    pts = [(100, 100), (400, 120), (380, 350), (120, 330)]
    regions = _regions_file(tmp_path / "roi.geojson", {"ROI A": pts})
    out = tmp_path / "out"
    res = _run(synth["s25"], out, regions=regions, block_size=256)
    # blocks whose core (+ 64 px) meets the region: rows and columns 0..1 of 4 x 4
    assert res.manifest["qc"]["blocks_processed"] == 4 and res.patches_run < res.patches_total == 16
    poly = shapely.Polygon(pts)
    df = gpd.read_parquet(out / "nuclei.parquet")
    assert len(df) and all(
        poly.covers(shapely.Point(x, y)) for x, y in zip(df.centroid_x, df.centroid_y)
    )
    truth = synth["truth"]
    inside = np.array([poly.covers(shapely.Point(x, y)) for x, y in truth])
    m = _match(df[["centroid_x", "centroid_y"]].to_numpy(), truth[inside], 3.0)
    assert m["matched"] == inside.sum() and m["extra"] == 0, m
    summary = json.loads((out / "summary.json").read_text())
    assert [(r["region_name"], r["source"]) for r in summary["regions"]] == [("ROI A", "user")]
    assert summary["regions"][0]["n_nuclei"] == len(df) == summary["slide"]["n_nuclei"]
    assert summary["regions"][0]["area_mm2"] == pytest.approx(poly.area * 0.25**2 / 1e6)
    assert summary["regions"][0]["region_class"] == "Tumor"


def test_nested_and_overlapping_regions_count_as_in_qupath(synth: dict, tmp_path: Path) -> None:
    """A hotspot inside a tissue box: the hotspot's nuclei count in both; the slide row counts
    each nucleus once and its area is the union; overlapping regions get a warning."""
    big = [(50, 50), (700, 50), (700, 700), (50, 700)]
    hot = [(200, 200), (400, 200), (400, 400), (200, 400)]
    side = [(600, 50), (900, 50), (900, 300), (600, 300)]  # overlaps the big box
    regions = _regions_file(
        tmp_path / "nested.geojson", {"tissue": big, "hotspot": hot, "side": side}
    )
    out = tmp_path / "out"
    res = _run(synth["s25"], out, regions=regions, block_size=256)
    df = gpd.read_parquet(out / "nuclei.parquet")
    truth = synth["truth"]
    polys = {k: shapely.Polygon(v) for k, v in (("tissue", big), ("hotspot", hot), ("side", side))}
    xy = list(zip(df.centroid_x, df.centroid_y))
    want = {k: int(sum(p.covers(shapely.Point(x, y)) for x, y in xy)) for k, p in polys.items()}
    summary = json.loads((out / "summary.json").read_text())
    got = {r["region_name"]: r["n_nuclei"] for r in summary["regions"]}
    assert got == want and want["hotspot"] > 20
    for k, p in polys.items():  # and the true nuclei (centroids on an edge may differ by one)
        assert abs(want[k] - sum(p.covers(shapely.Point(x, y)) for x, y in truth)) <= 2
    union = shapely.union_all(list(polys.values()))
    n_union = int(sum(union.covers(shapely.Point(x, y)) for x, y in xy))
    assert summary["slide"]["n_nuclei"] == len(df) == n_union < sum(want.values())
    assert summary["slide"]["area_mm2"] == pytest.approx(union.area * 0.25**2 / 1e6)
    assert res.manifest["warnings"] and "overlap" in res.manifest["warnings"][0]
    # each nucleus's region_id is the smallest region holding it
    hot_id = [r["region_id"] for r in summary["regions"] if r["region_name"] == "hotspot"][0]
    in_hot = np.array(
        [polys["hotspot"].covers(shapely.Point(x, y)) for x, y in zip(df.centroid_x, df.centroid_y)]
    )
    assert (df["region_id"].to_numpy()[in_hot] == hot_id).all()


# --------------------------------------------------------------------------------------------
# real slides
# --------------------------------------------------------------------------------------------
def test_tcga_without_mpp_refuses(wsi_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(MissingMppError, match="--mpp"):
        _run(wsi_dir / "tcga-cr-7395-01a-01-ts1.svs", tmp_path / "out", tissue="auto")
    assert not any((tmp_path / "out" / n).exists() for n in FINAL)


@pytest.mark.slow
def test_tcga_with_mpp_and_a_user_region(wsi_dir: Path, tmp_path: Path) -> None:
    pts = [(2000, 1500), (2300, 1520), (2260, 1800), (2050, 1760)]
    regions = _regions_file(tmp_path / "roi.geojson", {"Tumour nest": pts})
    out = tmp_path / "out"
    # the frozen section's haematoxylin is too faint for the classic model's fixed threshold
    # (it finds nothing); the "null" model puts nuclei everywhere in every processed tile,
    # which is what the region filter needs
    res = _run(
        wsi_dir / "tcga-cr-7395-01a-01-ts1.svs",
        out,
        mpp=0.5,
        tissue="auto",
        regions=regions,
        model="null",
    )
    assert res.manifest["qc"]["blocks_processed"] < 10 and res.patches_run < res.patches_total
    m = res.manifest
    assert (
        m["resolution"]["mpp_source"] == "user:--mpp"
        and m["resolution"]["scale_level0_to_model"] == 2.0
    )
    assert m["regions"]["source"] == "user (--regions)"
    assert m["qc"]["nuclei_outside_regions_removed"] > 0
    df = gpd.read_parquet(out / "nuclei.parquet")
    poly = shapely.Polygon(pts)
    # null-model discs every 40 model px = 20 level-0 px: about area / 400 of them
    assert len(df) == pytest.approx(poly.area / 400, rel=0.2)
    assert all(poly.covers(shapely.Point(x, y)) for x, y in zip(df.centroid_x, df.centroid_y))
    summary = json.loads((out / "summary.json").read_text())
    assert [r["region_name"] for r in summary["regions"]] == ["Tumour nest"]
    assert summary["regions"][0]["n_nuclei"] == len(df) == len(_features(out / "nuclei.geojson.gz"))
    assert check_qupath_geojson(out / "nuclei.geojson.gz") == []
    tissue = _features(out / "tissue.geojson")
    assert [f["properties"]["name"] for f in tissue] == ["Tumour nest"]


@pytest.mark.slow
def test_he_example_ome_tiff(wsi_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    res = _run(wsi_dir / "HE_example.tif", out, tissue="auto", batch_size=32)
    m = res.manifest
    assert m["resolution"]["mpp_source"].startswith("ome")
    assert m["resolution"]["scale_level0_to_model"] == pytest.approx(0.50008 / 0.25, rel=1e-3)
    assert 0 < res.patches_run <= res.patches_total
    df = gpd.read_parquet(out / "nuclei.parquet")
    # real H&E at 20x, resampled by 2.0003: every nucleus once, no overlaps at all
    assert len(df) > 3000 and df["id"].is_unique
    assert _max_overlap(list(df.geometry)) < 1.0
    assert m["qc"]["seam_candidates"] > 0 and m["qc"]["nuclei_cut_at_window_border"] == 0
    assert check_qupath_geojson(out / "nuclei.geojson.gz") == []
    summary = json.loads((out / "summary.json").read_text())
    assert summary["slide"]["n_nuclei"] == len(df) == sum(r["n_nuclei"] for r in summary["regions"])


@pytest.mark.slow
def test_small_dicom_open_tissue_and_a_small_region(wsi_dir: Path, tmp_path: Path) -> None:
    """The DICOM is ~4.6 µm/px (nominal, from ImagedVolumeWidth): far too coarse for nuclei
    (a full run would be ~115k tiles at 18x upsampling). Check the reader + tissue detection,
    then push a tiny region across a frame seam (frames are 500 px) through the engine."""
    from wsi_nuclei.slide import open_slide
    from wsi_nuclei.tissue import detect_tissue_on_slide

    with open_slide(wsi_dir / "small_dicom.dcm") as s:
        assert s.backend == "dicom" and s.dimensions == (3236, 2638)
        tmap = detect_tissue_on_slide(s)
    assert 0.2 < tmap.tissue_fraction < 0.8
    biggest = max(tmap.regions, key=lambda r: r.area_px)
    assert biggest.area_px > 0.1 * 3236 * 2638
    pts = [(985, 1485), (1015, 1485), (1015, 1515), (985, 1515)]
    regions = _regions_file(tmp_path / "roi.geojson", {"seam": pts})
    out = tmp_path / "out"
    # at its nominal 4.6 µm/px the engine refuses (18x upsampling is meaningless) and leaves
    # no output folder behind
    from wsi_nuclei.errors import MissingMppError

    with pytest.raises(MissingMppError, match="too coarse"):
        _run(wsi_dir / "small_dicom.dcm", out, tissue="auto", regions=regions)
    assert not out.exists()
    # with an explicit --mpp the frame seam is read like any other pixel
    res = _run(wsi_dir / "small_dicom.dcm", out, tissue="auto", regions=regions, mpp=0.25)
    m = res.manifest
    assert m["backend"] == "dicom" and m["resolution"]["mpp_source"] == "user:--mpp"
    assert m["resolution"]["scale_level0_to_model"] == pytest.approx(1.0)
    assert res.patches_run < 60
    summary = json.loads((out / "summary.json").read_text())
    assert [r["region_name"] for r in summary["regions"]] == ["seam"]
    assert check_qupath_geojson(out / "nuclei.geojson.gz") == []
    df = gpd.read_parquet(out / "nuclei.parquet")
    poly = shapely.Polygon(pts)
    assert all(poly.covers(shapely.Point(x, y)) for x, y in zip(df.centroid_x, df.centroid_y))


# --------------------------------------------------------------------------------------------
# models whose output window is smaller than their input (HoVer-Net "fast": 256 in, 164 out)
# --------------------------------------------------------------------------------------------
class _Classic164:
    """The classical model seen through a 256-in / 164-out window: its "maps" are the central
    164 x 164 of each input patch (as a valid-convolution network's would be)."""

    map_fill = {"rgb": 255.0}

    def __init__(self, spec) -> None:
        self.spec = spec
        self.device = "cpu"

    def infer(self, batch: np.ndarray) -> list[dict]:
        c = (self.spec.input_size - self.spec.output_size) // 2
        n = self.spec.output_size
        return [
            {"rgb": t[c : c + n, c : c + n].transpose(2, 0, 1).astype(np.float32)} for t in batch
        ]

    def postprocess(self, raw: dict, origin=None):
        from wsi_nuclei.models.classic import ClassicModel

        return ClassicModel(self.spec).postprocess(raw)


@pytest.fixture
def classic164():
    from wsi_nuclei import engine
    from wsi_nuclei.models import ModelSpec, _registry, register_model

    spec = ModelSpec(
        name="test-classic-164",
        description="test",
        licence="test",
        mpp=0.25,
        input_size=256,
        output_size=164,
        class_names={},
        builder=lambda spec, weights, device: _Classic164(spec),
    )
    register_model(spec)
    engine.clear_model_cache()
    yield spec.name
    del _registry._REGISTRY[spec.name]
    engine.clear_model_cache()


def test_output_window_smaller_than_input_is_exact(
    synth: dict, tmp_path: Path, classic164: str, base: Path
) -> None:
    out = tmp_path / "o164"
    res = _run(synth["s25"], out, model=classic164, block_size=256)
    m = res.manifest["tiling"]
    assert (m["patch_stride"], m["patch_border"], m["patch_context"]) == (164, 0, 46)
    assert res.patches_total == res.patches_run == 7 * 7  # ceil(1024 / 164)
    df = gpd.read_parquet(out / "nuclei.parquet")
    truth = synth["truth"]
    assert _match(df[["centroid_x", "centroid_y"]].to_numpy(), truth, 3.0) == {
        "true": len(truth),
        "found": len(truth),
        "matched": len(truth),
        "missed": 0,
        "extra": 0,
    }
    assert df["id"].is_unique and _max_overlap(list(df.geometry)) < 1.0
    # same nuclei, same geometry as the 256/256 classic run: the output window is invisible
    a = gpd.read_parquet(base / "nuclei.parquet").sort_values("id").reset_index(drop=True)
    b = df.sort_values("id").reset_index(drop=True)
    assert len(a) == len(df) and (a["id"] == b["id"]).all()
    np.testing.assert_allclose(a["area_um2"], b["area_um2"])


# --------------------------------------------------------------------------------------------
# accelerator out of memory, a worker process that dies
# --------------------------------------------------------------------------------------------
def test_out_of_memory_halves_the_batch_and_completes(
    synth: dict, base: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    from wsi_nuclei.models.classic import ClassicModel

    real = ClassicModel.infer
    calls = []

    def oom(self, batch):
        calls.append(len(batch))
        if len(batch) > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(self, batch)

    monkeypatch.setattr(ClassicModel, "infer", oom)
    out = synth["dir"] / "oom"
    # infer_chunk=8: the whole batch in one call (the CPU default runs smaller chunks)
    res = _run(synth["s25"], out, batch_size=8, block_size=256, infer_chunk=8)
    assert res.manifest["qc"]["oom_batch_splits"] > 0 and max(calls) == 8 and 2 in calls
    _same_outputs(base, out)


def _descendants(pid: int) -> list[int]:
    """Process ids below ``pid`` (from /proc)."""
    kids: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            kids.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        for k in kids.get(p, []):
            out.append(k)
            todo.append(k)
    return out


@pytest.mark.slow
def test_a_dead_worker_process_does_not_change_the_result(
    synth: dict, base: Path, tmp_path: Path
) -> None:
    """--workers 2: one worker process is killed mid-run; Dask reruns its tasks elsewhere, the
    coordinator resubmits any block whose window was on it, and the output is the same."""
    import signal
    import subprocess
    import sys
    import time

    script = Path(sys.executable).parent / "wsi-nuclei"
    cmd = [str(script)] if script.is_file() else [sys.executable, "-m", "wsi_nuclei.cli"]
    out = tmp_path / "dead"
    proc = subprocess.Popen(
        [
            *cmd,
            "run",
            str(synth["s25"]),
            "--model",
            "classic",
            "--tissue",
            "none",
            "--block-size",
            "256",
            "--batch-size",
            "2",
            "--workers",
            "2",
            "--threads",
            "1",
            "--out",
            str(out),
            "-q",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    killed = None
    deadline = time.time() + 120
    while killed is None and proc.poll() is None and time.time() < deadline:
        time.sleep(0.5)
        workers = [
            p
            for p in _descendants(proc.pid)
            if "distributed" in Path(f"/proc/{p}/cmdline").read_bytes().decode(errors="ignore")
            or "spawn_main" in Path(f"/proc/{p}/cmdline").read_bytes().decode(errors="ignore")
        ]
        blocks = (
            list((out / ".work" / "blocks").glob("*.parquet"))
            if (out / ".work" / "blocks").is_dir()
            else []
        )
        if len(workers) >= 2 and len(blocks) >= 2:
            killed = workers[-1]
            os.kill(killed, signal.SIGKILL)
    _, err = proc.communicate(timeout=600)
    assert killed is not None, "no worker process to kill"
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    _same_outputs(base, out)


def test_a_part_file_gives_back_its_block_table_and_stats(tmp_path: Path) -> None:
    """Parts are written from the frame's arrays (no pandas metadata): the same columns, dtypes,
    values, geometries and stats come back, for a block with nuclei and for an empty one."""
    from wsi_nuclei.engine._blocks import _frame
    from wsi_nuclei.pipeline._parts import load_part, load_part_stats, save_part

    square = shapely.box(10.0, 20.0, 14.5, 23.5)
    frame = pd.DataFrame(
        {
            "id": ["a", "b", "c"],
            "block_row": np.array([0, 0, 1], np.int32),
            "centroid_x": [1.5, 2.25, 3.0],
            "class_id": np.array([1, 0, 3], np.int8),
            "class_prob": np.array([0.5, 0.25, 1.0], np.float32),
            "geometry": [square, None, square.buffer(1.0)],
            "_seam": [True, False, True],
            "_mask": [b"\x01\x02", None, b""],
        }
    )
    stats = {"n_found": 3, "member_rows": [0, 2], "member_ids": [5, 7]}
    for f, s in ((frame, stats), (_frame({}), {"n_found": 0})):
        path = tmp_path / "part.parquet"
        save_part(f, s, path)
        got, got_stats = load_part(path)
        assert got_stats == s == load_part_stats(path)
        assert list(got.columns) == list(f.columns)
        assert got.dtypes.to_dict() == f.dtypes.to_dict()
        assert isinstance(got.index, pd.RangeIndex) and len(got) == len(f)
        pd.testing.assert_frame_equal(got.drop(columns="geometry"), f.drop(columns="geometry"))
        for a, b in zip(got["geometry"], f["geometry"]):
            assert (a is None and b is None) or a.equals_exact(b, 0.0)

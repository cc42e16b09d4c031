"""``--anndata``: nuclei.h5ad read back with anndata and compared with nuclei.parquet."""

from __future__ import annotations

import errno
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from shapely.geometry import box

from wsi_nuclei.cli import main
from wsi_nuclei.demo import make_nuclei_image, write_pyramidal_tiff

anndata = pytest.importorskip("anndata", reason="the optional 'anndata' extra is not installed")
gpd = pytest.importorskip("geopandas")


@pytest.fixture(scope="module")
def slide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("h5ad")
    rgb, _, _ = make_nuclei_image(512, 384, seed=3, min_radius=6, gap=4)
    return write_pyramidal_tiff(d / "s.svs", rgb, mpp=0.25)


def test_run_anndata_matches_the_parquet(
    slide: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    regions = tmp_path / "r.geojson"
    regions.write_text(
        json.dumps(
            {
                "type": "FeatureCollection",
                "features": [
                    {
                        "type": "Feature",
                        "geometry": {
                            "type": "Polygon",
                            "coordinates": [[[0, 0], [256, 0], [256, 384], [0, 384], [0, 0]]],
                        },
                        "properties": {"objectType": "annotation", "name": "left"},
                    },
                    {
                        "type": "Feature",
                        "geometry": {
                            "type": "Polygon",
                            "coordinates": [[[256, 0], [512, 0], [512, 384], [256, 384], [256, 0]]],
                        },
                        "properties": {"objectType": "annotation", "name": "right"},
                    },
                ],
            }
        )
    )
    out = tmp_path / "run"
    assert (
        main(
            [
                "run",
                str(slide),
                "--model",
                "classic",
                "--tissue",
                "none",
                "--regions",
                str(regions),
                "--anndata",
                "--no-report",
                "--out",
                str(out),
                "-q",
            ]
        )
        == 0
    )
    assert capsys.readouterr().err == ""
    assert not list(out.glob(".*tmp*"))
    ad = anndata.read_h5ad(out / "nuclei.h5ad")
    df = gpd.read_parquet(out / "nuclei.parquet")
    summary = json.loads((out / "summary.json").read_text())
    run = json.loads((out / "run.json").read_text())
    assert ad.n_obs == len(df) == summary["slide"]["n_nuclei"] > 50
    assert list(ad.obs_names) == df["id"].tolist()
    # classes: categorical with the model's classes (classic: one, 'Nucleus')
    assert isinstance(ad.obs["class"].dtype, pd.CategoricalDtype)
    assert list(ad.obs["class"].cat.categories) == ["Nucleus"]
    assert ad.obs["class"].astype(str).tolist() == df["class_name"].tolist()
    np.testing.assert_array_equal(
        ad.obs["class_prob"].to_numpy(), df["class_prob"].to_numpy(np.float32)
    )
    assert not any(
        c.startswith("prob_") for c in ad.obs.columns
    )  # no class head: no class probabilities
    # morphology in obs and X, centroids in µm in obsm['spatial']
    morph = [
        "area_um2",
        "perimeter_um",
        "circularity",
        "solidity",
        "eccentricity",
        "major_axis_um",
        "minor_axis_um",
    ]
    assert list(ad.var_names) == morph and ad.X.dtype == np.float32
    for i, c in enumerate(morph):
        np.testing.assert_array_equal(ad.obs[c].to_numpy(), df[c].to_numpy(np.float32))
        np.testing.assert_array_equal(ad.X[:, i], df[c].to_numpy(np.float32))
    np.testing.assert_array_equal(
        ad.obsm["spatial"], df[["centroid_x_um", "centroid_y_um"]].to_numpy()
    )
    np.testing.assert_allclose(
        ad.obsm["spatial"], df[["centroid_x", "centroid_y"]].to_numpy() * 0.25
    )
    # regions by id and name; counts per region as in the summary
    np.testing.assert_array_equal(ad.obs["region_id"].to_numpy(), df["region_id"].to_numpy())
    assert list(ad.obs["region"].cat.categories) == ["left", "right"]
    counts = ad.obs["region"].value_counts()
    by_name = {r["region_name"]: r["n_nuclei"] for r in summary["regions"]}
    assert {k: int(counts[k]) for k in by_name} == by_name
    meta = ad.uns["wsi_nuclei"]
    assert (meta["slide_name"], meta["mpp"], meta["model"], meta["model_sha256"]) == (
        "s.svs",
        0.25,
        "classic",
        "",
    )
    assert meta["fingerprint"] == run["fingerprint"] and meta["spatial_unit"] == "um"
    # deterministic: a second run writes the same bytes
    again = tmp_path / "again"
    assert (
        main(
            [
                "run",
                str(slide),
                "--model",
                "classic",
                "--tissue",
                "none",
                "--regions",
                str(regions),
                "--anndata",
                "--no-report",
                "--out",
                str(again),
                "-q",
            ]
        )
        == 0
    )
    assert (again / "nuclei.h5ad").read_bytes() == (out / "nuclei.h5ad").read_bytes()


def test_anndata_with_classes() -> None:
    from wsi_nuclei.anndata_export import nuclei_anndata
    from wsi_nuclei.regions import Region

    df = pd.DataFrame(
        {
            "id": ["n1", "n2", "n3"],
            "class_id": [2, 1, 0],
            "class_name": ["Inflammatory", "Neoplastic", "Nucleus"],
            "class_prob": [0.9, 0.8, 0.3],
            **{
                f"prob_{c}": [0.1, 0.2, 0.3]
                for c in ("Neoplastic", "Inflammatory", "Connective", "Dead", "Epithelial")
            },
            **{
                c: [1.0, 2.0, 3.0]
                for c in (
                    "area_um2",
                    "perimeter_um",
                    "circularity",
                    "solidity",
                    "eccentricity",
                    "major_axis_um",
                    "minor_axis_um",
                )
            },
            "region_id": [2, 1, 9],
            "centroid_x": [4.0, 8.0, 12.0],
            "centroid_y": [0.0, 4.0, 8.0],
            "centroid_x_um": [2.0, 4.0, 6.0],
            "centroid_y_um": [0.0, 2.0, 4.0],
        }
    )
    regions = [
        Region(1, "Tumour", box(0, 0, 10, 10), "user"),
        Region(2, "Stroma", box(10, 0, 20, 10), "user"),
        Region(3, "Empty", box(0, 10, 10, 20), "user"),
    ]
    ad = nuclei_anndata(df, regions=regions, uns={"model": "m", "model_sha256": None})
    assert list(ad.obs["class"].cat.categories) == [
        "Neoplastic",
        "Inflammatory",
        "Connective",
        "Dead",
        "Epithelial",
        "Nucleus",
    ]
    assert ad.obs["class"].astype(str).tolist() == ["Inflammatory", "Neoplastic", "Nucleus"]
    assert [c for c in ad.obs.columns if c.startswith("prob_")] == [
        "prob_Neoplastic",
        "prob_Inflammatory",
        "prob_Connective",
        "prob_Dead",
        "prob_Epithelial",
    ]
    assert list(ad.obs["region"].cat.categories) == ["Tumour", "Stroma", "Empty", "region 9"]
    assert ad.obs["region"].astype(str).tolist() == ["Stroma", "Tumour", "region 9"]
    assert ad.uns["wsi_nuclei"]["model_sha256"] == ""
    ad2 = nuclei_anndata(df.iloc[:2], classes=["Neoplastic", "Inflammatory"])
    assert list(ad2.obs["class"].cat.categories) == ["Neoplastic", "Inflammatory"]


def test_anndata_missing_is_refused_up_front(
    slide: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "anndata", None)  # `import anndata` raises ImportError
    out = tmp_path / "out"
    for argv in ([str(slide)], [str(slide), str(slide.parent)]):
        code = main(["run", *argv, "--model", "classic", "--anndata", "--out", str(out)])
        err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
        assert code == 1
        assert err == [
            "wsi-nuclei: error: --anndata needs the 'anndata' package, which is not installed: "
            "pip install 'wsi-nuclei[anndata]'"
        ]
        assert not out.exists()


def test_anndata_write_is_atomic(
    slide: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full_disk(self, path, *a, **kw):  # type: ignore[no-untyped-def]
        Path(path).write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(anndata.AnnData, "write_h5ad", full_disk)
    out = tmp_path / "out"
    code = main(
        [
            "run",
            str(slide),
            "--model",
            "classic",
            "--tissue",
            "none",
            "--anndata",
            "--no-report",
            "--out",
            str(out),
            "-q",
        ]
    )
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert code == 7 and len(err) == 1 and "cannot write nuclei.h5ad" in err[0]
    assert not (out / "nuclei.h5ad").exists() and not list(out.glob(".*tmp*"))
    assert not (out / "run.json").exists()  # the run is not finished: a rerun replaces the outputs
    monkeypatch.undo()
    assert (
        main(
            [
                "run",
                str(slide),
                "--model",
                "classic",
                "--tissue",
                "none",
                "--anndata",
                "--no-report",
                "--out",
                str(out),
                "-q",
            ]
        )
        == 0
    )
    assert anndata.read_h5ad(out / "nuclei.h5ad").n_obs > 50

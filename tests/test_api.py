"""The public API (wsi_nuclei.*): every name resolves, importing the package stays cheap, and the
documented calls work end to end on a synthetic slide with known nuclei."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np

import wsi_nuclei as wn
from wsi_nuclei.demo import make_nuclei_image, write_pyramidal_tiff


def test_every_public_name_resolves_to_its_module() -> None:
    for name in wn.__all__:
        obj = getattr(wn, name)
        assert obj is not None
        if name != "__version__":
            assert getattr(obj, "__module__", "").startswith("wsi_nuclei."), name
    assert set(wn.__all__) <= set(dir(wn))


def test_import_is_cheap() -> None:
    """``import wsi_nuclei`` (and so ``wsi-nuclei --help``) loads neither torch nor the slide readers."""
    code = "import sys, wsi_nuclei; print(sorted(m for m in ('torch', 'openslide', 'dask', 'wsi_nuclei.pipeline') if m in sys.modules))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert out == "[]"


def test_documented_calls_on_a_synthetic_slide(tmp_path: Path) -> None:
    rgb, inst, table = make_nuclei_image(512, 512, seed=3, min_radius=6, max_radius=12, gap=4)
    path = tmp_path / "s.svs"
    write_pyramidal_tiff(path, rgb, mpp=0.25, compression="deflate")
    n_true = len(np.unique(inst)) - 1

    slide = wn.open_slide(path)
    assert isinstance(slide, wn.Slide) and slide.dimensions == (512, 512)
    assert "classic" in [s.name for s in wn.list_models()] and wn.get_spec("classic").mpp == 0.25

    res = wn.run(
        wn.RunConfig(slide=path, out=tmp_path / "out", model="classic", tissue="none", quiet=True)
    )
    assert isinstance(res, wn.RunResult) and res.n_nuclei == n_true
    assert wn.check_qupath_geojson(res.files["qupath.geojson.gz"]) == []

    model = wn.load_model("classic")
    found = wn.segment_image(model, rgb)
    assert len(found.labels) == n_true

    assert wn.write_report(tmp_path / "out").name == "report.html"
    overlay = wn.render_overlay(tmp_path / "out", 0, 0, 128)
    assert overlay.shape == (128, 128, 3) and overlay.dtype == np.uint8


def test_all_lists_exactly_the_lazy_exports() -> None:
    assert sorted(wn.__all__) == sorted(["__version__", *wn._EXPORTS])

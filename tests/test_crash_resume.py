"""Kill -9 at a few moments of a real ``wsi-nuclei run`` (subprocess), rerun, compare bytes.

The fast version of ``benchmarks/crash_resume.py``: a synthetic slide with the ``classic``
model in 16 blocks, SIGKILL after 30 %, 65 % and 97 % of an uninterrupted run's wall time
(while blocks are inferred, and towards the writers), then the same command again: the
nuclei table and the GeoJSON must be byte-identical to the uninterrupted run's.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from wsi_nuclei.demo import make_nuclei_image, write_pyramidal_tiff

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "crash_resume.py"


def test_sigkill_at_three_points_then_resume_gives_identical_files(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("crash_resume", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    rgb, _, _ = make_nuclei_image(1024, 1024, seed=3, min_radius=6, max_radius=14, gap=4)
    slide = write_pyramidal_tiff(tmp_path / "s.svs", rgb, mpp=0.25)
    res = mod.crash_resume(
        [
            str(slide),
            "--model",
            "classic",
            "--tissue",
            "none",
            "--block-size",
            "256",
            "--batch-size",
            "2",
        ],
        [0.3, 0.65, 0.9],
        tmp_path / "work",
        timeout=600,
    )
    bad = [r for r in res["rows"] if not r["identical"]]
    assert not bad, bad
    assert res["killed"] >= 1  # at least one kill landed before the run finished

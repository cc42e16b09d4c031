"""benchmarks/bench_gpu.py, the script prepared for a lent GPU, runs on CPU and reports every stage."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load():
    spec = importlib.util.spec_from_file_location("bench_gpu", ROOT / "benchmarks" / "bench_gpu.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.usefixtures("torch_one_thread")
def test_bench_gpu_on_cpu_reports_each_stage(tmp_path: Path) -> None:
    from wsi_nuclei.models import find_weights, get_spec

    if find_weights(get_spec("wsi-nuclei-lite0")) is None:
        pytest.skip("bundled weights absent")
    out = tmp_path / "g.json"
    assert (
        _load().main(
            ["--device", "cpu", "--batch", "4", "--n", "8", "--threads", "1", "--json", str(out)]
        )
        == 0
    )
    res = json.loads(out.read_text())
    assert (
        res["device"] == "cpu"
        and res["network_patches_per_s"] > 0
        and res["network_tta_patches_per_s"] > 0
    )
    post = res["postprocess"]
    # the torch path finds the very same nuclei as the numpy path on the same maps
    assert post["numpy_nuclei"] == post["torch_nuclei"] > 0
    assert post["numpy_ms_per_block"] > 0 and post["torch_ms_per_block"] > 0


def test_bench_gpu_without_cuda_is_one_line(capsys: pytest.CaptureFixture) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    assert _load().main(["--device", "cuda"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no CUDA device" in err[0]

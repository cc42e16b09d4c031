"""benchmarks/bench_peers.py: the parts that need no TIAToolbox (weights, shim, measurement, table).

TIAToolbox is an optional extra (``.[bench]``) that CI does not install; the one test that
needs it is skipped with that reason.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "bench_peers.py"
HAS_TIA = importlib.util.find_spec("tiatoolbox") is not None


def _load():
    spec = importlib.util.spec_from_file_location("bench_peers", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _patches(n: int = 2, side: int = 128) -> np.ndarray:
    from wsi_nuclei.demo import make_nuclei_image

    rgb, _, _ = make_nuclei_image(side, side * n, seed=1)
    return np.stack([rgb[:, i * side : (i + 1) * side] for i in range(n)]).astype(np.uint8)


def test_random_state_dict_is_official_layout_and_loads() -> None:
    from wsi_nuclei.models.hovernet.checkpoint import official_state_dict_layout

    sd = _load().make_state_dict(seed=3)
    layout = official_state_dict_layout()
    plain = {k: tuple(v.shape) for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    assert plain == layout and list(plain) == list(layout)
    counters = [k for k in sd if k.endswith("num_batches_tracked")]
    assert len(counters) == sum(k.endswith(".running_var") for k in layout)
    model = _load().hovernet_model(sd)  # strict load of exactly these tensors
    assert model.net.state_dict()["conv0./.weight"].equal(sd["conv0./.weight"])
    again = _load().make_state_dict(seed=3)
    assert all(again[k].equal(v) for k, v in sd.items())  # seeded


@pytest.mark.usefixtures("torch_one_thread")
def test_calibrated_weights_give_the_asked_foreground(tmp_path: Path) -> None:
    patches = _patches()
    sd = _load().make_state_dict(seed=0, patches=patches, fg=0.3)
    model = _load().hovernet_model(sd)
    maps = model.infer(patches)
    fg = float(np.mean([(m["np"] > 0.5).mean() for m in maps]))
    assert 0.25 <= fg <= 0.35
    hv = np.stack([m["hv"] for m in maps])
    assert 0.5 < hv.std() < 2.0  # unit spread, not logits in the hundreds


def test_torchvision_shim_satisfies_imports_only() -> None:
    code = (
        "import sys, importlib.util\n"
        f"spec = importlib.util.spec_from_file_location('bp', {str(SCRIPT)!r})\n"
        "bp = importlib.util.module_from_spec(spec); spec.loader.exec_module(bp)\n"
        "assert bp.install_torchvision_shim('on')\n"
        "from torchvision.ops.misc import FrozenBatchNorm2d\n"
        "import torchvision.transforms as T\n"
        "t = T.Compose([T.ToTensor()])\n"
        "key = T.InterpolationMode.BILINEAR; {key: 1}\n"
        "try:\n"
        "    t(None)\n"
        "    raise SystemExit('call went through')\n"
        "except RuntimeError as exc:\n"
        "    assert 'torchvision shim' in str(exc)\n"
        "print('|'.join(sorted(set(bp.SHIM_REQUESTS))))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    names = out.stdout.strip().split("|")
    assert (
        "torchvision.ops.misc.FrozenBatchNorm2d" in names
        and "torchvision.transforms.ToTensor" in names
    )


def test_measure_sees_child_memory_and_time() -> None:
    code = "import time, numpy as np; a = np.ones(300 * 2**20 // 8); time.sleep(0.6)"
    run = _load().measure([sys.executable, "-c", code], poll_s=0.05)
    assert run["rc"] == 0 and run["wall_s"] >= 0.6
    assert abs(run["cpu_s"] - run["user_s"] - run["sys_s"]) <= 0.11
    assert run["peak_rss_mb"] >= 300 and run["tree_peak_rss_mb"] >= 250


def test_summary_ratios_and_table_on_a_hand_made_case() -> None:
    bp = _load()
    runs = [
        {
            "tool": "wsi-nuclei",
            "rc": 0,
            "wall_s": 30.0,
            "peak_rss_mb": 1000.0,
            "tree_peak_rss_mb": 1000.0,
            "patches": 36,
            "nuclei": 10,
        },
        {
            "tool": "wsi-nuclei",
            "rc": 0,
            "wall_s": 50.0,
            "peak_rss_mb": 1200.0,
            "tree_peak_rss_mb": 1100.0,
            "patches": 36,
            "nuclei": 10,
        },
        {
            "tool": "wsi-nuclei",
            "rc": 1,
            "wall_s": 1.0,
            "peak_rss_mb": 1.0,
            "tree_peak_rss_mb": 1.0,
        },  # failed: not counted
        {
            "tool": "tiatoolbox",
            "rc": 0,
            "wall_s": 80.0,
            "peak_rss_mb": 2200.0,
            "tree_peak_rss_mb": 2400.0,
            "patches": 25,
            "nuclei": 20,
        },
    ]
    s = bp.summarise(runs)
    assert s["median"]["wsi-nuclei"]["wall_s"] == 40.0 and s["median"]["wsi-nuclei"]["runs"] == 2
    r = s["ratio_wsi_over_tia"]
    assert (
        r["wall_s"] == 0.5
        and r["peak_rss_mb"] == 0.5
        and r["patches"] == 1.44
        and r["nuclei"] == 0.5
    )
    table = bp.format_table(s)
    assert "| wall time (s) | 40.0 | 80.0 | 0.50x |" in table
    assert "| network patches | 36 | 25 | 1.44x |" in table
    only = bp.summarise(runs[:2])
    assert only["ratio_wsi_over_tia"]["wall_s"] is None and "n/a" in bp.format_table(only)
    json.dumps(s)


@pytest.mark.skipif(HAS_TIA, reason="tiatoolbox is installed here")
def test_without_tiatoolbox_one_line_exit_2(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    assert _load().main(["--work", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "tiatoolbox is not installed" in err[0]


@pytest.mark.slow
@pytest.mark.skipif(
    not HAS_TIA, reason="tiatoolbox not installed (optional extra .[bench]; CI does not install it)"
)
@pytest.mark.usefixtures("torch_one_thread")
def test_raw_maps_agree_with_tiatoolbox(tmp_path: Path) -> None:
    import torch

    bp = _load()
    bp.install_torchvision_shim("auto")
    weights = tmp_path / "w.pth"
    torch.save(bp.make_state_dict(seed=0, patches=_patches(), fg=0.3), weights)
    res = bp.raw_agreement(weights, _patches(1, 256)[0])
    assert res["same_layout"]
    assert max(res[f"logits_{h}_max_abs_diff"] for h in ("np", "hv", "tp")) < 1e-3
    assert res["infer_np_max_abs_diff"] < 1e-4 and res["infer_tp_argmax_agreement"] > 0.999

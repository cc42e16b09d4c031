"""Every stage that would run on a GPU, timed per stage: one short script for a lent GPU machine.

Usage::

    python benchmarks/bench_gpu.py [--device cuda] [--batch 64] [--n 512] [--slide PATH] [--json OUT]

Prints one JSON object with, for the default model on ``--device``:

- ``network``: patches/s of batched inference (fp32, and fp16 autocast on CUDA, the precision
  ``run`` uses there), host->device transfer included, from pinned memory on CUDA;
- ``network_tta``: the same with flip test-time augmentation;
- ``postprocess``: ms per 1216 x 1216 block (a 1024 core with the 96-px halo) and per
  256-px-patch equivalent, for the numpy path and the torch path on the device;
- ``end_to_end`` (with ``--slide``): ``wsi-nuclei run`` on the slide, wall time and patches/s.

Runs on CPU too (``--device cpu``), which is how it is tested; on a machine without CUDA,
``--device cuda`` stops with one line. Budget: about 2 minutes on a GPU with the defaults.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def _tiles(n_in: int, batch: int) -> np.ndarray:
    from wsi_nuclei.demo import make_nuclei_image

    rgb, _, _ = make_nuclei_image(n_in * 4, n_in * 4, seed=3)
    tiles = np.stack(
        [
            rgb[y : y + n_in, x : x + n_in]
            for y in range(0, 4 * n_in, n_in)
            for x in range(0, 4 * n_in, n_in)
        ]
    )
    return np.concatenate([tiles] * (batch // len(tiles) + 1))[:batch]


def _network(model, batch: np.ndarray, n: int, device: str) -> float:
    """Patches/s of ``model.infer`` over about ``n`` patches (after one warm-up batch)."""
    model.infer(batch)
    _sync(device)
    reps = max(1, n // len(batch))
    t = time.perf_counter()
    for _ in range(reps):
        model.infer(batch)
    _sync(device)
    return reps * len(batch) / (time.perf_counter() - t)


def _block_maps(model, size: int = 1216) -> dict[str, np.ndarray]:
    """Blended maps of a synthetic H&E-like region of ``size`` px, through the engine."""
    from wsi_nuclei.demo import make_nuclei_image
    from wsi_nuclei.inference import predict_maps

    rgb, _, _ = make_nuclei_image(size, size, seed=5)
    return predict_maps(model, rgb)


def _postprocess(
    maps: dict[str, np.ndarray], params, device: str, reps: int = 3
) -> dict[str, float]:
    from wsi_nuclei.postprocess import hv_to_instances
    from wsi_nuclei.postprocess_torch import hv_to_instances_torch

    out = {}
    side = maps["np"].shape[-1]
    per_patch = (side / 192) ** 2  # patch-grid cells (stride 192) in the block
    for name, fn in (
        ("numpy", lambda: hv_to_instances(maps["np"], maps["hv"], maps.get("tp"), params)),
        (
            "torch",
            lambda: hv_to_instances_torch(
                maps["np"], maps["hv"], maps.get("tp"), params, device=device
            ),
        ),
    ):
        fn()
        _sync(device)
        t = time.perf_counter()
        for _ in range(reps):
            res = fn()
        _sync(device)
        ms = 1000 * (time.perf_counter() - t) / reps
        out[f"{name}_ms_per_block"] = round(ms, 1)
        out[f"{name}_ms_per_patch"] = round(ms / per_patch, 2)
        out[f"{name}_nuclei"] = int(len(res.labels))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    p.add_argument("--batch", type=int, default=64, help="patches per batch (default: %(default)s)")
    p.add_argument(
        "--n", type=int, default=512, help="patches to time per setting (default: %(default)s)"
    )
    p.add_argument(
        "--threads", type=int, default=2, help="torch CPU threads (default: %(default)s)"
    )
    p.add_argument("--slide", help="also time 'wsi-nuclei run' on this slide")
    p.add_argument("--json", help="write the figures here too")
    a = p.parse_args(argv)
    import torch

    if a.device == "cuda" and not torch.cuda.is_available():
        print(
            "bench_gpu: --device cuda but no CUDA device is available (use --device cpu to test the script)",
            file=sys.stderr,
        )
        return 1
    torch.set_num_threads(a.threads)
    from wsi_nuclei.models import default_model_name, load_model

    name = default_model_name()
    res: dict = {
        "model": name,
        "device": a.device,
        "batch": a.batch,
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(0) if a.device == "cuda" else None,
    }
    model = load_model(name, device=a.device)
    batch = _tiles(model.spec.input_size, a.batch)
    res["network_patches_per_s"] = round(_network(model, batch, a.n, a.device), 1)
    res["network_tta_patches_per_s"] = round(
        _network(load_model(name, device=a.device, tta=True), batch, a.n // 4, a.device), 1
    )
    res["postprocess"] = _postprocess(_block_maps(model), model.params, a.device)
    if a.slide:
        import subprocess
        import tempfile

        out = Path(tempfile.mkdtemp(prefix="bench-gpu-"))
        t = time.perf_counter()
        subprocess.run(
            [
                sys.executable,
                "-m",
                "wsi_nuclei.cli",
                "run",
                a.slide,
                "--out",
                str(out),
                "--device",
                a.device,
                "-q",
                "--no-report",
                "--batch-size",
                str(min(a.batch, 64)),
            ],
            check=True,
        )
        wall = time.perf_counter() - t
        man = json.loads((out / "run.json").read_text())
        res["end_to_end"] = {
            "wall_s": round(wall, 1),
            "patches": man["qc"]["patches_run"],
            "patches_per_s": round(man["qc"]["patches_run"] / wall, 1),
            "nuclei": man["n_nuclei"],
            "postprocess_backend": man.get("model", {}).get("postprocess_backend"),
        }
    text = json.dumps(res)
    print(text)
    if a.json:
        Path(a.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

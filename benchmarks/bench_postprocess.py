"""Post-processing speed and agreement: the numpy path against the torch path, on real maps.

Usage::

    python benchmarks/bench_postprocess.py [--device cpu|cuda] [--threads 1] [--repeats 3]
                                           [--cache /tmp/wsi-nuclei-bench-maps] [--json out.json]

The maps are the bundled model's (``wsi-nuclei-lite0``) on the MoNuSeg validation images of
``configs/val_split.json`` (1000 x 1000 at 0.25 µm/px, reflected to one 1024 x 1024 block, the
engine's default block core) and on 256 x 256 CoNSeP validation tiles; they are computed once on
the CPU and cached. For each block the script prints the median wall time of
``hv_to_instances`` (numpy, CPU) and of ``hv_to_instances_torch`` on ``--device`` (maps copied
to the device and the result back included), the time per 256 x 256 tile equivalent (block
time / 16) and the binary PQ of the torch instances against the numpy ones.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "nuclei"


def _maps(model, ds: str, name: str, size: int | None, cache: Path) -> dict[str, np.ndarray]:
    from PIL import Image

    from wsi_nuclei.inference import predict_maps

    path = cache / f"{ds}__{name}__{size or 0}.npz"
    if path.exists():
        with np.load(path) as z:
            return {k: z[k] for k in z.files}
    image = np.asarray(Image.open(DATA / ds / "images" / f"{name}.png").convert("RGB"))
    if size:
        h, w = image.shape[:2]
        image = np.pad(
            image, ((0, max(0, size - h)), (0, max(0, size - w)), (0, 0)), mode="reflect"
        )[:size, :size]
    maps = predict_maps(model, image)
    cache.mkdir(parents=True, exist_ok=True)
    np.savez(path, **maps)
    return maps


def _time(fn, repeats: int, sync) -> tuple[float, object]:
    out = fn()  # warm-up (allocator, kernels)
    times = []
    for _ in range(repeats):
        sync()
        t = time.perf_counter()
        out = fn()
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", default="cpu", help="device of the torch path (cpu or cuda)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads of torch and OpenCV")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--cache", type=Path, default=Path("/tmp/wsi-nuclei-bench-maps"))
    p.add_argument("--consep", type=int, default=4, help="CoNSeP validation tiles to time")
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = p.parse_args()
    import cv2
    import torch

    torch.set_num_threads(args.threads)
    cv2.setNumThreads(args.threads)  # the numpy path's OpenCV calls get the same cores
    from wsi_nuclei.eval import panoptic_quality
    from wsi_nuclei.models import load_model
    from wsi_nuclei.postprocess import hv_to_instances
    from wsi_nuclei.postprocess_torch import hv_to_instances_torch

    model = load_model("wsi-nuclei-lite0", device="cpu")
    params = model.params
    split = json.loads((REPO / "configs" / "val_split.json").read_text())
    cases = [("monuseg_train", n, 1024) for n in split["monuseg_train"]]
    cases += [("consep_train", n, None) for n in split["consep_train"][: args.consep]]
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    rows = []
    print(
        f"torch {torch.__version__}, torch path on {args.device}, {args.threads} torch thread(s), "
        f"median of {args.repeats}"
    )
    print(
        f"{'image':<28} {'size':>9} {'nuclei':>6} {'numpy ms':>9} {'torch ms':>9} "
        f"{'np ms/tile':>10} {'torch ms/tile':>13} {'PQ':>7} {'class agree':>11}"
    )
    for ds, name, size in cases:
        maps = _maps(model, ds, name, size, args.cache)
        t_np, ref = _time(
            lambda maps=maps: hv_to_instances(maps["np"], maps["hv"], maps["tp"], params),
            args.repeats,
            lambda: None,
        )
        t_t, res = _time(
            lambda maps=maps: hv_to_instances_torch(
                maps["np"], maps["hv"], maps["tp"], params, device=args.device
            ),
            args.repeats,
            sync,
        )
        pq = panoptic_quality(ref.inst, res.inst)["pq"]
        same_n = len(ref.labels) == len(res.labels)
        agree = (
            float(np.mean(ref.class_id == res.class_id))
            if same_n and len(ref.labels)
            else float("nan")
        )
        h, w = maps["np"].shape
        tiles = h * w / 256**2
        row = {
            "dataset": ds,
            "image": name,
            "height": h,
            "width": w,
            "nuclei_numpy": len(ref.labels),
            "nuclei_torch": len(res.labels),
            "numpy_ms": t_np * 1e3,
            "torch_ms": t_t * 1e3,
            "numpy_ms_per_tile": t_np * 1e3 / tiles,
            "torch_ms_per_tile": t_t * 1e3 / tiles,
            "pq": pq,
            "identical": bool(np.array_equal(ref.inst, res.inst)),
            "class_agreement": agree,
        }
        rows.append(row)
        print(
            f"{name[:28]:<28} {h:>4}x{w:<4} {len(ref.labels):>6} {row['numpy_ms']:>9.1f} {row['torch_ms']:>9.1f} "
            f"{row['numpy_ms_per_tile']:>10.2f} {row['torch_ms_per_tile']:>13.2f} {pq:>7.4f} {agree:>11.4f}"
        )
    blocks = [r for r in rows if r["height"] == 1024]
    if blocks:
        mean = {
            k: statistics.mean(r[k] for r in blocks)
            for k in ("numpy_ms", "torch_ms", "numpy_ms_per_tile", "torch_ms_per_tile")
        }
        print(
            f"1024 x 1024 blocks, mean: numpy {mean['numpy_ms']:.0f} ms ({mean['numpy_ms_per_tile']:.1f} ms per "
            f"256-px tile), torch on {args.device} {mean['torch_ms']:.0f} ms ({mean['torch_ms_per_tile']:.1f} ms per tile); "
            f"min PQ {min(r['pq'] for r in rows):.4f}, all identical: {all(r['identical'] for r in rows)}"
        )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "device": args.device,
                    "threads": args.threads,
                    "torch": torch.__version__,
                    "rows": rows,
                },
                indent=1,
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Model inference speed: tiles/s of the network alone and of post-processing, per device.

Usage::

    python benchmarks/bench_model.py [--model NAME] [--device cpu|cuda] [--batch 16] [--threads 2] [--n 128] [--tta] [--precision auto|fp32|bf16|fp16|int8] [--no-fuse]

Reports network tiles/s (256x256 at 0.25 um/px, random-free real-looking input: a synthetic
H&E-like tile), post-processing ms/tile (HV watershed + classes) and the combined rate.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--n", type=int, default=128, help="tiles to time")
    p.add_argument(
        "--precision",
        default="auto",
        help="network arithmetic as 'wsi-nuclei run --precision' (default auto)",
    )
    p.add_argument(
        "--tta", action="store_true", help="flip test-time augmentation (4 network passes per tile)"
    )
    p.add_argument(
        "--no-fuse",
        action="store_true",
        help="keep the batch normalisations as separate layers (the spec's fuse_batchnorm off), "
        "to measure what folding them into the convolutions gains",
    )
    args = p.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    from wsi_nuclei.demo import make_nuclei_image
    from wsi_nuclei.models import default_model_name, load_model

    name = args.model or default_model_name()
    model = load_model(name, device=args.device, tta=args.tta, precision=args.precision)
    if args.no_fuse and getattr(model.spec, "fuse_batchnorm", False):
        import dataclasses

        from wsi_nuclei.models import find_weights

        spec = dataclasses.replace(model.spec, fuse_batchnorm=False)
        precision = model.precision
        model = spec.builder(spec, find_weights(spec), model.device)
        model.tta, model.precision = args.tta, precision
    n_in = model.spec.input_size
    rgb, _, _ = make_nuclei_image(n_in * 4, n_in * 4, seed=3)
    tiles = np.stack(
        [
            rgb[y : y + n_in, x : x + n_in]
            for y in range(0, 4 * n_in, n_in)
            for x in range(0, 4 * n_in, n_in)
        ]
    )
    batch = np.concatenate([tiles] * (args.batch // len(tiles) + 1))[: args.batch]
    model.infer(batch)  # warm-up
    if args.device == "cuda":
        torch.cuda.synchronize()
    n_batches = max(1, args.n // args.batch)
    t = time.perf_counter()
    raws = []
    for _ in range(n_batches):
        raws = model.infer(batch)
    if args.device == "cuda":
        torch.cuda.synchronize()
    t_net = (time.perf_counter() - t) / (n_batches * args.batch)
    t = time.perf_counter()
    for raw in raws:
        model.postprocess(raw)
    t_post = (time.perf_counter() - t) / len(raws)
    res = {
        "model": name,
        "device": args.device,
        "tta": args.tta,
        "precision": getattr(model, "precision", "fp32"),
        "fused_batchnorm": bool(getattr(model.spec, "fuse_batchnorm", False)),
        "batch": args.batch,
        "threads": args.threads,
        "network_tiles_per_s": round(1 / t_net, 1),
        "postprocess_ms_per_tile": round(1000 * t_post, 1),
        "sequential_tiles_per_s": round(1 / (t_net + t_post), 1),
    }
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

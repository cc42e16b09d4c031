"""Fit the int8 activation ranges of a map model on training images (``--precision int8``).

Usage::

    python scripts/calibrate_int8.py [--model wsi-nuclei-lite0] [--weights FILE]
        [--data ../shared/data/nuclei] [--split configs/val_split.json] [--images 12] [--patches 2]
        [--layers A,B] [--out FILE]

Takes ``--patches`` deterministic 256-px crops (at the model's resolution) from each of
``--images`` training images of every instance and point dataset in ``--data`` (images named in
the validation split and datasets named ``*_test`` are left out), runs the float network on them with histogram observers at
the inputs and outputs of the spec's ``int8_layers``, and writes the fitted (scale, zero point)
of each activation to the model's calibration file beside the weights (``--out`` to write
elsewhere), tied to the weights by their sha256.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np


def _crops(dataset: Path, names: list[str], patches: int, size: int, seed: int) -> list:
    from wsi_nuclei.datasets import read_shared_dataset

    rng = np.random.default_rng(seed)
    out = []
    for sample in read_shared_dataset(dataset, names=names):
        h, w = sample.image.shape[:2]
        if h < size or w < size:
            continue
        for _ in range(patches):
            y, x = int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))
            out.append(sample.image[y : y + size, x : x + size])
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default="wsi-nuclei-lite0")
    p.add_argument("--weights", default=None, help="weights file (default: the model's own)")
    p.add_argument("--data", default="../shared/data/nuclei", help="folder of shared datasets")
    p.add_argument("--split", default="configs/val_split.json", help="images to leave out")
    p.add_argument("--images", type=int, default=12, help="training images per dataset")
    p.add_argument("--patches", type=int, default=2, help="crops per image")
    p.add_argument(
        "--layers",
        default=None,
        help="comma-separated module names to quantise (default: the spec's int8_layers)",
    )
    p.add_argument("--out", default=None, help="calibration file (default: beside the weights)")
    args = p.parse_args(argv)

    import torch

    from wsi_nuclei.datasets import is_pannuke_fold, list_images
    from wsi_nuclei.models import find_weights, get_spec, load_model
    from wsi_nuclei.models._int8 import calibrate_int8, write_calibration
    from wsi_nuclei.models.fetch import sha256_file

    spec = get_spec(args.model)
    if not spec.int8_layers or not spec.int8_calibration:
        print(f"error: model {spec.name!r} names no int8 layers", file=sys.stderr)
        return 2
    layers = args.layers.split(",") if args.layers else list(spec.int8_layers)
    if not Path(args.data).is_dir():
        print(f"error: {args.data}: no such folder of datasets", file=sys.stderr)
        return 2
    weights = find_weights(spec, args.weights)
    model = load_model(spec.name, device="cpu", precision="fp32", weights=args.weights)
    held_out = json.loads(Path(args.split).read_text()) if args.split else {}
    crops, used = [], []
    for i, d in enumerate(sorted(Path(args.data).iterdir())):
        if not d.is_dir() or d.name.endswith("_test") or is_pannuke_fold(d):
            continue
        if not (d / "meta.json").is_file():
            continue
        names = [n for n in list_images(d) if n not in held_out.get(d.name, [])]
        if not names:
            continue
        step = max(1, len(names) // args.images)
        names = names[::step][: args.images]
        got = _crops(d, names, args.patches, spec.input_size, seed=i)
        crops += got
        used.append(f"{d.name} ({len(names)} images, {len(got)} crops)")
    if not crops:
        print(f"error: no training images found in {args.data}", file=sys.stderr)
        return 2

    def batches():
        for k in range(0, len(crops), 4):
            x = torch.from_numpy(np.stack(crops[k : k + 4])).permute(0, 3, 1, 2).float()
            yield x.contiguous()

    torch.manual_seed(0)
    qparams = calibrate_int8(model.net, layers, batches())
    out = Path(args.out) if args.out else Path(weights).parent / spec.int8_calibration
    about = (
        f"{len(crops)} crops of {spec.input_size} px at {spec.mpp} um/px from training images "
        f"(validation split left out): {'; '.join(used)}; histogram observers, 7-bit activations"
    )
    write_calibration(
        out,
        weights_sha256=sha256_file(weights),
        layers=layers,
        qparams=qparams,
        about=about,
    )
    print(f"{out}: {len(qparams)} activations from {about}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

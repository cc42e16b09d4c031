"""Turn a training checkpoint into the bundled weights file (fp16 state dict) and print its sha256.

Usage::

    python scripts/export_weights.py runs/v3/stage3/best.pt wsi_nuclei/models/weights/wsi-nuclei-lite0-v3.pt

Then record the printed sha256 as DEFAULT_WEIGHTS_SHA256 in wsi_nuclei/models/lite.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from wsi_nuclei.models import sha256_file


def main(src: str, dest: str) -> int:
    ck = torch.load(src, map_location="cpu", weights_only=True)
    sd = ck.get("model", ck)
    half = {k: (v.half() if v.is_floating_point() else v) for k, v in sd.items()}
    Path(dest).parent.mkdir(parents=True, exist_ok=True)
    torch.save(half, dest)
    print(
        f"{dest}: {Path(dest).stat().st_size / 1e6:.1f} MB, epoch {ck.get('epoch')}, metrics {ck.get('metrics')}"
    )
    print(f"sha256 {sha256_file(dest)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(*sys.argv[1:3]))

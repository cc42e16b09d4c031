"""Accuracy against network passes: the default model's output border (the cross-faded overlap
of neighbouring patches) varied on the validation split, through the engine's path.

Each border ``B`` gives a patch stride of ``output - 2B`` and so ``(output / stride)²`` network
passes per pixel; the scores are those of ``wsi-nuclei evaluate --split`` with the model's
``output_border`` replaced (for this process only).

    python benchmarks/bench_border.py [--borders 0 16 32 48] [--precision fp32] [--json out.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SETS = ("monuseg_train", "consep_train", "crchisto")


def _row(border: int, stride: int, output: int, res: dict) -> dict:
    row: dict = {"border": border, "stride": stride, "passes": round((output / stride) ** 2, 2)}
    for name, r in res.items():
        pq = (r["segmentation"].get("pq") or {}).get("mean") or {}
        if pq.get("pq") is not None:
            row[f"{name}_bpq"] = round(pq["pq"], 4)
        row[f"{name}_det_f1"] = round(r["detection"]["f1"], 4)
        for group, g in (r["classification"].get("groups") or {}).items():
            if isinstance(g, dict) and g.get("f1") is not None:
                row[f"{name}_{group}_f1"] = round(g["f1"], 4)
        row[f"{name}_s"] = r["seconds"]
    return row


def main(argv: list[str] | None = None) -> int:
    from wsi_nuclei.eval.command import _split_names, evaluate_model
    from wsi_nuclei.models import default_model_name, load_model

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--borders", type=int, nargs="+", default=[0, 16, 32, 48])
    p.add_argument("--model", default=None, help="default: the default model")
    p.add_argument("--data-root", default=str(REPO.parent / "shared" / "data" / "nuclei"))
    p.add_argument("--split", default=str(REPO / "configs" / "val_split.json"))
    p.add_argument("--precision", default="fp32")
    p.add_argument("--json", help="write the rows here")
    a = p.parse_args(argv)
    root = Path(a.data_root)
    if not all((root / s).is_dir() for s in SETS):
        print(f"bench_border: the validation sets {SETS} are not all under {root}", file=sys.stderr)
        return 2
    model = load_model(a.model or default_model_name(), precision=a.precision)
    spec = model.spec
    rows = []
    for b in a.borders:
        model.spec = dataclasses.replace(spec, output_border=b)
        res = {
            s: evaluate_model(
                model, root / s, names=_split_names(a.split, root / s), progress=False
            )
            for s in SETS
        }
        rows.append(_row(b, model.spec.stride, spec.output_size, res))
        print(json.dumps(rows[-1]), flush=True)
    model.spec = spec
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

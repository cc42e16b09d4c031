"""``wsi-nuclei evaluate``: run a model on annotated datasets and report the standard metrics.

Images are resampled to the model's resolution, predicted whole (maps stitched over a sliding
window, then post-processed once) and scored with :func:`wsi_nuclei.eval.evaluate_predictions`:
binary PQ/DQ/SQ, mPQ over the classes with exact labels, AJI, Dice, detection P/R/F1 with
centroids paired within 3 µm (12 px at 0.25 µm/px, as HoVer-Net) and per-class F1 for the class
groups present (e.g. CoNSeP: Inflammatory, Connective, Neoplastic|Epithelial).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .._io import atomic_path
from ..datasets import read_dataset
from ..errors import DatasetError
from ..models._device import PRECISIONS

if TYPE_CHECKING:
    from ..models.base import NucleusModel


def evaluate_model(
    model: NucleusModel,
    dataset: str | Path,
    *,
    names: list[str] | None = None,
    radius_um: float = 3.0,
    progress: bool = True,
) -> dict[str, Any]:
    """Evaluate ``model`` on one dataset (optionally only the images ``names``)."""
    from tqdm import tqdm

    from ..inference import predict_instances
    from .aggregate import evaluate_predictions

    samples = read_dataset(dataset, target_mpp=model.spec.mpp, names=names)
    t0 = time.perf_counter()
    records = []
    for s in tqdm(
        samples, desc=Path(dataset).name, unit="img", disable=not progress, file=sys.stderr
    ):
        res = predict_instances(model, s.image)
        pred_class = np.zeros(int(res.inst.max()) + 1, np.int64)
        pred_class[res.labels] = res.class_id
        rec = {
            "name": s.name,
            "true_inst": s.inst,
            "true_classes": s.classes,
            "true_allowed": s.allowed,
            "pred_inst": res.inst,
            "pred_class": pred_class if model.spec.class_names else None,
            "mpp": s.mpp,
        }
        if s.inst is None:  # point labels (e.g. CRCHisto): detection and classes only
            rec.update(true_points=s.points, true_classes=None)
        records.append(rec)
    if not records:
        raise DatasetError(f"{dataset}: no images to evaluate")
    out = evaluate_predictions(records, radius_um=radius_um)
    out["seconds"] = round(time.perf_counter() - t0, 2)
    out["dataset"] = str(dataset)
    out["images"] = [r["name"] for r in records]
    return out


def _split_names(split_file: str | None, dataset: Path) -> list[str] | None:
    if not split_file:
        return None
    split = json.loads(Path(split_file).read_text())
    if dataset.name not in split:
        raise DatasetError(f"{split_file}: no entry for dataset {dataset.name!r}")
    return list(split[dataset.name])


def run_evaluate(args: argparse.Namespace) -> int:
    from ..models import default_model_name, load_model
    from .aggregate import format_table

    if args.split:  # configs/val_split.json resolves from any working directory (see find_config)
        from .._io import find_config

        args.split = str(find_config(args.split))
    model_name = args.model or default_model_name()
    model = load_model(
        model_name,
        weights=args.weights,
        device=args.device,
        tta=args.tta,
        precision=args.precision,
    )
    results: dict[str, Any] = {
        "model": model_name,
        "weights": args.weights,
        "tta": args.tta,
        "precision": getattr(model, "precision", "fp32"),
        "datasets": {},
    }
    for d in args.datasets:
        path = Path(d)
        if not path.exists():
            raise DatasetError(f"{path}: no such dataset folder")
        names = _split_names(args.split, path)
        res = evaluate_model(
            model, path, names=names, radius_um=args.radius_um, progress=not args.quiet
        )
        results["datasets"][path.name] = res
        print(f"\n== {path.name} ({res['n_images']} images, model {model_name})")
        print(format_table(res))
    if args.json:
        with atomic_path(args.json) as tmp:
            tmp.write_text(json.dumps(results, indent=1, allow_nan=False, default=str))
        print(f"\nresults -> {args.json}")
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``wsi-nuclei evaluate``."""
    p.add_argument(
        "datasets",
        nargs="+",
        help="dataset folders (shared format with meta.json, or an official PanNuke fold)",
    )
    p.add_argument("--model", "-m", help="model name (default: the bundled trained model)")
    p.add_argument("--weights", help="weights file for the model")
    p.add_argument(
        "--device", default="auto", choices=["auto", "cpu", "cuda"], help="device (default: auto)"
    )
    p.add_argument(
        "--tta", action="store_true", help="flip test-time augmentation (as 'wsi-nuclei run --tta')"
    )
    p.add_argument(
        "--precision",
        default="auto",
        choices=PRECISIONS,
        help="network arithmetic, as 'wsi-nuclei run --precision' (default: auto)",
    )
    p.add_argument(
        "--split",
        help="JSON {dataset: [image names]}: evaluate only these images (e.g. configs/val_split.json)",
    )
    p.add_argument(
        "--radius-um",
        type=float,
        default=3.0,
        help="centroid pairing radius in um for detection/classification F1 "
        "(default: 3.0 = 12 px at 0.25 um/px)",
    )
    p.add_argument("--json", help="write all results to this JSON file")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")

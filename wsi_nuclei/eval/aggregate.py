"""Aggregation of the ``evaluate`` command: score predictions against an annotated dataset.

:func:`evaluate_predictions` consumes one record per image (ground truth and prediction as
instance maps), computes every metric of :mod:`wsi_nuclei.eval` per image and combines them
over the dataset into a JSON-ready dict; :func:`format_table` renders it for the terminal.

Conventions (details in :mod:`wsi_nuclei.eval.instance` and :mod:`wsi_nuclei.eval.detection`):

* binary PQ/DQ/SQ: mean over images (HoVer-Net/Kumar/PanNuke ``bPQ``) *and* pooled counts;
* AJI and Dice: mean over images;
* detection and per-group classification F1: pooled over all nuclei of the dataset, as
  HoVer-Net's ``compute_stats.py`` (centroids paired within ``radius_px``);
* mPQ: over the PanNuke classes that have exact labels somewhere in the dataset; the others
  are listed under ``excluded_classes``. A class-c prediction matched (IoU > 0.5) to a true
  nucleus that is not labelled c exactly but may be c (e.g. unknown, 31) is ignored rather
  than counted as a false positive (``true_allowed`` of
  :func:`wsi_nuclei.eval.instance.multiclass_pq`).

Undefined values (e.g. PQ of a dataset with no nuclei at all) are ``None`` in the output, so
``json.dumps(results, allow_nan=False)`` works.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from .._io import json_ready
from ..schema import CLASS_NAMES
from ._common import IntArray, nanmean
from .classes import PANNUKE_CLASS_IDS, UNKNOWN_ALLOWED, classes_to_allowed
from .detection import detection_scores_from_pairs, instance_centroids, match_centroids
from .instance import (
    aggregate_multiclass_pq,
    aggregate_pq,
    aji_from_overlap,
    dice_from_overlap,
    instance_overlap,
    multiclass_pq_from_overlap,
    pq_from_overlap,
)

__all__ = ["evaluate_predictions", "format_table"]


def _true_allowed(record: Mapping[str, Any], n_ids: int) -> IntArray:
    """Allowed bitmask per true id: ``true_allowed``, else derived from ``true_classes``,
    else all unknown."""
    allowed = record.get("true_allowed")
    if allowed is not None:
        return np.asarray(allowed, np.int64)
    classes = record.get("true_classes")
    if classes is not None:
        out = classes_to_allowed(classes)
        out[0] = 0
        return out
    out = np.full(n_ids, UNKNOWN_ALLOWED, np.int64)
    out[0] = 0
    return out


def evaluate_predictions(
    records: Iterable[Mapping[str, Any]],
    *,
    class_groups: Mapping[str, int] | None = None,
    radius_px: float = 12.0,
    radius_um: float | None = None,
    iou_threshold: float = 0.5,
) -> dict[str, Any]:
    """Score predictions against ground truth over a dataset.

    Parameters
    ----------
    records : iterable of mapping
        One per image, consumed once (a generator is fine; only per-nucleus summaries are
        kept). Keys:

        ``name`` (str); ``true_inst`` (int (H, W), 0 = background) or, for point labels,
        ``true_points`` ((K, 2) (x, y) nucleus centres, with ``true_allowed`` one entry per point;
        such records count only for detection and classification); ``true_classes``
        ((N+1,) exact PanNuke class per true id or 0; optional); ``true_allowed`` ((N+1,)
        allowed bitmask per true id; optional, derived from ``true_classes`` when absent, all
        unknown when both are absent); ``pred_inst`` (int (H, W)); ``pred_class`` (PanNuke
        class per predicted id, indexed by id, 0 = none; ``None`` or absent for a model without
        classes); ``mpp`` (µm/px of the arrays; optional unless ``radius_um`` is given).
    class_groups : mapping of str to int, optional
        Groups for per-class F1, ``{name: allowed bitmask}``; default
        :func:`default_class_groups` of the allowed sets in the ground truth (unknown excluded).
    radius_px : float, default 12.0
        Centroid pairing radius in pixels at the records' resolution (HoVer-Net's 12 px assume
        0.25 µm/px; the caller rescales).
    radius_um : float, optional
        If given, the radius is ``radius_um / mpp`` pixels per image instead of ``radius_px``.
    iou_threshold : float, default 0.5
        PQ matching threshold (strict ``>``).

    Returns
    -------
    dict
        JSON-ready::

            n_images, n_true_nuclei, n_pred_nuclei,
            segmentation: {pq: {mean: {pq, dq, sq}, pooled: {pq, dq, sq, tp, fp, fn, iou_sum},
                                n_images_scored},
                           aji: {mean, n_images_scored}, dice: {mean, n_images_scored}},
            detection: {radius_px | radius_um, precision, recall, f1, tp, fp, fn},
            classification: None | {accuracy, n_typed_pairs, n_correct,
                                    groups: {name: {mask, classes, f1, tp, fp, fn, fp_d, fn_d,
                                                    n_true, n_pred}}},
            mpq: None | {classes, excluded_classes, mpq: {per_image, per_image_strict, pooled},
                         per_class: {name: {id, mean, mean_strict, n_images, pooled}}},
            per_image: [{name, mpp, n_true, n_pred, pq, dq, sq, aji, dice, det_f1, mpq}]

        ``classification`` and ``mpq`` are ``None`` (with ``classification_note``) when any
        record has no ``pred_class`` or no prediction carries a class.
    """
    if radius_um is None and radius_px < 0:
        raise ValueError("radius_px must be >= 0")
    if radius_um is not None and not radius_um > 0:
        raise ValueError("radius_um must be > 0")
    pq_rows: list[dict[str, Any]] = []
    mpq_rows: list[dict[str, Any]] = []
    per_image: list[dict[str, Any]] = []
    paired_allowed: list[np.ndarray] = []
    paired_class: list[np.ndarray] = []
    unpaired_allowed: list[np.ndarray] = []
    unpaired_class: list[np.ndarray] = []
    has_classes = True
    any_pred_class = False
    n_true_total = 0
    n_pred_total = 0

    for rec in records:
        name = str(rec.get("name", f"image_{len(per_image)}"))
        pred_inst = np.asarray(rec["pred_inst"])
        mpp = rec.get("mpp")
        if rec.get("true_inst") is None:  # point labels: detection and classification only
            row, pairs_out, n_pts, n_p = _point_record(rec, pred_inst, radius_px, radius_um)
            if row["has_pred_class"] is False:
                has_classes = False
            any_pred_class |= bool(row.pop("any_pred_class"))
            row.pop("has_pred_class")
            n_true_total += n_pts
            n_pred_total += n_p
            for lst, v in zip(
                (paired_allowed, paired_class, unpaired_allowed, unpaired_class), pairs_out
            ):
                lst.append(v)
            per_image.append(row)
            continue
        true_inst = np.asarray(rec["true_inst"])
        ov = instance_overlap(true_inst, pred_inst)
        n_true, n_pred = int(ov.true_labels.size), int(ov.pred_labels.size)
        n_true_total += n_true
        n_pred_total += n_pred
        max_true = int(ov.true_labels.max()) if n_true else 0
        allowed = _true_allowed(rec, max_true + 1)
        if allowed.size <= max_true:
            raise ValueError(f"{name}: true_allowed has {allowed.size} entries, max id {max_true}")

        pq = pq_from_overlap(ov, iou_threshold)
        pq_rows.append(pq)
        row = {
            "name": name,
            "mpp": mpp,
            "n_true": n_true,
            "n_pred": n_pred,
            "pq": pq["pq"],
            "dq": pq["dq"],
            "sq": pq["sq"],
            "aji": aji_from_overlap(ov),
            "dice": dice_from_overlap(ov),
            "mpq": math.nan,
        }

        pred_class_table = rec.get("pred_class")
        if pred_class_table is None:
            has_classes = False
            p_cls = np.zeros(n_pred, np.int64)
        else:
            pred_class_table = np.asarray(pred_class_table, np.int64)
            max_pred = int(ov.pred_labels.max()) if n_pred else 0
            if pred_class_table.size <= max_pred:
                raise ValueError(
                    f"{name}: pred_class has {pred_class_table.size} entries, max id {max_pred}"
                )
            p_cls = pred_class_table[ov.pred_labels]
            any_pred_class |= bool(np.any(p_cls > 0))

        # detection: centroids of both maps (labels ascending = ov order)
        radius = radius_px
        if radius_um is not None:
            if mpp is None or not float(mpp) > 0:
                raise ValueError(f"{name}: radius_um needs a positive 'mpp'")
            radius = float(radius_um) / float(mpp)
        t_xy, _ = instance_centroids(true_inst)
        p_xy, _ = instance_centroids(pred_inst)
        t_allowed = allowed[ov.true_labels]
        pairs, ut, up = match_centroids(t_xy, p_xy, radius)
        paired_allowed.append(t_allowed[pairs[:, 0]])
        paired_class.append(p_cls[pairs[:, 1]])
        unpaired_allowed.append(t_allowed[ut])
        unpaired_class.append(p_cls[up])
        k = len(pairs)
        row["det_f1"] = 2 * k / (2 * k + len(ut) + len(up)) if (k + len(ut) + len(up)) else math.nan

        if pred_class_table is not None:
            true_classes = rec.get("true_classes")
            if true_classes is None:
                true_classes = np.zeros(max_true + 1, np.int64)
            mpq = multiclass_pq_from_overlap(
                ov,
                true_classes,
                pred_class_table,
                classes=PANNUKE_CLASS_IDS,
                true_allowed=allowed,
                iou_threshold=iou_threshold,
            )
            mpq_rows.append(mpq)
        per_image.append(row)

    detection = detection_scores_from_pairs(
        np.concatenate(paired_allowed) if paired_allowed else np.zeros(0, np.int64),
        np.concatenate(paired_class) if paired_class else np.zeros(0, np.int64),
        np.concatenate(unpaired_allowed) if unpaired_allowed else np.zeros(0, np.int64),
        np.concatenate(unpaired_class) if unpaired_class else np.zeros(0, np.int64),
        groups=class_groups,
    )

    results: dict[str, Any] = {
        "n_images": len(per_image),
        "n_true_nuclei": n_true_total,
        "n_pred_nuclei": n_pred_total,
        "segmentation": {
            "pq": aggregate_pq(pq_rows),
            "aji": {
                "mean": nanmean([r["aji"] for r in per_image]),
                "n_images_scored": sum(not math.isnan(r["aji"]) for r in per_image),
            },
            "dice": {
                "mean": nanmean([r["dice"] for r in per_image]),
                "n_images_scored": sum(not math.isnan(r["dice"]) for r in per_image),
            },
        },
        "detection": {
            **({"radius_um": radius_um} if radius_um is not None else {"radius_px": radius_px}),
            **{k: detection[k] for k in ("precision", "recall", "f1", "tp", "fp", "fn")},
        },
        "classification": None,
        "mpq": None,
        "per_image": per_image,
    }
    del results["segmentation"]["pq"]["n_images"]

    if not has_classes:
        results["classification_note"] = "some records have no pred_class"
    elif not any_pred_class:
        results["classification_note"] = "no prediction carries a class"
    else:
        groups = {}
        for gname, g in detection["groups"].items():
            groups[gname] = {
                "mask": g["mask"],
                "classes": [CLASS_NAMES[c] for c in PANNUKE_CLASS_IDS if g["mask"] >> (c - 1) & 1],
                **{k: g[k] for k in ("f1", "tp", "fp", "fn", "fp_d", "fn_d", "n_true", "n_pred")},
            }
        results["classification"] = {
            "accuracy": detection["accuracy"],
            "n_typed_pairs": detection["n_typed_pairs"],
            "n_correct": detection["n_correct"],
            "groups": groups,
        }
        agg = aggregate_multiclass_pq(mpq_rows, PANNUKE_CLASS_IDS)
        for row, m in zip([r for r in per_image if r.get("labels") != "points"], mpq_rows):
            stats = [m["per_class"][c] for c in agg["classes"]]
            row["mpq"] = nanmean([s["pq"] for s in stats if s["n_true"] > 0])
        results["mpq"] = {
            "classes": [CLASS_NAMES[c] for c in agg["classes"]],
            "excluded_classes": [CLASS_NAMES[c] for c in agg["excluded_classes"]],
            "mpq": agg["mpq"],
            "n_images_scored": agg["n_images_scored"],
            "per_class": {CLASS_NAMES[c]: {"id": c, **v} for c, v in agg["per_class"].items()},
        }
    return json_ready(results)


def _point_record(
    rec: Mapping[str, Any], pred_inst: np.ndarray, radius_px: float, radius_um: float | None
) -> tuple[dict[str, Any], tuple[np.ndarray, ...], int, int]:
    """Detection pairs of one point-labelled record (``true_points`` (K, 2) as (x, y),
    ``true_allowed`` (K,) per point): segmentation metrics are undefined (NaN)."""
    name = str(rec.get("name", "image"))
    pts = np.asarray(rec["true_points"], np.float64).reshape(-1, 2)
    allowed = rec.get("true_allowed")
    allowed = (
        np.full(len(pts), UNKNOWN_ALLOWED, np.int64)
        if allowed is None
        else np.asarray(allowed, np.int64)
    )
    if allowed.shape != (len(pts),):
        raise ValueError(
            f"{name}: true_allowed needs one entry per point ({len(pts)}), got {allowed.shape}"
        )
    radius = radius_px
    if radius_um is not None:
        mpp = rec.get("mpp")
        if mpp is None or not float(mpp) > 0:
            raise ValueError(f"{name}: radius_um needs a positive 'mpp'")
        radius = float(radius_um) / float(mpp)
    p_xy, p_labels = instance_centroids(pred_inst)
    table = rec.get("pred_class")
    if table is None:
        p_cls = np.zeros(len(p_labels), np.int64)
    else:
        table = np.asarray(table, np.int64)
        if len(p_labels) and table.size <= int(p_labels.max()):
            raise ValueError(
                f"{name}: pred_class has {table.size} entries, max id {int(p_labels.max())}"
            )
        p_cls = table[p_labels]
    pairs, ut, up = match_centroids(pts[:, ::-1], p_xy, radius)  # both (row, col)
    k = len(pairs)
    row = {
        "name": name,
        "mpp": rec.get("mpp"),
        "n_true": len(pts),
        "n_pred": len(p_labels),
        "labels": "points",
        "pq": math.nan,
        "dq": math.nan,
        "sq": math.nan,
        "aji": math.nan,
        "dice": math.nan,
        "mpq": math.nan,
        "det_f1": 2 * k / (2 * k + len(ut) + len(up)) if (k + len(ut) + len(up)) else math.nan,
        "has_pred_class": table is not None,
        "any_pred_class": bool(np.any(p_cls > 0)),
    }
    out = (allowed[pairs[:, 0]], p_cls[pairs[:, 1]], allowed[ut], p_cls[up])
    return row, out, len(pts), len(p_labels)


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------
_COL = 9  # width of a value column


def _fmt(value: Any) -> str:
    """One right-aligned cell: 4 decimals for floats, ``-`` for an undefined value."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return f"{'-':>{_COL}}"
    if isinstance(value, float):
        return f"{value:>{_COL}.4f}"
    return f"{value!s:>{_COL}}"


def _block(title: str, header: list[str], rows: list[tuple[str, list[Any]]]) -> list[str]:
    """A titled block: header line, rule, then ``label  cell cell ...`` rows."""
    width = max([len(title)] + [len(label) + 2 for label, _ in rows]) + 2
    head = f"{title:<{width}}" + "".join(f"{h:>{_COL}}" for h in header)
    lines = ["", head, "-" * len(head)]
    for label, cells in rows:
        lines.append(f"{'  ' + label:<{width}}" + "".join(_fmt(c) for c in cells).rstrip())
    return lines


def format_table(results: Mapping[str, Any]) -> str:
    """Render :func:`evaluate_predictions` results as a fixed-width text table.

    Parameters
    ----------
    results : mapping
        Output of :func:`evaluate_predictions` (or the same after a JSON round trip).

    Returns
    -------
    str
        Aligned blocks (segmentation, detection, per-group F1, mPQ); ``-`` marks an undefined
        value. No trailing newline.
    """
    lines = [
        f"images: {results['n_images']}   true nuclei: {results['n_true_nuclei']}   "
        f"predicted nuclei: {results['n_pred_nuclei']}"
    ]
    seg = results["segmentation"]
    mean, pooled = seg["pq"]["mean"], seg["pq"]["pooled"]
    lines += _block(
        "Segmentation",
        ["PQ", "DQ", "SQ"],
        [
            ("binary, mean over images", [mean["pq"], mean["dq"], mean["sq"]]),
            ("binary, pooled", [pooled["pq"], pooled["dq"], pooled["sq"]]),
            ("AJI, mean over images", [seg["aji"]["mean"]]),
            ("Dice, mean over images", [seg["dice"]["mean"]]),
        ],
    )

    det = results["detection"]
    if det.get("radius_um") is not None:
        radius = f"{det['radius_um']:g} um"
    else:
        radius = f"{det.get('radius_px', 0):g} px"
    lines += _block(
        f"Detection (radius {radius})",
        ["P", "R", "F1", "TP", "FP", "FN"],
        [("pooled", [det[k] for k in ("precision", "recall", "f1", "tp", "fp", "fn")])],
    )

    cls = results.get("classification")
    if cls is None:
        lines += ["", f"Classification: not evaluated ({results.get('classification_note', '')})"]
    elif not cls["groups"] and not cls["n_typed_pairs"]:
        lines += ["", "Classification: not evaluated (the ground truth has no class labels)"]
    else:
        rows = [
            (name, [g["f1"], g["mask"], g["n_true"], g["n_pred"]])
            for name, g in cls["groups"].items()
        ]
        rows.append(("accuracy, typed pairs", [cls["accuracy"], None, cls["n_typed_pairs"]]))
        lines += _block("Classification (group)", ["F1", "mask", "n_true", "n_pred"], rows)

    mpq = results.get("mpq")
    if mpq is not None and not mpq["classes"]:
        lines += ["", "Multi-class PQ: not evaluated (no exact class labels in the ground truth)"]
    elif mpq is not None:
        rows = [
            (name, [v["mean"], v["pooled"]["pq"], v["pooled"]["n_true"]])
            for name, v in mpq["per_class"].items()
        ]
        m = mpq["mpq"]
        rows.append(("mPQ (PanNuke)", [m["per_image"], m["pooled"]]))
        rows.append(("mPQ (strict)", [m["per_image_strict"]]))
        lines += _block("Multi-class PQ", ["mean", "pooled", "n_true"], rows)
        if mpq["excluded_classes"]:
            lines.append("  excluded (no exact labels): " + ", ".join(mpq["excluded_classes"]))
    return "\n".join(lines)

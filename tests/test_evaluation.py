"""Tests of the evaluate command's aggregation (wsi_nuclei.eval.aggregate) on synthetic records."""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import pytest

import wsi_nuclei.eval as M
from wsi_nuclei.eval import default_class_groups, evaluate_predictions, format_table


def _squares(positions: list[tuple[int, int]], size: int = 6, shape: int = 64) -> np.ndarray:
    """Instance map with one ``size`` x ``size`` square per position (ids 1..n)."""
    out = np.zeros((shape, shape), np.int32)
    for i, (r, c) in enumerate(positions, start=1):
        out[r : r + size, c : c + size] = i
    return out


POS = [(2, 2), (2, 20), (2, 40), (30, 2), (30, 20), (30, 40)]


def _consep_like() -> dict[str, Any]:
    """CoNSeP-like truth: inflammatory, connective, epithelial (17), unknown (31).

    ids:        1     2     3     4     5     6
    classes:    2     3     0     0     2     3
    allowed:    2     4    17    31     2     4
    Prediction: exact copies of 1..5 (6 missed) plus one false positive, classes
    pred ids:   1->2 (ok), 2->3 (ok), 3->5 (ok for 17), 4->1 (unknown truth), 5->3 (wrong),
                7 = FP of class 2 at (50, 50).
    """
    true = _squares(POS)
    pred = np.zeros_like(true)
    for i in range(1, 6):
        pred[true == i] = i
    pred[50:56, 50:56] = 7
    return {
        "name": "consep_1",
        "true_inst": true,
        "true_classes": np.array([0, 2, 3, 0, 0, 2, 3], np.uint8),
        "true_allowed": np.array([0, 2, 4, 17, 31, 2, 4], np.uint8),
        "pred_inst": pred,
        "pred_class": np.array([0, 2, 3, 5, 1, 3, 0, 2], np.uint8),
        "mpp": 0.25,
    }


def test_consep_like_record() -> None:
    rec = _consep_like()
    res = evaluate_predictions([rec])
    json.dumps(res, allow_nan=False)  # JSON-ready
    assert (res["n_images"], res["n_true_nuclei"], res["n_pred_nuclei"]) == (1, 6, 6)

    # segmentation: TP 5 (IoU 1), FP 1, FN 1 -> DQ = 5 / 6, SQ = 1
    seg = res["segmentation"]
    assert seg["pq"]["mean"]["pq"] == pytest.approx(5 / 6)
    assert seg["pq"]["pooled"]["pq"] == pytest.approx(5 / 6)
    assert (seg["pq"]["pooled"]["tp"], seg["pq"]["pooled"]["fp"], seg["pq"]["pooled"]["fn"]) == (
        5,
        1,
        1,
    )
    # AJI = 5*36 / (5*36 + 36 + 36); Dice = 2*180 / (216 + 216)
    assert seg["aji"]["mean"] == pytest.approx(180 / 252)
    assert seg["dice"]["mean"] == pytest.approx(360 / 432)

    det = res["detection"]
    assert (det["tp"], det["fp"], det["fn"]) == (5, 1, 1)
    assert det["f1"] == pytest.approx(10 / 12)
    assert det["radius_px"] == 12.0

    cls = res["classification"]
    # typed pairs: ids 1, 2, 3, 5 (4 is unknown); correct: 1, 2, 3 -> 3/4
    assert cls["n_typed_pairs"] == 4 and cls["accuracy"] == pytest.approx(0.75)
    groups = cls["groups"]
    assert list(groups) == ["Inflammatory", "Connective", "Neoplastic|Epithelial"]
    # Inflammatory (2): TP 1 (id 1), FN 1 (id 5 predicted 3), FP_d 1 (pred 7)
    #   -> 2 / (2 + 2 + 1) = 0.4
    assert groups["Inflammatory"]["f1"] == pytest.approx(0.4)
    # Connective (4): TP 1 (id 2), FP 1 (id 5: truth 2, pred 3), FN_d 1 (id 6)
    #   -> 2 / (2 + 2 + 1) = 0.4
    assert groups["Connective"]["f1"] == pytest.approx(0.4)
    # Neo|Epi (17): TP 1 (id 3); pred 1 on unknown id 4 ignored -> 1.0
    assert groups["Neoplastic|Epithelial"]["f1"] == pytest.approx(1.0)
    assert groups["Neoplastic|Epithelial"]["classes"] == ["Neoplastic", "Epithelial"]

    mpq = res["mpq"]
    assert mpq["classes"] == ["Inflammatory", "Connective"]
    assert mpq["excluded_classes"] == ["Neoplastic", "Dead", "Epithelial"]
    # class 2: truth ids 1, 5; preds of class 2: 1, 7 -> TP 1, FP 1, FN 1 -> PQ 0.5
    # class 3: truth ids 2, 6; preds of class 3: 2, 5 -> TP 1, FP 1, FN 1 -> PQ 0.5
    assert mpq["per_class"]["Inflammatory"]["pooled"]["pq"] == pytest.approx(0.5)
    assert mpq["per_class"]["Connective"]["pooled"]["pq"] == pytest.approx(0.5)
    assert mpq["mpq"]["per_image"] == pytest.approx(0.5)
    assert mpq["mpq"]["pooled"] == pytest.approx(0.5)

    (row,) = res["per_image"]
    assert row["name"] == "consep_1" and row["mpp"] == 0.25
    assert row["pq"] == pytest.approx(5 / 6) and row["mpq"] == pytest.approx(0.5)

    table = format_table(res)
    assert "Neoplastic|Epithelial" in table and "mPQ (PanNuke)" in table
    assert "excluded (no exact labels): Neoplastic, Dead, Epithelial" in table
    # also after a JSON round trip
    assert format_table(json.loads(json.dumps(res))) == table


def test_matches_per_image_metrics_and_generator_input() -> None:
    rng = np.random.default_rng(3)
    recs = []
    for k in range(3):
        true = _squares(POS[: 4 + k])
        pred = np.roll(true, (k, 1), axis=(0, 1))
        n = int(true.max())
        recs.append(
            {
                "name": f"img{k}",
                "true_inst": true,
                "true_classes": np.r_[0, rng.integers(1, 4, n)].astype(np.uint8),
                "pred_inst": pred,
                "pred_class": np.r_[0, rng.integers(1, 4, n)].astype(np.uint8),
                "mpp": 0.25,
            }
        )
    res = evaluate_predictions(r for r in recs)  # a generator is consumed once
    per = [M.panoptic_quality(r["true_inst"], r["pred_inst"]) for r in recs]
    assert res["segmentation"]["pq"]["mean"]["pq"] == pytest.approx(np.mean([p["pq"] for p in per]))
    assert res["segmentation"]["pq"]["pooled"]["pq"] == pytest.approx(
        M.aggregate_pq(per)["pooled"]["pq"]
    )
    assert res["segmentation"]["aji"]["mean"] == pytest.approx(
        np.mean([M.aji(r["true_inst"], r["pred_inst"]) for r in recs])
    )
    mpq = M.aggregate_multiclass_pq(
        [
            M.multiclass_pq(r["true_inst"], r["true_classes"], r["pred_inst"], r["pred_class"])
            for r in recs
        ]
    )
    assert res["mpq"]["mpq"]["per_image"] == pytest.approx(mpq["mpq"]["per_image"])
    assert res["mpq"]["mpq"]["pooled"] == pytest.approx(mpq["mpq"]["pooled"])
    # true_allowed derived from true_classes: one group per exact class
    assert set(res["classification"]["groups"]) <= {"Neoplastic", "Inflammatory", "Connective"}
    assert res["n_images"] == 3


def test_perfect_prediction_pannuke_classes() -> None:
    true = _squares(POS)
    classes = np.array([0, 1, 2, 3, 4, 5, 1], np.uint8)
    rec = {
        "name": "p",
        "true_inst": true,
        "true_classes": classes,
        "true_allowed": M.classes_to_allowed(classes),
        "pred_inst": true * 2,
        "pred_class": np.zeros(13, np.uint8),
        "mpp": 0.25,
    }
    rec["pred_class"][::2] = classes  # pred id 2k is true id k
    res = evaluate_predictions([rec])
    assert res["segmentation"]["pq"]["mean"]["pq"] == 1.0
    assert res["detection"]["f1"] == 1.0
    assert res["mpq"]["mpq"]["per_image"] == 1.0
    assert res["mpq"]["excluded_classes"] == []
    assert list(res["classification"]["groups"]) == [
        "Neoplastic",
        "Inflammatory",
        "Connective",
        "Dead",
        "Epithelial",
    ]
    assert all(g["f1"] == 1.0 for g in res["classification"]["groups"].values())


def test_model_without_classes_and_empty_image() -> None:
    true = _squares(POS[:2])
    recs = [
        {
            "name": "a",
            "true_inst": true,
            "true_classes": None,
            "true_allowed": None,
            "pred_inst": true,
            "pred_class": None,
            "mpp": 0.5,
        },
        {
            "name": "empty",
            "true_inst": np.zeros((8, 8), np.int32),
            "pred_inst": np.zeros((8, 8), np.int32),
        },
    ]
    res = evaluate_predictions(recs)
    json.dumps(res, allow_nan=False)
    assert res["classification"] is None and res["mpq"] is None
    assert res["classification_note"] == "some records have no pred_class"
    # the empty image is skipped by the means (undefined), not scored 0
    assert res["segmentation"]["pq"]["mean"]["pq"] == 1.0
    assert res["segmentation"]["pq"]["n_images_scored"] == 1
    assert res["segmentation"]["aji"]["n_images_scored"] == 1
    assert res["per_image"][1]["pq"] is None
    assert "Classification: not evaluated" in format_table(res)


def test_classified_predictions_on_unlabelled_truth() -> None:
    # MoNuSeg-like: every nucleus unknown (31), predictions carry classes
    rec = _consep_like()
    rec["true_allowed"] = np.where(rec["true_allowed"] > 0, 31, 0)
    rec["true_classes"] = np.zeros_like(rec["true_classes"])
    res = evaluate_predictions([rec])
    assert res["classification"]["groups"] == {}
    assert res["classification"]["accuracy"] is None
    assert res["mpq"]["classes"] == [] and res["mpq"]["mpq"]["pooled"] is None
    assert len(res["mpq"]["excluded_classes"]) == 5
    table = format_table(res)
    assert "Classification: not evaluated (the ground truth has no class labels)" in table
    assert "Multi-class PQ: not evaluated" in table


def test_predictions_without_any_class() -> None:
    rec = _consep_like()
    rec["pred_class"] = np.zeros_like(rec["pred_class"])
    res = evaluate_predictions([rec])
    assert res["classification"] is None
    assert res["classification_note"] == "no prediction carries a class"


def test_empty_dataset() -> None:
    res = evaluate_predictions([])
    json.dumps(res, allow_nan=False)
    assert res["n_images"] == 0 and res["detection"]["f1"] is None
    assert isinstance(format_table(res), str)


def test_radius_um_and_custom_groups() -> None:
    true = _squares([(10, 10)], size=6, shape=40)
    pred = _squares([(10, 18)], size=6, shape=40)  # centroid 8 px away
    rec = {
        "name": "x",
        "true_inst": true,
        "true_allowed": np.array([0, 17]),
        "pred_inst": pred,
        "pred_class": np.array([0, 5]),
        "mpp": 0.5,
    }
    assert evaluate_predictions([rec])["detection"]["tp"] == 1  # 8 <= 12 px
    res = evaluate_predictions([rec], radius_um=3.0)  # 3 um at 0.5 um/px = 6 px < 8
    assert res["detection"]["tp"] == 0 and res["detection"]["radius_um"] == 3.0
    res = evaluate_predictions([rec], class_groups={"Epithelial": 16, "Tumour-ish": 17})
    g = res["classification"]["groups"]
    assert g["Tumour-ish"]["f1"] == 1.0
    # truth 17 straddles group 16: ambiguous -> nothing counted
    assert g["Epithelial"]["tp"] == 0 and g["Epithelial"]["f1"] is None
    with pytest.raises(ValueError):
        evaluate_predictions([{**rec, "mpp": None}], radius_um=3.0)


def test_bad_tables_raise() -> None:
    rec = _consep_like()
    with pytest.raises(ValueError):
        evaluate_predictions([{**rec, "pred_class": rec["pred_class"][:5]}])
    with pytest.raises(ValueError):
        evaluate_predictions([{**rec, "true_allowed": rec["true_allowed"][:3]}])


def test_default_class_groups_reexport() -> None:
    assert default_class_groups([2, 4, 17, 31]) == {
        "Inflammatory": 2,
        "Connective": 4,
        "Neoplastic|Epithelial": 17,
    }
    assert default_class_groups([1, 2, 4, 8, 16]) == {
        "Neoplastic": 1,
        "Inflammatory": 2,
        "Connective": 4,
        "Dead": 8,
        "Epithelial": 16,
    }


def test_format_table_layout() -> None:
    res = evaluate_predictions([_consep_like()])
    lines = format_table(res).splitlines()
    assert lines[0].startswith("images: 1")
    pq_line = next(line for line in lines if "binary, mean over images" in line)
    assert "0.8333" in pq_line and "1.0000" in pq_line
    assert not any(
        math.isnan(float(tok))
        for line in lines
        for tok in line.split()
        if tok.replace(".", "", 1).isdigit()
    )


def test_point_records_score_detection_and_classes_only() -> None:
    """A point-labelled image (CRCHisto): predicted centroids paired with the points within
    the radius; segmentation metrics undefined; instance records alongside still counted."""
    pred = np.zeros((40, 40), np.int32)
    pred[9:12, 9:12] = 1  # centroid (10, 10): near point 0
    pred[29:32, 9:12] = 2  # centroid (10, 30) = (x, y): near point 1
    pred[2:4, 35:37] = 3  # far from every point: false positive
    rec = {
        "name": "pts",
        "true_inst": None,
        "true_points": np.array([[10.5, 10.0], [10.0, 31.0], [30.0, 20.0]]),
        "true_allowed": np.array([2, 4, 17]),
        "pred_inst": pred,
        "pred_class": np.array([0, 2, 3, 1]),
        "mpp": 0.25,
    }
    inst_rec = {
        "name": "inst",
        "true_inst": pred.copy(),
        "true_classes": np.array([0, 2, 3, 1], np.uint8),
        "pred_inst": pred,
        "pred_class": np.array([0, 2, 3, 1]),
        "mpp": 0.25,
    }
    r = evaluate_predictions([rec, inst_rec], radius_px=3.0)
    det = r["detection"]
    # points: tp 2, fp 1 (pred 3), fn 1 (point 2); the instance record: 3 tp
    assert (det["tp"], det["fp"], det["fn"]) == (5, 1, 1)
    g = r["classification"]["groups"]
    assert g["Inflammatory"]["tp"] == 2 and g["Connective"]["tp"] == 2
    row = [x for x in r["per_image"] if x["name"] == "pts"][0]
    assert row["pq"] is None and row["det_f1"] == pytest.approx(4 / 6)
    assert r["segmentation"]["pq"]["mean"]["pq"] == pytest.approx(1.0)  # the instance record only

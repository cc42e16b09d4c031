"""Tune the post-processing of a trained model: HV thresholds on the validation split, class prior on training images.

The engine's blended network maps of every image (the patch grid and blending of
``wsi-nuclei run``, :func:`wsi_nuclei.inference.predict_maps`) are computed once (optionally
with flip TTA) and cached; the post-processing of such a map is what ``run`` does on a block
(images of the split fit in one block). Then

1. the :class:`wsi_nuclei.postprocess.HVParams` (nucleus-probability threshold, edge
   threshold, Sobel size, minimum size) are tuned by coordinate descent on binary PQ on the
   validation split (configs/val_split.json: its MoNuSeg and CoNSeP images; point-labelled sets
   have no outlines and are skipped), score = mean of the per-dataset bPQ;
2. the class head's temperature (``HVParams.class_temperature``: per-pixel class
   probabilities ``softmax(log p / T)``) is fitted by the negative log-likelihood of the true
   class set of the nuclei paired (within 3 µm) with annotated ones on the validation split's
   class-labelled images (CoNSeP instances, CRCHisto points); the expected calibration error of
   ``class_prob`` is reported before and after, and cross-fitted (T fitted on one dataset,
   scored on the other);
3. a class prior (multipliers of the Inflammatory and Connective probabilities) is chosen on
   CoNSeP *training* images (never on the validation split) by the mean per-class F1.

Prints one line per setting and the best ones; ``--json`` writes the table.

Usage::

    python scripts/tune_postprocess.py --weights wsi_nuclei/models/weights/wsi-nuclei-lite0-v3.pt \\
        --cache /tmp/tune-cache [--tta] [--json tune.json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import numpy as np

from wsi_nuclei.datasets import read_dataset
from wsi_nuclei.eval import evaluate_predictions, panoptic_quality
from wsi_nuclei.inference import predict_maps
from wsi_nuclei.postprocess import HVParams, hv_to_instances


def _maps(model, samples, cache: Path, tag: str):
    out = []
    for s in samples:
        f = cache / f"{tag}-{s.name.replace('/', '__')}.npz"
        if f.is_file():
            z = np.load(f)
            maps = {k: z[k].astype(np.float32) for k in z.files}
        else:
            maps = predict_maps(model, s.image)
            np.savez(f, **{k: v.astype(np.float16) for k, v in maps.items()})
        out.append((s, maps))
    return out


def _bpq(items, params: HVParams) -> float:
    return float(
        np.mean(
            [
                panoptic_quality(s.inst, hv_to_instances(m["np"], m["hv"], None, params).inst)["pq"]
                for s, m in items
            ]
        )
    )


def _class_f1(items, params: HVParams) -> dict[str, float]:
    recs = []
    for s, m in items:
        res = hv_to_instances(m["np"], m["hv"], m["tp"], params)
        pc = np.zeros(int(res.inst.max()) + 1, np.int64)
        pc[res.labels] = res.class_id
        recs.append(
            {
                "name": s.name,
                "true_inst": s.inst,
                "true_classes": s.classes,
                "true_allowed": s.allowed,
                "pred_inst": res.inst,
                "pred_class": pc,
                "mpp": s.mpp,
            }
        )
    r = evaluate_predictions(recs, radius_um=3.0)
    f1 = {k: g["f1"] for k, g in r["classification"]["groups"].items()}
    f1["detection"] = r["detection"]["f1"]
    return f1


def _paired(items, params: HVParams) -> tuple[list[np.ndarray], list[np.ndarray], list[list]]:
    """Per image: allowed sets of the annotated nuclei paired with predictions, and for each
    pair the instance's pixel class probabilities (so any temperature can be applied)."""
    from wsi_nuclei.eval import instance_centroids, match_centroids

    out = []
    for s, m in items:
        res = hv_to_instances(m["np"], m["hv"], None, params)
        if s.inst is not None:
            t_xy, t_lab = instance_centroids(s.inst)
            allowed = s.allowed[t_lab]
        else:
            t_xy, allowed = s.points[:, ::-1], s.allowed
        p_xy, p_lab = instance_centroids(res.inst)
        pairs, _, _ = match_centroids(t_xy, p_xy, 3.0 / s.mpp)
        known = allowed[pairs[:, 0]] != 31
        pairs = pairs[known]
        out.append((res.inst, p_lab[pairs[:, 1]], allowed[pairs[:, 0]].astype(np.int64), m["tp"]))
    return out


def _scores(paired, t: float) -> tuple[float, np.ndarray, np.ndarray]:
    """Mean NLL of the true set, and (confidence, correct) of every pair, at temperature t."""
    from wsi_nuclei.postprocess import classify_instances

    nll, conf, ok = [], [], []
    for inst, labels, allowed, tp in paired:
        if not len(labels):
            continue
        cid, cprob, probs = classify_instances(inst, tp, int(inst.max()), temperature=t)
        pr = probs[labels - 1]  # (k, 5): PanNuke classes 1..5
        bits = (allowed[:, None] >> np.arange(5)[None, :]) & 1
        nll.append(-np.log(np.maximum((pr * bits).sum(1), 1e-8)))
        conf.append(cprob[labels - 1])
        ok.append(bits[np.arange(len(labels)), cid[labels - 1] - 1] == 1)
    return float(np.mean(np.concatenate(nll))), np.concatenate(conf), np.concatenate(ok)


def _calibrate(all_val: dict, params: HVParams) -> dict:
    from wsi_nuclei.eval import expected_calibration_error

    temps = [round(float(t), 2) for t in np.arange(0.5, 3.01, 0.1)]
    data = {
        d: _paired(items, params)
        for d, items in all_val.items()
        if any(np.isin(np.asarray(s.allowed), (0, 31), invert=True).any() for s, _ in items)
    }
    out: dict = {"temperatures": temps, "datasets": {}}

    def fit(names: list[str]) -> float:
        return min(temps, key=lambda t: np.mean([_scores(data[d], t)[0] for d in names]))

    t_all = fit(list(data))
    out["T"] = t_all
    for d in data:
        _, c1, k1 = _scores(data[d], 1.0)
        _, ct, kt = _scores(data[d], t_all)
        others = [o for o in data if o != d]
        row = {
            "n_pairs": int(len(c1)),
            "accuracy": float(k1.mean()),
            "ece_T1": expected_calibration_error(c1, k1),
            "ece_fitted": expected_calibration_error(ct, kt),
        }
        if others:
            t_x = fit(others)
            _, cx, kx = _scores(data[d], t_x)
            row.update(
                {"T_from_other": t_x, "ece_cross_fitted": expected_calibration_error(cx, kx)}
            )
        out["datasets"][d] = row
    # --min-class-prob: the largest probability below which the nuclei's classes are, taken
    # together, more often wrong than right (pooled over the class-labelled datasets, at T)
    conf = np.concatenate([_scores(data[d], t_all)[1] for d in data])
    ok = np.concatenate([_scores(data[d], t_all)[2] for d in data])
    rows = []
    for thr in np.arange(0.3, 0.81, 0.05):
        below = conf < thr
        rows.append(
            {
                "threshold": round(float(thr), 2),
                "fraction_below": float(below.mean()),
                "accuracy_below": float(ok[below].mean()) if below.any() else None,
                "accuracy_at_or_above": float(ok[~below].mean()) if (~below).any() else None,
            }
        )
    out["min_class_prob_curve"] = rows
    wrong = [
        r["threshold"]
        for r in rows
        if r["accuracy_below"] is not None and r["accuracy_below"] < 0.5
    ]
    out["min_class_prob"] = max(wrong) if wrong else 0.0
    return out


def main(argv: list[str] | None = None) -> int:
    import torch

    from wsi_nuclei.models import load_model

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--weights", required=True, help="weights file of wsi-nuclei-lite0")
    p.add_argument("--data-root", default="../shared/data/nuclei")
    p.add_argument("--split", default="configs/val_split.json")
    p.add_argument("--cache", default="/tmp/tune-cache", help="folder for cached maps")
    p.add_argument("--tta", action="store_true", help="flip test-time augmentation")
    p.add_argument(
        "--n-train", type=int, default=96, help="CoNSeP training patches used for the class prior"
    )
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", help="write all scores here")
    p.add_argument("--no-prior", action="store_true", help="skip the class-prior step")
    p.add_argument(
        "--skip-hv", action="store_true", help="keep the registry's HV thresholds (only calibrate)"
    )
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    cache = Path(a.cache)
    cache.mkdir(parents=True, exist_ok=True)
    model = load_model("wsi-nuclei-lite0", weights=a.weights)
    model.tta = a.tta
    from wsi_nuclei.models import sha256_file

    # cached maps belong to these exact weights and this patch grid
    tag = sha256_file(a.weights)[:16] + f"-s{model.spec.stride}" + ("-tta" if a.tta else "")
    split = {
        k: v for k, v in json.loads(Path(a.split).read_text()).items() if not k.startswith("_")
    }
    root = Path(a.data_root)
    t0 = time.time()
    all_val = {
        d: _maps(model, read_dataset(root / d, names=names), cache, tag)
        for d, names in split.items()
    }
    val = {
        d: items for d, items in all_val.items() if items and items[0][0].inst is not None
    }  # outlines: HV tuning
    held = set(split["consep_train"])
    rng = np.random.default_rng(0)
    all_train = sorted(
        n.stem for n in (root / "consep_train" / "images").glob("*.png") if n.stem not in held
    )
    train_names = sorted(
        rng.choice(all_train, size=min(a.n_train, len(all_train)), replace=False).tolist()
    )
    consep_tr = _maps(model, read_dataset(root / "consep_train", names=train_names), cache, tag)
    print(f"maps ready in {time.time() - t0:.0f} s", flush=True)

    # coordinate descent over the HV parameters from the current ones: one parameter at a
    # time over its candidate values, repeated until nothing improves (a full grid is ~100x dearer)
    space = {
        "np_threshold": (0.35, 0.4, 0.45, 0.5, 0.55, 0.6),
        "edge_threshold": (0.3, 0.35, 0.4, 0.45, 0.5, 0.6),
        "sobel_ksize": (5, 7, 11, 15),
        "min_px": (10, 20, 30, 40, 60),
        "grad_offset": (0.1, 0.2, 0.3, 0.4),
    }
    cur = {
        "np_threshold": model.params.np_threshold,
        "edge_threshold": model.params.edge_threshold,
        "sobel_ksize": model.params.sobel_ksize,
        "min_px": model.params.min_nucleus_px,
        "grad_offset": model.params.grad_offset,
    }  # the registry's current values
    rows: list[dict] = []
    seen: dict[tuple, float] = {}

    def score(c: dict) -> float:
        key = tuple(c.values())
        if key not in seen:
            prm = HVParams(
                np_threshold=c["np_threshold"],
                edge_threshold=c["edge_threshold"],
                sobel_ksize=c["sobel_ksize"],
                min_marker_px=c["min_px"],
                min_nucleus_px=c["min_px"],
                grad_offset=c["grad_offset"],
            )
            sc = {d: _bpq(items, prm) for d, items in val.items()}
            seen[key] = float(np.mean(list(sc.values())))
            rows.append({**c, **sc, "score": seen[key]})
            print(
                " ".join(
                    f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                    for k, v in rows[-1].items()
                ),
                flush=True,
            )
        return seen[key]

    improved = not a.skip_hv
    if a.skip_hv:
        score(cur)
    while improved:
        improved = False
        for name, values in space.items():
            base = score(cur)
            cand = max(values, key=lambda v: score({**cur, name: v}))
            if score({**cur, name: cand}) > base:
                cur, improved = {**cur, name: cand}, True
    best = max(rows, key=lambda r: r["score"])
    print("best HV params:", best, flush=True)
    prm = HVParams(
        np_threshold=best["np_threshold"],
        edge_threshold=best["edge_threshold"],
        sobel_ksize=best["sobel_ksize"],
        min_marker_px=best["min_px"],
        min_nucleus_px=best["min_px"],
        grad_offset=best["grad_offset"],
    )
    calib = _calibrate(all_val, prm)
    print("class temperature:", json.dumps(calib), flush=True)
    if a.no_prior:
        if a.json:
            Path(a.json).write_text(
                json.dumps({"hv": rows, "best_hv": best, "calibration": calib}, indent=1)
            )
        return 0
    prior_rows = []
    for wi, wc in itertools.product((1.0, 1.5, 2.0, 3.0, 4.0, 6.0), (1.0, 1.5, 2.0, 3.0, 4.0)):
        pr = HVParams(**{**prm.__dict__, "class_prior": (1.0, wi, wc, 1.0, 1.0)})
        f1 = _class_f1(consep_tr, pr)
        prior_rows.append(
            {
                "inflammatory": wi,
                "connective": wc,
                **f1,
                "mean_f1": float(
                    np.mean(
                        [f1[g] for g in ("Inflammatory", "Connective", "Neoplastic|Epithelial")]
                    )
                ),
            }
        )
        print("prior", prior_rows[-1], flush=True)
    bp = max(prior_rows, key=lambda r: r["mean_f1"])
    print("best prior (CoNSeP train patches):", bp, flush=True)
    for pr in (None, (1.0, bp["inflammatory"], bp["connective"], 1.0, 1.0)):
        f1 = _class_f1(val["consep_train"], HVParams(**{**prm.__dict__, "class_prior": pr}))
        print(f"validation CoNSeP class F1 with prior {pr}: {f1}", flush=True)
    if a.json:
        Path(a.json).write_text(
            json.dumps(
                {"hv": rows, "best_hv": best, "prior": prior_rows, "best_prior": bp}, indent=1
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

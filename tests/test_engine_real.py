"""The engine's seam guarantees with the real bundled model on real H&E.

The bundled network does not predict a pixel the same way in every patch, so these are the
cases that matter: a CMU-1-Small-Region crop at model resolution and a held-out MoNuSeg tile,
segmented through the engine with small blocks (many seams) and compared with the same
blended maps post-processed as one image (the whole-region reference): no reference nucleus
lost, at least 99 % matched at IoU >= 0.9, no pixel in two nuclei, and the same nuclei
whatever the block size.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from wsi_nuclei.eval import instance_overlap, pq_from_overlap

pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture(scope="module")
def model():
    from wsi_nuclei.models import find_weights, get_spec, load_model

    spec = get_spec("wsi-nuclei-lite0")
    if find_weights(spec) is None:
        pytest.skip("bundled weights absent")
    return load_model("wsi-nuclei-lite0", device="cpu")


def _compare(model, image: np.ndarray, block: int) -> dict:
    from wsi_nuclei.inference import predict_maps, segment_image

    # the whole image as one block: beyond its edge nothing (background), as the engine sees it
    pad = 96
    maps = {
        k: np.pad(v, [(0, 0)] * (v.ndim - 2) + [(pad, pad), (pad, pad)])
        for k, v in predict_maps(model, image).items()
    }
    ref = model.postprocess(maps).inst[pad:-pad, pad:-pad]
    got = segment_image(model, image, block_size=block).inst
    ov = instance_overlap(ref, got)
    n_ref = len(ov.true_labels)
    # lost: a reference nucleus less than half covered by output nuclei
    ref_ids, ref_area = np.unique(ref[ref > 0], return_counts=True)
    covered = np.bincount(ref[(ref > 0) & (got > 0)], minlength=ref.max() + 1)[ref_ids]
    return {
        "n_ref": n_ref,
        "n_got": len(ov.pred_labels),
        "lost": int((covered < 0.5 * ref_area).sum()),
        "iou09": pq_from_overlap(ov, 0.9)["tp"] / max(1, n_ref),
        "got": got,
    }


def test_cmu_crop_through_small_blocks_matches_the_whole_region(model, wsi_dir: Path) -> None:
    from wsi_nuclei.slide import open_slide

    with open_slide(wsi_dir / "CMU-1-Small-Region.svs") as sl:
        s = sl.mpp / 0.25
        x0, y0 = 2200, 3000  # model px, dense dermis and epidermis
        crop = sl.read_scaled(
            (x0 / s, y0 / s, (x0 + 640) / s, (y0 + 640) / s), (640, 640), target_mpp=0.25
        )
    r = _compare(model, crop, block=200)
    assert r["n_ref"] > 100
    assert r["lost"] == 0 and r["iou09"] >= 0.99, {k: v for k, v in r.items() if k != "got"}
    other = _compare(model, crop, block=300)["got"]  # other seams, same nuclei
    ov = instance_overlap(r["got"], other)
    assert pq_from_overlap(ov, 0.9)["tp"] >= 0.99 * len(ov.true_labels)


def test_monuseg_validation_tile_through_small_blocks(model, nuclei_dir: Path) -> None:
    from wsi_nuclei.datasets import read_dataset

    split = json.loads((Path(__file__).parents[1] / "configs" / "val_split.json").read_text())
    s = next(read_dataset(nuclei_dir / "monuseg_train", names=split["monuseg_train"][:1]))
    r = _compare(model, s.image, block=256)
    assert r["n_ref"] > 200
    assert r["lost"] == 0 and r["iou09"] >= 0.99, {k: v for k, v in r.items() if k != "got"}


def test_run_reports_classes_the_model_cannot_produce_as_not_measured(
    model, wsi_dir: Path, tmp_path: Path
) -> None:
    """A real run with the bundled model: no nucleus is "Dead" (a class without training labels),
    its summary columns are empty rather than 0, and the reliability note is in run.json; with
    --min-class-prob 1 every nucleus is written without a class."""
    import pandas as pd
    from PIL import Image

    from wsi_nuclei import RunConfig, run
    from wsi_nuclei.slide import open_slide

    with open_slide(wsi_dir / "CMU-1-Small-Region.svs") as sl:
        s = sl.mpp / 0.25
        crop = sl.read_scaled((2200 / s, 3000 / s, 2712 / s, 3512 / s), (512, 512), target_mpp=0.25)
    png = tmp_path / "crop.png"
    Image.fromarray(crop).save(png)
    res = run(
        RunConfig(slide=png, out=tmp_path / "a", mpp=0.25, tissue="none", quiet=True, threads=1)
    )
    nuc = pd.read_parquet(tmp_path / "a" / "nuclei.parquet")
    assert len(nuc) > 50 and "Dead" not in set(nuc["class_name"])
    assert (nuc["prob_Dead"] == 0).all()
    summ = pd.read_csv(tmp_path / "a" / "summary.csv")
    assert summ["count_Dead"].isna().all() and summ["count_Inflammatory"].notna().all()
    man = json.loads((tmp_path / "a" / "run.json").read_text())
    assert man["classes"]["not_measured"] == ["Dead"] and "Dead" in man["reliability_note"]
    assert res.n_nuclei == len(nuc)
    run(
        RunConfig(
            slide=png,
            out=tmp_path / "b",
            mpp=0.25,
            tissue="none",
            quiet=True,
            threads=1,
            min_class_prob=1.0,
        )
    )
    low = pd.read_parquet(tmp_path / "b" / "nuclei.parquet")
    assert (
        len(low) == len(nuc)
        and set(low["class_name"]) == {"Nucleus"}
        and (low["class_id"] == 0).all()
    )
    np.testing.assert_allclose(
        low["prob_Inflammatory"], nuc["prob_Inflammatory"]
    )  # kept for re-thresholding
    summ_b = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert summ_b["slide"]["n_nuclei_unclassified"] == len(low)
    assert (
        summ_b["qc"]["nuclei_unclassified_low_prob"] == len(low)
        and man["qc"]["nuclei_unclassified_low_prob"] == 0
    )

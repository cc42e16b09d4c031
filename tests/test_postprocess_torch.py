"""Tests of wsi_nuclei.postprocess_torch (run on CPU torch): its building blocks against scipy /
scikit-image, exact recovery of perfect maps, equivalence with the numpy path on synthetic maps
and on real validation tiles through the bundled model, the backend choice and the resume key."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage as ndi
from skimage.segmentation import watershed

from test_postprocess import _pairing, _perfect_maps, _scene
from wsi_nuclei.eval import panoptic_quality
from wsi_nuclei.postprocess import HVParams, hv_to_instances
from wsi_nuclei.postprocess_torch import (
    BACKEND_ENV,
    _components,
    _flood,
    _number,
    hv_to_instances_torch,
    postprocess_backend,
)

REPO = Path(__file__).resolve().parents[1]


def _same(a, b) -> None:
    """Two InstanceResults are the same segmentation, numbering and classes."""
    np.testing.assert_array_equal(a.inst, b.inst)
    assert b.inst.dtype == np.int32
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(a.class_id, b.class_id)
    assert b.class_id.dtype == np.int8 and b.class_prob.dtype == np.float32
    np.testing.assert_allclose(a.class_prob, b.class_prob, atol=1e-5)
    if a.class_probs is None:
        assert b.class_probs is None
    else:
        np.testing.assert_allclose(a.class_probs, b.class_probs, atol=1e-5)


# --------------------------------------------------------------------------------------------
# building blocks
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_components_number_like_scipy_label(seed: int) -> None:
    rng = np.random.default_rng(seed)
    mask = ndi.binary_opening(rng.random((97, 131)) < 0.55)
    mask[40, :] = True  # a long run joining many blobs
    mask[5:90:2, 7] = False  # combs
    lab_sp, n = ndi.label(mask)
    lab = _number(_components(torch.from_numpy(mask)), 1).numpy()
    assert n > 5
    np.testing.assert_array_equal(lab, lab_sp)  # same components, same raster numbering


def test_components_follow_a_spiral() -> None:
    # one 4-connected path that winds inwards: the worst case for plain label propagation
    size = 41
    m = np.zeros((size, size), bool)
    r0, c0, r1, c1 = 0, 0, size - 1, size - 1
    while r0 <= r1 and c0 <= c1:
        m[r0, c0 : c1 + 1] = True
        m[r0 : r1 + 1, c1] = True
        m[r1, c0 : c1 + 1] = True
        m[r0 + 2 : r1 + 1, c0] = True
        if c0 + 1 < size and r0 + 2 < size:
            m[r0 + 2, c0 : c0 + 3] = True
        r0, c0, r1, c1 = r0 + 2, c0 + 2, r1 - 2, c1 - 2
    lab_sp, n = ndi.label(m)
    np.testing.assert_array_equal(_number(_components(torch.from_numpy(m)), 1).numpy(), lab_sp)


def test_number_drops_small_components_keeping_raster_order() -> None:
    m = np.zeros((20, 20), bool)
    m[0:2, 10:12] = True  # 4 px, first in raster order
    m[5:10, 0:5] = True  # 25 px
    m[12:20, 12:20] = True  # 64 px
    lab = _number(_components(torch.from_numpy(m)), 10).numpy()
    assert lab[0, 10] == 0 and lab[5, 0] == 1 and lab[15, 15] == 2 and lab.max() == 2


@pytest.mark.parametrize("seed", [0, 1])
def test_flood_equals_skimage_watershed_on_random_energy(seed: int) -> None:
    rng = np.random.default_rng(seed)
    h, w = 90, 110
    energy = ndi.gaussian_filter(rng.random((h, w)), 2).astype(np.float32) + 0.01 * rng.random(
        (h, w)
    ).astype(np.float32)
    mask = ndi.binary_opening(rng.random((h, w)) < 0.8, iterations=2)
    markers = np.zeros((h, w), np.int64)
    for i, (r, c) in enumerate(rng.integers(3, [h - 3, w - 3], size=(25, 2))):
        markers[r - 1 : r + 2, c - 1 : c + 2] = i + 1
    markers *= mask
    ref = watershed(energy, markers=markers, mask=mask)
    out = _flood(
        torch.from_numpy(energy), torch.from_numpy(markers), torch.from_numpy(mask)
    ).numpy()
    np.testing.assert_array_equal(out, ref)
    assert ((out == 0) & mask).sum() > 0  # some parts of the mask hold no marker and stay 0


# --------------------------------------------------------------------------------------------
# the instance step on synthetic maps
# --------------------------------------------------------------------------------------------
def test_perfect_maps_recover_the_known_instances() -> None:
    inst, cls = _scene()
    np_prob, hv, tp = _perfect_maps(inst, cls)
    res = hv_to_instances_torch(np_prob, hv, tp, HVParams())
    pq = panoptic_quality(inst, res.inst)
    assert pq["tp"] == 10 and pq["fp"] == 0 and pq["fn"] == 0 and pq["pq"] > 0.9
    np.testing.assert_array_equal(res.labels, np.arange(1, 11))
    pairs = _pairing(inst, res.inst)
    assert sorted(pairs.values()) == list(range(1, 11))
    for t, p in pairs.items():
        assert res.class_id[p - 1] == cls[t]
    _same(hv_to_instances(np_prob, hv, tp, HVParams()), res)


def test_noisy_maps_and_other_parameters_match_numpy() -> None:
    inst, cls = _scene()
    np_prob, hv, tp = _perfect_maps(inst, cls)
    rng = np.random.default_rng(3)
    np_prob = np.clip(
        ndi.gaussian_filter(np_prob, 1.5) + 0.1 * rng.standard_normal(inst.shape), 0, 1
    ).astype(np.float32)
    hv = np.clip(
        ndi.gaussian_filter(hv, (0, 1.5, 1.5)) + 0.05 * rng.standard_normal(hv.shape), -1, 1
    ).astype(np.float32)
    tp = 0.6 * tp + 0.4 * rng.dirichlet(np.ones(6), size=inst.shape).transpose(2, 0, 1).astype(
        np.float32
    )
    for params in (
        HVParams(),
        HVParams(
            np_threshold=0.45,
            edge_threshold=0.35,
            sobel_ksize=15,
            min_marker_px=40,
            min_nucleus_px=40,
            class_temperature=1.1,
            class_exclude=(4,),
        ),
        HVParams(class_prior=(1.0, 2.0, 0.5, 1.0, 1.0), hole_px=0, marker_open_px=3, sobel_ksize=7),
    ):
        _same(
            hv_to_instances(np_prob, hv, tp, params), hv_to_instances_torch(np_prob, hv, tp, params)
        )


def test_without_classes_tiny_and_empty_inputs() -> None:
    inst, cls = _scene(160)
    np_prob, hv, _ = _perfect_maps(inst, cls)
    a, b = hv_to_instances(np_prob * 0.8, hv * 0.9), hv_to_instances_torch(np_prob * 0.8, hv * 0.9)
    _same(a, b)
    assert b.inst.max() == 7 and not b.class_id.any()
    # smaller than the Sobel kernel: OpenCV reflects repeatedly, so must we
    small_np, small_hv = np_prob[20:29, 20:35], hv[:, 20:29, 20:35]
    _same(
        hv_to_instances(small_np, small_hv, params=HVParams(min_nucleus_px=3, min_marker_px=3)),
        hv_to_instances_torch(
            small_np, small_hv, params=HVParams(min_nucleus_px=3, min_marker_px=3)
        ),
    )
    for np_map in (np.zeros((64, 48), np.float32), np.ones((64, 48), np.float32)):
        hv0 = np.zeros((2, 64, 48), np.float32)
        tp0 = np.zeros((6, 64, 48), np.float32)
        tp0[0] = 1
        r = hv_to_instances_torch(np_map, hv0, tp0)
        _same(hv_to_instances(np_map, hv0, tp0), r)
        assert r.inst.shape == (64, 48) and r.class_probs.shape == (len(r.labels), 5)
    empty = hv_to_instances_torch(np.zeros((64, 48), np.float32), np.zeros((2, 64, 48), np.float32))
    assert empty.inst.max() == 0 and len(empty.labels) == 0 and empty.class_probs is None


def test_same_result_twice_and_from_tensors() -> None:
    inst, cls = _scene()
    np_prob, hv, tp = _perfect_maps(inst, cls)
    hv = hv * 0.8
    a = hv_to_instances_torch(np_prob, hv, tp)
    b = hv_to_instances_torch(np_prob, hv, tp)
    c = hv_to_instances_torch(torch.from_numpy(np_prob), torch.from_numpy(hv), torch.from_numpy(tp))
    _same(a, b)
    _same(a, c)


# --------------------------------------------------------------------------------------------
# real validation tiles through the bundled model
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lite_model():
    from wsi_nuclei.models import load_model

    return load_model("wsi-nuclei-lite0", device="cpu")


def test_real_validation_tiles_match_numpy(lite_model, nuclei_dir: Path, torch_one_thread) -> None:
    from PIL import Image

    from wsi_nuclei.inference import predict_maps

    split = json.loads((REPO / "configs" / "val_split.json").read_text())
    tiles = [("consep_train", n, None) for n in split["consep_train"][:2]]
    tiles.append(("monuseg_train", split["monuseg_train"][0], (slice(200, 584), slice(300, 684))))
    params = lite_model.params
    for ds, name, crop in tiles:
        image = np.asarray(Image.open(nuclei_dir / ds / "images" / f"{name}.png").convert("RGB"))
        image = image[crop] if crop else image
        maps = predict_maps(lite_model, image)
        ref = hv_to_instances(maps["np"], maps["hv"], maps["tp"], params)
        res = hv_to_instances_torch(maps["np"], maps["hv"], maps["tp"], params)
        assert len(ref.labels) > 20
        assert panoptic_quality(ref.inst, res.inst)["pq"] >= 0.99, name
        pairs = _pairing(ref.inst, res.inst)
        agree = np.mean([ref.class_id[t - 1] == res.class_id[p - 1] for t, p in pairs.items()])
        assert agree >= 0.99, name


# --------------------------------------------------------------------------------------------
# which implementation runs
# --------------------------------------------------------------------------------------------
def test_backend_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    assert postprocess_backend("cpu") == "numpy"
    assert postprocess_backend("cuda") == "torch" and postprocess_backend("cuda:1") == "torch"
    assert (
        postprocess_backend("cuda", "numpy") == "numpy"
        and postprocess_backend("cpu", "torch") == "torch"
    )
    monkeypatch.setenv(BACKEND_ENV, "torch")
    assert postprocess_backend("cpu") == "torch"
    monkeypatch.setenv(BACKEND_ENV, "numpy")
    assert postprocess_backend("cuda") == "numpy"
    monkeypatch.setenv(BACKEND_ENV, "gpu")
    with pytest.raises(ValueError, match="auto, numpy or torch"):
        postprocess_backend("cpu")


def test_model_uses_the_forced_backend(lite_model, monkeypatch: pytest.MonkeyPatch) -> None:
    from wsi_nuclei.models import load_model

    assert lite_model.postprocess_backend == "numpy"  # CPU default
    monkeypatch.setenv(BACKEND_ENV, "torch")
    forced = load_model("wsi-nuclei-lite0", device="cpu")
    assert forced.postprocess_backend == "torch"
    calls = []
    import wsi_nuclei.postprocess_torch as pt

    real = pt.hv_to_instances_torch
    monkeypatch.setattr(
        pt, "hv_to_instances_torch", lambda *a, **k: calls.append(k) or real(*a, **k)
    )
    inst, cls = _scene()
    np_prob, hv, tp = _perfect_maps(inst, cls)
    raw = {"np": np_prob, "hv": hv, "tp": tp}
    _same(lite_model.postprocess(raw), forced.postprocess(raw))
    assert calls == [{"device": "cpu"}]


def test_resume_key_records_the_torch_post_processing(monkeypatch: pytest.MonkeyPatch) -> None:
    from wsi_nuclei.inference import ArraySlide
    from wsi_nuclei.models import get_spec
    from wsi_nuclei.pipeline import RunConfig, make_plan

    spec = get_spec("wsi-nuclei-lite0")
    slide = ArraySlide(np.full((300, 300, 3), 200, np.uint8), spec.mpp)
    cfg = RunConfig(slide=slide, tissue="none")
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    plain, _ = make_plan(cfg, spec, slide, slide, "a", None, "cpu", None)
    monkeypatch.setenv(BACKEND_ENV, "numpy")
    assert make_plan(cfg, spec, slide, slide, "a", None, "cpu", None)[0].key() == plain.key()
    monkeypatch.setenv(BACKEND_ENV, "torch")
    forced, _ = make_plan(cfg, spec, slide, slide, "a", None, "cpu", None)
    assert forced.key() != plain.key() and forced.postprocess.endswith("backend=torch")

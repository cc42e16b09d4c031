"""Tests of wsi_nuclei.datasets: the official PanNuke fold reader, the shared format (real and
synthetic, with resampling) and the HoVer-Net distance-map targets, against known answers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from wsi_nuclei.datasets import (
    ALLOWED_UNKNOWN,
    hv_targets,
    is_pannuke_fold,
    read_dataset,
    read_pannuke_fold,
    read_shared_dataset,
    resample_sample,
)
from wsi_nuclei.errors import DatasetError

# --------------------------------------------------------------------------------------------
# A synthetic official PanNuke fold
#
# Layout of the official release: images.npy (N, 256, 256, 3) float64 in 0..255, masks.npy
# (N, 256, 256, 6) float64 with, in channels 0-4 (Neoplastic, Inflammatory, Connective, Dead,
# Epithelial), the instance ids of the nuclei of that class (ids are unique over the image, as
# in PanNuke), and in channel 5 the background (1 where no nucleus); types.npy (N,) tissue
# names (unicode).
#
# Image 0: id 7 Neoplastic (rows 10-19, cols 10-29), id 3 Inflammatory (rows 40-49, cols
#          40-44), id 12 Neoplastic (rows 100-119, cols 200-209), id 5 Epithelial (rows
#          200-203, cols 0-3), id 9 Dead (rows 60-61, cols 60-62).
#   The reader relabels in channel order, then by id within a channel:
#   1 = Neoplastic id 7, 2 = Neoplastic id 12, 3 = Inflammatory id 3, 4 = Dead id 9,
#   5 = Epithelial id 5 -> classes [0, 1, 1, 2, 4, 5], allowed [0, 1, 1, 2, 8, 16].
# Image 1: no nuclei at all.
# Image 2: id 1 Connective (rows 0-255, col 128: a 1-px line), id 2 Connective (rows 0-9,
#          cols 0-9) -> classes [0, 3, 3], allowed [0, 4, 4].
# --------------------------------------------------------------------------------------------

_FOLD_BOXES = {
    0: [
        (0, 7, (10, 20, 10, 30)),
        (1, 3, (40, 50, 40, 45)),
        (0, 12, (100, 120, 200, 210)),
        (4, 5, (200, 204, 0, 4)),
        (3, 9, (60, 62, 60, 63)),
    ],
    1: [],
    2: [(2, 1, (0, 256, 128, 129)), (2, 2, (0, 10, 0, 10))],
}
# expected (class, box) per new label, per image
_FOLD_EXPECTED = {
    0: [
        (1, (10, 20, 10, 30)),
        (1, (100, 120, 200, 210)),
        (2, (40, 50, 40, 45)),
        (4, (60, 62, 60, 63)),
        (5, (200, 204, 0, 4)),
    ],
    1: [],
    2: [(3, (0, 256, 128, 129)), (3, (0, 10, 0, 10))],
}
_TISSUES = ["Breast", "Colon", "Adrenal_gland"]


def _fold_arrays(n: int = 3) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, 256, 256, 3)).astype(np.float64)
    masks = np.zeros((n, 256, 256, 6), np.float64)
    for i in range(n):
        for ch, ident, (r0, r1, c0, c1) in _FOLD_BOXES[i]:
            masks[i, r0:r1, c0:c1, ch] = ident
        masks[i, ..., 5] = (masks[i, ..., :5].sum(-1) == 0).astype(np.float64)
    return images, masks, np.array(_TISSUES[:n])


def _write_fold(root: Path, *, nested: bool = False) -> tuple[np.ndarray, np.ndarray]:
    images, masks, types = _fold_arrays()
    img_dir = root / "images" / "fold1" if nested else root
    mask_dir = root / "masks" / "fold1" if nested else root
    img_dir.mkdir(parents=True, exist_ok=True)
    mask_dir.mkdir(parents=True, exist_ok=True)
    np.save(img_dir / "images.npy", images)
    np.save(img_dir / "types.npy", types)
    np.save(mask_dir / "masks.npy", masks)
    return images, masks


def _check_fold_samples(samples, images: np.ndarray, fold_name: str) -> None:
    assert [s.name for s in samples] == [f"{fold_name}/{i:05d}" for i in range(3)]
    for i, s in enumerate(samples):
        assert s.mpp == 0.25
        assert s.info["tissue"] == _TISSUES[i]
        assert s.image.dtype == np.uint8 and s.image.shape == (256, 256, 3)
        np.testing.assert_array_equal(s.image, images[i].astype(np.uint8))
        assert s.inst.dtype == np.int32 and s.inst.shape == (256, 256)
        exp = _FOLD_EXPECTED[i]
        want = np.zeros((256, 256), np.int32)
        for label, (_, (r0, r1, c0, c1)) in enumerate(exp, start=1):
            want[r0:r1, c0:c1] = label
        np.testing.assert_array_equal(s.inst, want)
        np.testing.assert_array_equal(s.classes, [0] + [c for c, _ in exp])
        np.testing.assert_array_equal(s.allowed, [0] + [1 << (c - 1) for c, _ in exp])
        assert s.classes.dtype == np.uint8 and s.allowed.dtype == np.uint8


def test_pannuke_fold_flat_layout(tmp_path: Path) -> None:
    root = tmp_path / "fold1"
    images, _ = _write_fold(root)
    assert is_pannuke_fold(root)
    _check_fold_samples(list(read_pannuke_fold(root)), images, "fold1")
    # read_dataset detects the format
    _check_fold_samples(list(read_dataset(root)), images, "fold1")


def test_pannuke_fold_nested_archive_layout(tmp_path: Path) -> None:
    root = tmp_path / "Fold 1"
    images, _ = _write_fold(root, nested=True)
    _check_fold_samples(list(read_dataset(root)), images, "Fold 1")


def test_pannuke_fold_indices_names_and_resampling(tmp_path: Path) -> None:
    root = tmp_path / "fold2"
    _write_fold(root)
    got = list(read_pannuke_fold(root, indices=[2]))
    assert [s.name for s in got] == ["fold2/00002"]
    # evaluate --split passes image names: for a fold they are the zero-padded indices
    got = list(read_dataset(root, names=["00002", "00000"]))
    assert [s.name for s in got] == ["fold2/00002", "fold2/00000"]
    with pytest.raises(DatasetError):
        list(read_dataset(root, names=["train_1"]))
    with pytest.raises(DatasetError):
        list(read_pannuke_fold(root, indices=[3]))
    # 0.25 -> 0.5 um/px halves the size; labels by nearest neighbour keep their classes
    (s,) = list(read_pannuke_fold(root, indices=[0], target_mpp=0.5))
    assert s.mpp == 0.5 and s.info["source_mpp"] == 0.25
    assert s.image.shape == (128, 128, 3) and s.inst.shape == (128, 128)
    np.testing.assert_array_equal(s.classes, [0, 1, 1, 2, 4, 5])
    assert (s.inst[5:10, 5:15] == 1).all()  # rows 10-19, cols 10-29 at half size
    # target_mpp=None keeps the native resolution
    (s,) = list(read_pannuke_fold(root, indices=[0], target_mpp=None))
    assert s.inst.shape == (256, 256)


@pytest.mark.parametrize(
    "case",
    [
        "masks_5_channels",
        "count_mismatch",
        "size_mismatch",
        "images_no_channel",
        "no_masks",
        "garbage_npy",
    ],
)
def test_pannuke_fold_malformed(tmp_path: Path, case: str) -> None:
    root = tmp_path / "bad"
    root.mkdir()
    images, masks, types = _fold_arrays(2)
    if case == "masks_5_channels":
        masks = masks[..., :5]
    elif case == "count_mismatch":
        masks = masks[:1]
    elif case == "size_mismatch":
        masks = masks[:, :128, :128]
    elif case == "images_no_channel":
        images = images[..., 0]
    np.save(root / "images.npy", images)
    np.save(root / "types.npy", types)
    if case == "garbage_npy":
        (root / "masks.npy").write_bytes(b"this is not a numpy file" * 10)
    elif case != "no_masks":
        np.save(root / "masks.npy", masks)
    with pytest.raises(DatasetError) as exc:
        list(read_dataset(root))
    assert "\n" not in str(exc.value)


def test_read_dataset_missing_or_unknown(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="no such dataset"):
        read_dataset(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="neither"):
        read_dataset(tmp_path / "empty")


# --------------------------------------------------------------------------------------------
# Shared format
# --------------------------------------------------------------------------------------------


def test_real_shared_dataset_nucls_train(nuclei_dir: Path) -> None:
    d = nuclei_dir / "nucls_train"
    meta = json.loads((d / "meta.json").read_text())
    samples = list(read_dataset(d))
    assert len(samples) == meta["counts"]["images"] == 10
    assert sorted(s.name for s in samples) == sorted(f"nucls_train/{n}" for n in meta["images"])
    total, per_allowed = 0, {}
    for s in samples:
        name = s.name.split("/", 1)[1]
        info = meta["images"][name]
        assert s.mpp == 0.25  # already at 0.25 um/px: no resampling
        assert s.image.shape == (info["height"], info["width"], 3) and s.image.dtype == np.uint8
        n = int(s.inst.max())
        assert n == info["nuclei"]
        np.testing.assert_array_equal(np.unique(s.inst), np.arange(n + 1))  # consecutive ids
        assert s.classes.shape == s.allowed.shape == (n + 1,)
        assert s.classes[0] == 0 and s.allowed[0] == 0
        # NuCLS: Tumor -> Neoplastic exactly, Non-Tumor -> allowed 30 (anything but Neoplastic)
        assert set(np.unique(s.allowed[1:])) <= {1, 30}
        np.testing.assert_array_equal(s.classes[1:] == 1, s.allowed[1:] == 1)
        assert set(np.unique(s.classes[1:])) <= {0, 1}
        total += n
        for a in s.allowed[1:]:
            per_allowed[str(int(a))] = per_allowed.get(str(int(a)), 0) + 1
    assert total == meta["counts"]["nuclei"] == 458
    assert per_allowed == meta["counts"]["nuclei_per_allowed"]
    # names= selects images in the given order
    got = list(read_dataset(d, names=["train_3", "train_1"]))
    assert [s.name for s in got] == ["nucls_train/train_3", "nucls_train/train_1"]


def _write_shared(
    root: Path, mpps: dict[str, float | None], top_mpp: float | str | None = None
) -> dict:
    """A tiny shared-format dataset; returns {name: (rgb, inst, classes, allowed)}."""
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    meta: dict = {"name": root.name, "images": {}}
    if top_mpp is not None:
        meta["mpp"] = top_mpp
    out = {}
    rng = np.random.default_rng(1)
    for k, (name, mpp) in enumerate(mpps.items()):
        h, w = 40 + 4 * k, 50
        rgb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        inst = np.zeros((h, w), np.int32)
        inst[2:8, 3:9] = 1
        inst[20:30, 10:14] = 2
        inst[30:33, 40:50] = 3
        classes = np.array([0, 2, 0, 3], np.uint8)
        allowed = np.array([0, 2, 17, 4], np.uint8)
        Image.fromarray(rgb).save(root / "images" / f"{name}.png")
        np.savez_compressed(
            root / "labels" / f"{name}.npz",
            inst=inst,
            classes=classes,
            allowed=allowed,
            source_class=np.array([-1, 2, 3, 4], np.int16),
        )
        meta["images"][name] = {
            "height": h,
            "width": w,
            "nuclei": 3,
            **({"mpp": mpp} if mpp is not None else {}),
        }
        out[name] = (rgb, inst, classes, allowed)
    (root / "meta.json").write_text(json.dumps(meta))
    return out


def test_synthetic_shared_dataset_per_image_mpp_resampled(tmp_path: Path) -> None:
    d = tmp_path / "synth"
    truth = _write_shared(d, {"a_40x": 0.25, "b_20x": 0.5, "c_top": None}, top_mpp=0.5)
    samples = {s.name: s for s in read_shared_dataset(d)}
    assert sorted(samples) == ["synth/a_40x", "synth/b_20x", "synth/c_top"]

    rgb, inst, classes, allowed = truth["a_40x"]
    s = samples["synth/a_40x"]
    assert s.mpp == 0.25 and "source_mpp" not in s.info
    np.testing.assert_array_equal(s.image, rgb)  # lossless PNG, no resampling
    np.testing.assert_array_equal(s.inst, inst)
    np.testing.assert_array_equal(s.classes, classes)
    np.testing.assert_array_equal(s.allowed, allowed)

    # per-image mpp 0.5 and (third image) the top-level mpp 0.5 -> resampled 2x to 0.25
    for name in ("b_20x", "c_top"):
        rgb, inst, classes, allowed = truth[name]
        s = samples[f"synth/{name}"]
        assert s.mpp == 0.25 and s.info["source_mpp"] == 0.5
        assert s.image.shape == (2 * rgb.shape[0], 2 * rgb.shape[1], 3)
        # nearest-neighbour 2x: every label pixel becomes an exact 2x2 block
        np.testing.assert_array_equal(s.inst, np.kron(inst, np.ones((2, 2), np.int32)))
        assert s.inst.dtype == np.int32
        np.testing.assert_array_equal(s.classes, classes)
        np.testing.assert_array_equal(s.allowed, allowed)
        # bilinear image: same mean colour, and each 2x2 block stays close to its source pixel
        assert abs(float(s.image.mean()) - float(rgb.mean())) < 2.0
        small = s.image.reshape(rgb.shape[0], 2, rgb.shape[1], 2, 3).mean(axis=(1, 3))
        assert np.corrcoef(small.ravel(), rgb.ravel())[0, 1] > 0.6

    # target_mpp=None keeps the native size
    s = next(iter(read_shared_dataset(d, names=["b_20x"], target_mpp=None)))
    assert s.mpp == 0.5 and s.inst.shape == truth["b_20x"][1].shape


def test_resample_sample_tolerance_and_downsampling(tmp_path: Path) -> None:
    d = tmp_path / "tol"
    _write_shared(d, {"x": 0.2525}, top_mpp=None)
    (s,) = list(read_shared_dataset(d))  # within 2% of 0.25: unchanged
    assert s.mpp == 0.2525 and s.inst.shape == (40, 50)
    (s,) = list(read_shared_dataset(d, target_mpp=0.505))  # half the size
    assert s.inst.shape == (20, 25) and s.mpp == 0.505
    assert resample_sample(s, 0.505) is s


def test_shared_dataset_errors(tmp_path: Path) -> None:
    d = tmp_path / "nompp"
    _write_shared(d, {"x": None}, top_mpp="differs per image")
    with pytest.raises(DatasetError, match="mpp"):
        list(read_shared_dataset(d))
    d = tmp_path / "nometa"
    _write_shared(d, {"x": 0.25})
    (d / "meta.json").unlink()
    with pytest.raises(DatasetError, match="meta.json"):
        list(read_shared_dataset(d))
    d = tmp_path / "badjson"
    _write_shared(d, {"x": 0.25})
    (d / "meta.json").write_text("{not json")
    with pytest.raises(DatasetError, match="invalid JSON"):
        list(read_dataset(d))
    d = tmp_path / "missing_label"
    _write_shared(d, {"x": 0.25})
    with pytest.raises(DatasetError, match="missing"):
        list(read_shared_dataset(d, names=["y"]))
    d = tmp_path / "shape"
    truth = _write_shared(d, {"x": 0.25})
    _, inst, classes, allowed = truth["x"]
    np.savez_compressed(
        d / "labels" / "x.npz",
        inst=inst[:10],
        classes=classes,
        allowed=allowed,
        source_class=np.full(4, -1, np.int16),
    )
    with pytest.raises(DatasetError, match="shape"):
        list(read_shared_dataset(d))
    assert ALLOWED_UNKNOWN == 31


# --------------------------------------------------------------------------------------------
# hv_targets
# --------------------------------------------------------------------------------------------


def test_hv_targets_hand_case() -> None:
    inst = np.zeros((8, 10), np.int32)
    # Instance 1: a T/L shape  (0,0) (0,1) (0,2) (0,3) (1,0) (2,0)  (row, col)
    #   centre of mass x = (0+1+2+3+0+0)/6 = 1, y = (0+0+0+0+1+2)/6 = 0.5
    #   x offsets -1 0 1 2 -1 -1 -> left side / 1, right side / 2 -> -1 0 .5 1 -1 -1
    #   y offsets -.5 -.5 -.5 -.5 .5 1.5 -> top / .5, bottom / 1.5 -> -1 -1 -1 -1 1/3 1
    for r, c in [(0, 0), (0, 1), (0, 2), (0, 3), (1, 0), (2, 0)]:
        inst[r, c] = 1
    # Instance 2: a 5x5 square rows 3-7, cols 5-9 touching nothing; centre (5, 7)
    inst[3:8, 5:10] = 2
    # Instance 3: one pixel: offsets 0 -> 0 (no division by zero)
    inst[7, 0] = 3
    hv = hv_targets(inst)
    assert hv.shape == (2, 8, 10) and hv.dtype == np.float32
    h, v = hv
    np.testing.assert_allclose(
        [h[0, 0], h[0, 1], h[0, 2], h[0, 3], h[1, 0], h[2, 0]], [-1, 0, 0.5, 1, -1, -1], atol=1e-6
    )
    np.testing.assert_allclose(
        [v[0, 0], v[0, 1], v[0, 2], v[0, 3], v[1, 0], v[2, 0]],
        [-1, -1, -1, -1, 1 / 3, 1],
        atol=1e-6,
    )
    ramp = np.array([-1, -0.5, 0, 0.5, 1], np.float32)
    np.testing.assert_allclose(h[3:8, 5:10], np.tile(ramp, (5, 1)), atol=1e-6)
    np.testing.assert_allclose(v[3:8, 5:10], np.tile(ramp[:, None], (1, 5)), atol=1e-6)
    assert h[7, 0] == 0 and v[7, 0] == 0
    assert (hv[:, inst == 0] == 0).all()  # background is 0


def test_hv_targets_touching_discs_and_missing_ids() -> None:
    from skimage.draw import disk

    inst = np.zeros((60, 80), np.int32)
    rr, cc = disk((30, 25), 15, shape=inst.shape)
    inst[rr, cc] = 1
    rr, cc = disk((30, 52), 13, shape=inst.shape)
    inst[rr, cc] = 4  # ids 2, 3 absent: skipped
    hv = hv_targets(inst)
    assert hv.min() >= -1 and hv.max() <= 1
    assert (hv[:, inst == 0] == 0).all()
    for label in (1, 4):
        yy, xx = np.nonzero(inst == label)
        cy, cx = yy.mean(), xx.mean()
        h, v = hv[0][yy, xx], hv[1][yy, xx]
        # sign flips at the centre of mass, extremes reach exactly +-1 on both sides
        assert (np.sign(h) == np.sign(np.round(xx - cx, 6))).all()
        assert (np.sign(v) == np.sign(np.round(yy - cy, 6))).all()
        assert h.min() == -1 and h.max() == 1 and v.min() == -1 and v.max() == 1
        # monotone in x along the row through the centre
        row = int(round(cy))
        vals = hv[0][row][inst[row] == label]
        assert (np.diff(vals) > 0).all()
    # the two discs touch, yet each has its own centre: a jump from +1 to -1 at the seam
    seam = [(r, c) for r, c in zip(*np.nonzero(inst[:, :-1] == 1)) if inst[r, c + 1] == 4]
    assert seam
    r, c = seam[len(seam) // 2]
    assert hv[0, r, c] > 0.9 and hv[0, r, c + 1] < -0.9


# --------------------------------------------------------------------------------------------
# point-labelled datasets (format 1.1, "annotation": "points")
# --------------------------------------------------------------------------------------------
def _write_points(root: Path, mpp: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    rgb = np.full((20, 30, 3), 200, np.uint8)
    pts = np.array([[0.0, 0.0], [29.0, 19.0], [10.0, 5.0]], np.float32)  # (x, y) pixel centres
    Image.fromarray(rgb).save(root / "images" / "p.png")
    np.savez_compressed(
        root / "labels" / "p.npz",
        points=pts,
        point_classes=np.array([2, 3, 0], np.uint8),
        point_allowed=np.array([2, 4, 17], np.uint8),
        point_source_class=np.array([2, 3, 1], np.int16),
    )
    meta = {
        "name": root.name,
        "format_version": 1.1,
        "annotation": "points",
        "images": {"p": {"mpp": mpp}},
    }
    (root / "meta.json").write_text(json.dumps(meta))
    return rgb, pts


def test_point_dataset_reader_and_resampling(tmp_path: Path) -> None:
    _, pts = _write_points(tmp_path / "pts", mpp=0.5)
    (s,) = list(read_dataset(tmp_path / "pts", target_mpp=None))
    assert s.annotation == "points" and s.inst is None
    np.testing.assert_array_equal(s.points, pts)
    assert s.classes.tolist() == [2, 3, 0] and s.allowed.tolist() == [2, 4, 17]
    # 0.5 -> 0.25 um/px: the image doubles, pixel centres map as (p + 0.5) * 2 - 0.5
    (s2,) = list(read_dataset(tmp_path / "pts", target_mpp=0.25))
    assert s2.image.shape == (40, 60, 3) and s2.mpp == 0.25
    np.testing.assert_allclose(s2.points, [[0.5, 0.5], [58.5, 38.5], [20.5, 10.5]])


def test_point_dataset_errors(tmp_path: Path) -> None:
    _write_points(tmp_path / "a")
    lab = tmp_path / "a" / "labels" / "p.npz"
    np.savez_compressed(
        lab,
        points=np.array([[50.0, 1.0]], np.float32),
        point_classes=np.array([2], np.uint8),
        point_allowed=np.array([2], np.uint8),
        point_source_class=np.array([2], np.int16),
    )
    with pytest.raises(DatasetError, match="outside the image"):
        list(read_dataset(tmp_path / "a"))
    np.savez_compressed(
        lab,
        points=np.zeros((2, 2), np.float32),
        point_classes=np.array([2], np.uint8),
        point_allowed=np.array([2, 2], np.uint8),
        point_source_class=np.array([2, 2], np.int16),
    )
    with pytest.raises(DatasetError, match="differ in length"):
        list(read_dataset(tmp_path / "a"))
    np.savez_compressed(lab, inst=np.zeros((20, 30), np.int32))
    with pytest.raises(DatasetError, match="missing array"):
        list(read_dataset(tmp_path / "a"))

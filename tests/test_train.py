"""Tests of wsi_nuclei.train: the partial-label class loss on hand cases, batch building, and a
tiny end-to-end training run on a synthetic shared-format dataset, resumed from its checkpoint."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.special import logsumexp

from wsi_nuclei.train import (
    DatasetEntry,
    hovernet_loss,
    main,
    make_batch,
    partial_label_nll,
    point_label_map,
)
from wsi_nuclei.train._data import _load_entries

pytestmark = pytest.mark.usefixtures("torch_one_thread")


# --------------------------------------------------------------------------------------------
# partial_label_nll
# --------------------------------------------------------------------------------------------

# One row of pixels (N=1, H=1, W=7) with known logits over 6 channels (0 = background).
_LOGITS = np.array(
    [
        [0.5, 2.0, -1.0, 0.0, 1.0, -0.5],
        [1.5, 0.2, 0.3, -2.0, 0.0, 1.0],
        [-1.0, 0.0, 0.0, 3.0, 0.5, 0.5],
        [2.0, -1.0, 1.0, 0.0, 0.0, 2.5],
        [0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
        [30.0, -30.0, -30.0, -30.0, -30.0, -30.0],  # background almost surely
        [0.3, 0.1, -0.2, 0.4, 0.0, 2.0],
    ],
    np.float64,
)


def _p() -> np.ndarray:
    e = np.exp(_LOGITS - _LOGITS.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def _loss(allowed: list[int], weight: list[float]) -> float:
    logits = torch.from_numpy(_LOGITS.T.copy()).float().view(1, 6, 1, 7)
    a = torch.tensor(allowed, dtype=torch.uint8).view(1, 1, 7)
    w = torch.tensor(weight, dtype=torch.float32).view(1, 1, 7)
    return float(partial_label_nll(logits, a, w))


def _nll(i: int, classes: list[int]) -> float:
    """-log sum_{c in classes} p_c of pixel i, computed in log space (float64)."""
    z = _LOGITS[i]
    return float(logsumexp(z) - logsumexp(z[classes]))


def test_partial_label_nll_single_pixels() -> None:
    p = _p()
    for i in range(7):
        w = [0.0] * 7
        w[i] = 1.0
        # exact label = a single bit -> plain NLL of that class
        for c in range(1, 6):
            a = [0] * 7
            a[i] = 1 << (c - 1)
            assert _loss(a, w) == pytest.approx(_nll(i, [c]), rel=1e-4, abs=1e-5)
            if i != 5:
                assert _loss(a, w) == pytest.approx(-math.log(p[i, c]), rel=1e-4)
        # unknown class on a nucleus pixel (31) -> -log(1 - p_bg)
        a = [0] * 7
        a[i] = 31
        assert _loss(a, w) == pytest.approx(_nll(i, [1, 2, 3, 4, 5]), rel=1e-4, abs=1e-5)
        if i != 5:  # (1 - p_bg underflows for the saturated pixel 5)
            assert _loss(a, w) == pytest.approx(-math.log(1 - p[i, 0]), rel=1e-4, abs=1e-5)
        # background pixel (0) -> -log p_bg
        a = [0] * 7
        assert _loss(a, w) == pytest.approx(-math.log(p[i, 0]), rel=1e-4, abs=1e-5)
        # CoNSeP epithelial = Neoplastic | Epithelial (17), NuCLS non-tumour = 30
        a[i] = 17
        assert _loss(a, w) == pytest.approx(_nll(i, [1, 5]), rel=1e-4, abs=1e-5)
        a[i] = 30
        assert _loss(a, w) == pytest.approx(_nll(i, [2, 3, 4, 5]), rel=1e-4, abs=1e-5)
    # spot values: pixel 4 (all logits equal): exact 1/6 each
    assert _loss([0, 0, 0, 0, 31, 0, 0], [0, 0, 0, 0, 1, 0, 0]) == pytest.approx(
        math.log(6 / 5), rel=1e-5
    )
    assert _loss([0, 0, 0, 0, 17, 0, 0], [0, 0, 0, 0, 1, 0, 0]) == pytest.approx(
        math.log(3), rel=1e-5
    )
    assert _loss([0, 0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 1, 0, 0]) == pytest.approx(
        math.log(6), rel=1e-5
    )


def test_partial_label_nll_weighted_mean_and_ignored_pixels() -> None:
    p = _p()
    allowed = [1, 0, 31, 4, 17, 16, 2]
    per_px = [
        -math.log(p[0, 1]),
        -math.log(p[1, 0]),
        -math.log(1 - p[2, 0]),
        -math.log(p[3, 3]),
        -math.log(p[4, 1] + p[4, 5]),
        _nll(5, [5]),
        -math.log(p[6, 2]),
    ]
    assert per_px[5] > 50  # pixel 5 would dominate if it were not ignored
    weight = [1.0, 2.0, 1.0, 0.5, 1.0, 0.0, 1.0]
    want = sum(w * v for w, v in zip(weight, per_px)) / sum(weight)
    assert _loss(allowed, weight) == pytest.approx(want, rel=1e-4)
    # all weights zero: 0, not NaN
    assert _loss(allowed, [0.0] * 7) == 0.0


def test_partial_label_nll_gradient_is_free_within_the_allowed_set() -> None:
    # With allowed = all classes, the loss depends only on p_bg: its gradient does not favour
    # any class over another (equal logits stay equal after a step).
    logits = torch.zeros(1, 6, 1, 1, requires_grad=True)
    partial_label_nll(
        logits, torch.full((1, 1, 1), 31, dtype=torch.uint8), torch.ones(1, 1, 1)
    ).backward()
    g = logits.grad.view(6)
    assert g[0] > 0  # pushes background down
    torch.testing.assert_close(g[1:], torch.full((5,), float(g[1])))
    assert float(g.sum()) == pytest.approx(0.0, abs=1e-6)


# --------------------------------------------------------------------------------------------
# A synthetic dataset in the shared format
# --------------------------------------------------------------------------------------------


def _make_image(seed: int, size: int = 96) -> tuple[np.ndarray, np.ndarray]:
    try:
        from wsi_nuclei.demo import make_nuclei_image

        rgb, inst, _ = make_nuclei_image(size, size, seed=seed, min_radius=5, max_radius=10)
        return rgb, inst
    except ImportError:
        from skimage.draw import disk

        rng = np.random.default_rng(seed)
        rgb = np.full((size, size, 3), (235, 170, 200), np.uint8)
        inst = np.zeros((size, size), np.int32)
        for k in range(1, 9):
            r, c = rng.integers(10, size - 10, 2)
            rr, cc = disk((r, c), 6, shape=inst.shape)
            inst[rr, cc] = k
        inst = np.searchsorted(np.unique(inst), inst).astype(np.int32)  # consecutive ids
        rgb[inst > 0] = (70, 40, 120)
        return rgb, inst


def _write_dataset(root: Path, n_images: int = 3) -> Path:
    d = root / "synth"
    (d / "images").mkdir(parents=True)
    (d / "labels").mkdir()
    meta: dict = {"name": "synth", "mpp": 0.25, "images": {}}
    for i in range(n_images):
        rgb, inst = _make_image(i)
        n = int(inst.max())
        classes = np.zeros(n + 1, np.uint8)
        classes[1:] = np.arange(n) % 3  # 0 (unknown), 1, 2
        allowed = np.where(classes > 0, 1 << (classes.astype(np.int32) - 1), 31).astype(np.uint8)
        allowed[0] = 0
        Image.fromarray(rgb).save(d / "images" / f"img{i}.png")
        np.savez_compressed(
            d / "labels" / f"img{i}.npz",
            inst=inst,
            classes=classes,
            allowed=allowed,
            source_class=np.full(n + 1, -1, np.int16),
        )
        meta["images"][f"img{i}"] = {
            "height": rgb.shape[0],
            "width": rgb.shape[1],
            "nuclei": n,
            "mpp": 0.25,
        }
    (d / "meta.json").write_text(json.dumps(meta))
    return d


def test_make_batch_targets_are_consistent(tmp_path: Path) -> None:
    d = _write_dataset(tmp_path, 2)
    items, weights, val = _load_entries([DatasetEntry(d, 1.0)], {"synth": ["img1"]}, 0.25)
    assert len(items) == 1 and [s.name for s in val] == ["synth/img1"]
    np.testing.assert_allclose(weights, [1.0])
    b = make_batch(items, weights, 3, 64, np.random.default_rng(0))
    assert tuple(b["x"].shape) == (3, 3, 64, 64) and b["x"].dtype == torch.float32
    assert 0 <= float(b["x"].min()) and float(b["x"].max()) <= 255
    assert tuple(b["np"].shape) == (3, 64, 64) and set(b["np"].unique().tolist()) <= {0, 1}
    assert tuple(b["hv"].shape) == (3, 2, 64, 64)
    assert float(b["hv"].abs().max()) <= 1
    fg = b["np"].bool()
    assert (b["hv"].permute(1, 0, 2, 3)[:, ~fg] == 0).all()  # hv 0 off nuclei
    assert (b["allowed"][~fg] == 0).all() and (b["allowed"][fg] > 0).all()
    assert set(b["allowed"][fg].unique().tolist()) <= {1, 2, 31}
    assert (b["mask"] == 1).all() and (b["hv_on"] == 1).all()
    # the loss is finite and decomposes as documented
    torch.manual_seed(0)
    out = {
        "np": torch.randn(3, 2, 64, 64),
        "hv": torch.randn(3, 2, 64, 64),
        "tp": torch.randn(3, 6, 64, 64),
    }
    total, parts = hovernet_loss(out, b)
    assert set(parts) == {"np_ce", "np_dice", "hv_mse", "hv_msge", "tp_nll"}
    want = (
        parts["np_ce"] + parts["np_dice"] + 2 * parts["hv_mse"] + parts["hv_msge"] + parts["tp_nll"]
    )
    assert float(total) == pytest.approx(want, rel=1e-5)
    # msge_weight scales only the HV-gradient term
    total3, parts3 = hovernet_loss(out, b, msge_weight=3.0)
    assert parts3["hv_msge"] == pytest.approx(parts["hv_msge"])
    assert float(total3) == pytest.approx(want + 2 * parts["hv_msge"], rel=1e-5)


# --------------------------------------------------------------------------------------------
# End-to-end training, resumed
# --------------------------------------------------------------------------------------------

_COMMON = [
    "--steps-per-epoch",
    "2",
    "--batch",
    "2",
    "--crop",
    "64",
    "--no-pretrained",
    "--threads",
    "1",
    "--device",
    "cpu",
    "--quiet",
]


def test_train_resume_and_best_weights(tmp_path: Path) -> None:
    from wsi_nuclei.models.effunet import EffUNet

    _write_dataset(tmp_path / "data", 3)
    (tmp_path / "split.json").write_text(
        json.dumps({"_comment": "validation images", "synth": ["img2"]})
    )
    (tmp_path / "cfg.json").write_text(
        json.dumps(
            {
                "datasets": [{"name": "synth", "weight": 1.0}],
                "val_split": "split.json",
                "target_mpp": 0.25,
            }
        )
    )
    out = tmp_path / "run"
    args = [
        "--config",
        str(tmp_path / "cfg.json"),
        "--data-root",
        str(tmp_path / "data"),
        "--out",
        str(out),
        *_COMMON,
    ]

    assert main(["--epochs", "1", *args]) == 0
    ck = torch.load(out / "last.pt", map_location="cpu", weights_only=False)
    assert ck["step"] == 2
    hist = json.loads((out / "history.json").read_text())
    assert [(h["epoch"], h["step"]) for h in hist] == [(1, 2)]
    assert "synth/bPQ" in hist[0] and "synth/dice" in hist[0]
    assert 0 <= hist[0]["synth/bPQ"] <= 1 and np.isfinite(hist[0]["loss"])
    assert (out / "best.pt").is_file() and (out / "args.json").is_file()
    weights_after_1 = ck["model"]

    assert main(["--epochs", "2", "--resume", *args]) == 0
    ck = torch.load(out / "last.pt", map_location="cpu", weights_only=False)
    assert ck["step"] == 4
    hist = json.loads((out / "history.json").read_text())
    assert [(h["epoch"], h["step"]) for h in hist] == [(1, 2), (2, 4)]
    assert ck["history"] == hist
    # training continued from the checkpoint: the weights moved on
    k = "np_head.out.weight"
    assert not torch.equal(weights_after_1[k], ck["model"][k])
    assert json.loads((out / "args.json").read_text())["resume"] == "True"

    # resuming a finished run does nothing more
    assert main(["--epochs", "2", "--resume", *args]) == 0
    assert torch.load(out / "last.pt", map_location="cpu", weights_only=False)["step"] == 4

    # best.pt loads into EffUNet (strictly) and runs
    best = torch.load(out / "best.pt", map_location="cpu", weights_only=True)
    assert best["epoch"] in (1, 2)
    net = EffUNet(n_types=6)
    net.load_state_dict(best["model"], strict=True)
    with torch.inference_mode():
        o = net.eval()(torch.zeros(1, 3, 64, 64))
    assert tuple(o["tp"].shape) == (1, 6, 64, 64)


def test_train_is_deterministic(tmp_path: Path) -> None:
    d = _write_dataset(tmp_path / "data", 2)
    for run in ("a", "b"):
        main(
            [
                "--data",
                str(d),
                "--out",
                str(tmp_path / run),
                "--epochs",
                "1",
                "--seed",
                "3",
                *_COMMON,
            ]
        )
    a = torch.load(tmp_path / "a" / "last.pt", map_location="cpu", weights_only=False)["model"]
    b = torch.load(tmp_path / "b" / "last.pt", map_location="cpu", weights_only=False)["model"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


def test_train_without_validation_writes_best(tmp_path: Path) -> None:
    d = _write_dataset(tmp_path / "data", 2)
    out = tmp_path / "run"
    main(["--data", str(d), "--out", str(out), "--epochs", "1", *_COMMON])
    assert (out / "last.pt").is_file()
    assert (out / "best.pt").is_file()


def test_train_init_weights_starts_from_given_network(tmp_path: Path) -> None:
    """--init-weights (an fp16 file like the bundled one) replaces the ImageNet start: after a
    tiny run at learning rate 0 the conv weights still equal the given network's."""
    from wsi_nuclei.models.effunet import EffUNet

    d = _write_dataset(tmp_path / "data", 2)
    torch.manual_seed(5)
    src = EffUNet()
    init = tmp_path / "init.pt"
    torch.save(
        {k: (v.half() if v.is_floating_point() else v) for k, v in src.state_dict().items()}, init
    )
    out = tmp_path / "run"
    main(
        [
            "--data",
            str(d),
            "--out",
            str(out),
            "--epochs",
            "1",
            "--lr",
            "0",
            "--init-weights",
            str(init),
            *_COMMON,
        ]
    )
    got = torch.load(out / "last.pt", map_location="cpu", weights_only=False)["model"]
    ref = src.state_dict()
    # conv/linear weights unchanged at lr 0 (BN running stats do move in train mode)
    for k in [k for k in ref if k.endswith("weight") and ref[k].ndim == 4]:
        torch.testing.assert_close(got[k], ref[k].half().float())


def test_train_lite1_from_lite0_weights(tmp_path: Path) -> None:
    """--encoder lite1 with lite0 --init-weights trains the deepened network (config stage key
    "encoder"): at learning rate 0 its trained blocks keep the given weights and the added blocks
    start as the identity."""
    from wsi_nuclei.models.effunet import EffUNet, encoder_of

    _write_dataset(tmp_path / "data", 2)
    torch.manual_seed(6)
    src = EffUNet()
    init = tmp_path / "init.pt"
    torch.save(src.state_dict(), init)
    cfg = {
        "datasets": [{"name": "synth", "weight": 1.0}],
        "target_mpp": 0.25,
        "stages": [{"name": "big", "epochs": 1, "lr": 0.0, "encoder": "lite1", "init": str(init)}],
    }
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    out = tmp_path / "run"
    args = ["--config", str(tmp_path / "cfg.json"), "--data-root", str(tmp_path / "data")]
    assert main([*args, "--out", str(out), *_COMMON]) == 0
    got = torch.load(out / "big" / "last.pt", map_location="cpu", weights_only=False)["model"]
    assert encoder_of(got) == "lite1"
    ref = src.state_dict()
    torch.testing.assert_close(
        got["encoder._blocks.4._depthwise_conv.weight"],
        ref["encoder._blocks.3._depthwise_conv.weight"],
    )
    assert not got["encoder._blocks.3._bn2.weight"].any()
    net = EffUNet(n_types=6, encoder="lite1")
    net.load_state_dict(got, strict=True)


def test_train_with_separate_validation_dataset(tmp_path: Path) -> None:
    """--val-data (e.g. a held-out PanNuke fold) is scored every epoch and picks best.pt."""
    d = _write_dataset(tmp_path / "train", 2)
    v = _write_dataset(tmp_path / "heldout", 2)
    out = tmp_path / "run"
    main(["--data", str(d), "--val-data", str(v), "--out", str(out), "--epochs", "1", *_COMMON])
    hist = json.loads((out / "history.json").read_text())
    assert set(hist[0]) >= {f"{v.name}/bPQ", f"{v.name}/dice"}
    best = torch.load(out / "best.pt", map_location="cpu", weights_only=True)
    assert best["metrics"] == {k: hist[0][k] for k in best["metrics"]}


def test_train_config_stages_chain_and_resume(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A config with stages runs each in <out>/<name>; "init": "previous" starts from the
    previous stage's best weights (checked at learning rate 0); --resume skips finished stages."""
    _write_dataset(tmp_path / "data", 3)
    (tmp_path / "split.json").write_text(json.dumps({"synth": ["img2"]}))
    cfg = {
        "datasets": [{"name": "synth", "weight": 1.0}],
        "val_split": "split.json",
        "target_mpp": 0.25,
        "stages": [
            {"name": "s1", "epochs": 1, "lr": 1e-3},
            {"name": "s2", "epochs": 2, "lr": 0.0, "class_weight": 3, "init": "previous"},
            {"name": "s3", "epochs": 1, "lr": 1e-2, "init": "previous"},
            {"name": "s4", "epochs": 1, "lr": 0.0, "init": "s1"},  # an earlier stage by name
        ],
    }
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    out = tmp_path / "run"
    args = [
        "--config",
        str(tmp_path / "cfg.json"),
        "--data-root",
        str(tmp_path / "data"),
        "--out",
        str(out),
        *_COMMON,
    ]
    assert main(["--resume", *args]) == 0
    s1 = torch.load(out / "s1" / "best.pt", map_location="cpu", weights_only=True)["model"]
    s2 = torch.load(out / "s2" / "last.pt", map_location="cpu", weights_only=False)
    assert s2["step"] == 4  # stage 2's own epochs (2 x 2 steps), not the command line's
    assert json.loads((out / "s2" / "args.json").read_text())["class_weight"] == "3.0"
    s3 = torch.load(out / "s3" / "last.pt", map_location="cpu", weights_only=False)["model"]
    s4 = torch.load(out / "s4" / "last.pt", map_location="cpu", weights_only=False)["model"]
    convs = [k for k in s1 if k.endswith("weight") and s1[k].ndim == 4]
    for k in convs:
        torch.testing.assert_close(s2["model"][k], s1[k])
        torch.testing.assert_close(s4[k], s1[k])  # from s1, not from the stage before it
    assert any(not torch.equal(s3[k], s1[k]) for k in convs)
    capsys.readouterr()
    assert main(["--resume", *args]) == 0
    assert capsys.readouterr().out.count("already finished") == 4


@pytest.mark.parametrize(
    "stages, message",
    [
        ([{"epochs": 1}], "needs a name"),
        ([{"name": "a", "momentum": 0.9}], "may only set"),
        ([{"name": "a", "init": "previous"}], "init must be"),
        ([{"name": "a", "init": "b"}, {"name": "b"}], "init must be"),  # a later stage
        ([{"name": "a"}, {"name": "a"}], "unique"),
    ],
)
def test_train_config_bad_stages_are_refused(tmp_path: Path, stages: list, message: str) -> None:
    from wsi_nuclei.errors import DatasetError

    _write_dataset(tmp_path / "data", 2)
    (tmp_path / "cfg.json").write_text(
        json.dumps({"datasets": [{"name": "synth"}], "stages": stages})
    )
    with pytest.raises(DatasetError, match=message):
        main(
            [
                "--config",
                str(tmp_path / "cfg.json"),
                "--data-root",
                str(tmp_path / "data"),
                "--out",
                str(tmp_path / "r"),
                *_COMMON,
            ]
        )


def test_train_config_unknown_key_is_refused(tmp_path: Path) -> None:
    from wsi_nuclei.errors import DatasetError

    _write_dataset(tmp_path / "data", 2)
    (tmp_path / "cfg.json").write_text(json.dumps({"datasets": [{"name": "synth"}], "epochs": 3}))
    with pytest.raises(DatasetError, match="unknown training config keys"):
        main(
            [
                "--config",
                str(tmp_path / "cfg.json"),
                "--data-root",
                str(tmp_path / "data"),
                "--out",
                str(tmp_path / "r"),
                *_COMMON,
            ]
        )


@pytest.mark.parametrize("content", [None, "{not json", "[1, 2]"])
def test_train_config_unreadable_val_split_is_one_clear_error(
    tmp_path: Path, content: str | None
) -> None:
    """A config whose val_split file is missing or broken (e.g. a config copied to another
    folder: the path is relative to the config's own folder) is refused with one DatasetError
    that names the file, not an internal error."""
    from wsi_nuclei.errors import DatasetError

    _write_dataset(tmp_path / "data", 2)
    cfg = tmp_path / "elsewhere" / "cfg.json"
    cfg.parent.mkdir()
    cfg.write_text(json.dumps({"datasets": [{"name": "synth"}], "val_split": "split.json"}))
    if content is not None:
        (cfg.parent / "split.json").write_text(content)
    with pytest.raises(DatasetError, match="split"):
        main(
            [
                "--config",
                str(cfg),
                "--data-root",
                str(tmp_path / "data"),
                "--out",
                str(tmp_path / "r"),
                *_COMMON,
            ]
        )


def test_class_weight_scales_labelled_nucleus_pixels_only() -> None:
    # pixel 0: background; pixel 1: Inflammatory (2, labelled); pixel 2: unknown (31)
    logits = torch.zeros(1, 6, 1, 3)
    b = {"allowed": torch.tensor([[[0, 2, 31]]], dtype=torch.uint8), "mask": torch.ones(1, 1, 3)}
    # each pixel's nll under uniform logits: bg -log(1/6), inflammatory -log(1/6), unknown -log(5/6)
    nll = np.array([np.log(6), np.log(6), -np.log(5 / 6)])
    for w in (1.0, 3.0):
        weights = np.array([1, w, 1])
        got = float(
            partial_label_nll(logits, b["allowed"], b["mask"] * torch.tensor([[[1, w, 1]]]))
        )
        assert got == pytest.approx((nll * weights).sum() / weights.sum(), rel=1e-5)
    from wsi_nuclei.train.losses import _labelled_px

    assert _labelled_px(torch.tensor([0, 1, 2, 4, 17, 30, 31], dtype=torch.uint8)).tolist() == [
        False,
        True,
        True,
        True,
        True,
        False,
        False,
    ]


def test_hed_jitter_strength() -> None:
    """Strength 0 keeps the image (up to the HED round trip); larger strengths move it more."""
    from wsi_nuclei.demo import make_nuclei_image
    from wsi_nuclei.train._data import _hed_jitter

    img = make_nuclei_image(64, 64, seed=1)[0]
    same = _hed_jitter(img, np.random.default_rng(0), 0.0)
    assert np.abs(same.astype(int) - img).mean() < 1.5  # HED round trip and uint8 truncation only
    dev = [
        np.abs(_hed_jitter(img, np.random.default_rng(s), k).astype(int) - img).mean()
        for k in (0.05, 0.3)
        for s in range(5)
    ]
    assert np.mean(dev[5:]) > 2 * np.mean(dev[:5]) > 0


# --------------------------------------------------------------------------------------------
# point labels
# --------------------------------------------------------------------------------------------
def test_point_label_map_disks() -> None:
    lab = point_label_map(
        (10, 12), np.array([[2.0, 3.0], [11.0, 9.0]]), np.array([2, 17], np.uint8), 1.5
    )
    # radius 1.5: the 3x3 square around each point (corners at distance sqrt(2) <= 1.5), clipped
    want = np.zeros((10, 12), np.uint8)
    want[2:5, 1:4] = 2
    want[8:10, 10:12] = 17
    np.testing.assert_array_equal(lab, want)
    assert point_label_map((5, 5), np.zeros((0, 2)), np.zeros(0, np.uint8), 3).max() == 0


def _write_points_dataset(root: Path) -> Path:
    d = root / "pts"
    (d / "images").mkdir(parents=True)
    (d / "labels").mkdir()
    rgb, inst = _make_image(7)
    from scipy import ndimage as ndi

    c = np.asarray(ndi.center_of_mass(np.ones_like(inst), inst, np.arange(1, inst.max() + 1)))[
        :, ::-1
    ]
    n = len(c)
    Image.fromarray(rgb).save(d / "images" / "a.png")
    np.savez_compressed(
        d / "labels" / "a.npz",
        points=c.astype(np.float32),
        point_classes=np.full(n, 2, np.uint8),
        point_allowed=np.full(n, 2, np.uint8),
        point_source_class=np.full(n, 2, np.int16),
    )
    (d / "meta.json").write_text(
        json.dumps({"name": "pts", "annotation": "points", "images": {"a": {"mpp": 0.25}}})
    )
    return d


def test_point_items_train_the_class_head_only(tmp_path: Path) -> None:
    d = _write_points_dataset(tmp_path)
    items, weights, _ = _load_entries([DatasetEntry(d, 1.0, point_radius_um=1.0)], {}, 0.25)
    assert len(items) == 1 and not items[0].seg
    b = make_batch(items, weights, 2, 64, np.random.default_rng(0))
    assert float(b["mask"].sum()) == 0 and float(b["hv_on"].sum()) == 0  # no segmentation loss
    assert float(b["cls_mask"].sum()) > 0
    assert set(b["allowed"][b["cls_mask"].bool()].unique().tolist()) == {2}
    torch.manual_seed(0)
    out = {
        "np": torch.randn(2, 2, 64, 64, requires_grad=True),
        "hv": torch.randn(2, 2, 64, 64, requires_grad=True),
        "tp": torch.randn(2, 6, 64, 64, requires_grad=True),
    }
    total, parts = hovernet_loss(out, b)
    total.backward()
    assert float(out["np"].grad.abs().sum()) == 0 and float(out["hv"].grad.abs().sum()) == 0
    g = out["tp"].grad.abs().sum(1)
    assert float(g[~b["cls_mask"].bool()].sum()) == 0 and float(g[b["cls_mask"].bool()].sum()) > 0
    assert parts["tp_nll"] > 0


def test_training_validates_on_points(tmp_path: Path) -> None:
    _write_dataset(tmp_path / "data", 2)
    _write_points_dataset(tmp_path / "data")
    (tmp_path / "split.json").write_text(json.dumps({"synth": ["img1"], "pts": ["a"]}))
    (tmp_path / "cfg.json").write_text(
        json.dumps(
            {
                "datasets": [{"name": "synth"}, {"name": "pts", "weight": 0.5}],
                "val_split": "split.json",
            }
        )
    )
    out = tmp_path / "run"
    main(
        [
            "--config",
            str(tmp_path / "cfg.json"),
            "--data-root",
            str(tmp_path / "data"),
            "--out",
            str(out),
            "--epochs",
            "1",
            *_COMMON,
        ]
    )
    hist = json.loads((out / "history.json").read_text())
    assert {"synth/bPQ", "pts/det_f1"} <= set(hist[0]) and "pts/bPQ" not in hist[0]


def test_validation_score_weighs_segmentation_and_classes() -> None:
    from wsi_nuclei.train import validation_score

    assert validation_score({"a/bPQ": 0.5, "b/bPQ": 0.7}) == pytest.approx(0.6)
    assert validation_score(
        {"a/bPQ": 0.6, "a/cls_f1": 0.4, "c/cls_f1": float("nan")}
    ) == pytest.approx(0.5)
    assert validation_score({"p/cls_f1": 0.3}) == pytest.approx(0.3)


def test_shift_pairs_are_two_views_of_one_region(tmp_path: Path) -> None:
    from wsi_nuclei.train import SHIFT_MAX, shift_consistency_loss

    d = _write_dataset(tmp_path, 1)
    items, weights, _ = _load_entries([DatasetEntry(d, 1.0)], {}, 0.25)
    b = make_batch(items, weights, 3, 48, np.random.default_rng(1), shift_pairs=True)
    assert tuple(b["x"].shape) == (6, 3, 48, 48) and tuple(b["pair_shift"].shape) == (3, 2)
    for k, (dy, dx) in enumerate(b["pair_shift"].tolist()):
        assert 1 <= dy <= SHIFT_MAX and 1 <= dx <= SHIFT_MAX
        a, v = b["x"][2 * k], b["x"][2 * k + 1]
        torch.testing.assert_close(
            a[:, dy:, dx:], v[:, : 48 - dy, : 48 - dx]
        )  # same pixels, shifted
        torch.testing.assert_close(
            b["np"][2 * k][dy:, dx:], b["np"][2 * k + 1][: 48 - dy, : 48 - dx]
        )
    # maps that follow the shift exactly cost nothing; others do
    x = b["x"].mean(1, keepdim=True) / 255
    out = {"np": torch.cat([-x, x], 1), "hv": torch.cat([x, x], 1), "tp": torch.cat([x] * 6, 1)}
    assert float(shift_consistency_loss(out, b["pair_shift"])) == pytest.approx(0.0, abs=1e-7)
    out["np"] = out["np"] + torch.tensor([0.0, 1.0]).view(1, 2, 1, 1) * torch.linspace(
        0, 3, 48
    ).view(1, 1, 1, -1)  # position-dependent
    assert float(shift_consistency_loss(out, b["pair_shift"])) > 1e-4
    total, parts = hovernet_loss({"np": out["np"], "hv": out["hv"], "tp": out["tp"]}, b, 1.0, 20.0)
    assert "shift_cons" in parts and np.isfinite(float(total))


def test_shift_consistency_on_segmentation_maps_only_ignores_the_classes(tmp_path: Path) -> None:
    """--shift-seg-only: class maps that disagree between the views cost nothing, segmentation
    maps that disagree cost as much as with the classes included."""
    from wsi_nuclei.train import shift_consistency_loss

    d = _write_dataset(tmp_path, 1)
    items, weights, _ = _load_entries([DatasetEntry(d, 1.0)], {}, 0.25)
    b = make_batch(items, weights, 2, 48, np.random.default_rng(2), shift_pairs=True)
    x = b["x"].mean(1, keepdim=True) / 255
    ramp = torch.linspace(0, 3, 48).view(1, 1, 1, -1)  # depends on the position, not the tissue
    out = {
        "np": torch.cat([-x, x], 1),
        "hv": torch.cat([x, x], 1),
        "tp": torch.cat([x] * 5 + [ramp.expand_as(x)], 1),
    }
    assert float(shift_consistency_loss(out, b["pair_shift"])) > 1e-4  # the class maps disagree
    assert float(shift_consistency_loss(out, b["pair_shift"], classes=False)) == pytest.approx(
        0.0, abs=1e-7
    )
    _, with_cls = hovernet_loss(out, b, 1.0, 20.0)
    _, seg_only = hovernet_loss(out, b, 1.0, 20.0, shift_classes=False)
    assert with_cls["shift_cons"] > 1e-4 and seg_only["shift_cons"] == pytest.approx(0.0, abs=1e-7)
    out["hv"] = out["hv"] + ramp  # now the distance maps disagree too
    assert float(shift_consistency_loss(out, b["pair_shift"], classes=False)) > 1e-4


@pytest.mark.parametrize("native", [True, False])
def test_train_amp_on_the_cpu_is_bfloat16_where_native(
    tmp_path: Path, monkeypatch, capsys, native: bool
) -> None:
    """--amp on the CPU: the network runs under bfloat16 autocast where the CPU has it (the
    losses in float32), and plain float32 elsewhere (with one line saying so)."""
    import wsi_nuclei.models as models
    from wsi_nuclei.models.effunet import EffUNet

    monkeypatch.setattr(models, "cpu_has_native_bf16", lambda: native)
    seen: list[torch.dtype] = []
    orig = EffUNet.forward

    def spy(self, x):
        out = orig(self, x)
        if self.training:
            seen.append(out["np"].dtype)
        return out

    monkeypatch.setattr(EffUNet, "forward", spy)
    d = _write_dataset(tmp_path / "data", 2)
    out = tmp_path / "run"
    common = [a for a in _COMMON if a != "--quiet"]
    main(["--data", str(d), "--out", str(out), "--epochs", "1", "--amp", *common])
    assert seen == [torch.bfloat16 if native else torch.float32] * 2
    assert ("no native bfloat16" in capsys.readouterr().out) is not native
    ck = torch.load(out / "last.pt", map_location="cpu", weights_only=False)
    assert all(v.dtype != torch.bfloat16 for v in ck["model"].values())  # float32 weights
    assert all(math.isfinite(h["loss"]) for h in ck["history"])

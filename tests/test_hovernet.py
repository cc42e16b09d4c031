"""HoVer-Net "fast" (PanNuke): official checkpoint layout, verified loading, forward, fetch.

The real checkpoint is not needed: a random state dict with the official names and shapes is
written the way the official converter wrote ``hovernet_fast_pannuke_type_tf2pytorch.tar``
(``{"desc": state}``, legacy ``torch.save`` format, conv weights as transposed TensorFlow
arrays) and must load strictly.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from wsi_nuclei.errors import ModelError
from wsi_nuclei.models import InstanceResult, get_spec, load_model, sha256_file
from wsi_nuclei.models import fetch as fetch_mod
from wsi_nuclei.models.fetch import (
    HOVERNET_PANNUKE_SIZE,
    HOVERNET_PANNUKE_URL,
    default_cache_dir,
    fetch_weights,
)
from wsi_nuclei.models.hovernet.checkpoint import (
    load_hovernet_fast,
    load_official_checkpoint,
    official_state_dict_layout,
)
from wsi_nuclei.models.hovernet.net import HoVerNetFast, build_hovernet_fast
from wsi_nuclei.models.maps import MapModel

#: Keys/shapes read off the official source: vqdang/hover_net models/hovernet/net_desc.py
#: (HoVerNet, mode="fast": conv0 with key "/", ksize 3 decoder) and net_utils.py
#: (ResidualBlock "preact/bn", "conv1/bn"...; DenseBlock "preact_bna/bn", grouped conv2).
VERIFIED_SHAPES: dict[str, tuple[int, ...]] = {
    "conv0./.weight": (64, 3, 7, 7),
    "conv0.bn.running_var": (64,),
    "d0.units.0.conv1.weight": (64, 64, 1, 1),
    "d0.units.1.preact/bn.weight": (256,),
    "d0.shortcut.weight": (256, 64, 1, 1),
    "d1.units.0.conv2.weight": (128, 128, 3, 3),
    "d1.shortcut.weight": (512, 256, 1, 1),
    "d2.units.5.conv3.weight": (1024, 256, 1, 1),
    "d3.blk_bna.bn.running_mean": (2048,),
    "conv_bot.weight": (1024, 2048, 1, 1),
    "decoder.tp.u3.conva.weight": (256, 1024, 3, 3),
    "decoder.tp.u3.dense.units.0.preact_bna/bn.weight": (256,),
    "decoder.np.u3.dense.units.7.conv1.weight": (128, 480, 1, 1),
    "decoder.np.u3.dense.units.7.conv2.weight": (32, 32, 3, 3),
    "decoder.hv.u3.convf.weight": (512, 512, 1, 1),
    "decoder.hv.u2.dense.units.3.conv1/bn.running_mean": (128,),
    "decoder.hv.u2.dense.blk_bna.bn.weight": (256,),
    "decoder.np.u1.conva.weight": (64, 256, 3, 3),
    "decoder.tp.u0.bn.weight": (64,),
    "decoder.tp.u0.conv.weight": (6, 64, 1, 1),
    "decoder.tp.u0.conv.bias": (6,),
    "decoder.hv.u0.conv.weight": (2, 64, 1, 1),
    "upsample2x.unpool_mat": (2, 2),
}
#: Tensors in the official checkpoint: parameters + BN running stats + unpool_mat.
OFFICIAL_KEY_COUNT = 668


def _map_model(state: dict[str, torch.Tensor]) -> MapModel:
    """``hovernet-pannuke`` on the CPU with the weights of ``state``, as the registry builds it."""
    return MapModel(get_spec("hovernet-pannuke"), load_hovernet_fast(state), "cpu")


def _is_tf_conv(key: str) -> bool:
    """Conv weights the official converter transposed from TensorFlow's HWIO layout."""
    return ("conv" in key and "bn" not in key and "bias" not in key) or "shortcut" in key


def _random_official_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random, numerically sane tensors with the official names/shapes (converter-style)."""
    rng = np.random.default_rng(seed)
    state: dict[str, torch.Tensor] = {}
    for key, shape in official_state_dict_layout().items():
        if key == "upsample2x.unpool_mat":
            arr = np.ones(shape, np.float32)
        elif _is_tf_conv(key) and len(shape) == 4:
            c_out, c_in, kh, kw = shape
            hwio = rng.standard_normal((kh, kw, c_in, c_out), dtype=np.float32)
            hwio *= np.float32(np.sqrt(2.0 / (c_in * kh * kw)))
            arr = np.transpose(hwio, [3, 2, 0, 1])  # non-contiguous, as in the official file
        elif key.endswith("running_var"):
            arr = rng.uniform(0.5, 1.5, shape).astype(np.float32)
        elif key.endswith("running_mean"):
            arr = (0.1 * rng.standard_normal(shape)).astype(np.float32)
        elif key.endswith("weight"):
            arr = (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        else:
            arr = (0.1 * rng.standard_normal(shape)).astype(np.float32)
        state[key] = torch.from_numpy(arr)
    return state


def _cheap_state(**changes: tuple[int, ...] | None) -> dict[str, torch.Tensor]:
    """Layout-shaped tensors backed by one element (files stay tiny); None drops a key."""
    state = {k: torch.ones(()).expand(shape) for k, shape in official_state_dict_layout().items()}
    for key, shape in changes.items():
        if shape is None:
            del state[key]
        else:
            state[key] = torch.ones(()).expand(shape)
    return state


@pytest.fixture(scope="module")
def official_like(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A random checkpoint in the official container layout, and its sha256."""
    path = tmp_path_factory.mktemp("weights") / "hovernet_fast_pannuke_type_tf2pytorch.tar"
    torch.save({"desc": _random_official_state()}, path, _use_new_zipfile_serialization=False)
    return path, sha256_file(path)


# ---------------------------------------------------------------------------------------
# Layout
# ---------------------------------------------------------------------------------------
def test_layout_has_official_names_and_shapes() -> None:
    layout = official_state_dict_layout()
    assert len(layout) == OFFICIAL_KEY_COUNT
    for key, shape in VERIFIED_SHAPES.items():
        assert layout[key] == shape, key
    assert not any(k.endswith("num_batches_tracked") for k in layout)
    assert {k.split(".")[0] for k in layout} == {
        "conv0",
        "d0",
        "d1",
        "d2",
        "d3",
        "conv_bot",
        "decoder",
        "upsample2x",
    }
    assert {k.split(".")[1] for k in layout if k.startswith("decoder.")} == {"tp", "np", "hv"}
    # The module's own state dict is the layout plus one counter per batch norm.
    model_keys = list(build_hovernet_fast().state_dict())
    assert [k for k in model_keys if not k.endswith("num_batches_tracked")] == list(layout)
    seg_only = official_state_dict_layout(None)
    assert not any(k.startswith("decoder.tp.") for k in seg_only)


def test_official_container_reproduces_published_file_size(
    official_like: tuple[Path, str],
) -> None:
    """Saved like the official converter did, our layout is byte-for-byte the published size.

    The legacy pickle records every key name and tensor shape/stride, so an equal size is a
    strong check that names and shapes match the real 150,996,114-byte checkpoint.
    """
    path, _ = official_like
    assert path.stat().st_size == HOVERNET_PANNUKE_SIZE


# ---------------------------------------------------------------------------------------
# Loading and forward
# ---------------------------------------------------------------------------------------
def test_load_strict_and_forward(official_like: tuple[Path, str]) -> None:
    path, sha = official_like
    state = load_official_checkpoint(path, expected_sha256=sha)
    keys = build_hovernet_fast(6).load_state_dict(state, strict=True)
    assert not keys.missing_keys and not keys.unexpected_keys
    net = _map_model(state)  # strict load (assign) inside
    loaded = net.net.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())
    assert not any(t.is_meta for t in loaded.values())
    del state, loaded
    assert net.spec.input_size == 256 and net.spec.output_size == 164
    assert net.spec.mpp == pytest.approx(0.25)

    rng = np.random.default_rng(1)
    batch = rng.integers(0, 256, size=(1, 256, 256, 3), dtype=np.uint8)
    raws = net.infer(batch)
    assert len(raws) == 1
    raw = raws[0]
    assert raw["np"].shape == (164, 164)
    assert raw["hv"].shape == (2, 164, 164)
    assert raw["tp"].shape == (6, 164, 164)
    for arr in raw.values():
        assert arr.dtype == np.float32 and np.isfinite(arr).all()
    assert raw["np"].min() >= 0.0 and raw["np"].max() <= 1.0
    np.testing.assert_allclose(raw["tp"].sum(axis=0), 1.0, atol=1e-5)
    assert net.infer(batch[:0]) == []

    # The shared HV post-processing, if present, turns the maps into a 164 x 164 result.
    if importlib.util.find_spec("wsi_nuclei.postprocess") is not None:
        result = net.postprocess(raw)
        assert isinstance(result, InstanceResult)
        assert result.inst.shape == (164, 164)
        assert len(result.labels) == len(result.class_id) == len(result.class_prob)


def test_module_prefix_and_counters_accepted(tmp_path: Path) -> None:
    state = {"module." + k: v for k, v in _cheap_state().items()}
    state["module.conv0.bn.num_batches_tracked"] = torch.tensor(7)
    path = tmp_path / "dp.tar"
    torch.save({"desc": state}, path)
    loaded = load_official_checkpoint(path, expected_sha256=None)
    assert "conv0./.weight" in loaded
    assert int(loaded["conv0.bn.num_batches_tracked"]) == 7
    assert int(loaded["d0.blk_bna.bn.num_batches_tracked"]) == 0
    with torch.device("meta"):
        assert list(loaded) == list(HoVerNetFast().state_dict())


def test_bad_sha_refused_before_unpickling(
    official_like: tuple[Path, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    path, _ = official_like

    def _no_load(*args: object, **kwargs: object) -> None:
        raise AssertionError("torch.load must not run before the hash is verified")

    monkeypatch.setattr(torch, "load", _no_load)
    with pytest.raises(ModelError, match="sha256 mismatch"):
        load_official_checkpoint(path, expected_sha256="0" * 64)
    # With the official hash (the default) the size is checked even before hashing.
    with pytest.raises(ModelError, match="expected 150996114 .*sha256 mismatch"):
        load_official_checkpoint(_truncated(path))


def _truncated(src: Path) -> Path:
    dst = src.with_name("truncated.tar")
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        fout.write(fin.read(1 << 20))
    return dst


def test_truncated_and_random_files_refused(
    official_like: tuple[Path, str], tmp_path: Path
) -> None:
    path, sha = official_like
    short = _truncated(path)
    with pytest.raises(ModelError, match="sha256 mismatch"):
        load_official_checkpoint(short, expected_sha256=sha)
    with pytest.raises(ModelError, match="cannot read weights file"):
        load_official_checkpoint(short, expected_sha256=None)
    junk = tmp_path / "junk.tar"
    junk.write_bytes(os.urandom(4096))
    with pytest.raises(ModelError, match="cannot read weights file"):
        load_official_checkpoint(junk, expected_sha256=None)
    with pytest.raises(ModelError, match="not found"):
        load_official_checkpoint(tmp_path / "nope.tar", expected_sha256=None)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"decoder.np.u3.dense.units.3.conv2.weight": None}, "1 missing keys"),
        (
            {"decoder.tp.u0.conv.weight": (5, 64, 1, 1), "decoder.tp.u0.conv.bias": (5,)},
            "type head has 5 channels",
        ),
        ({"d1.units.0.conv2.weight": (128, 128, 5, 5)}, "wrong shape"),
        ({"extra.weight": (3,)}, "unexpected keys"),
    ],
)
def test_mismatching_state_dict_refused(
    tmp_path: Path, changes: dict[str, tuple[int, ...] | None], message: str
) -> None:
    path = tmp_path / "bad.tar"
    torch.save({"desc": _cheap_state(**changes)}, path)
    with pytest.raises(ModelError, match=message) as info:
        load_official_checkpoint(path, expected_sha256=sha256_file(path))
    assert "\n" not in str(info.value)


def test_segmentation_only_checkpoint_refused(tmp_path: Path) -> None:
    state = {k: v for k, v in _cheap_state().items() if not k.startswith("decoder.tp.")}
    path = tmp_path / "seg.tar"
    torch.save(state, path)  # bare state dict, no container
    with pytest.raises(ModelError, match="no type branch"):
        load_official_checkpoint(path, expected_sha256=None)


def test_non_finite_and_bad_unpool_refused(tmp_path: Path) -> None:
    state = _cheap_state()
    state["conv_bot.weight"] = torch.full((1024, 2048, 1, 1), float("nan"))
    path = tmp_path / "nan.tar"
    torch.save({"desc": state}, path)
    with pytest.raises(ModelError, match="non-finite"):
        load_official_checkpoint(path, expected_sha256=None)
    state = _cheap_state()
    state["upsample2x.unpool_mat"] = torch.zeros(2, 2)
    torch.save({"desc": state}, path)
    with pytest.raises(ModelError, match="unpool_mat"):
        load_official_checkpoint(path, expected_sha256=None)


# ---------------------------------------------------------------------------------------
# NucleusModel wrapper
# ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cheap_model() -> MapModel:
    return _map_model(_cheap_state())


def test_postprocess_delegates_to_hv_to_instances(
    cheap_model: MapModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    expected = get_spec("hovernet-pannuke").hv_params()  # HoVer-Net's default thresholds
    calls = []
    sentinel = InstanceResult(
        inst=np.zeros((164, 164), np.int32),
        labels=np.zeros(0, np.int32),
        class_id=np.zeros(0, np.int8),
        class_prob=np.zeros(0, np.float32),
        class_probs=np.zeros((0, 5), np.float32),
    )

    def _stub(np_prob, hv, tp_prob=None, params=None):  # type: ignore[no-untyped-def]
        calls.append((np_prob, hv, tp_prob, params))
        return sentinel

    stub = types.ModuleType("wsi_nuclei.postprocess")
    stub.hv_to_instances = _stub  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "wsi_nuclei.postprocess", stub)
    raw = {
        "np": np.zeros((164, 164), np.float32),
        "hv": np.zeros((2, 164, 164), np.float32),
        "tp": np.zeros((6, 164, 164), np.float32),
    }
    assert cheap_model.postprocess(raw) is sentinel
    ((np_prob, hv, tp_prob, params),) = calls
    assert np_prob is raw["np"] and hv is raw["hv"] and tp_prob is raw["tp"]
    assert params == expected


def test_infer_small_tiles(cheap_model: MapModel) -> None:
    """Any side that is a multiple of 8 (>= 96) works; the output is the input minus 92."""
    raws = cheap_model.infer(np.full((2, 96, 104, 3), 200, np.uint8))
    assert [sorted(r) for r in raws] == [["hv", "np", "tp"]] * 2
    assert [r["tp"].shape for r in raws] == [(6, 4, 12)] * 2


def test_registry_builds_hovernet(tmp_path: Path) -> None:
    """``load_model`` -> the hovernet builder -> :func:`load_hovernet_fast` in a :class:`MapModel`."""
    path = tmp_path / "user.tar"
    state = {"module." + k: v for k, v in _cheap_state().items()}
    state["module.conv0.bn.num_batches_tracked"] = torch.tensor(7)
    torch.save({"desc": state}, path)
    model = load_model("hovernet-pannuke", weights=path, device="cpu")
    assert isinstance(model, MapModel)
    assert not model.hv_tanh and not model.channels_last  # the official model runs as published
    assert int(model.net.state_dict()["conv0.bn.num_batches_tracked"]) == 7
    assert (model.spec.name, model.spec.input_size, model.spec.output_size) == (
        "hovernet-pannuke",
        256,
        164,
    )


def test_infer_rejects_bad_batches(cheap_model: MapModel) -> None:
    with pytest.raises(ValueError, match="uint8"):
        cheap_model.infer(np.zeros((1, 256, 256, 3), np.float32))
    with pytest.raises(ValueError, match="multiple of 8"):
        cheap_model.infer(np.zeros((1, 250, 256, 3), np.uint8))


def test_missing_weights_says_how_to_fetch(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("WSI_NUCLEI_HOME", str(tmp_path))  # an empty cache
    with pytest.raises(ModelError, match="models fetch"):
        load_model("hovernet-pannuke", device="cpu")


# ---------------------------------------------------------------------------------------
# fetch
# ---------------------------------------------------------------------------------------
def test_fetch_file_url(tmp_path: Path) -> None:
    src = tmp_path / "src.bin"
    payload = os.urandom(3 * (1 << 20) + 17)
    src.write_bytes(payload)
    sha = hashlib.sha256(payload).hexdigest()
    dest = tmp_path / "cache" / "sub" / "weights.tar"
    seen: list[tuple[int, int | None]] = []
    out = fetch_weights(src.as_uri(), dest, sha.upper(), progress=lambda d, t: seen.append((d, t)))
    assert out == dest and dest.read_bytes() == payload
    assert seen[-1] == (len(payload), len(payload))
    assert [p.name for p in dest.parent.iterdir()] == ["weights.tar"]  # no temporary left
    # Already there and verified: no network needed.
    assert fetch_weights("http://127.0.0.1:9/never", dest, sha) == dest


def test_fetch_sha_mismatch_leaves_nothing(tmp_path: Path) -> None:
    src = tmp_path / "src.bin"
    src.write_bytes(b"not the weights")
    dest = tmp_path / "cache" / "weights.tar"
    with pytest.raises(ModelError, match="sha256 mismatch"):
        fetch_weights(src.as_uri(), dest, "0" * 64)
    assert list(dest.parent.iterdir()) == []


def test_fetch_unreachable_fails_fast(tmp_path: Path) -> None:
    dest = tmp_path / "weights.tar"
    start = time.monotonic()
    with pytest.raises(ModelError, match="offline or unreachable") as info:
        fetch_weights("http://127.0.0.1:9/x", dest, "0" * 64, timeout=5)
    assert time.monotonic() - start < 10
    message = str(info.value)
    assert "--weights PATH" in message and str(dest) in message and "\n" not in message
    assert not dest.exists()
    with pytest.raises(ModelError, match="offline or unreachable"):
        fetch_weights((tmp_path / "absent.bin").as_uri(), dest, "0" * 64)


def test_fetch_html_page_refused(tmp_path: Path) -> None:
    page = tmp_path / "confirm.html"
    page.write_text("<html>virus scan warning</html>")
    with pytest.raises(ModelError, match="web page"):
        fetch_weights(page.as_uri(), tmp_path / "w.tar", "0" * 64)


def test_cache_dir_and_url(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("WSI_NUCLEI_HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home"
    assert fetch_mod.default_weights_path() == (
        tmp_path / "home" / "hovernet_fast_pannuke_type_tf2pytorch.tar"
    )
    monkeypatch.delenv("WSI_NUCLEI_HOME")
    assert default_cache_dir() == Path.home() / ".cache" / "wsi-nuclei"
    assert "1SbSArI3KOOWHxRlxnjchO7_MbWzB4lNR" in HOVERNET_PANNUKE_URL
    with pytest.raises(ModelError, match="unknown weights"):
        fetch_mod.default_weights_path("nope")

"""HoVer-Net "fast" with the official PanNuke checkpoint.

The network is a re-implementation of the "fast" mode of HoVer-Net (Graham et al., Medical
Image Analysis 2019) whose module tree reproduces the parameter names and shapes of the
official PyTorch port, so that the published checkpoint
``hovernet_fast_pannuke_type_tf2pytorch.tar`` loads with ``strict=True``:

* input 256 x 256 RGB (uint8 values; the network divides by 255 itself), output the central
  164 x 164 window (in general: ``input - 92`` for any input side that is a multiple of 8);
* encoder: a 7x7 stem with TensorFlow-style "same" padding, then four pre-activation
  ResNet-50 stages (3, 4, 6, 3 bottleneck units; the strided 3x3 convolutions pad like
  TensorFlow's "same", i.e. asymmetrically), then a 1x1 bottleneck ``conv_bot`` to 1024
  channels;
* three decoder branches ``tp`` (nuclear type, 6 logits = background + 5 PanNuke classes),
  ``np`` (nucleus vs background, 2 logits) and ``hv`` (horizontal/vertical distance maps).
  Each upsamples by nearest-neighbour x2, adds the (centre-cropped) encoder feature of the
  same scale and applies "valid" 3x3 convolutions and a dense block with grouped convolutions
  whose running features are centre-cropped to the new features before concatenation;
* all batch norms use eps = 1e-5.

Naming: PyTorch names sub-modules after the TensorFlow scopes of the original code, so keys
contain slashes, e.g. ``conv0./.weight`` or ``d0.units.1.preact/bn.running_var``. The
checkpoint stores parameters, running statistics and the constant ``upsample2x.unpool_mat``
(a 2x2 matrix of ones) but not the batch-norm ``num_batches_tracked`` counters; those are
added by :func:`load_official_checkpoint`.

The model expects input at 0.25 µm/px (40x), the resolution of PanNuke.
"""

from __future__ import annotations

import functools
import os
import warnings
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from wsi_nuclei.errors import ModelError
from wsi_nuclei.models.base import InstanceResult
from wsi_nuclei.models.fetch import (
    HOVERNET_PANNUKE_FILENAME,
    HOVERNET_PANNUKE_LICENCE,
    HOVERNET_PANNUKE_NAME,
    HOVERNET_PANNUKE_SHA256,
    HOVERNET_PANNUKE_SIZE,
    sha256_file,
)
from wsi_nuclei.schema import CLASS_NAMES

__all__ = [
    "HOVERNET_MPP",
    "HOVERNET_INPUT_SIZE",
    "HOVERNET_OUTPUT_SIZE",
    "PANNUKE_NR_TYPES",
    "HoVerNetFast",
    "HoVerNetPanNuke",
    "HoVerNetSpec",
    "build_hovernet_fast",
    "load_official_checkpoint",
    "official_state_dict_layout",
]

#: Resolution the PanNuke checkpoint was trained at (40x).
HOVERNET_MPP: Final[float] = 0.25
#: Tile side the "fast" model is run on.
HOVERNET_INPUT_SIZE: Final[int] = 256
#: Side of the central window it predicts (``input - 92``).
HOVERNET_OUTPUT_SIZE: Final[int] = 164
#: Type channels of the PanNuke head: background + 5 PanNuke classes (ids 1..5 in order).
PANNUKE_NR_TYPES: Final[int] = 6

_BN_EPS: Final[float] = 1e-5
#: How much is trimmed from the full-resolution / half-resolution encoder features before
#: they are added to the decoder (fixed by the valid convolutions of the decoder).
_SKIP0_TRIM: Final[int] = 92
_SKIP1_TRIM: Final[int] = 36
#: Input sides must be multiples of this (three stride-2 stages).
_SIZE_MULTIPLE: Final[int] = 8
#: Smallest input side for which every valid convolution still has something left.
_MIN_INPUT: Final[int] = 96
_BATCHES_TRACKED: Final[str] = "num_batches_tracked"
_UNPOOL_KEY: Final[str] = "upsample2x.unpool_mat"


# --------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------
class _TFSamePad(nn.Module):
    """Zero padding that reproduces TensorFlow's ``padding="same"`` for a square kernel.

    For stride 1 this is symmetric; for stride 2 on an even side, TensorFlow puts the single
    padding row/column at the bottom/right, which symmetric PyTorch padding cannot express.
    """

    def __init__(self, ksize: int, stride: int = 1) -> None:
        super().__init__()
        self.ksize = ksize
        self.stride = stride

    def _amount(self, size: int) -> tuple[int, int]:
        rem = size % self.stride
        total = max(self.ksize - (self.stride if rem == 0 else rem), 0)
        return total // 2, total - total // 2

    def forward(self, x: Tensor) -> Tensor:
        """Pad the last two dimensions of ``x`` (NCHW)."""
        left, right = self._amount(x.shape[-1])
        top, bottom = self._amount(x.shape[-2])
        if left == right == top == bottom == 0:
            return x
        return F.pad(x, (left, right, top, bottom))

    def extra_repr(self) -> str:
        return f"ksize={self.ksize}, stride={self.stride}"


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=_BN_EPS)


def _conv(c_in: int, c_out: int, ksize: int, *, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    """Bias-free convolution without implicit padding (padding is explicit where needed)."""
    return nn.Conv2d(c_in, c_out, ksize, stride=stride, padding=0, groups=groups, bias=False)


def _center_crop(x: Tensor, height: int, width: int) -> Tensor:
    """Central ``height`` x ``width`` window of ``x`` (NCHW); extra odd pixel goes bottom/right."""
    top = (x.shape[-2] - height) // 2
    left = (x.shape[-1] - width) // 2
    return x[..., top : top + height, left : left + width]


class _ResidualStage(nn.Module):
    """Pre-activation bottleneck stage (ResNet-50 v2 style) with TF "same" padding.

    Every unit is ``[BN-ReLU] 1x1 -> BN-ReLU -> pad -> 3x3 (stride on the first unit) ->
    BN-ReLU -> 1x1``, added to the running shortcut. The first unit has no pre-activation:
    its input already went through the previous stage's closing BN-ReLU (``blk_bna``).
    """

    def __init__(self, c_in: int, c_mid: int, c_out: int, count: int, stride: int = 1) -> None:
        super().__init__()
        self.units = nn.ModuleList()
        unit_in = c_in
        for idx in range(count):
            unit_stride = stride if idx == 0 else 1
            layers: list[tuple[str, nn.Module]] = []
            if idx > 0:
                layers += [("preact/bn", _bn(unit_in)), ("preact/relu", nn.ReLU(inplace=True))]
            layers += [
                ("conv1", _conv(unit_in, c_mid, 1)),
                ("conv1/bn", _bn(c_mid)),
                ("conv1/relu", nn.ReLU(inplace=True)),
                ("conv2/pad", _TFSamePad(3, unit_stride)),
                ("conv2", _conv(c_mid, c_mid, 3, stride=unit_stride)),
                ("conv2/bn", _bn(c_mid)),
                ("conv2/relu", nn.ReLU(inplace=True)),
                ("conv3", _conv(c_mid, c_out, 1)),
            ]
            self.units.append(nn.Sequential(OrderedDict(layers)))
            unit_in = c_out
        self.shortcut: nn.Module | None = (
            _conv(c_in, c_out, 1, stride=stride) if (c_in != c_out or stride != 1) else None
        )
        self.blk_bna = nn.Sequential(
            OrderedDict([("bn", _bn(c_out)), ("relu", nn.ReLU(inplace=True))])
        )

    def forward(self, x: Tensor) -> Tensor:
        """Apply the stage to ``x`` (NCHW)."""
        skip = x if self.shortcut is None else self.shortcut(x)
        feat = x
        for unit in self.units:
            feat = unit(feat) + skip
            skip = feat
        return self.blk_bna(feat)


class _DenseBlock(nn.Module):
    """Dense block of "valid" units: ``BN-ReLU 1x1 -> BN-ReLU ksize (grouped)``.

    Each unit adds ``growth`` channels; the accumulated features are centre-cropped to the
    (smaller) spatial size of the new features before concatenation. Closes with BN-ReLU.
    """

    def __init__(
        self,
        c_in: int,
        ksize: int,
        count: int,
        *,
        c_mid: int = 128,
        growth: int = 32,
        groups: int = 4,
    ) -> None:
        super().__init__()
        self.units = nn.ModuleList()
        unit_in = c_in
        for _ in range(count):
            self.units.append(
                nn.Sequential(
                    OrderedDict(
                        [
                            ("preact_bna/bn", _bn(unit_in)),
                            ("preact_bna/relu", nn.ReLU(inplace=True)),
                            ("conv1", _conv(unit_in, c_mid, 1)),
                            ("conv1/bn", _bn(c_mid)),
                            ("conv1/relu", nn.ReLU(inplace=True)),
                            ("conv2", _conv(c_mid, growth, ksize, groups=groups)),
                        ]
                    )
                )
            )
            unit_in += growth
        self.out_channels = unit_in
        self.blk_bna = nn.Sequential(
            OrderedDict([("bn", _bn(unit_in)), ("relu", nn.ReLU(inplace=True))])
        )

    def forward(self, x: Tensor) -> Tensor:
        """Apply the block to ``x`` (NCHW); output is smaller by ``count * (ksize - 1)``."""
        feat = x
        for unit in self.units:
            new = unit(feat)
            feat = torch.cat([_center_crop(feat, new.shape[-2], new.shape[-1]), new], dim=1)
        return self.blk_bna(feat)


class _Upsample2x(nn.Module):
    """Nearest-neighbour x2 upsampling.

    The original ("fixed unpooling" with a 2x2 matrix of ones) stores that matrix as a buffer
    named ``unpool_mat``; it is kept here so that checkpoint keys match. Multiplying by a
    matrix of ones is exactly nearest-neighbour upsampling, which is what is computed;
    :func:`load_official_checkpoint` refuses a checkpoint whose matrix is not all ones.
    """

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("unpool_mat", torch.ones(2, 2, dtype=torch.float32))

    def forward(self, x: Tensor) -> Tensor:
        """Upsample the last two dimensions of ``x`` (NCHW) by 2."""
        return F.interpolate(x, scale_factor=2.0, mode="nearest")


def _decoder_branch(out_ch: int, ksize: int = 3) -> nn.Sequential:
    """One decoder branch: ``u3`` (at 1/4), ``u2`` (at 1/2), ``u1`` and the head ``u0``."""
    u3 = nn.Sequential(
        OrderedDict(
            [
                ("conva", _conv(1024, 256, ksize)),
                ("dense", _DenseBlock(256, ksize, 8)),
                ("convf", _conv(512, 512, 1)),
            ]
        )
    )
    u2 = nn.Sequential(
        OrderedDict(
            [
                ("conva", _conv(512, 128, ksize)),
                ("dense", _DenseBlock(128, ksize, 4)),
                ("convf", _conv(256, 256, 1)),
            ]
        )
    )
    u1 = nn.Sequential(
        OrderedDict([("conva/pad", _TFSamePad(ksize, 1)), ("conva", _conv(256, 64, ksize))])
    )
    u0 = nn.Sequential(
        OrderedDict(
            [
                ("bn", _bn(64)),
                ("relu", nn.ReLU(inplace=True)),
                ("conv", nn.Conv2d(64, out_ch, 1, stride=1, padding=0, bias=True)),
            ]
        )
    )
    return nn.Sequential(OrderedDict([("u3", u3), ("u2", u2), ("u1", u1), ("u0", u0)]))


class HoVerNetFast(nn.Module):
    """HoVer-Net in "fast" mode (256 in, 164 out), official module names.

    Parameters
    ----------
    nr_types : int or None
        Channels of the type head (6 for PanNuke: background + 5 classes). ``None`` or 0
        builds the segmentation-only network (branches ``np`` and ``hv``).

    Notes
    -----
    :meth:`forward` takes NCHW images with values in 0..255 (uint8 or float) and returns a
    dict of logits/maps ``{"tp": (N, nr_types, h, w), "np": (N, 2, h, w),
    "hv": (N, 2, h, w)}`` with ``h = H - 92``; channel 0 of ``hv`` is the horizontal (x)
    map, channel 1 the vertical (y) map. ``H`` and ``W`` must be multiples of 8.
    """

    def __init__(self, nr_types: int | None = PANNUKE_NR_TYPES) -> None:
        super().__init__()
        self.nr_types = nr_types or None
        self.conv0 = nn.Sequential(
            OrderedDict(
                [
                    ("pad", _TFSamePad(7, 1)),
                    ("/", _conv(3, 64, 7)),
                    ("bn", _bn(64)),
                    ("relu", nn.ReLU(inplace=True)),
                ]
            )
        )
        self.d0 = _ResidualStage(64, 64, 256, 3, stride=1)
        self.d1 = _ResidualStage(256, 128, 512, 4, stride=2)
        self.d2 = _ResidualStage(512, 256, 1024, 6, stride=2)
        self.d3 = _ResidualStage(1024, 512, 2048, 3, stride=2)
        self.conv_bot = _conv(2048, 1024, 1)
        branches: list[tuple[str, nn.Module]] = []
        if self.nr_types is not None:
            branches.append(("tp", _decoder_branch(self.nr_types)))
        branches += [("np", _decoder_branch(2)), ("hv", _decoder_branch(2))]
        self.decoder = nn.ModuleDict(OrderedDict(branches))
        self.upsample2x = _Upsample2x()

    def forward(self, imgs: Tensor) -> dict[str, Tensor]:
        """Run the network on NCHW images in 0..255; see the class notes for the outputs."""
        x = imgs / 255.0 if imgs.is_floating_point() else imgs.float() / 255.0
        d0 = self.d0(self.conv0(x))
        d1 = self.d1(d0)
        d2 = self.d2(d1)
        d3 = self.conv_bot(self.d3(d2))
        skip0 = _center_crop(d0, d0.shape[-2] - _SKIP0_TRIM, d0.shape[-1] - _SKIP0_TRIM)
        skip1 = _center_crop(d1, d1.shape[-2] - _SKIP1_TRIM, d1.shape[-1] - _SKIP1_TRIM)
        up3 = self.upsample2x(d3)
        out: dict[str, Tensor] = OrderedDict()
        for name, branch in self.decoder.items():
            u3 = branch.u3(up3 + d2)
            u2 = branch.u2(self.upsample2x(u3) + skip1)
            u1 = branch.u1(self.upsample2x(u2) + skip0)
            out[name] = branch.u0(u1)
        return out


def _init_weights(module: nn.Module) -> None:
    """He-normal (fan-out) convolutions, unit batch norms: a sane start for fine-tuning."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def build_hovernet_fast(nr_types: int | None = PANNUKE_NR_TYPES) -> HoVerNetFast:
    """Build HoVer-Net "fast" with freshly initialised weights.

    Parameters
    ----------
    nr_types : int or None
        Type-head channels (6 for PanNuke); ``None``/0 for segmentation only.

    Returns
    -------
    HoVerNetFast
        The network (in training mode, on the default device), whose ``state_dict`` keys
        and shapes are those of the official implementation.
    """
    model = HoVerNetFast(nr_types)
    _init_weights(model)
    return model


@functools.lru_cache(maxsize=4)
def _layout(nr_types: int | None) -> tuple[tuple[str, tuple[int, ...]], ...]:
    with torch.device("meta"):
        model = HoVerNetFast(nr_types)
    return tuple(
        (key, tuple(value.shape))
        for key, value in model.state_dict().items()
        if not key.endswith(_BATCHES_TRACKED)
    )


def official_state_dict_layout(
    nr_types: int | None = PANNUKE_NR_TYPES,
) -> dict[str, tuple[int, ...]]:
    """Keys and shapes stored in an official HoVer-Net "fast" checkpoint.

    Parameters
    ----------
    nr_types : int or None
        Type-head channels (6 for PanNuke); ``None``/0 for segmentation only.

    Returns
    -------
    dict of str to tuple of int
        Every parameter, running statistic and the ``upsample2x.unpool_mat`` buffer, in
        module order. Batch-norm ``num_batches_tracked`` counters are not listed: the
        official checkpoints do not store them (the loader accepts and fills them).
    """
    return dict(_layout(nr_types or None))


# --------------------------------------------------------------------------------------
# Checkpoint loading
# --------------------------------------------------------------------------------------
def load_official_checkpoint(
    path: str | os.PathLike[str],
    *,
    expected_sha256: str | None = HOVERNET_PANNUKE_SHA256,
    expected_size: int | None = None,
    nr_types: int | None = PANNUKE_NR_TYPES,
) -> dict[str, Tensor]:
    """Verify and load a HoVer-Net "fast" checkpoint into a strict-loadable state dict.

    Parameters
    ----------
    path : str or PathLike
        The ``.tar`` file (a ``torch.save``'d dict holding the state dict under ``"desc"``,
        as published), or a plain ``torch.save(model.state_dict())`` re-export.
    expected_sha256 : str or None
        SHA-256 the file must have, checked (streaming) before anything is unpickled.
        Defaults to the official PanNuke checkpoint; ``None`` skips the check (for your own
        re-exports).
    expected_size : int or None
        Size in bytes the file must have, checked first. Defaults to the official size when
        ``expected_sha256`` is the official hash, else unchecked.
    nr_types : int or None
        Type-head channels the checkpoint must have (6 for PanNuke).

    Returns
    -------
    dict of str to Tensor
        Contiguous CPU tensors (floating ones as float32) keyed exactly like
        ``build_hovernet_fast(nr_types).state_dict()`` (``module.`` prefixes removed,
        missing ``num_batches_tracked`` counters added), ready for
        ``model.load_state_dict(sd, strict=True)``.

    Raises
    ------
    ModelError
        If the file is missing, has the wrong size or sha256, cannot be read as a
        PyTorch checkpoint, or its keys/shapes/values do not fit the network.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise ModelError(
            f"weights file not found: {path} (run `wsi-nuclei models fetch "
            f"{HOVERNET_PANNUKE_NAME}` or pass --weights PATH)"
        )
    if expected_size is None and expected_sha256 is not None:
        if expected_sha256.strip().lower() == HOVERNET_PANNUKE_SHA256:
            expected_size = HOVERNET_PANNUKE_SIZE
    if expected_size is not None:
        size = path.stat().st_size
        if size != expected_size:
            raise ModelError(
                f"weights file {path} has {size} bytes, expected {expected_size} "
                "(incomplete download or a different file; sha256 mismatch)"
            )
    if expected_sha256 is not None:
        got = sha256_file(path)
        want = expected_sha256.strip().lower()
        if got != want:
            raise ModelError(
                f"weights file {path}: sha256 mismatch (got {got}, expected {want}); "
                "re-download it, or skip the check for a checkpoint you exported yourself"
            )
    try:
        with warnings.catch_warnings():
            # The official file uses torch's legacy (non-zip) format, for which the
            # weights-only unpickler warns about an unusual "pickle protocol"; it loads fine.
            # Any other warning would add lines to the one-line error of a bad file.
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means "not a checkpoint"
        # torch's own message spans paragraphs and is mostly advice about weights_only.
        raise ModelError(
            f"cannot read weights file {path}: not a PyTorch checkpoint of plain tensors, "
            f"or corrupt ({type(exc).__name__})"
        ) from None
    state = _unwrap_state_dict(obj, path)
    return _conform_state_dict(state, path, nr_types or None)


def _first_line(exc: BaseException, limit: int = 160) -> str:
    text = str(exc).strip().splitlines()
    line = text[0] if text else type(exc).__name__
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _unwrap_state_dict(obj: Any, path: Path) -> dict[str, Tensor]:
    """Find the state dict in a loaded checkpoint container."""
    for key in ("desc", "state_dict", "model"):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping) or not obj:
        raise ModelError(
            f"weights file {path} holds no state dict (expected a dict with key 'desc')"
        )
    if not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items()):
        raise ModelError(f"weights file {path} is not a state dict of named tensors")
    state = dict(obj)
    if all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def _conform_state_dict(
    state: dict[str, Tensor], path: Path, nr_types: int | None
) -> dict[str, Tensor]:
    """Check ``state`` against the layout; return it in module order, counters filled in."""
    layout = official_state_dict_layout(nr_types)
    missing = [k for k in layout if k not in state]
    unexpected = [k for k in state if k not in layout and not _is_counter(k, layout)]
    wrong = [k for k, shape in layout.items() if k in state and tuple(state[k].shape) != shape]
    if missing or unexpected or wrong:
        raise ModelError(
            f"weights file {path} does not fit {_describe(nr_types)}: "
            + _mismatch_summary(state, layout, missing, unexpected, wrong)
        )
    unpool = state.get(_UNPOOL_KEY)
    if unpool is not None and not bool(torch.all(unpool == 1)):
        raise ModelError(f"weights file {path}: '{_UNPOOL_KEY}' is not all ones")
    bad = [
        k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())
    ]
    if bad:
        raise ModelError(
            f"weights file {path} has non-finite values in {len(bad)} tensors (e.g. '{bad[0]}')"
        )
    out: dict[str, Tensor] = {}
    for key in layout:
        value = state[key]
        # The official conv weights are transposed TensorFlow arrays (non-contiguous).
        out[key] = value.to(torch.float32).contiguous()
        if key.endswith(".running_var"):
            counter = key[: -len("running_var")] + _BATCHES_TRACKED
            value = state.get(counter)
            out[counter] = (
                value.reshape(()).to(torch.long)
                if value is not None and value.numel() == 1
                else torch.zeros((), dtype=torch.long)
            )
    return out


def _is_counter(key: str, layout: Mapping[str, tuple[int, ...]]) -> bool:
    """Whether ``key`` is the ``num_batches_tracked`` counter of a batch norm in ``layout``."""
    if not key.endswith("." + _BATCHES_TRACKED):
        return False
    return key[: -len(_BATCHES_TRACKED)] + "running_var" in layout


def _describe(nr_types: int | None) -> str:
    heads = f"{nr_types} type channels" if nr_types else "no type head"
    return f'HoVer-Net "fast" ({heads})'


def _mismatch_summary(
    state: Mapping[str, Tensor],
    layout: Mapping[str, tuple[int, ...]],
    missing: list[str],
    unexpected: list[str],
    wrong: list[str],
) -> str:
    """One-line summary of how a state dict differs from the layout."""
    parts = []
    tp_head = "decoder.tp.u0.conv.weight"
    if tp_head in layout and tp_head in state and tp_head in wrong:
        parts.append(
            f"its type head has {state[tp_head].shape[0]} channels, expected {layout[tp_head][0]}"
        )
    elif tp_head in layout and not any(k.startswith("decoder.tp.") for k in state):
        parts.append("it has no type branch (a segmentation-only checkpoint?)")
    if missing:
        parts.append(f"{len(missing)} missing keys (e.g. '{missing[0]}')")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys (e.g. '{unexpected[0]}')")
    if wrong:
        key = wrong[0]
        parts.append(
            f"{len(wrong)} tensors with the wrong shape (e.g. '{key}': "
            f"{tuple(state[key].shape)} instead of {layout[key]})"
        )
    return "; ".join(parts)


# --------------------------------------------------------------------------------------
# NucleusModel implementation
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class HoVerNetSpec:
    """Stand-alone description of the model, used when the registry is not available.

    The engine normally gets the registry's ``ModelSpec`` (see :func:`_default_spec`); this
    carries the same fields the engine reads.

    Attributes
    ----------
    name, description, licence : str
        Model name, one-line description, licence of the weights.
    mpp : float
        Resolution the model expects (µm/px).
    input_size, output_size : int
        Tile side fed to the network and side of the central window it predicts.
    class_names : dict of int to str
        PanNuke class ids (1..5) and names.
    weights_file, sha256 : str
        File name and SHA-256 of the official checkpoint.
    """

    name: str = HOVERNET_PANNUKE_NAME
    description: str = 'Official HoVer-Net "fast" PanNuke checkpoint (256 in, 164 out)'
    licence: str = HOVERNET_PANNUKE_LICENCE
    mpp: float = HOVERNET_MPP
    input_size: int = HOVERNET_INPUT_SIZE
    output_size: int = HOVERNET_OUTPUT_SIZE
    class_names: Mapping[int, str] = field(default_factory=lambda: dict(CLASS_NAMES))
    weights_file: str = HOVERNET_PANNUKE_FILENAME
    sha256: str = HOVERNET_PANNUKE_SHA256


def _default_spec() -> Any:
    """The registry's spec of ``hovernet-pannuke``, or :class:`HoVerNetSpec` without one."""
    try:
        from wsi_nuclei.models.registry import get_spec

        return get_spec(HOVERNET_PANNUKE_NAME)
    except (ImportError, ModelError):
        return HoVerNetSpec()


def _select_device(device: str | torch.device) -> torch.device:
    """Resolve ``"auto"`` and check that a requested CUDA device exists."""
    if isinstance(device, str) and device.strip().lower() == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ModelError(f"invalid device {device!r} ({_first_line(exc)})") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ModelError(f"device {device!r} requested but CUDA is not available")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ModelError(
                f"device {device!r} requested but only {torch.cuda.device_count()} GPU(s) exist"
            )
    elif dev.type != "cpu":
        raise ModelError(f"unsupported device {device!r} (use cpu, cuda or auto)")
    return dev


class HoVerNetPanNuke:
    """HoVer-Net "fast" with the official PanNuke weights, as a :class:`NucleusModel`.

    Parameters
    ----------
    weights : str, PathLike or mapping of str to Tensor
        Path of the checkpoint (verified with :func:`load_official_checkpoint`) or an
        already loaded state dict (official keys, optionally inside ``{"desc": ...}``).
    device : str or torch.device
        ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
    fp16 : bool
        Run the network under float16 autocast (CUDA only; ignored on CPU). Outputs are
        returned as float32 either way. Off by default: the official model was validated
        in float32 (on Ampere and newer GPUs cuDNN already uses TF32 for float32 convs).
    channels_last : bool or None
        Use the channels-last memory format; ``None`` means "on CUDA only".
    expected_sha256 : str or None
        Passed to :func:`load_official_checkpoint` when ``weights`` is a path; ``None``
        accepts any checkpoint with the right layout.
    spec : object, optional
        The model description the engine reads (``mpp``, ``input_size``,
        ``output_size``...); defaults to the registry's ``hovernet-pannuke`` spec.
    postprocess_options : mapping, optional
        Extra keyword arguments for :func:`wsi_nuclei.postprocess.hv_to_instances`, e.g.
        ``{"params": HVParams(...)}``.

    Notes
    -----
    Input tiles must be 256 x 256 RGB at 0.25 µm/px; the output window is the central
    164 x 164. The weights are licensed CC BY-NC-SA 4.0 (non-commercial).

    :meth:`infer` returns, per tile, ``{"np": (h, w), "hv": (2, h, w), "tp": (6, h, w)}``
    float32 maps: the nucleus probability, the horizontal (channel 0, x) and vertical
    (channel 1, y) distance maps (linear output, about [-1, 1]) and the type probabilities
    (channel 0 background, channel ``k`` PanNuke class ``k``). :meth:`postprocess` takes
    such a dict (for one tile, or maps stitched over a larger image).
    """

    def __init__(
        self,
        weights: str | os.PathLike[str] | Mapping[str, Tensor] | None,
        *,
        device: str | torch.device = "auto",
        fp16: bool = False,
        channels_last: bool | None = None,
        expected_sha256: str | None = HOVERNET_PANNUKE_SHA256,
        spec: Any | None = None,
        postprocess_options: Mapping[str, Any] | None = None,
    ) -> None:
        if weights is None:
            raise ModelError(
                f"no weights for {HOVERNET_PANNUKE_NAME}: run `wsi-nuclei models fetch "
                f"{HOVERNET_PANNUKE_NAME}` or pass --weights PATH"
            )
        self.device = _select_device(device)
        on_cuda = self.device.type == "cuda"
        self.fp16 = bool(fp16) and on_cuda
        self.channels_last = on_cuda if channels_last is None else bool(channels_last)
        self.postprocess_options = dict(postprocess_options or {})
        from wsi_nuclei.postprocess_torch import postprocess_backend

        #: ``torch`` on CUDA (or when ``WSI_NUCLEI_POSTPROCESS`` says so), else ``numpy``
        self.postprocess_backend = postprocess_backend(self.device.type)

        if isinstance(weights, Mapping):
            label = Path("<state dict>")
            state = _conform_state_dict(_unwrap_state_dict(weights, label), label, PANNUKE_NR_TYPES)
        else:
            state = load_official_checkpoint(weights, expected_sha256=expected_sha256)
        with torch.device("meta"):  # no wasted random initialisation
            net = HoVerNetFast(PANNUKE_NR_TYPES)
        net.load_state_dict(state, strict=True, assign=True)
        net.eval().requires_grad_(False)
        net = net.to(self.device)
        if self.channels_last:
            net = net.to(memory_format=torch.channels_last)
        self.net = net
        self.spec = spec if spec is not None else _default_spec()

    @classmethod
    def from_checkpoint(
        cls,
        weights: str | os.PathLike[str] | Mapping[str, Tensor] | None,
        *,
        device: str | torch.device = "auto",
        expected_sha256: str | None = HOVERNET_PANNUKE_SHA256,
        **options: Any,
    ) -> HoVerNetPanNuke:
        """Build the model from a checkpoint file (the registry's entry point).

        Parameters
        ----------
        weights : str, PathLike or mapping, or None
            Checkpoint path (or state dict); ``None`` raises a :class:`ModelError` that
            says how to get the file.
        device : str or torch.device
            See the class parameters.
        expected_sha256 : str or None
            See :func:`load_official_checkpoint`; the registry passes ``None`` because it
            has verified the cached file itself (or the user chose ``--weights``).
        **options
            Other keyword arguments of the class (``fp16``, ``channels_last``, ``spec``,
            ``postprocess_options``).

        Returns
        -------
        HoVerNetPanNuke
            The model, in eval mode on ``device``.
        """
        return cls(weights, device=device, expected_sha256=expected_sha256, **options)

    def infer(self, batch: np.ndarray) -> list[dict[str, np.ndarray]]:
        """Run the network on a batch of tiles.

        Parameters
        ----------
        batch : ndarray of uint8, shape (N, H, W, 3)
            RGB tiles (``H = W = 256`` for the engine; any multiple of 8 >= 96 works).

        Returns
        -------
        list of dict of str to ndarray
            One ``{"np", "hv", "tp"}`` dict of float32 maps per tile (see the class notes),
            of side ``H - 92`` (164 for 256 tiles).

        Raises
        ------
        ValueError
            If ``batch`` is not an (N, H, W, 3) uint8 array of a usable size.
        """
        arr = np.asarray(batch)
        if arr.ndim != 4 or arr.shape[-1] != 3 or arr.dtype != np.uint8:
            raise ValueError(
                f"expected an (N, H, W, 3) uint8 batch, got shape {arr.shape} dtype {arr.dtype}"
            )
        n, height, width = arr.shape[:3]
        for side in (height, width):
            if side % _SIZE_MULTIPLE or side < _MIN_INPUT:
                raise ValueError(
                    f"tile side {side} unusable: must be a multiple of {_SIZE_MULTIPLE} "
                    f"and at least {_MIN_INPUT} (the engine uses {HOVERNET_INPUT_SIZE})"
                )
        if n == 0:
            return []
        arr = np.ascontiguousarray(arr)
        if not arr.flags.writeable:  # torch.from_numpy warns on read-only arrays
            arr = arr.copy()
        x = torch.from_numpy(arr).to(self.device, non_blocking=True)
        x = x.permute(0, 3, 1, 2)  # NCHW view of NHWC memory == channels-last layout
        x = x.float() if self.channels_last else x.contiguous().float()
        with (
            torch.inference_mode(),
            torch.autocast(device_type=self.device.type, dtype=torch.float16, enabled=self.fp16),
        ):
            out = self.net(x)
        maps = {
            "np": torch.softmax(out["np"].float(), dim=1)[:, 1],
            "hv": out["hv"].float(),
            "tp": torch.softmax(out["tp"].float(), dim=1),
        }
        host = {k: v.contiguous().cpu().numpy() for k, v in maps.items()}
        return [{k: v[i] for k, v in host.items()} for i in range(n)]

    def postprocess(self, raw: Mapping[str, np.ndarray], origin: tuple[int, int] | None = None) -> InstanceResult:
        """Turn maps into instances with the HoVer-Net HV post-processing.

        Parameters
        ----------
        raw : mapping of str to ndarray
            One element of :meth:`infer`'s result, or such maps blended over a window:
            ``"np"`` (h, w), ``"hv"`` (2, h, w) and ``"tp"`` (6, h, w).
        origin : tuple of int, optional
            The window's canvas position (unused: the result depends on the maps only).

        Returns
        -------
        InstanceResult
            Instances in the maps' window, classes from the type probabilities.
        """
        if self.postprocess_backend == "torch":
            from wsi_nuclei.postprocess_torch import hv_to_instances_torch

            return hv_to_instances_torch(raw["np"], raw["hv"], raw.get("tp"), **self.postprocess_options,
                                         device=self.device)
        from wsi_nuclei.postprocess import hv_to_instances

        return hv_to_instances(raw["np"], raw["hv"], raw.get("tp"), **self.postprocess_options)

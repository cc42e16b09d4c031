"""The HoVer-Net "fast" network, with the module names of the official checkpoint.

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
added by :func:`wsi_nuclei.models.hovernet.checkpoint.load_official_checkpoint`.

The model expects input at 0.25 µm/px (40x), the resolution of PanNuke.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Final

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["OUTPUT_TRIM", "PANNUKE_NR_TYPES", "HoVerNetFast", "build_hovernet_fast"]

#: Type channels of the PanNuke head: background + 5 PanNuke classes (ids 1..5 in order).
PANNUKE_NR_TYPES: Final[int] = 6
#: The output window is the input less this (valid convolutions): 256 in, 164 out.
OUTPUT_TRIM: Final[int] = 92

_BN_EPS: Final[float] = 1e-5
#: How much is trimmed from the full-resolution / half-resolution encoder features before
#: they are added to the decoder (fixed by the valid convolutions of the decoder).
_SKIP0_TRIM: Final[int] = OUTPUT_TRIM
_SKIP1_TRIM: Final[int] = 36
#: Input sides must be multiples of this (three stride-2 stages).
_SIZE_MULTIPLE: Final[int] = 8
#: Smallest input side for which every valid convolution still has something left.
_MIN_INPUT: Final[int] = 96


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

    @staticmethod
    def check_input_size(height: int, width: int) -> None:
        """Raise ``ValueError`` unless both sides are multiples of 8 and at least 96."""
        for side in (height, width):
            if side % _SIZE_MULTIPLE or side < _MIN_INPUT:
                raise ValueError(
                    f"tile side {side} unusable: must be a multiple of {_SIZE_MULTIPLE} "
                    f"and at least {_MIN_INPUT} (the engine uses 256)"
                )

    def forward(self, imgs: Tensor) -> dict[str, Tensor]:
        """Run the network on NCHW images in 0..255; see the class notes for the outputs."""
        self.check_input_size(imgs.shape[-2], imgs.shape[-1])
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
            u3 = branch.get_submodule("u3")(up3 + d2)
            u2 = branch.get_submodule("u2")(self.upsample2x(u3) + skip1)
            u1 = branch.get_submodule("u1")(self.upsample2x(u2) + skip0)
            out[name] = branch.get_submodule("u0")(u1)
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

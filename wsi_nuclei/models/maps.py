"""The one wrapper for map models: a torch network that outputs NP/HV/TP maps -> instances.

:class:`MapModel` runs any network whose forward returns ``np`` / ``hv`` (/ ``tp``) logits
(the bundled EfficientNet-Lite0 U-Net, the official HoVer-Net "fast") for the engine: batching
on a device, optional bfloat16 / float16 autocast (``precision``), flip test-time augmentation, and the HV
post-processing with the model's tuned thresholds. What differs between networks is read from
the model's :class:`~wsi_nuclei.models.ModelSpec` (``hv_tanh``, ``fp16``,
``channels_last_cpu``, ``postprocess``); what the network itself requires of its input (e.g.
HoVer-Net's sides, multiples of 8) is checked by the network.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .base import InstanceResult

#: precision -> autocast dtype (float32: no autocast)
_AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


def fuse_batchnorm(net: torch.nn.Module) -> torch.nn.Module:
    """``net`` (in eval mode) with each batch normalisation that directly follows a convolution
    folded into that convolution's weights and bias, or ``net`` itself when it cannot be traced.

    An inference-only rewrite (``torch.fx.experimental.optimization.fuse``): the folded
    convolution computes ``gamma * (conv(x) - mean) / sqrt(var + eps) + beta`` in one pass
    instead of a convolution and a separate normalisation pass over its output. ``net`` is not
    modified; the result is a traced copy whose maps agree with ``net``'s to float32 rounding.
    """
    import warnings

    with warnings.catch_warnings():  # the module's import uses torch.jit's deprecated API
        warnings.simplefilter("ignore", DeprecationWarning)
        from torch.fx.experimental.optimization import fuse

    if net.training:
        raise ValueError("fuse_batchnorm needs a network in eval mode")
    try:
        return fuse(net)
    except Exception:  # noqa: BLE001 - not traceable by torch.fx: run it unfused
        return net


class MapModel:
    """Runs a network returning ``np``/``hv``/``tp`` logits and post-processes its maps.

    Parameters
    ----------
    spec : ModelSpec
        The model's description; read here: ``hv_tanh`` (apply tanh to the ``hv`` output),
        ``fp16`` (float16 autocast on CUDA by default), ``channels_last_cpu``,
        ``fuse_batchnorm`` (see :func:`fuse_batchnorm`) and, through
        :meth:`ModelSpec.hv_params`, the post-processing thresholds.
    net : torch.nn.Module
        Takes (N, 3, H, W) float RGB in 0..255, returns a dict of logits maps.
    device : str
        ``cpu`` or ``cuda`` (see :func:`wsi_nuclei.models.resolve_device`).
    params : HVParams, optional
        Post-processing thresholds; default ``spec.hv_params()``.
    tta : bool
        Test-time augmentation: average the maps over the four flips of each tile (4x the
        network time). Flipping a tile mirrors its distance maps, so the horizontal map is
        negated after a left-right flip and the vertical map after an up-down flip.
    weights : path, optional
        The weights file ``net`` was loaded from: ``precision = "int8"`` finds the model's
        calibration file beside it (else the package's own) and checks that it belongs to
        these weights.
    postprocess_backend : str, optional
        ``numpy``, ``torch`` or ``auto``; ``None`` reads ``WSI_NUCLEI_POSTPROCESS`` (default
        ``auto``: the torch implementation on CUDA, numpy on CPU; see
        :func:`wsi_nuclei.postprocess_torch.postprocess_backend`). The resolved choice is the
        attribute ``postprocess_backend``.

    Notes
    -----
    :meth:`infer` returns, per tile, ``{"np": (h, w), "hv": (2, h, w), "tp": (C, h, w)}``
    float32 maps: the nucleus probability, the horizontal (channel 0, x) and vertical
    (channel 1, y) distance maps and the type probabilities (channel 0 background, channel
    ``k`` class ``k``; absent for a network without a type head). ``(h, w)`` is the output
    window of the network (``spec.output_size`` for ``spec.input_size`` tiles).
    """

    #: :meth:`postprocess` takes the engine's float16 windows as they are (both backends compute
    #: in float32 and convert only what they read)
    accepts_float16_maps = True

    def __init__(
        self,
        spec: Any,
        net: torch.nn.Module,
        device: str = "cpu",
        *,
        params: Any = None,
        tta: bool = False,
        postprocess_backend: str | None = None,
        weights: Any = None,
    ) -> None:
        from ..postprocess_torch import postprocess_backend as _backend

        self.spec = spec
        self.device = device
        on_cuda = str(device).startswith("cuda")
        self.hv_tanh = bool(spec.hv_tanh)
        self.params = params if params is not None else spec.hv_params()
        self.tta = tta
        self.postprocess_backend = _backend(device, postprocess_backend)
        net = net.eval().to(device)
        self.net = fuse_batchnorm(net) if getattr(spec, "fuse_batchnorm", False) else net
        self.weights = weights
        self._net_int8: torch.nn.Module | None = None
        self.channels_last = False
        self.precision = "fp16" if (bool(spec.fp16) and on_cuda) else "fp32"

    @property
    def precision(self) -> str:
        """``fp32``, ``bf16`` or ``fp16``: the autocast of the network (``load_model`` sets it
        from ``--precision``; the default is float16 on CUDA where the spec allows it); or
        ``int8``, the CPU network with the spec's ``int8_layers`` quantised to 8-bit integers
        (built when first set, :mod:`wsi_nuclei.models._int8`).

        Setting it also chooses the memory format: channels-last on CUDA, on the CPU where the
        spec asks for it (``channels_last_cpu``) and always in bfloat16 on the CPU, whose fast
        (AMX / AVX512-BF16) convolutions need it: HoVer-Net "fast" takes 1.04 s per patch in
        bfloat16 channels-last against 2.0 s in bfloat16 contiguous on this project's 2 cores.
        """
        return self._precision

    @precision.setter
    def precision(self, value: str) -> None:
        if value not in ("fp32", "bf16", "fp16", "int8"):
            raise ValueError(f"precision must be fp32, bf16, fp16 or int8, got {value!r}")
        if value == "int8" and self._net_int8 is None:
            self._net_int8 = self._build_int8()
        self._precision = value
        on_cuda = str(self.device).startswith("cuda")
        channels_last = on_cuda or bool(self.spec.channels_last_cpu) or value == "bf16"
        if channels_last != self.channels_last:
            fmt = torch.channels_last if channels_last else torch.contiguous_format
            self.net = self.net.to(memory_format=fmt)  # type: ignore[call-overload]
            self.channels_last = channels_last

    def _build_int8(self) -> torch.nn.Module:
        from ..errors import ModelError
        from ._int8 import calibration_path, quantize_int8, read_calibration
        from .fetch import sha256_file

        spec = self.spec
        if str(self.device) != "cpu":
            raise ModelError("--precision int8 runs on the CPU only (use --device cpu)")
        calib = calibration_path(spec, self.weights)
        if not spec.int8_layers or calib is None or self.weights is None:
            raise ModelError(f"model {spec.name!r} has no int8 calibration")
        doc = read_calibration(calib, sha256_file(self.weights))
        return quantize_int8(self.net, doc["layers"], doc["qparams"])

    def _maps(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        int8 = self.precision == "int8"
        x = x.contiguous(
            memory_format=torch.channels_last
            if self.channels_last or int8
            else torch.contiguous_format
        )
        device_type = "cuda" if str(self.device).startswith("cuda") else "cpu"
        dtype = _AUTOCAST.get(self.precision)
        with torch.autocast(
            device_type=device_type, dtype=dtype or torch.float32, enabled=dtype is not None
        ):
            out = (self._net_int8 if int8 and self._net_int8 is not None else self.net)(x)
        npp = torch.softmax(out["np"].float(), 1)[:, 1]
        hv = out["hv"].float()
        hv = torch.tanh(hv) if self.hv_tanh else hv
        tp = torch.softmax(out["tp"].float(), 1) if "tp" in out else None
        return npp, hv, tp

    def _maps_tta(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        acc: list[torch.Tensor | None] = [None, None, None]
        for dims in ((), (-1,), (-2,), (-2, -1)):  # W, H and both: last two dims of every map
            maps = self._maps(x.flip(dims) if dims else x)
            npp, hv, tp = (m.flip(dims) if dims and m is not None else m for m in maps)
            assert npp is not None and hv is not None
            sign = torch.tensor(
                [-1.0 if -1 in dims else 1.0, -1.0 if -2 in dims else 1.0], device=hv.device
            )
            hv = hv * sign.view(1, 2, 1, 1)
            for i, m in enumerate((npp, hv, tp)):
                if m is not None:
                    prev = acc[i]
                    acc[i] = m if prev is None else prev + m
        npp_sum, hv_sum, tp_sum = acc
        assert npp_sum is not None and hv_sum is not None
        return npp_sum / 4, hv_sum / 4, (tp_sum / 4 if tp_sum is not None else None)

    @torch.inference_mode()
    def infer(self, batch: np.ndarray) -> list[dict[str, np.ndarray]]:
        """Run the network on ``batch``, (N, H, W, 3) uint8 RGB tiles; one map dict per tile.

        Raises
        ------
        ValueError
            If ``batch`` is not an (N, H, W, 3) uint8 array (or, raised by the network, its
            tiles have a side the network cannot take).
        """
        arr = np.asarray(batch)
        if arr.ndim != 4 or arr.shape[-1] != 3 or arr.dtype != np.uint8:
            raise ValueError(
                f"expected an (N, H, W, 3) uint8 batch, got shape {arr.shape} dtype {arr.dtype}"
            )
        if len(arr) == 0:
            return []
        arr = np.ascontiguousarray(arr)
        if not arr.flags.writeable:  # torch.from_numpy warns on read-only arrays
            arr = arr.copy()
        x = torch.from_numpy(arr).to(self.device).permute(0, 3, 1, 2).float()
        npp, hv, tp = self._maps_tta(x) if self.tta else self._maps(x)
        npp_h, hv_h = npp.cpu().numpy(), hv.cpu().numpy()
        tp_h = tp.cpu().numpy() if tp is not None else None
        return [
            {"np": npp_h[i], "hv": hv_h[i], **({"tp": tp_h[i]} if tp_h is not None else {})}
            for i in range(len(arr))
        ]

    def postprocess(
        self,
        raw: dict[str, np.ndarray],
        origin: tuple[int, int] | None = None,
        shape: tuple[int, int] | None = None,
    ) -> InstanceResult:
        """Instances from (blended) maps; ``origin`` (the window's canvas position) and ``shape``
        are unused: the result depends on the maps only. Runs on the model's device with the torch
        implementation when ``postprocess_backend`` is ``torch``."""
        if self.postprocess_backend == "torch":
            from ..postprocess_torch import hv_to_instances_torch

            return hv_to_instances_torch(
                raw["np"], raw["hv"], raw.get("tp"), self.params, device=self.device
            )
        from ..postprocess import hv_to_instances

        return hv_to_instances(raw["np"], raw["hv"], raw.get("tp"), self.params)

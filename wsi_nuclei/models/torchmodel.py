"""Wrapper that runs a HoVer-Net-style torch network for the engine (batching, device, AMP)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .base import InstanceResult


class HoVerMapModel:
    """Runs a network returning ``np``/``hv``/``tp`` logits and post-processes its maps.

    Parameters
    ----------
    spec : ModelSpec
    net : torch.nn.Module
        Takes (N, 3, H, W) float RGB in 0..255, returns a dict of logits maps.
    device : str
        ``cpu`` or ``cuda``; on CUDA, inference runs under fp16 autocast.
    hv_tanh : bool
        Apply tanh to the ``hv`` output (our networks are trained through a tanh; the official
        HoVer-Net output is linear).
    params : HVParams, optional
        Post-processing thresholds (tuned per model on its validation split).
    tta : bool
        Test-time augmentation: average the maps over the four flips of each tile (4x the
        network time). Flipping a tile mirrors its distance maps, so the horizontal map is
        negated after a left-right flip and the vertical map after an up-down flip.
    postprocess_backend : str, optional
        ``numpy``, ``torch`` or ``auto``; ``None`` reads ``WSI_NUCLEI_POSTPROCESS`` (default
        ``auto``: the torch implementation on CUDA, numpy on CPU; see
        :func:`wsi_nuclei.postprocess_torch.postprocess_backend`). The resolved choice is the
        attribute ``postprocess_backend``.
    """

    def __init__(self, spec: Any, net: torch.nn.Module, device: str = "cpu", *, hv_tanh: bool = True,
                 params: Any = None, tta: bool = False, postprocess_backend: str | None = None) -> None:
        from ..postprocess import HVParams
        from ..postprocess_torch import postprocess_backend as _backend

        self.spec = spec
        self.device = device
        self.hv_tanh = hv_tanh
        self.params = params if params is not None else HVParams()
        self.tta = tta
        self.postprocess_backend = _backend(device, postprocess_backend)
        self.net = net.eval().to(device).to(memory_format=torch.channels_last)

    def _maps(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        with torch.autocast(device_type="cuda", dtype=torch.float16, enabled=self.device == "cuda"):
            out = self.net(x.contiguous(memory_format=torch.channels_last))
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
            sign = torch.tensor([-1.0 if -1 in dims else 1.0, -1.0 if -2 in dims else 1.0], device=hv.device)
            hv = hv * sign.view(1, 2, 1, 1)
            for i, m in enumerate((npp, hv, tp)):
                if m is not None:
                    acc[i] = m if acc[i] is None else acc[i] + m
        npp, hv, tp = (a / 4 if a is not None else None for a in acc)
        return npp, hv, tp  # type: ignore[return-value]

    @torch.inference_mode()
    def infer(self, batch: np.ndarray) -> list[dict[str, np.ndarray]]:
        x = torch.from_numpy(np.ascontiguousarray(batch)).to(self.device).permute(0, 3, 1, 2).float()
        npp, hv, tp = self._maps_tta(x) if self.tta else self._maps(x)
        npp, hv = npp.cpu().numpy(), hv.cpu().numpy()
        tp = tp.cpu().numpy() if tp is not None else None
        return [
            {"np": npp[i], "hv": hv[i], **({"tp": tp[i]} if tp is not None else {})}
            for i in range(len(batch))
        ]

    def postprocess(self, raw: dict[str, np.ndarray], origin: tuple[int, int] | None = None) -> InstanceResult:
        """Instances from (blended) maps; ``origin`` (the window's canvas position) is unused:
        the result depends on the maps only. Runs on the model's device with the torch
        implementation when ``postprocess_backend`` is ``torch``."""
        if self.postprocess_backend == "torch":
            from ..postprocess_torch import hv_to_instances_torch

            return hv_to_instances_torch(raw["np"], raw["hv"], raw.get("tp"), self.params, device=self.device)
        from ..postprocess import hv_to_instances

        return hv_to_instances(raw["np"], raw["hv"], raw.get("tp"), self.params)

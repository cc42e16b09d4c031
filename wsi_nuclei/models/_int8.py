"""8-bit integer convolutions for a map network's heaviest layers on the CPU (``--precision int8``).

Post-training static quantization (``torch.ao.quantization``'s FX graph mode): the convolutions of
the layers named in ``ModelSpec.int8_layers`` (for the bundled EffUNet the full- and
half-resolution decoder and the heads' bodies, which hold most of its arithmetic) run in 8-bit
integers with per-channel weight scales; the encoder, the upsampling and the 1x1 output layers
stay float32. Activation ranges are not measured at run time: they were fitted once on
training images (``scripts/calibrate_int8.py``) and ship as a small JSON file beside the
weights, tied to them by the weights' sha256, so that a run is deterministic and needs no data.
Weight scales are computed from the loaded weights.

Activations use 7 of the 8 bits (``reduce_range``): CPUs without VNNI instructions multiply
8-bit pairs into saturating 16-bit sums, which the full range would overflow.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from ..errors import ModelError

#: quantised engines in order of preference (x86 / fbgemm on x86-64, qnnpack on ARM)
_ENGINES = ("x86", "fbgemm", "qnnpack")
#: activation codes used: 0..127 (7 bits, see the module docstring)
_QMIN, _QMAX = 0, 127
#: format of the calibration files
_FORMAT = 1


def int8_engine() -> str | None:
    """The quantised-kernel engine this torch build offers (``x86``, ``fbgemm``, ``qnnpack``),
    or None when it has none."""
    supported = set(torch.backends.quantized.supported_engines)
    return next((e for e in _ENGINES if e in supported), None)


def _qconfig_mapping(layers: Iterable[str], *, calibrate: bool) -> Any:
    from torch.ao.quantization import (
        HistogramObserver,
        MinMaxObserver,
        QConfig,
        QConfigMapping,
        default_per_channel_weight_observer,
    )

    observer = HistogramObserver if calibrate else MinMaxObserver
    act = observer.with_args(dtype=torch.quint8, reduce_range=True)
    qconfig = QConfig(activation=act, weight=default_per_channel_weight_observer)
    mapping = QConfigMapping()
    for name in layers:
        mapping = mapping.set_module_name(name, qconfig)
    return mapping


def _prepare(net: torch.nn.Module, layers: Iterable[str], *, calibrate: bool) -> Any:
    from torch.ao.quantization.quantize_fx import prepare_fx

    engine = int8_engine()
    if engine is None:
        raise ModelError("--precision int8: this torch build has no quantised CPU kernels")
    torch.backends.quantized.engine = engine
    example = torch.zeros(1, 3, 64, 64)
    with warnings.catch_warnings():  # torch.ao.quantization announces its move to torchao
        warnings.simplefilter("ignore")
        return prepare_fx(
            net.to(memory_format=torch.contiguous_format).eval(),  # type: ignore[call-overload]
            _qconfig_mapping(layers, calibrate=calibrate),
            example_inputs=(example,),
        )


def _observers(prepared: torch.nn.Module) -> dict[str, Any]:
    from torch.ao.quantization.observer import ObserverBase

    return {n: m for n, m in prepared.named_modules() if isinstance(m, ObserverBase)}


def calibrate_int8(
    net: torch.nn.Module, layers: Iterable[str], batches: Iterable[torch.Tensor]
) -> dict[str, list[float]]:
    """Activation quantisation parameters of ``net``'s ``layers`` fitted on ``batches``.

    Parameters
    ----------
    net : torch.nn.Module
        The float network in eval mode (as the engine runs it, batch norms folded).
    layers : iterable of str
        Module names whose convolutions are to run in 8 bits.
    batches : iterable of Tensor
        (N, 3, H, W) float RGB in 0..255: the calibration images.

    Returns
    -------
    dict
        Observer name -> ``[scale, zero_point]`` (histogram-fitted ranges, 7-bit codes).
    """
    import copy

    layers = list(layers)
    prepared = _prepare(copy.deepcopy(net), layers, calibrate=True)
    with torch.inference_mode():
        for x in batches:
            prepared(x)
    out = {}
    for name, obs in _observers(prepared).items():
        if getattr(obs, "dtype", None) != torch.quint8:
            continue
        scale, zero_point = obs.calculate_qparams()
        out[name] = [float(scale.item()), int(zero_point.item())]
    if not out:
        raise ModelError(f"int8 calibration: no layer of {layers} holds a convolution")
    return out


def quantize_int8(
    net: torch.nn.Module, layers: Iterable[str], qparams: dict[str, list[float]]
) -> torch.nn.Module:
    """``net`` with the convolutions of ``layers`` in 8-bit integers, activation scales from
    ``qparams`` (:func:`calibrate_int8`); the rest of the network is unchanged.

    The result is a new module in channels-last memory format; ``net`` is not modified.

    Raises
    ------
    ModelError
        No quantised kernels in this torch build, kernels that cannot run the network, or
        ``qparams`` that do not fit it (fitted for another network or another torch version's
        graph).
    """
    import copy

    from torch.ao.quantization.quantize_fx import convert_fx

    prepared = _prepare(copy.deepcopy(net), layers, calibrate=False)
    observers = {n: o for n, o in _observers(prepared).items() if o.dtype == torch.quint8}
    if set(observers) != set(qparams):
        raise ModelError(
            f"--precision int8: the calibration file names {len(qparams)} activations, the "
            f"network has {len(observers)}: it was fitted for another network"
        )
    for name, obs in observers.items():
        scale, zero_point = float(qparams[name][0]), int(qparams[name][1])
        # the range whose (scale, zero point) MinMaxObserver computes back
        obs.min_val = torch.tensor(-zero_point * scale)
        obs.max_val = torch.tensor((_QMAX - _QMIN - zero_point) * scale)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quantized = convert_fx(prepared)
        quantized = quantized.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        with torch.inference_mode():  # a kernel this engine lacks fails here, not mid-run
            quantized(torch.zeros(1, 3, 64, 64).contiguous(memory_format=torch.channels_last))
    except (RuntimeError, NotImplementedError) as exc:
        detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:120]
        raise ModelError(
            f"--precision int8: this torch build's quantised kernels "
            f"({torch.backends.quantized.engine}) cannot run the network ({detail}); "
            "use --precision fp32"
        ) from None
    return quantized


def calibration_path(spec: Any, weights: str | Path | None) -> Path | None:
    """The int8 calibration file of ``spec`` for ``weights``: beside the weights, else the
    package's own (it fits only the bundled weights: :func:`read_calibration` checks the sha256),
    or None when the model has none."""
    if not spec.int8_calibration:
        return None
    from ._registry import WEIGHTS_DIR

    candidates = [Path(weights).parent / spec.int8_calibration] if weights else []
    candidates.append(WEIGHTS_DIR / spec.int8_calibration)
    return next((p for p in candidates if p.is_file()), candidates[0])


def write_calibration(
    path: str | Path,
    *,
    weights_sha256: str,
    layers: list[str],
    qparams: dict[str, list[float]],
    about: str,
) -> None:
    """Write a calibration file (JSON) for weights with the given sha256."""
    doc = {
        "format": _FORMAT,
        "weights_sha256": weights_sha256,
        "layers": layers,
        "about": about,
        "qparams": qparams,
    }
    tmp = Path(f"{path}.tmp")
    tmp.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
    tmp.replace(path)


def read_calibration(path: str | Path, weights_sha256: str | None) -> dict[str, Any]:
    """Read a calibration file, checking that it belongs to weights with ``weights_sha256``
    (None: not checked).

    Raises
    ------
    ModelError
        Missing, unreadable, another format, or fitted for other weights.
    """
    p = Path(path)
    try:
        doc = json.loads(p.read_text())
    except FileNotFoundError:
        raise ModelError(f"--precision int8: calibration file {p} not found") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelError(f"--precision int8: {p}: unreadable ({exc})") from None
    if not isinstance(doc, dict) or doc.get("format") != _FORMAT or "qparams" not in doc:
        raise ModelError(f"--precision int8: {p}: not a calibration file of format {_FORMAT}")
    if weights_sha256 is not None and doc.get("weights_sha256") != weights_sha256:
        raise ModelError(
            f"--precision int8: {p} was fitted for other weights (sha256 "
            f"{str(doc.get('weights_sha256'))[:12]}..., these are {weights_sha256[:12]}...); "
            "fit one for them with scripts/calibrate_int8.py --weights FILE"
        )
    return doc

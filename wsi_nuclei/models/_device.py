"""The one device and precision resolver: ``--device`` -> the torch device, ``--precision`` ->
the arithmetic of the network (float32, or bfloat16 / float16 autocast)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import DeviceError, ModelError

if TYPE_CHECKING:
    from ._registry import ModelSpec


def resolve_device(device: str = "auto") -> str:
    """``auto`` -> ``cuda`` when available, else ``cpu``; refuses ``cuda`` without a GPU.

    Parameters
    ----------
    device : str
        ``auto``, ``cpu`` or ``cuda``.

    Returns
    -------
    str
        ``cpu`` or ``cuda``.

    Raises
    ------
    DeviceError
        ``cuda`` was asked for but no CUDA GPU is usable.
    ModelError
        Any other device name.
    """
    import torch  # here: resolving a device is the first moment torch is needed

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        build = (
            "a CPU-only build of torch"
            if torch.version.cuda is None
            else f"torch built for CUDA {torch.version.cuda}"
        )
        raise DeviceError(
            f"--device cuda: no CUDA GPU is usable here ({build}); use --device cpu or auto"
        )
    if device not in ("cpu", "cuda"):
        raise ModelError(f"unknown device {device!r} (auto, cpu or cuda)")
    return device


#: ``--precision`` values: ``auto`` resolves to one of the others (see :func:`resolve_precision`)
PRECISIONS = ("auto", "fp32", "bf16", "fp16", "int8")


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX tiles).

    Without either, torch emulates bfloat16 on the CPU and a network runs slower than in
    float32, so ``--precision auto`` keeps float32 there.
    """
    import torch

    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    try:
        return any(bool(getattr(torch.cpu, p)()) for p in probes if hasattr(torch.cpu, p))
    except (RuntimeError, AttributeError):  # an unusual build: no native path assumed
        return False


def resolve_precision(precision: str, device: str, spec: ModelSpec) -> str:
    """The arithmetic a model's network runs in: ``fp32``, ``bf16`` or ``fp16`` (autocast).

    Parameters
    ----------
    precision : str
        ``auto``, ``fp32``, ``bf16`` or ``fp16``. ``auto`` is float16 on CUDA when the model
        allows it (``spec.fp16``), bfloat16 on a CPU with native bfloat16 when the model was
        validated in it (``spec.bf16_cpu``), float32 otherwise.
    device : str
        The resolved device, ``cpu`` or ``cuda``.
    spec : ModelSpec
        The model; ``spec.precisions`` lists what it can run in (models without a network:
        ``fp32`` only).

    Returns
    -------
    str
        ``fp32``, ``bf16`` or ``fp16``.

    Raises
    ------
    ModelError
        An unknown precision, one the model cannot run in, or ``fp16`` on the CPU.
    """
    if precision not in PRECISIONS:
        raise ModelError(f"unknown precision {precision!r} ({', '.join(PRECISIONS)})")
    on_cuda = str(device).startswith("cuda")
    if precision == "auto":
        if on_cuda and spec.fp16 and "fp16" in spec.precisions:
            return "fp16"
        if not on_cuda and spec.bf16_cpu and "bf16" in spec.precisions and cpu_has_native_bf16():
            return "bf16"
        return "fp32"
    if precision not in spec.precisions:
        raise ModelError(
            f"model {spec.name!r} runs in {', '.join(spec.precisions)} only, not {precision}"
        )
    if precision == "fp16" and not on_cuda:
        raise ModelError("--precision fp16 needs a CUDA GPU; on the CPU use bf16 or fp32")
    if precision == "int8" and on_cuda:
        raise ModelError("--precision int8 runs on the CPU only; on CUDA use fp16 or fp32")
    return precision

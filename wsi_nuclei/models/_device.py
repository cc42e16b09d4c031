"""The one device resolver: ``--device auto|cpu|cuda`` -> the torch device string to run on."""

from __future__ import annotations

from ..errors import DeviceError, ModelError


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

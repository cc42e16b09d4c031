"""Verified loading of HoVer-Net "fast" checkpoints (the official PanNuke ``.tar``).

The official file is a legacy ``torch.save`` of ``{"desc": state_dict}`` with the module names
of :class:`~wsi_nuclei.models.hovernet.net.HoVerNetFast` and conv weights stored as transposed
TensorFlow arrays. :func:`load_official_checkpoint` checks its size and SHA-256 *before*
unpickling (``weights_only=True``), then its keys, shapes and values against
:func:`official_state_dict_layout`; :func:`load_hovernet_fast` returns the network with the
weights in place.
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

import torch
from torch import Tensor

from ...errors import ModelError
from ..fetch import (
    HOVERNET_PANNUKE_NAME,
    HOVERNET_PANNUKE_SHA256,
    HOVERNET_PANNUKE_SIZE,
    sha256_file,
)
from .net import PANNUKE_NR_TYPES, HoVerNetFast

__all__ = ["load_hovernet_fast", "load_official_checkpoint", "official_state_dict_layout"]

_BATCHES_TRACKED: Final[str] = "num_batches_tracked"
_UNPOOL_KEY: Final[str] = "upsample2x.unpool_mat"


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
        Channels of the checkpoint's type head (6 for PanNuke); ``None``/0 for a
        segmentation-only checkpoint.

    Returns
    -------
    dict of str to tuple of int
        Every parameter, running statistic and the ``upsample2x.unpool_mat`` buffer, in
        module order. Batch-norm ``num_batches_tracked`` counters are not listed: the
        official checkpoints do not store them (the loader accepts and fills them).
    """
    return dict(_layout(nr_types or None))


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
            tracked = state.get(counter)
            out[counter] = (
                tracked.reshape(()).to(torch.long)
                if tracked is not None and tracked.numel() == 1
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


def load_hovernet_fast(
    weights: str | os.PathLike[str] | Mapping[str, Tensor],
    *,
    expected_sha256: str | None = HOVERNET_PANNUKE_SHA256,
) -> HoVerNetFast:
    """HoVer-Net "fast" (PanNuke type head) with the weights of a checkpoint, in eval mode.

    Parameters
    ----------
    weights : str, PathLike or mapping of str to Tensor
        Path of the checkpoint (verified with :func:`load_official_checkpoint`) or an
        already loaded state dict (official keys, optionally inside ``{"desc": ...}``).
    expected_sha256 : str or None
        Passed to :func:`load_official_checkpoint` when ``weights`` is a path; ``None``
        accepts any checkpoint with the right layout (the registry passes ``None``: it has
        verified the cached file itself, or the user chose ``--weights``).

    Returns
    -------
    HoVerNetFast
        The network on the CPU, in eval mode, without gradients.
    """
    if isinstance(weights, Mapping):
        label = Path("<state dict>")
        state = _conform_state_dict(_unwrap_state_dict(weights, label), label, PANNUKE_NR_TYPES)
    else:
        state = load_official_checkpoint(weights, expected_sha256=expected_sha256)
    with torch.device("meta"):  # no wasted random initialisation
        net = HoVerNetFast(PANNUKE_NR_TYPES)
    net.load_state_dict(state, strict=True, assign=True)
    return net.eval().requires_grad_(False)

"""Nucleus models: the registry (what exists, how to load it) and the model interface.

Public entry point of the models package (the pattern of timm)::

    from wsi_nuclei.models import list_models, get_spec, load_model

* :func:`list_models` / :func:`get_spec`: every registered :class:`ModelSpec` -- resolution,
  patch geometry, context and halo, thresholds, TTA capability, classes, weights, licence;
* :func:`load_model`: a ready :class:`NucleusModel` (weights found and verified, device
  resolved with :func:`resolve_device`);
* :func:`register_model`: how a model module adds its spec (the built-in ones are
  :mod:`~wsi_nuclei.models.lite`, :mod:`~wsi_nuclei.models.hovernet` and
  :mod:`~wsi_nuclei.models.classic`, imported on first use).

Modules: ``_registry`` (the leaf registry), ``_device`` (the device resolver), ``base`` (the
model interface), ``maps`` (the one wrapper of map networks), ``fetch`` (opt-in download and
the SHA-256 helper), ``effunet`` / ``lite`` (the default network and its entry),
``hovernet/`` (HoVer-Net "fast": ``net``, ``checkpoint``), ``classic`` (no-weights models).
Importing this package imports no torch.
"""

from __future__ import annotations

from ._device import PRECISIONS, cpu_has_native_bf16, resolve_device, resolve_precision
from ._registry import (
    WEIGHTS_DIR,
    ModelSpec,
    default_model_name,
    find_weights,
    get_spec,
    list_models,
    load_model,
    register_model,
    require_tta,
    weights_status,
)
from .base import InstanceResult, NucleusModel
from .fetch import sha256_file

__all__ = [
    "PRECISIONS",
    "WEIGHTS_DIR",
    "InstanceResult",
    "ModelSpec",
    "NucleusModel",
    "cpu_has_native_bf16",
    "default_model_name",
    "find_weights",
    "get_spec",
    "list_models",
    "load_model",
    "register_model",
    "require_tta",
    "resolve_device",
    "resolve_precision",
    "sha256_file",
    "weights_status",
]

"""The model registry (a leaf): name -> :class:`ModelSpec`, and :func:`load_model`.

In the spirit of timm: model modules *register themselves* with :func:`register_model`;
this module imports none of them at import time. The first :func:`list_models`,
:func:`get_spec` or :func:`load_model` imports the built-in model modules
(:data:`_BUILTIN_MODULES`), whose import registers their specs. Weights are either bundled in
the package (``wsi_nuclei/models/weights/``), given by the user (``--weights PATH``) or looked
up in the cache folder (:func:`wsi_nuclei.models.fetch.default_cache_dir`). Nothing is
downloaded unless the user runs ``wsi-nuclei models fetch NAME``.

Everything the engine needs to know about a model -- resolution, patch geometry, context
(``output_border``) and post-processing halo, thresholds, TTA capability, how its maps are
read -- is a field of its :class:`ModelSpec`; the engine never asks what class a model is.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ModelError
from ..schema import CLASS_COLORS
from ._device import resolve_device, resolve_precision
from .fetch import default_cache_dir, sha256_file

if TYPE_CHECKING:
    from ..postprocess import HVParams
    from .base import NucleusModel

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"


@dataclass(frozen=True)
class ModelSpec:
    """Everything the engine and the user need to know about a model."""

    name: str
    description: str
    licence: str
    mpp: float  # expected µm/px
    input_size: int
    output_size: int
    class_names: dict[int, str]
    builder: Callable[[ModelSpec, Path | None, str], Any]
    weights_file: str | None = None  # file name (bundled or in the cache dir)
    sha256: str | None = None
    bundled: bool = False
    url: str | None = None
    class_colors: dict[int, tuple[int, int, int]] = field(
        default_factory=lambda: dict(CLASS_COLORS)
    )
    tta: bool = False  # supports flip test-time augmentation (network models)
    #: post-processing thresholds tuned for this model (fields of postprocess.HVParams)
    postprocess: dict[str, Any] = field(default_factory=dict)
    #: output pixels at each side of the output window that see too little context to be
    #: trusted alone: neighbouring patches overlap by twice this and are cross-faded there
    #: (0 for valid-convolution models such as HoVer-Net "fast", whose output is all valid)
    output_border: int = 0
    #: post-processing halo (model px): larger than the largest nucleus radius plus the reach
    #: of the post-processing, so that a nucleus near a block border is seen whole by a block
    halo: int = 96
    #: per class name, how well the model was trained to produce it: "trained" (many exact
    #: labels), "weak" (few exact labels, or only as part of a set such as Neoplastic|Epithelial)
    #: or "none" (no labels: the model cannot be trusted to ever predict it); empty = unknown
    class_support: dict[str, str] = field(default_factory=dict)
    #: the evidence behind ``class_support``, in words (training labels per class)
    class_evidence: str = ""
    #: nuclei whose calibrated class probability is below this are written without a class
    #: (class 0, "Nucleus"): below it their classes were more often wrong than right on the
    #: validation split (``scripts/tune_postprocess.py``); 0 keeps every class
    min_class_prob: float = 0.0
    #: tissues the class head was trained and validated on, in words
    trained_on: str = ""
    #: map models (:class:`~wsi_nuclei.models.maps.MapModel`): the network's ``hv`` output was
    #: trained through a tanh (the official HoVer-Net's is linear and is used as it is)
    hv_tanh: bool = True
    #: map models on CUDA: run the network under float16 autocast (False: float32, as the
    #: official HoVer-Net was validated)
    fp16: bool = True
    #: map models on a CPU with native bfloat16 (AVX512-BF16 or AMX): run the network under
    #: bfloat16 autocast by default (``--precision auto``); set only once the model's accuracy
    #: was measured in bfloat16 through the engine
    bf16_cpu: bool = False
    #: the precisions the model can run in (``--precision``); models without a network: fp32
    precisions: tuple[str, ...] = ("fp32",)
    #: map models: channels-last memory format on the CPU too (on CUDA it is always used)
    channels_last_cpu: bool = True
    #: map models: fold every batch normalisation that directly follows a convolution into
    #: that convolution's weights before inference (``torch.fx``; the maps agree to about 1e-5
    #: in float32, and the network runs faster: docs/benchmarks.md)
    fuse_batchnorm: bool = False
    #: map models: patches per network call on the CPU by default (``--infer-chunk``; None: the
    #: engine's default, 2). The CPU runs as many calls at once as it has worker threads, so
    #: heavy networks take 1 (HoVer-Net fast: 67 MB of activations per patch)
    cpu_infer_chunk: int | None = None
    #: map models: modules whose convolutions run in 8-bit integers under ``--precision int8``
    #: (post-training quantisation, :mod:`wsi_nuclei.models._int8`); empty: no int8
    int8_layers: tuple[str, ...] = ()
    #: file name (beside the weights) of the int8 activation calibration, tied to the weights
    #: by their sha256 (``scripts/calibrate_int8.py`` writes it)
    int8_calibration: str | None = None

    @property
    def stride(self) -> int:
        """Distance between neighbouring patches of the engine's grid (model px)."""
        return self.output_size - 2 * self.output_border

    @property
    def needs_weights(self) -> bool:
        return self.weights_file is not None

    def hv_params(self) -> HVParams:
        """The model's :class:`~wsi_nuclei.postprocess.HVParams` (defaults where not tuned)."""
        from ..postprocess import HVParams

        params = dict(self.postprocess)
        if "class_exclude" not in params:
            params["class_exclude"] = self.unsupported_class_ids
        return HVParams(**params)

    @property
    def unsupported_class_ids(self) -> tuple[int, ...]:
        """Class ids the model has no training labels for (``class_support`` "none")."""
        return tuple(
            sorted(
                c for c, name in self.class_names.items() if self.class_support.get(name) == "none"
            )
        )

    def reliability_note(self) -> str:
        """What the model's classes can be trusted for, in plain words (empty when unknown)."""
        if not self.class_support or not self.class_names:
            return ""
        by = {
            lvl: [n for n in self.class_names.values() if self.class_support.get(n) == lvl]
            for lvl in ("trained", "weak", "none")
        }
        parts = []
        if by["trained"]:
            parts.append(f"trained with many exact labels for {', '.join(by['trained'])}")
        if by["weak"]:
            parts.append(
                f"{'only ' if by['trained'] else ''}weakly for {', '.join(by['weak'])} (few exact labels: "
                "treat these counts as rough)"
            )
        if by["none"]:
            parts.append(
                f"never for {', '.join(by['none'])}, which it does not output (reported as not measured, "
                "not as 0)"
            )
        note = f"{self.name}: " + "; ".join(parts) + "."
        if self.min_class_prob > 0:
            note += (
                f" Nuclei whose class probability is below {self.min_class_prob:g} are written without a class "
                '("Nucleus").'
            )
        if self.trained_on:
            note += f" Classes were validated on {self.trained_on}; on other tissues (e.g. skin) they are unvalidated."
        return note


#: The modules that register the built-in models, in the order ``list_models`` shows them.
_BUILTIN_MODULES: tuple[str, ...] = ("lite", "hovernet", "classic")

_REGISTRY: dict[str, ModelSpec] = {}
_BUILTIN_DONE = False


def register_model(spec: ModelSpec) -> ModelSpec:
    """Add a model to the registry (the name must be new); returns ``spec``."""
    if spec.name in _REGISTRY:
        raise ValueError(f"model {spec.name!r} already registered")
    _REGISTRY[spec.name] = spec
    return spec


def _ensure_builtin_models() -> None:
    """Import the built-in model modules once (each registers its models on import)."""
    global _BUILTIN_DONE
    if not _BUILTIN_DONE:
        _BUILTIN_DONE = True
        for module in _BUILTIN_MODULES:
            importlib.import_module(f"{__package__}.{module}")


def _module_rank(spec: ModelSpec) -> int:
    """Position of the module that registered ``spec`` (its builder's) in the built-in list."""
    module = getattr(spec.builder, "__module__", "") or ""
    for i, name in enumerate(_BUILTIN_MODULES):
        if module == f"{__package__}.{name}":
            return i
    return len(_BUILTIN_MODULES)


def _ordered() -> list[ModelSpec]:
    """Registered specs: built-in modules in :data:`_BUILTIN_MODULES` order, each in its own
    registration order, then the others (whichever module was imported first)."""
    specs = list(_REGISTRY.values())
    return sorted(specs, key=_module_rank)  # stable: registration order within a module


def list_models() -> list[ModelSpec]:
    """All registered models (built-in ones first, in a fixed order)."""
    _ensure_builtin_models()
    return _ordered()


def get_spec(name: str) -> ModelSpec:
    """The spec of model ``name``; :class:`ModelError` if unknown."""
    _ensure_builtin_models()
    if name not in _REGISTRY:
        raise ModelError(
            f"unknown model {name!r}; available: {', '.join(s.name for s in _ordered())}"
        )
    return _REGISTRY[name]


def find_weights(spec: ModelSpec, weights: str | Path | None = None) -> Path | None:
    """Where the weights of ``spec`` are: ``weights`` if given, else bundled, else the cache."""
    if spec.weights_file is None:
        if weights is not None:
            raise ModelError(f"model {spec.name!r} has no weights; drop --weights {weights}")
        return None
    if weights is not None:
        p = Path(weights)
        if not p.is_file():
            raise ModelError(f"weights file not found: {p}")
        return p
    for folder in (WEIGHTS_DIR, default_cache_dir()):
        p = folder / spec.weights_file
        if p.is_file():
            return p
    return None


def weights_status(spec: ModelSpec) -> str:
    """``"none needed"``, ``"bundled"``, ``"present (<path>)"`` or ``"missing"``."""
    if not spec.needs_weights:
        return "none needed"
    p = find_weights(spec)
    if p is None:
        return "missing"
    return "bundled" if p.parent == WEIGHTS_DIR else f"present ({p})"


def require_tta(spec: ModelSpec) -> None:
    """Raise :class:`ModelError` unless model ``spec`` supports flip test-time augmentation."""
    if not spec.tta:
        raise ModelError(
            f"model {spec.name!r} has no test-time augmentation (only network models do)"
        )


def load_model(
    name: str,
    *,
    weights: str | Path | None = None,
    device: str = "auto",
    tta: bool = False,
    precision: str = "auto",
) -> NucleusModel:
    """Build model ``name`` with its weights on ``device``; returns a ``NucleusModel``.

    ``tta`` turns on flip test-time augmentation (network models only); ``precision`` is
    resolved by :func:`~wsi_nuclei.models.resolve_precision` and set as the model's
    ``precision`` attribute (network models).
    """
    spec = get_spec(name)
    path = find_weights(spec, weights)
    if spec.needs_weights and path is None:
        hint = (
            f"pass --weights PATH or run 'wsi-nuclei models fetch {name}'"
            if spec.url
            else "pass --weights PATH"
        )
        raise ModelError(f"weights for model {name!r} ({spec.weights_file}) not found: {hint}")
    if path is not None and spec.sha256 and weights is None:
        digest = sha256_file(path)
        if digest != spec.sha256:
            raise ModelError(
                f"{path}: sha256 {digest[:12]}... does not match the registry ({spec.sha256[:12]}...)"
            )
    if tta:
        require_tta(spec)
    dev = resolve_device(device)
    prec = resolve_precision(precision, dev, spec)
    model = spec.builder(spec, path, dev)
    if tta:
        model.tta = True
    if hasattr(model, "precision"):
        model.precision = prec
    return model


def default_model_name() -> str:
    """The bundled trained model if its weights are present, else the classical baseline."""
    for spec in list_models():
        if spec.bundled and find_weights(spec) is not None:
            return spec.name
    return "classic"

"""Model registry: name -> builder, weights file, sha256, licence, resolution, classes.

In the spirit of timm: :func:`list_models` shows what exists, :func:`load_model` builds one
ready for :mod:`wsi_nuclei.pipeline`. Weights are either bundled in the package
(``wsi_nuclei/models/weights/``), given by the user (``--weights PATH``) or looked up in the
cache folder (:func:`wsi_nuclei.models.fetch.default_cache_dir`). Nothing is downloaded unless
the user runs ``wsi-nuclei models fetch NAME``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ModelError
from ..schema import CLASS_COLORS, CLASS_NAMES

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
    builder: Callable[["ModelSpec", Path | None, str], Any]
    weights_file: str | None = None  # file name (bundled or in the cache dir)
    sha256: str | None = None
    bundled: bool = False
    url: str | None = None
    class_colors: dict[int, tuple[int, int, int]] = field(default_factory=lambda: dict(CLASS_COLORS))
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

    @property
    def stride(self) -> int:
        """Distance between neighbouring patches of the engine's grid (model px)."""
        return self.output_size - 2 * self.output_border

    @property
    def needs_weights(self) -> bool:
        return self.weights_file is not None

    def hv_params(self) -> Any:
        """The model's :class:`~wsi_nuclei.postprocess.HVParams` (defaults where not tuned)."""
        from ..postprocess import HVParams

        params = dict(self.postprocess)
        if "class_exclude" not in params:
            params["class_exclude"] = self.unsupported_class_ids
        return HVParams(**params)

    @property
    def unsupported_class_ids(self) -> tuple[int, ...]:
        """Class ids the model has no training labels for (``class_support`` "none")."""
        return tuple(sorted(c for c, name in self.class_names.items() if self.class_support.get(name) == "none"))

    def reliability_note(self) -> str:
        """What the model's classes can be trusted for, in plain words (empty when unknown)."""
        if not self.class_support or not self.class_names:
            return ""
        by = {lvl: [n for n in self.class_names.values() if self.class_support.get(n) == lvl]
              for lvl in ("trained", "weak", "none")}
        parts = []
        if by["trained"]:
            parts.append(f"trained with many exact labels for {', '.join(by['trained'])}")
        if by["weak"]:
            parts.append(f"{'only ' if by['trained'] else ''}weakly for {', '.join(by['weak'])} (few exact labels: "
                         "treat these counts as rough)")
        if by["none"]:
            parts.append(f"never for {', '.join(by['none'])}, which it does not output (reported as not measured, "
                         "not as 0)")
        note = f"{self.name}: " + "; ".join(parts) + "."
        if self.min_class_prob > 0:
            note += (f" Nuclei whose class probability is below {self.min_class_prob:g} are written without a class "
                     "(\"Nucleus\").")
        if self.trained_on:
            note += f" Classes were validated on {self.trained_on}; on other tissues (e.g. skin) they are unvalidated."
        return note



_REGISTRY: dict[str, ModelSpec] = {}


def register(spec: ModelSpec) -> ModelSpec:
    """Add a model to the registry (the name must be new)."""
    if spec.name in _REGISTRY:
        raise ValueError(f"model {spec.name!r} already registered")
    _REGISTRY[spec.name] = spec
    return spec


def list_models() -> list[ModelSpec]:
    """All registered models, in registration order."""
    _ensure_builtin()
    return list(_REGISTRY.values())


def get_spec(name: str) -> ModelSpec:
    """The spec of model ``name``; :class:`ModelError` if unknown."""
    _ensure_builtin()
    if name not in _REGISTRY:
        raise ModelError(f"unknown model {name!r}; available: {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


def sha256_of(path: str | Path, chunk: int = 1 << 20) -> str:
    """sha256 hex digest of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def find_weights(spec: ModelSpec, weights: str | Path | None = None) -> Path | None:
    """Where the weights of ``spec`` are: ``weights`` if given, else bundled, else the cache."""
    if not spec.needs_weights:
        if weights is not None:
            raise ModelError(f"model {spec.name!r} has no weights; drop --weights {weights}")
        return None
    if weights is not None:
        p = Path(weights)
        if not p.is_file():
            raise ModelError(f"weights file not found: {p}")
        return p
    from .fetch import default_cache_dir

    for folder in (WEIGHTS_DIR, default_cache_dir()):
        p = folder / spec.weights_file  # type: ignore[operator]
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


def resolve_device(device: str = "auto") -> str:
    """``auto`` -> ``cuda`` when available, else ``cpu``; refuses ``cuda`` without a GPU."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        from ..errors import DeviceError

        build = "a CPU-only build of torch" if torch.version.cuda is None else f"torch built for CUDA {torch.version.cuda}"
        raise DeviceError(f"--device cuda: no CUDA GPU is usable here ({build}); use --device cpu or auto")
    if device not in ("cpu", "cuda"):
        raise ModelError(f"unknown device {device!r} (auto, cpu or cuda)")
    return device


def require_tta(spec: ModelSpec) -> None:
    """Raise :class:`ModelError` unless model ``spec`` supports flip test-time augmentation."""
    if not spec.tta:
        raise ModelError(f"model {spec.name!r} has no test-time augmentation (only network models do)")


def load_model(name: str, *, weights: str | Path | None = None, device: str = "auto", tta: bool = False) -> Any:
    """Build model ``name`` with its weights on ``device``; returns a ``NucleusModel``.

    ``tta`` turns on flip test-time augmentation (network models only).
    """
    spec = get_spec(name)
    path = find_weights(spec, weights)
    if spec.needs_weights and path is None:
        hint = f"pass --weights PATH or run 'wsi-nuclei models fetch {name}'" if spec.url else "pass --weights PATH"
        raise ModelError(f"weights for model {name!r} ({spec.weights_file}) not found: {hint}")
    if path is not None and spec.sha256 and weights is None:
        digest = sha256_of(path)
        if digest != spec.sha256:
            raise ModelError(f"{path}: sha256 {digest[:12]}... does not match the registry ({spec.sha256[:12]}...)")
    if tta:
        require_tta(spec)
    model = spec.builder(spec, path, resolve_device(device))
    if tta:
        model.tta = True
    return model


def default_model_name() -> str:
    """The bundled trained model if its weights are present, else the classical baseline."""
    _ensure_builtin()
    for spec in _REGISTRY.values():
        if spec.bundled and find_weights(spec) is not None:
            return spec.name
    return "classic"


_BUILTIN_DONE = False


def _ensure_builtin() -> None:
    global _BUILTIN_DONE
    if not _BUILTIN_DONE:
        _BUILTIN_DONE = True
        from . import zoo  # noqa: F401  (registers the built-in models)


PANNUKE_CLASSES: dict[int, str] = dict(CLASS_NAMES)

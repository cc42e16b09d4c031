"""The interface every nucleus model implements for the engine.

A model takes a batch of RGB tiles at its own resolution (``spec.mpp``) of size
``spec.input_size`` and returns, per tile, an :class:`InstanceResult` covering the central
``spec.output_size`` x ``spec.output_size`` window (``output_size < input_size`` for
valid-convolution models such as HoVer-Net "fast": 256 in, 164 out).

Inference and post-processing are two calls so that the pipeline can run them as separate
tasks (post-processing of one batch overlaps inference of the next).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

if TYPE_CHECKING:
    from ._registry import ModelSpec


@dataclass
class InstanceResult:
    """Instances found in one tile's output window.

    Attributes
    ----------
    inst : ndarray of int32, shape (output_size, output_size)
        0 = background, 1..N = nuclei (labels need not be consecutive).
    labels : ndarray of int32, shape (N,)
        The instance labels present in ``inst``, in increasing order.
    class_id : ndarray of int8, shape (N,)
        PanNuke class id per instance (0 when the model has no class head).
    class_prob : ndarray of float32, shape (N,)
        Probability of the assigned class (mean over the instance's pixels); for a model
        without classes, the mean nucleus probability.
    class_probs : ndarray of float32, shape (N, 5) or None
        Mean per-class probability (PanNuke classes 1..5, renormalised without background),
        None for a model without a class head.
    """

    inst: np.ndarray
    labels: np.ndarray
    class_id: np.ndarray
    class_prob: np.ndarray
    class_probs: np.ndarray | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class NucleusModel(Protocol):
    """What the pipeline needs from a model (see :mod:`wsi_nuclei.models`)."""

    spec: ModelSpec

    def infer(self, batch: np.ndarray) -> list[dict[str, np.ndarray]]:
        """Run the network on ``batch`` (N, H, W, 3) uint8 RGB; one dict of maps per tile
        (channels first, the model's output window)."""
        ...

    def postprocess(
        self,
        raw: dict[str, np.ndarray],
        origin: tuple[int, int] | None = None,
        shape: tuple[int, int] | None = None,
    ) -> InstanceResult:
        """Turn (blended) maps into instances (pure CPU work, thread-safe); ``origin`` is the
        window's top-left and ``shape`` its size in model px (for a model without maps)."""
        ...

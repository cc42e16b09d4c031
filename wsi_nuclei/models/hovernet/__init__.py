"""HoVer-Net "fast" with the official PanNuke checkpoint: registers ``hovernet-pannuke``.

Importing this package registers the model (its spec holds the 256 -> 164 geometry, the
weights file and its SHA-256) and imports no torch; the parts are

* :mod:`wsi_nuclei.models.hovernet.net`: the network (:class:`HoVerNetFast`), whose module
  names are those of the official checkpoint;
* :mod:`wsi_nuclei.models.hovernet.checkpoint`: verified loading of the checkpoint
  (:func:`load_official_checkpoint`, :func:`load_hovernet_fast`).

The engine runs it through the one map-model wrapper, :class:`wsi_nuclei.models.maps.MapModel`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ...schema import CLASS_NAMES
from .._registry import ModelSpec, register_model
from ..fetch import (
    HOVERNET_PANNUKE_FILENAME,
    HOVERNET_PANNUKE_LICENCE,
    HOVERNET_PANNUKE_NAME,
    HOVERNET_PANNUKE_SHA256,
    HOVERNET_PANNUKE_URL,
)

__all__ = ["SPEC"]


def _build(spec: ModelSpec, weights: Path | None, device: str) -> Any:
    """The registry's builder: the verified network in a :class:`MapModel` on ``device``."""
    from ...errors import ModelError
    from ..maps import MapModel
    from .checkpoint import load_hovernet_fast

    if weights is None:
        raise ModelError(
            f"no weights for {spec.name}: run `wsi-nuclei models fetch {spec.name}` or pass --weights PATH"
        )
    # the registry has verified the cached file itself (or the user chose --weights)
    return MapModel(spec, load_hovernet_fast(weights, expected_sha256=None), device)


#: ``hovernet-pannuke``: the official weights run as published (linear ``hv`` output, float32,
#: channels-last only on CUDA, HoVer-Net's default post-processing thresholds).
SPEC = register_model(
    ModelSpec(
        name=HOVERNET_PANNUKE_NAME,
        description="Official HoVer-Net 'fast' PanNuke checkpoint (256 in, 164 out); weights from the HoVer-Net authors, --weights PATH",
        licence=f"{HOVERNET_PANNUKE_LICENCE} (PanNuke-derived weights)",
        mpp=0.25,
        input_size=256,
        output_size=164,
        class_names=dict(CLASS_NAMES),
        builder=_build,
        weights_file=HOVERNET_PANNUKE_FILENAME,
        sha256=HOVERNET_PANNUKE_SHA256,
        url=HOVERNET_PANNUKE_URL,
        class_support={name: "trained" for name in CLASS_NAMES.values()},
        class_evidence="PanNuke: ~190,000 labelled nuclei of the five classes from 19 tissues (Gamper et al. 2020)",
        trained_on="PanNuke's 19 tissues (20x/40x H&E)",
        hv_tanh=False,
        fp16=False,
        precisions=("fp32", "bf16", "fp16"),  # --precision bf16/fp16 on request only
        channels_last_cpu=False,
        # one patch per call: two calls run at once on 2 cores; on the bench_peers crop 28.6 s
        # and 1,386 MB peak against 30.0 s and 1,964 MB with 2 (docs/benchmarks.md)
        cpu_infer_chunk=1,
    )
)

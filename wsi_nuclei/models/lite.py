"""The bundled default model ``wsi-nuclei-lite0``: registers its spec and builds it.

The network is :class:`wsi_nuclei.models.effunet.EffUNet`; the weights (an fp16 state dict)
are bundled in ``wsi_nuclei/models/weights/`` and checked against :data:`DEFAULT_WEIGHTS_SHA256`
before loading; the engine runs it through :class:`wsi_nuclei.models.maps.MapModel` with the
thresholds of its spec. Importing this module imports no torch.
"""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path
from typing import Any

from ..schema import CLASS_NAMES
from ._registry import ModelSpec, register_model

__all__ = ["DEFAULT_WEIGHTS_FILE", "DEFAULT_WEIGHTS_SHA256", "SPEC"]

#: File name of the bundled default weights (fp16 state dict).
DEFAULT_WEIGHTS_FILE = "wsi-nuclei-lite0-v4.pt"
#: sha256 of the bundled default weights, checked before loading.
DEFAULT_WEIGHTS_SHA256 = "317499aac211c998e82ff201cfd640224ca85c5ed73ae80e971facaeccb1128a"


def _build(spec: ModelSpec, weights: Path | None, device: str) -> Any:
    """The registry's builder: the EffUNet with the weights of ``weights`` in a :class:`MapModel`."""
    import torch

    from ..errors import ModelError
    from .effunet import EffUNet, encoder_of
    from .maps import MapModel

    try:
        with (
            warnings.catch_warnings()
        ):  # torch's notes on odd pickles would add lines to the one-line error
            warnings.simplefilter("ignore")
            sd = torch.load(weights, map_location="cpu", weights_only=True)  # type: ignore[arg-type]
        sd = {k: v.float() for k, v in sd.get("model", sd).items()}
        # background + the spec's classes; the encoder (lite0 or lite1) as the weights have it
        net = EffUNet(n_types=len(spec.class_names) + 1, encoder=encoder_of(sd))
        net.load_state_dict(sd, strict=True)
    except (
        RuntimeError,
        KeyError,
        AttributeError,
        EOFError,
        IndexError,
        ValueError,
        pickle.UnpicklingError,
    ) as exc:
        detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:120]
        raise ModelError(f"{weights}: not a {spec.name} weights file ({detail})") from None
    return MapModel(spec, net, device, weights=weights)


SPEC = register_model(
    ModelSpec(
        name="wsi-nuclei-lite0",
        description="Default. HoVer-Net-style EfficientNet-Lite0 U-Net (3.6M params) trained here on CoNSeP, CRCHisto points, "
        "MoNuSeg, MICCAI15, NuCLS, PanNuke-25 (see docs/model-card.md)",
        licence="CC BY-NC-SA 4.0 (weights: non-commercial research; trained on CC BY-NC-SA / research-only data)",
        mpp=0.25,
        input_size=256,
        output_size=256,
        class_names=dict(CLASS_NAMES),
        builder=_build,
        weights_file=DEFAULT_WEIGHTS_FILE,
        sha256=DEFAULT_WEIGHTS_SHA256,
        bundled=True,
        tta=True,
        # thresholds tuned on the validation split by scripts/tune_postprocess.py (docs/model-card.md)
        postprocess={
            "np_threshold": 0.45,
            "edge_threshold": 0.35,
            "sobel_ksize": 15,
            "min_marker_px": 40,
            "min_nucleus_px": 40,
            "grad_offset": 0.3,
            "class_temperature": 1.0,
        },
        output_border=32,
        precisions=("fp32", "bf16", "fp16", "int8"),
        fuse_batchnorm=True,
        # --precision int8: the full- and half-resolution decoder and the heads' bodies (most of
        # the network's arithmetic) in 8-bit integers; ranges fitted by scripts/calibrate_int8.py
        int8_layers=("up2", "up1", "np_head.body", "hv_head.body", "tp_head.body"),
        int8_calibration="wsi-nuclei-lite0-v4.int8.json",
        bf16_cpu=True,  # validation split through the engine in bfloat16: docs/model-card.md
        class_support={
            "Neoplastic": "weak",
            "Inflammatory": "trained",
            "Connective": "trained",
            "Dead": "none",
            "Epithelial": "weak",
        },
        class_evidence=(
            "exact training labels: Inflammatory 4,507 CoNSeP + 6,970 CRCHisto points; Connective 6,668 CoNSeP "
            "spindle + 5,712 CRCHisto fibroblast points; Neoplastic only 454 (NuCLS tumour, PanNuke-25); "
            "Epithelial none exact (CoNSeP and CRCHisto epithelium is 'Neoplastic or Epithelial', 14,330 nuclei); "
            "Dead none"
        ),
        trained_on="colorectal (CoNSeP, CRCHisto), breast (NuCLS) and multi-organ (MoNuSeg, PanNuke) H&E",
        min_class_prob=0.0,
        hv_tanh=True,  # trained through a tanh (wsi_nuclei.train)
    )
)

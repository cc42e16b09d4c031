"""The built-in models (imported lazily by the registry)."""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path
from typing import Any

from .fetch import HOVERNET_PANNUKE_URL
from .registry import PANNUKE_CLASSES, ModelSpec, register

#: sha256 of the bundled default weights (fp16 state dict), checked before loading.
DEFAULT_WEIGHTS_FILE = "wsi-nuclei-lite0-v3.pt"
DEFAULT_WEIGHTS_SHA256 = "514e18fe30165c963dc9c2f0ddbd53c7da35de9e4fc25f9551bf1e3493470a47"


def _build_classic(spec: ModelSpec, weights: Path | None, device: str) -> Any:
    from .classic import ClassicModel

    return ClassicModel(spec)


def _build_null(spec: ModelSpec, weights: Path | None, device: str) -> Any:
    from .classic import NullModel

    return NullModel(spec)


def _build_lite0(spec: ModelSpec, weights: Path | None, device: str) -> Any:
    import torch

    from ..errors import ModelError
    from .effunet import EffUNet
    from .torchmodel import HoVerMapModel

    net = EffUNet(n_types=6)
    try:
        with warnings.catch_warnings():  # torch's notes on odd pickles would add lines to the one-line error
            warnings.simplefilter("ignore")
            sd = torch.load(weights, map_location="cpu", weights_only=True)
        sd = sd.get("model", sd)
        net.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True)
    except (RuntimeError, KeyError, AttributeError, EOFError, IndexError, ValueError, pickle.UnpicklingError) as exc:
        detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:120]
        raise ModelError(f"{weights}: not a {spec.name} weights file ({detail})") from None
    return HoVerMapModel(spec, net, device, hv_tanh=True, params=spec.hv_params())


def _build_hovernet(spec: ModelSpec, weights: Path | None, device: str) -> Any:
    from .hovernet import HoVerNetPanNuke

    return HoVerNetPanNuke.from_checkpoint(weights, device=device, expected_sha256=None)


register(ModelSpec(
    name="wsi-nuclei-lite0",
    description="Default. HoVer-Net-style EfficientNet-Lite0 U-Net (3.6M params) trained here on CoNSeP, CRCHisto points, "
                "MoNuSeg, MICCAI15, NuCLS, PanNuke-25 (see docs/model-card.md)",
    licence="CC BY-NC-SA 4.0 (weights: non-commercial research; trained on CC BY-NC-SA / research-only data)",
    mpp=0.25, input_size=256, output_size=256, class_names=dict(PANNUKE_CLASSES),
    builder=_build_lite0, weights_file=DEFAULT_WEIGHTS_FILE, sha256=DEFAULT_WEIGHTS_SHA256, bundled=True, tta=True,
    # thresholds tuned on the validation split by scripts/tune_postprocess.py (docs/model-card.md)
    postprocess={"np_threshold": 0.45, "edge_threshold": 0.35, "sobel_ksize": 15, "min_marker_px": 40, "min_nucleus_px": 40,
                 "grad_offset": 0.3, "class_temperature": 1.1},
    output_border=32,
    class_support={"Neoplastic": "weak", "Inflammatory": "trained", "Connective": "trained", "Dead": "none",
                   "Epithelial": "weak"},
    class_evidence=("exact training labels: Inflammatory 4,507 CoNSeP + 6,970 CRCHisto points; Connective 6,668 CoNSeP "
                    "spindle + 5,712 CRCHisto fibroblast points; Neoplastic only 454 (NuCLS tumour, PanNuke-25); "
                    "Epithelial none exact (CoNSeP and CRCHisto epithelium is 'Neoplastic or Epithelial', 14,330 nuclei); "
                    "Dead none"),
    trained_on="colorectal (CoNSeP, CRCHisto), breast (NuCLS) and multi-organ (MoNuSeg, PanNuke) H&E",
    min_class_prob=0.0,
))

register(ModelSpec(
    name="hovernet-pannuke",
    description="Official HoVer-Net 'fast' PanNuke checkpoint (256 in, 164 out); weights from the HoVer-Net authors, --weights PATH",
    licence="CC BY-NC-SA 4.0 (PanNuke-derived weights)",
    mpp=0.25, input_size=256, output_size=164, class_names=dict(PANNUKE_CLASSES),
    builder=_build_hovernet, weights_file="hovernet_fast_pannuke_type_tf2pytorch.tar",
    sha256="4a1463467737f81203a0513f794276cbcbbd6bb470969584f314167c6acef081",
    url=HOVERNET_PANNUKE_URL,
    class_support={name: "trained" for name in PANNUKE_CLASSES.values()},
    class_evidence="PanNuke: ~190,000 labelled nuclei of the five classes from 19 tissues (Gamper et al. 2020)",
    trained_on="PanNuke's 19 tissues (20x/40x H&E)",
))

register(ModelSpec(
    name="classic",
    description="Classical baseline, no weights: haematoxylin deconvolution, fixed threshold, distance-transform watershed; no classes",
    licence="Apache-2.0 (code only)",
    mpp=0.25, input_size=256, output_size=256, class_names={},
    builder=_build_classic,
))

register(ModelSpec(
    name="null",
    description="No network: a fixed pattern of disc nuclei per tile; measures the engine (read, tile, own, measure, write) without model cost",
    licence="Apache-2.0 (code only)",
    mpp=0.25, input_size=256, output_size=256, class_names={},
    builder=_build_null,
))

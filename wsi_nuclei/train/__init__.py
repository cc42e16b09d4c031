"""``wsi-nuclei train``: train the HoVer-Net-style default model on annotated nucleus datasets.

Reads datasets in the shared format or official PanNuke folds (:mod:`wsi_nuclei.datasets`),
resamples them to 0.25 µm/px, and optimises three losses as HoVer-Net does:

* nucleus pixels (``np``): cross-entropy + soft Dice;
* distance maps (``hv``): MSE + MSE of their gradients inside nuclei (MSGE);
* classes (``tp``): partial-label negative log-likelihood: for a nucleus pixel whose class is
  only known to lie in a set A (``allowed`` bitmask, e.g. CoNSeP "epithelial" = Neoplastic or
  Epithelial, unknown = any class), the loss is ``-log(sum_{c in A} p_c)``; background pixels
  have A = {background}. Exact labels are the special case |A| = 1.

Point-labelled datasets (``"annotation": "points"``, e.g. CRCHisto: nucleus centres with a
class) train the class head only: the class loss applies on a small disk around each point
(``point_radius_um``, 1.5 µm by default, inside any nucleus) with the point's allowed set, and
no other pixel of such an image counts for any loss (their nucleus extents are unknown, so the
segmentation losses never see them).

``--class-weight`` gives nucleus pixels whose class is known to within two classes more weight
in the class loss.

Runs are resumable: ``<out>/last.pt`` holds model, optimiser, scheduler, RNG states and the
step; ``--resume`` continues from it. Each epoch prints one validation line. A config may list
``stages`` (e.g. a second stage at a lower learning rate from the first stage's best weights):
one command runs them all, each in ``<out>/<stage name>``.

Modules: ``_data`` (config, items, batches), :mod:`.losses`, ``_loop`` (stages, checkpoints,
validation), :mod:`.options` (the command's options, importable without torch). The names below
load on first use, so that ``wsi-nuclei --help`` does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "DatasetEntry": "_data",
    "SHIFT_MAX": "_data",
    "load_train_config": "_data",
    "make_batch": "_data",
    "point_label_map": "_data",
    "hovernet_loss": "losses",
    "partial_label_nll": "losses",
    "shift_consistency_loss": "losses",
    "main": "_loop",
    "train": "_loop",
    "validate": "_loop",
    "validation_score": "_loop",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

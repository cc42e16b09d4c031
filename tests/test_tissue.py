"""Tests for wsi_nuclei.tissue: tissue masks, tissue regions, whole-slide detection."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from shapely.geometry import Polygon
from skimage.draw import disk

from wsi_nuclei.errors import NoTissueError
from wsi_nuclei.regions import rasterize_regions
from wsi_nuclei.tissue import (
    TissueMap,
    detect_tissue,
    detect_tissue_on_slide,
    regions_from_mask,
    tissue_mask,
)

GLASS = (242, 240, 243)
PINK = (225, 130, 180)  # eosin-rich H&E
PURPLE = (140, 80, 160)  # hematoxylin-rich H&E
GREEN_INK = (40, 150, 110)
BLUE_INK = (35, 55, 190)


def _glass(h: int = 160, w: int = 200, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = np.empty((h, w, 3), np.float64)
    img[:] = GLASS
    img += rng.normal(0, 2.0, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def _paint_disk(img: np.ndarray, center: tuple[int, int], radius: float, color) -> int:
    rr, cc = disk(center, radius, shape=img.shape[:2])
    img[rr, cc] = color
    return len(rr)


# --------------------------------------------------------------------------------------------
# tissue_mask / detect_tissue on synthetic thumbnails
# --------------------------------------------------------------------------------------------
def test_two_blobs_give_two_regions_with_ids_and_areas() -> None:
    img = _glass()
    # the lower blob is further left: ordering must follow the top of the bounding box
    n_top = _paint_disk(img, (40, 140), 22, PINK)
    n_low = _paint_disk(img, (110, 50), 30, PURPLE)
    ds = 16.0
    regions = detect_tissue(img, ds)
    assert [r.id for r in regions] == [1, 2]
    assert [r.name for r in regions] == ["Tissue 1", "Tissue 2"]
    assert all(r.source == "tissue" and r.geometry.is_valid for r in regions)
    top, low = regions
    assert top.geometry.centroid.x == pytest.approx(140.5 * ds, abs=ds)
    assert top.geometry.centroid.y == pytest.approx(40.5 * ds, abs=ds)
    assert low.geometry.centroid.x == pytest.approx(50.5 * ds, abs=ds)
    for region, n_px, radius in ((top, n_top, 22), (low, n_low, 30)):
        assert region.area_px == pytest.approx(n_px * ds * ds, rel=0.03)
        assert region.area_px == pytest.approx(math.pi * radius**2 * ds * ds, rel=0.04)


def test_anisotropic_downsample_and_mask_pixel_frame() -> None:
    mask = np.zeros((20, 30), bool)
    mask[5:10, 10:20] = True
    (region,) = regions_from_mask(mask, (2.0, 3.0), simplify_px=0)
    xmin, ymin, xmax, ymax = region.bounds
    # pixel (row, col) covers [col*dx, (col+1)*dx) x [row*dy, (row+1)*dy); contours cut the
    # corners by half a pixel at most
    assert xmin == pytest.approx(20.0, abs=1.0) and xmax == pytest.approx(40.0, abs=1.0)
    assert ymin == pytest.approx(15.0, abs=1.5) and ymax == pytest.approx(30.0, abs=1.5)
    assert region.area_px == pytest.approx(50 * 6.0, rel=0.03)


def test_holes_are_kept_and_small_holes_filled() -> None:
    img = _glass()
    _paint_disk(img, (80, 100), 50, PINK)
    _paint_disk(img, (80, 100), 15, GLASS)  # a lumen: 700 px, kept as a hole
    _paint_disk(img, (80, 135), 2, GLASS)  # a speck: 13 px, filled
    (region,) = detect_tissue(img, 1.0)
    assert isinstance(region.geometry, Polygon)
    assert len(region.geometry.interiors) == 1
    hole = Polygon(region.geometry.interiors[0])
    assert hole.area == pytest.approx(math.pi * 15**2, rel=0.06)
    assert region.area_px == pytest.approx(math.pi * (50**2 - 15**2), rel=0.03)


def test_all_white_and_constant_images_have_no_tissue() -> None:
    white = np.full((64, 80, 3), 255, np.uint8)
    assert not tissue_mask(white).any()
    with pytest.raises(NoTissueError) as info:
        detect_tissue(white, 4.0)
    assert "\n" not in str(info.value)
    assert not tissue_mask(np.full((64, 80, 3), 240, np.uint8)).any()
    assert not tissue_mask(_glass()).any()
    assert not tissue_mask(np.zeros((0, 0, 3), np.uint8)).any()


def test_constant_tissue_colour_is_all_tissue() -> None:
    # no background at all: Otsu must not split the stain; saturation is constant here
    assert tissue_mask(np.full((40, 50, 3), PINK, np.uint8)).all()


def test_black_artefact_and_pen_ink_are_excluded() -> None:
    img = _glass()
    _paint_disk(img, (40, 50), 20, PINK)
    _paint_disk(img, (40, 140), 20, GREEN_INK)
    _paint_disk(img, (115, 50), 20, BLUE_INK)
    _paint_disk(img, (115, 140), 20, (15, 15, 25))  # black/dark blue artefact
    mask = tissue_mask(img)
    assert mask[40, 50] and mask.sum() == pytest.approx(math.pi * 400, rel=0.05)
    regions = detect_tissue(img, 8.0)
    assert len(regions) == 1
    assert regions[0].geometry.centroid.x == pytest.approx(50.5 * 8, abs=8)
    # without ink exclusion the coloured ink blobs count as stained tissue
    assert len(detect_tissue(img, 8.0, exclude_ink=False)) == 3


def test_ink_drawn_across_tissue_is_cut_out() -> None:
    img = _glass()
    _paint_disk(img, (80, 100), 60, PINK)
    img[75:85, 20:180] = GREEN_INK
    img[20:140, 95:103] = BLUE_INK
    mask = tissue_mask(img)
    assert not mask[80, 60] and not mask[50, 99]
    assert mask[50, 60] and mask[110, 140]
    assert len(regions_from_mask(mask, 1.0)) == 4


def test_pale_bluish_tissue_is_kept() -> None:
    """Weakly saturated bluish tissue (like kidney-48-5.tif) is tissue, not ink."""
    img = _glass()
    _paint_disk(img, (80, 100), 25, (150, 160, 195))  # hue ~226 deg, saturation ~0.23
    assert len(detect_tissue(img, 1.0)) == 1


def test_min_region_um2_needs_mpp_and_filters() -> None:
    img = _glass()
    _paint_disk(img, (40, 50), 25, PINK)  # ~1960 px
    _paint_disk(img, (120, 150), 8, PINK)  # ~200 px
    ds, mpp = 16.0, 0.5  # 8 um per thumbnail px -> 64 um^2 per px
    assert len(detect_tissue(img, ds)) == 2
    kept = detect_tissue(img, ds, min_region_um2=400 * 64.0, mpp=mpp)
    assert len(kept) == 1 and kept[0].id == 1
    with pytest.raises(ValueError):
        detect_tissue(img, ds, min_region_um2=1000.0)


def test_rgba_and_float_input() -> None:
    img = _glass()
    _paint_disk(img, (80, 100), 30, PINK)
    rgba = np.dstack([img, np.full(img.shape[:2], 255, np.uint8)])
    rgba[:, :20, 3] = 0
    rgba[:, :20, :3] = 0  # transparent black (OpenSlide outside the scanned area)
    m = tissue_mask(rgba)
    assert m.any() and not m[:, :20].any()
    assert np.array_equal(tissue_mask(img.astype(np.float64) / 255.0), tissue_mask(img))
    with pytest.raises(ValueError):
        tissue_mask(np.zeros((10, 10), np.uint8))


# --------------------------------------------------------------------------------------------
# TissueMap and the slide wrapper
# --------------------------------------------------------------------------------------------
def test_fraction_in_box_matches_brute_force() -> None:
    rng = np.random.default_rng(1)
    mask = rng.random((23, 31)) > 0.6
    ds = 4
    tmap = TissueMap(mask=mask, downsample=float(ds), regions=())
    full = np.kron(mask, np.ones((ds, ds), bool))  # level-0 resolution
    for _ in range(200):
        x0, x1 = np.sort(rng.integers(-10, full.shape[1] + 10, 2))
        y0, y1 = np.sort(rng.integers(-10, full.shape[0] + 10, 2))
        if x1 == x0 or y1 == y0:
            continue
        inside = full[max(y0, 0) : max(y1, 0), max(x0, 0) : max(x1, 0)].sum()
        expected = inside / ((x1 - x0) * (y1 - y0))
        assert tmap.fraction_in_box(x0, y0, x1, y1) == pytest.approx(expected, abs=1e-9)
    # vectorised form
    xs0 = np.array([0, 10, 50])
    ys0 = np.array([0, 5, 20])
    vec = tmap.fraction_in_box(xs0, ys0, xs0 + 32, ys0 + 16)
    assert isinstance(vec, np.ndarray) and vec.shape == (3,)
    for k in range(3):
        one = tmap.fraction_in_box(xs0[k], ys0[k], xs0[k] + 32, ys0[k] + 16)
        assert vec[k] == pytest.approx(one)
    assert tmap.fraction_in_box(0, 0, full.shape[1], full.shape[0]) == pytest.approx(mask.mean())
    assert tmap.fraction_in_box(-100, -100, -1, -1) == 0.0
    assert tmap.fraction_in_box(5, 5, 5, 9) == 0.0


def test_fraction_in_box_partial_pixels() -> None:
    mask = np.zeros((4, 4), bool)
    mask[1, 1] = True  # level-0 [10, 20) x [10, 20)
    tmap = TissueMap(mask=mask, downsample=10.0, regions=())
    assert tmap.fraction_in_box(15, 15, 25, 25) == pytest.approx(0.25)
    assert tmap.fraction_in_box(19.5, 10, 20.5, 11) == pytest.approx(0.5)
    assert tmap.fraction_in_box(20, 0, 40, 40) == 0.0


class _FakeSlide:
    """Minimal slide: ``get_thumbnail`` takes the longest side (an int) only."""

    def __init__(self, image: np.ndarray, level0_scale: int, mpp: float | None) -> None:
        self._image = image
        self.dimensions = (image.shape[1] * level0_scale, image.shape[0] * level0_scale)
        self.mpp = mpp
        self.requested: list[int] = []

    def get_thumbnail(self, max_size: int) -> np.ndarray:
        if not isinstance(max_size, int):
            raise TypeError("max_size must be an int")
        self.requested.append(max_size)
        h, w = self._image.shape[:2]
        step = max(1, math.ceil(max(h, w) / max_size))
        return self._image[::step, ::step]


def test_detect_tissue_on_slide_with_fake_slide() -> None:
    img = _glass(320, 400)
    _paint_disk(img, (80, 100), 40, PINK)
    _paint_disk(img, (220, 300), 50, PURPLE)
    # level 0 is 8x the image at 0.25 um/px -> image px = 2 um; target 8 um -> step 4
    slide = _FakeSlide(img, 8, mpp=0.25)
    tmap = detect_tissue_on_slide(slide)
    assert slide.requested == [100]
    assert tmap.mask.shape == (80, 100)
    assert tmap.downsample == pytest.approx(32.0)
    assert [r.name for r in tmap.regions] == ["Tissue 1", "Tissue 2"]
    expected = (math.pi * 40**2 + math.pi * 50**2) / (320 * 400)
    assert tmap.tissue_fraction == pytest.approx(expected, rel=0.08)
    w, h = slide.dimensions
    assert tmap.fraction_in_box(0, 0, w, h) == pytest.approx(tmap.tissue_fraction)
    # a tile in the middle of blob 2 is full of tissue, one in a corner has none
    cx, cy = 300 * 8, 220 * 8
    assert tmap.fraction_in_box(cx - 64, cy - 64, cx + 64, cy + 64) == pytest.approx(1.0)
    assert tmap.fraction_in_box(0, 0, 256, 256) == 0.0
    # regions agree with the mask
    area = sum(r.area_px for r in tmap.regions)
    assert area == pytest.approx(tmap.mask.sum() * tmap.downsample**2, rel=0.05)


def test_detect_tissue_on_slide_empty() -> None:
    slide = _FakeSlide(_glass(), 4, mpp=None)
    with pytest.raises(NoTissueError):
        detect_tissue_on_slide(slide)
    tmap = detect_tissue_on_slide(slide, allow_empty=True)
    assert tmap.regions == () and not tmap.mask.any()
    assert tmap.fraction_in_box(0, 0, 100, 100) == 0.0


def test_rasterize_regions_round_trip() -> None:
    img = _glass()
    _paint_disk(img, (80, 100), 50, PINK)
    _paint_disk(img, (80, 100), 15, GLASS)
    mask = tissue_mask(img)
    regions = regions_from_mask(mask, 4.0)
    back = rasterize_regions(regions, mask.shape, 4.0)
    assert not back[80, 100]  # hole stays empty
    assert (back != mask).sum() <= 0.03 * mask.sum()


# --------------------------------------------------------------------------------------------
# Real slides
# --------------------------------------------------------------------------------------------
class _OpenSlideAdapter:
    """openslide object + mpp (the project's Slide has ``mpp``; openslide has properties)."""

    def __init__(self, path: Path) -> None:
        openslide = pytest.importorskip("openslide")
        self._slide = openslide.open_slide(str(path))
        self.dimensions = self._slide.dimensions
        mpp = self._slide.properties.get("openslide.mpp-x")
        self.mpp = float(mpp) if mpp else None

    def get_thumbnail(self, size: tuple[int, int]):
        return self._slide.get_thumbnail(size)


def test_cmu_small_region_mostly_tissue(wsi_dir: Path) -> None:
    slide = _OpenSlideAdapter(wsi_dir / "CMU-1-Small-Region.svs")
    assert slide.mpp == pytest.approx(0.499, abs=1e-3)
    tmap = detect_tissue_on_slide(slide)
    # a skin biopsy strip filling about a third to a half of the field
    assert 0.25 < tmap.tissue_fraction < 0.65
    assert tmap.downsample == pytest.approx(8.0 / 0.499, rel=0.02)
    assert all(r.geometry.is_valid and not r.geometry.is_empty for r in tmap.regions)
    largest = max(tmap.regions, key=lambda r: r.area_px)
    w, h = slide.dimensions
    assert largest.area_px > 0.8 * sum(r.area_px for r in tmap.regions)
    assert largest.area_px / (w * h) == pytest.approx(tmap.tissue_fraction, rel=0.15)
    # the bottom centre is tissue, the top-left corner glass
    assert tmap.fraction_in_box(900, 2700, 1156, 2956) > 0.9
    assert tmap.fraction_in_box(0, 300, 256, 556) == 0.0
    # a finer thumbnail agrees on the fraction
    fine = tissue_mask(np.asarray(slide.get_thumbnail((555, 742)).convert("RGB")))
    assert fine.mean() == pytest.approx(tmap.tissue_fraction, abs=0.08)


def test_kidney_one_small_bluish_fragment(wsi_dir: Path) -> None:
    slide = _OpenSlideAdapter(wsi_dir / "kidney-48-5.tif")  # Pillow fallback, no mpp
    assert slide.mpp is None
    tmap = detect_tissue_on_slide(slide)
    assert len(tmap.regions) == 1
    (region,) = tmap.regions
    w, h = slide.dimensions
    assert 0.001 < region.area_px / (w * h) < 0.01
    xmin, ymin, xmax, ymax = region.bounds
    # the fragment lies left of centre, a bit below the middle
    assert 250 < xmin < xmax < 450 and 470 < ymin < ymax < 600


def test_tcga_frozen_section(wsi_dir: Path) -> None:
    slide = _OpenSlideAdapter(wsi_dir / "tcga-cr-7395-01a-01-ts1.svs")  # no mpp
    tmap = detect_tissue_on_slide(slide, fallback_thumbnail_px=512)
    assert max(tmap.mask.shape) == 512
    assert 0.45 < tmap.tissue_fraction < 0.8
    largest = max(tmap.regions, key=lambda r: r.area_px)
    assert largest.id == 1 and largest.area_px > 0.95 * sum(r.area_px for r in tmap.regions)
    assert len(largest.geometry.interiors) >= 1  # the tear in the middle is a hole


def _dicom_thumbnail(path: Path, step: int) -> np.ndarray:
    pydicom = pytest.importorskip("pydicom")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(str(path))
        frames = ds.pixel_array
    rows, cols = int(ds.TotalPixelMatrixRows), int(ds.TotalPixelMatrixColumns)
    fh, fw = frames.shape[1:3]
    n_rows = math.ceil(rows / fh)
    image = np.zeros((n_rows * fh, math.ceil(cols / fw) * fw, 3), np.uint8)
    for k, frame in enumerate(frames):  # column-major frame order (see wsi/README.md)
        c, r = divmod(k, n_rows)
        image[r * fh : (r + 1) * fh, c * fw : (c + 1) * fw] = frame
    image = image[:rows, :cols]
    h, w = (rows // step) * step, (cols // step) * step
    return (
        image[:h, :w]
        .reshape(h // step, step, w // step, step, 3)
        .mean(axis=(1, 3))
        .astype(np.uint8)
    )


def test_dicom_pen_marks_excluded(wsi_dir: Path) -> None:
    from wsi_nuclei.tissue import _hsv

    thumb = _dicom_thumbnail(wsi_dir / "small_dicom.dcm", 2)  # ~9 um/px
    hue, sat, _ = _hsv(thumb)
    green_ink = (hue > 140) & (hue < 190) & (sat > 0.4)
    assert green_ink.mean() > 0.02  # the slide does carry green marker
    mask = tissue_mask(thumb)
    raw = tissue_mask(thumb, exclude_ink=False)
    assert 0.3 < mask.mean() < 0.6
    assert (mask & green_ink).sum() < 0.01 * green_ink.sum()
    assert (raw & green_ink).sum() > 0.5 * green_ink.sum()
    regions = regions_from_mask(mask, 2.0)
    assert all(r.geometry.is_valid for r in regions)
    assert [r.id for r in regions] == list(range(1, len(regions) + 1))
    tops = [(r.bounds[1], r.bounds[0]) for r in regions]
    assert all(t[0] >= s[0] - 2 for s, t in zip(tops, tops[1:]))

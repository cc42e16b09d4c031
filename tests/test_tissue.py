"""Tests for wsi_nuclei.tissue: tissue masks, tissue regions, QuPath regions, assignment."""

from __future__ import annotations

import gzip
import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import shapely
from shapely.geometry import MultiPolygon, Polygon, box
from skimage.draw import disk

from wsi_nuclei.errors import NoTissueError, RegionsFileError
from wsi_nuclei.tissue import (
    Region,
    TissueMap,
    assign_regions,
    detect_tissue,
    detect_tissue_on_slide,
    load_regions,
    rasterize_regions,
    regions_from_geojson,
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
    return image[:h, :w].reshape(h // step, step, w // step, step, 3).mean(axis=(1, 3)).astype(
        np.uint8
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


# --------------------------------------------------------------------------------------------
# load_regions
# --------------------------------------------------------------------------------------------
def _feature(geometry: dict, **props) -> dict:
    return {
        "type": "Feature",
        "id": "5c2b7a5e-0000-4000-8000-000000000000",
        "geometry": geometry,
        "properties": {"objectType": "annotation", **props},
    }


def _qupath_features() -> list[dict]:
    square_with_hole = {
        "type": "Polygon",
        "coordinates": [
            [[0, 0], [100, 0], [100, 100], [0, 100], [0, 0]],
            [[25, 25], [75, 25], [75, 75], [25, 75], [25, 25]],
        ],
    }
    two_squares = {
        "type": "MultiPolygon",
        "coordinates": [
            [[[200, 0], [250, 0], [250, 50], [200, 50], [200, 0]]],
            [[[300, 0], [340, 0], [340, 40], [300, 40], [300, 0]]],
        ],
    }
    return [
        _feature(
            square_with_hole,
            name="Tumour core",
            classification={"name": "Tumor", "color": [200, 0, 0]},
            isLocked=False,
        ),
        {  # a detection from a previous run: ignored
            "type": "Feature",
            "geometry": {"type": "Polygon", "coordinates": [[[1, 1], [2, 1], [2, 2], [1, 1]]]},
            "properties": {"objectType": "detection"},
        },
        _feature(two_squares, classification={"name": "Stroma", "color": [150, 200, 150]}),
        _feature({"type": "Point", "coordinates": [5, 5]}, name="a point"),
        _feature({"type": "LineString", "coordinates": [[0, 0], [9, 9]]}),
        _feature(
            {"type": "Polygon", "coordinates": [[[0, 200], [60, 200], [60, 260], [0, 260]]]},
            classification="Immune cells",
        ),  # unclosed ring: QuPath-lenient, repaired
    ]


def _check_qupath_regions(regions: list[Region]) -> None:
    assert [r.id for r in regions] == [1, 2, 3]
    assert [r.name for r in regions] == ["Tumour core", "Stroma", "Immune cells"]
    assert [r.classification for r in regions] == ["Tumor", "Stroma", "Immune cells"]
    assert [r.color for r in regions] == [(200, 0, 0), (150, 200, 150), None]
    assert all(r.source == "user" and r.geometry.is_valid for r in regions)
    core, stroma, immune = regions
    assert isinstance(core.geometry, Polygon) and len(core.geometry.interiors) == 1
    assert core.area_px == pytest.approx(100 * 100 - 50 * 50)
    assert isinstance(stroma.geometry, MultiPolygon) and len(stroma.geometry.geoms) == 2
    assert stroma.area_px == pytest.approx(50 * 50 + 40 * 40)
    assert immune.area_px == pytest.approx(3600)


def test_load_regions_array_form(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "regions.json"
    path.write_text(json.dumps(_qupath_features(), indent=2))
    with caplog.at_level(logging.WARNING, logger="wsi_nuclei.tissue"):
        regions = load_regions(path)
    _check_qupath_regions(regions)
    assert "ignored 1 detection" in caplog.text and "2 feature(s) without an area" in caplog.text


def test_load_regions_feature_collection_gz(tmp_path: Path) -> None:
    path = tmp_path / "regions.geojson.gz"
    doc = {"type": "FeatureCollection", "features": _qupath_features()}
    path.write_bytes(gzip.compress(json.dumps(doc).encode()))
    _check_qupath_regions(load_regions(path))
    plain = tmp_path / "regions.geojson"
    plain.write_text(json.dumps(doc))
    _check_qupath_regions(load_regions(str(plain)))


def test_load_regions_single_feature_offset_and_names(tmp_path: Path) -> None:
    path = tmp_path / "one.geojson"
    feat = _feature({"type": "Polygon", "coordinates": [[[0, 0], [10, 0], [10, 10], [0, 0]]]})
    del feat["properties"]["objectType"]  # annotation by default
    path.write_text(json.dumps(feat))
    (region,) = load_regions(path, offset=(100.0, -5.0))
    assert region.name == "Region 1" and region.classification is None and region.color is None
    assert region.bounds == pytest.approx((100.0, -5.0, 110.0, 5.0))
    # derived classes (QuPath "names") and packed integer colours
    doc = [
        _feature(
            {"type": "Polygon", "coordinates": [[[0, 0], [10, 0], [10, 10], [0, 0]]]},
            classification={"names": ["Tumor", "Positive"], "color": -65536},
        )
    ]
    (region,) = regions_from_geojson(doc)
    assert region.classification == "Tumor: Positive" and region.color == (255, 0, 0)


def test_load_regions_repairs_a_bow_tie(tmp_path: Path) -> None:
    path = tmp_path / "bowtie.geojson"
    bow = {"type": "Polygon", "coordinates": [[[0, 0], [10, 10], [10, 0], [0, 10], [0, 0]]]}
    path.write_text(json.dumps([_feature(bow)]))
    (region,) = load_regions(path)
    assert region.geometry.is_valid and region.area_px == pytest.approx(50.0)


@pytest.mark.parametrize(
    ("name", "content", "fragment"),
    [
        ("empty.geojson", b"", "empty"),
        ("garbage.geojson", b"{not json,,", "not valid JSON"),
        ("binary.geojson", b"\xff\xfe\x00\x81\x92", "not UTF-8"),
        ("notgeo.json", json.dumps({"foo": 1}).encode(), "not GeoJSON"),
        ("number.json", b"42", "not GeoJSON"),
        ("nofeatures.geojson", json.dumps({"type": "FeatureCollection"}).encode(), "features"),
        (
            "emptyfc.geojson",
            json.dumps({"type": "FeatureCollection", "features": []}).encode(),
            "no features",
        ),
        (
            "onlydetections.geojson",
            json.dumps(
                [
                    {
                        "type": "Feature",
                        "geometry": {
                            "type": "Polygon",
                            "coordinates": [[[0, 0], [5, 0], [5, 5], [0, 0]]],
                        },
                        "properties": {"objectType": "detection"},
                    }
                ]
            ).encode(),
            "no polygon annotations",
        ),
        (
            "short_ring.geojson",
            json.dumps(
                [_feature({"type": "Polygon", "coordinates": [[[0, 0], [5, 0], [0, 0]]]})]
            ).encode(),
            "feature 1",
        ),
        (
            "flat.geojson",
            json.dumps(
                [_feature({"type": "Polygon", "coordinates": [[[0, 0], [5, 0], [9, 0], [0, 0]]]})]
            ).encode(),
            "cannot be repaired",
        ),
        (
            "nan.geojson",
            b'[{"type": "Feature", "geometry": {"type": "Polygon", "coordinates": '
            b"[[[0, 0], [NaN, 0], [5, 5], [0, 0]]]}, \"properties\": {}}]",
            "non-finite",
        ),
        (
            "badtype.geojson",
            json.dumps([_feature({"type": "Circle", "coordinates": [0, 0]})]).encode(),
            "unknown geometry type",
        ),
        ("notfeature.geojson", json.dumps([1, 2]).encode(), "not a GeoJSON Feature"),
        ("bad.geojson.gz", b"\x1f\x8b\x08\x00garbage", "gzip"),
        ("plain.geojson.gz", json.dumps([]).encode(), "not gzip"),
    ],
)
def test_malformed_regions_files(tmp_path: Path, name: str, content: bytes, fragment: str) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(RegionsFileError) as info:
        load_regions(path)
    message = str(info.value)
    assert "\n" not in message
    assert str(path) in message
    assert fragment in message


def test_missing_regions_file(tmp_path: Path) -> None:
    with pytest.raises(RegionsFileError, match="not found"):
        load_regions(tmp_path / "nope.geojson")


# --------------------------------------------------------------------------------------------
# assign_regions
# --------------------------------------------------------------------------------------------
def _region(rid: int, geom) -> Region:
    return Region(
        id=rid, name=f"R{rid}", geometry=geom, source="user", classification=None, color=None
    )


def test_assign_regions_hand_placed_points() -> None:
    donut = Polygon(
        [(0, 0), (100, 0), (100, 100), (0, 100)], [[(40, 40), (60, 40), (60, 60), (40, 60)]]
    )
    regions = [
        _region(1, donut),
        _region(2, box(80, 80, 150, 150)),  # overlaps the donut's corner
        _region(3, MultiPolygon([box(200, 0, 210, 10), box(220, 0, 230, 10)])),
    ]
    pts = {
        (10, 10): 1,
        (50, 50): -1,  # in the donut's hole
        (90, 90): 1,  # overlap: first region wins
        (120, 120): 2,
        (205, 5): 3,
        (225, 5): 3,
        (215, 5): -1,  # between the two parts of the MultiPolygon
        (-5, 50): -1,
        (100, 50): 1,  # on the boundary
    }
    x = np.array([p[0] for p in pts], float)
    y = np.array([p[1] for p in pts], float)
    out = assign_regions(x, y, regions)
    assert out.dtype == np.int32
    assert out.tolist() == list(pts.values())
    # order matters where regions overlap
    assert assign_regions([90.0], [90.0], [regions[1], regions[0]]).tolist() == [2]
    # shape is kept; empty inputs
    grid = assign_regions(x.reshape(3, 3), y.reshape(3, 3), regions)
    assert grid.shape == (3, 3) and grid.ravel().tolist() == list(pts.values())
    assert assign_regions(x, y, []).tolist() == [-1] * len(pts)
    assert assign_regions(np.array([]), np.array([]), regions).shape == (0,)


def test_assign_regions_many_points_matches_scalar_test() -> None:
    rng = np.random.default_rng(3)
    regions = [
        _region(1, Polygon([(0, 0), (400, 50), (300, 400), (50, 300)])),
        _region(2, box(250, 250, 500, 500)),
    ]
    x = rng.uniform(-50, 550, 5000)
    y = rng.uniform(-50, 550, 5000)
    out = assign_regions(x, y, regions)
    p0 = shapely.intersects_xy(regions[0].geometry, x, y)
    p1 = shapely.intersects_xy(regions[1].geometry, x, y)
    expected = np.where(p0, 1, np.where(p1, 2, -1))
    assert np.array_equal(out, expected)


def test_region_is_frozen() -> None:
    r = _region(1, box(0, 0, 2, 3))
    assert r.area_px == 6.0
    with pytest.raises(AttributeError):
        r.id = 2  # type: ignore[misc]


# --------------------------------------------------------------------------------------------
# fuzzing the regions parser: any JSON is either regions or one RegionsFileError
# --------------------------------------------------------------------------------------------
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_fz_num = st.one_of(st.integers(-10**6, 10**6), st.floats(allow_nan=True, allow_infinity=True), st.none(), st.text(max_size=3))
_fz_coord = st.lists(_fz_num, min_size=0, max_size=3)
_fz_ring = st.lists(_fz_coord, min_size=0, max_size=8)
_fz_geom = st.one_of(
    st.fixed_dictionaries({"type": st.sampled_from(["Polygon", "MultiPolygon", "Point", "LineString", "GeometryCollection", "Bogus", 7]),
                           "coordinates": st.one_of(st.lists(_fz_ring, max_size=3), st.lists(st.lists(_fz_ring, max_size=2), max_size=2), _fz_num)}),
    _fz_num, st.lists(_fz_num, max_size=3),
)
_fz_props = st.one_of(st.none(), _fz_num, st.fixed_dictionaries({}, optional={
    "objectType": st.one_of(st.sampled_from(["annotation", "detection", "cell", "tile"]), _fz_num),
    "name": st.one_of(st.text(max_size=10), _fz_num),
    "classification": st.one_of(st.fixed_dictionaries({}, optional={"name": st.one_of(st.text(max_size=5), _fz_num),
                                                                   "color": st.one_of(st.lists(_fz_num, max_size=4), _fz_num)}), _fz_num),
    "isLocked": st.booleans()}))
_fz_feature = st.one_of(st.fixed_dictionaries({"type": st.just("Feature")}, optional={"geometry": _fz_geom, "properties": _fz_props,
                                                                                  "id": st.one_of(st.text(max_size=8), _fz_num)}), _fz_num, _fz_geom)
_fz_doc = st.one_of(_fz_feature, st.lists(_fz_feature, max_size=4),
                 st.fixed_dictionaries({"type": st.sampled_from(["FeatureCollection", "Feature", "Nope"])},
                                       optional={"features": st.one_of(st.lists(_fz_feature, max_size=4), _fz_num)}))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_fz_doc)
def test_regions_parser_never_raises_anything_else(doc) -> None:
    from wsi_nuclei.errors import RegionsFileError
    from wsi_nuclei.tissue import Region, regions_from_geojson

    try:
        out = regions_from_geojson(doc)
    except RegionsFileError as exc:
        assert str(exc) and "\n" not in str(exc)
        return
    assert out and all(isinstance(r, Region) and r.geometry.is_valid and not r.geometry.is_empty for r in out)


@settings(max_examples=60, deadline=None)
@given(st.binary(max_size=300))
def test_regions_file_of_random_bytes(tmp_path_factory, data: bytes) -> None:
    from wsi_nuclei.errors import RegionsFileError
    from wsi_nuclei.tissue import load_regions

    p = tmp_path_factory.mktemp("fz") / "r.geojson"
    p.write_bytes(data)
    try:
        load_regions(p)
    except RegionsFileError:
        pass

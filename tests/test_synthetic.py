"""Tests for the synthetic fixtures of wsi_nuclei.demo: nuclei images, pyramidal TIFFs and the procedural slide."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage
from skimage.color import rgb2hed
from skimage.filters import threshold_otsu

from wsi_nuclei.demo import (
    NUCLEUS_DTYPE,
    SyntheticSlide,
    make_nuclei_image,
    write_pyramidal_tiff,
)
from wsi_nuclei.slide import open_slide, scale_info

# ---- make_nuclei_image -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def nuclei() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return make_nuclei_image(300, 360, seed=11, margin=3)


def test_image_and_table_agree(nuclei: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    rgb, inst, table = nuclei
    assert rgb.shape == (300, 360, 3) and rgb.dtype == np.uint8
    assert inst.shape == (300, 360) and inst.dtype == np.int32
    assert table.dtype == NUCLEUS_DTYPE
    n = len(table)
    assert 50 < n < 400
    np.testing.assert_array_equal(table["label"], np.arange(1, n + 1))
    assert set(np.unique(inst)) == set(range(n + 1))
    idx = np.arange(1, n + 1)
    np.testing.assert_array_equal(ndimage.sum(np.ones_like(inst), inst, idx), table["area"])
    cy, cx = np.array(ndimage.center_of_mass(np.ones_like(inst), inst, idx)).T
    np.testing.assert_allclose(table["centroid_x"], cx)
    np.testing.assert_allclose(table["centroid_y"], cy)
    for rec, sl in zip(table, ndimage.find_objects(inst)):
        assert (rec["bbox_y0"], rec["bbox_y1"]) == (sl[0].start, sl[0].stop)
        assert (rec["bbox_x0"], rec["bbox_x1"]) == (sl[1].start, sl[1].stop)
    # Nuclear area fraction is near the default density.
    assert 0.08 < (inst > 0).mean() < 0.2


def test_nuclei_do_not_touch(nuclei: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    _, inst, table = nuclei
    _, n_comp = ndimage.label(inst > 0, structure=np.ones((3, 3)))
    assert n_comp == len(table)  # every nucleus is its own 8-connected component
    # At least 2 background pixels between nuclei: growing a nucleus by 2 px hits nobody.
    for k, sl in enumerate(ndimage.find_objects(inst), start=1):
        ys = slice(max(sl[0].start - 2, 0), sl[0].stop + 2)
        xs = slice(max(sl[1].start - 2, 0), sl[1].stop + 2)
        win = inst[ys, xs]
        grown = ndimage.maximum_filter(win == k, size=5)
        assert set(np.unique(win[grown])) <= {0, k}
    # The margin is respected.
    assert not inst[:3].any() and not inst[-3:].any()
    assert not inst[:, :3].any() and not inst[:, -3:].any()


def test_deterministic_and_seeded() -> None:
    a = make_nuclei_image(96, 128, seed=4)
    b = make_nuclei_image(96, 128, seed=4)
    c = make_nuclei_image(96, 128, seed=5)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a[0], c[0])


def test_requested_count_and_radii() -> None:
    _, inst, table = make_nuclei_image(256, 256, n_nuclei=25, seed=2, min_radius=5, max_radius=8)
    assert len(table) == 25 and inst.max() == 25
    assert table["area"].min() >= np.pi * 5 * 5 * 0.55 * 0.8
    assert table["area"].max() <= np.pi * 8 * 8 * 1.2
    empty_rgb, empty_inst, empty = make_nuclei_image(64, 64, n_nuclei=0)
    assert len(empty) == 0 and not empty_inst.any() and empty_rgb.shape == (64, 64, 3)


def test_haematoxylin_threshold_separates(
    nuclei: tuple[np.ndarray, np.ndarray, np.ndarray],
) -> None:
    rgb, inst, _ = nuclei
    h = rgb2hed(rgb)[..., 0]
    fg = h > threshold_otsu(h)
    truth = inst > 0
    iou = (fg & truth).sum() / (fg | truth).sum()
    assert iou > 0.85
    # Colour: pink background (R, B > G), purple nuclei (B > R > G, darker).
    bg = rgb[~ndimage.binary_dilation(truth, iterations=2)].mean(axis=0)
    nuc = rgb[ndimage.binary_erosion(truth, iterations=2)].mean(axis=0)
    assert bg[0] > bg[1] + 40 and bg[2] > bg[1] + 40 and bg.mean() > 180
    assert nuc[2] > nuc[0] > nuc[1] and nuc.mean() < 130


# ---- write_pyramidal_tiff ----------------------------------------------------------------------


@pytest.mark.parametrize("compression", ["jpeg", "deflate"])
def test_pyramid_opens_in_openslide_and_tiffslide(tmp_path: Path, compression: str) -> None:
    import openslide

    rgb, _, _ = make_nuclei_image(600, 700, seed=1)
    path = write_pyramidal_tiff(
        tmp_path / "pyr.svs", rgb, mpp=0.25, levels=3, tile=256, compression=compression
    )
    assert path.exists() and [p.name for p in tmp_path.iterdir()] == ["pyr.svs"]  # atomic
    osr = openslide.OpenSlide(str(path))
    try:
        assert osr.properties["openslide.vendor"] == "aperio"
        assert float(osr.properties["openslide.mpp-x"]) == 0.25
        assert osr.properties["openslide.objective-power"] == "40"
        assert osr.level_dimensions == ((700, 600), (350, 300), (175, 150))
        assert osr.level_downsamples == pytest.approx((1.0, 2.0, 4.0))
    finally:
        osr.close()
    reads = {}
    for backend in ("openslide", "tiffslide"):
        with open_slide(path, backend=backend) as s:
            assert s.backend == backend and s.vendor == "aperio"
            assert s.mpp == 0.25
            assert s.level_dimensions == ((700, 600), (350, 300), (175, 150))
            assert s.best_level_for_mpp(0.5) == 1 and s.best_level_for_mpp(1.0) == 2
            assert scale_info(s, 0.5)["scale_factor"] == pytest.approx(1.0)
            reads[backend] = [s.read_region((0, 0), k, s.level_dimensions[k]) for k in range(3)]
    for a, b in zip(reads["openslide"], reads["tiffslide"]):
        np.testing.assert_array_equal(a, b)
    level0 = reads["openslide"][0].astype(int)
    if compression == "deflate":
        np.testing.assert_array_equal(level0, rgb)
    else:
        assert np.abs(level0 - rgb).mean() < 4
    # Level 1 is the 2x2 area mean of level 0.
    mean2 = rgb.reshape(300, 2, 350, 2, 3).mean(axis=(1, 3))
    assert np.abs(reads["tiffslide"][1] - mean2).mean() < 4


# ---- SyntheticSlide ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def big() -> SyntheticSlide:
    return SyntheticSlide(100_000, 100_000, seed=0, tissue_fraction=0.1)


def _tissue_point(slide: SyntheticSlide, want: int) -> tuple[int, int]:
    """Level-0 top-left of a block of class ``want`` (1 tissue, 2 border).

    Tissue blocks also have tissue right and below; border blocks are about half tissue.
    """
    b = slide._block
    nx, ny = slide.dimensions[0] // b, slide.dimensions[1] // b
    gy, gx = np.mgrid[0:ny, 0:nx]
    cls = slide._classify(gx, gy)
    ok = cls[:-1, :-1] == want
    if want == 1:
        ok &= (cls[1:, :-1] == 1) & (cls[:-1, 1:] == 1) & (cls[1:, 1:] == 1)
    for j, i in np.argwhere(ok):
        if want == 2 and not 0.3 < slide._block_mask(int(i), int(j), 128).mean() < 0.7:
            continue  # a border block that really is half tissue, half glass
        return int(i) * b, int(j) * b
    raise AssertionError("no such block")


def test_synthetic_geometry(big: SyntheticSlide) -> None:
    assert big.dimensions == (100_000, 100_000)
    assert big.level_downsamples == (1.0, 4.0, 16.0, 64.0)
    assert big.level_dimensions[-1] == (1563, 1563)
    assert big.mpp == 0.25 and big.offset == (0, 0) and big.backend == "synthetic"
    assert big.best_level_for_mpp(0.25) == 0 and big.best_level_for_mpp(4.0) == 2
    assert len(big.fingerprint) == 64
    assert big.fingerprint != SyntheticSlide(100_000, 100_000, seed=1).fingerprint


def test_synthetic_thumbnail_and_fraction(big: SyntheticSlide) -> None:
    thumb = big.get_thumbnail(512)
    assert thumb.shape == (512, 512, 3)
    tissue = thumb.min(axis=2) < 220
    assert 0.07 < tissue.mean() < 0.13
    np.testing.assert_array_equal(tissue, big.tissue_mask((512, 512)))
    # Low-resolution reads agree with the analytic mask.
    low = big.read_region((0, 0), 3, (800, 800))
    mask = big.tissue_mask(big.level_dimensions[3])[:800, :800]
    assert 0.02 < mask.mean() and ((low.min(axis=2) < 220) == mask).mean() > 0.99


def test_synthetic_reads_are_consistent(big: SyntheticSlide) -> None:
    for want in (1, 2):  # inside tissue, and across a tissue border
        x, y = _tissue_point(big, want)
        x, y = x - 100, y - 77
        a = big.read_region((x, y), 0, (900, 800))
        b = big.read_region((x + 137, y + 251), 0, (400, 300))
        np.testing.assert_array_equal(a[251:551, 137:537], b)
        fresh = SyntheticSlide(100_000, 100_000, seed=0)
        np.testing.assert_array_equal(a, fresh.read_region((x, y), 0, (900, 800)))
        np.testing.assert_array_equal(big.read_scaled((x, y, x + 900, y + 800), (900, 800)), a)
        if want == 2:
            assert (a.min(axis=2) > 235).mean() > 0.01 and (a.min(axis=2) < 150).mean() > 0.01
        # Level 1 too (used for coarser processing resolutions).
        c = big.read_region((x, y), 1, (300, 300))
        d = big.read_region((x + 40, y + 80), 1, (100, 100))
        np.testing.assert_array_equal(c[20:120, 10:110], d)
        # ... and level 1 is the 4x4 mean of level 0 inside tissue.
        if want == 1:
            x0, y0 = x + 100, y + 77
            l0 = big.read_region((x0, y0), 0, (512, 512)).astype(float)
            l1 = big.read_region((x0, y0), 1, (128, 128)).astype(float)
            assert np.abs(l0.reshape(128, 4, 128, 4, 3).mean(axis=(1, 3)) - l1).max() <= 1.0
    # Other seeds give another layout and other block choices.
    other = SyntheticSlide(100_000, 100_000, seed=2, tissue_fraction=1.0)
    assert not np.array_equal(other.tissue_mask((64, 64)), big.tissue_mask((64, 64)))
    assert not np.array_equal(a, other.read_region((x, y), 0, (900, 800)))
    # Past the edge: white.
    assert (big.read_region((99_990, 99_990), 0, (64, 64))[10:, 10:] == 255).all()


def test_synthetic_ground_truth(big: SyntheticSlide) -> None:
    x, y = _tissue_point(big, 1)
    box = (x, y, x + 1024, y + 1024)
    img = big.read_region((x, y), 0, (1024, 1024))
    truth = big.nuclei_in_box(box)
    assert truth.dtype == NUCLEUS_DTYPE and len(truth) > 300
    h = rgb2hed(img)[..., 0]
    lab, n = ndimage.label(h > threshold_otsu(h), structure=np.ones((3, 3)))
    sizes = ndimage.sum(np.ones_like(lab), lab, np.arange(1, n + 1))
    assert (sizes >= 10).sum() == len(truth)
    centres = np.array(ndimage.center_of_mass(np.ones_like(lab), lab, np.arange(1, n + 1)))
    cy, cx = centres[sizes >= 10].T
    got = np.sort(np.round(cx + x) * 1e6 + np.round(cy + y))
    want = np.sort(np.round(truth["centroid_x"]) * 1e6 + np.round(truth["centroid_y"]))
    assert (np.abs(got - want) <= 1e6 + 1).all()  # same centroids to within a pixel
    np.testing.assert_array_equal(truth["label"], np.arange(len(truth)))


def test_synthetic_full_tissue_and_pickle() -> None:
    s = SyntheticSlide(4096, 3000, seed=9, tissue_fraction=1.0, mpp=0.5)
    assert s.level_count == 2 and s.level_dimensions[1] == (1024, 750)
    region = s.read_region((1000, 1000), 0, (300, 300))
    assert (region.min(axis=2) > 235).mean() < 0.05  # no glass
    s2 = pickle.loads(pickle.dumps(s))
    np.testing.assert_array_equal(s2.read_region((1000, 1000), 0, (300, 300)), region)
    assert s2.fingerprint == s.fingerprint
    assert SyntheticSlide(2048, 2048, tissue_fraction=0.0).get_thumbnail(64).min() > 235
    with pytest.raises(ValueError):
        SyntheticSlide(100, 100, tissue_fraction=1.5)

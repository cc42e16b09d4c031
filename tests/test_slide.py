"""Tests for wsi_nuclei.slide: backends, resolution policy, geometry of reads, bad input."""

from __future__ import annotations

import pickle
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from wsi_nuclei.errors import (
    InputNotFoundError,
    MissingMppError,
    UnsupportedSlideError,
    WsiNucleiError,
)
from wsi_nuclei.slide import BACKENDS, open_slide, scale_info

CMU = "CMU-1-Small-Region.svs"
TCGA = "tcga-cr-7395-01a-01-ts1.svs"
HE = "HE_example.tif"
KIDNEY = "kidney-48-5.tif"
DICOM = "small_dicom.dcm"


def _seam_score(img: np.ndarray, step: int, axis: int) -> float:
    """Mean |difference| across the lines between ``step``-sized frames along ``axis``."""
    a = img.astype(np.int16)
    idx = np.arange(step, a.shape[axis], step)
    if axis == 1:
        return float(np.abs(a[:, idx - 1] - a[:, idx]).mean())
    return float(np.abs(a[idx - 1] - a[idx]).mean())


def _shifted_score(img: np.ndarray, step: int, axis: int, shift: int) -> float:
    """Same as :func:`_seam_score` but between pixel pairs inside the frames."""
    a = img.astype(np.int16)
    idx = np.arange(step, a.shape[axis], step) - shift
    if axis == 1:
        return float(np.abs(a[:, idx - 1] - a[:, idx]).mean())
    return float(np.abs(a[idx - 1] - a[idx]).mean())


# ---- real slides ----------------------------------------------------------------------------


def test_cmu_openslide_and_tiffslide_agree(wsi_dir: Path) -> None:
    with open_slide(wsi_dir / CMU) as a, open_slide(wsi_dir / CMU, backend="tiffslide") as b:
        assert a.backend == "openslide" and b.backend == "tiffslide"
        assert a.vendor == b.vendor == "aperio"
        assert a.dimensions == b.dimensions == (2220, 2967)
        assert a.level_count == b.level_count == 1
        assert a.mpp == pytest.approx(0.499) and b.mpp == pytest.approx(0.499)
        assert a.mpp_source == "openslide:openslide.mpp-x"
        assert b.mpp_source == "aperio:MPP"
        assert a.offset == (0, 0)
        ra = a.read_region((700, 900), 0, (256, 256))
        rb = b.read_region((700, 900), 0, (256, 256))
        assert ra.shape == (256, 256, 3) and ra.dtype == np.uint8
        assert np.abs(ra.astype(int) - rb).max() <= 2
        assert ra.std() > 10  # real tissue, not a blank
        assert a.fingerprint == b.fingerprint and len(a.fingerprint) == 64
        thumb = a.get_thumbnail(256)
        assert thumb.shape == (256, 192, 3)
        assert a.get_thumbnail((300, 200)).shape == (200, 150, 3)  # fits a (w, h) box
        assert a.name == CMU


def test_read_region_outside_is_white(wsi_dir: Path) -> None:
    with open_slide(wsi_dir / CMU) as s:
        w, h = s.dimensions
        r = s.read_region((w - 10, h - 20), 0, (30, 40))
        assert (r[20:, :] == 255).all() and (r[:, 10:] == 255).all()
        assert (r[:20, :10] != 255).any()
        assert (s.read_region((-500, -500), 0, (50, 50)) == 255).all()
        edge = s.read_scaled((w - 50, h - 50, w + 50, h + 50), (200, 200))
        assert (edge[110:, :] == 255).all() and (edge[:, 110:] == 255).all()


def test_tcga_two_levels_and_missing_mpp(wsi_dir: Path) -> None:
    with pytest.raises(MissingMppError, match="pass --mpp"):
        open_slide(wsi_dir / TCGA)
    with open_slide(wsi_dir / TCGA, mpp=0.5) as s:
        assert s.backend == "openslide"
        assert s.level_count == 2
        assert s.level_dimensions == ((4443, 3567), (2221, 1783))
        assert s.mpp == 0.5 and s.mpp_source == "user:--mpp"
        assert s.best_level_for_mpp(0.25) == 0
        assert s.best_level_for_mpp(0.9) == 0
        assert s.best_level_for_mpp(1.0) == 1  # downsample 2.0005 counts as 1.0 µm/px
        assert s.best_level_for_mpp(8.0) == 1
        info = scale_info(s, 0.25)
        assert info["level"] == 0 and info["scale_factor"] == pytest.approx(2.0)
        info = scale_info(s, 2.0)
        assert info["level"] == 1 and info["scale_factor"] == pytest.approx(0.50025, rel=1e-3)
        # A low-resolution read comes from level 1 and matches it.
        ds = s.level_downsamples[1]
        low = s.read_scaled((0, 0, 2000 * ds, 1000 * ds), (2000, 1000))
        assert low.shape == (1000, 2000, 3)
        np.testing.assert_array_equal(low, s.read_region((0, 0), 1, (2000, 1000)))
        # The thumbnail uses the reduced level.
        assert s.get_thumbnail(512).shape == (411, 512, 3)


def test_tcga_tiffslide_levels_match_openslide(wsi_dir: Path) -> None:
    with (
        open_slide(wsi_dir / TCGA, mpp=0.5) as a,
        open_slide(wsi_dir / TCGA, mpp=0.5, backend="tiffslide") as b,
    ):
        assert b.backend == "tiffslide"
        assert a.level_dimensions == b.level_dimensions
        ra = a.read_region((2000, 1600), 0, (128, 128))
        rb = b.read_region((2000, 1600), 0, (128, 128))
        assert ra.std() > 5
        np.testing.assert_array_equal(ra, rb)
        # Level 1 (downsample 2.0005): OpenSlide renders non-integer level positions with
        # sub-pixel interpolation, tiffslide reads whole level pixels: close, not equal.
        ra = a.read_region((200, 1600), 1, (128, 128))
        rb = b.read_region((200, 1600), 1, (128, 128))
        assert np.corrcoef(ra[..., 1].ravel(), rb[..., 1].ravel())[0, 1] > 0.98


def test_he_example_ome_mpp_and_fallback(wsi_dir: Path) -> None:
    with open_slide(wsi_dir / HE) as s:
        assert s.backend == "tiffslide"  # OpenSlide does not read it
        assert "openslide" in s.backend_errors
        assert s.dimensions == (1380, 1484)
        assert s.mpp == pytest.approx(0.50008, abs=1e-5)
        assert s.mpp_source == "ome:PhysicalSizeX"
        ref = s.read_region((400, 500), 0, (200, 200))
    # An explicit backend that cannot read the file falls back (and says so).
    with open_slide(wsi_dir / HE, backend="dicom") as s:
        assert s.requested_backend == "dicom" and s.backend != "dicom"
        assert "dicom" in s.backend_errors
    with open_slide(wsi_dir / HE, backend="image") as s:
        assert s.backend == "image" and s.mpp_source == "ome:PhysicalSizeX"
        assert np.abs(s.read_region((400, 500), 0, (200, 200)).astype(int) - ref).max() <= 2


def test_kidney_has_no_mpp(wsi_dir: Path) -> None:
    with pytest.raises(MissingMppError):
        open_slide(wsi_dir / KIDNEY)
    with open_slide(wsi_dir / KIDNEY, mpp=2.0) as s:
        assert s.dimensions == (1493, 901) and s.mpp == 2.0
    with open_slide(wsi_dir / KIDNEY, require_mpp=False) as s:
        assert s.mpp is None and s.mpp_source == "unknown"
        assert s.get_thumbnail(300).shape == (181, 300, 3)
        with pytest.raises(MissingMppError):
            s.best_level_for_mpp(0.5)


def test_dicom_column_major_frames(wsi_dir: Path) -> None:
    with open_slide(wsi_dir / DICOM) as s:
        assert s.backend == "dicom"
        assert s.dimensions == (3236, 2638) and s.level_count == 1
        assert s.mpp_source == "dicom:ImagedVolumeWidth (nominal)"
        assert s.mpp == pytest.approx(15000 / 3236)
        assert s.properties["dicom.frame-order"].startswith("column-major")
        img = s.read_region((0, 0), 0, s.dimensions)
    # The assembled image is continuous across the 500 px frame seams: the jump across a seam
    # is of the same order as between neighbouring pixels inside a frame.
    inside = _shifted_score(img, 500, 1, 250) + _shifted_score(img, 500, 0, 250)
    seams = _seam_score(img, 500, 1) + _seam_score(img, 500, 0)
    assert seams < 3 * inside
    # Row-major placement of the same frames (what TILED_FULL normally means) is not.
    import pydicom

    with warnings.catch_warnings():  # pydicom: the JPEG stream is YBR, the header says RGB
        warnings.simplefilter("ignore")
        frames = pydicom.dcmread(wsi_dir / DICOM).pixel_array
    rows, cols = 6, 7
    wrong = np.zeros((rows * 500, cols * 500, 3), np.uint8)
    for k in range(42):
        r, c = divmod(k, cols)
        wrong[r * 500 : (r + 1) * 500, c * 500 : (c + 1) * 500] = frames[k]
    wrong = wrong[:2638, :3236]
    assert _seam_score(wrong, 500, 1) + _seam_score(wrong, 500, 0) > 5 * seams
    # And our assembly is the column-major placement, frame for frame.
    k = 9  # column 1, row 3
    np.testing.assert_allclose(
        img[1500:2000, 500:1000].astype(float), frames[k].astype(float), atol=3
    )


# ---- synthetic DICOM (row-major TILED_FULL, explicit positions, PixelSpacing) ----------------


def _write_dicom(
    path: Path, image: np.ndarray, frame: int, *, order: str, spacing_mm: float | None
) -> None:
    """Minimal uncompressed DICOM WSI with frames in ``order`` ("row", "col" or "shuffled")."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    th, tw = image.shape[:2]
    nr, nc = -(-th // frame), -(-tw // frame)
    padded = np.zeros((nr * frame, nc * frame, 3), np.uint8)
    padded[:th, :tw] = image
    cells = [(r, c) for r in range(nr) for c in range(nc)]
    if order == "col":
        cells = [(r, c) for c in range(nc) for r in range(nr)]
    elif order == "shuffled":
        cells = [cells[i] for i in np.random.default_rng(0).permutation(len(cells))]
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.77.1.6"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "SM"
    ds.Rows = ds.Columns = frame
    ds.NumberOfFrames = len(cells)
    ds.TotalPixelMatrixColumns, ds.TotalPixelMatrixRows = tw, th
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "RGB"
    ds.PlanarConfiguration = 0
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.DimensionOrganizationType = "TILED_SPARSE" if order == "shuffled" else "TILED_FULL"
    if spacing_mm is not None:
        pm = Dataset()
        pm.PixelSpacing = [spacing_mm, spacing_mm]
        shared = Dataset()
        shared.PixelMeasuresSequence = [pm]
        ds.SharedFunctionalGroupsSequence = [shared]
    if order == "shuffled":
        items = []
        for r, c in cells:
            pos = Dataset()
            pos.ColumnPositionInTotalImagePixelMatrix = c * frame + 1
            pos.RowPositionInTotalImagePixelMatrix = r * frame + 1
            item = Dataset()
            item.PlanePositionSlideSequence = [pos]
            items.append(item)
        ds.PerFrameFunctionalGroupsSequence = items
    ds.PixelData = b"".join(
        padded[r * frame : (r + 1) * frame, c * frame : (c + 1) * frame].tobytes() for r, c in cells
    )
    ds.save_as(path, enforce_file_format=True)


@pytest.fixture(scope="module")
def he_image() -> np.ndarray:
    from wsi_nuclei.demo import make_nuclei_image

    return make_nuclei_image(230, 260, seed=5)[0]


@pytest.mark.parametrize("order", ["row", "col", "shuffled"])
def test_dicom_frame_orders(tmp_path: Path, he_image: np.ndarray, order: str) -> None:
    path = tmp_path / f"{order}.dcm"
    _write_dicom(path, he_image, 64, order=order, spacing_mm=0.00025)
    with open_slide(path) as s:
        assert s.backend == "dicom"
        assert s.dimensions == (260, 230)
        assert s.mpp == pytest.approx(0.25) and s.mpp_source == "dicom:PixelSpacing"
        np.testing.assert_array_equal(s.read_region((0, 0), 0, s.dimensions), he_image)
        part = s.read_region((50, 70), 0, (100, 90))
        np.testing.assert_array_equal(part, he_image[70:160, 50:150])
        expected = {"row": "row-major", "col": "column-major", "shuffled": "explicit"}[order]
        assert s.properties["dicom.frame-order"].startswith(expected)


def test_dicom_truncated(tmp_path: Path, wsi_dir: Path) -> None:
    data = (wsi_dir / DICOM).read_bytes()
    bad = tmp_path / "cut.dcm"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(UnsupportedSlideError):
        open_slide(bad)


# ---- plain images and geometry ---------------------------------------------------------------


def test_png_needs_mpp(tmp_path: Path, he_image: np.ndarray) -> None:
    path = tmp_path / "roi.png"
    Image.fromarray(he_image).save(path)
    with pytest.raises(MissingMppError):
        open_slide(path)
    with open_slide(path, mpp=0.25) as s:
        assert s.backend == "image" and s.vendor == "png"
        assert s.mpp == 0.25 and s.mpp_source == "user:--mpp"
        np.testing.assert_array_equal(s.read_region((0, 0), 0, (260, 230)), he_image)
    # The usual 72 dpi default is not a microscope resolution.
    Image.fromarray(he_image).save(path, dpi=(72, 72))
    with pytest.raises(MissingMppError, match="implausible"):
        open_slide(path)
    # An RGBA PNG: transparent pixels read as white.
    rgba = np.dstack([he_image, np.full(he_image.shape[:2], 255, np.uint8)])
    rgba[:10, :, 3] = 0
    Image.fromarray(rgba).save(path)
    with open_slide(path, mpp=0.5) as s:
        r = s.read_region((0, 0), 0, (20, 20))
        assert (r[:10] == 255).all() and (r[10:] == he_image[10:20, :20]).all()


def test_tiff_resolution_tags(tmp_path: Path, he_image: np.ndarray) -> None:
    import tifffile

    path = tmp_path / "flat.tif"
    tifffile.imwrite(path, he_image, resolution=(1e4 / 0.5, 1e4 / 0.5), resolutionunit="CENTIMETER")
    with open_slide(path) as s:
        assert s.mpp == pytest.approx(0.5) and s.mpp_source == "tiff:XResolution"
    tifffile.imwrite(path, he_image, resolution=(25400 / 0.25, 25400 / 0.25), resolutionunit="INCH")
    with open_slide(path, backend="image") as s:
        assert s.mpp == pytest.approx(0.25) and s.mpp_source == "tiff:XResolution"
    tifffile.imwrite(path, he_image, resolution=(2.0, 2.0), resolutionunit="NONE")
    with pytest.raises(MissingMppError):
        open_slide(path)


def _edge_image() -> np.ndarray:
    img = np.zeros((200, 200, 3), np.uint8)
    img[:, 100:] = 255  # vertical edge between level-0 pixels 99 and 100 (x = 100.0)
    img[150:, :] = 255  # horizontal edge at y = 150.0
    return img


def test_read_scaled_upsampling_geometry(tmp_path: Path) -> None:
    path = tmp_path / "edge.png"
    Image.fromarray(_edge_image()).save(path)
    with open_slide(path, mpp=0.5) as s:
        out = s.read_scaled((0, 0, 200, 200), (400, 400), target_mpp=0.25)
        assert out.shape == (400, 400, 3)
        row = out[100, :, 0].astype(int)
        # Output pixel j is centred on level-0 x = (j + 0.5) / 2: the edge at x = 100 falls
        # between output pixels 199 and 200, interpolated bilinearly between pixel centres.
        assert row[198] == 0 and row[201] == 255
        assert abs(row[199] - 64) <= 2 and abs(row[200] - 191) <= 2
        col = out[:, 50, 0].astype(int)
        assert col[298] == 0 and col[301] == 255
        assert abs(col[299] - 64) <= 2 and abs(col[300] - 191) <= 2
        # A box shifted by half a level-0 pixel moves the edge by one output pixel.
        shifted = s.read_scaled((0.5, 0, 200.5, 200), (400, 400))[100, :, 0].astype(int)
        assert shifted[197] == 0 and shifted[200] == 255
        assert abs(shifted[198] - 64) <= 2 and abs(shifted[199] - 191) <= 2
        # Integer-aligned scale-1 boxes are exact copies; boxes past the image are white.
        exact = s.read_scaled((10, 20, 74, 84), (64, 64))
        np.testing.assert_array_equal(exact, _edge_image()[20:84, 10:74])
        pad = s.read_scaled((150, 100, 250, 200), (200, 200))
        assert (pad[:, 110:] == 255).all()
        # Downsampling 4x keeps the edge at x = 100 -> output 25.
        small = s.read_scaled((0, 0, 200, 200), (50, 50))[10, :, 0].astype(int)
        assert small[23] == 0 and small[26] == 255 and 100 < small[24] + small[25] < 410


def test_tiles_agree_with_whole_read(tmp_path: Path, he_image: np.ndarray) -> None:
    """Adjacent upsampled tiles equal the corresponding part of one big upsampled read."""
    path = tmp_path / "he.png"
    Image.fromarray(he_image).save(path)
    with open_slide(path, mpp=0.5) as s:
        whole = s.read_scaled((32, 32, 160, 160), (256, 256)).astype(int)
        for ty in range(2):
            for tx in range(2):
                x0, y0 = 32 + 64 * tx, 32 + 64 * ty
                tile = s.read_scaled((x0, y0, x0 + 64, y0 + 64), (128, 128))
                part = whole[128 * ty : 128 * ty + 128, 128 * tx : 128 * tx + 128]
                assert np.abs(tile.astype(int) - part).max() <= 1


def test_bounds_offset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """OpenSlide bounds: dimensions are the bounds and reads are shifted by the origin."""
    import openslide
    import tifffile

    path = tmp_path / "bounded.tif"
    tifffile.imwrite(path, np.zeros((8, 8, 3), np.uint8))
    calls: list[tuple[tuple[int, int], int, tuple[int, int]]] = []

    class _FakeOpenSlide:
        properties = {
            "openslide.vendor": "mirax",
            "openslide.mpp-x": "0.25",
            "openslide.mpp-y": "0.25",
            "openslide.bounds-x": "1000",
            "openslide.bounds-y": "600",
            "openslide.bounds-width": "3000",
            "openslide.bounds-height": "2000",
        }
        level_dimensions = ((8000, 6000), (4000, 3000))
        level_downsamples = (1.0, 2.0)

        def __init__(self, _path: str) -> None:
            pass

        def read_region(
            self, loc: tuple[int, int], level: int, size: tuple[int, int]
        ) -> Image.Image:
            calls.append((loc, level, size))
            arr = np.zeros((size[1], size[0], 4), np.uint8)
            arr[..., 0] = 10
            arr[:, : size[0] // 2, 3] = 255  # right half transparent
            return Image.fromarray(arr, "RGBA")

        def close(self) -> None:
            pass

    monkeypatch.setattr(openslide, "OpenSlide", _FakeOpenSlide)
    with open_slide(path, backend="openslide") as s:
        assert s.offset == (1000, 600)
        assert s.dimensions == (3000, 2000)
        assert s.level_dimensions == ((3000, 2000), (1500, 1000))
        calls.clear()
        r = s.read_region((100, 50), 0, (20, 10))
        assert calls == [((1100, 650), 0, (20, 10))]
        assert (r[:, :10, 0] == 10).all() and (r[:, 10:] == 255).all()
        calls.clear()
        s.read_region((200, 100), 1, (8, 8))
        assert calls == [((1200, 700), 1, (8, 8))]
        # Past the bounds: not even asked from the backend.
        calls.clear()
        assert (s.read_region((3000, 0), 0, (10, 10)) == 255).all() and not calls


def test_pickle_reopens(wsi_dir: Path) -> None:
    with open_slide(wsi_dir / TCGA, mpp=0.5, backend="tiffslide") as s:
        s2 = pickle.loads(pickle.dumps(s))
        try:
            assert s2.backend == "tiffslide" and s2.mpp == 0.5 and s2.fingerprint == s.fingerprint
            np.testing.assert_array_equal(
                s2.read_region((100, 100), 1, (32, 32)), s.read_region((100, 100), 1, (32, 32))
            )
        finally:
            s2.close()


# ---- bad input ---------------------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(InputNotFoundError) as exc:
        open_slide(tmp_path / "nope.svs")
    assert exc.value.exit_code == 2


def test_truncated_svs(tmp_path: Path, wsi_dir: Path) -> None:
    data = (wsi_dir / CMU).read_bytes()
    for frac in (0.3, 0.95):
        bad = tmp_path / f"cut{frac}.svs"
        bad.write_bytes(data[: int(len(data) * frac)])
        with pytest.raises(UnsupportedSlideError, match="truncated") as exc:
            open_slide(bad)
        assert exc.value.exit_code == 3
        assert "\n" not in str(exc.value)
        with pytest.raises(UnsupportedSlideError):
            open_slide(bad, backend="tiffslide")


def test_random_bytes_and_empty(tmp_path: Path) -> None:
    junk = tmp_path / "junk.svs"
    junk.write_bytes(np.random.default_rng(0).integers(0, 256, 20_000, dtype=np.uint8).tobytes())
    with pytest.raises(UnsupportedSlideError, match="no backend can read it") as exc:
        open_slide(junk)
    assert "\n" not in str(exc.value)
    empty = tmp_path / "empty.tif"
    empty.write_bytes(b"")
    with pytest.raises(UnsupportedSlideError, match="empty"):
        open_slide(empty)
    with pytest.raises(UnsupportedSlideError, match="directory"):
        open_slide(tmp_path)


def test_backends_are_tried_in_registry_order(tmp_path: Path) -> None:
    """BACKENDS (and the CLI's --backend choices) list the registered backends in priority
    order; a file no backend claims is tried with each of them, in that order."""
    assert BACKENDS == ("openslide", "tiffslide", "dicom", "image")
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"not a slide\n" * 100)
    with pytest.raises(UnsupportedSlideError, match="no backend can read it") as exc:
        open_slide(junk)
    tried = str(exc.value).split("no backend can read it (", 1)[1]
    assert [tried.index(f"{b}: ") for b in BACKENDS] == sorted(
        tried.index(f"{b}: ") for b in BACKENDS
    )


def test_bad_arguments(tmp_path: Path, he_image: np.ndarray) -> None:
    path = tmp_path / "x.png"
    Image.fromarray(he_image).save(path)
    with pytest.raises(WsiNucleiError, match="unknown slide backend"):
        open_slide(path, backend="bioformats")
    for bad in (0.0, -1.0, 50.0, float("nan")):
        with pytest.raises(MissingMppError):
            open_slide(path, mpp=bad)


def test_corrupt_tile_data_is_wrapped(tmp_path: Path) -> None:
    """Garbage inside a tile surfaces as UnsupportedSlideError, never a backend traceback."""
    from wsi_nuclei.demo import make_nuclei_image, write_pyramidal_tiff

    rgb = make_nuclei_image(512, 768, seed=1)[0]  # 3 x 2 tiles; opening reads the middle
    path = write_pyramidal_tiff(tmp_path / "s.svs", rgb, levels=1, compression="jpeg")
    import tifffile

    with tifffile.TiffFile(path) as tf:
        off = int(tf.pages[0].dataoffsets[0])
    raw = bytearray(path.read_bytes())
    raw[off : off + 400] = b"\x00" * 400
    bad = tmp_path / "bad.svs"
    bad.write_bytes(bytes(raw))
    for backend in ("openslide", "tiffslide"):
        with open_slide(bad, backend=backend) as s:
            assert s.backend == backend
            with pytest.raises(UnsupportedSlideError, match="cannot decode"):
                s.read_region((0, 0), 0, (256, 256))


def test_copy_keeps_fingerprint(tmp_path: Path, wsi_dir: Path) -> None:
    copy = tmp_path / "copy.svs"
    shutil.copyfile(wsi_dir / CMU, copy)
    with open_slide(copy) as a, open_slide(wsi_dir / CMU) as b:
        assert a.fingerprint == b.fingerprint


def test_fingerprint_covers_every_pixel_file_of_a_mirax_like_slide(tmp_path: Path) -> None:
    """MIRAX keeps its pixels in a folder beside the .mrxs index: changing a byte there (or a
    block in the middle of a big single file) changes the fingerprint; a copy does not."""
    import shutil

    from wsi_nuclei.slide import pixel_files
    from wsi_nuclei.slide._integrity import fingerprint

    idx = tmp_path / "s.mrxs"
    idx.write_bytes(b"index" * 10)
    data = tmp_path / "s"
    data.mkdir()
    (data / "Data0000.dat").write_bytes(bytes(5 * 2**20))
    (data / "Slidedat.ini").write_text("[GENERAL]")
    assert [p.name for p in pixel_files(idx)] == ["s.mrxs", "Data0000.dat", "Slidedat.ini"]
    a = fingerprint(idx, (100, 100))
    with open(data / "Data0000.dat", "r+b") as fh:  # a byte in a sampled middle block
        fh.seek(5 * 2**20 * 4 // 9)
        fh.write(b"\x01")
    b = fingerprint(idx, (100, 100))
    assert a != b
    copy = tmp_path / "copy"
    copy.mkdir()
    shutil.copy(idx, copy / "s.mrxs")
    shutil.copytree(data, copy / "s")
    assert fingerprint(copy / "s.mrxs", (100, 100)) == b  # content, not place or time
    assert fingerprint(copy / "s.mrxs", (100, 101)) != b


def test_rgb_converter_floats_and_16_bit_grey() -> None:
    """The one RGB converter (slide readers and tissue detection): floats in 0..1 or 0..255,
    16-bit grey PIL images to three 8-bit channels (the DICOM reader pastes them as tiles)."""
    from PIL import Image

    from wsi_nuclei._rgb import pil_to_rgb, to_rgb_uint8

    unit = np.array([[[0.0, 0.5, 1.0]]])
    assert to_rgb_uint8(unit).tolist() == [[[0, 128, 255]]]
    assert to_rgb_uint8(unit * 255.0).tolist() == [[[0, 128, 255]]]
    assert to_rgb_uint8(np.array([[[np.nan, 300.0, -4.0]]])).tolist() == [[[0, 255, 0]]]
    grey16 = Image.fromarray(np.array([[0, 32896, 65535]], np.uint16))
    out = pil_to_rgb(grey16)
    assert out.shape == (1, 3, 3) and out.dtype == np.uint8
    assert out[0, :, 0].tolist() == [0, 128, 255] and (out[..., 0] == out[..., 2]).all()


def _patch_row_boxes(x0: float, y0: float, size: float, stride: float, n: int) -> list:
    return [(x0 + k * stride, y0, x0 + k * stride + size, y0 + size) for k in range(n)]


@pytest.mark.parametrize(
    "scale",
    [1.0, 1.0108, 2.0, 0.5],  # exact, a 0.2527 µm/px slide read at 0.25, 20x -> 40x, 80x -> 40x
)
def test_read_scaled_batch_gives_read_scaled_bit_for_bit(scale: float) -> None:
    """Patch rows (overlapping boxes), a gap, a second row, boxes past the slide's edge and out of
    order: each result equals read_scaled's of its own box, whatever was read with it."""
    from wsi_nuclei.demo import SyntheticSlide

    s = SyntheticSlide(3000, 2000, mpp=0.25, seed=3, tissue_fraction=0.6)
    n_out, stride_out = 256, 192
    size, stride = n_out / scale, stride_out / scale
    boxes = (
        _patch_row_boxes(-40 / scale, 300.3, size, stride, 5)  # starts past the left edge
        + _patch_row_boxes(2400.7, 300.3, size, stride, 4)  # same row after a gap, past the right
        + _patch_row_boxes(0, 300.3 + stride, size, stride, 3)  # the next row
        + [(100.25, 1900.5, 100.25 + size, 1900.5 + size)]  # past the bottom
    )
    boxes = boxes[::-1][:7] + boxes[:6]  # out of order, one box twice
    sizes = [(n_out, n_out)] * len(boxes)
    got = s.read_scaled_batch(boxes, sizes, target_mpp=0.25 / scale)
    assert len(got) == len(boxes)
    for b, z, g in zip(boxes, sizes, got):
        want = s.read_scaled(b, z, target_mpp=0.25 / scale)
        assert g.shape == want.shape == (n_out, n_out, 3) and g.dtype == np.uint8
        assert np.array_equal(g, want), (scale, b)
    assert s.read_scaled_batch([], []) == []
    with pytest.raises(ValueError, match="2 boxes but 1"):
        s.read_scaled_batch(boxes[:2], sizes[:1])


def test_read_scaled_batch_reads_a_patch_row_once() -> None:
    from wsi_nuclei.demo import SyntheticSlide

    s = SyntheticSlide(3000, 2000, mpp=0.25, seed=3)
    calls: list[tuple] = []
    real = s._read_level

    def counting(*a: int) -> np.ndarray:
        calls.append(a)
        return real(*a)

    s._read_level = counting  # type: ignore[method-assign]
    boxes = _patch_row_boxes(0, 512, 256, 192, 16)
    s.read_scaled_batch(boxes, [(256, 256)] * 16, target_mpp=0.25)
    assert calls == [(0, 0, 512, 15 * 192 + 256, 256)]  # one window: the row's union


def test_read_scaled_batch_on_a_real_slide_matches_per_box_reads(wsi_dir: Path) -> None:
    """CMU-1-Small-Region (20x) read at 0.25 µm/px through both backends."""
    path = wsi_dir / "CMU-1-Small-Region.svs"
    boxes = _patch_row_boxes(700.25, 900.5, 128, 96, 6)
    sizes = [(256, 256)] * len(boxes)
    for backend in ("openslide", "tiffslide"):
        with open_slide(path, backend=backend) as s:
            got = s.read_scaled_batch(boxes, sizes, target_mpp=0.25)
            for b, z, g in zip(boxes, sizes, got):
                assert np.array_equal(g, s.read_scaled(b, z, target_mpp=0.25)), (backend, b)

"""The ``dicom`` backend: DICOM VL Whole Slide Microscopy instances read with pydicom.

One instance is one pyramid level. Frames are located in the file without loading the pixel
data and decoded on demand; their placement is explicit or inferred from the TILED_FULL grid.
"""

from __future__ import annotations

import functools
import io
import struct
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .._rgb import WHITE, pil_to_rgb, to_rgb_uint8
from ._base import Reader
from ._mpp import MppCandidate, float_or_none
from ._registry import register_backend

#: DICOM attributes copied into ``Slide.properties``.
_DICOM_PROPERTIES = (
    "SOPClassUID",
    "Modality",
    "ImageType",
    "Manufacturer",
    "ManufacturerModelName",
    "SoftwareVersions",
    "DimensionOrganizationType",
    "Rows",
    "Columns",
    "NumberOfFrames",
    "TotalPixelMatrixColumns",
    "TotalPixelMatrixRows",
    "ImagedVolumeWidth",
    "ImagedVolumeHeight",
    "SamplesPerPixel",
    "PhotometricInterpretation",
    "BitsAllocated",
    "LossyImageCompression",
    "ObjectiveLensPower",
)


class _DicomReader(Reader):
    """DICOM VL Whole Slide Microscopy (single instance = single level) read with pydicom.

    Frames are located in the file without loading the pixel data, decoded on demand (Pillow
    for JPEG/JPEG 2000, pydicom's decoders otherwise) and cached. Frame placement: explicit
    ``PlanePositionSlideSequence`` positions when present; otherwise the TILED_FULL grid, whose
    order (row-major per the standard, column-major in some converters) is checked by seam
    continuity.
    """

    name = "dicom"

    def __init__(self, path: Path) -> None:
        import pydicom

        self._path = path
        with warnings.catch_warnings(), open(path, "rb") as fh:
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(fh, stop_before_pixels=True)
            pixel_pos = fh.tell()
            fh.seek(pixel_pos)
            head = fh.read(12)
        self._ds = ds
        self._rows, self._cols = int(ds.Rows), int(ds.Columns)
        self._spp = int(getattr(ds, "SamplesPerPixel", 1))
        self._bits = int(getattr(ds, "BitsAllocated", 8))
        self._photometric = str(getattr(ds, "PhotometricInterpretation", "RGB"))
        self._planar = int(getattr(ds, "PlanarConfiguration", 0) or 0)
        self._n = int(getattr(ds, "NumberOfFrames", 1) or 1)
        tw = int(getattr(ds, "TotalPixelMatrixColumns", 0) or self._cols)
        th = int(getattr(ds, "TotalPixelMatrixRows", 0) or self._rows)
        self.level_dimensions = ((tw, th),)
        self.level_downsamples = (1.0,)
        self.vendor = str(getattr(ds, "Manufacturer", "") or "dicom")
        size = path.stat().st_size
        self._frames = self._locate_frames(head, pixel_pos, size)
        self.properties = self._collect_properties(ds)
        self._decode_cached = functools.lru_cache(maxsize=64)(self._decode)
        self._positions = self._frame_positions(ds)
        self._grid = self._grid_index()

    # -- metadata --

    @staticmethod
    def _collect_properties(ds: Any) -> dict[str, str]:
        """Technical attributes only (no patient, study or person identifiers)."""
        out: dict[str, str] = {"dicom.TransferSyntaxUID": str(ds.file_meta.TransferSyntaxUID)}
        for key in _DICOM_PROPERTIES:
            value = getattr(ds, key, None)
            if value is not None and value != "":
                out[f"dicom.{key}"] = str(value)
        return out

    def mpp_candidates(self) -> list[MppCandidate]:
        ds = self._ds
        out: list[MppCandidate] = []
        spacing = None
        for seq_name in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
            seq = getattr(ds, seq_name, None)
            if seq:
                pm = getattr(seq[0], "PixelMeasuresSequence", None)
                if pm and getattr(pm[0], "PixelSpacing", None):
                    spacing = pm[0].PixelSpacing
                    break
        if spacing is None and getattr(ds, "PixelSpacing", None):
            spacing = ds.PixelSpacing
        if spacing is not None and len(spacing) >= 2:
            row_mm, col_mm = float_or_none(spacing[0]), float_or_none(spacing[1])
            if row_mm and col_mm:
                out.append(MppCandidate(col_mm * 1000.0, row_mm * 1000.0, "dicom:PixelSpacing"))
        width_mm = float_or_none(getattr(ds, "ImagedVolumeWidth", None))
        cols = self.level_dimensions[0][0]
        if width_mm and cols:
            v = width_mm * 1000.0 / cols
            out.append(MppCandidate(v, v, "dicom:ImagedVolumeWidth (nominal)"))
        return out

    # -- frame bytes --

    def _locate_frames(
        self, head: bytes, pos: int, size: int
    ) -> list[tuple[int, int]] | list[bytes]:
        """(file offset, length) of every frame, or the frame bytes when they must be joined.

        ``head`` holds the first 12 bytes of the file at ``pos``, where pydicom stopped before
        the pixel data.
        """
        if len(head) < 8 or struct.unpack("<HH", head[:4]) != (0x7FE0, 0x0010):
            raise ValueError("no PixelData element (or not little endian)")
        if head[4:6] in (b"OB", b"OW", b"UN"):  # explicit VR
            if len(head) < 12:
                raise ValueError("PixelData header is truncated")
            length = struct.unpack("<L", head[8:12])[0]
            start = pos + 12
        else:  # implicit VR
            length = struct.unpack("<L", head[4:8])[0]
            start = pos + 8
        if length != 0xFFFFFFFF:  # native (uncompressed) pixel data
            frame_len = self._rows * self._cols * self._spp * (self._bits // 8)
            if start + frame_len * self._n > size or length < frame_len * self._n:
                raise ValueError(
                    f"pixel data holds {min(length, size - start)} bytes, "
                    f"{frame_len * self._n} expected (truncated?)"
                )
            return [(start + k * frame_len, frame_len) for k in range(self._n)]
        items: list[tuple[int, int]] = []
        bot: list[int] = []
        with open(self._path, "rb") as fh:
            pos = start
            first = True
            while True:
                fh.seek(pos)
                head = fh.read(8)
                if len(head) < 8:
                    raise ValueError("encapsulated pixel data ends early (truncated?)")
                group, elem, length = struct.unpack("<HHL", head)
                tag = group << 16 | elem
                if tag == 0xFFFEE0DD:
                    break
                if tag != 0xFFFEE000:
                    raise ValueError(f"unexpected tag {tag:08X} in encapsulated pixel data")
                if pos + 8 + length > size:
                    raise ValueError(
                        f"pixel data item at byte {pos} runs past the end of the file (truncated?)"
                    )
                if first:
                    if length:
                        bot = list(struct.unpack(f"<{length // 4}L", fh.read(length)))
                    first = False
                else:
                    items.append((pos + 8, length))
                pos += 8 + length
        if len(items) == self._n:
            return items
        if len(bot) == self._n:  # several fragments per frame: join them
            starts = [start + 8 + len(bot) * 4 + b for b in bot]
            frames: list[bytes] = []
            with open(self._path, "rb") as fh:
                for k in range(self._n):
                    lo = starts[k]
                    hi = starts[k + 1] if k + 1 < self._n else None
                    chunk = b""
                    for off, ln in items:
                        if off - 8 >= lo and (hi is None or off - 8 < hi):
                            fh.seek(off)
                            chunk += fh.read(ln)
                    frames.append(chunk)
            return frames
        if self._n == 1 and items:
            with open(self._path, "rb") as fh:
                chunk = b""
                for off, ln in items:
                    fh.seek(off)
                    chunk += fh.read(ln)
            return [chunk]
        raise ValueError(f"{len(items)} pixel-data fragments for {self._n} frames, no offset table")

    def _frame_bytes(self, k: int) -> bytes:
        ref = self._frames[k]
        if isinstance(ref, bytes):
            return ref
        off, ln = ref
        with open(self._path, "rb") as fh:
            fh.seek(off)
            data = fh.read(ln)
        if len(data) != ln:
            raise ValueError(f"frame {k} is truncated")
        return data

    def _decode(self, k: int) -> np.ndarray:
        """Frame ``k`` as (rows, cols, 3) uint8 RGB."""
        data = self._frame_bytes(k)
        native = not self._ds.file_meta.TransferSyntaxUID.is_compressed
        if native:
            dtype = np.uint8 if self._bits == 8 else np.dtype("<u2")
            arr: np.ndarray = np.frombuffer(data, dtype=dtype)
            if self._spp == 1:
                arr = arr.reshape(self._rows, self._cols)
            elif self._planar == 1:
                arr = np.moveaxis(arr.reshape(self._spp, self._rows, self._cols), 0, -1)
            else:
                arr = arr.reshape(self._rows, self._cols, self._spp)
            if self._photometric.startswith("YBR") and self._spp == 3:
                from pydicom.pixels import convert_color_space

                arr = convert_color_space(arr, self._photometric, "RGB")
            if self._photometric == "MONOCHROME1":
                arr = np.iinfo(arr.dtype).max - arr
            return to_rgb_uint8(arr)
        try:
            with Image.open(io.BytesIO(data)) as img:
                img.load()
                return pil_to_rgb(img)
        except Exception:  # noqa: BLE001 - Pillow lacks this codec: use pydicom's decoders
            from pydicom.pixels import pixel_array

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                arr = pixel_array(str(self._path), index=k)
            return to_rgb_uint8(arr)

    def frame(self, k: int) -> np.ndarray:
        """Decoded frame ``k`` (cached; thread-safe, a frame may rarely be decoded twice)."""
        return self._decode_cached(k)

    # -- placement --

    def _frame_positions(self, ds: Any) -> list[tuple[int, int]]:
        """Top-left (x, y) in the total pixel matrix of every frame."""
        per_frame = getattr(ds, "PerFrameFunctionalGroupsSequence", None)
        if per_frame is not None and len(per_frame) == self._n:
            pos: list[tuple[int, int]] = []
            for item in per_frame:
                pps = getattr(item, "PlanePositionSlideSequence", None)
                if not pps:
                    break
                col = getattr(pps[0], "ColumnPositionInTotalImagePixelMatrix", None)
                row = getattr(pps[0], "RowPositionInTotalImagePixelMatrix", None)
                if col is None or row is None:
                    break
                pos.append((int(col) - 1, int(row) - 1))
            else:
                self.properties["dicom.frame-order"] = "explicit (PlanePositionSlideSequence)"
                return pos
        tw, th = self.level_dimensions[0]
        ncols = -(-tw // self._cols)
        nrows = -(-th // self._rows)
        grid = ncols * nrows
        if self._n != grid:
            if self._n % grid:
                raise ValueError(
                    f"{self._n} frames cannot tile a {tw}x{th} matrix in "
                    f"{self._cols}x{self._rows} frames and no frame positions are given"
                )
            # TILED_FULL with several focal planes / optical paths: the first plane comes first.
            self.properties["dicom.planes"] = str(self._n // grid)
        row_major = [((k % ncols) * self._cols, (k // ncols) * self._rows) for k in range(grid)]
        col_major = [((k // nrows) * self._cols, (k % nrows) * self._rows) for k in range(grid)]
        if ncols == 1 or nrows == 1:
            self.properties["dicom.frame-order"] = "row-major"
            return row_major
        s_row = self._seam_score(row_major, ncols, nrows)
        s_col = self._seam_score(col_major, ncols, nrows)
        self.properties["dicom.seam-score-row-major"] = f"{s_row:.2f}"
        self.properties["dicom.seam-score-column-major"] = f"{s_col:.2f}"
        if s_col < 0.5 * s_row and s_row - s_col > 2.0:
            self.properties["dicom.frame-order"] = "column-major (detected by seam continuity)"
            return col_major
        self.properties["dicom.frame-order"] = "row-major"
        return row_major

    def _seam_score(self, positions: list[tuple[int, int]], ncols: int, nrows: int) -> float:
        """Mean absolute grey-level jump across frame seams if frames sat at ``positions``."""
        at = {(x // self._cols, y // self._rows): k for k, (x, y) in enumerate(positions)}
        tw, th = self.level_dimensions[0]
        seams: list[tuple[int, int, bool]] = []
        for r in range(nrows):
            for c in range(ncols):
                if c + 1 < ncols:
                    seams.append((at[(c, r)], at[(c + 1, r)], True))
                if r + 1 < nrows:
                    seams.append((at[(c, r)], at[(c, r + 1)], False))
        # Deterministic subsample that favours the middle of the grid (tissue), at most 24 seams.
        if len(seams) > 24:
            idx = np.linspace(0, len(seams) - 1, 24).round().astype(int)
            seams = [seams[i] for i in idx]
        total, count = 0.0, 0
        for a, b, horizontal in seams:
            fa, fb = self.frame(a).astype(np.int16), self.frame(b).astype(np.int16)
            ya = positions[a][1]
            xa = positions[a][0]
            if horizontal:
                valid = min(self._rows, th - ya)
                diff = np.abs(fa[:valid, -1] - fb[:valid, 0])
            else:
                valid = min(self._cols, tw - xa)
                diff = np.abs(fa[-1, :valid] - fb[0, :valid])
            total += float(diff.sum())
            count += diff.size
        return total / max(count, 1)

    # -- pixels --

    def _grid_index(self) -> np.ndarray | None:
        """Frame index per grid cell (-1 = no frame) when frames sit on the frame grid."""
        fw, fh = self._cols, self._rows
        if any(px % fw or py % fh or px < 0 or py < 0 for px, py in self._positions):
            return None
        tw, th = self.level_dimensions[0]
        grid = np.full((-(-th // fh), -(-tw // fw)), -1, dtype=np.int64)
        for k, (px, py) in enumerate(self._positions):
            if py // fh < grid.shape[0] and px // fw < grid.shape[1]:
                grid[py // fh, px // fw] = k
        return grid

    def read(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        out = np.full((h, w, 3), WHITE, dtype=np.uint8)
        fw, fh = self._cols, self._rows
        frames: Iterable[int]
        if self._grid is not None:
            cells = self._grid[y // fh : (y + h - 1) // fh + 1, x // fw : (x + w - 1) // fw + 1]
            frames = [int(k) for k in cells.ravel() if k >= 0]
        else:
            frames = range(len(self._positions))
        for k in frames:
            px, py = self._positions[k]
            ix0, iy0 = max(x, px), max(y, py)
            ix1, iy1 = min(x + w, px + fw), min(y + h, py + fh)
            if ix1 <= ix0 or iy1 <= iy0:
                continue
            f = self.frame(k)
            out[iy0 - y : iy1 - y, ix0 - x : ix1 - x] = f[iy0 - py : iy1 - py, ix0 - px : ix1 - px]
        return out

    def close(self) -> None:
        self._decode_cached.cache_clear()


register_backend(
    "dicom", _DicomReader, containers=("dicom",), extensions=(".dcm", ".dicom"), priority=30
)

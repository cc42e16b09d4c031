"""Is the file whole, which files hold its pixels, and what identifies its content.

:func:`tiff_structure_problem` finds truncated TIFFs before a backend trips over them,
:func:`pixel_files` lists a slide's data files and :func:`fingerprint` hashes them cheaply.
"""

from __future__ import annotations

import hashlib
import struct
from pathlib import Path

import numpy as np

__all__ = ["fingerprint", "pixel_files", "tiff_structure_problem"]

_MIB = 1 << 20

#: Byte size of the TIFF field types that can hold offsets/byte counts.
_TIFF_TYPE_SIZE = {3: 2, 4: 4, 13: 4, 16: 8, 18: 8}
_TIFF_INT_FMT = {3: "H", 4: "I", 13: "I", 16: "Q", 18: "Q"}


def tiff_structure_problem(path: Path) -> str | None:
    """Walk the TIFF IFD chain; describe the first sign of truncation, or None if sound.

    Checks that every IFD and every strip/tile byte range lies inside the file. Only reads the
    directory entries and offset tables, so it is cheap even for large slides. Hamamatsu NDPI
    (which wraps 32-bit offsets) is skipped.
    """
    if path.suffix.lower() == ".ndpi":
        return None
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(16)
        bo = "<" if head[:2] == b"II" else ">"
        version = struct.unpack(bo + "H", head[2:4])[0]
        big = version == 43
        if big:
            if len(head) < 16:
                return "header is truncated"
            ifd = struct.unpack(bo + "Q", head[8:16])[0]
        else:
            if len(head) < 8:
                return "header is truncated"
            ifd = struct.unpack(bo + "I", head[4:8])[0]
        cnt_fmt, cnt_size = ("Q", 8) if big else ("H", 2)
        entry_size, off_fmt, off_size = (20, "Q", 8) if big else (12, "I", 4)
        seen: set[int] = set()
        n = 0
        while ifd and n < 100_000:
            if ifd in seen:
                return f"IFD chain loops at byte {ifd}"
            seen.add(ifd)
            if ifd + cnt_size > size:
                return f"IFD {n} at byte {ifd} lies beyond the end of the file ({size} bytes)"
            fh.seek(ifd)
            count = struct.unpack(bo + cnt_fmt, fh.read(cnt_size))[0]
            end = ifd + cnt_size + count * entry_size + off_size
            if end > size:
                return f"IFD {n} at byte {ifd} runs past the end of the file ({size} bytes)"
            block = fh.read(count * entry_size)
            nxt = struct.unpack(bo + off_fmt, fh.read(off_size))[0]
            arrays: dict[int, np.ndarray] = {}
            for i in range(count):
                e = block[i * entry_size : (i + 1) * entry_size]
                tag, typ = struct.unpack(bo + "HH", e[:4])
                if tag not in (273, 279, 324, 325) or typ not in _TIFF_INT_FMT:
                    continue
                num = struct.unpack(bo + ("Q" if big else "I"), e[4 : 4 + (8 if big else 4)])[0]
                raw_value = e[4 + (8 if big else 4) :]
                nbytes = num * _TIFF_TYPE_SIZE[typ]
                if nbytes <= len(raw_value):
                    data = raw_value[:nbytes]
                else:
                    where = struct.unpack(bo + off_fmt, raw_value)[0]
                    if where + nbytes > size:
                        return f"IFD {n} offset table runs past the end of the file ({size} bytes)"
                    here = fh.tell()
                    fh.seek(where)
                    data = fh.read(nbytes)
                    fh.seek(here)
                arrays[tag] = np.frombuffer(data, dtype=np.dtype(bo + _TIFF_INT_FMT[typ])).astype(
                    np.uint64
                )
            for off_tag, cnt_tag in ((273, 279), (324, 325)):
                offs, cnts = arrays.get(off_tag), arrays.get(cnt_tag)
                if offs is None or cnts is None or len(offs) != len(cnts) or not len(offs):
                    continue
                used = cnts > 0
                if used.any():
                    last = int((offs[used] + cnts[used]).max())
                    if last > size:
                        return (
                            f"image data of IFD {n} extends to byte {last}, past the end of the "
                            f"file ({size} bytes)"
                        )
            ifd = nxt
            n += 1
    return None


def pixel_files(path: Path) -> list[Path]:
    """The files that hold a slide's pixel data: the file itself, plus for multi-file formats
    the data files beside it (MIRAX: the folder named like the ``.mrxs``; a folder given as the
    slide: every file in it)."""
    path = Path(path)
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.is_file())
    files = [path]
    if path.suffix.lower() == ".mrxs":
        data = path.with_suffix("")
        if data.is_dir():
            files += sorted(p for p in data.rglob("*") if p.is_file())
    return files


def fingerprint(path: Path, dimensions: tuple[int, int]) -> str:
    """sha256 of the dimensions and, for every file holding pixel data (:func:`pixel_files`),
    its name, size, first and last MiB and 8 evenly spaced 64 KiB blocks (hex).

    Content only (no modification times), so a copied slide keeps its nucleus ids; cheap on
    any size (at most ~2.5 MiB read per file).
    """
    h = hashlib.sha256()
    h.update(f"{dimensions[0]}x{dimensions[1]}:".encode())
    root = path if path.is_dir() else path.parent
    for f in pixel_files(path):
        size = f.stat().st_size
        h.update(f"{f.relative_to(root).as_posix() if f != path else ''}:{size}:".encode())
        with open(f, "rb") as fh:
            h.update(fh.read(_MIB))
            if size > 2 * _MIB:
                for k in range(1, 9):
                    fh.seek(size * k // 9)
                    h.update(fh.read(64 * 1024))
            if size > _MIB:
                fh.seek(max(size - _MIB, _MIB))
                h.update(fh.read(_MIB))
    return h.hexdigest()

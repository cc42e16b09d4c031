"""Bad input of every kind, table-driven: each case is generated in code and run through the
CLI; each must end with its exit code, exactly one stderr line, no traceback, and no output file
under a final name (nor a half-written one)."""

from __future__ import annotations

import errno
import fcntl
import gzip
import json
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from wsi_nuclei.cli import main
from wsi_nuclei.demo import make_nuclei_image, write_pyramidal_tiff

FINAL = (
    "nuclei.geojson.gz",
    "nuclei.geojson",
    "nuclei.parquet",
    "tissue.geojson",
    "summary.csv",
    "summary.json",
    "run.json",
)


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("good")
    rgb, _, _ = make_nuclei_image(512, 512, seed=2, min_radius=6, gap=4)
    return write_pyramidal_tiff(d / "good.svs", rgb, mpp=0.25)


def _regions(path: Path, doc) -> Path:
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    return path


def _poly(coords) -> dict:
    return {
        "type": "FeatureCollection",
        "features": [
            {
                "type": "Feature",
                "geometry": {"type": "Polygon", "coordinates": [coords]},
                "properties": {"objectType": "annotation", "name": "r"},
            }
        ],
    }


# each case: (name, exit code, builder(tmp, good) -> (argv, out folder))
def _slide_case(make, code, extra=()):
    def build(tmp: Path, good: Path):
        slide = make(tmp, good)
        return [str(slide), *extra], code

    return build


def _zero(tmp, good):
    (tmp / "zero.svs").write_bytes(b"")
    return tmp / "zero.svs"


def _random(tmp, good):
    (tmp / "random.svs").write_bytes(
        np.random.default_rng(0).integers(0, 256, 50_000, dtype=np.uint8).tobytes()
    )
    return tmp / "random.svs"


def _truncated_svs(tmp, good):
    data = good.read_bytes()
    (tmp / "trunc.svs").write_bytes(data[: len(data) // 3])
    return tmp / "trunc.svs"


def _truncated_tiff(tmp, good):
    import tifffile

    tifffile.imwrite(
        tmp / "t.tif", np.full((600, 600, 3), 128, np.uint8), tile=(256, 256), photometric="rgb"
    )
    data = (tmp / "t.tif").read_bytes()
    (tmp / "t.tif").write_bytes(data[: len(data) // 2])
    return tmp / "t.tif"


def _wrong_ext(tmp, good):
    (tmp / "notes.tif").write_text("these are my notes, not a slide\n" * 100)
    return tmp / "notes.tif"


def _directory(tmp, good):
    (tmp / "folder.svs").mkdir()
    return tmp / "folder.svs"


def _png(tmp, good, arr=None, name="img.png"):
    if arr is None:
        arr, _, _ = make_nuclei_image(300, 300, seed=1)
    Image.fromarray(arr).save(tmp / name)
    return tmp / name


def _white_tiff(tmp, good):
    return write_pyramidal_tiff(tmp / "white.svs", np.full((512, 512, 3), 250, np.uint8), mpp=0.25)


def _u16(tmp, good):
    import tifffile

    tifffile.imwrite(tmp / "u16.tif", np.full((300, 300, 3), 60000, np.uint16), photometric="rgb")
    return tmp / "u16.tif"


def _lying_header(tmp, good):
    import tifffile

    tifffile.imwrite(tmp / "huge.tif", np.zeros((64, 64, 3), np.uint8), photometric="rgb")
    with tifffile.TiffFile(tmp / "huge.tif") as tf:
        offs = [
            t.valueoffset
            for t in tf.pages[0].tags.values()
            if t.name in ("ImageWidth", "ImageLength")
        ]
    d = bytearray((tmp / "huge.tif").read_bytes())
    for off in offs:
        struct.pack_into("<I", d, off, 200_000)
    (tmp / "huge.tif").write_bytes(bytes(d))
    return tmp / "huge.tif"


def _regions_case(doc, code, *, gz=False):
    def build(tmp: Path, good: Path):
        path = tmp / ("r.geojson.gz" if gz else "r.geojson")
        if gz:
            path.write_bytes(
                gzip.compress(doc.encode() if isinstance(doc, str) else json.dumps(doc).encode())
            )
        else:
            _regions(path, doc)
        return [str(good), "--model", "classic", "--regions", str(path)], code

    return build


def _weights_case(content: bytes, code, model="wsi-nuclei-lite0"):
    def build(tmp: Path, good: Path):
        w = tmp / "w.pt"
        w.write_bytes(content)
        return [str(good), "--model", model, "--weights", str(w)], code

    return build


class _Evil:
    """Unpickling this would create a file (a weights file must never be unpickled freely)."""

    def __reduce__(self):
        return (open, (str(Path(os.environ.get("WSI_EVIL_TARGET", "/tmp/evil")).resolve()), "w"))


def _evil_pickle() -> bytes:
    return pickle.dumps(_Evil())


def _out_is_file(tmp, good):
    (tmp / "afile").write_text("x")
    return [str(good), "--model", "classic", "--out", str(tmp / "afile" / "sub")], 7


def _out_unwritable(tmp, good):
    return [str(good), "--model", "classic", "--out", "/proc/wsi-nuclei-cannot-write-here"], 7


def _existing(tmp, good):
    out = tmp / "out"
    out.mkdir()
    (out / "nuclei.parquet").write_text("an earlier result")
    (out / "run.json").write_text("{}")
    return [str(good), "--model", "classic", "--out", str(out)], 7


CASES = {
    "missing file": (lambda tmp, good: ([str(tmp / "nope.svs")], 2)),
    "zero-byte file": _slide_case(_zero, 3),
    "random bytes": _slide_case(_random, 3),
    "truncated SVS": _slide_case(_truncated_svs, 3),
    "truncated TIFF": _slide_case(_truncated_tiff, 3, ("--mpp", "0.25")),
    "text file with a slide extension": _slide_case(_wrong_ext, 3),
    "directory as slide": _slide_case(_directory, 3),
    "PNG without --mpp": _slide_case(_png, 4),
    "--mpp 0": _slide_case(_png, 2, ("--mpp", "0")),
    "--mpp negative": _slide_case(_png, 2, ("--mpp", "-0.25")),
    "--mpp 1e6": _slide_case(_png, 2, ("--mpp", "1e6")),
    "slide with no tissue": _slide_case(_white_tiff, 5),
    "all-black image": _slide_case(
        lambda t, g: _png(t, g, np.zeros((300, 300, 3), np.uint8), "black.png"),
        5,
        ("--mpp", "0.25"),
    ),
    "all-white image": _slide_case(
        lambda t, g: _png(t, g, np.full((300, 300, 3), 255, np.uint8), "white.png"),
        5,
        ("--mpp", "0.25"),
    ),
    "transparent RGBA PNG": _slide_case(
        lambda t, g: _png(t, g, np.zeros((300, 300, 4), np.uint8), "rgba.png"), 5, ("--mpp", "0.25")
    ),
    "16-bit TIFF without tissue": _slide_case(_u16, 5, ("--mpp", "0.25")),
    "TIFF header that lies about its size": _slide_case(_lying_header, 3, ("--mpp", "0.25")),
    "regions: malformed JSON": _regions_case("{not json", 6),
    "regions: empty file": _regions_case("", 6),
    "regions: empty FeatureCollection": _regions_case(
        {"type": "FeatureCollection", "features": []}, 6
    ),
    "regions: points only": _regions_case(
        {
            "type": "FeatureCollection",
            "features": [
                {
                    "type": "Feature",
                    "geometry": {"type": "Point", "coordinates": [10, 10]},
                    "properties": {},
                }
            ],
        },
        6,
    ),
    "regions: outside the slide": _regions_case(
        _poly([[9000, 9000], [9500, 9000], [9500, 9500], [9000, 9000]]), 5
    ),
    "regions: NaN coordinates": _regions_case(
        '{"type": "Polygon", "coordinates": [[[0, 0], [NaN, 0], [10, 10], [0, 0]]]}', 6
    ),
    "regions: bare list of numbers": _regions_case([1, 2, 3], 6),
    "regions: gzip of garbage": _regions_case("\x00\x01garbage", 6, gz=True),
    "regions: polygon with 2 points": _regions_case(_poly([[0, 0], [10, 10], [0, 0]]), 6),
    "weights: truncated file": _weights_case(b"PK\x03\x04" + b"\x00" * 20, 8),
    "weights: random bytes": _weights_case(
        np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes(), 8
    ),
    "weights: a pickle that would create a file": _weights_case(_evil_pickle(), 8),
    "unknown model": (lambda tmp, good: ([str(good), "--model", "no-such-model"], 8)),
    "--tta for a model without it": (
        lambda tmp, good: ([str(good), "--model", "classic", "--tta"], 8)
    ),
    "--precision bf16 for a model without a network": (
        lambda tmp, good: ([str(good), "--model", "classic", "--precision", "bf16"], 8)
    ),
    "--precision fp16 on the CPU": (
        lambda tmp, good: ([str(good), "--device", "cpu", "--precision", "fp16"], 8)
    ),
    "--precision of an unknown kind": (lambda tmp, good: ([str(good), "--precision", "int4"], 2)),
    "--precision int8 for a model without a calibration": (
        lambda tmp, good: ([str(good), "--model", "hovernet-pannuke", "--precision", "int8"], 8)
    ),
    "output path under a file": _out_is_file,
    "output folder not writable": _out_unwritable,
    "existing results without --overwrite": _existing,
    "--halo larger than --block-size": (
        lambda tmp, good: ([str(good), "--block-size", "128", "--halo", "300"], 2)
    ),
    "weights for a model with none to load": (
        lambda tmp, good: ([str(good), "--model", "classic", "--weights", str(tmp / "w.pt")], 8)
    ),
    "--batch-size 0": (lambda tmp, good: ([str(good), "--batch-size", "0"], 2)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input(
    case: str,
    good: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("WSI_EVIL_TARGET", str(tmp_path / "evil-was-here"))
    argv, code = CASES[case](tmp_path, good)
    if "--out" not in argv:
        argv += ["--out", str(tmp_path / "out")]
    out = Path(argv[argv.index("--out") + 1])
    before = {p.name: p.read_bytes() for p in out.glob("*") if p.is_file()} if out.is_dir() else {}
    try:
        got = main(["run", *argv, "-q"])
    except SystemExit as exc:  # argparse
        got = exc.code
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert got == code, err
    assert "Traceback" not in err
    if code == 2 and lines and lines[0].startswith("usage:"):
        assert ": error: argument" in lines[-1]  # argparse's own form
    else:
        assert len(lines) == 1 and lines[0].startswith("wsi-nuclei: error: "), err
    for name in FINAL:  # nothing new under a final name, earlier files untouched
        p = out / name
        assert not p.exists() or before.get(name) == p.read_bytes(), name
    if out.is_dir():
        assert not list(out.glob(".*tmp*"))
    assert not (tmp_path / "evil-was-here").exists()


def test_there_are_at_least_30_cases() -> None:
    assert len(CASES) >= 30


def test_full_filesystem_injected(
    good: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ENOSPC on the very first part file: one line, exit 7, nothing under a final name."""
    from wsi_nuclei import _io

    def full(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(_io.os, "replace", full)
    out = tmp_path / "out"
    code = main(
        ["run", str(good), "--model", "classic", "--tissue", "none", "--out", str(out), "-q"]
    )
    err = capsys.readouterr().err
    assert code == 7 and len(err.strip().splitlines()) == 1 and "No space left" in err
    assert not any((out / n).exists() for n in FINAL)


def test_concurrent_run_into_the_same_folder(
    good: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    with open(out / ".wsi-nuclei.lock", "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        code = main(["run", str(good), "--model", "classic", "--out", str(out), "-q"])
    err = capsys.readouterr().err
    assert code == 7 and len(err.strip().splitlines()) == 1 and "another wsi-nuclei run" in err


def test_unicode_and_spaces_in_paths(
    good: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    d = tmp_path / "Präparat 1 — é"
    d.mkdir()
    slide = d / "slide ü 1.svs"
    slide.write_bytes(good.read_bytes())
    regions = _regions(
        d / "Regionen ä.geojson", _poly([[10, 10], [400, 10], [400, 400], [10, 400], [10, 10]])
    )
    out = d / "Ergebnisse ß"
    code = main(
        [
            "run",
            str(slide),
            "--model",
            "classic",
            "--regions",
            str(regions),
            "--out",
            str(out),
            "-q",
        ]
    )
    assert code == 0, capsys.readouterr().err
    assert (out / "nuclei.geojson.gz").is_file() and json.loads((out / "summary.json").read_text())[
        "slide"
    ]["n_nuclei"] > 0

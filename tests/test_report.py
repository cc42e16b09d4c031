"""report.html and ``wsi-nuclei overlay`` (wsi_nuclei.report) on a synthetic slide with known
nuclei, in a real headless browser when one is installed, and on a real slide.

The run: a 1024 x 1024 px synthetic slide at 0.25 µm/px, the ``classic`` model, two user
regions that overlap (so the run has a warning to show). The overlay is checked against the
slide's own pixels: outside the drawn outlines it is the slide, and the outline pixels are
exactly the class colours, on the boundary of each known nucleus.
"""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import shapely
from PIL import Image

from wsi_nuclei import RunConfig, report, run
from wsi_nuclei.cli import main
from wsi_nuclei.demo import make_nuclei_image, write_pyramidal_tiff
from wsi_nuclei.schema import CLASS_COLORS, CLASS_NAMES
from wsi_nuclei.slide import open_slide

SIZE = 1024


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
class _Cells(HTMLParser):
    """Elements with data-key (path, kind, exact value, shown text), and every image source."""

    def __init__(self) -> None:
        super().__init__()
        self.cells: list[dict] = []
        self.images: list[str] = []
        self.attrs_with_urls: list[str] = []
        self.tags: set[str] = set()
        self._open: list[dict | None] = []

    def handle_starttag(self, tag: str, attrs: list) -> None:
        a = dict(attrs)
        self.tags.add(tag)
        for k in ("src", "href"):
            if k in a:
                self.attrs_with_urls.append(a[k])
                if a[k].startswith("data:image/png;base64,"):
                    self.images.append(a[k])
        if "data-key" in a:
            cell = {
                "key": a["data-key"],
                "kind": a["data-kind"],
                "value": json.loads(a["data-value"]),
                "text": "",
            }
            self.cells.append(cell)
            self._open.append(cell)
        elif tag not in ("img", "image", "rect", "line", "path", "stop", "polyline", "meta", "br"):
            self._open.append(None)

    def handle_endtag(self, tag: str) -> None:
        if self._open and tag not in (
            "img",
            "image",
            "rect",
            "line",
            "path",
            "stop",
            "polyline",
            "meta",
            "br",
        ):
            self._open.pop()

    def handle_data(self, data: str) -> None:
        if self._open and self._open[-1] is not None:
            self._open[-1]["text"] += data


def _parse(text: str) -> _Cells:
    p = _Cells()
    p.feed(text)
    return p


def _lookup(summary: dict, key: str):
    v = summary
    for part in key.split("."):
        v = v[int(part)] if isinstance(v, list) else v[part]
    return v


def _expected_text(value, kind: str) -> str:
    """The page's rounding rules, written out independently of wsi_nuclei.report."""
    if value is None:
        return "n/a"
    if kind == "raw":
        return value if isinstance(value, str) else json.dumps(value)
    return {
        "count": lambda v: f"{v:,}",
        "fraction": lambda v: f"{100 * v:.1f} %",
        "density": lambda v: f"{v:,.1f}",
        "area_mm2": lambda v: f"{v:.4f}",
        "area_um2": lambda v: f"{v:.1f}",
    }[kind](value)


def _check_numbers(cells: list[dict], summary: dict) -> set[str]:
    """Every marked number equals summary.json (exact value, and text by the rounding rules)."""
    assert cells
    for c in cells:
        want = _lookup(summary, c["key"])
        assert c["value"] == want, c
        assert c["text"] == _expected_text(want, c["kind"]), c
    return {c["key"] for c in cells}


def _decode(uri: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))).convert("RGB"))


def _regions_file(path: Path, polygons: dict[str, list[tuple[float, float]]]) -> Path:
    feats = []
    for name, pts in polygons.items():
        ring = [list(map(float, p)) for p in pts] + [list(map(float, pts[0]))]
        feats.append(
            {
                "type": "Feature",
                "geometry": {"type": "Polygon", "coordinates": [ring]},
                "properties": {"objectType": "annotation", "name": name},
            }
        )
    path.write_text(json.dumps({"type": "FeatureCollection", "features": feats}))
    return path


def _copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    (dst / "report.html").unlink(missing_ok=True)
    return dst


# --------------------------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> dict:
    d = tmp_path_factory.mktemp("report")
    rgb, inst, table = make_nuclei_image(SIZE, SIZE, seed=1, min_radius=6, max_radius=14, gap=4)
    slide = write_pyramidal_tiff(d / "s.svs", rgb, mpp=0.25, compression="deflate")
    big = [(40, 40), (700, 40), (700, 980), (40, 980)]
    side = [(600, 100), (990, 100), (990, 600), (600, 600)]  # overlaps the big one: a warning
    regions = _regions_file(d / "roi.geojson", {"Region <big> & co": big, "side": side})
    out = d / "run"
    res = run(
        RunConfig(
            slide=slide,
            out=out,
            model="classic",
            tissue="none",
            regions=regions,
            block_size=256,
            quiet=True,
        )
    )
    return {"dir": d, "slide": slide, "out": out, "res": res, "rgb": rgb}


@pytest.fixture(scope="module")
def classed(synth: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the run whose nuclei have classes 1..5 in turn (the classic model has none)."""
    out = _copy_run(synth["out"], tmp_path_factory.mktemp("classed") / "run")
    import pyarrow as pa
    import pyarrow.parquet as pq

    t = pq.read_table(out / "nuclei.parquet")
    cls = (np.arange(t.num_rows) % 5 + 1).astype(np.int8)
    t = t.set_column(t.schema.get_field_index("class_id"), "class_id", pa.array(cls))
    t = t.set_column(
        t.schema.get_field_index("class_name"),
        "class_name",
        pa.array([CLASS_NAMES[c] for c in cls]),
    )
    pq.write_table(t, out / "nuclei.parquet")
    return out


# --------------------------------------------------------------------------------------------
# report.html
# --------------------------------------------------------------------------------------------
def test_run_writes_a_self_contained_report(synth: dict) -> None:
    out, res = synth["out"], synth["res"]
    page = (out / "report.html").read_text(encoding="utf-8")
    assert res.files["report.html"] == out / "report.html"
    p = _parse(page)
    # nothing to fetch: every src/href is an embedded image or an in-page reference
    assert p.attrs_with_urls and all(
        u.startswith(("data:image/png;base64,", "#")) or u.startswith("url(#")
        for u in p.attrs_with_urls
    )
    assert (
        not re.search(r"https?://", page)
        and "<script" not in page
        and "<link" not in page
        and "@import" not in page
    )
    # thumbnail, density map, the densest crop and 3 random ones
    assert len(p.images) == 6
    thumb, heat, *crops = (_decode(u) for u in p.images)
    assert thumb.shape == heat.shape == (720, 720, 3)
    assert all(c.shape == (400, 400, 3) for c in crops)  # 100 µm at 0.25 µm/px
    # the classic model's nuclei are unclassified: grey outlines in every crop
    grey = np.array(CLASS_COLORS[0], np.uint8)
    assert all((c == grey).all(axis=2).sum() > 500 for c in crops)
    # the run's warning (overlapping regions) is shown, user text escaped
    assert res.manifest["warnings"] and all(
        f"<b>Warning:</b> {w}" in page for w in res.manifest["warnings"]
    )
    assert "Region &lt;big&gt; &amp; co" in page and "Region <big>" not in page
    # no reliability note in this run.json: nothing shown for it
    assert 'id="reliability"' not in page


def test_numbers_on_the_page_equal_summary_json(synth: dict) -> None:
    out = synth["out"]
    summary = json.loads((out / "summary.json").read_text())
    keys = _check_numbers(_parse((out / "report.html").read_text(encoding="utf-8")).cells, summary)
    # every QC figure, and per region and for the slide every class's count, fraction, density
    assert {f"qc.{k}" for k in summary["qc"]} <= keys
    assert {
        "qc.seam_candidates",
        "qc.seam_duplicates_removed",
        "qc.nuclei_outside_regions_removed",
        "qc.mpp_source",
        "qc.model_sha256",
        "qc.seconds_total",
        "qc.passes_per_pixel",
        "qc.patches_planned",
    } <= keys
    names = summary["class_names"]
    for path in ["slide", "regions.0", "regions.1"]:
        for what in ("counts", "fractions", "density_per_mm2"):
            assert {f"{path}.{what}.{n}" for n in names} <= keys
        assert {
            f"{path}.n_nuclei",
            f"{path}.area_mm2",
            f"{path}.density_per_mm2.total",
            f"{path}.area_um2.all.median",
        } <= keys
    # known answers: the slide count is the number of nuclei in nuclei.parquet, and both
    # overlapping regions hold nuclei
    n = len(pd.read_parquet(out / "nuclei.parquet", columns=["id"]))
    assert summary["slide"]["n_nuclei"] == n > 300
    assert all(r["n_nuclei"] > 50 for r in summary["regions"])


def test_report_is_deterministic_and_re_rendered_from_the_folder(
    synth: dict, tmp_path: Path, capsys
) -> None:
    first = (synth["out"] / "report.html").read_bytes()
    copy = _copy_run(synth["out"], tmp_path / "run")
    assert main(["report", str(copy)]) == 0
    assert capsys.readouterr().out.strip() == str(copy / "report.html")
    assert (copy / "report.html").read_bytes() == first  # same run folder -> same bytes
    assert not list(copy.glob(".*tmp*"))


def test_reliability_note_is_shown_prominently(synth: dict, tmp_path: Path) -> None:
    copy = _copy_run(synth["out"], tmp_path / "run")
    m = json.loads((copy / "run.json").read_text())
    m["reliability_note"] = "This model never predicts <Dead>; Epithelial only weakly."
    (copy / "run.json").write_text(json.dumps(m))
    page = report.write_report(copy).read_text(encoding="utf-8")
    note = re.search(r'<div class="note" id="reliability">(.*?)</div>', page)
    assert note and "never predicts &lt;Dead&gt;; Epithelial only weakly." in note.group(1)
    assert page.index('id="reliability"') < page.index("<h2>Slide</h2>")  # before everything else


def test_report_without_the_slide_keeps_the_numbers(synth: dict, tmp_path: Path, capsys) -> None:
    copy = _copy_run(synth["out"], tmp_path / "run")
    m = json.loads((copy / "run.json").read_text())
    m["slide"] = m["slide_path"] = str(tmp_path / "moved.svs")
    (copy / "run.json").write_text(json.dumps(m))
    assert main(["report", str(copy)]) == 0
    page = (copy / "report.html").read_text(encoding="utf-8")
    p = _parse(page)
    assert p.images == [] and "pictures are omitted" in page
    _check_numbers(p.cells, json.loads((copy / "summary.json").read_text()))
    # an explicit --slide that does not exist is an error, in one line
    capsys.readouterr()
    assert main(["report", str(copy), "--slide", str(tmp_path / "nope.svs")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nope.svs" in err and "Traceback" not in err
    # --slide with the right file gives the pictures again
    assert main(["report", str(copy), "--slide", str(synth["slide"])]) == 0
    again = _parse((copy / "report.html").read_text(encoding="utf-8")).images
    assert (
        again == _parse((synth["out"] / "report.html").read_text(encoding="utf-8")).images
        and len(again) == 6
    )


def test_report_of_a_folder_that_is_not_a_run(tmp_path: Path, capsys) -> None:
    assert main(["report", str(tmp_path / "missing")]) == 2
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert (
        len(err) == 2
        and all(e.startswith("wsi-nuclei: error: ") for e in err)
        and "run.json" in err[1]
    )


def test_a_failing_report_does_not_lose_the_run(
    synth: dict, tmp_path: Path, monkeypatch, capsys
) -> None:
    rgb = synth["rgb"][:512, :512]
    slide = write_pyramidal_tiff(
        tmp_path / "small.svs", np.ascontiguousarray(rgb), mpp=0.25, compression="deflate"
    )

    def broken(*a, **k):
        raise RuntimeError("drawing failed\nsecond line")

    monkeypatch.setattr(report, "write_report", broken)
    res = run(
        RunConfig(slide=slide, out=tmp_path / "a", model="classic", tissue="none", quiet=True)
    )
    err = capsys.readouterr().err
    assert (
        res.n_nuclei > 50
        and (tmp_path / "a" / "run.json").is_file()
        and (tmp_path / "a" / "summary.json").is_file()
    )
    assert not (tmp_path / "a" / "report.html").exists() and "report.html" not in res.files
    lines = [ln for ln in err.splitlines() if "report" in ln]
    assert (
        len(lines) == 1
        and "warning: report.html not written" in lines[0]
        and "drawing failed" in lines[0]
    )
    assert "second line" not in err and "Traceback" not in err
    monkeypatch.undo()
    # --no-report: no page, and no warning
    assert (
        main(
            [
                "run",
                str(slide),
                "--out",
                str(tmp_path / "b"),
                "--model",
                "classic",
                "--tissue",
                "none",
                "--quiet",
                "--no-report",
            ]
        )
        == 0
    )
    assert (tmp_path / "b" / "run.json").is_file() and not (tmp_path / "b" / "report.html").exists()
    assert "report" not in capsys.readouterr().err
    assert json.loads((tmp_path / "b" / "run.json").read_text())["slide_path"] == str(
        slide.resolve()
    )


# --------------------------------------------------------------------------------------------
# overlay
# --------------------------------------------------------------------------------------------
def test_overlay_draws_known_nuclei_in_class_colours(
    synth: dict, classed: Path, tmp_path: Path, capsys
) -> None:
    x, y, w, h = 300, 200, 320, 240
    png = tmp_path / "ov.png"
    assert (
        main(
            [
                "overlay",
                str(classed),
                "--x",
                str(x),
                "--y",
                str(y),
                "--size",
                str(w),
                str(h),
                "-o",
                str(png),
            ]
        )
        == 0
    )
    assert capsys.readouterr().out.strip() == str(png)
    ov = np.asarray(Image.open(png).convert("RGB"))
    assert ov.shape == (h, w, 3)
    with open_slide(synth["slide"]) as s:
        base = s.read_region((x, y), 0, (w, h))
    colours = {c: np.array(CLASS_COLORS[c], np.uint8) for c in range(1, 6)}
    changed = (ov != base).any(axis=2)
    drawn = np.zeros((h, w), bool)
    for col in colours.values():
        drawn |= (ov == col).all(axis=2)
    # the slide everywhere but on the outlines, and outlines only in class colours
    assert changed.sum() > 2000 and not (changed & ~drawn).any()
    df = pd.read_parquet(
        classed / "nuclei.parquet", columns=["centroid_x", "centroid_y", "class_id", "geometry"]
    )
    geoms = shapely.from_wkb(df["geometry"].to_numpy())
    inside = [
        i
        for i, g in enumerate(geoms)
        if shapely.box(x + 3, y + 3, x + w - 3, y + h - 3).contains(g)
    ]
    assert len(inside) > 20 and len(set(df["class_id"].iloc[inside])) == 5
    for i in inside:
        g, col = geoms[i], colours[int(df["class_id"].iloc[i])]
        ring = np.asarray(g.exterior.coords)
        # every vertex of the outline has a pixel of the nucleus's class colour within 1 px
        for vx, vy in ring[::3]:
            c, r = int(vx - x), int(vy - y)
            win = ov[max(0, r - 1) : r + 2, max(0, c - 1) : c + 2]
            assert (win == col).all(axis=2).any(), (i, vx, vy)
        # the middle of the nucleus is the slide's own pixel
        cx, cy = int(df["centroid_x"].iloc[i] - x), int(df["centroid_y"].iloc[i] - y)
        assert not changed[cy, cx]
    # in the report of the same folder, the crops show all five class colours
    p = _parse(report.write_report(classed).read_text(encoding="utf-8"))
    crops = [_decode(u) for u in p.images[2:]]
    assert all(
        sum((c == col).all(axis=2).sum() > 50 for col in colours.values()) == 5 for c in crops
    )


def test_overlay_refuses_bad_regions_and_a_missing_slide_in_one_line(
    synth: dict, tmp_path: Path, capsys
) -> None:
    out = str(synth["out"])
    cases = [
        (["overlay", out, "--x", "900", "--y", "0", "--size", "200"], 1, "outside the slide"),
        (["overlay", out, "--x", "0", "--y", "1000", "--size", "10", "30"], 1, "outside the slide"),
        (["overlay", out, "--x", "0", "--y", "0", "--size", "1", "2", "3"], 2, "--size"),
        (["overlay", out, "--x", "-5", "--y", "0", "--size", "10"], 2, "--x"),
        (
            ["overlay", out, "--x", "0", "--y", "0", "--size", "10", "-o", str(tmp_path / "a.jpg")],
            7,
            "PNG",
        ),
        (
            ["overlay", str(tmp_path / "none"), "--x", "0", "--y", "0", "--size", "10"],
            2,
            "no such run folder",
        ),
        (
            [
                "overlay",
                out,
                "--x",
                "0",
                "--y",
                "0",
                "--size",
                "10",
                "--slide",
                str(tmp_path / "x.svs"),
            ],
            2,
            "x.svs",
        ),
    ]
    for argv, code, text in cases:
        try:
            rc = main(argv)
        except SystemExit as exc:  # argparse errors
            rc = exc.code
        err = capsys.readouterr().err
        last = err.strip().splitlines()[-1]
        assert rc == code and text in last and "Traceback" not in err, (argv, rc, err)
    # the slide moved: one line naming --slide
    copy = _copy_run(synth["out"], tmp_path / "run")
    m = json.loads((copy / "run.json").read_text())
    m["slide"] = m["slide_path"] = str(tmp_path / "gone.svs")
    (copy / "run.json").write_text(json.dumps(m))
    assert main(["overlay", str(copy), "--x", "0", "--y", "0", "--size", "64"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "gone.svs" in err and "--slide" in err
    # another slide than the run's: refused
    other = write_pyramidal_tiff(
        tmp_path / "other.svs", np.full((256, 256, 3), 200, np.uint8), mpp=0.25
    )
    assert (
        main(["overlay", str(copy), "--x", "0", "--y", "0", "--size", "64", "--slide", str(other)])
        == 1
    )
    assert "not the slide of this run" in capsys.readouterr().err
    # default output name, in the run folder
    assert (
        main(
            [
                "overlay",
                str(copy),
                "--x",
                "10",
                "--y",
                "20",
                "--size",
                "64",
                "32",
                "--slide",
                str(synth["slide"]),
            ]
        )
        == 0
    )
    assert Image.open(copy / "overlay_x10_y20_64x32.png").size == (64, 32)


def test_help_explains_every_option(capsys) -> None:
    for cmd, opts in (
        ("overlay", ["--x", "--y", "--size", "--output", "--slide", "--line-width"]),
        ("report", ["--slide", "--crops", "--seed"]),
        ("run", ["--no-report"]),
    ):
        with pytest.raises(SystemExit):
            main([cmd, "--help"])
        text = capsys.readouterr().out
        for o in opts:
            line = next(ln for ln in text.splitlines() if ln.strip().startswith(o))
            assert len(line.split()) > 2 or o == "--output", (cmd, o, line)
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    assert "report.html" in " ".join(capsys.readouterr().out.split())


# --------------------------------------------------------------------------------------------
# a real headless browser
# --------------------------------------------------------------------------------------------
def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if path := shutil.which(name):
            return path
    return None


def _browser(args: list[str], profile: Path) -> subprocess.CompletedProcess:
    exe = _chromium()
    if exe is None:
        pytest.skip(
            "no Chromium binary found (apt-get install chromium); the headless-browser check needs one"
        )
    cmd = [
        exe,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--hide-scrollbars",
        "--no-first-run",
        f"--user-data-dir={profile}",
        *args,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180)


def test_report_in_a_headless_browser(synth: dict, tmp_path: Path) -> None:
    page = synth["out"] / "report.html"
    shot = tmp_path / "shot.png"
    r = _browser(
        ["--window-size=1280,1800", f"--screenshot={shot}", page.as_uri()], tmp_path / "profile"
    )
    assert shot.is_file(), r.stderr[-2000:]
    img = np.asarray(Image.open(shot).convert("RGB")).astype(float)
    assert img.shape[:2] == (1800, 1280)
    # not blank: the thumbnail, density map and crops make it far from a uniform page
    assert img.std() > 30
    assert (
        (img.max(axis=2) - img.min(axis=2)) > 60
    ).mean() > 0.05  # coloured pixels (H&E, heat map)
    # the numbers the browser rendered equal summary.json
    r = _browser(["--dump-dom", page.as_uri()], tmp_path / "profile")
    assert "data-key" in r.stdout, r.stderr[-2000:]
    summary = json.loads((synth["out"] / "summary.json").read_text())
    keys = _check_numbers(_parse(r.stdout).cells, summary)
    assert {f"qc.{k}" for k in summary["qc"]} <= keys and "slide.n_nuclei" in keys


# --------------------------------------------------------------------------------------------
# a real slide
# --------------------------------------------------------------------------------------------
@pytest.mark.shared
@pytest.mark.slow
def test_report_on_a_real_slide(wsi_dir: Path, tmp_path: Path) -> None:
    path = wsi_dir / "CMU-1-Small-Region.svs"
    if not path.is_file():
        pytest.skip(f"real slide not available: {path}")
    res = run(RunConfig(slide=path, out=tmp_path / "cmu", model="classic", quiet=True))
    page = (tmp_path / "cmu" / "report.html").read_text(encoding="utf-8")
    p = _parse(page)
    summary = json.loads((tmp_path / "cmu" / "summary.json").read_text())
    _check_numbers(p.cells, summary)
    assert summary["slide"]["n_nuclei"] == res.n_nuclei > 1000
    assert len(p.images) == 6
    thumb = _decode(p.images[0])
    assert max(thumb.shape[:2]) == 720 and thumb.std() > 20  # tissue, not glass
    # 0.499 µm/px: crops of 100 µm are 200 px; every crop lies on tissue with nuclei drawn
    grey = np.array(CLASS_COLORS[0], np.uint8)
    for uri in p.images[2:]:
        c = _decode(uri)
        assert c.shape == (200, 200, 3) and (c == grey).all(axis=2).sum() > 100
    assert main(["report", str(tmp_path / "cmu")]) == 0
    assert (tmp_path / "cmu" / "report.html").read_text(encoding="utf-8") == page

"""Cohort runs (``wsi-nuclei run`` with many slides, a folder or a glob) and ``summarize``
(folders walked, no overwrite without --overwrite, slides that appear twice flagged, plurals)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from wsi_nuclei.cli import main
from wsi_nuclei.cohort import expand_inputs, output_names
from wsi_nuclei.demo import make_nuclei_image, write_pyramidal_tiff
from wsi_nuclei.errors import InputNotFoundError

OPTS = [
    "--model",
    "classic",
    "--tissue",
    "none",
    "--no-report",
    "-q",
]  # -q last (some runs drop it)


def _untimed(run_dir: Path, *skip: str) -> dict:
    """summary.json without the QC entries that differ between equal runs (timings, ``skip``)."""
    summary = json.loads((run_dir / "summary.json").read_text())
    summary["qc"] = {
        k: v for k, v in summary["qc"].items() if not k.startswith("seconds_") and k not in skip
    }
    return summary


def _lines(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln.strip()]


@pytest.fixture(scope="module")
def slides(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Three small synthetic slides: a.svs and b.svs (other nuclei), sub/a.tif (a's stem, b's pixels)."""
    d = tmp_path_factory.mktemp("cohort")
    (d / "sub").mkdir()
    a, _, _ = make_nuclei_image(384, 384, seed=1, min_radius=6, gap=4)
    b, _, _ = make_nuclei_image(384, 384, seed=2, min_radius=6, gap=4)
    return {
        "dir": d,
        "a": write_pyramidal_tiff(d / "a.svs", a, mpp=0.25),
        "b": write_pyramidal_tiff(d / "b.svs", b, mpp=0.25),
        "a2": write_pyramidal_tiff(d / "sub" / "a.tif", b, mpp=0.25),
    }


# --------------------------------------------------------------------------------------------
# inputs and names
# --------------------------------------------------------------------------------------------
def test_expand_inputs_folders_globs_and_mirax(tmp_path: Path) -> None:
    d = tmp_path / "slides"
    (d / "deeper").mkdir(parents=True)
    for name in (
        "b.ndpi",
        "a.svs",
        "C.TIF",
        "x.mrxs",
        "notes.txt",
        ".hidden.svs",
        "deeper/d.svs",
        "x.ome.tiff",
    ):
        (d / name).write_bytes(b"x")
    (d / "x").mkdir()  # MIRAX data folder of x.mrxs
    (d / "x" / "Slidedat.ini").write_text("")
    (d / "x" / "Data0000.dat").write_bytes(b"x")
    (
        d / "folder.svs"
    ).mkdir()  # a folder named like a slide is a (bad) slide, not a folder of slides

    got, cohort = expand_inputs([str(d)])
    assert cohort
    assert [p.name for p in got] == [
        "C.TIF",
        "a.svs",
        "b.ndpi",
        "folder.svs",
        "x.mrxs",
        "x.ome.tiff",
    ]
    # a glob (quoted on the command line) is expanded here, '**' recursing; only slide names match
    got, cohort = expand_inputs([str(d / "**" / "*.svs")])
    assert cohort and [p.relative_to(d).as_posix() for p in got] == [
        "a.svs",
        "deeper/d.svs",
        "folder.svs",
    ]
    got, _ = expand_inputs([str(d / "*")])
    assert "x" not in [p.name for p in got] and "notes.txt" not in [p.name for p in got]
    # one explicit file: not a cohort, the path kept as given; the same file twice runs once
    got, cohort = expand_inputs([str(d / "a.svs")])
    assert got == [d / "a.svs"] and not cohort
    got, cohort = expand_inputs(
        [str(d / "a.svs"), str(d / "deeper" / ".." / "a.svs"), str(d / "b.ndpi")]
    )
    assert got == [d / "a.svs", d / "b.ndpi"] and cohort
    got, cohort = expand_inputs([str(d / "folder.svs")])
    assert got == [d / "folder.svs"] and not cohort
    # nothing to run: one-line errors, exit code 2
    (tmp_path / "empty").mkdir()
    for bad, match in (
        (str(tmp_path / "empty"), "no slides in this folder"),
        (str(d / "*.bif"), "no slide matches"),
        (str(d / "nope.svs"), "nope.svs: no such file"),
    ):
        with pytest.raises(InputNotFoundError, match=match) as info:
            expand_inputs([str(d / "a.svs"), bad])
        assert info.value.exit_code == 2 and "\n" not in str(info.value)


def test_output_names_disambiguate_equal_stems_deterministically(tmp_path: Path) -> None:
    paths = [
        tmp_path / "z" / "x.svs",
        tmp_path / "a" / "x.tif",
        tmp_path / "y.svs",
        tmp_path / "m" / "X.ome.tiff",
        tmp_path / "x-2.svs",
    ]
    names, notes = output_names(paths)
    # x, x and X collide (case-insensitively: one folder on macOS/Windows); numbered in path order,
    # skipping x-2, which is another slide's own name
    assert names == ["x-4", "x-1", "y", "X-3", "x-2"]
    assert len(notes) == 1 and notes[0].startswith("3 slides share the name 'x': ")
    assert f"{paths[1]} -> x-1/" in notes[0] and f"{paths[0]} -> x-4/" in notes[0]
    assert output_names(list(reversed(paths)))[0] == list(reversed(names))  # not the order given
    assert output_names(paths[2:3]) == (["y"], [])


# --------------------------------------------------------------------------------------------
# cohort runs
# --------------------------------------------------------------------------------------------
def test_cohort_run_one_model_load_failures_continue_table_and_resume(
    slides: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from wsi_nuclei import engine, models
    from wsi_nuclei.pipeline import _run as pipeline_run

    bad = tmp_path / "bad.svs"
    bad.write_bytes(b"not a slide" * 100)
    loads: list[str] = []
    real_load = models.load_model

    def counting_load(name, **kw):  # type: ignore[no-untyped-def]
        loads.append(name)
        return real_load(name, **kw)

    monkeypatch.setattr(models, "load_model", counting_load)
    engine.clear_model_cache()
    out = tmp_path / "out"
    argv = [
        "run",
        str(slides["dir"]),
        str(bad),
        str(slides["dir"] / "sub" / "*.tif"),
        *OPTS,
        "--out",
        str(out),
    ]
    assert main(argv) == 3  # the one failure's exit code
    err = _lines(capsys.readouterr().err)
    assert err[0] == (
        f"wsi-nuclei: note: 2 slides share the name 'a': {slides['a']} -> a-1/, "
        f"{slides['a2']} -> a-2/"
    )
    assert err[1].startswith(
        f"wsi-nuclei: error: {bad}: cannot open bad.svs: no backend can read it"
    )
    assert err[2].startswith(
        "wsi-nuclei: warning: slide a.tif = b.svs appears in 2 runs (same fingerprint"
    )
    assert err[3].startswith("wsi-nuclei: error: 1 of 4 slides failed")
    assert len(err) == 4 and "Traceback" not in "\n".join(err)
    assert loads == ["classic"]  # one model load for three slides
    assert sorted(p.name for p in out.iterdir()) == [
        "a-1",
        "a-2",
        "b",
        "cohort.csv",
    ]  # nothing for the bad slide

    # each slide's folder holds exactly what a single-slide run of it writes
    single = tmp_path / "single-b"
    assert main(["run", str(slides["b"]), *OPTS, "--out", str(single)]) == 0
    for name in ("nuclei.parquet", "tissue.geojson"):
        assert (out / "b" / name).read_bytes() == (single / name).read_bytes(), name
    assert _untimed(out / "b") == _untimed(single)
    # the cohort table is the one `summarize <out>` writes
    capsys.readouterr()
    assert main(["summarize", str(out), "-o", str(tmp_path / "again.csv")]) == 0
    assert (out / "cohort.csv").read_bytes() == (tmp_path / "again.csv").read_bytes()
    table = pd.read_csv(out / "cohort.csv")
    assert table["run_dir"].drop_duplicates().tolist() == [
        str(out / "a-1"),
        str(out / "a-2"),
        str(out / "b"),
    ]
    n_b = json.loads((out / "b" / "summary.json").read_text())["slide"]["n_nuclei"]
    assert n_b > 50 and table.loc[table["run_dir"] == str(out / "b"), "n_nuclei"].tolist() == [
        n_b,
        n_b,
    ]

    # rerun: finished slides are skipped (untouched), the bad one is tried again
    stamp = (out / "b" / "run.json").stat().st_mtime_ns
    capsys.readouterr()
    assert main(argv) == 3
    assert (out / "b" / "run.json").stat().st_mtime_ns == stamp
    bad.unlink()
    assert main(argv[:2] + argv[3:]) == 0
    cap = capsys.readouterr()
    assert _lines(cap.err)[-1].startswith(
        "wsi-nuclei: warning: slide a.tif = b.svs appears in 2 runs"
    )
    assert cap.out == ""  # -q

    # an interrupted cohort resumes per slide: the finished ones are skipped, the interrupted
    # one continues from its finished blocks, the others run
    out2 = tmp_path / "out2"
    argv2 = [
        "run",
        str(slides["a"]),
        str(slides["b"]),
        str(slides["a2"]),
        *OPTS[:-1],
        "--block-size",
        "128",
        "--out",
        str(out2),
    ]
    real_write = pipeline_run._write

    def interrupt_b(cfg, *a, **kw):  # type: ignore[no-untyped-def]
        if Path(cfg.slide).name == "b.svs":
            raise KeyboardInterrupt
        return real_write(cfg, *a, **kw)

    monkeypatch.setattr(pipeline_run, "_write", interrupt_b)
    assert main(argv2) == 130
    assert (out2 / "a-1" / "run.json").is_file() and not (out2 / "b" / "run.json").exists()
    assert not (out2 / "a-2").exists() and not (out2 / "cohort.csv").exists()
    monkeypatch.setattr(pipeline_run, "_write", real_write)
    capsys.readouterr()
    assert main(argv2) == 0
    cap = capsys.readouterr()
    assert f"[1/3] {slides['a']}: finished earlier in {out2 / 'a-1'}/, skipped" in cap.err
    resumed = json.loads((out2 / "b" / "run.json").read_text())
    assert (
        resumed["qc"]["blocks_resumed"] == resumed["qc"]["blocks_processed"] == 9
    )  # 384 px in 128 px blocks
    assert "cohort: 3 slides: 2 done, 1 finished earlier" in cap.out
    assert f"  b.svs: {resumed['n_nuclei']} nuclei in" in cap.out
    fresh = tmp_path / "fresh-b"
    assert main(["run", str(slides["b"]), *OPTS, "--block-size", "128", "--out", str(fresh)]) == 0
    assert (out2 / "b" / "nuclei.parquet").read_bytes() == (fresh / "nuclei.parquet").read_bytes()
    x, y = (
        _untimed(out2 / "b", "blocks_resumed", "patches_run", "peak_band_mb"),
        _untimed(fresh, "blocks_resumed", "patches_run", "peak_band_mb"),
    )
    assert x == y, {
        k: (x["qc"][k], y["qc"].get(k)) for k in x["qc"] if x["qc"][k] != y["qc"].get(k)
    }


def test_cohort_refuses_regions_and_reports_counts(
    slides: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    regions = tmp_path / "r.geojson"
    regions.write_text(
        '{"type": "Polygon", "coordinates": [[[0, 0], [100, 0], [100, 100], [0, 0]]]}'
    )
    code = main(
        [
            "run",
            str(slides["a"]),
            str(slides["b"]),
            *OPTS,
            "--regions",
            str(regions),
            "--out",
            str(tmp_path / "o"),
        ]
    )
    err = _lines(capsys.readouterr().err)
    assert code == 1 and len(err) == 1 and "--regions describes one slide" in err[0]
    assert not (tmp_path / "o").exists()
    # a folder with one slide is still a cohort run (the layout does not depend on the count)
    code = main(
        [
            "run",
            str(slides["dir"] / "sub"),
            "--model",
            "classic",
            "--tissue",
            "none",
            "--out",
            str(tmp_path / "one"),
        ]
    )
    cap = capsys.readouterr()
    assert (
        code == 0
        and (tmp_path / "one" / "a" / "run.json").is_file()
        and (tmp_path / "one" / "cohort.csv").is_file()
    )
    assert "cohort: 1 slide: 1 done in" in cap.out


# --------------------------------------------------------------------------------------------
# summarize
# --------------------------------------------------------------------------------------------
def test_summarize_walks_folders_refuses_overwrite_flags_duplicates(
    slides: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    runs = tmp_path / "runs"
    assert main(["run", str(slides["a"]), *OPTS, "--out", str(runs / "x" / "a")]) == 0
    assert main(["run", str(slides["b"]), *OPTS, "--out", str(runs / "y" / "deep" / "b")]) == 0
    (runs / "y" / ".hidden" / "c").mkdir(parents=True)  # not walked
    out = tmp_path / "cohort.csv"
    capsys.readouterr()
    assert main(["summarize", str(runs), "-o", str(out)]) == 0
    cap = capsys.readouterr()
    assert cap.err == "" and cap.out.strip() == f"4 rows (2 slides, 2 runs) -> {out}"
    table = pd.read_csv(out)
    assert (
        table["run_dir"].tolist()
        == [str(runs / "x" / "a")] * 2 + [str(runs / "y" / "deep" / "b")] * 2
    )
    # an existing output is not replaced without --overwrite: one line, exit 7, file untouched
    before = out.read_bytes()
    assert main(["summarize", str(runs / "x" / "a"), "-o", str(out)]) == 7
    err = _lines(capsys.readouterr().err)
    assert err == [f"wsi-nuclei: error: {out} already exists; use --overwrite to replace it"]
    assert out.read_bytes() == before
    assert main(["summarize", str(runs / "x" / "a"), "-o", str(out), "--overwrite"]) == 0
    assert capsys.readouterr().out.strip() == f"2 rows (1 slide, 1 run) -> {out}"
    # the same slide twice (a copy under another name has the same fingerprint): a warning line
    copy = tmp_path / "copy-of-a.svs"
    copy.write_bytes(slides["a"].read_bytes())
    assert main(["run", str(copy), *OPTS, "--out", str(runs / "z")]) == 0
    capsys.readouterr()
    assert (
        main(["summarize", str(runs), str(runs / "x" / "a"), "-o", str(tmp_path / "c2.csv")]) == 0
    )
    cap = capsys.readouterr()
    warn = _lines(cap.err)
    fp = json.loads((runs / "z" / "run.json").read_text())["fingerprint"]
    assert warn == [
        f"wsi-nuclei: warning: slide a.svs = copy-of-a.svs appears in 2 runs (same fingerprint {fp[:12]}, "
        f"same regions): {runs / 'x' / 'a'}, {runs / 'z'}; its rows are in the table 2 times"
    ]
    assert (
        cap.out.strip() == f"6 rows (3 slides, 3 runs) -> {tmp_path / 'c2.csv'}"
    )  # x/a given twice: once
    # a folder without runs: one line, exit 2, nothing written
    (tmp_path / "none").mkdir()
    assert main(["summarize", str(tmp_path / "none"), "-o", str(tmp_path / "c3.csv")]) == 2
    assert "no wsi-nuclei run in" in _lines(capsys.readouterr().err)[0]
    assert not (tmp_path / "c3.csv").exists()

"""Tests of the ``wsi-nuclei`` command line: help texts, exit codes, one-line errors, the
``models``, ``summarize`` and ``demo`` commands, and a real slide end to end."""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from wsi_nuclei import errors
from wsi_nuclei.cli import EXIT_CODES, build_parser, main
from wsi_nuclei.demo import make_nuclei_image, write_pyramidal_tiff
from wsi_nuclei.export import check_qupath_geojson
from wsi_nuclei.pipeline import OUTPUT_NAMES

FINAL = ("nuclei.geojson.gz", "nuclei.geojson", *OUTPUT_NAMES)
REPO = Path(__file__).resolve().parents[1]


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def _no_outputs(out: Path) -> None:
    for name in FINAL:
        assert not (out / name).exists(), f"{name} written"


def _one_error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected one stderr line, got:\n{err}"
    assert lines[0].startswith("wsi-nuclei: error: "), lines[0]
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture(scope="module")
def small_slide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 512 x 512 synthetic slide at 0.25 µm/px (16 tiles)."""
    d = tmp_path_factory.mktemp("cli")
    rgb, _, _ = make_nuclei_image(512, 512, seed=1, min_radius=6, gap=4)
    return write_pyramidal_tiff(d / "small.svs", rgb, mpp=0.25)


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty weights cache (no weights found, nothing fetched)."""
    monkeypatch.setenv("WSI_NUCLEI_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache"


# --------------------------------------------------------------------------------------------
# help
# --------------------------------------------------------------------------------------------
def test_top_level_help_lists_commands_and_every_exit_code(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for name in _subcommands():
        assert name in out
    # every error class's exit code is documented, with 0 and 130
    codes = {int(line.split()[0]) for line in EXIT_CODES.splitlines()[1:] if line.strip()}
    classes = {
        c.exit_code
        for c in vars(errors).values()
        if isinstance(c, type) and issubclass(c, errors.WsiNucleiError)
    }
    assert classes <= codes and {0, 130} <= codes
    for code in codes:
        assert f"\n  {code} " in out
    assert main([]) == 0  # no command: the help, not an error
    assert "COMMAND" in capsys.readouterr().out


@pytest.mark.parametrize("command", sorted(_subcommands()))
def test_every_subcommand_help_mentions_every_option(
    command: str, capsys: pytest.CaptureFixture
) -> None:
    parser = _subcommands()[command]
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    flat = " ".join(out.split())
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        assert action.help and action.help != argparse.SUPPRESS, (
            f"{command}: {action.dest} has no help"
        )
        shown = action.metavar or (
            "{" + ",".join(action.choices) + "}" if action.choices else action.dest
        )
        for opt in action.option_strings or [shown]:
            assert opt in out, f"{command} --help does not mention {opt}"
        # the help text itself is shown (argparse may re-wrap it; %(default)s is expanded)
        words = action.help.split("%(")[0].split()[:4]
        assert " ".join(words) in flat, f"{command}: help of {action.dest} not shown"
    if command == "run":
        assert "exit codes:" in out and "resolution policy:" in out


def test_version(capsys: pytest.CaptureFixture) -> None:
    from wsi_nuclei import __version__

    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"wsi-nuclei {__version__}"


# --------------------------------------------------------------------------------------------
# bad input: one line, the documented exit code, no output
# --------------------------------------------------------------------------------------------
def _run_cli(args: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    code = main(args)
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def test_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code, _, err = _run_cli(
        ["run", str(tmp_path / "nope.svs"), "--out", str(tmp_path / "out")], capsys
    )
    assert code == 2
    assert "nope.svs" in _one_error_line(err)
    assert not (tmp_path / "out").exists()


def test_random_bytes_named_svs(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    bad = tmp_path / "random.svs"
    bad.write_bytes(np.random.default_rng(0).integers(0, 256, 50_000, dtype=np.uint8).tobytes())
    code, _, err = _run_cli(["run", str(bad), "--out", str(tmp_path / "out")], capsys)
    assert code == 3
    assert "random.svs" in _one_error_line(err)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("fraction", [0.001, 0.5, 0.999])
def test_truncated_svs(
    wsi_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture, fraction: float
) -> None:
    data = (wsi_dir / "CMU-1-Small-Region.svs").read_bytes()
    bad = tmp_path / "cut.svs"
    bad.write_bytes(data[: int(len(data) * fraction)])
    code, _, err = _run_cli(["run", str(bad), "--out", str(tmp_path / "out")], capsys)
    assert code == 3
    assert "truncated" in _one_error_line(err)
    assert not (tmp_path / "out").exists()


def _corrupt_copy(slide: Path, dest: Path) -> Path:
    """A copy of ``slide`` with garbage in one JPEG tile of level 0 (the TIFF stays sound)."""
    import tifffile

    shutil.copy(slide, dest)
    with tifffile.TiffFile(dest) as tf:
        off, cnt = tf.pages[0].dataoffsets[3], tf.pages[0].databytecounts[3]  # tile (1, 1) of 2 x 2
    with open(dest, "r+b") as fh:
        fh.seek(off)
        fh.write(bytes(np.random.default_rng(1).integers(0, 256, cnt, dtype=np.uint8)))
    return dest


def test_corrupt_tile_in_a_sound_file(
    small_slide: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """Found while the tiles are read, inside a Dask task (see also the subprocess test: the
    worker's log, which capsys cannot see, must stay quiet)."""
    bad = _corrupt_copy(small_slide, tmp_path / "corrupt.svs")
    out = tmp_path / "out"
    code, _, err = _run_cli(
        ["run", str(bad), "--tissue", "none", "--model", "classic", "--out", str(out), "-q"], capsys
    )
    assert code == 3
    assert "corrupt.svs" in _one_error_line(err)  # no worker log, no traceback
    _no_outputs(out)


def test_plain_tiff_without_mpp(
    wsi_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    code, _, err = _run_cli(
        ["run", str(wsi_dir / "kidney-48-5.tif"), "--out", str(tmp_path / "out")], capsys
    )
    assert code == 4
    assert "--mpp" in _one_error_line(err)
    assert not (tmp_path / "out").exists()


def test_white_image_has_no_tissue(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    img = tmp_path / "white.png"
    Image.fromarray(np.full((600, 800, 3), 255, np.uint8)).save(img)
    out = tmp_path / "out"
    code, _, err = _run_cli(
        ["run", str(img), "--mpp", "0.25", "--model", "classic", "--out", str(out)], capsys
    )
    assert code == 5
    assert "no tissue" in _one_error_line(err)
    _no_outputs(out)


@pytest.mark.parametrize(
    "content",
    [
        b'{"type": "FeatureCollection", "features": [',
        b'{"type": "FeatureCollection", "features": '
        b'[{"type": "Feature", "geometry": {"type": "Point", "coordinates": [1, 2]}, "properties": {}}]}',
    ],
    ids=["not-json", "no-polygon"],
)
def test_malformed_regions(
    small_slide: Path, tmp_path: Path, capsys: pytest.CaptureFixture, content: bytes
) -> None:
    regions = tmp_path / "regions.geojson"
    regions.write_bytes(content)
    out = tmp_path / "out"
    code, _, err = _run_cli(
        [
            "run",
            str(small_slide),
            "--regions",
            str(regions),
            "--model",
            "classic",
            "--out",
            str(out),
        ],
        capsys,
    )
    assert code == 6
    assert "regions.geojson" in _one_error_line(err)
    assert not out.exists()


def test_output_not_writable(
    small_slide: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("I am a file, not a folder")
    code, _, err = _run_cli(
        ["run", str(small_slide), "--model", "classic", "--out", str(blocker / "sub")], capsys
    )
    assert code == 7
    assert "not writable" in _one_error_line(err)
    assert blocker.read_text() == "I am a file, not a folder"


def test_existing_results_need_overwrite(
    small_slide: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "summary.json").write_text("{}")
    code, _, err = _run_cli(
        ["run", str(small_slide), "--model", "classic", "--out", str(out)], capsys
    )
    assert code == 7
    assert "--overwrite" in _one_error_line(err)
    assert (out / "summary.json").read_text() == "{}"  # left alone
    assert sorted(p.name for p in out.iterdir()) == ["summary.json"]


def test_unknown_model(small_slide: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    code, _, err = _run_cli(
        ["run", str(small_slide), "--model", "no-such-model", "--out", str(out)], capsys
    )
    assert code == 8
    line = _one_error_line(err)
    assert "no-such-model" in line and "classic" in line  # lists the available ones
    assert not out.exists()


def test_missing_weights_file(
    small_slide: Path, tmp_path: Path, capsys: pytest.CaptureFixture, home: Path
) -> None:
    out = tmp_path / "out"
    code, _, err = _run_cli(
        [
            "run",
            str(small_slide),
            "--model",
            "hovernet-pannuke",
            "--weights",
            str(tmp_path / "missing.tar"),
            "--out",
            str(out),
        ],
        capsys,
    )
    assert code == 8
    assert "missing.tar" in _one_error_line(err)
    assert not out.exists()


def test_models_fetch_offline(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch, home: Path
) -> None:
    def offline(*args, **kwargs):
        raise OSError("network is unreachable (test)")

    monkeypatch.setattr(socket, "create_connection", offline)
    monkeypatch.setattr(socket.socket, "connect", offline)
    monkeypatch.setattr(socket, "getaddrinfo", offline)
    code, _, err = _run_cli(["models", "fetch", "hovernet-pannuke"], capsys)
    assert code == 8
    assert "--weights" in _one_error_line(err)  # says how to place the file by hand
    assert not any(home.rglob("*.tar"))  # nothing half-downloaded left in the cache


def test_models_fetch_needs_a_name(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["models", "fetch"])
    assert exc.value.code == 2
    assert "needs a model name" in capsys.readouterr().err


def test_strict_ownership_with_a_small_halo(
    small_slide: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "out"
    code, _, err = _run_cli(
        [
            "run",
            str(small_slide),
            "--model",
            "classic",
            "--tissue",
            "none",
            "--halo",
            "6",
            "--block-size",
            "128",
            "--strict-ownership",
            "--out",
            str(out),
            "-q",
        ],
        capsys,
    )
    assert code == 1
    assert "--halo" in _one_error_line(err)
    _no_outputs(out)


def test_errors_through_the_console_script(tmp_path: Path, small_slide: Path) -> None:
    """A real process: one stderr line, the exit code, no traceback; and a clean success with
    the Dask dashboard's default port (8787) taken."""
    script = Path(sys.executable).parent / "wsi-nuclei"
    cmd = [str(script)] if script.is_file() else [sys.executable, "-m", "wsi_nuclei.cli"]
    env = dict(os.environ)
    bad = tmp_path / "random.svs"
    bad.write_bytes(b"\x00\x01not a slide" * 100)
    proc = subprocess.run(
        [*cmd, "run", str(bad), "--out", str(tmp_path / "o1")],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert proc.returncode == 3
    _one_error_line(proc.stderr)
    assert proc.stdout == ""
    bad = _corrupt_copy(small_slide, tmp_path / "corrupt.svs")  # the error comes from a Dask task
    proc = subprocess.run(
        [
            *cmd,
            "run",
            str(bad),
            "--model",
            "classic",
            "--tissue",
            "none",
            "--out",
            str(tmp_path / "o3"),
            "-q",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 3
    assert "corrupt.svs" in _one_error_line(proc.stderr)
    blocker = socket.socket()
    try:
        try:
            blocker.bind(("", 8787))
            blocker.listen()
        except OSError:
            pass  # already taken by someone else: the same situation
        proc = subprocess.run(
            [
                *cmd,
                "run",
                str(small_slide),
                "--model",
                "classic",
                "--tissue",
                "none",
                "--out",
                str(tmp_path / "o2"),
                "-q",
            ],
            capture_output=True,
            text=True,
            timeout=300,
            env=env,
        )
    finally:
        blocker.close()
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""  # no progress bar (-q), no warnings, no logs
    assert (tmp_path / "o2" / "nuclei.geojson.gz").is_file()


# --------------------------------------------------------------------------------------------
# models, summarize, demo, a real slide
# --------------------------------------------------------------------------------------------
def test_models_lists_every_model(capsys: pytest.CaptureFixture, home: Path) -> None:
    from wsi_nuclei.models import list_models, weights_status

    code, out, err = _run_cli(["models"], capsys)
    assert code == 0 and err == ""
    blocks: dict[str, str] = {}
    name = None
    for line in out.splitlines():
        if line and not line.startswith(" "):
            name = line.strip()
            blocks[name] = ""
        elif name:
            blocks[name] += line.strip() + "\n"
    specs = list_models()
    assert list(blocks) == [s.name for s in specs]
    assert {"classic", "hovernet-pannuke"} <= set(blocks)
    for spec in specs:
        b = blocks[spec.name]
        assert f"licence:    {spec.licence}" in b
        assert (
            f"resolution: {spec.mpp} um/px, input {spec.input_size} px, output {spec.output_size} px"
            in b
        )
        classes = ", ".join(spec.class_names.values()) if spec.class_names else "none (nuclei only)"
        assert f"classes:    {classes}" in b
        assert f"weights:    {weights_status(spec)}" in b
    assert "weights:    none needed" in blocks["classic"]
    assert "weights:    missing" in blocks["hovernet-pannuke"]  # empty cache
    assert "Neoplastic, Inflammatory, Connective, Dead, Epithelial" in blocks["hovernet-pannuke"]


def test_summarize_two_runs(
    small_slide: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    regions = tmp_path / "rois.geojson"
    regions.write_text(
        json.dumps(
            {
                "type": "FeatureCollection",
                "features": [
                    {
                        "type": "Feature",
                        "geometry": {
                            "type": "Polygon",
                            "coordinates": [[[0, 0], [256, 0], [256, 512], [0, 512], [0, 0]]],
                        },
                        "properties": {"objectType": "annotation", "name": "left"},
                    },
                    {
                        "type": "Feature",
                        "geometry": {
                            "type": "Polygon",
                            "coordinates": [[[256, 0], [512, 0], [512, 512], [256, 512], [256, 0]]],
                        },
                        "properties": {"objectType": "annotation", "name": "right"},
                    },
                ],
            }
        )
    )
    a, b = tmp_path / "run-a", tmp_path / "run-b"
    assert (
        main(
            [
                "run",
                str(small_slide),
                "--model",
                "classic",
                "--tissue",
                "none",
                "--out",
                str(a),
                "-q",
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "run",
                str(small_slide),
                "--model",
                "classic",
                "--tissue",
                "none",
                "--regions",
                str(regions),
                "--out",
                str(b),
                "-q",
            ]
        )
        == 0
    )
    capsys.readouterr()
    cohort = tmp_path / "cohort" / "cohort.csv"
    code, out, err = _run_cli(["summarize", str(a), str(b), "--output", str(cohort)], capsys)
    assert code == 0 and err == ""
    assert str(cohort) in out
    table = pd.read_csv(cohort)
    # one row per slide x region, plus each run's whole-slide row
    assert table["region_name"].tolist() == ["Slide", "slide", "left", "right", "slide"]
    assert table["run_dir"].tolist() == [str(a)] * 2 + [str(b)] * 3
    assert set(table["slide_name"]) == {"small.svs"}
    na = json.loads((a / "summary.json").read_text())["slide"]["n_nuclei"]
    nb = json.loads((b / "summary.json").read_text())["regions"]
    assert table["n_nuclei"].tolist() == [na, na, nb[0]["n_nuclei"], nb[1]["n_nuclei"], na]
    assert nb[0]["n_nuclei"] > 0 and nb[1]["n_nuclei"] > 0
    # a folder that is not a run: a one-line error, exit 2
    code, _, err = _run_cli(
        ["summarize", str(a), str(tmp_path / "nothing"), "--output", str(tmp_path / "c2.csv")],
        capsys,
    )
    assert code == 2
    _one_error_line(err)
    assert not (tmp_path / "c2.csv").exists()


@pytest.mark.slow
def test_demo(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "demo"
    code, stdout, _ = _run_cli(["demo", "--size", "1024", "--out", str(out), "-q"], capsys)
    assert code == 0, stdout
    assert "every nucleus found exactly once" in stdout
    line = next(ln for ln in stdout.splitlines() if ln.startswith("model classic: known nuclei"))
    numbers = [int(w.strip(",:;")) for w in line.split() if w.strip(",:;").isdigit()]
    known, found, matched, missed, extra, overlapping = numbers
    assert known == found == matched > 300 and missed == extra == overlapping == 0
    assert check_qupath_geojson(out / "results" / "nuclei.geojson.gz") == []
    # a second demo into the same folder needs --overwrite
    code, _, err = _run_cli(["demo", "--size", "1024", "--out", str(out), "-q"], capsys)
    assert code == 7
    _one_error_line(err)


def test_demo_with_the_bundled_model_reports_recall_not_exactness(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "demo"
    code, stdout, err = _run_cli(
        ["demo", "--size", "512", "--out", str(out), "-q", "--model", "wsi-nuclei-lite0"], capsys
    )
    assert code == 0, stdout + err
    assert "model: wsi-nuclei-lite0" in err
    line = next(
        ln for ln in stdout.splitlines() if ln.startswith("model wsi-nuclei-lite0: known nuclei")
    )
    assert line.endswith("overlapping each other: 0")
    assert "recall" in stdout and "no accuracy figure for slides" in stdout
    assert "every nucleus found exactly once" not in stdout


@pytest.mark.slow
def test_cmu_small_region_end_to_end(
    wsi_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "cmu"
    code, stdout, err = _run_cli(
        ["run", str(wsi_dir / "CMU-1-Small-Region.svs"), "--model", "classic", "--out", str(out)],
        capsys,
    )
    assert code == 0, err
    assert "Traceback" not in err and "Warning" not in err
    # the final report
    assert "CMU-1-Small-Region.svs" in stdout and "level 0" in stdout and "scale x1.996" in stdout
    for name in ("nuclei.geojson.gz", *OUTPUT_NAMES):
        assert (out / name).is_file() and name in stdout
    manifest = json.loads((out / "run.json").read_text())
    res = manifest["resolution"]
    assert res["level"] == 0 and res["mpp"] == pytest.approx(0.499)
    assert res["scale_factor"] == pytest.approx(1.996) and res["mpp_source"].startswith("openslide")
    assert manifest["regions"]["source"] == "tissue detection"
    assert check_qupath_geojson(out / "nuclei.geojson.gz") == []
    assert check_qupath_geojson(out / "tissue.geojson") == []
    with gzip.open(out / "nuclei.geojson.gz", "rt") as fh:
        n_features = len(json.load(fh)["features"])
    import geopandas as gpd

    df = gpd.read_parquet(out / "nuclei.parquet")
    summary = json.loads((out / "summary.json").read_text())
    assert len(df) == n_features == manifest["n_nuclei"] == summary["slide"]["n_nuclei"] > 1000
    assert sum(r["n_nuclei"] for r in summary["regions"]) == n_features
    assert df["id"].is_unique and set(df["region_id"]) <= {
        r["region_id"] for r in summary["regions"]
    }
    w, h = manifest["dimensions"]
    assert (w, h) == (2220, 2967)
    assert df["centroid_x"].between(0, w).all() and df["centroid_y"].between(0, h).all()
    assert manifest["qc"]["patches_planned"] < manifest["qc"]["patches_total"]  # glass skipped


def test_tta_on_a_model_without_it(
    small_slide: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "out"
    code, _, err = _run_cli(
        ["run", str(small_slide), "--model", "classic", "--tta", "--out", str(out)], capsys
    )
    assert code == 8
    assert "test-time augmentation" in _one_error_line(err)
    assert not out.exists()


# --------------------------------------------------------------------------------------------
# option ranges, device, disk full, a second run into the same folder
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "opt, value",
    [
        ("--batch-size", "0"),
        ("--batch-size", "-1"),
        ("--batch-size", "x"),
        ("--max-in-flight", "0"),
        ("--halo", "-5"),
        ("--halo", "2000"),
        ("--block-size", "10"),
        ("--workers", "0"),
        ("--workers", "-3"),
        ("--threads", "0"),
        ("--mpp", "0"),
        ("--mpp", "-0.25"),
        ("--mpp", "1e6"),
        ("--mpp", "nan"),
    ],
)
def test_numeric_options_have_ranges(
    opt: str, value: str, small_slide: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["run", str(small_slide), "--out", str(tmp_path / "o"), opt, value])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and opt in err.strip().splitlines()[-1]
    assert not (tmp_path / "o").exists()


def test_halo_larger_than_the_block_is_refused(
    small_slide: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    with pytest.raises(SystemExit) as exc:
        main(
            [
                "run",
                str(small_slide),
                "--out",
                str(tmp_path / "o"),
                "--block-size",
                "128",
                "--halo",
                "200",
            ]
        )
    assert exc.value.code == 2 and "--halo" in capsys.readouterr().err


def test_device_cuda_without_a_gpu(
    small_slide: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present")
    code, _, err = _run_cli(
        [
            "run",
            str(small_slide),
            "--model",
            "classic",
            "--device",
            "cuda",
            "--out",
            str(tmp_path / "o"),
        ],
        capsys,
    )
    assert code == 1 and "no CUDA GPU" in _one_error_line(err)
    _no_outputs(tmp_path / "o")


def test_full_disk_is_one_line_exit_7_and_keeps_finished_work(
    small_slide: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import errno

    from wsi_nuclei import _io

    real = os.replace

    def full(src, dst):
        if str(dst).endswith("nuclei.parquet"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(src, dst)

    monkeypatch.setattr(_io.os, "replace", full)
    out = tmp_path / "o"
    code, _, err = _run_cli(
        [
            "run",
            str(small_slide),
            "--model",
            "classic",
            "--tissue",
            "none",
            "--block-size",
            "256",
            "--out",
            str(out),
            "-q",
        ],
        capsys,
    )
    assert code == 7 and "No space left" in _one_error_line(err)
    assert not (out / "nuclei.parquet").exists() and not list(out.glob(".*tmp*"))
    assert (
        len(list((out / ".work" / "blocks").glob("*.parquet"))) == 4
    )  # every block kept: a rerun resumes
    monkeypatch.setattr(_io.os, "replace", real)
    code, _, _ = _run_cli(
        [
            "run",
            str(small_slide),
            "--model",
            "classic",
            "--tissue",
            "none",
            "--block-size",
            "256",
            "--out",
            str(out),
            "--overwrite",
            "-q",
        ],
        capsys,
    )
    assert code == 0 and (out / "nuclei.parquet").is_file()


def test_second_run_into_the_same_folder_is_refused(
    small_slide: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    import fcntl

    out = tmp_path / "o"
    out.mkdir()
    with open(out / ".wsi-nuclei.lock", "a+") as fh:  # a first run holds the lock
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        fh.write("pid 12345")
        fh.flush()
        code, _, err = _run_cli(
            ["run", str(small_slide), "--model", "classic", "--out", str(out), "-q"], capsys
        )
    assert code == 7 and "another wsi-nuclei run" in _one_error_line(err)
    _no_outputs(out)
    code, _, _ = _run_cli(
        ["run", str(small_slide), "--model", "classic", "--out", str(out), "-q"], capsys
    )
    assert code == 0  # the lock went with the process that held it
    assert not (out / ".wsi-nuclei.lock").exists()


def test_help_models_and_summarize_do_not_import_torch() -> None:
    """`wsi-nuclei --help` answers at once: torch (seconds to import) is loaded only by the
    commands that run a network."""
    code = (
        "import sys, contextlib, io\n"
        "from wsi_nuclei.cli import main\n"
        "for argv in (['--help'], ['run', '--help'], ['train', '--help'], ['models']):\n"
        "    with contextlib.redirect_stdout(io.StringIO()):\n"
        "        try:\n"
        "            main(argv)\n"
        "        except SystemExit:\n"
        "            pass\n"
        "print('torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_internal_error_is_one_line_and_exit_70(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """A bug (an exception that is not a WsiNucleiError) gives one line and exit 70, not a
    traceback; WSI_NUCLEI_TRACEBACK=1 lets the exception through."""
    from wsi_nuclei.cli import _main as cli

    def broken(args: object) -> int:
        raise ValueError("buffer source array is read-only\nsecond line")

    parser = cli.build_parser()
    real_parse = parser.parse_args

    def parse(argv: object = None) -> object:
        ns = real_parse(["models"])
        ns.func = broken
        return ns

    monkeypatch.setattr(parser, "parse_args", parse)
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    monkeypatch.delenv("WSI_NUCLEI_TRACEBACK", raising=False)
    assert cli.main(["models"]) == 70
    err = capsys.readouterr().err
    assert (
        err.count("\n") == 1
        and "internal error: ValueError: buffer source array is read-only (a bug" in err
    )
    monkeypatch.setenv("WSI_NUCLEI_TRACEBACK", "1")
    with pytest.raises(ValueError, match="read-only"):
        cli.main(["models"])

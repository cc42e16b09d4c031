"""Progress on stderr (wsi_nuclei._progress): the ETA on a fake clock, the stage lines on and off
a terminal, and the CLI's stderr for a whole run (each stage once, nothing with --quiet, the
outputs unchanged)."""

from __future__ import annotations

import errno
import io
from pathlib import Path

import pandas as pd
import pytest

from wsi_nuclei._progress import EtaEstimator, Progress, format_seconds
from wsi_nuclei.cli import main
from wsi_nuclei.demo import make_nuclei_image, write_pyramidal_tiff

STAGES = ("tissue", "patches", "stitching", "writing")


class FakeClock:
    """A clock that moves only when told to."""

    def __init__(self, t: float = 0.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


# --------------------------------------------------------------------------------------------
# the ETA
# --------------------------------------------------------------------------------------------
def test_eta_leaves_out_the_warm_up_batch() -> None:
    """The first batch takes 20 s (model load and warm-up), the others 1 s each: the ETA is
    the one of the 1 s batches, not tqdm's ``elapsed / done`` extrapolation."""
    clock = FakeClock()
    est = EtaEstimator(100, clock=clock)
    clock.t = 20.0
    est.update(10)  # the warm-up batch
    assert est.rate() is None and est.eta() is None
    clock.t = 21.0
    est.update(10)  # one batch after the warm-up says nothing yet (it may be pipelined)
    assert est.eta() is None
    clock.t = 22.0
    est.update(10)
    assert est.rate() == pytest.approx(10.0)  # (30 - 10) patches in (22 - 20) s
    assert est.eta() == pytest.approx(7.0)  # 70 patches left at 10 per second
    naive = (clock.t - est.start) / est.done * est.remaining  # what a first-batch rate gives
    assert naive == pytest.approx(51.33, abs=0.01)
    for t in (23.0, 24.0, 25.0, 26.0, 27.0, 28.0, 29.0):
        clock.t = t
        est.update(10)
    assert est.remaining == 0 and est.eta() == 0.0
    clock.t = 30.0
    assert est.overall_rate() == pytest.approx(100 / 30)  # the end line's rate: the whole stage


def test_eta_follows_a_change_of_speed_within_its_window() -> None:
    clock = FakeClock()
    est = EtaEstimator(200, warmup=1, min_samples=2, window=2, clock=clock)
    for t, n in [(5.0, 10), (6.0, 10), (7.0, 10), (8.0, 10)]:  # warm-up, then 10 patches/s
        clock.t = t
        est.update(n)
    assert est.rate() == pytest.approx(10.0) and est.eta() == pytest.approx(16.0)
    for t in (12.0, 16.0):  # now 2.5 patches/s; the window holds the latest 2 completions
        clock.t = t
        est.update(10)
    assert est.rate() == pytest.approx(2.5)  # (60 - 40) / (16 - 8)
    assert est.eta() == pytest.approx(140 / 2.5)


def test_eta_without_warm_up_and_with_simultaneous_completions() -> None:
    clock = FakeClock(100.0)
    est = EtaEstimator(50, warmup=0, min_samples=1, clock=clock)
    clock.t = 102.0
    est.update(10)
    assert est.eta() == pytest.approx(8.0)  # 10 in 2 s from the start: 40 left at 5/s
    burst = EtaEstimator(50, clock=clock)
    for _ in range(3):  # three pipelined batches completing at the same instant
        burst.update(5)
    assert burst.rate() is None and burst.eta() is None  # no time passed: no rate, not infinity
    with pytest.raises(ValueError):
        EtaEstimator(10, min_samples=0)


@pytest.mark.parametrize(
    "seconds, text",
    [
        (0.04, "0.0 s"),
        (0.44, "0.4 s"),
        (32.14, "32.1 s"),
        (59.96, "1 min 00 s"),
        (125, "2 min 05 s"),
        (3720, "1 h 02 min"),
        (-3, "0.0 s"),
    ],
)
def test_format_seconds(seconds: float, text: str) -> None:
    assert format_seconds(seconds) == text


# --------------------------------------------------------------------------------------------
# stage lines
# --------------------------------------------------------------------------------------------
def test_off_a_terminal_each_stage_is_one_line_and_a_long_bar_a_line_a_minute() -> None:
    clock = FakeClock(-0.5)
    buf = io.StringIO()
    p = Progress(stream=buf, clock=clock)  # a StringIO is no terminal
    assert not p.tty
    with p.stage("tissue", "detecting tissue") as st:
        clock.t = 0.0
        st.done("1 region")
    with p.stage("patches", total=400, unit="patch", eta=True) as st:
        for i in range(40):  # a 10-patch batch every 5 s after a 30 s warm-up: 225 s
            clock.t = 30.0 + 5 * i
            st.update(10)
        st.done("400 patches")
    with p.stage("writing", total=2, unit="file") as st:
        with st.step("a.parquet"):
            clock.t += 1.0
        st.begin_step("report.html")
        clock.t += 2.5
        st.end_step("not written")
        st.done("1 file")
    lines = buf.getvalue().splitlines()
    assert "\r" not in buf.getvalue() and "\x1b" not in buf.getvalue()  # nothing drawn
    assert lines[0] == "tissue        0.5 s  1 region"
    # plain lines at most every 60 s (at 60, 120, 180 s), then the end line
    plain = [ln for ln in lines if ln.startswith("patches") and "ETA" in ln]
    assert len(plain) == 3, lines
    # 60 s in: 60 patches in the 30 s after the warm-up batch, 330 left at 2 per second
    assert plain[0] == "patches   1 min 00 s  70/400 patches (18%), ETA 2 min 45 s, 2.0 patch/s"
    assert lines[4] == "patches   3 min 45 s  400 patches"
    assert lines[5] == "writing       3.5 s  1 file"
    assert lines[6].split() == ["a.parquet", "1.00", "s"]
    assert lines[7].split() == ["report.html", "(not", "written)", "2.50", "s"]
    assert len(lines) == 8


def test_a_failing_stage_prints_nothing_and_quiet_nothing_but_warnings() -> None:
    for tty in (False, True):
        buf = io.StringIO()
        p = Progress(stream=buf, tty=tty)
        with pytest.raises(RuntimeError), p.stage("tissue", "detecting tissue"):
            raise RuntimeError("no tissue")
        with (
            pytest.raises(RuntimeError),
            p.stage("patches", total=10, unit="patch", eta=True) as st,
        ):
            st.update(3)
            raise RuntimeError("corrupt tile")
        text = buf.getvalue()
        if tty:  # what was drawn is erased: the error line will stand alone
            assert text.endswith("\r") or text.endswith("\x1b[K"), repr(text)
            assert "\n" not in text
        else:
            assert text == ""
    buf = io.StringIO()
    quiet = Progress(enabled=False, stream=buf, tty=True)
    with quiet.stage("patches", total=10, unit="patch", eta=True) as st:
        st.update(10)
        st.warn("wsi-nuclei: warning: something")
        st.done("10 patches")
    assert buf.getvalue() == "wsi-nuclei: warning: something\n"


def test_on_a_terminal_a_bar_with_the_eta_then_the_end_line() -> None:
    clock = FakeClock()
    buf = io.StringIO()
    p = Progress(stream=buf, tty=True, clock=clock)
    with p.stage("patches", total=40, unit="patch", eta=True) as st:
        for i in range(4):
            clock.t = 20.0 + i
            st.update(10)
            st._bar.refresh()  # tqdm draws at most every 0.25 s of real time
        st.done("40 patches")
    text = buf.getvalue()
    assert "ETA after the first batches" in text  # before the warm-up is over
    assert "30/40 [" in text and "ETA 1.0 s, 10.0 patch/s" in text  # 10 left at 10 per second
    assert text.endswith("patches      23.0 s  40 patches\n")


# --------------------------------------------------------------------------------------------
# the command line
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_slide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 512 x 512 synthetic slide at 0.25 µm/px."""
    rgb, _, _ = make_nuclei_image(512, 512, seed=1, min_radius=6, gap=4)
    return write_pyramidal_tiff(tmp_path_factory.mktemp("progress") / "small.svs", rgb, mpp=0.25)


def _stage_lines(err: str) -> dict[str, list[str]]:
    return {s: [ln for ln in err.splitlines() if ln.split()[:1] == [s]] for s in STAGES}


DETERMINISTIC = ("nuclei.geojson.gz", "nuclei.parquet", "tissue.geojson", "qupath.geojson.gz")


def test_cli_names_each_stage_once_and_quiet_shows_nothing(
    small_slide: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    opts = ["--model", "classic", "--block-size", "256"]
    assert main(["run", str(small_slide), *opts, "--out", str(tmp_path / "a")]) == 0
    cap = capsys.readouterr()
    assert (
        "Traceback" not in cap.err and "\r" not in cap.err
    )  # captured stderr is no terminal: nothing drawn
    lines = _stage_lines(cap.err)
    for stage in STAGES:
        assert len(lines[stage]) == 1, cap.err
    assert (
        "1 region (tissue detection)" in lines["tissue"][0]
        and "blocks planned" in lines["tissue"][0]
    )
    assert "4 patches" in lines["patches"][0] and "patch/s" in lines["patches"][0]
    assert "4 blocks" in lines["stitching"][0] and "seam candidates" in lines["stitching"][0]
    assert "8 files" in lines["writing"][0]
    for name in (
        *DETERMINISTIC,
        "summary.csv",
        "run.json",
        "report.html",
    ):  # one timed line per output file
        assert sum(ln.startswith(f"  {name}") for ln in cap.err.splitlines()) == 1, (name, cap.err)
    assert "nuclei" in cap.out  # the final report is on stdout, as before

    assert main(["run", str(small_slide), *opts, "--out", str(tmp_path / "q"), "--quiet"]) == 0
    cap = capsys.readouterr()
    assert cap.err == "" and cap.out == ""
    for name in DETERMINISTIC:  # progress changes no output file
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "q" / name).read_bytes(), name
    a, q = (
        pd.read_csv(tmp_path / d / "summary.csv") for d in ("a", "q")
    )  # the same but for its timings
    timing = [c for c in a.columns if c.startswith("qc_seconds_") or c == "qc_peak_band_mb"]
    pd.testing.assert_frame_equal(a.drop(columns=timing), q.drop(columns=timing))


def test_cli_failure_while_writing_leaves_the_error_alone_and_a_rerun_says_it_resumed(
    small_slide: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from wsi_nuclei import _io

    real = _io.os.replace

    def full(src, dst):  # type: ignore[no-untyped-def]
        if str(dst).endswith("nuclei.parquet"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(src, dst)

    monkeypatch.setattr(_io.os, "replace", full)
    opts = [
        "run",
        str(small_slide),
        "--model",
        "classic",
        "--tissue",
        "none",
        "--block-size",
        "256",
        "--no-report",
        "--out",
        str(tmp_path / "o"),
    ]
    assert main(opts) == 7
    err = capsys.readouterr().err
    lines = _stage_lines(err)
    assert [len(lines[s]) for s in STAGES] == [1, 1, 1, 0], err  # the failed stage prints nothing
    assert "1 region (whole slide)" in lines["tissue"][0]
    assert (
        err.splitlines()[-1].startswith("wsi-nuclei: error: ")
        and "No space left" in err.splitlines()[-1]
    )
    assert "Traceback" not in err
    monkeypatch.setattr(_io.os, "replace", real)
    assert main([*opts, "--overwrite"]) == 0
    lines = _stage_lines(capsys.readouterr().err)
    assert [len(lines[s]) for s in STAGES] == [1, 1, 1, 1]
    assert "nothing to run: all 4 blocks resumed" in lines["patches"][0]

"""Kill ``wsi-nuclei run`` with SIGKILL at random moments, rerun it, compare with a clean run.

For each kill point the same command is started in a fresh output folder, killed with
SIGKILL after a random fraction of the uninterrupted run's wall time (one kill in each of
``--kills`` equal slices of it), and once more at each stage target: the moment seam resolution
starts and the moment each output file is being written (its temporary file exists), so those
short windows are hit whatever the machine's speed. Then the same command runs again to
completion; ``nuclei.parquet``, ``nuclei.geojson.gz``, ``qupath.geojson.gz`` and
``tissue.geojson`` must be byte-identical to the uninterrupted run's. Prints one JSON line per
kill and a summary.

Usage::

    python benchmarks/crash_resume.py [--slide PATH] [--kills 10] [--seed 0] [-- extra run options]

Default slide: ../shared/data/wsi/CMU-1-Small-Region.svs with the default model (``-- --model classic``
for a faster check of the same machinery).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SLIDE = REPO.parent / "shared" / "data" / "wsi" / "CMU-1-Small-Region.svs"


def _cli() -> list[str]:
    script = Path(sys.executable).parent / "wsi-nuclei"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "wsi_nuclei.cli"]


def _stage(out: Path) -> str:
    """Where the killed run was, from what it left behind."""
    work = out / ".work"
    done = [
        n
        for n in (
            "nuclei.geojson.gz",
            "nuclei.geojson",
            "nuclei.parquet",
            "summary.json",
            "tissue.geojson",
            "qupath.geojson.gz",
            "qupath.geojson",
            "run.json",
            "report.html",
        )
        if (out / n).exists()
    ]
    if done:
        return "writing outputs (" + ", ".join(done) + " done)"
    if (work / "final").is_dir():
        return f"stitching ({len(list((work / 'final').glob('*.parquet')))} final parts)"
    n = len(list((work / "blocks").glob("*.parquet"))) if (work / "blocks").is_dir() else 0
    return f"blocks ({n} finished)"


def _outputs(out: Path) -> dict[str, bytes]:
    return {
        p.name: p.read_bytes()
        for p in sorted([*out.glob("nuclei.*"), *out.glob("qupath.*"), *out.glob("tissue.geojson")])
    }


#: kill points tied to a stage rather than a time: the run is killed the moment the condition
#: holds (polled every 2 ms), so each output write and the seam stage is hit whatever the
#: machine's speed ("while writing X" = X's temporary file exists)
TARGETS = (
    "stitching",
    "nuclei.geojson.gz",
    "nuclei.parquet",
    "summary.json",
    "tissue.geojson",
    "qupath.geojson.gz",
    "run.json",
    "report.html",
)


def _target_reached(out: Path, target: str) -> bool:
    if target == "stitching":
        return (out / ".work" / "final").is_dir()
    return any(out.glob(f".{target}.tmp-*"))


def _wait(proc: subprocess.Popen, out: Path, when: float | str, timeout: float) -> None:
    """Sleep ``when`` seconds, or until the stage ``when`` is reached (or the run ends)."""
    if not isinstance(when, str):
        time.sleep(when)
        return
    t_end = time.perf_counter() + timeout
    while proc.poll() is None and time.perf_counter() < t_end and not _target_reached(out, when):
        time.sleep(0.002)


def crash_resume(
    run_args: list[str],
    fractions: list[float],
    work: Path,
    timeout: float = 3600,
    targets: tuple[str, ...] = (),
) -> dict:
    """Reference run, then one kill + resume per fraction of its wall time and per stage target;
    see the module notes."""
    ref = work / "reference"
    t = time.perf_counter()
    subprocess.run(
        [*_cli(), "run", *run_args, "--out", str(ref), "-q"], check=True, timeout=timeout
    )
    wall = time.perf_counter() - t
    want = _outputs(ref)
    rows = []
    points: list[float | str] = [f * wall for f in fractions] + list(targets)
    for k, when in enumerate(points):
        out = work / f"kill{k}"
        # a stage target waits for the output's temporary file: every write then pauses 0.3 s
        # before its rename (the package's fault-injection hook), so even a 1 kB file is caught
        env = (
            {**os.environ, "WSI_NUCLEI_TEST_SLOW_WRITES": "0.3"} if isinstance(when, str) else None
        )
        proc = subprocess.Popen(
            [*_cli(), "run", *run_args, "--out", str(out), "-q"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            env=env,
        )
        _wait(proc, out, when, timeout)
        killed = proc.poll() is None
        if killed:
            os.killpg(proc.pid, signal.SIGKILL)  # the run and any worker process it started
        proc.wait()
        stage = _stage(out) if killed else "finished before the kill"
        if killed:  # the same command again, as a user would
            res = subprocess.run(
                [*_cli(), "run", *run_args, "--out", str(out), "-q"],
                capture_output=True,
                text=True,
                timeout=timeout,
            )
            code, err = res.returncode, res.stderr.strip()[-300:]
            if code == 7 and "already exist" in err and (out / "run.json").is_file():
                code = 0  # killed after run.json, the last output: the results were complete
                stage += "; complete (run.json written), rerun refuses to overwrite"
        else:
            code, err = proc.returncode, ""
        got = _outputs(out) if code == 0 else {}
        rows.append(
            {
                "kill": k,
                "at": when if isinstance(when, str) else f"{when:.2f} s",
                "killed": killed,
                "stage": stage,
                "rerun_exit": code,
                "rerun_stderr": err,
                "identical": got == want and bool(want),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
        shutil.rmtree(out, ignore_errors=True)
    return {
        "reference_wall_s": round(wall, 2),
        "kills": len(rows),
        "killed": sum(r["killed"] for r in rows),
        "identical": sum(r["identical"] for r in rows),
        "rows": rows,
    }


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--slide", default=str(DEFAULT_SLIDE))
    p.add_argument("--kills", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", default=None)
    p.add_argument(
        "--no-targets",
        action="store_true",
        help="only the timed kills (no kill while each output is written)",
    )
    a = p.parse_args(argv)
    rng = np.random.default_rng(a.seed)
    # stratified over the run: one kill in each of `kills` equal slices of its duration
    fractions = [(k + rng.uniform(0.1, 0.9)) / a.kills for k in range(a.kills)]
    work = Path(a.work or tempfile.mkdtemp(prefix="crash-resume-"))
    summary = crash_resume(
        [a.slide, *extra], fractions, work, targets=() if a.no_targets else TARGETS
    )
    print(json.dumps({k: v for k, v in summary.items() if k != "rows"}))
    return 0 if summary["identical"] == summary["kills"] else 1


if __name__ == "__main__":
    sys.exit(main())

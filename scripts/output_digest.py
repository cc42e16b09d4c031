"""Digest of the deterministic outputs of a few reference runs, to show a refactor changed no byte.

Runs the synthetic demo slide (``classic`` model) and CMU-1-Small-Region (bundled default model
in float32, and ``classic``), then prints the sha256 of every output file whose bytes are deterministic
(``run.json`` and ``report.html`` carry timings and are left out; the summaries are
compared without their timing and memory fields, ``seconds_*`` and ``peak_*``). ``--record FILE`` writes the
digests; ``--compare FILE`` exits 1 and names each file whose digest differs.

    python scripts/output_digest.py --record docs/output-digest.json     # before a change
    python scripts/output_digest.py --compare docs/output-digest.json    # after it

The digests depend on the numerical libraries (numpy, scikit-image, torch) of the machine that
recorded them; compare on the same environment.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from wsi_nuclei.models import sha256_file

ROOT = Path(__file__).resolve().parents[1]
CMU = ROOT.parent / "shared" / "data" / "wsi" / "CMU-1-Small-Region.svs"
DETERMINISTIC = (
    "nuclei.parquet",
    "nuclei.geojson.gz",
    "qupath.geojson.gz",
    "tissue.geojson",
    "summary.csv",
    "summary.json",
)


def _cli(*args: str) -> None:
    cmd = [sys.executable, "-m", "wsi_nuclei.cli", *args, "--quiet"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(
            f"output_digest: {' '.join(cmd)} failed ({done.returncode}): {done.stderr.strip()[-400:]}"
        )


def _is_timing(key: str) -> bool:
    return key.removeprefix("qc_").startswith(("seconds_", "peak_"))


def _drop_timings(obj: object) -> object:
    if isinstance(obj, dict):
        return {k: _drop_timings(v) for k, v in obj.items() if not _is_timing(k)}
    if isinstance(obj, list):
        return [_drop_timings(v) for v in obj]
    return obj


def _digest(path: Path) -> str:
    """sha256 of the file; of its content without timing fields for the summaries."""
    if path.name == "summary.json":
        data = json.dumps(_drop_timings(json.loads(path.read_text())), sort_keys=True).encode()
        return hashlib.sha256(data).hexdigest()
    if path.name == "summary.csv":
        import pandas as pd

        table = pd.read_csv(path, dtype=str, keep_default_na=False)
        table = table[[c for c in table.columns if not _is_timing(c)]]
        return hashlib.sha256(table.to_csv(index=False).encode()).hexdigest()
    return sha256_file(path)


def _digests(folder: Path) -> dict[str, str]:
    return {name: _digest(folder / name) for name in DETERMINISTIC if (folder / name).exists()}


def collect(work: Path) -> dict[str, dict[str, str]]:
    """Run the reference runs under ``work``; digests per run name and output file."""
    out: dict[str, dict[str, str]] = {}
    _cli("demo", "--out", str(work / "demo"), "--size", "2048", "--overwrite")
    out["demo-classic"] = _digests(work / "demo" / "results")
    if CMU.exists():
        for model in ("wsi-nuclei-lite0", "classic"):
            _cli(
                "run",
                str(CMU),
                "--out",
                str(work / f"cmu-{model}"),
                "--model",
                model,
                "--overwrite",
                "--no-report",
                "--precision",  # float32: the same digests on CPUs with and without bfloat16
                "fp32",
            )
            out[f"cmu-{model}"] = _digests(work / f"cmu-{model}")
    else:
        print(f"output_digest: {CMU} absent; CMU runs skipped", file=sys.stderr)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--record", type=Path, help="write the digests to this JSON file")
    g.add_argument("--compare", type=Path, help="compare with the digests in this JSON file")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="wsi-nuclei-digest-") as tmp:
        got = collect(Path(tmp))
    if args.record:
        args.record.write_text(json.dumps(got, indent=2, sort_keys=True) + "\n")
    if not args.compare:
        print(json.dumps(got, indent=2, sort_keys=True))
        return 0
    want = json.loads(args.compare.read_text())
    bad = [
        f"{run}/{name}"
        for run, files in want.items()
        for name, digest in files.items()
        if got.get(run, {}).get(name) != digest
    ]
    n = sum(len(v) for v in want.values())
    if bad:
        print(f"output_digest: {len(bad)} of {n} outputs differ: {', '.join(bad)}")
        return 1
    print(f"output_digest: all {n} outputs identical byte for byte ({', '.join(want)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

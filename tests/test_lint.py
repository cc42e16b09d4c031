"""The code passes the project's lint and format bar (ruff, pyproject.toml; .ci/run runs the same
checks and mypy before the tests)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _ruff() -> list[str] | None:
    exe = Path(sys.executable).parent / "ruff"
    if exe.is_file():
        return [str(exe)]
    found = shutil.which("ruff")
    return [found] if found else None


@pytest.mark.parametrize(
    "args",
    [
        ["check", "--no-cache", "wsi_nuclei", "tests", "benchmarks", "scripts"],
        ["format", "--check", "--no-cache", "."],
    ],
    ids=["lint", "format"],
)
def test_ruff_finds_nothing(args: list[str]) -> None:
    ruff = _ruff()
    if ruff is None:
        pytest.skip(
            "ruff is not installed (it comes with the test extra: pip install -e '.[test]')"
        )
    res = subprocess.run([*ruff, *args], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-1000:]

"""wsi_nuclei._allocator: glibc's thresholds raised once per process, or left alone on request."""

from __future__ import annotations

import subprocess
import sys

import pytest

CODE = "from wsi_nuclei._allocator import keep_large_blocks_in_heap as k; print(k(), k())"


def _run(env: dict[str, str]) -> str:
    import os

    full = {**os.environ, **env}
    return subprocess.run(
        [sys.executable, "-c", CODE], capture_output=True, text=True, env=full, check=True
    ).stdout.strip()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt is Linux-only")
def test_thresholds_set_once_or_left_alone() -> None:
    assert _run({"WSI_NUCLEI_MALLOC_TUNE": "1"}) == "True True"
    assert _run({"WSI_NUCLEI_MALLOC_TUNE": "0"}) == "False False"
    assert _run({"WSI_NUCLEI_MALLOC_MB": "not-a-number"}) == "True True"  # falls back to 128 MiB

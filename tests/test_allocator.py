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


ARENAS = """
import ctypes, threading
from wsi_nuclei._allocator import keep_large_blocks_in_heap as k
k()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
blocks = []
def take():
    blocks.append(libc.malloc(1 << 16))  # a thread's first malloc picks (or makes) its arena
threads = [threading.Thread(target=take) for _ in range(6)]
[t.start() for t in threads]
[t.join() for t in threads]
libc.malloc_stats()  # one "Arena N:" block per arena, on stderr
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt is Linux-only")
def test_one_malloc_arena_unless_asked_otherwise() -> None:
    import os

    def arenas(env: dict[str, str]) -> int:
        err = subprocess.run(
            [sys.executable, "-c", ARENAS],
            capture_output=True,
            text=True,
            env={**os.environ, **env},
            check=True,
        ).stderr
        return sum(line.startswith("Arena ") for line in err.splitlines())

    assert arenas({"WSI_NUCLEI_MALLOC_TUNE": "1"}) == 1
    assert arenas({"WSI_NUCLEI_MALLOC_TUNE": "1", "WSI_NUCLEI_MALLOC_ARENAS": "0"}) > 1
    assert arenas({"WSI_NUCLEI_MALLOC_TUNE": "0"}) > 1  # glibc's own: an arena per thread

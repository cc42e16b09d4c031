"""Keep large freed blocks in the process heap (glibc), so that a network call does not map and
unmap its activations every time.

glibc serves allocations above its mmap threshold (dynamic, at most 32 MiB) with fresh ``mmap``
pages and returns them on ``free``: every network call then page-faults its activation tensors in
again (on a CPU, HoVer-Net's are about 67 MB per patch). Raising the mmap and trim thresholds to
128 MiB once per process (when the engine loads a model) keeps that memory in the heap for the
next call. Measured on 2 cores (``docs/benchmarks.md``, "Allocator"): HoVer-Net fast on the
bench_peers crop 40.8-42.1 s -> 33.0-38.5 s wall, peak RSS 1.33-1.36 -> 1.28-1.58 GB; the default
model on CMU-1-Small-Region: kernel share 8.5-9.8 % -> 5.9-7.6 %, wall unchanged within noise.

It also caps the number of malloc arenas at one (``M_ARENA_MAX``). glibc gives each thread that
allocates concurrently its own arena (up to 8 per core), and each arena grows and trims its own
heap: the engine's reader, post-processing and torch threads then fault the same memory in again
and again. Measured on CMU-1-Small-Region with the default model (2 cores, bfloat16; three runs
each): 0.43-0.96 M minor faults, kernel share 7.1-10.7 % with glibc's arenas; 0.20-0.21 M, 6.5-6.7
% and about 5 % less peak RSS with one, wall time unchanged (two arenas: 0.30-0.35 M, 8.7-10.2 %).
The engine's allocations are few and large (numpy and torch buffers; Python's small objects
have their own allocator), so one arena costs no measurable lock contention here.

It changes the allocator of the whole process (also when wsi-nuclei is used as a library):
``WSI_NUCLEI_MALLOC_TUNE=0`` leaves glibc's defaults alone, ``WSI_NUCLEI_MALLOC_MB=N`` sets
another threshold, ``WSI_NUCLEI_MALLOC_ARENAS=N`` another arena cap (0: glibc's default). A no-op
on other C libraries and platforms.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

__all__ = ["keep_large_blocks_in_heap"]

#: mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
#: Blocks up to this size (MiB) come from the heap; free memory up to it stays there.
_DEFAULT_MB = 128
_DONE = False


def _env_int(name: str, default: int) -> int:
    """The integer in environment variable ``name``; ``default`` when unset or not a number."""
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default


def keep_large_blocks_in_heap() -> bool:
    """Raise glibc's mmap and trim thresholds and cap its arenas, once per process; True when
    the thresholds were set."""
    global _DONE
    if _DONE:
        return True
    if not sys.platform.startswith("linux") or os.environ.get("WSI_NUCLEI_MALLOC_TUNE", "1") == "0":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl has no mallopt)
        return False
    threshold = min(2047, max(1, _env_int("WSI_NUCLEI_MALLOC_MB", _DEFAULT_MB))) << 20
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    ok = bool(mallopt(_M_MMAP_THRESHOLD, threshold)) and bool(mallopt(_M_TRIM_THRESHOLD, threshold))
    arenas = max(0, _env_int("WSI_NUCLEI_MALLOC_ARENAS", 1))
    if ok and arenas:
        mallopt(_M_ARENA_MAX, arenas)  # threads already holding an arena keep it
    _DONE = ok
    return ok

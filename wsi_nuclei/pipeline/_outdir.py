"""The output folder: checks before a run writes anything (existing results, --overwrite), the
folder lock against a second concurrent run, and removal of temporaries a killed run left.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

from ..errors import OutputError
from ._config import _WORK


def _prepare_out(out: Path, names: list[str], overwrite: bool) -> None:
    """Check ``out`` before anything is written: existing results need ``overwrite`` (unless an
    interrupted run left them), and the folder must be writable (:class:`OutputError` otherwise)."""
    existing = [n for n in names if (out / n).exists()]
    # outputs of a run that was interrupted while writing them (its work folder is there and
    # run.json, written last, is not) are not results: rerunning the same command replaces them
    interrupted = (out / _WORK).is_dir() and not (out / "run.json").exists()
    if existing and not overwrite and not interrupted:
        raise OutputError(
            f"{out}: results already exist ({', '.join(existing)}); use --overwrite to replace them"
        )
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise OutputError(f"{out}: output folder not writable ({exc.strerror or exc})") from None


_LOCK = ".wsi-nuclei.lock"


class _Lock:
    """An exclusive lock on ``<out>/.wsi-nuclei.lock`` held for the whole run (flock: released
    by the kernel if the process dies, so a crash never leaves the folder locked)."""

    def __init__(self, fh: Any) -> None:
        self.fh, self.owned, self.closed = fh, True, False

    def close(self) -> None:
        """Release the lock (idempotent)."""
        if not self.closed:
            self.fh.close()
            self.closed = True


def _lock(out: Path) -> _Lock:
    """Take the folder lock or raise :class:`OutputError` naming the run that holds it."""
    import fcntl

    path = out / _LOCK
    fh = open(path, "a+")
    try:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        fh.seek(0)
        who = fh.read().strip() or "another process"
        fh.close()
        raise OutputError(
            f"{out}: another wsi-nuclei run ({who}) is writing into this folder; wait for it or use another --out"
        ) from None
    fh.seek(0)
    fh.truncate()
    fh.write(f"pid {os.getpid()}")
    fh.flush()
    return _Lock(fh)


def _remove_stale_temporaries(out: Path) -> None:
    """Temporary files of a run that was killed mid-write (we hold the folder's lock: no other
    run is writing them)."""
    for folder in (out, out / _WORK, out / _WORK / "blocks", out / _WORK / "final"):
        if folder.is_dir():
            for p in folder.glob(".*.tmp-*"):
                with contextlib.suppress(OSError):
                    p.unlink()

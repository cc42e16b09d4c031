"""Small helpers shared by every writer: atomic writes (temporary name, then rename),
strict-JSON conversion, and where the shipped ``configs/`` are found."""

from __future__ import annotations

import contextlib
import errno
import math
import os
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

#: Test hook: seconds to wait between writing a file and renaming it into place, so that a
#: crash test (benchmarks/crash_resume.py) can kill a run while even a small output is half
#: done. Unset in normal use.
_SLOW_WRITES_ENV = "WSI_NUCLEI_TEST_SLOW_WRITES"

#: errno values that mean "the disk cannot take this file" (reported as OutputError, exit 7)
_DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG})


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``final``; rename it to ``final`` only on success.

    The temporary file lives in the same directory (so the rename is atomic) and is removed
    if the body raises, so a reader never sees a half-written file under its final name. A full
    or read-only disk becomes one :class:`~wsi_nuclei.errors.OutputError` (exit 7); whatever
    was complete before stays as it was.
    """
    from .errors import OutputError

    final = Path(final)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        if _SLOW_WRITES_ENV in os.environ:  # fault-injection hook, see _SLOW_WRITES_ENV
            time.sleep(float(os.environ[_SLOW_WRITES_ENV]))
        os.replace(tmp, final)
    except OSError as exc:
        if exc.errno in _DISK_ERRNOS:
            raise OutputError(
                f"{final.parent}: cannot write {final.name} ({exc.strerror or exc}); "
                "finished work is kept, free space and rerun to resume"
            ) from None
        raise
    finally:
        with contextlib.suppress(OSError):
            if tmp.exists():
                tmp.unlink()


#: Environment variable naming a folder of configs (the Docker image sets it to its ``configs/``).
CONFIGS_ENV = "WSI_NUCLEI_CONFIGS"


def find_config(path: str | os.PathLike[str]) -> Path:
    """A config file named on the command line (``--config``, ``--split``), from any working directory.

    Parameters
    ----------
    path : str or os.PathLike
        The path as given, e.g. ``configs/train_default.json``.

    Returns
    -------
    pathlib.Path
        ``path`` itself when it exists or is absolute; otherwise the first existing of: the file
        of that name in the folder ``$WSI_NUCLEI_CONFIGS``, and ``path`` relative to the source
        tree this package runs from (a checkout or editable install, which holds ``configs/``).
        When none exists, ``path`` unchanged (the caller reports it as missing).
    """
    p = Path(path)
    if p.exists() or p.is_absolute():
        return p
    candidates = []
    if os.environ.get(CONFIGS_ENV):
        candidates.append(Path(os.environ[CONFIGS_ENV]) / p.name)
    candidates.append(Path(__file__).resolve().parents[1] / p)
    for c in candidates:
        if c.is_file():
            return c
    return p


def json_ready(value: Any) -> Any:
    """Recursively turn ``value`` into strict-JSON-ready Python (NaN/inf -> None, numpy -> Python,
    paths and other objects -> str)."""
    if isinstance(value, Mapping):
        return {str(k): json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    if isinstance(value, np.ndarray):
        return [json_ready(v) for v in value.tolist()]
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        v = float(value)
        return v if math.isfinite(v) else None
    return str(value)

"""Small helpers shared by every writer: atomic writes (temporary name, then rename) and
strict-JSON conversion."""

from __future__ import annotations

import contextlib
import errno
import math
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np


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
        os.replace(tmp, final)
    except OSError as exc:
        if exc.errno in _DISK_ERRNOS:
            raise OutputError(f"{final.parent}: cannot write {final.name} ({exc.strerror or exc}); "
                              "finished work is kept, free space and rerun to resume") from None
        raise
    finally:
        with contextlib.suppress(OSError):
            if tmp.exists():
                tmp.unlink()


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

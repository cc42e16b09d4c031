"""How many CPU cores this process may use: its CPU affinity and, in a container, the cgroup's
CPU quota (``docker run --cpus 2`` leaves every host core in the affinity mask)."""

from __future__ import annotations

import math
import os
from pathlib import Path

_CGROUP = Path("/sys/fs/cgroup")


def _cgroup_quota(root: Path = _CGROUP) -> int | None:
    """Cores allowed by the cgroup's CPU quota (v2 ``cpu.max``, v1 ``cpu.cfs_quota_us``), or
    ``None`` when there is no quota (or no cgroup file to read)."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        if quota != "max" and float(period) > 0:
            return max(1, math.ceil(float(quota) / float(period)))
        return None
    except (OSError, ValueError):
        pass
    try:
        q = float((root / "cpu" / "cpu.cfs_quota_us").read_text())
        p = float((root / "cpu" / "cpu.cfs_period_us").read_text())
        return max(1, math.ceil(q / p)) if q > 0 and p > 0 else None
    except (OSError, ValueError):
        return None


def usable_cores(root: Path = _CGROUP) -> int:
    """Cores this process may run on: the smaller of its CPU affinity and the cgroup quota."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        n = os.cpu_count() or 1
    quota = _cgroup_quota(root)
    return max(1, min(n, quota) if quota else n)

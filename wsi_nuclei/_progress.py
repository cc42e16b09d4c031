"""Progress on stderr for the stages of a run: tissue, patches, stitching, writing.

Every stage ends with one line (its name, its time and what it found)::

    tissue          0.4 s  2 regions (tissue detection), 1.234 mm2; 640 patches, 12 blocks planned
    patches        32.1 s  640 patches, 19.9 patch/s
    stitching       1.2 s  12 blocks, 40 seam candidates: 17 duplicates removed, 3 trimmed
    writing         2.1 s  7 files
      nuclei.geojson.gz          0.41 s
      ...

On a terminal the stage shows live while it runs (a tqdm bar for the stages with steps, a
status line for the others) and is replaced by that line when it ends. Elsewhere (a pipe, a
CI log) nothing is drawn: a stage prints its one line when it ends, and a long bar stage (the
patches) adds a plain line at most every ``interval`` seconds, so a log is never flooded. A
stage that fails prints nothing and erases what it drew, so that the error stays the one line
the user reads. Disabled (``--quiet``), nothing is written except warnings (:meth:`Progress.warn`).

Progress is only ever written to stderr; it never touches an output file.
"""

from __future__ import annotations

import sys
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TextIO

__all__ = ["EtaEstimator", "Progress", "format_seconds"]

#: Width of the stage name column.
_NAME_WIDTH = 10


def format_seconds(seconds: float) -> str:
    """A duration for a person: ``"0.4 s"``, ``"32.1 s"``, ``"2 min 05 s"``, ``"1 h 02 min"``.

    Parameters
    ----------
    seconds : float
        The duration (negative values count as 0).

    Returns
    -------
    str
        The duration, at most three significant parts.
    """
    s = max(0.0, float(seconds))
    if s < 59.95:
        return f"{s:.1f} s"
    s = round(s)
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {(s % 3600) // 60:02d} min"


class EtaEstimator:
    """Remaining time of a stage from its completed batches, leaving out the warm-up.

    Why not tqdm's own estimate: tqdm's first rate is the first batch's size over the time
    since the bar started, and that first batch carries the model's load and warm-up (weights
    read, CUDA context and kernel selection, the Dask worker's start) and the filling of the
    pipeline (``--max-in-flight`` batches are submitted at once, so the first completion
    measures latency, not throughput). Its ETA then starts several times too long, and its
    exponential smoothing takes many updates to forget it. Here the clock starts at the end of
    the first ``warmup`` batches: the rate is the work completed since then over the time
    since then, over a sliding window of the latest ``window`` completions (so that it follows
    a slide whose later tiles are slower), and no ETA is given until ``min_samples`` batches
    have completed after the warm-up (one completion right after another, as pipelined
    batches often arrive, says nothing about the rate).

    Parameters
    ----------
    total : int
        Work units of the stage (e.g. patches).
    warmup : int, default 1
        Completions whose time is not taken as representative.
    min_samples : int, default 2
        Completions after the warm-up needed before a rate (and an ETA) is given.
    window : int, default 64
        Completions the rate is measured over (the latest ones).
    clock : callable, default time.perf_counter
        Seconds, monotonic (a fake clock in tests).
    """

    def __init__(
        self,
        total: int,
        warmup: int = 1,
        min_samples: int = 2,
        window: int = 64,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        if warmup < 0 or min_samples < 1 or window < min_samples:
            raise ValueError("need warmup >= 0, min_samples >= 1 and window >= min_samples")
        self.total = int(total)
        self.warmup = int(warmup)
        self.min_samples = int(min_samples)
        self.clock = clock
        self.start = clock()
        self.done = 0
        self.completions = 0
        # (time, work done) at the latest completions; the first is the anchor of the rate
        self._marks: deque[tuple[float, int]] = deque(maxlen=int(window) + 1)
        if self.warmup == 0:
            self._marks.append((self.start, 0))

    def update(self, n: int) -> None:
        """Record one completed batch of ``n`` work units (at the clock's present time).

        Parameters
        ----------
        n : int
            Work units the batch completed.
        """
        self.done += int(n)
        self.completions += 1
        if self.completions >= self.warmup:
            self._marks.append((self.clock(), self.done))

    @property
    def remaining(self) -> int:
        """Work units not yet completed."""
        return max(0, self.total - self.done)

    def rate(self) -> float | None:
        """Work units per second after the warm-up, or ``None`` while it is not known yet.

        Returns
        -------
        float or None
            The rate over the window, ``None`` before ``min_samples`` completions after the
            warm-up (or when they took no measurable time).
        """
        if len(self._marks) < self.min_samples + 1:
            return None
        (t0, d0), (t1, d1) = self._marks[0], self._marks[-1]
        if t1 <= t0 or d1 <= d0:
            return None
        return (d1 - d0) / (t1 - t0)

    def eta(self) -> float | None:
        """Seconds left, counted from the latest completion, or ``None`` while unknown.

        Returns
        -------
        float or None
            ``remaining / rate``; 0 when all work is done.
        """
        if self.remaining == 0:
            return 0.0
        r = self.rate()
        return None if r is None else self.remaining / r

    def overall_rate(self) -> float | None:
        """Work units per second over the whole stage so far (warm-up included), for the end line.

        Returns
        -------
        float or None
            ``None`` when no time has passed.
        """
        dt = self.clock() - self.start
        return self.done / dt if dt > 0 else None


def _plural(unit: str) -> str:
    """``"patch"`` -> ``"patches"``, ``"part"`` -> ``"parts"``."""
    return unit + ("es" if unit.endswith(("s", "x", "ch", "sh")) else "s")


def _is_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):  # closed, or a stream without isatty
        return False


class _Stage:
    """One running stage; made by :meth:`Progress.stage`."""

    def __init__(
        self, progress: Progress, name: str, doing: str, total: int | None, unit: str, eta: bool
    ) -> None:
        self.p = progress
        self.name = name
        self.doing = doing
        self.total = total
        self.unit = unit
        self.start = progress.clock()
        self.detail = ""
        self._label = ""
        self._step: tuple[str, float] | None = None
        self.steps: list[tuple[str, float]] = []
        self.estimator = EtaEstimator(total, clock=progress.clock) if (eta and total) else None
        self._bar: Any = None
        self._last_plain = self.start
        self._n = 0
        if not progress.enabled:
            return
        if progress.tty and total:
            from tqdm import tqdm

            self._bar = tqdm(
                total=total,
                desc=f"{name:<{_NAME_WIDTH}}",
                unit=unit,
                file=progress.stream,
                leave=False,
                dynamic_ncols=True,
                mininterval=0.25,
                bar_format="{desc}{percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]",
            )
            self._refresh_postfix()
        elif progress.tty:
            self._status(doing)

    # ---- live display ----------------------------------------------------------------------
    def _status(self, text: str) -> None:
        if self.p.enabled and self.p.tty and self._bar is None:
            line = f"{self.name:<{_NAME_WIDTH}} {text} ..." if text else self.name
            self.p.stream.write("\r" + line + "\x1b[K")
            self.p.stream.flush()

    def _clear(self) -> None:
        if self._bar is not None:
            self._bar.close()  # leave=False: the bar is erased
            self._bar = None
        elif self.p.enabled and self.p.tty:
            self.p.stream.write("\r\x1b[K")
            self.p.stream.flush()

    def _eta_text(self) -> str:
        est = self.estimator
        if est is None:
            return ""
        eta, rate = est.eta(), est.rate()
        if eta is None or rate is None:
            return "ETA after the first batches"
        return f"ETA {format_seconds(eta)}, {rate:.1f} {self.unit}/s"

    def _refresh_postfix(self, label: str = "") -> None:
        if self._bar is not None:
            parts = [t for t in (self._eta_text(), label) if t]
            self._bar.set_postfix_str(", ".join(parts), refresh=False)

    # ---- the stage's calls -----------------------------------------------------------------
    def update(self, n: int = 1) -> None:
        """Advance by ``n`` units (one completed batch when the stage has an ETA).

        Parameters
        ----------
        n : int, default 1
            Units completed.
        """
        self._n += int(n)
        if self.estimator is not None:
            self.estimator.update(n)
        if not self.p.enabled:
            return
        if self._bar is not None:
            self._refresh_postfix(self._label)
            self._bar.update(n)
        elif not self.p.tty and self.total and self.p.interval is not None:
            now = self.p.clock()
            if now - self._last_plain >= self.p.interval and self._n < self.total:
                self._last_plain = now
                pct = 100.0 * self._n / self.total
                eta = self._eta_text()
                self.p._line(
                    f"{self.name:<{_NAME_WIDTH}}{format_seconds(now - self.start):>9}  {self._n}/{self.total} "
                    f"{_plural(self.unit)} ({pct:.0f}%)" + (f", {eta}" if eta else "")
                )

    def label(self, text: str) -> None:
        """Show what the stage is doing now (a file being written, a pass over the blocks).

        Parameters
        ----------
        text : str
            A few words.
        """
        self._label = text
        if self._bar is not None:
            self._refresh_postfix(text)
            self._bar.refresh()
        else:
            self._status(text)

    def begin_step(self, label: str) -> None:
        """Start timing one step (one output file); it is listed under the stage's end line.

        Parameters
        ----------
        label : str
            The step's name (e.g. ``"nuclei.parquet"``).
        """
        self.end_step()
        self.label(label)
        self._step = (label, self.p.clock())

    def end_step(self, note: str = "") -> None:
        """End the step begun last (nothing when none is open) and advance the bar by one.

        Parameters
        ----------
        note : str, optional
            A few words after the step's time (e.g. ``"not written"``).
        """
        if self._step is None:
            return
        label, t = self._step
        self._step = None
        self.steps.append((label + (f"  ({note})" if note else ""), self.p.clock() - t))
        self.update(1)

    @contextmanager
    def step(self, label: str) -> Iterator[None]:
        """Time the enclosed block as one step (see :meth:`begin_step`).

        Parameters
        ----------
        label : str
            The step's name.

        Yields
        ------
        None
        """
        self.begin_step(label)
        yield
        self.end_step()

    def warn(self, line: str) -> None:
        """Print a warning line without breaking the live display (see :meth:`Progress.warn`).

        Parameters
        ----------
        line : str
            The whole line.
        """
        self.p.warn(line)

    def done(self, detail: str) -> None:
        """What the end line says after the stage's time.

        Parameters
        ----------
        detail : str
            E.g. ``"640 patches, 19.9 patch/s"``.
        """
        self.detail = detail

    def _finish(self) -> None:
        self.end_step()
        self._clear()
        if not self.p.enabled:
            return
        elapsed = self.p.clock() - self.start
        self.p._line(
            f"{self.name:<{_NAME_WIDTH}}{format_seconds(elapsed):>9}"
            + (f"  {self.detail}" if self.detail else "")
        )
        width = max((len(s) for s, _ in self.steps), default=0)
        for s, dt in self.steps:
            self.p._line(f"  {s:<{width}}  {dt:8.2f} s")

    def _abort(self) -> None:
        self._clear()


class Progress:
    """Stage progress of one run on stderr (see the module docstring).

    Parameters
    ----------
    enabled : bool, default True
        ``False`` (``--quiet``): nothing is shown but warnings.
    stream : file-like, optional
        Where to write (default: ``sys.stderr`` at the time of the call).
    tty : bool, optional
        Draw live bars and status lines (default: whether ``stream`` is a terminal).
    interval : float or None, default 60.0
        Off a terminal, the least seconds between two plain lines of a bar stage (``None``:
        only the end line).
    clock : callable, default time.perf_counter
        Seconds, monotonic (a fake clock in tests).
    """

    def __init__(
        self,
        enabled: bool = True,
        stream: TextIO | None = None,
        tty: bool | None = None,
        interval: float | None = 60.0,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.enabled = bool(enabled)
        self.stream = stream if stream is not None else sys.stderr
        self.tty = _is_terminal(self.stream) if tty is None else bool(tty)
        self.interval = interval
        self.clock = clock
        self._active: _Stage | None = None

    def _line(self, text: str) -> None:
        self.stream.write(text + "\n")
        self.stream.flush()

    @contextmanager
    def stage(
        self,
        name: str,
        doing: str = "",
        total: int | None = None,
        unit: str = "step",
        eta: bool = False,
    ) -> Iterator[_Stage]:
        """Run a stage: shown live while the block runs, one end line when it succeeds.

        Parameters
        ----------
        name : str
            The stage (``"tissue"``, ``"patches"``, ``"stitching"``, ``"writing"``).
        doing : str, optional
            What a stage without steps is doing, for its status line on a terminal.
        total : int, optional
            Steps of the stage: a bar on a terminal.
        unit : str, default "step"
            Name of one step (``"patch"``).
        eta : bool, default False
            Each :meth:`_Stage.update` is one completed batch: show the remaining time
            (:class:`EtaEstimator`) and the rate.

        Yields
        ------
        _Stage
            Call ``update``, ``label``, ``step`` and ``done`` on it.
        """
        st = _Stage(self, name, doing, total, unit, eta)
        self._active = st
        try:
            yield st
        except BaseException:
            st._abort()  # the error line must stand alone
            raise
        else:
            st._finish()
        finally:
            self._active = None

    def warn(self, line: str) -> None:
        """Print a warning line, also when disabled, without breaking a live bar.

        Parameters
        ----------
        line : str
            The whole line (``"wsi-nuclei: warning: ..."``).
        """
        st = self._active
        if st is not None and st._bar is not None:
            st._bar.clear()
            self._line(line)
            st._bar.refresh()
        else:
            if self.enabled and self.tty and st is not None:
                self.stream.write("\r\x1b[K")
            self._line(line)
            if st is not None:
                st._status(st._label or st.doing)

"""Running a strip: :func:`run_strip` feeds batches to an executor, blends their maps as they
finish, submits blocks whose windows are final and hands each finished block to a callback;
lost work is resubmitted.

Executors: :class:`InlineExecutor` (everything at once in the calling thread: images in
memory), :class:`ThreadExecutor` (a pool of threads in this process: a local run with one
worker) and :class:`DaskExecutor` (a ``dask.distributed`` client: worker processes or an
external cluster).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor
from concurrent.futures import wait as _wait_futures
from typing import Any

from ._blocks import process_block
from ._context import EngineContext, model_of
from ._patches import fill_values, infer_patches, read_patches
from .blend import MapBlender
from .strips import Strip, patches_for_window


class _Done:
    """A finished future (inline execution)."""

    def __init__(self, fn: Callable, args: tuple) -> None:
        args = tuple(a.result() if isinstance(a, _Done) else a for a in args)
        try:
            self._value, self._exc = fn(*args), None
        except BaseException as exc:  # re-raised by result()
            self._value, self._exc = None, exc

    def done(self) -> bool:
        return True

    def result(self) -> Any:
        if self._exc is not None:
            raise self._exc
        return self._value

    def release(self) -> None:
        pass


class InlineExecutor:
    """Runs every task at once in the calling thread (images in memory, tests)."""

    def submit(self, fn: Callable, *args: Any) -> _Done:
        return _Done(fn, args)

    def put(self, obj: Any) -> Any:
        return obj

    def wait_any(self, futures: list) -> None:
        return None


class _ThreadFuture(Future):
    """A task of :class:`ThreadExecutor` (a ``concurrent.futures.Future`` with ``release``)."""

    def release(self) -> None:
        pass


class ThreadExecutor:
    """Runs tasks on ``threads`` threads of this process.

    A task whose arguments include futures of this executor starts once they are all done,
    with their results in their place (as Dask passes a future's value); if one of them
    failed, the task fails with that error without running. Windows are passed by reference
    (``put`` is the identity). The local default: a ``dask.distributed`` client in-process
    spends about 10 ms of Python per task in its scheduler, under the interpreter lock that
    the tasks' own Python needs (``docs/benchmarks.md``).
    """

    def __init__(self, threads: int) -> None:
        self._pool = ThreadPoolExecutor(max(1, int(threads)), thread_name_prefix="wsi-nuclei")
        self._lock = threading.Lock()
        self._waiting: set[_ThreadFuture] = set()  # submitted, not started

    def submit(self, fn: Callable, *args: Any) -> _ThreadFuture:
        out = _ThreadFuture()
        deps = [a for a in args if isinstance(a, Future)]
        # the function and its inputs, dropped when the task starts: an input future holds
        # this task's callback, so keeping them would make a cycle that holds the inputs'
        # results (patches, maps) until the garbage collector runs
        task: list[Any] = [fn, args]
        with self._lock:
            self._waiting.add(out)

        def call() -> None:
            with self._lock:
                self._waiting.discard(out)
            f, a = task
            task.clear()
            if not out.set_running_or_notify_cancel():  # cancelled before it started
                return
            try:
                values = tuple(x.result() if isinstance(x, Future) else x for x in a)
                del a
                out.set_result(f(*values))
            except BaseException as exc:  # re-raised by result()
                out.set_exception(exc)

        if not deps:
            self._pool.submit(call)
            return out
        left = [len(deps)]

        def dep_done(_: Future) -> None:
            with self._lock:
                left[0] -= 1
                ready = left[0] == 0
            if ready:
                try:
                    self._pool.submit(call)
                except RuntimeError:  # the pool was shut down (the run stopped)
                    out.cancel()

        for d in deps:
            d.add_done_callback(dep_done)
        return out

    def put(self, obj: Any) -> Any:
        return obj

    def wait_any(self, futures: list) -> None:
        if futures:
            _wait_futures(futures, return_when=FIRST_COMPLETED)

    def close(self) -> None:
        """Stop the pool: tasks not started are cancelled, running ones finish."""
        with self._lock:
            waiting, self._waiting = list(self._waiting), set()
        for fut in waiting:
            fut.cancel()
        self._pool.shutdown(wait=True, cancel_futures=True)


class DaskExecutor:
    """Submits tasks to a ``dask.distributed`` client."""

    def __init__(self, client: Any) -> None:
        self.client = client

    def submit(self, fn: Callable, *args: Any) -> Any:
        return self.client.submit(fn, *args, pure=False)

    def put(self, obj: Any) -> Any:
        # a worker that just died may still be chosen: try again (the scheduler drops it)
        for attempt in range(6):
            try:
                return self.client.scatter(obj, direct=True)
            except Exception as exc:
                if attempt == 5 or not (_lost_work(exc) or isinstance(exc, OSError)):
                    raise
                time.sleep(0.5 * (attempt + 1))
        raise AssertionError("unreachable")

    def wait_any(self, futures: list) -> None:
        from distributed import wait

        if futures:
            try:
                wait(futures, return_when="FIRST_COMPLETED")
            except (
                Exception
            ):  # e.g. futures cancelled with a lost worker: the caller sees them as done
                pass


def _lost_work(exc: BaseException) -> bool:
    """An error that means "the worker (or its data) went away", not "the task failed"."""
    names = {t.__name__ for t in type(exc).__mro__}
    return bool(
        names
        & {
            "KilledWorker",
            "CancelledError",
            "FutureCancelledError",
            "CommClosedError",
            "FutureLostError",
        }
    )


def run_strip(
    ctx: EngineContext,
    strip: Strip,
    ex: Any,
    *,
    todo: set[tuple[int, int]] | None = None,
    on_block: Callable[[tuple[int, int], Any, dict], None],
    on_batch: Callable[[int, dict], None] | None = None,
    max_in_flight: int = 4,
    max_post: int = 2,
) -> dict[str, float]:
    """Run one strip: infer its batches in order, blend, post-process blocks as they become ready.

    Parameters
    ----------
    todo : set of (row, col), optional
        Blocks still to do (resume); only batches with a patch they need are inferred.
    on_block : callable(block, frame, stats)
        Called in the coordinator for every finished block (e.g. to save its part file).
    on_batch : callable(n_patches, stats), optional
        Called for every inferred batch (progress).

    Returns
    -------
    dict
        ``t_read``, ``t_infer`` and ``t_post`` summed over tasks, ``n_patches`` inferred,
        ``peak_band_bytes``.
    """
    bg, pg = ctx.blocks, ctx.patches
    blocks = [b for b in strip.blocks if todo is None or b in todo]
    if todo is None:
        run_batches = list(range(len(strip.batches)))
    else:
        need: set[tuple[int, int]] = set()
        for r, c in blocks:
            rows, cols = patches_for_window(pg, bg.window_box(r, c))
            need.update((pr, pc) for pr in rows for pc in cols)
        run_batches = [i for i, b in enumerate(strip.batches) if any(p in need for p in b)]
    stats = {
        "t_read": 0.0,
        "t_infer": 0.0,
        "t_post": 0.0,
        "n_patches": 0,
        "peak_band_bytes": 0,
        "oom_batch_splits": 0,
        "post_retries": 0,
    }
    if not blocks:
        return stats
    blender: MapBlender | None = None
    layout: tuple = ()
    infer_q: deque = deque()
    nxt = 0
    pending = deque(blocks)  # not yet submitted, row-major (window bottoms non-decreasing)
    posts: dict[Any, tuple[tuple[int, int], Any, int]] = {}
    model = model_of(ctx)

    def ensure_blender(n_channels: int) -> MapBlender:
        nonlocal blender
        if blender is None:
            blender = MapBlender(pg, strip.x0, strip.x1, n_channels, fill_values(model, layout))
        return blender

    if not run_batches:  # nothing to infer: every window is fill
        layout = getattr(model, "map_layout", ())
        ensure_blender(sum(k for _, k, _ in layout)).finish()
    try:
        while pending or posts:
            while len(infer_q) < max_in_flight and nxt < len(run_batches):
                bi = run_batches[nxt]
                rd = ex.submit(read_patches, ctx, strip.batches[bi])
                infer_q.append((bi, ex.submit(infer_patches, ctx, rd)))
                nxt += 1
            progressed = False
            if infer_q and infer_q[0][1].done():
                bi, fut = infer_q.popleft()
                maps, lay, t_read, t_inf, n_split = fut.result()
                stats["oom_batch_splits"] += n_split
                fut.release()
                if blender is None:
                    layout = lay
                bl = ensure_blender(maps.shape[1])
                for p, m in zip(strip.batches[bi], maps):
                    bl.add(p, m)
                stats["t_read"] += t_read
                stats["t_infer"] += t_inf
                stats["n_patches"] += len(maps)
                if on_batch is not None:
                    on_batch(len(maps), {"t_read": t_read, "t_infer": t_inf})
                if nxt == len(run_batches) and not infer_q:
                    bl.finish()
                progressed = True
            if blender is not None:
                stats["peak_band_bytes"] = max(stats["peak_band_bytes"], blender.nbytes)
                while (
                    pending
                    and len(posts) < max_post
                    and bg.window_box(*pending[0])[3] <= blender.final_y
                ):
                    b = pending.popleft()
                    win = blender.window(bg.window_box(*b)) if blender.c else None
                    fut = ex.submit(
                        process_block, ctx, b, ex.put(win) if win is not None else None, layout
                    )
                    posts[fut] = (b, win, 0)
                    progressed = True
                blender.drop_before(min((bg.window_box(*b)[1] for b in pending), default=1 << 60))
            for fut in [f for f in posts if f.done()]:
                b, win, tries = posts.pop(fut)
                try:
                    frame, st = fut.result()
                except Exception as exc:
                    # a worker died with the block's window (scattered data is not recomputed):
                    # the coordinator still holds the window, so the block is simply resubmitted
                    if not _lost_work(exc) or tries >= 3:
                        raise
                    fut2 = ex.submit(
                        process_block, ctx, b, ex.put(win) if win is not None else None, layout
                    )
                    posts[fut2] = (b, win, tries + 1)
                    stats["post_retries"] += 1
                    progressed = True
                    continue
                fut.release()
                stats["t_post"] += st.get("t_post", 0.0)
                on_block(b, frame, st)
                progressed = True
            if not progressed:
                ex.wait_any(([infer_q[0][1]] if infer_q else []) + list(posts))
    finally:
        for _, fut in infer_q:
            getattr(fut, "cancel", lambda: None)()
        for fut in posts:
            getattr(fut, "cancel", lambda: None)()
    return stats

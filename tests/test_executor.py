"""The in-process executor of a local run (engine ``ThreadExecutor``): dependencies passed as
values, failures passed on, no thread held while a task waits for its inputs, cancellation."""

from __future__ import annotations

import gc
import threading
import time
import weakref

import pytest

from wsi_nuclei.engine import ThreadExecutor


@pytest.fixture
def ex():
    e = ThreadExecutor(2)
    yield e
    e.close()


def test_a_task_gets_the_values_of_the_futures_it_was_given(ex: ThreadExecutor) -> None:
    order: list[str] = []

    def first() -> int:
        time.sleep(0.05)
        order.append("first")
        return 20

    def second(a: int, b: int) -> int:
        order.append("second")
        return a + b

    fa = ex.submit(first)
    fb = ex.submit(second, fa, 22)
    assert fb.result(timeout=10) == 42
    assert order == ["first", "second"]
    fb.release()  # the futures API run_strip uses


def test_a_failed_input_fails_the_task_without_running_it(ex: ThreadExecutor) -> None:
    ran: list[bool] = []

    def bad() -> None:
        raise ValueError("corrupt tile")

    def after(x: object) -> None:
        ran.append(True)

    f = ex.submit(after, ex.submit(bad))
    with pytest.raises(ValueError, match="corrupt tile"):
        f.result(timeout=10)
    assert ran == []


def test_a_waiting_task_holds_no_thread(ex: ThreadExecutor) -> None:
    """Two threads: one is busy, a second task waits for it; a third, independent task must
    still run (a pool thread blocked on the dependency would leave it queued)."""
    gate = threading.Event()
    blocker = ex.submit(gate.wait, 10)
    dependent = ex.submit(lambda ok: ok, blocker)
    free = ex.submit(lambda: "ran")
    try:
        assert free.result(timeout=5) == "ran"
        assert not dependent.done()
    finally:
        gate.set()
    assert dependent.result(timeout=10) is True


def test_wait_any_returns_when_one_is_done(ex: ThreadExecutor) -> None:
    gate = threading.Event()
    slow = ex.submit(gate.wait, 10)
    fast = ex.submit(lambda: 1)
    ex.wait_any([slow, fast])
    assert fast.done() and not slow.done()
    gate.set()
    ex.wait_any([])  # nothing to wait for: returns at once


def test_a_cancelled_task_never_runs_and_close_cancels_the_queued_ones() -> None:
    ex = ThreadExecutor(1)
    gate = threading.Event()
    ran: list[int] = []
    busy = ex.submit(gate.wait, 10)
    queued = ex.submit(ran.append, 1)
    after = ex.submit(ran.append, busy)  # waits for an input
    cancelled = ex.submit(ran.append, 2)
    assert cancelled.cancel()
    closer = threading.Thread(target=ex.close)
    closer.start()
    time.sleep(0.2)  # close has cancelled what had not started, and waits for `busy`
    gate.set()
    closer.join(10)
    assert not closer.is_alive()
    assert busy.result() is True
    assert queued.cancelled() and after.cancelled() and cancelled.cancelled()
    assert ran == []


class _Result:  # weakly referenceable stand-in for a batch's patches or maps
    pass


def test_finished_results_are_freed_without_the_garbage_collector(ex: ThreadExecutor) -> None:
    """A task's inputs are dropped once it has run: no reference cycle between a future and
    the task waiting for it keeps a batch's patches alive until the collector runs."""
    refs = []
    gc.disable()
    try:
        for _ in range(3):
            read = ex.submit(_Result)
            infer = ex.submit(lambda r: (refs.append(weakref.ref(r)), _Result())[1], read)
            maps = weakref.ref(infer.result(timeout=10))
            del read, infer
            time.sleep(0.05)  # the pool thread lets go of the finished task
            assert maps() is None
        assert [r() for r in refs] == [None, None, None]
    finally:
        gc.enable()
